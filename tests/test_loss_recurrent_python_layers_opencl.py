"""OpenCL side of test_loss_recurrent_python_layers' losses and recurrent layers: CPU vs OpenCL parity, GPU-mode
gradient checks, and the host fallback (with its one-time warning) for the layers Caffe has no GPU code for."""
import numpy as np
import pytest
from gradient_check import blobs_from, check_gradient, make_layer, opencl_available, rand, setup_layer

from kaffe.engine import device
from kaffe.engine.layer import _warned_fallback as warned_fallback

pytestmark = [pytest.mark.opencl,
              pytest.mark.skipif(not opencl_available(), reason="no OpenCL platform (install pocl-opencl-icd)")]


def run(text, arrays, mode, propagate, num_top, top_diffs=None):
    """(tops, bottom diffs of the propagated bottoms, param diffs) of a fresh layer in `mode`."""
    device.set_mode_gpu() if mode == device.GPU else device.set_mode_cpu()
    try:
        device.set_random_seed(1701)
        layer = make_layer(text)
        bottom = blobs_from(*arrays)
        top = setup_layer(layer, bottom, num_top)
        layer.forward(bottom, top)
        outputs = [t.data.copy() for t in top]
        if top_diffs is None:
            return outputs
        for t, d in zip(top, top_diffs):
            t.diff[...] = d
        for b in bottom:
            b.diff[...] = 0
        layer.backward(top, propagate, bottom)
        return (outputs, [b.diff.copy() for b, go in zip(bottom, propagate) if go],
                [p.diff.copy() for p in layer.blobs])
    finally:
        device.set_mode_cpu()


def check_parity(text, arrays, propagate=(True, False), num_top=None, rtol=1e-4, atol=1e-5):
    """CPU and OpenCL agree on the tops, the diffs of the propagated bottoms and the parameter diffs."""
    propagate = list(propagate) + [False] * (len(arrays) - len(propagate))
    tops = run(text, arrays, device.CPU, propagate, num_top)
    rng = np.random.default_rng(3)
    diffs = [rng.standard_normal(t.shape).astype(np.float32) + 1.5 for t in tops]  # a loss weight is the top diff
    cpu = run(text, arrays, device.CPU, propagate, num_top, diffs)
    gpu = run(text, arrays, device.GPU, propagate, num_top, diffs)
    for kind, a_list, b_list in zip(("top", "bottom diff", "param diff"), cpu, gpu):
        for i, (a, b) in enumerate(zip(a_list, b_list)):
            np.testing.assert_allclose(b, a, rtol=rtol, atol=atol, err_msg=f"{kind} {i} differs on OpenCL")


def gpu_gradient(text, arrays, check_bottom, num_top=None, tops=None, **kw):
    device.set_mode_gpu()
    try:
        layer = make_layer(text)
        bottom = blobs_from(*arrays)
        top = setup_layer(layer, bottom, num_top)
        check_gradient(layer, bottom, top if tops is None else top[:tops], check_bottom=check_bottom, **kw)
    finally:
        device.set_mode_cpu()


def targets(shape, ignore=None, seed=1):
    t = np.random.default_rng(seed).random(shape)
    if ignore is not None:
        t.reshape(-1)[::4] = ignore
    return t


@pytest.mark.parametrize("param", ["", "loss_param { normalization: VALID ignore_label: -1 }",
                                   "loss_param { normalization: FULL }", "loss_param { normalize: true }",
                                   "loss_param { normalization: NONE ignore_label: -1 }"])
def test_sigmoid_cross_entropy_parity(param):
    x = rand(5, 3, 7, scale=4)
    x[0, 0, :2] = [60, -60]
    check_parity(f'type: "SigmoidCrossEntropyLoss" {param}', [x, targets((5, 3, 7), ignore=-1)])


def test_sigmoid_cross_entropy_gpu_gradient():
    gpu_gradient('type: "SigmoidCrossEntropyLoss" loss_param { ignore_label: -1 normalization: VALID }',
                 [rand(3, 5), targets((3, 5), ignore=-1)], check_bottom=[0])


def test_euclidean_parity_and_gradient():
    a, b = rand(7, 3, 5), rand(7, 15, seed=2)
    check_parity('type: "EuclideanLoss"', [a, b], propagate=[True, True])
    gpu_gradient('type: "EuclideanLoss"', [rand(3, 5), rand(3, 5, seed=3)], check_bottom=[0, 1])


@pytest.mark.parametrize("param", ["", "contrastive_loss_param { margin: 3 }",
                                   "contrastive_loss_param { legacy_version: true margin: 0.7 }"])
def test_contrastive_parity(param):
    n, c = 33, 5
    a, b = rand(n, c, scale=0.6), rand(n, c, seed=4, scale=0.6)
    y = (np.random.default_rng(5).random(n) > 0.5).astype(float)
    check_parity(f'type: "ContrastiveLoss" {param}', [a, b, y], propagate=[True, True])


def test_contrastive_gpu_gradient():
    y = np.array([1, 0, 0, 1, 0.0])
    gpu_gradient('type: "ContrastiveLoss" contrastive_loss_param { margin: 2 }',
                 [rand(5, 3, 1, 1, scale=0.5), rand(5, 3, 1, 1, seed=6, scale=0.5), y], check_bottom=[0, 1], step=1e-3)


def test_lstm_unit_parity_and_gradient():
    c_prev, gates = rand(1, 37, 5), rand(1, 37, 20, seed=7, scale=2)
    cont = (np.random.default_rng(8).random((1, 37)) > 0.3).astype(float)
    check_parity('type: "LSTMUnit"', [c_prev, gates, cont], propagate=[True, True], num_top=2)
    gpu_gradient('type: "LSTMUnit"', [rand(1, 3, 2), rand(1, 3, 8, seed=9), [[1, 0, 1]]], check_bottom=[0, 1],
                 num_top=2)


FILLERS = 'weight_filler { type: "uniform" min: -0.6 max: 0.6 } bias_filler { type: "uniform" min: -0.5 max: 0.5 }'


@pytest.mark.parametrize("text, arrays, num_top", [
    ('type: "MultinomialLogisticLoss"', [np.full((4, 5), 0.2), [0, 2, 4, 1]], None),
    ('type: "InfogainLoss"', [rand(4, 3), [0, 2, 1, 1], np.eye(3) + 0.1], None),
    ('type: "HingeLoss" hinge_loss_param { norm: L2 }', [rand(4, 5), [0, 2, 4, 1]], None),
    (f'type: "LSTM" recurrent_param {{ num_output: 3 {FILLERS} }}',
     [rand(3, 2, 4), [[0, 0], [1, 1], [1, 0]], rand(2, 5, seed=11)], None),
    (f'type: "RNN" recurrent_param {{ num_output: 3 expose_hidden: true {FILLERS} }}',
     [rand(3, 2, 4), [[1, 0], [1, 1], [1, 0]], rand(1, 2, 3, seed=12)], 2),
])
def test_host_layers_run_in_gpu_mode(text, arrays, num_top, kaffe_log):
    type_name = text.split('"')[1]
    warned_fallback.discard(type_name)  # the warning comes once per type and process
    check_parity(text, arrays, num_top=num_top, rtol=1e-5, propagate=[True, False, "LSTM" in text])
    assert any(type_name in m and "no OpenCL implementation" in m for m in kaffe_log)


def test_recurrent_gpu_mode_gradient():
    gpu_gradient(f'type: "LSTM" recurrent_param {{ num_output: 2 {FILLERS} }}',
                 [rand(3, 2, 3), [[0, 0], [1, 1], [1, 0]], rand(2, 2, seed=10)], check_bottom=[0, 2])
