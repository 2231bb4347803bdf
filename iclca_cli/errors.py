"""The one exception type the command line turns into `error: ...` + `hint: ...` and exit code 2."""


class IclcaError(Exception):
    """Bad usage or bad input: a one-line message and a hint on what to do instead."""

    def __init__(self, message: str, hint: str):
        super().__init__(message)
        self.message = message
        self.hint = hint
