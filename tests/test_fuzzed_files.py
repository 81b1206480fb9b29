"""Fuzzed files never crash the readers: real files mutated by hypothesis (truncations, byte flips, spliced bytes,
huge varint lengths, duplicated and massively repeated fields, deep nesting, extreme numbers) give a result or a
KaffeError: no other exception, no signal. 500 examples per reader, each under a deadline.

Readers: prototxt nets of every format generation (V2, V1, V0) built into Nets, solver prototxts, .caffemodel
V2/V1/V0 and HDF5 loaded into a net, .solverstate binary and HDF5 restored into a solver, .binaryproto mean files,
Datum records (raw and encoded), HDF5Data files."""
import datetime
import io
import logging
import re

import h5py
import numpy as np
import pytest
from google.protobuf import text_format
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import SHARED
from gradient_check import make_layer, setup_layer
from kaffe.engine import device
from kaffe.engine.errors import KaffeError
from kaffe.engine.log import logger
from kaffe.engine.net import Net
from kaffe.layers.data import parse_datum
from kaffe.layers.transform import DataTransformer
from kaffe.proto import caffe_pb2
from kaffe.solvers import get_solver
from kaffe.solvers.solver import read_solver_param

ZOO = SHARED / "zoo"
LENET = ZOO / "weights" / "lenet_v2" / "lenet.prototxt"
LENET_WEIGHTS = ZOO / "weights" / "lenet_v2" / "lenet_iter_10000.caffemodel"
pytestmark = pytest.mark.skipif(not LENET_WEIGHTS.exists(), reason=f"Caffe's LeNet files not found at {ZOO}")

FUZZ = settings(max_examples=500, deadline=datetime.timedelta(seconds=10), derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.large_base_example])
EXTREME_NUMBERS = [b"0", b"-1", b"1", b"3", b"-2147483648", b"2147483647", b"2147483648", b"4294967296",
                   b"9223372036854775808", b"1000000000", b"2000000000", b"1e308", b"nan", b"-0.5"]
NUMBER = re.compile(rb"-?\d+(\.\d+)?")
HUGE_VARINTS = [b"\xff\xff\xff\xff\x0f", b"\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01", b"\xff\xff\xff\x7f"]
NESTINGS = [b"\x0a\x80\x80\x04", b"\x0b", b"\x12\xff\x01", b"layer { ", b"{ ", b"[ "]


@st.composite
def mutated(draw, base, text=False):
    """`base` with 1 to 4 mutations."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["truncate", "flip", "splice", "delete", "duplicate", "varint", "nest", "repeat"]
                                  + ["number"] * (3 if text else 0)))
        at = draw(st.integers(0, len(data)))
        if op == "truncate":
            del data[at:]
        elif op == "flip" and data:
            data[at % len(data)] ^= 1 << draw(st.integers(0, 7))
        elif op == "splice":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[at:at + draw(st.integers(1, 64))]
        elif op == "duplicate":
            start = draw(st.integers(0, len(data)))
            data[at:at] = data[start:start + draw(st.integers(1, 4096))]
        elif op == "varint":
            data[at:at + draw(st.integers(0, 5))] = draw(st.sampled_from(HUGE_VARINTS))
        elif op == "nest":
            data[at:at] = draw(st.sampled_from(NESTINGS)) * draw(st.integers(1, 20000))
        elif op == "repeat":   # one field repeated many times: huge repeated counts
            data[at:at] = bytes(data[at:at + draw(st.integers(1, 8))]) * draw(st.integers(2, 20000))
        elif op == "number":
            numbers = list(NUMBER.finditer(bytes(data)))
            if numbers:
                match = numbers[draw(st.integers(0, len(numbers) - 1))]
                data[match.start():match.end()] = draw(st.sampled_from(EXTREME_NUMBERS))
    return bytes(data)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(autouse=True, scope="module")
def quiet():
    """Thousands of net set-ups: keep the log to warnings."""
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


def read_or_refuse(function, *args):
    try:
        return function(*args)
    except KaffeError:
        return None


def written(folder, name, data):
    path = folder / name
    path.write_bytes(data)
    return str(path)


# -- prototxt -------------------------------------------------------------------------------------------------
NET_FILES = {"V2": LENET, "V1": ZOO / "legacy_v1" / "examples" / "mnist" / "lenet.prototxt",
             "V0": ZOO / "legacy_v0" / "examples" / "lenet" / "lenet.prototxt"}


@pytest.mark.parametrize("generation", list(NET_FILES))
def test_fuzzed_net_prototxt(work, generation):
    @FUZZ
    @given(mutated(NET_FILES[generation].read_bytes(), text=True))
    def check(data):
        read_or_refuse(Net, written(work, "net.prototxt", data), caffe_pb2.TEST)
    check()


SOLVER_FILES = {"current": ZOO / "bvlc" / "examples" / "mnist" / "lenet_solver.prototxt",
                "solver_type enum": ZOO / "legacy_v1" / "examples" / "mnist"
                / "mnist_autoencoder_solver_nesterov.prototxt"}


@pytest.mark.parametrize("generation", list(SOLVER_FILES))
def test_fuzzed_solver_prototxt(work, generation):
    @FUZZ
    @given(mutated(SOLVER_FILES[generation].read_bytes(), text=True))
    def check(data):
        read_or_refuse(read_solver_param, written(work, "solver.prototxt", data))
    check()


# -- weights --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lenet():
    return Net(str(LENET), caffe_pb2.TEST)


def legacy_weights(generation):
    """Caffe's LeNet weights in the V1 (`layers`) or V0 (`layers { layer }`) binary format."""
    trained = caffe_pb2.NetParameter.FromString(LENET_WEIGHTS.read_bytes())
    blobs = {layer.name: layer.blobs for layer in trained.layer}
    net = text_format.Parse(NET_FILES[generation].read_text(), caffe_pb2.NetParameter())
    for layer in net.layers:
        inner = layer.layer if generation == "V0" else layer
        inner.blobs.extend(blobs.get(inner.name, []))
    return net.SerializeToString()


def weight_files(work, lenet):
    lenet.copy_from(str(LENET_WEIGHTS))
    lenet.save_hdf5(str(work / "lenet.caffemodel.h5"))
    return {"V2": LENET_WEIGHTS.read_bytes(), "V1": legacy_weights("V1"), "V0": legacy_weights("V0"),
            "HDF5": (work / "lenet.caffemodel.h5").read_bytes()}


@pytest.mark.parametrize("generation", ["V2", "V1", "V0", "HDF5"])
def test_fuzzed_caffemodel(work, lenet, generation):
    base = weight_files(work, lenet)[generation]
    name = "weights.caffemodel.h5" if generation == "HDF5" else "weights.caffemodel"
    lenet.copy_from(written(work, name, base))   # the unmutated file loads

    @FUZZ
    @given(mutated(base))
    def check(data):
        read_or_refuse(lenet.copy_from, written(work, name, data))
    check()


# -- solver states ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("snapshot_format", ["BINARYPROTO", "HDF5"])
def test_fuzzed_solverstate(work, snapshot_format):
    param = text_format.Parse(
        f'net_param {{ {LENET.read_text().replace("dim: 64", "dim: 2")} }} type: "Adam" base_lr: 0.01 '
        f'lr_policy: "fixed" max_iter: 1 snapshot_format: {snapshot_format} snapshot_prefix: "{work}/adam"',
        caffe_pb2.SolverParameter())
    solver = get_solver(param)
    _, state_file = solver.snapshot()
    extension = ".solverstate.h5" if snapshot_format == "HDF5" else ".solverstate"

    @FUZZ
    @given(mutated(open(state_file, "rb").read()))
    def check(data):
        read_or_refuse(solver.restore, written(work, "fuzzed" + extension, data))
    check()
    device.set_random_seed(1701)   # a restored state may have set kaffe's generator to anything


# -- mean files, Datum records, HDF5 data ------------------------------------------------------------------------
def test_fuzzed_binaryproto_mean(work):
    mean = caffe_pb2.BlobProto()
    mean.shape.dim.extend([1, 3, 4, 4])
    mean.data.extend(np.linspace(0, 255, 48))
    path = work / "mean.binaryproto"
    transform = caffe_pb2.TransformationParameter(mean_file=str(path))

    @FUZZ
    @given(mutated(mean.SerializeToString()))
    def check(data):
        path.write_bytes(data)
        read_or_refuse(lambda: DataTransformer(transform, caffe_pb2.TEST, "layer 'data'")
                       .transform(np.zeros((2, 3, 4, 4), np.uint8), None))
    check()


def png(pixels):
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


DATUMS = {
    "raw": caffe_pb2.Datum(channels=3, height=4, width=4, data=bytes(range(48)), label=3),
    "float": caffe_pb2.Datum(channels=1, height=2, width=3, float_data=[0.5] * 6, label=1),
    "encoded": caffe_pb2.Datum(encoded=True, data=png(np.arange(48, dtype=np.uint8).reshape(4, 4, 3)), label=2),
}


@pytest.mark.parametrize("kind", list(DATUMS))
def test_fuzzed_datum_record(kind):
    transformer = DataTransformer(caffe_pb2.TransformationParameter(scale=0.5), caffe_pb2.TRAIN, "Data layer 'd'")

    @FUZZ
    @given(mutated(DATUMS[kind].SerializeToString()))
    def check(data):
        read_or_refuse(lambda: transformer.datum_array(parse_datum(data, b"00000042", "Data layer 'd'"), " 42"))
    check()


def test_fuzzed_hdf5_data_file(work):
    with h5py.File(work / "data.h5", "w") as f:
        f["data"] = np.arange(60, dtype=np.float32).reshape(5, 3, 2, 2)
        f["label"] = np.arange(5, dtype=np.float32)
    base = (work / "data.h5").read_bytes()
    (work / "list.txt").write_text(f"{work / 'fuzzed.h5'}\n")
    spec = (f'type: "HDF5Data" top: "data" top: "label" '
            f'hdf5_data_param {{ source: "{work / "list.txt"}" batch_size: 2 }}')

    def load(data):
        written(work, "fuzzed.h5", data)
        layer = make_layer(spec)
        try:
            top = setup_layer(layer, [], 2)
            layer.forward([], top)
        finally:
            layer.close()

    @FUZZ
    @given(mutated(base))
    def check(data):
        read_or_refuse(load, data)
    check()
