"""Shapes that cannot be allocated are refused before anything is allocated, with a message, not a MemoryError
or an OOM kill: a blob whose float32 values would exceed the memory this process can have (physical memory,
the cgroup's limit, `ulimit -v`), beside what the net being set up holds already, or in GPU mode the OpenCL
device's memory, or whose count overflows int64; a filler whose float64 values would not fit. The Net adds
the layer's name (engine/net.py).
"""
import contextlib
import functools
import math
import os
import resource
import threading

from . import device
from .errors import KaffeError

FLOAT_BYTES = 4
INT64_MAX = 2 ** 63 - 1
FILL_BYTES = FLOAT_BYTES + 8   # a filler draws float64 values, then stores them as float32
_CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")
_held = threading.local()      # the bytes of the net being set up in this thread, counted with each new blob


class BlobShapeError(KaffeError):
    """A blob shape that is refused (too many axes, a negative dimension, more memory than there is)."""


def human_bytes(n):
    units = ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
    scale = 0
    while n >= 1024 and scale < len(units) - 1:
        n /= 1024
        scale += 1
    return f"{n} bytes" if scale == 0 else f"{n:.1f} {units[scale]}"


@functools.cache
def _machine_memory():
    """(bytes, what they are): physical memory, or the cgroup's limit where it is lower."""
    best = (os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "the machine's memory")
    for path in _CGROUP_LIMITS:
        try:
            with open(path) as f:
                value = f.read().strip()
        except OSError:
            continue
        if value.isdigit() and int(value) < best[0]:
            best = (int(value), "the memory limit of this container (cgroup)")
    return best


def host_limit():
    """(bytes, what they are): the most host memory this process may get."""
    limit = _machine_memory()
    soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    if soft != resource.RLIM_INFINITY and soft < limit[0]:
        limit = (soft, "the address-space limit of this process (ulimit -v)")
    return limit


def _device_limit():
    """(bytes, what they are) of the OpenCL device in GPU mode (one buffer at most max_mem_alloc_size), or None."""
    if device.mode() != device.GPU:
        return None
    from . import opencl
    dev = opencl.current().device
    return min((dev.global_mem_size, "the OpenCL device's memory"),
               (dev.max_mem_alloc_size, "the OpenCL device's largest buffer (CL_DEVICE_MAX_MEM_ALLOC_SIZE)"))


@contextlib.contextmanager
def net_holding(nbytes):
    """While a layer of a net is set up: the bytes the net's earlier blobs take, which every new blob must fit
    beside."""
    _held.bytes = nbytes
    try:
        yield
    finally:
        _held.bytes = 0


def check_count(shape, what="blob", bytes_per_value=FLOAT_BYTES):
    """The count of `shape`, or a BlobShapeError when its values cannot be allocated here."""
    count = math.prod(shape)
    shown = " ".join(map(str, shape))
    if count > INT64_MAX:
        raise BlobShapeError(f"{what} shape {shown} has {count} values, which overflows int64")
    needed = count * bytes_per_value
    held = getattr(_held, "bytes", 0)
    limit = host_limit()
    if needed + held > limit[0]:
        beside = (f" beside the {held} bytes ({human_bytes(held)}) of the net's earlier blobs"
                  if needed <= limit[0] else "")
        raise BlobShapeError(f"{what} shape {shown} needs {needed} bytes ({human_bytes(needed)}){beside}, more "
                             f"than {limit[1]} ({human_bytes(limit[0])})")
    limit = _device_limit()
    if limit is not None and count * FLOAT_BYTES > limit[0]:
        needed = count * FLOAT_BYTES
        raise BlobShapeError(f"{what} shape {shown} needs {needed} bytes ({human_bytes(needed)}), more than "
                             f"{limit[1]} ({human_bytes(limit[0])})")
    return count


def total_bytes(blobs):
    """The bytes of the float32 values of distinct blobs."""
    return FLOAT_BYTES * sum({id(b): b.count for b in blobs}.values())


def check_total(blobs, what):
    """Refuse blobs (distinct ones) whose values together exceed the host's memory."""
    needed = total_bytes(blobs)
    limit = host_limit()
    if needed > limit[0]:
        raise BlobShapeError(f"{what} need {needed} bytes ({human_bytes(needed)}) of data, more than {limit[1]} "
                             f"({human_bytes(limit[0])})")
