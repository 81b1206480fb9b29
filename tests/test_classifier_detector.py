"""kaffe.Classifier, kaffe.Detector and `kaffe classify`: pycaffe's crop rules checked against crops cut by hand,
on a small net with weights made by kaffe's fillers."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import kaffe
import kaffe.io as kio
from kaffe.engine.errors import KaffeError
from kaffe.tools import cli

NET = """name: "small"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 4 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "gaussian" std: 0.3 }
                      bias_filler { type: "constant" value: 0.1 } } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "fc" type: "InnerProduct" bottom: "conv" top: "fc"
  inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""
MEAN_BGR = np.array([0.3, 0.4, 0.5])
pytestmark = pytest.mark.usefixtures("log_back_on_stderr")  # the tests run cli.main


@pytest.fixture
def small(tmp_path):
    """(deploy prototxt, weights) of a 3 x 8 x 8 -> 5-class net."""
    model = tmp_path / "deploy.prototxt"
    model.write_text(NET)
    kaffe.set_random_seed(7)
    weights = tmp_path / "small.caffemodel"
    kaffe.Net(str(model), kaffe.TEST).save(str(weights))
    return str(model), str(weights)


def _images(n=3, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.random((rng.integers(9, 16), rng.integers(9, 16), 3)).astype(np.float32) for _ in range(n)]


def _by_hand(small, crops):
    """The net's probabilities for H x W x 3 RGB crops prepared as the Classifier is set up below: BGR, times 2,
    minus MEAN_BGR, times 0.5."""
    net = kaffe.Net(small[0], kaffe.TEST, weights=small[1])
    batch = np.stack([(c.transpose(2, 0, 1)[::-1] * 2 - MEAN_BGR[:, None, None]) * 0.5 for c in crops])
    return net.forward_all(data=batch)["prob"]


def _classifier(small, **kwargs):
    return kaffe.Classifier(*small, mean=MEAN_BGR, raw_scale=2.0, input_scale=0.5, channel_swap=(2, 1, 0),
                            **kwargs)


def test_predict_oversample_averages_the_ten_crops(small):
    images = _images()
    classifier = _classifier(small, image_dims=(11, 12))
    predictions = classifier.predict(images)
    assert predictions.shape == (3, 5)
    for image, prediction in zip(images, predictions):
        resized = kio.resize_image(image, (11, 12))
        # corners, then the centre (5.5 - 4, 6 - 4 -> rows 1..9, columns 2..10), then the same mirrored
        boxes = [(0, 0), (0, 4), (3, 0), (3, 4), (1, 2)]
        crops = [resized[t:t + 8, l:l + 8] for t, l in boxes]
        crops += [c[:, ::-1] for c in crops]
        np.testing.assert_allclose(prediction, _by_hand(small, crops).mean(0), rtol=1e-5, atol=1e-6)


def test_predict_center_only(small):
    images = _images(5, seed=1)
    predictions = _classifier(small, image_dims=(11, 12)).predict(images, oversample=False)
    crops = [kio.resize_image(image, (11, 12))[1:9, 2:10] for image in images]
    np.testing.assert_allclose(predictions, _by_hand(small, crops), rtol=1e-5, atol=1e-6)


def test_default_image_dims_are_the_input_size(small):
    classifier = kaffe.Classifier(*small)
    assert list(classifier.image_dims) == [8, 8] and list(classifier.crop_dims) == [8, 8]
    image = _images(1)[0]
    np.testing.assert_allclose(classifier.predict([image], oversample=False),
                               classifier.forward_all(data=kio.resize_image(image, (8, 8)).transpose(2, 0, 1)[None])
                               ["prob"], rtol=1e-6)


def test_classifier_rejects_what_the_transformer_rejects(small):
    with pytest.raises(ValueError, match="Mean channels incompatible with input.") as error:
        kaffe.Classifier(*small, mean=np.zeros(4))
    assert isinstance(error.value, KaffeError)
    with pytest.raises(ValueError, match="Channel swap needs"):
        kaffe.Classifier(*small, channel_swap=(1, 0))
    with pytest.raises(IndexError, match="no images"):
        kaffe.Classifier(*small).predict([])


# -- Detector ---------------------------------------------------------------------------------------------------
@pytest.fixture
def picture(tmp_path):
    pixels = np.random.default_rng(3).integers(0, 256, (20, 25, 3), dtype=np.uint8)
    path = tmp_path / "picture.png"
    Image.fromarray(pixels).save(path)
    return str(path), pixels / np.float32(255)


def test_detect_windows_warps_each_window(small, picture):
    path, image = picture
    detector = kaffe.Detector(*small, mean=MEAN_BGR, raw_scale=2.0, input_scale=0.5, channel_swap=(2, 1, 0))
    windows = [np.array([0, 0, 10, 10]), np.array([5, 3, 19, 24]), np.array([2, 2, 10, 10])]
    detections = detector.detect_windows(iter([(path, iter(windows))]))  # iterators are read once, as given
    assert [d["filename"] for d in detections] == [path] * 3
    assert [list(d["window"]) for d in detections] == [list(w) for w in windows]
    crops = [kio.resize_image(image[w[0]:w[2], w[1]:w[3]], (8, 8)) for w in windows]
    np.testing.assert_allclose(np.stack([d["prediction"] for d in detections]), _by_hand(small, crops),
                               rtol=1e-5, atol=1e-6)


def test_context_pad_crop_by_hand(small, picture):
    _, image = picture
    detector = kaffe.Detector(*small, context_pad=1)  # the 8-pixel input shows the window in its inner 6
    assert list(detector.crop_dims) == [8, 8, 3] and not detector.crop_mean.any()
    # window (2, 3, 8, 9): half 3.5, centre (5.5, 6.5), grown by 8/6 to rows 1..10, columns 2..11 (10 x 10 with
    # the +1 of pycaffe's box sizes), scale 8/10; inside the image, so the 9 x 9 slice is warped to 8 x 8
    np.testing.assert_allclose(detector.crop(image, np.array([2, 3, 8, 9])),
                               kio.resize_image(image[1:10, 2:11], (8, 8)), atol=1e-6)
    # window (-2, -2, 3, 3) leaves the image: centre (1, 1), box (-3, -3, 5, 5), scale 8/9: round(3 * 8/9) = 3 rows
    # and columns of mean (zeros here) above and left of image[0:5, 0:5] clipped, warped to round(6 * 8/9) = 5
    crop = detector.crop(image, np.array([-2, -2, 3, 3]))
    assert crop.shape == (8, 8, 3) and not crop[:3].any() and not crop[:, :3].any()
    np.testing.assert_allclose(crop[3:, 3:], kio.resize_image(image[0:5, 0:5], (5, 5)), atol=1e-6)


def test_context_pad_fills_with_the_mean_in_image_space(small, picture):
    _, image = picture
    detector = kaffe.Detector(*small, mean=MEAN_BGR * 255, raw_scale=255.0, channel_swap=(2, 1, 0), context_pad=1)
    crop = detector.crop(image, np.array([-2, -2, 3, 3]))
    np.testing.assert_allclose(crop[0, 0], MEAN_BGR[::-1], atol=1e-6)  # back to RGB and to [0, 1]
    prepared = detector.transformer.preprocess("data", crop)
    np.testing.assert_allclose(prepared[:, 0, 0], 0, atol=1e-4)  # the padding feeds the net zeros


def test_detector_bad_windows_and_selective_search(small, picture):
    path, image = picture
    detector = kaffe.Detector(*small)
    with pytest.raises(ValueError, match="holds no pixel"):
        detector.detect_windows([(path, [np.array([5, 5, 5, 9])])])
    with pytest.raises(IndexError, match="no windows"):
        detector.detect_windows([(path, [])])
    with pytest.raises(ImportError, match="not on PyPI") as error:
        detector.detect_selective_search([path])
    assert isinstance(error.value, KaffeError)


# -- kaffe classify -------------------------------------------------------------------------------------------
def _classify(small, *args):
    return cli.main(["classify", *map(str, args), "--model_def", small[0], "--pretrained_model", small[1],
                     "--images_dim", "11,12", "--mean_file", "76.5,102,127.5", "--channel_swap", "2,1,0"])


def test_classify_file_folder_and_npy(small, tmp_path, capsys):
    images = [np.asarray(Image.fromarray((im * 255).astype(np.uint8))) / np.float32(255) for im in _images(2)]
    folder = tmp_path / "images"
    folder.mkdir()
    for n, im in enumerate(images):
        Image.fromarray((im * 255).round().astype(np.uint8)).save(folder / f"{n}.png")
    (folder / "skipped.txt").write_text("not a png")
    classifier = kaffe.Classifier(*small, image_dims=(11, 12), mean=MEAN_BGR * 255, raw_scale=255.0,
                                  channel_swap=(2, 1, 0))
    assert _classify(small, folder, tmp_path / "folder.npy", "--ext", "png") == 0
    np.testing.assert_allclose(np.load(tmp_path / "folder.npy"), classifier.predict(images), rtol=1e-5, atol=1e-6)
    assert _classify(small, folder / "1.png", tmp_path / "one.npy", "--center_only") == 0
    np.testing.assert_allclose(np.load(tmp_path / "one.npy"), classifier.predict(images[1:], oversample=False),
                               rtol=1e-5, atol=1e-6)
    batch = np.stack([kio.resize_image(im, (13, 14)) for im in images])  # N x H x W x K
    np.save(tmp_path / "batch.npy", batch)
    assert _classify(small, tmp_path / "batch.npy", tmp_path / "batch_out.npy") == 0
    np.testing.assert_allclose(np.load(tmp_path / "batch_out.npy"), classifier.predict(batch), rtol=1e-5, atol=1e-6)
    out = capsys.readouterr().out
    assert "CPU mode" in out and "Loading folder:" in out and "Classifying 2 inputs." in out
    assert f"Saving results into {tmp_path / 'one.npy'}" in out


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing.jpg", "missing.jpg: no such image file"),
    (lambda d: (d / "notes.jpg", (d / "notes.jpg").write_text("hello"))[0], "notes.jpg: not an image file"),
    (lambda d: d, "no *.jpg images in the folder"),
])
def test_classify_bad_inputs_one_line(small, tmp_path, capsys, make, message):
    assert _classify(small, make(tmp_path), tmp_path / "out.npy") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("kaffe classify: error: ") and message in err[-1]
    assert not (tmp_path / "out.npy").exists()


def test_classify_default_weights_missing_says_how_to_fetch(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KAFFE_CACHE", str(tmp_path / "cache"))
    assert cli.main(["classify", str(tmp_path / "x.jpg"), str(tmp_path / "out.npy")]) == 1
    assert "kaffe zoo fetch caffenet" in capsys.readouterr().err


def test_classify_program_no_traceback(small, tmp_path):
    done = subprocess.run([sys.executable, "-m", "kaffe.tools.cli", "classify", str(tmp_path / "nope.png"),
                           str(tmp_path / "out.npy"), "--model_def", small[0], "--pretrained_model", small[1]],
                          capture_output=True, text=True)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == f"kaffe classify: error: {tmp_path / 'nope.png'}: no such image file"


@pytest.mark.slow
def test_caffenet_oversample_and_from_net_mean(tmp_path):
    """CaffeNet's deploy net (filler weights): the 10 crops of a 256 x 256 image, and the 256 x 256 mean of its
    train_val data layer resized to the 227 x 227 input."""
    from kaffe.engine.net import read_net_param
    models = Path(__file__).resolve().parents[1] / "models" / "caffenet"
    mean = np.random.default_rng(8).random((3, 256, 256)).astype(np.float32) * 60 + 90
    proto = kaffe.caffe_pb2.BlobProto(num=1, channels=3, height=256, width=256)
    proto.data.extend(mean.ravel())
    (tmp_path / "mean.binaryproto").write_bytes(proto.SerializeToString())
    layer = next(layer for layer in read_net_param(str(models / "train_val.prototxt")).layer
                 if any(rule.phase == kaffe.TEST for rule in layer.include))
    layer.transform_param.mean_file = str(tmp_path / "mean.binaryproto")
    kaffe.set_random_seed(2)
    classifier = kaffe.Classifier(str(models / "deploy.prototxt"), None, image_dims=(256, 256),
                                  mean=mean.mean((1, 2)), raw_scale=255.0, channel_swap=(2, 1, 0))
    transformer = kio.Transformer.from_net(classifier, layer)
    assert transformer.mean["data"].shape == (3, 227, 227)
    lo, hi = mean.min(), mean.max()
    resized = kio.resize_image((mean - lo).transpose(1, 2, 0) / (hi - lo), (227, 227)).transpose(2, 0, 1)
    np.testing.assert_allclose(transformer.mean["data"], resized * (hi - lo) + lo, rtol=1e-6)
    image = np.random.default_rng(9).random((375, 500, 3)).astype(np.float32)
    prediction = classifier.predict([image])
    assert prediction.shape == (1, 1000)
    big = kio.resize_image(image, (256, 256))
    crops = [big[t:t + 227, l:l + 227] for t, l in [(0, 0), (0, 29), (29, 0), (29, 29), (14, 14)]]
    crops += [c[:, ::-1] for c in crops]
    batch = np.stack([classifier.transformer.preprocess("data", c) for c in crops])
    np.testing.assert_allclose(prediction[0], classifier.forward_all(data=batch)["prob"].mean(0), rtol=1e-5,
                               atol=1e-7)
