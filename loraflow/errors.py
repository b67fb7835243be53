"""The one base of failures a user can act on: the message says what to do, the CLI prints it without a traceback."""


class LoraflowError(RuntimeError):
    pass
