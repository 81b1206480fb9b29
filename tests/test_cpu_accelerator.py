"""The compiled CPU accelerator (engine/accelerator.py, layers/cpu_kernels.py) against the numpy path it replaces
(KAFFE_ACCEL=0): depthwise convolution forward and both backward directions, im2col, col2im, max pooling's
forward with and without argmax and its backward with Caffe's first-maximum tie rule, LRN's window sums, the
Winograd convolution's transforms (against the direct sums), a convolution's bias and ReLU pass; gradient checks
with it on; numpy alone when numba is missing."""
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from gradient_check import blobs_from, check_gradient, make_layer, rand32, setup_layer

from kaffe.engine import accelerator, device
from kaffe.layers import vision
from kaffe.layers.neuron import relu
from kaffe.layers.vision import col2im, im2col
from kaffe.proto import caffe_pb2

pytest.importorskip("numba")


@pytest.fixture(autouse=True)
def seeded():
    device.set_random_seed(1234)


def run_both(monkeypatch, text, x, num_top=1, prefill_diffs=False):
    """Forward and backward of one layer with the accelerator on and off: per run, the tops' data, the bottom
    diff and the parameter diffs (added to a non-zero start when prefill_diffs)."""
    results = []
    for accel in ("1", "0"):
        monkeypatch.setenv("KAFFE_ACCEL", accel)
        device.set_random_seed(1234)
        layer = make_layer(text)
        bottom = blobs_from(x)
        top = setup_layer(layer, bottom, num_top=num_top)
        for blob in layer.blobs:
            blob.mutable_cpu_diff()[...] = 0.25 if prefill_diffs else 0
        layer.forward(bottom, top)
        top[0].mutable_cpu_diff()[...] = rand32(*top[0].shape, seed=5)
        layer.backward(top, [True], bottom)
        results.append([t.cpu_data().copy() for t in top] + [bottom[0].cpu_diff().copy()] +
                       [blob.cpu_diff().copy() for blob in layer.blobs])
    return results


def assert_close(accelerated, reference):
    for got, want in zip(accelerated, reference):
        scale = max(float(np.abs(want).max()), 1.0)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale)


def convolution_output(text, x, phase=caffe_pb2.TRAIN, **flags):
    """(the layer, its top) after one forward of a freshly seeded layer of `text` on x, with the optimiser's
    flags (winograd, shifted_taps, fused_relu) set on it."""
    device.set_random_seed(1234)
    layer = make_layer(text, phase=phase)
    bottom = blobs_from(x)
    top = setup_layer(layer, bottom)
    for name, value in flags.items():
        setattr(layer, name, value)
    layer.forward(bottom, top)
    return layer, top[0].cpu_data().copy()


def depthwise_text(channels, geometry, multiplier=1, bias=True, extra=""):
    return (f'type: "Convolution" convolution_param {{ num_output: {channels * multiplier} group: {channels} '
            f'bias_term: {"true" if bias else "false"} {geometry} weight_filler {{ type: "gaussian" std: 0.5 }} '
            f'bias_filler {{ type: "gaussian" std: 0.5 }} }} {extra}')


DEPTHWISE_CASES = [
    # (input shape, geometry, channel multiplier, bias)
    ((1, 3, 7, 9), "kernel_size: 3 pad: 1", 1, True),                      # MobileNet's conv*/dw, batch 1
    ((3, 4, 9, 7), "kernel_size: 3 stride: 2 pad: 1", 1, True),            # its stride-2 layers, odd sizes
    ((3, 2, 8, 11), "kernel_size: 3 stride: 2 pad: 2 dilation: 2", 1, False),
    ((1, 3, 6, 5), "kernel_h: 2 kernel_w: 3 stride_h: 1 stride_w: 2 pad_h: 0 pad_w: 1", 2, True),  # multiplier 2
    ((3, 2, 5, 5), "kernel_size: 5 pad: 3", 1, True),                      # taps reading padding only
    ((1, 5, 13, 13), "kernel_size: 3", 3, False),
]


@pytest.mark.parametrize("shape,geometry,multiplier,bias", DEPTHWISE_CASES)
def test_depthwise_convolution_matches_the_numpy_path(monkeypatch, shape, geometry, multiplier, bias):
    accelerated, reference = run_both(monkeypatch, depthwise_text(shape[1], geometry, multiplier, bias),
                                      rand32(*shape), prefill_diffs=True)
    assert_close(accelerated, reference)


def test_depthwise_convolution_with_frozen_weights_or_bias(monkeypatch):
    """lr_mult 0 on the weights: the bias gradient alone; on the bias: the weights alone."""
    for params in ('param { lr_mult: 0 } param { lr_mult: 1 }', 'param { lr_mult: 1 } param { lr_mult: 0 }'):
        accelerated, reference = run_both(monkeypatch, depthwise_text(3, "kernel_size: 3 pad: 1", extra=params),
                                          rand32(2, 3, 5, 6), prefill_diffs=True)
        assert_close(accelerated, reference)


@pytest.mark.parametrize("shape,geometry,multiplier,bias", DEPTHWISE_CASES[:4])
def test_depthwise_convolution_with_the_fused_relu_is_relu_of_its_output(monkeypatch, shape, geometry, multiplier,
                                                                          bias):
    """The optimiser's fused ReLU inside the kernel gives layers/neuron.py's relu of the plain output, bit for bit:
    -0 to +0, NaN kept, -inf to NaN."""
    monkeypatch.setenv("KAFFE_ACCEL", "1")
    x = rand32(*shape)
    x.flat[::7], x.flat[3::11], x.flat[5::13] = np.inf, -np.inf, np.nan
    x.flat[1::5] = -0.0
    outputs = []
    for fused in (False, True):
        device.set_random_seed(1234)
        layer = make_layer(depthwise_text(shape[1], geometry, multiplier, bias))
        bottom = blobs_from(x)
        top = setup_layer(layer, bottom)
        layer.fused_relu = fused
        layer.forward(bottom, top)
        outputs.append(top[0].cpu_data().copy())
    plain, fused = outputs
    assert np.isnan(plain).any() and (plain == -np.inf).any()
    want = np.empty_like(plain)
    relu(plain, want)
    np.testing.assert_array_equal(fused.view(np.uint32), want.view(np.uint32))


WINOGRAD_CASES = [
    # (input shape, num_output, pad, bias): output sides that 4x4 tiles do and do not divide, several samples
    ((1, 6, 8, 8), 5, 1, True),
    ((3, 4, 9, 7), 6, 1, True),        # 3 samples, odd sides, tiles past both edges
    ((2, 5, 10, 13), 3, 0, False),     # no padding
    ((1, 3, 6, 5), 4, 2, True),        # padding wider than the window's reach
    ((2, 16, 14, 14), 24, 1, True),
]


def winograd_and_direct(monkeypatch, shape, outputs, pad, bias, x, fused_relu=False):
    """The tops of one 3x3 convolution with `winograd` set (the thresholds lowered to take these small shapes)
    and without it."""
    monkeypatch.setenv("KAFFE_ACCEL", "1")
    monkeypatch.setattr(vision, "WINOGRAD_MIN_CHANNELS", 1)
    monkeypatch.setattr(vision, "WINOGRAD_MIN_SIDE", 1)
    text = (f'type: "Convolution" convolution_param {{ num_output: {outputs} kernel_size: 3 pad: {pad} '
            f'bias_term: {"true" if bias else "false"} weight_filler {{ type: "gaussian" std: 0.5 }} '
            f'bias_filler {{ type: "gaussian" std: 0.5 }} }}')
    tops = []
    for winograd in (True, False):
        layer, output = convolution_output(text, x, phase=caffe_pb2.TEST, winograd=winograd, fused_relu=fused_relu)
        assert layer._runs_winograd() == winograd
        tops.append(output)
    return tops


@pytest.mark.parametrize("shape,outputs,pad,bias", WINOGRAD_CASES)
def test_winograd_convolution_matches_the_direct_sums(monkeypatch, shape, outputs, pad, bias):
    """Within 2e-5 of the output's scale (F(4x4, 3x3) measured at 1e-6 to 3e-6 here, 1.4e-5 with VGG-16's 512
    channels)."""
    winograd, direct = winograd_and_direct(monkeypatch, shape, outputs, pad, bias, rand32(*shape))
    np.testing.assert_allclose(winograd, direct, rtol=0, atol=2e-5 * np.abs(direct).max())


def test_winograd_convolution_with_the_fused_relu_is_relu_of_its_output(monkeypatch):
    shape, outputs, pad, bias = WINOGRAD_CASES[1]
    plain, _ = winograd_and_direct(monkeypatch, shape, outputs, pad, bias, rand32(*shape))
    fused, _ = winograd_and_direct(monkeypatch, shape, outputs, pad, bias, rand32(*shape), fused_relu=True)
    want = np.empty_like(plain)
    relu(plain, want)
    assert (plain < 0).any()
    np.testing.assert_array_equal(fused.view(np.uint32), want.view(np.uint32))


def test_winograd_weights_follow_the_weights(monkeypatch):
    """The transformed weights are derived again when the layer's weights change (net surgery, copy_from)."""
    monkeypatch.setenv("KAFFE_ACCEL", "1")
    monkeypatch.setattr(vision, "WINOGRAD_MIN_CHANNELS", 1)
    monkeypatch.setattr(vision, "WINOGRAD_MIN_SIDE", 1)
    layer = make_layer('type: "Convolution" convolution_param { num_output: 3 kernel_size: 3 pad: 1 '
                       'weight_filler { type: "gaussian" std: 0.5 } }', phase=caffe_pb2.TEST)
    bottom = blobs_from(rand32(1, 2, 6, 6))
    top = setup_layer(layer, bottom)
    layer.winograd = True
    layer.forward(bottom, top)
    layer.blobs[0].mutable_cpu_data()[...] *= 2
    layer.forward(bottom, top)
    doubled = top[0].cpu_data().copy()
    layer.winograd = False
    layer.forward(bottom, top)
    np.testing.assert_allclose(doubled, top[0].cpu_data(), rtol=0, atol=2e-5 * np.abs(doubled).max())


@pytest.mark.parametrize("shape,geometry,multiplier,bias", DEPTHWISE_CASES[1:4])
def test_depthwise_convolution_gradient_with_the_accelerator(monkeypatch, shape, geometry, multiplier, bias):
    monkeypatch.setenv("KAFFE_ACCEL", "1")
    layer = make_layer(depthwise_text(shape[1], geometry, multiplier, bias))
    bottom = blobs_from(rand32(*shape))
    top = setup_layer(layer, bottom)
    assert layer._compiled_depthwise()
    check_gradient(layer, bottom, top)


@pytest.mark.parametrize("geometry,shape", [
    ("kernel_size: 3 stride: 2", (3, 3, 9, 8)),            # overlapping windows (CIFAR-10, AlexNet)
    ("kernel_size: 3 stride: 2 pad: 1", (1, 4, 8, 7)),     # padded and clipped windows (GoogLeNet)
    ("kernel_size: 3 stride: 1 pad: 1", (3, 2, 5, 6)),
    ("kernel_size: 2 stride: 2", (1, 3, 8, 6)),            # tiling windows (LeNet)
    ("kernel_size: 3 stride: 2 round_mode: FLOOR", (3, 2, 10, 9)),
    ("kernel_h: 2 kernel_w: 3 stride_h: 1 stride_w: 2", (1, 2, 5, 7))])
def test_max_pooling_backward_is_bit_identical_to_the_numpy_path(monkeypatch, geometry, shape):
    """Integer inputs give many ties: the gradient goes to the first maximum in window order, as in Caffe; the
    argmax top is the forward's either way."""
    x = np.random.default_rng(11).integers(0, 4, size=shape).astype(np.float32)
    accelerated, reference = run_both(monkeypatch, f'type: "Pooling" pooling_param {{ pool: MAX {geometry} }}', x,
                                      num_top=2)
    for got, want in zip(accelerated, reference):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("geometry,shape", [
    ("kernel_size: 3 stride: 2", (3, 3, 9, 8)),
    ("kernel_size: 3 stride: 2 pad: 1", (2, 4, 8, 7)),
    ("kernel_size: 3 stride: 1 pad: 1", (3, 2, 5, 6)),
    ("kernel_size: 2 stride: 2", (1, 3, 8, 6)),
    ("kernel_size: 3 pad: 2 stride: 3", (2, 2, 7, 7)),   # windows over padding only: -FLT_MAX, as Caffe
    ("kernel_h: 2 kernel_w: 3 stride_h: 1 stride_w: 2", (1, 2, 5, 7))])
def test_max_pooling_forward_without_argmax_is_bit_identical_to_the_numpy_path(monkeypatch, geometry, shape):
    """A MAX pooling whose backward never runs takes one compiled pass, with Caffe's values: NaN and -inf never
    win, a window of those only gives -FLT_MAX."""
    x = np.random.default_rng(12).integers(-3, 4, size=shape).astype(np.float32)
    x.flat[::7] = np.nan
    x.flat[::11] = -np.inf
    x[0, 0] = -np.inf
    x[-1, -1, :2] = np.nan
    tops = []
    for accel in ("1", "0"):
        monkeypatch.setenv("KAFFE_ACCEL", accel)
        layer = make_layer(f'type: "Pooling" pooling_param {{ pool: MAX {geometry} }}')
        bottom = blobs_from(x)
        top = setup_layer(layer, bottom)
        layer.needs_backward = False
        layer.forward(bottom, top)
        tops.append(top[0].data.copy())
    np.testing.assert_array_equal(tops[0], tops[1])
    assert (tops[0] == -np.finfo(np.float32).max).any()


@pytest.mark.parametrize("geometry,shape", [
    ("kernel_size: 3 stride: 2", (3, 3, 9, 8)),
    ("kernel_size: 3 stride: 2 pad: 1", (2, 4, 8, 7)),
    ("kernel_size: 2 stride: 2", (2, 3, 8, 6))])
@pytest.mark.parametrize("special", ["ties", "nan", "nan window"])
def test_max_pooling_forward_with_argmax_is_bit_identical_to_the_numpy_path(monkeypatch, geometry, shape, special):
    """Training's MAX forward keeps the argmax for backward: compiled, the values, the argmax top and the
    gradient are the numpy path's, with ties (zeros of both signs), NaN and -inf cells, and windows of NaN only
    (where the compiled pass hands over to the numpy path, as Caffe leaves -FLT_MAX and argmax -1 there)."""
    x = np.random.default_rng(15).integers(-2, 3, size=shape).astype(np.float32)
    x[x == 0] = np.float32(-0.0) * (np.arange((x == 0).sum()) % 2)
    if special != "ties":
        x.flat[::7] = np.nan
        x.flat[::13] = -np.inf
    if special == "nan window":
        x[0, 0, :3, :3] = np.nan
    accelerated, reference = run_both(monkeypatch, f'type: "Pooling" pooling_param {{ pool: MAX {geometry} }}', x,
                                      num_top=2)
    for got, want in zip(accelerated, reference):
        np.testing.assert_array_equal(got, want)


COLUMN_CASES = [
    ((6, 20, 12, 12), (5, 5), (1, 1), (0, 0), (1, 1)),    # LeNet's conv2
    ((3, 4, 9, 8), (3, 3), (2, 2), (1, 1), (1, 1)),       # overlapping strided windows, padding
    ((2, 3, 11, 10), (3, 2), (1, 2), (2, 1), (2, 1)),     # per-axis geometry, dilation
    ((1, 5, 7, 7), (3, 3), (1, 1), (1, 1), (1, 1)),       # one sample
    ((1, 3, 13, 13), (5, 5), (4, 4), (0, 0), (1, 1)),     # AlexNet-like conv1: windows skip cells
    ((2, 2, 4, 5), (3, 3), (1, 1), (4, 3), (1, 1))]       # padding wider than the reach: rows of zeros


@pytest.mark.parametrize("shape,kernel,stride,pad,dilation", COLUMN_CASES)
def test_im2col_is_bit_identical_to_the_numpy_path(monkeypatch, shape, kernel, stride, pad, dilation):
    """The compiled batch-outer columns (and one sample's, which are the batch-innermost ones too)."""
    x = rand32(*shape)
    for batch_last in (False, True):
        columns = []
        for accel in ("1", "0"):
            monkeypatch.setenv("KAFFE_ACCEL", accel)
            columns.append(im2col(x, kernel, stride, pad, dilation, batch_last=batch_last,
                                  out=np.full(im2col(x, kernel, stride, pad, dilation).size, np.nan, np.float32)))
        np.testing.assert_array_equal(columns[0], columns[1])


@pytest.mark.parametrize("shape,kernel,stride,pad,dilation", COLUMN_CASES)
def test_col2im_is_bit_identical_to_the_numpy_path(monkeypatch, shape, kernel, stride, pad, dilation):
    columns = im2col(rand32(*shape), kernel, stride, pad, dilation, batch_last=True)
    columns = np.random.default_rng(14).standard_normal(columns.shape).astype(np.float32)
    images = []
    for accel in ("1", "0"):
        monkeypatch.setenv("KAFFE_ACCEL", accel)
        images.append(col2im(columns, shape, kernel, stride, pad, dilation, batch_last=True))
    np.testing.assert_array_equal(images[0], images[1])


def test_convolution_backward_with_the_compiled_col2im(monkeypatch):
    """A convolution whose columns keep the batch innermost (C x kernel >= 4 x outputs): its bottom diff goes
    through the compiled col2im, with the numpy path's values."""
    text = ('type: "Convolution" convolution_param { num_output: 4 kernel_size: 3 stride: 2 pad: 1 '
            'weight_filler { type: "gaussian" std: 0.5 } bias_filler { type: "gaussian" std: 0.5 } }')
    accelerated, reference = run_both(monkeypatch, text, rand32(3, 5, 9, 8))
    for got, want in zip(accelerated, reference):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("size,shape", [(5, (2, 7, 4, 3)), (3, (1, 2, 5, 5)), (7, (2, 4, 3, 2))])
def test_lrn_across_channels_is_bit_identical_to_the_numpy_path(monkeypatch, size, shape):
    """The compiled window sums give the numpy path's bits, forward and backward (which reads the kept scale),
    windows wider than the channels included."""
    x = np.random.default_rng(13).standard_normal(shape).astype(np.float32) * 3
    accelerated, reference = run_both(monkeypatch, f'type: "LRN" lrn_param {{ local_size: {size} alpha: 0.3 '
                                                   f'beta: 0.75 k: 2 }}', x)
    for got, want in zip(accelerated, reference):
        np.testing.assert_array_equal(got, want)


def test_max_pooling_gradient_with_the_accelerator(monkeypatch):
    monkeypatch.setenv("KAFFE_ACCEL", "1")
    layer = make_layer('type: "Pooling" pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 }')
    bottom = blobs_from(np.random.default_rng(3).permutation(2 * 2 * 7 * 7).reshape(2, 2, 7, 7) * 0.05)
    top = setup_layer(layer, bottom)
    check_gradient(layer, bottom, top)


def test_bias_relu_kernel_is_numpys_sums_and_relu_bit_for_bit():
    """A convolution's epilogue in one pass: numpy's bias sum, the fused Eltwise sum's np.add and
    layers/neuron.py's relu, special values included (-0 to +0, NaN kept, -inf to NaN, -inf + inf to NaN)."""
    rng = np.random.default_rng(7)
    y = rng.standard_normal((3, 5, 37)).astype(np.float32)
    y.flat[::7], y.flat[3::11], y.flat[5::13], y.flat[1::5] = np.inf, -np.inf, np.nan, -0.0
    residual = rng.standard_normal((3, 5, 37)).astype(np.float32)
    residual.flat[::9], residual.flat[2::17], residual.flat[4::6] = -np.inf, np.nan, -0.0
    bias = np.array([0.5, -0.0, 0.0, np.inf, -2.0], dtype=np.float32)
    for add_bias in (False, True):
        for add_residual in (False, True):
            for fused_relu in (False, True):
                with np.errstate(invalid="ignore"):   # -inf + inf
                    want = y + bias.reshape(1, -1, 1) if add_bias else y.copy()
                    if add_residual:
                        np.add(want, residual, out=want)
                if fused_relu:
                    relu(want, want)
                got = y.copy()
                accelerator.kernels().bias_relu(got, bias, residual if add_residual else vision.NO_RESIDUAL,
                                                add_bias, add_residual, fused_relu)
                np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("channels, geometry, shifted_taps", [(4, "kernel_size: 1", False),
                                                             (4, "kernel_size: 3 pad: 1 group: 2", False),
                                                             (96, "kernel_size: 3 pad: 1", True)])
def test_convolution_bias_and_fused_relu_match_the_numpy_path(monkeypatch, channels, geometry, shifted_taps):
    """Pointwise, grouped and shifted_taps convolutions add their bias after the GEMMs (and the optimiser's
    ReLU): bit-identical with the accelerator on and off, on data whose signs are random."""
    x = rand32(1, channels, 9, 10)
    for fused in (False, True):
        outputs = []
        for accel in ("1", "0"):
            monkeypatch.setenv("KAFFE_ACCEL", accel)
            layer, output = convolution_output(
                f'type: "Convolution" convolution_param {{ num_output: 6 {geometry} weight_filler {{ type: '
                f'"gaussian" std: 0.5 }} bias_filler {{ type: "gaussian" std: 0.5 }} }}', x,
                fused_relu=fused, shifted_taps=shifted_taps)
            assert layer._runs_shifted_taps() == shifted_taps
            outputs.append(output)
        assert (outputs[1] < 0).any() != fused
        np.testing.assert_array_equal(outputs[0].view(np.uint32), outputs[1].view(np.uint32))


def test_kaffe_accel_0_turns_it_off(monkeypatch):
    monkeypatch.setenv("KAFFE_ACCEL", "1")
    assert accelerator.enabled()
    monkeypatch.setenv("KAFFE_ACCEL", "0")
    assert not accelerator.enabled()


def run_python(code):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300)


def test_import_kaffe_does_not_import_numba():
    done = run_python("import sys, kaffe; print('numba' in sys.modules)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_without_numba_the_numpy_path_runs_with_one_info_line():
    done = run_python("""
        import sys
        sys.modules["numba"] = None  # as if it were not installed: `import numba` raises ImportError
        import numpy as np
        import kaffe
        from kaffe.engine.log import init_log
        init_log(stream=sys.stdout)
        net_text = '''
        input: "data" input_shape { dim: 2 dim: 3 dim: 8 dim: 8 } force_backward: true
        layer { name: "dw" type: "Convolution" bottom: "data" top: "dw"
                convolution_param { num_output: 3 group: 3 kernel_size: 3 pad: 1 weight_filler { type: "xavier" } } }
        layer { name: "pool" type: "Pooling" bottom: "dw" top: "pool"
                pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
        layer { name: "dw2" type: "Convolution" bottom: "pool" top: "dw2"
                convolution_param { num_output: 3 group: 3 kernel_size: 3 weight_filler { type: "xavier" } } }
        '''
        import tempfile
        with tempfile.NamedTemporaryFile("w", suffix=".prototxt", delete=False) as f:
            f.write(net_text)
        net = kaffe.Net(f.name, kaffe.TRAIN)
        net.blobs["data"].data[...] = np.random.default_rng(0).standard_normal((2, 3, 8, 8))
        for _ in range(2):
            net.forward()
            net.blobs["dw2"].diff[...] = 1
            net.backward()
        print("finite", bool(np.isfinite(net.blobs["data"].diff).all()))
    """)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count('pip install "kaffe[accel]"') == 1
    assert "finite True" in done.stdout
