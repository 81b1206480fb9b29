"""The direct OpenCL convolutions: depthwise (group == the image side's channels, also with a channel
multiplier; Convolution and Deconvolution) as one kernel per direction over the whole batch, and 1x1 stride-1
convolutions as GEMMs on the NCHW data without im2col. Parity with the CPU code (forward, bottom diff, weight
and bias gradients), a numeric gradient in GPU mode, and the launches each pass takes."""
import numpy as np
import pytest
from gradient_check import blobs_from, check_gradient, check_parity, make_layer, opencl_available, \
    rand32 as rand, setup_layer

from kaffe.engine import opencl
from kaffe.layers import vision

pytestmark = [pytest.mark.opencl,
              pytest.mark.skipif(not opencl_available(), reason="no OpenCL platform (install pocl-opencl-icd)")]

FILLERS = 'weight_filler { type: "gaussian" std: 0.5 } bias_filler { type: "gaussian" std: 0.5 }'


def layer_text(kind, params):
    return f'type: "{kind}" convolution_param {{ {params} {FILLERS} }}'


DEPTHWISE = [
    pytest.param((1, 4, 7, 9), "num_output: 4 group: 4 kernel_size: 3 pad: 1", id="k3-s1-p1-batch1"),
    pytest.param((3, 4, 9, 7), "num_output: 4 group: 4 kernel_size: 3 stride: 2 pad: 1", id="k3-s2-p1"),
    pytest.param((3, 3, 10, 8), "num_output: 3 group: 3 kernel_size: 5 pad: 2", id="k5-s1-p2"),
    pytest.param((1, 5, 11, 8), "num_output: 5 group: 5 kernel_size: 5 stride: 2", id="k5-s2-p0-batch1"),
    pytest.param((3, 3, 9, 10), "num_output: 3 group: 3 kernel_size: 3 dilation: 2 pad: 2", id="dilation2"),
    pytest.param((2, 2, 8, 7), "num_output: 2 group: 2 kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 pad_h: 1 "
                 "bias_term: false", id="rect-nobias"),
    pytest.param((2, 3, 7, 6), "num_output: 6 group: 3 kernel_size: 3 stride: 2 pad: 1", id="multiplier2"),
    pytest.param((3, 2, 6, 9), "num_output: 6 group: 2 kernel_size: 5 pad: 2 dilation: 2 bias_term: false",
                 id="multiplier3-nobias"),
    pytest.param((2, 4, 11), "num_output: 4 group: 4 kernel_size: 3 stride: 2 pad: 1", id="1d"),
]


@pytest.mark.parametrize("shape,params", DEPTHWISE)
def test_depthwise_convolution_parity(shape, params):
    check_parity(layer_text("Convolution", params), [rand(*shape)])


@pytest.mark.parametrize("shape,params", [
    pytest.param((2, 4, 5, 6), "num_output: 4 group: 4 kernel_size: 3 stride: 2 pad: 1", id="depthwise"),
    # the image side (the top) has the 3 channels of the groups, the bottom their 6 = 3 x 2 filters' outputs
    pytest.param((1, 6, 4, 3), "num_output: 3 group: 3 kernel_size: 4 stride: 2 pad: 1", id="multiplier2"),
])
def test_depthwise_deconvolution_parity(shape, params):
    check_parity(layer_text("Deconvolution", params), [rand(*shape)])


def test_depthwise_several_bottoms():
    check_parity(layer_text("Convolution", "num_output: 3 group: 3 kernel_size: 3 pad: 1"),
                 [rand(2, 3, 5, 6), rand(2, 3, 5, 6, seed=1)], num_top=2)


POINTWISE = [
    pytest.param((1, 5, 4, 6), "num_output: 3", id="bias-batch1"),
    pytest.param((4, 5, 3, 7), "num_output: 8 bias_term: false", id="nobias-batch4"),
    pytest.param((4, 6, 5, 3), "num_output: 7", id="bias-batch4"),
    pytest.param((2, 4, 3, 5), "num_output: 6 group: 2", id="group2"),
    pytest.param((3, 4, 9), "num_output: 2", id="1d"),
]


@pytest.mark.parametrize("shape,params", POINTWISE)
def test_pointwise_convolution_parity(shape, params):
    check_parity(layer_text("Convolution", f"{params} kernel_size: 1"), [rand(*shape)])


@pytest.mark.parametrize("samples_per_chunk", [1, 2])
def test_pointwise_backward_in_sample_chunks(monkeypatch, samples_per_chunk):
    """Backward's weight gradient in chunks of samples: one sample reads the bottom as its own columns, more
    go through im2col."""
    monkeypatch.setattr(vision, "COLUMN_BUFFER_LIMIT", samples_per_chunk * 4 * 20)
    check_parity(layer_text("Convolution", "num_output: 3 kernel_size: 1"), [rand(5, 4, 4, 5)])


@pytest.mark.parametrize("num_output", [2, 4], ids=["depthwise", "multiplier2"])
def test_depthwise_gradient_gpu(gpu_mode, num_output):
    layer = make_layer(layer_text("Convolution", f"num_output: {num_output} group: 2 kernel_size: 3 stride: 2 "
                                                 "pad: 1 dilation: 2"))
    bottom = blobs_from(rand(2, 2, 5, 4))
    top = setup_layer(layer, bottom)
    check_gradient(layer, bottom, top, step=1e-2, threshold=1e-2)


def launches(run):
    """Kernel launches (and uploads) of run() once the layer's inputs and weights are on the device."""
    run()
    opencl.reset_stats()
    run()
    counts = opencl.stats()
    assert counts["uploads"] == 0 and counts["waits"] == 0, counts
    return counts["launches"]


@pytest.mark.parametrize("kind,shape,params,forward,backward", [
    # backward: bias gradient (channel_sum), weight gradient, bottom diff
    ("Convolution", (3, 8, 9, 7), "num_output: 8 group: 8 kernel_size: 3 stride: 2 pad: 1", 1, 3),
    ("Convolution", (2, 4, 6, 6), "num_output: 8 group: 4 kernel_size: 3 pad: 1", 1, 3),
    ("Deconvolution", (2, 4, 5, 6), "num_output: 4 group: 4 kernel_size: 3 stride: 2", 1, 3),
    # one batched GEMM with the bias fused; backward: im2col + GEMM (weight and bias), GEMM (bottom diff)
    ("Convolution", (4, 6, 5, 5), "num_output: 5 kernel_size: 1", 1, 3),
    # one sample: the weight gradient's GEMM reads the bottom as it is
    ("Convolution", (1, 6, 5, 5), "num_output: 5 kernel_size: 1", 1, 2),
    # 3x3, groups: per group one GEMM for the weight and bias gradients, one for the columns, then col2im
    ("Convolution", (2, 4, 6, 6), "num_output: 6 group: 2 kernel_size: 3 pad: 1", 3, 5),
])
def test_launches_per_pass(gpu_mode, kind, shape, params, forward, backward):
    layer = make_layer(layer_text(kind, params))
    bottom = blobs_from(rand(*shape))
    top = setup_layer(layer, bottom)
    assert launches(lambda: layer.forward(bottom, top)) == forward
    top[0].diff[...] = rand(*top[0].shape, seed=2)
    assert launches(lambda: layer.backward(top, [True], bottom)) == backward
