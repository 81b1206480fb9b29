"""Caffe's example notebooks, as our own scripts (tests/pycaffe_scripts/), run unchanged two ways: as plain
`import caffe` scripts under `kaffe run`, and as `import kaffe as caffe` scripts in this process (the same text
with its caffe imports naming kaffe). Each prints a RESULT line of JSON that the tests check."""
import contextlib
import io
import json
import re
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import kaffe as caffe
from kaffe.proto import caffe_pb2
from google.protobuf import text_format

SCRIPTS = Path(__file__).resolve().parent / "pycaffe_scripts"
REPO = Path(__file__).resolve().parents[1]
WAYS = ["import kaffe as caffe", "kaffe run"]


def as_kaffe(text):
    """The script written for `import kaffe as caffe`: `import caffe` and `from caffe...` name kaffe."""
    text = re.sub(r"^import caffe(?=\s|$)", "import kaffe as caffe", text, flags=re.M)
    return re.sub(r"^from caffe([ .])", r"from kaffe\1", text, flags=re.M)


def run_script(name, args, folder, way):
    """Run tests/pycaffe_scripts/NAME.py with `args`; returns its RESULT (None if it prints none)."""
    args = [str(a) for a in args]
    script = SCRIPTS / f"{name}.py"
    if way == "kaffe run":
        done = subprocess.run([sys.executable, "-m", "kaffe.tools.cli", "run", str(script)] + args, cwd=folder,
                              capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        stdout = done.stdout
    else:
        copy = Path(folder) / f"{name}_kaffe_as_caffe.py"
        copy.write_text(as_kaffe(script.read_text()))
        assert "import kaffe as caffe" in copy.read_text() or "from kaffe import" in copy.read_text()
        helpers = [path.stem for path in SCRIPTS.glob("*_layers.py")]   # Python layers' modules, beside the script
        for helper in helpers:
            (Path(folder) / f"{helper}.py").write_text(as_kaffe((SCRIPTS / f"{helper}.py").read_text()))
        saved = sys.argv, list(sys.path)
        sys.argv, sys.path[:0] = [str(copy)] + args, [str(folder)]   # as `python SCRIPT.py ARGS` sets them
        captured = io.StringIO()
        try:
            with contextlib.redirect_stdout(captured):
                runpy.run_path(str(copy), run_name="__main__")
        finally:
            sys.argv, sys.path[:] = saved
            for helper in helpers:
                sys.modules.pop(helper, None)
        stdout = captured.getvalue()
    results = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(results[-1][len("RESULT "):]) if results else None


def _folder(tmp_path, way):
    folder = tmp_path / way.replace(" ", "_")
    folder.mkdir()
    return folder


# -- 00-classification -----------------------------------------------------------------------------------------
def _caffenet_files(folder, size):
    """CaffeNet's deploy net (input size x size), kaffe-made weights, a mean file, an image and 1000 labels."""
    text = (REPO / "models" / "caffenet" / "deploy.prototxt").read_text()
    deploy = folder / "deploy.prototxt"
    deploy.write_text(text.replace("dim: 227", f"dim: {size}"))
    net = caffe.Net(str(deploy), caffe.TEST)
    rng = np.random.default_rng(0)
    for blobs in net.params.values():
        fan_in = blobs[0].count // blobs[0].shape[0]
        blobs[0].data[...] = rng.normal(0, np.sqrt(1.0 / fan_in), blobs[0].shape)
        blobs[1].data[...] = rng.normal(0, 0.1, blobs[1].shape)
    weights = folder / "caffenet.caffemodel"
    net.save(str(weights))
    mean = folder / "mean.npy"
    np.save(mean, np.array([104.0, 117.0, 123.0])[:, None, None] + rng.normal(0, 5, (3, 256, 256)))
    image = folder / "cat.png"  # lossless, of the net's input size: no resize in the comparison below
    from PIL import Image
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(image)
    labels = folder / "synset_words.txt"
    labels.write_text("".join(f"n{i:08d} class number {i}\n" for i in range(1000)))
    return deploy, weights, mean, image, labels


def _check_classification(folder, size, way):
    deploy, weights, mean, image, labels = _caffenet_files(folder, size)
    result = run_script("classification", [deploy, weights, mean, image, labels, folder], folder, way)
    saved = np.load(folder / "classification.npz")
    prob = saved["prob"]
    assert prob.shape == (50, 1000) and result["batch"] == 50
    np.testing.assert_allclose(prob, np.broadcast_to(prob[0], prob.shape), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(prob.sum(1), 1, rtol=1e-5)
    assert result["top5"] == list(np.argsort(prob[0])[::-1][:5])
    assert result["labels"] == [f"n{i:08d} class number {i}" for i in result["top5"]]
    # the Transformer: H x W x RGB in [0, 1] -> C x H x W, BGR, x 255, minus the per-channel mean
    from PIL import Image
    rgb = np.asarray(Image.open(image), dtype=np.float32) / 255
    mu = np.load(mean).mean(1).mean(1)
    expected = rgb.transpose(2, 0, 1)[::-1] * 255 - mu[:, None, None]
    np.testing.assert_allclose(saved["transformed"], expected, rtol=1e-5, atol=1e-4)
    # a batch of one gives the same probabilities
    one = caffe.Net(str(deploy), str(weights), caffe.TEST)
    one.blobs["data"].reshape(1, 3, size, size)
    np.testing.assert_allclose(one.forward(data=saved["transformed"][None])["prob"][0], prob[0], rtol=1e-4,
                               atol=1e-6)
    assert (folder / "conv1_filters.png").stat().st_size > 0 and (folder / "conv1_outputs.png").stat().st_size > 0


@pytest.mark.parametrize("way", WAYS)
def test_classification_small_input(tmp_path, way):
    _check_classification(_folder(tmp_path, way), 67, way)  # CaffeNet's layers at 67 x 67: pool5 is 1 x 1


@pytest.mark.slow
@pytest.mark.parametrize("way", WAYS)
def test_classification_caffenet_227(tmp_path, way):
    _check_classification(_folder(tmp_path, way), 227, way)


# -- 01-learning-lenet --------------------------------------------------------------------------------------
def _learning_lenet(tmp_path, mnist_lmdb, niter, test_batches):
    results = [run_script("learning_lenet", [mnist_lmdb, _folder(tmp_path, way), niter, test_batches],
                          tmp_path, way) for way in WAYS]
    assert results[0] == results[1]  # the solver's random_seed: the same run both ways
    result = results[0]
    assert result["iter"] == niter + 1 and result["first_gradient"] > 0 and result["first_scores_change"] > 0
    assert len(result["test_acc"]) == -(-niter // 25)
    train = caffe_pb2.NetParameter()
    text_format.Merge((tmp_path / "kaffe_run" / "lenet_auto_train.prototxt").read_text(), train)
    assert [layer.name for layer in train.layer] == ["data", "conv1", "pool1", "conv2", "pool2", "fc1", "relu1",
                                                     "score", "loss"]
    assert train.layer[0].data_param.batch_size == 64 and train.layer[6].top == ["fc1"]
    return result


def test_learning_lenet_short(tmp_path, mnist_lmdb):
    result = _learning_lenet(tmp_path, mnist_lmdb, 30, 2)
    assert result["last_loss"] < result["first_loss"]


@pytest.mark.slow
def test_learning_lenet_200_iterations_reach_90_percent(tmp_path, mnist_lmdb):
    result = _learning_lenet(tmp_path, mnist_lmdb, 200, 100)
    assert result["test_acc"][-1] > 0.9 and result["last_loss"] < 0.5


# -- net_surgery ---------------------------------------------------------------------------------------------
def _correlate(image, kernel):
    kh, kw = kernel.shape
    out = np.zeros((image.shape[0] - kh + 1, image.shape[1] - kw + 1))
    for i in range(kh):
        for j in range(kw):
            out += kernel[i, j] * image[i:i + out.shape[0], j:j + out.shape[1]]
    return out


@pytest.mark.parametrize("way", WAYS)
def test_net_surgery(tmp_path, way):
    folder = _folder(tmp_path, way)
    from PIL import Image
    rng = np.random.default_rng(5)
    Image.fromarray(rng.integers(0, 256, (100, 100), dtype=np.uint8)).save(folder / "gray.png")
    Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(folder / "color.png")
    result = run_script("net_surgery", [folder / "gray.png", folder / "color.png", folder], folder, way)
    assert result["map_shape"] == [1, 10, 5, 5] and result["conv1_copied"]
    assert result["largest_difference"] < 1e-4   # the full-conv net's map is the classifier on every window
    saved = np.load(folder / "net_surgery.npz")
    image = saved["image"]
    np.testing.assert_allclose(image, np.asarray(Image.open(folder / "gray.png")) / 255, atol=1e-6)
    np.testing.assert_allclose(saved["biased"], _correlate(image, saved["random_filter"]) + 1, rtol=1e-4, atol=1e-5)
    sobel = np.pad(saved["sobel"], 1)
    for k, (kernel, bias) in enumerate([(saved["gaussian"], 1), (sobel, 0), (sobel.T, 0)]):
        np.testing.assert_allclose(saved["designed"][k], _correlate(image, kernel) + bias, rtol=1e-4, atol=1e-5)


# -- brewing-logreg ------------------------------------------------------------------------------------------
def test_brewing_logreg(tmp_path):
    results = [run_script("brewing_logreg", [_folder(tmp_path, way), 1000], tmp_path, way) for way in WAYS]
    assert results[0] == results[1]
    assert results[0]["logreg"] > 0.75 and results[0]["nonlinear"] > 0.75   # chance is 0.5
    test = caffe_pb2.NetParameter()
    text_format.Merge((tmp_path / "kaffe_run" / "logreg_auto_test.prototxt").read_text(), test)
    assert [layer.type for layer in test.layer] == ["HDF5Data", "InnerProduct", "Accuracy", "SoftmaxWithLoss"]


# -- 02-fine-tuning ------------------------------------------------------------------------------------------
def test_fine_tuning(tmp_path, mnist_lmdb):
    results = [run_script("fine_tuning", [mnist_lmdb, _folder(tmp_path, way), 50, 20], tmp_path, way)
               for way in WAYS]
    assert results[0] == results[1]
    result = results[0]
    assert result["copied"] and result["renamed_kept_its_init"] and result["still_frozen"]
    accuracy = result["accuracy"]
    assert accuracy["finetuned"] > 0.5 and accuracy["finetuned"] > accuracy["scratch"] + 0.3
    assert result["final_loss"]["finetuned"] < result["final_loss"]["scratch"]


# -- pycaffe/caffenet.py -------------------------------------------------------------------------------------
CAFFENET_LAYERS = [  # pycaffe's automatic names: the type and its running count
    ("Data1", "Data", [], ["Data1", "Data2"]), ("Convolution1", "Convolution", ["Data1"], ["Convolution1"]),
    ("ReLU1", "ReLU", ["Convolution1"], ["Convolution1"]), ("Pooling1", "Pooling", ["Convolution1"], ["Pooling1"]),
    ("LRN1", "LRN", ["Pooling1"], ["LRN1"]), ("Convolution2", "Convolution", ["LRN1"], ["Convolution2"]),
    ("ReLU2", "ReLU", ["Convolution2"], ["Convolution2"]), ("Pooling2", "Pooling", ["Convolution2"], ["Pooling2"]),
    ("LRN2", "LRN", ["Pooling2"], ["LRN2"]), ("Convolution3", "Convolution", ["LRN2"], ["Convolution3"]),
    ("ReLU3", "ReLU", ["Convolution3"], ["Convolution3"]),
    ("Convolution4", "Convolution", ["Convolution3"], ["Convolution4"]),
    ("ReLU4", "ReLU", ["Convolution4"], ["Convolution4"]),
    ("Convolution5", "Convolution", ["Convolution4"], ["Convolution5"]),
    ("ReLU5", "ReLU", ["Convolution5"], ["Convolution5"]), ("Pooling3", "Pooling", ["Convolution5"], ["Pooling3"]),
    ("InnerProduct1", "InnerProduct", ["Pooling3"], ["InnerProduct1"]),
    ("ReLU6", "ReLU", ["InnerProduct1"], ["InnerProduct1"]),
    ("Dropout1", "Dropout", ["InnerProduct1"], ["InnerProduct1"]),
    ("InnerProduct2", "InnerProduct", ["InnerProduct1"], ["InnerProduct2"]),
    ("ReLU7", "ReLU", ["InnerProduct2"], ["InnerProduct2"]),
    ("Dropout2", "Dropout", ["InnerProduct2"], ["InnerProduct2"]),
    ("InnerProduct3", "InnerProduct", ["InnerProduct2"], ["InnerProduct3"]),
    ("SoftmaxWithLoss1", "SoftmaxWithLoss", ["InnerProduct3", "Data2"], ["SoftmaxWithLoss1"]),
]


def test_caffenet_netspec(tmp_path):
    for way in WAYS:
        assert run_script("caffenet", [_folder(tmp_path, way)], tmp_path, way) is None
    for name in ("train.prototxt", "test.prototxt"):
        assert (tmp_path / "kaffe_run" / name).read_text() == (tmp_path / "import_kaffe_as_caffe" / name).read_text()
    nets = {}
    for name in ("train", "test"):
        nets[name] = caffe_pb2.NetParameter()
        text_format.Merge((tmp_path / "kaffe_run" / f"{name}.prototxt").read_text(), nets[name])
    train, test = nets["train"], nets["test"]
    assert [(l.name, l.type, list(l.bottom), list(l.top)) for l in train.layer] == CAFFENET_LAYERS
    assert [(l.name, l.type, list(l.bottom), list(l.top)) for l in test.layer] == CAFFENET_LAYERS + [
        ("Accuracy1", "Accuracy", ["InnerProduct3", "Data2"], ["Accuracy1"])]
    data = train.layer[0]
    assert (data.data_param.source, data.data_param.batch_size, data.data_param.backend) == (
        "/path/to/caffe-train-lmdb", 256, caffe_pb2.DataParameter.LMDB)
    assert test.layer[0].data_param.batch_size == 50
    assert (data.transform_param.crop_size, list(data.transform_param.mean_value), data.transform_param.mirror) == (
        227, [104, 117, 123], True)
    conv2 = train.layer[5].convolution_param
    assert (conv2.num_output, list(conv2.kernel_size), list(conv2.pad), conv2.group) == (256, [5], [2], 2)
    assert train.layer[3].pooling_param.pool == caffe_pb2.PoolingParameter.MAX
    assert train.layer[4].lrn_param.local_size == 5 and train.layer[22].inner_product_param.num_output == 1000


# -- FCN's net.py, surgery.py, score.py and solve.py ------------------------------------------------------------
@pytest.mark.parametrize("way", WAYS)
def test_fcn_segmentation(tmp_path, way):
    result = run_script("fcn", [_folder(tmp_path, way), 2, 60], tmp_path, way)
    assert result["crop_offset"] == [2] and result["interp_layers"] == ["upscore"] and result["iter"] == 120
    assert result["upscore_kept"] and result["bilinear_centre"] == pytest.approx((1 - 0.5 / 4) ** 2)
    (accuracy_before, _), (accuracy, mean_iu) = result["scores"][0], result["scores"][-1]
    assert accuracy > 0.95 and mean_iu > 0.8 and accuracy > accuracy_before
