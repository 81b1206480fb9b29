import numpy as np
import pytest
from gradient_check import blobs_from, check_gradient, forward, make_layer, rand, setup_layer

from kaffe.engine.blob import Blob
from kaffe.engine.errors import KaffeError

FLT_MIN = float(np.finfo(np.float32).tiny)


def labels_for(shape, classes, seed=1):
    return np.random.default_rng(seed).integers(0, classes, size=shape).astype(np.float64)


# -- float64 references (loops are fine here) -------------------------------------------------------------------
def softmax_loss_ref(x, labels, axis, ignore, mode):
    """(loss, gradient for loss weight 1) of softmax + multinomial log loss, looping over positions."""
    x = np.moveaxis(x.astype(np.float32).astype(np.float64), axis, -1)
    outer, inner = int(np.prod(x.shape[:axis])), int(np.prod(x.shape[axis:-1]))
    rows = x.reshape(-1, x.shape[-1])
    labels = labels.reshape(-1).astype(int)
    loss, valid = 0.0, 0
    grad = np.zeros_like(rows)
    for r, (row, label) in enumerate(zip(rows, labels)):
        if label == ignore:
            continue
        p = np.exp(row - row.max())
        p /= p.sum()
        loss -= np.log(max(p[label], FLT_MIN))
        grad[r] = p
        grad[r, label] -= 1
        valid += 1
    norm = {"FULL": outer * inner, "VALID": valid, "BATCH_SIZE": outer, "NONE": 1}[mode]
    norm = max(1, norm)
    grad = np.moveaxis(grad.reshape(x.shape), -1, axis)
    return loss / norm, grad / norm


def accuracy_ref(x, labels, axis, top_k, ignore=None):
    """Overall and per-class accuracy; right iff fewer than top_k other classes score >= the true class."""
    x = np.moveaxis(x.astype(np.float32), axis, -1).reshape(-1, x.shape[axis])
    labels = labels.reshape(-1).astype(int)
    classes = x.shape[1]
    hits, counts = np.zeros(classes), np.zeros(classes)
    for row, label in zip(x, labels):
        if label == ignore:
            continue
        rivals = sum(1 for k in range(classes) if k != label and row[k] >= row[label])
        counts[label] += 1
        hits[label] += rivals < top_k
    total = counts.sum()
    per_class = np.array([h / c if c else 0.0 for h, c in zip(hits, counts)])
    return (hits.sum() / total if total else 0.0), per_class


# -- SoftmaxWithLoss ---------------------------------------------------------------------------------------------
MODES = ["FULL", "VALID", "BATCH_SIZE", "NONE"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("ignore", [None, 2])
def test_softmax_loss_forward_and_backward(mode, ignore):
    x = rand(3, 4, 2, 3) * 2
    labels = labels_for((3, 1, 2, 3), 4)
    labels[0, 0, 0, :] = 2  # some ignored positions for sure
    ignore_text = f"ignore_label: {ignore}" if ignore is not None else ""
    layer, bottom, top = forward(
        f'type: "SoftmaxWithLoss" loss_param {{ normalization: {mode} {ignore_text} }}', x, labels)
    loss, grad = softmax_loss_ref(x, labels, 1, ignore, mode)
    assert top[0].shape == ()
    np.testing.assert_allclose(float(top[0].data), loss, rtol=1e-5)
    top[0].diff[...] = 1.0
    layer.backward(top, [True, False], bottom)
    np.testing.assert_allclose(bottom[0].diff, grad, rtol=1e-4, atol=1e-7)


def test_full_and_valid_differ_with_ignored_labels():
    x = rand(2, 3, 4)
    labels = np.array([[0, 1, 1, 2], [2, 2, 0, 1]], dtype=float)
    losses = {}
    for mode in ("FULL", "VALID"):
        _, _, top = forward(f'type: "SoftmaxWithLoss" loss_param {{ normalization: {mode} ignore_label: 2 }}',
                            x, labels)
        losses[mode] = float(top[0].data)
    # 5 valid positions out of 8
    np.testing.assert_allclose(losses["FULL"] * 8, losses["VALID"] * 5, rtol=1e-5)


@pytest.mark.parametrize("params,mode", [
    ("", "VALID"),
    ("normalize: false", "BATCH_SIZE"),
    ("normalize: true", "VALID"),
    ("normalize: false normalization: FULL", "FULL"),
    ("normalize: true normalization: NONE", "NONE"),
])
def test_deprecated_normalize(params, mode):
    x = rand(3, 5, 2)
    labels = labels_for((3, 2), 5)
    labels[0, 0] = 4
    _, _, top = forward(f'type: "SoftmaxWithLoss" loss_param {{ ignore_label: 4 {params} }}', x, labels)
    np.testing.assert_allclose(float(top[0].data), softmax_loss_ref(x, labels, 1, 4, mode)[0], rtol=1e-5)


def test_flt_min_clamp():
    x = np.array([[0.0, -200.0], [0.0, -200.0]])
    _, _, top = forward('type: "SoftmaxWithLoss"', x, np.array([1.0, 1.0]))
    np.testing.assert_allclose(float(top[0].data), 87.3365, atol=1e-4)
    np.testing.assert_allclose(float(top[0].data), -np.log(FLT_MIN), rtol=1e-6)


def test_all_ignored_normalizer_is_at_least_one():
    layer, bottom, top = forward('type: "SoftmaxWithLoss" loss_param { ignore_label: 0 }', rand(2, 3), np.zeros(2))
    assert float(top[0].data) == 0.0
    top[0].diff[...] = 1.0
    layer.backward(top, [True, False], bottom)
    assert np.all(bottom[0].diff == 0)


def test_probability_top_and_loss_weight():
    x = rand(2, 3, 4)
    labels = labels_for((2, 4), 3)
    layer, bottom, top = forward('type: "SoftmaxWithLoss" loss_weight: 2.5 loss_weight: 0', x, labels, num_top=2)
    e = np.exp(x - x.max(axis=1, keepdims=True))
    np.testing.assert_allclose(top[1].data, e / e.sum(axis=1, keepdims=True), rtol=1e-5)
    assert top[1].shape == x.shape
    assert layer.loss(0) == 2.5
    layer.backward(top, [True, False], bottom)  # top[0].diff holds the loss weight
    np.testing.assert_allclose(bottom[0].diff, 2.5 * softmax_loss_ref(x, labels, 1, None, "VALID")[1],
                               rtol=1e-4, atol=1e-7)


def test_default_loss_weight_and_forward_return():
    x = rand(4, 3)
    labels = labels_for((4,), 3)
    layer = make_layer('type: "SoftmaxWithLoss"')
    bottom = blobs_from(x, labels)
    top = setup_layer(layer, bottom)
    loss = layer.forward(bottom, top)
    np.testing.assert_allclose(loss, softmax_loss_ref(x, labels, 1, None, "VALID")[0], rtol=1e-5)


def test_softmax_loss_axis_2():
    x = rand(2, 3, 5) * 2
    labels = labels_for((2, 3), 5)
    layer, bottom, top = forward('type: "SoftmaxWithLoss" softmax_param { axis: 2 }', x, labels)
    loss, grad = softmax_loss_ref(x, labels, 2, None, "VALID")
    np.testing.assert_allclose(float(top[0].data), loss, rtol=1e-5)
    top[0].diff[...] = 1.0
    layer.backward(top, [True, False], bottom)
    np.testing.assert_allclose(bottom[0].diff, grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("mode", MODES)
def test_softmax_loss_gradient_with_ignore_label(mode):
    x = rand(2, 4, 3, 2)
    labels = labels_for((2, 3, 2), 4, seed=3)
    labels[1, 0, :] = 1
    layer = make_layer(f'type: "SoftmaxWithLoss" loss_param {{ ignore_label: 1 normalization: {mode} }}')
    bottom = blobs_from(x, labels)
    top = setup_layer(layer, bottom)
    check_gradient(layer, bottom, top, check_bottom=[0], threshold=1e-3)


def test_softmax_loss_gradient_last_axis():
    # (as in Caffe, the probability top is an output only: backward ignores its diff, so it is left out here)
    layer = make_layer('type: "SoftmaxWithLoss" softmax_param { axis: -1 }')
    bottom = blobs_from(rand(3, 2, 5), labels_for((3, 2), 5))
    top = setup_layer(layer, bottom)
    check_gradient(layer, bottom, top, check_bottom=[0], threshold=1e-3)


def test_softmax_loss_errors():
    with pytest.raises(KaffeError, match=r"'sl'.*number of labels.*\(2, 3, 4\).*got 6"):
        forward('name: "sl" type: "SoftmaxWithLoss"', rand(2, 3, 4), np.zeros((2, 3)))
    with pytest.raises(KaffeError, match="'sl'.*label 3 is outside"):
        forward('name: "sl" type: "SoftmaxWithLoss"', rand(2, 3), np.array([0, 3]))
    with pytest.raises(KaffeError, match="'sl'.*at most 2 top"):
        forward('name: "sl" type: "SoftmaxWithLoss"', rand(2, 3), np.array([0, 1]), num_top=3)
    with pytest.raises(KaffeError, match="'sl'.*exactly 2 bottom"):
        forward('name: "sl" type: "SoftmaxWithLoss"', rand(2, 3))
    with pytest.raises(KaffeError, match="'sl'"):
        forward('name: "sl" type: "SoftmaxWithLoss" softmax_param { axis: 0 }', rand(2, 3), np.zeros(3))
    layer, bottom, top = forward('name: "sl" type: "SoftmaxWithLoss"', rand(2, 3), np.array([0, 1]))
    with pytest.raises(KaffeError, match="'sl'.*label inputs"):
        layer.backward(top, [True, True], bottom)


# -- Accuracy ----------------------------------------------------------------------------------------------------
def test_accuracy_ties_count_as_wrong():
    x = np.array([[1.0, 1.0, 0.0],    # label 0 ties with class 1: wrong at top 1, right at top 2
                  [0.5, 2.0, 2.0],    # label 2 ties with class 1: wrong
                  [3.0, 1.0, 2.0],    # label 0: right
                  [1.0, 1.0, 1.0]])   # label 1, all tie: wrong at top 1 and top 2, right at top 3
    labels = np.array([0, 2, 0, 1])
    for k, expected in [(1, 0.25), (2, 0.75), (3, 1.0)]:
        _, _, top = forward(f'type: "Accuracy" accuracy_param {{ top_k: {k} }}', x, labels)
        assert top[0].shape == ()
        np.testing.assert_allclose(float(top[0].data), expected, rtol=1e-6)


@pytest.mark.parametrize("top_k", [1, 3])
def test_accuracy_against_reference_with_ties(top_k):
    x = np.round(rand(50, 6), 0)  # many ties
    labels = labels_for((50,), 6)
    _, _, top = forward(f'type: "Accuracy" accuracy_param {{ top_k: {top_k} }}', x, labels, num_top=2)
    overall, per_class = accuracy_ref(x, labels, 1, top_k)
    np.testing.assert_allclose(float(top[0].data), overall, rtol=1e-6)
    assert top[1].shape == (6,)
    np.testing.assert_allclose(top[1].data, per_class, rtol=1e-6)


def test_accuracy_ignore_label_and_per_class():
    x = rand(4, 5, 3)
    labels = labels_for((4, 3), 5, seed=2)
    labels[0, :] = 4
    labels[1, 1] = 4
    _, _, top = forward('type: "Accuracy" accuracy_param { ignore_label: 4 top_k: 2 }', x, labels, num_top=2)
    overall, per_class = accuracy_ref(x, labels, 1, 2, ignore=4)
    np.testing.assert_allclose(float(top[0].data), overall, rtol=1e-6)
    np.testing.assert_allclose(top[1].data, per_class, rtol=1e-6)
    assert top[1].data[4] == 0  # an ignored class has no examples


def test_accuracy_all_ignored_is_zero():
    _, _, top = forward('type: "Accuracy" accuracy_param { ignore_label: 1 }', rand(3, 2), np.ones(3))
    assert float(top[0].data) == 0


@pytest.mark.parametrize("axis", [2, -1, 0])
def test_accuracy_axis(axis):
    x = np.round(rand(3, 4, 5), 1)
    shape = list(x.shape)
    del shape[axis]
    labels = labels_for(shape, x.shape[axis])
    _, _, top = forward(f'type: "Accuracy" accuracy_param {{ axis: {axis} top_k: 2 }}', x, labels, num_top=2)
    overall, per_class = accuracy_ref(x, labels, axis % 3, 2)
    np.testing.assert_allclose(float(top[0].data), overall, rtol=1e-6)
    np.testing.assert_allclose(top[1].data, per_class, rtol=1e-6)


def test_accuracy_is_not_a_loss_and_has_no_backward():
    layer, bottom, top = forward('name: "acc" type: "Accuracy"', rand(4, 3), labels_for((4,), 3))
    assert layer.loss(0) == 0
    assert layer.forward(bottom, top) == 0
    layer.backward(top, [False, False], bottom)
    with pytest.raises(KaffeError, match="'acc'.*backward"):
        layer.backward(top, [True, False], bottom)


def test_accuracy_errors():
    with pytest.raises(KaffeError, match=r"'acc'.*top_k \(4\).*3"):
        forward('name: "acc" type: "Accuracy" accuracy_param { top_k: 4 }', rand(2, 3), np.zeros(2))
    with pytest.raises(KaffeError, match=r"'acc'.*number of labels.*got 3"):
        forward('name: "acc" type: "Accuracy"', rand(2, 3), np.zeros(3))
    with pytest.raises(KaffeError, match="'acc'.*label 5"):
        forward('name: "acc" type: "Accuracy"', rand(2, 3), np.array([0, 5]))
    with pytest.raises(KaffeError, match="'acc'.*exactly 2 bottom"):
        forward('name: "acc" type: "Accuracy"', rand(2, 3))
    layer = make_layer('name: "acc" type: "Accuracy"')
    with pytest.raises(KaffeError, match="'acc'.*at most 2 top"):
        layer.setup(blobs_from(rand(2, 3), np.zeros(2)), [Blob(), Blob(), Blob()])
