"""Data-parallel training over MPI (solvers/distributed.py): `mpiexec -n 2 kaffe train` against one process.

Equivalence: 2 ranks x batch B give, after N iterations, the weights of 1 process x batch 2B (Caffe's rule:
rank r reads records r, r + 2, ...; gradients summed and scaled by 1/2). With BatchNorm in TRAIN each rank
normalises with its own batch's statistics (as Caffe's multi-GPU), which is what one process with batch B and
iter_size 2 does; that is the reference there (batch 2B in one process would normalise over 2B items).
"""
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from kaffe.engine.io import read_binary_proto
from kaffe.proto import caffe_pb2
from kaffe.solvers import get_solver

pytestmark = pytest.mark.skipif(shutil.which("mpiexec") is None, reason='mpiexec not found: pip install "kaffe[mpi]"')

LENET = """name: "LeNet"
layer {{ name: "mnist" type: "Data" top: "data" top: "label" include {{ phase: TRAIN }}
  transform_param {{ scale: 0.00390625 }} data_param {{ source: "{train}" batch_size: {batch} backend: LMDB }} }}
layer {{ name: "mnist" type: "Data" top: "data" top: "label" include {{ phase: TEST }}
  transform_param {{ scale: 0.00390625 }} data_param {{ source: "{test}" batch_size: 100 backend: LMDB }} }}
layer {{ name: "conv1" type: "Convolution" bottom: "data" top: "conv1" param {{ lr_mult: 1 }} param {{ lr_mult: 2 }}
  convolution_param {{ num_output: {conv1} kernel_size: 5 stride: 1 weight_filler {{ type: "xavier" }} }} }}
{norm}layer {{ name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param {{ pool: MAX kernel_size: 2 stride: 2 }} }}
layer {{ name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2" param {{ lr_mult: 1 }} param {{ lr_mult: 2 }}
  convolution_param {{ num_output: {conv2} kernel_size: 5 stride: 1 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "pool2" type: "Pooling" bottom: "conv2" top: "pool2"
  pooling_param {{ pool: MAX kernel_size: 2 stride: 2 }} }}
layer {{ name: "ip1" type: "InnerProduct" bottom: "pool2" top: "ip1" param {{ lr_mult: 1 }} param {{ lr_mult: 2 }}
  inner_product_param {{ num_output: {ip1} weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }}
layer {{ name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2" param {{ lr_mult: 1 }} param {{ lr_mult: 2 }}
  inner_product_param {{ num_output: 10 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "accuracy" type: "Accuracy" bottom: "ip2" bottom: "label" top: "accuracy"
  include {{ phase: TEST }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }}
"""
BATCH_NORM = """layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }
layer { name: "scale1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }
"""
SOLVER = """net: "{net}"
momentum: 0.9 weight_decay: 0.0005 lr_policy: "inv" gamma: 0.0001 power: 0.75
display: {display} max_iter: {iterations} snapshot_prefix: "{prefix}" random_seed: 1 iter_size: {iter_size}
{extra}
"""
SGD = 'type: "SGD" base_lr: 0.01'
ADAM = 'type: "Adam" base_lr: 0.001 momentum2: 0.999 delta: 1e-8'  # Caffe's lenet_solver_adam
FULL = dict(conv1=20, conv2=50, ip1=500)      # Caffe's LeNet
SMALL = dict(conv1=4, conv2=8, ip1=32)        # the same layers, small enough for the unit suite


def write_run(folder, mnist, batch, iterations, size=SMALL, norm="", iter_size=1, extra=SGD, display=0):
    """A LeNet-style net and solver in folder (snapshot at the end: <folder>/run_iter_N.*); the solver path."""
    folder.mkdir(parents=True, exist_ok=True)
    net = folder / "net.prototxt"
    net.write_text(LENET.format(train=mnist / "mnist_train_lmdb", test=mnist / "mnist_test_lmdb", batch=batch,
                                norm=norm, **size))
    solver = folder / "solver.prototxt"
    solver.write_text(SOLVER.format(net=net, prefix=folder / "run", iterations=iterations, iter_size=iter_size,
                                    extra=extra, display=display))
    return solver


def mpiexec(args, ranks=2, timeout=300, **kwargs):
    """`mpiexec -n ranks python -m kaffe.tools.cli ARGS` (one BLAS thread per rank); the CompletedProcess."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    command = ["mpiexec", "-n", str(ranks), sys.executable, "-m", "kaffe.tools.cli", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, **kwargs)


def train_alone(solver_path, iterations):
    solver = get_solver(str(solver_path))
    solver.solve()
    assert solver.iter == iterations


def weights(model_file):
    param = read_binary_proto(str(model_file), caffe_pb2.NetParameter())
    return {(layer.name, i): np.array(blob.data, dtype=np.float64) for layer in param.layer
            for i, blob in enumerate(layer.blobs)}


def differences(mine, reference):
    """{(layer, blob index): |mine - reference| / |reference|} of two .caffemodel files."""
    mine, reference = weights(mine), weights(reference)
    assert mine.keys() == reference.keys()
    return {key: np.linalg.norm(mine[key] - value) / max(np.linalg.norm(value), 1e-30)
            for key, value in reference.items()}


def assert_same_weights(mine, reference, rtol=1e-5, skip=()):
    """Within rtol (a number, or {key: tolerance}) relative to the reference, blob by blob."""
    for key, error in differences(mine, reference).items():
        tolerance = rtol.get(key, max(rtol.values())) if isinstance(rtol, dict) else rtol
        assert key in skip or error <= tolerance, f"{key}: relative difference {error:.3g} > {tolerance:.3g}"


def check_equivalence(tmp_path, mnist, iterations, size, extra=SGD, norm="", reference_iter_size=1, rtol=1e-5):
    """2 ranks x 32 against one process x 64 (or x 32 with iter_size 2): the same weights."""
    ranks = write_run(tmp_path / "ranks", mnist, 32, iterations, size, norm, extra=extra)
    alone = write_run(tmp_path / "alone", mnist, 64 // reference_iter_size, iterations, size, norm,
                      iter_size=reference_iter_size, extra=extra)
    result = mpiexec(["train", "--solver", str(ranks)])
    assert result.returncode == 0, result.stderr[-3000:]
    train_alone(alone, iterations)
    # BatchNorm's mean/variance blobs are each rank's own running statistics (rank 0's batches only); conv1's
    # bias feeds BatchNorm, which subtracts it again: its gradient is zero but for rounding, so it holds noise
    skip = [("bn1", 0), ("bn1", 1), ("bn1", 2), ("conv1", 1)] if norm else ()
    assert_same_weights(tmp_path / "ranks" / f"run_iter_{iterations}.caffemodel",
                        tmp_path / "alone" / f"run_iter_{iterations}.caffemodel", rtol, skip)
    return result


def float32_spread(tmp_path, mnist, iterations, size, extra):
    """How far one process drifts from itself when only the order of its float32 sums changes: batch 64
    against batch 32 with iter_size 2 (the same records, the same arithmetic otherwise)."""
    runs = [write_run(tmp_path / f"b{batch}", mnist, batch, iterations, size, iter_size=64 // batch, extra=extra)
            for batch in (64, 32)]
    for run in runs:
        train_alone(run, iterations)
    return differences(*(run.parent / f"run_iter_{iterations}.caffemodel" for run in runs))


def run_mpi_script(tmp_path, script, ranks=2, timeout=300):
    path = tmp_path / "script.py"
    path.write_text(script)
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run(["mpiexec", "-n", str(ranks), sys.executable, str(path)], env=env, capture_output=True,
                          text=True, timeout=timeout)


# -- equivalence (small nets in the unit suite; Caffe's LeNet for 200 iterations under -m slow) ----------------
def test_two_ranks_train_as_one_process_with_twice_the_batch(tmp_path, mnist_lmdb):
    result = check_equivalence(tmp_path, mnist_lmdb, 20, SMALL)
    assert result.stderr.count("Solving LeNet") == 1   # rank 0 writes the log, the other rank only errors


def test_batch_norm_uses_each_ranks_batch_statistics(tmp_path, mnist_lmdb):
    # the reference: one process with batch 32 and iter_size 2, whose BatchNorm normalises each pass of 32
    check_equivalence(tmp_path, mnist_lmdb, 20, SMALL, norm=BATCH_NORM, reference_iter_size=2)


def test_adam(tmp_path, mnist_lmdb):
    check_equivalence(tmp_path, mnist_lmdb, 20, SMALL, extra=ADAM)


def test_ranks_on_opencl_devices(tmp_path, mnist_lmdb):
    """`mpiexec -n 2 kaffe train --gpu all`: each rank on an OpenCL device (both on PoCL's one device here); the
    diffs come down into the reduction buffers and go back up for the update: one process's weights within the
    OpenCL parity tolerance."""
    from kaffe.engine import opencl
    if not opencl.devices():
        pytest.skip("no OpenCL platform (install pocl-opencl-icd)")
    ranks = write_run(tmp_path / "ranks", mnist_lmdb, 32, 10, SMALL)
    alone = write_run(tmp_path / "alone", mnist_lmdb, 64, 10, SMALL)
    result = mpiexec(["train", "--solver", str(ranks), "--gpu", "all"], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    train_alone(alone, 10)
    assert_same_weights(tmp_path / "ranks" / "run_iter_10.caffemodel", tmp_path / "alone" / "run_iter_10.caffemodel",
                        rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("extra, norm", [(SGD, ""), (SGD, BATCH_NORM), (ADAM, "")], ids=["sgd", "batchnorm", "adam"])
def test_lenet_200_iterations(tmp_path, mnist_lmdb, extra, norm):
    """Caffe's LeNet, 2 ranks x 32 against 1 process x 64 after 20 and 200 iterations: within 1e-5, or within 4
    times the spread of one process between two orders of the same float32 sums (batch 64 against batch 32 x
    iter_size 2), where that is larger. The spread grows with the iterations (a near-tie in max pooling that
    flips sends a gradient elsewhere; Adam divides small gradients by their own size): after 200 SGD iterations
    it is 1e-3 and more, so 1e-5 holds there only up to float32's own reproducibility. The spread is measured
    without BatchNorm; dividing by each batch's deviation, BatchNorm grows differences about twice as fast
    (measured: conv1 7.7e-3 after 200 iterations against a spread of 1.6e-3), hence 8 times the spread there."""
    iter_size, factor = (2, 8) if norm else (1, 4)
    for iterations in (20, 200):
        spread = float32_spread(tmp_path / f"spread{iterations}", mnist_lmdb, iterations, FULL, extra)
        check_equivalence(tmp_path / f"ranks{iterations}", mnist_lmdb, iterations, FULL, extra, norm,
                          reference_iter_size=iter_size,
                          rtol={key: max(1e-5, factor * value) for key, value in spread.items()})


@pytest.mark.slow
def test_lenet_10000_iterations_reaches_99_percent_and_resumes_exactly(tmp_path, mnist_lmdb):
    """Caffe's LeNet and solver, 2 ranks x batch 32; rank 0 tests on all 10,000 test images at the end; the run
    resumed from its 5,000-iteration snapshot (with both ranks' data cursors) ends with the same weights."""
    extra = SGD + " snapshot: 5000 test_iter: 100 test_interval: 10000"
    solver_path = write_run(tmp_path, mnist_lmdb, 32, 10000, FULL, extra=extra)
    result = mpiexec(["train", "--solver", str(solver_path)], timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    accuracy = float(result.stderr.split("Test net output #0: accuracy = ")[-1].split()[0])
    assert accuracy >= 0.99
    final = tmp_path / "run_iter_10000.caffemodel"
    final.rename(tmp_path / "straight.caffemodel")
    resumed = mpiexec(["train", "--solver", str(solver_path), "--snapshot", str(tmp_path / "run_iter_5000.solverstate")],
                      timeout=1800)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(final, tmp_path / "straight.caffemodel", rtol=0)


# -- pycaffe's multi-GPU names -------------------------------------------------------------------------------
def test_pycaffe_train_py_pattern(tmp_path, mnist_lmdb):
    """Caffe's python/train.py solve() under mpiexec: set_solver_count/rank, set_multiprocess, NCCL, bcast,
    add_callback, after_backward; the weights are those of `kaffe train` on one process with twice the batch."""
    solver = write_run(tmp_path / "ranks", mnist_lmdb, 32, 20)
    alone = write_run(tmp_path / "alone", mnist_lmdb, 64, 20)
    result = run_mpi_script(tmp_path, f"""
import kaffe as caffe
from mpi4py import MPI
rank, count = MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()
assert caffe.has_nccl()
caffe.set_mode_cpu()
caffe.set_solver_count(count)
caffe.set_solver_rank(rank)
caffe.set_multiprocess(True)
assert (caffe.solver_count(), caffe.solver_rank()) == (count, rank)
solver = caffe.SGDSolver({str(solver)!r})
nccl = caffe.NCCL(solver, caffe.NCCL.new_uid())
nccl.bcast()
solver.add_callback(nccl)
if solver.param.layer_wise_reduce:
    solver.net.after_backward(nccl)
solver.step(solver.param.max_iter)
if rank == 0:
    solver.snapshot()
""")
    assert result.returncode == 0, result.stderr[-3000:]
    train_alone(alone, 20)
    assert_same_weights(tmp_path / "ranks" / "run_iter_20.caffemodel", tmp_path / "alone" / "run_iter_20.caffemodel")


def test_nccl_without_an_mpi_launcher_says_how_to_start_it(tmp_path, mnist_lmdb):
    import kaffe
    solver = get_solver(str(write_run(tmp_path, mnist_lmdb, 32, 1)))
    with pytest.raises(kaffe.KaffeError, match="mpiexec -n 2 python script.py"):
        kaffe.NCCL(solver, kaffe.NCCL.new_uid())


# -- resume ---------------------------------------------------------------------------------------------------
def test_resume_with_the_same_rank_count_is_exact(tmp_path, mnist_lmdb):
    straight = write_run(tmp_path / "straight", mnist_lmdb, 32, 20)
    stopped = write_run(tmp_path / "stopped", mnist_lmdb, 32, 20, extra=SGD + " snapshot: 10")
    assert mpiexec(["train", "--solver", str(straight)]).returncode == 0
    first = mpiexec(["train", "--solver", str(stopped), "--iterations", "10"])
    assert first.returncode == 0, first.stderr[-3000:]
    state = read_binary_proto(str(tmp_path / "stopped" / "run_iter_10.solverstate"), caffe_pb2.SolverState())
    assert '"solver_count": 2' in state.kaffe_resume_state   # every rank's data cursors are in the snapshot
    (tmp_path / "stopped" / "run_iter_20.caffemodel").unlink(missing_ok=True)
    resumed = mpiexec(["train", "--solver", str(stopped), "--snapshot",
                       str(tmp_path / "stopped" / "run_iter_10.solverstate")])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(tmp_path / "stopped" / "run_iter_20.caffemodel",
                        tmp_path / "straight" / "run_iter_20.caffemodel", rtol=0)


def test_resume_with_another_rank_count_warns(tmp_path, mnist_lmdb, kaffe_log):
    solver_path = write_run(tmp_path, mnist_lmdb, 32, 20, extra=SGD + " snapshot: 10")
    assert mpiexec(["train", "--solver", str(solver_path), "--iterations", "10"]).returncode == 0
    solver = get_solver(str(solver_path))
    solver.solve(str(tmp_path / "run_iter_10.solverstate"))
    assert solver.iter == 20
    assert any("made by 2 rank(s) and training resumes with 1" in m for m in kaffe_log)


# -- failures: every rank stops, naming the rank and the reason ---------------------------------------------
def _rank_pid(rank, marker):
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read().split(b"\0")
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                command = f.read()
        except OSError:
            continue
        if f"PMI_RANK={rank}".encode() in environ and marker.encode() in command:
            return int(pid)
    return None


def _start_and_signal(tmp_path, mnist_lmdb, signum, env=()):
    solver_path = write_run(tmp_path, mnist_lmdb, 32, 1000000, extra=SGD + " snapshot: 10")
    command = ["mpiexec", "-n", "2", sys.executable, "-m", "kaffe.tools.cli", "train", "--solver", str(solver_path)]
    process = subprocess.Popen(command, env=dict(os.environ, OPENBLAS_NUM_THREADS="1", **dict(env)),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (tmp_path / "run_iter_10.solverstate").exists():   # training runs
        assert time.monotonic() < deadline and process.poll() is None, "training did not start"
        time.sleep(0.5)
    os.kill(_rank_pid(1, str(solver_path)), signum)
    try:
        out, err = process.communicate(timeout=30)   # every rank must be gone within 30 s
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    return process.returncode, out + err


def test_ctrl_c_on_one_rank_stops_every_rank_at_the_same_iteration(tmp_path, mnist_lmdb):
    code, output = _start_and_signal(tmp_path, mnist_lmdb, signal.SIGINT)
    assert code == 0 and "Optimization stopped early." in output
    last = max(int(p.name.split("_")[-1].split(".")[0]) for p in tmp_path.glob("run_iter_*.solverstate"))
    state = read_binary_proto(str(tmp_path / f"run_iter_{last}.solverstate"), caffe_pb2.SolverState())
    assert '"solver_count": 2' in state.kaffe_resume_state   # both ranks took part in the final snapshot


def test_a_killed_rank_stops_every_rank(tmp_path, mnist_lmdb):
    code, err = _start_and_signal(tmp_path, mnist_lmdb, signal.SIGKILL)
    assert code != 0
    assert "BAD TERMINATION" in err and "signal 9" in err   # the launcher names the process and the signal


def test_a_hung_rank_is_noticed_by_the_watchdog(tmp_path, mnist_lmdb):
    code, err = _start_and_signal(tmp_path, mnist_lmdb, signal.SIGSTOP, env={"KAFFE_MPI_TIMEOUT": "3"})
    assert code != 0
    assert "rank 0 of 2: no answer from the other ranks for 3 s while reducing the gradients" in err


def test_an_error_on_one_rank_stops_all_naming_it(tmp_path, mnist_lmdb):
    import lmdb
    from kaffe.layers.data import Database
    source = tmp_path / "bad_lmdb"
    mnist = Database(mnist_lmdb / "mnist_train_lmdb", "lmdb", "test")
    with lmdb.open(str(source), map_size=1 << 26) as out, out.begin(write=True) as write:
        for i, (key, value) in zip(range(256), mnist.records()):
            write.put(key, value[:-10] if i == 40 else value)   # record 40: in rank 1's first batch
    mnist.close()
    solver_path = write_run(tmp_path, mnist_lmdb, 32, 20)
    net = solver_path.parent / "net.prototxt"
    net.write_text(net.read_text().replace(str(mnist_lmdb / "mnist_train_lmdb"), str(source)))
    result = mpiexec(["train", "--solver", str(solver_path)], timeout=60)
    assert result.returncode != 0
    assert "kaffe train: error: rank 1 of 2: " in result.stderr and "bad_lmdb" in result.stderr
    assert "rank 0 of 2 stops: rank 1 of 2 failed: " in result.stderr


# -- bad input ------------------------------------------------------------------------------------------------
def test_a_data_source_missing_on_one_rank(tmp_path, mnist_lmdb):
    """Each rank runs in its own folder; the relative source exists in rank 0's only."""
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    (tmp_path / "a" / "train_lmdb").symlink_to(mnist_lmdb / "mnist_train_lmdb")
    solver_path = write_run(tmp_path, mnist_lmdb, 32, 20)
    net = solver_path.parent / "net.prototxt"
    net.write_text(net.read_text().replace(str(mnist_lmdb / "mnist_train_lmdb"), "train_lmdb"))
    rank = [sys.executable, "-m", "kaffe.tools.cli", "train", "--solver", str(solver_path)]
    command = ["mpiexec", "-n", "1", "-wdir", str(tmp_path / "a"), *rank, ":",
               "-n", "1", "-wdir", str(tmp_path / "b"), *rank]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, OPENBLAS_NUM_THREADS="1"))
    assert result.returncode != 0
    assert "rank 1 of 2 failed: Data layer 'mnist': data source train_lmdb does not exist" in result.stderr
    assert result.stderr.count("kaffe train: error:") == 2   # both ranks exit, with the reason


def test_mismatched_kaffe_version(tmp_path, mnist_lmdb):
    solver_path = write_run(tmp_path, mnist_lmdb, 32, 2)
    result = run_mpi_script(tmp_path, f"""
import os, sys, kaffe
if os.environ["PMI_RANK"] == "1":
    kaffe.__version__ = "0.9.0"
from kaffe.tools.cli import main
sys.exit(main(["train", "--solver", {str(solver_path)!r}]))
""", timeout=120)
    assert result.returncode != 0
    assert f"rank 1's kaffe version is 0.9.0, rank 0's is {__import__('kaffe').__version__}" in result.stderr


def test_mismatched_net_file(tmp_path, mnist_lmdb):
    first = write_run(tmp_path / "a", mnist_lmdb, 32, 2)
    second = write_run(tmp_path / "b", mnist_lmdb, 32, 2, size=dict(SMALL, ip1=16))
    rank = [sys.executable, "-m", "kaffe.tools.cli", "train", "--solver"]
    result = subprocess.run(["mpiexec", "-n", "1", *rank, str(first), ":", "-n", "1", *rank, str(second)],
                            capture_output=True, text=True, timeout=120, env=dict(os.environ, OPENBLAS_NUM_THREADS="1"))
    assert result.returncode != 0
    assert "the ranks differ at start: rank 1's net file" in result.stderr


def test_records_that_do_not_divide_by_the_rank_count_warn(tmp_path, mnist_lmdb, kaffe_log):
    import kaffe
    from kaffe.engine.net import Net
    param = caffe_pb2.NetParameter()
    layer = param.layer.add(name="mnist", type="Data", top=["data", "label"])
    layer.data_param.source = str(mnist_lmdb / "mnist_test_lmdb")   # 10,000 records
    layer.data_param.backend = caffe_pb2.DataParameter.LMDB
    try:
        kaffe.set_solver_count(3)
        layer.data_param.batch_size = 10
        Net(param, caffe_pb2.TRAIN)
        assert any("10000 records do not divide by 3 ranks" in m for m in kaffe_log)
        layer.data_param.batch_size = 5000
        Net(param, caffe_pb2.TRAIN)
        assert any("fewer than one step of 3 ranks x batch 5000" in m for m in kaffe_log)
    finally:
        kaffe.set_solver_count(1)
