"""Caffe's MNIST siamese (ContrastiveLoss, shared weights) and autoencoder (SigmoidCrossEntropyLoss + EuclideanLoss)
examples train from their solver files with the loss going down (long: -m slow)."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import MNIST_RAW, REPO
from kaffe.tools import data

pytestmark = pytest.mark.slow
ITERATIONS = int(os.environ.get("KAFFE_EXAMPLE_ITERS", 1000))


def kaffe(*args, cwd):
    result = subprocess.run([sys.executable, "-m", "kaffe.tools.cli", *args], cwd=cwd, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


def write_pairs(path, images, labels, seed):
    """Caffe's convert_mnist_siamese_data layout: item k pairs two random images i, j as the 2 channels of one
    Datum (image i, then image j), label 1 when their digits agree; keys "%08d"."""
    rng = np.random.default_rng(seed)
    i, j = rng.integers(0, len(images), len(images)), rng.integers(0, len(images), len(images))
    pairs = np.concatenate([images[i], images[j]], axis=1)  # N x 2 x 28 x 28
    data.write_datums(str(path), pairs, (labels[i] == labels[j]).astype(np.int64))


def workspace(tmp_path, mnist_lmdb, model, solver_name, **overrides):
    """A working directory with models/ and data/mnist/ as the solver files expect, and a copy of the solver with
    the given fields replaced; returns the solver's path relative to it."""
    (tmp_path / "models").symlink_to(REPO / "models")
    out = tmp_path / "data" / "mnist"
    out.mkdir(parents=True)
    for name in ("mnist_train_lmdb", "mnist_test_lmdb"):
        (out / name).symlink_to(mnist_lmdb / name)
    text = (REPO / "models" / model / solver_name).read_text()
    for field, value in overrides.items():
        text, count = re.subn(rf"^{field}: .*$", f"{field}: {value}", text, flags=re.M)
        assert count, field
    (tmp_path / solver_name).write_text(text)
    return solver_name, out


def train_losses(log):
    return [(int(it), float(loss)) for it, loss in re.findall(r"Iteration (\d+)[^\n]*, loss = ([\d.e+-]+)", log)]


def outputs_named(log, name):
    """Every 'Test net output #k: name = value' of the log, in order."""
    return [float(v) for v in re.findall(rf"Test net output #\d+: {name} = ([\d.e+-]+)", log)]


def test_siamese_contrastive_loss_goes_down(tmp_path, mnist_lmdb):
    solver, out = workspace(tmp_path, mnist_lmdb, "mnist_siamese", "mnist_siamese_solver.prototxt",
                            max_iter=ITERATIONS, test_interval=ITERATIONS // 2, snapshot=0)
    contents = data.load_mnist_folder(str(MNIST_RAW))
    for split, seed in (("train", 1), ("test", 2)):
        images, labels = data._mnist_split(contents, "train" if split == "train" else "t10k")
        write_pairs(out / f"mnist_siamese_{split}_lmdb", images, labels, seed)
    log = kaffe("train", "--solver", solver, cwd=tmp_path)
    losses = train_losses(log)
    tests = outputs_named(log, "loss")
    print(f"siamese train loss (smoothed) by iteration: {losses}")
    print(f"siamese test loss at 0, {ITERATIONS // 2}, {ITERATIONS}: {tests}")
    assert len(tests) == 3
    assert tests[-1] < 0.5 * tests[0] and tests[-1] < tests[1] * 1.05
    assert losses[-1][1] < 0.5 * losses[0][1]


def test_autoencoder_losses_go_down(tmp_path, mnist_lmdb):
    solver, _ = workspace(tmp_path, mnist_lmdb, "mnist_autoencoder", "mnist_autoencoder_solver.prototxt",
                          max_iter=ITERATIONS, test_interval=ITERATIONS // 2, snapshot=0)
    log = kaffe("train", "--solver", solver, cwd=tmp_path)
    losses = train_losses(log)
    cross_entropy = outputs_named(log, "cross_entropy_loss")
    l2 = outputs_named(log, "l2_error")
    print(f"autoencoder train loss (smoothed) by iteration: {losses}")
    print(f"autoencoder test cross_entropy_loss (test-on-train, test-on-test alternating): {cross_entropy}")
    print(f"autoencoder test l2_error: {l2}")
    assert len(cross_entropy) == 6 and len(l2) == 6  # two test nets at the start, half-way and the end
    on_train, on_test = cross_entropy[0::2], cross_entropy[1::2]
    for series in (on_train, on_test, l2[0::2], l2[1::2]):
        assert series[2] < series[1] < series[0]
    assert losses[-1][1] < 0.5 * losses[0][1]
