"""Caffe's format upgrades (V0 -> V1 -> V2, data transform, net inputs, BatchNorm, solver_type), the upgrade
tools, fork spellings and messages, and weights of every generation and size."""
import os
import re

import numpy as np
import pytest

from conftest import REPO, SHARED
from kaffe.engine.errors import KaffeError
from kaffe.engine.io import parse_text_proto, read_text_proto, write_binary_proto
from kaffe.engine.layer import layer_type_list
from kaffe.engine.net import Net, read_net_param, read_weights_param
from kaffe.engine.upgrade import (V0_LAYER_TYPES, V1_LAYER_TYPES, upgrade_net_param, upgrade_solver_param)
from kaffe.proto import caffe_pb2
from kaffe.tools import upgrade as upgrade_tool

ZOO = SHARED / "zoo"
needs_zoo = pytest.mark.skipif(not ZOO.exists(), reason="../shared/zoo not found")


def net_text(text):
    return parse_text_proto(text, caffe_pb2.NetParameter())


def upgraded(text):
    param = net_text(text)
    upgrade_net_param(param, "test")
    return param


def structure(net):
    """What 'the same net' means: layers (name, type, blobs), blob shapes, parameter shapes."""
    return ([(layer.name, layer.type, net.bottom_names[layer.name], net.top_names[layer.name])
             for layer in net.layers],
            {name: blob.shape for name, blob in net.blobs.items()},
            [[b.shape for b in layer.blobs] for layer in net.layers])


# -- the enum and type tables --------------------------------------------------------------------
def test_v1_table_covers_every_enum_value():
    assert set(V1_LAYER_TYPES) == set(caffe_pb2.V1LayerParameter.LayerType.keys())
    assert V1_LAYER_TYPES["SOFTMAX_LOSS"] == "SoftmaxWithLoss" and V1_LAYER_TYPES["TANH"] == "TanH"
    assert V1_LAYER_TYPES["NONE"] == ""


def test_v1_table_names_registered_layer_types():
    missing = sorted(set(V1_LAYER_TYPES.values()) - {""} - set(layer_type_list()))
    if missing:
        pytest.skip(f"layer types not implemented yet: {', '.join(missing)}")


def test_v0_table_maps_to_v1_enums():
    for v1_name in V0_LAYER_TYPES.values():
        caffe_pb2.V1LayerParameter.LayerType.Value(v1_name)


# -- V0 ------------------------------------------------------------------------------------------
V0_PADDED = """
name: "v0" input: "data" input_dim: 2 input_dim: 3 input_dim: 9 input_dim: 9
layers { layer { name: "pad1" type: "padding" pad: 2 } bottom: "data" top: "pad1" }
layers { layer { name: "conv1" type: "conv" num_output: 4 kernelsize: 3 stride: 2 group: 1 biasterm: false
                 weight_filler { type: "xavier" } blobs_lr: 2 weight_decay: 0 }
         bottom: "pad1" top: "conv1" }
layers { layer { name: "pool1" type: "pool" pool: AVE kernelsize: 3 stride: 2 } bottom: "conv1" top: "pool1" }
layers { layer { name: "norm1" type: "lrn" local_size: 3 alpha: 0.5 beta: 0.25 k: 2 } bottom: "pool1" top: "norm1" }
layers { layer { name: "drop" type: "dropout" dropout_ratio: 0.3 } bottom: "norm1" top: "norm1" }
layers { layer { name: "ip" type: "innerproduct" num_output: 5 bias_filler { type: "constant" value: 1 } }
         bottom: "norm1" top: "ip" }
layers { layer { name: "prob" type: "softmax" } bottom: "ip" top: "prob" }
"""


def test_v0_upgrade_folds_padding_and_maps_fields(kaffe_log):
    param = upgraded(V0_PADDED)
    assert not len(param.layers) and not len(param.input) and not len(param.input_dim)
    names = [layer.name for layer in param.layer]
    assert names == ["input", "conv1", "pool1", "norm1", "drop", "ip", "prob"]  # the padding layer is gone
    inp, conv, pool, norm, drop, ip, _ = param.layer
    assert list(inp.input_param.shape[0].dim) == [2, 3, 9, 9] and list(inp.top) == ["data"]
    assert conv.type == "Convolution" and list(conv.bottom) == ["data"]
    c = conv.convolution_param
    assert (c.num_output, list(c.kernel_size), list(c.stride), list(c.pad), c.bias_term) == (4, [3], [2], [2], False)
    assert c.weight_filler.type == "xavier"
    assert [(p.lr_mult, p.decay_mult) for p in conv.param] == [(2, 0)]
    assert pool.pooling_param.pool == caffe_pb2.PoolingParameter.AVE and pool.pooling_param.kernel_size == 3
    assert (norm.lrn_param.local_size, norm.lrn_param.alpha, norm.lrn_param.beta, norm.lrn_param.k) == (3, .5, .25, 2)
    assert drop.dropout_param.dropout_ratio == pytest.approx(0.3)
    assert ip.inner_product_param.num_output == 5 and ip.inner_product_param.bias_filler.value == 1
    assert any("V0LayerParameter" in m for m in kaffe_log) and any("Input layer" in m for m in kaffe_log)
    net = Net(param, caffe_pb2.TEST)
    assert net.blobs["conv1"].shape == (2, 4, 6, 6)  # (9 + 2*2 - 3) // 2 + 1: the folded pad is used


def test_v0_data_fields_go_to_their_params_and_transform():
    param = upgraded('layers { layer { name: "d" type: "data" source: "db" batchsize: 7 rand_skip: 3 scale: 0.5 '
                     'meanfile: "m.binaryproto" cropsize: 11 mirror: true } top: "data" top: "label" }\n'
                     'layers { layer { name: "i" type: "images" source: "list.txt" shuffle_images: true '
                     'new_height: 5 new_width: 6 batchsize: 2 } top: "a" top: "b" }\n'
                     'layers { layer { name: "w" type: "window_data" det_fg_threshold: 0.6 det_bg_threshold: 0.4 '
                     'det_fg_fraction: 0.2 det_context_pad: 16 det_crop_mode: "square" } top: "c" top: "e" }\n'
                     'layers { layer { name: "cat" type: "concat" concat_dim: 1 } bottom: "a" bottom: "c" top: "f" }')
    d, i, w, cat = param.layer
    assert (d.type, d.data_param.source, d.data_param.batch_size, d.data_param.rand_skip) == ("Data", "db", 7, 3)
    t = d.transform_param
    assert (t.scale, t.mean_file, t.crop_size, t.mirror) == (0.5, "m.binaryproto", 11, True)
    assert (i.type, i.image_data_param.shuffle, i.image_data_param.new_height, i.image_data_param.new_width) == \
        ("ImageData", True, 5, 6)
    wp = w.window_data_param
    assert (w.type, wp.fg_threshold, wp.bg_threshold, wp.context_pad, wp.crop_mode) == \
        ("WindowData", pytest.approx(0.6), pytest.approx(0.4), 16, "square")
    assert cat.type == "Concat" and cat.concat_param.concat_dim == 1


def test_v0_padding_into_a_non_conv_layer_is_an_error():
    with pytest.raises(KaffeError, match="Padding layer input to non-convolutional"):
        upgraded('input: "x" layers { layer { name: "p" type: "padding" pad: 1 } bottom: "x" top: "p" }\n'
                 'layers { layer { name: "r" type: "relu" } bottom: "p" top: "r" }')


# -- data transform, V1 --------------------------------------------------------------------------
def test_v1_upgrade_params_specs_and_transform(kaffe_log):
    param = upgraded("""
        layers { name: "d" type: DATA top: "data" top: "label" include { phase: TRAIN }
                 data_param { source: "db" batch_size: 4 scale: 0.25 mean_file: "m" crop_size: 3 mirror: true } }
        layers { name: "c" type: CONVOLUTION bottom: "data" top: "c" blobs_lr: 1 blobs_lr: 2 weight_decay: 1
                 weight_decay: 0 param: "w" param: "b" blob_share_mode: PERMISSIVE
                 convolution_param { num_output: 2 kernel_size: 1 } }
        layers { name: "l" type: SOFTMAX_LOSS bottom: "c" bottom: "label" top: "l" loss_weight: 2
                 exclude { stage: "x" } loss_param { ignore_label: 3 } }
        layers { name: "e" type: EUCLIDEAN_LOSS bottom: "c" bottom: "c" top: "e" }""")
    d, c, loss, e = param.layer
    assert d.type == "Data" and d.include[0].phase == caffe_pb2.TRAIN
    assert not d.data_param.HasField("scale") and d.data_param.source == "db"
    assert (d.transform_param.scale, d.transform_param.mean_file, d.transform_param.crop_size,
            d.transform_param.mirror) == (0.25, "m", 3, True)
    assert [(p.name, p.lr_mult, p.decay_mult) for p in c.param] == [("w", 1, 1), ("b", 2, 0)]
    assert c.param[0].share_mode == caffe_pb2.ParamSpec.PERMISSIVE and not c.param[1].HasField("share_mode")
    assert c.convolution_param.num_output == 2
    assert (loss.type, list(loss.loss_weight), loss.exclude[0].stage[0], loss.loss_param.ignore_label) == \
        ("SoftmaxWithLoss", [2.0], "x", 3)
    assert e.type == "EuclideanLoss"
    assert any("transform_param" in m for m in kaffe_log) and any("V1LayerParameter" in m for m in kaffe_log)


def test_v1_and_v2_layers_together_are_refused():
    with pytest.raises(KaffeError, match="both 'layer' and 'layers'"):
        upgraded('layer { name: "a" type: "ReLU" } layers { name: "b" type: RELU }')


def test_input_upgrade_forms():
    shaped = upgraded('input: "a" input: "b" input_shape { dim: 1 dim: 2 } input_shape { dim: 3 }\n'
                      'layer { name: "r" type: "ReLU" bottom: "a" top: "r" }')
    assert [layer.name for layer in shaped.layer] == ["input", "r"]
    assert [list(s.dim) for s in shaped.layer[0].input_param.shape] == [[1, 2], [3]]
    alone = upgraded('input: "data" layer { name: "r" type: "ReLU" bottom: "data" top: "r" }')
    assert [layer.name for layer in alone.layer] == ["r"] and not len(alone.input)  # an old caffemodel's inputs
    with pytest.raises(KaffeError, match="4 values per input"):
        upgraded('input: "a" input_dim: 1 input_dim: 2')


def test_batchnorm_upgrade_zeroes_the_three_param_specs(kaffe_log):
    param = upgraded('layer { name: "bn" type: "BatchNorm" param { lr_mult: 1 name: "m" } param { lr_mult: 1 } '
                     'param { lr_mult: 1 decay_mult: 5 } }\n'
                     'layer { name: "bn2" type: "BatchNorm" param { lr_mult: 1 } }')
    assert [(p.lr_mult, p.decay_mult, p.name) for p in param.layer[0].param] == [(0, 0, "m"), (0, 0, ""), (0, 0, "")]
    assert param.layer[1].param[0].lr_mult == 1  # only the old three-spec form is upgraded
    assert any("BatchNorm" in m for m in kaffe_log)


def test_current_nets_are_left_alone(kaffe_log):
    param = net_text('layer { name: "r" type: "ReLU" bottom: "x" top: "x" }')
    before = param.SerializeToString()
    assert upgrade_net_param(param, "test") == []
    assert param.SerializeToString() == before and not kaffe_log


# -- solvers -------------------------------------------------------------------------------------
def test_solver_type_upgrade(kaffe_log):
    for enum, name in (("SGD", "SGD"), ("NESTEROV", "Nesterov"), ("ADAGRAD", "AdaGrad"), ("RMSPROP", "RMSProp"),
                       ("ADADELTA", "AdaDelta"), ("ADAM", "Adam")):
        param = parse_text_proto(f"solver_type: {enum}", caffe_pb2.SolverParameter())
        assert upgrade_solver_param(param, "s") and param.type == name and not param.HasField("solver_type")
    assert any('type: "Adam"' in m for m in kaffe_log)
    with pytest.raises(KaffeError, match="cannot be both specified"):
        upgrade_solver_param(parse_text_proto('solver_type: SGD type: "SGD"', caffe_pb2.SolverParameter()))


def test_solver_module_uses_the_engine_upgrade():
    from kaffe.solvers import solver
    assert solver.upgrade_solver_param is upgrade_solver_param


# -- fork spellings ------------------------------------------------------------------------------
def test_ceil_mode_is_read_as_round_mode(kaffe_log):
    param = upgraded('layer { name: "p" type: "Pooling" pooling_param { pool: MAX kernel_size: 3 stride: 2\n'
                     '  ceil_mode: false } }\n'
                     'layer { name: "q" type: "Pooling" pooling_param < ceil_mode: true > }  # ceil_mode: false\n'
                     'layer { name: "ceil_mode: false" type: "Pooling" }')
    assert param.layer[0].pooling_param.round_mode == caffe_pb2.PoolingParameter.FLOOR
    assert param.layer[1].pooling_param.round_mode == caffe_pb2.PoolingParameter.CEIL
    assert param.layer[1].pooling_param.HasField("round_mode")
    assert param.layer[2].name == "ceil_mode: false"  # strings and comments are left alone
    assert [m for m in kaffe_log if "ceil_mode" in m] == [
        m for m in kaffe_log if re.search(r"ceil_mode: false }.*line 2\b.*FLOOR|ceil_mode: true }.*line 3\b.*CEIL", m)]
    assert len([m for m in kaffe_log if "ceil_mode" in m]) == 2


def test_ceil_mode_outside_pooling_param_stays_an_error():
    with pytest.raises(KaffeError, match=r'<string>:1:\d+: .*no field named "ceil_mode"'):
        net_text('layer { name: "c" convolution_param { ceil_mode: true } }')


def test_fork_fields_name_the_field_the_file_line_and_the_fork(tmp_path):
    path = tmp_path / "ssd.prototxt"
    path.write_text('name: "ssd"\nlayer {\n  name: "perm"\n  type: "Permute"\n  permute_param { order: 0 }\n}\n')
    with pytest.raises(KaffeError, match=rf'{re.escape(str(path))}:5:3: .*no field named "permute_param".*'
                                         r"SSD.*fork of Caffe"):
        read_net_param(str(path))
    path.write_text('name: "x"\nlayer { name: "a" type: "Input" top: "a" my_fancy_param { } }\n')
    with pytest.raises(KaffeError, match=r":2:\d+: .*my_fancy_param.*comes from a Caffe fork"):
        read_net_param(str(path))


def test_fork_layer_types_name_the_type_the_file_line_and_the_fork(tmp_path):
    path = tmp_path / "ssd.prototxt"
    path.write_text('name: "ssd"\nlayer { name: "data" type: "Input" top: "data" '
                    'input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }\n'
                    'layer {\n  name: "prior"\n  type: "PriorBox"\n  bottom: "data"\n  top: "prior"\n}\n')
    with pytest.raises(KaffeError, match=rf"{re.escape(str(path))}:5: Unknown layer type: 'PriorBox' "
                                         r"\(layer 'prior'\).*SSD.*Known types: "):
        Net(str(path), caffe_pb2.TEST)


# -- the upgrade tools ---------------------------------------------------------------------------
LEGACY_NETS = sorted(str(p) for p in ZOO.glob("legacy_v*/**/*.prototxt") if "solver" not in p.name) \
    if ZOO.exists() else []


def _built(path):
    from test_zoo import build  # the stand-ins for absent data sources
    return structure(build(path, caffe_pb2.TEST)[0])


@needs_zoo
@pytest.mark.parametrize("path", LEGACY_NETS, ids=lambda p: os.path.relpath(p, ZOO))
def test_upgrade_net_proto_text_builds_the_same_net(path, tmp_path):
    out = tmp_path / os.path.basename(os.path.dirname(path)) / os.path.basename(path)  # the stand-ins go by folder
    out.parent.mkdir()
    assert upgrade_tool.main(["upgrade_net_proto_text", path, str(out)]) == 0
    current = read_text_proto(str(out), caffe_pb2.NetParameter())  # a current message, no upgrade needed
    assert len(current.layer) and not len(current.layers) and not len(current.input)
    assert upgrade_net_param(current, "again") == []
    assert _built(out) == _built(path)


@needs_zoo
def test_legacy_files_match_their_current_versions():
    """Caffe's own V0/V1 files and their later V2 versions describe the same nets."""
    pairs = [("legacy_v1/examples/mnist/lenet_train_test.prototxt", "bvlc/examples/mnist/lenet_train_test.prototxt"),
             ("legacy_v1/models/bvlc_reference_caffenet/deploy.prototxt",
              "bvlc/models/bvlc_reference_caffenet/deploy.prototxt"),
             ("legacy_v0/examples/lenet/lenet.prototxt", "bvlc/examples/mnist/lenet.prototxt")]
    for old, new in pairs:
        old_net, new_net = _built(ZOO / old), _built(ZOO / new)
        assert old_net[1] == new_net[1] and old_net[2] == new_net[2], old


@needs_zoo
def test_upgrade_solver_proto_text(tmp_path):
    source = ZOO / "legacy_v1/examples/mnist/lenet_solver.prototxt"
    text = source.read_text()
    assert "solver_type" in text or "type" not in text
    out = tmp_path / "solver.prototxt"
    assert upgrade_tool.main(["upgrade_solver_proto_text", str(source), str(out)]) == 0
    current = read_text_proto(str(out), caffe_pb2.SolverParameter())
    assert not current.HasField("solver_type")
    original = read_text_proto(str(source), caffe_pb2.SolverParameter())
    upgrade_solver_param(original)
    assert current == original


def test_upgrade_tool_usage_and_errors(tmp_path, capsys):
    assert upgrade_tool.main(["upgrade_net_proto_text", "only-one"]) == 2
    assert "usage" in capsys.readouterr().err
    assert upgrade_tool.main(["upgrade_net_proto_text", str(tmp_path / "nope"), str(tmp_path / "out")]) == 1
    assert "file not found" in capsys.readouterr().err


# -- weights -------------------------------------------------------------------------------------
LENET = str(REPO / "models" / "lenet" / "lenet_deploy.prototxt")
V1_TYPES = {"Convolution": caffe_pb2.V1LayerParameter.CONVOLUTION,
            "InnerProduct": caffe_pb2.V1LayerParameter.INNER_PRODUCT}


def _random_lenet(seed):
    net = Net(LENET, caffe_pb2.TEST)
    rng = np.random.default_rng(seed)
    for blobs in net.params.values():
        for blob in blobs:
            blob.data[...] = rng.normal(0, 1, blob.shape)
    return net


def _v1_caffemodel(net, path):
    """A 2014-style .caffemodel: V1 `layers` with blobs in legacy 4-D num/channels/height/width form."""
    param = caffe_pb2.NetParameter(name=net.name)
    for layer in net.layers:
        if not layer.blobs:
            continue
        v1 = param.layers.add(name=layer.name, type=V1_TYPES[layer.type])
        for blob in layer.blobs:
            legacy = (1,) * (4 - len(blob.shape)) + blob.shape
            stored = v1.blobs.add(num=legacy[0], channels=legacy[1], height=legacy[2], width=legacy[3])
            stored.data.extend(blob.data.ravel().tolist())
    write_binary_proto(param, str(path))


def test_v1_caffemodel_with_legacy_shapes_loads(tmp_path, kaffe_log):
    source = _random_lenet(1)
    _v1_caffemodel(source, tmp_path / "v1.caffemodel")
    target = Net(LENET, caffe_pb2.TEST)
    target.copy_from(str(tmp_path / "v1.caffemodel"))
    for name, blobs in source.params.items():
        for a, b in zip(blobs, target.params[name]):
            np.testing.assert_array_equal(a.data, b.data)
    assert any("V1LayerParameter" in m for m in kaffe_log)


def test_upgrade_net_proto_binary_keeps_the_weights(tmp_path):
    source = _random_lenet(2)
    _v1_caffemodel(source, tmp_path / "v1.caffemodel")
    out = tmp_path / "v2.caffemodel"
    assert upgrade_tool.main(["upgrade_net_proto_binary", str(tmp_path / "v1.caffemodel"), str(out)]) == 0
    raw = caffe_pb2.NetParameter()
    raw.ParseFromString(out.read_bytes())
    assert not len(raw.layers) and [layer.type for layer in raw.layer] == ["Convolution"] * 2 + ["InnerProduct"] * 2
    assert raw.layer[2].blobs[1].num == 1 and raw.layer[2].blobs[1].width == 500  # Caffe keeps the legacy shape
    from_old, from_new = Net(LENET, caffe_pb2.TEST), Net(LENET, caffe_pb2.TEST)
    from_old.copy_from(str(tmp_path / "v1.caffemodel"))
    from_new.copy_from(str(out))
    for name, blobs in from_old.params.items():
        for a, b in zip(blobs, from_new.params[name]):
            np.testing.assert_array_equal(a.data, b.data)


def test_weights_layers_on_one_side_are_logged_and_shape_mismatch_names_both(tmp_path, kaffe_log):
    source = _random_lenet(3)
    param = source.to_proto()
    param.layer.add(name="extra", type="ReLU")
    del param.layer[[layer.name for layer in param.layer].index("ip2")].blobs[:]
    param.layer[[layer.name for layer in param.layer].index("ip2")].name = "renamed"
    Net(LENET, caffe_pb2.TEST).copy_from(param)
    assert any("Ignoring source layer extra" in m for m in kaffe_log)
    assert any("ip2" in m and "not in the weights" in m for m in kaffe_log)
    bad = source.to_proto()
    conv1 = bad.layer[[layer.name for layer in bad.layer].index("conv1")]
    conv1.blobs[0].shape.dim[0] = 21
    with pytest.raises(KaffeError, match=r"conv1.*shape mismatch.*21 1 5 5.*20 1 5 5"):
        Net(LENET, caffe_pb2.TEST).copy_from(bad)


def _varint(n):
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def test_weights_over_64_mb_load(tmp_path):
    """Caffe's files exceed protobuf's default 64 MB message limit (VGG-16: 553 MB)."""
    n_in, n_out = 18000, 1000  # 72 MB of float32 weights
    path = tmp_path / "big.caffemodel"
    weights = np.random.default_rng(0).standard_normal((n_out, n_in), dtype=np.float32)
    layer = caffe_pb2.LayerParameter(name="ip", type="InnerProduct")
    blob = layer.blobs.add()
    blob.shape.dim.extend([n_out, n_in])
    raw = weights.tobytes()
    blob.MergeFromString(b"\x2a" + _varint(len(raw)) + raw)  # packed `data` (field 5), without a Python list
    layer.blobs.add().shape.dim.append(n_out)
    layer.blobs[1].data.extend([0.5] * n_out)
    write_binary_proto(caffe_pb2.NetParameter(name="big", layer=[layer]), str(path))
    del layer, blob, raw
    assert path.stat().st_size > 64 << 20
    net = Net(net_text(f'name: "big" layer {{ name: "x" type: "Input" top: "x" input_param {{ shape {{ dim: 1 '
                       f'dim: {n_in} }} }} }} layer {{ name: "ip" type: "InnerProduct" bottom: "x" top: "ip" '
                       f'inner_product_param {{ num_output: {n_out} }} }}'), caffe_pb2.TEST)
    net.copy_from(str(path))
    np.testing.assert_array_equal(net.params["ip"][0].data, weights)
    assert (net.params["ip"][1].data == 0.5).all()


def test_read_weights_param_upgrades(tmp_path):
    param = caffe_pb2.NetParameter()
    param.layers.add(name="c", type=caffe_pb2.V1LayerParameter.RELU)
    path = str(tmp_path / "v1_relu.caffemodel")
    write_binary_proto(param, path)
    assert [(layer.name, layer.type) for layer in read_weights_param(path).layer] == [("c", "ReLU")]


# -- acceptance: Caffe's trained LeNet through `kaffe test` ---------------------------------------
LENET_WEIGHTS = ZOO / "weights" / "lenet_v2" / "lenet_iter_10000.caffemodel"


@pytest.mark.skipif(not LENET_WEIGHTS.exists(), reason="Caffe's trained LeNet weights not found")
def test_caffe_trained_lenet_scores_99_percent_with_kaffe_test(mnist_lmdb, tmp_path, monkeypatch, capsys):
    from kaffe.tools import cli
    (tmp_path / "data").mkdir()
    os.symlink(mnist_lmdb, tmp_path / "data" / "mnist")  # the prototxt reads data/mnist/... from the cwd
    monkeypatch.chdir(tmp_path)
    status = cli.main(["test", "--model", str(REPO / "models" / "lenet" / "lenet_train_test.prototxt"),
                       "--weights", str(LENET_WEIGHTS), "--iterations", "100"])
    err = capsys.readouterr().err
    assert status == 0, err[-2000:]
    accuracy = float(re.findall(r"\] accuracy = ([0-9.]+)", err)[-1])
    assert accuracy >= 0.99, accuracy
