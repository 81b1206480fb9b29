"""glog-style logging, so that tools written for Caffe's logs (parse_log.py, extract_seconds.py) read ours."""
import logging
import os
import sys
import time

_LEVEL_LETTER = {logging.DEBUG: "I", logging.INFO: "I", logging.WARNING: "W", logging.ERROR: "E",
                 logging.CRITICAL: "F"}


class GlogFormatter(logging.Formatter):
    """Formats records as `I1127 08:00:01.123456 12345 solver.py:228] message`."""

    def format(self, record):
        seconds = record.created
        stamp = time.strftime("%m%d %H:%M:%S", time.localtime(seconds))
        micros = int((seconds - int(seconds)) * 1e6)
        letter = _LEVEL_LETTER.get(record.levelno, "I")
        return (f"{letter}{stamp}.{micros:06d} {os.getpid():5d} "
                f"{record.filename}:{record.lineno}] {record.getMessage()}")


logger = logging.getLogger("kaffe")


def init_log(level=logging.INFO, stream=None):
    """Send kaffe's log to `stream` (stderr by default, as Caffe's tools do) in glog format."""
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(GlogFormatter())
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
