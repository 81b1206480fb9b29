"""Shapes that cannot be allocated are refused before anything is allocated, with a message, not a MemoryError
or an OOM kill: a blob whose float32 values would exceed the memory this process can have (physical memory,
the cgroup's limit, `ulimit -v`), or in GPU mode the OpenCL device's memory, or whose count overflows int64.
The Net adds the layer's name (engine/net.py).
"""
import functools
import math
import os
import resource

from . import device
from .errors import KaffeError

FLOAT_BYTES = 4
INT64_MAX = 2 ** 63 - 1
_CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


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


def check_count(shape, what="blob"):
    """The count of `shape`, or a BlobShapeError when its float32 values cannot be allocated here."""
    count = math.prod(shape)
    shown = " ".join(map(str, shape))
    if count > INT64_MAX:
        raise BlobShapeError(f"{what} shape {shown} has {count} values, which overflows int64")
    needed = count * FLOAT_BYTES
    for limit in (host_limit(), _device_limit()):
        if limit is not None and needed > limit[0]:
            raise BlobShapeError(f"{what} shape {shown} needs {needed} bytes ({human_bytes(needed)}), more than "
                                 f"{limit[1]} ({human_bytes(limit[0])})")
    return count


def check_total(blobs, what):
    """Refuse blobs (distinct ones) whose values together exceed the host's memory."""
    needed = FLOAT_BYTES * sum({id(b): b.count for b in blobs}.values())
    limit = host_limit()
    if needed > limit[0]:
        raise BlobShapeError(f"{what} need {needed} bytes ({human_bytes(needed)}) of data, more than {limit[1]} "
                             f"({human_bytes(limit[0])})")
