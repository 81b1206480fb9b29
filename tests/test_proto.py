"""kaffe's caffe.proto: generated module in sync, and wire-compatible with Caffe.

The facts in FIELD_FACTS were checked against BVLC Caffe master's
src/caffe/proto/caffe.proto (the 9b89154 tree).
"""
import importlib.util
import math
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import text_format

from kaffe.proto import caffe_pb2

PROTO_DIR = Path(__file__).resolve().parents[1] / "proto"


def test_generated_module_matches_schema(tmp_path):
    if importlib.util.find_spec("grpc_tools") is None:
        pytest.skip("grpc_tools (grpcio-tools) is not installed: cannot regenerate caffe_pb2.py")
    (tmp_path / "caffe.proto").write_bytes((PROTO_DIR / "caffe.proto").read_bytes())
    # The same command that produced the committed file, run in a copy.
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I.", "--python_out=.", "caffe.proto"],
        cwd=tmp_path,
        check=True,
    )
    fresh = (tmp_path / "caffe_pb2.py").read_bytes()
    committed = (PROTO_DIR / "caffe_pb2.py").read_bytes()
    assert fresh == committed, (
        "proto/caffe_pb2.py is stale: run "
        "`cd proto && python -m grpc_tools.protoc -I. --python_out=. caffe.proto`"
    )


def _field(message, name):
    return getattr(caffe_pb2, message).DESCRIPTOR.fields_by_name[name]


def _enum(message, enum, value):
    return getattr(caffe_pb2, message).DESCRIPTOR.enum_types_by_name[enum].values_by_name[value].number


NO_DEFAULT = object()

# (message, field, number, label, default); label is "optional", "repeated" or "required".
FIELD_FACTS = [
    ("BlobShape", "dim", 1, "repeated", NO_DEFAULT),
    ("BlobProto", "shape", 7, "optional", NO_DEFAULT),
    ("BlobProto", "data", 5, "repeated", NO_DEFAULT),
    ("BlobProto", "double_diff", 9, "repeated", NO_DEFAULT),
    ("BlobProto", "num", 1, "optional", 0),
    ("BlobProtoVector", "blobs", 1, "repeated", NO_DEFAULT),
    ("Datum", "encoded", 7, "optional", False),
    ("Datum", "float_data", 6, "repeated", NO_DEFAULT),
    ("FillerParameter", "type", 1, "optional", "constant"),
    ("FillerParameter", "std", 6, "optional", 1.0),
    ("FillerParameter", "sparse", 7, "optional", -1),
    ("FillerParameter", "variance_norm", 8, "optional", 0),  # FAN_IN
    ("NetParameter", "layer", 100, "repeated", NO_DEFAULT),
    ("NetParameter", "layers", 2, "repeated", NO_DEFAULT),
    ("NetParameter", "input_dim", 4, "repeated", NO_DEFAULT),
    ("NetParameter", "input_shape", 8, "repeated", NO_DEFAULT),
    ("SolverParameter", "net", 24, "optional", NO_DEFAULT),
    ("SolverParameter", "test_iter", 3, "repeated", NO_DEFAULT),
    ("SolverParameter", "test_initialization", 32, "optional", True),
    ("SolverParameter", "average_loss", 33, "optional", 1),
    ("SolverParameter", "iter_size", 36, "optional", 1),
    ("SolverParameter", "regularization_type", 29, "optional", "L2"),
    ("SolverParameter", "clip_gradients", 35, "optional", -1.0),
    ("SolverParameter", "snapshot_format", 37, "optional", 1),  # BINARYPROTO
    ("SolverParameter", "solver_mode", 17, "optional", 1),  # GPU
    ("SolverParameter", "random_seed", 20, "optional", -1),
    ("SolverParameter", "type", 40, "optional", "SGD"),
    ("SolverParameter", "delta", 31, "optional", 1e-8),
    ("SolverParameter", "momentum2", 39, "optional", 0.999),
    ("SolverParameter", "rms_decay", 38, "optional", 0.99),
    ("SolverParameter", "solver_type", 30, "optional", 0),  # SGD
    ("SolverParameter", "layer_wise_reduce", 41, "optional", True),
    ("SolverParameter", "weights", 42, "repeated", NO_DEFAULT),
    ("SolverState", "iter", 1, "optional", NO_DEFAULT),
    ("SolverState", "learned_net", 2, "optional", NO_DEFAULT),
    ("SolverState", "history", 3, "repeated", NO_DEFAULT),
    ("SolverState", "current_step", 4, "optional", 0),
    ("NetState", "phase", 1, "optional", 1),  # TEST
    ("NetStateRule", "not_stage", 5, "repeated", NO_DEFAULT),
    ("ParamSpec", "lr_mult", 3, "optional", 1.0),
    ("ParamSpec", "decay_mult", 4, "optional", 1.0),
    ("LayerParameter", "phase", 10, "optional", NO_DEFAULT),
    ("LayerParameter", "propagate_down", 11, "repeated", NO_DEFAULT),
    ("LayerParameter", "transform_param", 100, "optional", NO_DEFAULT),
    ("LayerParameter", "loss_param", 101, "optional", NO_DEFAULT),
    ("LayerParameter", "convolution_param", 106, "optional", NO_DEFAULT),
    ("LayerParameter", "pooling_param", 121, "optional", NO_DEFAULT),
    ("LayerParameter", "batch_norm_param", 139, "optional", NO_DEFAULT),
    ("LayerParameter", "input_param", 143, "optional", NO_DEFAULT),
    ("LayerParameter", "recurrent_param", 146, "optional", NO_DEFAULT),
    ("LayerParameter", "swish_param", 147, "optional", NO_DEFAULT),
    ("LayerParameter", "clip_param", 148, "optional", NO_DEFAULT),
    ("LayerParameter", "window_data_param", 129, "optional", NO_DEFAULT),
    ("TransformationParameter", "mean_value", 5, "repeated", NO_DEFAULT),
    ("LossParameter", "normalization", 3, "optional", 1),  # VALID
    ("LossParameter", "normalize", 2, "optional", NO_DEFAULT),
    ("ClipParameter", "min", 1, "required", NO_DEFAULT),
    ("ClipParameter", "max", 2, "required", NO_DEFAULT),
    ("ConcatParameter", "axis", 2, "optional", 1),
    ("BatchNormParameter", "moving_average_fraction", 2, "optional", 0.999),
    ("BatchNormParameter", "eps", 3, "optional", 1e-5),
    ("ConvolutionParameter", "bias_term", 2, "optional", True),
    ("ConvolutionParameter", "group", 5, "optional", 1),
    ("ConvolutionParameter", "axis", 16, "optional", 1),
    ("ConvolutionParameter", "kernel_size", 4, "repeated", NO_DEFAULT),
    ("ConvolutionParameter", "stride", 6, "repeated", NO_DEFAULT),
    ("ConvolutionParameter", "dilation", 18, "repeated", NO_DEFAULT),
    ("CropParameter", "axis", 1, "optional", 2),
    ("DataParameter", "backend", 8, "optional", 0),  # LEVELDB
    ("DataParameter", "prefetch", 10, "optional", 4),
    ("DataParameter", "batch_size", 4, "optional", NO_DEFAULT),
    ("DropoutParameter", "dropout_ratio", 1, "optional", 0.5),
    ("EltwiseParameter", "operation", 1, "optional", 1),  # SUM
    ("ImageDataParameter", "batch_size", 4, "optional", 1),
    ("ImageDataParameter", "root_folder", 12, "optional", ""),
    ("InnerProductParameter", "transpose", 6, "optional", False),
    ("LRNParameter", "beta", 3, "optional", 0.75),
    ("MVNParameter", "eps", 3, "optional", 1e-9),
    ("PoolingParameter", "stride", 3, "optional", 1),
    ("PoolingParameter", "global_pooling", 12, "optional", False),
    ("PoolingParameter", "round_mode", 13, "optional", 0),  # CEIL
    ("ReductionParameter", "operation", 1, "optional", 1),  # SUM
    ("ReshapeParameter", "num_axes", 3, "optional", -1),
    ("SliceParameter", "axis", 3, "optional", 1),
    ("SwishParameter", "beta", 1, "optional", 1.0),
    ("WindowDataParameter", "crop_mode", 11, "optional", "warp"),
    ("V1LayerParameter", "name", 4, "optional", NO_DEFAULT),
    ("V1LayerParameter", "type", 5, "optional", NO_DEFAULT),
    ("V1LayerParameter", "include", 32, "repeated", NO_DEFAULT),
    ("V1LayerParameter", "param", 1001, "repeated", NO_DEFAULT),
    ("V1LayerParameter", "blobs_lr", 7, "repeated", NO_DEFAULT),
    ("V1LayerParameter", "layer", 1, "optional", NO_DEFAULT),
    ("V0LayerParameter", "kernelsize", 8, "optional", NO_DEFAULT),
    ("V0LayerParameter", "blobs", 50, "repeated", NO_DEFAULT),
    ("V0LayerParameter", "hdf5_output_param", 1001, "optional", NO_DEFAULT),
    ("PReLUParameter", "channel_shared", 2, "optional", False),
]


@pytest.mark.parametrize("message,name,number,label,default", FIELD_FACTS,
                         ids=[f"{m}.{f}" for m, f, *_ in FIELD_FACTS])
def test_field_matches_caffe(message, name, number, label, default):
    field = _field(message, name)
    assert field.number == number
    actual_label = "repeated" if field.is_repeated else "required" if field.is_required else "optional"
    assert actual_label == label
    if default is NO_DEFAULT:
        assert not field.has_default_value
    else:
        assert field.has_default_value
        if isinstance(default, float):
            assert math.isclose(field.default_value, default, rel_tol=1e-6)
        else:
            assert field.default_value == default


PACKED = [
    ("BlobShape", "dim"), ("BlobProto", "data"), ("BlobProto", "diff"),
    ("BlobProto", "double_data"), ("BlobProto", "double_diff"),
]
NOT_PACKED = [
    ("Datum", "float_data"), ("NetParameter", "input_dim"), ("SolverParameter", "test_iter"),
    ("LayerParameter", "loss_weight"), ("ConvolutionParameter", "kernel_size"),
    ("TransformationParameter", "mean_value"), ("V1LayerParameter", "blobs_lr"),
]


@pytest.mark.parametrize("message,name", PACKED)
def test_packed_like_caffe(message, name):
    assert _field(message, name).is_packed


@pytest.mark.parametrize("message,name", NOT_PACKED)
def test_unpacked_like_caffe(message, name):
    assert not _field(message, name).is_packed


def test_enums_match_caffe():
    assert caffe_pb2.TRAIN == 0 and caffe_pb2.TEST == 1
    assert _enum("FillerParameter", "VarianceNorm", "AVERAGE") == 2
    assert _enum("SolverParameter", "SolverType", "ADAM") == 5
    assert _enum("SolverParameter", "SnapshotFormat", "HDF5") == 0
    assert _enum("LossParameter", "NormalizationMode", "NONE") == 3
    assert _enum("PoolingParameter", "RoundMode", "FLOOR") == 1
    assert _enum("PoolingParameter", "PoolMethod", "STOCHASTIC") == 2
    assert _enum("HingeLossParameter", "Norm", "L1") == 1
    assert _enum("ReductionParameter", "ReductionOp", "MEAN") == 4
    assert _enum("DataParameter", "DB", "LMDB") == 1
    layer_type = {
        "NONE": 0, "ABSVAL": 35, "ACCURACY": 1, "CONVOLUTION": 4, "DATA": 5,
        "DECONVOLUTION": 39, "DUMMY_DATA": 32, "INNER_PRODUCT": 14, "POOLING": 17,
        "RELU": 18, "SOFTMAX_LOSS": 21, "SLICE": 33, "THRESHOLD": 31,
    }
    for name, number in layer_type.items():
        assert _enum("V1LayerParameter", "LayerType", name) == number
    assert len(caffe_pb2.V1LayerParameter.LayerType.keys()) == 40


def test_kaffe_extension_is_the_only_addition():
    field = _field("SolverState", "kaffe_resume_state")
    assert field.number == 1000 and field.type == field.TYPE_STRING
    assert sorted(f.number for f in caffe_pb2.SolverState.DESCRIPTOR.fields) == [1, 2, 3, 4, 1000]
    assert len(caffe_pb2.DESCRIPTOR.message_types_by_name) == 63


def test_wire_bytes_match_caffe_encoding():
    # Hand-encoded with Caffe's field numbers and wire types.
    shape = caffe_pb2.BlobShape(dim=[2, 3])
    assert shape.SerializeToString() == b"\x0a\x02\x02\x03"  # field 1, packed varints
    blob = caffe_pb2.BlobProto(data=[1.0, -2.0])
    assert blob.SerializeToString() == b"\x2a\x08" + struct.pack("<2f", 1.0, -2.0)  # field 5, packed
    net = caffe_pb2.NetParameter()
    net.layer.add(name="a")
    assert net.SerializeToString() == b"\xa2\x06\x03\x0a\x01a"  # field 100, then name = 1
    state = caffe_pb2.SolverState(iter=7, kaffe_resume_state="{}")
    assert state.SerializeToString() == b"\x08\x07\xc2\x3e\x02{}"  # iter = 1, extension = 1000


def test_binary_round_trip_with_blobs():
    net = caffe_pb2.NetParameter(name="tiny")
    conv = net.layer.add(name="conv1", type="Convolution", bottom=["data"], top=["conv1"])
    conv.convolution_param.num_output = 2
    conv.convolution_param.kernel_size.append(3)
    conv.param.add(lr_mult=1.0)
    conv.param.add(lr_mult=2.0, decay_mult=0.0)
    weights = conv.blobs.add()
    weights.shape.dim.extend([2, 1, 3, 3])
    weights.data.extend(float(i) / 4 for i in range(18))
    bias = conv.blobs.add()
    bias.shape.dim.append(2)
    bias.data.extend([0.5, -0.5])
    conv.include.add(phase=caffe_pb2.TRAIN)

    parsed = caffe_pb2.NetParameter.FromString(net.SerializeToString())
    assert parsed == net
    layer = parsed.layer[0]
    assert list(layer.blobs[0].shape.dim) == [2, 1, 3, 3]
    assert list(layer.blobs[0].data) == [float(i) / 4 for i in range(18)]
    assert list(layer.blobs[1].data) == [0.5, -0.5]
    assert layer.param[1].decay_mult == 0.0
    assert layer.include[0].phase == caffe_pb2.TRAIN
    assert layer.convolution_param.group == 1  # default, unset
    assert not layer.convolution_param.HasField("group")


def test_text_format_round_trip():
    text = """
name: "LeNet"
layer {
  name: "data"
  type: "Input"
  top: "data"
  input_param { shape { dim: 64 dim: 1 dim: 28 dim: 28 } }
}
layer {
  name: "pool1"
  type: "Pooling"
  bottom: "data"
  top: "pool1"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 round_mode: FLOOR }
}
layer {
  name: "loss"
  type: "SoftmaxWithLoss"
  bottom: "pool1"
  bottom: "label"
  top: "loss"
  loss_param { normalization: BATCH_SIZE }
  include { phase: TEST stage: "val" }
}
"""
    net = text_format.Parse(text, caffe_pb2.NetParameter())
    assert net.layer[1].pooling_param.round_mode == caffe_pb2.PoolingParameter.FLOOR
    assert net.layer[2].loss_param.normalization == caffe_pb2.LossParameter.BATCH_SIZE
    again = text_format.Parse(text_format.MessageToString(net), caffe_pb2.NetParameter())
    assert again == net

    solver = text_format.Parse(
        'net: "train_val.prototxt" test_iter: 100 base_lr: 0.01 lr_policy: "step" '
        'stepsize: 1000 solver_mode: CPU type: "Adam" weights: "a.caffemodel"',
        caffe_pb2.SolverParameter(),
    )
    assert solver.solver_mode == caffe_pb2.SolverParameter.CPU
    assert text_format.Parse(text_format.MessageToString(solver), caffe_pb2.SolverParameter()) == solver
    assert solver.momentum2 == pytest.approx(0.999)

    legacy = text_format.Parse(
        'layers { name: "conv1" type: CONVOLUTION blobs_lr: 1 blobs_lr: 2 '
        'convolution_param { num_output: 20 kernel_size: 5 } } '
        'layers { layer { name: "ip" type: "innerproduct" num_output: 10 } }',
        caffe_pb2.NetParameter(),
    )
    assert legacy.layers[0].type == caffe_pb2.V1LayerParameter.CONVOLUTION
    assert legacy.layers[1].layer.type == "innerproduct"
    assert text_format.Parse(text_format.MessageToString(legacy), caffe_pb2.NetParameter()) == legacy
