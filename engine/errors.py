"""The one exception type kaffe raises for bad input.

The command line prints its message as one paragraph and exits non-zero; Python users catch it.
"""


class KaffeError(Exception):
    """A user-facing error: a bad prototxt, a missing file, a shape mismatch, a diverged training."""
