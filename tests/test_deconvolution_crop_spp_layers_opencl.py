"""OpenCL Deconvolution, Im2col, Crop, SPP and STOCHASTIC pooling: parity with the CPU code (relative error
<= 1e-4; STOCHASTIC TRAIN draws the same elements exactly), gradients in GPU mode, and no host round trips."""
import numpy as np
import pytest
from gradient_check import blobs_from, check_gradient, check_parity, distinct_centred as distinct, gpu_host_copies, \
    make_layer, opencl_available, positive, rand32 as rand, run_layer, setup_layer

from kaffe.engine import device
from kaffe.layers import vision
from kaffe.proto import caffe_pb2

pytestmark = [pytest.mark.opencl,
              pytest.mark.skipif(not opencl_available(), reason="no OpenCL platform (install pocl-opencl-icd)")]

FILLERS = 'weight_filler { type: "gaussian" std: 0.5 } bias_filler { type: "gaussian" std: 0.5 }'


def deconv(params):
    return f'type: "Deconvolution" convolution_param {{ {params} {FILLERS} }}'


def stochastic(geometry):
    return f'type: "Pooling" pooling_param {{ pool: STOCHASTIC {geometry} }}'


# -- parity ---------------------------------------------------------------------------------------------
PARITY_CASES = [
    pytest.param(deconv("num_output: 4 kernel_size: 3"), [rand(2, 3, 4, 5)], None, id="deconv"),
    pytest.param(deconv("num_output: 6 kernel_size: 4 stride: 2 pad: 1 group: 2"), [rand(2, 4, 5, 3)], None,
                 id="deconv-stride-group"),
    pytest.param(deconv("num_output: 3 kernel_h: 2 kernel_w: 3 stride_h: 3 stride_w: 1 pad_h: 1 group: 3 "
                        "bias_term: false"), [rand(2, 6, 3, 4)], None, id="deconv-rect-nobias"),
    pytest.param(deconv("num_output: 2 kernel_size: 3 dilation: 2 stride: 2 pad: 2"), [rand(2, 2, 4, 3)], None,
                 id="deconv-dilation"),
    pytest.param(deconv("num_output: 2 kernel_size: 4 stride: 3 pad: 1"), [rand(2, 3, 5)], None, id="deconv-1d"),
    pytest.param(deconv("num_output: 2 kernel_size: 2 stride: 2"), [rand(2, 3, 3, 2), rand(2, 3, 3, 2, seed=1)], 2,
                 id="deconv-two-bottoms"),
    pytest.param('type: "Im2col" convolution_param { kernel_size: 3 }', [rand(2, 3, 5, 6)], None, id="im2col"),
    pytest.param('type: "Im2col" convolution_param { kernel_size: 3 stride: 2 pad: 1 dilation: 2 }',
                 [rand(2, 2, 7, 6)], None, id="im2col-dilation"),
    pytest.param('type: "Im2col" convolution_param { kernel_h: 2 kernel_w: 3 stride_h: 1 stride_w: 2 pad_h: 1 '
                 'pad_w: 2 }', [rand(1, 3, 5, 7)], None, id="im2col-rect"),
    pytest.param('type: "Im2col" convolution_param { kernel_size: 3 stride: 2 pad: 1 }', [rand(2, 2, 9)], None,
                 id="im2col-1d"),
    pytest.param('type: "Crop"', [rand(2, 3, 6, 5), rand(2, 3, 4, 4)], None, id="crop"),
    pytest.param('type: "Crop" crop_param { offset: 1 }', [rand(2, 3, 6, 5), rand(1, 1, 4, 3)], None,
                 id="crop-offset"),
    pytest.param('type: "Crop" crop_param { axis: 1 offset: 1 offset: 0 offset: 2 }',
                 [rand(2, 4, 5, 6), rand(2, 3, 4, 3)], None, id="crop-per-axis"),
    pytest.param('type: "Crop" crop_param { axis: 0 offset: 1 }', [rand(3, 4, 5), rand(2, 2, 3)], None,
                 id="crop-axis0"),
    pytest.param('type: "SPP" spp_param { pyramid_height: 3 pool: MAX }', [distinct(2, 3, 7, 9)], None,
                 id="spp-max"),
    pytest.param('type: "SPP" spp_param { pyramid_height: 2 pool: AVE }', [rand(2, 3, 5, 7)], None, id="spp-ave"),
    pytest.param('type: "SPP" spp_param { pyramid_height: 1 pool: AVE }', [rand(2, 3, 5, 7)], None, id="spp-one"),
]


@pytest.mark.parametrize("text,arrays,num_top", PARITY_CASES)
def test_parity(text, arrays, num_top):
    check_parity(text, arrays, num_top=num_top)


@pytest.mark.parametrize("geometry,shape", [
    ("kernel_size: 2 stride: 2", (2, 3, 6, 6)),
    ("kernel_size: 3 stride: 2", (2, 2, 7, 8)),
    ("kernel_h: 2 kernel_w: 3 stride_h: 1 stride_w: 2", (1, 3, 5, 7)),
    ("global_pooling: true", (2, 2, 4, 5)),
])
def test_stochastic_pooling_parity(geometry, shape):
    """TRAIN: the same seed gives the same elements on both sides (exactly); TEST within 1e-4."""
    x = positive(*shape)
    dy = [rand(*run_layer(stochastic(geometry), [x], device.CPU)[0][0].shape, seed=2)]
    cpu = run_layer(stochastic(geometry), [x], device.CPU, top_diffs=dy)
    gpu = run_layer(stochastic(geometry), [x], device.GPU, top_diffs=dy)
    np.testing.assert_array_equal(gpu[0][0], cpu[0][0])
    np.testing.assert_array_equal(gpu[1][0], cpu[1][0])
    check_parity(stochastic(geometry), [x], phase=caffe_pb2.TEST)


def test_spp_stochastic_parity():
    check_parity('type: "SPP" spp_param { pyramid_height: 3 pool: STOCHASTIC }', [positive(2, 3, 8, 4)],
                 phase=caffe_pb2.TEST)
    check_parity('type: "SPP" spp_param { pyramid_height: 3 pool: STOCHASTIC }', [positive(2, 3, 8, 4)])


def test_deconvolution_in_sample_chunks(monkeypatch):
    """Columns bigger than COLUMN_BUFFER_LIMIT go through the GEMMs a few samples at a time."""
    monkeypatch.setattr(vision, "COLUMN_BUFFER_LIMIT", 2 * 2 * 9 * 30)
    check_parity(deconv("num_output: 4 kernel_size: 3 stride: 2 pad: 1 group: 2"), [rand(5, 4, 5, 6)])


def test_deconvolution_3d_falls_back_to_the_cpu():
    check_parity(deconv("num_output: 2 kernel_size: 2 stride: 2 group: 2"), [rand(1, 2, 2, 3, 2)])


# -- gradients in GPU mode ----------------------------------------------------------------------------------
GRADIENT_CASES = [
    pytest.param(deconv("num_output: 4 kernel_size: 3 stride: 2 pad: 1 group: 2"), [rand(2, 4, 3, 3)], {},
                 id="deconv"),
    pytest.param(deconv("num_output: 2 kernel_size: 3 dilation: 2 stride: 2 pad: 2"), [rand(1, 2, 3, 3)], {},
                 id="deconv-dilation"),
    pytest.param('type: "Im2col" convolution_param { kernel_size: 3 stride: 2 pad: 1 dilation: 2 }',
                 [rand(2, 2, 5, 4)], {}, id="im2col"),
    pytest.param('type: "Crop" crop_param { axis: 1 offset: 1 offset: 2 offset: 0 }',
                 [rand(2, 4, 6, 3), rand(2, 2, 3, 3)], {"check_bottom": [0]}, id="crop"),
    pytest.param('type: "SPP" spp_param { pyramid_height: 3 pool: MAX }', [distinct(2, 2, 7, 6)], {}, id="spp-max"),
    pytest.param('type: "SPP" spp_param { pyramid_height: 2 pool: AVE }', [rand(1, 3, 5, 3)], {}, id="spp-ave"),
    pytest.param(stochastic("kernel_size: 3 stride: 2"), [positive(2, 2, 5, 7) * 4 + 1], {"step": 1e-3},
                 id="stochastic-train"),
]


@pytest.mark.parametrize("text,arrays,options", GRADIENT_CASES)
def test_gradient_gpu(gpu_mode, text, arrays, options):
    layer = make_layer(text)
    bottom = blobs_from(*arrays)
    check_gradient(layer, bottom, setup_layer(layer, bottom), **options)


def test_stochastic_pooling_test_gradient_gpu(gpu_mode):
    layer = make_layer(stochastic("kernel_h: 2 kernel_w: 3 stride: 1"), caffe_pb2.TEST)
    bottom = blobs_from(positive(1, 3, 4, 5) * 4 + 1)
    check_gradient(layer, bottom, setup_layer(layer, bottom), step=1e-3)


# -- GPU mode stays on the device ---------------------------------------------------------------------------
@pytest.mark.parametrize("text,arrays,num_top,propagate,phase", [
    pytest.param(deconv("num_output: 4 kernel_size: 3 stride: 2 group: 2"), [rand(2, 4, 3, 3)], 1, [True],
                 caffe_pb2.TRAIN, id="deconv"),
    pytest.param('type: "Im2col" convolution_param { kernel_size: 2 }', [rand(2, 2, 4, 3)], 1, [True],
                 caffe_pb2.TRAIN, id="im2col"),
    pytest.param('type: "Crop" crop_param { offset: 1 }', [rand(2, 3, 6, 5), rand(2, 3, 4, 3)], 1, [True, False],
                 caffe_pb2.TRAIN, id="crop"),
    pytest.param('type: "SPP" spp_param { pyramid_height: 3 }', [rand(2, 3, 7, 6)], 1, [True], caffe_pb2.TRAIN,
                 id="spp"),
    pytest.param(stochastic("kernel_size: 2 stride: 2"), [positive(2, 3, 4, 4)], 1, [True], caffe_pb2.TRAIN,
                 id="stochastic-train"),
    pytest.param(stochastic("kernel_size: 2 stride: 2"), [positive(2, 3, 4, 4)], 1, [True], caffe_pb2.TEST,
                 id="stochastic-test"),
])
def test_gpu_mode_has_no_fallback_and_no_host_copy(monkeypatch, kaffe_log, text, arrays, num_top, propagate, phase):
    *_, copies = gpu_host_copies(monkeypatch, text, arrays, num_top, propagate, phase)
    assert not [m for m in kaffe_log if "no OpenCL implementation" in m]
    assert not copies, f"{len(copies)} device-to-host copies (of {copies} values) in GPU mode"
