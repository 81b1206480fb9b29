"""Losses (SigmoidCrossEntropy, Euclidean, MultinomialLogistic, Infogain, Hinge, Contrastive), recurrent layers
(RNN, LSTM, LSTMUnit) and the Python layer: float64 references, gradient checks, Caffe's error conditions."""
import sys
import textwrap

import numpy as np
import pytest
from gradient_check import blobs_from, check_gradient, forward, make_layer, rand, setup_layer

from kaffe.engine.blob import Blob
from kaffe.engine.errors import KaffeError
from kaffe.engine.io import write_binary_proto
from kaffe.proto import caffe_pb2


def backward(layer, bottom, top, weight=1.0, propagate=None):
    top[0].diff[...] = weight
    for b in bottom:
        b.diff[...] = 0
    layer.backward(top, propagate or [True] + [False] * (len(bottom) - 1), bottom)
    return [b.diff.copy() for b in bottom]


def f64(a):
    return np.asarray(a, dtype=np.float32).astype(np.float64)


def norm_of(mode, outer, inner, valid):
    return max(1, {"FULL": outer * inner, "VALID": valid, "BATCH_SIZE": outer, "NONE": 1}[mode])


# -- SigmoidCrossEntropyLoss ---------------------------------------------------------------------------------------
def sigmoid_ce_ref(x, t, ignore, mode):
    x, t = f64(x), f64(t)
    p = 1 / (1 + np.exp(-x))
    valid = np.ones(x.shape, bool) if ignore is None else t.astype(int) != ignore
    losses = t * np.logaddexp(0, -x) + (1 - t) * np.logaddexp(0, x)  # -t log p - (1 - t) log(1 - p)
    n = norm_of(mode, x.shape[0], x[0].size, valid.sum())
    return losses[valid].sum() / n, np.where(valid, p - t, 0) / n


@pytest.mark.parametrize("param, mode", [("", "BATCH_SIZE"), ("normalization: FULL", "FULL"),
                                         ("normalization: VALID", "VALID"), ("normalization: NONE", "NONE"),
                                         ("normalize: true", "VALID"), ("normalize: false", "BATCH_SIZE")])
@pytest.mark.parametrize("ignore", [None, -1])
def test_sigmoid_cross_entropy_values(param, mode, ignore):
    x = rand(3, 2, 5, scale=3)
    x[0, 0, 0] = 40.0  # the stable form must not overflow
    x[0, 0, 1] = -40.0
    t = np.random.default_rng(1).random((3, 2, 5))
    t[1, 1, :3] = -1  # ignored where ignore_label is -1 (targets counted as ints)
    ignore_text = f"ignore_label: {ignore}" if ignore is not None else ""
    layer, bottom, top = forward(f'type: "SigmoidCrossEntropyLoss" loss_param {{ {param} {ignore_text} }}', x, t)
    loss, grad = sigmoid_ce_ref(x, t, ignore, mode)
    assert top[0].data.shape == ()
    np.testing.assert_allclose(top[0].data, loss, rtol=1e-5)
    diffs = backward(layer, bottom, top, weight=2.0)
    np.testing.assert_allclose(diffs[0], 2 * grad, rtol=1e-5, atol=1e-7)


def test_sigmoid_cross_entropy_gradient_and_errors():
    layer, bottom, top = forward('type: "SigmoidCrossEntropyLoss" loss_param { ignore_label: 3 }',
                                 rand(2, 3, 3), np.where(rand(2, 3, 3, seed=2) > 1, 3, rand(2, 3, 3, seed=3) > 0))
    check_gradient(layer, bottom, top, check_bottom=[0])
    with pytest.raises(KaffeError, match="cannot backpropagate to label"):
        layer.backward(top, [True, True], bottom)
    with pytest.raises(KaffeError, match="same count"):
        forward('type: "SigmoidCrossEntropyLoss"', rand(2, 3), rand(2, 4))


def test_sigmoid_cross_entropy_targets_of_another_shape_with_the_same_count():
    """Caffe checks only the counts: (2, 3, 2) predictions take (2, 6) targets, value by value."""
    x, t = rand(2, 3, 2, scale=3), np.random.default_rng(4).random((2, 6))
    layer, bottom, top = forward('type: "SigmoidCrossEntropyLoss"', x, t)
    loss, grad = sigmoid_ce_ref(x, t.reshape(x.shape), None, "BATCH_SIZE")
    np.testing.assert_allclose(top[0].data, loss, rtol=1e-5)
    np.testing.assert_allclose(backward(layer, bottom, top)[0], grad, rtol=1e-5, atol=1e-7)


# -- EuclideanLoss --------------------------------------------------------------------------------------------------
def test_euclidean_values_gradient_both_bottoms():
    a, b = rand(3, 2, 5), rand(3, 10, seed=1)
    layer, bottom, top = forward('type: "EuclideanLoss"', a, b)
    diff = f64(a).reshape(3, -1) - f64(b)
    np.testing.assert_allclose(top[0].data, (diff ** 2).sum() / 3 / 2, rtol=1e-6)
    da, db = backward(layer, bottom, top, weight=0.5, propagate=[True, True])
    np.testing.assert_allclose(da, 0.5 * diff.reshape(a.shape) / 3, rtol=1e-5)
    np.testing.assert_allclose(db, -0.5 * diff / 3, rtol=1e-5)
    assert layer.allow_force_backward(1)
    check_gradient(layer, bottom, top)
    with pytest.raises(KaffeError, match="same dimension"):
        forward('type: "EuclideanLoss"', rand(3, 4), rand(3, 5))


# -- MultinomialLogisticLoss ----------------------------------------------------------------------------------------
def test_multinomial_logistic_values_threshold_gradient():
    probs = np.random.default_rng(0).random((4, 5)) + 0.05
    probs /= probs.sum(axis=1, keepdims=True)
    probs[3, 1] = 0.0  # clamped to 1e-20 before the log
    labels = np.array([0, 2, 4, 1], float).reshape(4, 1, 1, 1)
    layer, bottom, top = forward('type: "MultinomialLogisticLoss"', probs, labels)
    picked = np.maximum(f64(probs)[np.arange(4), [0, 2, 4, 1]], 1e-20)
    np.testing.assert_allclose(top[0].data, -np.log(picked).sum() / 4, rtol=1e-5)
    (d,) = backward(layer, bottom, top, weight=1.0)[:1]
    expect = np.zeros((4, 5))
    expect[np.arange(3), [0, 2, 4]] = -1 / 4 / picked[:3]
    np.testing.assert_allclose(d[:3], expect[:3], rtol=1e-5)
    assert d[3, 1] == pytest.approx(np.float32(-0.25) / np.float32(1e-20), rel=1e-5)
    probs[3, 1] = 0.3
    layer, bottom, top = forward('type: "MultinomialLogisticLoss"', probs, labels)
    check_gradient(layer, bottom, top, check_bottom=[0], step=1e-3)
    with pytest.raises(KaffeError, match="outside"):
        forward('type: "MultinomialLogisticLoss"', probs, [0, 2, 5, 1])
    with pytest.raises(KaffeError, match="one value per sample"):
        forward('type: "MultinomialLogisticLoss"', probs, np.zeros((4, 2)))


# -- InfogainLoss ---------------------------------------------------------------------------------------------------
def infogain_ref(x, labels, h, axis, ignore, mode):
    x = np.moveaxis(f64(x), axis, -1)
    rows = x.reshape(-1, x.shape[-1])
    labels = labels.reshape(-1).astype(int)
    h = f64(h).reshape(rows.shape[1], rows.shape[1])
    loss, count = 0.0, 0
    grad = np.zeros_like(rows)
    for r, (row, label) in enumerate(zip(rows, labels)):
        if label == ignore:
            continue
        p = np.exp(row - row.max())
        p /= p.sum()
        loss -= (h[label] * np.log(np.maximum(p, 1e-20))).sum()
        grad[r] = p * h[label].sum() - h[label]
        count += 1
    outer = int(np.prod(x.shape[:axis]))
    n = norm_of(mode, outer, labels.size // outer, count)
    return loss / n, np.moveaxis(grad.reshape(x.shape), -1, axis) / n


@pytest.mark.parametrize("mode", ["VALID", "FULL", "BATCH_SIZE", "NONE"])
def test_infogain_bottom_matrix_axis_ignore(mode):
    x, h = rand(2, 3, 4, seed=4), np.random.default_rng(5).random((4, 4))
    labels = np.random.default_rng(6).integers(0, 4, (2, 3)).astype(float)
    labels[1, 2] = 7  # ignored
    text = (f'type: "InfogainLoss" infogain_loss_param {{ axis: -1 }} '
            f'loss_param {{ ignore_label: 7 normalization: {mode} }}')
    layer, bottom, top = forward(text, x, labels, h, num_top=2)
    loss, grad = infogain_ref(x, labels, h, 2, 7, mode)
    np.testing.assert_allclose(top[0].data, loss, rtol=1e-5)
    e = np.exp(x - x.max(axis=2, keepdims=True))
    np.testing.assert_allclose(top[1].data, e / e.sum(axis=2, keepdims=True), rtol=1e-5)
    d = backward(layer, bottom, top, weight=1.5)[0]
    np.testing.assert_allclose(d, 1.5 * grad, rtol=1e-4, atol=1e-6)
    check_gradient(layer, bottom, top[:1], check_bottom=[0])  # the probabilities top has no backward
    with pytest.raises(KaffeError, match="infogain matrix input"):
        layer.backward(top, [True, False, True], bottom)


def test_infogain_matrix_from_binaryproto(tmp_path):
    h = np.random.default_rng(7).random((3, 3))
    blob = Blob(1, 1, 3, 3)
    blob.data[...] = h.reshape(1, 1, 3, 3)
    path = tmp_path / "H.binaryproto"
    write_binary_proto(blob.to_proto(), str(path))
    x, labels = rand(4, 3, seed=8), np.array([0, 1, 2, 1.0])
    layer, bottom, top = forward(f'type: "InfogainLoss" infogain_loss_param {{ source: "{path}" }}', x, labels)
    loss, _ = infogain_ref(x, labels, h, 1, None, "VALID")
    np.testing.assert_allclose(top[0].data, loss, rtol=1e-5)
    check_gradient(layer, bottom, top, check_bottom=[0])
    with pytest.raises(KaffeError, match="source"):
        forward('type: "InfogainLoss"', x, labels)
    with pytest.raises(KaffeError, match="3 x 3"):
        forward('type: "InfogainLoss"', x, labels, np.ones((2, 2)))
    with pytest.raises(KaffeError, match="normalize is deprecated"):
        forward('type: "InfogainLoss" loss_param { normalize: true }', x, labels, h)


# -- HingeLoss ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm", ["L1", "L2"])
def test_hinge_values_and_gradient(norm):
    x, labels = rand(5, 4, seed=9, scale=1.5), np.array([0, 3, 1, 1, 2.0])
    layer, bottom, top = forward(f'type: "HingeLoss" hinge_loss_param {{ norm: {norm} }}', x, labels)
    loss, grad = 0.0, np.zeros((5, 4))
    for i in range(5):
        for j in range(4):
            s = -1.0 if j == labels[i] else 1.0
            m = max(0.0, 1 + s * f64(x)[i, j])
            loss += m if norm == "L1" else m * m
            grad[i, j] = (s * (m > 0) if norm == "L1" else 2 * s * m) / 5
    np.testing.assert_allclose(top[0].data, loss / 5, rtol=1e-5)
    np.testing.assert_allclose(backward(layer, bottom, top, weight=3.0)[0], 3 * grad, rtol=1e-5, atol=1e-7)
    # L1 has kinks where a margin is 0: keep the checked values away from x = +-1
    check_gradient(layer, bottom, top, check_bottom=[0], kink=1.0, kink_range=0.02)


# -- ContrastiveLoss ------------------------------------------------------------------------------------------------
def contrastive_ref(a, b, y, margin, legacy):
    a, b = f64(a).reshape(len(y), -1), f64(b).reshape(len(y), -1)
    loss, ga = 0.0, np.zeros_like(a)
    for i in range(len(y)):
        d = a[i] - b[i]
        d2 = d @ d
        if int(y[i]):
            loss += d2
            ga[i] = d
        elif legacy:
            loss += max(margin - d2, 0)
            ga[i] = -d if margin - d2 > 0 else 0
        else:
            dist = np.sqrt(d2)
            loss += max(margin - dist, 0) ** 2
            ga[i] = -(margin - dist) / (dist + 1e-4) * d if margin - dist > 0 else 0
    n = len(y)
    return loss / n / 2, ga / n


@pytest.mark.parametrize("params, margin, legacy", [("", 1.0, False), ("margin: 2.5", 2.5, False),
                                                     ("legacy_version: true", 1.0, True),
                                                     ("margin: 0.6 legacy_version: true", 0.6, True)])
def test_contrastive_values_and_gradients(params, margin, legacy):
    a, b = rand(6, 3, 1, 1, seed=10, scale=0.5), rand(6, 3, 1, 1, seed=11, scale=0.5)
    y = np.array([1, 0, 0.5, 1, 0, 0])  # 0.5 counts as 0 (dissimilar), as Caffe's static_cast<int>
    layer, bottom, top = forward(f'type: "ContrastiveLoss" contrastive_loss_param {{ {params} }}', a, b, y)
    loss, ga = contrastive_ref(a, b, y, margin, legacy)
    np.testing.assert_allclose(top[0].data, loss, rtol=1e-5)
    da, db, _ = backward(layer, bottom, top, weight=2.0, propagate=[True, True, False])
    np.testing.assert_allclose(da.reshape(6, 3), 2 * ga, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(db.reshape(6, 3), -2 * ga, rtol=1e-4, atol=1e-6)
    assert not layer.allow_force_backward(2) and layer.allow_force_backward(1)
    check_gradient(layer, bottom, top, check_bottom=[0, 1], step=1e-3)


def test_contrastive_shape_errors():
    with pytest.raises(KaffeError, match="same C"):
        forward('type: "ContrastiveLoss"', rand(2, 3), rand(2, 4), [1, 0])
    with pytest.raises(KaffeError, match="one value"):
        forward('type: "ContrastiveLoss"', rand(2, 3), rand(2, 3), np.ones((2, 2)))


# -- recurrent layers: float64 step-by-step references -------------------------------------------------------------
FILLERS = 'weight_filler { type: "uniform" min: -0.6 max: 0.6 } bias_filler { type: "uniform" min: -0.5 max: 0.5 }'


def sig(v):
    return 1 / (1 + np.exp(-v))


def lstm_ref(params, x, cont, static, h, c):
    params = [f64(p) for p in params]
    w_x, b = params[0], params[1]
    w_s = params[2] if static is not None else None
    w_h = params[-1]
    hidden = w_h.shape[1]
    T, N = cont.shape
    x = f64(x).reshape(T, N, -1)
    outs = []
    for t in range(T):
        for n in range(N):
            g = w_x @ x[t, n] + b + w_h @ (cont[t, n] * h[n])
            if static is not None:
                g = g + w_s @ f64(static).reshape(N, -1)[n]
            i, f, o = (sig(g[k * hidden:(k + 1) * hidden]) for k in range(3))
            gg = np.tanh(g[3 * hidden:])
            c[n] = cont[t, n] * f * c[n] + i * gg
            h[n] = o * np.tanh(c[n])
        outs.append(h.copy())
    return np.stack(outs), h, c


def rnn_ref(params, x, cont, static, h):
    params = [f64(p) for p in params]
    w_x, b = params[0], params[1]
    w_s = params[2] if static is not None else None
    w_hh, w_ho, b_o = params[-3:]
    T, N = cont.shape
    x = f64(x).reshape(T, N, -1)
    outs = []
    for t in range(T):
        o_t = np.zeros_like(h)
        for n in range(N):
            a = w_x @ x[t, n] + b + w_hh @ (cont[t, n] * h[n])
            if static is not None:
                a = a + w_s @ f64(static).reshape(N, -1)[n]
            h[n] = np.tanh(a)
            o_t[n] = np.tanh(w_ho @ h[n] + b_o)
        outs.append(o_t)
    return np.stack(outs), h


def sequences(T=4, N=3, shape=(2, 3), seed=12):
    x = rand(T, N, *shape, seed=seed)
    cont = np.ones((T, N))
    cont[0] = 0
    cont[2, 1] = 0  # stream 1 starts a new sequence at t = 2
    return x, cont


@pytest.mark.parametrize("static", [False, True])
def test_lstm_parameters_values_and_state_carry(static):
    x, cont = sequences()
    arrays = [x, cont] + ([rand(3, 5, seed=13)] if static else [])
    layer, bottom, top = forward(f'type: "LSTM" recurrent_param {{ num_output: 4 {FILLERS} }}', *arrays)
    shapes = [(16, 6), (16,)] + ([(16, 5)] if static else []) + [(16, 4)]
    assert [b.shape for b in layer.blobs] == shapes
    assert top[0].shape == (4, 3, 4)
    st = arrays[2] if static else None
    ref, h, c = lstm_ref([b.data for b in layer.blobs], x, cont, st, np.zeros((3, 4)), np.zeros((3, 4)))
    np.testing.assert_allclose(top[0].data, ref, rtol=1e-4, atol=1e-6)
    # cont is 0 at t = 0: the state carried between the checker's forwards does not count
    check_gradient(layer, bottom, top, check_bottom=[0, 2] if static else [0])
    layer.forward(bottom, top)
    # the next batch continues from the last state where cont is 1 at t = 0
    x2 = rand(4, 3, 2, 3, seed=14)
    cont2 = np.ones((4, 3))
    cont2[0, 2] = 0
    bottom[0].data[...] = x2
    bottom[1].data[...] = cont2
    layer.forward(bottom, top)
    ref2, _, _ = lstm_ref([b.data for b in layer.blobs], x2, cont2, st, h, c)
    np.testing.assert_allclose(top[0].data, ref2, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("static", [False, True])
def test_rnn_parameters_values_and_gradient(static):
    x, cont = sequences(T=3, N=2, shape=(3,))
    arrays = [x, cont] + ([rand(2, 2, 2, seed=15)] if static else [])
    layer, bottom, top = forward(f'type: "RNN" recurrent_param {{ num_output: 3 {FILLERS} }}', *arrays)
    shapes = [(3, 3), (3,)] + ([(3, 4)] if static else []) + [(3, 3), (3, 3), (3,)]
    assert [b.shape for b in layer.blobs] == shapes
    ref, _ = rnn_ref([b.data for b in layer.blobs], x, cont, arrays[2] if static else None, np.zeros((2, 3)))
    np.testing.assert_allclose(top[0].data, ref, rtol=1e-4, atol=1e-6)
    check_gradient(layer, bottom, top, check_bottom=[0, 2] if static else [0])


def test_expose_hidden_takes_and_gives_the_state():
    x, cont = sequences(T=3, N=2, shape=(2,))
    cont[0] = 1  # the given initial state counts
    h0, c0 = rand(1, 2, 3, seed=16), rand(1, 2, 3, seed=17)
    layer, bottom, top = forward(f'type: "LSTM" recurrent_param {{ num_output: 3 expose_hidden: true {FILLERS} }}',
                                 x, cont, h0, c0, num_top=3)
    ref, h, c = lstm_ref([b.data for b in layer.blobs], x, cont, None, f64(h0[0]), f64(c0[0]))
    np.testing.assert_allclose(top[0].data, ref, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(top[1].data[0], h, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(top[2].data[0], c, rtol=1e-4, atol=1e-6)
    # Caffe: gradients flow from the output top only (the final-state tops share data, not diffs)
    check_gradient(layer, bottom, top[:1], check_bottom=[0])
    rnn, bottom, top = forward(f'type: "RNN" recurrent_param {{ num_output: 3 expose_hidden: true {FILLERS} }}',
                               x, cont, h0, num_top=2)
    ref, h = rnn_ref([b.data for b in rnn.blobs], x, cont, None, f64(h0[0]))
    np.testing.assert_allclose(top[0].data, ref, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(top[1].data[0], h, rtol=1e-4, atol=1e-6)
    with pytest.raises(KaffeError, match="takes exactly 3 top"):
        forward(f'type: "LSTM" recurrent_param {{ num_output: 3 expose_hidden: true }}', x, cont, h0, c0, num_top=1)
    with pytest.raises(KaffeError, match="initial state h_0"):
        forward(f'type: "LSTM" recurrent_param {{ num_output: 3 expose_hidden: true }}', x, cont,
                rand(1, 2, 4), c0, num_top=3)


def test_recurrent_errors():
    x, cont = sequences(T=3, N=2, shape=(2,))
    layer, bottom, top = forward('type: "RNN" recurrent_param { num_output: 2 }', x, cont)
    with pytest.raises(KaffeError, match="sequence indicators"):
        layer.backward(top, [True, True], bottom)
    assert not layer.allow_force_backward(1)
    with pytest.raises(KaffeError, match="timesteps changed"):
        layer.forward(blobs_from(rand(4, 2, 2), np.ones((4, 2))), top)
    with pytest.raises(KaffeError, match="continuation"):
        forward('type: "LSTM" recurrent_param { num_output: 2 }', x, np.ones((3, 3)))
    with pytest.raises(KaffeError, match="num_output"):
        forward('type: "LSTM"', x, cont)


def test_lstm_unit_values_and_gradient():
    c_prev, gates = rand(1, 3, 4, seed=18), rand(1, 3, 16, seed=19, scale=2)
    cont = np.array([[1, 0, 1.0]])
    layer, bottom, top = forward('type: "LSTMUnit"', c_prev, gates, cont, num_top=2)
    g = f64(gates[0])
    i, f, o, gg = sig(g[:, :4]), sig(g[:, 4:8]), sig(g[:, 8:12]), np.tanh(g[:, 12:])
    c = cont[0][:, None] * f * f64(c_prev[0]) + i * gg
    np.testing.assert_allclose(top[0].data[0], c, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(top[1].data[0], o * np.tanh(c), rtol=1e-5, atol=1e-6)
    check_gradient(layer, bottom, top, check_bottom=[0, 1])
    with pytest.raises(KaffeError, match="sequence indicators"):
        layer.backward(top, [True, True, True], bottom)
    with pytest.raises(KaffeError, match="1 x N x 4H"):
        forward('type: "LSTMUnit"', c_prev, rand(1, 3, 15), cont, num_top=2)


# -- Python layer ---------------------------------------------------------------------------------------------------
USER_MODULE = '''
import numpy as np
import kaffe as caffe


class ScaledSum(caffe.Layer):
    """top = w * sum(bottoms) + param_str's offset, with one learned blob w (1,)."""

    def setup(self, bottom, top):
        self.offset = float(self.param_str or 0)
        self.blobs.add_blob(1)
        self.blobs[0].data[...] = 2.0
        self.seen_phase = self.phase

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        top[0].data[...] = self.blobs[0].data[0] * sum(b.data for b in bottom) + self.offset

    def backward(self, top, propagate_down, bottom):
        self.blobs[0].diff[...] += (top[0].diff * sum(b.data for b in bottom)).sum()
        for go, b in zip(propagate_down, bottom):
            if go:
                b.diff[...] = self.blobs[0].data[0] * top[0].diff


class EuclideanLoss(caffe.Layer):
    """pycaffe's example loss layer."""

    def setup(self, bottom, top):
        if len(bottom) != 2:
            raise Exception("Need two inputs to compute distance.")

    def reshape(self, bottom, top):
        self.diff = np.zeros_like(bottom[0].data, dtype=np.float32)
        top[0].reshape(1)

    def forward(self, bottom, top):
        self.diff[...] = bottom[0].data - bottom[1].data
        top[0].data[...] = np.sum(self.diff ** 2) / bottom[0].num / 2.

    def backward(self, top, propagate_down, bottom):
        for i in range(2):
            if propagate_down[i]:
                sign = 1 if i == 0 else -1
                bottom[i].diff[...] = sign * self.diff / bottom[i].num


class Broken(caffe.Layer):
    def setup(self, bottom, top):
        pass

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        raise ValueError("the user's message")


class NotALayer:
    pass
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "user_layers_4c.py").write_text(USER_MODULE)
    (tmp_path / "user_layers_4c_bad.py").write_text("import no_such_module_4c\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "user_layers_4c"
    for name in ("user_layers_4c", "user_layers_4c_bad"):
        sys.modules.pop(name, None)


def python_layer(layer_class, param_str="", phase=caffe_pb2.TRAIN, module="user_layers_4c"):
    return make_layer(f'type: "Python" name: "py" python_param {{ module: "{module}" layer: "{layer_class}" '
                      f'param_str: "{param_str}" }}', phase)


def test_python_layer_setup_forward_backward_and_blobs(user_module):
    layer = python_layer("ScaledSum", param_str="0.5", phase=caffe_pb2.TEST)
    a, b = rand(2, 3), rand(2, 3, seed=1)
    bottom = blobs_from(a, b)
    top = setup_layer(layer, bottom)
    assert layer.user.seen_phase == caffe_pb2.TEST and layer.user.param_str == "0.5"
    assert [blob.shape for blob in layer.blobs] == [(1,)] and layer.user.blobs is layer.blobs
    assert layer.param_propagate_down == [True]
    layer.forward(bottom, top)
    np.testing.assert_allclose(top[0].data, 2 * (f64(a) + f64(b)) + 0.5, rtol=1e-6)
    check_gradient(layer, bottom, top)


def test_python_loss_layer_in_a_net(user_module, tmp_path):
    from kaffe.engine.net import Net
    net_text = textwrap.dedent('''
        force_backward: true
        layer { name: "in" type: "Input" top: "a" top: "b" input_param { shape { dim: 4 dim: 3 } } }
        layer { name: "loss" type: "Python" bottom: "a" bottom: "b" top: "loss" loss_weight: 1
                python_param { module: "user_layers_4c" layer: "EuclideanLoss" } }
    ''')
    path = tmp_path / "net.prototxt"
    path.write_text(net_text)
    net = Net(str(path), caffe_pb2.TRAIN)
    a, b = rand(4, 3), rand(4, 3, seed=2)
    net.blobs["a"].data[...] = a
    net.blobs["b"].data[...] = b
    out = net.forward()
    assert out["loss"].item() == pytest.approx(((f64(a) - f64(b)) ** 2).sum() / 8, rel=1e-5)
    net.backward()
    np.testing.assert_allclose(net.blobs["a"].diff, (f64(a) - f64(b)) / 4, rtol=1e-5)


def test_python_layer_errors_name_the_layer(user_module):
    layer = python_layer("Broken")
    bottom = blobs_from(rand(2, 2))
    top = setup_layer(layer, bottom)
    with pytest.raises(KaffeError) as error:
        layer.forward(bottom, top)
    message = str(error.value)
    assert "'py'" in message and "user_layers_4c.Broken" in message and "ValueError: the user's message" in message
    assert "user_layers_4c.py" in message and error.value.__cause__ is None and error.value.__suppress_context__
    assert isinstance(error.value, ValueError)   # the user's class too, as pycaffe passes the exception on
    with pytest.raises(KaffeError, match="has no class 'Missing'"):
        python_layer("Missing")
    with pytest.raises(KaffeError, match="cannot import module 'no_such_module_4c_top'"):
        python_layer("X", module="no_such_module_4c_top")
    with pytest.raises(KaffeError, match="cannot import module 'user_layers_4c_bad'.*no_such_module_4c"):
        python_layer("X", module="user_layers_4c_bad")
    with pytest.raises(KaffeError, match="deriving from kaffe.Layer"):
        python_layer("NotALayer")
    with pytest.raises(KaffeError, match="Python layer 'py'.*Need two inputs"):
        setup_layer(python_layer("EuclideanLoss"), blobs_from(rand(2, 2)))
