"""A trained run at work: loading it (:func:`load_run`) and embedding texts and video files."""
