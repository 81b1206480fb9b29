"""Deconvolution, Im2col, Crop, SPP and STOCHASTIC pooling on the CPU: float64 loop references, gradient checks
with awkward shapes, Caffe's shapes, parameter blobs and errors."""
import itertools

import numpy as np
import pytest
from gradient_check import blobs_from, check_gradient, distinct, make_layer, positive, rand32 as rand, setup_layer

from kaffe.engine import device
from kaffe.engine.errors import KaffeError
from kaffe.layers.neuron import dropout_bits
from kaffe.proto import caffe_pb2

FILLERS = 'weight_filler { type: "gaussian" std: 0.5 } bias_filler { type: "gaussian" std: 0.5 }'


@pytest.fixture(autouse=True)
def seeded():
    device.set_random_seed(1234)


def run(text, *arrays, num_top=None, phase=caffe_pb2.TRAIN):
    layer = make_layer(text, phase)
    bottom = blobs_from(*arrays)
    top = setup_layer(layer, bottom, num_top)
    layer.forward(bottom, top)
    return layer, bottom, top


# -- Deconvolution -------------------------------------------------------------------------------------
def deconv_ref(x, w, b, stride, pad, dilation, group):
    """Each input value scatters input * kernel into the output (the transpose of a convolution), float64."""
    x, w = x.astype(np.float64), w.astype(np.float64)
    num, channels, *spatial = x.shape
    _, out_per_group, *kernel = w.shape
    out = [s * (n - 1) + d * (k - 1) + 1 - 2 * p for n, k, s, p, d in zip(spatial, kernel, stride, pad, dilation)]
    y = np.zeros((num, out_per_group * group, *out))
    in_per_group = channels // group
    for c in range(channels):
        g = c // in_per_group
        for pos in itertools.product(*map(range, spatial)):
            for tap in itertools.product(*map(range, kernel)):
                idx = [q * s - p + t * d for q, t, s, p, d in zip(pos, tap, stride, pad, dilation)]
                if all(0 <= i < n for i, n in zip(idx, out)):
                    for o in range(out_per_group):
                        y[(slice(None), g * out_per_group + o, *idx)] += x[(slice(None), c, *pos)] * w[(c, o, *tap)]
    if b is not None:
        y += b.astype(np.float64).reshape((1, -1) + (1,) * len(spatial))
    return y


DECONV_CASES = [
    # (bottom shape, params, stride, pad, dilation, group)
    ((2, 3, 4, 5), "num_output: 4 kernel_size: 3", (1, 1), (0, 0), (1, 1), 1),
    ((2, 4, 3, 4), "num_output: 6 kernel_size: 3 stride: 2 pad: 1 group: 2", (2, 2), (1, 1), (1, 1), 2),
    ((1, 6, 3, 3), "num_output: 3 kernel_h: 2 kernel_w: 3 stride_h: 3 stride_w: 1 pad_h: 1 pad_w: 0 group: 3",
     (3, 1), (1, 0), (1, 1), 3),
    ((2, 2, 4, 3), "num_output: 2 kernel_size: 3 dilation: 2 stride: 2 pad: 2", (2, 2), (2, 2), (2, 2), 1),
    ((1, 2, 3, 4), "num_output: 3 kernel_size: 2 kernel_size: 3 dilation: 3 dilation: 1 stride: 1 stride: 2 "
     "pad: 0 pad: 1 bias_term: false", (1, 2), (0, 1), (3, 1), 1),
    ((2, 3, 5), "num_output: 2 kernel_size: 4 stride: 3 pad: 1", (3,), (1,), (1,), 1),  # 1-D
    ((1, 2, 2, 3, 2), "num_output: 2 kernel_size: 2 stride: 2 pad: 0 group: 2", (2, 2, 2), (0, 0, 0),
     (1, 1, 1), 2),  # 3-D
]


@pytest.mark.parametrize("shape,params,stride,pad,dilation,group", DECONV_CASES)
def test_deconvolution_matches_reference(shape, params, stride, pad, dilation, group):
    layer, bottom, top = run(f'type: "Deconvolution" convolution_param {{ {params} {FILLERS} }}', rand(*shape))
    w = layer.blobs[0].data
    b = layer.blobs[1].data if len(layer.blobs) > 1 else None
    num_output = top[0].shape[1]
    # Caffe's parameter shapes: (C_in, num_output / group, *kernel) and (num_output,)
    assert w.shape[:2] == (shape[1], num_output // group)
    assert b is None or b.shape == (num_output,)
    expected = deconv_ref(bottom[0].data, w, b, stride, pad, dilation, group)
    assert top[0].shape == expected.shape
    np.testing.assert_allclose(top[0].data, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape,params", [
    ((2, 4, 3, 4), "num_output: 6 kernel_size: 3 stride: 2 pad: 1 group: 2"),
    ((1, 6, 3, 2), "num_output: 3 kernel_h: 2 kernel_w: 3 stride_h: 3 stride_w: 1 pad_h: 1 pad_w: 0 group: 3"),
    ((2, 2, 3, 3), "num_output: 2 kernel_size: 3 dilation: 2 stride: 2 pad: 2"),
    ((2, 3, 5), "num_output: 2 kernel_size: 4 stride: 3 pad: 1"),
])
def test_deconvolution_gradient(shape, params):
    layer = make_layer(f'type: "Deconvolution" convolution_param {{ {params} {FILLERS} }}')
    bottom = blobs_from(rand(*shape))
    check_gradient(layer, bottom, setup_layer(layer, bottom))


def test_deconvolution_several_bottoms_share_weights():
    text = f'type: "Deconvolution" convolution_param {{ num_output: 2 kernel_size: 2 stride: 2 {FILLERS} }}'
    layer, bottom, top = run(text, rand(2, 3, 2, 3), rand(2, 3, 2, 3, seed=1), num_top=2)
    for b, t in zip(bottom, top):
        expected = deconv_ref(b.data, layer.blobs[0].data, layer.blobs[1].data, (2, 2), (0, 0), (1, 1), 1)
        np.testing.assert_allclose(t.data, expected, rtol=1e-4, atol=1e-4)
    check_gradient(layer, bottom, top)


def test_deconvolution_is_the_adjoint_of_convolution():
    """<conv(x), y> = <x, deconv(y)> with the same weights (conv: (O, C/g, k), deconv of O channels to C)."""
    geometry = "kernel_size: 3 stride: 2 pad: 1 dilation: 1 group: 2 bias_term: false"
    conv, conv_bottom, conv_top = run(f'type: "Convolution" convolution_param {{ num_output: 4 {geometry} '
                                      f'{FILLERS} }}', rand(2, 6, 7, 9))
    y = rand(*conv_top[0].shape, seed=3)
    deconv = make_layer(f'type: "Deconvolution" convolution_param {{ num_output: 6 {geometry} }}')
    deconv_bottom = blobs_from(y)
    deconv_top = setup_layer(deconv, deconv_bottom)
    deconv.blobs[0].data[...] = conv.blobs[0].data
    deconv.forward(deconv_bottom, deconv_top)
    assert deconv_top[0].shape == conv_bottom[0].shape  # 7 x 9 -> 4 x 5 -> 7 x 9
    lhs = np.sum(conv_top[0].data.astype(np.float64) * y)
    rhs = np.sum(conv_bottom[0].data.astype(np.float64) * deconv_top[0].data)
    assert lhs == pytest.approx(rhs, rel=1e-4)


def bilinear_kernel(size):
    f = np.ceil(size / 2.0)
    c = (size - 1) / (2.0 * f)
    taps = 1.0 - np.abs(np.arange(size) / f - c)
    return np.outer(taps, taps)


@pytest.mark.parametrize("factor", [2, 3])
def test_deconvolution_bilinear_upsampling(factor):
    """FCN's fixed upsampling: bilinear filler, kernel 2f - f % 2, stride f, pad ceil((f - 1) / 2), one group
    per channel. Every output is the bilinear interpolation of the input: a linear ramp stays linear inside."""
    kernel, pad = 2 * factor - factor % 2, int(np.ceil((factor - 1) / 2))
    text = (f'type: "Deconvolution" convolution_param {{ num_output: 2 group: 2 bias_term: false kernel_size: '
            f'{kernel} stride: {factor} pad: {pad} weight_filler {{ type: "bilinear" }} }}')
    rows = np.arange(5, dtype=np.float32)
    x = np.stack([np.broadcast_to(rows[:, None], (5, 4)), np.ones((5, 4), np.float32)])[None]
    layer, bottom, top = run(text, x)
    assert layer.blobs[0].shape == (2, 1, kernel, kernel)
    np.testing.assert_allclose(layer.blobs[0].data[1, 0], bilinear_kernel(kernel), rtol=1e-6)
    expected = deconv_ref(x, layer.blobs[0].data, None, (factor,) * 2, (pad,) * 2, (1, 1), 2)
    np.testing.assert_allclose(top[0].data, expected, rtol=1e-5, atol=1e-5)
    assert top[0].shape == (1, 2, factor * 5, factor * 4)  # f (n - 1) + k - 2 pad = f n
    inside = (slice(factor, -factor), slice(factor, -factor))
    np.testing.assert_allclose(top[0].data[0, 1][inside], 1.0, rtol=1e-6)  # a constant stays constant
    ramp = top[0].data[0, 0][inside]
    steps = np.diff(ramp, axis=0)
    np.testing.assert_allclose(steps, 1.0 / factor, rtol=1e-5)  # the ramp's slope is divided by the factor
    np.testing.assert_allclose(np.diff(ramp, axis=1), 0.0, atol=1e-6)


@pytest.mark.parametrize("params,shape,message", [
    ("num_output: 4 kernel_size: 3 group: 2", (1, 3, 4, 4), "group 2 must divide"),
    ("num_output: 3 kernel_size: 3 group: 2", (1, 4, 4, 4), "group 2 must divide"),
    ("num_output: 0 kernel_size: 3", (1, 2, 4, 4), "num_output must be positive"),
    ("num_output: 2 kernel_size: 1 pad: 1", (1, 2, 2, 2), "leaves no output"),
    ("num_output: 2", (1, 2, 4, 4), "kernel_size must be specified"),
    ("num_output: 2 kernel_h: 2 kernel_w: 2", (1, 2, 4), "can only be used for 2D"),
])
def test_deconvolution_errors(params, shape, message):
    with pytest.raises(KaffeError, match=message):
        run(f'type: "Deconvolution" convolution_param {{ {params} }}', rand(*shape))


# -- Im2col -------------------------------------------------------------------------------------------
def im2col_layer_ref(x, kernel, stride, pad, dilation):
    """(num, C, *spatial) -> (num, C * prod(kernel), *out): row c * K + k holds tap k of channel c, float64."""
    num, channels, *spatial = x.shape
    out = [(n + 2 * p - (d * (k - 1) + 1)) // s + 1 for n, k, s, p, d in zip(spatial, kernel, stride, pad, dilation)]
    taps = list(itertools.product(*map(range, kernel)))
    y = np.zeros((num, channels * len(taps), *out))
    for c in range(channels):
        for t, tap in enumerate(taps):
            for pos in itertools.product(*map(range, out)):
                idx = [q * s - p + i * d for q, i, s, p, d in zip(pos, tap, stride, pad, dilation)]
                if all(0 <= i < n for i, n in zip(idx, spatial)):
                    y[(slice(None), c * len(taps) + t, *pos)] = x[(slice(None), c, *idx)]
    return y


IM2COL_CASES = [
    ((2, 3, 5, 6), "kernel_size: 3", (3, 3), (1, 1), (0, 0), (1, 1)),
    ((2, 2, 7, 6), "kernel_size: 3 stride: 2 pad: 1 dilation: 2", (3, 3), (2, 2), (1, 1), (2, 2)),
    ((1, 3, 5, 7), "kernel_h: 2 kernel_w: 3 stride_h: 1 stride_w: 2 pad_h: 1 pad_w: 2", (2, 3), (1, 2), (1, 2),
     (1, 1)),
    ((2, 2, 9), "kernel_size: 3 stride: 2 pad: 1", (3,), (2,), (1,), (1,)),  # 1-D
    ((1, 2, 4, 3, 4), "kernel_size: 2 pad: 1 stride: 2", (2, 2, 2), (2, 2, 2), (1, 1, 1), (1, 1, 1)),  # 3-D
]


@pytest.mark.parametrize("shape,params,kernel,stride,pad,dilation", IM2COL_CASES)
def test_im2col_layer_matches_reference(shape, params, kernel, stride, pad, dilation):
    _, bottom, top = run(f'type: "Im2col" convolution_param {{ {params} }}', rand(*shape))
    expected = im2col_layer_ref(bottom[0].data, kernel, stride, pad, dilation)
    assert top[0].shape == expected.shape
    np.testing.assert_array_equal(top[0].data, expected.astype(np.float32))


@pytest.mark.parametrize("shape,params", [(case[0], case[1]) for case in IM2COL_CASES])
def test_im2col_layer_gradient(shape, params):
    layer = make_layer(f'type: "Im2col" convolution_param {{ {params} }}')
    bottom = blobs_from(rand(*shape))
    check_gradient(layer, bottom, setup_layer(layer, bottom))


def test_im2col_layer_batch_axes():
    """axis: 2 makes the first two axes the batch."""
    x = rand(2, 3, 2, 6)
    _, _, top = run('type: "Im2col" convolution_param { kernel_size: 3 axis: 2 }', x)
    expected = im2col_layer_ref(x.reshape(6, 2, 6), (3,), (1,), (0,), (1,)).reshape(2, 3, 6, 4)
    np.testing.assert_array_equal(top[0].data, expected)


@pytest.mark.parametrize("text,shape,message", [
    ('convolution_param { kernel_size: 3 axis: -1 }', (2, 3, 4), "spatial axis"),
    ('convolution_param { kernel_size: 5 }', (1, 2, 3, 3), "larger than the padded input"),
    ('convolution_param { kernel_size: 0 }', (1, 2, 3, 3), "nonzero"),
    ('convolution_param { kernel_size: 2 stride: 1 stride: 2 stride: 3 }', (1, 2, 3, 3), "once per spatial"),
])
def test_im2col_layer_errors(text, shape, message):
    with pytest.raises(KaffeError, match=message):
        run(f'type: "Im2col" {text}', rand(*shape))


# -- Crop ---------------------------------------------------------------------------------------------
def crop_ref(x, shape, offsets):
    y = np.zeros(shape)
    for idx in itertools.product(*map(range, shape)):
        y[idx] = x[tuple(i + o for i, o in zip(idx, offsets))]
    return y


@pytest.mark.parametrize("params,big,small,start,offsets", [
    ("", (2, 3, 6, 5), (2, 3, 4, 4), 2, (0, 0, 0, 0)),  # axis 2, no offset: 0
    ("offset: 1", (2, 3, 6, 5), (1, 1, 4, 3), 2, (0, 0, 1, 1)),  # axes before `axis` keep bottom[0]'s size
    ("axis: 1 offset: 1 offset: 0 offset: 2", (2, 4, 5, 6), (2, 3, 4, 3), 1, (0, 1, 0, 2)),
    ("axis: -1 offset: 3", (2, 3, 4, 7), (2, 3, 4, 2), 3, (0, 0, 0, 3)),
    ("axis: 0 offset: 1", (3, 4, 5), (2, 2, 3), 0, (1, 1, 1)),
])
def test_crop_matches_reference(params, big, small, start, offsets):
    x = rand(*big)
    _, _, top = run(f'type: "Crop" crop_param {{ {params} }}', x, rand(*small))
    shape = big[:start] + small[start:]
    np.testing.assert_array_equal(top[0].data, crop_ref(x, shape, offsets).astype(np.float32))


def test_crop_backward_reaches_bottom0_only():
    layer, bottom, top = run('type: "Crop" crop_param { axis: 1 offset: 1 offset: 2 offset: 0 }', rand(2, 4, 6, 3),
                             rand(2, 2, 3, 3))
    dy = rand(*top[0].shape, seed=5)
    top[0].diff[...] = dy
    bottom[1].diff[...] = 7.0
    layer.backward(top, [True, True], bottom)
    expected = np.zeros(bottom[0].shape, np.float32)
    expected[:, 1:3, 2:5, 0:3] = dy
    np.testing.assert_array_equal(bottom[0].diff, expected)
    assert (bottom[1].diff == 7.0).all()
    check_gradient(layer, bottom, top, check_bottom=[0])


@pytest.mark.parametrize("params,big,small,message", [
    ("offset: 2", (1, 2, 5, 5), (1, 2, 4, 4), "out-of-bounds with size 4 and offset 2"),
    ("axis: 1 offset: 1 offset: 1", (1, 2, 5, 5), (1, 1, 4, 4), "number of offset values"),
    ("", (1, 2, 5, 5), (1, 2, 4), "same number of axes"),
    ("axis: 4", (1, 2, 5, 5), (1, 2, 4, 4), "axis 4 out of range"),
])
def test_crop_errors(params, big, small, message):
    with pytest.raises(KaffeError, match=message):
        run(f'type: "Crop" crop_param {{ {params} }}', rand(*big), rand(*small))


# -- SPP ----------------------------------------------------------------------------------------------
def pool_ref(x, kernel, stride, pad, method):
    """Caffe's MAX / AVE pooling (ceil rounding, no window starting in the padding), float64."""
    num, channels, *spatial = x.shape
    out = []
    for n, k, s, p in zip(spatial, kernel, stride, pad):
        o = -(-(n + 2 * p - k) // s) + 1
        out.append(o - 1 if p and (o - 1) * s >= n + p else o)
    y = np.zeros((num, channels, *out))
    for ph, pw in itertools.product(*map(range, out)):
        h0, w0 = ph * stride[0] - pad[0], pw * stride[1] - pad[1]
        h1, w1 = min(h0 + kernel[0], spatial[0] + pad[0]), min(w0 + kernel[1], spatial[1] + pad[1])
        window = x[:, :, max(h0, 0):min(h1, spatial[0]), max(w0, 0):min(w1, spatial[1])].astype(np.float64)
        y[:, :, ph, pw] = window.max(axis=(2, 3)) if method == "MAX" else window.sum(axis=(2, 3)) / ((h1 - h0) * (w1 - w0))
    return y


def spp_ref(x, height, method):
    levels = []
    for level in range(height):
        bins = 2 ** level
        kernel = [-(-n // bins) for n in x.shape[2:]]
        pad = [(k * bins - n + 1) // 2 for k, n in zip(kernel, x.shape[2:])]
        levels.append(pool_ref(x, kernel, kernel, pad, method))
    if height == 1:
        return levels[0]
    return np.concatenate([y.reshape(x.shape[0], -1) for y in levels], axis=1)


@pytest.mark.parametrize("method", ["MAX", "AVE"])
@pytest.mark.parametrize("height,shape,width", [
    (1, (2, 3, 5, 7), None),  # one level: the pooled (N, C, 1, 1), not flattened
    (2, (2, 3, 5, 7), 3 * (1 + 4)),
    (3, (2, 2, 7, 9), 2 * (1 + 4 + 16)),
    (3, (1, 3, 8, 6), 3 * (1 + 4 + 16)),
    (4, (1, 2, 15, 16), 2 * (1 + 4 + 16 + 64)),
])
def test_spp_matches_reference(method, height, shape, width):
    x = rand(*shape)
    _, _, top = run(f'type: "SPP" spp_param {{ pyramid_height: {height} pool: {method} }}', x)
    expected = spp_ref(x, height, method)
    assert top[0].shape == ((shape[0], shape[1], 1, 1) if width is None else (shape[0], width))
    np.testing.assert_allclose(top[0].data, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["MAX", "AVE"])
@pytest.mark.parametrize("height,shape", [(1, (2, 2, 3, 5)), (3, (2, 2, 7, 6)), (2, (1, 3, 5, 3))])
def test_spp_gradient(method, height, shape):
    layer = make_layer(f'type: "SPP" spp_param {{ pyramid_height: {height} pool: {method} }}')
    bottom = blobs_from(distinct(*shape))
    check_gradient(layer, bottom, setup_layer(layer, bottom))


def test_spp_follows_the_input_size():
    layer, bottom, top = run('type: "SPP" spp_param { pyramid_height: 2 }', rand(1, 2, 6, 6))
    bottom[0].reshape(3, 2, 9, 7)
    bottom[0].data[...] = rand(3, 2, 9, 7)
    layer.forward(bottom, top)
    np.testing.assert_allclose(top[0].data, spp_ref(bottom[0].data, 2, "MAX"), rtol=1e-6)


def test_spp_stochastic_levels():
    """STOCHASTIC levels need no padding (inputs the bins divide); TEST gives the weighted averages."""
    x = positive(2, 3, 8, 4)
    _, _, top = run('type: "SPP" spp_param { pyramid_height: 3 pool: STOCHASTIC }', x, phase=caffe_pb2.TEST)
    parts, start = [], 0
    for bins in (1, 2, 4):
        kh, kw = 8 // bins, 4 // bins
        windows = x.astype(np.float64).reshape(2, 3, bins, kh, bins, kw)
        parts.append(((windows ** 2).sum(axis=(3, 5)) / windows.sum(axis=(3, 5))).reshape(2, -1))
    np.testing.assert_allclose(top[0].data, np.concatenate(parts, axis=1), rtol=1e-5)


@pytest.mark.parametrize("text,shape,message", [
    ('spp_param { pyramid_height: 2 }', (2, 3, 4), "4 axes"),
    ('spp_param { pyramid_height: 0 }', (1, 2, 4, 4), "at least 1"),
    ('spp_param { pyramid_height: 3 }', (1, 2, 5, 8), "pad .* must be smaller than the kernel"),  # 5 into 4 bins
    ('spp_param { pyramid_height: 2 pool: STOCHASTIC }', (1, 2, 5, 4), "padding is implemented only"),
])
def test_spp_errors(text, shape, message):
    with pytest.raises(KaffeError, match=message):
        run(f'type: "SPP" {text}', rand(*shape))


# -- Pooling STOCHASTIC ------------------------------------------------------------------------------------
def windows_of(shape, kernel, stride):
    """(ph, pw, rows, cols) of every window: ceil rounding, no padding, clipped at the input's end."""
    h, w = shape
    out = [-(-(n - k) // s) + 1 for n, k, s in zip(shape, kernel, stride)]
    for ph, pw in itertools.product(*map(range, out)):
        rows = range(ph * stride[0], min(ph * stride[0] + kernel[0], h))
        cols = range(pw * stride[1], min(pw * stride[1] + kernel[1], w))
        yield ph, pw, rows, cols


def stochastic_train_ref(x, kernel, stride, seed):
    """(values, flat indices): u from the Dropout counter generator (24 bits, in (0, 1]); the first element at
    which the running window sum reaches u * the window sum."""
    num, channels, h, w = x.shape
    out = [-(-(n - k) // s) + 1 for n, k, s in zip((h, w), kernel, stride)]
    u = ((dropout_bits(seed, num * channels * out[0] * out[1]) >> 8) + 1) / 2.0 ** 24
    u = u.reshape(num, channels, *out)
    values, index = np.zeros((num, channels, *out)), np.zeros((num, channels, *out), dtype=int)
    for n, c in itertools.product(range(num), range(channels)):
        for ph, pw, rows, cols in windows_of((h, w), kernel, stride):
            cells = [(r, q) for r in rows for q in cols]
            total = sum(float(x[n, c, r, q]) for r, q in cells)
            running = 0.0
            for r, q in cells:
                running += float(x[n, c, r, q])
                if running >= u[n, c, ph, pw] * total:
                    values[n, c, ph, pw], index[n, c, ph, pw] = x[n, c, r, q], r * w + q
                    break
    return values, index


def stochastic_test_ref(x, kernel, stride):
    num, channels, h, w = x.shape
    out = [-(-(n - k) // s) + 1 for n, k, s in zip((h, w), kernel, stride)]
    y = np.zeros((num, channels, *out))
    for ph, pw, rows, cols in windows_of((h, w), kernel, stride):
        window = x[:, :, rows.start:rows.stop, cols.start:cols.stop].astype(np.float64)
        y[:, :, ph, pw] = (window ** 2).sum(axis=(2, 3)) / window.sum(axis=(2, 3))
    return y


STOCHASTIC_CASES = [
    ((2, 3, 6, 6), "kernel_size: 2 stride: 2", (2, 2), (2, 2)),
    ((2, 2, 7, 8), "kernel_size: 3 stride: 2", (3, 3), (2, 2)),  # the last windows are clipped
    ((1, 3, 5, 7), "kernel_h: 2 kernel_w: 3 stride_h: 1 stride_w: 2", (2, 3), (1, 2)),
    ((2, 2, 4, 5), "global_pooling: true", (4, 5), (1, 1)),
]


def stochastic_text(geometry):
    return f'type: "Pooling" pooling_param {{ pool: STOCHASTIC {geometry} }}'


@pytest.mark.parametrize("shape,geometry,kernel,stride", STOCHASTIC_CASES)
def test_stochastic_pooling_train_matches_reference(shape, geometry, kernel, stride):
    x = positive(*shape)
    layer, bottom, top = run(stochastic_text(geometry), x)
    values, index = stochastic_train_ref(x, kernel, stride, layer.seed)
    np.testing.assert_array_equal(top[0].data, values.astype(np.float32))
    np.testing.assert_array_equal(layer.argmax, index)
    # backward: each output's gradient goes to its sampled element
    dy = rand(*top[0].shape, seed=4)
    top[0].diff[...] = dy
    layer.backward(top, [True], bottom)
    expected = np.zeros(shape)
    for n, c in itertools.product(range(shape[0]), range(shape[1])):
        for (ph, pw), at in np.ndenumerate(index[n, c]):
            expected[n, c, at // shape[3], at % shape[3]] += dy[n, c, ph, pw]
    np.testing.assert_allclose(bottom[0].diff, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape,geometry,kernel,stride", STOCHASTIC_CASES)
def test_stochastic_pooling_test_matches_reference(shape, geometry, kernel, stride):
    x = positive(*shape)
    _, _, top = run(stochastic_text(geometry), x, phase=caffe_pb2.TEST)
    np.testing.assert_allclose(top[0].data, stochastic_test_ref(x, kernel, stride), rtol=1e-5)


def test_stochastic_pooling_samples_in_proportion_to_the_activations():
    x = np.tile(np.array([[1, 2], [3, 4]], np.float32), (400, 25, 1, 1))  # 10000 windows of one 2 x 2 pattern
    _, _, top = run(stochastic_text("kernel_size: 2"), x)
    frequencies = np.array([(top[0].data == v).mean() for v in (1, 2, 3, 4)])
    np.testing.assert_allclose(frequencies, np.array([1, 2, 3, 4]) / 10, atol=0.015)


def test_stochastic_pooling_draws_from_the_device_generator():
    x = positive(2, 3, 6, 6)
    text = stochastic_text("kernel_size: 3 stride: 3")
    layer, bottom, top = run(text, x)
    first = top[0].data.copy()
    layer.forward(bottom, top)  # a new seed each forward
    assert not np.array_equal(top[0].data, first)
    device.set_random_seed(1234)
    _, _, again = run(text, x)  # same generator state: same draw
    np.testing.assert_array_equal(again[0].data, first)


def test_stochastic_pooling_zero_windows():
    """A window of zeros gives 0 (TRAIN: its first element; TEST: 0 / FLT_MIN)."""
    x = np.zeros((1, 1, 4, 4), np.float32)
    x[0, 0, 2:, 2:] = 1.0
    layer, bottom, top = run(stochastic_text("kernel_size: 2 stride: 2"), x)
    np.testing.assert_array_equal(top[0].data[0, 0], [[0, 0], [0, 1]])
    assert list(layer.argmax[0, 0, 0]) == [0, 2]
    _, _, test_top = run(stochastic_text("kernel_size: 2 stride: 2"), x, phase=caffe_pb2.TEST)
    np.testing.assert_array_equal(test_top[0].data[0, 0], [[0, 0], [0, 1]])


@pytest.mark.parametrize("phase", [caffe_pb2.TRAIN, caffe_pb2.TEST])
@pytest.mark.parametrize("shape,geometry", [((2, 2, 5, 7), "kernel_size: 3 stride: 2"),
                                            ((1, 3, 4, 5), "kernel_h: 2 kernel_w: 3 stride: 1")])
def test_stochastic_pooling_gradient(phase, shape, geometry):
    """TRAIN: the checker's fixed seed makes each forward draw the same u; values far apart keep the choice."""
    layer = make_layer(stochastic_text(geometry), phase)
    bottom = blobs_from(positive(*shape) * 4 + 1)
    check_gradient(layer, bottom, setup_layer(layer, bottom), step=1e-3)


def test_stochastic_pooling_refuses_padding():
    with pytest.raises(KaffeError, match="padding is implemented only for average and max"):
        run(stochastic_text("kernel_size: 3 pad: 1"), positive(1, 1, 4, 4))
