import numpy as np
import pytest
from google.protobuf import text_format

from kaffe.engine import device
from kaffe.engine.blob import Blob
from kaffe.engine.errors import KaffeError
from kaffe.engine.filler import fill
from kaffe.proto import caffe_pb2


def filler(text):
    return text_format.Parse(text, caffe_pb2.FillerParameter())


def test_blob_shape_and_legacy_accessors():
    b = Blob(2, 3, 4, 5)
    assert b.shape == (2, 3, 4, 5) and b.count == 120 and b.num_axes == 4
    assert (b.num, b.channels, b.height, b.width) == (2, 3, 4, 5)
    assert b.count_axes(1) == 60 and b.count_axes(1, 3) == 12
    assert b.canonical_axis_index(-1) == 3
    with pytest.raises(KaffeError):
        b.canonical_axis_index(4)
    v = Blob(7)
    assert (v.num, v.channels, v.height, v.width) == (7, 1, 1, 1)
    assert b.shape_string() == "2 3 4 5 (120)"


def test_blob_reshape_keeps_memory_when_smaller_and_views_are_writable():
    b = Blob(4, 5)
    b.data[...] = np.arange(20).reshape(4, 5)
    memory = b._data
    b.reshape(2, 5)
    assert b._data is memory
    np.testing.assert_array_equal(b.data, np.arange(10).reshape(2, 5))
    b.reshape(3, 10)
    assert b._data is not memory and b.count == 30
    b.diff[...] = 1
    b.data[...] = 3
    b.update()
    np.testing.assert_array_equal(b.data, 2)


def test_blob_proto_round_trip_and_legacy_shapes():
    b = Blob(2, 3)
    b.data[...] = np.arange(6).reshape(2, 3)
    b.diff[...] = -1
    proto = b.to_proto(write_diff=True)
    c = Blob()
    c.from_proto(caffe_pb2.BlobProto.FromString(proto.SerializeToString()))
    np.testing.assert_array_equal(c.data, b.data)
    np.testing.assert_array_equal(c.diff, b.diff)
    legacy = caffe_pb2.BlobProto(num=1, channels=1, height=1, width=3, data=[1, 2, 3])
    bias = Blob(3)
    assert bias.shape_equals_proto(legacy)
    bias.from_proto(legacy, reshape=False)
    np.testing.assert_array_equal(bias.data, [1, 2, 3])
    with pytest.raises(KaffeError):
        Blob(4).from_proto(legacy, reshape=False)


def test_constant_uniform_gaussian_fillers():
    device.set_random_seed(3)
    b = Blob(200, 50)
    fill(b, filler('type: "constant" value: 2.5'))
    assert np.all(b.data == 2.5)
    fill(b, filler('type: "uniform" min: -2 max: 3'))
    assert b.data.min() >= -2 and b.data.max() <= 3 and abs(b.data.mean() - 0.5) < 0.05
    fill(b, filler('type: "gaussian" mean: 1 std: 2'))
    assert abs(b.data.mean() - 1) < 0.05 and abs(b.data.std() - 2) < 0.05
    fill(b)  # Caffe's default filler: constant 0
    assert np.all(b.data == 0)


def test_sparse_gaussian_keeps_sparse_over_num_outputs():
    device.set_random_seed(4)
    b = Blob(40, 1000)
    fill(b, filler('type: "gaussian" std: 1 sparse: 10'))
    assert abs(np.mean(b.data != 0) - 10 / 40) < 0.01
    with pytest.raises(KaffeError, match="sparse"):
        fill(b, filler('type: "xavier" sparse: 3'))


def test_positive_unitball_rows_sum_to_one():
    b = Blob(6, 2, 3)
    fill(b, filler('type: "positive_unitball"'))
    assert np.all(b.data >= 0)
    np.testing.assert_allclose(b.data.reshape(6, -1).sum(axis=1), 1, rtol=1e-5)


@pytest.mark.parametrize("norm,n", [("FAN_IN", 3 * 5 * 5), ("FAN_OUT", 20 * 5 * 5), ("AVERAGE", (75 + 500) / 2)])
def test_xavier_and_msra_use_caffe_fans(norm, n):
    device.set_random_seed(5)
    b = Blob(20, 3, 5, 5)
    fill(b, filler(f'type: "xavier" variance_norm: {norm}'))
    bound = np.sqrt(3.0 / n)
    assert np.abs(b.data).max() <= bound + 1e-6 and np.abs(b.data).max() > 0.9 * bound
    big = Blob(200, 3, 5, 5)
    fill(big, filler(f'type: "msra" variance_norm: {norm}'))
    fan_in, fan_out = 75, 200 * 25
    expect = {"FAN_IN": fan_in, "FAN_OUT": fan_out, "AVERAGE": (fan_in + fan_out) / 2}[norm]
    assert abs(big.data.std() - np.sqrt(2.0 / expect)) < 0.03 * np.sqrt(2.0 / expect)


def test_bilinear_filler_values():
    b = Blob(2, 1, 4, 4)
    fill(b, filler('type: "bilinear"'))
    # K=4: f=2, c=0.75, taps 1-|x/2-0.75| = 0.25 0.75 0.75 0.25
    taps = np.array([0.25, 0.75, 0.75, 0.25])
    np.testing.assert_allclose(b.data[1, 0], np.outer(taps, taps))
    with pytest.raises(KaffeError):
        fill(Blob(1, 1, 3, 4), filler('type: "bilinear"'))


def test_unknown_filler_lists_known():
    with pytest.raises(KaffeError, match="Unknown filler name.*xavier"):
        fill(Blob(2), filler('type: "nope"'))
