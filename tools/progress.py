"""Progress of the long tools: a tqdm bar when the stream (stderr) is a terminal; on a pipe or a file one line
per 10% (or nothing, for tools whose log already says how far they are), so logs and CI output stay clean.
A stream of None (the tools' --quiet) shows nothing.
"""
import sys

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ..engine.log import logger


def add_quiet_flag(parser):
    parser.add_argument("--quiet", action="store_true", help="no progress bar or progress lines")


def stream(quiet):
    """Where a tool's progress goes: stderr, or nowhere with --quiet."""
    return None if quiet else sys.stderr


def is_terminal(stream):
    return stream is not None and getattr(stream, "isatty", lambda: False)()


class Progress:
    """Counts `total` steps of `what`. update(n) after each; the bar closes itself at the total (or use it as a
    context manager). unit="B" counts bytes (shown as kB/MB). lines=False: nothing unless on a terminal."""

    def __init__(self, total, what, stream=sys.stderr, unit="it", lines=True):
        self.total, self.what, self.stream, self.unit = total, what, stream, unit
        self.done = 0
        self._bar = self._redirect = None
        if is_terminal(stream):
            # kaffe's log lines go through tqdm.write meanwhile, above the bar instead of through it
            self._redirect = logging_redirect_tqdm([logger])
            self._redirect.__enter__()
            self._bar = tqdm(total=total or None, desc=what, file=stream, unit=unit, unit_scale=unit == "B",
                             unit_divisor=1024 if unit == "B" else 1000, dynamic_ncols=True)
        elif not lines:
            self.stream = None
        self._every = max(1, total // 10) if total else 1 << 24
        self._next = self._every

    def update(self, step=1):
        self.done += step
        if self._bar is not None:
            self._bar.update(step)
            if self.total and self.done >= self.total:
                self.close()
        elif self.stream is not None and self.done >= min(self._next, self.total or self._next):
            self._next = self.done + self._every
            self.stream.write(self._line() + "\n")
            self.stream.flush()

    def _line(self):
        if not self.total:
            return f"{self.what}: {self._amount(self.done)}"
        share = self.done / self.total
        return (f"{self.what}: [{'#' * int(30 * share):<30}] {self._amount(self.done)}/{self._amount(self.total)} "
                f"({100 * share:.0f}%)")

    def _amount(self, n):
        return f"{n / 1e6:.1f} MB" if self.unit == "B" else str(n)

    def close(self):
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            self._redirect.__exit__(None, None, None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
