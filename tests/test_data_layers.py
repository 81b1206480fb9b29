"""Data layers (Data, MemoryData, DummyData, Input) and the DataTransformer against numpy expectations."""
import gc
import io
import json
import os
import subprocess
import sys
import threading
import time

import lmdb
import numpy as np
import pytest
from PIL import Image

from gradient_check import make_layer, setup_layer
from kaffe.engine import device
from kaffe.engine.blob import Blob
from kaffe.engine.errors import KaffeError
from kaffe.proto import caffe_pb2

TRAIN, TEST = caffe_pb2.TRAIN, caffe_pb2.TEST


# -- helpers -------------------------------------------------------------------------------------------
def write_lmdb(path, datums):
    env = lmdb.open(str(path), map_size=1 << 26)
    with env.begin(write=True) as txn:
        for i, datum in enumerate(datums):
            txn.put(b"%08d" % i, datum.SerializeToString())
    env.close()
    return str(path)


def uint8_datums(images, labels):
    return [caffe_pb2.Datum(channels=x.shape[0], height=x.shape[1], width=x.shape[2], data=x.tobytes(), label=int(y))
            for x, y in zip(images, labels)]


def random_images(n, shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n,) + shape, dtype=np.uint8)


def data_layer(source, batch_size, phase=TRAIN, transform="", extra="", num_top=2):
    layer = make_layer(f'name: "data" type: "Data" transform_param {{ {transform} }} '
                       f'data_param {{ source: "{source}" batch_size: {batch_size} backend: LMDB {extra} }}', phase)
    top = setup_layer(layer, [], num_top)
    return layer, top


def next_batch(layer, top):
    layer.forward([], top)
    return top[0].data.copy(), (top[1].data.copy() if len(top) > 1 else None)


def prefetch_threads():
    return [t for t in threading.enumerate() if t.name.startswith("kaffe-prefetch") and t.is_alive()]


@pytest.fixture
def images_db(tmp_path):
    images = random_images(10, (3, 5, 6))
    labels = np.arange(10) * 3 % 7
    return write_lmdb(tmp_path / "db", uint8_datums(images, labels)), images, labels


@pytest.fixture(autouse=True)
def seeded():
    device.set_random_seed(1701)
    yield
    gc.collect()  # layers left over from a test release their threads and LMDBs


def window_matches(out, item, mean, scale, crop):
    """All (h_off, w_off, flipped) for which `out` is the transform of `item` (float64 reference)."""
    matches = []
    _, height, width = item.shape
    for h in range(height - crop + 1):
        for w in range(width - crop + 1):
            for flip in (False, True):
                window = (item.astype(np.float64) - mean)[:, h:h + crop, w:w + crop] * scale
                if flip:
                    window = window[:, :, ::-1]
                if np.allclose(out, window, rtol=1e-6, atol=1e-6):
                    matches.append((h, w, flip))
    return matches


# -- Data: reading ---------------------------------------------------------------------------------------
def test_reads_uint8_in_key_order_and_wraps(images_db):
    source, images, labels = images_db
    layer, top = data_layer(source, 4, TEST)
    assert top[0].shape == (4, 3, 5, 6) and top[1].shape == (4,)
    order = np.arange(12) % 10  # three batches of 4 over 10 records: the third wraps around
    for b in range(3):
        data, label = next_batch(layer, top)
        index = order[4 * b:4 * b + 4]
        np.testing.assert_array_equal(data, images[index].astype(np.float32))
        np.testing.assert_array_equal(label, labels[index].astype(np.float32))
    assert top[0].data.dtype == np.float32
    layer.close()


def test_single_top_has_no_label(images_db):
    source, images, _ = images_db
    layer, top = data_layer(source, 2, TEST, num_top=1)
    data, _ = next_batch(layer, top)
    np.testing.assert_array_equal(data, images[:2])
    layer.close()


def test_reads_float_data(tmp_path):
    values = np.random.default_rng(3).standard_normal((5, 2, 3, 3)).astype(np.float32)
    datums = [caffe_pb2.Datum(channels=2, height=3, width=3, float_data=v.ravel().tolist(), label=i)
              for i, v in enumerate(values)]
    layer, top = data_layer(write_lmdb(tmp_path / "f", datums), 5, TEST, "scale: 2")
    data, label = next_batch(layer, top)
    np.testing.assert_array_equal(data, values * np.float32(2))
    np.testing.assert_array_equal(label, np.arange(5))
    layer.close()


def encode_png(pixels_hwc):
    buffer = io.BytesIO()
    Image.fromarray(pixels_hwc).save(buffer, format="PNG")
    return buffer.getvalue()


def test_reads_encoded_png_as_bgr_chw(tmp_path):
    rgb = random_images(3, (4, 5, 3), seed=5)  # H x W x RGB
    gray = random_images(3, (4, 5), seed=6)
    color_db = write_lmdb(tmp_path / "c", [caffe_pb2.Datum(data=encode_png(x), encoded=True, label=7) for x in rgb])
    layer, top = data_layer(color_db, 3, TEST)
    data, label = next_batch(layer, top)
    np.testing.assert_array_equal(data, rgb[..., ::-1].transpose(0, 3, 1, 2))  # BGR, channels first
    np.testing.assert_array_equal(label, [7, 7, 7])
    layer.close()

    gray_db = write_lmdb(tmp_path / "g", [caffe_pb2.Datum(data=encode_png(x), encoded=True) for x in gray])
    layer, top = data_layer(gray_db, 3, TEST)
    assert top[0].shape == (3, 1, 4, 5)
    np.testing.assert_array_equal(next_batch(layer, top)[0], gray[:, None])
    layer.close()
    layer, top = data_layer(gray_db, 3, TEST, "force_color: true")
    np.testing.assert_array_equal(next_batch(layer, top)[0], np.repeat(gray[:, None], 3, axis=1))
    layer.close()


def test_rand_skip_starts_within_range_then_reads_in_order(images_db):
    source, images, _ = images_db
    starts = set()
    for seed in range(12):
        device.set_random_seed(seed)
        layer, top = data_layer(source, 3, TEST, extra="rand_skip: 6")
        first, _ = next_batch(layer, top)
        second, _ = next_batch(layer, top)
        start = next(s for s in range(10) if np.array_equal(first[0], images[s]))
        assert 0 <= start < 6
        np.testing.assert_array_equal(np.concatenate([first, second]), images[(start + np.arange(6)) % 10])
        starts.add(start)
        layer.close()
    assert len(starts) > 1


# -- Data: transformation ---------------------------------------------------------------------------------
@pytest.mark.parametrize("means", [[100.0], [10.0, 120.5, 250.0]])
def test_mean_value_and_scale(images_db, means):
    source, images, _ = images_db
    mean_text = " ".join(f"mean_value: {m}" for m in means)
    layer, top = data_layer(source, 5, TEST, f"scale: 0.5 {mean_text}")
    data, _ = next_batch(layer, top)
    mean = np.array(means, dtype=np.float64).reshape(-1, 1, 1)
    np.testing.assert_allclose(data, (images[:5] - mean) * 0.5, rtol=1e-6)
    layer.close()


def write_mean_file(path, mean):
    proto = caffe_pb2.BlobProto(num=1, channels=mean.shape[0], height=mean.shape[1], width=mean.shape[2])
    proto.data.extend(mean.ravel().tolist())
    path.write_bytes(proto.SerializeToString())
    return str(path)


@pytest.fixture
def mean_file(tmp_path):
    mean = np.random.default_rng(9).uniform(0, 255, size=(3, 5, 6)).astype(np.float32)
    return write_mean_file(tmp_path / "mean.binaryproto", mean), mean.astype(np.float64)


def test_mean_file_with_centre_crop_in_test(images_db, mean_file):
    source, images, _ = images_db
    path, mean = mean_file
    layer, top = data_layer(source, 10, TEST, f'crop_size: 3 mean_file: "{path}" scale: 0.25')
    assert top[0].shape == (10, 3, 3, 3)
    data, _ = next_batch(layer, top)
    h, w = (5 - 3) // 2, (6 - 3) // 2  # Caffe's centre: (size - crop) / 2, rounded down
    expected = (images.astype(np.float64) - mean)[:, :, h:h + 3, w:w + 3] * 0.25
    np.testing.assert_allclose(data, expected, rtol=1e-5, atol=1e-5)
    layer.close()


def test_random_crop_in_train_stays_in_bounds(images_db, mean_file):
    source, images, _ = images_db
    path, mean = mean_file
    layer, top = data_layer(source, 10, TRAIN, f'crop_size: 4 mean_file: "{path}"')
    offsets = set()
    for _ in range(4):
        data, _ = next_batch(layer, top)
        for out, item in zip(data, images):
            matches = window_matches(out, item, mean, 1.0, 4)
            assert matches and not any(flip for _, _, flip in matches)
            offsets.add(matches[0][:2])
    assert len(offsets) > 3  # 2 x 3 possible windows: the crops do vary
    layer.close()


@pytest.mark.parametrize("phase", [TRAIN, TEST])
def test_mirror_flips_at_random_in_both_phases(images_db, phase):
    source, images, _ = images_db
    layer, top = data_layer(source, 10, phase, "mirror: true mean_value: 3 mean_value: 4 mean_value: 5")
    mean = np.array([3.0, 4.0, 5.0]).reshape(3, 1, 1)
    flipped = []
    for _ in range(3):
        data, _ = next_batch(layer, top)
        for out, item in zip(data, images - mean):
            plain, mirrored = np.allclose(out, item), np.allclose(out, item[:, :, ::-1])
            assert plain or mirrored
            flipped.append(mirrored)
    assert 0 < sum(flipped) < len(flipped)
    layer.close()


def test_crop_and_mirror_with_mean_file(images_db, mean_file):
    source, images, _ = images_db
    path, mean = mean_file
    layer, top = data_layer(source, 10, TRAIN, f'crop_size: 4 mirror: true mean_file: "{path}" scale: 0.1')
    seen = set()
    for _ in range(3):
        data, _ = next_batch(layer, top)
        for out, item in zip(data, images):
            matches = window_matches(out, item, mean, 0.1, 4)
            assert matches
            seen.update(flip for _, _, flip in matches)
    assert seen == {False, True}
    layer.close()


def test_same_seed_gives_same_batches(images_db):
    source, _, _ = images_db
    runs = []
    for _ in range(2):
        device.set_random_seed(42)
        layer, top = data_layer(source, 4, TRAIN, "crop_size: 3 mirror: true")
        runs.append([next_batch(layer, top)[0] for _ in range(3)])
        layer.close()
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)


# -- Data: exact resume ------------------------------------------------------------------------------------
def test_resume_continues_with_the_same_batches(images_db):
    source, _, _ = images_db
    transform = "crop_size: 3 mirror: true scale: 0.5"
    layer, top = data_layer(source, 3, TRAIN, transform, "prefetch: 4")
    for _ in range(4):  # batches 1..4 (the fourth wraps around the 10 records)
        next_batch(layer, top)
    time.sleep(0.2)  # let the thread read ahead: the state must still name the batch the net takes next
    state = json.loads(json.dumps(layer.get_resume_state()))
    expected = [next_batch(layer, top) for _ in range(5)]
    layer.close()

    device.set_random_seed(999)  # a different seed: everything must come from the state
    fresh, fresh_top = data_layer(source, 3, TRAIN, transform, "prefetch: 4")
    next_batch(fresh, fresh_top)  # consumed and read-ahead batches are discarded by the restore
    fresh.set_resume_state(state)
    for data, label in expected:
        got_data, got_label = next_batch(fresh, fresh_top)
        np.testing.assert_array_equal(got_data, data)
        np.testing.assert_array_equal(got_label, label)
    fresh.close()


def test_state_before_the_first_forward_replays_batch_one(images_db):
    source, _, _ = images_db
    layer, top = data_layer(source, 4, TRAIN, "crop_size: 4 mirror: true", "rand_skip: 7")
    state = layer.get_resume_state()
    first = next_batch(layer, top)
    layer.set_resume_state(state)
    np.testing.assert_array_equal(next_batch(layer, top)[0], first[0])
    layer.close()


def test_bad_resume_state_is_an_error(images_db):
    layer, _ = data_layer(images_db[0], 2, TEST)
    with pytest.raises(KaffeError, match="bad resume state"):
        layer.set_resume_state({"cursor": 3})
    layer.close()


# -- Data: prefetch thread ---------------------------------------------------------------------------------
def test_prefetch_thread_stops_on_close_and_collection(images_db):
    source, _, _ = images_db
    before = len(prefetch_threads())
    layer, top = data_layer(source, 2, TEST, extra="prefetch: 2")
    next_batch(layer, top)
    assert len(prefetch_threads()) == before + 1
    layer.close()
    assert len(prefetch_threads()) == before
    with pytest.raises(KaffeError, match="stopped"):
        layer.forward([], top)

    layer, top = data_layer(source, 2, TEST)
    del layer, top
    gc.collect()
    deadline = time.time() + 5
    while len(prefetch_threads()) > before and time.time() < deadline:
        time.sleep(0.01)
    assert len(prefetch_threads()) == before


def test_interpreter_exits_with_a_running_prefetch_thread(images_db):
    script = ("from gradient_check import make_layer, setup_layer\n"
              f"layer = make_layer('type: \"Data\" data_param {{ source: \"{images_db[0]}\" batch_size: 2 "
              "backend: LMDB }')\n"
              "top = setup_layer(layer, [], 2)\nlayer.forward([], top)\nprint('done')\n")
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    result = subprocess.run([sys.executable, "-c", script], cwd=tests_dir, capture_output=True, text=True,
                            timeout=60, env=dict(os.environ, PYTHONPATH=tests_dir))
    assert result.returncode == 0, result.stderr
    assert "done" in result.stdout


def test_two_layers_share_one_source(images_db):
    source, images, _ = images_db
    a, top_a = data_layer(source, 4, TEST)
    b, top_b = data_layer(source, 4, TEST)
    np.testing.assert_array_equal(next_batch(a, top_a)[0], next_batch(b, top_b)[0])
    a.close()
    np.testing.assert_array_equal(next_batch(b, top_b)[0], images[4:8])
    b.close()


# -- Data: errors ------------------------------------------------------------------------------------------
def test_missing_source(tmp_path):
    with pytest.raises(KaffeError, match=r"Data layer 'data'.*nowhere.*does not exist.*LMDB directory"):
        data_layer(tmp_path / "nowhere", 2)


def test_source_given_as_data_mdb(images_db):
    with pytest.raises(KaffeError, match=r"data.mdb.*is a file.*not data.mdb itself"):
        data_layer(os.path.join(images_db[0], "data.mdb"), 2)


def test_empty_db(tmp_path):
    with pytest.raises(KaffeError, match=r"Data layer 'data'.*empty.*is empty"):
        data_layer(write_lmdb(tmp_path / "empty", []), 2)


def test_not_an_lmdb(tmp_path):
    (tmp_path / "plain").mkdir()
    with pytest.raises(KaffeError, match=r"plain is not an LMDB"):
        data_layer(tmp_path / "plain", 2)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "data.mdb").write_bytes(os.urandom(8192))
    with pytest.raises(KaffeError, match=r"junk as an LMDB"):
        data_layer(tmp_path / "junk", 2)


def test_records_that_are_not_datums(tmp_path):
    path = tmp_path / "other"
    env = lmdb.open(str(path))
    with env.begin(write=True) as txn:
        txn.put(b"a", b"\xff\xff\xff definitely not a protobuf")
    env.close()
    with pytest.raises(KaffeError, match="not a Datum"):
        data_layer(path, 2)


def test_an_lmdb_read_with_the_default_leveldb_backend_is_explained(images_db):
    layer = make_layer(f'type: "Data" data_param {{ source: "{images_db[0]}" batch_size: 2 }}')
    with pytest.raises(KaffeError, match="is an LMDB, not a LevelDB: set `backend: LMDB`.*LEVELDB is Caffe's default"):
        setup_layer(layer, [], 2)


@pytest.mark.parametrize("transform, message", [
    ("crop_size: 6", "crop_size 6 is larger"),
    ("mean_value: 1 mean_value: 2", "1 mean_value or as many as channels"),
    ('mean_value: 1 mean_file: "x"', "mean_file and mean_value"),
    ('mean_file: "/no/such/mean.binaryproto"', "not found"),
    ("force_color: true force_gray: true", "force_color and force_gray"),
])
def test_transform_errors(images_db, transform, message):
    with pytest.raises(KaffeError, match=message):
        layer, top = data_layer(images_db[0], 2, TEST, transform)
        layer.forward([], top)


def test_mean_file_of_the_wrong_size(images_db, tmp_path):
    path = write_mean_file(tmp_path / "m.binaryproto", np.zeros((3, 4, 4), np.float32))
    layer, top = data_layer(images_db[0], 2, TEST, f'mean_file: "{path}"')
    with pytest.raises(KaffeError, match=r"3 x 4 x 4 but the data is 3 x 5 x 6"):
        layer.forward([], top)
    layer.close()


# -- MemoryData ----------------------------------------------------------------------------------------------
def memory_layer(batch_size=2):
    layer = make_layer(f"type: 'MemoryData' memory_data_param {{ batch_size: {batch_size} channels: 2 height: 3 "
                       f"width: 1 }}")
    return layer, setup_layer(layer, [], 2)


@pytest.mark.parametrize("label_shape", [(6,), (6, 1, 1, 1)])
def test_memory_data_reset_and_wrap(label_shape):
    layer, top = memory_layer()
    assert top[0].shape == (2, 2, 3, 1) and top[1].shape == (2,)
    data = np.arange(36, dtype=np.float32).reshape(6, 2, 3, 1)
    labels = np.arange(6, dtype=np.float32).reshape(label_shape) + 10
    layer.reset(data, labels)
    for start in (0, 2, 4, 0, 2):
        layer.forward([], top)
        np.testing.assert_array_equal(top[0].data, data[start:start + 2])
        np.testing.assert_array_equal(top[1].data, labels.reshape(-1)[start:start + 2])
    layer.reset(data[::-1], labels)  # a reset starts again from the first item
    layer.forward([], top)
    np.testing.assert_array_equal(top[0].data, data[::-1][:2])


def test_memory_data_errors():
    layer, top = memory_layer()
    with pytest.raises(KaffeError, match="reset"):
        layer.forward([], top)
    with pytest.raises(KaffeError, match=r"\(5\) must be a positive multiple of the batch size \(2\)"):
        layer.reset(np.zeros((5, 2, 3, 1)), np.zeros(5))
    with pytest.raises(KaffeError, match="N x 2 x 3 x 1"):
        layer.reset(np.zeros((4, 2, 3, 2)), np.zeros(4))
    with pytest.raises(KaffeError, match="labels must have shape"):
        layer.reset(np.zeros((4, 2, 3, 1)), np.zeros(3))
    with pytest.raises(KaffeError, match="must be specified and positive"):
        setup_layer(make_layer("type: 'MemoryData' memory_data_param { batch_size: 2 channels: 1 }"), [], 2)


# -- DummyData and Input ---------------------------------------------------------------------------------------
def test_dummy_data_shapes_and_default_zeros():
    layer = make_layer("type: 'DummyData' dummy_data_param { shape { dim: 2 dim: 3 } }")
    top = setup_layer(layer, [], 2)
    assert [t.shape for t in top] == [(2, 3), (2, 3)]
    layer.forward([], top)
    assert not top[0].data.any() and not top[1].data.any()

    layer = make_layer("type: 'DummyData' dummy_data_param { shape { dim: 4 } shape { dim: 1 dim: 5 } }")
    assert [t.shape for t in setup_layer(layer, [], 2)] == [(4,), (1, 5)]

    layer = make_layer("type: 'DummyData' dummy_data_param { num: 2 channels: 3 channels: 4 height: 5 width: 6 }")
    assert [t.shape for t in setup_layer(layer, [], 2)] == [(2, 3, 5, 6), (2, 4, 5, 6)]


def test_dummy_data_refills_only_non_constant_fillers():
    layer = make_layer("type: 'DummyData' dummy_data_param { shape { dim: 3 dim: 4 } "
                       "data_filler { type: 'constant' value: 7 } data_filler { type: 'gaussian' std: 2 } }")
    const, noise = top = setup_layer(layer, [], 2)
    np.testing.assert_array_equal(const.data, 7)
    const.data[...] = -1  # filled once at setup: forward leaves it alone, as Caffe does
    layer.forward([], top)
    first = noise.data.copy()
    layer.forward([], top)
    np.testing.assert_array_equal(const.data, -1)
    assert not np.array_equal(first, noise.data) and first.std() > 0.5

    layer = make_layer("type: 'DummyData' dummy_data_param { shape { dim: 50 } data_filler { type: 'uniform' "
                       "min: 2 max: 3 } }")
    top = setup_layer(layer, [], 2)
    layer.forward([], top)
    assert all(((t.data >= 2) & (t.data <= 3)).all() for t in top)
    assert not np.array_equal(top[0].data, top[1].data)


@pytest.mark.parametrize("param, message", [
    ("shape { dim: 2 } data_filler {} data_filler {} data_filler {}", "0, 1 or equal"),
    ("shape { dim: 2 } num: 2 channels: 1 height: 1 width: 1", "Both shape and legacy|both shape and legacy"),
    ("shape { dim: 2 } shape { dim: 3 } shape { dim: 4 }", "once per top"),
    ("", "once per top"),
])
def test_dummy_data_errors(param, message):
    with pytest.raises(KaffeError, match=message):
        setup_layer(make_layer(f"type: 'DummyData' dummy_data_param {{ {param} }}"), [], 2)


def test_input_shapes():
    layer = make_layer("type: 'Input' input_param { shape { dim: 2 dim: 3 dim: 4 } }")
    top = setup_layer(layer, [], 2)
    assert [t.shape for t in top] == [(2, 3, 4), (2, 3, 4)]
    top[0].data[...] = 5
    layer.forward([], top)
    np.testing.assert_array_equal(top[0].data, 5)  # the user's values are left as they are

    layer = make_layer("type: 'Input' input_param { shape { dim: 1 } shape { dim: 2 dim: 2 } }")
    assert [t.shape for t in setup_layer(layer, [], 2)] == [(1,), (2, 2)]
    with pytest.raises(KaffeError, match="once per top"):
        setup_layer(make_layer("type: 'Input' input_param { shape { dim: 1 } shape { dim: 2 } }"), [], 3)


def test_data_layers_take_no_bottoms():
    with pytest.raises(KaffeError, match="exactly 0 bottom"):
        make_layer("type: 'Input' input_param { shape { dim: 1 } }").setup([Blob(1)], [Blob()])
