"""OpenCL versions of the layers of test_activation_common_normalization_layers: CPU vs OpenCL parity (forward, bottom and parameter
gradients, BatchNorm's running statistics, in place) and finite-difference gradients in GPU mode."""
import numpy as np
import pytest
from gradient_check import blobs_from, check_gradient, make_layer, opencl_available, rand32 as rand, setup_layer
from test_activation_common_normalization_layers import ACTIVATIONS, away_from

from kaffe.engine import device
from kaffe.engine import layer as layer_module
from kaffe.engine.blob import Blob
from kaffe.engine.errors import KaffeError
from kaffe.proto import caffe_pb2

pytestmark = [pytest.mark.opencl,
              pytest.mark.skipif(not opencl_available(), reason="no OpenCL platform (install pocl-opencl-icd)")]

TRAIN, TEST = caffe_pb2.TRAIN, caffe_pb2.TEST


def run(mode, text, arrays, top_diffs=None, num_top=None, propagate=None, in_place=False, phase=TRAIN, passes=1,
        blob_values=None):
    """Host copies of (tops, propagated bottom diffs, parameter data, parameter diffs) of a fresh layer in `mode`
    after `passes` forwards and (given top_diffs) one backward."""
    (device.set_mode_gpu if mode == device.GPU else device.set_mode_cpu)()
    try:
        device.set_random_seed(1701)
        layer = make_layer(text, phase)
        bottom = blobs_from(*arrays)
        if in_place:
            top = bottom[:1]
            layer.setup(bottom, top)
        else:
            top = setup_layer(layer, bottom, num_top)
        for blob, values in zip(layer.blobs, blob_values or []):
            blob.data[...] = values
        for _ in range(passes):
            layer.forward(bottom, top)
        tops = [t.data.copy() for t in top]
        propagate = propagate or [True] * len(bottom)
        diffs = []
        if top_diffs is not None:
            for t, d in zip(top, top_diffs):
                t.diff[...] = d
            for p in layer.blobs:
                p.diff[...] = 0
            layer.backward(top, propagate, bottom)
            diffs = [b.diff.copy() for b, down in zip(bottom, propagate) if down]
        return tops, diffs, [p.data.copy() for p in layer.blobs], [p.diff.copy() for p in layer.blobs]
    finally:
        device.set_mode_cpu()


def assert_parity(text, arrays, backward=True, rtol=1e-4, atol=1e-5, **kwargs):
    tops = run(device.CPU, text, arrays, **kwargs)[0]
    diffs = [rand(*t.shape, seed=40 + i) for i, t in enumerate(tops)] if backward else None
    cpu = run(device.CPU, text, arrays, diffs, **kwargs)
    gpu = run(device.GPU, text, arrays, diffs, **kwargs)
    for kind, a_list, b_list in zip(("top", "bottom diff", "param data", "param diff"), cpu, gpu):
        assert len(a_list) == len(b_list)
        for i, (a, b) in enumerate(zip(a_list, b_list)):
            np.testing.assert_allclose(b, a, rtol=rtol, atol=atol, err_msg=f"{kind} {i} differs on OpenCL")


def gpu_gradient(text, arrays, num_top=None, check_bottom=None, phase=TRAIN, blob_values=None, **kwargs):
    device.set_mode_gpu()
    try:
        layer = make_layer(text, phase)
        bottom = blobs_from(*arrays)
        top = setup_layer(layer, bottom, num_top)
        for blob, values in zip(layer.blobs, blob_values or []):
            blob.data[...] = values
        check_gradient(layer, bottom, top, check_bottom=check_bottom, **kwargs)
    finally:
        device.set_mode_cpu()


# -- activations -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(ACTIVATIONS))
def test_activation_parity(case):
    text, x, _, _ = ACTIVATIONS[case]
    # also across work-groups: 2 * 3 * 257 values
    big = np.resize(x, (2, 3, 257)) * np.float32(1.01)
    assert_parity(text, [x])
    assert_parity(text, [big])


@pytest.mark.parametrize("case", ["bnll", "power_sqrt", "log_base10", "clip", "swish_beta", "elu"])
def test_activation_in_place_parity(case):
    text, x, _, _ = ACTIVATIONS[case]
    assert_parity(text, [x], in_place=True)


@pytest.mark.parametrize("case", ["absval", "bnll", "elu_alpha", "power_square", "power_inverse", "exp_base2",
                                  "log_base2_negative_scale", "clip", "swish_beta"])
def test_activation_gradient_on_gpu(case):
    text, x, _, _ = ACTIVATIONS[case]
    gpu_gradient(text, [x[:2, :3, :3]], threshold=2e-3)


def test_threshold_on_gpu():
    x = rand(3, 5, 7)
    assert_parity('type: "Threshold" threshold_param { threshold: 0.2 }', [x], backward=False)
    device.set_mode_gpu()
    try:
        layer = make_layer('type: "Threshold"')
        bottom = blobs_from(x)
        top = setup_layer(layer, bottom)
        layer.forward(bottom, top)
        with pytest.raises(KaffeError, match="no backward"):
            layer.backward(top, [True], bottom)
    finally:
        device.set_mode_cpu()


def test_no_cpu_fallback_for_these_layers():
    fallback = layer_module.Layer.forward_gpu
    for name in ["AbsVal", "BNLL", "ELU", "PReLU", "Power", "Exp", "Log", "Threshold", "Clip", "Swish", "Embed",
                 "Slice", "Tile", "Reduction", "Bias", "Scale", "BatchReindex", "Filter", "Parameter", "BatchNorm",
                 "MVN"]:
        assert layer_module._REGISTRY[name].forward_gpu is not fallback, name
        assert layer_module._REGISTRY[name].backward_gpu is not layer_module.Layer.backward_gpu, name


# -- PReLU -----------------------------------------------------------------------------------------------------------
PRELU = 'type: "PReLU" prelu_param { filler { type: "uniform" min: -1 max: 1 } }'
PRELU_SHARED = 'type: "PReLU" prelu_param { channel_shared: true filler { type: "constant" value: -0.3 } }'


@pytest.mark.parametrize("text", [PRELU, PRELU_SHARED])
@pytest.mark.parametrize("in_place", [False, True])
def test_prelu_parity(text, in_place):
    assert_parity(text, [rand(3, 5, 2, 37, scale=2)], in_place=in_place)


@pytest.mark.parametrize("text", [PRELU, PRELU_SHARED])
def test_prelu_gradient_on_gpu(text):
    gpu_gradient(text, [away_from(rand(2, 3, 5), [0.0])], threshold=2e-3)


# -- common layers ---------------------------------------------------------------------------------------------------
EMBED = ('type: "Embed" embed_param { num_output: 5 input_dim: 9 weight_filler { type: "gaussian" } '
         'bias_filler { type: "gaussian" } }')
INDICES = np.random.default_rng(3).integers(0, 9, size=(4, 70)).astype(np.float32)  # many repeats: atomics


@pytest.mark.parametrize("text", [EMBED, EMBED.replace("} }", "} bias_term: false }")])
def test_embed_parity(text):
    assert_parity(text, [INDICES], propagate=[False])


def test_embed_gradient_on_gpu():
    gpu_gradient(EMBED, [INDICES[:2, :3]], check_bottom=[], threshold=1e-3)


@pytest.mark.parametrize("text, num_top", [
    ("slice_param { slice_point: 1 slice_point: 4 }", 3), ("slice_param { axis: 0 }", 2),
    ("slice_param { axis: -1 slice_point: 2 }", 2), ("slice_param { slice_dim: 2 slice_point: 3 }", 2),
    ("", 1)])
def test_slice_parity(text, num_top):
    assert_parity(f'type: "Slice" {text}', [rand(4, 5, 7, 3)], num_top=num_top)


def test_slice_gradient_on_gpu():
    gpu_gradient('type: "Slice" slice_param { axis: 1 slice_point: 2 }', [rand(2, 5, 3)], num_top=2)


@pytest.mark.parametrize("axis, tiles", [(0, 2), (1, 3), (-1, 4)])
def test_tile_parity(axis, tiles):
    assert_parity(f'type: "Tile" tile_param {{ axis: {axis} tiles: {tiles} }}', [rand(3, 5, 7)])


def test_tile_gradient_on_gpu():
    gpu_gradient('type: "Tile" tile_param { axis: 1 tiles: 3 }', [rand(2, 3, 2)])


@pytest.mark.parametrize("op", ["SUM", "ASUM", "SUMSQ", "MEAN"])
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_reduction_parity(op, axis):
    # axis 0: one row of 555 values, more than a work-group
    assert_parity(f'type: "Reduction" reduction_param {{ operation: {op} axis: {axis} coeff: -1.5 }}',
                  [rand(3, 5, 37)], rtol=2e-4)


@pytest.mark.parametrize("op", ["SUM", "ASUM", "SUMSQ", "MEAN"])
def test_reduction_gradient_on_gpu(op):
    gpu_gradient(f'type: "Reduction" reduction_param {{ operation: {op} axis: 1 coeff: 0.5 }}',
                 [away_from(rand(3, 2, 3), [0.0])], threshold=2e-3)


BIAS_CASES = [
    ('type: "Bias" bias_param { filler { type: "gaussian" } }', [(3, 4, 5, 6)]),
    ('type: "Bias" bias_param { axis: 2 num_axes: -1 filler { type: "gaussian" } }', [(3, 4, 5, 6)]),
    ('type: "Bias" bias_param { num_axes: 0 filler { type: "gaussian" } }', [(3, 4, 5)]),
    ('type: "Bias" bias_param { axis: 1 }', [(3, 4, 5, 6), (4, 5)]),
]


@pytest.mark.parametrize("text, shapes", BIAS_CASES)
def test_bias_parity(text, shapes):
    arrays = [rand(*s, seed=i) for i, s in enumerate(shapes)]
    assert_parity(text, arrays)
    if len(shapes) == 1:
        assert_parity(text, arrays, in_place=True)


def test_bias_gradient_on_gpu():
    gpu_gradient('type: "Bias" bias_param { axis: 0 num_axes: 2 filler { type: "gaussian" } }', [rand(3, 2, 3)])
    gpu_gradient('type: "Bias"', [rand(2, 3, 2), rand(3, 2, seed=1)])


SCALE_CASES = [
    ('type: "Scale" scale_param { filler { type: "gaussian" } bias_term: true bias_filler { type: "gaussian" } }',
     [(3, 4, 5, 6)]),
    ('type: "Scale" scale_param { axis: 2 num_axes: 2 filler { type: "gaussian" } }', [(3, 4, 5, 6)]),
    ('type: "Scale" scale_param { num_axes: 0 filler { type: "gaussian" } }', [(3, 4, 5)]),
    ('type: "Scale" scale_param { axis: 0 bias_term: true bias_filler { type: "gaussian" } }', [(3, 4, 5), (3, 4)]),
]


@pytest.mark.parametrize("text, shapes", SCALE_CASES)
def test_scale_parity(text, shapes):
    arrays = [rand(*s, seed=i) for i, s in enumerate(shapes)]
    assert_parity(text, arrays)
    if len(shapes) == 1:
        assert_parity(text, arrays, in_place=True)


def test_scale_gradient_on_gpu():
    gpu_gradient(SCALE_CASES[0][0], [rand(2, 3, 2, 2)])
    gpu_gradient(SCALE_CASES[3][0], [rand(3, 2, 2), rand(3, 2, seed=1)])


def test_batch_reindex_parity_and_gradient_on_gpu():
    x, index = rand(5, 3, 7), np.array([4, 0, 4, 2, 4, 4, 1], dtype=np.float32)
    assert_parity('type: "BatchReindex"', [x, index], propagate=[True, False])
    gpu_gradient('type: "BatchReindex"', [x[:3, :2, :2], index[:4] % 3], check_bottom=[0])
    with pytest.raises(KaffeError, match="not an integer"):
        run(device.GPU, 'type: "BatchReindex"', [x, np.array([5.0], dtype=np.float32)])


def test_filter_parity_and_gradient_on_gpu():
    x, y = rand(6, 3, 5), rand(6, 2, seed=1)
    selector = np.array([1, 0, 0, 3, 1, 0], dtype=np.float32)
    assert_parity('type: "Filter"', [x, y, selector], num_top=2, propagate=[True, True, False])
    assert_parity('type: "Filter"', [x, np.zeros(6, np.float32)], propagate=[True, False])
    gpu_gradient('type: "Filter"', [x[:, :2, :2], selector], check_bottom=[0])


def test_parameter_layer_on_gpu():
    tops, _, params, _ = run(device.GPU, 'type: "Parameter" parameter_param { shape { dim: 3 dim: 2 } }', [])
    assert tops[0].shape == (3, 2) and params[0].shape == (3, 2)


# -- normalization -----------------------------------------------------------------------------------------------------
BN = 'type: "BatchNorm" batch_norm_param { moving_average_fraction: 0.7 eps: 0.001 }'


@pytest.mark.parametrize("shape", [(4, 3, 5, 17), (37, 6), (2, 3, 300)])
@pytest.mark.parametrize("in_place", [False, True])
def test_batch_norm_train_parity_with_running_statistics(shape, in_place):
    assert_parity(BN, [rand(*shape, scale=2) + 1], passes=3, in_place=in_place, rtol=2e-4, atol=2e-5)


def test_batch_norm_test_phase_parity():
    stats = [2 * rand(3, seed=1), 2 * (np.abs(rand(3, seed=2)) + 0.5), np.array([2.0], np.float32)]
    assert_parity(BN, [rand(4, 3, 5)], phase=TEST, blob_values=stats)
    assert_parity(BN, [rand(4, 3, 5)], phase=TEST)  # factor 0


@pytest.mark.parametrize("phase", [TRAIN, TEST])
def test_batch_norm_gradient_on_gpu(phase):
    stats = [2 * rand(3, seed=1), 2 * (np.abs(rand(3, seed=2)) + 0.5), np.array([2.0], np.float32)]
    gpu_gradient(BN, [rand(3, 3, 2, 3)], phase=phase, blob_values=stats if phase == TEST else None,
                 threshold=2e-3, check_params=False)


MVN_PARAMS = ["", "normalize_variance: false", "across_channels: true", "eps: 0.1"]


@pytest.mark.parametrize("params", MVN_PARAMS)
@pytest.mark.parametrize("in_place", [False, True])
def test_mvn_parity(params, in_place):
    assert_parity(f'type: "MVN" mvn_param {{ {params} }}', [rand(3, 4, 7, 11, scale=3) + 2], in_place=in_place,
                  rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("params", MVN_PARAMS[:3])
def test_mvn_gradient_on_gpu(params):
    gpu_gradient(f'type: "MVN" mvn_param {{ {params} }}', [rand(2, 3, 2, 3, seed=4)], threshold=2e-3)


def test_batch_norm_statistics_stay_on_device():
    # a TRAIN forward in GPU mode leaves the statistics newest on the device (no host round trip)
    device.set_mode_gpu()
    try:
        layer = make_layer(BN)
        bottom, top = blobs_from(rand(4, 3, 5)), [Blob()]
        layer.setup(bottom, top)
        layer.forward(bottom, top)
        from kaffe.engine.syncedmem import HEAD_AT_GPU
        assert all(b._data.head == HEAD_AT_GPU for b in layer.blobs)
        assert top[0]._data.head == HEAD_AT_GPU
    finally:
        device.set_mode_cpu()
