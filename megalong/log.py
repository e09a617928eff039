"""What megalong prints while it works (torch-free): `log`, one line on stderr from rank 0 (RANK
from the environment, as torchrun sets it), and `ProgressPrinter`, progress lines at most every
so many seconds plus the final one."""

import os
import sys
import time
from collections.abc import Callable
from typing import Union


def is_rank_zero() -> bool:
    return os.environ.get("RANK", "0") == "0"


def log(message: str, *, every_rank: bool = False) -> None:
    """`[megalong] message` on stderr: from rank 0 only, unless `every_rank`."""
    if every_rank or is_rank_zero():
        print(f"[megalong] {message}", file=sys.stderr, flush=True)


class ProgressPrinter:
    """Progress lines on a stream (stderr by default): at most one every `interval_s` seconds
    (default 0.5 on a terminal, 10 otherwise) and always the final one. On a terminal an
    `updating` printer rewrites one line (carriage return) until the final line."""

    def __init__(self, *, interval_s: float | None = None, stream=None, enabled: bool = True,
                 updating: bool = True):
        self.stream = (stream or sys.stderr) if enabled else None
        self.tty = self.stream is not None and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.interval_s = interval_s if interval_s is not None else (0.5 if self.tty else 10.0)
        self.updating = updating and self.tty
        self.start = self.last = time.monotonic()

    @property
    def enabled(self) -> bool:
        return self.stream is not None

    def elapsed(self) -> float:
        return max(time.monotonic() - self.start, 1e-9)

    def update(self, line: Union[str, Callable[[], str]], *, final: bool = False) -> bool:
        """Prints `line` (a string, or a callable making it, called only when printing) if the
        interval has passed or it is `final`; returns whether it printed."""
        if self.stream is None:
            return False
        now = time.monotonic()
        if not final and now - self.last < self.interval_s:
            return False
        self.last = now
        end = "\r" if self.updating and not final else "\n"
        print(line() if callable(line) else line, end=end, file=self.stream, flush=True)
        return True
