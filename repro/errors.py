"""Errors that reach the user as one line and exit status 2 instead of a traceback."""


class UserError(Exception):
    """Bad input from the user (a suite file, a flag, a missing dataset): reported as one line, exit 2."""
