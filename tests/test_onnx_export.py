"""ONNX export: every exportable layer, our zoo's deploy nets and Caffe's own give in onnxruntime what kaffe's forward
gives (Caffe's pooling rounding and divisors exactly); `kaffe export onnx` and its bad input."""
import glob
import os
import subprocess
import sys

import numpy as np
import pytest
from google.protobuf import text_format

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from conftest import REPO, SHARED  # noqa: E402
from test_zoo import STAGES, with_stand_ins  # noqa: E402
import kaffe  # noqa: E402
from kaffe.engine.errors import KaffeError  # noqa: E402
from kaffe.engine.graph import filter_net  # noqa: E402
from kaffe.engine.net import Net, read_net_param  # noqa: E402
from kaffe.engine.onnx_export import CONVERTERS, export_onnx  # noqa: E402
from kaffe.proto import caffe_pb2  # noqa: E402
from kaffe.tools import cli  # noqa: E402

ZOO = SHARED / "zoo"
LENET_WEIGHTS = ZOO / "weights" / "lenet_v2" / "lenet_iter_10000.caffemodel"
TOLERANCE = 1e-4


# -- helpers -----------------------------------------------------------------------------------------------------
def fill(net, seed=0):
    """Random weights that keep activations O(1) through deep nets: msra for weights, small biases, BatchNorm
    statistics of a plausible scale stored with a moving-average factor of 2 (which the export must fold in)."""
    rng = np.random.default_rng(seed)
    for layer in net.layers:
        blobs = [b.data for b in layer.blobs]
        if layer.type == "BatchNorm":
            channels = blobs[0].shape
            blobs[2][...] = 2
            blobs[0][...] = 2 * rng.uniform(-0.2, 0.2, channels)
            blobs[1][...] = 2 * rng.uniform(0.5, 1.5, channels)
        elif layer.type in ("Convolution", "Deconvolution", "InnerProduct"):
            fan_in = blobs[0].shape[0] if getattr(layer, "transpose", False) else blobs[0][0].size
            blobs[0][...] = rng.standard_normal(blobs[0].shape, np.float32) * np.float32(np.sqrt(2 / fan_in))
            for b in blobs[1:]:
                b[...] = rng.uniform(-0.1, 0.1, b.shape)
        elif layer.type == "Scale" and len(layer.layer_param.bottom) == 1:   # a learned scale
            blobs[0][...] = rng.uniform(0.5, 1.5, blobs[0].shape)
            for b in blobs[1:]:
                b[...] = rng.uniform(-0.1, 0.1, b.shape)
        else:
            for b in blobs:
                b[...] = rng.uniform(-0.5, 0.5, b.shape)


def relative_error(expected, actual):
    """Issue 13's measure: the max abs error over the elements, relative to the output's RMS."""
    assert expected.shape == actual.shape, (expected.shape, actual.shape)
    rms = float(np.sqrt(np.mean(np.square(expected.astype(np.float64))))) or 1.0
    return float(np.abs(expected.astype(np.float64) - actual).max()) / rms


def uniform(low=-1.0, high=1.0):
    return lambda rng, shape: rng.uniform(low, high, shape).astype(np.float32)


UNBATCHED = {"h"}   # inputs of the layer cases whose first axis is no batch (InfogainLoss's matrix)


def compare_inputs(net, batch, feed, seed=1):
    """Reshapes the net to `batch` and fills its inputs from feed(rng, shape) (or feed[name](rng, shape), uniform
    in [-1, 1) for the names it lacks); returns them by name."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for name in net.inputs:
        blob = net.blobs[name]
        shape = (batch,) + blob.shape[1:] if blob.shape and name not in UNBATCHED else blob.shape
        fill_input = feed.get(name, uniform()) if isinstance(feed, dict) else feed
        feeds[name] = np.asarray(fill_input(rng, shape), np.float32)
        blob.reshape(*shape)
    net.reshape()
    for name, value in feeds.items():
        net.blobs[name].data[...] = value
    return feeds


def session_of(model, extra=()):
    """An onnxruntime CPU session of the model, with the `extra` tensors as further outputs."""
    for name in extra:
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def compare(net, session, batch, feed=uniform(), extra=(), seed=1):
    """{blob: relative error} of onnxruntime against kaffe's forward at `batch`, for the net's outputs and the
    `extra` blobs that session_of added."""
    feeds = compare_inputs(net, batch, feed, seed)
    net.forward()
    # outputs in the net's order (an input blob rewritten in place comes out as `<blob>/<layer>`)
    return {name: relative_error(net.blobs[name].data, value)
            for name, value in zip(net.outputs + list(extra), session.run(None, feeds))}


def logit_layers(net):
    """The last weighted layer before each Softmax and SoftmaxWithLoss: the layers writing logits."""
    return [max(i for i in range(index) if net.layers[i].blobs) for index, layer in enumerate(net.layers)
            if layer.type in ("Softmax", "SoftmaxWithLoss")]


def logits(net):
    """The logit blobs (a Softmax flattens small errors of its input; a loss sums them)."""
    return [net.top_names[net.layer_names[i]][0] for i in logit_layers(net)]


def label_feeds(net):
    """Labels in range for the second top of each data source (Caffe's label; 0 or 1 for nets that score no
    classes, such as the siamese pairs' similarity)."""
    classes = [layer.dims[1] for layer in net.layers if layer.type in ("SoftmaxWithLoss", "Accuracy")]
    return {tops[1]: labels(min(classes, default=2)) for layer, tops in zip(net.layers, net.top_names.values())
            if not layer.layer_param.bottom and len(tops) > 1}


def net_of(text, phase=caffe_pb2.TEST, **inputs):
    """A net of Input layers {name: shape} followed by the layers of `text` (prototxt)."""
    param = caffe_pb2.NetParameter(name="case")
    for name, shape in inputs.items():
        param.layer.add(name=name, type="Input", top=[name]).input_param.shape.add(dim=shape)
    text_format.Parse(text, param)
    return Net(param, phase)


# -- every layer type ----------------------------------------------------------------------------------------------
def pooling(geometry, pool="MAX", tops='top: "pool"'):
    return f'layer {{ name: "pool" type: "Pooling" bottom: "data" {tops} pooling_param {{ pool: {pool} {geometry} }} }}'


def one(layer_type, params="", bottom="data", top="out", name="layer"):
    return f'layer {{ name: "{name}" type: "{layer_type}" bottom: "{bottom}" top: "{top}" {params} }}'


IMAGE = {"data": [2, 3, 9, 10]}
POSITIVE = uniform(0.1, 2.0)


def labels(classes):
    return lambda rng, shape: rng.integers(0, classes, shape)


LAYER_CASES = {
    "conv_group_dilation": (one("Convolution", "convolution_param { num_output: 4 kernel_size: 3 pad: 2 stride: 2 "
                                "dilation: 2 group: 2 }"), {"data": [2, 4, 11, 12]}),
    "conv_rectangular": (one("Convolution", "convolution_param { num_output: 3 kernel_h: 3 kernel_w: 2 pad_h: 1 "
                             "pad_w: 0 stride_h: 2 stride_w: 1 bias_term: false }"), IMAGE),
    "deconv": (one("Deconvolution", "convolution_param { num_output: 4 kernel_size: 4 stride: 2 pad: 1 group: 1 }"),
               IMAGE),
    "deconv_group": (one("Deconvolution", "convolution_param { num_output: 2 kernel_size: 3 stride: 3 group: 2 }"),
                     {"data": [2, 4, 5, 5]}),
    "deconv_dilation": (one("Deconvolution", "convolution_param { num_output: 2 kernel_size: 3 stride: 2 pad: 2 "
                                             "dilation: 2 }"), IMAGE),
    "conv_3d": (one("Convolution", "convolution_param { num_output: 2 kernel_size: 2 kernel_size: 3 kernel_size: 2 "
                                   "stride: 2 pad: 1 }"), {"data": [2, 2, 4, 5, 6]}),
    "pool_max_global": (pooling("global_pooling: true"), IMAGE),
    "pool_ave_global": (pooling("global_pooling: true", "AVE"), IMAGE),
    "pool_max_argmax_top": (pooling("kernel_size: 3 stride: 2 pad: 1", tops='top: "pool" top: "mask"'),
                            {"data": [2, 2, 11, 12]}),
    "pool_ave_overhang": (pooling("kernel_size: 3 stride: 2 pad: 1", "AVE"), {"data": [2, 2, 6, 7]}),
    "pool_ave_overhang_rect": (pooling("kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 3 pad_h: 2 pad_w: 1", "AVE"),
                               {"data": [2, 2, 8, 9]}),
    "pool_floor": (pooling("kernel_size: 3 stride: 2 pad: 1 round_mode: FLOOR", "AVE"), {"data": [2, 2, 8, 9]}),
    "pool_stochastic_test": (pooling("kernel_size: 3 stride: 2", "STOCHASTIC"), {"data": [2, 2, 8, 9]}, POSITIVE),
    "pool_stochastic_global": (pooling("global_pooling: true", "STOCHASTIC"), IMAGE, POSITIVE),
    "spp_max": (one("SPP", "spp_param { pyramid_height: 3 }"), {"data": [2, 2, 7, 9]}),
    "spp_ave_one_level": (one("SPP", "spp_param { pyramid_height: 1 pool: AVE }"), IMAGE),
    "spp_ave": (one("SPP", "spp_param { pyramid_height: 2 pool: AVE }"), {"data": [2, 2, 5, 6]}),
    "im2col": (one("Im2col", "convolution_param { kernel_size: 3 stride: 2 pad: 1 dilation: 1 }"), IMAGE),
    "im2col_dilated": (one("Im2col", "convolution_param { kernel_h: 2 kernel_w: 3 dilation: 2 }"), IMAGE),
    "inner_product": (one("InnerProduct", "inner_product_param { num_output: 5 }"), IMAGE),
    "inner_product_transpose": (one("InnerProduct", "inner_product_param { num_output: 5 transpose: true }"),
                                {"data": [2, 7]}),
    "inner_product_axis2": (one("InnerProduct", "inner_product_param { num_output: 5 axis: 2 bias_term: false }"),
                            IMAGE),
    "inner_product_axis_minus1": (one("InnerProduct", "inner_product_param { num_output: 3 axis: -1 transpose: "
                                                      "true }"), IMAGE),
    "embed": (one("Embed", "embed_param { num_output: 4 input_dim: 10 }"), {"data": [2, 3]},
              lambda rng, shape: rng.integers(0, 10, shape).astype(np.float32)),
    "relu": (one("ReLU"), IMAGE),
    "relu_leaky_in_place": (one("ReLU", "relu_param { negative_slope: 0.1 }", top="data"), IMAGE),
    "prelu": (one("PReLU"), IMAGE),
    "prelu_shared": (one("PReLU", "prelu_param { channel_shared: true }"), {"data": [2, 3]}),
    "elu": (one("ELU", "elu_param { alpha: 0.5 }"), IMAGE),
    "sigmoid": (one("Sigmoid"), IMAGE),
    "tanh": (one("TanH"), IMAGE),
    "absval": (one("AbsVal"), IMAGE),
    "bnll": (one("BNLL"), IMAGE, uniform(-30, 30)),
    "power": (one("Power", "power_param { power: 2 scale: 0.5 shift: 1 }"), IMAGE),
    "power_fraction": (one("Power", "power_param { power: 0.5 scale: 2 shift: 0.5 }"), IMAGE, POSITIVE),
    "power_zero": (one("Power", "power_param { power: 0 scale: 3 }"), IMAGE),
    "power_constant": (one("Power", "power_param { power: 3 scale: 0 shift: 2 }"), IMAGE),
    "exp": (one("Exp"), IMAGE),
    "exp_base": (one("Exp", "exp_param { base: 2 scale: 0.5 shift: 1 }"), IMAGE),
    "log": (one("Log"), IMAGE, POSITIVE),
    "log_base": (one("Log", "log_param { base: 10 scale: 2 shift: 3 }"), IMAGE),
    "threshold": (one("Threshold", "threshold_param { threshold: 0.2 }"), IMAGE),
    "clip": (one("Clip", "clip_param { min: -0.3 max: 0.4 }"), IMAGE),
    "swish": (one("Swish", "swish_param { beta: 1.5 }"), IMAGE),
    "swish_default": (one("Swish"), IMAGE),
    "batch_norm": (one("BatchNorm", "batch_norm_param { eps: 0.001 }"), IMAGE),
    "batch_norm_2d_in_place": (one("BatchNorm", top="data"), {"data": [2, 6]}),
    "scale_bias_term": (one("Scale", "scale_param { bias_term: true }"), IMAGE),
    "scale_two_axes": (one("Scale", "scale_param { axis: 1 num_axes: 2 }"), IMAGE),
    "scale_bottom": ('layer { name: "layer" type: "Scale" bottom: "data" bottom: "s" top: "out" '
                     'scale_param { axis: 0 } }', {"data": [2, 3, 4, 5], "s": [2, 3]}),
    "bias_bottom": ('layer { name: "layer" type: "Bias" bottom: "data" bottom: "b" top: "out" '
                    'bias_param { axis: 0 } }',
                    {"data": [2, 3, 4, 5], "b": [2, 3, 4]}),
    "bias": (one("Bias", "bias_param { axis: 2 num_axes: -1 }"), IMAGE),
    "bias_scalar": (one("Bias", "bias_param { num_axes: 0 }"), IMAGE),
    "mvn": (one("MVN"), IMAGE),
    "mvn_across_channels_mean_only": (one("MVN", "mvn_param { across_channels: true normalize_variance: false }"),
                                      IMAGE),
    "mvn_2d": (one("MVN", "mvn_param { eps: 0.01 }"), {"data": [2, 5]}),
    "lrn_across": (one("LRN", "lrn_param { local_size: 5 alpha: 0.5 beta: 0.75 k: 2 }"), {"data": [2, 7, 4, 5]}),
    "lrn_within": (one("LRN", "lrn_param { local_size: 3 alpha: 0.5 beta: 0.75 norm_region: WITHIN_CHANNEL }"),
                   IMAGE),
    "softmax": (one("Softmax"), IMAGE),
    "softmax_axis": (one("Softmax", "softmax_param { axis: -2 }"), IMAGE),
    "concat": ('layer { name: "layer" type: "Concat" bottom: "data" bottom: "b" top: "out" }',
               {"data": [2, 3, 4, 5], "b": [2, 2, 4, 5]}),
    "concat_axis": ('layer { name: "layer" type: "Concat" bottom: "data" bottom: "b" top: "out" '
                    'concat_param { axis: -1 } }', {"data": [2, 3, 4, 5], "b": [2, 3, 4, 2]}),
    "slice": ('layer { name: "layer" type: "Slice" bottom: "data" top: "a" top: "b" top: "c" '
              'slice_param { axis: 3 slice_point: 1 slice_point: 7 } }', IMAGE),
    "slice_equal": ('layer { name: "layer" type: "Slice" bottom: "data" top: "a" top: "b" top: "c" }', IMAGE),
    "eltwise_sum": ('layer { name: "layer" type: "Eltwise" bottom: "data" bottom: "b" bottom: "c" top: "out" '
                    'eltwise_param { coeff: 1 coeff: -0.5 coeff: 2 } }', {"data": [2, 3], "b": [2, 3], "c": [2, 3]}),
    "eltwise_prod": ('layer { name: "layer" type: "Eltwise" bottom: "data" bottom: "b" bottom: "c" top: "out" '
                     'eltwise_param { operation: PROD } }', {"data": [2, 3], "b": [2, 3], "c": [2, 3]}),
    "eltwise_max": ('layer { name: "layer" type: "Eltwise" bottom: "data" bottom: "b" top: "out" '
                    'eltwise_param { operation: MAX } }', {"data": [2, 3, 2], "b": [2, 3, 2]}),
    "flatten": (one("Flatten"), IMAGE),
    "flatten_axes": (one("Flatten", "flatten_param { axis: 1 end_axis: 2 }"), IMAGE),
    "reshape_copy_infer": (one("Reshape", "reshape_param { shape { dim: 0 dim: -1 dim: 5 } }"), IMAGE),
    "reshape_axis": (one("Reshape", "reshape_param { axis: 2 num_axes: 1 shape { dim: 3 dim: 3 } }"), IMAGE),
    "reshape_all": (one("Reshape", "reshape_param { shape { dim: -1 } }"), IMAGE),
    "reshape_new_leading_axis": (one("Reshape", "reshape_param { axis: 0 num_axes: 0 shape { dim: 1 } }"), IMAGE),
    "crop": ('layer { name: "layer" type: "Crop" bottom: "data" bottom: "ref" top: "out" '
             'crop_param { axis: 2 offset: 1 offset: 2 } }', {"data": [2, 3, 9, 10], "ref": [2, 3, 5, 6]}),
    "split_and_dropout": ('layer { name: "split" type: "Split" bottom: "data" top: "a" top: "b" } '
                          'layer { name: "drop" type: "Dropout" bottom: "a" top: "a" } '
                          'layer { name: "relu" type: "ReLU" bottom: "b" top: "c" }', IMAGE),
    "reduction_sum": (one("Reduction", "reduction_param { axis: 1 }"), IMAGE),
    "reduction_asum": (one("Reduction", "reduction_param { operation: ASUM axis: 2 coeff: 2 }"), IMAGE),
    "reduction_sumsq": (one("Reduction", "reduction_param { operation: SUMSQ axis: -1 }"), IMAGE),
    "reduction_mean_all": (one("Reduction", "reduction_param { operation: MEAN coeff: 3 }"), IMAGE),
    "argmax_topk": (one("ArgMax", "argmax_param { top_k: 3 }"), IMAGE, lambda rng, s: rng.integers(0, 4, s) / 4),
    "argmax_max_val": (one("ArgMax", "argmax_param { top_k: 2 out_max_val: true }"), {"data": [2, 6]},
                       lambda rng, s: rng.integers(0, 3, s) / 2),
    "argmax_axis": (one("ArgMax", "argmax_param { axis: 1 top_k: 2 }"), IMAGE,
                    lambda rng, s: rng.integers(0, 3, s) / 2),
    "argmax_axis_max_val": (one("ArgMax", "argmax_param { axis: -1 out_max_val: true }"), IMAGE),
    "tile": (one("Tile", "tile_param { axis: 1 tiles: 3 }"), IMAGE),
    "softmax_loss_with_prob": ('layer { name: "layer" type: "SoftmaxWithLoss" bottom: "data" bottom: "label" '
                               'top: "out" top: "prob" }', {"data": [2, 5], "label": [2]}, {"label": labels(5)}),
    "softmax_loss_spatial_ignore": ('layer { name: "layer" type: "SoftmaxWithLoss" bottom: "data" bottom: "label" '
                                    'top: "out" loss_param { ignore_label: 4 } }',
                                    {"data": [2, 4, 3, 3], "label": [2, 1, 3, 3]}, {"label": labels(5)}),
    "softmax_loss_full": ('layer { name: "layer" type: "SoftmaxWithLoss" bottom: "data" bottom: "label" top: "out" '
                          'loss_param { ignore_label: 0 normalization: FULL } softmax_param { axis: 2 } }',
                          {"data": [2, 3, 4], "label": [2, 3]}, {"label": labels(4)}),
    "softmax_loss_batch_size": ('layer { name: "layer" type: "SoftmaxWithLoss" bottom: "data" bottom: "label" '
                                'top: "out" loss_param { normalize: false } }',
                                {"data": [2, 4, 3], "label": [2, 3]}, {"label": labels(4)}),
    "softmax_loss_none": ('layer { name: "layer" type: "SoftmaxWithLoss" bottom: "data" bottom: "label" top: "out" '
                          'loss_param { normalization: NONE } }', {"data": [2, 4], "label": [2]},
                          {"label": labels(4)}),
    "accuracy_top2_ties": ('layer { name: "layer" type: "Accuracy" bottom: "data" bottom: "label" top: "out" '
                           'accuracy_param { top_k: 2 } }', {"data": [2, 6], "label": [2]},
                           {"data": lambda rng, s: rng.integers(0, 3, s), "label": labels(6)}),
    "accuracy_spatial_ignore": ('layer { name: "layer" type: "Accuracy" bottom: "data" bottom: "label" top: "out" '
                                'accuracy_param { ignore_label: 1 } }', {"data": [2, 3, 4, 4], "label": [2, 4, 4]},
                                {"label": labels(3)}),
    "sigmoid_cross_entropy_loss": ('layer { name: "layer" type: "SigmoidCrossEntropyLoss" bottom: "data" '
                                   'bottom: "t" top: "out" }', {"data": [2, 6], "t": [2, 6]},
                                   {"data": uniform(-5, 5), "t": uniform(0, 1)}),
    "sigmoid_cross_entropy_loss_ignore": ('layer { name: "layer" type: "SigmoidCrossEntropyLoss" bottom: "data" '
                                          'bottom: "t" top: "out" loss_param { ignore_label: 2 normalization: '
                                          'VALID } }', {"data": [2, 3, 2], "t": [2, 3, 2]}, {"t": labels(3)}),
    "euclidean_loss": ('layer { name: "layer" type: "EuclideanLoss" bottom: "data" bottom: "b" top: "out" }',
                       {"data": [2, 3, 2], "b": [2, 6]}),
    "contrastive_loss": ('layer { name: "layer" type: "ContrastiveLoss" bottom: "data" bottom: "b" bottom: "sim" '
                         'top: "out" contrastive_loss_param { margin: 2 } }',
                         {"data": [2, 3], "b": [2, 3, 1, 1], "sim": [2, 1, 1, 1]}, {"sim": labels(2)}),
    "contrastive_loss_legacy": ('layer { name: "layer" type: "ContrastiveLoss" bottom: "data" bottom: "b" '
                                'bottom: "sim" top: "out" contrastive_loss_param { legacy_version: true } }',
                                {"data": [2, 3], "b": [2, 3], "sim": [2]}, {"sim": labels(2)}),
    "infogain_loss": ('layer { name: "layer" type: "InfogainLoss" bottom: "data" bottom: "label" bottom: "h" '
                      'top: "out" top: "prob" }', {"data": [2, 4], "label": [2], "h": [4, 4]},
                      {"label": labels(4), "h": uniform(0, 1)}),
    "infogain_loss_axis_ignore": ('layer { name: "layer" type: "InfogainLoss" bottom: "data" bottom: "label" '
                                  'bottom: "h" top: "out" loss_param { ignore_label: 1 normalization: FULL } '
                                  'infogain_loss_param { axis: 2 } }', {"data": [2, 3, 4], "label": [2, 3],
                                                                        "h": [1, 4, 4]},
                                  {"label": labels(4), "h": uniform(0, 1)}),
    "multinomial_logistic_loss": ('layer { name: "layer" type: "MultinomialLogisticLoss" bottom: "data" '
                                  'bottom: "label" top: "out" }', {"data": [2, 5, 1, 1], "label": [2]},
                                  {"data": lambda rng, s: rng.uniform(0, 1, s) ** 30, "label": labels(5)}),
    "hinge_loss_l1": ('layer { name: "layer" type: "HingeLoss" bottom: "data" bottom: "label" top: "out" }',
                      {"data": [2, 3, 2], "label": [2, 1, 1, 1]}, {"label": labels(6)}),
    "hinge_loss_l2": ('layer { name: "layer" type: "HingeLoss" bottom: "data" bottom: "label" top: "out" '
                      'hinge_loss_param { norm: L2 } }', {"data": [2, 4], "label": [2]}, {"label": labels(4)}),
    "parameter_and_batch_reindex": ('layer { name: "param" type: "Parameter" top: "p" parameter_param { shape { '
                                    'dim: 3 dim: 4 } } } '
                                    'layer { name: "layer" type: "BatchReindex" bottom: "p" bottom: "data" '
                                    'top: "out" }', {"data": [2]},
                                    lambda rng, s: rng.integers(0, 3, s).astype(np.float32)),
}


@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_layer_matches_onnxruntime(case, opset=None):
    text, inputs, *feed = LAYER_CASES[case]
    net = net_of(text, **inputs)
    fill(net)
    model = export_onnx(net, opset=opset, batch="dynamic")
    onnx.checker.check_model(model, full_check=True)
    session = session_of(model)
    for batch in (2, 3):
        errors = compare(net, session, batch, *feed)
        assert errors and max(errors.values()) < 1e-5, (batch, errors)


@pytest.mark.parametrize("opset", [13, 18, 21])
@pytest.mark.parametrize("case", ["reduction_mean_all", "mvn", "accuracy_spatial_ignore", "slice", "lrn_within"])
def test_opset_dependent_forms_match(case, opset):
    """ReduceMean takes its axes as an input from opset 18 on (17, the default, is covered above)."""
    test_layer_matches_onnxruntime(case, opset)


def test_infogain_matrix_from_its_file(tmp_path):
    source = tmp_path / "h.binaryproto"
    h = np.random.default_rng(2).uniform(0, 1, (3, 3)).astype(np.float32)
    source.write_bytes(caffe_pb2.BlobProto(shape=caffe_pb2.BlobShape(dim=[3, 3]), data=h.ravel()).SerializeToString())
    net = net_of(f'layer {{ name: "layer" type: "InfogainLoss" bottom: "data" bottom: "label" top: "out" '
                 f'infogain_loss_param {{ source: "{source}" }} }}', data=[2, 3], label=[2])
    model = export_onnx(net, batch="dynamic")
    np.testing.assert_array_equal(
        onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "layer_infogain")), h)
    errors = compare(net, session_of(model), 4, {"label": labels(3)})
    assert max(errors.values()) < 1e-5, errors


# 3x3/2 on 112 and 113 inputs, with and without pad: Caffe's output sizes (rounded up, then clipped) where ONNX's
# floor default gives 55, 56, 56, 57
CAFFE_POOLED = {(112, 0): 56, (113, 0): 56, (112, 1): 57, (113, 1): 57}
POOL_SIZES = [(n, pad, pool) for n, pad in CAFFE_POOLED for pool in ("MAX", "AVE")]


@pytest.mark.parametrize("size,pad,pool", POOL_SIZES, ids=[f"{n}-pad{p}-{m}" for n, p, m in POOL_SIZES])
def test_pooling_rounding_matches_caffe_exactly(size, pad, pool):
    net = net_of(pooling(f"kernel_size: 3 stride: 2 pad: {pad}", pool), data=[2, 2, size, size])
    assert net.blobs["pool"].shape[2:] == (CAFFE_POOLED[size, pad],) * 2
    model = export_onnx(net)
    x = np.random.default_rng(3).uniform(-1, 1, net.blobs["data"].shape).astype(np.float32)
    net.blobs["data"].data[...] = x
    net.forward()
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"data": x})
    expected = net.blobs["pool"].data
    assert y.shape == expected.shape
    if pool == "MAX":
        assert np.array_equal(y, expected)
    else:   # the same windows and divisors; the sums are taken in another order
        assert relative_error(expected, y) < 1e-6


# -- whole nets ----------------------------------------------------------------------------------------------------
def zoo_net_files():
    return sorted(p for p in glob.glob(str(ZOO / "**" / "*.prototxt"), recursive=True) if "solver" not in p)


def exportable(path):
    """Whether every layer of the file's TEST-phase net has an ONNX form."""
    param = read_net_param(path)
    param.state.phase = caffe_pb2.TEST
    param.state.stage.extend(STAGES.get(os.path.basename(path), {}).get(caffe_pb2.TEST, []))
    return all(layer.type in CONVERTERS or not layer.bottom for layer in filter_net(param).layer)


def _id(path):
    path = str(path)
    return os.path.relpath(path, ZOO) if path.startswith(str(ZOO)) else os.path.relpath(path, REPO)


BIG = ("alexnet", "caffenet", "googlenet", "vgg16", "resnet50")
# models/: every deploy net, and the train_val nets whose data test_zoo has stand-ins for
OUR_NETS = sorted(glob.glob(str(REPO / "models" / "*" / "deploy.prototxt")) +
                  glob.glob(str(REPO / "models" / "*" / "train_val.prototxt")) +
                  glob.glob(str(REPO / "models" / "lenet" / "lenet_*.prototxt")))
OUR_NETS = [p for p in OUR_NETS if "solver" not in p]
ALL_NETS = OUR_NETS + [p for p in zoo_net_files() if exportable(p)]
assert all(exportable(p) for p in OUR_NETS)
NET_PARAMS = [pytest.param(p, id=_id(p), marks=[pytest.mark.slow] if any(b in str(p) for b in BIG) else [])
              for p in ALL_NETS]


@pytest.mark.skipif(not ZOO.exists(), reason="../shared/zoo not found")
def test_every_zoo_net_is_exportable():
    assert [_id(p) for p in zoo_net_files() if not exportable(p)] == []


def calibrate(net, feed):
    """Scales the layers writing logits so that these have an RMS of 1 (random weights otherwise give logits in
    the tens, whose float32 rounding a Softmax turns into large errors of the probabilities and the loss)."""
    for index in logit_layers(net):
        compare_inputs(net, 1, feed)
        net.forward()
        logit = net.blobs[net.top_names[net.layer_names[index]][0]].data
        rms = np.sqrt(np.mean(np.square(logit.astype(np.float64))))
        for b in net.layers[index].blobs:
            b.data[...] /= rms


def build_net(path):
    """The file's TEST-phase net; data layers (whose sources are absent) become Input layers of the shapes
    they would give (test_zoo's stand-ins) for batch 1: the export makes graph inputs of either."""
    param = with_stand_ins(read_net_param(str(path)), path)
    for layer in param.layer:
        if layer.type == "DummyData":
            shapes = list(layer.dummy_data_param.shape)
            layer.ClearField("dummy_data_param")
            layer.type = "Input"
            for shape in shapes:
                shape.dim[0] = 1
            layer.input_param.shape.extend(shapes)
    param.state.phase = caffe_pb2.TEST
    param.state.stage.extend(STAGES.get(os.path.basename(path), {}).get(caffe_pb2.TEST, []))
    return Net(param)


def net_errors(path, weights=None):
    """{(batch, blob): relative error} of a net exported with a dynamic batch, at batch 1 and 4."""
    net = build_net(path)
    feed = dict(label_feeds(net), data=uniform(0, 1) if weights else uniform())
    if weights:
        net.copy_from(str(weights))
    else:
        fill(net)
        calibrate(net, feed)
    model = export_onnx(net, batch="dynamic")
    onnx.checker.check_model(model, full_check=True)
    session = session_of(model, logits(net))
    return {(batch, blob): error for batch in (1, 4)
            for blob, error in compare(net, session, batch, feed, extra=logits(net)).items()}


@pytest.mark.parametrize("path", NET_PARAMS)
def test_net_matches_onnxruntime(path):
    if not os.path.exists(path):
        pytest.skip(f"{path} not found")
    errors = net_errors(path)
    assert max(errors.values()) < TOLERANCE, errors


@pytest.mark.skipif(not LENET_WEIGHTS.exists(), reason="Caffe-trained LeNet weights not found")
def test_caffe_trained_lenet_matches_onnxruntime():
    errors = net_errors(LENET_WEIGHTS.parent / "lenet.prototxt", LENET_WEIGHTS)
    assert max(errors.values()) < TOLERANCE, errors


def test_model_is_checked_with_shapes_and_batch_choices(tmp_path):
    net = Net(str(REPO / "models" / "lenet" / "lenet_deploy.prototxt"), kaffe.TEST)
    fill(net)
    path = tmp_path / "lenet.onnx"
    net.to_onnx(str(path), batch="dynamic")
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == 17
    assert [i.name for i in model.graph.input] == ["data"] and [o.name for o in model.graph.output] == ["prob"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert model.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert {v.name for v in model.graph.value_info} >= {"conv1", "pool1", "ip1", "ip2"}
    names = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    assert set(names) == {f"{layer}_{i}" for layer in ("conv1", "conv2", "ip1", "ip2") for i in (0, 1)}
    np.testing.assert_array_equal(names["conv1_0"], net.params["conv1"][0].data)
    for batch, opset in ((None, 13), (5, 21)):
        model = export_onnx(net, opset=opset, batch=batch)
        assert model.opset_import[0].version == opset
        dims = [d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim]
        assert dims == [batch or 64, 10]


def test_in_place_tops_are_renamed_and_the_last_keeps_the_blob_name():
    net = net_of(one("Convolution", "convolution_param { num_output: 2 kernel_size: 1 }", top="conv", name="conv")
                 + one("ReLU", bottom="conv", top="conv", name="relu")
                 + one("Scale", bottom="conv", top="conv", name="scale"), data=[1, 2, 3, 3])
    model = export_onnx(net)
    assert [list(n.output) for n in model.graph.node] == [["conv/conv"], ["conv/relu"], ["conv"]]
    assert [o.name for o in model.graph.output] == ["conv"]


def test_data_layer_transform_is_the_input_contract(mnist_lmdb):
    net = net_of(f'''layer {{ name: "mnist" type: "Data" top: "data" top: "label"
                   transform_param {{ scale: 0.00390625 mean_value: 10 }}
                   data_param {{ source: "{mnist_lmdb / "mnist_test_lmdb"}" batch_size: 4 backend: LMDB }} }}
                 layer {{ name: "silence" type: "Silence" bottom: "label" }}
                 {one("InnerProduct", "inner_product_param { num_output: 3 }", top="ip")}''')
    fill(net)
    model = export_onnx(net)
    assert [i.name for i in model.graph.input] == ["data", "label"]
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == [4, 1, 28, 28]
    metadata = {p.key: p.value for p in model.metadata_props}
    assert metadata["kaffe.input.data"] == "Data layer 'mnist'"
    assert metadata["kaffe.transform_param.data"] == "scale: 0.00390625 mean_value: 10.0"
    net.forward()
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (ip,) = session.run(None, {"data": net.blobs["data"].data, "label": net.blobs["label"].data})
    assert relative_error(net.blobs["ip"].data, ip) < 1e-5


@pytest.mark.skipif(not LENET_WEIGHTS.exists(), reason="Caffe-trained LeNet weights not found")
def test_caffe_lenet_train_test_exports_with_its_data_layer(mnist_lmdb, tmp_path, monkeypatch):
    """Caffe's own TEST net, reading MNIST's test LMDB where Caffe would (examples/mnist/), with Caffe's weights:
    onnxruntime gives its accuracy and loss from the batch the Data layer delivered."""
    (tmp_path / "examples" / "mnist").mkdir(parents=True)
    (tmp_path / "examples" / "mnist" / "mnist_test_lmdb").symlink_to(mnist_lmdb / "mnist_test_lmdb")
    monkeypatch.chdir(tmp_path)
    net = Net(str(ZOO / "bvlc" / "examples" / "mnist" / "lenet_train_test.prototxt"), kaffe.TEST,
              weights=str(LENET_WEIGHTS))
    model = export_onnx(net)
    assert [i.name for i in model.graph.input] == ["data", "label"]
    assert [o.name for o in model.graph.output] == ["accuracy", "loss"]
    metadata = {p.key: p.value for p in model.metadata_props}
    assert metadata["kaffe.transform_param.data"] == "scale: 0.00390625"
    net.forward()
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    accuracy, loss = session.run(None, {"data": net.blobs["data"].data, "label": net.blobs["label"].data})
    assert accuracy == net.blobs["accuracy"].data and accuracy > 0.95
    assert relative_error(net.blobs["loss"].data, loss) < 1e-5


# -- refusals --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,message", [
    (one("Filter").replace('bottom: "data"', 'bottom: "data" bottom: "label"'),
     "Filter layer 'layer' has no ONNX counterpart"),
    (pooling("kernel_size: 2 stride: 2", "STOCHASTIC").replace('pooling_param', 'phase: TRAIN pooling_param'),
     "Pooling layer 'pool': STOCHASTIC pooling draws at random in the TRAIN phase"),
    (one("BatchNorm", "batch_norm_param { use_global_stats: false }"), "BatchNorm layer 'layer': use_global_stats"),
    (one("Slice", "slice_param { axis: 0 }", top="a", name="s").replace('top: "a"', 'top: "a" top: "b"'),
     "Slice layer 's': slicing the batch axis fixes the batch size"),
    (one("InnerProduct", "inner_product_param { num_output: 2 axis: 0 }"),
     r"InnerProduct layer 'layer': an inner product over the batch axis fixes the batch size: export it with "
     r"the net's batch \(2\)"),
    (one("Scale", "scale_param { axis: 0 num_axes: 2 }"), "a learned operand over the batch axis fixes"),
])
def test_layers_without_an_exact_counterpart_stop_the_export(text, message):
    net = net_of(text, data=[2, 3, 4, 4], label=[2])
    with pytest.raises(KaffeError, match=message):
        export_onnx(net, batch="dynamic")


def test_train_phase_and_missing_onnx_are_refused(monkeypatch):
    with pytest.raises(KaffeError, match="only a TEST-phase net"):
        export_onnx(net_of(one("ReLU"), phase=caffe_pb2.TRAIN, data=[1, 2]))
    net = net_of(one("ReLU"), data=[1, 2])
    with pytest.raises(KaffeError, match="opset must be between 13"):
        export_onnx(net, opset=12)
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(KaffeError, match=r'pip install "kaffe\[onnx\]"'):
        export_onnx(net)


# -- the command line ------------------------------------------------------------------------------------------------
LENET_DEPLOY = str(REPO / "models" / "lenet" / "lenet_deploy.prototxt")


def test_cli_exports_with_weights_and_batch(tmp_path):
    out = tmp_path / "lenet.onnx"
    args = ["export", "onnx", "--model", str(LENET_WEIGHTS.parent / "lenet.prototxt"), "--out", str(out),
            "--batch", "dynamic", "--opset", "18"]
    if LENET_WEIGHTS.exists():
        args += ["--weights", str(LENET_WEIGHTS)]
    assert cli.main(args) == 0
    model = onnx.load(str(out))
    assert model.opset_import[0].version == 18
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert cli.main(["export", "onnx", "--model", LENET_DEPLOY, "--out", str(out), "--batch", "3"]) == 0
    assert onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim[0].dim_value == 3


@pytest.mark.parametrize("args,message", [
    (["--model", LENET_DEPLOY, "--batch", "zero"], "--batch must be 'dynamic' or a positive integer, got 'zero'"),
    (["--model", LENET_DEPLOY, "--batch", "0"], "--batch must be 'dynamic' or a positive integer, got '0'"),
    (["--model", "missing.prototxt"], "missing.prototxt"),
    (["--model", LENET_DEPLOY, "--weights", "missing.caffemodel"], "missing.caffemodel"),
    (["--model", LENET_DEPLOY, "--opset", "99"], "--opset must be between 13 and"),
    ([], "the following arguments are required: --model"),
])
def test_cli_bad_input_is_one_line(tmp_path, capsys, args, message):
    out = ["--out", str(tmp_path / "x.onnx")] if args else []
    assert cli.main(["export", "onnx"] + args + out) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("kaffe export: error:")]
    assert len(errors) == 1 and message in errors[0], errors
    assert not (tmp_path / "x.onnx").exists()


def test_cli_unsupported_layer_is_one_line_without_traceback(tmp_path):
    model = tmp_path / "filter.prototxt"
    model.write_text('layer { name: "data" type: "Input" top: "data" top: "keep" input_param { shape { dim: 2 '
                     'dim: 3 } shape { dim: 2 } } }\n'
                     'layer { name: "select" type: "Filter" bottom: "data" bottom: "keep" top: "kept" }')
    result = subprocess.run([sys.executable, "-m", "kaffe.tools.cli", "export", "onnx", "--model", str(model),
                             "--out", str(tmp_path / "filter.onnx")], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == ("kaffe export: error: Filter layer 'select' has no ONNX "
                                                       "counterpart; the export stops (see the layer table under "
                                                       "ONNX in README.md)")
    assert "Traceback" not in result.stderr and not (tmp_path / "filter.onnx").exists()
    assert "Traceback" not in result.stderr
