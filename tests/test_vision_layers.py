"""Convolution, Pooling, LRN and InnerProduct: float64 loop references, gradient checks, Caffe's shapes and errors."""
import itertools

import numpy as np
import pytest
from gradient_check import blobs_from, check_gradient, distinct, forward as run, make_layer, rand32 as rand, \
    setup_layer

from kaffe.engine import device
from kaffe.engine.blob import Blob
from kaffe.engine.errors import KaffeError
from kaffe.layers.vision import col2im, im2col
from kaffe.proto import caffe_pb2

FLT_MAX = float(np.finfo(np.float32).max)


@pytest.fixture(autouse=True)
def seeded():
    device.set_random_seed(1234)


# -- references ------------------------------------------------------------------------------------
def conv_ref(x, w, b, stride, pad, dilation, group):
    x = x.astype(np.float64)
    w = w.astype(np.float64)
    num, channels, *spatial = x.shape
    outputs, _, *kernel = w.shape
    out = [(n + 2 * p - (d * (k - 1) + 1)) // s + 1 for n, k, s, p, d in zip(spatial, kernel, stride, pad, dilation)]
    cg, og = channels // group, outputs // group
    y = np.zeros((num, outputs, *out))
    for o in range(outputs):
        g = o // og
        for pos in itertools.product(*map(range, out)):
            acc = np.zeros(num) if b is None else np.full(num, float(b[o]))
            for c in range(cg):
                for tap in itertools.product(*map(range, kernel)):
                    idx = [q * s - p + t * d for q, t, s, p, d in zip(pos, tap, stride, pad, dilation)]
                    if all(0 <= i < n for i, n in zip(idx, spatial)):
                        acc += x[(slice(None), g * cg + c, *idx)] * w[(o, c, *tap)]
            y[(slice(None), o, *pos)] = acc
    return y


def pool_ref(x, method, kernel, stride, pad, out):
    """Caffe's CPU pooling loops, vectorised only over (num, channels)."""
    x = x.astype(np.float64)
    height, width = x.shape[2:]
    y = np.zeros(x.shape[:2] + tuple(out))
    mask = np.full(y.shape, -1.0)
    for ph, pw in itertools.product(range(out[0]), range(out[1])):
        hs, ws = ph * stride[0] - pad[0], pw * stride[1] - pad[1]
        if method == "MAX":
            best = np.full(x.shape[:2], -FLT_MAX)
            idx = np.full(x.shape[:2], -1.0)
            for h in range(max(hs, 0), min(hs + kernel[0], height)):
                for w in range(max(ws, 0), min(ws + kernel[1], width)):
                    better = x[:, :, h, w] > best
                    best = np.where(better, x[:, :, h, w], best)
                    idx = np.where(better, h * width + w, idx)
            y[:, :, ph, pw], mask[:, :, ph, pw] = best, idx
        else:
            he, we = min(hs + kernel[0], height + pad[0]), min(ws + kernel[1], width + pad[1])
            size = (he - hs) * (we - ws)
            total = x[:, :, max(hs, 0):min(he, height), max(ws, 0):min(we, width)].sum(axis=(2, 3))
            y[:, :, ph, pw] = total / size
    return y, mask


def lrn_ref(x, size, alpha, beta, k, within):
    x = x.astype(np.float64)
    half = (size - 1) // 2
    if within:
        n, c, h, w = x.shape
        pooled, _ = pool_ref(x * x, "AVE", (size, size), (1, 1), (half, half), (h, w))
        return x * (1 + alpha * pooled) ** -beta
    scale = np.full(x.shape, k)
    for c in range(x.shape[1]):
        for j in range(max(0, c - half), min(x.shape[1], c + half + 1)):
            scale[:, c] += alpha / size * x[:, j] ** 2
    return x * scale ** -beta


# -- im2col / col2im -----------------------------------------------------------------------------
@pytest.mark.parametrize("spatial,kernel,stride,pad,dilation", [
    ((7, 6), (3, 2), (2, 1), (1, 2), (1, 2)),
    ((9,), (4,), (3,), (2,), (1,)),
    ((4, 5, 3), (2, 3, 2), (1, 2, 1), (1, 0, 1), (2, 1, 1)),
])
@pytest.mark.parametrize("batch_last", [True, False])
def test_col2im_is_the_adjoint_of_im2col(spatial, kernel, stride, pad, dilation, batch_last):
    x = rand(2, 3, *spatial)
    col = im2col(x, kernel, stride, pad, dilation, batch_last)
    c = rand(*col.shape, seed=1)
    back = col2im(c, x.shape, kernel, stride, pad, dilation, batch_last=batch_last)
    assert np.isclose(np.vdot(col.astype(np.float64), c), np.vdot(x.astype(np.float64), back), rtol=1e-5)


# -- Convolution -----------------------------------------------------------------------------------
def conv_text(num_output, geometry, group=1, bias=True, extra=""):
    return (f'type: "Convolution" convolution_param {{ num_output: {num_output} group: {group} '
            f'bias_term: {"true" if bias else "false"} {geometry} {extra} '
            f'weight_filler {{ type: "gaussian" std: 0.5 }} bias_filler {{ type: "gaussian" std: 0.5 }} }}')


CONV_CASES = [
    # (input shape, num_output, geometry text, group, stride, pad, dilation)
    ((2, 4, 7, 6), 6, "kernel_size: 3 stride: 2 pad: 1", 2, (2, 2), (1, 1), (1, 1)),
    ((2, 3, 7, 8), 4, "kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 3 pad_h: 2 pad_w: 1", 1, (2, 3), (2, 1), (1, 1)),
    ((1, 6, 9, 7), 3, "kernel_size: 3 dilation: 2 pad: 1", 3, (1, 1), (1, 1), (2, 2)),
    ((2, 2, 5, 6), 4, "kernel_size: 1", 1, (1, 1), (0, 0), (1, 1)),
    ((2, 4, 3, 5), 6, "kernel_size: 1", 2, (1, 1), (0, 0), (1, 1)),           # pointwise with groups
    ((2, 4, 6, 5), 4, "kernel_size: 3 pad: 1", 4, (1, 1), (1, 1), (1, 1)),    # depthwise (MobileNet)
    ((2, 3, 7, 8), 3, "kernel_size: 3 stride: 2 pad: 1 dilation: 2", 3, (2, 2), (1, 1), (2, 2)),
    ((2, 3, 9), 3, "kernel_size: 4 stride: 2 pad: 2", 3, (2,), (2,), (1,)),   # depthwise 1-D, overhang
    ((2, 3, 9), 4, "kernel_size: 3 stride: 2 pad: 1", 1, (2,), (1,), (1,)),
    ((2, 4, 4, 5, 3), 4, "kernel_size: 2 kernel_size: 3 kernel_size: 2 stride: 1 stride: 2 stride: 1 "
                         "pad: 1 pad: 0 pad: 1 dilation: 2 dilation: 1 dilation: 1",
     2, (1, 2, 1), (1, 0, 1), (2, 1, 1)),
]


@pytest.mark.parametrize("shape,num_output,geometry,group,stride,pad,dilation", CONV_CASES)
def test_convolution_forward_matches_reference(shape, num_output, geometry, group, stride, pad, dilation):
    layer, bottom, top = run(conv_text(num_output, geometry, group), rand(*shape))
    w, b = layer.blobs[0].data, layer.blobs[1].data
    assert layer.blobs[0].shape[:2] == (num_output, shape[1] // group)
    expected = conv_ref(bottom[0].data, w, b, stride, pad, dilation, group)
    assert top[0].shape == expected.shape
    np.testing.assert_allclose(top[0].data, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape,num_output,geometry,group,stride,pad,dilation", CONV_CASES)
def test_convolution_gradient(shape, num_output, geometry, group, stride, pad, dilation):
    small = (1,) + shape[1:] if len(shape) == 5 else shape  # keep the 3-D case quick
    layer = make_layer(conv_text(num_output, geometry, group))
    bottom = blobs_from(rand(*small))
    top = setup_layer(layer, bottom)
    check_gradient(layer, bottom, top)


def test_convolution_output_size_formula():
    layer, _, top = run('type: "Convolution" convolution_param { num_output: 2 kernel_size: 5 stride: 3 pad: 2 '
                        'dilation: 2 }', rand(1, 1, 17, 12))
    # floor((in + 2p - (d(k-1)+1)) / s) + 1
    assert top[0].shape == (1, 2, (17 + 4 - 9) // 3 + 1, (12 + 4 - 9) // 3 + 1)
    assert np.all(top[0].data == 0)  # default fillers are constant 0


def test_convolution_without_bias_has_one_blob():
    layer, bottom, top = run(conv_text(3, "kernel_size: 2", bias=False), rand(2, 2, 4, 5))
    assert len(layer.blobs) == 1
    np.testing.assert_allclose(top[0].data, conv_ref(bottom[0].data, layer.blobs[0].data, None, (1, 1), (0, 0),
                                                     (1, 1), 1), rtol=1e-4, atol=1e-4)
    check_gradient(layer, bottom, top)


def test_convolution_channel_axis():
    x = rand(2, 3, 4, 6, 5)  # axis 2: batch (2, 3), channels 4, spatial (6, 5)
    layer, bottom, top = run(conv_text(2, "kernel_size: 3 pad: 1 stride: 2", extra="axis: 2"), x)
    assert top[0].shape == (2, 3, 2, 3, 3)
    expected = conv_ref(x.reshape(6, 4, 6, 5), layer.blobs[0].data, layer.blobs[1].data, (2, 2), (1, 1), (1, 1), 1)
    np.testing.assert_allclose(top[0].data.reshape(expected.shape), expected, rtol=1e-4, atol=1e-4)


def test_convolution_several_bottoms_share_weights():
    layer = make_layer(conv_text(4, "kernel_size: 3 stride: 2 pad: 1", group=2))
    bottom = blobs_from(rand(2, 2, 5, 6, seed=1), rand(2, 2, 5, 6, seed=2))
    top = setup_layer(layer, bottom, num_top=2)
    layer.forward(bottom, top)
    for b, t in zip(bottom, top):
        expected = conv_ref(b.data, layer.blobs[0].data, layer.blobs[1].data, (2, 2), (1, 1), (1, 1), 2)
        np.testing.assert_allclose(t.data, expected, rtol=1e-4, atol=1e-4)
    check_gradient(layer, bottom, top)


def test_convolution_reshapes_when_the_bottom_changes():
    layer = make_layer(conv_text(3, "kernel_size: 3 pad: 1 stride: 2"))
    bottom = blobs_from(rand(2, 2, 5, 5))
    top = setup_layer(layer, bottom)
    layer.forward(bottom, top)
    bottom[0].reshape(3, 2, 8, 6)
    bottom[0].data[...] = rand(3, 2, 8, 6, seed=5)
    layer.forward(bottom, top)
    expected = conv_ref(bottom[0].data, layer.blobs[0].data, layer.blobs[1].data, (2, 2), (1, 1), (1, 1), 1)
    assert top[0].shape == (3, 3, 4, 3)
    np.testing.assert_allclose(top[0].data, expected, rtol=1e-4, atol=1e-4)


SHIFTED_TAPS_CASES = [
    # (input shape, num_output, geometry): "same" windows (one pad between rows and samples) and others (two)
    ((1, 96, 9, 11), 40, "kernel_size: 3 pad: 1"),
    ((3, 64, 10, 7), 100, "kernel_size: 5 pad: 2"),
    ((2, 96, 8, 9), 20, "kernel_h: 3 kernel_w: 1 pad_h: 1 pad_w: 0"),
    ((2, 96, 12, 10), 30, "kernel_size: 3 pad: 2 dilation: 2"),
    ((2, 96, 11, 10), 30, "kernel_size: 3 pad: 0"),
    ((2, 96, 9, 9), 30, "kernel_h: 2 kernel_w: 3 pad_h: 2 pad_w: 1"),  # windows overhanging the pads
    ((1, 128, 5, 5), 16, "kernel_size: 3 pad: 1"),  # a small map of one sample
    ((4, 64, 46, 46), 160, "kernel_size: 3 pad: 1"),  # 64 channels, more than twice the outputs: large columns
]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape,num_output,geometry", SHIFTED_TAPS_CASES)
def test_shifted_taps_forward_matches_im2col(shape, num_output, geometry, bias):
    """The optimiser's forward (one GEMM per kernel tap over the shifted padded input) gives im2col's values."""
    layer = make_layer(conv_text(num_output, geometry, bias=bias), phase=caffe_pb2.TEST)
    bottom = blobs_from(rand(*shape), rand(*shape, seed=3))
    top = setup_layer(layer, bottom, num_top=2)
    layer.forward(bottom, top)
    expected = [t.data.copy() for t in top]
    layer.shifted_taps = True
    assert layer._runs_shifted_taps()
    for t in top:
        t.data[...] = np.nan
    layer.forward(bottom, top)
    for t, e in zip(top, expected):
        np.testing.assert_allclose(t.data, e, rtol=1e-4, atol=1e-4)


def test_shifted_taps_follow_new_weights_and_shapes():
    """Changed weights are re-laid out per tap; a smaller input after a larger one (whose values remain in the
    shared work buffers) gets zeros in its pads."""
    layer = make_layer(conv_text(8, "kernel_size: 3 pad: 1"), phase=caffe_pb2.TEST)
    reference = make_layer(conv_text(8, "kernel_size: 3 pad: 1"), phase=caffe_pb2.TEST)
    layer.shifted_taps = True
    for step, shape in enumerate([(2, 96, 10, 12), (1, 96, 6, 5), (3, 96, 9, 9)]):
        bottom = blobs_from(rand(*shape, seed=step) + 5)
        top, expected = setup_layer(layer, bottom), setup_layer(reference, bottom)
        layer.blobs[0].data[...] = rand(*layer.blobs[0].shape, seed=10 + step)
        reference.blobs[0].data[...] = layer.blobs[0].data
        reference.blobs[1].data[...] = layer.blobs[1].data
        layer.forward(bottom, top)
        reference.forward(bottom, expected)
        assert layer._runs_shifted_taps()
        np.testing.assert_allclose(top[0].data, expected[0].data, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape,num_output,geometry", [
    ((1, 48, 9, 9), 48, "kernel_size: 3 pad: 1"),     # too few channels for a GEMM per tap
    ((1, 64, 9, 9), 256, "kernel_size: 3 pad: 1"),    # 64 channels, but outputs outweigh the columns' copies
    ((4, 512, 7, 7), 512, "kernel_size: 3 pad: 1"),   # small maps of several samples
    ((2, 96, 9, 9), 30, "kernel_size: 3 stride: 2"),  # strides
])
def test_shifted_taps_leave_other_shapes_to_im2col(shape, num_output, geometry):
    layer = make_layer(conv_text(num_output, geometry), phase=caffe_pb2.TEST)
    setup_layer(layer, blobs_from(rand(*shape)))
    layer.shifted_taps = True
    assert not layer._runs_shifted_taps()


def test_convolution_accumulates_parameter_gradients():
    layer, bottom, top = run(conv_text(2, "kernel_size: 2"), rand(1, 2, 3, 3))
    top[0].diff[...] = 1
    layer.backward(top, [True], bottom)
    first = layer.blobs[0].diff.copy(), layer.blobs[1].diff.copy()
    layer.backward(top, [True], bottom)
    np.testing.assert_allclose(layer.blobs[0].diff, 2 * first[0], rtol=1e-6)
    np.testing.assert_allclose(layer.blobs[1].diff, 2 * first[1], rtol=1e-6)
    np.testing.assert_allclose(layer.blobs[1].diff, 2 * np.full(2, 4.0))


@pytest.mark.parametrize("geometry,shape,message", [
    ("kernel_size: 0", (1, 2, 5, 5), "nonzero"),
    ("kernel_size: 3 stride: 0", (1, 2, 5, 5), "nonzero"),
    ("", (1, 2, 5, 5), "kernel_size must be specified"),
    ("kernel_size: 3 kernel_size: 3 kernel_size: 3", (1, 2, 5, 5), "once per spatial dimension"),
    ("kernel_size: 3 kernel_h: 3 kernel_w: 3", (1, 2, 5, 5), "not both"),
    ("kernel_h: 3 kernel_w: 3", (1, 2, 5, 5, 5), "2D convolution"),
    ("kernel_size: 3 pad: 1 pad_h: 1 pad_w: 1", (1, 2, 5, 5), "not both"),
    ("kernel_size: 3 stride: 1 stride: 1 stride: 1", (1, 2, 5, 5), "stride must be specified"),
    ("kernel_size: 3 dilation: 1 dilation: 1 dilation: 1", (1, 2, 5, 5), "dilation must be specified"),
    ("kernel_size: 6", (1, 2, 5, 5), "larger than the padded input"),
])
def test_convolution_bad_geometry(geometry, shape, message):
    layer = make_layer(f'type: "Convolution" convolution_param {{ num_output: 2 {geometry} }}')
    with pytest.raises(KaffeError, match=message):
        setup_layer(layer, blobs_from(rand(*shape)))


@pytest.mark.parametrize("num_output,group,channels", [(3, 2, 4), (4, 2, 3), (0, 1, 2)])
def test_convolution_bad_groups(num_output, group, channels):
    layer = make_layer(f'type: "Convolution" convolution_param {{ num_output: {num_output} group: {group} '
                       f'kernel_size: 1 }}')
    with pytest.raises(KaffeError, match="group|num_output"):
        setup_layer(layer, blobs_from(rand(1, channels, 3, 3)))


def test_convolution_bad_bottoms():
    layer = make_layer(conv_text(2, "kernel_size: 1"))
    bottom = blobs_from(rand(1, 2, 3, 3))
    top = setup_layer(layer, bottom)
    bottom[0].reshape(1, 3, 3, 3)
    with pytest.raises(KaffeError, match="channels"):
        layer.forward(bottom, top)
    bottom[0].reshape(1, 2, 3)
    with pytest.raises(KaffeError, match="num_axes"):
        layer.forward(bottom, top)
    layer = make_layer(conv_text(2, "kernel_size: 1"))
    with pytest.raises(KaffeError, match="same shape"):
        setup_layer(layer, blobs_from(rand(1, 2, 3, 3), rand(1, 2, 3, 4)), num_top=2)


def test_convolution_stored_weights_must_fit():
    layer = make_layer('type: "Convolution" convolution_param { num_output: 2 kernel_size: 3 } '
                       'blobs { shape { dim: 2 dim: 1 dim: 3 dim: 3 } data: [' + ",".join(["0.5"] * 18) + '] } '
                       'blobs { shape { dim: 2 } data: [1, 2] }')
    with pytest.raises(KaffeError, match="shape"):
        setup_layer(layer, blobs_from(rand(1, 2, 5, 5)))
    layer = make_layer('type: "Convolution" convolution_param { num_output: 2 kernel_size: 3 } '
                       'blobs { shape { dim: 2 dim: 1 dim: 3 dim: 3 } data: [' + ",".join(["0.5"] * 18) + '] } '
                       'blobs { shape { dim: 2 } data: [1, 2] }')
    x = rand(1, 1, 5, 5)
    bottom = blobs_from(x)
    top = setup_layer(layer, bottom)
    layer.forward(bottom, top)
    expected = conv_ref(x, np.full((2, 1, 3, 3), 0.5), np.array([1.0, 2.0]), (1, 1), (0, 0), (1, 1), 1)
    np.testing.assert_allclose(top[0].data, expected, rtol=1e-5)


# -- Pooling ---------------------------------------------------------------------------------------
def pool_text(method, geometry, extra=""):
    return f'type: "Pooling" pooling_param {{ pool: {method} {geometry} {extra} }}'


@pytest.mark.parametrize("size,geometry,expected", [
    ((28, 28), "kernel_size: 2 stride: 2", (14, 14)),
    ((6, 6), "kernel_size: 3 stride: 2", (3, 3)),
    ((7, 7), "kernel_size: 3 stride: 2 pad: 1", (4, 4)),
    ((6, 6), "kernel_size: 2 stride: 2 pad: 1", (4, 4)),
    ((5, 5), "kernel_size: 2 stride: 2 pad: 1", (3, 3)),  # ceil gives 4, whose window would start in the pad
    ((7, 7), "kernel_size: 2 stride: 2", (4, 4)),  # last window hangs over the edge
    ((7, 7), "kernel_size: 2 stride: 2 round_mode: FLOOR", (3, 3)),
    ((7, 9), "kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 3 pad_h: 1 pad_w: 1", (4, 4)),
    ((5, 7), "global_pooling: true", (1, 1)),
])
def test_pooling_output_shape(size, geometry, expected):
    for method in ("MAX", "AVE"):
        _, _, top = run(pool_text(method, geometry), rand(2, 3, *size))
        assert top[0].shape == (2, 3) + expected


POOL_CASES = [
    # (input spatial, geometry text, kernel, stride, pad, FLOOR?)
    ((7, 7), "kernel_size: 3 stride: 2 pad: 1", (3, 3), (2, 2), (1, 1), False),
    ((5, 5), "kernel_size: 2 stride: 2 pad: 1", (2, 2), (2, 2), (1, 1), False),
    ((7, 6), "kernel_size: 2 stride: 2", (2, 2), (2, 2), (0, 0), False),
    ((7, 8), "kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 3 pad_h: 2 pad_w: 1", (3, 2), (2, 3), (2, 1), False),
    ((7, 7), "kernel_size: 3 stride: 2 pad: 1 round_mode: FLOOR", (3, 3), (2, 2), (1, 1), True),
    ((5, 4), "kernel_size: 3", (3, 3), (1, 1), (0, 0), False),
    ((5, 7), "global_pooling: true", (5, 7), (1, 1), (0, 0), False),
]


def caffe_out(size, kernel, stride, pad, floor):
    out = []
    for n, k, s, p in zip(size, kernel, stride, pad):
        o = int((np.floor if floor else np.ceil)((n + 2 * p - k) / s)) + 1
        if p and (o - 1) * s >= n + p:
            o -= 1
        out.append(o)
    return out


@pytest.mark.parametrize("method", ["MAX", "AVE"])
@pytest.mark.parametrize("size,geometry,kernel,stride,pad,floor", POOL_CASES)
def test_pooling_forward_matches_reference(method, size, geometry, kernel, stride, pad, floor):
    x = rand(2, 3, *size)
    _, _, top = run(pool_text(method, geometry), x)
    expected, _ = pool_ref(x, method, kernel, stride, pad, caffe_out(size, kernel, stride, pad, floor))
    assert top[0].shape == expected.shape
    np.testing.assert_allclose(top[0].data, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", ["MAX", "AVE"])
@pytest.mark.parametrize("size,geometry,kernel,stride,pad,floor", POOL_CASES)
def test_pooling_gradient(method, size, geometry, kernel, stride, pad, floor):
    layer = make_layer(pool_text(method, geometry))
    bottom = blobs_from(distinct(2, 2, *size))
    top = setup_layer(layer, bottom)
    check_gradient(layer, bottom, top)


def test_ave_pooling_divisor_counts_padding_but_not_overhang():
    # 3x3 of ones, kernel 2, stride 2, pad 1: windows rows [-1,1) [1,3): pool_size 2 and 2; the sums are 1 and 2
    _, _, top = run(pool_text("AVE", "kernel_size: 2 stride: 2 pad: 1"), np.ones((1, 1, 3, 3)))
    np.testing.assert_allclose(top[0].data[0, 0], [[1 / 4, 2 / 4], [2 / 4, 4 / 4]])
    # no pad, ceil: the last window [2, 4) of a size-3 axis divides by 1
    _, _, top = run(pool_text("AVE", "kernel_size: 2 stride: 2"), np.ones((1, 1, 3, 3)))
    np.testing.assert_allclose(top[0].data[0, 0], np.ones((2, 2)))


def test_max_pooling_ties_go_to_the_first_maximum_and_mask_top():
    x = np.zeros((1, 2, 4, 5), np.float32)
    x[0, 1, 1, 1] = x[0, 1, 1, 2] = x[0, 1, 2, 1] = 3  # a tie inside one window
    x[0, 1, 0, 3] = 3
    x[0, 1, 2, 3] = x[0, 1, 1, 4] = 3  # tie in window (1, 2): row-major order puts (1, 4) first
    layer, bottom, top = run(pool_text("MAX", "kernel_size: 2 stride: 2 pad: 1"), x, num_top=2)
    expected, mask = pool_ref(x, "MAX", (2, 2), (2, 2), (1, 1), (3, 3))
    np.testing.assert_array_equal(top[0].data, expected)
    np.testing.assert_array_equal(top[1].data, mask)
    assert top[1].data[0, 1, 1, 1] == 1 * 5 + 1
    assert top[1].data[0, 1, 0, 2] == 0 * 5 + 3
    assert top[1].data[0, 1, 1, 2] == 1 * 5 + 4
    assert top[1].data[0, 0, 1, 1] == 1 * 5 + 1  # all-zero window: its first real cell
    top[0].diff[...] = np.arange(top[0].count).reshape(top[0].shape)
    layer.backward(top, [True], bottom)
    routed = np.zeros(x.size)
    np.add.at(routed, (mask + np.arange(2).reshape(1, 2, 1, 1) * 20).ravel().astype(int), top[0].diff.ravel())
    np.testing.assert_array_equal(bottom[0].diff.ravel(), routed)


def test_max_pooling_gradient_with_mask_top():
    layer = make_layer(pool_text("MAX", "kernel_size: 3 stride: 2 pad: 1"))
    bottom = blobs_from(distinct(2, 2, 5, 6, seed=3))
    top = setup_layer(layer, bottom, num_top=2)
    check_gradient(layer, bottom, top)


def test_max_pooling_window_without_input_gives_minus_flt_max():
    # stride larger than the kernel and no pad: the ceil'd last window starts past the input, as in Caffe
    layer, bottom, top = run(pool_text("MAX", "kernel_size: 1 stride: 3"), rand(1, 1, 5, 5), num_top=2)
    assert top[0].shape == (1, 1, 3, 3)
    assert top[0].data[0, 0, 2, 0] == -FLT_MAX and top[1].data[0, 0, 2, 0] == -1
    top[0].diff[...] = 1
    layer.backward(top, [True], bottom)
    assert bottom[0].diff.sum() == 4


def test_pooling_reshapes_when_the_bottom_changes():
    layer = make_layer(pool_text("AVE", "global_pooling: true"))
    bottom = blobs_from(rand(1, 2, 3, 3))
    top = setup_layer(layer, bottom)
    bottom[0].reshape(2, 2, 4, 6)
    bottom[0].data[...] = rand(2, 2, 4, 6, seed=1)
    layer.forward(bottom, top)
    np.testing.assert_allclose(top[0].data[..., 0, 0], bottom[0].data.mean(axis=(2, 3)), rtol=1e-5)


@pytest.mark.parametrize("text,num_top,message", [
    (pool_text("MAX", "kernel_size: 0"), 1, "cannot be zero"),
    (pool_text("MAX", "kernel_size: 2 pad: 2"), 1, "smaller than the kernel"),
    (pool_text("AVE", "kernel_h: 3 kernel_w: 2 pad_h: 1 pad_w: 2"), 1, "smaller than the kernel"),
    (pool_text("MAX", "kernel_size: 2 kernel_h: 2 kernel_w: 2"), 1, "not both"),
    (pool_text("MAX", "kernel_h: 2"), 1, "kernel_h and kernel_w"),
    (pool_text("MAX", "kernel_size: 2 pad: 1 pad_h: 1 pad_w: 1"), 1, "pad is pad OR"),
    (pool_text("MAX", "kernel_size: 2 stride_h: 2"), 1, "stride is stride OR"),
    (pool_text("MAX", "kernel_size: 2 stride: 0"), 1, "stride must be nonzero"),
    (pool_text("MAX", "global_pooling: true kernel_size: 2"), 1, "cannot be specified"),
    (pool_text("AVE", "global_pooling: true stride: 2"), 1, "only pad = 0 and stride = 1"),
    (pool_text("AVE", "kernel_size: 2"), 2, "at most 1 top"),
    (pool_text("MAX", "kernel_size: 2"), 3, "at most 2 top"),
    (pool_text("MAX", "kernel_size: 9"), 1, "does not fit"),
])
def test_pooling_bad_parameters(text, num_top, message):
    layer = make_layer(text)
    with pytest.raises(KaffeError, match=message):
        setup_layer(layer, blobs_from(rand(1, 2, 5, 5)), num_top=num_top)


def test_pooling_needs_four_axes():  # STOCHASTIC: tests/test_deconvolution_crop_spp_layers.py
    with pytest.raises(KaffeError, match="4 axes"):
        setup_layer(make_layer(pool_text("MAX", "kernel_size: 2")), blobs_from(rand(2, 5, 5)))


# -- LRN -------------------------------------------------------------------------------------------
LRN_CASES = [
    ("ACROSS_CHANNELS", 5, 1.0, 0.75, 1.0),
    ("ACROSS_CHANNELS", 3, 0.3, 0.6, 2.0),
    ("WITHIN_CHANNEL", 3, 1.0, 0.75, 1.0),
    ("WITHIN_CHANNEL", 5, 2.0, 0.5, 1.0),
]


def lrn_text(region, size, alpha, beta, k):
    return (f'type: "LRN" lrn_param {{ norm_region: {region} local_size: {size} alpha: {alpha} beta: {beta} '
            f'k: {k} }}')


@pytest.mark.parametrize("region,size,alpha,beta,k", LRN_CASES)
def test_lrn_forward_matches_reference(region, size, alpha, beta, k):
    x = rand(2, 7, 5, 6) * 2
    _, _, top = run(lrn_text(region, size, alpha, beta, k), x)
    expected = lrn_ref(x, size, alpha, beta, k, region == "WITHIN_CHANNEL")
    np.testing.assert_allclose(top[0].data, expected, rtol=1e-5, atol=1e-6)


def test_lrn_defaults():
    x = rand(1, 6, 3, 4)
    _, _, top = run('type: "LRN"', x)
    np.testing.assert_allclose(top[0].data, lrn_ref(x, 5, 1.0, 0.75, 1.0, False), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("region,size,alpha,beta,k", LRN_CASES)
def test_lrn_gradient(region, size, alpha, beta, k):
    layer = make_layer(lrn_text(region, size, alpha, beta, k))
    bottom = blobs_from(rand(2, 7, 3, 4))
    top = setup_layer(layer, bottom)
    check_gradient(layer, bottom, top)


def test_lrn_bad_inputs():
    with pytest.raises(KaffeError, match="odd"):
        setup_layer(make_layer('type: "LRN" lrn_param { local_size: 4 }'), blobs_from(rand(1, 3, 2, 2)))
    with pytest.raises(KaffeError, match="4 axes"):
        setup_layer(make_layer('type: "LRN"'), blobs_from(rand(3, 2, 2)))


# -- InnerProduct ----------------------------------------------------------------------------------
def ip_text(num_output, extra=""):
    return (f'type: "InnerProduct" inner_product_param {{ num_output: {num_output} {extra} '
            f'weight_filler {{ type: "gaussian" std: 0.5 }} bias_filler {{ type: "gaussian" std: 0.5 }} }}')


@pytest.mark.parametrize("shape,axis,transpose,bias", [
    ((3, 2, 4, 5), 1, False, True),
    ((3, 2, 4, 5), 2, True, True),
    ((3, 2, 4, 5), -1, False, False),
    ((4, 6), 1, True, False),
])
def test_inner_product_forward_and_gradient(shape, axis, transpose, bias):
    extra = f'axis: {axis} transpose: {"true" if transpose else "false"} bias_term: {"true" if bias else "false"}'
    layer, bottom, top = run(ip_text(3, extra), rand(*shape))
    split = axis % len(shape)
    k = int(np.prod(shape[split:]))
    w = layer.blobs[0].data.astype(np.float64)
    assert w.shape == ((k, 3) if transpose else (3, k))
    assert len(layer.blobs) == (2 if bias else 1)
    expected = bottom[0].data.reshape(-1, k).astype(np.float64) @ (w if transpose else w.T)
    if bias:
        expected += layer.blobs[1].data
    assert top[0].shape == shape[:split] + (3,)
    np.testing.assert_allclose(top[0].data.reshape(-1, 3), expected, rtol=1e-5, atol=1e-5)
    check_gradient(layer, bottom, top)


def test_inner_product_input_size_must_stay():
    layer = make_layer(ip_text(2))
    bottom = blobs_from(rand(2, 3, 4))
    top = setup_layer(layer, bottom)
    bottom[0].reshape(5, 12)  # same K: fine
    layer.forward(bottom, top)
    assert top[0].shape == (5, 2)
    bottom[0].reshape(2, 3, 5)
    with pytest.raises(KaffeError, match="incompatible.*15.*12"):
        layer.forward(bottom, top)


def test_inner_product_stored_weights_must_fit_the_input():
    text = ('type: "InnerProduct" inner_product_param { num_output: 2 } '
            'blobs { shape { dim: 2 dim: 3 } data: [1, 2, 3, 4, 5, 6] } blobs { shape { dim: 2 } data: [0.5, -1] }')
    with pytest.raises(KaffeError, match="shape"):
        setup_layer(make_layer(text), blobs_from(rand(4, 5)))
    layer, _, top = run(text, np.array([[1, 0, 2]], np.float32))
    np.testing.assert_allclose(top[0].data, [[7.5, 15.0]])
    with pytest.raises(KaffeError, match="num_output"):
        setup_layer(make_layer('type: "InnerProduct"'), blobs_from(rand(4, 5)))


def test_inner_product_respects_propagate_flags():
    layer, bottom, top = run(ip_text(2), rand(3, 4))
    top[0].diff[...] = 1
    bottom[0].diff[...] = 7
    layer.param_propagate_down = [False, True]
    layer.backward(top, [False], bottom)
    assert np.all(bottom[0].diff == 7) and np.all(layer.blobs[0].diff == 0)
    np.testing.assert_allclose(layer.blobs[1].diff, [3, 3])


def test_blob_shapes_are_caffes():
    layer, _, _ = run(conv_text(6, "kernel_size: 3", group=2), rand(1, 4, 5, 5))
    assert [b.shape for b in layer.blobs] == [(6, 2, 3, 3), (6,)]
    assert isinstance(layer.blobs[0], Blob)
    assert caffe_pb2.PoolingParameter().round_mode == caffe_pb2.PoolingParameter.CEIL


@pytest.mark.parametrize("geometry,shape", [
    ("kernel_size: 2 stride: 2", (3, 4, 8, 6)),            # tiled: the reshape path
    ("kernel_size: 3 stride: 3", (2, 3, 9, 6)),
    ("kernel_size: 3 stride: 2", (2, 3, 9, 8)),            # overlapping windows (CIFAR-10, AlexNet)
    ("kernel_size: 3 stride: 2 pad: 1", (2, 3, 8, 7)),     # padded and clipped windows (GoogLeNet)
    ("kernel_size: 3 stride: 1 pad: 1", (1, 2, 5, 6)),
    ("kernel_h: 2 kernel_w: 3 stride_h: 1 stride_w: 2", (2, 2, 5, 7))])
def test_max_pooling_fast_path_equals_the_general_path(geometry, shape, monkeypatch):
    """The separable fast path (rows, then columns; reshapes for tiling windows) must agree with the tap loop,
    ties (first maximum wins), mask top and backward included (numpy alone: tests/test_cpu_accelerator.py holds
    the compiled passes to these)."""
    monkeypatch.setenv("KAFFE_ACCEL", "0")
    rng = np.random.default_rng(11)
    x = rng.integers(0, 4, size=shape).astype(np.float32)   # many ties
    results = []
    for fast in (True, False):
        layer = make_layer(f'type: "Pooling" pooling_param {{ pool: MAX {geometry} }}')
        bottom = blobs_from(x)
        top = setup_layer(layer, bottom, num_top=2)
        if not fast:
            layer._forward_max_fast = lambda *args: False   # decline the fast path
        layer.forward(bottom, top)
        assert (layer.window_argmax is not None) == fast
        top[0].diff[...] = np.random.default_rng(12).standard_normal(top[0].shape).astype(np.float32)
        layer.backward(top, [True], bottom)
        results.append((top[0].data.copy(), top[1].data.copy(), bottom[0].diff.copy()))
    for fast, general in zip(*results):
        np.testing.assert_array_equal(fast, general)


@pytest.mark.parametrize("geometry,kernel,stride", [("kernel_size: 2 stride: 2", (2, 2), (2, 2)),
                                                    ("kernel_h: 2 kernel_w: 1 stride_h: 2 stride_w: 1", (2, 1), (2, 1)),
                                                    ("kernel_h: 1 kernel_w: 3 stride_h: 1 stride_w: 3", (1, 3), (1, 3)),
                                                    ("kernel_size: 3 stride: 2", (3, 3), (2, 2))])
def test_max_pooling_with_nan_and_infinite_values_follows_caffe(geometry, kernel, stride):
    """NaN never wins a window (Caffe's strict >), an all -inf window gives -FLT_MAX and mask -1: the fast
    path hands such inputs to the general one, whose results are Caffe's."""
    x = np.random.default_rng(3).standard_normal((2, 3, 6, 6)).astype(np.float32)
    x[0, 0, 0, 0] = np.nan                     # one NaN cell in a window
    x[1, 2, :kernel[0], :kernel[1]] = -np.inf  # a whole window of -inf
    x[0, 1, 2:2 + kernel[0], 3:3 + kernel[1]] = -FLT_MAX
    layer, bottom, top = run(f'type: "Pooling" pooling_param {{ pool: MAX {geometry} }}', x, num_top=2)
    expected, mask = pool_ref(x, "MAX", kernel, stride, (0, 0), top[0].shape[2:])
    np.testing.assert_array_equal(top[0].data, expected.astype(np.float32))
    np.testing.assert_array_equal(top[1].data, mask)
    assert top[0].data[1, 2, 0, 0] == -FLT_MAX and top[1].data[1, 2, 0, 0] == -1
    x[~(x > -FLT_MAX)] = 0  # no NaN, -inf or -FLT_MAX left: the fast path takes it, same answers
    bottom[0].data[...] = x
    layer.forward(bottom, top)
    assert layer.window_argmax is not None
    expected, mask = pool_ref(x, "MAX", kernel, stride, (0, 0), top[0].shape[2:])
    np.testing.assert_array_equal(top[0].data, expected.astype(np.float32))
    np.testing.assert_array_equal(top[1].data, mask)


def test_convolution_backward_uses_the_current_bottom_after_a_change():
    """The forward's columns are reused by backward only while the bottom's data is unchanged."""
    rng = np.random.default_rng(5)
    text = 'type: "Convolution" convolution_param { num_output: 3 kernel_size: 3 weight_filler { type: "gaussian" } }'
    x1, x2 = rng.standard_normal((2, 2, 5, 5)), rng.standard_normal((2, 2, 5, 5))
    dy = rng.standard_normal((2, 3, 3, 3)).astype(np.float32)
    device.set_random_seed(1)
    layer = make_layer(text)
    bottom = blobs_from(x1)
    top = setup_layer(layer, bottom)
    layer.forward(bottom, top)
    bottom[0].data[...] = x2          # changed after the forward: backward must see x2
    top[0].diff[...] = dy
    layer.backward(top, [True], bottom)
    device.set_random_seed(1)
    fresh = make_layer(text)
    fresh_bottom = blobs_from(x2)
    fresh_top = setup_layer(fresh, fresh_bottom)
    fresh.forward(fresh_bottom, fresh_top)
    fresh_top[0].diff[...] = dy
    fresh.backward(fresh_top, [True], fresh_bottom)
    np.testing.assert_allclose(layer.blobs[0].diff, fresh.blobs[0].diff, rtol=1e-5)


def test_convolution_forward_sees_data_written_through_a_kept_array():
    """pycaffe scripts keep `d = net.blobs['data'].data` and write new images into it between forwards: the
    data version does not change then, and forward must still use the new data."""
    rng = np.random.default_rng(6)
    layer, bottom, top = run(conv_text(3, "kernel_size: 3"), rng.standard_normal((2, 2, 5, 5)))
    kept = bottom[0].data
    layer.forward(bottom, top)
    kept[...] = rng.standard_normal(kept.shape)
    layer.forward(bottom, top)
    w, b = layer.blobs[0].data, layer.blobs[1].data
    np.testing.assert_allclose(top[0].data, conv_ref(kept, w, b, (1, 1), (0, 0), (1, 1), 1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["Convolution", "Deconvolution"])
@pytest.mark.parametrize("channels,num_output,group", [(1, 20, 1), (20, 50, 1), (3, 2, 1), (4, 6, 2)])
def test_convolution_layouts_agree(kind, channels, num_output, group):
    """The CPU path picks the batch-innermost or batch-outer column layout by size; both give the same
    forward and backward (the layout is forced each way here)."""
    text = (f'type: "{kind}" convolution_param {{ num_output: {num_output} kernel_size: 5 stride: 1 pad: 1 '
            f'group: {group} weight_filler {{ type: "gaussian" }} bias_filler {{ type: "gaussian" }} }}')
    x = rand(3, channels, 9, 8)
    out_h, out_w = (11, 10) if kind == "Deconvolution" else (7, 6)
    dy = rand(3, num_output, out_h, out_w, seed=2)
    results = []
    for batch_last in (True, False):
        device.set_random_seed(4)
        layer = make_layer(text)
        bottom = blobs_from(x)
        top = setup_layer(layer, bottom)
        layer.reshape = (lambda original, flag: lambda b, t: (original(b, t), setattr(layer, "batch_last", flag)))(
            layer.reshape, batch_last)
        layer.forward(bottom, top)
        top[0].diff[...] = dy
        layer.backward(top, [True], bottom)
        results.append((top[0].data.copy(), bottom[0].diff.copy(), layer.blobs[0].diff.copy(),
                        layer.blobs[1].diff.copy()))
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)  # float32 sums in different orders
