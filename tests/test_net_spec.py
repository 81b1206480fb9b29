"""kaffe.net_spec against pycaffe's: the expected texts below are what real pycaffe's net_spec.py prints for the
same calls (checked by running Caffe's file over kaffe's schema), plus pycaffe's own test_net_spec cases."""
import hashlib
import re
import subprocess
import sys
import textwrap

import pytest

import kaffe
from kaffe import KaffeError
from kaffe import layers as L
from kaffe import params as P


def small_net():
    n = kaffe.NetSpec()
    n.data, n.label = L.DummyData(shape=[dict(dim=[2, 1, 8, 8]), dict(dim=[2])], transform_param=dict(scale=1. / 255),
                                  ntop=2)
    n.conv1 = L.Convolution(n.data, kernel_size=3, num_output=4, weight_filler=dict(type='xavier'),
                            param=[dict(lr_mult=1), dict(lr_mult=2, decay_mult=0)])
    n.pool1 = L.Pooling(n.conv1, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    n.relu1 = L.ReLU(n.pool1, in_place=True)
    n.ip1 = L.InnerProduct(n.relu1, num_output=3)
    n.loss = L.SoftmaxWithLoss(n.ip1, n.label, loss_weight=2)
    n.acc = L.Accuracy(n.ip1, n.label, include=dict(phase=kaffe.TEST))
    return n.to_proto()


SMALL_NET_TEXT = '''\
layer {
  name: "data"
  type: "DummyData"
  top: "data"
  top: "label"
  transform_param {
    scale: 0.00392156886
  }
  dummy_data_param {
    shape {
      dim: 2
      dim: 1
      dim: 8
      dim: 8
    }
    shape {
      dim: 2
    }
  }
}
layer {
  name: "conv1"
  type: "Convolution"
  bottom: "data"
  top: "conv1"
  param {
    lr_mult: 1
  }
  param {
    lr_mult: 2
    decay_mult: 0
  }
  convolution_param {
    num_output: 4
    kernel_size: 3
    weight_filler {
      type: "xavier"
    }
  }
}
layer {
  name: "pool1"
  type: "Pooling"
  bottom: "conv1"
  top: "pool1"
  pooling_param {
    pool: MAX
    kernel_size: 2
    stride: 2
  }
}
layer {
  name: "relu1"
  type: "ReLU"
  bottom: "pool1"
  top: "pool1"
}
layer {
  name: "ip1"
  type: "InnerProduct"
  bottom: "pool1"
  top: "ip1"
  inner_product_param {
    num_output: 3
  }
}
layer {
  name: "loss"
  type: "SoftmaxWithLoss"
  bottom: "ip1"
  bottom: "label"
  top: "loss"
  loss_weight: 2
}
layer {
  name: "acc"
  type: "Accuracy"
  bottom: "ip1"
  bottom: "label"
  top: "acc"
  include {
    phase: TEST
  }
}
'''


def test_named_tops_print_pycaffe_text():
    assert str(small_net()) == SMALL_NET_TEXT


def anonymous_net():
    data = L.Input(shape=dict(dim=[2, 6]))
    first, middle, last = L.Slice(data, slice_point=[2, 4], ntop=3)
    total = L.Eltwise(first, L.ReLU(middle, in_place=True), last, operation=P.Eltwise.SUM)
    return kaffe.to_proto(total, L.Accuracy(total, first))


ANONYMOUS_NET_TEXT = '''\
layer {
  name: "Input1"
  type: "Input"
  top: "Input1"
  input_param {
    shape {
      dim: 2
      dim: 6
    }
  }
}
layer {
  name: "Slice1"
  type: "Slice"
  bottom: "Input1"
  top: "Slice1"
  top: "Slice2"
  top: "Slice3"
  slice_param {
    slice_point: 2
    slice_point: 4
  }
}
layer {
  name: "ReLU1"
  type: "ReLU"
  bottom: "Slice2"
  top: "Slice2"
}
layer {
  name: "Eltwise1"
  type: "Eltwise"
  bottom: "Slice1"
  bottom: "Slice2"
  bottom: "Slice3"
  top: "Eltwise1"
  eltwise_param {
    operation: SUM
  }
}
layer {
  name: "Accuracy1"
  type: "Accuracy"
  bottom: "Eltwise1"
  bottom: "Slice1"
  top: "Accuracy1"
}
'''


def test_unnamed_tops_get_pycaffe_automatic_names():
    assert str(anonymous_net()) == ANONYMOUS_NET_TEXT


def test_partly_named_tops_keep_their_names_and_numbering():
    n = kaffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[2, 6]))
    first, n.b, last = L.Slice(n.data, ntop=3)
    n.out = L.Concat(first, last)
    layers = n.to_proto().layer
    assert [(layer.name, list(layer.top)) for layer in layers] == [
        ("data", ["data"]), ("Slice1", ["Slice1", "b", "Slice2"]), ("out", ["out"])]


def conv_relu(bottom, ks, nout, stride=1, pad=0, group=1):
    conv = L.Convolution(bottom, kernel_size=ks, stride=stride, num_output=nout, pad=pad, group=group)
    return conv, L.ReLU(conv, in_place=True)


def caffenet(lmdb, batch_size=256, include_acc=False):
    """Caffe's examples/pycaffe/caffenet.py, written again."""
    data, label = L.Data(source=lmdb, backend=P.Data.LMDB, batch_size=batch_size, ntop=2,
                         transform_param=dict(crop_size=227, mean_value=[104, 117, 123], mirror=True))
    conv1, relu1 = conv_relu(data, 11, 96, stride=4)
    pool1 = L.Pooling(relu1, pool=P.Pooling.MAX, kernel_size=3, stride=2)
    norm1 = L.LRN(pool1, local_size=5, alpha=1e-4, beta=0.75)
    conv2, relu2 = conv_relu(norm1, 5, 256, pad=2, group=2)
    pool2 = L.Pooling(relu2, pool=P.Pooling.MAX, kernel_size=3, stride=2)
    norm2 = L.LRN(pool2, local_size=5, alpha=1e-4, beta=0.75)
    conv3, relu3 = conv_relu(norm2, 3, 384, pad=1)
    conv4, relu4 = conv_relu(relu3, 3, 384, pad=1, group=2)
    conv5, relu5 = conv_relu(relu4, 3, 256, pad=1, group=2)
    pool5 = L.Pooling(relu5, pool=P.Pooling.MAX, kernel_size=3, stride=2)
    fc6 = L.InnerProduct(pool5, num_output=4096)
    drop6 = L.Dropout(L.ReLU(fc6, in_place=True), in_place=True)
    fc7 = L.InnerProduct(drop6, num_output=4096)
    drop7 = L.Dropout(L.ReLU(fc7, in_place=True), in_place=True)
    fc8 = L.InnerProduct(drop7, num_output=1000)
    loss = L.SoftmaxWithLoss(fc8, label)
    if include_acc:
        return kaffe.to_proto(loss, L.Accuracy(fc8, label))
    return kaffe.to_proto(loss)


# name:bottoms>tops of every layer, and the SHA-256 of the whole text, as real pycaffe prints them
CAFFENET_TEST_LAYERS = (
    "Data1:>Data1,Data2 Convolution1:Data1>Convolution1 ReLU1:Convolution1>Convolution1 Pooling1:Convolution1>Pooling1 "
    "LRN1:Pooling1>LRN1 Convolution2:LRN1>Convolution2 ReLU2:Convolution2>Convolution2 Pooling2:Convolution2>Pooling2 "
    "LRN2:Pooling2>LRN2 Convolution3:LRN2>Convolution3 ReLU3:Convolution3>Convolution3 "
    "Convolution4:Convolution3>Convolution4 ReLU4:Convolution4>Convolution4 Convolution5:Convolution4>Convolution5 "
    "ReLU5:Convolution5>Convolution5 Pooling3:Convolution5>Pooling3 InnerProduct1:Pooling3>InnerProduct1 "
    "ReLU6:InnerProduct1>InnerProduct1 Dropout1:InnerProduct1>InnerProduct1 InnerProduct2:InnerProduct1>InnerProduct2 "
    "ReLU7:InnerProduct2>InnerProduct2 Dropout2:InnerProduct2>InnerProduct2 InnerProduct3:InnerProduct2>InnerProduct3 "
    "SoftmaxWithLoss1:InnerProduct3,Data2>SoftmaxWithLoss1 Accuracy1:InnerProduct3,Data2>Accuracy1")
CAFFENET_SHA256 = {
    "train": "af15e76c746f950d0266128d248ea3214743c313e2b6008b4f27c2769ee752d6",
    "test": "933ff9bc5033769d6859e95aad8db272e133c100636b131f2acd202d87fd2849",
}


def test_caffenet_example_prints_pycaffe_text():
    test_net = caffenet('/path/to/caffe-val-lmdb', batch_size=50, include_acc=True)
    assert " ".join(f"{layer.name}:{','.join(layer.bottom)}>{','.join(layer.top)}"
                    for layer in test_net.layer) == CAFFENET_TEST_LAYERS
    conv2 = test_net.layer[5].convolution_param
    assert (conv2.num_output, list(conv2.kernel_size), list(conv2.pad), conv2.group) == (256, [5], [2], 2)
    assert list(test_net.layer[0].transform_param.mean_value) == [104, 117, 123]
    assert test_net.layer[0].data_param.backend == kaffe.caffe_pb2.DataParameter.LMDB
    texts = {"train": str(caffenet('/path/to/caffe-train-lmdb')), "test": str(test_net)}
    assert {k: hashlib.sha256(t.encode()).hexdigest() for k, t in texts.items()} == CAFFENET_SHA256


def pycaffe_lenet(batch_size, anonymous=False):
    """pycaffe's test_net_spec LeNet, with NetSpec names or with automatic ones."""
    n = kaffe.NetSpec() if not anonymous else None
    data, label = L.DummyData(shape=[dict(dim=[batch_size, 1, 28, 28]), dict(dim=[batch_size, 1, 1, 1])],
                              transform_param=dict(scale=1. / 255), ntop=2)
    pool1 = L.Pooling(L.Convolution(data, kernel_size=5, num_output=20, weight_filler=dict(type='xavier')),
                      kernel_size=2, stride=2, pool=P.Pooling.MAX)
    pool2 = L.Pooling(L.Convolution(pool1, kernel_size=5, num_output=50, weight_filler=dict(type='xavier')),
                      kernel_size=2, stride=2, pool=P.Pooling.MAX)
    ip1 = L.InnerProduct(pool2, num_output=500, weight_filler=dict(type='xavier'))
    relu1 = L.ReLU(ip1, in_place=True)
    ip2 = L.InnerProduct(relu1, num_output=10, weight_filler=dict(type='xavier'))
    loss = L.SoftmaxWithLoss(ip2, label)
    if anonymous:
        return loss.to_proto()
    n.data, n.label, n.pool1, n.pool2, n.ip1, n.relu1, n.ip2, n.loss = data, label, pool1, pool2, ip1, relu1, ip2, loss
    return n.to_proto()


def load_net(net_param, tmp_path):
    path = tmp_path / "net.prototxt"
    path.write_text(str(net_param))
    return kaffe.Net(str(path), kaffe.TEST)


@pytest.mark.parametrize("anonymous", [False, True])
def test_lenet_builds_with_in_place_relu(tmp_path, anonymous):
    net_param = pycaffe_lenet(50, anonymous)
    assert net_param.layer[6].type == "ReLU" and net_param.layer[6].bottom == net_param.layer[6].top
    net = load_net(net_param, tmp_path)
    assert len(net.layers) == 9
    assert net.blobs[net_param.layer[-1].top[0]].data.shape == ()


def test_layers_without_tops(tmp_path):
    n = kaffe.NetSpec()
    n.data, n.data2 = L.DummyData(shape=dict(dim=3), ntop=2)
    n.silence_data = L.Silence(n.data, ntop=0)
    n.silence_data2 = L.Silence(n.data2, ntop=0)
    net_param = n.to_proto()
    assert [(layer.name, list(layer.top)) for layer in net_param.layer] == [
        ("data", ["data", "data2"]), ("silence_data", []), ("silence_data2", [])]
    assert len(load_net(net_param, tmp_path).forward()) == 0


def test_fields_by_kind():
    """Repeated fields from lone values, nested messages, enums by value or name, LayerParameter's own fields and
    explicit *_param dicts, a Python layer's python_param."""
    n = kaffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 2, 4, 4]), include=[dict(phase=kaffe.TRAIN), dict(stage=['a', 'b'])])
    n.up = L.Deconvolution(n.data, convolution_param=dict(num_output=2, kernel_size=4, stride=2, bias_term=False),
                           param=[dict(lr_mult=0)], propagate_down=True)
    n.avg = L.Pooling(n.up, pool='AVE', global_pooling=True)
    n.py = L.Python(n.avg, module='mod', layer='Layer', param_str="{'k': 1}", loss_weight=[0.5])
    n.ip = L.InnerProduct(n.py, num_output=1, weight_filler=kaffe.caffe_pb2.FillerParameter(type='xavier'))
    layers = n.to_proto().layer
    assert [(r.phase, list(r.stage)) for r in layers[0].include] == [(kaffe.TRAIN, []), (kaffe.TRAIN, ['a', 'b'])]
    assert layers[0].include[1].HasField("phase") is False
    assert list(layers[0].input_param.shape[0].dim) == [1, 2, 4, 4]
    up = layers[1]
    assert (up.convolution_param.num_output, list(up.convolution_param.stride), up.convolution_param.bias_term) \
        == (2, [2], False)
    assert [p.lr_mult for p in up.param] == [0] and list(up.propagate_down) == [True]
    assert layers[2].pooling_param.pool == P.Pooling.AVE == kaffe.caffe_pb2.PoolingParameter.AVE
    assert (layers[3].python_param.module, layers[3].python_param.layer, layers[3].python_param.param_str,
            list(layers[3].loss_weight)) == ("mod", "Layer", "{'k': 1}", [0.5])
    assert layers[4].inner_product_param.weight_filler.type == 'xavier'


def test_netspec_item_access_and_reassignment():
    n = kaffe.NetSpec()
    n['data'] = L.Input(shape=dict(dim=[1, 3]))
    n.relu = L.ReLU(n['data'])
    n.alias = n.relu  # a top given two names takes the later one, as in pycaffe
    assert n.data is n['data'] and list(n.tops) == ['data', 'relu', 'alias']
    assert [layer.name for layer in n.to_proto().layer] == ['data', 'alias']


def test_layers_package_keeps_its_submodules():
    from kaffe.layers import vision
    assert L.vision is vision and L.python_layer.__name__ == "kaffe.layers.python_layer"
    assert callable(L.Convolution) and L.Convolution.__name__ == "Convolution"
    with pytest.raises(AttributeError):
        L.__no_such_dunder__


def test_unchanged_caffe_script_prints_the_same_text(tmp_path):
    script = tmp_path / "make_net.py"
    script.write_text(textwrap.dedent('''\
        import kaffe
        kaffe.install_as_caffe()
        import caffe
        from caffe import layers as L, params as P, to_proto
        import caffe.coord_map
        import caffe.draw
        import caffe.net_spec
        data = L.Input(shape=dict(dim=[2, 6]))
        first, middle, last = L.Slice(data, slice_point=[2, 4], ntop=3)
        total = L.Eltwise(first, L.ReLU(middle, in_place=True), last, operation=P.Eltwise.SUM)
        assert caffe.net_spec.NetSpec is caffe.NetSpec and caffe.draw.get_pydot_graph and caffe.coord_map.crop
        print(to_proto(total, caffe.layers.Accuracy(total, first)), end="")
        '''))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True).stdout
    assert out == ANONYMOUS_NET_TEXT


def test_bottom_that_is_not_a_top():
    data = L.DummyData(ntop=2)  # a tuple of two Tops
    with pytest.raises(TypeError, match=r"^Silence input 0 is not a Top \(type is <class 'tuple'>\)$") as error:
        L.Silence(data, ntop=0)
    assert isinstance(error.value, KaffeError)
    L.Silence(*data, ntop=0)


@pytest.mark.parametrize("make, builtin, message", [
    (lambda: L.Convolution(L.Input(), kernel_sise=3), AttributeError, "no field 'kernel_sise'"),
    (lambda: L.Deconvolution(L.Input(), num_output=3), AttributeError, "inside convolution_param"),
    (lambda: L.Convolution(L.Input(), weight_filler=dict(typ='xavier')), AttributeError, "FillerParameter"),
    (lambda: L.Convolution(L.Input(), kernel_size='3'), TypeError, "kernel_size"),
    (lambda: L.InnerProduct(L.Input(), num_output=dict(a=1)), TypeError, "not a message"),
    (lambda: L.Pooling(L.Input(), pool=7), ValueError, "pool"),
])
def test_bad_layer_parameters(make, builtin, message):
    top = make()
    with pytest.raises(builtin, match=message) as error:
        top.to_proto()
    assert isinstance(error.value, KaffeError)


def test_bad_netspec_use():
    n = kaffe.NetSpec()
    with pytest.raises(KeyError, match="no top named 'missing'") as error:
        n.missing
    assert isinstance(error.value, KaffeError) and not hasattr(n, "missing") and getattr(n, "x", 1) == 1
    with pytest.raises(KeyError):
        n['missing']
    n.pair = L.DummyData(ntop=2)
    with pytest.raises(TypeError, match=re.escape("NetSpec top 'pair' is a tuple, not a Top")) as error:
        n.to_proto()
    assert isinstance(error.value, KaffeError)
    with pytest.raises(AttributeError, match="no value 'MAXX'") as error:
        P.Pooling.MAXX
    assert isinstance(error.value, KaffeError)
    with pytest.raises(AttributeError, match="no message PoolParameter"):
        P.Pool
