"""The one exception type that reaches users as a single line instead of a traceback."""


class UserError(Exception):
    """Bad input or settings: the message names the file or setting and how to fix it."""
