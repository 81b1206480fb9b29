"""Net construction and the pycaffe API, on small nets and on LeNet."""
import numpy as np
import pytest
from google.protobuf import text_format

import kaffe as caffe
from kaffe.engine.errors import KaffeError
from kaffe.proto import caffe_pb2

from conftest import REPO, SHARED

LENET_DEPLOY = REPO / "models" / "lenet" / "lenet_deploy.prototxt"
CAFFE_LENET_WEIGHTS = SHARED / "zoo" / "weights" / "lenet_v2" / "lenet_iter_10000.caffemodel"


def write(tmp_path, text, name="net.prototxt"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


SMALL = """
name: "small"
layer { name: "data" type: "Input" top: "data" top: "label"
        input_param { shape { dim: 4 dim: 3 } shape { dim: 4 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
        inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.5 }
                              bias_filler { type: "constant" value: 0.1 } } }
layer { name: "relu" type: "ReLU" bottom: "ip" top: "ip" }
layer { name: "acc" type: "Accuracy" bottom: "ip" bottom: "label" top: "acc" include { phase: TEST } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""


def test_lenet_deploy_shapes_and_shape_log(kaffe_log):
    net = caffe.Net(str(LENET_DEPLOY), caffe.TEST)
    shapes = {name: blob.shape for name, blob in net.blobs.items()}
    assert shapes == {"data": (64, 1, 28, 28), "conv1": (64, 20, 24, 24), "pool1": (64, 20, 12, 12),
                      "conv2": (64, 50, 8, 8), "pool2": (64, 50, 4, 4), "ip1": (64, 500),
                      "ip2": (64, 10), "prob": (64, 10)}
    assert "Top shape: 64 20 24 24 (737280)" in kaffe_log
    assert "Top shape: 64 50 4 4 (51200)" in kaffe_log
    assert net.inputs == ["data"] and net.outputs == ["prob"]
    assert list(net.params) == ["conv1", "conv2", "ip1", "ip2"]
    assert [b.shape for b in net.params["conv1"]] == [(20, 1, 5, 5), (20,)]
    assert [layer.type for layer in net.layers][:3] == ["Input", "Convolution", "Pooling"]


def test_phase_filtering_split_insertion_and_outputs(tmp_path):
    model = write(tmp_path, SMALL)
    train = caffe.Net(model, caffe.TRAIN)
    test = caffe.Net(model, caffe.TEST)
    assert "acc" not in train.layer_dict and "acc" in test.layer_dict
    assert train.outputs == ["loss"] and test.outputs == ["acc", "loss"]   # sorted, as Caffe's std::set
    assert "ip_relu_0_split_0" in test.blobs and "label_data_1_split_1" in test.blobs
    assert "ip_relu_0_split_0" not in train.blobs
    assert train.blob_loss_weights["loss"] == 1.0 and train._blob_loss_weights[train._blob_names.index("loss")] == 1.0


def test_forward_returns_outputs_and_loss_matches_numpy(tmp_path):
    net = caffe.Net(write(tmp_path, SMALL), caffe.TEST)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3)).astype(np.float32)
    label = np.array([0, 1, 2, 3], dtype=np.float32)
    out = net.forward(data=x, label=label)
    assert set(out) == {"acc", "loss"}
    w, b = net.params["ip"][0].data, net.params["ip"][1].data
    logits = np.maximum(x.astype(np.float64) @ w.T + b, 0)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    expect = -np.mean(np.log(p[np.arange(4), label.astype(int)]))
    assert out["loss"] == pytest.approx(expect, rel=1e-5)
    assert out["acc"] == pytest.approx(np.mean(logits.argmax(1) == label))
    with pytest.raises(KaffeError, match="do not match net inputs"):
        net.forward(data=x)
    with pytest.raises(KaffeError, match="not batch sized"):
        net.forward(data=x[:2], label=label[:2])


def test_forward_start_end_and_backward(tmp_path):
    net = caffe.Net(write(tmp_path, "force_backward: true\n" + SMALL), caffe.TRAIN)
    net.blobs["data"].data[...] = np.random.default_rng(1).standard_normal((4, 3))
    net.blobs["label"].data[...] = [0, 1, 2, 3]
    out = net.forward(end="ip")
    assert set(out) == {"ip"}
    net.forward(start="relu")
    diffs = net.backward()
    assert set(diffs) == {"data", "label"}
    assert np.abs(diffs["data"]).sum() > 0          # force_backward reaches the input
    assert np.all(diffs["label"] == 0)              # but never the labels of a loss
    assert np.abs(net.params["ip"][0].diff).sum() > 0


def test_loss_weight_scales_loss_and_gradients(tmp_path):
    text = SMALL.replace('top: "loss" }', 'top: "loss" loss_weight: 2.5 }')
    one, two = caffe.Net(write(tmp_path, SMALL, "a.prototxt"), caffe.TRAIN), \
        caffe.Net(write(tmp_path, text, "b.prototxt"), caffe.TRAIN)
    two.params["ip"][0].data[...] = one.params["ip"][0].data
    x = np.random.default_rng(2).standard_normal((4, 3))
    for net in (one, two):
        net.blobs["data"].data[...] = x
        net.blobs["label"].data[...] = [3, 2, 1, 0]
        net.clear_param_diffs()
        net.loss_value = net.forward_backward()
    assert two.loss_value == pytest.approx(2.5 * one.loss_value, rel=1e-6)
    np.testing.assert_allclose(two.params["ip"][0].diff, 2.5 * one.params["ip"][0].diff, rtol=1e-5, atol=1e-7)


def test_backward_inference_and_propagate_down(tmp_path, kaffe_log):
    text = """
    layer { name: "data" type: "Input" top: "a" top: "b" top: "label"
            input_param { shape { dim: 2 dim: 3 } } }
    layer { name: "fa" type: "InnerProduct" bottom: "a" top: "fa" param { lr_mult: 0 } param { lr_mult: 0 }
            inner_product_param { num_output: 3 } }
    layer { name: "fb" type: "InnerProduct" bottom: "b" top: "fb" inner_product_param { num_output: 3 } }
    layer { name: "sum" type: "Eltwise" bottom: "fa" bottom: "fb" top: "s" propagate_down: true propagate_down: false }
    layer { name: "dead" type: "InnerProduct" bottom: "s" top: "unused" inner_product_param { num_output: 2 } }
    layer { name: "loss" type: "SoftmaxWithLoss" bottom: "s" bottom: "label" top: "loss" }
    """
    text = text.replace('input_param { shape { dim: 2 dim: 3 } }',
                        'input_param { shape { dim: 2 dim: 3 } shape { dim: 2 dim: 3 } shape { dim: 2 } }')
    net = caffe.Net(write(tmp_path, text), caffe.TRAIN)
    need = dict(zip(net.layer_names, net.layer_need_backward))
    assert need["fa"] is False          # lr_mult 0 and nothing below needs a gradient
    assert need["dead"] is False        # does not lead to the loss
    assert need["sum"] is True and need["loss"] is True
    assert net.bottom_need_backward[net.layer_names.index("sum")] == [True, False]
    assert "dead does not need backward computation." in kaffe_log


def test_shared_parameters(tmp_path):
    base = """
    layer { name: "data" type: "Input" top: "x" input_param { shape { dim: 2 dim: 4 } } }
    layer { name: "a" type: "InnerProduct" bottom: "x" top: "a" param { name: "w" } param { name: "bias" }
            inner_product_param { num_output: 3 weight_filler { type: "gaussian" } } }
    layer { name: "b" type: "InnerProduct" bottom: "x" top: "b" param { name: "w" } param { name: "bias" }
            inner_product_param { num_output: NUM } }
    """
    net = caffe.Net(write(tmp_path, base.replace("NUM", "3")), caffe.TRAIN)
    a, b = net.params["a"], net.params["b"]
    np.testing.assert_array_equal(a[0].data, b[0].data)
    a[0].data[0, 0] = 42
    assert b[0].data[0, 0] == 42
    assert len(net.learnable_params) == 2
    with pytest.raises(KaffeError, match="Cannot share param 'w'.*shape mismatch.*2 4 \\(8\\)"):
        caffe.Net(write(tmp_path, base.replace("NUM", "2"), "bad.prototxt"), caffe.TRAIN)


def test_in_place_top_reuses_the_blob(tmp_path):
    net = caffe.Net(write(tmp_path, SMALL), caffe.TRAIN)
    relu = net.layer_names.index("relu")
    assert net.top_vecs[relu][0] is net.bottom_vecs[relu][0]


@pytest.mark.parametrize("text,pattern", [
    ('layer { name: "x" type: "Nope" top: "x" }', r"Unknown layer type: 'Nope'.*Known types: .*Convolution"),
    ('layer { name: "x" type: "Relu" top: "x" }', r"Did you mean 'ReLU'"),
    ('layer { name: "x" type: "ReLU" bottom: "y" top: "x" }', r"Unknown bottom blob 'y' \(layer 'x', bottom index 0\)"),
    ('layer { name: "d" type: "Input" top: "x" input_param { shape { dim: 1 } } }\n'
     'layer { name: "e" type: "Input" top: "x" input_param { shape { dim: 1 } } }', r"produced by multiple sources"),
    ('layer { name: "d" type: "Input" top: "a" top: "b" input_param { shape { dim: 2 dim: 3 } shape { dim: 2 dim: 4 } } }\n'
     'layer { name: "c" type: "Concat" bottom: "a" bottom: "b" top: "c" concat_param { axis: 0 } }', r"Concat layer 'c'.*\(2, 3\) and \(2, 4\)"),
])
def test_bad_nets_give_clear_errors(tmp_path, text, pattern):
    with pytest.raises(KaffeError, match=pattern):
        caffe.Net(write(tmp_path, text), caffe.TRAIN)


def test_malformed_prototxt_names_file_line_and_column(tmp_path):
    path = write(tmp_path, 'name: "x"\nlayer {\n  name: "a"\n  tpye: "ReLU"\n}\n')
    with pytest.raises(KaffeError, match=r"net\.prototxt:4:3: .*no field named \"?tpye"):
        caffe.Net(path, caffe.TEST)
    path = write(tmp_path, 'layer {\n  name: "a"\n', "open.prototxt")
    with pytest.raises(KaffeError, match=r"open\.prototxt:\d+:\d+"):
        caffe.Net(path, caffe.TEST)
    with pytest.raises(KaffeError, match="not found"):
        caffe.Net(str(tmp_path / "missing.prototxt"), caffe.TEST)


def test_save_and_copy_from_round_trip(tmp_path):
    net = caffe.Net(str(LENET_DEPLOY), caffe.TEST)
    caffe.set_random_seed(7)
    other = caffe.Net(str(LENET_DEPLOY), caffe.TEST)
    for name in net.params:
        for blob in net.params[name]:
            blob.data[...] = np.random.default_rng(3).standard_normal(blob.shape)
    path = str(tmp_path / "w.caffemodel")
    net.save(path)
    parsed = caffe_pb2.NetParameter.FromString(open(path, "rb").read())
    assert [layer.name for layer in parsed.layer] == net.layer_names
    assert list(parsed.layer[1].blobs[0].shape.dim) == [20, 1, 5, 5]
    other.copy_from(path)
    x = np.random.default_rng(4).random((64, 1, 28, 28)).astype(np.float32)
    np.testing.assert_allclose(other.forward(data=x)["prob"], net.forward(data=x)["prob"], rtol=1e-6)
    again = caffe.Net(str(LENET_DEPLOY), path, caffe.TEST)
    np.testing.assert_array_equal(again.params["ip2"][0].data, net.params["ip2"][0].data)
    kw = caffe.Net(str(LENET_DEPLOY), phase=caffe.TEST, weights=path)
    np.testing.assert_array_equal(kw.params["conv1"][1].data, net.params["conv1"][1].data)


def test_weight_loading_errors(tmp_path):
    net = caffe.Net(str(LENET_DEPLOY), caffe.TEST)
    bad = caffe_pb2.NetParameter()
    layer = bad.layer.add(name="ip2", type="InnerProduct")
    layer.blobs.add().shape.dim.extend([7, 500])
    layer.blobs.add().shape.dim.extend([7])
    path = tmp_path / "bad.caffemodel"
    path.write_bytes(bad.SerializeToString())
    with pytest.raises(KaffeError, match=r"Cannot copy param 0 weights from layer 'ip2'; shape mismatch.  ?"
                                         r"Source param shape is 7 500 \(3500\); target param shape is 10 500"):
        net.copy_from(str(path))
    good = tmp_path / "good.caffemodel"
    net.save(str(good))
    truncated = tmp_path / "truncated.caffemodel"
    truncated.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(KaffeError, match="truncated.caffemodel.*(truncated|not a)"):
        net.copy_from(str(truncated))
    text = tmp_path / "text.caffemodel"
    text.write_text(open(LENET_DEPLOY).read())
    with pytest.raises(KaffeError, match="text.caffemodel"):
        net.copy_from(str(text))


@pytest.mark.skipif(not CAFFE_LENET_WEIGHTS.exists(), reason="Caffe-trained LeNet weights not in ../shared")
def test_caffe_trained_lenet_weights_classify_mnist(mnist_lmdb):
    """Weights trained by real Caffe must give Caffe's accuracy through our layers (conv, pool, ip...)."""
    from kaffe.tools.data import read_idx
    from conftest import MNIST_RAW
    net = caffe.Net(str(LENET_DEPLOY), str(CAFFE_LENET_WEIGHTS), caffe.TEST)
    images = read_idx(MNIST_RAW / "t10k-images-idx3-ubyte.gz")[:2048].astype(np.float32) * 0.00390625
    labels = read_idx(MNIST_RAW / "t10k-labels-idx1-ubyte.gz")[:2048]
    correct = 0
    for start in range(0, 2048, 64):
        prob = net.forward(data=images[start:start + 64].reshape(64, 1, 28, 28))["prob"]
        correct += int(np.sum(prob.argmax(1) == labels[start:start + 64]))
    assert correct / 2048 >= 0.985
