"""kaffe.io (pycaffe's caffe.io): expectations worked out by hand from pycaffe's definitions (and scikit-image's
resize, which pycaffe calls: half-pixel centres, cval 0 outside, smoothing before shrinking)."""
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import kaffe
import kaffe.io as kio
from kaffe.engine.errors import KaffeError
from kaffe.proto import caffe_pb2

LENET = Path(__file__).resolve().parents[1] / "models" / "lenet"


def _save(path, pixels):
    Image.fromarray(pixels).save(path)
    return str(path)


# -- load_image -----------------------------------------------------------------------------------------------
@pytest.fixture
def colors_png(tmp_path):
    pixels = np.zeros((2, 3, 3), np.uint8)
    pixels[0] = [[255, 0, 0], [0, 255, 0], [0, 0, 255]]
    pixels[1] = [[255, 255, 255], [51, 102, 204], [0, 0, 0]]
    return _save(tmp_path / "colors.png", pixels), pixels


def test_load_image_rgb_in_0_1(colors_png):
    path, pixels = colors_png
    image = kio.load_image(path)
    assert image.dtype == np.float32 and image.shape == (2, 3, 3)
    np.testing.assert_allclose(image, pixels / 255.0, atol=1e-7)
    assert image[1, 1].tolist() == pytest.approx([0.2, 0.4, 0.8])


def test_load_image_gray_of_colour_uses_rgb2gray_weights(colors_png):
    image = kio.load_image(colors_png[0], color=False)
    assert image.shape == (2, 3, 1) and image.dtype == np.float32
    # scikit-image's rgb2gray: 0.2125 R + 0.7154 G + 0.0721 B
    expected = [[0.2125, 0.7154, 0.0721], [1.0, 0.2125 * 0.2 + 0.7154 * 0.4 + 0.0721 * 0.8, 0.0]]
    np.testing.assert_allclose(image[..., 0], expected, atol=1e-6)


def test_load_image_gray_file_tiled_to_rgb_and_alpha_dropped(tmp_path):
    gray = np.array([[0, 51], [102, 255]], np.uint8)
    path = _save(tmp_path / "gray.png", gray)
    color = kio.load_image(path)
    assert color.shape == (2, 2, 3)
    for c in range(3):
        np.testing.assert_allclose(color[..., c], gray / 255.0, atol=1e-7)
    np.testing.assert_allclose(kio.load_image(path, color=False)[..., 0], gray / 255.0, atol=1e-7)
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 255, 7
    image = kio.load_image(_save(tmp_path / "rgba.png", rgba))
    assert image.shape == (2, 2, 3)
    assert image[0, 0].tolist() == [1.0, 0.0, 0.0]


def test_load_image_missing_and_non_image_files(tmp_path):
    with pytest.raises(FileNotFoundError) as missing:
        kio.load_image(str(tmp_path / "nope.jpg"))
    assert isinstance(missing.value, KaffeError) and "nope.jpg" in str(missing.value)
    text = tmp_path / "notes.jpg"
    text.write_text("not an image\n")
    with pytest.raises(OSError) as bad:
        kio.load_image(str(text))
    assert isinstance(bad.value, KaffeError) and "notes.jpg: not an image file" in str(bad.value)


# -- resize_image ---------------------------------------------------------------------------------------------
def test_resize_image_upsampling_by_hand():
    # columns 0 and 1 at half-pixel positions -0.25, 0.25, 0.75, 1.25 of a [0, 1] row, cval 0 beyond the edges
    image = np.array([[[0.0], [1.0]], [[0.0], [1.0]]])
    out = kio.resize_image(image, (2, 4))
    assert out.dtype == np.float32 and out.shape == (2, 4, 1)
    np.testing.assert_allclose(out[..., 0], [[0, 0.25, 0.75, 0.75]] * 2, atol=1e-6)
    # 3 columns: positions -1/6, 1/2, 7/6
    np.testing.assert_allclose(kio.resize_image(image, (2, 3))[..., 0], [[0, 0.5, 5 / 6]] * 2, atol=1e-6)


def test_resize_image_works_in_0_1_and_scales_back():
    # values 3..9 are resized as (x - 3) / 6, so the cval-0 border pulls towards the minimum 3, not towards 0
    image = (np.arange(4.0).reshape(2, 2, 1) * 2 + 3)
    out = kio.resize_image(image, (4, 4))[..., 0]
    assert out[0, 0] == pytest.approx(3.0)
    # (1.25, 1.25) -> rows 1 (weight .75) and beyond (cval), columns alike: 3 + 6 * (1 * .75 * .75)
    assert out[3, 3] == pytest.approx(3 + 6 * 0.5625)
    assert out[1, 1] == pytest.approx(3 + 6 * (0.75 * 0.75 * 0 + 0.75 * 0.25 * 1 / 3 + 0.25 * 0.75 * 2 / 3 +
                                               0.25 * 0.25 * 1), abs=1e-6)


def test_resize_image_smooths_when_shrinking():
    # a 6 x 6 checkerboard shrunk 3 times: sampling alone would give pure 0 / 1 pixels, today's scikit-image
    # smooths first (as pycaffe now resizes), which leaves values near the mean
    board = (np.indices((6, 6)).sum(0) % 2).astype(float)[..., None]
    out = kio.resize_image(board, (2, 2))
    assert np.all((out > 0.35) & (out < 0.65))


def test_resize_image_constant_and_many_channel_images():
    out = kio.resize_image(np.full((5, 5, 3), 0.3), (7, 2))
    assert out.shape == (7, 2, 3) and out.dtype == np.float32 and np.all(out == np.float32(0.3))
    # neither 1 nor 3 channels: scipy's zoom, by (rows, columns, 1)
    from scipy.ndimage import zoom
    image = np.random.default_rng(0).random((4, 6, 2))
    out = kio.resize_image(image, (8, 3))
    assert out.shape == (8, 3, 2)
    np.testing.assert_allclose(out, zoom(image, (2.0, 0.5, 1), order=1), atol=1e-6)


# -- oversample -----------------------------------------------------------------------------------------------
def test_oversample_order_corners_center_then_mirrors():
    image = np.arange(4 * 5 * 2, dtype=np.float32).reshape(4, 5, 2)
    crops = kio.oversample([image, image + 100], (2, 3))
    assert crops.shape == (20, 2, 3, 2) and crops.dtype == np.float32
    # corners at (0, 0), (0, 2), (2, 0), (2, 2); centre (2, 2.5) -1 / -1.5 -> truncated to (1, 1)
    boxes = [(0, 0), (0, 2), (2, 0), (2, 2), (1, 1)]
    for n, im in enumerate([image, image + 100]):
        for k, (top, left) in enumerate(boxes):
            np.testing.assert_array_equal(crops[10 * n + k], im[top:top + 2, left:left + 3])
            np.testing.assert_array_equal(crops[10 * n + 5 + k], im[top:top + 2, left:left + 3][:, ::-1])


# -- Transformer --------------------------------------------------------------------------------------------
def _imagenet_style(shape=(1, 3, 2, 2)):
    t = kio.Transformer({"data": shape})
    t.set_transpose("data", (2, 0, 1))
    t.set_channel_swap("data", (2, 1, 0))
    t.set_raw_scale("data", 255.0)
    t.set_mean("data", np.array([104.0, 117.0, 123.0]))
    t.set_input_scale("data", 0.5)
    return t


def test_preprocess_order_of_steps_and_deprocess():
    image = np.random.default_rng(1).random((2, 2, 3)).astype(np.float32)
    keep = image.copy()
    t = _imagenet_style()
    out = t.preprocess("data", image)
    expected = (image.transpose(2, 0, 1)[[2, 1, 0]] * 255 - np.array([104, 117, 123])[:, None, None]) * 0.5
    assert out.shape == (3, 2, 2) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-4)
    np.testing.assert_array_equal(image, keep)  # the caller's image is not scaled in place
    np.testing.assert_allclose(t.deprocess("data", out), image, atol=1e-6)
    np.testing.assert_allclose(t.deprocess("data", out[np.newaxis]), image, atol=1e-6)  # 1 x K x H x W too


def test_preprocess_resizes_to_the_input_size():
    image = np.random.default_rng(2).random((5, 7, 3)).astype(np.float32)
    t = kio.Transformer({"data": (1, 3, 3, 4)})
    t.set_transpose("data", (2, 0, 1))
    np.testing.assert_allclose(t.preprocess("data", image), kio.resize_image(image, (3, 4)).transpose(2, 0, 1))


def test_set_mean_full_array_is_resized_in_0_1():
    mean = np.random.default_rng(3).random((3, 6, 6)) * 200 + 10
    t = kio.Transformer({"data": (1, 3, 4, 4)})
    t.set_mean("data", mean)
    lo, hi = mean.min(), mean.max()
    expected = kio.resize_image(((mean - lo) / (hi - lo)).transpose(1, 2, 0), (4, 4)).transpose(2, 0, 1) * \
        (hi - lo) + lo
    assert t.mean["data"].shape == (3, 4, 4)
    np.testing.assert_allclose(t.mean["data"], expected)
    same = kio.Transformer({"data": (1, 3, 6, 6)})
    same.set_mean("data", mean)
    assert same.mean["data"] is mean
    gray = kio.Transformer({"data": (1, 3, 4, 4)})  # one mean channel for every input channel
    gray.set_mean("data", mean[:1])
    assert gray.mean["data"].shape == (1, 4, 4)
    one = kio.Transformer({"data": (1, 1, 3, 3)})  # an H x W mean for a 1-channel input
    one.set_mean("data", mean[0])
    assert one.mean["data"].shape == (1, 3, 3)


@pytest.mark.parametrize("action, message", [
    (lambda t: t.set_mean("data", np.zeros(4)), "Mean channels incompatible with input."),
    (lambda t: t.set_mean("data", np.zeros((1, 3, 2, 2))), "Mean shape invalid"),
    (lambda t: t.set_mean("data", np.zeros((2, 5, 5))), "Mean channels incompatible with input."),
    (lambda t: t.set_channel_swap("data", (1, 0)),
     "Channel swap needs to have the same number of dimensions as the input channels."),
    (lambda t: t.set_transpose("data", (1, 0)),
     "Transpose order needs to have the same number of dimensions as the input."),
    (lambda t: t.set_raw_scale("image", 255), "image is not one of the net inputs: {'data': (1, 3, 2, 2)}"),
    (lambda t: t.preprocess("image", np.zeros((2, 2, 3))), "image is not one of the net inputs"),
])
def test_transformer_rejects_what_pycaffe_rejects(action, message):
    with pytest.raises(ValueError) as error:
        action(kio.Transformer({"data": (1, 3, 2, 2)}))
    assert isinstance(error.value, KaffeError) and message in str(error.value)


# -- Transformer.from_net ---------------------------------------------------------------------------------------
def _write_mean(path, mean):
    proto = caffe_pb2.BlobProto(num=1, channels=mean.shape[0], height=mean.shape[1], width=mean.shape[2])
    proto.data.extend(mean.ravel())
    path.write_bytes(proto.SerializeToString())
    return str(path)


def _deploy(tmp_path, channels, size):
    path = tmp_path / "deploy.prototxt"
    path.write_text(f'layer {{ name: "data" type: "Input" top: "data" '
                    f'input_param {{ shape {{ dim: 2 dim: {channels} dim: {size} dim: {size} }} }} }}')
    return kaffe.Net(str(path), kaffe.TEST)


def test_from_net_mean_file_resized_to_the_crop(tmp_path):
    mean = np.random.default_rng(4).random((3, 16, 16)).astype(np.float32) * 255
    param = caffe_pb2.TransformationParameter(crop_size=12, mean_file=_write_mean(tmp_path / "m.binaryproto", mean),
                                              scale=0.25)
    t = kio.Transformer.from_net(_deploy(tmp_path, 3, 12), param)
    # what pycaffe users write by hand for the same data layer
    manual = kio.Transformer({"data": (2, 3, 12, 12)})
    manual.set_transpose("data", (2, 0, 1))
    manual.set_channel_swap("data", (2, 1, 0))
    manual.set_raw_scale("data", 255.0)
    manual.set_mean("data", kio.blobproto_to_array(caffe_pb2.BlobProto.FromString(
        (tmp_path / "m.binaryproto").read_bytes()))[0])
    manual.set_input_scale("data", 0.25)
    np.testing.assert_allclose(t.mean["data"], manual.mean["data"], rtol=1e-6)
    image = np.random.default_rng(5).random((20, 18, 3)).astype(np.float32)
    np.testing.assert_allclose(t.preprocess("data", image), manual.preprocess("data", image), rtol=1e-6, atol=1e-5)


def test_from_net_prototxt_path_lenet(tmp_path):
    # LeNet's data layer: 1 channel (no swap), scale 1/256, no mean
    t = kio.Transformer.from_net(_deploy(tmp_path, 1, 28), str(LENET / "lenet_train_test.prototxt"))
    assert t.channel_swap == {} and t.mean == {} and t.raw_scale == {"data": 255.0}
    assert t.input_scale["data"] == pytest.approx(0.00390625)
    digit = np.arange(28 * 28, dtype=np.uint8).reshape(28, 28)
    out = t.preprocess("data", kio.load_image(_save(tmp_path / "digit.png", digit), color=False))
    np.testing.assert_allclose(out[0], digit * 0.00390625, atol=1e-6)


def test_from_net_matches_the_data_layer(tmp_path):
    pixels = np.random.default_rng(6).integers(0, 256, (6, 7, 3), dtype=np.uint8)
    _save(tmp_path / "a.png", pixels)
    (tmp_path / "list.txt").write_text("a.png 0\n")
    net_path = tmp_path / "train.prototxt"
    net_path.write_text(f'''layer {{ name: "data" type: "ImageData" top: "data" top: "label"
  transform_param {{ mean_value: 10 mean_value: 20 mean_value: 30 scale: 0.5 }}
  image_data_param {{ source: "{tmp_path / 'list.txt'}" root_folder: "{tmp_path}/" batch_size: 1 }} }}''')
    net = kaffe.Net(str(net_path), kaffe.TEST)
    fed = net.forward()["data"][0].copy()
    t = kio.Transformer.from_net(net, "data")  # a net without inputs: the data layer's top
    np.testing.assert_allclose(t.preprocess("data", kio.load_image(str(tmp_path / "a.png"))), fed, atol=1e-4)
    # the same from the layer object and from its LayerParameter
    for source in (net.layer_dict["data"], net.layer_dict["data"].layer_param):
        np.testing.assert_array_equal(kio.Transformer.from_net(net, source).mean["data"], t.mean["data"])


def test_from_net_bad_arguments(tmp_path):
    net = _deploy(tmp_path, 3, 8)
    with pytest.raises(ValueError, match="crops 10 x 10 but input 'data' is 8 x 8"):
        kio.Transformer.from_net(net, caffe_pb2.TransformationParameter(crop_size=10))
    with pytest.raises(ValueError, match="Mean channels incompatible"):
        kio.Transformer.from_net(net, caffe_pb2.TransformationParameter(mean_value=[1, 2]))
    with pytest.raises(TypeError) as error:
        kio.Transformer.from_net(net, 3)
    assert isinstance(error.value, KaffeError)
    with pytest.raises(KaffeError, match="no layer with a transform_param"):
        kio.Transformer.from_net(net, str(LENET / "lenet_deploy.prototxt"))


# -- protos -----------------------------------------------------------------------------------------------------
def test_blobproto_round_trip_with_diff_and_float32_rounding():
    arr = np.arange(24, dtype=np.float64).reshape(2, 3, 4) / 3
    blob = kio.array_to_blobproto(arr, -arr)
    assert list(blob.shape.dim) == [2, 3, 4] and not blob.HasField("num")
    np.testing.assert_array_equal(kio.blobproto_to_array(blob), arr.astype(np.float32))
    np.testing.assert_array_equal(kio.blobproto_to_array(blob, return_diff=True), -arr.astype(np.float32))
    assert len(kio.array_to_blobproto(arr).diff) == 0


def test_blobproto_legacy_shape():
    blob = caffe_pb2.BlobProto(num=1, channels=2, height=1, width=3, data=[1, 2, 3, 4, 5, 6])
    blob.shape.dim.extend([6])  # the legacy fields win, as in pycaffe
    assert kio.blobproto_to_array(blob).shape == (1, 2, 1, 3)


def test_blobprotovector_round_trip():
    arrays = [np.ones((2, 2)), np.arange(3.0), np.zeros((1, 2, 3, 4))]
    text = kio.arraylist_to_blobprotovector_str(arrays)
    vec = caffe_pb2.BlobProtoVector.FromString(text)
    assert [list(b.shape.dim) for b in vec.blobs] == [[2, 2], [3], [1, 2, 3, 4]]
    for a, b in zip(arrays, kio.blobprotovector_str_to_arraylist(text)):
        np.testing.assert_array_equal(a, b)


def test_datum_uint8_and_float():
    pixels = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    datum = kio.array_to_datum(pixels, 7)
    assert (datum.channels, datum.height, datum.width, datum.label) == (2, 3, 4, 7)
    assert datum.data == bytes(range(24)) and not len(datum.float_data)
    back = kio.datum_to_array(datum)
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, pixels)
    back[0, 0, 0] = 9  # a writable array of its own
    values = np.linspace(-1, 1, 6).reshape(1, 2, 3)
    datum = kio.array_to_datum(values)
    assert datum.data == b"" and not datum.HasField("label") and len(datum.float_data) == 6
    assert kio.datum_to_array(datum).dtype == np.float64
    np.testing.assert_allclose(kio.datum_to_array(datum), values, atol=1e-7)
    with pytest.raises(ValueError, match="Incorrect array shape.") as error:
        kio.array_to_datum(np.zeros((2, 2)))
    assert isinstance(error.value, KaffeError)


def test_import_kaffe_does_not_import_scikit_image():
    import subprocess
    code = "import sys, kaffe; kaffe.Classifier; kaffe.io.Transformer; print('skimage' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_missing_scikit_image_names_the_extra(monkeypatch, colors_png):
    monkeypatch.setitem(sys.modules, "skimage", None)
    with pytest.raises(ImportError, match=r'pip install "kaffe\[pycaffe\]"') as error:
        kio.load_image(colors_png[0])
    assert isinstance(error.value, KaffeError)
    with pytest.raises(KaffeError, match="scikit-image"):
        kio.resize_image(np.zeros((4, 4, 3)) + np.eye(4)[..., None], (2, 2))
