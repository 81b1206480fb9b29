"""`kaffe parse_log`: Caffe's parse_log.py rows and CSV files, from Caffe's own log format and from kaffe's."""
import re
import subprocess
import sys

import pytest

from kaffe.engine.errors import KaffeError
from kaffe.tools.parse_log import parse_log
from test_cli import TINY_NET

# a LeNet log in real Caffe's glog format: a prototxt dump, a warning, a blank line, the new year, an output
# in an exponent spelling, and a nan loss (which Caffe's number pattern does not read)
CAFFE_LOG = """\
Log file created at: 2026/12/31 23:58:50
Running on machine: gpu-box
Log line format: [IWEF]mmdd hh:mm:ss.uuuuuu threadid file:line] msg
I1231 23:58:50.104152 31337 caffe.cpp:204] Using GPUs 0
I1231 23:58:50.311120 31337 solver.cpp:45] Initializing solver from parameters: 
test_iter: 100
test_interval: 200
base_lr: 0.01
display: 100
max_iter: 400
lr_policy: "inv"
net: "examples/mnist/lenet_train_test.prototxt"
I1231 23:58:50.312001 31337 net.cpp:53] Initializing net from parameters: 
name: "LeNet"
state {
  phase: TRAIN
}
I1231 23:58:51.002233 31337 solver.cpp:57] Solver scaffolding done.
I1231 23:58:51.002512 31337 caffe.cpp:239] Starting Optimization
I1231 23:58:51.002520 31337 solver.cpp:293] Solving LeNet
I1231 23:58:51.002522 31337 solver.cpp:294] Learning Rate Policy: inv
I1231 23:58:51.003298 31337 solver.cpp:351] Iteration 0, Testing net (#0)
I1231 23:58:51.870102 31337 solver.cpp:418]     Test net output #0: accuracy = 0.0856
I1231 23:58:51.870134 31337 solver.cpp:418]     Test net output #1: loss = 2.37046 (* 1 = 2.37046 loss)
I1231 23:58:51.884580 31337 solver.cpp:239] Iteration 0 (0 iter/s, 0.882s/100 iters), loss = 2.40564
I1231 23:58:51.884620 31337 solver.cpp:258]     Train net output #0: loss = 2.40564 (* 1 = 2.40564 loss)
I1231 23:58:51.884640 31337 sgd_solver.cpp:112] Iteration 0, lr = 0.01
I1231 23:59:52.501977 31337 solver.cpp:239] Iteration 100 (1.65 iter/s, 60.617s/100 iters), loss = 0.206372
I1231 23:59:52.502014 31337 solver.cpp:258]     Train net output #0: loss = 0.206372 (* 1 = 0.206372 loss)
I1231 23:59:52.502025 31337 sgd_solver.cpp:112] Iteration 100, lr = 0.00992565
I0101 00:00:53.250000 31337 solver.cpp:351] Iteration 200, Testing net (#0)
I0101 00:00:54.112000 31337 solver.cpp:418]     Test net output #0: accuracy = 0.9615
I0101 00:00:54.112030 31337 solver.cpp:418]     Test net output #1: loss = 0.123e-0 (* 1 = 0.123 loss)
I0101 00:00:54.120000 31337 solver.cpp:239] Iteration 200 (1.6 iter/s, 61.618s/100 iters), loss = 1.5E-1
I0101 00:00:54.120040 31337 solver.cpp:258]     Train net output #0: loss = 0.15 (* 1 = 0.15 loss)
I0101 00:00:54.120060 31337 sgd_solver.cpp:112] Iteration 200, lr = 9.85258e-03
W0101 00:00:55.000000 31337 solver.cpp:300] a warning line

I0101 00:01:55.000000 31337 solver.cpp:239] Iteration 300 (1.64 iter/s, 60.88s/100 iters), loss = nan
I0101 00:01:55.000040 31337 solver.cpp:258]     Train net output #0: loss = nan (* 1 = nan loss)
I0101 00:01:55.000060 31337 sgd_solver.cpp:112] Iteration 300, lr = 0.00978075
"""

# what Caffe's parse_log.py returns for it (its quirks included: the row of iteration 100 keeps the rate
# logged before it, the first rows take the second row's rate, rows that never fill up are dropped)
CAFFE_TRAIN = [
    {"NumIters": 0.0, "Seconds": 0.8821, "LearningRate": 0.01, "loss": 2.40564},
    {"NumIters": 100.0, "Seconds": 61.499494, "LearningRate": 0.01, "loss": 0.206372},
    {"NumIters": 200.0, "Seconds": 123.11752, "LearningRate": 0.00992565, "loss": 0.15},
]
CAFFE_TEST = [
    {"NumIters": 0.0, "Seconds": 0.867582, "LearningRate": 0.00992565, "accuracy": 0.0856, "loss": 2.37046},
    {"NumIters": 200.0, "Seconds": 123.10948, "LearningRate": 0.00992565, "accuracy": 0.9615, "loss": 0.123},
]


def kaffe(*args, cwd):
    return subprocess.run([sys.executable, "-m", "kaffe.tools.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def test_caffe_log_gives_caffes_rows_and_csv_files(tmp_path):
    log = tmp_path / "caffe.log"
    log.write_text(CAFFE_LOG)
    train, test = parse_log(str(log))
    assert train == CAFFE_TRAIN and test == CAFFE_TEST
    assert [list(row) for row in test] == [["NumIters", "Seconds", "LearningRate", "accuracy", "loss"]] * 2
    (tmp_path / "out").mkdir()
    result = kaffe("parse_log", "caffe.log", "out", "--verbose", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["Wrote out/caffe.log.train", "Wrote out/caffe.log.test"]
    # csv's excel dialect, as Caffe writes it: CRLF line ends, floats as Python writes them
    assert (tmp_path / "out" / "caffe.log.train").read_bytes() == (
        b"NumIters,Seconds,LearningRate,loss\r\n0.0,0.8821,0.01,2.40564\r\n"
        b"100.0,61.499494,0.01,0.206372\r\n200.0,123.11752,0.00992565,0.15\r\n")
    assert kaffe("parse_log", "caffe.log", "out", "--delimiter", ";", cwd=tmp_path).returncode == 0
    assert (tmp_path / "out" / "caffe.log.test").read_text().splitlines() == [
        "NumIters;Seconds;LearningRate;accuracy;loss", "0.0;0.867582;0.00992565;0.0856;2.37046",
        "200.0;123.10948;0.00992565;0.9615;0.123"]


def test_a_single_test_pass_is_dropped_and_nan_rates_stay(tmp_path):
    """Caffe pushes a row when the next one starts or when it is as long as the first: one test pass never is."""
    log = tmp_path / "short.log"
    lines = [line for line in CAFFE_LOG.splitlines() if "00:0" not in line]   # up to iteration 100
    log.write_text("\n".join(lines) + "\n")
    train, test = parse_log(str(log))
    assert test == []
    assert [row["NumIters"] for row in train] == [0.0, 100.0]
    only_first = tmp_path / "first.log"
    only_first.write_text("\n".join(line for line in lines if "Iteration 100" not in line
                                    and "0.206372" not in line and "lr =" not in line) + "\n")
    assert parse_log(str(only_first)) == ([], [])


TWO_TEST_NETS = ('net: "net.prototxt" test_iter: 2 test_iter: 3 test_state {} test_state {} base_lr: 0.1 '
                 'momentum: 0.9 lr_policy: "step" gamma: 0.5 stepsize: 10 max_iter: 20 display: 5 '
                 'test_interval: 10 snapshot: 10 snapshot_prefix: "snap/tiny" random_seed: 1\n')


def test_kaffe_log_with_two_test_nets_and_a_restart(tmp_path):
    (tmp_path / "net.prototxt").write_text(TINY_NET)
    (tmp_path / "solver.prototxt").write_text(TWO_TEST_NETS)
    (tmp_path / "snap").mkdir()
    first = kaffe("train", "--solver", "solver.prototxt", cwd=tmp_path)
    resumed = kaffe("train", "--solver", "solver.prototxt", "--snapshot", "snap/tiny_iter_10.solverstate",
                    cwd=tmp_path)
    assert first.returncode == 0 and resumed.returncode == 0, first.stderr + resumed.stderr
    log = tmp_path / "train.log"
    log.write_text(first.stderr + resumed.stderr)
    train, test = parse_log(str(log))
    # displays 0 5 10 15 of the first run, 10 15 of the resumed one (the final "Iteration 20, loss" line has
    # no Train net output lines, as in Caffe)
    assert [row["NumIters"] for row in train] == [0.0, 5.0, 10.0, 15.0, 10.0, 15.0]
    logged = [float(v) for v in re.findall(r"Train net output #0: loss = (\S+)", log.read_text())]
    assert [row["loss"] for row in train] == logged
    rates = [float(v) for v in re.findall(r"Iteration \d+, lr = (\S+)", log.read_text())]
    assert [row["LearningRate"] for row in train] == [rates[0]] + rates[:5]   # the rate logged before each
    # the two test nets share output names; Caffe's rows: at iteration 0 net #1's values overwrite net #0's in
    # the first row, then, the first row being as long as a full pass, one row per test net
    assert [row["NumIters"] for row in test] == [0.0, 10.0, 10.0, 20.0, 20.0, 10.0, 10.0, 20.0, 20.0]
    passes = re.findall(r"Test net output #0: acc = (\S+)\n.*Test net output #1: loss = (\S+) ", log.read_text())
    assert [(row["acc"], row["loss"]) for row in test] == [(float(a), float(b)) for a, b in passes[1:]]
    assert all(row["Seconds"] >= 0 for row in train + test)


def test_not_a_caffe_log_is_one_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("just some text\nno training here\n")
    (tmp_path / "fake.log").write_text("Solving everything at once\n")
    (tmp_path / "out").mkdir()
    for name, message in (("notes.txt", r"notes\.txt is not a Caffe training log"),
                          ("fake.log", r"fake\.log:1: the 'Solving' line is not a glog line"),
                          ("missing.log", r"cannot read missing\.log")):
        result = kaffe("parse_log", name, "out", cwd=tmp_path)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert re.search(r"^kaffe parse_log: error: " + message, result.stderr), result.stderr
        with pytest.raises(ValueError):      # also a KaffeValueError
            parse_log(str(tmp_path / name))
    result = kaffe("parse_log", "notes.txt", "nowhere", cwd=tmp_path)
    assert result.returncode == 1 and "output directory nowhere does not exist" in result.stderr
    with pytest.raises(KaffeError):
        parse_log(str(tmp_path / "notes.txt"))
