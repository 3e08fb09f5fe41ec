"""The one exception type a user sees as a one-line error."""


class UserError(Exception):
    """A problem with the user's input or environment: printed as one line, exit status 2."""
