"""Finite-difference gradient checks for layers, after Caffe's GradientChecker.

The objective is L = sum_k <top_k, W_k> with fixed random weights W_k, so the analytic gradient is
backward() with top diffs W_k. Each checked value (bottom data, parameter data) is moved by +-step
and L is re-evaluated; the two must agree within threshold * max(|analytic|, |numeric|, 1).
"""
import numpy as np
from google.protobuf import text_format

from kaffe.engine import device
from kaffe.engine.blob import Blob
from kaffe.engine import layer as layer_module
from kaffe.engine.layer import create_layer
from kaffe.engine.syncedmem import HEAD_AT_GPU, SyncedMemory
from kaffe.proto import caffe_pb2


def rand(*shape, seed=0, scale=1.0):
    """Seeded standard-normal float64 values times scale."""
    return np.random.default_rng(seed).standard_normal(shape) * scale


def rand32(*shape, seed=0, scale=1.0):
    """rand() in float32 (what the blobs hold), for tests that compare arrays as the layers see them."""
    return rand(*shape, seed=seed, scale=scale).astype(np.float32)


def positive(*shape, seed=0):
    """Non-negative activations with distinct values (as after a ReLU), for STOCHASTIC pooling."""
    return np.random.default_rng(seed).uniform(0.2, 2.0, shape).astype(np.float32)


def distinct(*shape, seed=0, spacing=0.05):
    """No ties, spaced more than twice the gradient checker's step (MAX pooling's choice stays put)."""
    count = int(np.prod(shape))
    values = np.random.default_rng(seed).permutation(count) * spacing - count * spacing / 2
    return values.reshape(shape).astype(np.float32)


def distinct_centred(*shape, seed=0, gap=0.05):
    """Values at least `gap` apart with mean 0 (MAX pooling gradients: no two values in a window within the
    finite-difference step)."""
    values = np.random.default_rng(seed).permutation(int(np.prod(shape))) * gap
    return (values - values.mean()).reshape(shape).astype(np.float32)


def make_layer(text, phase=caffe_pb2.TRAIN):
    """A layer from the text of a LayerParameter, e.g. 'type: "ReLU" relu_param { negative_slope: 0.1 }'."""
    param = text_format.Parse(text, caffe_pb2.LayerParameter())
    if not param.name:
        param.name = param.type.lower()
    if not param.HasField("phase"):
        param.phase = phase
    return create_layer(param)


def blobs_from(*arrays):
    blobs = []
    for a in arrays:
        a = np.asarray(a, dtype=np.float32)
        b = Blob(a.shape)
        b.data[...] = a
        blobs.append(b)
    return blobs


def setup_layer(layer, bottom, num_top=None):
    """Create the tops the layer needs and run setup; returns the top blobs."""
    n = num_top if num_top is not None else (layer.exact_num_top_blobs or layer.min_top_blobs or 1)
    top = [Blob() for _ in range(n)]
    layer.setup(bottom, top)
    return top


def forward(text, *arrays, num_top=None):
    """(layer, bottom, top) of a fresh layer after setup and one forward."""
    layer = make_layer(text)
    bottom = blobs_from(*arrays)
    top = setup_layer(layer, bottom, num_top)
    layer.forward(bottom, top)
    return layer, bottom, top


def check_gradient(layer, bottom, top, step=1e-2, threshold=1e-2, check_bottom=None, check_params=True,
                   seed=1701, kink=None, kink_range=-1.0):
    """Compare analytic and numeric gradients for the bottoms in check_bottom (default: all) and params.

    kink/kink_range: skip values within kink_range of kink (e.g. ReLU at 0), as Caffe's checker does.
    Raises AssertionError with the first mismatches.
    """
    rng = np.random.default_rng(seed + 1)
    check_bottom = range(len(bottom)) if check_bottom is None else check_bottom

    def forward():
        device.set_random_seed(seed)
        layer.forward(bottom, top)

    forward()
    weights = [rng.standard_normal(t.shape) for t in top]

    def objective():
        forward()
        return sum(float(np.sum(t.data.astype(np.float64) * w)) for t, w in zip(top, weights))

    # analytic gradients
    forward()
    # zero first: layers such as Flatten share their bottom's diff with their top
    for p in layer.blobs:
        p.diff[...] = 0
    for b in bottom:
        b.diff[...] = 0
    for t, w in zip(top, weights):
        t.diff[...] = w
    propagate = [i in check_bottom for i in range(len(bottom))]
    layer.backward(top, propagate, bottom)
    targets = [(f"bottom[{i}]", bottom[i], bottom[i].diff.astype(np.float64).copy()) for i in check_bottom]
    if check_params:
        targets += [(f"param[{j}]", p, p.diff.astype(np.float64).copy()) for j, p in enumerate(layer.blobs)]

    failures = []
    for label, blob, analytic in targets:
        flat_data = blob.data.reshape(-1)
        flat_analytic = analytic.reshape(-1)
        for i in range(blob.count):
            x = float(flat_data[i])
            if kink is not None and abs(x - kink) <= kink_range:
                continue
            blob.data.reshape(-1)[i] = x + step
            plus = objective()
            blob.data.reshape(-1)[i] = x - step
            minus = objective()
            blob.data.reshape(-1)[i] = x
            numeric = (plus - minus) / (2 * step)
            scale = max(abs(numeric), abs(flat_analytic[i]), 1.0)
            if abs(numeric - flat_analytic[i]) > threshold * scale:
                failures.append(f"{label}[{i}]: analytic {flat_analytic[i]:.6g} numeric {numeric:.6g}")
    assert not failures, f"{layer.type} '{layer.name}' gradient mismatch ({len(failures)}): " + "; ".join(failures[:8])


def opencl_available():
    try:
        import pyopencl as cl
        return bool(cl.get_platforms())
    except Exception:  # no ICD loader, no platform: the OpenCL tests skip with this reason
        return False


def gpu_host_copies(monkeypatch, text, arrays, num_top=None, propagate=None, phase=caffe_pb2.TRAIN):
    """(layer, bottom, top, sizes of its device-to-host copies) over one GPU-mode forward and backward of a fresh layer whose
    bottoms and top diffs start on the device, as a previous GPU layer leaves them. The one-time CPU-fallback
    warning is re-armed, so that a fallback shows in the log."""
    monkeypatch.setattr(layer_module, "_warned_fallback", set())
    copies = []
    to_cpu = SyncedMemory._to_cpu

    def counting_to_cpu(memory):
        if memory.head == HEAD_AT_GPU:
            copies.append(memory.count)
        to_cpu(memory)

    device.set_mode_gpu()
    try:
        layer = make_layer(text, phase)
        bottom = blobs_from(*arrays)
        top = setup_layer(layer, bottom, num_top)
        for b in bottom:
            b.mutable_gpu_data()
        # a loss top's diff holds its loss weight, set on the host at setup; the other tops get device diffs
        for t in [t for i, t in enumerate(top) if not layer.loss(i)]:
            t.diff[...] = 1.0
            t.mutable_gpu_diff()
        monkeypatch.setattr(SyncedMemory, "_to_cpu", counting_to_cpu)
        layer.forward(bottom, top)
        layer.backward(top, propagate, bottom)
        monkeypatch.setattr(SyncedMemory, "_to_cpu", to_cpu)
    finally:
        device.set_mode_cpu()
    return layer, bottom, top, copies


def run_layer(text, arrays, mode, num_top=None, top_diffs=None, seed=1701, phase=caffe_pb2.TRAIN):
    """Forward (and backward, given top diffs) of a fresh layer in `mode` ('CPU' or 'GPU').

    Returns (top data arrays, bottom diff arrays, param diff arrays), all copied to the host.
    """
    if mode == device.GPU:
        device.set_mode_gpu()
    else:
        device.set_mode_cpu()
    try:
        device.set_random_seed(seed)
        layer = make_layer(text, phase)
        bottom = blobs_from(*arrays)
        top = setup_layer(layer, bottom, num_top)
        device.set_random_seed(seed + 1)
        layer.forward(bottom, top)
        outputs = [t.data.copy() for t in top]
        bottom_diffs, param_diffs = [], []
        if top_diffs is not None:
            for t, d in zip(top, top_diffs):
                t.diff[...] = d
            for p in layer.blobs:
                p.diff[...] = 0
            layer.backward(top, [True] * len(bottom), bottom)
            bottom_diffs = [b.diff.copy() for b in bottom]
            param_diffs = [p.diff.copy() for p in layer.blobs]
        return outputs, bottom_diffs, param_diffs
    finally:
        device.set_mode_cpu()


def check_parity(text, arrays, num_top=None, rtol=1e-4, atol=1e-5, backward=True, seed=1701,
                 phase=caffe_pb2.TRAIN):
    """The layer's OpenCL forward/backward equals its CPU forward/backward (same seed, same inputs)."""
    rng = np.random.default_rng(seed)
    cpu = run_layer(text, arrays, device.CPU, num_top, seed=seed, phase=phase)
    diffs = [rng.standard_normal(o.shape).astype(np.float32) for o in cpu[0]] if backward else None
    cpu = run_layer(text, arrays, device.CPU, num_top, diffs, seed=seed, phase=phase)
    gpu = run_layer(text, arrays, device.GPU, num_top, diffs, seed=seed, phase=phase)
    for kind, a_list, b_list in zip(("top", "bottom diff", "param diff"), cpu, gpu):
        for i, (a, b) in enumerate(zip(a_list, b_list)):
            np.testing.assert_allclose(b, a, rtol=rtol, atol=atol, err_msg=f"{kind} {i} differs on OpenCL")
