"""What a data layer does with a record that does not decode (a truncated Datum, a wrong size, an image that
cannot be read): stop with the source, the key or line and the reason (Caffe stops too), or, with
`kaffe train --skip_bad_records`, log it, count it and read the next record instead.
"""
import itertools
import threading

from .errors import KaffeError
from .log import logger

_skip = False
_skipped = itertools.count(1)   # records skipped in this process (the prefetch threads share it)
_lock = threading.Lock()


def set_skip_bad_records(skip):
    global _skip
    _skip = bool(skip)


class RecordChecker:
    """One per data source: `bad(error)` raises the error, or when skipping logs and counts it; a source whose
    every record is bad (`total()` of them in a row) stops all the same, instead of reading forever."""

    def __init__(self, source, total):
        self.source, self.total = source, total
        self.in_a_row = 0

    def bad(self, error):
        if not _skip:
            raise error
        self.in_a_row += 1
        if self.in_a_row >= self.total():
            raise KaffeError(f"{error}; every record of {self.source} is bad ({self.in_a_row} in a row)")
        with _lock:
            count = next(_skipped)
        logger.warning(f"Skipped bad record #{count} (--skip_bad_records): {error}")

    def good(self):
        self.in_a_row = 0
