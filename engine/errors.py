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


class KaffeOSError(KaffeError, OSError):
    """A file that cannot be read where pycaffe raises OSError (caffe.io.load_image of a file that is no image)."""


class KaffeFileNotFoundError(KaffeOSError, FileNotFoundError):
    """A missing file where pycaffe raises FileNotFoundError (caffe.io.load_image of a missing image)."""


class KaffeImportError(KaffeError, ImportError):
    """A missing package where pycaffe fails to import it (scikit-image, Detector's selective search)."""


class KaffeKeyError(KaffeError, KeyError):
    """A missing name where pycaffe raises KeyError; shows its message as plain text, not as a quoted key."""

    def __str__(self):
        return str(self.args[0]) if self.args else ""


class KaffeAttributeError(KaffeError, AttributeError):
    """An unknown name where pycaffe raises AttributeError (a NetSpec layer field that the schema does not have)."""


class KaffeMissingAttributeKeyError(KaffeKeyError, AttributeError):
    """A missing name that pycaffe reports as KeyError from attribute access (NetSpec's `n.missing`); being an
    AttributeError too keeps hasattr(), getattr(n, name, default) and copy working."""


class KaffeRuntimeError(KaffeError, RuntimeError):
    """A failure where pycaffe raises RuntimeError (coord_map between tops that no spatial layers connect)."""


class KaffeAssertionError(KaffeError, AssertionError):
    """A failed check where pycaffe asserts (coord_map.crop of a scale mismatch or a negative offset)."""


# most specific first: the builtin class of a user's exception -> the KaffeError that is also that class
_LIKE = ((FileNotFoundError, KaffeFileNotFoundError), (OSError, KaffeOSError), (ImportError, KaffeImportError),
         (KeyError, KaffeKeyError), (IndexError, KaffeIndexError), (AttributeError, KaffeAttributeError),
         (ValueError, KaffeValueError), (TypeError, KaffeTypeError), (RuntimeError, KaffeRuntimeError),
         (AssertionError, KaffeAssertionError))


def error_like(error, message):
    """A KaffeError saying `message` that is also `error`'s builtin class: a Python layer's own exception, which
    pycaffe passes on, so `except RuntimeError:` around the user's code still catches it."""
    for builtin, kaffe_class in _LIKE:
        if isinstance(error, builtin):
            return kaffe_class(message)
    return KaffeError(message)
