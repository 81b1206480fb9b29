"""Model zoos: Caffe's own files under ../shared/zoo (V2, V1 and V0) and ours under models/ build in TRAIN and
TEST phase with the top shapes that Caffe prints for them; `kaffe zoo list/show/fetch`."""
import glob
import hashlib
import http.server
import io
import math
import os
import threading

import pytest

from conftest import REPO, SHARED
from kaffe.engine.errors import KaffeError
from kaffe.engine.layer import layer_type_list
from kaffe.engine.net import Net, read_net_param
from kaffe.proto import caffe_pb2
from kaffe.tools import zoo

ZOO = SHARED / "zoo"
DATA_LAYERS = {"Data", "ImageData", "HDF5Data", "WindowData", "MemoryData"}
# Per-item shape of the first top of each data layer whose source is absent, by dataset (Caffe reads it from the
# source; the stand-in gives the same): the image or feature vector; other tops are labels of shape (batch,).
ITEM_SHAPES = {"siamese": (2, 28, 28), "mnist": (1, 28, 28), "lenet": (1, 28, 28), "cifar10": (3, 32, 32),
               "cifar10_quick": (3, 32, 32), "cifar10_full": (3, 32, 32),
               "hdf5_classification": (4,)}  # by folder name; the first match wins
STAGES = {"mnist_autoencoder.prototxt": {caffe_pb2.TEST: ["test-on-test"]}}


def _dataset(path, layer):
    folders = set(os.path.dirname(str(path)).split(os.sep))
    for key in ITEM_SHAPES:
        if key in folders:
            return ITEM_SHAPES[key]
    crop = layer.transform_param.crop_size
    if crop:
        return (3, crop, crop)
    raise AssertionError(f"no stand-in shape for {path} layer {layer.name}")


def _batch_size(layer):
    for field in ("data_param", "image_data_param", "hdf5_data_param", "window_data_param", "memory_data_param"):
        if layer.HasField(field):
            return getattr(layer, field).batch_size
    raise AssertionError(layer.name)


def with_stand_ins(param, path):
    """Data layers with absent sources -> DummyData of the dataset's shapes (same name, tops and rules)."""
    for layer in param.layer:
        if layer.type not in DATA_LAYERS:
            continue
        batch, item = _batch_size(layer), _dataset(path, layer)
        stand_in = caffe_pb2.LayerParameter(name=layer.name, type="DummyData", top=layer.top)
        stand_in.include.extend(layer.include)
        stand_in.exclude.extend(layer.exclude)
        for i in range(len(layer.top)):
            stand_in.dummy_data_param.shape.add().dim.extend((batch,) + item if i == 0 else (batch,))
        layer.CopyFrom(stand_in)
    return param


def _included(layer, phase, stages):
    def matches(rule):
        return ((not rule.HasField("phase") or rule.phase == phase) and all(s in stages for s in rule.stage)
                and not any(s in stages for s in rule.not_stage))
    if len(layer.include):
        return any(matches(r) for r in layer.include)
    return not any(matches(r) for r in layer.exclude)


def _spatial(field, n):
    values = list(field) if hasattr(field, "__len__") else [field]
    return values * n if len(values) == 1 else values


def expected_top_shapes(param, phase, stages):
    """Top shapes by Caffe's formulas, computed independently of kaffe's layers."""
    shapes = {}
    for layer in param.layer:
        if not _included(layer, phase, stages):
            continue
        bottoms = [shapes[b] for b in layer.bottom]
        t = layer.type
        if t == "Input":
            out = [tuple(s.dim) for s in layer.input_param.shape]
            if len(out) == 1:
                out *= len(layer.top)
        elif t == "DummyData":
            out = [tuple(s.dim) for s in layer.dummy_data_param.shape]
        elif t == "Convolution":
            p = layer.convolution_param
            n, _, h, w = bottoms[0]
            k = [p.kernel_h, p.kernel_w] if p.kernel_h else _spatial(p.kernel_size, 2)
            pad = [p.pad_h, p.pad_w] if p.pad_h or p.pad_w else (_spatial(p.pad, 2) if len(p.pad) else [0, 0])
            s = [p.stride_h, p.stride_w] if p.stride_h else (_spatial(p.stride, 2) if len(p.stride) else [1, 1])
            d = _spatial(p.dilation, 2) if len(p.dilation) else [1, 1]
            out = [(n, p.num_output) + tuple((x + 2 * pd - (dd * (kk - 1) + 1)) // ss + 1
                                             for x, kk, pd, ss, dd in zip((h, w), k, pad, s, d))]
        elif t == "Pooling":
            p = layer.pooling_param
            n, c, h, w = bottoms[0]
            if p.global_pooling:
                out = [(n, c, 1, 1)]
            else:
                k, s, pad = p.kernel_size, p.stride, p.pad
                rnd = math.floor if p.round_mode == caffe_pb2.PoolingParameter.FLOOR else math.ceil
                dims = []
                for x in (h, w):
                    o = int(rnd((x + 2 * pad - k) / s)) + 1
                    if pad and (o - 1) * s >= x + pad:
                        o -= 1
                    dims.append(o)
                out = [(n, c, *dims)]
        elif t == "InnerProduct":
            out = [(bottoms[0][0], layer.inner_product_param.num_output)]
        elif t == "Concat":
            b0 = bottoms[0]
            out = [(b0[0], sum(b[1] for b in bottoms)) + tuple(b0[2:])]
        elif t == "Flatten":
            out = [(bottoms[0][0], math.prod(bottoms[0][1:]))]
        elif t == "Slice":
            p = layer.slice_param
            axis = p.slice_dim if p.HasField("slice_dim") else p.axis
            b0 = bottoms[0]
            points = [0] + list(p.slice_point) + [b0[axis]] if len(p.slice_point) else \
                [i * b0[axis] // len(layer.top) for i in range(len(layer.top) + 1)]
            out = [b0[:axis] + (hi - lo,) + b0[axis + 1:] for lo, hi in zip(points, points[1:])]
        elif t in ("SoftmaxWithLoss", "EuclideanLoss", "SigmoidCrossEntropyLoss", "ContrastiveLoss", "Accuracy"):
            out = [()]
        elif t in ("ReLU", "Sigmoid", "TanH", "Dropout", "LRN", "BatchNorm", "Scale", "Softmax", "Eltwise"):
            out = [bottoms[0]]
        else:
            raise AssertionError(f"no shape rule for {t} in this test")
        for name, shape in zip(layer.top, out):
            shapes[name] = tuple(shape)
    return shapes


def without_fillers(param):
    """Constant (zero) parameters: shapes do not depend on them, and filling 100 M random values takes seconds."""
    for layer in param.layer:
        for _, sub in layer.ListFields():
            if hasattr(sub, "weight_filler"):
                sub.ClearField("weight_filler")
                if hasattr(sub, "bias_filler"):
                    sub.ClearField("bias_filler")
    return param


def build(path, phase):
    param = without_fillers(with_stand_ins(read_net_param(str(path)), path))
    stages = STAGES.get(os.path.basename(path), {}).get(phase, [])
    param.state.phase = phase
    param.state.stage.extend(stages)
    missing = sorted({layer.type for layer in param.layer} - set(layer_type_list()))
    if missing:
        pytest.skip(f"layer types not implemented yet: {', '.join(missing)}")
    return Net(param), expected_top_shapes(param, phase, stages)


SHARED_NETS = sorted(p for p in glob.glob(str(ZOO / "**" / "*.prototxt"), recursive=True) if "solver" not in p)
PHASES = [caffe_pb2.TRAIN, caffe_pb2.TEST]
OUR_MODELS = ("cifar10_quick", "cifar10_full", "caffenet", "alexnet", "googlenet", "vgg16", "resnet50",
              "squeezenet1_1", "mobilenet_v1")
OUR_NETS = [str(REPO / "models" / m / f) for m in OUR_MODELS for f in ("train_val.prototxt", "deploy.prototxt")]


def _id(path):
    return os.path.relpath(path, ZOO if str(path).startswith(str(ZOO)) else REPO)


@pytest.mark.skipif(not ZOO.exists(), reason="../shared/zoo not found")
@pytest.mark.parametrize("phase", PHASES, ids=["TRAIN", "TEST"])
@pytest.mark.parametrize("path", SHARED_NETS, ids=_id)
def test_shared_zoo_net_builds_with_caffe_shapes(path, phase):
    net, expected = build(path, phase)
    for name, shape in expected.items():
        assert net.blobs[name].shape == shape, f"{_id(path)}: top '{name}'"


@pytest.mark.parametrize("phase", PHASES, ids=["TRAIN", "TEST"])
@pytest.mark.parametrize("path", OUR_NETS, ids=_id)
def test_our_zoo_net_builds_with_caffe_shapes(path, phase):
    net, expected = build(path, phase)
    for name, shape in expected.items():
        assert net.blobs[name].shape == shape, f"{_id(path)}: top '{name}'"


# Top shapes as Caffe's logs print them ("Top shape: ..."), written out by hand for the best-known nets.
PUBLISHED = {
    ("bvlc/models/bvlc_reference_caffenet/train_val.prototxt", caffe_pb2.TRAIN): {
        "data": (256, 3, 227, 227), "conv1": (256, 96, 55, 55), "pool1": (256, 96, 27, 27),
        "norm1": (256, 96, 27, 27), "conv2": (256, 256, 27, 27), "pool2": (256, 256, 13, 13),
        "conv3": (256, 384, 13, 13), "conv4": (256, 384, 13, 13), "conv5": (256, 256, 13, 13),
        "pool5": (256, 256, 6, 6), "fc6": (256, 4096), "fc7": (256, 4096), "fc8": (256, 1000), "loss": ()},
    ("bvlc/models/bvlc_googlenet/train_val.prototxt", caffe_pb2.TEST): {
        "conv1/7x7_s2": (50, 64, 112, 112), "pool1/3x3_s2": (50, 64, 56, 56), "conv2/3x3": (50, 192, 56, 56),
        "pool2/3x3_s2": (50, 192, 28, 28), "inception_3a/output": (50, 256, 28, 28),
        "inception_3b/output": (50, 480, 28, 28), "pool3/3x3_s2": (50, 480, 14, 14),
        "inception_4a/output": (50, 512, 14, 14), "inception_4d/output": (50, 528, 14, 14),
        "inception_4e/output": (50, 832, 14, 14), "pool4/3x3_s2": (50, 832, 7, 7),
        "inception_5b/output": (50, 1024, 7, 7), "pool5/7x7_s1": (50, 1024, 1, 1),
        "loss1/ave_pool": (50, 512, 4, 4), "loss1/fc": (50, 1024), "loss3/classifier": (50, 1000)},
    ("bvlc/examples/mnist/lenet_train_test.prototxt", caffe_pb2.TRAIN): {
        "data": (64, 1, 28, 28), "conv1": (64, 20, 24, 24), "pool1": (64, 20, 12, 12), "conv2": (64, 50, 8, 8),
        "pool2": (64, 50, 4, 4), "ip1": (64, 500), "ip2": (64, 10), "loss": ()},
    ("legacy_v0/examples/lenet/lenet.prototxt", caffe_pb2.TEST): {
        "conv1": (64, 20, 24, 24), "pool2": (64, 50, 4, 4), "ip1": (64, 500), "prob": (64, 10)},
    ("bvlc/examples/cifar10/cifar10_quick_train_test.prototxt", caffe_pb2.TEST): {
        "conv1": (100, 32, 32, 32), "pool1": (100, 32, 16, 16), "pool2": (100, 32, 8, 8),
        "pool3": (100, 64, 4, 4), "ip1": (100, 64), "ip2": (100, 10), "accuracy": ()},
    ("bvlc/examples/siamese/mnist_siamese_train_test.prototxt", caffe_pb2.TRAIN): {
        "data": (64, 1, 28, 28), "data_p": (64, 1, 28, 28), "feat": (64, 2), "feat_p": (64, 2), "loss": ()},
}


@pytest.mark.skipif(not ZOO.exists(), reason="../shared/zoo not found")
@pytest.mark.parametrize("key", list(PUBLISHED), ids=lambda k: f"{k[0]}-{caffe_pb2.Phase.Name(k[1])}")
def test_published_top_shapes(key):
    path, phase = key
    net, _ = build(ZOO / path, phase)
    for name, shape in PUBLISHED[key].items():
        assert net.blobs[name].shape == shape, name


def test_our_models_have_caffe_parameter_counts():
    """Parameter totals of the published architectures (the releases' figures)."""
    expected = {"alexnet": 60965224, "googlenet": 6998552, "squeezenet1_1": 1235496, "cifar10_quick": 145578}
    for name, count in expected.items():
        net = Net(str(REPO / "models" / name / "deploy.prototxt"), caffe_pb2.TEST)
        assert sum(b.count for layer in net.layers for b in layer.blobs) == count, name


# -- kaffe zoo -----------------------------------------------------------------------------------
def test_every_model_readme_has_the_front_matter():
    for name in OUR_MODELS:
        fields, _ = zoo.read_front_matter(os.path.join(zoo.MODELS, name, "README.md"))
        for key in ("name", "paper", "input_shape", "accuracy"):
            assert fields.get(key), (name, key)
        if fields.get("caffemodel_url"):
            assert fields.get("caffemodel") and (len(fields.get("sha1", "")) == 40
                                                 or len(fields.get("sha256", "")) == 64), name


def test_front_matter_parsing(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text('---\nname: "Quoted: yes"\nurl: http://x/y:z\n# comment\n---\n\nBody text\n')
    assert zoo.read_front_matter(str(readme)) == ({"name": "Quoted: yes", "url": "http://x/y:z"}, "Body text")
    readme.write_text("---\nname: x\n")
    with pytest.raises(KaffeError, match="never closed"):
        zoo.read_front_matter(str(readme))


def test_zoo_list_and_show(capsys):
    assert zoo.main(["list"]) == 0
    listing = capsys.readouterr().out
    for name in ("caffenet", "googlenet", "resnet50", "mobilenet_v1", "cifar10_quick"):
        assert name in listing
    assert zoo.main(["show", "caffenet"]) == 0
    shown = capsys.readouterr().out
    assert "sha1: 4c8d77deb20ea792f84eb5e6d0a11ca0a8660a46" in shown and "deploy.prototxt" in shown
    assert zoo.main(["show", "nope"]) == 1
    assert "no model named 'nope'" in capsys.readouterr().err


@pytest.fixture
def served(tmp_path, monkeypatch):
    """A local web server with one weights file, and a zoo whose model points at it."""
    payload = os.urandom(3 << 20)
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "w.caffemodel").write_bytes(payload)

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(tmp_path / "www"), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    models = tmp_path / "models"
    monkeypatch.setattr(zoo, "MODELS", str(models))
    monkeypatch.setenv("KAFFE_CACHE", str(tmp_path / "cache"))

    def model(name, url, checksum):
        (models / name).mkdir(parents=True)
        (models / name / "README.md").write_text(
            f"---\nname: {name}\ncaffemodel: w.caffemodel\ncaffemodel_url: {url}\n{checksum}\n---\n")
    yield payload, f"http://127.0.0.1:{server.server_address[1]}/w.caffemodel", model
    server.shutdown()


def test_fetch_downloads_and_checks_sha1(served, tmp_path, capsys):
    payload, url, model = served
    model("good", url, f"sha1: {hashlib.sha1(payload).hexdigest()}")
    assert zoo.main(["fetch", "good"]) == 0
    target = tmp_path / "cache" / "good" / "w.caffemodel"
    assert target.read_bytes() == payload
    assert zoo.main(["fetch", "good"]) == 0
    assert "already exists" in capsys.readouterr().out


def test_fetch_checks_sha256(served, tmp_path):
    payload, url, model = served
    model("good256", url, f"sha256: {hashlib.sha256(payload).hexdigest()}")
    out = io.StringIO()
    assert zoo.fetch_model("good256", out) == str(tmp_path / "cache" / "good256" / "w.caffemodel")
    assert "Checked sha256" in out.getvalue()


def test_fetch_rejects_a_bad_checksum(served, tmp_path, capsys):
    _, url, model = served
    model("bad", url, "sha1: " + "0" * 40)
    assert zoo.main(["fetch", "bad"]) == 1
    assert "did not download correctly" in capsys.readouterr().err
    assert not (tmp_path / "cache" / "bad" / "w.caffemodel").exists()


def test_fetch_offline_is_a_clear_error(served, capsys):
    _, _, model = served
    model("offline", "http://127.0.0.1:9/w.caffemodel", "sha1: " + "0" * 40)  # port 9: nothing listens
    assert zoo.main(["fetch", "offline"]) == 1
    err = capsys.readouterr().err
    assert "cannot download http://127.0.0.1:9/w.caffemodel" in err and "offline" in err


def test_fetch_without_public_weights(capsys):
    assert zoo.main(["fetch", "cifar10_quick"]) == 1
    assert "no public weights" in capsys.readouterr().err
