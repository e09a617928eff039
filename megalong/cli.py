"""What every megalong CLI does around its work: one-line errors, exit code 2, no traceback."""

import sys

from megalong.errors import MegalongError


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
