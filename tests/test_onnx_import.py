"""ONNX import: models built with onnx.helper give in kaffe what onnxruntime gives; imported nets train; bad input
is refused in one line; Caffe -> ONNX -> Caffe keeps the outputs."""
import re
import sys
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper  # noqa: E402

import kaffe  # noqa: E402
from gradient_check import opencl_available  # noqa: E402
from kaffe.engine.errors import KaffeError  # noqa: E402
from kaffe.engine.onnx_import import import_onnx  # noqa: E402
from kaffe.tools import cli  # noqa: E402

RNG = np.random.default_rng(0)


def random(*shape, low=-1.0, high=1.0):
    return RNG.uniform(low, high, shape).astype(np.float32)


def make_model(nodes, inputs, outputs, initializers=None, opset=17):
    """A model of `nodes` with float inputs {name: shape} (None: a dynamic batch), outputs [names] and
    initializers {name: array}."""
    graph = helper.make_graph(
        nodes, "test", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
        [onnx.numpy_helper.from_array(np.asarray(v), n) for n, v in (initializers or {}).items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def relative_error(expected, actual):
    """Max abs error over the expected output's RMS."""
    assert expected.shape == actual.shape, (expected.shape, actual.shape)
    rms = float(np.sqrt(np.mean(np.square(expected.astype(np.float64))))) or 1.0
    return float(np.abs(expected.astype(np.float64) - actual).max()) / rms


def run_both(model, feeds, batch=None):
    """(onnxruntime outputs, kaffe outputs) by output name, kaffe's from Net.from_onnx in the TEST phase."""
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    net = kaffe.Net.from_onnx(model, kaffe.TEST, batch=batch)
    for name, value in feeds.items():
        net.blobs[name].reshape(*value.shape)
        net.blobs[name].data[...] = value
    net.forward()
    return expected, {name: net.blobs[name].data.copy() for name in expected}


def check(model, feeds, batch=None):
    expected, actual = run_both(model, feeds, batch)
    for name in expected:
        assert relative_error(expected[name], actual[name]) < 1e-4, name


def node(op, inputs, outputs=("y",), **attributes):
    return helper.make_node(op, list(inputs), list(outputs), **attributes)


def single(op, x_shape, attributes=None, initializers=None, extra_inputs=(), opset=17, low=-1.0, high=1.0):
    """A model of one node reading x (and the named initializers), writing y; with a random input."""
    initializers = initializers or {}
    model = make_model([node(op, ["x", *extra_inputs], **(attributes or {}))], {"x": x_shape}, ["y"],
                       initializers, opset)
    return model, {"x": random(*x_shape, low=low, high=high)}


def i64(*values):
    return np.array(values, dtype=np.int64)


CONV_W = random(4, 3, 3, 3)
CASES = {
    # convolution: padding, stride, dilation, groups, auto_pad, asymmetric padding Caffe rounds away, N-D
    "conv_pad_stride": single("Conv", [2, 3, 9, 9], dict(pads=[1, 1, 1, 1], strides=[2, 2]),
                              {"w": CONV_W, "b": random(4)}, ["w", "b"]),
    "conv_dilation_group": single("Conv", [1, 6, 11, 10], dict(dilations=[2, 1], group=3, pads=[2, 0, 2, 0]),
                                  {"w": random(6, 2, 3, 3)}, ["w"]),
    "conv_same_upper": single("Conv", [1, 3, 9, 9], dict(auto_pad="SAME_UPPER", strides=[2, 2]),
                              {"w": CONV_W}, ["w"]),
    "conv_same_asymmetric": single("Conv", [1, 3, 10, 10], dict(auto_pad="SAME_UPPER", strides=[2, 2]),
                                   {"w": random(4, 3, 4, 4)}, ["w"]),
    "conv_pads_rounded": single("Conv", [1, 3, 9, 9], dict(pads=[0, 0, 1, 1], strides=[2, 2]), {"w": CONV_W},
                                ["w"]),
    "conv_rectangular": single("Conv", [1, 3, 7, 9], dict(pads=[1, 2, 1, 2], kernel_shape=[3, 5]),
                               {"w": random(2, 3, 3, 5), "b": random(2)}, ["w", "b"]),
    "conv_1d": single("Conv", [2, 3, 12], dict(pads=[1, 1], strides=[2]), {"w": random(5, 3, 3)}, ["w"]),
    "deconv_stride_pad": single("ConvTranspose", [2, 3, 5, 5], dict(strides=[2, 2], pads=[1, 1, 1, 1]),
                                {"w": random(3, 4, 4, 4), "b": random(4)}, ["w", "b"]),
    "deconv_group": single("ConvTranspose", [1, 4, 4, 6], dict(group=2, strides=[1, 2]),
                           {"w": random(4, 3, 3, 3)}, ["w"]),
    "deconv_output_padding": single("ConvTranspose", [1, 3, 4, 5], dict(strides=[2, 2], pads=[1, 1, 1, 1],
                                                                         output_padding=[1, 0]),
                                    {"w": random(3, 2, 3, 3), "b": random(2)}, ["w", "b"]),
    "deconv_asymmetric_pads": single("ConvTranspose", [1, 3, 4, 4], dict(strides=[2, 1], pads=[2, 0, 0, 1]),
                                     {"w": random(3, 2, 4, 3)}, ["w"]),
    "deconv_same_upper": single("ConvTranspose", [1, 3, 4, 5], dict(strides=[2, 2], auto_pad="SAME_UPPER"),
                                {"w": random(3, 2, 3, 3)}, ["w"]),
    "deconv_output_shape": single("ConvTranspose", [1, 3, 5, 5], dict(strides=[2, 2], output_shape=[9, 9]),
                                  {"w": random(3, 2, 3, 3)}, ["w"]),
    # pooling: Caffe's ceil-with-clip vs ONNX's floor, ceil_mode, padding, AVE divisors with and without pad
    "maxpool_112": single("MaxPool", [1, 2, 112, 112], dict(kernel_shape=[3, 3], strides=[2, 2])),
    "maxpool_113_pad": single("MaxPool", [1, 2, 113, 113], dict(kernel_shape=[3, 3], strides=[2, 2],
                                                                 pads=[1, 1, 1, 1])),
    "maxpool_ceil": single("MaxPool", [1, 2, 112, 112], dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)),
    "maxpool_same": single("MaxPool", [1, 2, 10, 9], dict(kernel_shape=[3, 2], strides=[2, 2],
                                                           auto_pad="SAME_UPPER")),
    "avepool_pad_exclude": single("AveragePool", [2, 3, 113, 113], dict(kernel_shape=[3, 3], strides=[2, 2],
                                                                         pads=[1, 1, 1, 1])),
    "avepool_pad_include": single("AveragePool", [2, 3, 112, 112], dict(kernel_shape=[3, 3], strides=[2, 2],
                                                                         pads=[1, 1, 1, 1], count_include_pad=1)),
    "avepool_ceil_overhang": single("AveragePool", [1, 3, 10, 10], dict(kernel_shape=[3, 3], strides=[2, 2],
                                                                         ceil_mode=1)),
    "avepool_ceil_pad_include": single("AveragePool", [1, 3, 10, 11], dict(
        kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1, pads=[1, 1, 1, 1], count_include_pad=1)),
    "avepool_asymmetric": single("AveragePool", [1, 2, 9, 9], dict(kernel_shape=[2, 2], strides=[2, 2],
                                                                    pads=[0, 0, 1, 1])),
    "avepool_window_covering_input": single("AveragePool", [1, 2, 6, 6], dict(kernel_shape=[7, 7],
                                                                               pads=[0, 0, 1, 1])),
    "maxpool_window_covering_input": single("MaxPool", [1, 2, 5, 6], dict(kernel_shape=[6, 7], pads=[1, 0, 0, 1])),
    "global_ave": single("GlobalAveragePool", [2, 3, 5, 7]),
    "global_max": single("GlobalMaxPool", [2, 3, 5, 7]),
    # inner products
    "gemm_transB": single("Gemm", [3, 6], dict(transB=1), {"w": random(4, 6), "b": random(4)}, ["w", "b"]),
    "gemm_alpha_beta": single("Gemm", [3, 6], dict(alpha=0.5, beta=2.0), {"w": random(6, 4), "b": random(1, 4)},
                              ["w", "b"]),
    "gemm_no_bias": single("Gemm", [3, 6], {}, {"w": random(6, 4)}, ["w"]),
    "matmul_3d": single("MatMul", [2, 3, 6], {}, {"w": random(6, 5)}, ["w"]),
    # activations
    "relu": single("Relu", [2, 3, 4]),
    "leaky_relu": single("LeakyRelu", [2, 3, 4], dict(alpha=0.2)),
    "leaky_relu_default": single("LeakyRelu", [2, 3, 4]),
    "prelu_channel": single("PRelu", [2, 3, 4, 5], {}, {"s": random(3, 1, 1)}, ["s"]),
    "prelu_shared": single("PRelu", [2, 3, 4], {}, {"s": random(1)}, ["s"]),
    "sigmoid": single("Sigmoid", [2, 3, 4]),
    "tanh": single("Tanh", [2, 3, 4]),
    "elu": single("Elu", [2, 3, 4], dict(alpha=0.5)),
    "clip_inputs": single("Clip", [2, 3, 4], {}, {"lo": np.float32(-0.3), "hi": np.float32(0.5)}, ["lo", "hi"]),
    "clip_min_only": single("Clip", [2, 3, 4], {}, {"lo": np.float32(0)}, ["lo"]),
    "clip_attributes": single("Clip", [2, 3, 4], dict(min=-0.2, max=0.1), opset=6),
    "selu": single("Selu", [2, 3, 4]),
    "selu_attributes": single("Selu", [2, 3, 4], dict(alpha=1.2, gamma=0.8)),
    "hard_sigmoid": single("HardSigmoid", [2, 3, 4], dict(alpha=0.3, beta=0.4), low=-4, high=4),
    "hard_swish": single("HardSwish", [2, 3, 4], low=-5, high=5),
    "abs": single("Abs", [2, 3, 4]),
    "exp": single("Exp", [2, 3, 4]),
    "log": single("Log", [2, 3, 4], low=0.1),
    "softplus": single("Softplus", [2, 3, 4]),
    "neg": single("Neg", [2, 3, 4]),
    "sqrt": single("Sqrt", [2, 3, 4], low=0.1),
    "reciprocal": single("Reciprocal", [2, 3, 4], low=0.5),
    "pow": single("Pow", [2, 3, 4], {}, {"e": np.float32(3)}, ["e"]),
    "batchnorm": single("BatchNormalization", [2, 3, 4, 5], dict(epsilon=1e-3),
                        {"g": random(3), "b": random(3), "m": random(3), "v": random(3, low=0.5, high=2)},
                        ["g", "b", "m", "v"]),
    "lrn_3": single("LRN", [2, 6, 4, 5], dict(size=3, alpha=0.1, beta=0.6, bias=2.0)),
    "lrn_5_defaults": single("LRN", [2, 7, 4, 5], dict(size=5)),
    # elementwise arithmetic with constants: Bias / Scale over contiguous axes, scalars
    "add_channel_constant": single("Add", [2, 3, 4, 5], {}, {"c": random(3, 1, 1)}, ["c"]),
    "add_last_axis_constant": single("Add", [2, 3, 4, 5], {}, {"c": random(5)}, ["c"]),
    "mul_scalar": single("Mul", [2, 3, 4], {}, {"c": np.float32(-1.5)}, ["c"]),
    "mul_plane_constant": single("Mul", [2, 3, 4, 5], {}, {"c": random(1, 3, 4, 5)}, ["c"]),
    "sub_constant": single("Sub", [2, 3, 4, 5], {}, {"c": random(1, 3, 1, 1)}, ["c"]),
    "div_constant": single("Div", [2, 3, 4], {}, {"c": random(3, 4, low=1, high=2)}, ["c"]),
    # Dropout is the identity in the TEST phase; Identity and Cast alias their input
    "dropout_ratio_input": single("Dropout", [2, 3, 4], {}, {"r": np.float32(0.3)}, ["r"]),
    "dropout_attribute": single("Dropout", [2, 3, 4], dict(ratio=0.2), opset=10),
    "identity": single("Identity", [2, 3]),
    "cast_float": single("Cast", [2, 3], dict(to=TensorProto.FLOAT)),
    # shapes
    "flatten": single("Flatten", [2, 3, 4, 5]),
    "flatten_axis2": single("Flatten", [2, 3, 4, 5], dict(axis=2)),
    "flatten_axis0": single("Flatten", [2, 3, 4], dict(axis=0)),
    "reshape_constant": single("Reshape", [2, 3, 4, 5], {}, {"s": i64(0, -1, 5)}, ["s"]),
    "squeeze": single("Squeeze", [2, 3, 1, 1], {}, {"a": i64(2, 3)}, ["a"]),
    "unsqueeze": single("Unsqueeze", [2, 3], {}, {"a": i64(1, -1)}, ["a"]),
    "softmax_axis1": single("Softmax", [2, 3, 4, 5], dict(axis=1)),
    "softmax_last": single("Softmax", [2, 3, 4]),
    "softmax_opset11_flattens": single("Softmax", [2, 3, 4, 5], dict(axis=1), opset=11),
    "softmax_opset11_default": single("Softmax", [2, 7], opset=11),
}


def graph(nodes, inputs, outputs=("y",), initializers=None, opset=17):
    """A model of several nodes with random inputs {name: shape} (a dynamic dimension drawn as 2)."""
    model = make_model(nodes, inputs, list(outputs), initializers, opset)
    return model, {name: random(*(d if isinstance(d, int) else 2 for d in shape)) for name, shape in inputs.items()}


PAIR = {"a": [2, 3, 4, 5], "b": [2, 3, 4, 5]}
CASES.update({
    "add": graph([node("Add", ["a", "b"])], PAIR),
    "sub": graph([node("Sub", ["a", "b"])], PAIR),
    "mul": graph([node("Mul", ["a", "b"])], PAIR),
    "max": graph([node("Max", ["a", "b", "c"])], dict(PAIR, c=[2, 3, 4, 5])),
    "mean": graph([node("Mean", ["a", "b", "c"])], dict(PAIR, c=[2, 3, 4, 5])),
    "min": graph([node("Min", ["a", "b", "c"])], dict(PAIR, c=[2, 3, 4, 5])),
    "min_single": graph([node("Min", ["a"])], {"a": [2, 3]}),
    "sum": graph([node("Sum", ["a", "b", "c"])], dict(PAIR, c=[2, 3, 4, 5])),
    "constant_minus_blob": graph([node("Sub", ["c", "a"])], {"a": [2, 3]}, initializers={"c": random(3)}),
    "scalar_over_blob": graph([node("Div", ["c", "a"])], {"a": [2, 3]}, initializers={"c": np.float32(2.5)}),
    "div": (graph([node("Div", ["a", "b"])], PAIR)[0], {"a": random(2, 3, 4, 5), "b": random(2, 3, 4, 5, low=0.5)}),
    "div_broadcast": (graph([node("Div", ["a", "b"])], {"a": [2, 3, 4], "b": [3, 1]})[0],
                      {"a": random(2, 3, 4), "b": random(3, 1, low=0.5)}),
    "constant_first_add": graph([node("Add", ["c", "a"])], {"a": [2, 3]}, initializers={"c": random(3)}),
    # a squeeze-and-excitation gate: (N, C, 1, 1) times (N, C, H, W)
    "broadcast_mul_gate": graph([node("GlobalAveragePool", ["a"], ["p"]), node("Sigmoid", ["p"], ["g"]),
                                 node("Mul", ["a", "g"])], {"a": [2, 3, 4, 5]}),
    "broadcast_sub_means": graph([node("ReduceMean", ["a"], ["m"], axes=[2]), node("Sub", ["a", "m"])],
                                 {"a": [2, 3, 4]}, opset=13),
    "broadcast_add_rows": graph([node("Add", ["r", "a"])], {"a": [2, 3, 4], "r": [3, 4]}),
    "concat_channels": graph([node("Concat", ["a", "b"], axis=1)], {"a": [2, 3, 4], "b": [2, 5, 4]}),
    "concat_last": graph([node("Concat", ["a", "b", "a"], axis=-1)], {"a": [2, 3, 4], "b": [2, 3, 1]}),
    "split_equal": graph([node("Split", ["a"], ["y", "z"], axis=1)], {"a": [2, 6, 3]}, ["y", "z"]),
    "split_sizes": graph([node("Split", ["a", "s"], ["y", "z", "w"], axis=-1)], {"a": [2, 3, 7]},
                         ["y", "z", "w"], {"s": i64(2, 4, 1)}),
    "split_attribute": graph([node("Split", ["a"], ["y", "z"], axis=2, split=[1, 3])], {"a": [2, 3, 4]},
                             ["y", "z"], opset=11),
    "slice_one_axis": graph([node("Slice", ["a", "s", "e", "ax"])], {"a": [2, 6, 5]},
                            initializers={"s": i64(1), "e": i64(4), "ax": i64(1)}),
    "slice_two_axes_negative": graph([node("Slice", ["a", "s", "e", "ax"])], {"a": [2, 6, 5]},
                                     initializers={"s": i64(2, -3), "e": i64(100, -1), "ax": i64(1, 2)}),
    "slice_attributes": graph([node("Slice", ["a"], starts=[0], ends=[2], axes=[2])], {"a": [2, 3, 5]},
                              opset=9),
    "matmul_add": graph([node("MatMul", ["a", "w"], ["m"]), node("Add", ["m", "b"])], {"a": [3, 6]},
                        initializers={"w": random(6, 4), "b": random(4)}),
    "matmul_add_kept": graph([node("MatMul", ["a", "w"], ["m"]), node("Add", ["m", "b"]), node("Relu", ["m"], ["z"])],
                             {"a": [3, 6]}, ["y", "z"], {"w": random(6, 4), "b": random(4)}),
    "identity_output": graph([node("Relu", ["a"], ["r"]), node("Identity", ["r"]), node("Sigmoid", ["r"], ["z"])],
                             {"a": [2, 3]}, ["y", "z"]),
    "maxpool_unused_indices": graph([node("MaxPool", ["a"], ["y", "indices"], kernel_shape=[2, 2])],
                                    {"a": [1, 2, 5, 5]}),
    "pad_then_conv": graph([node("Pad", ["a", "p"], ["padded"]), node("Conv", ["padded", "w"], pads=[0, 1, 0, 1])],
                           {"a": [1, 3, 6, 7]}, initializers={"p": i64(0, 0, 2, 1, 0, 0, 2, 1), "w": CONV_W}),
    "pad_attributes_then_conv": graph([node("Pad", ["a"], ["padded"], pads=[0, 0, 1, 1, 0, 0, 1, 1]),
                                       node("Conv", ["padded", "w"], strides=[2, 2])], {"a": [1, 3, 7, 7]},
                                      initializers={"w": CONV_W}, opset=10),
    "resize_nearest_scales": graph([node("Resize", ["a", "", "s"], mode="nearest")], {"a": [1, 3, 4, 5]},
                                   initializers={"s": np.array([1, 1, 2, 3], np.float32)}),
    "resize_nearest_sizes_asymmetric": graph([node("Resize", ["a", "", "", "z"], mode="nearest",
                                                   coordinate_transformation_mode="asymmetric",
                                                   nearest_mode="floor")],
                                             {"a": [2, 2, 3, 3]}, initializers={"z": i64(2, 2, 12, 6)}),
    "resize_opset10": graph([node("Resize", ["a", "s"], mode="nearest")], {"a": [1, 2, 3, 4]},
                            initializers={"s": np.array([1, 1, 3, 2], np.float32)}, opset=10),
    "upsample_opset9": graph([node("Upsample", ["a", "s"], mode="nearest")], {"a": [1, 2, 3, 4]},
                             initializers={"s": np.array([1, 1, 2, 2], np.float32)}, opset=9),
    "tile_two_axes": graph([node("Tile", ["a", "r"])], {"a": [2, 3, 4]}, initializers={"r": i64(1, 2, 3)}),
    "reduce_mean_spatial_keepdims": graph([node("ReduceMean", ["a"], axes=[2, 3])], {"a": [2, 3, 4, 5]},
                                          opset=13),
    "reduce_sum_axes_input": graph([node("ReduceSum", ["a", "ax"], keepdims=0)], {"a": [2, 3, 4]},
                                   initializers={"ax": i64(-1, 1)}),
    "reduce_sumsq_all": graph([node("ReduceSumSquare", ["a"], keepdims=0)], {"a": [2, 3, 4]}, opset=13),
    "reduce_l1": graph([node("ReduceL1", ["a"], axes=[2])], {"a": [2, 3, 4]}, opset=13),
    "argmax_keepdims": graph([node("ArgMax", ["a"], ["i"], axis=1), node("Cast", ["i"], to=TensorProto.FLOAT)],
                             {"a": [2, 5, 3]}),
    "argmax_squeezed": graph([node("ArgMax", ["a"], ["i"], axis=-1, keepdims=0),
                              node("Cast", ["i"], to=TensorProto.FLOAT)], {"a": [2, 3, 6]}),
    "greater_threshold": graph([node("Greater", ["a", "t"], ["g"]), node("Cast", ["g"], to=TensorProto.FLOAT)],
                               {"a": [2, 3, 4]}, initializers={"t": np.float32(0.2)}),
    # PyTorch's x.view(x.size(0), -1): shape arithmetic folded into the Reshape target
    "reshape_shape_arithmetic": graph([
        node("Shape", ["a"], ["shape"]), node("Constant", [], ["zero"], value=helper.make_tensor(
            "zero", TensorProto.INT64, [], [0])),
        node("Gather", ["shape", "zero"], ["batch"], axis=0), node("Unsqueeze", ["batch", "axes"], ["batch1"]),
        node("Concat", ["batch1", "minus1"], ["target"], axis=0), node("Reshape", ["a", "target"])],
        {"a": [2, 3, 4]}, initializers={"axes": i64(0), "minus1": i64(-1)}),
})


def embedding(cast):
    """Gather of table rows (+ a bias): indices from an int64 input, or cast from a float input of integers (as
    Caffe's Embed requires)."""
    nodes = [node("Gather", ["t", "i"], ["g"]), node("Add", ["g", "b"])]
    if cast:
        nodes.insert(0, node("Cast", ["a"], ["i"], to=TensorProto.INT64))
    model = make_model(nodes, {} if cast else {}, ["y"], {"t": random(10, 4), "b": random(4)})
    model.graph.input.append(helper.make_tensor_value_info(*(("a", TensorProto.FLOAT) if cast else
                                                             ("i", TensorProto.INT64)), [2, 3]))
    values = RNG.integers(0, 10, (2, 3))
    return model, {"a": values.astype(np.float32)} if cast else {"i": values.astype(np.int64)}


CASES.update({"gather_int_indices": embedding(cast=False), "gather_cast_indices": embedding(cast=True)})


@pytest.mark.parametrize("case", sorted(CASES))
def test_operator_matches_onnxruntime(case):
    model, feeds = CASES[case]
    check(model, feeds)


@pytest.mark.opencl
@pytest.mark.skipif(not opencl_available(), reason="no OpenCL platform (install pocl-opencl-icd)")
@pytest.mark.parametrize("case", ["avepool_pad_exclude", "broadcast_mul_gate", "deconv_output_padding",
                                  "resize_nearest_scales", "slice_two_axes_negative", "batchnorm"])
def test_imported_layers_match_onnxruntime_on_the_opencl_device(gpu_mode, case):
    check(*CASES[case])


@pytest.mark.parametrize("constant", [False, True])
def test_opset6_broadcast_lines_the_operand_up_from_axis(constant):
    """Before opset 7, Add/Mul with broadcast=1 and axis=1 line B up with A's axis 1 (onnxruntime runs no such
    opset, so numpy says what ONNX computes)."""
    a, b = random(2, 3, 4, 5), random(3, 4)
    model = make_model([node("Add", ["a", "b"], ["s"], broadcast=1, axis=1), node("Mul", ["s", "b"], broadcast=1,
                                                                                   axis=1)],
                       {"a": a.shape} if constant else {"a": a.shape, "b": b.shape}, ["y"],
                       {"b": b} if constant else {}, opset=6)
    net = kaffe.Net.from_onnx(model, kaffe.TEST)
    out = net.forward(**({"a": a} if constant else {"a": a, "b": b}))["y"]
    assert relative_error((a + b[:, :, None]) * b[:, :, None], out) < 1e-6


def test_dynamic_batch_imports_at_one_and_runs_at_another():
    """Reshape targets folded at batch 1 keep the batch free (0 / -1 in front), so batch 2 runs as in ONNX."""
    model, _ = CASES["reshape_shape_arithmetic"]
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    net, _ = import_onnx(model)
    assert list(net.layer[0].input_param.shape[0].dim) == [1, 3, 4]
    assert list(net.layer[1].reshape_param.shape.dim) == [0, 12]
    check(model, {"a": random(2, 3, 4)})


def test_train_phase_net_keeps_the_stored_statistics():
    model, feeds = graph([node("Conv", ["a", "w"], ["c"]), node("BatchNormalization", ["c", "g", "b", "m", "v"])],
                         {"a": [2, 3, 5, 5]}, initializers={"w": CONV_W, "g": random(4), "b": random(4),
                                                            "m": random(4), "v": random(4, low=0.5, high=2)})
    net = kaffe.Net.from_onnx(model, kaffe.TRAIN)
    out = net.forward(a=feeds["a"])["y"]
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    assert relative_error(expected[0], out) < 1e-4   # use_global_stats: the ONNX statistics, not the batch's


def test_batch_sets_a_dynamic_batch_only():
    model = CASES["relu"][0]   # static batch 2
    assert list(import_onnx(model, batch=2)[0].layer[0].input_param.shape[0].dim) == [2, 3, 4]
    with pytest.raises(KaffeError, match="static batch 2: .* only a dynamic batch can be set"):
        import_onnx(model, batch=3)


def test_average_pooling_divisor_correction_is_a_fixed_scale():
    net, weights = import_onnx(CASES["avepool_pad_exclude"][0])
    assert [layer.type for layer in net.layer] == ["Input", "Pooling", "Scale"]
    assert (net.layer[2].param[0].lr_mult, net.layer[2].param[0].decay_mult) == (0, 0)
    # Caffe divides the corner windows by 9 (the padded window), ONNX by the 4 cells inside the input
    assert np.asarray(weights.layer[2].blobs[0].data)[0] == pytest.approx(9 / 4)


REFUSED = {
    "transpose": (graph([node("Transpose", ["a"], perm=[1, 0])], {"a": [2, 3]}),
                  "node 'Transpose_0' (Transpose): operator has no Caffe counterpart"),
    "custom_domain": (graph([helper.make_node("Foo", ["a"], ["y"], domain="com.example")], {"a": [2]}),
                      "(Foo): operator of domain 'com.example' has no Caffe layer"),
    "matmul_of_computed": (graph([node("MatMul", ["a", "b"])], {"a": [2, 3], "b": [3, 4]}),
                           "(MatMul): its second operand (the weights) must be a constant"),
    "conv_asymmetric": (single("Conv", [1, 3, 8, 8], dict(pads=[0, 0, 1, 1], strides=[2, 2]), {"w": CONV_W},
                               ["w"]), "Caffe pads both ends alike"),
    "deconv_output_padding_bias_rows": (single("ConvTranspose", [1, 3, 4, 4], dict(strides=[2, 2],
                                                                                    output_padding=[1, 1]),
                                               {"w": random(3, 2, 3, 3)}, ["w"]), "hold only the bias"),
    "pool_dilation": (single("MaxPool", [1, 1, 9, 9], dict(kernel_shape=[2, 2], dilations=[2, 2])),
                      "dilated pooling"),
    "pool_1d": (single("MaxPool", [1, 1, 9], dict(kernel_shape=[2])), "Caffe pools 4-D blobs"),
    "pool_pad_not_below_kernel": (single("AveragePool", [1, 1, 9, 9], dict(kernel_shape=[2, 2], pads=[2, 2, 2, 2])),
                                  "not smaller than the kernel"),
    "slice_step": (graph([node("Slice", ["a", "s", "e", "ax", "st"])], {"a": [2, 6]},
                         initializers={"s": i64(0), "e": i64(6), "ax": i64(1), "st": i64(2)}), "step 2"),
    "reduce_middle_axis": (graph([node("ReduceSum", ["a"], axes=[1])], {"a": [2, 3, 4]}, opset=13),
                           "Caffe's Reduction reduces all the axes from one on"),
    "argmax_last_index": (graph([node("ArgMax", ["a"], ["i"], select_last_index=1),
                                 node("Cast", ["i"], to=TensorProto.FLOAT)], {"a": [2, 3]}), "select_last_index"),
    "cast_to_int": (graph([node("Cast", ["a"], ["i"], to=TensorProto.INT64), node("Cast", ["i"], to=TensorProto.FLOAT)],
                          {"a": [2, 3]}), "cast to INT64"),
    "maxpool_indices": (graph([node("MaxPool", ["a"], ["p", "i"], kernel_shape=[2, 2]),
                               node("Cast", ["i"], to=TensorProto.FLOAT)], {"a": [1, 2, 4, 4]}),
                        "the Indices output has no Caffe counterpart"),
    "pad_before_pooling": (graph([node("Pad", ["a", "p"], ["padded"]),
                                  node("MaxPool", ["padded"], kernel_shape=[2, 2])], {"a": [1, 3, 6, 6]},
                                 initializers={"p": i64(0, 0, 1, 1, 0, 0, 1, 1)}),
                           "node 'Pad_0' (Pad): Caffe pads only inside a Convolution; this padding is read by "
                           "node 'MaxPool_1' (MaxPool)"),
    "pad_reflect": (graph([node("Pad", ["a", "p"], ["padded"], mode="reflect"), node("Conv", ["padded", "w"])],
                          {"a": [1, 3, 6, 6]}, initializers={"p": i64(0, 0, 1, 1, 0, 0, 1, 1), "w": CONV_W}),
                    "only zero padding"),
    "resize_linear": (graph([node("Resize", ["a", "", "s"], mode="linear")], {"a": [1, 3, 4, 4]},
                            initializers={"s": np.array([1, 1, 2, 2], np.float32)}), "linear resizing"),
    "resize_fraction": (graph([node("Resize", ["a", "", "s"], mode="nearest")], {"a": [1, 3, 4, 4]},
                              initializers={"s": np.array([1, 1, 1.5, 1.5], np.float32)}), "by whole factors"),
    "resize_floor_half_pixel": (graph([node("Resize", ["a", "", "s"], mode="nearest", nearest_mode="floor")],
                                      {"a": [1, 3, 4, 4]}, initializers={"s": np.array([1, 1, 2, 2], np.float32)}),
                                "does not copy each pixel into its block"),
    "constant_minus_constant_output": (graph([node("Sub", ["c", "c"], ["d"]), node("Add", ["d", "c"])], {"a": [2]},
                                              initializers={"c": random(3)}), "output 'y' is a constant"),
    "batchnorm_per_activation": (single("BatchNormalization", [2, 3, 4], dict(spatial=0),
                                        {n: random(3, 4, low=0.5) for n in "gbmv"}, list("gbmv"), opset=7),
                                 "statistics per activation"),
    "lrn_even": (single("LRN", [1, 4, 3, 3], dict(size=4)), "even size 4"),
    "max_broadcast": (graph([node("Max", ["a", "b"])], {"a": [2, 3], "b": [3]}), "does not broadcast"),
    "gemm_transA": (single("Gemm", [6, 3], dict(transA=1), {"w": random(6, 4)}, ["w"]), "transA"),
    "dynamic_height": (graph([node("Relu", ["a"])], {"a": [1, 3, "height", 4]}),
                       "input 'a' has the dynamic dimension 'height' at axis 2"),
    "integer_input": ((make_model([node("Relu", ["a"])], {}, ["y"]), {}), None),
    "constant_output": ((make_model([node("Relu", ["c"])], {"a": [1]}, ["y"], {"c": random(2)}), {}),
                        "output 'y' is a constant"),
}
int_model = REFUSED["integer_input"][0][0]
int_model.graph.input.append(helper.make_tensor_value_info("i", TensorProto.INT64, [2]))
int_model.graph.node[0].input[0] = "i"
REFUSED["integer_input"] = ((int_model, {}), "input 'i' holds INT64 values; Caffe blobs hold floats")


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_unexpressible_model_is_refused_naming_the_node(case):
    (model, _), message = REFUSED[case]
    with pytest.raises(KaffeError, match=re.escape(message)):
        import_onnx(model)


def test_missing_onnx_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(ImportError, match=re.escape('pip install "kaffe[onnx]"')) as raised:
        import_onnx(b"")
    assert isinstance(raised.value, KaffeError)


@pytest.mark.parametrize("content, message", [
    (b"name: 'not onnx'\nlayer { type: 'ReLU' }\n", "not an ONNX model"),
    (b"", "not an ONNX model"),
    (None, "cannot read the ONNX model"),
])
def test_cli_refuses_bad_files_in_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "model.onnx"
    if content is not None:
        path.write_bytes(content)
    status = cli.main(["import", "onnx", str(path), "--out-model", str(tmp_path / "net.prototxt"),
                       "--out-weights", str(tmp_path / "w.caffemodel")])
    err = capsys.readouterr().err
    assert status == 1
    assert err.startswith("kaffe import: error: ") and message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_model_given_as_bytes_or_message_is_left_unchanged():
    model = CASES["conv_pad_stride"][0]
    before = model.SerializeToString()
    assert import_onnx(before) == import_onnx(model)
    assert model.SerializeToString() == before


def test_weights_stored_beside_the_model_are_read(tmp_path):
    model, feeds = CASES["conv_pad_stride"]
    onnx.save_model(model, str(tmp_path / "model.onnx"), save_as_external_data=True, location="weights.bin",
                    size_threshold=0)
    net, weights = import_onnx(tmp_path / "model.onnx")
    assert len(weights.layer[1].blobs) == 2
    (tmp_path / "weights.bin").unlink()
    with pytest.raises(KaffeError, match="cannot read the ONNX model's weights: .*weights.bin"):
        import_onnx(tmp_path / "model.onnx")


def test_cli_refuses_a_batch_below_one(tmp_path, capsys):
    onnx.save(CASES["relu"][0], str(tmp_path / "model.onnx"))
    assert cli.main(["import", "onnx", str(tmp_path / "model.onnx"), "--out-model", str(tmp_path / "n.prototxt"),
                     "--out-weights", str(tmp_path / "w.caffemodel"), "--batch", "0"]) == 1
    assert capsys.readouterr().err == "kaffe import: error: batch must be a positive integer, got 0\n"


def test_cli_refuses_unsupported_operator_in_one_line(tmp_path, capsys):
    path = tmp_path / "model.onnx"
    onnx.save(REFUSED["transpose"][0][0], str(path))
    status = cli.main(["import", "onnx", str(path), "--out-model", str(tmp_path / "net.prototxt"),
                       "--out-weights", str(tmp_path / "w.caffemodel")])
    err = capsys.readouterr().err
    assert status == 1 and len(err.strip().splitlines()) == 1
    assert "node 'Transpose_0' (Transpose)" in err


def test_cli_writes_a_net_and_weights_that_match_onnxruntime(tmp_path):
    model, feeds = graph([node("Conv", ["a", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
                          node("BatchNormalization", ["c", "g", "bb", "m", "v"], ["n"]), node("Relu", ["n"], ["r"]),
                          node("AveragePool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
                          node("Flatten", ["p"], ["f"]), node("Gemm", ["f", "fw", "fb"], ["y"], transB=1)],
                         {"a": [None, 3, 6, 6]},
                         initializers={"w": CONV_W, "b": random(4), "g": random(4), "bb": random(4),
                                       "m": random(4), "v": random(4, low=0.5, high=2), "fw": random(5, 36),
                                       "fb": random(5)})
    feeds = {"a": random(3, 3, 6, 6)}
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    prototxt, weights = tmp_path / "net.prototxt", tmp_path / "w.caffemodel"
    assert cli.main(["import", "onnx", str(path), "--out-model", str(prototxt), "--out-weights", str(weights),
                     "--batch", "3"]) == 0
    net = kaffe.Net(str(prototxt), str(weights), kaffe.TEST)
    assert net.inputs == ["a"] and net.outputs == ["y"] and net.blobs["a"].data.shape == (3, 3, 6, 6)
    out = net.forward(a=feeds["a"])["y"]
    expected = ort.InferenceSession(path.read_bytes(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert relative_error(expected, out) < 1e-4


def train_imported(tmp_path, model, data, labels, capsys, iterations=300):
    """`kaffe import onnx` the model, put an HDF5Data layer in place of its Input and a SoftmaxWithLoss on its
    output, `kaffe train` it from the imported weights; returns the losses the log reports."""
    import h5py
    from kaffe.engine.io import read_text_proto, write_text_proto
    from kaffe.proto import caffe_pb2
    onnx.save(model, str(tmp_path / "model.onnx"))
    imported, weights = tmp_path / "imported.prototxt", tmp_path / "imported.caffemodel"
    assert cli.main(["import", "onnx", str(tmp_path / "model.onnx"), "--out-model", str(imported),
                     "--out-weights", str(weights)]) == 0
    with h5py.File(tmp_path / "train.h5", "w") as f:
        f["x"], f["label"] = data, labels.astype(np.float32)
    (tmp_path / "train.txt").write_text(f"{tmp_path / 'train.h5'}\n")
    net = read_text_proto(str(imported), caffe_pb2.NetParameter())
    train = caffe_pb2.NetParameter(name="imported_train")
    feed = train.layer.add(name="data", type="HDF5Data", top=["x", "label"])
    feed.hdf5_data_param.source, feed.hdf5_data_param.batch_size = str(tmp_path / "train.txt"), 16
    feed.hdf5_data_param.shuffle = True
    train.layer.extend(layer for layer in net.layer if layer.type != "Input")
    train.layer.add(name="loss", type="SoftmaxWithLoss", bottom=["y", "label"], top=["loss"])
    write_text_proto(train, str(tmp_path / "train.prototxt"))
    (tmp_path / "solver.prototxt").write_text(
        f'net: "{tmp_path / "train.prototxt"}"\nbase_lr: 0.05\nmomentum: 0.9\nlr_policy: "fixed"\n'
        f'max_iter: {iterations}\ndisplay: 50\naverage_loss: 10\nrandom_seed: 1\nsnapshot_after_train: false\n')
    assert cli.main(["train", "--solver", str(tmp_path / "solver.prototxt"), "--weights", str(weights)]) == 0
    log = capsys.readouterr().err  # `kaffe train` logs to stderr, as Caffe does
    return [float(loss) for loss in re.findall(r"\] Iteration \d+ \(.*\), loss = (\S+)", log)]


def clusters(shape, classes=3, count=240):
    """Inputs around one random centre per class, and their labels."""
    centres = random(classes, *shape, low=-2, high=2)
    labels = RNG.integers(0, classes, count)
    return (centres[labels] + random(count, *shape, low=-0.7, high=0.7)), labels


def test_imported_mlp_trains(tmp_path, capsys):
    model, _ = graph([node("Gemm", ["x", "w1", "b1"], ["h"], transB=1), node("Relu", ["h"], ["r"]),
                      node("MatMul", ["r", "w2"], ["m"]), node("Add", ["m", "b2"])], {"x": [None, 8]},
                     initializers={"w1": random(16, 8, low=-0.3, high=0.3), "b1": np.zeros(16, np.float32),
                                   "w2": random(16, 3, low=-0.3, high=0.3), "b2": np.zeros(3, np.float32)})
    losses = train_imported(tmp_path, model, *clusters((8,)), capsys)
    assert len(losses) >= 6 and losses[-1] < 0.5 * losses[0], losses


def test_imported_cnn_trains(tmp_path, capsys):
    model, _ = graph([node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
                      node("BatchNormalization", ["c", "g", "bb", "m", "v"], ["n"]), node("Relu", ["n"], ["r"]),
                      node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
                      node("Flatten", ["p"], ["f"]), node("Gemm", ["f", "fw", "fb"], ["y"], transB=1)],
                     {"x": [None, 1, 8, 8]},
                     initializers={"w": random(4, 1, 3, 3, low=-0.5, high=0.5), "b": np.zeros(4, np.float32),
                                   "g": np.ones(4, np.float32), "bb": np.zeros(4, np.float32),
                                   "m": np.zeros(4, np.float32), "v": np.ones(4, np.float32),
                                   "fw": random(3, 64, low=-0.1, high=0.1), "fb": np.zeros(3, np.float32)})
    losses = train_imported(tmp_path, model, *clusters((1, 8, 8)), capsys)
    assert len(losses) >= 6 and losses[-1] < 0.5 * losses[0], losses


# -- round trip: Caffe net -> ONNX (engine/onnx_export.py) -> Caffe net --------------------------------------
REPO = Path(__file__).resolve().parents[1]

ROUND_TRIP_NETS = {
    "vision": """
        layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 15 dim: 15 } } }
        layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
                convolution_param { num_output: 6 kernel_size: 3 pad: 1 stride: 2 group: 3 } }
        layer { name: "dil" type: "Convolution" bottom: "conv" top: "dil"
                convolution_param { num_output: 4 kernel_size: 3 dilation: 2 pad: 2 bias_term: false } }
        layer { name: "relu" type: "ReLU" bottom: "dil" top: "dil" relu_param { negative_slope: 0.1 } }
        layer { name: "maxpool" type: "Pooling" bottom: "dil" top: "maxpool"
                pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
        layer { name: "avepool" type: "Pooling" bottom: "dil" top: "avepool"
                pooling_param { pool: AVE kernel_size: 4 stride: 2 pad: 1 } }
        layer { name: "concat" type: "Concat" bottom: "maxpool" bottom: "avepool" top: "concat" }
        layer { name: "lrn" type: "LRN" bottom: "concat" top: "lrn" lrn_param { local_size: 3 alpha: 0.5 } }
        layer { name: "deconv" type: "Deconvolution" bottom: "lrn" top: "deconv"
                convolution_param { num_output: 3 kernel_size: 4 stride: 2 pad: 1 } }
        layer { name: "global" type: "Pooling" bottom: "deconv" top: "global"
                pooling_param { pool: AVE global_pooling: true } }
    """,
    "normalization": """
        layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 4 dim: 5 dim: 5 } } }
        layer { name: "bn" type: "BatchNorm" bottom: "data" top: "bn" }
        layer { name: "scale" type: "Scale" bottom: "bn" top: "bn" scale_param { bias_term: true } }
        layer { name: "prelu" type: "PReLU" bottom: "bn" top: "prelu" }
        layer { name: "bias" type: "Bias" bottom: "prelu" top: "bias" }
        layer { name: "ip" type: "InnerProduct" bottom: "bias" top: "ip" inner_product_param { num_output: 7 } }
        layer { name: "drop" type: "Dropout" bottom: "ip" top: "ip" }
        layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }
    """,
    "elementwise": """
        layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 6 dim: 3 dim: 4 } } }
        layer { name: "slice" type: "Slice" bottom: "data" top: "a" top: "b" top: "c"
                slice_param { axis: 1 slice_point: 2 slice_point: 4 } }
        layer { name: "sum" type: "Eltwise" bottom: "a" bottom: "b" top: "sum"
                eltwise_param { operation: SUM coeff: 0.5 coeff: -2 } }
        layer { name: "prod" type: "Eltwise" bottom: "sum" bottom: "c" top: "prod"
                eltwise_param { operation: PROD } }
        layer { name: "max" type: "Eltwise" bottom: "prod" bottom: "a" top: "max" eltwise_param { operation: MAX } }
        layer { name: "sigmoid" type: "Sigmoid" bottom: "max" top: "sigmoid" }
        layer { name: "tanh" type: "TanH" bottom: "sum" top: "tanh" }
        layer { name: "elu" type: "ELU" bottom: "c" top: "elu" elu_param { alpha: 0.5 } }
        layer { name: "flatten" type: "Flatten" bottom: "elu" top: "flatten" }
        layer { name: "reshape" type: "Reshape" bottom: "tanh" top: "reshape"
                reshape_param { shape { dim: 0 dim: -1 dim: 3 } } }
    """,
    "neurons": """
        layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 4 dim: 5 } } }
        layer { name: "power" type: "Power" bottom: "data" top: "power"
                power_param { power: 2 scale: 0.5 shift: 1.5 } }
        layer { name: "exp" type: "Exp" bottom: "data" top: "exp" exp_param { base: 2 scale: 0.5 shift: 0.1 } }
        layer { name: "log" type: "Log" bottom: "power" top: "log" log_param { base: 10 scale: 2 shift: 0.5 } }
        layer { name: "threshold" type: "Threshold" bottom: "data" top: "threshold"
                threshold_param { threshold: 0.2 } }
        layer { name: "clip" type: "Clip" bottom: "data" top: "clip" clip_param { min: -0.3 max: 0.4 } }
        layer { name: "swish" type: "Swish" bottom: "data" top: "swish" swish_param { beta: 1.5 } }
        layer { name: "bnll" type: "BNLL" bottom: "data" top: "bnll" }
        layer { name: "abs" type: "AbsVal" bottom: "data" top: "abs" }
        layer { name: "shared" type: "PReLU" bottom: "data" top: "shared" prelu_param { channel_shared: true } }
    """,
    "within_channel_lrn_crop": """
        layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 8 dim: 9 } } }
        layer { name: "lrn" type: "LRN" bottom: "data" top: "lrn"
                lrn_param { local_size: 3 alpha: 0.3 beta: 0.75 norm_region: WITHIN_CHANNEL } }
        layer { name: "ref" type: "Input" top: "ref" input_param { shape { dim: 2 dim: 3 dim: 5 dim: 4 } } }
        layer { name: "crop" type: "Crop" bottom: "lrn" bottom: "ref" top: "crop"
                crop_param { axis: 2 offset: 1 offset: 3 } }
    """,
    "inner_products_reductions": """
        layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 4 dim: 5 } } }
        layer { name: "ip_axis2" type: "InnerProduct" bottom: "data" top: "ip_axis2"
                inner_product_param { num_output: 6 axis: 2 } }
        layer { name: "ip_transposed" type: "InnerProduct" bottom: "data" top: "ip_transposed"
                inner_product_param { num_output: 3 transpose: true bias_term: false } }
        layer { name: "mean" type: "Reduction" bottom: "ip_axis2" top: "mean"
                reduction_param { operation: MEAN axis: 2 } }
        layer { name: "sumsq" type: "Reduction" bottom: "data" top: "sumsq"
                reduction_param { operation: SUMSQ axis: 1 coeff: 0.5 } }
        layer { name: "asum" type: "Reduction" bottom: "data" top: "asum" reduction_param { operation: ASUM } }
        layer { name: "tile" type: "Tile" bottom: "data" top: "tile" tile_param { axis: 2 tiles: 3 } }
    """,
    "scale_bias_embed": """
        layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 4 dim: 5 } } }
        layer { name: "gate" type: "Input" top: "gate" input_param { shape { dim: 2 dim: 3 } } }
        layer { name: "gated" type: "Scale" bottom: "data" bottom: "gate" top: "gated" scale_param { axis: 0 } }
        layer { name: "plane" type: "Scale" bottom: "gated" top: "plane"
                scale_param { axis: 2 num_axes: 2 bias_term: true } }
        layer { name: "offset" type: "Bias" bottom: "plane" top: "offset" bias_param { axis: 1 num_axes: 2 } }
        layer { name: "words" type: "Input" top: "words" input_param { shape { dim: 2 dim: 5 } } }
        layer { name: "embed" type: "Embed" bottom: "words" top: "embed"
                embed_param { num_output: 4 input_dim: 7 } }
    """,
    "pyramid_stochastic_im2col_euclidean": """
        layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 9 dim: 11 } } }
        layer { name: "relu" type: "ReLU" bottom: "data" top: "positive" }
        layer { name: "stochastic" type: "Pooling" bottom: "positive" top: "stochastic"
                pooling_param { pool: STOCHASTIC kernel_size: 3 stride: 2 } }
        layer { name: "spp" type: "SPP" bottom: "data" top: "spp" spp_param { pyramid_height: 3 pool: MAX } }
        layer { name: "im2col" type: "Im2col" bottom: "data" top: "im2col"
                convolution_param { kernel_size: 3 stride: 2 pad: 1 } }
        layer { name: "loss" type: "EuclideanLoss" bottom: "data" bottom: "positive" top: "loss" }
    """,
    "mvn_silence": """
        layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 4 dim: 5 } } }
        layer { name: "mvn" type: "MVN" bottom: "data" top: "mvn" }
        layer { name: "mean_only" type: "MVN" bottom: "data" top: "mean_only" mvn_param { normalize_variance: false } }
        layer { name: "across" type: "MVN" bottom: "data" top: "across" mvn_param { across_channels: true } }
        layer { name: "sink" type: "Silence" bottom: "mean_only" }
    """,
}


def randomize(net):
    """Random weights of a scale that keeps activations of deep nets finite (BatchNorm: positive variances)."""
    for layer in net.layers:
        for i, blob in enumerate(layer.blobs):
            if layer.type == "BatchNorm":
                blob.data[...] = (random(*blob.shape, low=0.5, high=1.5) if i == 1 else
                                  np.ones(blob.shape) if i == 2 else random(*blob.shape, low=-0.2, high=0.2))
            else:
                fan_in = max(blob.count // blob.shape[0], 1) if len(blob.shape) > 1 else 1
                blob.data[...] = random(*blob.shape) * np.sqrt(3.0 / fan_in)


def round_trip(net):
    """Export `net` with the export helper, import it back; returns the relative errors, per output, of
    onnxruntime on the exported model and of the imported net, against `net`'s forward."""
    onnx_export = pytest.importorskip("kaffe.engine.onnx_export")
    model = onnx_export.export_onnx(net, batch="dynamic")
    feeds = {name: random(*net.blobs[name].shape) for name in net.inputs}
    if "words" in feeds:   # Embed's indices
        feeds["words"] = RNG.integers(0, 7, feeds["words"].shape).astype(np.float32)
    expected = net.forward(**feeds)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    runtime = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    back = kaffe.Net.from_onnx(model, kaffe.TEST, batch=next(iter(feeds.values())).shape[0])
    imported = back.forward(**feeds)
    return {name: (relative_error(value, runtime[name]), relative_error(value, imported[name]))
            for name, value in expected.items()}


def net_from_text(text):
    from kaffe.engine.io import parse_text_proto
    from kaffe.proto import caffe_pb2
    return kaffe.Net(parse_text_proto(text, caffe_pb2.NetParameter()), kaffe.TEST)


@pytest.mark.parametrize("name", sorted(ROUND_TRIP_NETS))
def test_round_trip_keeps_outputs(name):
    net = net_from_text(ROUND_TRIP_NETS[name])
    randomize(net)
    for output, errors in round_trip(net).items():
        assert max(errors) < 1e-4, (output, errors)


def deploy_net(path, batch):
    from kaffe.engine.net import read_net_param
    param = read_net_param(str(path))
    for layer in param.layer:
        if layer.type == "Input":
            for shape in layer.input_param.shape:
                shape.dim[0] = batch
    net = kaffe.Net(param, kaffe.TEST)
    randomize(net)
    return net


SMALL_DEPLOY = ["lenet/lenet_deploy.prototxt", "cifar10_quick/deploy.prototxt", "cifar10_full/deploy.prototxt"]
BIG_DEPLOY = ["alexnet", "caffenet", "googlenet", "mobilenet_v1", "resnet50", "squeezenet1_1", "vgg16"]


@pytest.mark.parametrize("path", SMALL_DEPLOY)
@pytest.mark.parametrize("batch", [1, 4])
def test_round_trip_of_small_deploy_nets(path, batch):
    for output, errors in round_trip(deploy_net(REPO / "models" / path, batch)).items():
        assert max(errors) < 1e-4, (path, output, errors)


def test_round_trip_with_real_lenet_weights():
    weights = REPO.parent / "shared" / "zoo" / "weights" / "lenet_v2" / "lenet_iter_10000.caffemodel"
    if not weights.exists():
        pytest.skip(f"the real LeNet weights are not at {weights}")
    net = kaffe.Net(str(REPO / "models" / "lenet" / "lenet_deploy.prototxt"), str(weights), kaffe.TEST)
    for output, errors in round_trip(net).items():
        assert max(errors) < 1e-4, (output, errors)


SHARED_ZOO = REPO.parent / "shared" / "zoo"
# the example nets; the zoo's ImageNet models are the deploy nets of models/ (same layers), round-tripped below
SHARED_NETS = [pytest.param(p, id=str(p.relative_to(SHARED_ZOO))) for p in sorted(SHARED_ZOO.glob("**/*.prototxt"))
               if "solver" not in p.name and "models/" not in str(p)]


@pytest.mark.parametrize("path", SHARED_NETS)
def test_round_trip_of_shared_zoo_nets_that_export(path):
    onnx_export = pytest.importorskip("kaffe.engine.onnx_export")
    try:
        net = deploy_net(path, 2)
        onnx_export.export_onnx(net)
    except KaffeError as e:   # data layers without their databases, loss layers: not this test's business
        pytest.skip(f"cannot be built or exported here: {e}")
    for output, errors in round_trip(net).items():
        assert max(errors) < 1e-4, (output, errors)


@pytest.mark.slow
@pytest.mark.parametrize("name", BIG_DEPLOY)
def test_round_trip_of_zoo_deploy_nets(name):
    for output, errors in round_trip(deploy_net(REPO / "models" / name / "deploy.prototxt", 1)).items():
        assert max(errors) < 1e-4, (name, output, errors)


# -- PyTorch's exports that onnx ships as backend test data --------------------------------------------------
ONNX_DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"
EXPORTS = sorted(ONNX_DATA.glob("pytorch-*/*/model.onnx"))
# real architectures, with weights made by ConstantOfShape (the plain convolution stacks AlexNet, VGG19 and
# ZFNet512 left out: the zoo round trip has their kind)
LIGHT = [ONNX_DATA / "light" / f"light_{name}.onnx" for name in
         ("densenet121", "inception_v1", "inception_v2", "resnet50", "shufflenet", "squeezenet")]


def stored_inputs(folder, model):
    """The model's inputs from test_data_set_0 (random for the light models, which store none)."""
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if not (folder / "test_data_set_0").exists():
        return {i.name: random(*(d.dim_value for d in i.type.tensor_type.shape.dim)) for i in inputs[:1]}
    feeds = {}
    for index, value in enumerate(inputs):
        tensor = onnx.TensorProto()
        tensor.ParseFromString((folder / "test_data_set_0" / f"input_{index}.pb").read_bytes())
        feeds[value.name] = onnx.numpy_helper.to_array(tensor)
    return feeds


def check_export(path):
    """An ONNX file either runs in kaffe as in onnxruntime, or is refused by a one-line KaffeError; returns
    whether it was imported."""
    model = onnx.load(str(path))
    feeds = stored_inputs(path.parent, model)
    try:
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as e:   # opsets older than onnxruntime runs
        pytest.skip(f"onnxruntime does not run it: {str(e)[:100]}")
    try:
        import_onnx(model)
    except KaffeError as e:
        assert "\n" not in str(e) and ("node '" in str(e) or "input '" in str(e) or "output '" in str(e)), str(e)
        return False
    batch = next(iter(feeds.values())).shape[0] if feeds and next(iter(feeds.values())).ndim else None
    expected, actual = run_both(model, feeds, batch)
    for name in expected:
        finite = np.isfinite(expected[name])   # sqrt of negative inputs: NaN in both
        assert np.array_equal(finite, np.isfinite(actual[name])), name
        assert relative_error(expected[name][finite], actual[name][finite]) < 1e-4, name
    return True


@pytest.mark.skipif(not EXPORTS, reason="onnx's backend test data is not installed")
@pytest.mark.parametrize("path", EXPORTS, ids=lambda p: f"{p.parent.parent.name}/{p.parent.name}")
def test_pytorch_exports_import_or_are_refused_clearly(path):
    check_export(path)


@pytest.mark.skipif(not EXPORTS, reason="onnx's backend test data is not installed")
def test_pytorch_exports_of_caffe_layers_import():
    for name in ("Conv2d_depthwise_padded", "Conv3d_groups", "ConvTranspose2d", "Embedding", "Linear_no_bias",
                 "MaxPool2d", "Softmax", "softmax_functional_dim3"):
        assert check_export(ONNX_DATA / "pytorch-converted" / f"test_{name}" / "model.onnx"), name


@pytest.mark.slow
@pytest.mark.skipif(not EXPORTS, reason="onnx's backend test data is not installed")
@pytest.mark.parametrize("path", LIGHT, ids=lambda p: p.stem)
def test_onnx_zoo_architectures_import_or_are_refused_clearly(path):
    check_export(path)
