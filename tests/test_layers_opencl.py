"""OpenCL neuron, common and loss layers: parity with the CPU code, gradients in GPU mode, no CPU fallback."""
import numpy as np
import pytest
from gradient_check import blobs_from, check_gradient, check_parity, gpu_host_copies, make_layer, opencl_available, \
    rand32 as rand, setup_layer

from kaffe.engine import device
from kaffe.engine import layer as layer_module
from kaffe.engine.errors import KaffeError
from kaffe.engine.syncedmem import HEAD_AT_CPU
from kaffe.layers.neuron import ElementwiseLayer
from kaffe.proto import caffe_pb2

pytestmark = [pytest.mark.opencl,
              pytest.mark.skipif(not opencl_available(), reason="no OpenCL platform (install pocl-opencl-icd)")]

ELEMENTWISE_TYPES = [name for name in layer_module.layer_type_list()
                     if issubclass(layer_module._REGISTRY[name], ElementwiseLayer)]


def labels(shape, classes, seed=1, ignored=None):
    """Integer labels as floats; with `ignored`, the first row of positions takes that label."""
    values = np.random.default_rng(seed).integers(0, classes, size=shape).astype(np.float32)
    if ignored is not None:
        values.reshape(shape[0], -1)[0] = ignored
    return values


def run(text, arrays, mode, num_top=None, top_diffs=None, propagate=None, in_place=False, seed=1701,
        phase=caffe_pb2.TRAIN):
    """(top data, bottom diffs) of a fresh layer in `mode`, forward and (given top_diffs) backward.

    Unlike gradient_check.run_layer: chooses propagate_down (labels take none) and can run in place.
    """
    (device.set_mode_gpu if mode == device.GPU else device.set_mode_cpu)()
    try:
        layer = make_layer(text, phase)
        bottom = blobs_from(*arrays)
        if in_place:
            top = bottom
            layer.setup(bottom, top)
        else:
            top = setup_layer(layer, bottom, num_top)
        device.set_random_seed(seed)
        layer.forward(bottom, top)
        outputs = [t.data.copy() for t in top]
        diffs = []
        if top_diffs is not None:
            for t, d in zip(top, top_diffs):
                if d is not None:  # None keeps the diff setup gave (a loss top's loss weight)
                    t.diff[...] = d
            layer.backward(top, propagate or [True] * len(bottom), bottom)
            diffs = [b.diff.copy() for b in bottom]
        return outputs, diffs
    finally:
        device.set_mode_cpu()


def assert_parity(text, arrays, top_diffs, rtol=1e-4, atol=1e-5, **kwargs):
    cpu = run(text, arrays, device.CPU, top_diffs=top_diffs, **kwargs)
    gpu = run(text, arrays, device.GPU, top_diffs=top_diffs, **kwargs)
    for kind, a_list, b_list in zip(("top", "bottom diff"), cpu, gpu):
        for i, (a, b) in enumerate(zip(a_list, b_list)):
            np.testing.assert_allclose(b, a, rtol=rtol, atol=atol, err_msg=f"{kind} {i} differs on OpenCL")


# -- neuron layers ----------------------------------------------------------------------------------------------
def neuron_texts():
    texts = [f'type: "{name}"' for name in ELEMENTWISE_TYPES]
    return texts + ['type: "ReLU" relu_param { negative_slope: 0.1 }',
                    'type: "ReLU" relu_param { negative_slope: -0.5 }']


@pytest.mark.parametrize("text", neuron_texts())
@pytest.mark.parametrize("shape", [(2, 3, 1, 257), (7,)])
def test_elementwise_parity(text, shape):
    check_parity(text, [rand(*shape, scale=3)])


@pytest.mark.parametrize("text", [t for t in neuron_texts() if '"AbsVal"' not in t]  # AbsVal refuses in place
                         + ['type: "Dropout" dropout_param { dropout_ratio: 0.4 }'])
@pytest.mark.parametrize("phase", [caffe_pb2.TRAIN, caffe_pb2.TEST])
def test_neuron_in_place_parity(text, phase):
    # against the CPU in place, which may differ from a separate top (ReLU with a negative slope reads y's sign)
    x, dy = rand(3, 5, 17, scale=2), rand(3, 5, 17, seed=9)
    assert_parity(text, [x], [dy], in_place=True, phase=phase)


@pytest.mark.parametrize("text", neuron_texts())
def test_elementwise_gradient_on_gpu(gpu_mode, text):
    layer = make_layer(text)
    bottom = blobs_from(rand(2, 3, 5, scale=2))
    top = setup_layer(layer, bottom)
    kink = 0.0 if "ReLU" in text else None
    check_gradient(layer, bottom, top, threshold=1e-3, kink=kink, kink_range=0.01 if kink is not None else -1)


@pytest.mark.parametrize("ratio", [None, 0.3, 0.0, 0.9])
@pytest.mark.parametrize("shape", [(3, 5, 7), (2, 1, 1030)])
def test_dropout_masks_are_bit_identical(ratio, shape):
    text = 'type: "Dropout"' + (f" dropout_param {{ dropout_ratio: {ratio} }}" if ratio is not None else "")
    x, dy = rand(*shape), rand(*shape, seed=2)
    check_parity(text, [x], rtol=0, atol=0)
    states = []
    for mode in (device.CPU, device.GPU):
        run(text, [x], mode, seed=77)
        states.append(device.rng_state())  # each forward draws the same one seed in either mode
    assert states[0] == states[1]
    cpu, gpu = (run(text, [x], mode, top_diffs=[dy], seed=77) for mode in (device.CPU, device.GPU))
    np.testing.assert_array_equal(gpu[0][0] != 0, cpu[0][0] != 0)
    np.testing.assert_array_equal(gpu[1][0], cpu[1][0])


def test_dropout_test_phase_is_identity_on_gpu():
    x, dy = rand(4, 5, 6), rand(4, 5, 6, seed=1)
    text = 'type: "Dropout" dropout_param { dropout_ratio: 0.9 }'
    (y,), (dx,) = run(text, [x], device.GPU, top_diffs=[dy], phase=caffe_pb2.TEST)
    np.testing.assert_array_equal(y, x)
    np.testing.assert_array_equal(dx, dy)


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_dropout_mask_statistics_on_gpu(ratio):
    x = np.ones((50, 40, 25), dtype=np.float32)
    (y,), _ = run(f'type: "Dropout" dropout_param {{ dropout_ratio: {ratio} }}', [x], device.GPU, seed=5)
    kept = y != 0
    np.testing.assert_allclose(y[kept], np.float32(1 / (1 - np.float32(ratio))))
    assert abs(kept.mean() - (1 - ratio)) < 4 * np.sqrt(ratio * (1 - ratio) / x.size)
    # neighbouring values are independent: P(both kept) = (1 - ratio)^2
    both = (kept[..., 1:] & kept[..., :-1]).mean()
    assert abs(both - (1 - ratio) ** 2) < 0.01


def test_dropout_gradient_on_gpu(gpu_mode):
    layer = make_layer('type: "Dropout" dropout_param { dropout_ratio: 0.4 }')
    bottom = blobs_from(rand(2, 3, 5, 3))
    top = setup_layer(layer, bottom)
    check_gradient(layer, bottom, top, threshold=1e-3)


# -- common layers ----------------------------------------------------------------------------------------------
def eltwise_inputs(n, shape=(2, 3, 5, 7)):
    xs = [rand(*shape, seed=i) for i in range(n)]
    xs[1].reshape(-1)[:9] = xs[0].reshape(-1)[:9]  # ties for MAX
    return xs


CONCAT_CASES = [
    ("concat_param { axis: 0 }", [(1, 3, 5), (4, 3, 5), (2, 3, 5)]),
    ("", [(2, 1, 5, 3), (2, 4, 5, 3), (2, 2, 5, 3)]),  # axis 1 by default
    ("concat_param { axis: -1 }", [(2, 3, 1), (2, 3, 7), (2, 3, 300)]),
    ("concat_param { concat_dim: 1 }", [(3, 2, 4), (3, 5, 4)]),
    ("concat_param { axis: 1 }", [(3, 2, 4)]),  # one bottom: the top shares it
]

COMMON_CASES = [
    pytest.param('type: "Split"', [rand(3, 5, 7)], 1, id="split-1"),
    pytest.param('type: "Split"', [rand(3, 5, 7)], 2, id="split-2"),
    pytest.param('type: "Split"', [rand(3, 5, 97)], 3, id="split-3"),
    pytest.param('type: "Flatten"', [rand(3, 5, 7, 2)], None, id="flatten"),
    pytest.param('type: "Flatten" flatten_param { axis: 2 end_axis: -1 }', [rand(3, 5, 7, 2)], None,
                 id="flatten-axis2"),
    pytest.param('type: "Reshape" reshape_param { shape { dim: 0 dim: -1 dim: 2 } }', [rand(3, 5, 7, 2)], None,
                 id="reshape"),
    *[pytest.param(f'type: "Concat" {params}', [rand(*s, seed=i) for i, s in enumerate(shapes)], None,
                   id=f"concat-{params or 'default'}-{len(shapes)}") for params, shapes in CONCAT_CASES],
    pytest.param('type: "Eltwise" eltwise_param { operation: PROD }', eltwise_inputs(2), None, id="prod-2"),
    pytest.param('type: "Eltwise" eltwise_param { operation: PROD }', eltwise_inputs(3), None, id="prod-3"),
    pytest.param('type: "Eltwise" eltwise_param { operation: PROD stable_prod_grad: false }',
                 [x + np.float32(3) for x in eltwise_inputs(3)], None, id="prod-unstable"),
    pytest.param('type: "Eltwise"', eltwise_inputs(2), None, id="sum"),
    pytest.param('type: "Eltwise" eltwise_param { operation: SUM coeff: 1 coeff: -0.5 coeff: 2 }',
                 eltwise_inputs(3), None, id="sum-coeffs"),
    pytest.param('type: "Eltwise" eltwise_param { operation: MAX }', eltwise_inputs(2), None, id="max-2"),
    pytest.param('type: "Eltwise" eltwise_param { operation: MAX }', eltwise_inputs(4), None, id="max-4"),
    *[pytest.param(f'type: "Softmax" softmax_param {{ axis: {axis} }}', [rand(2, 5, 3, 11, scale=3)], None,
                   id=f"softmax-axis{axis}") for axis in (1, 2, -1, 0)],
]


@pytest.mark.parametrize("text,arrays,num_top", COMMON_CASES)
def test_common_parity(text, arrays, num_top):
    check_parity(text, arrays, num_top=num_top)


def test_concat_backward_skips_bottoms_not_propagated():
    xs = [rand(2, 3, 4), rand(2, 5, 4, seed=1)]
    for mode in (device.CPU, device.GPU):
        (y,), (dx0, dx1) = run('type: "Concat"', xs, mode, top_diffs=[rand(2, 8, 4, seed=3)], propagate=[False, True])
        np.testing.assert_array_equal(y, np.concatenate(xs, axis=1))
        assert np.all(dx0 == 0)
        np.testing.assert_array_equal(dx1, rand(2, 8, 4, seed=3)[:, 3:])


def test_softmax_in_place_on_gpu():
    x, dy = rand(3, 4, 2, scale=3), rand(3, 4, 2, seed=4)
    text = 'type: "Softmax" softmax_param { axis: 1 }'
    separate = run(text, [x], device.CPU, top_diffs=[dy])
    in_place = run(text, [x], device.GPU, top_diffs=[dy], in_place=True)
    for a, b in zip(separate[0] + separate[1], in_place[0] + in_place[1]):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def test_softmax_is_stable_for_large_inputs_on_gpu():
    x = np.array([[1000.0, 1001.0, 999.0], [-1000.0, -1000.0, -2000.0]], dtype=np.float32)
    check_parity('type: "Softmax"', [x], atol=1e-30)


def test_silence_zeroes_propagated_diffs_on_gpu(gpu_mode):
    layer = make_layer('type: "Silence"')
    bottom = blobs_from(rand(2, 3), rand(300))
    top = setup_layer(layer, bottom, num_top=0)
    layer.forward(bottom, top)
    for b in bottom:
        b.diff[...] = 5
        b.mutable_gpu_diff()
    layer.backward(top, [True, False], bottom)
    assert np.all(bottom[0].diff == 0)
    assert np.all(bottom[1].diff == 5)


def max_inputs(n, shape=(2, 3, 2, 3)):
    """MAX's bottoms kept apart by more than the step, so that no finite difference crosses a tie."""
    size = int(np.prod(shape))
    return [np.random.default_rng(i).permutation(np.arange(size, dtype=np.float32) * 0.1 * (1 + i)).reshape(shape)
            for i in range(n)]


# (not Flatten/Reshape: check_gradient zeroes the bottom diffs after setting the top diffs, which they share)
@pytest.mark.parametrize("text,arrays,num_top", [
    ('type: "Split"', [rand(2, 3, 5)], 3),
    ('type: "Concat"', [rand(2, 1, 3), rand(2, 3, 3, seed=1), rand(2, 2, 3, seed=2)], None),
    ('type: "Concat" concat_param { axis: -1 }', [rand(2, 3, 1), rand(2, 3, 4, seed=1)], None),
    ('type: "Concat" concat_param { axis: 0 }', [rand(1, 3, 2), rand(2, 3, 2, seed=1)], None),
    ('type: "Eltwise" eltwise_param { operation: PROD }', eltwise_inputs(3, (2, 3, 2, 3)), None),
    ('type: "Eltwise" eltwise_param { operation: PROD stable_prod_grad: false }',
     [x + np.float32(3) for x in eltwise_inputs(3, (2, 3, 2, 3))], None),
    ('type: "Eltwise" eltwise_param { operation: SUM coeff: -1.5 coeff: 0.5 coeff: 2 }',
     eltwise_inputs(3, (2, 3, 2, 3)), None),
    ('type: "Eltwise" eltwise_param { operation: MAX }', max_inputs(3), None),
    ('type: "Softmax"', [rand(2, 3, 2, 3)], None),
    ('type: "Softmax" softmax_param { axis: 2 }', [rand(2, 3, 2, 3)], None),
])
def test_common_gradient_on_gpu(gpu_mode, text, arrays, num_top):
    layer = make_layer(text)
    bottom = blobs_from(*arrays)
    top = setup_layer(layer, bottom, num_top)
    check_gradient(layer, bottom, top, threshold=1e-3)


# -- loss layers ------------------------------------------------------------------------------------------------
MODES = ["FULL", "VALID", "BATCH_SIZE", "NONE"]


def softmax_loss_parity(text, x, y, num_top=1):
    diffs = [None] + [rand(*x.shape, seed=3)] * (num_top - 1)  # top 0 keeps its loss weight
    assert_parity(text, [x, y], diffs, num_top=num_top, propagate=[True, False])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("ignore", [None, 2])
def test_softmax_loss_parity(mode, ignore):
    ignore_text = f"ignore_label: {ignore}" if ignore is not None else ""
    softmax_loss_parity(f'type: "SoftmaxWithLoss" loss_param {{ normalization: {mode} {ignore_text} }}',
                        rand(3, 4, 5, 7, scale=2), labels((3, 5, 7), 4, ignored=ignore))


@pytest.mark.parametrize("text,x,y", [
    ('type: "SoftmaxWithLoss" loss_param { ignore_label: 4 normalize: false }', rand(3, 5, 2), labels((3, 2), 5)),
    ('type: "SoftmaxWithLoss" softmax_param { axis: 2 } loss_param { ignore_label: 0 }', rand(2, 3, 5),
     labels((2, 3), 5, ignored=0)),
    ('type: "SoftmaxWithLoss" softmax_param { axis: -1 }', rand(3, 2, 300), labels((3, 2), 300)),
    ('type: "SoftmaxWithLoss" loss_param { ignore_label: -1 }', rand(513, 10), labels((513,), 10, ignored=-1)),
])
def test_softmax_loss_parity_axes_and_params(text, x, y):
    softmax_loss_parity(text, x, y)


def test_softmax_loss_probability_top_and_loss_weight():
    softmax_loss_parity('type: "SoftmaxWithLoss" loss_weight: 2.5 loss_weight: 0 loss_param { ignore_label: 1 }',
                        rand(2, 3, 4, scale=2), labels((2, 4), 3, ignored=1), num_top=2)


def test_softmax_loss_flt_min_clamp_and_all_ignored_on_gpu():
    x = np.array([[0.0, -200.0], [0.0, -200.0]], dtype=np.float32)
    (loss,), _ = run('type: "SoftmaxWithLoss"', [x, np.ones(2)], device.GPU)
    np.testing.assert_allclose(float(loss), -np.log(np.finfo(np.float32).tiny), rtol=1e-6)
    (loss,), (dx, _) = run('type: "SoftmaxWithLoss" loss_param { ignore_label: 0 }', [rand(2, 3), np.zeros(2)],
                           device.GPU, top_diffs=[None], propagate=[True, False])
    assert float(loss) == 0.0 and np.all(dx == 0)


def test_softmax_loss_errors_on_gpu():
    with pytest.raises(KaffeError, match="'sl'.*label 3 is outside"):
        run('name: "sl" type: "SoftmaxWithLoss" loss_param { ignore_label: 1 }', [rand(2, 3), np.array([1, 3])],
            device.GPU)
    with pytest.raises(KaffeError, match="'sl'.*label inputs"):
        run('name: "sl" type: "SoftmaxWithLoss"', [rand(2, 3), np.array([0, 1])], device.GPU, top_diffs=[None],
            propagate=[True, True])


def test_softmax_loss_passes_nan_scores_through_on_gpu():
    x = rand(2, 3)
    x[0, 0] = np.nan
    (loss,), _ = run('type: "SoftmaxWithLoss"', [x, np.array([0, 1])], device.GPU)
    assert np.isnan(loss)


@pytest.mark.parametrize("mode", MODES)
def test_softmax_loss_gradient_on_gpu(gpu_mode, mode):
    layer = make_layer(f'type: "SoftmaxWithLoss" loss_param {{ ignore_label: 1 normalization: {mode} }}')
    bottom = blobs_from(rand(2, 4, 3, 2), labels((2, 3, 2), 4, seed=3, ignored=1))
    top = setup_layer(layer, bottom)
    check_gradient(layer, bottom, top, check_bottom=[0], threshold=1e-3)


@pytest.mark.parametrize("params", ["", "accuracy_param { top_k: 2 ignore_label: 1 }"])
def test_accuracy_in_gpu_mode_matches_cpu(params):
    x, y = rand(7, 4, 3), labels((7, 3), 4, ignored=1)
    x[0, 0, 0] = x[0, 1, 0]  # a tie
    cpu, gpu = (run(f'type: "Accuracy" {params}', [x, y], mode, num_top=2) for mode in (device.CPU, device.GPU))
    for a, b in zip(cpu[0], gpu[0]):
        np.testing.assert_array_equal(b, a)


# -- GPU mode runs these layers on the device: no fallback, no copy to the host ---------------------------------
DEVICE_CASES = [
    *[pytest.param(text, [rand(3, 4)], None, [True], id=text) for text in neuron_texts()],
    pytest.param('type: "Dropout"', [rand(3, 4)], None, [True], id="dropout"),
    *[pytest.param(*case.values, [True] * len(case.values[1]), id=case.id) for case in COMMON_CASES],
    pytest.param('type: "Silence"', [rand(3, 4), rand(5)], 0, [True, True], id="silence"),
    pytest.param('type: "SoftmaxWithLoss" loss_param { ignore_label: 0 }', [rand(3, 4, 5), labels((3, 5), 4)], 2,
                 [True, False], id="softmax-loss"),
    pytest.param('type: "Accuracy"', [rand(3, 4), labels((3,), 4)], 1, [False, False], id="accuracy"),
]


@pytest.mark.parametrize("text,arrays,num_top,propagate", DEVICE_CASES)
def test_gpu_mode_has_no_fallback_and_no_host_copy(monkeypatch, kaffe_log, text, arrays, num_top, propagate):
    layer, bottom, top, copies = gpu_host_copies(monkeypatch, text, arrays, num_top, propagate)
    fallbacks = [m for m in kaffe_log if "no OpenCL implementation" in m]
    assert not fallbacks, fallbacks
    if layer.type == "Accuracy":
        return  # runs its CPU code by design (layers/loss.py)
    assert not copies, f"{len(copies)} device-to-host copies (of {copies} values) in GPU mode"
    # written on the device, not on the host (a loss top's diff is its host-set loss weight)
    assert all(t._data.head != HEAD_AT_CPU for i, t in enumerate(top) if not layer.loss(i))
    assert all(b._diff.head != HEAD_AT_CPU for b, down in zip(bottom, propagate) if down)


def test_fallback_check_detects_a_host_layer(monkeypatch, kaffe_log):
    """The warning the test above looks for is the one a layer without OpenCL code gives."""
    monkeypatch.setattr(layer_module, "_warned_fallback", set())
    device.set_mode_gpu()
    try:
        layer = make_layer('type: "ReLU"')
        bottom = blobs_from(rand(3))
        layer_module.Layer.forward_gpu(layer, bottom, setup_layer(layer, bottom))
    finally:
        device.set_mode_cpu()
    assert any("ReLU layer has no OpenCL implementation" in m for m in kaffe_log)
