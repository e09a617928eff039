"""The one user-facing error type, and what every megalong CLI does with it: one line on
stderr, exit code 2, no traceback (tracebacks are for bugs)."""

import sys


class MegalongError(Exception):
    """Bad input or configuration; the message names the offending values and the fix."""


def run_cli(main, argv=None) -> int:
    try:
        main(argv)
    except MegalongError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
