"""ONNX import: models built with onnx.helper give in kaffe what onnxruntime gives; imported nets train; bad input
is refused in one line; Caffe -> ONNX -> Caffe keeps the outputs."""
import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper  # noqa: E402

import kaffe  # noqa: E402
from kaffe.engine.errors import KaffeError  # noqa: E402
from kaffe.engine.onnx_import import import_onnx  # noqa: E402

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
    """Max abs error over the output's RMS (Issue 13's measure)."""
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
