"""``python -m ssbctl`` (and ``torchrun -m ssbctl``)."""

from ssbctl.cli.app import run

run()
