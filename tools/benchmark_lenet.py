"""LeNet training speed: kaffe (CPU) against PyTorch (CPU) with the same architecture, in one run.

    python -m kaffe.tools.benchmark_lenet [--iterations 200] [--threads 2]

Both run batch-64 SGD steps (forward, backward, momentum update) with `--threads` BLAS/intra-op threads,
each in its own subprocess. kaffe's subprocess runs with OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset:
some machines set them to force an older OpenBLAS kernel that halves numpy's GEMM speed. kaffe reads
MNIST from the LMDB of `kaffe data mnist` (models/lenet/lenet_train_test.prototxt, run from the
repository root); PyTorch gets the same images as preloaded tensors.
"""
import argparse
import json
import os
import subprocess
import sys
import time

RESULT_TAG = "BENCHMARK_RESULT "


def _thread_env(threads, drop_openblas_overrides):
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    if drop_openblas_overrides:
        env.pop("OPENBLAS_CORETYPE", None)
        env.pop("OPENBLAS_L2_SIZE", None)
    return env


def measure_kaffe(iterations, warmup):
    import numpy as np

    from kaffe.engine import device
    from kaffe.engine.log import init_log
    from kaffe.solvers import get_solver, read_solver_param
    init_log(level=40)  # errors only: the log would be timed too
    param = read_solver_param("models/lenet/lenet_solver.prototxt")
    param.ClearField("test_iter")
    param.ClearField("test_interval")
    param.ClearField("test_net")
    param.display = 0
    param.snapshot = 0
    param.snapshot_after_train = False
    param.random_seed = 1
    device.set_mode_cpu()
    solver = get_solver(param)
    solver.test_nets = []
    solver.step(warmup)
    start = time.perf_counter()
    solver.step(iterations)
    seconds = time.perf_counter() - start
    kernel = None
    try:
        from threadpoolctl import threadpool_info
        kernel = [(i.get("internal_api"), i.get("architecture"), i.get("num_threads")) for i in threadpool_info()]
    except ImportError:
        pass
    return {"ms_per_iter": seconds / iterations * 1e3, "blas": kernel, "numpy": np.__version__}


def measure_torch(iterations, warmup, threads):
    import numpy as np
    import torch
    from torch import nn

    from kaffe.tools.data import read_idx
    torch.set_num_threads(threads)
    torch.manual_seed(1)
    mnist = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "mnist")
    source = os.environ.get("KAFFE_MNIST_DIR", mnist)
    images = read_idx(os.path.join(source, "train-images-idx3-ubyte.gz"))[: 64 * 50]
    labels = read_idx(os.path.join(source, "train-labels-idx1-ubyte.gz"))[: 64 * 50]
    x = torch.from_numpy(images.astype(np.float32).reshape(-1, 1, 28, 28) / 256.0)
    y = torch.from_numpy(labels.astype(np.int64))
    model = nn.Sequential(nn.Conv2d(1, 20, 5), nn.MaxPool2d(2, 2), nn.Conv2d(20, 50, 5), nn.MaxPool2d(2, 2),
                          nn.Flatten(), nn.Linear(800, 500), nn.ReLU(), nn.Linear(500, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=0.0005)
    loss_fn = nn.CrossEntropyLoss()

    def step(i):
        batch = slice((i % 50) * 64, (i % 50 + 1) * 64)
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
    cmd = [sys.executable, "-m", "kaffe.tools.benchmark_lenet", "--child", which,
           "--iterations", str(args.iterations), "--warmup", str(args.warmup), "--threads", str(args.threads)]
    out = subprocess.run(cmd, env=_thread_env(args.threads, drop_openblas_overrides), capture_output=True,
                         text=True)
    for line in out.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    raise SystemExit(f"{which} benchmark failed:\n{out.stdout}\n{out.stderr}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", choices=("kaffe", "torch"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child == "kaffe":
        print(RESULT_TAG + json.dumps(measure_kaffe(args.iterations, args.warmup)))
        return 0
    if args.child == "torch":
        print(RESULT_TAG + json.dumps(measure_torch(args.iterations, args.warmup, args.threads)))
        return 0
    kaffe = _run_child("kaffe", args, drop_openblas_overrides=True)
    torch = _run_child("torch", args, drop_openblas_overrides=False)
    print(f"LeNet training step, batch 64, {args.threads} threads, {args.iterations} iterations after "
          f"{args.warmup} warm-up")
    print(f"  kaffe (numpy {kaffe['numpy']}; OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE unset; BLAS {kaffe['blas']}): "
          f"{kaffe['ms_per_iter']:.2f} ms/iter ({1e3 / kaffe['ms_per_iter']:.1f} iter/s)")
    print(f"  PyTorch {torch['torch']} CPU: {torch['ms_per_iter']:.2f} ms/iter "
          f"({1e3 / torch['ms_per_iter']:.1f} iter/s)")
    print(f"  ratio kaffe/PyTorch time per iteration: {kaffe['ms_per_iter'] / torch['ms_per_iter']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
