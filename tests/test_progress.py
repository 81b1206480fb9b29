"""Progress bars (tqdm) of the long tools: on a terminal only (a pseudo-terminal here), never in piped output,
silenced by --quiet; piped output keeps its one-line messages."""
import fcntl
import io
import os
import pty
import re
import struct
import subprocess
import sys
import termios

import numpy as np
import pytest

from kaffe.tools.data import write_datums
from kaffe.tools.progress import Progress
from test_cli import TINY_NET


def run_in_terminal(args, cwd):
    """Run a command with a 100-column pseudo-terminal as stdin/stdout/stderr; returns (status, output)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    process = subprocess.Popen(args, cwd=cwd, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 1 << 16)
        except OSError:   # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return process.wait(timeout=120), b"".join(chunks).decode(errors="replace")


def run_piped(args, cwd):
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120)
    return result.returncode, result.stdout + result.stderr


def kaffe_args(*args):
    return [sys.executable, "-m", "kaffe.tools.cli", *args]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny net with weights (a short training) and a database of 50 small images."""
    path = tmp_path_factory.mktemp("progress")
    (path / "net.prototxt").write_text(TINY_NET)
    (path / "solver.prototxt").write_text('net: "net.prototxt" base_lr: 0.1 lr_policy: "fixed" max_iter: 2 '
                                          'snapshot_prefix: "tiny" random_seed: 1\n')
    assert run_piped(kaffe_args("train", "--solver", "solver.prototxt"), path)[0] == 0
    images = np.random.default_rng(0).integers(0, 256, (50, 3, 4, 4), dtype=np.uint8)
    write_datums(str(path / "images_lmdb"), images, np.arange(50))
    return path


TOOLS = {   # command, the bar's name
    "test": (["test", "--model", "net.prototxt", "--weights", "tiny_iter_2.caffemodel", "--iterations", "20"],
             "Scoring"),
    "compute_image_mean": (["compute_image_mean", "images_lmdb", "mean.binaryproto"], "Averaging images_lmdb"),
    "upgrade": (["upgrade_net_proto_binary", "tiny_iter_2.caffemodel", "upgraded.caffemodel"], "Upgrading"),
}


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_bars_on_a_terminal_only(folder, tool):
    args, name = TOOLS[tool]
    status, output = run_in_terminal(kaffe_args(*args), folder)
    assert status == 0, output
    assert f"\r{name}" in output and "100%|" in output, output[-2000:]
    status, quiet = run_in_terminal(kaffe_args(*args, "--quiet"), folder)
    assert status == 0 and name not in quiet and "%|" not in quiet, quiet[-2000:]
    status, piped = run_piped(kaffe_args(*args), folder)
    assert status == 0 and "\r" not in piped and "%|" not in piped
    # the same log lines, terminal or not (the bar's lines aside)
    shown = [line.split("\r")[-1] for line in output.split("\r\n")]   # what stays on each terminal line
    assert sorted(_shapes(shown)) == sorted(_shapes([line for line in piped.split("\n") if "[#" not in line]))


def _shapes(lines):
    return [re.sub(r"[\d.]+", "#", line) for line in lines if line.strip() and "%|" not in line]


def test_piped_compute_image_mean_keeps_its_lines_per_ten_percent(folder):
    status, piped = run_piped(kaffe_args("compute_image_mean", "images_lmdb"), folder)
    assert status == 0
    lines = [line for line in piped.splitlines() if line.startswith("Averaging images_lmdb: [")]
    assert lines[0] == "Averaging images_lmdb: [###                           ] 5/50 (10%)" and len(lines) == 10
    status, quiet = run_piped(kaffe_args("compute_image_mean", "--quiet", "images_lmdb"), folder)
    assert status == 0 and "Averaging" not in quiet and "mean_value per channel" in quiet


def test_progress_lines_on_a_stream_that_is_not_a_terminal():
    out = io.StringIO()
    bar = Progress(2_000_000, "Downloading x", out, unit="B")
    for _ in range(40):
        bar.update(50_000)
    lines = out.getvalue().splitlines()
    assert len(lines) == 10 and lines[0] == "Downloading x: [###                           ] 0.2 MB/2.0 MB (10%)"
    assert lines[-1] == "Downloading x: [##############################] 2.0 MB/2.0 MB (100%)"
    silent = io.StringIO()
    for stream, lines_too in ((silent, False), (None, True)):
        bar = Progress(10, "quiet", stream, lines=lines_too)
        for _ in range(10):
            bar.update()
    assert silent.getvalue() == ""
