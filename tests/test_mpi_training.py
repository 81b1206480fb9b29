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


def assert_same_weights(mine, reference, rtol=1e-5, skip=()):
    mine, reference = weights(mine), weights(reference)
    assert mine.keys() == reference.keys()
    for key, value in reference.items():
        if key[0] in skip:
            continue
        error = np.linalg.norm(mine[key] - value) / max(np.linalg.norm(value), 1e-30)
        assert error <= rtol, f"{key}: relative difference {error:.3g}"


def check_equivalence(tmp_path, mnist, iterations, size, extra=SGD, norm="", reference_iter_size=1):
    """2 ranks x 32 against one process x 64 (or x 32 with iter_size 2): the same weights."""
    ranks = write_run(tmp_path / "ranks", mnist, 32, iterations, size, norm, extra=extra)
    alone = write_run(tmp_path / "alone", mnist, 64 // reference_iter_size, iterations, size, norm,
                      iter_size=reference_iter_size, extra=extra)
    result = mpiexec(["train", "--solver", str(ranks)])
    assert result.returncode == 0, result.stderr[-3000:]
    train_alone(alone, iterations)
    # BatchNorm's mean/variance blobs are each rank's own running statistics: rank 0's batches only
    skip = ("bn1",) if norm else ()
    assert_same_weights(tmp_path / "ranks" / f"run_iter_{iterations}.caffemodel",
                        tmp_path / "alone" / f"run_iter_{iterations}.caffemodel", skip=skip)
    return result
