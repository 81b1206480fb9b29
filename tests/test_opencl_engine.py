"""The OpenCL device layer: GEMM, BLAS-1 helpers, reductions, formula kernels, host/device memory sync."""
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("pyopencl", reason="pyopencl is not installed (pip install kaffe[opencl])")

from kaffe.engine import opencl  # noqa: E402
from kaffe.engine.blob import Blob  # noqa: E402
from kaffe.engine.errors import KaffeError  # noqa: E402
from kaffe.engine.syncedmem import HEAD_AT_CPU, HEAD_AT_GPU, SYNCED, UNINITIALIZED, SyncedMemory  # noqa: E402

pytestmark = [pytest.mark.opencl,
              pytest.mark.skipif(not opencl.devices(), reason="no OpenCL platform (install pocl-opencl-icd)")]

NUMPY_OPS = SimpleNamespace(where=np.where, exp=np.exp, log=np.log, log1p=np.log1p, tanh=np.tanh, abs=np.abs,
                            maximum=np.maximum, minimum=np.minimum, sqrt=np.sqrt, pow=np.power)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def rand(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def assert_close(actual, expected, rtol=1e-4):
    """Relative to the largest reference value, as GEMM sums of mixed signs cancel."""
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    assert np.abs(actual - expected).max(initial=0.0) <= rtol * scale


# -- GEMM -------------------------------------------------------------------------------------------------
def op(matrix, transposed):
    return matrix.T if transposed else matrix


@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (7, 13, 5), (37, 70, 67), (65, 33, 130)])
def test_gemm_matches_numpy(rng, trans_a, trans_b, M, N, K):
    a = rand(rng, *((K, M) if trans_a else (M, K)))
    b = rand(rng, *((N, K) if trans_b else (K, N)))
    c = rand(rng, M, N)
    C = opencl.to_device(c)
    opencl.gemm(trans_a, trans_b, M, N, K, 0.75, opencl.to_device(a), opencl.to_device(b), -0.5, C)
    expected = 0.75 * (op(a.astype(np.float64), trans_a) @ op(b.astype(np.float64), trans_b)) - 0.5 * c
    assert_close(C.get().reshape(M, N), expected)


@pytest.mark.parametrize("tiles", [(16, 64, 16, 2, 4), (64, 64, 16, 4, 4), (64, 64, 16, 8, 8),
                                   (128, 128, 32, 8, 8)])
@pytest.mark.parametrize("trans", [False, True])
def test_gemm_every_tile_config(rng, monkeypatch, tiles, trans):
    """Each tile configuration _gemm_tiles picks on some device, whichever device runs the test; K = 36 and
    N = 260 are multiples of 4 (vector loads) but not of the tiles."""
    monkeypatch.setattr(opencl, "_gemm_tiles", lambda M, N, dev: tiles)
    M, N, K = 133, 260, 36
    a = rand(rng, *((K, M) if trans else (M, K)))
    b = rand(rng, *((N, K) if trans else (K, N)))
    C = opencl.zeros(M * N)
    opencl.gemm(trans, trans, M, N, K, 1.0, opencl.to_device(a), opencl.to_device(b), 0.0, C)
    assert_close(C.get().reshape(M, N), op(a.astype(np.float64), trans) @ op(b, trans))


@pytest.mark.parametrize("trans_a,trans_b", [(False, True), (True, False)])
@pytest.mark.parametrize("chunks", [2, 5, 64])
def test_gemm_split_k_matches_numpy(rng, trans_a, trans_b, chunks):
    """Split-K (chosen on GPUs for small C and long K, forced here): partial products per K chunk, then a
    reduction with alpha, beta and C's offset; K is not a multiple of the chunks or the tiles."""
    M, N, K = 20, 25, 1003
    a = rand(rng, *((K, M) if trans_a else (M, K)))
    b = rand(rng, *((N, K) if trans_b else (K, N)))
    c = rand(rng, 3 + M * N)
    C = opencl.to_device(c)
    opencl.gemm(trans_a, trans_b, M, N, K, 0.5, opencl.to_device(a), opencl.to_device(b), 1.0, C, c_offset=3,
                split_k=chunks)
    expected = c.astype(np.float64)
    expected[3:] += 0.5 * (op(a.astype(np.float64), trans_a) @ op(b.astype(np.float64), trans_b)).ravel()
    assert_close(C.get(), expected)


@pytest.mark.parametrize("trans_a,trans_b", [(False, True), (True, False), (False, False), (True, True)])
@pytest.mark.parametrize("N", [1, 25, 64, 131])
@pytest.mark.parametrize("chunks", [1, 5])
def test_gemm_row_sums_in_the_same_launch(rng, trans_a, trans_b, N, chunks):
    """row_sums (a layer's bias gradient beside its weight gradient): r = alpha * op(A)'s row sums + beta * r,
    C as without it, one launch (two when split along K); N around the tiles and vector widths."""
    M, K = 20, 203
    a = rand(rng, *((K, M) if trans_a else (M, K)))
    b = rand(rng, *((N, K) if trans_b else (K, N)))
    c, r = rand(rng, M * N), rand(rng, 2 + M)
    C, R = opencl.to_device(c), opencl.to_device(r)
    opencl.reset_stats()
    opencl.gemm(trans_a, trans_b, M, N, K, 0.5, opencl.to_device(a), opencl.to_device(b), 1.0, C, split_k=chunks,
                row_sums=R[2:])
    assert opencl.stats()["launches"] == (1 if chunks == 1 else 2)
    a64 = op(a.astype(np.float64), trans_a)
    assert_close(C.get(), c + 0.5 * (a64 @ op(b.astype(np.float64), trans_b)).ravel())
    assert_close(R.get(), np.concatenate([r[:2], r[2:] + 0.5 * a64.sum(axis=1)]))
    with pytest.raises(KaffeError, match="bias and row_sums"):
        opencl.gemm(trans_a, trans_b, M, N, K, 1.0, opencl.to_device(a), opencl.to_device(b), 0.0, C, bias=R,
                    row_sums=R)


def test_gemm_split_k_is_chosen_only_for_small_outputs_on_gpus():
    gpu = SimpleNamespace(is_gpu=True, device=SimpleNamespace(max_compute_units=132))
    cpu = SimpleNamespace(is_gpu=False, device=SimpleNamespace(max_compute_units=2))
    assert opencl.gemm_split_k(20, 25, 36864, 1, gpu) == 64        # conv1's weight gradient
    assert opencl.gemm_split_k(4096, 4096, 4096, 1024, gpu) == 1   # enough tiles already
    assert opencl.gemm_split_k(20, 25, 300, 1, gpu) == 1           # too little K to split
    assert opencl.gemm_split_k(20, 25, 36864, 1, cpu) == 1


def test_gemm_offsets_and_views(rng):
    M, N, K = 9, 11, 6
    a, b, c = rand(rng, 3 + M * K), rand(rng, 5 + K * N), rand(rng, 2 + M * N + 4)
    A, B, C = opencl.to_device(a), opencl.to_device(b), opencl.to_device(c)
    # an offset given as an argument and one carried by a view add up
    opencl.gemm(False, True, M, N, K, 1.0, A, B[2:], 1.0, C, a_offset=3, b_offset=3, c_offset=2)
    expected = c.copy()
    expected[2:2 + M * N] += (a[3:].reshape(M, K) @ b[5:].reshape(N, K).T).ravel()
    assert_close(C.get(), expected)


def test_gemm_beta_zero_ignores_nan_in_c(rng):
    a, b = rand(rng, 4, 3), rand(rng, 3, 5)
    C = opencl.to_device(np.full(20, np.nan, np.float32))
    opencl.gemm(False, False, 4, 5, 3, 2.0, opencl.to_device(a), opencl.to_device(b), 0.0, C)
    assert_close(C.get().reshape(4, 5), 2.0 * a @ b)


def test_gemm_k_zero_scales_c(rng):
    c = rand(rng, 6)
    C = opencl.to_device(c)
    opencl.gemm(False, False, 2, 3, 0, 1.0, opencl.zeros(1), opencl.zeros(1), 0.5, C)
    assert_close(C.get(), 0.5 * c)


def test_gemm_rejects_too_small_buffers():
    with pytest.raises(KaffeError, match="gemm B"):
        opencl.gemm(False, False, 4, 4, 4, 1.0, opencl.zeros(16), opencl.zeros(15), 0.0, opencl.zeros(16))


@pytest.mark.skipif(opencl._pyclblast() is None, reason="pyclblast is not installed")
def test_gemm_clblast_backend(rng):
    M, N, K = 17, 10, 9
    a, b, c = rand(rng, 1 + K * M), rand(rng, K * N), rand(rng, M * N)
    C = opencl.to_device(c)
    opencl.set_gemm_backend("clblast")
    try:
        opencl.gemm(True, False, M, N, K, 1.0, opencl.to_device(a)[1:], opencl.to_device(b), 1.0, C)
    finally:
        opencl.set_gemm_backend("kaffe")
    assert_close(C.get(), c + (a[1:].reshape(K, M).T @ b.reshape(K, N)).ravel())


# -- BLAS-1 helpers and reductions -------------------------------------------------------------------------
def test_axpby_axpy_scale_fill_on_views(rng):
    x, y = rand(rng, 1000), rand(rng, 1003)
    X, Y = opencl.to_device(x), opencl.to_device(y)
    opencl.axpby(0.5, X, 2.0, Y[3:])
    expected = y.copy()
    expected[3:] = 0.5 * x + 2.0 * y[3:]
    assert_close(Y.get(), expected)
    opencl.axpy(-1.0, X, Y, n=10)
    expected[:10] -= x[:10]
    assert_close(Y.get(), expected)
    opencl.scale(3.0, Y)
    assert_close(Y.get(), 3.0 * expected)
    opencl.fill(Y[1:], 7.0, n=2)
    assert Y.get()[:4].tolist() == pytest.approx([3.0 * expected[0], 7.0, 7.0, 3.0 * expected[3]])


def test_sgd_momentum_and_weight_decay_on_device(rng):
    w, g, h = rand(rng, 300), rand(rng, 300), rand(rng, 300)
    W, G, H = opencl.to_device(w), opencl.to_device(g), opencl.to_device(h)
    opencl.axpy(0.01, W, G)                 # L2 decay
    opencl.add_scaled_sign(0.002, W, G)     # L1 decay
    opencl.axpby(0.1, G, 0.9, H)            # history = lr * g + momentum * history
    opencl.axpy(-1.0, H, W)                 # w -= history
    g_expected = g + 0.01 * w + 0.002 * np.sign(w)
    h_expected = 0.1 * g_expected + 0.9 * h
    assert_close(W.get(), w - h_expected)


def test_copy_with_offsets(rng):
    src = rand(rng, 50)
    dst = opencl.zeros(40)
    opencl.copy(opencl.to_device(src), dst, n=20, src_offset=5, dst_offset=10)
    expected = np.zeros(40, np.float32)
    expected[10:30] = src[5:25]
    np.testing.assert_array_equal(dst.get(), expected)
    with pytest.raises(KaffeError, match="copy destination"):
        opencl.copy(opencl.to_device(src), dst, n=35, dst_offset=10)


@pytest.mark.parametrize("n", [1, 255, 256, 1000, 70001])
def test_reductions(rng, n):
    x, y = rand(rng, n + 2), rand(rng, n + 2)
    X, Y = opencl.to_device(x)[2:], opencl.to_device(y)[2:]
    x64, y64 = x[2:].astype(np.float64), y[2:].astype(np.float64)
    assert opencl.asum(X) == pytest.approx(np.abs(x64).sum(), rel=1e-5)
    assert opencl.sumsq(X) == pytest.approx((x64 * x64).sum(), rel=1e-5)
    assert opencl.dot(X, Y) == pytest.approx((x64 * y64).sum(), rel=1e-4, abs=1e-3)


def test_reduction_of_nothing_is_zero():
    assert opencl.asum(opencl.zeros(4), n=0) == 0.0


# -- formula kernels ---------------------------------------------------------------------------------------
FORMULAS = {
    "relu": (lambda x, p, ops: ops.maximum(x, 0) + p.negative_slope * ops.minimum(x, 0),
             ("x",), {"negative_slope": 0.1}),
    "relu_backward": (lambda x, dy, p, ops: dy * ((x > 0) + p.negative_slope * (x <= 0)),
                      ("x", "dy"), {"negative_slope": -0.25}),
    "sigmoid": (lambda x, p, ops: 0.5 * ops.tanh(0.5 * x) + 0.5, ("x",), {}),
    "sigmoid_backward": (lambda y, dy, p, ops: dy * y * (1 - y), ("y", "dy"), {}),
    "tanh": (lambda x, p, ops: ops.tanh(x), ("x",), {}),
    "elu": (lambda x, p, ops: ops.where(x > 0, x, p.alpha * (ops.exp(x) - 1)), ("x",), {"alpha": 1.5}),
    "bnll": (lambda x, p, ops: ops.where(x > 0, x + ops.log1p(ops.exp(-x)), ops.log1p(ops.exp(x))), ("x",), {}),
    "power": (lambda x, p, ops: ops.pow(p.shift + p.scale * ops.abs(x), p.power), ("x",),
              {"power": 1.5, "scale": 2.0, "shift": 0.5}),
    "logic": (lambda x, y, p, ops: (((x > y) & ~(x > 1)) | (abs(y) >= 2)) + ops.sqrt(x * x) / 4 - x ** 2,
              ("x", "y"), {}),
}


@pytest.mark.parametrize("name", sorted(FORMULAS))
def test_elementwise_kernel_matches_numpy(rng, name):
    formula, inputs, params = FORMULAS[name]
    host = [rand(rng, 1001) * 3 for _ in inputs]
    p = SimpleNamespace(**{k: np.float32(v) for k, v in params.items()})
    expected = formula(*host, p, NUMPY_OPS)
    out = opencl.empty(1001)
    opencl.elementwise_kernel(name, formula, inputs, tuple(params))(out, *map(opencl.to_device, host), p=p)
    np.testing.assert_allclose(out.get(), expected, rtol=1e-5, atol=1e-5)


def test_elementwise_kernel_in_place_and_parameter_values(rng):
    forward = FORMULAS["relu"][0]
    relu = opencl.elementwise_kernel("relu", forward, ("x",), ("negative_slope",))
    assert opencl.elementwise_kernel("relu", forward, ("x",), ("negative_slope",)) is relu
    x = rand(rng, 77)
    X = opencl.to_device(x)
    relu(X, X, p={"negative_slope": 0.0})
    relu(X, X, p={"negative_slope": 2.0})  # same program, another value
    np.testing.assert_allclose(X.get(), np.maximum(x, 0))


def test_neuron_layer_formulas_compile(rng):
    """The formulas layers/neuron.py states once, with its numpy ops as the reference."""
    neuron = pytest.importorskip("kaffe.layers.neuron")
    layers = [cls for cls in vars(neuron).values()
              if isinstance(cls, type) and getattr(cls, "formula", None) is not None]
    x = rand(rng, 300)
    y, dy = np.tanh(x), rand(rng, 300)
    for cls in layers:
        formula = cls.formula
        params = formula.params(neuron.caffe_pb2.LayerParameter())
        p = SimpleNamespace(**{k: np.float32(v) for k, v in params.items()})
        name = cls.__name__.lower()
        out = opencl.empty(300)
        opencl.elementwise_kernel(name + "_forward", formula.forward, ("x",), tuple(params))(
            out, opencl.to_device(x), p=p)
        np.testing.assert_allclose(out.get(), formula.forward(x, p, neuron.NUMPY_OPS), rtol=1e-5, atol=1e-6)
        if formula.backward is None:  # forward-only (Threshold)
            continue
        opencl.elementwise_kernel(name + "_backward", formula.backward, ("x", "y", "dy"), tuple(params))(
            out, *map(opencl.to_device, (x, y, dy)), p=p)
        np.testing.assert_allclose(out.get(), formula.backward(x, y, dy, p, neuron.NUMPY_OPS),
                                   rtol=1e-5, atol=1e-6)


def test_formula_errors():
    with pytest.raises(KaffeError, match="ops.where"):
        opencl.elementwise_kernel("branchy", lambda x, p, ops: x if x > 0 else -x, ("x",))
    with pytest.raises(KaffeError, match="slope"):
        opencl.elementwise_kernel("undeclared", lambda x, p, ops: p.slope * x, ("x",))
    scaled = opencl.elementwise_kernel("scaled", lambda x, p, ops: p.a * x, ("x",), ("a",))
    with pytest.raises(KaffeError, match="parameters"):
        scaled(opencl.zeros(3), opencl.zeros(3), p={})


# -- programs and devices -------------------------------------------------------------------------------------
def test_program_is_cached_and_build_errors_show_the_log():
    source = "__kernel void twice(__global float* x) { x[get_global_id(0)] *= SCALE; }"
    assert opencl.program(source, {"SCALE": 2.0}) is opencl.program(source, {"SCALE": 2.0})
    assert opencl.program(source, {"SCALE": 2.0}) is not opencl.program(source, {"SCALE": 3.0})
    with pytest.raises(KaffeError, match="undeclared|undefined|unknown"):
        opencl.program("__kernel void broken(__global float* x) { x[0] = undefined_name; }")


def test_select_device_out_of_range_lists_devices():
    count = len(opencl.devices())
    with pytest.raises(KaffeError, match=r"device 99 does not exist(.|\n)*0: "):
        opencl.select_device(99)
    assert count == len(opencl.devices())


def test_select_device_without_platform(monkeypatch):
    monkeypatch.setattr(opencl, "devices", lambda: [])
    monkeypatch.setitem(opencl._selected, "by_index", {})
    with pytest.raises(KaffeError, match="pocl-opencl-icd"):
        opencl.select_device(0)


def test_devices_list_gpus_first():
    kinds = [bool(d.type & opencl.cl.device_type.GPU) for _, d in opencl.devices()]
    assert kinds == sorted(kinds, reverse=True)


# -- host/device memory -------------------------------------------------------------------------------------
def test_synced_memory_heads():
    mem = SyncedMemory(5)
    assert mem.head == UNINITIALIZED
    mem.mutable_cpu()[:] = np.arange(5)
    assert mem.head == HEAD_AT_CPU
    device_copy = mem.gpu()                     # copies host -> device
    assert mem.head == SYNCED
    np.testing.assert_array_equal(device_copy.get(), np.arange(5))
    assert mem.gpu() is device_copy and mem.head == SYNCED  # synced: nothing to copy
    opencl.scale(2.0, mem.mutable_gpu())
    assert mem.head == HEAD_AT_GPU
    np.testing.assert_array_equal(mem.cpu(), 2 * np.arange(5))   # copies device -> host
    assert mem.head == SYNCED
    mem.mutable_cpu()[0] = 9
    assert mem.head == HEAD_AT_CPU
    assert mem.gpu().get()[0] == 9


def test_synced_memory_placed_on_host_keeps_its_values_in_the_given_array():
    shared = np.full(9, -1, np.float32)
    fresh, written, on_device = SyncedMemory(3), SyncedMemory(3), SyncedMemory(3)
    fresh.place_on_host(shared[0:3])                 # nothing held yet: reads as zeros, in the array
    written.mutable_cpu()[:] = [1, 2, 3]
    written.place_on_host(shared[3:6])               # host copy current: moved into the array
    opencl.fill(on_device.mutable_gpu(), 5.0)
    on_device.place_on_host(shared[6:9])             # device copy newest: comes down into the array when read
    assert fresh.cpu().base is shared and on_device.cpu().base is shared
    np.testing.assert_array_equal(shared, [0, 0, 0, 1, 2, 3, 5, 5, 5])
    shared *= 2                                      # what an in-place reduction does to the buffer
    written.mutable_cpu()
    np.testing.assert_array_equal(written.gpu().get(), [2, 4, 6])


def test_synced_memory_starts_zeroed_on_device():
    mem = SyncedMemory(4)
    np.testing.assert_array_equal(mem.gpu().get(), np.zeros(4))
    assert mem.head == HEAD_AT_GPU


def test_blob_update_and_norms_on_device(rng, gpu_mode):
    blob = Blob(2, 3)
    data, diff = rand(rng, 2, 3), rand(rng, 2, 3)
    blob.data = data
    blob.diff = diff
    blob.mutable_gpu_data()
    blob.mutable_gpu_diff()
    assert blob.asum_diff() == pytest.approx(np.abs(diff).sum(), rel=1e-5)
    assert blob.sumsq_data() == pytest.approx((data.astype(np.float64) ** 2).sum(), rel=1e-5)
    blob.scale_diff(0.5)
    blob.update()
    assert blob._data.head == HEAD_AT_GPU
    np.testing.assert_allclose(blob.cpu_data(), data - 0.5 * diff, rtol=1e-6)


def test_blob_keeps_device_memory_when_reshaped_smaller(rng, gpu_mode):
    blob = Blob(10)
    blob.data = rand(rng, 10)
    blob.reshape(4)
    assert blob.gpu_data().size == 4
    blob.mutable_gpu_diff()
    blob.update()
    np.testing.assert_allclose(blob.gpu_data().get(), blob.cpu_data())


def test_blob_device_views_are_made_once_per_memory_and_count(rng, gpu_mode):
    blob = Blob(2, 3)
    view = blob.gpu_data()
    assert blob.gpu_data() is view and blob.mutable_gpu_data() is view and view.size == 6
    blob.reshape(4)                     # smaller: the same memory, a view of its first 4 values
    assert blob.gpu_data().size == 4 and blob.gpu_data() is blob.gpu_data()
    blob.reshape(3, 3)                  # bigger: new memory, new views
    values = rand(rng, 3, 3)
    blob.data = values
    np.testing.assert_array_equal(blob.gpu_data().get(), values.ravel())
    assert blob.gpu_diff() is not blob.gpu_data()


AFFINE = """__kernel void affine(const int n, __global float* out, const int out_offset, const int shift,
                             const float a) {
    const int i = get_global_id(0);
    if (i < n)
        out[out_offset + i] = a * (float)(i + shift);
}"""


def test_launch_scalars_typed_at_the_first_launch_and_set_at_every_launch():
    out = opencl.zeros(6)
    # Python int and numpy's float64 (a float subclass) become int32 and float32, as later numpy scalars
    opencl.launch(AFFINE, "affine", 4, *opencl.device_args(out), 3, np.float64(0.5))
    assert out.get().tolist() == [1.5, 2.0, 2.5, 3.0, 0.0, 0.0]
    opencl.launch(AFFINE, "affine", 2, *opencl.device_args(out, 4), np.int32(1), np.float32(-2.0))
    assert out.get().tolist() == [1.5, 2.0, 2.5, 3.0, -2.0, -4.0]
    opencl.launch(AFFINE, "affine", 1, *opencl.device_args(out), 0, -0.0)   # -0.0 == 0.0, its sign is kept
    assert np.signbit(out.get()[0])


def test_uploads_keep_their_copy_events_until_the_copies_are_done():
    """pyopencl waits for a host copy when its event is dropped: kaffe keeps the events, so an upload enqueued
    behind other work does not make the host wait."""
    dev = opencl.current()
    host = np.arange(5, dtype=np.float32)
    array = opencl.upload(host, opencl.empty(5))
    host[:] = -1                        # the upload copied a private snapshot
    assert dev.pending_uploads
    opencl.finish()
    assert not dev.pending_uploads
    assert array.get().tolist() == [0, 1, 2, 3, 4]
