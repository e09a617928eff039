"""The one error type users see: CLIs print its message on one line and exit 2."""


class MegalongError(Exception):
    """Bad input or configuration; the message names the offending values and the fix."""
