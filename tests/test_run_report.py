"""The run report after `kaffe train` (also on Ctrl-C), --debug_info, and the NaN finder."""
import re
import signal
import subprocess
import sys

import pytest

import kaffe
from kaffe.engine.errors import KaffeError
from kaffe.tools.parse_log import parse_log

TWO_LAYERS = """
name: "two"
layer { name: "data" type: "DummyData" top: "data" top: "label"
        dummy_data_param { shape { dim: 8 dim: 5 } shape { dim: 8 }
                           data_filler { type: "gaussian" } data_filler { type: "constant" value: 1 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
        inner_product_param { num_output: 4 weight_filler { type: "xavier" } } }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
        inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }
layer { name: "acc" type: "Accuracy" bottom: "ip2" bottom: "label" top: "acc" include { phase: TEST } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }
"""
SOLVER = ('net: "{net}" base_lr: 0.1 momentum: 0.9 lr_policy: "fixed" max_iter: {iters} display: {display} '
          'test_iter: 2 test_interval: 10 snapshot: 10 snapshot_prefix: "snap/two" random_seed: 1\n')


def kaffe_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "kaffe.tools.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "net.prototxt").write_text(TWO_LAYERS)
    (tmp_path / "solver.prototxt").write_text(SOLVER.format(net="net.prototxt", iters=20, display=5))
    (tmp_path / "snap").mkdir()
    return tmp_path


def _report(log):
    """The report's lines (the messages after the last 'Optimization Done.')."""
    messages = [line.split("] ", 1)[1] for line in log.splitlines() if "] " in line]
    return messages[len(messages) - messages[::-1].index("Optimization Done."):]


def test_report_after_training_and_fine_tuning(folder):
    result = kaffe_cli("train", "--solver", "solver.prototxt", cwd=folder)
    assert result.returncode == 0, result.stderr
    report = _report(result.stderr)
    assert report[0] == "Run report:"
    assert re.fullmatch(r"  iterations: 20 done \(0 -> 20\) in [\d.]+ s, [\d.e+]+ iter/s", report[1])
    accuracies = [float(v) for v in re.findall(r"Test net output #0: acc = (\S+)", result.stderr)]
    losses = [float(v) for v in re.findall(r"Test net output #1: loss = (\S+)", result.stderr)]
    best = max(range(3), key=lambda i: (accuracies[i], -i))
    assert report[2] == (f"  test net #0 acc: last {accuracies[-1]:.6g} (iteration 20), best {accuracies[best]:.6g} "
                         f"(iteration {10 * best})")
    lowest = min(range(3), key=lambda i: (losses[i], i))
    assert report[3] == (f"  test net #0 loss: last {losses[-1]:.6g} (iteration 20), best {losses[lowest]:.6g} "
                         f"(iteration {10 * lowest})")
    assert report[4] == ("  snapshots written: snap/two_iter_10.caffemodel, snap/two_iter_10.solverstate, "
                         "snap/two_iter_20.caffemodel, snap/two_iter_20.solverstate")
    assert len(report) == 5     # no weights, no TensorBoard
    # the report leaves parse_log's rows as they are
    log = folder / "train.log"
    log.write_text(result.stderr)
    rows = parse_log(str(log))
    log.write_text(result.stderr[:result.stderr.rindex("Run report:")])
    assert parse_log(str(log)) == rows
    # fine-tuning: ip2 renamed, so ip1 is copied, ip2_new filled afresh, and the weights' ip2 skipped
    (folder / "renamed.prototxt").write_text(TWO_LAYERS.replace('"ip2"', '"ip2_new"'))
    (folder / "tune.prototxt").write_text(SOLVER.format(net="renamed.prototxt", iters=5, display=5))
    tuned = kaffe_cli("train", "--solver", "tune.prototxt", "--weights", "snap/two_iter_20.caffemodel", cwd=folder)
    assert tuned.returncode == 0, tuned.stderr
    assert _report(tuned.stderr)[-4:] == ["  weights: snap/two_iter_20.caffemodel",
                                          "    copied by name: ip1",
                                          "    freshly filled (not in the weights): ip2_new",
                                          "    skipped (not in this net): ip2"]


def test_report_after_ctrl_c(folder):
    (folder / "solver.prototxt").write_text(SOLVER.format(net="net.prototxt", iters=100000000, display=1000)
                                            .replace("snapshot: 10 ", "").replace("test_interval: 10", "test_interval: 5000"))
    process = subprocess.Popen([sys.executable, "-m", "kaffe.tools.cli", "train", "--solver", "solver.prototxt"],
                               cwd=folder, stderr=subprocess.PIPE, text=True)
    for line in process.stderr:
        if "Iteration 1000 " in line:
            break
    process.send_signal(signal.SIGINT)
    rest = process.stderr.read()
    assert process.wait(timeout=60) == 0, rest
    assert "Optimization stopped early." in rest
    report = _report(rest)
    done = int(re.fullmatch(r"  iterations: (\d+) done \(0 -> \1\) in [\d.]+ s, [\d.e+]+ iter/s", report[1]).group(1))
    assert done >= 1000 and report[-1] == f"  snapshots written: snap/two_iter_{done}.caffemodel, " \
                                          f"snap/two_iter_{done}.solverstate"


def test_debug_info_lines_as_caffe_logs_them(folder):
    result = kaffe_cli("train", "--solver", "solver.prototxt", "--debug_info", "--iterations", "1", cwd=folder)
    assert result.returncode == 0, result.stderr
    messages = [line.split("] ", 1)[1] for line in result.stderr.splitlines() if "] " in line]
    number = r"[\d.e+-]+"
    for pattern in (rf"    \[Forward\] Layer data, top blob data data: {number}",
                    rf"    \[Forward\] Layer ip1, top blob ip1 data: {number}",
                    rf"    \[Forward\] Layer ip1, param blob 1 data: {number}",
                    rf"    \[Backward\] Layer ip2, bottom blob ip1 diff: {number}",
                    rf"    \[Backward\] Layer ip1, param blob 0 diff: {number}",
                    rf"    \[Update\] Layer ip1, param 0 data: {number}; diff: {number}",
                    rf"    \[Update\] Layer ip2, param 1 data: {number}; diff: {number}"):
        assert any(re.fullmatch(pattern, m) for m in messages), pattern
    # as in Caffe: no gradient line for the data (it needs none), and the test net's passes are logged too
    assert not any(m.startswith("    [Backward] Layer ip1, bottom blob data") for m in messages)
    assert any(re.fullmatch(rf"    \[Forward\] Layer acc, top blob acc data: {number}", m) for m in messages)


OVERFLOW = """
name: "overflow"
layer { name: "data" type: "DummyData" top: "data" top: "target"
        dummy_data_param { shape { dim: 4 dim: 3 } shape { dim: 4 dim: 2 }
                           data_filler { type: "constant" value: 1 } data_filler { type: "constant" value: 0 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
        inner_product_param { num_output: 2 weight_filler { type: "constant" value: 1 } } }
layer { name: "scale_up" type: "Power" bottom: "ip" top: "ip" power_param { scale: 1e20 } }
layer { name: "blowup" type: "Power" bottom: "ip" top: "ip" power_param { power: 2 } }
layer { name: "relu" type: "ReLU" bottom: "ip" top: "ip" }
layer { name: "loss" type: "EuclideanLoss" bottom: "ip" bottom: "target" top: "loss" }
"""


def test_nan_finder_names_the_layer_that_overflows(tmp_path):
    """(1e20 * 3)^2 overflows float32 in 'blowup', in place: the blob as the pass left it cannot tell."""
    (tmp_path / "net.prototxt").write_text(OVERFLOW)
    (tmp_path / "solver.prototxt").write_text('net: "net.prototxt" base_lr: 0.1 lr_policy: "fixed" max_iter: 5 '
                                              'snapshot_after_train: false\n')
    solver = kaffe.get_solver(str(tmp_path / "solver.prototxt"))
    with pytest.raises(KaffeError, match=r"Training diverged: the loss is inf at iteration 0\. The first non-finite "
                                         r"value comes from layer 'blowup' \(Power\): its top blob 'ip' holds 0 NaN "
                                         r"and 8 infinite values from finite inputs\."):
        solver.step(1)
    result = kaffe_cli("train", "--solver", "solver.prototxt", cwd=tmp_path)
    assert result.returncode == 1 and "layer 'blowup' (Power)" in result.stderr
    assert "Run report:" in result.stderr and "  iterations: 0 done" in result.stderr
    # weights that went non-finite are named before any output
    solver.net.params["ip"][0].data[0, 1] = float("nan")
    with pytest.raises(KaffeError, match=r"Layer 'ip' \(InnerProduct\) has non-finite weights: param blob 0 holds "
                                         r"1 NaN and 0 infinite values\."):
        solver.step(1)
