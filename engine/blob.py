"""Blob: an N-d float32 array of data and a same-shaped array of gradients (diff), as in Caffe."""
import math

import numpy as np

from . import device, opencl
from .errors import KaffeError
from .memory_limits import BlobShapeError, check_count
from .syncedmem import HEAD_AT_GPU, SyncedMemory

MAX_BLOB_AXES = 32


class Blob:
    def __init__(self, *shape):
        self._shape = ()
        self._count = 0
        self._data = None
        self._diff = None
        if shape:
            self.reshape(*shape)

    # -- shape ------------------------------------------------------------------------------
    def reshape(self, *shape):
        """Reshape to `shape` (ints, a sequence, or a BlobShape); memory is kept when it is big enough."""
        if len(shape) == 1 and not isinstance(shape[0], (int, np.integer)):
            shape = shape[0]
            if hasattr(shape, "dim"):
                shape = shape.dim
        shape = tuple(int(d) for d in shape)
        if shape == self._shape and self._data is not None:
            return  # layers reshape their tops on every forward, as in Caffe: mostly to the same shape
        if len(shape) > MAX_BLOB_AXES:
            raise BlobShapeError(f"blob shape {shape} has more than {MAX_BLOB_AXES} axes")
        if any(d < 0 for d in shape):
            raise BlobShapeError(f"blob shape {shape} has a negative dimension")
        count = check_count(shape)  # refused here, before anything is allocated
        self._shape = shape
        self._count = count
        # memory is kept when it is big enough, as Caffe keeps its capacity
        if self._data is None or count > self._data.count:
            self._data = SyncedMemory(count)
        if self._diff is None or count > self._diff.count:
            self._diff = SyncedMemory(count)

    def reshape_like(self, other):
        self.reshape(other.shape)

    @property
    def shape(self):
        return self._shape

    @property
    def num_axes(self):
        return len(self._shape)

    @property
    def count(self):
        return self._count

    def count_axes(self, start, end=None):
        """Product of the dimensions in [start, end) (Caffe's count(start, end))."""
        end = self.num_axes if end is None else end
        return math.prod(self._shape[start:end])

    def canonical_axis_index(self, axis):
        """Turn a possibly negative axis into an index in [0, num_axes), or raise."""
        n = self.num_axes
        if not -n <= axis < n:
            raise KaffeError(f"axis {axis} out of range for a {n}-D blob of shape {self.shape_string()}")
        return axis + n if axis < 0 else axis

    def legacy_shape(self, index):
        """Caffe's num/channels/height/width view: blobs of fewer than 4 axes read 1 beyond their end."""
        if self.num_axes > 4:
            raise KaffeError(f"legacy accessors need at most 4 axes; blob has shape {self.shape_string()}")
        if index >= self.num_axes or index < -self.num_axes:
            return 1
        return self._shape[index]

    num = property(lambda self: self.legacy_shape(0))
    channels = property(lambda self: self.legacy_shape(1))
    height = property(lambda self: self.legacy_shape(2))
    width = property(lambda self: self.legacy_shape(3))

    def shape_string(self):
        return " ".join(str(d) for d in self._shape) + f" ({self._count})"

    # -- memory -------------------------------------------------------------------------------
    def _host_view(self, flat):
        return flat[:self._count].reshape(self._shape)

    def data_version(self):
        """Changes whenever the data may have been written (a cache of something derived from it is stale)."""
        return (id(self._data), self._data.version, self._shape)

    def cpu_data(self):
        return self._host_view(self._data.cpu())

    def mutable_cpu_data(self):
        return self._host_view(self._data.mutable_cpu())

    def cpu_diff(self):
        return self._host_view(self._diff.cpu())

    def mutable_cpu_diff(self):
        return self._host_view(self._diff.mutable_cpu())

    def gpu_data(self):
        return self._data.gpu_view(self._count)

    def mutable_gpu_data(self):
        return self._data.gpu_view(self._count, mutable=True)

    def gpu_diff(self):
        return self._diff.gpu_view(self._count)

    def mutable_gpu_diff(self):
        return self._diff.gpu_view(self._count, mutable=True)

    # pycaffe: `.data` / `.diff` are writable numpy arrays
    @property
    def data(self):
        return self.mutable_cpu_data()

    @data.setter
    def data(self, value):
        self.mutable_cpu_data()[...] = value

    @property
    def diff(self):
        return self.mutable_cpu_diff()

    @diff.setter
    def diff(self, value):
        self.mutable_cpu_diff()[...] = value

    def share_data(self, other):
        """Use `other`'s data memory (views such as Flatten/Reshape, shared parameters)."""
        if self._count != other.count:
            raise KaffeError(f"cannot share data of a blob of {other.count} values with one of {self._count}")
        self._data = other._data

    @property
    def memory(self):
        """The SyncedMemory that holds the data (blobs that share data share it)."""
        return self._data

    def use_memory(self, memory):
        """Hold the data in `memory`, a SyncedMemory of at least count floats: the optimiser's memory plan
        gives one buffer to blobs whose lifetimes do not overlap."""
        if memory.count < self._count:
            raise KaffeError(f"a buffer of {memory.count} values cannot hold a blob of {self._count}")
        self._data = memory

    def share_diff(self, other):
        if self._count != other.count:
            raise KaffeError(f"cannot share diff of a blob of {other.count} values with one of {self._count}")
        self._diff = other._diff

    def _on_device(self, memory):
        return device.mode() == device.GPU and memory.head == HEAD_AT_GPU

    def update(self):
        """data -= diff, on the side where the data is newest."""
        if self._on_device(self._data) or self._on_device(self._diff):
            opencl.axpy(-1.0, self.gpu_diff(), self.mutable_gpu_data())
        else:
            self.mutable_cpu_data()[...] -= self.cpu_diff()

    def _reduce(self, kind, memory, host_view):
        """'asum' (sum of |x|) or 'sumsq' (sum of x^2), computed on the side holding the newest values."""
        if self._on_device(memory):
            return getattr(opencl, kind)(memory.gpu(), n=self._count)
        flat = host_view().ravel()
        return float(np.abs(flat).sum(dtype=np.float64)) if kind == "asum" else float(np.dot(flat, flat))

    def asum_data(self):
        return self._reduce("asum", self._data, self.cpu_data)

    def asum_diff(self):
        return self._reduce("asum", self._diff, self.cpu_diff)

    def sumsq_data(self):
        return self._reduce("sumsq", self._data, self.cpu_data)

    def sumsq_diff(self):
        return self._reduce("sumsq", self._diff, self.cpu_diff)

    def zero_diff(self):
        """diff = 0 on the side the current mode computes on (no transfer for solvers in GPU mode)."""
        if device.mode() == device.GPU:
            opencl.fill(self.mutable_gpu_diff(), 0.0)
        else:
            self.mutable_cpu_diff()[...] = 0

    def scale_diff(self, factor):
        if self._on_device(self._diff):
            opencl.scale(factor, self.mutable_gpu_diff())
        else:
            self.mutable_cpu_diff()[...] *= np.float32(factor)

    # -- serialization --------------------------------------------------------------------------
    def shape_equals_proto(self, proto):
        """Caffe's ShapeEquals: legacy 4-D protos match right-aligned (a bias stored 1x1x1xN fits (N,))."""
        if is_legacy_proto(proto):
            return self.num_axes <= 4 and all(
                self.legacy_shape(i - 4) == d for i, d in enumerate(proto_shape(proto)))
        return self._shape == proto_shape(proto)

    def from_proto(self, proto, reshape=True):
        """Load a BlobProto (new `shape` or legacy num/channels/height/width; float or double values)."""
        if reshape:
            self.reshape(proto_shape(proto))
        elif not self.shape_equals_proto(proto):
            raise KaffeError(f"blob shape {self.shape_string()} does not match the stored shape "
                             f"{proto_shape(proto)}")
        values = proto.double_data if len(proto.double_data) else proto.data
        if len(values) != self._count:
            raise KaffeError(f"stored blob has {len(values)} values, expected {self._count}")
        self.mutable_cpu_data()[...] = np.asarray(values, dtype=np.float32).reshape(self._shape)
        diffs = proto.double_diff if len(proto.double_diff) else proto.diff
        if len(diffs):
            if len(diffs) != self._count:
                raise KaffeError(f"stored blob diff has {len(diffs)} values, expected {self._count}")
            self.mutable_cpu_diff()[...] = np.asarray(diffs, dtype=np.float32).reshape(self._shape)

    def to_proto(self, proto=None, write_diff=False):
        from ..proto import caffe_pb2
        proto = caffe_pb2.BlobProto() if proto is None else proto
        proto.Clear()
        proto.shape.dim.extend(self._shape)
        proto.MergeFromString(_packed_floats(BLOBPROTO_DATA, self.cpu_data()))
        if write_diff:
            proto.MergeFromString(_packed_floats(BLOBPROTO_DIFF, self.cpu_diff()))
        return proto

    def __repr__(self):
        return f"Blob({self.shape_string()})"


BLOBPROTO_DATA, BLOBPROTO_DIFF = 5, 6  # field numbers of BlobProto's packed float data / diff


def _varint(value):
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _packed_floats(field_number, values):
    """The wire bytes of a packed repeated float field holding `values`.

    Merged with MergeFromString, protobuf's own parser fills the field from one memory block: building a
    Python list of floats instead takes ten times longer (seconds for AlexNet's 61M weights).
    """
    payload = np.ascontiguousarray(values, dtype="<f4").tobytes()
    return _varint(field_number << 3 | 2) + _varint(len(payload)) + payload


def is_legacy_proto(proto):
    return any(proto.HasField(f) for f in ("num", "channels", "height", "width"))


def proto_shape(proto):
    """The shape a BlobProto stores: its `shape` field, or the legacy 4-D num/channels/height/width."""
    if is_legacy_proto(proto):
        return (proto.num, proto.channels, proto.height, proto.width)
    return tuple(int(d) for d in proto.shape.dim)
