"""Reading and writing protobuf files: prototxt (text) and binary (.caffemodel, .solverstate, .binaryproto).

Every failure becomes a KaffeError naming the file (and line and column for text), and binary files
are written atomically so that an interrupted write never destroys an earlier file.
"""
import contextlib
import os
import re
import tempfile

from google.protobuf import text_format
from google.protobuf.message import DecodeError

from .errors import KaffeError, StorageError
from .upgrade import rewrite_fork_spellings, unknown_field_hint

_UNKNOWN_FIELD = re.compile(r'has no field named "(\w+)"')
MAX_DETAIL = 300


def _read_bytes(path, what):
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise KaffeError(f"{path}: file not found (expected a {what} file)") from None
    except IsADirectoryError:
        raise KaffeError(f"{path}: is a directory, not a {what} file") from None
    except OSError as e:
        raise KaffeError(f"{path}: cannot read the {what} file: {e.strerror}") from None
    except ValueError:   # a NUL byte in the name, e.g. a learned_net read from a damaged .solverstate
        raise KaffeError(f"{path!r}: not a file name (it holds a NUL byte)") from None


def parse_text_proto(text, message, source="<string>"):
    """Parse protobuf text into `message`; errors name source:line:column and the offending field.

    A fork's `pooling_param { ceil_mode: ... }` is read as `round_mode` (logged); for another unknown field
    the error says when it comes from a Caffe fork.
    """
    text = rewrite_fork_spellings(text, source)
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as e:
        line, column = e.GetLine(), e.GetColumn()
        where = f"{source}:{line}:{column}" if line is not None else source
        detail = str(e)
        prefix = f"{line}:{column} : "
        if detail.startswith(prefix):
            detail = detail[len(prefix):]
        if len(detail) > MAX_DETAIL:   # protobuf quotes the offending text, which may be a whole file's line
            detail = detail[:MAX_DETAIL] + "..."
        unknown = _UNKNOWN_FIELD.search(detail)
        hint = unknown_field_hint(unknown.group(1)) if unknown else ""
        raise KaffeError(f"{where}: error parsing {message.DESCRIPTOR.name} text: {detail}{hint}") from None
    return message


def read_text_proto(path, message):
    data = _read_bytes(path, message.DESCRIPTOR.name)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise KaffeError(f"{path}: not a text prototxt file (it is binary; "
                         f"expected a {message.DESCRIPTOR.name} in protobuf text format)") from None
    return parse_text_proto(text, message, str(path))


def read_binary_proto(path, message):
    """Parse a binary protobuf file of any size (Caffe's weights exceed protobuf's default 64 MB limit)."""
    data = _read_bytes(path, message.DESCRIPTOR.name)
    try:
        message.ParseFromString(data)
    except DecodeError as e:
        raise KaffeError(f"{path}: not a valid binary {message.DESCRIPTOR.name} "
                         f"(truncated or not a protobuf file: {e})") from None
    bad = _non_text_field(message)
    if bad:
        raise KaffeError(f"{path}: not a valid binary {message.DESCRIPTOR.name}: its field {bad} is not UTF-8 "
                         f"text (a damaged file?)")
    return message


def _non_text_field(message):
    """The name of a string field holding bytes that are not UTF-8 (protobuf then returns bytes, not str)."""
    for field, value in message.ListFields():
        values = value if field.is_repeated else [value]
        if field.type == field.TYPE_STRING and any(isinstance(v, bytes) for v in values):
            return field.full_name
        if field.type == field.TYPE_MESSAGE:
            for item in values:
                bad = _non_text_field(item)
                if bad:
                    return bad
    return None


TEMP_PREFIX = ".tmp-"   # temporary files are TEMP_PREFIX + the target's name + a random suffix


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path):
    """A temporary path beside `path` to write; on success it is flushed to disk and renamed onto `path`, and the
    folder synced so that the rename survives a power cut; on failure it is removed. At every instant `path` is
    either the earlier file or the complete new one. A failed write (a full disk, `ulimit -f`) is a
    StorageError."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{os.path.basename(path)}.", dir=directory)
    except OSError as e:
        raise StorageError(f"cannot write {path}: {e.strerror}", e.errno) from None
    os.close(fd)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(error, OSError) and not isinstance(error, KaffeError):
            raise StorageError(f"cannot write {path}: {error.strerror or error} (the partial file was removed)",
                               error.errno) from None
        raise
    with contextlib.suppress(OSError):   # not every file system syncs folders; the file is on disk already
        _fsync(directory)


def write_file_atomically(path, payload):
    """Write bytes to `path` through atomic_path."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(payload)


def write_binary_proto(message, path):
    write_file_atomically(path, message.SerializeToString())


def write_text_proto(message, path):
    write_file_atomically(path, text_format.MessageToString(message).encode("utf-8"))
