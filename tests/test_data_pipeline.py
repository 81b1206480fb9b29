"""The data pipeline end to end: convert_imageset / compute_image_mean / kaffe data cifar10, the Data layer on
LMDB and LevelDB, ImageData, HDF5Data / HDF5Output, transforms against hand-computed values, prefetch overlap,
and every bad input's message. The LeNet trainings from LevelDB and from PNG lists are marked slow."""
import gc
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time

import h5py
import lmdb
import numpy as np
import plyvel
import pytest
from PIL import Image

from conftest import MNIST_RAW, REPO, SHARED
from gradient_check import make_layer, opencl_available, setup_layer
from kaffe.engine import device
from kaffe.engine.errors import KaffeError
from kaffe.engine.io import read_binary_proto
from kaffe.engine.net import Net
from kaffe.layers import data as data_layers
from kaffe.layers.transform import DataTransformer, read_image, resize_bilinear
from kaffe.proto import caffe_pb2
from kaffe.tools import compute_image_mean, convert_imageset
from kaffe.tools import data as data_tool
from test_data_tools import closed_port_url, mirror_server  # noqa: F401  (a local HTTP server fixture)

TRAIN, TEST = caffe_pb2.TRAIN, caffe_pb2.TEST
CAFFE_TEST_DATA = SHARED / "zoo" / "bvlc" / "test_data"


@pytest.fixture(autouse=True)
def seeded():
    device.set_random_seed(1701)
    yield
    gc.collect()  # layers left over from a test release their threads and databases


# -- helpers -----------------------------------------------------------------------------------------------
def write_pngs(folder, images, labels, names=None):
    """H x W x RGB (or H x W gray) uint8 images as PNG files; returns the list file's lines."""
    lines = []
    for i, (image, label) in enumerate(zip(images, labels)):
        name = names[i] if names else f"img_{i}.png"
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)
        lines.append(f"{name} {label}")
    return lines


def write_list(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def rgb_images(n, height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, height, width, 3), dtype=np.uint8)


def png_gray(rgb):
    """What OpenCV's IMREAD_GRAYSCALE gives for an RGB PNG: libpng's fixed-point luma, truncated."""
    rgb = rgb.astype(np.int64)
    return ((rgb[..., 0] * 9797 + rgb[..., 1] * 19234 + rgb[..., 2] * 3737) >> 15).astype(np.uint8)


def bgr_chw(rgb):
    """What Caffe's OpenCV loading gives for RGB H x W x 3 pixels: BGR, channels first."""
    return rgb[..., ::-1].transpose(0, 3, 1, 2)


def convert(*args):
    return convert_imageset.main([str(a) for a in args])


def layer_from(text, phase=TRAIN, num_top=2):
    layer = make_layer(text, phase)
    return layer, setup_layer(layer, [], num_top)


def data_layer(source, batch_size, backend="LMDB", phase=TRAIN, transform="", extra="", num_top=2):
    return layer_from(f'name: "data" type: "Data" transform_param {{ {transform} }} data_param {{ '
                      f'source: "{source}" batch_size: {batch_size} backend: {backend} {extra} }}', phase, num_top)


def batches(layer, top, count):
    out = []
    for _ in range(count):
        layer.forward([], top)
        out.append(tuple(t.data.copy() for t in top))
    return out


def db_records(path, backend):
    """(key, Datum) of every record, read without kaffe."""
    if backend == "lmdb":
        env = lmdb.open(str(path), readonly=True, lock=False)
        with env.begin() as txn:
            items = list(txn.cursor())
        env.close()
    else:
        db = plyvel.DB(str(path))
        items = list(db.iterator())
        db.close()
    return [(key, caffe_pb2.Datum.FromString(value)) for key, value in items]


@pytest.fixture
def image_set(tmp_path):
    """Seven known RGB PNGs (one name with spaces, in a sub folder) and their list file."""
    images = rgb_images(7, 5, 6)
    labels = [3, 1, 4, 1, 5, 9, 2]
    names = [f"img_{i}.png" for i in range(7)]
    names[2] = "sub dir/with space 2.png"
    root = tmp_path / "images"
    lines = write_pngs(root, images, labels, names)
    return str(root) + "/", write_list(tmp_path / "list.txt", lines), images, np.array(labels), names


# -- convert_imageset -> Data layer ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["lmdb", "leveldb"])
@pytest.mark.parametrize("flags", [[], ["--encoded", "--encode_type", "png"]])
def test_convert_imageset_then_data_layer_gives_the_same_bgr_pixels(tmp_path, image_set, backend, flags):
    root, list_file, images, labels, names = image_set
    db = tmp_path / "db"
    assert convert("--backend", backend, *flags, root, list_file, db) == 0
    records = db_records(db, backend)
    assert [key for key, _ in records] == [b"%08d_%s" % (i, n.encode()) for i, n in enumerate(names)]
    first = records[0][1]
    assert first.encoded == bool(flags) and first.label == 3
    if not flags:
        assert (first.channels, first.height, first.width) == (3, 5, 6)
    layer, top = data_layer(db, 7, backend.upper(), TEST)
    data, label = batches(layer, top, 1)[0]
    np.testing.assert_array_equal(data, bgr_chw(images))
    np.testing.assert_array_equal(label, labels)
    layer.close()


def test_encoded_png_keeps_the_files_own_bytes(tmp_path, image_set):
    root, list_file, _, _, names = image_set
    convert("--encoded", root, list_file, tmp_path / "db")  # the type is guessed from the extension
    for (_, datum), name in zip(db_records(tmp_path / "db", "lmdb"), names):
        assert datum.encoded and datum.data == (tmp_path / "images" / name).read_bytes()


def test_encoded_jpg_decodes_close_to_the_original(tmp_path):
    smooth = np.repeat(np.repeat(np.linspace(0, 255, 16, dtype=np.uint8)[None, :, None], 16, 0), 3, 2)
    smooth[..., 1] = 100
    list_file = write_list(tmp_path / "l.txt", write_pngs(tmp_path, smooth[None], [0]))
    convert("--encode_type", "jpg", str(tmp_path) + "/", list_file, tmp_path / "db")  # implies --encoded
    (_, datum), = db_records(tmp_path / "db", "lmdb")
    assert datum.encoded and datum.data[:2] == b"\xff\xd8"  # a JPEG file
    layer, top = data_layer(tmp_path / "db", 1, phase=TEST)
    assert np.abs(batches(layer, top, 1)[0][0] - bgr_chw(smooth[None])).max() <= 8
    layer.close()


def test_leveldb_and_lmdb_give_identical_batches(tmp_path, image_set):
    root, list_file, *_ = image_set
    convert("--backend=lmdb", root, list_file, tmp_path / "a")
    convert("-backend", "leveldb", root, list_file, tmp_path / "b")  # gflags spellings work too
    runs = []
    for path, backend in ((tmp_path / "a", "LMDB"), (tmp_path / "b", "LEVELDB")):
        device.set_random_seed(5)
        layer, top = data_layer(path, 3, backend, TRAIN, "crop_size: 4 mirror: true scale: 0.5", "rand_skip: 5")
        runs.append(batches(layer, top, 6))
        layer.close()
    for (data_a, label_a), (data_b, label_b) in zip(*runs):
        np.testing.assert_array_equal(data_a, data_b)
        np.testing.assert_array_equal(label_a, label_b)


def test_gray_resize_shuffle_and_check_size(tmp_path, image_set):
    root, list_file, images, labels, _ = image_set
    convert("--gray", "--resize_height", 3, "--resize_width", 9, "--shuffle", "--check_size", root, list_file,
            tmp_path / "db")
    records = db_records(tmp_path / "db", "lmdb")
    order = [int(key[:8]) for key, _ in records]
    assert order == list(range(7))
    names = [key[9:].decode() for key, _ in records]
    assert sorted(names) == sorted(line.rsplit(" ", 1)[0] for line in open(list_file).read().splitlines())
    for (key, datum), name in zip(records, names):
        index = int(re.search(r"(\d+)\.png", name).group(1))
        gray = png_gray(images[index])[None]
        assert (datum.channels, datum.height, datum.width) == (1, 3, 9) and datum.label == labels[index]
        expected = bilinear_reference(gray.astype(np.float64), 3, 9)
        assert np.abs(np.frombuffer(datum.data, np.uint8).reshape(1, 3, 9) - expected).max() <= 1


def bilinear_reference(image, height, width):
    """OpenCV's INTER_LINEAR in float64: half-pixel centres, edges clamped (slow loops, test only)."""
    channels, src_h, src_w = image.shape
    out = np.zeros((channels, height, width))
    for y in range(height):
        for x in range(width):
            sy = min(max((y + 0.5) * src_h / height - 0.5, 0), src_h - 1)
            sx = min(max((x + 0.5) * src_w / width - 0.5, 0), src_w - 1)
            y0, x0 = int(sy), int(sx)
            y1, x1 = min(y0 + 1, src_h - 1), min(x0 + 1, src_w - 1)
            fy, fx = sy - y0, sx - x0
            out[:, y, x] = ((1 - fy) * ((1 - fx) * image[:, y0, x0] + fx * image[:, y0, x1])
                            + fy * ((1 - fx) * image[:, y1, x0] + fx * image[:, y1, x1]))
    return out


@pytest.mark.parametrize("size", [(2, 3), (3, 4), (7, 13), (10, 12), (16, 5)])
def test_resize_matches_opencv_bilinear(size):
    image = np.random.default_rng(size[0]).integers(0, 256, size=(3, 7, 8), dtype=np.uint8)
    out = resize_bilinear(image, *size)
    assert out.dtype == np.uint8 and out.shape == (3,) + size
    assert np.abs(out - bilinear_reference(image.astype(np.float64), *size)).max() <= 1
    half = resize_bilinear(image[:, :6], 3, 4)  # exact halving: OpenCV averages 2 x 2 blocks, rounding
    blocks = image[:, :6, :8].reshape(3, 3, 2, 4, 2).astype(np.int64).sum(axis=(2, 4))
    np.testing.assert_array_equal(half, (blocks + 2) // 4)


@pytest.mark.parametrize("fmt", ["png", "jpg", "bmp", "palette.png", "rgba.png"])
def test_images_match_opencv_bit_for_bit(tmp_path, fmt):
    """What Caffe gets from OpenCV (imread colour/gray, resize INTER_LINEAR), where OpenCV is installed."""
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(12)
    for trial in range(15):
        height, width, new_height, new_width = (int(v) for v in rng.integers(1, 50, 4))
        image = Image.fromarray(rng.integers(0, 256, size=(height, width, 4), dtype=np.uint8))
        image = image.convert("P") if fmt.startswith("palette") else image if fmt.startswith("rgba") else \
            image.convert("RGB")
        path = str(tmp_path / f"{trial}.{fmt}")
        image.save(path)
        for is_color in (True, False):
            theirs = cv2.imread(path, cv2.IMREAD_COLOR if is_color else cv2.IMREAD_GRAYSCALE)
            np.testing.assert_array_equal(read_image(path, 0, 0, is_color),
                                          theirs.transpose(2, 0, 1) if is_color else theirs[None])
            theirs = cv2.resize(theirs, (new_width, new_height), interpolation=cv2.INTER_LINEAR)
            np.testing.assert_array_equal(read_image(path, new_height, new_width, is_color),
                                          theirs.transpose(2, 0, 1) if is_color else theirs[None])
            decoded = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_UNCHANGED)
            native = DataTransformer(caffe_pb2.TransformationParameter(), TEST, "t").decode(open(path, "rb").read())
            np.testing.assert_array_equal(native, decoded[None] if decoded.ndim == 2 else decoded.transpose(2, 0, 1))


def test_convert_imageset_errors(tmp_path, image_set, capsys):
    root, list_file, images, _, names = image_set
    bad = tmp_path / "bad.txt"
    write_list(bad, ["img_0.png 1", "", "missing.png 2"])
    with pytest.raises(KaffeError, match=r"could not read image .*images/missing.png \(.*bad.txt:3\)"):
        convert(root, bad, tmp_path / "db1")
    assert not (tmp_path / "db1").exists() and not (tmp_path / "db1.partial").exists()

    (tmp_path / "images" / "notes.png").write_text("not an image")
    write_list(bad, ["img_0.png 1", "notes.png 2"])
    with pytest.raises(KaffeError, match=r"could not read image .*notes.png \(.*bad.txt:2\).*not an image"):
        convert(root, bad, tmp_path / "db2")

    Image.fromarray(images[0][:4]).save(tmp_path / "images" / "small.png")
    write_list(bad, ["img_0.png 1", "small.png 2"])
    with pytest.raises(KaffeError, match=r"small.png \(.*bad.txt:2\) is 3 x 4 x 6 but the first image is 3 x 5 x 6 "
                                         r"\(--check_size\)"):
        convert("--check_size", root, bad, tmp_path / "db3")
    convert(root, bad, tmp_path / "db4")  # without --check_size the sizes may differ, as in Caffe...
    layer, top = data_layer(tmp_path / "db4", 2, phase=TEST)
    with pytest.raises(KaffeError, match=r"key b'00000001_small.png' is 3 x 4 x 6 but .*key b'00000000_img_0.png'.*"
                                         r"first item of its batch, is 3 x 5 x 6.*resize"):
        layer.forward([], top)  # ... but a batch of them is refused, naming both records
    layer.close()

    write_list(bad, ["img_0.png"])
    with pytest.raises(KaffeError, match=r"bad.txt:1: expected `<image path> <integer label>`"):
        convert(root, bad, tmp_path / "db5")
    with pytest.raises(KaffeError, match=r"db4 already exists"):
        convert(root, list_file, tmp_path / "db4")
    with pytest.raises(KaffeError, match=r"cannot read the image list .*nolist.txt"):
        convert(root, tmp_path / "nolist.txt", tmp_path / "db6")


def test_convert_imageset_help_and_program(tmp_path, image_set):
    with pytest.raises(SystemExit) as exit_info:
        convert_imageset.main(["--help"])
    assert exit_info.value.code == 0
    with pytest.raises(SystemExit):
        convert_imageset.main(["only_one_arg"])
    root, list_file, *_ = image_set
    run = subprocess.run([sys.executable, "-m", "kaffe.tools.convert_imageset", root, list_file,
                          str(tmp_path / "db")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "Processed 7 files." in run.stderr and "7/7" in run.stderr
    run = subprocess.run([sys.executable, "-m", "kaffe.tools.convert_imageset", root, list_file,
                          str(tmp_path / "db")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith("convert_imageset: ") and "already exists" in run.stderr


# -- compute_image_mean --------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend, flags", [("lmdb", []), ("leveldb", ["--encoded"])])
def test_compute_image_mean_equals_the_numpy_mean(tmp_path, image_set, backend, flags, kaffe_log):
    root, list_file, images, _, _ = image_set
    convert("--backend", backend, *flags, root, list_file, tmp_path / "db")
    out = tmp_path / "mean.binaryproto"
    assert compute_image_mean.main(["--backend", backend, str(tmp_path / "db"), str(out)]) == 0
    proto = read_binary_proto(str(out), caffe_pb2.BlobProto())
    assert (proto.num, proto.channels, proto.height, proto.width) == (1, 3, 5, 6)
    expected = bgr_chw(images).mean(axis=0, dtype=np.float64)
    np.testing.assert_allclose(np.array(proto.data).reshape(3, 5, 6), expected, rtol=1e-6)
    per_channel = expected.reshape(3, -1).mean(axis=1)
    assert "Number of channels: 3" in kaffe_log
    for c in range(3):
        logged = next(m for m in kaffe_log if m.startswith(f"mean_value channel [{c}]"))
        assert float(logged.split(": ")[1]) == pytest.approx(per_channel[c], rel=1e-5)

    # the mean file is what a Data layer subtracts
    layer, top = data_layer(tmp_path / "db", 7, backend.upper(), TEST, f'mean_file: "{out}"')
    np.testing.assert_allclose(batches(layer, top, 1)[0][0], bgr_chw(images) - expected, atol=1e-4)
    layer.close()


def test_compute_image_mean_errors(tmp_path):
    data_tool.write_datums(str(tmp_path / "empty"), np.zeros((0, 1, 2, 2), np.uint8), [])
    with pytest.raises(KaffeError, match=r"empty.*is empty: there are no records"):
        compute_image_mean.main([str(tmp_path / "empty")])
    with data_tool.DatumWriter(tmp_path / "mixed") as db:
        db.put(b"a", caffe_pb2.Datum(channels=1, height=2, width=2, data=bytes(4)).SerializeToString())
        db.put(b"b", caffe_pb2.Datum(channels=1, height=2, width=3, data=bytes(6)).SerializeToString())
        db.put(b"c", b"\xff\xff garbage")
    with pytest.raises(KaffeError, match=r"key b'b' is 1 x 2 x 3 but the first record \(b'a'\) is 1 x 2 x 2"):
        compute_image_mean.main([str(tmp_path / "mixed")])
    with pytest.raises(KaffeError, match=r"compute_image_mean: data source .*nowhere does not exist"):
        compute_image_mean.main([str(tmp_path / "nowhere")])
    with pytest.raises(KaffeError, match=r"is an LMDB, not a LevelDB"):
        compute_image_mean.main(["--backend", "leveldb", str(tmp_path / "mixed")])


# -- the Data layer on LevelDB ----------------------------------------------------------------------------------
@pytest.fixture
def leveldb_set(tmp_path):
    images = np.random.default_rng(2).integers(0, 256, size=(9, 2, 4, 5), dtype=np.uint8)
    labels = np.arange(9) % 4
    path = str(tmp_path / "ldb")
    data_tool.write_datums(path, images, labels, backend="leveldb")
    return path, images, labels


def test_leveldb_reads_in_key_order_wraps_and_resumes(leveldb_set):
    path, images, labels = leveldb_set
    layer, top = data_layer(path, 4, "LEVELDB", TEST)
    for b, (data, label) in enumerate(batches(layer, top, 3)):
        index = (4 * b + np.arange(4)) % 9
        np.testing.assert_array_equal(data, images[index])
        np.testing.assert_array_equal(label, labels[index])
    layer.close()

    layer, top = data_layer(path, 4, "LEVELDB", TRAIN, "crop_size: 3 mirror: true")
    batches(layer, top, 2)
    state = json.loads(json.dumps(layer.get_resume_state()))
    expected = batches(layer, top, 4)
    layer.close()
    device.set_random_seed(77)
    fresh, fresh_top = data_layer(path, 4, "LEVELDB", TRAIN, "crop_size: 3 mirror: true")
    fresh.set_resume_state(state)
    for (data, label), (got, got_label) in zip(expected, batches(fresh, fresh_top, 4)):
        np.testing.assert_array_equal(got, data)
        np.testing.assert_array_equal(got_label, label)
    fresh.close()


def test_two_layers_share_one_leveldb(leveldb_set):
    path, images, _ = leveldb_set  # LevelDB allows one opening per process: the layers share it
    a, top_a = data_layer(path, 3, "LEVELDB", TEST)
    b, top_b = data_layer(path, 3, "LEVELDB", TEST)
    np.testing.assert_array_equal(batches(a, top_a, 1)[0][0], batches(b, top_b, 1)[0][0])
    a.close()
    np.testing.assert_array_equal(batches(b, top_b, 1)[0][0], images[3:6])
    b.close()


def test_leveldb_errors(tmp_path, leveldb_set):
    with pytest.raises(KaffeError, match=r"Data layer 'data': data source .*nowhere does not exist"):
        data_layer(tmp_path / "nowhere", 2, "LEVELDB")
    (tmp_path / "plain").mkdir()
    with pytest.raises(KaffeError, match=r"plain is not a LevelDB: it has no CURRENT file"):
        data_layer(tmp_path / "plain", 2, "LEVELDB")
    with pytest.raises(KaffeError, match=r"is a LevelDB, not an LMDB: set `backend: LEVELDB`"):
        data_layer(leveldb_set[0], 2, "LMDB")
    with data_tool.DatumWriter(tmp_path / "empty", "leveldb"):
        pass
    with pytest.raises(KaffeError, match=r"empty is empty \(a LevelDB with no records\)"):
        data_layer(tmp_path / "empty", 2, "LEVELDB")
    good = caffe_pb2.Datum(channels=1, height=1, width=2, data=b"ab").SerializeToString()
    for bad, message in ((b"\xff\xff\xff not a protobuf", r"the record with key b'1' is not a Datum"),
                         (caffe_pb2.Datum(channels=1, height=1, width=2, data=b"abc").SerializeToString(),
                          r"Datum b'1' declares 1 x 1 x 2 but holds 3 values"),
                         (caffe_pb2.Datum(data=b"not a png", encoded=True).SerializeToString(),
                          r"cannot decode the encoded image in Datum b'1'")):
        path = tmp_path / f"corrupt{len(message)}"
        with data_tool.DatumWriter(path, "leveldb") as db:
            db.put(b"0", good)
            db.put(b"1", bad)
        layer, top = data_layer(path, 2, "LEVELDB", TEST)
        with pytest.raises(KaffeError, match=message):
            layer.forward([], top)
        layer.close()


def test_data_layer_on_a_leveldb_written_by_caffe_layout(tmp_path):
    """Caffe's convert_mnist_data/convert_cifar_data write plain Datums; plyvel reads Caffe's LevelDBs as is."""
    db = plyvel.DB(str(tmp_path / "caffe_db"), create_if_missing=True)
    pixels = np.arange(2 * 3 * 2 * 2, dtype=np.uint8).reshape(2, 3, 2, 2)
    for i in range(2):
        db.put(b"%05d" % i, caffe_pb2.Datum(channels=3, height=2, width=2, data=pixels[i].tobytes(),
                                            label=i).SerializeToString())
    db.close()
    layer, top = data_layer(tmp_path / "caffe_db", 2, "LEVELDB", TEST)
    np.testing.assert_array_equal(batches(layer, top, 1)[0][0], pixels)
    layer.close()


# -- transforms, against hand-computed values ----------------------------------------------------------------
def transform(text, phase, batch, seed=0):
    param = caffe_pb2.TransformationParameter()
    from google.protobuf import text_format
    text_format.Parse(text, param)
    return DataTransformer(param, phase, "test").transform(np.asarray(batch, dtype=np.uint8),
                                                           np.random.default_rng(seed))


def test_transform_hand_computed_values(tmp_path):
    item = np.arange(1, 17, dtype=np.uint8).reshape(1, 1, 4, 4)  # rows 1..4, 5..8, 9..12, 13..16
    # TEST crop: centre (4 - 2) / 2 = 1, then (x - mean) * scale
    np.testing.assert_array_equal(transform("crop_size: 2 mean_value: 1 scale: 2", TEST, item),
                                  [[[[10, 12], [18, 20]]]])
    np.testing.assert_array_equal(transform("crop_size: 3", TEST, item), [[[[1, 2, 3], [5, 6, 7], [9, 10, 11]]]])
    # mirror flips the columns of the crop
    flipped = {tuple(transform("crop_size: 2 mirror: true", TEST, item, seed).ravel()) for seed in range(20)}
    assert flipped == {(6, 7, 10, 11), (7, 6, 11, 10)}
    # TRAIN crops: any window of the item, never past its edge
    windows = {tuple(transform("crop_size: 3", TRAIN, item, seed).ravel()) for seed in range(40)}
    assert windows == {tuple(item[0, 0, h:h + 3, w:w + 3].ravel()) for h in (0, 1) for w in (0, 1)}
    # per-channel mean values, then scale
    two = np.stack([np.full((2, 2), 10), np.full((2, 2), 20)])[None]
    np.testing.assert_allclose(transform("mean_value: 4 mean_value: 8 scale: 0.5", TEST, two),
                               [[np.full((2, 2), 3.0), np.full((2, 2), 6.0)]])
    # a mean file is cropped (and mirrored) with the item: it is read at the same source pixels
    mean = np.arange(16, dtype=np.float32).reshape(1, 4, 4) / 4
    proto = caffe_pb2.BlobProto(num=1, channels=1, height=4, width=4)
    proto.data.extend(mean.ravel().tolist())
    (tmp_path / "m.binaryproto").write_bytes(proto.SerializeToString())
    out = transform(f'crop_size: 2 mean_file: "{tmp_path / "m.binaryproto"}" scale: 4', TEST, item)
    np.testing.assert_allclose(out, [[[[(6 - 1.25) * 4, (7 - 1.5) * 4], [(10 - 2.25) * 4, (11 - 2.5) * 4]]]])
    seen = set()
    for seed in range(20):
        out = transform(f'crop_size: 2 mirror: true mean_file: "{tmp_path / "m.binaryproto"}"', TEST, item, seed)
        seen.add(tuple(out.ravel()))
    assert seen == {(6 - 1.25, 7 - 1.5, 10 - 2.25, 11 - 2.5), (7 - 1.5, 6 - 1.25, 11 - 2.5, 10 - 2.25)}


def test_force_color_and_force_gray_decode_encoded_datums(tmp_path):
    rgb = rgb_images(2, 3, 4, seed=8)
    buffers = []
    for image in rgb:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        buffers.append(buffer.getvalue())
    with data_tool.DatumWriter(tmp_path / "db") as db:
        for i, payload in enumerate(buffers):
            db.put(b"%d" % i, caffe_pb2.Datum(data=payload, encoded=True).SerializeToString())
    layer, top = data_layer(tmp_path / "db", 2, phase=TEST, transform="force_gray: true")
    gray = png_gray(rgb)[:, None]
    np.testing.assert_array_equal(batches(layer, top, 1)[0][0], gray)
    layer.close()


# -- ImageData --------------------------------------------------------------------------------------------------
def image_data_layer(list_file, batch_size, params="", transform="", phase=TRAIN, root=""):
    return layer_from(f'name: "images" type: "ImageData" transform_param {{ {transform} }} image_data_param {{ '
                      f'source: "{list_file}" batch_size: {batch_size} root_folder: "{root}" {params} }}', phase)


def test_image_data_reads_the_list_in_order_and_wraps(image_set):
    root, list_file, images, labels, _ = image_set
    layer, top = image_data_layer(list_file, 3, root=root, phase=TEST)
    assert top[0].shape == (3, 3, 5, 6) and top[1].shape == (3,)
    for b, (data, label) in enumerate(batches(layer, top, 4)):  # 12 items over 7 images: wraps around
        index = (3 * b + np.arange(3)) % 7
        np.testing.assert_array_equal(data, bgr_chw(images[index]))
        np.testing.assert_array_equal(label, labels[index])
    layer.close()


def test_image_data_gray_resize_and_transform(image_set):
    root, list_file, images, _, _ = image_set
    layer, top = image_data_layer(list_file, 7, "is_color: false new_height: 4 new_width: 3", "scale: 0.5", TEST,
                                  root)
    assert top[0].shape == (7, 1, 4, 3)
    data = batches(layer, top, 1)[0][0]
    for out, image in zip(data, images):
        gray = png_gray(image)[None].astype(np.float64)
        assert np.abs(out - 0.5 * bilinear_reference(gray, 4, 3)).max() <= 0.5
    layer.close()


def test_image_data_shuffles_every_epoch_with_the_solver_seed(tmp_path):
    count = 12
    images = np.zeros((count, 2, 2, 3), np.uint8)
    images[:, 0, 0, 0] = np.arange(count)  # each image carries its index in one red pixel
    list_file = write_list(tmp_path / "l.txt", write_pngs(tmp_path, images, range(100, 100 + count)))
    runs = []
    for _ in range(2):
        device.set_random_seed(31)
        layer, top = image_data_layer(list_file, 4, "shuffle: true", root=str(tmp_path) + "/")
        epochs = []
        for _ in range(3):  # 3 epochs of 3 batches
            order = []
            for data, label in batches(layer, top, 3):
                order += list(data[:, 2, 0, 0].astype(int))
                np.testing.assert_array_equal(label - 100, data[:, 2, 0, 0])
            epochs.append(order)
        runs.append(epochs)
        layer.close()
    assert runs[0] == runs[1]  # the same seed gives the same orders
    for order in runs[0]:
        assert sorted(order) == list(range(count))
    assert runs[0][0] != list(range(count)) and len({tuple(o) for o in runs[0]}) == 3  # a new order each epoch
    device.set_random_seed(32)
    layer, top = image_data_layer(list_file, 4, "shuffle: true", root=str(tmp_path) + "/")
    assert list(batches(layer, top, 1)[0][0][:, 2, 0, 0]) != runs[0][0][:4]
    layer.close()


def test_image_data_rand_skip_and_exact_resume(tmp_path):
    images = rgb_images(10, 4, 4, seed=3)
    list_file = write_list(tmp_path / "l.txt", write_pngs(tmp_path, images, range(10)))
    starts = set()
    for seed in range(8):
        device.set_random_seed(seed)
        layer, top = image_data_layer(list_file, 2, "rand_skip: 5", root=str(tmp_path) + "/", phase=TEST)
        label = batches(layer, top, 1)[0][1]
        assert 0 <= label[0] < 5 and label[1] == label[0] + 1
        starts.add(label[0])
        layer.close()
    assert len(starts) > 1

    params, transform = "shuffle: true", "crop_size: 3 mirror: true"
    layer, top = image_data_layer(list_file, 3, params, transform, root=str(tmp_path) + "/")
    batches(layer, top, 4)  # past the first epoch
    time.sleep(0.1)
    state = json.loads(json.dumps(layer.get_resume_state()))
    expected = batches(layer, top, 6)
    layer.close()
    device.set_random_seed(999)
    fresh, fresh_top = image_data_layer(list_file, 3, params, transform, root=str(tmp_path) + "/")
    batches(fresh, fresh_top, 1)
    fresh.set_resume_state(state)
    for (data, label), (got, got_label) in zip(expected, batches(fresh, fresh_top, 6)):
        np.testing.assert_array_equal(got, data)
        np.testing.assert_array_equal(got_label, label)
    with pytest.raises(KaffeError, match="bad resume state"):
        fresh.set_resume_state({"index": 99, "order": None, "rng": state["rng"]})
    fresh.close()


def test_image_data_errors(tmp_path, image_set):
    root, list_file, images, _, _ = image_set
    bad = tmp_path / "bad.txt"
    write_list(bad, ["img_0.png 0", "img_1.png 1", "gone.png 2"])
    layer, top = image_data_layer(bad, 3, root=root)
    with pytest.raises(KaffeError, match=r"ImageData layer 'images': could not load image .*images/gone.png "
                                         r"\(.*bad.txt:3\)"):
        layer.forward([], top)
    layer.close()
    with pytest.raises(KaffeError, match=r"could not load image .*gone.png"):
        write_list(bad, ["gone.png 2"])
        image_data_layer(bad, 1, root=root)
    Image.fromarray(images[0][:, :4]).save(tmp_path / "images" / "narrow.png")
    write_list(bad, ["img_0.png 0", "narrow.png 1"])
    layer, top = image_data_layer(bad, 2, root=root)
    with pytest.raises(KaffeError, match=r"image .*narrow.png \(.*bad.txt:2\) is 3 x 5 x 4 but image .*img_0.png "
                                         r"\(.*bad.txt:1\), the first item of its batch, is 3 x 5 x 6"):
        layer.forward([], top)
    layer.close()
    layer, top = image_data_layer(bad, 2, root=root, transform="crop_size: 4")  # a crop makes them one size
    assert batches(layer, top, 1)[0][0].shape == (2, 3, 4, 4)
    layer.close()
    with pytest.raises(KaffeError, match=r"new_height and new_width must be set together"):
        image_data_layer(list_file, 2, "new_height: 3", root=root)
    write_list(bad, ["img_0.png zero"])
    with pytest.raises(KaffeError, match=r"bad.txt:1: expected `<image path> <integer label>`, got 'img_0.png zero'"):
        image_data_layer(bad, 1, root=root)
    write_list(bad, ["img_0.png 0"])
    with pytest.raises(KaffeError, match=r"not enough images \(1\) to skip"):
        for seed in range(20):  # rand_skip 5 over 1 image: some seed draws a skip >= 1
            device.set_random_seed(seed)
            image_data_layer(bad, 1, "rand_skip: 5", root=root)[0].close()
    with pytest.raises(KaffeError, match=r"cannot read the image list .*absent.txt"):
        image_data_layer(tmp_path / "absent.txt", 1)


# -- HDF5Data / HDF5Output ------------------------------------------------------------------------------------
def hdf5_layer(list_file, batch_size, tops=("data", "label"), extra="", phase=TRAIN):
    top_text = " ".join(f'top: "{t}"' for t in tops)
    return layer_from(f'name: "h5" type: "HDF5Data" {top_text} hdf5_data_param {{ source: "{list_file}" '
                      f'batch_size: {batch_size} {extra} }}', phase, len(tops))


def test_caffe_sample_hdf5_files(tmp_path):
    """Caffe's own test files and its test's expectations (test_hdf5data_layer.cpp)."""
    if not CAFFE_TEST_DATA.exists():
        pytest.skip(f"Caffe's test data not found at {CAFFE_TEST_DATA}")
    # the list names Caffe-relative paths: point them at the shared copies
    lines = (CAFFE_TEST_DATA / "sample_data_list.txt").read_text().split()
    list_file = write_list(tmp_path / "list.txt", [str(CAFFE_TEST_DATA / os.path.basename(p)) for p in lines])
    layer, top = hdf5_layer(list_file, 5, ("data", "label", "label2"))
    assert top[0].shape == (5, 8, 6, 5) and top[1].shape == (5, 1) and top[2].shape == (5, 1)
    size = 8 * 6 * 5
    for it, (data, label, label2) in enumerate(batches(layer, top, 12)):
        label_offset = 1 + (0 if it % 2 == 0 else 5)  # the two halves of a file, then the next file
        file_offset = 0 if it % 4 < 2 else 2400
        data_offset = 0 if it % 2 == 0 else 5 * size
        np.testing.assert_array_equal(label.ravel(), label_offset + np.arange(5))
        np.testing.assert_array_equal(label2.ravel(), label_offset + 1 + np.arange(5))
        np.testing.assert_array_equal(data.ravel(), file_offset + data_offset + np.arange(5 * size))
    layer.close()

    solver_list = write_list(tmp_path / "solver_list.txt", [str(CAFFE_TEST_DATA / "solver_data.h5")])
    layer, top = hdf5_layer(solver_list, 4, ("data", "targets"))
    with h5py.File(CAFFE_TEST_DATA / "solver_data.h5", "r") as f:
        expected = f["data"][()], f["targets"][()]
    (data, targets), (data2, targets2) = batches(layer, top, 2)
    np.testing.assert_array_equal(np.concatenate([data, data2]), expected[0])
    np.testing.assert_array_equal(np.concatenate([targets, targets2]), expected[1])
    layer.close()


def write_h5(path, **datasets):
    with h5py.File(path, "w") as f:
        for name, values in datasets.items():
            f.create_dataset(name, data=values)
    return str(path)


def test_hdf5_output_then_hdf5_data_round_trip(tmp_path):
    out = tmp_path / "out.h5"
    sink = make_layer(f'name: "sink" type: "HDF5Output" bottom: "data" bottom: "label" '
                      f'hdf5_output_param {{ file_name: "{out}" }}')
    data = np.random.default_rng(4).standard_normal((6, 2, 3, 4)).astype(np.float32)
    labels = np.arange(6, dtype=np.float32)
    from kaffe.engine.blob import Blob
    bottoms = [Blob(3, 2, 3, 4), Blob(3)]
    sink.setup(bottoms, [])
    for half in (slice(0, 3), slice(3, 6)):  # every forward appends its rows
        bottoms[0].data[...] = data[half]
        bottoms[1].data[...] = labels[half]
        sink.forward(bottoms, [])
    with h5py.File(out, "r") as f:
        assert f["data"].dtype == np.float32 and f["data"].shape == (6, 2, 3, 4)
        assert f["label"].shape == (6, 1, 1, 1)  # N x C x H x W, as Caffe saves blobs
        np.testing.assert_array_equal(f["data"][()], data)

    layer, top = hdf5_layer(write_list(tmp_path / "l.txt", [str(out)]), 4)
    (got, got_label), (got2, got_label2) = batches(layer, top, 2)
    np.testing.assert_array_equal(np.concatenate([got, got2])[:6], data)
    np.testing.assert_array_equal(np.concatenate([got_label, got_label2]).ravel()[:6], labels)
    np.testing.assert_array_equal(got2[2:], data[:2])  # wraps around to the first row
    layer.close()

    sink = make_layer(f'type: "HDF5Output" hdf5_output_param {{ file_name: "{out}" }}')
    sink.setup(bottoms, [])  # setup empties the file again
    with h5py.File(out, "r") as f:
        assert list(f.keys()) == []
    with pytest.raises(KaffeError, match=r"same number of rows"):
        sink.forward([Blob(3, 2), Blob(2)], [])
    with pytest.raises(KaffeError, match=r"failed to create HDF5 file"):
        make_layer(f'type: "HDF5Output" hdf5_output_param {{ file_name: "{tmp_path}/no/dir/x.h5" }}').setup(
            bottoms, [])


def test_hdf5_data_shuffle_any_tops_and_exact_resume(tmp_path):
    files = []
    for k, rows in enumerate((5, 3, 4)):
        ids = 100 * k + np.arange(rows)
        files.append(write_h5(tmp_path / f"f{k}.h5", id=ids.astype(np.float64), twice=np.stack([ids, 2 * ids], 1),
                              cube=np.broadcast_to(ids[:, None, None, None], (rows, 1, 2, 2)).astype(np.int16)))
    list_file = write_list(tmp_path / "l.txt", files)
    layer, top = hdf5_layer(list_file, 4, ("id", "twice", "cube"), "shuffle: true")
    assert [t.shape for t in top] == [(4,), (4, 2), (4, 1, 2, 2)]
    ids = []
    for data in batches(layer, top, 9):  # 36 rows = 3 epochs of 12
        np.testing.assert_array_equal(data[1], np.stack([data[0], 2 * data[0]], 1))
        np.testing.assert_array_equal(data[2][:, 0, 1, 1], data[0])
        ids += list(data[0].astype(int))
    epochs = [ids[i:i + 12] for i in (0, 12, 24)]
    everything = sorted(100 * k + r for k, rows in enumerate((5, 3, 4)) for r in range(rows))
    for epoch in epochs:
        assert sorted(epoch) == everything
        files_in_order = [i // 100 for i in epoch]
        assert sum(a != b for a, b in zip(files_in_order, files_in_order[1:])) == 2  # one file after the other
    assert len({tuple(e) for e in epochs}) == 3  # rows (and files) are reshuffled
    state = json.loads(json.dumps(layer.get_resume_state()))
    expected = batches(layer, top, 5)
    layer.close()
    device.set_random_seed(3)
    fresh, fresh_top = hdf5_layer(list_file, 4, ("id", "twice", "cube"), "shuffle: true")
    fresh.set_resume_state(state)
    for want, got in zip(expected, batches(fresh, fresh_top, 5)):
        for a, b in zip(want, got):
            np.testing.assert_array_equal(a, b)
    fresh.close()

    single = write_list(tmp_path / "one.txt", [files[0]])  # one file: its rows are reshuffled every epoch
    layer, top = hdf5_layer(single, 5, ("id",), "shuffle: true")
    orders = [tuple(b[0]) for b in batches(layer, top, 4)]
    assert all(sorted(o) == list(range(5)) for o in orders) and len(set(orders)) > 1
    layer.close()


def test_hdf5_data_errors(tmp_path):
    good = write_h5(tmp_path / "good.h5", data=np.zeros((3, 2), np.float32), label=np.zeros(3, np.float32))
    cases = [
        ([good, str(tmp_path / "missing.h5")], ("data", "label"), r"HDF5 file .*missing.h5 \(listed in .*\) does "
                                                                    r"not exist"),
        ([], ("data",), r"must have at least 1 HDF5 filename listed in"),
        ([good], ("data", "nope"), r"good.h5 has no dataset 'nope' \(the datasets are named after the tops"),
        ([write_h5(tmp_path / "rows.h5", data=np.zeros((3, 2)), label=np.zeros(2))], ("data", "label"),
         r"rows.h5 have different numbers of rows: data 3, label 2"),
        ([write_h5(tmp_path / "text.h5", data=np.array([b"a", b"b"]))], ("data",), r"must be a numeric array"),
    ]
    for files, tops, message in cases:
        with pytest.raises(KaffeError, match=message):
            hdf5_layer(write_list(tmp_path / "l.txt", files), 2, tops)
    other = write_h5(tmp_path / "other.h5", data=np.zeros((3, 5), np.float32), label=np.zeros(3, np.float32))
    layer, top = hdf5_layer(write_list(tmp_path / "l.txt", [good, other]), 2)
    with pytest.raises(KaffeError, match=r"the rows of .*other.h5 are \[\(5,\), \(\)\] but those of the first file"):
        batches(layer, top, 3)
    layer.close()
    with pytest.raises(KaffeError, match=r"HDF5Data does not transform data"):
        layer_from(f'type: "HDF5Data" top: "data" transform_param {{ scale: 2 }} hdf5_data_param {{ source: '
                   f'"{tmp_path / "l.txt"}" batch_size: 1 }}', TRAIN, 1)
    with pytest.raises(KaffeError, match=r"failed to open source file .*nothere.txt"):
        hdf5_layer(str(tmp_path / "nothere.txt"), 2)


# -- prefetch overlap ---------------------------------------------------------------------------------------------
class SlowTransformer(DataTransformer):
    """A data source made slow on purpose: each batch's transform takes DELAY seconds (test only)."""
    DELAY = 0.08
    spent = []

    def transform(self, batch, rng=None):
        start = time.perf_counter()
        time.sleep(self.DELAY)
        out = super().transform(batch, rng)
        SlowTransformer.spent.append(time.perf_counter() - start)
        return out


def test_prefetch_overlaps_data_and_compute(tmp_path, monkeypatch):
    images = np.zeros((40, 1, 4, 4), np.uint8)
    data_tool.write_datums(str(tmp_path / "db"), images, np.zeros(40))
    monkeypatch.setattr(data_layers, "DataTransformer", SlowTransformer)
    SlowTransformer.spent = []
    layer, top = data_layer(tmp_path / "db", 4, phase=TEST, extra="prefetch: 3")
    compute = SlowTransformer.DELAY
    iterations = 12
    start = time.perf_counter()
    for _ in range(iterations):
        layer.forward([], top)
        time.sleep(compute)  # the net's forward/backward
    total = time.perf_counter() - start
    layer.close()
    data_time = sum(SlowTransformer.spent[:iterations])
    serial = data_time + iterations * compute
    print(f"prefetch: {iterations} iterations in {total:.2f} s; data {data_time:.2f} s, compute "
          f"{iterations * compute:.2f} s (serial would be {serial:.2f} s)")
    assert total < 0.8 * serial
    assert total >= iterations * compute  # sanity: the compute itself is not skipped


# -- kaffe data cifar10 -------------------------------------------------------------------------------------------
def cifar_batch(count, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, count, dtype=np.uint8)
    pixels = rng.integers(0, 256, (count, 3, 32, 32), dtype=np.uint8)
    payload = np.concatenate([labels[:, None], pixels.reshape(count, -1)], axis=1).tobytes()
    return payload, pixels, labels


@pytest.fixture
def cifar_folder(tmp_path):
    folder = tmp_path / "cifar-src" / data_tool.CIFAR10_FOLDER
    folder.mkdir(parents=True)
    expected = {}
    for i, name in enumerate(data_tool.CIFAR10_TRAIN + data_tool.CIFAR10_TEST):
        payload, pixels, labels = cifar_batch(3, i)
        (folder / name).write_bytes(payload)
        expected[name] = (pixels, labels)
    return folder, expected


@pytest.mark.parametrize("backend", ["lmdb", "leveldb"])
def test_cifar10_from_folder(tmp_path, cifar_folder, backend):
    folder, expected = cifar_folder
    out = tmp_path / "out"
    assert data_tool.main(["cifar10", "--from", str(folder.parent), "--out", str(out), "--backend", backend]) == 0
    train = db_records(out / f"cifar10_train_{backend}", backend)
    test = db_records(out / f"cifar10_test_{backend}", backend)
    assert [key for key, _ in train] == [b"%05d" % i for i in range(15)]
    assert [key for key, _ in test] == [b"00000", b"00001", b"00002"]
    pixels = np.concatenate([expected[n][0] for n in data_tool.CIFAR10_TRAIN])
    labels = np.concatenate([expected[n][1] for n in data_tool.CIFAR10_TRAIN])
    for (_, datum), image, label in zip(train, pixels, labels):
        assert (datum.channels, datum.height, datum.width, datum.label) == (3, 32, 32, label)
        assert datum.data == image.tobytes()  # the file's R, G, B planes as they are, as Caffe's converter
    np.testing.assert_array_equal(np.frombuffer(test[2][1].data, np.uint8).reshape(3, 32, 32),
                                  expected["test_batch.bin"][0][2])
    with pytest.raises(KaffeError, match=f"cifar10_train_{backend} already exists"):
        data_tool.main(["cifar10", "--from", str(folder), "--out", str(out), "--backend", backend])


def test_cifar10_bad_inputs(tmp_path, cifar_folder):
    folder, _ = cifar_folder
    (folder / "data_batch_3.bin").write_bytes(b"\x00" * 3072)
    with pytest.raises(KaffeError, match=r"data_batch_3.bin is not a binary CIFAR-10 batch: its size \(3072 bytes"):
        data_tool.main(["cifar10", "--from", str(folder), "--out", str(tmp_path / "o1")])
    payload = bytearray(cifar_batch(2, 0)[0])
    payload[3073] = 12
    (folder / "data_batch_3.bin").write_bytes(bytes(payload))
    with pytest.raises(KaffeError, match=r"data_batch_3.bin: record 1 has label 12"):
        data_tool.main(["cifar10", "--from", str(folder), "--out", str(tmp_path / "o2")])
    os.unlink(folder / "test_batch.bin")
    with pytest.raises(KaffeError, match=r"no complete binary CIFAR-10 set \(missing test_batch.bin\)"):
        data_tool.main(["cifar10", "--from", str(folder), "--out", str(tmp_path / "o3")])
    assert not (tmp_path / "o1" / "cifar10_train_lmdb").exists()


def make_tarball(folder):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(folder, arcname=data_tool.CIFAR10_FOLDER)
    return buffer.getvalue()


def test_cifar10_download_checks_the_md5_and_offline_points_to_from(tmp_path, cifar_folder, mirror_server,
                                                                   monkeypatch):
    folder, _ = cifar_folder
    archive = make_tarball(folder)
    base, site = mirror_server
    (site / data_tool.CIFAR10_ARCHIVE).write_bytes(archive)
    url = base + data_tool.CIFAR10_ARCHIVE
    with pytest.raises(KaffeError, match=r"not the canonical CIFAR-10 binary tarball: its MD5 is"):
        data_tool.convert_cifar10(str(tmp_path / "o1"), url=url, progress=None)
    assert not (tmp_path / "o1" / "raw" / data_tool.CIFAR10_ARCHIVE).exists()
    monkeypatch.setattr(data_tool, "CIFAR10_MD5", hashlib.md5(archive).hexdigest())
    train, test = data_tool.convert_cifar10(str(tmp_path / "o2"), url=url, progress=None)
    assert len(db_records(train, "lmdb")) == 15 and len(db_records(test, "lmdb")) == 3
    # the cached tarball is used offline, and --from accepts a folder holding the tarball
    shutil.copytree(tmp_path / "o2" / "raw", tmp_path / "o2b" / "raw")
    data_tool.convert_cifar10(str(tmp_path / "o2b"), url=closed_port_url(), progress=None, backend="leveldb")
    (tmp_path / "tarball").mkdir()
    (tmp_path / "tarball" / data_tool.CIFAR10_ARCHIVE).write_bytes(archive)
    data_tool.main(["cifar10", "--from", str(tmp_path / "tarball"), "--out", str(tmp_path / "o3")])
    assert len(db_records(tmp_path / "o3" / "cifar10_train_lmdb", "lmdb")) == 15
    with pytest.raises(KaffeError, match=r"could not download .*offline.*kaffe data cifar10 --from FOLDER"):
        data_tool.convert_cifar10(str(tmp_path / "o4"), url=closed_port_url(), progress=None)


# -- DummyData fillers, MemoryData via the net, GPU mode -------------------------------------------------------------
@pytest.mark.parametrize("filler", ["type: 'constant' value: 3", "type: 'uniform' min: -1 max: 2",
                                    "type: 'gaussian' mean: 1 std: 0.5", "type: 'gaussian' std: 1 sparse: 2",
                                    "type: 'positive_unitball'", "type: 'xavier'", "type: 'msra'",
                                    "type: 'xavier' variance_norm: AVERAGE", "type: 'bilinear'"])
def test_dummy_data_every_filler(filler):
    layer, top = layer_from(f"type: 'DummyData' dummy_data_param {{ shape {{ dim: 4 dim: 3 dim: 4 dim: 4 }} "
                            f"data_filler {{ {filler} }} }}", TRAIN, 1)
    layer.forward([], top)
    values = top[0].data
    assert values.shape == (4, 3, 4, 4) and np.isfinite(values).all()
    if "positive_unitball" in filler:
        np.testing.assert_allclose(values.reshape(4, -1).sum(axis=1), 1, rtol=1e-5)
    if "constant" in filler:
        assert (values == 3).all()
    if "uniform" in filler:
        assert values.min() >= -1 and values.max() <= 2


def test_memory_data_through_net_set_input_arrays():
    net_param = caffe_pb2.NetParameter()
    from google.protobuf import text_format
    text_format.Parse("layer { name: 'm' type: 'MemoryData' top: 'data' top: 'label' memory_data_param { "
                      "batch_size: 2 channels: 1 height: 2 width: 2 } }", net_param)
    net = Net(net_param, TEST)
    data = np.arange(16, dtype=np.float32).reshape(4, 1, 2, 2)
    net.set_input_arrays(data, np.array([5, 6, 7, 8], np.float32))
    for start in (0, 2, 0):
        net.forward()
        np.testing.assert_array_equal(net.blobs["data"].data, data[start:start + 2])
        np.testing.assert_array_equal(net.blobs["label"].data, [5 + start, 6 + start])


@pytest.mark.opencl
@pytest.mark.skipif(not opencl_available(), reason="no OpenCL platform (install pocl-opencl-icd)")
def test_data_layers_in_gpu_mode_produce_on_the_host_without_a_fallback_warning(tmp_path, image_set, kaffe_log):
    root, list_file, images, _, _ = image_set
    convert(root, list_file, tmp_path / "db")
    h5 = write_h5(tmp_path / "d.h5", data=np.ones((4, 3), np.float32), label=np.zeros(4, np.float32))
    device.set_mode_gpu()
    try:
        layers = [data_layer(tmp_path / "db", 2, phase=TEST), image_data_layer(list_file, 2, root=root, phase=TEST),
                  hdf5_layer(write_list(tmp_path / "h.txt", [h5]), 2)]
        for layer, top in layers:
            layer.forward([], top)
            assert top[0].gpu_data().get().shape == (top[0].count,)  # one upload, when the next layer asks
            layer.close()
        np.testing.assert_array_equal(layers[0][1][0].gpu_data().get().reshape(2, 3, 5, 6), bgr_chw(images[:2]))
        from kaffe.engine.blob import Blob
        sink = make_layer(f"type: 'HDF5Output' hdf5_output_param {{ file_name: '{tmp_path / 'o.h5'}' }}")
        bottoms = [Blob(2, 3), Blob(2)]
        sink.setup(bottoms, [])
        bottoms[0].mutable_gpu_data()
        sink.forward(bottoms, [])
    finally:
        device.set_mode_cpu()
    assert not [m for m in kaffe_log if "no OpenCL implementation" in m]


# -- LeNet from LevelDB and from a list of PNG files (slow) ---------------------------------------------------------
def _lenet_net(train_layer, test_layer):
    text = (REPO / "models" / "lenet" / "lenet_train_test.prototxt").read_text()
    layers = re.split(r"(?m)^layer \{", text)
    header, rest = layers[0], layers[3:]  # the two Data layers are the first two
    return header + train_layer + test_layer + "".join("layer {" + layer for layer in rest)


def _data(kind, phase, source, batch):
    scale = "transform_param { scale: 0.00390625 }"
    if kind == "imagedata":
        return (f'layer {{ name: "mnist" type: "ImageData" top: "data" top: "label" include {{ phase: {phase} }} '
                f'{scale} image_data_param {{ source: "{source}" batch_size: {batch} is_color: false '
                f'{"shuffle: true" if phase == "TRAIN" else ""} }} }}\n')
    return (f'layer {{ name: "mnist" type: "Data" top: "data" top: "label" include {{ phase: {phase} }} {scale} '
            f'data_param {{ source: "{source}" batch_size: {batch} backend: {kind.upper()} }} }}\n')


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lmdb", "leveldb", "imagedata"])
def test_lenet_trains_from_every_source(tmp_path, kind):
    if not MNIST_RAW.exists():
        pytest.skip(f"real MNIST not found at {MNIST_RAW}")
    out = tmp_path / "mnist"
    if kind == "imagedata":
        contents = data_tool.load_mnist_folder(str(MNIST_RAW))
        sources = []
        for split, prefix in (("train", "train"), ("test", "t10k")):
            images = data_tool.parse_idx(contents[f"{prefix}-images-idx3-ubyte"], prefix)
            labels = data_tool.parse_idx(contents[f"{prefix}-labels-idx1-ubyte"], prefix)
            folder = out / split
            folder.mkdir(parents=True)
            lines = []
            for i, (image, label) in enumerate(zip(images, labels)):
                Image.fromarray(image).save(folder / f"{i:05d}.png", compress_level=1)
                lines.append(f"{folder / f'{i:05d}.png'} {label}")
            sources.append(write_list(out / f"{split}.txt", lines))
    else:
        data_tool.main(["mnist", "--from", str(MNIST_RAW), "--out", str(out), "--backend", kind])
        sources = [str(out / f"mnist_{split}_{kind}") for split in ("train", "test")]
    (tmp_path / "net.prototxt").write_text(_lenet_net(_data(kind, "TRAIN", sources[0], 64),
                                                      _data(kind, "TEST", sources[1], 100)))
    (tmp_path / "solver.prototxt").write_text(
        f'net: "{tmp_path / "net.prototxt"}" test_iter: 100 test_interval: 1500 base_lr: 0.01 momentum: 0.9 '
        f'weight_decay: 0.0005 lr_policy: "inv" gamma: 0.0001 power: 0.75 display: 500 max_iter: 1500 '
        f'snapshot: 0 snapshot_after_train: false random_seed: 1 solver_mode: CPU test_initialization: false')
    start = time.time()
    run = subprocess.run([sys.executable, "-m", "kaffe.tools.cli", "train", "--solver",
                          str(tmp_path / "solver.prototxt")], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    accuracy = float(re.findall(r"Test net output #0: accuracy = ([\d.]+)", run.stderr)[-1])
    print(f"LeNet from {kind}: test accuracy {accuracy:.4f} after 1500 iterations ({time.time() - start:.0f} s)")
    assert accuracy >= 0.975
