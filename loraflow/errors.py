"""The one base of failures a user can act on: the message says what to do, the CLI prints it without a traceback."""


class LoraflowError(RuntimeError):
    pass


class InputError(LoraflowError):
    """A bad config, bad data or a missing file: the same on every attempt, so tasks fail at once (no retry)."""
