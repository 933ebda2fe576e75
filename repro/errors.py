"""Errors that reach the user as one line and exit status 2 instead of a traceback."""


class UserError(Exception):
    """Bad input from the user (a suite file, a flag, a missing dataset): reported as one line, exit 2."""


def printable(text: str) -> str:
    """``text`` with its control characters escaped (``\\n``, ``\\x1b``), for a value quoted in a one-line message: it
    can neither start a line of its own on the terminal nor rewrite one."""
    return "".join(char if char.isprintable() else ascii(char)[1:-1] for char in text)
