"""The one exception type users see: a one-line message naming what is wrong and how to fix it."""


class UserError(Exception):
    """Bad input (data, config, checkpoint). The CLI prints it as one line and exits with code 2."""
