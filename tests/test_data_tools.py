"""`kaffe data mnist`: IDX reading, LMDB writing, MD5 checks and the mirror fallback (on a local HTTP server)."""
import functools
import gzip
import http.server
import os
import shutil
import socket
import threading

import lmdb
import numpy as np
import pytest

from kaffe.engine.errors import KaffeError
from kaffe.proto import caffe_pb2
from kaffe.tools import data as data_tool

SHARED = os.environ.get("KAFFE_SHARED", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared"))
SHARED_MNIST = os.path.join(SHARED, "data", "mnist")
needs_mnist = pytest.mark.skipif(not os.path.isdir(SHARED_MNIST), reason="the MNIST files are not available")


def idx_reference(path):
    """First image/label and count of an IDX file, read independently of the tool."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    count = int.from_bytes(raw[4:8], "big")
    if raw[3] == 3:
        return count, np.frombuffer(raw, np.uint8, count=784, offset=16).reshape(28, 28)
    return count, raw[8]


def read_records(path, keys):
    env = lmdb.open(path, readonly=True, lock=False)
    with env.begin() as txn:
        entries = txn.stat()["entries"]
        first_key = next(iter(txn.cursor().iternext(values=False)))
        datums = []
        for key in keys:
            datum = caffe_pb2.Datum()
            datum.ParseFromString(txn.get(key))
            datums.append(datum)
    env.close()
    return entries, first_key, datums


@needs_mnist
def test_convert_from_folder(tmp_path, capsys):
    out = tmp_path / "mnist"
    assert data_tool.main(["mnist", "--from", SHARED_MNIST, "--out", str(out)]) == 0
    assert "mnist_train_lmdb" in capsys.readouterr().out
    for split, prefix, total in (("train", "train", 60000), ("test", "t10k", 10000)):
        entries, first_key, (first, last) = read_records(str(out / f"mnist_{split}_lmdb"),
                                                         [b"00000000", b"%08d" % (total - 1)])
        assert entries == total and first_key == b"00000000"
        count, image = idx_reference(os.path.join(SHARED_MNIST, f"{prefix}-images-idx3-ubyte.gz"))
        _, label = idx_reference(os.path.join(SHARED_MNIST, f"{prefix}-labels-idx1-ubyte.gz"))
        assert count == total
        assert (first.channels, first.height, first.width, first.encoded) == (1, 28, 28, False)
        assert len(first.float_data) == 0
        np.testing.assert_array_equal(np.frombuffer(first.data, np.uint8).reshape(28, 28), image)
        assert first.label == label
        assert 0 <= last.label <= 9 and len(last.data) == 784

    with pytest.raises(KaffeError, match=r"mnist_train_lmdb already exists; remove it"):
        data_tool.main(["mnist", "--from", SHARED_MNIST, "--out", str(out)])


@needs_mnist
def test_read_idx_gzipped_and_plain(tmp_path):
    labels = data_tool.read_idx(os.path.join(SHARED_MNIST, "t10k-labels-idx1-ubyte.gz"))
    plain = tmp_path / "labels"
    with gzip.open(os.path.join(SHARED_MNIST, "t10k-labels-idx1-ubyte.gz"), "rb") as f:
        plain.write_bytes(f.read())
    np.testing.assert_array_equal(data_tool.read_idx(plain), labels)
    assert labels.shape == (10000,) and labels.dtype == np.uint8 and labels.max() == 9


def test_read_idx_rejects_bad_files(tmp_path):
    bad_magic = tmp_path / "bad_magic"
    bad_magic.write_bytes(b"\x12\x34\x08\x01" + (3).to_bytes(4, "big") + b"abc")
    with pytest.raises(KaffeError, match="bad_magic is not an IDX file"):
        data_tool.read_idx(bad_magic)
    truncated = tmp_path / "truncated"
    truncated.write_bytes(b"\x00\x00\x08\x03" + b"".join(d.to_bytes(4, "big") for d in (2, 28, 28)) + bytes(100))
    with pytest.raises(KaffeError, match="truncated has the wrong size"):
        data_tool.read_idx(truncated)
    ints = tmp_path / "ints"
    ints.write_bytes(b"\x00\x00\x0c\x01" + (2).to_bytes(4, "big") + (7).to_bytes(4, "big")
                     + (-1).to_bytes(4, "big", signed=True))
    np.testing.assert_array_equal(data_tool.read_idx(ints), [7, -1])


def test_write_datum_lmdb_roundtrip(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, size=(2500, 3, 2, 2), dtype=np.uint8)
    labels = np.arange(2500) % 10
    path = str(tmp_path / "db")
    data_tool.write_datum_lmdb(path, images, labels)
    entries, _, (datum,) = read_records(path, [b"00001234"])
    assert entries == 2500 and datum.label == 4
    np.testing.assert_array_equal(np.frombuffer(datum.data, np.uint8).reshape(3, 2, 2), images[1234])
    assert not os.path.exists(path + ".partial")
    with pytest.raises(KaffeError, match="already exists"):
        data_tool.write_datum_lmdb(path, images, labels)


@needs_mnist
def test_md5_mismatch_in_folder(tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(SHARED_MNIST, folder)
    with gzip.open(folder / "t10k-labels-idx1-ubyte.gz", "rb") as f:
        payload = bytearray(f.read())
    payload[100] ^= 1
    os.unlink(folder / "t10k-labels-idx1-ubyte.gz")
    (folder / "t10k-labels-idx1-ubyte").write_bytes(payload)  # uncompressed files are accepted too
    with pytest.raises(KaffeError, match=r"t10k-labels-idx1-ubyte is not the canonical MNIST.*MD5"):
        data_tool.main(["mnist", "--from", str(folder), "--out", str(tmp_path / "out")])
    assert not os.path.exists(tmp_path / "out" / "mnist_train_lmdb")


def test_missing_file_in_folder(tmp_path):
    with pytest.raises(KaffeError, match="has no train-images-idx3-ubyte"):
        data_tool.main(["mnist", "--from", str(tmp_path), "--out", str(tmp_path / "out")])


# -- downloads -----------------------------------------------------------------------------------------------
@pytest.fixture
def mirror_server(tmp_path):
    """An HTTP server on 127.0.0.1 serving tmp_path/site; yields its base URL."""
    site = tmp_path / "site"
    site.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(site)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", site
    server.shutdown()
    server.server_close()


def closed_port_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/"


@needs_mnist
def test_download_falls_back_between_mirrors_and_caches(tmp_path, mirror_server, monkeypatch):
    base, site = mirror_server
    shutil.copytree(SHARED_MNIST, site / "good")
    (site / "corrupt").mkdir()
    for name in data_tool.MNIST_FILES:  # a mirror serving the wrong bytes is skipped after its MD5 check
        (site / "corrupt" / f"{name}.gz").write_bytes(gzip.compress(b"not mnist"))
    mirrors = [closed_port_url(), base + "missing", base + "corrupt/", base + "good"]
    raw = tmp_path / "raw"
    contents = data_tool.download_mnist(str(raw), mirrors, progress=None)
    assert sorted(contents) == sorted(data_tool.MNIST_FILES)
    assert sorted(os.listdir(raw)) == sorted(f"{name}.gz" for name in data_tool.MNIST_FILES)

    # the cache is used without the network; the whole command downloads through $KAFFE_MNIST_MIRRORS
    assert data_tool.download_mnist(str(raw), [closed_port_url()], progress=None).keys() == contents.keys()
    out = tmp_path / "out"
    shutil.copytree(raw, out / "raw")
    monkeypatch.setenv(data_tool.MIRRORS_ENV, closed_port_url())
    data_tool.main(["mnist", "--out", str(out)])
    assert os.path.isdir(out / "mnist_test_lmdb")


def test_download_md5_mismatch_is_an_error(tmp_path, mirror_server):
    base, site = mirror_server
    for name in data_tool.MNIST_FILES:
        (site / f"{name}.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x00"))
    with pytest.raises(KaffeError, match=r"train-images-idx3-ubyte.*MD5 mismatch.*not the canonical MNIST"):
        data_tool.download_mnist(str(tmp_path / "raw"), [base], progress=None)


def test_offline_download_points_to_from(tmp_path):
    with pytest.raises(KaffeError, match=r"could not download train-images-idx3-ubyte.*--from FOLDER"):
        data_tool.download_mnist(str(tmp_path / "raw"), [closed_port_url(), closed_port_url()], progress=None)


def test_mirror_list_from_environment(monkeypatch):
    monkeypatch.setenv(data_tool.MIRRORS_ENV, "http://a/x, http://b/y/")
    assert data_tool.mnist_mirrors() == ["http://a/x/", "http://b/y/"]
    assert data_tool.mnist_mirrors(["http://c"]) == ["http://c/"]
    monkeypatch.delenv(data_tool.MIRRORS_ENV)
    assert data_tool.mnist_mirrors()[0].startswith("https://")


def test_help_and_usage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        data_tool.main(["mnist", "--help"])
    assert exit_info.value.code == 0
    assert "--from FOLDER" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        data_tool.main([])
