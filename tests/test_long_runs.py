"""Long runs keep a flat footprint: 10,000 iterations of a small LeNet on an LMDB, tested and snapshotted every 500
iterations, sampled every 500 iterations for host RSS, open files and threads (the prefetch threads); on PoCL, the
OpenCL pool's device allocations over a GPU-mode run. Also, in the unit suite: nets with data layers made and
dropped again leave no threads or open files behind."""
import gc
import os
import threading

import lmdb
import numpy as np
import pytest
from google.protobuf import text_format

from kaffe.engine import device
from kaffe.engine.log import logger
from kaffe.engine.net import Net
from kaffe.proto import caffe_pb2
from kaffe.solvers import get_solver

from gradient_check import opencl_available

NET = """
name: "small_lenet"
layer {{ name: "mnist" type: "Data" top: "data" top: "label" include {{ phase: TRAIN }}
        transform_param {{ scale: 0.00390625 }} data_param {{ source: "{db}" batch_size: 16 backend: LMDB }} }}
layer {{ name: "mnist" type: "Data" top: "data" top: "label" include {{ phase: TEST }}
        transform_param {{ scale: 0.00390625 }} data_param {{ source: "{db}" batch_size: 32 backend: LMDB }} }}
layer {{ name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param {{ num_output: 8 kernel_size: 5 stride: 1 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
        pooling_param {{ pool: MAX kernel_size: 2 stride: 2 }} }}
layer {{ name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
        convolution_param {{ num_output: 16 kernel_size: 5 stride: 1 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "pool2" type: "Pooling" bottom: "conv2" top: "pool2"
        pooling_param {{ pool: MAX kernel_size: 2 stride: 2 }} }}
layer {{ name: "ip1" type: "InnerProduct" bottom: "pool2" top: "ip1"
        inner_product_param {{ num_output: 64 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }}
layer {{ name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
        inner_product_param {{ num_output: 10 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "accuracy" type: "Accuracy" bottom: "ip2" bottom: "label" top: "accuracy" include {{ phase: TEST }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }}
"""


@pytest.fixture(scope="module")
def digits_db(tmp_path_factory):
    """2,000 raw 1x28x28 Datums (a class-dependent bright square on noise), small enough to be read many times."""
    path = tmp_path_factory.mktemp("long_runs") / "digits_lmdb"
    rng = np.random.default_rng(0)
    env = lmdb.open(str(path), map_size=1 << 26)
    with env.begin(write=True) as txn:
        for i in range(2000):
            label = i % 10
            pixels = rng.integers(0, 60, size=(1, 28, 28), dtype=np.uint8)
            pixels[0, 2 * label:2 * label + 8, 4:12] = 220
            datum = caffe_pb2.Datum(channels=1, height=28, width=28, data=pixels.tobytes(), label=label)
            txn.put(b"%08d" % i, datum.SerializeToString())
    env.close()
    return path


def footprint():
    """(resident set in bytes, open file descriptors, threads of this process, prefetch threads)."""
    with open("/proc/self/status") as f:
        rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    prefetch = sum(t.name.startswith("kaffe-prefetch") for t in threading.enumerate())
    return rss, len(os.listdir("/proc/self/fd")), len(os.listdir("/proc/self/task")), prefetch


def solver_for(db, folder, iterations, every):
    param = text_format.Parse(
        f'net_param {{ {NET.format(db=db)} }} base_lr: 0.01 momentum: 0.9 weight_decay: 0.0005 lr_policy: "inv" '
        f'gamma: 0.0001 power: 0.75 max_iter: {iterations} display: 0 test_iter: 10 test_interval: {every} '
        f'snapshot: {every} snapshot_prefix: "{folder}/small_lenet" random_seed: 1', caffe_pb2.SolverParameter())
    return get_solver(param)


def run_sampled(solver, iterations, every):
    samples = []
    for _ in range(iterations // every):
        solver.step(every)   # tests at the start of each chunk after the first, snapshots at its end
        gc.collect()
        samples.append(footprint())
    return samples


@pytest.mark.slow
def test_ten_thousand_iterations_keep_a_flat_footprint(digits_db, tmp_path):
    level = logger.level
    logger.setLevel("WARNING")
    try:
        solver = solver_for(digits_db, tmp_path, 10000, 500)
        samples = run_sampled(solver, 10000, 500)
    finally:
        logger.setLevel(level)
    rss = [s[0] for s in samples]
    settled = rss[1]   # after the first 1,000 iterations: the LMDB pages, caches and pools are in
    print("RSS MiB every 500 iterations:", [round(r / 2 ** 20, 1) for r in rss])
    print("open files, threads, prefetch threads:", sorted({s[1:] for s in samples}))
    assert max(rss[1:]) - settled < 8 << 20, rss    # no growth beyond noise over 9,000 more iterations
    assert len({s[1] for s in samples}) == 1, samples   # open files constant
    assert len({s[2] for s in samples}) == 1, samples   # threads constant
    assert {s[3] for s in samples} == {2}, samples      # one prefetch thread per data layer (train, test)
    assert len(list(tmp_path.glob("small_lenet_iter_*.caffemodel"))) == 20


@pytest.mark.slow
@pytest.mark.opencl
@pytest.mark.skipif(not opencl_available(), reason="no OpenCL device")
def test_gpu_mode_keeps_device_allocations_flat(digits_db, tmp_path, gpu_mode):
    from kaffe.engine import opencl
    level = logger.level
    logger.setLevel("WARNING")
    pool = opencl.current().allocator
    active = []
    try:
        solver = solver_for(digits_db, tmp_path, 800, 100)
        for _ in range(8):
            solver.step(100)
            active.append((pool.active_blocks, pool.active_bytes, pool.held_blocks))
    finally:
        logger.setLevel(level)
    print("OpenCL pool (active blocks, active bytes, held blocks) every 100 iterations:", active)
    assert len({a[:2] for a in active[1:]}) == 1, active   # the device allocations in use stay the same
    assert max(a[2] for a in active[1:]) <= active[1][2] + 2, active


def test_nets_made_and_dropped_leave_no_threads_or_open_files(digits_db):
    device.set_random_seed(1)
    param = text_format.Parse(NET.format(db=digits_db), caffe_pb2.NetParameter())
    Net(param, caffe_pb2.TRAIN).forward()
    gc.collect()
    before = footprint()
    for _ in range(20):
        net = Net(param, caffe_pb2.TRAIN)
        net.forward()
        del net
    gc.collect()
    after = footprint()
    assert after[1:] == before[1:], (before, after)
