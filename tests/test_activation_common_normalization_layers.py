"""Activations (AbsVal..Swish, PReLU), common layers (Embed, Slice, Tile, Reduction, ArgMax, Bias, Scale,
BatchReindex, Filter, Parameter) and normalization (BatchNorm, MVN) on the CPU: forward values against float64
references written here, Caffe's error checks, and finite-difference gradients on awkward shapes."""
import numpy as np
import pytest
from gradient_check import blobs_from, check_gradient, make_layer, rand, setup_layer
from google.protobuf import text_format

from kaffe.engine.blob import Blob
from kaffe.engine.errors import KaffeError
from kaffe.engine.net import Net
from kaffe.proto import caffe_pb2

TRAIN, TEST = caffe_pb2.TRAIN, caffe_pb2.TEST


def away_from(x, points, gap=0.05):
    """x with the values within `gap` of any of `points` moved off them (kinks spoil finite differences)."""
    x = np.array(x, dtype=np.float64)
    for point in points:
        near = np.abs(x - point) < gap
        x[near] = point + np.where(x[near] >= point, 2 * gap, -2 * gap)
    return x


def run(text, *arrays, phase=TRAIN, num_top=None, in_place=False):
    """(layer, bottom, top) after setup and one forward."""
    layer = make_layer(text, phase)
    bottom = blobs_from(*arrays)
    if in_place:
        top = bottom[:1]
        layer.setup(bottom, top)
    else:
        top = setup_layer(layer, bottom, num_top)
    layer.forward(bottom, top)
    return layer, bottom, top


def backward(layer, bottom, top, *diffs, propagate=None):
    for t, d in zip(top, diffs):
        t.diff[...] = d
    for p in layer.blobs:
        p.diff[...] = 0
    layer.backward(top, propagate or [True] * len(bottom), bottom)


def gradient(text, *arrays, phase=TRAIN, num_top=None, check_bottom=None, threshold=1e-2, **kwargs):
    layer = make_layer(text, phase)
    bottom = blobs_from(*arrays)
    top = setup_layer(layer, bottom, num_top)
    check_gradient(layer, bottom, top, threshold=threshold, check_bottom=check_bottom, **kwargs)


def sigmoid64(v):
    return 1 / (1 + np.exp(-v))


# -- elementwise activations: (text, input, forward reference, d output / d input or None) ---------------------------
POSITIVE = np.abs(rand(3, 4, 5, seed=3)) + 0.3
SIGNED = away_from(rand(3, 4, 5, seed=4, scale=2), [0.0])

ACTIVATIONS = {
    "absval": ('type: "AbsVal"', SIGNED, np.abs, np.sign),
    "bnll": ('type: "BNLL"', SIGNED, lambda x: np.logaddexp(0, x), sigmoid64),
    "elu": ('type: "ELU"', SIGNED, lambda x: np.where(x > 0, x, np.expm1(x)), lambda x: np.where(x > 0, 1, np.exp(x))),
    "elu_alpha": ('type: "ELU" elu_param { alpha: 0.4 }', SIGNED, lambda x: np.where(x > 0, x, 0.4 * np.expm1(x)),
                  lambda x: np.where(x > 0, 1, 0.4 * np.exp(x))),
    "power_default": ('type: "Power"', SIGNED, lambda x: x, lambda x: np.ones_like(x)),
    "power_square": ('type: "Power" power_param { power: 2 scale: 0.5 shift: 1 }', SIGNED,
                     lambda x: (0.5 * x + 1) ** 2, lambda x: 2 * 0.5 * (0.5 * x + 1)),
    "power_cube_no_shift": ('type: "Power" power_param { power: 3 scale: -1.5 }', SIGNED,
                            lambda x: (-1.5 * x) ** 3, lambda x: 3 * (-1.5) ** 3 * x ** 2),
    "power_sqrt": ('type: "Power" power_param { power: 0.5 scale: 2 shift: 0.5 }', POSITIVE,
                   lambda x: np.sqrt(2 * x + 0.5), lambda x: 0.5 * 2 / np.sqrt(2 * x + 0.5)),
    "power_inverse": ('type: "Power" power_param { power: -1 shift: 0.5 }', POSITIVE,
                      lambda x: 1 / (x + 0.5), lambda x: -1 / (x + 0.5) ** 2),
    "power_linear": ('type: "Power" power_param { power: 1 scale: 2.5 shift: -1 }', SIGNED,
                     lambda x: 2.5 * x - 1, lambda x: np.full_like(x, 2.5)),
    "power_zero": ('type: "Power" power_param { power: 0 scale: 3 shift: 2 }', SIGNED,
                   lambda x: np.ones_like(x), lambda x: np.zeros_like(x)),
    "power_scale_zero": ('type: "Power" power_param { power: 2 scale: 0 shift: 3 }', SIGNED,
                         lambda x: np.full_like(x, 9.0), lambda x: np.zeros_like(x)),
    "exp": ('type: "Exp"', SIGNED, np.exp, np.exp),
    "exp_base2": ('type: "Exp" exp_param { base: 2 scale: 0.5 shift: 1 }', SIGNED,
                  lambda x: 2.0 ** (1 + 0.5 * x), lambda x: np.log(2) * 0.5 * 2.0 ** (1 + 0.5 * x)),
    "exp_base3_negative_shift": ('type: "Exp" exp_param { base: 3 shift: -1 }', SIGNED,
                                 lambda x: 3.0 ** (x - 1), lambda x: np.log(3) * 3.0 ** (x - 1)),
    "log": ('type: "Log"', POSITIVE, np.log, lambda x: 1 / x),
    "log_base10": ('type: "Log" log_param { base: 10 scale: 2 shift: 1 }', POSITIVE,
                   lambda x: np.log10(2 * x + 1), lambda x: 2 / ((2 * x + 1) * np.log(10))),
    "log_base2_negative_scale": ('type: "Log" log_param { base: 2 scale: -0.5 shift: 4 }', POSITIVE,
                                 lambda x: np.log2(4 - 0.5 * x), lambda x: -0.5 / ((4 - 0.5 * x) * np.log(2))),
    "clip": ('type: "Clip" clip_param { min: -0.5 max: 0.7 }', away_from(SIGNED, [-0.5, 0.7]),
             lambda x: np.clip(x, -0.5, 0.7), lambda x: ((x >= -0.5) & (x <= 0.7)).astype(float)),
    "swish": ('type: "Swish"', SIGNED, lambda x: x * sigmoid64(x),
              lambda x: sigmoid64(x) + x * sigmoid64(x) * (1 - sigmoid64(x))),
    "swish_beta": ('type: "Swish" swish_param { beta: 2.5 }', SIGNED, lambda x: x * sigmoid64(2.5 * x),
                   lambda x: sigmoid64(2.5 * x) + 2.5 * x * sigmoid64(2.5 * x) * (1 - sigmoid64(2.5 * x))),
}


@pytest.mark.parametrize("case", sorted(ACTIVATIONS))
def test_activation_forward_and_backward_values(case):
    text, x, forward, slope = ACTIVATIONS[case]
    dy = rand(*x.shape, seed=11)
    layer, bottom, top = run(text, x)
    np.testing.assert_allclose(top[0].data, forward(x), rtol=2e-6, atol=1e-6)
    backward(layer, bottom, top, dy)
    np.testing.assert_allclose(bottom[0].diff, dy * slope(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", sorted(ACTIVATIONS))
def test_activation_gradient(case):
    text, x, _, _ = ACTIVATIONS[case]
    gradient(text, x[:2, :3, :5] if x.ndim == 3 else x, threshold=2e-3)


@pytest.mark.parametrize("case", ["bnll", "power_square", "power_sqrt", "log_base10", "clip", "swish_beta", "elu",
                                  "exp_base2"])
def test_activation_in_place_matches_separate_top(case):
    text, x, forward, slope = ACTIVATIONS[case]
    dy = rand(*x.shape, seed=12)
    layer, bottom, top = run(text, x, in_place=True)
    np.testing.assert_allclose(top[0].data, forward(x), rtol=2e-6, atol=1e-6)
    backward(layer, bottom, top, dy)
    np.testing.assert_allclose(bottom[0].diff, dy * slope(x), rtol=1e-5, atol=1e-6)


def test_bnll_is_stable_for_large_inputs():
    x = np.array([-200.0, -60.0, -1.0, 0.0, 1.0, 60.0, 200.0])
    layer, bottom, top = run('type: "BNLL"', x)
    np.testing.assert_allclose(top[0].data, np.logaddexp(0, x), rtol=1e-6, atol=1e-30)
    backward(layer, bottom, top, np.ones_like(x))
    np.testing.assert_allclose(bottom[0].diff, sigmoid64(np.minimum(x, 50)), rtol=1e-6, atol=1e-30)


def test_power_general_backward_uses_caffes_ratio_form():
    # shift 0, power 3: Caffe computes power * y / x, which is 0/0 = NaN at x = 0
    x = np.array([0.0, 1.0, -2.0])
    layer, bottom, top = run('type: "Power" power_param { power: 3 }', x)
    backward(layer, bottom, top, np.ones(3))
    assert np.isnan(bottom[0].diff[0])
    np.testing.assert_allclose(bottom[0].diff[1:], [3.0, 12.0])


def test_threshold_forward_and_no_backward():
    x = np.array([-1.0, 0.0, 0.3, 0.31, 2.0])
    _, _, top = run('type: "Threshold"', x)
    np.testing.assert_array_equal(top[0].data, [0, 0, 1, 1, 1])
    layer, bottom, top = run('type: "Threshold" threshold_param { threshold: 0.3 }', x)
    np.testing.assert_array_equal(top[0].data, [0, 0, 0, 1, 1])
    layer.backward(top, [False], bottom)  # nothing asked: fine
    with pytest.raises(KaffeError, match="Threshold layer 'threshold' has no backward"):
        layer.backward(top, [True], bottom)


def test_activation_parameter_errors():
    with pytest.raises(KaffeError, match="AbsVal layer 'absval' does not allow in-place"):
        run('type: "AbsVal"', rand(3), in_place=True)
    for text in ('type: "Exp" exp_param { base: 0 }', 'type: "Log" log_param { base: -2 }',
                 'type: "Log" log_param { base: 1 }'):
        with pytest.raises(KaffeError, match="base"):
            make_layer(text).setup(blobs_from(rand(3)), [Blob()])


# -- PReLU ---------------------------------------------------------------------------------------------------------
def prelu64(x, slopes):
    a = np.asarray(slopes, dtype=np.float64).reshape((1, -1) + (1,) * (x.ndim - 2))
    return np.where(x > 0, x, a * x)


def test_prelu_default_slopes_and_per_channel_forward_backward():
    x = away_from(rand(2, 3, 4, 5), [0.0])
    layer, bottom, top = run('type: "PReLU"', x)
    assert layer.blobs[0].shape == (3,)
    np.testing.assert_array_equal(layer.blobs[0].data, [0.25] * 3)
    slopes = np.array([0.1, -0.3, 0.8])
    layer.blobs[0].data[...] = slopes
    layer.forward(bottom, top)
    np.testing.assert_allclose(top[0].data, prelu64(x, slopes), rtol=1e-6)
    dy = rand(2, 3, 4, 5, seed=1)
    backward(layer, bottom, top, dy)
    np.testing.assert_allclose(bottom[0].diff, np.where(x > 0, dy, prelu64(np.ones_like(x) * -1, slopes) * -dy),
                               rtol=1e-6)
    np.testing.assert_allclose(layer.blobs[0].diff, (dy * np.minimum(x, 0)).sum(axis=(0, 2, 3)), rtol=1e-5, atol=1e-5)


def test_prelu_channel_shared_is_a_scalar_blob_and_filler():
    x = away_from(rand(3, 4, 7), [0.0])
    layer, bottom, top = run('type: "PReLU" prelu_param { channel_shared: true '
                             'filler { type: "constant" value: -0.5 } }', x)
    assert layer.blobs[0].shape == () and layer.blobs[0].count == 1
    np.testing.assert_allclose(top[0].data, np.where(x > 0, x, -0.5 * x), rtol=1e-6)
    dy = rand(3, 4, 7, seed=2)
    backward(layer, bottom, top, dy)
    np.testing.assert_allclose(layer.blobs[0].diff, (dy * np.minimum(x, 0)).sum(), rtol=1e-5)


def test_prelu_in_place_keeps_its_input():
    x = away_from(rand(2, 3, 5), [0.0])
    dy = rand(2, 3, 5, seed=3)
    layer, bottom, top = run('type: "PReLU" prelu_param { filler { type: "uniform" min: -1 max: 1 } }', x,
                             in_place=True)
    slopes = layer.blobs[0].data.astype(np.float64)
    np.testing.assert_allclose(top[0].data, prelu64(x, slopes), rtol=1e-6)
    backward(layer, bottom, top, dy)
    np.testing.assert_allclose(layer.blobs[0].diff, (dy * np.minimum(x, 0)).sum(axis=(0, 2)), rtol=1e-5)
    np.testing.assert_allclose(bottom[0].diff, dy * np.where(x > 0, 1, slopes.reshape(1, 3, 1)), rtol=1e-6)


@pytest.mark.parametrize("shared", [False, True])
def test_prelu_gradient(shared):
    text = (f'type: "PReLU" prelu_param {{ channel_shared: {str(shared).lower()} '
            f'filler {{ type: "uniform" min: -0.9 max: 0.9 }} }}')
    gradient(text, away_from(rand(2, 3, 3, 5), [0.0]), threshold=2e-3, kink=0.0, kink_range=0.01)


def test_prelu_errors():
    with pytest.raises(KaffeError, match="number of axes of bottom blob must be >= 2"):
        run('type: "PReLU"', rand(5))
    param = text_format.Parse('name: "p" type: "PReLU"', caffe_pb2.LayerParameter())
    Blob(4).to_proto(param.blobs.add())
    layer = make_layer(text_format.MessageToString(param))
    with pytest.raises(KaffeError, match="inconsistent"):
        layer.setup(blobs_from(rand(2, 3, 2)), [Blob()])


# -- Embed ---------------------------------------------------------------------------------------------------------
EMBED = ('type: "Embed" embed_param { num_output: 4 input_dim: 7 weight_filler { type: "gaussian" } '
         'bias_filler { type: "uniform" min: -1 max: 1 } }')


def test_embed_forward_backward_values():
    index = np.array([[3, 0, 6], [3, 3, 1]], dtype=np.float64)
    layer, bottom, top = run(EMBED, index)
    weight, bias = (b.data.astype(np.float64) for b in layer.blobs)
    assert weight.shape == (7, 4) and bias.shape == (4,)
    assert top[0].shape == (2, 3, 4)
    np.testing.assert_allclose(top[0].data, weight[index.astype(int)] + bias, rtol=1e-6)
    dy = rand(2, 3, 4, seed=5)
    backward(layer, bottom, top, dy, propagate=[False])
    expected = np.zeros((7, 4))
    for i, row in enumerate(index.astype(int).ravel()):
        expected[row] += dy.reshape(-1, 4)[i]
    np.testing.assert_allclose(layer.blobs[0].diff, expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(layer.blobs[1].diff, dy.reshape(-1, 4).sum(axis=0), rtol=1e-6)
    with pytest.raises(KaffeError, match="can't backpropagate to the Embed input"):
        layer.backward(top, [True], bottom)


def test_embed_without_bias_and_index_errors():
    layer, _, top = run('type: "Embed" embed_param { num_output: 2 input_dim: 3 bias_term: false '
                        'weight_filler { type: "constant" value: 2 } }', np.array([2.0, 0.0]))
    assert len(layer.blobs) == 1
    np.testing.assert_array_equal(top[0].data, np.full((2, 2), 2.0))
    for bad in (7.0, -1.0, 1.5):
        with pytest.raises(KaffeError, match="not an integer in \\[0, 7\\)"):
            run(EMBED, np.array([1.0, bad]))
    with pytest.raises(KaffeError, match="num_output must be positive"):
        run('type: "Embed" embed_param { input_dim: 3 }', np.zeros(2))


def test_embed_gradient():
    gradient(EMBED, np.array([[1.0, 6.0, 1.0], [0.0, 2.0, 6.0]]), check_bottom=[], threshold=1e-3)


# -- Slice ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, tops, cuts, axis", [
    ("slice_param { slice_point: 1 slice_point: 4 }", 3, [1, 4], 1),
    ("slice_param { axis: 0 }", 3, [1, 2], 0),
    ("slice_param { axis: -1 slice_point: 2 }", 2, [2], 3),
    ("slice_param { slice_dim: 2 slice_point: 1 }", 2, [1], 2),
])
def test_slice_forward_backward(text, tops, cuts, axis):
    x = rand(3, 5, 3, 4)
    layer, bottom, top = run(f'type: "Slice" {text}', x, num_top=tops)
    parts = np.split(x, cuts, axis=axis)
    for t, part in zip(top, parts):
        np.testing.assert_array_equal(t.data, part.astype(np.float32))
    diffs = [rand(*p.shape, seed=i) for i, p in enumerate(parts)]
    backward(layer, bottom, top, *diffs)
    np.testing.assert_allclose(bottom[0].diff, np.concatenate(diffs, axis=axis), rtol=1e-6)


def test_slice_gradient_and_single_top_shares():
    gradient('type: "Slice" slice_param { axis: 2 slice_point: 2 slice_point: 3 }', rand(2, 3, 5, 2), num_top=3)
    layer, bottom, top = run('type: "Slice"', rand(2, 3))
    bottom[0].data[0, 0] = 42
    assert top[0].data[0, 0] == 42


@pytest.mark.parametrize("text, tops, match", [
    ("slice_param { axis: 1 slice_dim: 1 }", 2, "either axis or slice_dim"),
    ("slice_param { slice_point: 2 slice_point: 2 }", 3, "increase strictly"),
    ("slice_param { slice_point: 1 }", 3, "one fewer"),
    ("slice_param { slice_point: 5 }", 2, "increase strictly"),
    ("", 2, "evenly divide"),
    ("slice_param { slice_dim: 4 }", 2, "slice_dim 4 out of range"),
])
def test_slice_errors(text, tops, match):
    with pytest.raises(KaffeError, match=match):
        run(f'type: "Slice" {text}', rand(2, 5, 3), num_top=tops)


# -- Tile ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_tile_forward_backward(axis):
    x = rand(2, 3, 4)
    layer, bottom, top = run(f'type: "Tile" tile_param {{ axis: {axis} tiles: 3 }}', x)
    expected = np.tile(x, [3 if i == axis % 3 else 1 for i in range(3)])
    np.testing.assert_array_equal(top[0].data, expected.astype(np.float32))
    dy = rand(*expected.shape, seed=2)
    backward(layer, bottom, top, dy)
    a = axis % 3
    folded = dy.reshape(x.shape[:a] + (3, x.shape[a]) + x.shape[a + 1:]).sum(axis=a)
    np.testing.assert_allclose(bottom[0].diff, folded, rtol=1e-6, atol=1e-6)


def test_tile_gradient_and_errors():
    gradient('type: "Tile" tile_param { axis: 1 tiles: 2 }', rand(3, 1, 5))
    with pytest.raises(KaffeError, match="number of tiles must be specified"):
        run('type: "Tile"', rand(2, 3))
    with pytest.raises(KaffeError, match="must be positive"):
        run('type: "Tile" tile_param { tiles: 0 }', rand(2, 3))
    with pytest.raises(KaffeError, match="in-place"):
        run('type: "Tile" tile_param { tiles: 2 }', rand(2, 3), in_place=True)


# -- Reduction ---------------------------------------------------------------------------------------------------
REDUCTIONS = {
    "SUM": (lambda v: v.sum(-1), lambda v: np.ones_like(v)),
    "ASUM": (lambda v: np.abs(v).sum(-1), np.sign),
    "SUMSQ": (lambda v: (v * v).sum(-1), lambda v: 2 * v),
    "MEAN": (lambda v: v.mean(-1), lambda v: np.ones_like(v) / v.shape[-1]),
}


@pytest.mark.parametrize("op", sorted(REDUCTIONS))
@pytest.mark.parametrize("axis, coeff", [(0, 1.0), (1, -2.5), (-1, 0.5), (2, 1.0)])
def test_reduction_values(op, axis, coeff):
    x = away_from(rand(2, 3, 5), [0.0])
    text = f'type: "Reduction" reduction_param {{ operation: {op} axis: {axis} coeff: {coeff} }}'
    layer, bottom, top = run(text, x)
    a = axis % 3
    assert top[0].shape == x.shape[:a]
    value, slope = REDUCTIONS[op]
    rows = x.reshape(int(np.prod(x.shape[:a])), -1)
    np.testing.assert_allclose(top[0].data.reshape(-1), coeff * value(rows), rtol=1e-5)
    dy = rand(*x.shape[:a], seed=3)
    backward(layer, bottom, top, dy)
    expected = coeff * np.reshape(dy, (-1, 1)) * slope(rows)
    np.testing.assert_allclose(bottom[0].diff.reshape(rows.shape), expected, rtol=1e-5)


@pytest.mark.parametrize("op", sorted(REDUCTIONS))
def test_reduction_gradient(op):
    gradient(f'type: "Reduction" reduction_param {{ operation: {op} axis: 1 coeff: 0.7 }}',
             away_from(rand(3, 2, 5), [0.0]), threshold=2e-3)


def test_reduction_default_is_sum_of_everything():
    x = rand(3, 4)
    _, _, top = run('type: "Reduction"', x)
    assert top[0].shape == ()
    np.testing.assert_allclose(top[0].data, x.sum(), rtol=1e-5)


# -- ArgMax --------------------------------------------------------------------------------------------------------
def argsort_caffe(v):
    """Indices by (value, index) descending, as Caffe's std::greater on pairs."""
    return sorted(range(len(v)), key=lambda j: (v[j], j), reverse=True)


def test_argmax_without_axis_top_k_and_values():
    x = np.round(rand(4, 2, 3), 1)
    x[0, 0, :2] = x[0, 1, 0] = 9.0  # a three-way tie: the highest flat index comes first
    layer, _, top = run('type: "ArgMax" argmax_param { top_k: 3 out_max_val: true }', x)
    assert top[0].shape == (4, 2, 3)
    for n in range(4):
        flat = x[n].ravel().astype(np.float32)
        order = argsort_caffe(flat)[:3]
        np.testing.assert_array_equal(top[0].data[n, 0], order)
        np.testing.assert_array_equal(top[0].data[n, 1], flat[order])
    np.testing.assert_array_equal(top[0].data[0, 0], [3, 1, 0])
    _, _, top = run('type: "ArgMax"', rand(5, 4, 2, 2))
    assert top[0].shape == (5, 1, 1, 1)
    _, _, top = run('type: "ArgMax" argmax_param { top_k: 2 }', x.reshape(4, 6))
    assert top[0].shape == (4, 1, 2)


@pytest.mark.parametrize("out_max_val", [False, True])
def test_argmax_along_axis(out_max_val):
    x = np.round(rand(2, 5, 3), 0)  # ties
    layer, _, top = run(f'type: "ArgMax" argmax_param {{ axis: 1 top_k: 2 out_max_val: {str(out_max_val).lower()} }}',
                        x)
    assert top[0].shape == (2, 2, 3)
    for n in range(2):
        for k in range(3):
            column = x[n, :, k].astype(np.float32)
            order = argsort_caffe(column)[:2]
            expected = column[order] if out_max_val else order
            np.testing.assert_array_equal(top[0].data[n, :, k], expected)


def test_argmax_errors():
    with pytest.raises(KaffeError, match="top_k must not be less than 1"):
        run('type: "ArgMax" argmax_param { top_k: 0 }', rand(2, 3))
    with pytest.raises(KaffeError, match="number of classes"):
        run('type: "ArgMax" argmax_param { top_k: 4 }', rand(2, 3))
    with pytest.raises(KaffeError, match="dimension of axis"):
        run('type: "ArgMax" argmax_param { top_k: 3 axis: 0 }', rand(2, 3))
    layer, bottom, top = run('type: "ArgMax"', rand(2, 3))
    with pytest.raises(KaffeError, match="no backward"):
        layer.backward(top, [True], bottom)


# -- Bias and Scale ------------------------------------------------------------------------------------------------
def broadcast(values, shape, axis):
    """values (whose shape is shape[axis:axis+k]) reshaped to broadcast against `shape`."""
    values = np.asarray(values, dtype=np.float64)
    return values.reshape((1,) * axis + values.shape + (1,) * (len(shape) - axis - values.ndim))


@pytest.mark.parametrize("params, axis, param_shape", [
    ("", 1, (3,)), ("axis: 2 num_axes: 2", 2, (4, 5)), ("axis: 0 num_axes: -1", 0, (2, 3, 4, 5)),
    ("num_axes: 0", 0, ()), ("axis: -2 num_axes: 1", 2, (4,))])
def test_bias_learned(params, axis, param_shape):
    x = rand(2, 3, 4, 5)
    text = f'type: "Bias" bias_param {{ {params} filler {{ type: "gaussian" }} }}'
    layer, bottom, top = run(text, x)
    assert layer.blobs[0].shape == param_shape
    b = layer.blobs[0].data.astype(np.float64)
    np.testing.assert_allclose(top[0].data, x + broadcast(b, x.shape, axis), rtol=1e-6, atol=1e-6)
    dy = rand(*x.shape, seed=4)
    backward(layer, bottom, top, dy)
    layer.backward(top, [True], bottom)  # a second backward: parameter gradients accumulate
    axes = tuple(i for i in range(4) if not axis <= i < axis + len(param_shape))
    np.testing.assert_allclose(layer.blobs[0].diff, 2 * dy.sum(axis=axes).reshape(param_shape), rtol=1e-5)
    np.testing.assert_allclose(bottom[0].diff, dy, rtol=1e-6)


def test_bias_from_bottom_and_in_place_and_gradient():
    x, b = rand(2, 3, 4), rand(3, 4, seed=1)
    layer, bottom, top = run('type: "Bias"', x, b)
    assert not layer.blobs
    np.testing.assert_allclose(top[0].data, x + b, rtol=1e-6)
    dy = rand(2, 3, 4, seed=2)
    backward(layer, bottom, top, dy)
    layer.backward(top, [True, True], bottom)  # a bottom's gradient is overwritten, not accumulated
    np.testing.assert_allclose(bottom[1].diff, dy.sum(axis=0), rtol=1e-5)
    layer, bottom, top = run('type: "Bias" bias_param { filler { type: "constant" value: 1.5 } }', x, in_place=True)
    np.testing.assert_allclose(top[0].data, x + 1.5, rtol=1e-6)
    gradient('type: "Bias" bias_param { axis: 1 }', x, b)
    gradient('type: "Bias" bias_param { axis: 0 num_axes: 2 filler { type: "gaussian" } }', rand(3, 2, 5))


def test_bias_and_scale_errors():
    with pytest.raises(KaffeError, match="dimension mismatch"):
        run('type: "Bias"', rand(2, 3, 4), rand(4))
    with pytest.raises(KaffeError, match="extends past"):
        run('type: "Scale" scale_param { axis: 1 num_axes: 3 }', rand(2, 3, 4))
    with pytest.raises(KaffeError, match="num_axes must be non-negative"):
        run('type: "Bias" bias_param { num_axes: -2 }', rand(2, 3))


def test_scale_learned_default_is_identity_and_bias_term():
    x = rand(2, 3, 4)
    layer, _, top = run('type: "Scale"', x)
    assert [b.shape for b in layer.blobs] == [(3,)]
    np.testing.assert_allclose(top[0].data, x, rtol=1e-6)
    text = ('type: "Scale" scale_param { axis: 1 num_axes: 2 bias_term: true filler { type: "gaussian" } '
            'bias_filler { type: "gaussian" } }')
    layer, bottom, top = run(text, x)
    assert [b.shape for b in layer.blobs] == [(3, 4), (3, 4)]
    s, b = (p.data.astype(np.float64) for p in layer.blobs)
    np.testing.assert_allclose(top[0].data, x * s + b, rtol=1e-5, atol=1e-6)
    dy = rand(2, 3, 4, seed=7)
    backward(layer, bottom, top, dy)
    np.testing.assert_allclose(layer.blobs[0].diff, (dy * x).sum(axis=0), rtol=1e-5)
    np.testing.assert_allclose(layer.blobs[1].diff, dy.sum(axis=0), rtol=1e-5)
    np.testing.assert_allclose(bottom[0].diff, dy * s, rtol=1e-5)


def test_scale_from_bottom_with_bias_term():
    x, s = rand(2, 3, 4), rand(2, 3, seed=1)
    layer, bottom, top = run('type: "Scale" scale_param { axis: 0 bias_term: true '
                             'bias_filler { type: "constant" value: 0.5 } }', x, s)
    assert [b.shape for b in layer.blobs] == [(2, 3)]  # only the bias: the scale is bottom[1]
    np.testing.assert_allclose(top[0].data, x * s[..., None] + 0.5, rtol=1e-5)
    dy = rand(2, 3, 4, seed=2)
    backward(layer, bottom, top, dy)
    np.testing.assert_allclose(bottom[1].diff, (dy * x).sum(axis=2), rtol=1e-5)
    np.testing.assert_allclose(layer.blobs[0].diff, dy.sum(axis=2), rtol=1e-5)
    gradient('type: "Scale" scale_param { axis: 0 bias_term: true bias_filler { type: "gaussian" } }', x, s)


def test_scale_in_place_keeps_input_for_the_scale_gradient():
    x = rand(3, 2, 5)
    text = 'type: "Scale" scale_param { filler { type: "uniform" min: 0.5 max: 2 } bias_term: true }'
    layer, bottom, top = run(text, x, in_place=True)
    s = layer.blobs[0].data.astype(np.float64).reshape(1, 2, 1)
    dy = rand(3, 2, 5, seed=3)
    backward(layer, bottom, top, dy)
    np.testing.assert_allclose(layer.blobs[0].diff, (dy * x).sum(axis=(0, 2)), rtol=1e-5)
    np.testing.assert_allclose(bottom[0].diff, dy * s, rtol=1e-5)


@pytest.mark.parametrize("text", [
    'type: "Scale" scale_param { axis: 1 filler { type: "gaussian" } bias_term: true '
    'bias_filler { type: "gaussian" } }',
    'type: "Scale" scale_param { num_axes: 0 filler { type: "gaussian" } }',
    'type: "Scale" scale_param { axis: 2 num_axes: -1 filler { type: "gaussian" } }'])
def test_scale_gradient(text):
    gradient(text, rand(2, 3, 3, 2))


# -- BatchReindex, Filter, Parameter --------------------------------------------------------------------------------
def test_batch_reindex_forward_backward_and_errors():
    x = rand(4, 2, 3)
    index = np.array([2.0, 0.0, 2.0, 3.0, 2.0])
    layer, bottom, top = run('type: "BatchReindex"', x, index)
    np.testing.assert_array_equal(top[0].data, x[index.astype(int)].astype(np.float32))
    dy = rand(5, 2, 3, seed=1)
    backward(layer, bottom, top, dy, propagate=[True, False])
    expected = np.zeros_like(x)
    np.add.at(expected, index.astype(int), dy)
    np.testing.assert_allclose(bottom[0].diff, expected, rtol=1e-6)
    with pytest.raises(KaffeError, match="cannot backprop to the index"):
        layer.backward(top, [True, True], bottom)
    gradient('type: "BatchReindex"', x, index, check_bottom=[0])
    for bad in (-1.0, 4.0):
        with pytest.raises(KaffeError, match="not an integer in \\[0, 4\\)"):
            run('type: "BatchReindex"', x, np.array([0.0, bad]))
    with pytest.raises(KaffeError, match="must be 1-D"):
        run('type: "BatchReindex"', x, np.zeros((2, 1)))


def test_filter_forward_backward_and_errors():
    x, y = rand(5, 3), rand(5, 2, 2, seed=1)
    selector = np.array([0.0, 1.0, 0.0, 2.0, -1.0]).reshape(5, 1)
    layer = make_layer('type: "Filter"')
    bottom = blobs_from(x, y, selector)
    top = [Blob(), Blob()]
    layer.setup(bottom, top)
    assert top[0].shape == (5, 3)  # the first reshape keeps every item, as Caffe's
    layer.forward(bottom, top)
    kept = [1, 3, 4]
    np.testing.assert_array_equal(top[0].data, x[kept].astype(np.float32))
    np.testing.assert_array_equal(top[1].data, y[kept].astype(np.float32))
    dy0, dy1 = rand(3, 3, seed=2), rand(3, 2, 2, seed=3)
    backward(layer, bottom, top, dy0, dy1, propagate=[True, True, False])
    expected = np.zeros_like(x)
    expected[kept] = dy0
    np.testing.assert_allclose(bottom[0].diff, expected, rtol=1e-6)
    with pytest.raises(KaffeError, match="selector"):
        layer.backward(top, [True, True, True], bottom)
    with pytest.raises(KaffeError, match="singletons"):
        run('type: "Filter"', x, np.ones((5, 2)), num_top=1)
    with pytest.raises(KaffeError, match="same 0th dimension"):
        run('type: "Filter"', x, np.ones(4), num_top=1)
    with pytest.raises(KaffeError, match="one top per filtered bottom"):
        run('type: "Filter"', x, np.ones(5), num_top=2)


def test_filter_gradient_and_empty_selection():
    x, selector = rand(4, 3), np.array([1.0, 0.0, 1.0, 1.0])
    gradient('type: "Filter"', x, selector, check_bottom=[0])
    layer, bottom, top = run('type: "Filter"', x, np.zeros(4))
    layer.forward(bottom, top)
    assert top[0].shape == (0, 3)


def test_parameter_layer_exposes_its_blob():
    layer, _, top = run('type: "Parameter" parameter_param { shape { dim: 2 dim: 3 } }')
    assert layer.blobs[0].shape == (2, 3) and top[0].shape == (2, 3)
    np.testing.assert_array_equal(top[0].data, 0)
    layer.blobs[0].data[...] = 5
    top[0].diff[...] = 2
    np.testing.assert_array_equal(top[0].data, 5)
    np.testing.assert_array_equal(layer.blobs[0].diff, 2)


# -- BatchNorm ---------------------------------------------------------------------------------------------------------
def batch_stats64(x):
    axes = (0,) + tuple(range(2, x.ndim))
    return x.mean(axis=axes), x.var(axis=axes), x.size // x.shape[1]


def channel(v, ndim):
    return np.asarray(v).reshape((1, -1) + (1,) * (ndim - 2))


@pytest.mark.parametrize("shape", [(4, 3, 2, 5), (6, 5), (3, 2, 7)])
def test_batch_norm_train_running_statistics_after_n_passes(shape):
    maf, eps = 0.9, 1e-3
    text = f'type: "BatchNorm" batch_norm_param {{ moving_average_fraction: {maf} eps: {eps} }}'
    batches = [rand(*shape, seed=s, scale=1 + s) + s for s in range(4)]
    layer = make_layer(text, TRAIN)
    bottom, top = blobs_from(batches[0]), [Blob()]
    layer.setup(bottom, top)
    assert [b.shape for b in layer.blobs] == [(shape[1],), (shape[1],), (1,)]
    mean_sum, var_sum, factor = np.zeros(shape[1]), np.zeros(shape[1]), 0.0
    for x in batches:
        bottom[0].data[...] = x
        layer.forward(bottom, top)
        mean, var, m = batch_stats64(x)
        np.testing.assert_allclose(top[0].data, (x - channel(mean, x.ndim)) / np.sqrt(channel(var, x.ndim) + eps),
                                   rtol=1e-4, atol=1e-5)
        factor = factor * maf + 1
        mean_sum = mean + maf * mean_sum
        var_sum = m / (m - 1) * var + maf * var_sum
    np.testing.assert_allclose(layer.blobs[2].data, [factor], rtol=1e-6)
    np.testing.assert_allclose(layer.blobs[0].data, mean_sum, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.blobs[1].data, var_sum, rtol=1e-5)
    # the TEST phase normalizes with mean_sum / factor and var_sum / factor
    test_layer = make_layer(text, TEST)
    test_layer.blobs = layer.blobs
    x = rand(*shape, seed=9)
    test_bottom, test_top = blobs_from(x), [Blob()]
    test_layer.setup(test_bottom, test_top)
    test_layer.forward(test_bottom, test_top)
    expected = (x - channel(mean_sum / factor, x.ndim)) / np.sqrt(channel(var_sum / factor, x.ndim) + eps)
    np.testing.assert_allclose(test_top[0].data, expected, rtol=1e-4, atol=1e-5)


def test_batch_norm_masks_its_blobs_from_the_solver():
    layer, _, _ = run('type: "BatchNorm"', rand(2, 3))
    assert [p.lr_mult for p in layer.layer_param.param] == [0, 0, 0]
    assert layer.param_propagate_down == [False] * 3
    layer, _, _ = run('type: "BatchNorm" param { lr_mult: 0 decay_mult: 0 }', rand(2, 3))
    assert len(layer.layer_param.param) == 3
    with pytest.raises(KaffeError, match="cannot configure batch normalization statistics"):
        run('type: "BatchNorm" param { lr_mult: 0 } param { lr_mult: 1 }', rand(2, 3))


def test_batch_norm_zero_factor_and_explicit_global_stats():
    x = rand(3, 2, 4)
    _, _, top = run('type: "BatchNorm" batch_norm_param { use_global_stats: true }', x, phase=TRAIN)
    np.testing.assert_allclose(top[0].data, x / np.sqrt(1e-5), rtol=1e-5)  # factor 0: mean = var = 0
    layer, _, top = run('type: "BatchNorm" batch_norm_param { use_global_stats: false }', x, phase=TEST)
    mean, var, _ = batch_stats64(x)
    np.testing.assert_allclose(top[0].data, (x - channel(mean, 3)) / np.sqrt(channel(var, 3) + 1e-5), rtol=1e-4,
                               atol=1e-5)
    assert layer.blobs[2].data[0] == 1
    with pytest.raises(KaffeError, match="channels"):
        layer.forward(blobs_from(rand(3, 4, 4)), [Blob()])


@pytest.mark.parametrize("phase", [TRAIN, TEST])
@pytest.mark.parametrize("shape", [(3, 2, 3, 2), (5, 3)])
def test_batch_norm_gradient(phase, shape):
    text = 'type: "BatchNorm" batch_norm_param { eps: 0.01 }'
    layer = make_layer(text, phase)
    bottom = blobs_from(rand(*shape, seed=1))
    top = setup_layer(layer, bottom)
    if phase == TEST:  # statistics in the blobs: sums with factor 2
        layer.blobs[0].data[...] = 2 * rand(shape[1], seed=2)
        layer.blobs[1].data[...] = 2 * (np.abs(rand(shape[1], seed=3)) + 0.5)
        layer.blobs[2].data[...] = 2
    # TRAIN updates the running sums at every forward; the gradient does not involve them
    check_gradient(layer, bottom, top, threshold=2e-3, check_params=False)


def test_batch_norm_in_place_backward_matches_separate_top():
    x, dy = rand(4, 3, 5), rand(4, 3, 5, seed=1)
    results = []
    for in_place in (False, True):
        layer, bottom, top = run('type: "BatchNorm"', x, in_place=in_place)
        y = top[0].data.copy()
        backward(layer, bottom, top, dy)
        results.append((y, bottom[0].diff.copy()))
    np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-6)
    np.testing.assert_allclose(results[1][1], results[0][1], rtol=1e-6)


BN_SCALE_NET = """
name: "bn_scale"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 6 dim: 3 dim: 2 dim: 2 } } }
layer { name: "bn" type: "BatchNorm" bottom: "data" top: "bn" batch_norm_param { moving_average_fraction: 0.8 } }
layer { name: "scale" type: "Scale" bottom: "bn" top: "bn"
        scale_param { bias_term: true filler { type: "uniform" min: 0.5 max: 2 } bias_filler { type: "gaussian" } } }
layer { name: "loss" type: "Reduction" bottom: "bn" top: "loss" reduction_param { operation: SUMSQ } loss_weight: 0.5 }
"""


def test_batch_norm_and_scale_train_then_test_match_caffe():
    param = text_format.Parse(BN_SCALE_NET, caffe_pb2.NetParameter())
    train = Net(param, TRAIN)
    eps, maf = 1e-5, 0.8
    bn, scale = train.params["bn"], train.params["scale"]
    learned = [b.data.astype(np.float64).copy() for b in scale]
    mean_sum, var_sum, factor = np.zeros(3), np.zeros(3), 0.0
    for i in range(5):
        x = rand(6, 3, 2, 2, seed=20 + i, scale=2) + 1
        train.forward(data=x)
        train.backward()
        # the BatchNorm statistics get no gradient; the Scale's parameters do
        assert not np.any(bn[0].diff) and not np.any(bn[1].diff)
        assert np.any(scale[0].diff)
        train.update()
        mean, var, m = batch_stats64(x)
        factor = factor * maf + 1
        mean_sum, var_sum = mean + maf * mean_sum, m / (m - 1) * var + maf * var_sum
        learned = [p - b.diff.astype(np.float64) for p, b in zip(learned, scale)]
    np.testing.assert_allclose(bn[2].data, [factor], rtol=1e-6)
    np.testing.assert_allclose(bn[0].data, mean_sum, rtol=1e-5)
    np.testing.assert_allclose(bn[1].data, var_sum, rtol=1e-5)
    np.testing.assert_allclose(scale[0].data, learned[0], rtol=1e-5)
    test = Net(param, TEST)
    test.share_trained_layers_with(train)
    x = rand(6, 3, 2, 2, seed=99)
    test.forward(data=x)
    normalized = (x - channel(mean_sum / factor, 4)) / np.sqrt(channel(var_sum / factor, 4) + eps)
    expected = normalized * channel(learned[0], 4) + channel(learned[1], 4)
    np.testing.assert_allclose(test.blobs["bn"].data, expected, rtol=1e-4, atol=1e-5)


# -- MVN ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("normalize_variance", [True, False])
@pytest.mark.parametrize("across_channels", [False, True])
@pytest.mark.parametrize("eps", [None, 0.1])
def test_mvn_forward_values(normalize_variance, across_channels, eps):
    x = rand(2, 3, 4, 5, scale=3) + 1
    text = (f'type: "MVN" mvn_param {{ normalize_variance: {str(normalize_variance).lower()} '
            f'across_channels: {str(across_channels).lower()} {"" if eps is None else f"eps: {eps}"} }}')
    _, _, top = run(text, x)
    axes = (1, 2, 3) if across_channels else (2, 3)
    y = x - x.mean(axis=axes, keepdims=True)
    if normalize_variance:
        y = y / (x.std(axis=axes, keepdims=True) + (1e-9 if eps is None else eps))  # eps is added to the std
    np.testing.assert_allclose(top[0].data, y, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("params", ["", "normalize_variance: false", "across_channels: true"])
@pytest.mark.parametrize("shape", [(2, 3, 2, 3), (3, 5)])
def test_mvn_gradient(params, shape):
    gradient(f'type: "MVN" mvn_param {{ {params} }}', rand(*shape, seed=4), threshold=2e-3)
