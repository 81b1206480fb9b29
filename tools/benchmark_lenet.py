"""Training speed: kaffe (CPU) against PyTorch (CPU) with the same architecture and solver, in one run.

    python -m kaffe.tools.benchmark_lenet [--net lenet|cifar10_quick] [--iterations 200] [--threads 2] [--repeats 3]

Both run SGD steps (forward, backward, momentum update) with `--threads` BLAS/intra-op threads, each in its
own subprocess. kaffe's subprocesses run with OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset: some machines set
them to force an older OpenBLAS kernel that halves numpy's GEMM speed.
- lenet (batch 64): kaffe runs models/lenet twice: with preloaded batches (a MemoryData layer, as PyTorch gets
  its tensors) and reading the LMDB of `kaffe data mnist` (run from the repository root). MNIST's raw files come
  from ../shared/data/mnist or $KAFFE_MNIST_DIR.
- cifar10_quick (batch 100): models/cifar10_quick on preloaded random images (speed does not depend on them).
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

RESULT_TAG = "BENCHMARK_RESULT "


def _thread_env(threads, drop_openblas_overrides):
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    if drop_openblas_overrides:
        env.pop("OPENBLAS_CORETYPE", None)
        env.pop("OPENBLAS_L2_SIZE", None)
    return env


def mnist_batches(count):
    """The first `count` MNIST training images (scaled by 1/256, as LeNet's transform_param) and labels."""
    from kaffe.tools.data import read_idx
    source = os.environ.get("KAFFE_MNIST_DIR", os.path.join("..", "shared", "data", "mnist"))
    images = read_idx(os.path.join(source, "train-images-idx3-ubyte.gz"))[:count]
    labels = read_idx(os.path.join(source, "train-labels-idx1-ubyte.gz"))[:count]
    return images.astype(np.float32).reshape(-1, 1, 28, 28) / 256.0, labels.astype(np.float32)


NETS = {"lenet": {"batch": 64, "shape": (1, 28, 28)}, "cifar10_quick": {"batch": 100, "shape": (3, 32, 32)}}


def training_batches(net, count):
    """`count` images and labels: MNIST's first ones for LeNet, random ones for CIFAR-10 quick."""
    if net == "lenet":
        return mnist_batches(count)
    rng = np.random.default_rng(0)
    return (rng.standard_normal((count, *NETS[net]["shape"]), np.float32) * 50,
            rng.integers(0, 10, count).astype(np.float32))


def measure_kaffe(net_name, iterations, warmup, source):
    """ms per SGD step; source "lmdb": the Data layer reads the LMDB of `kaffe data mnist` on its
    prefetch thread; "memory": a MemoryData layer cycles through preloaded batches, as PyTorch gets them."""
    from kaffe.engine import device
    from kaffe.engine.log import init_log
    from kaffe.engine.net import read_net_param
    from kaffe.proto import caffe_pb2
    from kaffe.solvers import get_solver, read_solver_param
    init_log(level=40)  # errors only: the log would be timed too
    param = read_solver_param("models/lenet/lenet_solver.prototxt" if net_name == "lenet" else
                              f"models/{net_name}/solver.prototxt")
    param.ClearField("test_iter")
    param.ClearField("test_interval")
    param.ClearField("test_net")
    param.display = 0
    param.snapshot = 0
    param.snapshot_after_train = False
    param.random_seed = 1
    batch, (channels, height, width) = NETS[net_name]["batch"], NETS[net_name]["shape"]
    if source == "memory":
        net = read_net_param(param.net)
        for layer in net.layer:
            if layer.type == "Data":
                layer.type = "MemoryData"
                layer.ClearField("data_param")
                layer.ClearField("transform_param")
                layer.memory_data_param.CopyFrom(caffe_pb2.MemoryDataParameter(
                    batch_size=batch, channels=channels, height=height, width=width))
        param.ClearField("net")
        param.net_param.CopyFrom(net)
    device.set_mode_cpu()
    solver = get_solver(param)
    solver.test_nets = []
    if source == "memory":
        solver.net.set_input_arrays(*training_batches(net_name, batch * 50))
    solver.step(warmup)
    start = time.perf_counter()
    solver.step(iterations)
    seconds = time.perf_counter() - start
    return {"ms_per_iter": seconds / iterations * 1e3, "numpy": np.__version__}


def measure_torch(net_name, iterations, warmup, threads):
    import torch
    from torch import nn

    torch.set_num_threads(threads)
    torch.manual_seed(1)
    size = NETS[net_name]["batch"]
    images, labels = training_batches(net_name, size * 50)
    x = torch.from_numpy(images)
    y = torch.from_numpy(labels.astype(np.int64))
    if net_name == "lenet":
        model = nn.Sequential(nn.Conv2d(1, 20, 5), nn.MaxPool2d(2, 2), nn.Conv2d(20, 50, 5), nn.MaxPool2d(2, 2),
                              nn.Flatten(), nn.Linear(800, 500), nn.ReLU(), nn.Linear(500, 10))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=0.0005)
    else:  # models/cifar10_quick: Caffe's pooling rounds up (ceil_mode)
        model = nn.Sequential(nn.Conv2d(3, 32, 5, padding=2), nn.MaxPool2d(3, 2, ceil_mode=True), nn.ReLU(),
                              nn.Conv2d(32, 32, 5, padding=2), nn.ReLU(), nn.AvgPool2d(3, 2, ceil_mode=True),
                              nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.AvgPool2d(3, 2, ceil_mode=True),
                              nn.Flatten(), nn.Linear(64 * 4 * 4, 64), nn.Linear(64, 10))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9, weight_decay=0.004)
    loss_fn = nn.CrossEntropyLoss()

    def step(i):
        batch = slice((i % 50) * size, (i % 50 + 1) * size)
        optimizer.zero_grad()
        loss = loss_fn(model(x[batch]), y[batch])
        loss.backward()
        optimizer.step()

    for i in range(warmup):
        step(i)
    start = time.perf_counter()
    for i in range(iterations):
        step(i)
    seconds = time.perf_counter() - start
    return {"ms_per_iter": seconds / iterations * 1e3, "torch": torch.__version__}


def _run_child(which, args, drop_openblas_overrides):
    cmd = [sys.executable, "-m", "kaffe.tools.benchmark_lenet", "--child", which, "--net", args.net,
           "--iterations", str(args.iterations), "--warmup", str(args.warmup), "--threads", str(args.threads)]
    out = subprocess.run(cmd, env=_thread_env(args.threads, drop_openblas_overrides), capture_output=True,
                         text=True)
    for line in out.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    raise SystemExit(f"{which} benchmark failed:\n{out.stdout}\n{out.stderr}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--net", choices=sorted(NETS), default="lenet")
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds; the medians are compared")
    parser.add_argument("--child", choices=("kaffe-lmdb", "kaffe-memory", "torch"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        from .benchmark_zoo import peak_rss_mb
        result = measure_kaffe(args.net, args.iterations, args.warmup, args.child[len("kaffe-"):]) \
            if args.child.startswith("kaffe-") else measure_torch(args.net, args.iterations, args.warmup, args.threads)
        print(RESULT_TAG + json.dumps(dict(result, rss_mb=peak_rss_mb())))
        return 0
    # the measurements take turns, `--repeats` rounds: a slow spell of a shared machine then touches each of
    # them, and the medians compare like with like
    runs = {"kaffe-memory": [], "kaffe-lmdb": [], "torch": []} if args.net == "lenet" else \
        {"kaffe-memory": [], "torch": []}
    for _ in range(args.repeats):
        for which, times in runs.items():
            times.append(_run_child(which, args, drop_openblas_overrides=which != "torch"))
    median = {which: float(np.median([r["ms_per_iter"] for r in times])) for which, times in runs.items()}
    print(f"{args.net} training step, batch {NETS[args.net]['batch']}, {args.threads} threads, "
          f"{args.iterations} iterations after "
          f"{args.warmup} warm-up, median of {args.repeats} alternating runs (kaffe: numpy "
          f"{runs['kaffe-memory'][0]['numpy']}, OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE unset)")
    for label, which in (("kaffe, preloaded batches (MemoryData)", "kaffe-memory"),
                         ("kaffe, LMDB Data layer with prefetch thread", "kaffe-lmdb"),
                         (f"PyTorch {runs['torch'][0]['torch']} CPU, preloaded batches", "torch")):
        if which not in runs:
            continue
        each = ", ".join(f"{r['ms_per_iter']:.2f}" for r in runs[which])
        rss = max(r["rss_mb"] for r in runs[which])
        print(f"  {label}: {median[which]:.2f} ms/iter ({1e3 / median[which]:.1f} iter/s; runs: {each}; "
              f"peak RSS {rss:.0f} MB)")
    lmdb = f", {median['kaffe-lmdb'] / median['torch']:.2f} (kaffe from LMDB)" if "kaffe-lmdb" in median else ""
    print(f"  ratio kaffe/PyTorch time per iteration: {median['kaffe-memory'] / median['torch']:.2f} "
          f"(same input path){lmdb}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
