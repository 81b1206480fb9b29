"""`kaffe extract_features`: Caffe's tool's records (one float Datum per item, keys %010d), log lines and errors."""
import lmdb
import numpy as np
import pytest

import kaffe
from kaffe.proto import caffe_pb2
from kaffe.tools import cli, extract_features
from kaffe.tools.data import write_datums

pytestmark = pytest.mark.usefixtures("log_back_on_stderr")  # the tests run cli.main

NET = """name: "features"
layer { name: "data" type: "Data" top: "data" top: "label" transform_param { scale: 0.00390625 }
  data_param { source: "%s" backend: LMDB batch_size: 4 } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 2 kernel_size: 3 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "fc" type: "InnerProduct" bottom: "conv" top: "fc"
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.5 } } }
"""


@pytest.fixture
def net_files(tmp_path):
    """(weights, net prototxt) of a net reading 10 random 1 x 5 x 5 images in batches of 4."""
    images = np.random.default_rng(0).integers(0, 256, (10, 1, 5, 5), dtype=np.uint8)
    write_datums(tmp_path / "images", images, np.arange(10))
    net = tmp_path / "net.prototxt"
    net.write_text(NET % (tmp_path / "images"))
    kaffe.set_random_seed(5)
    weights = tmp_path / "net.caffemodel"
    kaffe.Net(str(net), kaffe.TEST).save(str(weights))
    return str(weights), str(net)


def _records(path):
    env = lmdb.open(str(path), readonly=True, lock=False)
    with env.begin() as txn:
        records = [(key, caffe_pb2.Datum.FromString(value)) for key, value in txn.cursor()]
    env.close()
    return records


def test_datums_of_every_item_of_each_blob(net_files, tmp_path, capsys):
    weights, net = net_files
    status = cli.main(["extract_features", weights, net, "fc,conv", f"{tmp_path / 'fc'},{tmp_path / 'conv'}", "3"])
    assert status == 0
    # the same three batches by hand: items 0-3, 4-7, then 8, 9, 0, 1 (the data layer wraps around)
    reference = kaffe.Net(net, kaffe.TEST, weights=weights)
    expected = {"fc": [], "conv": []}
    for _ in range(3):
        reference.forward()
        for name in expected:
            expected[name].extend(reference.blobs[name].data.copy())
    for name, (channels, height, width) in (("fc", (3, 1, 1)), ("conv", (2, 3, 3))):
        records = _records(tmp_path / name)
        assert [key for key, _ in records] == [b"%010d" % i for i in range(12)]
        for (_, datum), features in zip(records, expected[name]):
            assert (datum.channels, datum.height, datum.width) == (channels, height, width)
            assert not datum.data and not datum.HasField("label") and not datum.encoded
            np.testing.assert_array_equal(np.array(datum.float_data, dtype=np.float32), features.ravel())
    log = capsys.readouterr().err
    for line in ("] Using CPU", "] Opening dataset " + str(tmp_path / "fc"), "] Extracting Features",
                 "] Extracted features of 12 query images for feature blob fc",
                 "] Extracted features of 12 query images for feature blob conv",
                 "] Successfully extracted the features!"):
        assert line in log
    assert "\nE" in log  # Caffe logs these at ERROR level


def test_a_log_line_every_thousand_records(tmp_path, kaffe_log):
    # DummyData: 400 items per forward pass, 3 passes -> 1200 records, committed and logged at 1000
    net = tmp_path / "dummy.prototxt"
    net.write_text('layer { name: "data" type: "DummyData" top: "data" dummy_data_param { shape { dim: 400 dim: 2 } '
                   'data_filler { type: "constant" value: 1.5 } } }')
    weights = tmp_path / "dummy.caffemodel"
    kaffe.Net(str(net), kaffe.TEST).save(str(weights))
    assert extract_features.main([str(weights), str(net), "data", str(tmp_path / "db"), "3", "lmdb", "CPU"]) == 0
    records = _records(tmp_path / "db")
    assert len(records) == 1200 and records[-1][0] == b"0000001199"
    assert list(records[7][1].float_data) == [1.5, 1.5] and (records[7][1].channels, records[7][1].height) == (2, 1)
    assert kaffe_log.count("Extracted features of 1000 query images for feature blob data") == 1
    assert kaffe_log[-2:] == ["Extracted features of 1200 query images for feature blob data",
                              "Successfully extracted the features!"]


def test_leveldb_backend(net_files, tmp_path):
    plyvel = pytest.importorskip("plyvel")
    weights, net = net_files
    assert cli.main(["extract_features", weights, net, "fc", str(tmp_path / "fc_leveldb"), "1",
                     "--backend", "leveldb"]) == 0
    db = plyvel.DB(str(tmp_path / "fc_leveldb"))
    keys = [key for key, _ in db]
    db.close()
    assert keys == [b"%010d" % i for i in range(4)]


@pytest.mark.parametrize("args, message", [
    (["fc,conv", "{tmp}/one", "1"], "the number of blob names (2) and dataset names (1) must be equal"),
    (["fc7", "{tmp}/one", "1"], "Unknown feature blob name fc7 in the network"),
    (["fc", "{tmp}/exists", "1"], "already exists; remove it first"),
])
def test_bad_arguments_one_line(net_files, tmp_path, capsys, args, message):
    (tmp_path / "exists").mkdir()
    weights, net = net_files
    argv = [weights, net] + [a.format(tmp=tmp_path) for a in args]
    assert cli.main(["extract_features", *argv]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("kaffe extract_features: error: ") and message in err[-1]
    assert not (tmp_path / "one").exists() and not (tmp_path / "one.partial").exists()


def test_bad_db_type_is_a_usage_error(net_files, tmp_path, capsys):
    weights, net = net_files
    with pytest.raises(SystemExit) as done:
        cli.main(["extract_features", weights, net, "fc", str(tmp_path / "x"), "1", "rocksdb"])
    assert done.value.code == 2
    assert "expected DB_TYPE (lmdb or leveldb)" in capsys.readouterr().err
