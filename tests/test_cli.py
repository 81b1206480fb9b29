"""The `kaffe` command: Caffe's flag spellings, log lines, and clear errors with a non-zero exit."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import MNIST_RAW, REPO

TINY_NET = """
name: "tiny"
layer { name: "data" type: "DummyData" top: "data" top: "label"
        dummy_data_param { shape { dim: 8 dim: 5 } shape { dim: 8 }
                           data_filler { type: "gaussian" } data_filler { type: "constant" value: 1 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
        inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }
layer { name: "acc" type: "Accuracy" bottom: "ip" bottom: "label" top: "acc" include { phase: TEST } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""


def kaffe(*args, cwd, timeout=120):
    return subprocess.run([sys.executable, "-m", "kaffe.tools.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def tiny(tmp_path):
    (tmp_path / "net.prototxt").write_text(TINY_NET)
    (tmp_path / "solver.prototxt").write_text(
        'net: "net.prototxt" base_lr: 0.1 momentum: 0.9 lr_policy: "fixed" max_iter: 20 display: 5 '
        'test_iter: 2 test_interval: 10 snapshot: 10 snapshot_prefix: "snap/tiny" random_seed: 1\n')
    (tmp_path / "snap").mkdir()
    return tmp_path


def assert_clean_error(result, *patterns):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    for pattern in patterns:
        assert re.search(pattern, result.stderr), (pattern, result.stderr[-2000:])


@pytest.mark.parametrize("flags", [["-solver", "solver.prototxt"], ["--solver=solver.prototxt"],
                                   ["--solver", "solver.prototxt"]])
def test_train_accepts_caffe_spellings_and_logs_like_caffe(tiny, flags):
    result = kaffe("train", *flags, cwd=tiny)
    assert result.returncode == 0, result.stderr
    log = result.stderr
    assert re.search(r"^I\d{4} \d\d:\d\d:\d\d\.\d{6} +\d+ \S+\.py:\d+\] Iteration 5 \([\d.e+-]+ iter/s, "
                     r"[\d.e+-]+s/5 iters\), loss = [\d.e+-]+$", log, re.M)
    assert re.search(r"\]     Train net output #0: loss = [\d.e+-]+ \(\* 1 = [\d.e+-]+ loss\)$", log, re.M)
    assert re.search(r"\] Iteration 5, lr = 0\.1$", log, re.M)
    assert re.search(r"\] Iteration 10, Testing net \(#0\)$", log, re.M)
    assert re.search(r"\]     Test net output #0: acc = [\d.e+-]+$", log, re.M)
    assert re.search(r"\] Snapshotting to binary proto file snap/tiny_iter_10\.caffemodel$", log, re.M)
    assert (tiny / "snap" / "tiny_iter_20.solverstate").exists()


def test_resume_and_finetune_and_test_and_time(tiny):
    assert kaffe("train", "-solver", "solver.prototxt", cwd=tiny).returncode == 0
    resumed = kaffe("train", "-solver", "solver.prototxt", "-snapshot", "snap/tiny_iter_10.solverstate", cwd=tiny)
    assert resumed.returncode == 0, resumed.stderr
    assert "Restoring previous solver status from snap/tiny_iter_10.solverstate" in resumed.stderr
    assert "Iteration 10, Testing net (#0)" in resumed.stderr
    tuned = kaffe("train", "--solver", "solver.prototxt", "--weights", "snap/tiny_iter_20.caffemodel",
                  "--iterations", "5", cwd=tiny)
    assert tuned.returncode == 0, tuned.stderr
    both = kaffe("train", "--solver", "solver.prototxt", "--weights", "a", "--snapshot", "b", cwd=tiny)
    assert_clean_error(both, "snapshot to resume training or weights to finetune but not both")
    scored = kaffe("test", "-model", "net.prototxt", "-weights", "snap/tiny_iter_20.caffemodel",
                   "-iterations", "3", cwd=tiny)
    assert scored.returncode == 0, scored.stderr
    assert re.search(r"\] Batch 2, loss = [\d.e+-]+$", scored.stderr, re.M)
    assert re.search(r"\] loss = [\d.e+-]+ \(\* 1 = [\d.e+-]+ loss\)$", scored.stderr, re.M)
    timed = kaffe("time", "-model", "net.prototxt", "-iterations", "4", cwd=tiny)
    assert timed.returncode == 0, timed.stderr
    for pattern in (r"\]\s+ip\tforward: [\d.e+-]+ ms\.$", r"\]\s+ip\tbackward: [\d.e+-]+ ms\.$",
                    r"\] Average Forward pass: [\d.e+-]+ ms\.$", r"\] Average Backward pass: [\d.e+-]+ ms\.$",
                    r"\] Average Forward-Backward: [\d.e+-]+ ms\.$", r"\] Total Time: [\d.e+-]+ ms\.$"):
        assert re.search(pattern, timed.stderr, re.M), pattern


def test_bad_inputs_exit_non_zero_with_one_clear_message(tiny):
    (tiny / "broken.prototxt").write_text('layer {\n  name: "a"\n  type: "ReLU"\n  bottom: "x" top: "x"\n  kernel: 3\n}\n')
    assert_clean_error(kaffe("time", "--model", "broken.prototxt", cwd=tiny),
                       r"broken\.prototxt:5:3: .*no field named \"?kernel")
    (tiny / "unknown.prototxt").write_text('layer { name: "a" type: "Convolutoin" top: "x" }')
    assert_clean_error(kaffe("time", "--model", "unknown.prototxt", cwd=tiny),
                       r"Unknown layer type: 'Convolutoin'", r"Known types: .*Convolution", r"Did you mean")
    (tiny / "bottom.prototxt").write_text('layer { name: "a" type: "ReLU" bottom: "nothing" top: "x" }')
    assert_clean_error(kaffe("time", "--model", "bottom.prototxt", cwd=tiny), r"Unknown bottom blob 'nothing'")
    (tiny / "shapes.prototxt").write_text(
        'layer { name: "d" type: "Input" top: "a" top: "b" '
        'input_param { shape { dim: 2 dim: 3 } shape { dim: 2 dim: 4 } } }\n'
        'layer { name: "sum" type: "Eltwise" bottom: "a" bottom: "b" top: "c" }')
    assert_clean_error(kaffe("time", "--model", "shapes.prototxt", cwd=tiny), r"'sum'", r"2.*3", r"2.*4")
    (tiny / "nodata.prototxt").write_text(
        'layer { name: "d" type: "Data" top: "x" data_param { source: "no/such/lmdb" batch_size: 2 backend: LMDB } }')
    assert_clean_error(kaffe("time", "--model", "nodata.prototxt", cwd=tiny), r"no/such/lmdb")
    (tiny / "garbage.caffemodel").write_bytes(b"\x0a\xff\xff\xff\xff\x0f")
    assert_clean_error(kaffe("test", "--model", "net.prototxt", "--weights", "garbage.caffemodel", cwd=tiny),
                       r"garbage\.caffemodel")
    assert_clean_error(kaffe("train", "--solver", "missing.prototxt", cwd=tiny), r"missing\.prototxt.*not found")
    assert_clean_error(kaffe("test", "--model", "net.prototxt", cwd=tiny), r"Need model weights")


def test_nan_loss_exits_with_the_iteration(tiny):
    (tiny / "solver.prototxt").write_text(
        'net: "net.prototxt" base_lr: 1e38 momentum: 0.9 lr_policy: "fixed" max_iter: 50 display: 0 '
        'snapshot_after_train: false random_seed: 1\n')
    (tiny / "net.prototxt").write_text(TINY_NET.replace('data_filler { type: "gaussian" }',
                                                        'data_filler { type: "gaussian" std: 1e10 }'))
    assert_clean_error(kaffe("train", "--solver", "solver.prototxt", cwd=tiny),
                       r"diverged: the loss is (nan|inf) at iteration \d+")


def test_sigint_stops_after_the_iteration_and_snapshots(tiny):
    (tiny / "solver.prototxt").write_text(
        'net: "net.prototxt" base_lr: 0.1 lr_policy: "fixed" max_iter: 100000000 display: 1000 '
        'snapshot_prefix: "snap/tiny" random_seed: 1\n')
    proc = subprocess.Popen([sys.executable, "-m", "kaffe.tools.cli", "train", "--solver", "solver.prototxt"],
                            cwd=tiny, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if "Iteration 1000 " in line:
            break
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read()
    assert proc.wait(timeout=60) == 0, rest
    assert "Optimization stopped early." in rest
    snapshots = list((tiny / "snap").glob("tiny_iter_*.caffemodel"))
    assert len(snapshots) == 1 and (tiny / "snap" / (snapshots[0].stem + ".solverstate")).exists()


def test_benchmark_lenet_measures_kaffe_training_steps():
    """The kaffe side of tools/benchmark_lenet (PyTorch is an optional extra): real LeNet SGD steps on MNIST."""
    if not MNIST_RAW.exists():
        pytest.skip(f"real MNIST not found at {MNIST_RAW}")
    out = subprocess.run([sys.executable, "-m", "kaffe.tools.benchmark_lenet", "--child", "kaffe-memory",
                          "--iterations", "3", "--warmup", "1"], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "KAFFE_MNIST_DIR": str(MNIST_RAW)})
    assert out.returncode == 0, out.stderr
    tagged = [line for line in out.stdout.splitlines() if line.startswith("BENCHMARK_RESULT ")]
    result = json.loads(tagged[0][len("BENCHMARK_RESULT "):])
    assert result["ms_per_iter"] > 0 and result["numpy"] == np.__version__
    assert 20 < result["rss_mb"] < 4000   # the child's own peak, not its parent's
