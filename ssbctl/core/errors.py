"""Errors that the CLI reports on one line with exit code 2, without a traceback."""


class UserError(Exception):
    """A problem with what the user gave: a bad recipe, a missing file, an unknown name."""


class TrainingError(Exception):
    """Training cannot go on (for example: the loss stays non-finite); exit code 1."""


class DataError(Exception):
    """The data cannot be used as asked (for example: too many unreadable videos); exit code 1."""
