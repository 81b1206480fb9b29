"""OpenCL device layer: device choice, one context and in-order queue per device, device arrays, a program cache,
GEMM, reductions and BLAS-1 helpers, and kernels generated from elementwise formulas.

Device arrays are float32 `pyopencl.array.Array`s; views with an offset (e.g. `blob.gpu_data()[k:]`) are
accepted wherever an array is, the offset is passed to the kernels. All work goes to the selected device's one
in-order queue, so kernels run in the order they are enqueued and only reads back to the host wait.
"""
import collections
import functools
import importlib.resources
import math
import os
import re

import numpy as np
import pyopencl as cl
import pyopencl.array as cla
import pyopencl.tools as cltools

from . import device as kaffe_device
from . import gemm_tuning
from .errors import KaffeError
from .log import logger
from .opencl_codegen import SYMBOLIC_OPS, Expr, literal, symbolic_params

FLOAT_BYTES = 4
STATS_ENV = "KAFFE_OPENCL_STATS"
NO_PLATFORM_HINT = ("install an OpenCL driver (ICD): pocl-opencl-icd for CPUs (apt install pocl-opencl-icd), "
                    "or the GPU vendor's OpenCL runtime")


# -- devices -----------------------------------------------------------------------------------------------
def devices():
    """Every OpenCL device as (platform, device), GPUs first, then the others; the list index is the device id.

    The order is stable: within each kind, platforms in the ICD loader's order and their devices in theirs.
    """
    try:
        platforms = cl.get_platforms()
    except cl.Error:  # the ICD loader reports "no platform" as an error
        return []
    found = [(platform, dev) for platform in platforms for dev in _platform_devices(platform)]
    is_gpu = [bool(dev.type & cl.device_type.GPU) for _, dev in found]
    return [pair for pair, gpu in zip(found, is_gpu) if gpu] + [pair for pair, gpu in zip(found, is_gpu) if not gpu]


def _platform_devices(platform):
    try:
        return platform.get_devices()
    except cl.Error:  # a platform without devices (e.g. a GPU driver with no card present)
        return []


def describe(index, platform, dev):
    return f"{index}: {dev.name.strip()} ({cl.device_type.to_string(dev.type)}, {platform.name.strip()})"


class Device:
    """One selected device: its context, in-order queue, memory pool and compiled programs."""

    def __init__(self, index, platform, dev):
        self.index = index
        self.platform = platform
        self.device = dev
        self.context = cl.Context([dev])
        self.queue = cl.CommandQueue(self.context, dev)
        # a pool: layers allocate temporaries (im2col columns, reduction partials) every iteration
        self.allocator = cltools.MemoryPool(cltools.ImmediateAllocator(self.queue))
        self.programs = {}
        self.kernels = {}
        self.pending_uploads = collections.deque()

    @property
    def is_gpu(self):
        return bool(self.device.type & cl.device_type.GPU)

    def __repr__(self):
        return f"Device({describe(self.index, self.platform, self.device)})"


_selected = {"device": None, "by_index": {}}


def select_device(index):
    """Make device `index` (an index into devices()) current and return its Device.

    A device keeps its context once made, so arrays made on it stay valid when it is selected again.
    """
    index = int(index)
    known = _selected["by_index"]
    if index not in known:
        found = devices()
        if not found:
            raise KaffeError(f"no OpenCL platform found: {NO_PLATFORM_HINT}")
        if not 0 <= index < len(found):
            listing = "\n".join("  " + describe(i, p, d) for i, (p, d) in enumerate(found))
            raise KaffeError(f"OpenCL device {index} does not exist; the devices are:\n{listing}")
        known[index] = Device(index, *found[index])
        logger.info("Using OpenCL device %s", describe(index, *found[index]))
    _selected["device"] = known[index]
    return known[index]


def current():
    """The selected Device; the first use selects kaffe's device id (kaffe.engine.device.set_device)."""
    if _selected["device"] is None:
        select_device(kaffe_device.device_id())
    return _selected["device"]


def queue():
    return current().queue


def context():
    return current().context


def finish():
    """Wait until every enqueued command of the current device has run."""
    if _selected["device"] is not None:
        _count("waits")
        _selected["device"].queue.finish()
        _selected["device"].pending_uploads.clear()


# -- statistics -------------------------------------------------------------------------------------------
# Every command kaffe enqueues goes through the counted helpers below (launch, kernel, upload, download, copy,
# finish, program): the counts show what an iteration costs in launches, transfers and host waits on any device.
STATS_FIELDS = ("launches", "copies", "uploads", "upload_bytes", "downloads", "download_bytes", "waits", "builds")
_stats = dict.fromkeys(STATS_FIELDS, 0)


def stats():
    """The counts since the last reset_stats(): kernel launches, device-to-device copies, host-to-device
    uploads and downloads (and their bytes), blocking waits of the host (finish, blocking reads) and program
    builds."""
    return dict(_stats)


def reset_stats():
    _stats.update(dict.fromkeys(STATS_FIELDS, 0))


def stats_enabled():
    """Whether KAFFE_OPENCL_STATS asks for the per-iteration counts in the log."""
    return os.environ.get(STATS_ENV, "0") not in ("", "0")


def stats_per_iteration(counts, iterations):
    """One log line of counts (a stats() dict) averaged over `iterations`."""
    per = {}
    for name in STATS_FIELDS:
        value = counts[name] / max(iterations, 1)
        per[name] = f"{value:.0f}" if value == int(value) else f"{value:.6g}"
    return ("OpenCL per iteration: {launches} launches, {copies} device copies, {uploads} uploads "
            "({upload_bytes} bytes), {downloads} downloads ({download_bytes} bytes), {waits} blocking "
            "waits, {builds} program builds".format(**per))


def _count(field, n=1):
    _stats[field] += n


# -- arrays ----------------------------------------------------------------------------------------------
def empty(n):
    """An uninitialised float32 device array of n values."""
    dev = current()
    return cla.empty(dev.queue, int(n), np.float32, allocator=dev.allocator)


def zeros(n):
    return fill(empty(n), 0.0)


def to_device(host):
    """A device copy of a host array, as float32."""
    host = np.ascontiguousarray(host, dtype=np.float32)
    return upload(host, empty(host.size))


def upload(host, array):
    """Enqueue array[:host.size] = host without waiting: the copy reads a private snapshot of `host`, which
    pyopencl keeps alive until the transfer is done, so the caller may write `host` again at once."""
    host = np.array(host, dtype=array.dtype, copy=True).reshape(-1)
    if host.size:
        _count("uploads")
        _count("upload_bytes", host.nbytes)
        pending = current().pending_uploads
        # pyopencl's event of a copy from host memory waits for the copy when it is dropped: keep each one
        # until its copy is done, or the host would wait for everything enqueued before it
        while pending and pending[0].command_execution_status == cl.command_execution_status.COMPLETE:
            pending.popleft()
        pending.append(cl.enqueue_copy(queue(), array.base_data, host, dst_offset=array.offset, is_blocking=False))
    return array


def download(array, out=None):
    """The values of a device array on the host: a blocking read, the one kind of wait kaffe makes."""
    out = np.empty(array.size, dtype=array.dtype) if out is None else out
    if array.size:
        _count("downloads")
        _count("download_bytes", out.nbytes)
        _count("waits")
        cl.enqueue_copy(queue(), out, array.base_data, src_offset=array.offset, is_blocking=True)
    return out


def _buffer(array, offset=0):
    """(memory object, offset in floats, floats available from that offset) of a device array or view."""
    if array.dtype != np.float32:
        raise KaffeError(f"OpenCL kernels take float32 arrays, got {array.dtype}")
    if array.size and not array.flags.forc:
        raise KaffeError("OpenCL kernels take contiguous arrays")
    return array.base_data, array.offset // FLOAT_BYTES + int(offset), array.size - int(offset)


def device_args(array, offset=0):
    """(memory object, offset in elements as int32) of a contiguous device array or view: the argument pair
    by which kaffe's kernels take an array (any dtype: float data, int argmax buffers)."""
    if array.size and not array.flags.forc:
        raise KaffeError("OpenCL kernels take contiguous arrays")
    return array.base_data, np.int32(array.offset // array.dtype.itemsize + int(offset))


LAUNCH_GROUP = 256


def launch(source, name, n, *args, defines=None):
    """Run kernel `name` of `source` with one work-item per i < n (rounded up to whole work-groups); n is
    passed as the kernel's first argument. Python ints become int32 and Python floats float32 arguments."""
    if n > 0:
        kernel(source, name, defines)(queue(), (_round_up(n, LAUNCH_GROUP),), (LAUNCH_GROUP,), n, *args)


def _scalar_dtype(value):
    """The dtype a kernel argument is passed as: Python ints and bools are int32, Python floats (numpy's float64
    too, a float subclass) float32, other numpy scalars keep theirs; None for memory objects."""
    if isinstance(value, (bool, int)):
        return np.int32
    if isinstance(value, float):
        return np.float32
    return value.dtype if isinstance(value, np.generic) else None


class CountedKernel:
    """A cl.Kernel whose launches are counted; called as a cl.Kernel (queue, global size, local size, *args).

    The scalar arguments' types are fixed at the first launch: pyopencl then packs scalars with struct instead
    of inspecting each value's buffer, about 50x cheaper per argument.
    """

    def __init__(self, knl):
        self.kernel = knl
        self.typed = False

    def __call__(self, queue_, global_size, local_size, *args):
        _stats["launches"] += 1
        knl = self.kernel
        if not self.typed:
            knl.set_scalar_arg_dtypes([_scalar_dtype(a) for a in args])
            self.typed = True
        knl.set_args(*args)
        return cl.enqueue_nd_range_kernel(queue_, knl, global_size, local_size)


def scratch(owner, name, n, dtype=np.float32):
    """A device work array of at least n values kept on `owner` (a layer) and grown as needed.

    Layers reuse it every iteration; its contents are undefined between calls.
    """
    buffers = owner.__dict__.setdefault("_device_scratch", {})
    found = buffers.get(name)
    if found is None or found.size < n:
        dev = current()
        found = buffers[name] = cla.empty(dev.queue, max(int(n), 1), dtype, allocator=dev.allocator)
    return found


def copy(src, dst, n=None, src_offset=0, dst_offset=0):
    """dst[dst_offset : dst_offset + n] = src[src_offset : src_offset + n] on the device (n: all of src)."""
    n = src.size - src_offset if n is None else int(n)
    src_buf, src_at, src_left = _buffer(src, src_offset)
    dst_buf, dst_at, dst_left = _buffer(dst, dst_offset)
    _check_room("copy source", n, src_left)
    _check_room("copy destination", n, dst_left)
    if n:
        _count("copies")
        cl.enqueue_copy(queue(), dst_buf, src_buf, byte_count=n * FLOAT_BYTES,
                        src_offset=src_at * FLOAT_BYTES, dst_offset=dst_at * FLOAT_BYTES)
    return dst


def _check_room(what, needed, available):
    if needed > available:
        raise KaffeError(f"OpenCL {what}: {needed} values needed, only {available} after the offset")


# -- programs --------------------------------------------------------------------------------------------
@functools.cache
def _kernel_file(name):
    """A .cl file's text: a bare name is beside this module, "layers/x.cl" is relative to the kaffe package.

    importlib.resources finds the files inside an installed wheel as well as in the source tree.
    """
    package = "kaffe" if "/" in name else __package__
    return importlib.resources.files(package).joinpath(name).read_text()


def _build_options(defines):
    options = []
    for name, value in sorted((defines or {}).items()):
        if isinstance(value, bool):
            value = int(value)
        elif isinstance(value, float):
            value = literal(value)
        options.append(f"-D{name}={value}")
    return tuple(options)


def program(source, defines=None):
    """The built cl.Program of `source` (a .cl file name, see _kernel_file, OpenCL C text, or a tuple of those,
    concatenated: shared helpers such as layers/random.cl come first) with `defines`
    ({name: value} passed as -D options), built once per device and options.

    pyopencl also keeps the binaries in its disk cache, so a later run skips the compiler. A failed build
    raises KaffeError with the compiler's log.
    """
    dev = current()
    parts = source if isinstance(source, tuple) else (source,)
    is_file = [part.endswith(".cl") and "\n" not in part for part in parts]
    text = "\n".join(_kernel_file(part) if file else part for part, file in zip(parts, is_file))
    options = _build_options(defines)
    key = (text, options)
    if key not in dev.programs:
        _count("builds")
        try:
            dev.programs[key] = cl.Program(dev.context, text).build(options=list(options))
        except cl.Error as error:  # pyopencl's message holds the build log
            label = " + ".join(part if file else "generated OpenCL source" for part, file in zip(parts, is_file))
            raise KaffeError(f"OpenCL build of {label} failed on {dev.device.name.strip()} "
                             f"with options {' '.join(options) or '(none)'}:\n{error}") from None
    return dev.programs[key]


def kernel(source, name, defines=None):
    """The CountedKernel `name` of program(source, defines), made once per device."""
    kernels = current().kernels
    # the defines' values with their types: {"X": 1} and {"X": 1.0} build different programs
    key = (source, name, tuple(defines.items()), tuple(map(type, defines.values()))) if defines else (source, name)
    found = kernels.get(key)
    if found is None:
        found = kernels[key] = CountedKernel(cl.Kernel(program(source, defines), name))
    return found


def _round_up(n, multiple):
    return (n + multiple - 1) // multiple * multiple


# -- elementwise kernels from formulas ------------------------------------------------------------------------
ELEMENTWISE_GROUP = 256


class ElementwiseKernel:
    """out[i] = formula(inputs[i]..., p, ops) over i < n; see elementwise_kernel."""

    def __init__(self, name, formula, inputs, params):
        self.name = name
        # a prefix keeps names such as "tanh" clear of OpenCL's built-in functions
        self.c_name = "ew_" + re.sub(r"\W", "_", name)
        self.inputs = tuple(inputs)
        self.params = tuple(params)
        value = formula(*(Expr(f"v_{x}") for x in self.inputs), symbolic_params(name, self.params), SYMBOLIC_OPS)
        if not isinstance(value, Expr):  # a formula that ignores its inputs, such as a constant fill
            value = Expr(literal(value))
        self.expression = value.code
        self.source = self._source()

    def _source(self):
        args = ["const int n", "__global float* out", "const int out_offset"]
        args += [f"__global const float* in_{x}, const int in_{x}_offset" for x in self.inputs]
        args += [f"const float p_{name}" for name in self.params]
        loads = "".join(f"        const float v_{x} = in_{x}[in_{x}_offset + i];\n" for x in self.inputs)
        return (f"__kernel void {self.c_name}({', '.join(args)}) {{\n"
                f"    const int i = get_global_id(0);\n"
                f"    if (i < n) {{\n{loads}"
                f"        out[out_offset + i] = {self.expression};\n"
                f"    }}\n}}\n")

    def __call__(self, out, *inputs, p=None, n=None):
        """Run over the first n values (default: all of out); p gives the parameters (attributes or a dict)."""
        if len(inputs) != len(self.inputs):
            raise KaffeError(f"elementwise kernel {self.name} takes inputs {self.inputs}, got {len(inputs)} arrays")
        n = out.size if n is None else int(n)
        out_buf, out_at, out_left = _buffer(out)
        _check_room(f"{self.name} output", n, out_left)
        args = [np.int32(n), out_buf, np.int32(out_at)]
        for name, array in zip(self.inputs, inputs):
            buf, at, left = _buffer(array)
            _check_room(f"{self.name} input {name}", n, left)
            args += [buf, np.int32(at)]
        values = p if isinstance(p, dict) else vars(p) if p is not None else {}
        missing = [name for name in self.params if name not in values]
        if missing:
            raise KaffeError(f"elementwise kernel {self.name} needs parameters {missing}")
        args += [np.float32(values[name]) for name in self.params]
        if n:
            knl = kernel(self.source, self.c_name)
            knl(queue(), (_round_up(n, ELEMENTWISE_GROUP),), (ELEMENTWISE_GROUP,), *args)
        return out


@functools.cache
def elementwise_kernel(name, formula, inputs, params=()):
    """The kernel computing out = formula(*inputs, p, ops) element by element, made once per arguments.

    `formula` is a Python function of symbolic operands written with arithmetic/comparison operators and the
    functions of `ops` (as in layers/neuron.py); `inputs` and `params` are tuples of names. Parameters become
    float kernel arguments, so one program serves every parameter value. Call the result as
    `kernel(out, *input_arrays, p=params_namespace_or_dict, n=None)`; `out` may be one of the inputs.
    """
    return ElementwiseKernel(name, formula, tuple(inputs), tuple(params))


# -- BLAS-1 helpers ---------------------------------------------------------------------------------------------
_AXPBY = elementwise_kernel("axpby", lambda x, y, p, ops: p.a * x + p.b * y, ("x", "y"), ("a", "b"))
_SCALE = elementwise_kernel("scale", lambda x, p, ops: p.a * x, ("x",), ("a",))
_FILL = elementwise_kernel("fill", lambda p, ops: p.value, (), ("value",))
# sign(w): 0 at 0, as Caffe's L1 regularization
_ADD_SIGN = elementwise_kernel("add_scaled_sign",
                               lambda w, g, p, ops: g + p.a * ((w > 0) - (w < 0)), ("w", "g"), ("a",))


def axpy(alpha, x, y, n=None):
    """y += alpha * x (e.g. L2 weight decay: axpy(decay, data, diff); SGD step: axpy(-1, history, data))."""
    return _AXPBY(y, x, y, p={"a": alpha, "b": 1.0}, n=n)


def axpby(alpha, x, beta, y, n=None):
    """y = alpha * x + beta * y (SGD momentum: axpby(local_rate, diff, momentum, history))."""
    return _AXPBY(y, x, y, p={"a": alpha, "b": beta}, n=n)


def scale(alpha, x, out=None, n=None):
    """out = alpha * x (out defaults to x itself)."""
    return _SCALE(x if out is None else out, x, p={"a": alpha}, n=n)


def fill(x, value, n=None):
    """x[:n] = value."""
    return _FILL(x, p={"value": value}, n=n)


def add_scaled_sign(alpha, w, g, n=None):
    """g += alpha * sign(w) (L1 weight decay)."""
    return _ADD_SIGN(g, w, g, p={"a": alpha}, n=n)


# -- reductions ---------------------------------------------------------------------------------------------------
REDUCE_GROUP = 256
REDUCE_MAX_GROUPS = 256


def _reduce(term, x, y=None, n=None, out=None, scale=1.0):
    """scale * the sum over i < n of the term: a host float, or, when `out` (a device array or view) is given,
    written to out[0] without any wait (the host reads it later, if at all)."""
    n = x.size if n is None else int(n)
    x_buf, x_at, x_left = _buffer(x)
    _check_room(f"{term} input", n, x_left)
    y_buf, y_at = x_buf, x_at
    if y is not None:
        y_buf, y_at, y_left = _buffer(y)
        _check_room(f"{term} input", n, y_left)
    if n == 0 and out is None:
        return 0.0
    target = empty(1) if out is None else out
    if n == 0:
        fill(target, 0.0, n=1)
    else:
        defines = {"GROUP_SIZE": REDUCE_GROUP, term.upper(): 1}
        groups = min(REDUCE_MAX_GROUPS, -(-n // REDUCE_GROUP))
        out_buf, out_at, _ = _buffer(target)
        # one work-group sums straight into the target; more leave partial sums for a second launch
        partial, partial_at = (out_buf, out_at) if groups == 1 else (empty(groups).data, 0)
        kernel("reduce.cl", "reduce_partial", defines)(
            queue(), (groups * REDUCE_GROUP,), (REDUCE_GROUP,), np.int32(n), x_buf, np.int32(x_at), y_buf,
            np.int32(y_at), partial, np.int32(partial_at), np.float32(scale if groups == 1 else 1.0))
        if groups > 1:
            kernel("reduce.cl", "sum_partials", defines)(
                queue(), (REDUCE_GROUP,), (REDUCE_GROUP,), np.int32(groups), partial, out_buf, np.int32(out_at),
                np.float32(scale))
    return target if out is not None else float(download(target)[0])


def asum(x, n=None, out=None, scale=1.0):
    """scale * the sum of |x|: a host float, as Caffe's caffe_gpu_asum, or written to the device array `out`."""
    return _reduce("asum", x, n=n, out=out, scale=scale)


def sumsq(x, n=None, out=None, scale=1.0):
    """scale * the sum of x * x (see asum for `out`)."""
    return _reduce("sumsq", x, n=n, out=out, scale=scale)


def dot(x, y, n=None, out=None, scale=1.0):
    return _reduce("dot", x, y, n=n, out=out, scale=scale)


# -- GEMM ------------------------------------------------------------------------------------------------
GEMM_BACKENDS = ("kaffe", "clblast")
# None: per shape class, the backend the tuning cache measured best (engine/gemm_tuning.py), else kaffe's
_gemm_state = {"backend": os.environ.get("KAFFE_GEMM") or None}


def set_gemm_backend(name):
    """'kaffe' (gemm.cl), 'clblast' (pyclblast, when installed), or None: the tuning cache's choice."""
    if name is not None and name not in GEMM_BACKENDS:
        raise KaffeError(f"unknown GEMM backend {name!r}; choose one of {GEMM_BACKENDS}")
    if name == "clblast" and _pyclblast() is None:
        raise KaffeError("the 'clblast' GEMM backend needs pyclblast (pip install pyclblast; it builds against "
                         "the CLBlast library, e.g. apt install libclblast-dev)")
    _gemm_state["backend"] = name


def explicit_gemm_backend():
    """The backend set by KAFFE_GEMM or set_gemm_backend, None when the tuning cache chooses."""
    return _gemm_state["backend"]


def gemm_backend():
    return _gemm_state["backend"] or "kaffe"


@functools.cache
def _pyclblast():
    try:
        import pyclblast
    except ImportError:
        return None
    return pyclblast


class GemmTiles(collections.namedtuple("GemmTiles", "ts_m ts_n ts_k wpt_m wpt_n local_vec prefetch",
                                         defaults=(1, 0))):
    """gemm.cl's settings TS_M, TS_N, TS_K, WPT_M, WPT_N, LOCAL_VEC, PREFETCH (see the kernel's header)."""

    def __str__(self):
        return (f"{self.ts_m}x{self.ts_n}x{self.ts_k} tiles, {self.wpt_m}x{self.wpt_n} per work-item"
                + (", float4 local reads" if self.local_vec == 4 else "")
                + ("", ", prefetch", ", prefetch, 2 local buffers")[self.prefetch])


def _gemm_tiles(M, N, dev):
    """The GemmTiles for a C of M x N on `dev`: those that `kaffe device_query --tune` measured best for its
    shape class where its cache holds them (engine/gemm_tuning.py), else gemm_rule_tiles'."""
    return gemm_tuning.tuned_tiles(M, N, dev) or gemm_rule_tiles(M, N, dev)


def gemm_rule_tiles(M, N, dev):
    """The GemmTiles for a C of M x N on `dev` without a tuning cache.

    Bigger tiles and register blocks reuse each load more, but leave fewer work-groups to fill the compute
    units: on a GPU the big tiles pay only when there are at least as many of them as compute units (H100:
    128x128 blocks 8x8 reach ~31 TFLOP/s at 4096^3, 64x64 ~12 at 1024^3, where 128x128 reach 8).
    CPU runtimes (PoCL) run a work-group as a loop over its work-items: few work-items with big blocks win.
    """
    if not dev.is_gpu:
        return GemmTiles(16, 64, 16, 2, 4) if M <= 32 else GemmTiles(64, 64, 16, 8, 8)
    if -(-M // 128) * -(-N // 128) >= dev.device.max_compute_units:
        return GemmTiles(128, 128, 32, 8, 8)
    return GemmTiles(64, 64, 16, 4, 4)


def _vector_width(ld, offset, run_tile):
    """The widest load (4, 2, 1) that starts aligned: ld and offset must be multiples of it."""
    for width in (4, 2):
        if ld % width == 0 and offset % width == 0 and run_tile % width == 0:
            return width
    return 1


def gemm_split_k(M, N, K, tiles, dev):
    """How many K chunks a GEMM should use: several only on GPUs whose compute units the C tiles cannot fill,
    and only while each chunk keeps a few hundred K steps of work."""
    if not dev.is_gpu or tiles >= dev.device.max_compute_units:
        return 1
    return int(max(1, min(2 * dev.device.max_compute_units // tiles, K // 512, 64)))


def gemm(trans_a, trans_b, M, N, K, alpha, A, B, beta, C, a_offset=0, b_offset=0, c_offset=0, split_k=None,
         batch=1, strides=(0, 0, 0), ldb=None, ldc=None, bias=None, bias_axis=1, a_blocks=None, row_sums=None):
    """C = alpha * op(A) @ op(B) + beta * C on device arrays holding row-major matrices (as numpy's).

    op(A) is M x K: A holds it from a_offset as M x K, or as K x M when trans_a. op(B) is K x N: B holds it as
    K x N, or as N x K when trans_b. C holds M x N from c_offset. With beta == 0, C is not read (NaNs there
    do not leak into the result). Offsets count floats, added to any offset of the array views themselves.
    split_k: the number of K chunks (default: gemm_split_k's choice; tests force it).
    batch: that many GEMMs in one launch, the z-th on A, B, C advanced by z * strides (floats); ldb, ldc:
    row strides of B and C other than the dense ones. bias: a device array added to every row of C
    (bias_axis 1, bias[n]) or every column (bias_axis 0, bias[m]), in the same launch.
    a_blocks: (block, stride) with trans_a False: op(A)[m][k] is at (k // block) * stride + m * block + k % block
    (an (N, O, L) array read as the O x (N * L) matrix, block L, stride O * L).
    row_sums: a device array r of M values: also r[m] = alpha * sum_k op(A)[m][k] + beta * r[m] in the same
    launch (op(B) gets a column of ones: a layer's bias gradient beside its weight gradient).
    """
    if bias is not None and row_sums is not None:
        raise KaffeError("gemm: bias and row_sums cannot be used together")
    a_buf, a_at, a_left = _buffer(A, a_offset)
    b_buf, b_at, b_left = _buffer(B, b_offset)
    c_buf, c_at, c_left = _buffer(C, c_offset)
    extra = bias if row_sums is None else row_sums
    bias_buf, bias_at, bias_left = (c_buf, 0, None) if extra is None else _buffer(extra)
    dev = current()
    plans = _gemm_plans(dev)
    key = (trans_a, trans_b, M, N, K, a_at, a_left, b_at, b_left, c_at, c_left, bias_left,
           "sums" if row_sums is not None else bias_axis, split_k, batch, tuple(strides), ldb, ldc, a_blocks)
    plan = plans.get(key)
    if plan is None:
        plan = plans[key] = _gemm_plan(*key, dev)
    if plan.kernel is None:
        if plan.lda is not None:   # CLBlast
            # pyclblast wants 2-D arrays and passes their whole buffers: the offsets of views are in *_at
            _pyclblast().gemm(dev.queue, M, N, K, A.reshape(1, A.size), B.reshape(1, B.size), C.reshape(1, C.size),
                              plan.lda, plan.ldb, plan.ldc, alpha=float(alpha), beta=float(beta),
                              a_transp=bool(trans_a), b_transp=bool(trans_b), a_offset=a_at, b_offset=b_at,
                              c_offset=c_at)
        return C
    M, N, K = plan.sizes
    target, target_at, target_ld = c_buf, c_at, plan.ldc
    if plan.chunks > 1:
        partial = dev.split_k_scratch = _grown(getattr(dev, "split_k_scratch", None), plan.chunks * M * N)
        target, target_at, target_ld = partial.base_data, 0, N
    plan.kernel(dev.queue, plan.global_size, plan.local_size, M, N, K, float(alpha), a_buf, a_at, plan.lda, b_buf,
                b_at, plan.ldb, float(beta), target, target_at, target_ld, plan.k_chunk, *plan.strides, bias_buf,
                bias_at)
    if plan.chunks > 1:
        launch("gemm.cl", "gemm_split_reduce", M * N, N, plan.chunks, partial.base_data, float(beta), c_buf, c_at,
               plan.ldc, bias_buf, bias_at, defines=plan.defines)
    return C


GemmPlan = collections.namedtuple("GemmPlan", "kernel sizes lda ldb ldc global_size local_size k_chunk strides "
                                              "chunks defines")
_NO_WORK = GemmPlan(*(None,) * 11)


def _gemm_plans(dev):
    """dev's GemmPlans by call signature; made anew when the backend or the tuning table changes."""
    owner = (_gemm_state["backend"], getattr(dev, "gemm_tuned", None))
    cached = getattr(dev, "gemm_plans", None)
    if cached is None or cached[0] != owner[0] or cached[1] is not owner[1]:
        cached = dev.gemm_plans = owner + ({},)
    return cached[2]


def _gemm_plan(trans_a, trans_b, M, N, K, a_at, a_left, b_at, b_left, c_at, c_left, bias_left, bias_axis, split_k,
               batch, strides, ldb, ldc, a_blocks, dev):
    """What a gemm call of this signature launches (see gemm): its checks, kernel, sizes and scalar arguments,
    worked out once per signature."""
    M, N, K, batch = int(M), int(N), int(K), int(batch)
    block, block_stride = a_blocks or (0, 0)
    if block and trans_a:
        raise KaffeError("gemm: a_blocks needs an untransposed A")
    lda = M if trans_a else block or K
    ldb = int(ldb or (K if trans_b else N))
    ldc = int(ldc or N)
    last = batch - 1
    a_end = ((K - 1) // block) * block_stride + (M - 1) * lda + (K - 1) % block + 1 if block and M and K else M * K
    _check_room("gemm A", last * strides[0] + a_end, a_left)
    _check_room("gemm B", last * strides[1] + ((N if trans_b else K) - 1) * ldb + (K if trans_b else N), b_left)
    _check_room("gemm C", last * strides[2] + (M - 1) * ldc + N, c_left)
    if M == 0 or (N == 0 and bias_axis != "sums"):
        return _NO_WORK
    if bias_left is not None:
        _check_room("gemm bias", N if bias_axis == 1 else M, bias_left)
    if (_gemm_state["backend"] or gemm_tuning.tuned_backend(M, N, dev)) == "clblast" and batch == 1 \
            and bias_left is None and not block:
        return _NO_WORK._replace(lda=lda, ldb=ldb, ldc=ldc)
    ones_column = bias_axis == "sums"
    N += ones_column   # the column of ones; the kernel sends that column of the product to the row sums
    ts_m, ts_n, ts_k, wpt_m, wpt_n, local_vec, prefetch = GemmTiles(*_gemm_tiles(M, N, dev))
    defines = {"TRANS_A": bool(trans_a), "TRANS_B": bool(trans_b), "TS_M": ts_m, "TS_N": ts_n, "TS_K": ts_k,
               "WPT_M": wpt_m, "WPT_N": wpt_n, "LOCAL_VEC": local_vec, "PREFETCH": prefetch,
               "VEC_A": _vector_width(math.gcd(lda, strides[0], block_stride), a_at, ts_m if trans_a else ts_k),
               "A_K_BLOCK": block, "A_K_STRIDE": block_stride,
               "VEC_B": _vector_width(math.gcd(ldb, strides[1]), b_at, ts_k if trans_b else ts_n),
               "BATCHED": batch > 1, "BIAS": 0 if bias_left is None or ones_column else 2 - bias_axis,
               "ONES_COLUMN": ones_column}
    local = (ts_n // wpt_n, ts_m // wpt_m)
    tiles = -(-N // ts_n) * -(-M // ts_m)
    chunks = 1 if batch > 1 or (bias_left is not None and not ones_column) \
        else split_k or gemm_split_k(M, N, K, tiles, dev)
    k_chunk = max(ts_k, _round_up(-(-K // chunks), ts_k))
    chunks = max(1, -(-K // k_chunk))
    if chunks > 1:
        defines["SPLIT_K"] = True
    global_size = (-(-N // ts_n) * local[0], -(-M // ts_m) * local[1], max(chunks, batch))
    return GemmPlan(kernel("gemm.cl", "gemm", defines), (M, N, K), lda, ldb, ldc, global_size, local + (1,),
                    k_chunk, tuple(int(s) for s in strides), chunks, defines)


def _grown(array, n):
    """`array` if it holds at least n floats, else a new device array of n floats."""
    if array is not None and array.size >= n:
        return array
    return empty(n)
