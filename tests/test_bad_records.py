"""Bad data mid-run: a record that does not decode (a truncated Datum, a wrong size, an undecodable encoded image,
a missing ImageData image) stops `kaffe train` with the source, the key or line and the reason, carried from the
prefetch thread to the main thread; with --skip_bad_records it is skipped and counted in the log."""
import io
import subprocess
import sys

import lmdb
import numpy as np
import pytest
from google.protobuf import text_format
from PIL import Image

from kaffe.engine import bad_records
from kaffe.engine.errors import KaffeError
from kaffe.engine.net import Net
from kaffe.proto import caffe_pb2

RECORDS = 5050
BAD_AT = 5000     # the position of the corrupt record: in the batch of iteration 166 (batches of 30)
KEY = b"%08d" % BAD_AT


def raw_datum(i):
    pixels = np.random.default_rng(i).integers(0, 256, size=(1, 4, 4), dtype=np.uint8)
    return caffe_pb2.Datum(channels=1, height=4, width=4, data=pixels.tobytes(), label=i % 3)


def png_bytes(pixels):
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


CORRUPTIONS = {
    "truncated": (lambda: raw_datum(BAD_AT).SerializeToString()[:9], "is not a Datum"),
    "wrong size": (lambda: caffe_pb2.Datum(channels=1, height=4, width=4, data=bytes(15)).SerializeToString(),
                   "declares 1 x 4 x 4 but holds 15 values"),
    "undecodable image": (lambda: caffe_pb2.Datum(encoded=True, data=png_bytes(np.zeros((4, 4), np.uint8))[:30])
                          .SerializeToString(), "cannot decode the encoded image"),
    "another size": (lambda: caffe_pb2.Datum(channels=1, height=5, width=5, data=bytes(25)).SerializeToString(),
                     "is 1 x 5 x 5 but the record with key b'00004980', the first item of its batch, is 1 x 4 x 4"),
}


@pytest.fixture(scope="module")
def databases(tmp_path_factory):
    """One LMDB of RECORDS raw 1x4x4 Datums per corruption, its record BAD_AT corrupt."""
    root = tmp_path_factory.mktemp("bad_records")
    good = [raw_datum(i).SerializeToString() for i in range(RECORDS)]
    paths = {}
    for name, (corrupt, _) in CORRUPTIONS.items():
        path = root / name.replace(" ", "_")
        env = lmdb.open(str(path), map_size=1 << 26)
        with env.begin(write=True) as txn:
            for i, value in enumerate(good):
                txn.put(b"%08d" % i, corrupt() if i == BAD_AT else value)
        env.close()
        paths[name] = path
    return paths


def net_text(source):
    return f"""
name: "records"
layer {{ name: "data" type: "Data" top: "data" top: "label" include {{ phase: TRAIN }}
        transform_param {{ scale: 0.00390625 }} data_param {{ source: "{source}" batch_size: 30 backend: LMDB }} }}
layer {{ name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
        inner_product_param {{ num_output: 3 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }}
"""


def train(folder, net, max_iter, *flags):
    (folder / "net.prototxt").write_text(net)
    (folder / "solver.prototxt").write_text(f'net: "net.prototxt" base_lr: 0.01 lr_policy: "fixed" '
                                            f'max_iter: {max_iter} display: 20 snapshot_after_train: false\n')
    return subprocess.run([sys.executable, "-m", "kaffe.tools.cli", "train", "--solver", "solver.prototxt", *flags],
                          cwd=folder, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_corrupt_record_at_position_5000_stops_training_with_source_key_and_reason(databases, tmp_path,
                                                                                      corruption):
    source = databases[corruption]
    result = train(tmp_path, net_text(source), 200)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("kaffe train: error: Data layer 'data': "), error
    assert repr(KEY) in error and f"(data source {source})" in error and CORRUPTIONS[corruption][1] in error, error
    assert "Iteration 160 (" in result.stderr and "Iteration 180 (" not in result.stderr


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_skip_bad_records_skips_and_counts_them(databases, tmp_path, corruption):
    result = train(tmp_path, net_text(databases[corruption]), 180, "--skip_bad_records")
    assert result.returncode == 0, result.stderr[-3000:]
    skipped = [line for line in result.stderr.splitlines() if "Skipped bad record" in line]
    assert len(skipped) == 1 and "#1 (--skip_bad_records)" in skipped[0] and repr(KEY) in skipped[0]
    assert "Optimization Done." in result.stderr


def test_the_error_reaches_a_pycaffe_forward_from_the_prefetch_thread(databases):
    param = caffe_pb2.NetParameter()
    text_format.Parse(net_text(databases["wrong size"]).replace("batch_size: 30", "batch_size: 2500"), param)
    net = Net(param, caffe_pb2.TRAIN)
    net.forward()
    net.forward()   # records 0..4999
    with pytest.raises(KaffeError, match=f"{KEY!r} declares 1 x 4 x 4 but holds 15 values"):
        net.forward()


def test_a_source_whose_every_record_is_bad_stops_even_when_skipping(kaffe_log):
    checker = bad_records.RecordChecker("data source x", lambda: 3)
    bad_records.set_skip_bad_records(True)
    try:
        checker.bad(KaffeError("record 1 is bad"))
        checker.good()
        checker.bad(KaffeError("record 0 is bad"))
        checker.bad(KaffeError("record 1 is bad"))
        with pytest.raises(KaffeError, match=r"record 2 is bad; every record of data source x is bad \(3 in a row\)"):
            checker.bad(KaffeError("record 2 is bad"))
    finally:
        bad_records.set_skip_bad_records(False)
    assert len([m for m in kaffe_log if m.startswith("Skipped bad record #")]) == 3
    with pytest.raises(KaffeError, match="record 3 is bad"):   # not skipping: the first bad record stops
        checker.bad(KaffeError("record 3 is bad"))


def image_list_job(folder, missing_line):
    images = folder / "images"
    images.mkdir()
    lines = []
    for i in range(6):
        name = f"img{i}.png"
        if i + 1 != missing_line:
            Image.fromarray(np.full((5, 5, 3), 40 * i, np.uint8)).save(images / name)
        lines.append(f"{name} {i % 2}")
    (folder / "list.txt").write_text("\n".join(lines) + "\n")
    return f"""
name: "images"
layer {{ name: "data" type: "ImageData" top: "data" top: "label"
        image_data_param {{ source: "list.txt" root_folder: "images/" batch_size: 2 }} }}
layer {{ name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
        inner_product_param {{ num_output: 2 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }}
"""


def test_a_missing_image_stops_training_with_the_list_line(tmp_path):
    result = train(tmp_path, image_list_job(tmp_path, missing_line=4), 5)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    error = result.stderr.strip().splitlines()[-1]
    assert "ImageData layer 'data': could not load image images/img3.png (list.txt:4)" in error, error


def test_a_missing_image_is_skipped_with_skip_bad_records(tmp_path):
    result = train(tmp_path, image_list_job(tmp_path, missing_line=4), 6, "--skip_bad_records")
    assert result.returncode == 0, result.stderr[-3000:]
    skipped = [line for line in result.stderr.splitlines() if "Skipped bad record" in line]
    # each pass over the list (the prefetch thread reads ahead) skips it once more, counted
    assert len(skipped) >= 2 and all(f"#{n} (--skip_bad_records)" in line and "list.txt:4" in line
                                     for n, line in enumerate(skipped, 1)), skipped
