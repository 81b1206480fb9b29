"""`kaffe plot`: the chart's lines hold the logs' data points (checked on matplotlib's figure objects)."""
import subprocess
import sys

import pytest

from kaffe.engine.errors import KaffeError
from kaffe.tools.parse_log import parse_log
from kaffe.tools.plot import plot_logs
from test_cli import TINY_NET
from test_parse_log import CAFFE_LOG, CAFFE_TEST, CAFFE_TRAIN, TWO_TEST_NETS


@pytest.fixture
def logs(tmp_path):
    """A hand-written Caffe log and a kaffe log of a short training (two test nets)."""
    (tmp_path / "caffe.log").write_text(CAFFE_LOG)
    (tmp_path / "net.prototxt").write_text(TINY_NET)
    (tmp_path / "solver.prototxt").write_text(TWO_TEST_NETS)
    (tmp_path / "snap").mkdir()
    run = subprocess.run([sys.executable, "-m", "kaffe.tools.cli", "train", "--solver", "solver.prototxt"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    (tmp_path / "kaffe.log").write_text(run.stderr)
    return tmp_path


def _lines(figure):
    axes = figure.axes[0]
    return {line.get_label(): line.get_xydata().tolist() for line in axes.lines}, axes


def test_loss_accuracy_and_lr_charts_hold_the_logged_points(logs):
    caffe, kaffe = str(logs / "caffe.log"), str(logs / "kaffe.log")
    lines, axes = _lines(plot_logs([caffe, kaffe], "iters", "loss"))
    train, test = parse_log(kaffe)
    assert lines == {
        "caffe (train)": [[r["NumIters"], r["loss"]] for r in CAFFE_TRAIN],
        "caffe (test)": [[r["NumIters"], r["loss"]] for r in CAFFE_TEST],
        "kaffe (train)": [[r["NumIters"], r["loss"]] for r in train],
        "kaffe (test)": [[r["NumIters"], r["loss"]] for r in test]}
    assert axes.get_yscale() == "log" and axes.get_xlabel() == "Iters"   # the losses span two decades
    assert [t.get_text() for t in axes.get_legend().get_texts()] == list(lines)
    lines, axes = _lines(plot_logs([caffe], "seconds", "accuracy"))
    assert lines == {"caffe": [[r["Seconds"], r["accuracy"]] for r in CAFFE_TEST]}
    assert axes.get_yscale() == "linear" and axes.get_title() == "Test accuracy  vs. Seconds"
    lines, axes = _lines(plot_logs([caffe, kaffe], "iters", "lr"))
    assert lines["caffe"] == [[r["NumIters"], r["LearningRate"]] for r in CAFFE_TRAIN]
    assert lines["kaffe"] == [[r["NumIters"], r["LearningRate"]] for r in train]
    assert axes.get_ylabel() == "learning rate"


def test_png_and_svg_files_and_bad_requests(logs):
    for name in ("chart.png", "chart.svg"):
        result = subprocess.run([sys.executable, "-m", "kaffe.tools.cli", "plot", "caffe.log", "kaffe.log",
                                 "--out", name, "--y", "loss"], cwd=logs, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, result.stderr
    assert (logs / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in (logs / "chart.svg").read_bytes()[:500]
    for args, message in ((["--out", "x.png", "--y", "nope"], "no log has a 'nope' column to plot; the logs have: "
                                                              "acc, accuracy, loss, lr"),
                          (["--out", "x.jpg"], "--out must end in .png or .svg"),
                          (["--out", "x.png", "--x", "epochs"], "invalid choice")):
        result = subprocess.run([sys.executable, "-m", "kaffe.tools.cli", "plot", "caffe.log", "kaffe.log", *args],
                                cwd=logs, capture_output=True, text=True, timeout=120)
        assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr
    with pytest.raises(KaffeError, match="not a Caffe training log"):
        plot_logs([str(logs / "net.prototxt")])


def test_missing_matplotlib_names_the_extra(logs):
    code = ("import sys; sys.modules['matplotlib'] = None; from kaffe.tools.cli import main; "
            "sys.exit(main(['plot', 'caffe.log', '--out', 'x.png']))")
    result = subprocess.run([sys.executable, "-c", code], cwd=logs, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == 'kaffe plot: error: kaffe plot needs matplotlib: pip install "kaffe[viz]"'
