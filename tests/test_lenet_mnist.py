"""LeNet on real MNIST from the command line, as the README runs it (long: -m slow)."""
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import MNIST_RAW, REPO
from kaffe.proto import caffe_pb2

pytestmark = pytest.mark.slow


def kaffe(*args, cwd):
    result = subprocess.run([sys.executable, "-m", "kaffe.tools.cli", *args], cwd=cwd, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


def weights(path):
    net = caffe_pb2.NetParameter.FromString(path.read_bytes())
    return {layer.name: [np.array(b.data) for b in layer.blobs] for layer in net.layer if layer.blobs}


def test_lenet_trains_to_caffe_accuracy_and_resumes_exactly(tmp_path):
    if not MNIST_RAW.exists():
        pytest.skip(f"real MNIST not found at {MNIST_RAW}")
    (tmp_path / "models").symlink_to(REPO / "models")
    kaffe("data", "mnist", "--from", str(MNIST_RAW), cwd=tmp_path)
    log = kaffe("train", "--solver", "models/lenet/lenet_solver.prototxt", cwd=tmp_path)
    tests = re.findall(r"Iteration (\d+), Testing net \(#0\)\n.*Test net output #0: accuracy = ([\d.]+)", log)
    assert [int(it) for it, _ in tests] == list(range(0, 10001, 500))
    final_accuracy = float(tests[-1][1])
    print(f"LeNet test accuracy at iteration 10000: {final_accuracy}")
    assert final_accuracy >= 0.990
    out = tmp_path / "data" / "mnist"
    for it in (5000, 10000):
        assert (out / f"lenet_iter_{it}.caffemodel").exists() and (out / f"lenet_iter_{it}.solverstate").exists()

    solver = (REPO / "models" / "lenet" / "lenet_solver.prototxt").read_text()
    (tmp_path / "resume_solver.prototxt").write_text(
        solver.replace('snapshot_prefix: "data/mnist/lenet"', 'snapshot_prefix: "data/mnist/resumed"'))
    kaffe("train", "--solver", "resume_solver.prototxt", "--snapshot", "data/mnist/lenet_iter_5000.solverstate",
          cwd=tmp_path)
    uninterrupted, resumed = weights(out / "lenet_iter_10000.caffemodel"), weights(out / "resumed_iter_10000.caffemodel")
    assert uninterrupted.keys() == resumed.keys()
    for name in uninterrupted:
        for a, b in zip(uninterrupted[name], resumed[name]):
            assert np.abs(a - b).max() <= 1e-6, name
