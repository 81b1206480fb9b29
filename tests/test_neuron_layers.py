import numpy as np
import pytest
from gradient_check import blobs_from, check_gradient, make_layer, rand, rand32, setup_layer

from kaffe.engine import device
from kaffe.engine.blob import Blob
from kaffe.engine.errors import KaffeError
from kaffe.engine.layer import _REGISTRY
from kaffe.layers.neuron import ElementwiseLayer, dropout_bits
from kaffe.proto import caffe_pb2


def run(text, x, phase=caffe_pb2.TRAIN, seed=None):
    layer = make_layer(text, phase)
    bottom = blobs_from(x)
    top = setup_layer(layer, bottom)
    if seed is not None:
        device.set_random_seed(seed)
    layer.forward(bottom, top)
    return layer, bottom, top


def forward_backward(text, x, dy, in_place, phase=caffe_pb2.TRAIN, seed=5):
    """(top data, bottom diff) after a forward and a backward, in place or with a separate top."""
    layer = make_layer(text, phase)
    bottom = blobs_from(x)
    top = bottom if in_place else [Blob()]
    layer.setup(bottom, top)
    device.set_random_seed(seed)
    layer.forward(bottom, top)
    y = top[0].data.copy()
    top[0].diff[...] = dy
    layer.backward(top, [True], bottom)
    return y, bottom[0].diff.copy()


# -- forward values against float64 references -------------------------------------------------------------------
def test_relu_forward():
    x = rand(2, 3, 4, 5)
    _, _, top = run('type: "ReLU"', x)
    np.testing.assert_allclose(top[0].data, np.maximum(x, 0), rtol=1e-6)


def test_leaky_relu_forward_and_backward_at_zero():
    x = rand(3, 7)
    x[0, :3] = 0.0
    layer, bottom, top = run('type: "ReLU" relu_param { negative_slope: 0.3 }', x)
    np.testing.assert_allclose(top[0].data, np.where(x > 0, x, 0.3 * x), rtol=1e-6, atol=1e-7)
    dy = rand(3, 7, seed=1)
    top[0].diff[...] = dy
    layer.backward(top, [True], bottom)
    # Caffe: dy * ((x > 0) + slope * (x <= 0)): zero takes the negative side
    np.testing.assert_allclose(bottom[0].diff, dy * np.where(x > 0, 1.0, 0.3), rtol=1e-6)


def test_relu_shortcut_gives_the_formulas_values_special_values_included():
    """negative_slope 0 on the CPU takes one numpy pass each way: the same values as Caffe's formula, for -inf
    (0 * -inf = NaN), NaN, infinite gradients and zeros too, over more than one evaluation block."""
    from kaffe.layers.neuron import BLOCK, NUMPY_OPS, ReLULayer
    from types import SimpleNamespace
    x = rand32(BLOCK + 77, scale=3)
    x[:6] = [np.inf, np.nan, 0.0, -0.0, 1e-45, -1e-45]
    dy = rand32(BLOCK + 77, seed=3)
    dy[6:10] = [np.inf, -np.inf, np.nan, 0.0]
    x[7:9] = [-2.0, 3.0]
    p = SimpleNamespace(negative_slope=np.float32(0))
    with np.errstate(all="ignore"):
        y_formula = ReLULayer.formula.forward(x, p, NUMPY_OPS)
        dx_formula = ReLULayer.formula.backward(x, y_formula, dy, p, NUMPY_OPS)
    for with_neg_inf in (False, True):
        if with_neg_inf:
            x[10] = -np.inf
            with np.errstate(all="ignore"):
                y_formula = ReLULayer.formula.forward(x, p, NUMPY_OPS)
            assert np.isnan(y_formula[10])
        y, dx = forward_backward('type: "ReLU"', x, dy, in_place=False)
        np.testing.assert_array_equal(y, y_formula)
        if not with_neg_inf:
            np.testing.assert_array_equal(dx, dx_formula)


def test_formulas_evaluated_blockwise_give_the_whole_array_values():
    from kaffe.layers.neuron import BLOCK, NUMPY_OPS
    x = rand32(2 * BLOCK + 5, scale=2)
    _, _, top = run('type: "TanH"', x)
    np.testing.assert_array_equal(top[0].data, np.tanh(x))


def test_sigmoid_forward_is_stable_for_large_inputs():
    x = np.concatenate([rand(20), [-200.0, -90.0, 0.0, 90.0, 200.0]])
    _, _, top = run('type: "Sigmoid"', x)
    assert np.all(np.isfinite(top[0].data))
    np.testing.assert_allclose(top[0].data, 1 / (1 + np.exp(-x)), rtol=1e-6, atol=1e-7)


def test_tanh_forward():
    x = rand(4, 9, scale=3)
    _, _, top = run('type: "TanH"', x)
    np.testing.assert_allclose(top[0].data, np.tanh(x), rtol=1e-6, atol=1e-7)


def test_backward_uses_top_data_for_sigmoid_and_tanh():
    x = rand(5, 6)
    dy = rand(5, 6, seed=3)
    for text, ref in [('type: "Sigmoid"', lambda y: dy * y * (1 - y)), ('type: "TanH"', lambda y: dy * (1 - y * y))]:
        layer, bottom, top = run(text, x)
        top[0].diff[...] = dy
        layer.backward(top, [True], bottom)
        np.testing.assert_allclose(bottom[0].diff, ref(top[0].data.astype(np.float64)), rtol=1e-5, atol=1e-7)


def test_no_backward_when_not_propagating():
    layer, bottom, top = run('type: "TanH"', rand(3, 4))
    bottom[0].diff[...] = 7
    top[0].diff[...] = 1
    layer.backward(top, [False], bottom)
    assert np.all(bottom[0].diff == 7)


# -- gradients -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,kink", [
    ('type: "ReLU"', 0.0),
    ('type: "ReLU" relu_param { negative_slope: 0.01 }', 0.0),
    ('type: "ReLU" relu_param { negative_slope: -0.5 }', 0.0),
    ('type: "Sigmoid"', None),
    ('type: "TanH"', None),
])
def test_gradients(text, kink):
    layer = make_layer(text)
    bottom = blobs_from(rand(2, 3, 3, 5, scale=2))
    top = setup_layer(layer, bottom)
    check_gradient(layer, bottom, top, threshold=1e-3, kink=kink, kink_range=0.01 if kink is not None else -1)


# -- in place ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", [
    'type: "ReLU"',
    'type: "ReLU" relu_param { negative_slope: 0.2 }',
    'type: "Sigmoid"',
    'type: "TanH"',
    'type: "Dropout" dropout_param { dropout_ratio: 0.4 }',
])
@pytest.mark.parametrize("phase", [caffe_pb2.TRAIN, caffe_pb2.TEST])
def test_in_place_matches_separate_top(text, phase):
    x = rand(3, 4, 5, scale=2)
    dy = rand(3, 4, 5, seed=9)
    y_sep, dx_sep = forward_backward(text, x, dy, in_place=False, phase=phase)
    y_in, dx_in = forward_backward(text, x, dy, in_place=True, phase=phase)
    np.testing.assert_array_equal(y_in, y_sep)
    np.testing.assert_array_equal(dx_in, dx_sep)


# -- the formulas are pure expressions: symbolic operands and ops give expressions back ---------------------------
class Sym:
    def __init__(self, text):
        self.text = text

    def _bin(op, swap=False):
        def method(self, other):
            a, b = (other, self) if swap else (self, other)
            return Sym(f"({_text(a)} {op} {_text(b)})")
        return method

    __add__, __radd__ = _bin("+"), _bin("+", True)
    __sub__, __rsub__ = _bin("-"), _bin("-", True)
    __mul__, __rmul__ = _bin("*"), _bin("*", True)
    __truediv__, __rtruediv__ = _bin("/"), _bin("/", True)
    __gt__, __ge__, __lt__, __le__ = _bin(">"), _bin(">="), _bin("<"), _bin("<=")

    def __neg__(self):
        return Sym(f"(-{self.text})")

    def __bool__(self):
        raise TypeError("a formula branched on data")


def _text(v):
    return v.text if isinstance(v, Sym) else repr(float(v))


class SymOps:
    def __getattr__(self, name):
        assert name in {"where", "exp", "log", "log1p", "tanh", "abs", "maximum", "minimum", "sqrt", "pow"}
        return lambda *args: Sym(f"{name}({', '.join(_text(a) for a in args)})")


def test_formulas_are_symbolic_expressions():
    elementwise = {name: cls for name, cls in _REGISTRY.items() if issubclass(cls, ElementwiseLayer)}
    assert {"ReLU", "Sigmoid", "TanH"} <= set(elementwise)
    for name, cls in elementwise.items():
        formula = cls.formula
        p = type("P", (), {k: Sym(k) for k in formula.params(caffe_pb2.LayerParameter())})()
        y = formula.forward(Sym("x"), p, SymOps())
        dx = formula.backward(Sym("x"), Sym("y"), Sym("dy"), p, SymOps())
        assert isinstance(y, Sym) and isinstance(dx, Sym), name
    relu = elementwise["ReLU"].formula
    p = type("P", (), {"negative_slope": Sym("s")})()
    assert relu.backward(Sym("x"), Sym("y"), Sym("dy"), p, SymOps()).text == \
        "(dy * ((x > 0.0) + (s * (x <= 0.0))))"


# -- Dropout -------------------------------------------------------------------------------------------------------
def test_dropout_train_scales_kept_values_and_mask_statistics():
    x = rand(40, 50, 10) + 3.0  # no zeros in the input
    layer, bottom, top = run('type: "Dropout" dropout_param { dropout_ratio: 0.3 }', x, seed=11)
    y = top[0].data
    kept = y != 0
    scale = 1.0 / (1.0 - np.float32(0.3))
    np.testing.assert_allclose(y[kept], (x[kept] * scale), rtol=1e-6)
    n = x.size
    frac = kept.mean()
    assert abs(frac - 0.7) < 4 * np.sqrt(0.7 * 0.3 / n)
    # the same mask is used backward
    dy = rand(*x.shape, seed=2)
    top[0].diff[...] = dy
    layer.backward(top, [True], bottom)
    np.testing.assert_allclose(bottom[0].diff, np.where(kept, dy * scale, 0), rtol=1e-6)


def test_dropout_default_ratio_and_seeded_mask():
    x = np.ones((100, 100))
    _, _, top_a = run('type: "Dropout"', x, seed=3)
    _, _, top_b = run('type: "Dropout"', x, seed=3)
    _, _, top_c = run('type: "Dropout"', x, seed=4)
    assert set(np.unique(top_a[0].data)) == {0.0, 2.0}
    np.testing.assert_array_equal(top_a[0].data, top_b[0].data)
    assert not np.array_equal(top_a[0].data, top_c[0].data)


def test_dropout_bits_are_splitmix64():
    """The mask bits (the same in layers/neuron.cl) are the top halves of splitmix64's outputs."""
    # splitmix64 seeded with 1234567 (the sequence published with Vigna's reference code)
    published = [6457827717110365317, 3203168211198807973, 9817491932198370423, 4593380528125082431,
                 16408922859458223821]
    np.testing.assert_array_equal(dropout_bits(1234567, 5), [v >> 32 for v in published])

    def splitmix64(state):  # a plain-integer reference, for a seed whose counters wrap around 2^64
        z = state % 2**64
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 % 2**64
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB % 2**64
        return z ^ (z >> 31)
    seed = 2**64 - 5
    expected = [splitmix64(seed + (i + 1) * 0x9E3779B97F4A7C15) >> 32 for i in range(1000)]
    np.testing.assert_array_equal(dropout_bits(seed, 1000), expected)


def test_dropout_test_phase_is_identity():
    x = rand(4, 5, 6)
    layer, bottom, top = run('type: "Dropout" dropout_param { dropout_ratio: 0.9 }', x, phase=caffe_pb2.TEST)
    np.testing.assert_array_equal(top[0].data, x.astype(np.float32))
    dy = rand(4, 5, 6, seed=1)
    top[0].diff[...] = dy
    layer.backward(top, [True], bottom)
    np.testing.assert_array_equal(bottom[0].diff, dy.astype(np.float32))


def test_dropout_gradient():
    layer = make_layer('type: "Dropout" dropout_param { dropout_ratio: 0.4 }')
    bottom = blobs_from(rand(2, 3, 5, 3))
    top = setup_layer(layer, bottom)
    check_gradient(layer, bottom, top, threshold=1e-3)


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5])
def test_dropout_bad_ratio(ratio):
    layer = make_layer(f'name: "drop1" type: "Dropout" dropout_param {{ dropout_ratio: {ratio} }}')
    with pytest.raises(KaffeError, match="drop1"):
        setup_layer(layer, blobs_from(np.ones(3)))


def test_neuron_layers_take_one_bottom_and_one_top():
    layer = make_layer('name: "r" type: "ReLU"')
    with pytest.raises(KaffeError, match="'r'"):
        setup_layer(layer, blobs_from(np.ones(3), np.ones(3)))


def test_reshape_follows_bottom():
    layer = make_layer('type: "Sigmoid"')
    bottom = blobs_from(rand(2, 3))
    top = setup_layer(layer, bottom)
    bottom[0].reshape(4, 1, 5)
    bottom[0].data[...] = 0
    layer.forward(bottom, top)
    assert top[0].shape == (4, 1, 5)
    np.testing.assert_array_equal(top[0].data, 0.5)
