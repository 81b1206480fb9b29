"""TensorBoard event files of `kaffe train --tensorboard`, read back by TensorBoard itself: its
EventAccumulator, its HTTP server's scalars API, and its web page in headless Chromium."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO
from test_cli import TINY_NET

pytest.importorskip("tensorboardX")
event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

CHROMIUM = "/usr/bin/chromium"
LENET_SOLVER = """net: "net.prototxt"
test_iter: 2 test_interval: 30
base_lr: 0.01 momentum: 0.9 weight_decay: 0.0005 lr_policy: "inv" gamma: 0.0001 power: 0.75
display: 10 max_iter: 60 snapshot: 30 snapshot_prefix: "snap/lenet" random_seed: 1
"""
NUMBER = r"[-+]?(?:\d+\.?\d*(?:e[-+]?\d+)?|nan|inf)"


def kaffe(*args, cwd, env=None):
    return subprocess.run([sys.executable, "-m", "kaffe.tools.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env=env)


def _lenet_folder(folder, mnist):
    net = (REPO / "models" / "lenet" / "lenet_train_test.prototxt").read_text()
    (folder / "net.prototxt").write_text(net.replace("data/mnist/", f"{mnist}/"))
    (folder / "solver.prototxt").write_text(LENET_SOLVER)
    (folder / "snap").mkdir()


@pytest.fixture(scope="module")
def lenet_runs(tmp_path_factory, mnist_lmdb):
    """60 LeNet iterations with --tensorboard runs, and the same run without it."""
    folder = tmp_path_factory.mktemp("lenet_tensorboard")
    _lenet_folder(folder, mnist_lmdb)
    with_board = kaffe("train", "--solver", "solver.prototxt", "--tensorboard", "runs", cwd=folder)
    assert with_board.returncode == 0, with_board.stderr[-3000:]
    plain = kaffe("train", "--solver", "solver.prototxt", cwd=folder)
    assert plain.returncode == 0, plain.stderr[-3000:]
    return folder, with_board.stderr, plain.stderr


def _accumulator(run_dir):
    events = event_accumulator.EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "histograms": 0,
                                                                             "tensors": 0})
    events.Reload()
    return events


def _series(events, tag):
    return [(e.step, e.value) for e in events.Scalars(tag)]


def _logged(log, pattern):
    return [(int(i), float(v)) for i, v in re.findall(pattern, log)]


def test_event_files_hold_the_values_of_the_log_lines(lenet_runs):
    folder, log, _ = lenet_runs
    assert sorted(os.listdir(folder / "runs")) == ["lenet"]
    events = _accumulator(folder / "runs" / "lenet")
    displays = _logged(log, rf"\] Iteration (\d+) \(.*\), loss = ({NUMBER})\n")
    assert [step for step, _ in displays] == [0, 10, 20, 30, 40, 50]
    for tag, logged in (("train/smoothed_loss", displays),
                        ("train/lr", _logged(log, rf"\] Iteration (\d+), lr = ({NUMBER})\n")),
                        ("train/loss", [(i, v) for (i, _), (_, v) in zip(displays, _logged(
                            log, rf"\](?: Iteration (\d+)) \(.*\n.*Train net output #0: loss = ({NUMBER})"))])):
        series = _series(events, tag)
        assert [s for s, _ in series] == [i for i, _ in logged], tag
        assert all(abs(a - b) <= 1e-5 * abs(b) for (_, a), (_, b) in zip(series, logged)), tag
    tests = re.findall(rf"\] Iteration (\d+), Testing net \(#0\)\n.*output #0: accuracy = ({NUMBER})\n"
                       rf".*output #1: loss = ({NUMBER}) ", log)
    assert [int(i) for i, _, _ in tests] == [0, 30, 60]
    for j, tag in ((1, "test/0/accuracy"), (2, "test/0/loss")):
        series = _series(events, tag)
        assert [s for s, _ in series] == [0, 30, 60]
        assert all(abs(a - float(t[j])) <= 1e-5 * abs(float(t[j])) for (_, a), t in zip(series, tests)), tag
    assert [s for s, _ in _series(events, "train/raw_loss")] == [0, 10, 20, 30, 40, 50]
    assert all(v > 0 for _, v in _series(events, "train/iter_per_s")[1:])   # none measured at iteration 0
    # histograms at the snapshots, of every parameter and its gradient; the graph; the prototxt texts
    tags = events.Tags()
    expected = {f"params/{layer}/{i}{grad}" for layer in ("conv1", "conv2", "ip1", "ip2") for i in (0, 1)
                for grad in ("", "/grad")}
    assert set(tags["histograms"]) == expected
    assert [e.step for e in events.Histograms("params/conv1/0")] == [30, 60]
    assert events.Histograms("params/ip2/1")[0].histogram_value.num == 10   # the 10 biases
    graph = events.Graph()
    nodes = {node.name: node for node in graph.node}
    assert list(nodes) == ["mnist", "conv1", "pool1", "conv2", "pool2", "ip1", "relu1", "ip2", "loss"]
    assert nodes["conv1"].op == "Convolution" and list(nodes["conv1"].input) == ["mnist"]
    assert list(nodes["loss"].input) == ["ip2", "mnist:1"]
    assert list(nodes["ip2"].input) == ["relu1"]    # ReLU in place: ip2 reads what relu1 wrote
    assert [d.size for d in nodes["conv1"].attr["_output_shapes"].list.shape[0].dim] == [64, 20, 24, 24]
    texts = {tag for tag in tags["tensors"]}
    assert {"solver/text_summary", "net/text_summary"} <= texts
    solver_text = events.Tensors("solver/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "base_lr: 0.01" in solver_text and 'lr_policy: "inv"' in solver_text


def _shapes(log):
    """Each line with its numbers, timestamp and pid blanked: the log's line shapes."""
    lines = [re.sub(r"^(\w)\d{4} [\d:.]+ +\d+ ", r"\1", line) for line in log.splitlines()]
    return [re.sub(NUMBER, "#", line) for line in lines]


def test_caffe_log_lines_are_the_same_with_and_without_tensorboard(lenet_runs):
    _, with_board, plain = lenet_runs
    board, without = _shapes(with_board), _shapes(plain)
    end = board.index("Icli.py:#] Optimization Done.") + 1
    assert board[:end] == without[:end]
    # only the report follows, and only its TensorBoard line differs
    assert board[end:][:-1] == without[end:] and "TensorBoard: runs/lenet" in board[-1]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tensorboard_server(lenet_runs):
    """The real TensorBoard serving the LeNet run on a free local port."""
    folder = lenet_runs[0]
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(folder / "runs"),
                               "--port", str(port), "--host", "127.0.0.1", "--reload_interval", "0"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                with urllib.request.urlopen(f"{url}/data/runs", timeout=5) as response:
                    if json.loads(response.read()) == ["lenet"]:
                        break
            except OSError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail("TensorBoard did not serve the run within 60 s")
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def _get(url):
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def test_tensorboard_server_serves_the_loss_and_accuracy_series(lenet_runs, tensorboard_server):
    _, log, _ = lenet_runs
    tags = _get(f"{tensorboard_server}/data/plugin/scalars/tags")["lenet"]
    assert {"train/smoothed_loss", "train/loss", "train/lr", "test/0/accuracy", "test/0/loss"} <= set(tags)
    loss = _get(f"{tensorboard_server}/data/plugin/scalars/scalars?run=lenet&tag=train/smoothed_loss")
    displays = _logged(log, rf"\] Iteration (\d+) \(.*\), loss = ({NUMBER})\n")
    assert [step for _, step, _ in loss] == [i for i, _ in displays]
    assert all(abs(v - b) <= 1e-5 * b for (_, _, v), (_, b) in zip(loss, displays))
    accuracy = _get(f"{tensorboard_server}/data/plugin/scalars/scalars?run=lenet&tag=test/0/accuracy")
    logged = [float(v) for v in re.findall(rf"output #0: accuracy = ({NUMBER})", log)]
    assert [step for _, step, _ in accuracy] == [0, 30, 60]
    assert [round(v, 4) for _, _, v in accuracy] == [round(v, 4) for v in logged]


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"no Chromium at {CHROMIUM} (Debian's chromium package)")
def test_tensorboard_page_renders_the_run_in_headless_chromium(tensorboard_server, tmp_path):
    page = f"{tensorboard_server}/?tagFilter=smoothed_loss#timeseries"

    def chromium(*args, budget_ms=20000):
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'profile'}", f"--virtual-time-budget={budget_ms}",
                 "--window-size=1280,900"]
        return subprocess.run([CHROMIUM, *flags, *args, page], capture_output=True, text=True, timeout=180)

    for attempt in range(4):   # a slow (busy) machine may need more than the page's virtual time budget
        dom = chromium("--dump-dom", budget_ms=20000 << attempt).stdout
        if "<line-chart" in dom:
            break
    # the scalars card of the filtered tag, drawn by a line chart, with the run in its legend and table
    assert re.search(r"<scalar-card[\s>]", dom) and "<line-chart" in dom, dom[-2000:]
    assert "train/smoothed_loss" in dom
    assert re.search(r">\s*lenet\s*<", dom)
    screenshot = tmp_path / "tensorboard_scalars.png"   # kept in the test's tmp folder (a CI artifact)
    chromium(f"--screenshot={screenshot}")
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"




def _tiny(tmp_path, max_iter=20):
    (tmp_path / "net.prototxt").write_text(TINY_NET)
    (tmp_path / "solver.prototxt").write_text(
        f'net: "net.prototxt" base_lr: 0.1 lr_policy: "fixed" max_iter: {max_iter} display: 5 snapshot: 10 '
        f'snapshot_prefix: "{tmp_path}/tiny" random_seed: 1\n')
    return str(tmp_path / "solver.prototxt")


def test_python_solver_resume_appends_without_going_back(tmp_path):
    import kaffe
    solver_file = _tiny(tmp_path)
    board = tmp_path / "board"
    first = kaffe.get_solver(solver_file, tensorboard=board)
    first.solve()
    first.report.tensorboard.close()
    resumed = kaffe.SGDSolver(solver_file, tensorboard=board)
    resumed.solve(str(tmp_path / "tiny_iter_10.solverstate"))
    resumed.report.tensorboard.close()
    assert os.listdir(board) == ["tiny"]           # the same run, two event files
    assert len(os.listdir(board / "tiny")) == 2
    series = _series(_accumulator(board / "tiny"), "train/smoothed_loss")
    steps = [s for s, _ in series]
    assert steps == [0, 5, 10, 15]                 # the first run's 10 and 15 replaced by the resumed run's
    # restored in the same process, the solver's own run goes on from the snapshot's iteration
    resumed.restore(str(tmp_path / "tiny_iter_10.solverstate"))
    resumed.step(10)
    resumed.report.tensorboard.close()
    assert os.listdir(board) == ["tiny"] and len(os.listdir(board / "tiny")) == 3
    assert [s for s, _ in _series(_accumulator(board / "tiny"), "train/smoothed_loss")] == [0, 5, 10, 15]
    # a fresh start beside it is a new run, and so is the environment variable's
    env_dir = tmp_path / "env_board"
    os.environ["KAFFE_TENSORBOARD"] = str(env_dir)
    try:
        kaffe.get_solver(solver_file).solve()
        kaffe.get_solver(solver_file, tensorboard=board).solve()
    finally:
        del os.environ["KAFFE_TENSORBOARD"]
    assert os.listdir(env_dir) == ["tiny"] and sorted(os.listdir(board)) == ["tiny", "tiny-2"]


def test_a_killed_run_keeps_the_events_older_than_the_flush_interval(tmp_path):
    from kaffe.solvers.tensorboard import FLUSH_SECS
    assert FLUSH_SECS <= 10
    _tiny(tmp_path, max_iter=100000000)
    proc = subprocess.Popen([sys.executable, "-m", "kaffe.tools.cli", "train", "--solver", "solver.prototxt",
                             "--tensorboard", "board"], cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:
            if "Iteration 100 " in line:
                break
        time.sleep(FLUSH_SECS + 1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    steps = [s for s, _ in _series(_accumulator(tmp_path / "board" / "tiny"), "train/smoothed_loss")]
    assert steps[:21] == list(range(0, 105, 5))


def test_missing_tensorboardx_names_the_extra(tmp_path):
    _tiny(tmp_path)
    code = ("import sys; sys.modules['tensorboardX'] = None; from kaffe.tools.cli import main; "
            "sys.exit(main(['train', '--solver', 'solver.prototxt', '--tensorboard', 'board']))")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert 'kaffe train: error: TensorBoard event files need the tensorboardX package: ' \
           'pip install "kaffe[tensorboard]"' in result.stderr
    assert not Path(tmp_path / "board").exists()
