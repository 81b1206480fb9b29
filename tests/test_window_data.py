"""WindowData: window-file parsing, fg/bg sampling, Caffe's warp/square geometry with context padding, mirror,
mean and scale, determinism, exact resume, caching and errors."""
import gc

import numpy as np
import pytest
from PIL import Image

from gradient_check import make_layer, opencl_available, setup_layer
from kaffe.engine import device
from kaffe.engine.blob import Blob
from kaffe.engine.errors import KaffeError
from kaffe.engine.io import write_binary_proto
from kaffe.layers.transform import resize_bilinear
from kaffe.proto import caffe_pb2

TRAIN, TEST = caffe_pb2.TRAIN, caffe_pb2.TEST


@pytest.fixture(autouse=True)
def seeded():
    device.set_random_seed(1701)
    yield
    gc.collect()  # layers left over from a test stop their prefetch threads


def save_image(path, height, width, seed):
    """A random RGB PNG; returns its pixels as OpenCV gives them to Caffe (BGR, channels first)."""
    rgb = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)
    return np.ascontiguousarray(rgb[..., ::-1].transpose(2, 0, 1))


def window_file(path, entries):
    """entries: (image path, height, width, [(class, overlap, x1, y1, x2, y2), ...]) in file order."""
    lines = []
    for index, (name, height, width, windows) in enumerate(entries):
        lines += [f"# {index}", str(name), "3", str(height), str(width), str(len(windows))]
        lines += [" ".join(str(v) for v in window) for window in windows]
    path.write_text("\n".join(lines) + "\n")
    return path


def window_layer(source, batch_size=4, crop_size=8, window="", transform="", phase=TRAIN):
    layer = make_layer(f"name: 'win' type: 'WindowData' transform_param {{ crop_size: {crop_size} {transform} }} "
                       f"window_data_param {{ source: '{source}' batch_size: {batch_size} {window} }}", phase)
    return layer, setup_layer(layer, [], 2)


def batch(layer, top):
    layer.forward([], top)
    return top[0].data.copy(), top[1].data.copy()


@pytest.fixture
def one_window(tmp_path):
    """A 20 x 24 image with one foreground window per call: returns (make(box) -> window file, BGR pixels)."""
    pixels = save_image(tmp_path / "img.png", 20, 24, seed=3)

    def make(box, label=1):
        return window_file(tmp_path / "w.txt", [(tmp_path / "img.png", 20, 24, [(label, 1.0, *box)])])
    return make, pixels


def only_fg(extra=""):
    return f"fg_fraction: 1 {extra}"


# -- sampling -------------------------------------------------------------------------------------------------
def test_fg_bg_split_labels_and_shapes(tmp_path):
    for i in range(2):
        save_image(tmp_path / f"im{i}.png", 16, 16, seed=i)
    source = window_file(tmp_path / "w.txt", [
        (tmp_path / "im0.png", 16, 16, [(1, 0.9, 0, 0, 7, 7), (2, 0.5, 2, 2, 9, 9), (7, 0.1, 4, 4, 12, 12),
                                        (9, 0.4, 1, 1, 5, 5)]),  # 0.4: neither fg (>= .5) nor bg (< .3): dropped
        (tmp_path / "im1.png", 16, 16, [(3, 0.7, 3, 3, 15, 15), (5, 0.0, 0, 0, 15, 15)])])
    layer, top = window_layer(source, batch_size=7, window="bg_threshold: 0.3 fg_fraction: 0.5")
    assert top[0].shape == (7, 3, 8, 8) and top[1].shape == (7,)
    seen = set()
    for _ in range(25):
        data, labels = batch(layer, top)
        # int(7 * 0.5) = 3 foreground windows, after the 4 background ones (whose class is forced to 0)
        assert (labels[:4] == 0).all() and set(labels[4:]) <= {1, 2, 3} and (labels[4:] > 0).all()
        seen |= set(labels[4:].tolist())
        assert np.isfinite(data).all()
    assert seen == {1, 2, 3}  # uniform over every foreground window, with replacement
    layer.close()


@pytest.mark.parametrize("batch_size, fraction, num_fg", [(8, 0.25, 2), (7, 0.25, 1), (10, 0.3, 3), (5, 0, 0)])
def test_foreground_count_is_truncated_as_caffe(tmp_path, batch_size, fraction, num_fg):
    save_image(tmp_path / "im.png", 12, 12, seed=0)
    source = window_file(tmp_path / "w.txt", [(tmp_path / "im.png", 12, 12, [(4, 0.8, 0, 0, 5, 5),
                                                                             (4, 0.2, 3, 3, 9, 9)])])
    layer, top = window_layer(source, batch_size=batch_size, window=f"fg_fraction: {fraction}")
    _, labels = batch(layer, top)
    np.testing.assert_array_equal(labels, [0] * (batch_size - num_fg) + [4] * num_fg)
    layer.close()


# -- geometry ---------------------------------------------------------------------------------------------------
def test_warp_without_context_is_the_box_resized_and_scaled(one_window, kaffe_log):
    make, pixels = one_window
    layer, top = window_layer(make((2, 3, 9, 12)), batch_size=2, crop_size=6,
                              window=only_fg("scale: 0.5"), transform="scale: 3")
    data, labels = batch(layer, top)
    expected = resize_bilinear(pixels[:, 3:13, 2:10], 6, 6).astype(np.float32) * 0.5
    np.testing.assert_array_equal(data, np.stack([expected, expected]))
    np.testing.assert_array_equal(labels, [1, 1])
    assert any("transform_param.scale is ignored" in m for m in kaffe_log)
    layer.close()


def test_context_pad_clipped_at_the_corner_leaves_zero_padding(one_window):
    # crop 10, context_pad 2: the box 0..5 grows by 10/6 about its centre 3 to -2..8 (11 pixels); its 2 pixels
    # beyond the image become round(2 * 10/11) = 2 zero rows/columns, and 0..8 is warped to round(9 * 10/11) = 8
    make, pixels = one_window
    layer, top = window_layer(make((0, 0, 5, 5)), batch_size=1, crop_size=10, window=only_fg("context_pad: 2"))
    data, _ = batch(layer, top)
    expected = np.zeros((3, 10, 10), np.float32)
    expected[:, 2:, 2:] = resize_bilinear(pixels[:, 0:9, 0:9], 8, 8)
    np.testing.assert_array_equal(data[0], expected)
    layer.close()


def test_mirror_flips_the_window_and_its_padding(one_window):
    make, pixels = one_window
    layer, top = window_layer(make((0, 0, 5, 5)), batch_size=6, crop_size=10, window=only_fg("context_pad: 2"),
                              transform="mirror: true")
    warped = resize_bilinear(pixels[:, 0:9, 0:9], 8, 8).astype(np.float32)
    plain = np.zeros((3, 10, 10), np.float32)
    plain[:, 2:, 2:] = warped
    flipped = np.zeros((3, 10, 10), np.float32)
    flipped[:, 2:, :8] = warped[:, :, ::-1]  # the padding that was left of the window is now right of it
    kinds = set()
    for _ in range(4):
        data, _ = batch(layer, top)
        for item in data:
            is_plain = np.array_equal(item, plain)
            assert is_plain or np.array_equal(item, flipped)
            kinds.add(is_plain)
    assert kinds == {True, False}
    layer.close()


def test_square_mode_makes_the_box_square_about_its_centre(one_window):
    # the 4 x 8 box x 4..7, y 6..13 has centre (6, 10) and half-size 4 in square mode: x 2..10, y 6..14
    make, pixels = one_window
    layer, top = window_layer(make((4, 6, 7, 13)), batch_size=1, crop_size=8, window=only_fg("crop_mode: 'square'"))
    data, _ = batch(layer, top)
    np.testing.assert_array_equal(data[0], resize_bilinear(pixels[:, 6:15, 2:11], 8, 8))
    layer.close()


def test_square_mode_clipped_at_the_bottom_right(one_window):
    # box x 18..23, y 14..19 with context_pad 1, crop 8: centre x1 + 3 = 21 (Caffe's), half 3 * 8/6 = 4, so
    # x 17..25, y 13..21 (9 pixels), 2 beyond each far edge: the clipped 7 are warped to round(7 * 8/9) = 6, and
    # the padding after them is what is left of the crop
    make, pixels = one_window
    layer, top = window_layer(make((18, 14, 23, 19)), batch_size=1, crop_size=8,
                              window=only_fg("crop_mode: 'square' context_pad: 1"))
    data, _ = batch(layer, top)
    expected = np.zeros((3, 8, 8), np.float32)
    expected[:, :6, :6] = resize_bilinear(pixels[:, 13:20, 17:24], 6, 6)
    np.testing.assert_array_equal(data[0], expected)
    layer.close()


# -- mean ---------------------------------------------------------------------------------------------------
def test_mean_values_are_subtracted_only_where_the_window_lands(one_window):
    make, pixels = one_window
    layer, top = window_layer(make((0, 0, 5, 5)), batch_size=1, crop_size=10, window=only_fg("context_pad: 2"),
                              transform="mean_value: 10 mean_value: 20 mean_value: 30")
    data, _ = batch(layer, top)
    expected = np.zeros((3, 10, 10), np.float32)
    expected[:, 2:, 2:] = resize_bilinear(pixels[:, 0:9, 0:9], 8, 8) - np.float32([10, 20, 30])[:, None, None]
    np.testing.assert_array_equal(data[0], expected)
    layer.close()


def test_mean_file_is_cropped_at_the_width_offset_for_both_axes(one_window, tmp_path):
    make, pixels = one_window
    mean = np.random.default_rng(9).uniform(0, 100, size=(3, 10, 14)).astype(np.float32)
    blob = Blob(1, 3, 10, 14)
    blob.mutable_cpu_data()[...] = mean
    write_binary_proto(blob.to_proto(), str(tmp_path / "mean.binaryproto"))
    layer, top = window_layer(make((2, 3, 9, 12)), batch_size=1, crop_size=6, window=only_fg("scale: 2"),
                              transform=f"mean_file: '{tmp_path / 'mean.binaryproto'}'")
    data, _ = batch(layer, top)
    offset = (14 - 6) // 2  # Caffe takes the offset from the mean's width, for rows too
    expected = (resize_bilinear(pixels[:, 3:13, 2:10], 6, 6) - mean[:, offset:offset + 6, offset:offset + 6]) * 2
    np.testing.assert_allclose(data[0], expected, rtol=0, atol=1e-5)
    layer.close()


# -- randomness, resume, caching, root folder ------------------------------------------------------------------
@pytest.fixture
def many_windows(tmp_path):
    for i in range(3):
        save_image(tmp_path / "imgs" / f"im{i}.png", 18, 22, seed=10 + i)
    return window_file(tmp_path / "w.txt", [
        (f"imgs/im{i}.png", 18, 22, [(i + 1, 0.8, i, i, 10 + i, 12), (0, 0.1, 2 * i, 1, 21, 17 - i)])
        for i in range(3)])


def run(source, batches, window="context_pad: 1", transform="mirror: true", seed=None):
    if seed is not None:
        device.set_random_seed(seed)
    layer, top = window_layer(source, batch_size=4, window=f"root_folder: '{source.parent}/' {window}",
                              transform=transform)
    out = [batch(layer, top) for _ in range(batches)]
    layer.close()
    return out


def test_root_folder_seeded_determinism_and_caching(many_windows):
    first, again = run(many_windows, 3, seed=4), run(many_windows, 3, seed=4)
    cached = run(many_windows, 3, window="context_pad: 1 cache_images: true", seed=4)
    other = run(many_windows, 3, seed=5)
    for (data, labels), (data2, labels2), (data3, labels3) in zip(first, again, cached):
        np.testing.assert_array_equal(data, data2)
        np.testing.assert_array_equal(labels, labels2)
        np.testing.assert_array_equal(data, data3)
        np.testing.assert_array_equal(labels, labels3)
    assert any(not np.array_equal(a[0], b[0]) for a, b in zip(first, other))


def test_cached_images_are_not_read_again(many_windows):
    device.set_random_seed(2)
    layer, top = window_layer(many_windows, window=f"root_folder: '{many_windows.parent}/' cache_images: true")
    for i in range(3):
        (many_windows.parent / "imgs" / f"im{i}.png").unlink()
    data, _ = batch(layer, top)
    assert data.any()
    layer.close()


def test_resume_state_reproduces_the_next_batches(many_windows):
    device.set_random_seed(6)
    layer, top = window_layer(many_windows, window=f"root_folder: '{many_windows.parent}/' context_pad: 1",
                              transform="mirror: true")
    batch(layer, top)
    state = layer.get_resume_state()
    expected = [batch(layer, top) for _ in range(2)]
    device.set_random_seed(99)
    other, other_top = window_layer(many_windows, window=f"root_folder: '{many_windows.parent}/' context_pad: 1",
                                    transform="mirror: true")
    batch(other, other_top)
    other.set_resume_state(state)
    for data, labels in expected:
        got_data, got_labels = batch(other, other_top)
        np.testing.assert_array_equal(got_data, data)
        np.testing.assert_array_equal(got_labels, labels)
    with pytest.raises(KaffeError, match="bad resume state"):
        other.set_resume_state({"key": "00"})
    layer.close()
    other.close()


# -- errors -------------------------------------------------------------------------------------------------
def test_errors_at_setup(tmp_path, one_window):
    make, _ = one_window
    source = make((2, 3, 9, 12))
    with pytest.raises(KaffeError, match=r"cannot read the window file .*nope\.txt"):
        window_layer(tmp_path / "nope.txt")
    with pytest.raises(KaffeError, match=r"transform_param\.crop_size must be positive.*window_data_param\.crop_size"):
        window_layer(source, crop_size=0, window="crop_size: 8")
    with pytest.raises(KaffeError, match=r"crop_mode must be"):
        window_layer(source, window="crop_mode: 'Square'")
    with pytest.raises(KaffeError, match=r"context_pad 4 leaves no room"):
        window_layer(source, window="context_pad: 4")
    with pytest.raises(KaffeError, match=r"no background windows"):
        window_layer(source)  # fg_fraction .25 of 4: 3 background windows wanted, the file has none
    (tmp_path / "missing.txt").write_text(f"# 0\n{tmp_path / 'img.png'}\n3 20 24\n1\n1 0.9 0 0 3 3\n"
                                          f"# 1\n{tmp_path / 'gone.png'}\n3 20 24\n1\n1 0.9 0 0 3 3\n")
    with pytest.raises(KaffeError, match=r"could not find image .*gone\.png \(.*missing\.txt:7\)"):
        window_layer(tmp_path / "missing.txt", window=only_fg())
    bad = {"# 0\nimg.png\n3 20 24\n1\n1 0.9 0 x 3 3\n": r"bad\.txt:5: expected the window's y1, got 'x'",
           "# 0\nimg.png\n3 20 24\n2\n1 0.9 0 0 3 3\n": r"the file ends where a window's class index",
           "0\nimg.png\n3 20 24\n0\n": r"bad\.txt:1: expected '# <image index>'",
           "# 0\nimg.png\n1 20 24\n0\n": r"bad\.txt:2: image img\.png is declared with 1 channels",
           "# 0\nimg.png\n3 20 24\n1\n0 0.9 0 0 3 3\n": r"bad\.txt:5: a foreground window .* has class 0",
           "# 1\nimg.png\n3 20 24\n1\n1 0.9 0 0 3 3\n": r"bad\.txt:5: the window refers to image index 1",
           "\n": r"window file .*bad\.txt is empty"}
    for text, message in bad.items():
        (tmp_path / "bad.txt").write_text(text)
        with pytest.raises(KaffeError, match=message):
            window_layer(tmp_path / "bad.txt", window=f"root_folder: '{tmp_path}/' " + only_fg())


def test_errors_while_reading_batches(tmp_path, one_window):
    make, _ = one_window
    layer, top = window_layer(make((20, 3, 30, 12)), window=only_fg())  # x2 = 30 is outside the 24 columns
    with pytest.raises(KaffeError, match=r"window 20 3 30 12 at .*w\.txt:7 does not lie inside its image"):
        layer.forward([], top)
    layer.close()
    (tmp_path / "broken.png").write_bytes(b"not a png")
    window_file(tmp_path / "b.txt", [(tmp_path / "broken.png", 20, 24, [(1, 1.0, 0, 0, 3, 3)])])
    layer, top = window_layer(tmp_path / "b.txt", window=only_fg())
    with pytest.raises(KaffeError, match=r"could not load image .*broken\.png \(.*b\.txt:2\)"):
        layer.forward([], top)
    layer.close()


@pytest.mark.opencl
@pytest.mark.skipif(not opencl_available(), reason="no OpenCL platform (install pocl-opencl-icd)")
def test_gpu_mode_produces_on_the_host_without_a_fallback_warning(one_window, kaffe_log):
    make, pixels = one_window
    device.set_mode_gpu()
    try:
        layer, top = window_layer(make((2, 3, 9, 12)), batch_size=2, crop_size=6, window=only_fg())
        layer.forward([], top)
        expected = resize_bilinear(pixels[:, 3:13, 2:10], 6, 6).astype(np.float32)
        np.testing.assert_array_equal(top[0].gpu_data().get().reshape(2, 3, 6, 6), np.stack([expected] * 2))
        layer.close()
    finally:
        device.set_mode_cpu()
    assert not [m for m in kaffe_log if "no OpenCL implementation" in m]
