"""Snapshots in both formats (binary proto and HDF5): Caffe's layouts, exact resumes for every rule, loading."""
import json
import subprocess
import sys

import h5py
import numpy as np
import pytest
from google.protobuf import text_format

import kaffe as caffe
from kaffe.engine import device
from kaffe.engine.errors import KaffeError
from kaffe.proto import caffe_pb2

from gradient_check import opencl_available

# random data every pass (DummyData draws from kaffe's RNG), so an exact resume needs the RNG state too
NET = """
name: "shared"
layer { name: "data" type: "DummyData" top: "data" top: "label"
        dummy_data_param { shape { dim: 8 dim: 5 } shape { dim: 8 }
                           data_filler { type: "gaussian" } data_filler { type: "constant" value: 1 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
        param { name: "w" lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
        inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.3 }
                              bias_filler { type: "constant" value: 0.1 } } }
layer { name: "relu" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
        param { name: "w" } param { lr_mult: 1 }
        inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "ip3" type: "InnerProduct" bottom: "ip2" top: "ip3"
        inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip3" bottom: "label" top: "loss" }
"""
# ip2's weights share ip1's ("w"): 5 learnable parameters (w, ip1 bias, ip2 bias, ip3 weights, ip3 bias)
LEARNABLE_SHAPES = [(5, 5), (5,), (5,), (3, 5), (3,)]

RULES = {
    "SGD": 'base_lr: 0.05 momentum: 0.9',
    "Nesterov": 'base_lr: 0.05 momentum: 0.9',
    "AdaGrad": 'base_lr: 0.05',
    "RMSProp": 'base_lr: 0.01 rms_decay: 0.9',
    "AdaDelta": 'base_lr: 1.0 momentum: 0.9 delta: 0.000001',
    "Adam": 'base_lr: 0.01 momentum: 0.9 momentum2: 0.999',
}
FORMATS = {"BINARYPROTO": ("", ".caffemodel", ".solverstate"),
           "HDF5": (".h5", ".caffemodel.h5", ".solverstate.h5")}


def solver_param(rule, prefix, fmt="BINARYPROTO", extra=""):
    # multistep keeps current_step in the state; weight decay and iter_size take part too
    text = (f'net_param {{ {NET} }} type: "{rule}" {RULES[rule]} lr_policy: "multistep" gamma: 0.5 '
            f'stepvalue: 2 stepvalue: 6 weight_decay: 0.001 iter_size: 2 max_iter: 9 snapshot: 4 '
            f'snapshot_prefix: "{prefix}" snapshot_format: {fmt} display: 0 random_seed: 11')
    return text_format.Merge(extra, text_format.Parse(text, caffe_pb2.SolverParameter()))  # extra wins


def weights(net):
    return {name: [b.data.copy() for b in blobs] for name, blobs in net.params.items()}


def assert_same_weights(a, b, tol=1e-6):
    assert a.keys() == b.keys()
    for name in a:
        for x, y in zip(a[name], b[name]):
            assert np.abs(x - y).max() <= tol, name


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("rule", sorted(RULES))
def test_resume_equals_the_uninterrupted_run(tmp_path, rule, fmt):
    full = caffe.get_solver(solver_param(rule, tmp_path / "full", fmt))
    full.solve()
    assert full.iter == 9
    final = weights(full.net)
    state = tmp_path / f"full_iter_4{FORMATS[fmt][2]}"
    assert state.exists() and (tmp_path / f"full_iter_4{FORMATS[fmt][1]}").exists()
    caffe.set_random_seed(999)          # the state brings back the RNG, whatever the new process's seed
    resumed = caffe.get_solver(solver_param(rule, tmp_path / "resumed", fmt))
    resumed.solve(str(state))
    assert resumed.iter == 9 and resumed.current_step == full.current_step == 2
    assert_same_weights(final, weights(resumed.net))
    for a, b in zip(full.history_blobs(), resumed.history_blobs()):
        assert np.abs(a.data - b.data).max() <= 1e-6
    assert not list(tmp_path.glob(".tmp-*"))      # atomic writes leave no temporaries


@pytest.mark.opencl
@pytest.mark.skipif(not opencl_available(), reason="no OpenCL platform (install pocl-opencl-icd)")
@pytest.mark.parametrize("rule", ["AdaDelta", "Adam"])
def test_gpu_mode_resume_from_hdf5(tmp_path, rule):
    device.set_mode_gpu()
    try:
        full = caffe.get_solver(solver_param(rule, tmp_path / "full", "HDF5"))
        full.solve()
        resumed = caffe.get_solver(solver_param(rule, tmp_path / "resumed", "HDF5"))
        resumed.solve(str(tmp_path / "full_iter_4.solverstate.h5"))
        assert_same_weights(weights(full.net), weights(resumed.net))
    finally:
        device.set_mode_cpu()


def test_hdf5_layout_is_caffes(tmp_path):
    solver = caffe.get_solver(solver_param("Adam", tmp_path / "lin", "HDF5", "snapshot_diff: true"))
    solver.step(4)
    model, state = tmp_path / "lin_iter_4.caffemodel.h5", tmp_path / "lin_iter_4.solverstate.h5"
    with h5py.File(model, "r") as f:
        assert set(f) == {"data", "diff"}
        # a group per layer, parameterless ones included; the shared weight only under its owner
        assert set(f["data"]) == {"data", "ip1", "relu", "ip2", "ip3", "loss"}
        assert {name: sorted(f["data"][name]) for name in f["data"]} == {
            "data": [], "ip1": ["0", "1"], "relu": [], "ip2": ["1"], "ip3": ["0", "1"], "loss": []}
        for name, blobs in solver.net.params.items():
            for j, blob in enumerate(blobs):
                if f"{name}/{j}" != "ip2/0":
                    dataset = f["data"][name][str(j)]
                    assert dataset.dtype == np.float32 and dataset.shape == blob.shape
                    np.testing.assert_array_equal(dataset[()], blob.data)
                # diffs of every parameter, shared ones too
                np.testing.assert_array_equal(f["diff"][name][str(j)][()], blob.diff)
    with h5py.File(state, "r") as f:
        assert set(f) == {"iter", "learned_net", "current_step", "history", "kaffe_resume_state"}
        for name, value in (("iter", 4), ("current_step", 1)):
            assert f[name].dtype == np.int32 and f[name].shape == (1,) and f[name][0] == value
        assert f["learned_net"].shape == () and f["learned_net"].dtype.kind == "S"
        assert f["learned_net"][()].split(b"\0")[0].decode() == str(model)
        # Adam: all first moments, then all second moments
        assert sorted(f["history"], key=int) == [str(i) for i in range(10)]
        assert [f["history"][str(i)].shape for i in range(10)] == LEARNABLE_SHAPES * 2
        for i, blob in enumerate(solver.history_blobs()):
            np.testing.assert_array_equal(f["history"][str(i)][()], blob.data)
        assert (f["history"]["5"][()] >= 0).all()           # a second moment
        extra = json.loads(f["kaffe_resume_state"][()].split(b"\0")[0])
        assert set(extra) >= {"rng", "train_net"}


def test_binary_state_keeps_both_history_sets_in_caffes_order(tmp_path):
    solver = caffe.get_solver(solver_param("AdaDelta", tmp_path / "lin"))
    solver.step(4)
    state = caffe_pb2.SolverState.FromString((tmp_path / "lin_iter_4.solverstate").read_bytes())
    assert state.iter == 4 and state.current_step == 1
    assert [tuple(h.shape.dim) for h in state.history] == LEARNABLE_SHAPES * 2
    for stored, blob in zip(state.history, solver.history_blobs()):
        np.testing.assert_array_equal(np.array(stored.data, np.float32).reshape(blob.shape), blob.data)


def test_net_hdf5_round_trip_and_weights_loading(tmp_path):
    param = solver_param("SGD", tmp_path / "a")
    source = caffe.get_solver(param).net
    source.save_hdf5(str(tmp_path / "w.caffemodel.h5"))
    target = caffe.get_solver(solver_param("SGD", tmp_path / "b", extra="random_seed: 12")).net
    assert np.abs(target.params["ip3"][0].data - source.params["ip3"][0].data).max() > 0
    target.copy_from(str(tmp_path / "w.caffemodel.h5"))        # signature detection, as --weights
    assert_same_weights(weights(source), weights(target))
    np.testing.assert_array_equal(target.params["ip2"][0].data, source.params["ip1"][0].data)  # still shared
    other = caffe.get_solver(solver_param("SGD", tmp_path / "c", extra="random_seed: 13")).net
    other.load_hdf5(str(tmp_path / "w.caffemodel.h5"))
    assert_same_weights(weights(source), weights(other))


def test_hdf5_loading_errors(tmp_path, kaffe_log):
    net = caffe.get_solver(solver_param("SGD", tmp_path / "a")).net
    path = tmp_path / "w.caffemodel.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("data/ip3/0", data=np.zeros((4, 5), np.float32))
        f.create_dataset("data/extra/0", data=np.zeros(3, np.float32))   # read first: names go in order
    with pytest.raises(KaffeError, match=r"w.caffemodel.h5: Cannot load blob /data/ip3/0 from hdf5; shape mismatch. "
                                         r"Source shape is 4 5 \(20\) target shape is 3 5 \(15\)"):
        net.copy_from(str(path))
    assert "Ignoring source layer extra" in kaffe_log
    with h5py.File(path, "w") as f:
        f.create_dataset("data/ip3/0", data=np.zeros((3, 5), np.float32))
    with pytest.raises(KaffeError, match="Incompatible number of blobs for layer ip3: param 1 is missing"):
        net.copy_from(str(path))
    with h5py.File(path, "w") as f:
        for j in range(3):
            f.create_dataset(f"data/ip3/{j}", data=np.zeros(3, np.float32))
    with pytest.raises(KaffeError, match="Incompatible number of blobs for layer ip3: the net has 2, the weights "
                                         "have 3"):
        net.copy_from(str(path))
    with h5py.File(path, "w") as f:
        f.create_dataset("weights", data=np.zeros(3, np.float32))
    with pytest.raises(KaffeError, match="no 'data' group"):
        net.copy_from(str(path))
    with pytest.raises(KaffeError, match="file not found"):
        net.load_hdf5(str(tmp_path / "missing.caffemodel.h5"))


def test_restore_rejects_bad_hdf5_states(tmp_path):
    sgd = caffe.get_solver(solver_param("SGD", tmp_path / "sgd", "HDF5"))
    sgd.step(4)
    adam = caffe.get_solver(solver_param("Adam", tmp_path / "adam", "HDF5"))
    with pytest.raises(KaffeError, match="Incorrect length of history blobs: the file has 5, this solver and net "
                                         "need 10"):
        adam.restore(str(tmp_path / "sgd_iter_4.solverstate.h5"))
    (tmp_path / "junk.solverstate.h5").write_bytes(b"not hdf5 at all")
    with pytest.raises(KaffeError, match="junk.solverstate.h5: not a readable HDF5 file"):
        adam.restore(str(tmp_path / "junk.solverstate.h5"))
    with h5py.File(tmp_path / "empty.solverstate.h5", "w"):
        pass
    with pytest.raises(KaffeError, match="Failed to load int dataset with name iter"):
        adam.restore(str(tmp_path / "empty.solverstate.h5"))


def test_binary_restore_rejects_a_history_of_the_wrong_shape(tmp_path):
    solver = caffe.get_solver(solver_param("SGD", tmp_path / "s"))
    solver.step(4)
    state = caffe_pb2.SolverState.FromString((tmp_path / "s_iter_4.solverstate").read_bytes())
    state.history[0].shape.dim[:] = [25]
    (tmp_path / "bad.solverstate").write_bytes(state.SerializeToString())
    with pytest.raises(KaffeError, match=r"does not match the stored shape"):
        solver.restore(str(tmp_path / "bad.solverstate"))


# -- the command line ----------------------------------------------------------------------------------------
def kaffe(*args, cwd):
    result = subprocess.run([sys.executable, "-m", "kaffe.tools.cli", *args], cwd=cwd, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


def read_h5_weights(path):
    with h5py.File(path, "r") as f:
        return {name: [f["data"][name][j][()] for j in sorted(f["data"][name], key=int)] for name in f["data"]}


def test_cli_resumes_from_solverstate_h5_and_finetunes_from_caffemodel_h5(tmp_path):
    (tmp_path / "net.prototxt").write_text(NET)
    solver = ('net: "net.prototxt" type: "Adam" base_lr: 0.01 momentum: 0.9 momentum2: 0.999 lr_policy: "fixed" '
              'max_iter: 8 snapshot: 4 snapshot_format: HDF5 display: 2 random_seed: 5 snapshot_prefix: "{}"\n')
    (tmp_path / "full.prototxt").write_text(solver.format("full"))
    (tmp_path / "resumed.prototxt").write_text(solver.format("resumed"))
    log = kaffe("train", "--solver", "full.prototxt", cwd=tmp_path)
    assert "Snapshotting to HDF5 file full_iter_4.caffemodel.h5" in log
    assert "Snapshotting solver state to HDF5 file full_iter_8.solverstate.h5" in log
    kaffe("train", "--solver", "resumed.prototxt", "--snapshot", "full_iter_4.solverstate.h5", cwd=tmp_path)
    full, resumed = read_h5_weights(tmp_path / "full_iter_8.caffemodel.h5"), read_h5_weights(
        tmp_path / "resumed_iter_8.caffemodel.h5")
    assert_same_weights(full, resumed)
    log = kaffe("train", "--solver", "resumed.prototxt", "--weights", "full_iter_8.caffemodel.h5", cwd=tmp_path)
    assert "Iteration 0" in log
    log = kaffe("test", "--model", "net.prototxt", "--weights", "full_iter_8.caffemodel.h5", "--iterations", "2",
                cwd=tmp_path)
    assert "loss = " in log
