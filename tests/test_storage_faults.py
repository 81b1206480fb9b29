"""Storage faults: a missing or read-only snapshot folder is reported before the first iteration; a full disk
(a small tmpfs) or the file-size limit of `ulimit -f` during a snapshot leaves the previous snapshot intact,
removes the partial files and stops with a clear message, or warns and trains on with --snapshot_failure continue."""
import contextlib
import os
import resource
import signal
import subprocess
import sys

import pytest

from kaffe.solvers.snapshot_files import check_complete, snapshot_states

NET = """
name: "disk"
layer { name: "data" type: "DummyData" top: "data" top: "label"
        dummy_data_param { shape { dim: 8 dim: 64 } shape { dim: 8 }
                           data_filler { type: "gaussian" } data_filler { type: "constant" value: 1 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
        inner_product_param { num_output: 64 weight_filler { type: "xavier" } } }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
        inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }
"""
# Adam keeps two history blobs per parameter: a .solverstate is about twice its .caffemodel
WEIGHT_BYTES = 4 * (64 * 64 + 64 + 3 * 64 + 3)


def make_job(folder, prefix="snap/disk", snapshot_format="BINARYPROTO", max_iter=30):
    (folder / "net.prototxt").write_text(NET)
    (folder / "solver.prototxt").write_text(
        f'net: "net.prototxt" type: "Adam" base_lr: 0.01 lr_policy: "fixed" max_iter: {max_iter} display: 5 '
        f'snapshot: 3 snapshot_format: {snapshot_format} snapshot_prefix: "{prefix}" random_seed: 3\n')
    return folder


def train(folder, *flags, preexec_fn=None):
    return subprocess.run([sys.executable, "-m", "kaffe.tools.cli", "train", "--solver", "solver.prototxt", *flags],
                          cwd=folder, capture_output=True, text=True, timeout=300, preexec_fn=preexec_fn)


def assert_clean_failure(result, *texts):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    for text in texts:
        assert text in result.stderr, (text, result.stderr[-3000:])


def assert_snapshots_intact(folder):
    """No temporaries, no weights without their state, and every state (with its weights) loads."""
    names = os.listdir(folder)
    assert not [n for n in names if n.startswith(".tmp-") or n.endswith(".tempfile")], names
    for name in names:
        if ".caffemodel" in name:
            assert name.replace(".caffemodel", ".solverstate") in names, names
    states = snapshot_states(str(folder / "disk"))
    for state in states:
        check_complete(state)
    return states


@contextlib.contextmanager
def tmpfs(folder, options):
    folder.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def test_a_missing_snapshot_folder_is_reported_before_training(tmp_path):
    result = train(make_job(tmp_path, prefix="no/such/folder/disk"))
    assert_clean_failure(result, "Cannot write to snapshot prefix 'no/such/folder/disk' (No such file or directory). "
                                 "Make sure that the directory exists and is writable.")
    assert "Iteration" not in result.stderr


def test_a_read_only_snapshot_folder_is_reported_before_training(tmp_path):
    job = make_job(tmp_path)
    if os.geteuid() == 0:
        context = tmpfs(tmp_path / "snap", "ro,size=64k")
    else:
        (tmp_path / "snap").mkdir(mode=0o555)
        context = contextlib.nullcontext()
    with context:
        result = train(job)
    assert_clean_failure(result, "Cannot write to snapshot prefix 'snap/disk' (Read-only file system)"
                         if os.geteuid() == 0 else "Cannot write to snapshot prefix 'snap/disk' (Permission denied)")
    assert "Iteration" not in result.stderr


@pytest.mark.parametrize("snapshot_format", ["BINARYPROTO", "HDF5"])
def test_a_full_disk_at_the_nth_snapshot_stops_with_the_previous_one_intact(tmp_path, snapshot_format):
    job = make_job(tmp_path, snapshot_format=snapshot_format)
    with tmpfs(tmp_path / "snap", "size=128k") as snap:   # room for a few snapshot pairs, not for ten
        result = train(job)
        assert_clean_failure(result, "No space left on device", "The previous snapshots are intact",
                             "--snapshot auto")
        states = assert_snapshots_intact(snap)
        assert len(states) >= 2   # it is the Nth snapshot that fails, not the first
        failed = int(result.stderr.split("Snapshot at iteration ")[1].split()[0])
        assert states[0].endswith(f"disk_iter_{failed - 3}.solverstate" + (".h5" if snapshot_format == "HDF5" else ""))


def test_a_full_disk_with_snapshot_failure_continue_trains_on(tmp_path):
    job = make_job(tmp_path)
    with tmpfs(tmp_path / "snap", "size=128k") as snap:
        result = train(job, "--snapshot_failure", "continue")
        assert result.returncode == 0, result.stderr[-3000:]
        assert "training goes on (--snapshot_failure continue)" in result.stderr
        assert "Iteration 30, loss" in result.stderr and "Optimization Done." in result.stderr
        assert len(assert_snapshots_intact(snap)) >= 2


@pytest.mark.parametrize("ignore_sigxfsz", [True, False], ids=["SIGXFSZ ignored", "SIGXFSZ default"])
def test_ulimit_f_during_a_snapshot_stops_cleanly(tmp_path, ignore_sigxfsz):
    """A limit between the size of the weights and that of the solver state: the weights are written, the
    state is not, and the weights that no state names are removed again."""
    job = make_job(tmp_path)
    (tmp_path / "snap").mkdir()

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (WEIGHT_BYTES * 3 // 2, resource.RLIM_INFINITY))
        if ignore_sigxfsz:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    result = train(job, preexec_fn=limit_file_size)
    assert_clean_failure(result, "Snapshot at iteration 3 failed: cannot write snap/disk_iter_3.solverstate: "
                                 "File too large (the partial file was removed)")
    assert os.listdir(tmp_path / "snap") == []
