"""The one exception type kaffe raises for bad input.

The command line prints its message as one paragraph and exits non-zero; Python users catch it.
"""


class KaffeError(Exception):
    """A user-facing error: a bad prototxt, a missing file, a shape mismatch, a diverged training."""


class StorageError(KaffeError, OSError):
    """A file could not be written (a full disk, `ulimit -f`, a read-only or missing folder); `errno` says why."""

    def __init__(self, message, errno=None):
        super().__init__(message)
        self.errno = errno


# where pycaffe raises a builtin class, kaffe raises one of these, so that `except ValueError:` still works
class KaffeValueError(KaffeError, ValueError):
    """Bad input where pycaffe raises ValueError (a Transformer mean of the wrong shape, an unknown layer name)."""


class KaffeTypeError(KaffeError, TypeError):
    """Bad input where pycaffe raises TypeError (a NetSpec bottom that is not a Top)."""


class KaffeIndexError(KaffeError, IndexError):
    """An index out of range where pycaffe raises IndexError (a layer index of net._forward)."""


class KaffeKeyError(KaffeError, KeyError):
    """A missing name where pycaffe raises KeyError; shows its message as plain text, not as a quoted key."""

    def __str__(self):
        return str(self.args[0]) if self.args else ""


class StorageError(KaffeError, OSError):
    """A file could not be written (a full disk, `ulimit -f`, a read-only or missing folder); `errno` says why."""

    def __init__(self, message, errno=None):
        super().__init__(message)
        self.errno = errno
