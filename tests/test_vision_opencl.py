"""OpenCL Convolution, Pooling, LRN and InnerProduct: parity with the CPU code, gradients in GPU mode, and a
conv -> pool -> ip chain that stays on the device."""
import numpy as np
import pytest
from gradient_check import blobs_from, check_gradient, check_parity, distinct_centred as distinct, make_layer, \
    opencl_available, rand32 as rand, setup_layer

from kaffe.engine.blob import Blob
from kaffe.engine.syncedmem import HEAD_AT_GPU
from kaffe.layers import vision

pytestmark = [pytest.mark.opencl,
              pytest.mark.skipif(not opencl_available(), reason="no OpenCL platform (install pocl-opencl-icd)")]

FILLERS = 'weight_filler { type: "gaussian" std: 0.5 } bias_filler { type: "gaussian" std: 0.5 }'


# -- Convolution --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,geometry", [
    ((2, 3, 7, 9), "num_output: 5 kernel_size: 3"),
    ((3, 4, 9, 8), "num_output: 6 kernel_size: 3 pad: 1 stride: 2 group: 2"),
    ((2, 6, 11, 10), "num_output: 3 kernel_h: 3 kernel_w: 2 pad_h: 2 pad_w: 0 stride_h: 3 stride_w: 1 group: 3"),
    ((2, 4, 12, 13), "num_output: 4 kernel_size: 3 dilation: 2 pad: 2 stride: 2 group: 4"),
    ((1, 2, 5, 5), "num_output: 2 kernel_size: 5 kernel_size: 1 dilation: 1 dilation: 3 pad: 0 pad: 3"),
    ((2, 3, 4, 6), "num_output: 4 kernel_size: 1 stride: 2"),
])
def test_convolution_parity(shape, geometry):
    check_parity(f'type: "Convolution" convolution_param {{ {geometry} {FILLERS} }}', [rand(*shape)])


def test_convolution_without_bias_and_several_bottoms():
    text = f'type: "Convolution" convolution_param {{ num_output: 4 kernel_size: 3 pad: 1 bias_term: false {FILLERS} }}'
    check_parity(text, [rand(2, 3, 6, 7), rand(2, 3, 6, 7, seed=1), rand(2, 3, 6, 7, seed=2)], num_top=3)


def test_convolution_1d_and_batch_axes():
    """1-D runs the 2-D kernels with a unit row; axes before `axis` are all batch."""
    check_parity(f'type: "Convolution" convolution_param {{ num_output: 3 kernel_size: 3 pad: 1 stride: 2 {FILLERS} }}',
                 [rand(2, 4, 11)])
    check_parity(f'type: "Convolution" convolution_param {{ num_output: 3 kernel_size: 2 axis: 2 {FILLERS} }}',
                 [rand(2, 3, 2, 5, 6)])


def test_convolution_3d_falls_back_to_cpu():
    check_parity(f'type: "Convolution" convolution_param {{ num_output: 2 kernel_size: 2 {FILLERS} }}',
                 [rand(2, 2, 3, 4, 5)])


def test_convolution_in_sample_chunks(monkeypatch):
    """Columns over the limit are processed a few samples at a time (here 2 + 2 + 1)."""
    monkeypatch.setattr(vision, "COLUMN_BUFFER_LIMIT", 2 * 2 * 9 * 25)
    check_parity(f'type: "Convolution" convolution_param {{ num_output: 4 kernel_size: 3 pad: 1 group: 2 {FILLERS} }}',
                 [rand(5, 2, 5, 5)])


def test_convolution_gradient_gpu(gpu_mode):
    layer = make_layer(f'type: "Convolution" convolution_param {{ num_output: 4 kernel_size: 3 pad: 1 stride: 2 '
                       f'dilation: 2 group: 2 {FILLERS} }}')
    bottom = blobs_from(rand(2, 4, 5, 6), rand(2, 4, 5, 6, seed=1))
    top = setup_layer(layer, bottom, 2)
    check_gradient(layer, bottom, top, step=1e-2, threshold=1e-2)


def test_convolution_accumulates_parameter_diffs(gpu_mode):
    layer = make_layer(f'type: "Convolution" convolution_param {{ num_output: 3 kernel_size: 2 {FILLERS} }}')
    bottom = blobs_from(rand(2, 2, 4, 4))
    top = setup_layer(layer, bottom)
    layer.forward(bottom, top)
    top[0].diff[...] = rand(*top[0].shape, seed=3)
    sums = []
    for _ in range(2):
        layer.backward(top, [True], bottom)
        sums.append([p.diff.copy() for p in layer.blobs])
    for once, twice in zip(*sums):
        np.testing.assert_allclose(twice, 2 * once, rtol=1e-5, atol=1e-6)


# -- Pooling ------------------------------------------------------------------------------------------------
POOLINGS = [
    ((2, 3, 7, 9), "kernel_size: 3 stride: 2"),                        # overhanging last window (ceil)
    ((2, 2, 6, 6), "kernel_size: 3 stride: 2 pad: 1"),
    ((2, 2, 4, 5), "kernel_size: 3 stride: 2 pad: 2"),                 # the last row of windows starts in the
                                                                       # padding: dropped
    ((1, 3, 5, 8), "kernel_h: 3 kernel_w: 2 stride_h: 1 stride_w: 3 pad_h: 1 pad_w: 1"),
    ((2, 2, 7, 7), "kernel_size: 2 stride: 3 round_mode: FLOOR"),
    ((2, 2, 4, 6), "kernel_size: 2 stride: 2"),                        # tiles exactly (the CPU's fast path)
    ((2, 3, 5, 7), "global_pooling: true"),
]


@pytest.mark.parametrize("shape,geometry", POOLINGS)
@pytest.mark.parametrize("method", ["MAX", "AVE"])
def test_pooling_parity(method, shape, geometry):
    check_parity(f'type: "Pooling" pooling_param {{ pool: {method} {geometry} }}', [rand(*shape)])


@pytest.mark.parametrize("shape,geometry", POOLINGS[:3])
def test_max_pooling_mask_top_and_ties(shape, geometry):
    """Rounded values give ties in most windows: the first maximum wins, on both tops."""
    check_parity(f'type: "Pooling" pooling_param {{ pool: MAX {geometry} }}', [np.round(rand(*shape))], num_top=2)


def test_max_pooling_nan_never_wins():
    x = rand(1, 2, 6, 6)
    x[0, 0, :3, :3] = np.nan  # a window of NaNs: -FLT_MAX and index -1, as Caffe
    x[0, 1, ::2, ::2] = np.nan
    check_parity('type: "Pooling" pooling_param { pool: MAX kernel_size: 3 stride: 3 }', [x], num_top=2)


@pytest.mark.parametrize("method", ["MAX", "AVE"])
def test_pooling_gradient_gpu(gpu_mode, method):
    layer = make_layer(f'type: "Pooling" pooling_param {{ pool: {method} kernel_size: 3 stride: 2 pad: 1 }}')
    bottom = blobs_from(distinct(2, 2, 5, 6))
    top = setup_layer(layer, bottom, 2 if method == "MAX" else 1)
    check_gradient(layer, bottom, top, check_bottom=[0])


# -- LRN ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,param", [
    ((2, 7, 3, 4), "local_size: 5 alpha: 0.7 beta: 0.75 k: 2"),
    ((2, 3, 2, 3), "local_size: 5 alpha: 1.5 beta: 0.6"),              # fewer channels than the window
    ((1, 4, 2, 2), "local_size: 1 alpha: 0.5 beta: 1.2 k: 0.5"),
    ((2, 3, 5, 7), "local_size: 3 alpha: 0.7 beta: 0.75 norm_region: WITHIN_CHANNEL"),
    ((1, 2, 3, 4), "local_size: 5 alpha: 2.0 beta: 0.5 norm_region: WITHIN_CHANNEL"),  # window beyond the plane
])
def test_lrn_parity(shape, param):
    check_parity(f'type: "LRN" lrn_param {{ {param} }}', [rand(*shape)])


@pytest.mark.parametrize("region", ["ACROSS_CHANNELS", "WITHIN_CHANNEL"])
def test_lrn_gradient_gpu(gpu_mode, region):
    layer = make_layer(f'type: "LRN" lrn_param {{ local_size: 3 alpha: 0.8 beta: 0.75 k: 1.5 norm_region: {region} }}')
    bottom = blobs_from(rand(2, 4, 3, 5))
    top = setup_layer(layer, bottom)
    check_gradient(layer, bottom, top)


# -- InnerProduct ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,param", [
    ((3, 2, 3, 5), "num_output: 7"),
    ((3, 4, 5), "num_output: 6 axis: 2 transpose: true"),
    ((2, 3, 5, 2), "num_output: 5 axis: -2 bias_term: false"),
    ((37, 65), "num_output: 66 transpose: true"),
])
def test_inner_product_parity(shape, param):
    check_parity(f'type: "InnerProduct" inner_product_param {{ {param} {FILLERS} }}', [rand(*shape)])


@pytest.mark.parametrize("transpose", ["false", "true"])
def test_inner_product_gradient_gpu(gpu_mode, transpose):
    layer = make_layer(f'type: "InnerProduct" inner_product_param {{ num_output: 5 transpose: {transpose} {FILLERS} }}')
    bottom = blobs_from(rand(3, 2, 2, 3))
    top = setup_layer(layer, bottom)
    check_gradient(layer, bottom, top)


# -- the chain stays on the device --------------------------------------------------------------------------------
def test_conv_pool_ip_chain_stays_on_device(gpu_mode):
    from kaffe.engine import opencl
    layers = [make_layer(f'name: "conv" type: "Convolution" '
                         f'convolution_param {{ num_output: 4 kernel_size: 3 {FILLERS} }}'),
              make_layer('name: "pool" type: "Pooling" pooling_param { pool: MAX kernel_size: 2 stride: 2 }'),
              make_layer(f'name: "ip" type: "InnerProduct" inner_product_param {{ num_output: 3 {FILLERS} }}')]
    blobs = blobs_from(rand(2, 3, 8, 9)) + [Blob() for _ in layers]
    for i, layer in enumerate(layers):
        layer.setup([blobs[i]], [blobs[i + 1]])
    for i, layer in enumerate(layers):
        layer.forward([blobs[i]], [blobs[i + 1]])
    opencl.fill(blobs[-1].mutable_gpu_diff(), 1.0)
    for i, layer in reversed(list(enumerate(layers))):
        layer.backward([blobs[i + 1]], [True], [blobs[i]])
    for blob in blobs[1:]:
        assert blob._data.head == HEAD_AT_GPU and blob._diff.head == HEAD_AT_GPU
    for layer in layers:
        for param in layer.blobs:
            assert param._diff.head == HEAD_AT_GPU
    assert blobs[0]._diff.head == HEAD_AT_GPU


@pytest.mark.parametrize("kind", ["Convolution", "Deconvolution"])
@pytest.mark.parametrize("want_weight,want_bottom", [(True, False), (False, True), (True, True)])
def test_convolution_backward_branches_match_the_cpu(kind, want_weight, want_bottom):
    """Only the weight gradient, only the bottom diff, or both: each device computes just what is asked, and
    the same values (with groups, stride and pad; the bias gradient in every case)."""
    from kaffe.engine import device
    text = (f'type: "{kind}" convolution_param {{ num_output: 6 kernel_size: 3 stride: 2 pad: 1 group: 2 '
            f'weight_filler {{ type: "gaussian" }} bias_filler {{ type: "gaussian" }} }}')
    x = np.random.default_rng(4).standard_normal((2, 4, 7, 6)).astype(np.float32)
    results = []
    for mode in (device.set_mode_cpu, device.set_mode_gpu):
        mode()
        try:
            device.set_random_seed(2)
            layer = make_layer(text)
            bottom = blobs_from(x)
            top = setup_layer(layer, bottom)
            layer.forward(bottom, top)
            top[0].diff[...] = np.random.default_rng(5).standard_normal(top[0].shape)
            layer.param_propagate_down[0] = want_weight
            bottom[0].diff[...] = 7  # must stay when the bottom diff is not asked for
            layer.backward(top, [want_bottom], bottom)
            results.append([bottom[0].diff.copy(), layer.blobs[0].diff.copy(), layer.blobs[1].diff.copy()])
        finally:
            device.set_mode_cpu()
    (cpu_bottom, cpu_weight, cpu_bias), (gpu_bottom, gpu_weight, gpu_bias) = results
    assert (cpu_bottom == 7).all() != want_bottom and (cpu_weight == 0).all() != want_weight
    for a, b in ((cpu_bottom, gpu_bottom), (cpu_weight, gpu_weight), (cpu_bias, gpu_bias)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
