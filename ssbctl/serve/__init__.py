"""``ssbctl serve``: a local search page and JSON API over an index and the run that built it.

The web framework is an optional extra (``pip install 'ssbctl[serve]'``): importing this package
does not import it; :mod:`ssbctl.serve.app` does."""
