import numpy as np
import pytest
from gradient_check import blobs_from, check_gradient, forward, make_layer, rand, setup_layer

from kaffe.engine.blob import Blob
from kaffe.engine.errors import KaffeError


# -- Split -----------------------------------------------------------------------------------------------------------
def test_split_tops_share_bottom_data_and_backward_sums():
    x = rand(2, 3, 4)
    layer, bottom, top = forward('type: "Split"', x, num_top=3)
    for t in top:
        assert t.shape == x.shape
        np.testing.assert_array_equal(t.data, x.astype(np.float32))
    bottom[0].data[0, 0, 0] = 42  # shared memory, not a copy
    assert all(t.data[0, 0, 0] == 42 for t in top)
    diffs = [rand(2, 3, 4, seed=s) for s in (1, 2, 3)]
    for t, d in zip(top, diffs):
        t.diff[...] = d
    layer.backward(top, [True], bottom)
    np.testing.assert_allclose(bottom[0].diff, sum(diffs), rtol=1e-6)


def test_split_gradient():
    layer = make_layer('type: "Split"')
    bottom = blobs_from(rand(2, 3, 5))
    top = setup_layer(layer, bottom, num_top=2)
    check_gradient(layer, bottom, top)


def test_split_refuses_in_place():
    layer = make_layer('name: "sp" type: "Split"')
    bottom = blobs_from(rand(2))
    with pytest.raises(KaffeError, match="'sp'.*in-place"):
        layer.setup(bottom, [bottom[0], Blob()])


# -- Flatten ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("params,expected", [
    ("", (2, 60)),
    ("flatten_param { axis: 2 }", (2, 3, 20)),
    ("flatten_param { axis: 0 end_axis: -2 }", (24, 5)),
    ("flatten_param { axis: 1 end_axis: 2 }", (2, 12, 5)),
    ("flatten_param { axis: -1 }", (2, 3, 4, 5)),
    ("flatten_param { axis: 0 }", (120,)),
])
def test_flatten_shapes_and_sharing(params, expected):
    x = rand(2, 3, 4, 5)
    layer, bottom, top = forward(f'type: "Flatten" {params}', x)
    assert top[0].shape == expected
    np.testing.assert_array_equal(top[0].data.reshape(x.shape), x.astype(np.float32))
    top[0].diff[...] = 3.0
    assert np.all(bottom[0].diff == 3.0)  # diff is shared, no copy
    bottom[0].data[...] = 1.0
    assert np.all(top[0].data == 1.0)


def test_flatten_errors():
    with pytest.raises(KaffeError, match="'fl'.*end_axis 4.*2, 3, 4"):
        forward('name: "fl" type: "Flatten" flatten_param { end_axis: 4 }', rand(2, 3, 4))
    layer = make_layer('name: "fl" type: "Flatten"')
    bottom = blobs_from(rand(2, 3))
    with pytest.raises(KaffeError, match="in-place"):
        layer.setup(bottom, bottom)


# -- Reshape ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("params,expected", [
    ("shape { dim: 0 dim: -1 }", (2, 90)),
    ("shape { dim: 3 dim: 5 dim: 0 dim: 2 }", (3, 5, 6, 2)),  # copies axis 2 of (2, 3, 6, 5)
    ("shape { dim: -1 dim: 0 dim: 2 }", (30, 3, 2)),
    ("shape { dim: 0 dim: 0 dim: 0 dim: 0 }", (2, 3, 6, 5)),
    ("shape { dim: 1 } axis: 1 num_axes: 0", (2, 1, 3, 6, 5)),
    ("shape { dim: 1 } axis: 0 num_axes: 0", (1, 2, 3, 6, 5)),
    ("shape { dim: 1 } axis: -1 num_axes: 0", (2, 3, 6, 5, 1)),
    ("shape { dim: -1 } axis: 1 num_axes: 2", (2, 18, 5)),
    ("shape { dim: 3 dim: -1 } axis: -3", (2, 3, 3, 10)),
    ("shape { dim: 0 dim: 30 } axis: 1", (2, 3, 30)),
    ("shape { dim: 0 dim: -1 } axis: 2 num_axes: 2", (2, 3, 6, 5)),
])
def test_reshape(params, expected):
    x = rand(2, 3, 6, 5)
    layer, bottom, top = forward(f'type: "Reshape" reshape_param {{ {params} }}', x)
    assert top[0].shape == expected
    np.testing.assert_array_equal(top[0].data.reshape(-1), x.astype(np.float32).reshape(-1))
    top[0].diff[...] = 2.0
    assert np.all(bottom[0].diff == 2.0)


def test_reshape_to_scalar_and_follows_bottom():
    layer, bottom, top = forward('type: "Reshape" reshape_param { shape { } }', np.ones((1, 1)))
    assert top[0].shape == ()
    layer = make_layer('type: "Reshape" reshape_param { shape { dim: 0 dim: -1 } }')
    bottom = blobs_from(rand(2, 3))
    top = setup_layer(layer, bottom)
    bottom[0].reshape(4, 3, 2)
    layer.forward(bottom, top)
    assert top[0].shape == (4, 6)


@pytest.mark.parametrize("params,message", [
    ("shape { dim: -1 dim: -1 }", "multiple -1"),
    ("shape { dim: 7 dim: -1 }", "divisible.*7"),
    ("shape { dim: 4 dim: 4 }", "output count 16.*input count 180"),
    ("shape { }", "output count 1 "),
    ("shape { dim: 0 dim: 0 dim: 0 dim: 0 dim: 0 }", "no corresponding bottom axis"),
    ("shape { dim: 1 } axis: 5", "axis 5 out of range"),
    ("shape { dim: 1 } axis: -6", "axis -6 out of range"),
    ("shape { dim: 1 } axis: 3 num_axes: 2", "out of range"),
    ("shape { dim: 1 } num_axes: -2", "num_axes"),
    ("shape { dim: -2 dim: 1 }", "below -1"),
])
def test_reshape_errors(params, message):
    with pytest.raises(KaffeError, match=f"'rs'.*{message}"):
        forward(f'name: "rs" type: "Reshape" reshape_param {{ {params} }}', rand(2, 3, 6, 5))


def test_reshape_refuses_in_place():
    layer = make_layer('name: "rs" type: "Reshape" reshape_param { shape { dim: -1 } }')
    bottom = blobs_from(rand(2, 3))
    with pytest.raises(KaffeError, match="in-place"):
        layer.setup(bottom, bottom)


# -- Concat ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("params,shapes,axis", [
    ("concat_param { axis: 0 }", [(2, 3, 4), (1, 3, 4), (3, 3, 4)], 0),
    ("", [(2, 3, 4), (2, 5, 4)], 1),
    ("concat_param { axis: -1 }", [(2, 3, 1), (2, 3, 4), (2, 3, 2)], 2),
    ("concat_param { concat_dim: 0 }", [(1, 3), (2, 3)], 0),
])
def test_concat_forward_backward(params, shapes, axis):
    xs = [rand(*s, seed=i) for i, s in enumerate(shapes)]
    layer, bottom, top = forward(f'type: "Concat" {params}', *xs)
    np.testing.assert_array_equal(top[0].data, np.concatenate(xs, axis).astype(np.float32))
    dy = rand(*top[0].shape, seed=9)
    top[0].diff[...] = dy
    for b in bottom:
        b.diff[...] = -1
    layer.backward(top, [True, False] + [True] * (len(xs) - 2), bottom)
    parts = np.split(dy.astype(np.float32), np.cumsum([s[axis] for s in shapes])[:-1], axis)
    np.testing.assert_array_equal(bottom[0].diff, parts[0])
    assert np.all(bottom[1].diff == -1)  # not propagated
    for b, part in zip(bottom[2:], parts[2:]):
        np.testing.assert_array_equal(b.diff, part)


def test_concat_single_bottom_shares():
    layer, bottom, top = forward('type: "Concat"', rand(2, 3))
    bottom[0].data[...] = 5
    assert np.all(top[0].data == 5)


def test_concat_gradient():
    layer = make_layer('type: "Concat" concat_param { axis: 2 }')
    bottom = blobs_from(rand(2, 3, 1, 2), rand(2, 3, 3, 2, seed=1))
    top = setup_layer(layer, bottom)
    check_gradient(layer, bottom, top)


def test_concat_errors():
    with pytest.raises(KaffeError, match=r"'cc'.*\(2, 3, 4\) and \(2, 5, 5\)"):
        forward('name: "cc" type: "Concat"', rand(2, 3, 4), rand(2, 5, 5))
    with pytest.raises(KaffeError, match=r"'cc'.*\(2, 3\) and \(2, 3, 1\)"):
        forward('name: "cc" type: "Concat"', rand(2, 3), rand(2, 3, 1))
    with pytest.raises(KaffeError, match="'cc'.*not both"):
        forward('name: "cc" type: "Concat" concat_param { axis: 0 concat_dim: 0 }', rand(2), rand(2))
    with pytest.raises(KaffeError, match="'cc'.*concat_dim 2"):
        forward('name: "cc" type: "Concat" concat_param { concat_dim: 2 }', rand(2, 2), rand(2, 2))
    with pytest.raises(KaffeError, match="'cc'.*axis -3"):
        forward('name: "cc" type: "Concat" concat_param { axis: -3 }', rand(2, 2), rand(2, 2))


# -- Eltwise ---------------------------------------------------------------------------------------------------------
def eltwise_inputs(n=3, shape=(2, 3, 4, 3)):
    return [rand(*shape, seed=i) for i in range(n)]


def test_eltwise_forward_ops():
    xs = eltwise_inputs()
    x64 = [x.astype(np.float32).astype(np.float64) for x in xs]
    _, _, top = forward('type: "Eltwise" eltwise_param { operation: PROD }', *xs)
    np.testing.assert_allclose(top[0].data, x64[0] * x64[1] * x64[2], rtol=1e-6)
    _, _, top = forward('type: "Eltwise"', *xs)  # SUM is the default
    np.testing.assert_allclose(top[0].data, x64[0] + x64[1] + x64[2], rtol=1e-6, atol=1e-6)
    _, _, top = forward('type: "Eltwise" eltwise_param { operation: SUM coeff: 1 coeff: -0.5 coeff: 2 }', *xs)
    np.testing.assert_allclose(top[0].data, x64[0] - 0.5 * x64[1] + 2 * x64[2], rtol=1e-6, atol=1e-6)
    _, _, top = forward('type: "Eltwise" eltwise_param { operation: MAX }', *xs)
    np.testing.assert_array_equal(top[0].data, np.maximum(np.maximum(x64[0], x64[1]), x64[2]))


def test_eltwise_max_backward_routes_to_argmax_with_caffes_tie_rule():
    a = np.array([1.0, 2.0, 3.0, 5.0])
    b = np.array([1.0, 4.0, 3.0, 0.0])
    c = np.array([0.0, 4.0, 3.0, 5.0])
    layer, bottom, top = forward('type: "Eltwise" eltwise_param { operation: MAX }', a, b, c)
    top[0].diff[...] = [10, 20, 30, 40]
    layer.backward(top, [True, True, True], bottom)
    # a tie of bottoms 0 and 1 goes to 1; a later bottom takes over only when strictly greater
    np.testing.assert_array_equal(bottom[0].diff, [0, 0, 0, 40])
    np.testing.assert_array_equal(bottom[1].diff, [10, 20, 30, 0])
    np.testing.assert_array_equal(bottom[2].diff, [0, 0, 0, 0])


@pytest.mark.parametrize("params", [
    "operation: PROD",
    "operation: PROD stable_prod_grad: false",
    "operation: SUM",
    "operation: SUM coeff: -1.5 coeff: 0.5 coeff: 2",
    "operation: MAX",
])
def test_eltwise_gradient(params):
    layer = make_layer(f'type: "Eltwise" eltwise_param {{ {params} }}')
    xs = eltwise_inputs(shape=(2, 3, 2, 3))
    if "MAX" in params:  # keep the bottoms apart by more than the step, so no finite difference crosses a tie
        xs = [np.arange(36).reshape(2, 3, 2, 3) * 0.1 * (1 + i) for i in range(3)]
        xs = [np.random.default_rng(i).permutation(x.ravel()).reshape(x.shape) for i, x in enumerate(xs)]
    bottom = blobs_from(*xs)
    top = setup_layer(layer, bottom)
    check_gradient(layer, bottom, top, threshold=1e-3)


def test_eltwise_errors():
    with pytest.raises(KaffeError, match=r"'el'.*\(2, 3\) and \(3, 2\)"):
        forward('name: "el" type: "Eltwise"', rand(2, 3), rand(3, 2))
    with pytest.raises(KaffeError, match="'el'.*one coefficient per bottom"):
        forward('name: "el" type: "Eltwise" eltwise_param { coeff: 1 }', rand(2), rand(2))
    with pytest.raises(KaffeError, match="'el'.*only takes coefficients for summation"):
        forward('name: "el" type: "Eltwise" eltwise_param { operation: PROD coeff: 1 coeff: 2 }', rand(2), rand(2))
    with pytest.raises(KaffeError, match="'el'.*at least 2"):
        forward('name: "el" type: "Eltwise"', rand(2))


# -- Silence ---------------------------------------------------------------------------------------------------------
def test_silence():
    layer, bottom, top = forward('type: "Silence"', rand(2, 3), rand(4), num_top=0)
    assert top == []
    for b in bottom:
        b.diff[...] = 5
    layer.backward(top, [True, False], bottom)
    assert np.all(bottom[0].diff == 0)
    assert np.all(bottom[1].diff == 5)
    with pytest.raises(KaffeError, match="exactly 0 top"):
        forward('type: "Silence"', rand(2), num_top=1)


# -- Softmax ---------------------------------------------------------------------------------------------------------
def softmax_ref(x, axis):
    x = x.astype(np.float32).astype(np.float64)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


@pytest.mark.parametrize("axis", [1, 2, -1, 0])
def test_softmax_forward(axis):
    x = rand(2, 5, 3, 4) * 3
    _, _, top = forward(f'type: "Softmax" softmax_param {{ axis: {axis} }}', x)
    np.testing.assert_allclose(top[0].data, softmax_ref(x, axis), rtol=1e-5, atol=1e-7)


def test_softmax_is_stable_for_large_inputs():
    x = np.array([[1000.0, 1001.0, 999.0], [-1000.0, -1000.0, -2000.0]])
    _, _, top = forward('type: "Softmax"', x)
    np.testing.assert_allclose(top[0].data, softmax_ref(x, 1), rtol=1e-5, atol=1e-30)


@pytest.mark.parametrize("axis", [1, 2])
def test_softmax_gradient(axis):
    layer = make_layer(f'type: "Softmax" softmax_param {{ axis: {axis} }}')
    bottom = blobs_from(rand(2, 3, 5, 2))
    top = setup_layer(layer, bottom)
    check_gradient(layer, bottom, top, threshold=1e-3)


def test_softmax_in_place_matches_separate_top():
    x = rand(3, 4, 2)
    dy = rand(3, 4, 2, seed=4)
    results = []
    for in_place in (False, True):
        layer = make_layer('type: "Softmax" softmax_param { axis: 1 }')
        bottom = blobs_from(x)
        top = bottom if in_place else [Blob()]
        layer.setup(bottom, top)
        layer.forward(bottom, top)
        y = top[0].data.copy()
        top[0].diff[...] = dy
        layer.backward(top, [True], bottom)
        results.append((y, bottom[0].diff.copy()))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])


def test_softmax_bad_axis():
    with pytest.raises(KaffeError, match=r"'sm'.*axis 3.*\(2, 3\)"):
        forward('name: "sm" type: "Softmax" softmax_param { axis: 3 }', rand(2, 3))
