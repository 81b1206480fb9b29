"""Crash safety: `kaffe train` killed with SIGKILL at seeded random moments (set-up, mid-iteration, mid-snapshot)
and re-run with `--snapshot auto` ends with the weights of an uninterrupted run, and every snapshot on disk loads."""
import fcntl
import os
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from kaffe.engine.errors import KaffeError, StorageError
from kaffe.engine import io as kaffe_io
from kaffe.engine.io import read_binary_proto
from kaffe.engine.net import Net
from kaffe.proto import caffe_pb2
from kaffe.solvers import get_solver
from kaffe.solvers.snapshot_files import check_complete, latest_complete, snapshot_states

# random data every pass (DummyData draws from kaffe's RNG), so an exact resume needs the RNG state too
NET = """
name: "drill"
layer { name: "data" type: "DummyData" top: "data" top: "label"
        dummy_data_param { shape { dim: 16 dim: 64 } shape { dim: 16 }
                           data_filler { type: "gaussian" } data_filler { type: "constant" value: 1 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
        inner_product_param { num_output: 256 weight_filler { type: "xavier" } } }
layer { name: "relu" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
        inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }
layer { name: "acc" type: "Accuracy" bottom: "ip2" bottom: "label" top: "acc" include { phase: TEST } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }
"""
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
DISPLAY = re.compile(r"\] Iteration \d+ \(")
SNAPSHOTTING = re.compile(r"\] Snapshotting (to|solver state)")


def make_job(folder, max_iter, snapshot_format="BINARYPROTO"):
    folder.mkdir()
    (folder / "net.prototxt").write_text(NET)
    (folder / "solver.prototxt").write_text(
        f'net: "net.prototxt" type: "Adam" base_lr: 0.01 momentum: 0.9 momentum2: 0.999 lr_policy: "step" '
        f'gamma: 0.5 stepsize: 7 max_iter: {max_iter} display: 1 test_iter: 2 test_interval: 5 snapshot: 2 '
        f'snapshot_format: {snapshot_format} snapshot_prefix: "snap/drill" random_seed: 7\n')
    (folder / "snap").mkdir()
    return folder


def train_command(*flags):
    return [sys.executable, "-m", "kaffe.tools.cli", "train", "--solver", "solver.prototxt", *flags]


def run_to_end(folder, *flags):
    result = subprocess.run(train_command(*flags), cwd=folder, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


def run_and_kill(folder, moment, rng):
    """Start `kaffe train --snapshot auto` and SIGKILL it at `moment`; returns whether it was killed."""
    process = subprocess.Popen(train_command("--snapshot", "auto"), cwd=folder, stderr=subprocess.PIPE, text=True)
    # the smallest pipe: the child blocks on its log a few lines ahead of what this reads, so it is killed
    # close to the line that triggers the kill, not hundreds of iterations later
    fcntl.fcntl(process.stderr.fileno(), F_SETPIPE_SZ, 4096)
    try:
        if moment == "set-up":   # while Python, the nets or the restore are being set up
            time.sleep(rng.uniform(0.0, 1.5))
        else:
            pattern, count = ((DISPLAY, rng.randint(1, 6)) if moment == "iteration"
                              else (SNAPSHOTTING, rng.randint(1, 4)))
            for line in process.stderr:
                if pattern.search(line):
                    count -= 1
                    if count == 0:
                        if moment == "iteration":
                            time.sleep(rng.uniform(0.0, 0.003))
                        break
        if process.poll() is not None:
            return False
        process.send_signal(signal.SIGKILL)
        return True
    finally:
        process.wait(timeout=60)
        process.stderr.close()


def assert_every_snapshot_loads(folder):
    prefix = str(folder / "snap" / "drill")
    for state_file in snapshot_states(prefix):
        check_complete(state_file)   # the state and the weights it names read back


def final_weights(folder, max_iter, extension=".caffemodel"):
    path = folder / "snap" / f"drill_iter_{max_iter}{extension}"
    net = Net(str(folder / "net.prototxt"), caffe_pb2.TEST, weights=str(path))
    return {name: [b.data.copy() for b in blobs] for name, blobs in net.params.items()}


def kill_drill(tmp_path, kills, max_iter, seed, snapshot_format="BINARYPROTO"):
    extension = ".caffemodel.h5" if snapshot_format == "HDF5" else ".caffemodel"
    reference = make_job(tmp_path / "reference", max_iter, snapshot_format)
    run_to_end(reference)
    drill = make_job(tmp_path / "drill", max_iter, snapshot_format)
    rng = random.Random(seed)
    moments = ["set-up", "iteration", "snapshot"]
    killed = {m: 0 for m in moments}
    for i in range(kills):
        moment = moments[i % 3] if i < 3 else rng.choice(moments)
        killed[moment] += run_and_kill(drill, moment, rng)
        assert not any(p.endswith(".tempfile") for p in os.listdir(drill / "snap"))
        assert_every_snapshot_loads(drill)
    log = run_to_end(drill, "--snapshot", "auto")
    assert "Optimization Done." in log
    assert not [p for p in os.listdir(drill / "snap") if p.startswith(".tmp-")]   # the killed runs' halves removed
    assert_every_snapshot_loads(drill)
    expected, got = final_weights(reference, max_iter, extension), final_weights(drill, max_iter, extension)
    for name in expected:
        for a, b in zip(expected[name], got[name]):
            assert np.max(np.abs(a - b)) <= 1e-6, name
    return killed


def test_a_few_kills_at_each_kind_of_moment_resume_to_the_same_weights(tmp_path):
    killed = kill_drill(tmp_path, kills=5, max_iter=40, seed=1)
    assert sum(killed.values()) >= 4 and all(killed.values()), killed


@pytest.mark.slow
@pytest.mark.parametrize("snapshot_format", ["BINARYPROTO", "HDF5"])
def test_thirty_random_kills_resume_to_the_same_weights(tmp_path, snapshot_format):
    killed = kill_drill(tmp_path, kills=32, max_iter=220, seed=17, snapshot_format=snapshot_format)
    assert sum(killed.values()) >= 30 and all(killed.values()), killed


def test_auto_starts_fresh_without_snapshots_and_skips_incomplete_ones(tmp_path):
    job = make_job(tmp_path / "job", max_iter=6)
    log = run_to_end(job, "--snapshot", "auto")
    assert "No complete snapshot of 'snap/drill' yet: starting from scratch" in log
    prefix = str(job / "snap" / "drill")
    assert latest_complete(prefix).endswith("drill_iter_6.solverstate")
    # the newest state loses its weights, and a half-written temporary lies about: auto takes iteration 4
    os.remove(job / "snap" / "drill_iter_6.caffemodel")
    (job / "snap" / ".tmp-drill_iter_8.caffemodel.abc").write_bytes(b"\x08\x01half")
    (job / "snap" / "drill_iter_0.tempfile").write_bytes(b"")   # the write probe of a run killed at once
    log = run_to_end(job, "--snapshot", "auto", "--iterations", "8")
    assert "Skipping snapshot snap/drill_iter_6.solverstate" in log
    assert "Restoring previous solver status from snap/drill_iter_4.solverstate" in log
    assert not (job / "snap" / ".tmp-drill_iter_8.caffemodel.abc").exists()
    assert not (job / "snap" / "drill_iter_0.tempfile").exists()
    assert (job / "snap" / "drill_iter_8.solverstate").exists()


def test_a_snapshot_pair_is_written_weights_first_and_each_file_whole(tmp_path, monkeypatch):
    """Every file reaches its name complete: a write that fails half-way leaves the earlier pair as it was."""
    job = make_job(tmp_path / "job", max_iter=4)
    monkeypatch.chdir(job)
    solver = get_solver("solver.prototxt")
    solver.param.snapshot = 0   # snapshots only where this test asks
    solver.step(2)
    first_model, first_state = solver.snapshot()
    before = {p: open(p, "rb").read() for p in (first_model, first_state)}
    solver.step(2)
    real = kaffe_io.write_binary_proto
    order = []

    def failing_state_write(message, path):
        order.append(os.path.basename(path))
        if path.endswith(".solverstate"):
            raise StorageError(f"cannot write {path}: No space left on device (the partial file was removed)", 28)
        real(message, path)
    monkeypatch.setattr("kaffe.solvers.solver.write_binary_proto", failing_state_write)
    with pytest.raises(KaffeError, match="Snapshot at iteration 4 failed.*No space left on device"):
        solver.snapshot()
    assert order == ["drill_iter_4.caffemodel", "drill_iter_4.solverstate"]
    assert sorted(os.listdir("snap")) == ["drill_iter_2.caffemodel", "drill_iter_2.solverstate"]
    assert {p: open(p, "rb").read() for p in before} == before
    assert read_binary_proto(first_state, caffe_pb2.SolverState()).iter == 2


def test_auto_with_weights_fine_tunes_only_a_fresh_start(tmp_path):
    trained = make_job(tmp_path / "trained", max_iter=4)
    run_to_end(trained)
    weights = str(trained / "snap" / "drill_iter_4.caffemodel")
    job = make_job(tmp_path / "job", max_iter=4)
    solver = job / "solver.prototxt"
    solver.write_text(solver.read_text().replace("snapshot: 2", "snapshot: 0"))   # only the one after training
    run_to_end(job, "--snapshot", "auto", "--weights", weights, "--iterations", "0")   # fresh: the weights
    assert read_binary_proto(str(job / "snap" / "drill_iter_0.caffemodel"), caffe_pb2.NetParameter()).layer[1] \
        .blobs[0].data == read_binary_proto(weights, caffe_pb2.NetParameter()).layer[1].blobs[0].data
    log = run_to_end(job, "--snapshot", "auto", "--weights", weights)   # a snapshot exists: resumed from it
    assert "Restoring previous solver status from snap/drill_iter_0.solverstate" in log
