"""What --tensorboard costs: LeNet training with and without TensorBoard event files, in one run.

    python -m kaffe.tools.benchmark_tensorboard [--iterations 500] [--repeats 5] [--mnist DIR]

Each measurement is a fresh process training models/lenet/lenet_solver.prototxt from the LMDB of `kaffe data
mnist` (DIR/mnist_train_lmdb, default data/mnist) on the CPU with 2 threads: `--iterations` steps after 20 of
warm-up, displaying every 100 as the solver says (the scalars), then one snapshot (the histograms); the test
passes are left out (the same work in both). The two take turns for `--repeats` rounds and the medians are
compared. Run it with OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset (`env -u ...`), as the other benchmarks.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from .benchmark_lenet import RESULT_TAG, _thread_env


def measure(iterations, warmup, mnist, tensorboard):
    """Seconds per training step; tensorboard: a folder for the event files, or None."""
    from ..engine import device
    from ..engine.log import init_log
    from ..engine.net import read_net_param
    from ..solvers import get_solver, read_solver_param
    init_log(level=40)   # errors only: both sides would time the same log lines
    param = read_solver_param("models/lenet/lenet_solver.prototxt")
    net = read_net_param(param.net)
    for layer in net.layer:
        if layer.type == "Data":
            layer.data_param.source = layer.data_param.source.replace("data/mnist", mnist)
    param.ClearField("net")
    param.net_param.CopyFrom(net)
    for field in ("test_iter", "test_interval", "test_net"):
        param.ClearField(field)
    param.snapshot = 0
    param.snapshot_after_train = False
    with tempfile.TemporaryDirectory() as folder:
        param.snapshot_prefix = os.path.join(folder, "lenet")
        device.set_mode_cpu()
        solver = get_solver(param, tensorboard=tensorboard and os.path.join(folder, tensorboard))
        solver.step(warmup)
        start = time.perf_counter()
        solver.step(iterations)
        solver.snapshot()
        seconds = time.perf_counter() - start
        solver.report.finish()
    return {"ms_per_iter": seconds / iterations * 1e3}


def _run_child(args, tensorboard):
    cmd = [sys.executable, "-m", "kaffe.tools.benchmark_tensorboard", "--child", "--iterations", str(args.iterations),
           "--warmup", str(args.warmup), "--mnist", args.mnist] + (["--tensorboard"] if tensorboard else [])
    out = subprocess.run(cmd, env=_thread_env(2, True), capture_output=True, text=True)
    for line in out.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])["ms_per_iter"]
    raise SystemExit(f"benchmark child failed:\n{out.stdout}\n{out.stderr}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5, help="alternating rounds; the medians are compared")
    parser.add_argument("--mnist", default=os.path.join("data", "mnist"), help="the folder of mnist_train_lmdb")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tensorboard", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(RESULT_TAG + json.dumps(measure(args.iterations, args.warmup, args.mnist,
                                              "runs" if args.tensorboard else None)))
        return 0
    times = {False: [], True: []}
    for round_ in range(args.repeats):
        for tensorboard in (False, True) if round_ % 2 == 0 else (True, False):
            times[tensorboard].append(_run_child(args, tensorboard))
        print(f"round {round_ + 1}: without {times[False][-1]:.2f} ms/iter, with --tensorboard "
              f"{times[True][-1]:.2f} ms/iter", flush=True)
    without, with_board = statistics.median(times[False]), statistics.median(times[True])
    print(f"LeNet training, median of {args.repeats} rounds of {args.iterations} iterations: without "
          f"{without:.2f} ms/iter, with --tensorboard {with_board:.2f} ms/iter: "
          f"{100 * (with_board / without - 1):+.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
