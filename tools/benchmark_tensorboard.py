"""What --tensorboard costs: LeNet training with and without TensorBoard event files, in one run.

    python -m kaffe.tools.benchmark_tensorboard [--iterations 500] [--repeats 7] [--mnist DIR]

One process (2 threads) builds two LeNet solvers from models/lenet/lenet_solver.prototxt reading the LMDB of
`kaffe data mnist` (DIR/mnist_train_lmdb, default data/mnist), one of them writing TensorBoard event files, and
times `--iterations` steps of each in turn (the order alternating) for `--repeats` rounds after a warm-up; the
medians are compared, of wall time and of the process's CPU time (which a busy shared machine disturbs less).
Steps display every 100 iterations as the solver says (the scalars); the test passes are left out (the same work
in both). The CPU time spent inside the TensorBoard calls is counted too, and the histograms of a snapshot are
timed apart and shown as a share of the solver's snapshot interval. Run it with OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset (`env -u ...`), as the
other benchmarks.
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


def _solver(mnist, snapshot_prefix, tensorboard):
    from ..engine.net import read_net_param
    from ..solvers import get_solver, read_solver_param
    param = read_solver_param("models/lenet/lenet_solver.prototxt")
    net = read_net_param(param.net)
    for layer in net.layer:
        if layer.type == "Data":
            layer.data_param.source = layer.data_param.source.replace("data/mnist", mnist)
    param.ClearField("net")
    param.net_param.CopyFrom(net)
    for field in ("test_iter", "test_interval", "test_net"):
        param.ClearField(field)
    param.snapshot_prefix = snapshot_prefix
    return get_solver(param, tensorboard=tensorboard)


def measure(iterations, warmup, repeats, mnist):
    """ms per step of each solver, round by round, and the seconds of one snapshot's histograms."""
    from ..engine import device
    from ..engine.log import init_log
    init_log(level=40)   # errors only: both sides would time the same log lines
    device.set_mode_cpu()
    with tempfile.TemporaryDirectory() as folder:
        solvers = {"without": _solver(mnist, os.path.join(folder, "a"), None),
                   "with": _solver(mnist, os.path.join(folder, "b"), os.path.join(folder, "runs"))}
        board = solvers["with"].report.tensorboard
        in_calls = [0.0]

        def counted(method):
            def run(*args):
                start = time.thread_time()
                method(*args)
                in_calls[0] += time.thread_time() - start
            return run

        board.display, board.test = counted(board.display), counted(board.test)
        for solver in solvers.values():
            solver.step(warmup)
        in_calls[0] = 0.0
        times = {(name, clock): [] for name in solvers for clock in ("wall", "cpu")}
        for round_ in range(repeats):
            for name in ("without", "with") if round_ % 2 == 0 else ("with", "without"):
                wall, cpu = time.perf_counter(), time.process_time()
                solvers[name].step(iterations)
                times[name, "wall"].append((time.perf_counter() - wall) / iterations * 1e3)
                times[name, "cpu"].append((time.process_time() - cpu) / iterations * 1e3)
        start = time.perf_counter()
        board.snapshot([])
        histograms = time.perf_counter() - start
        board.close()
        return {"ms_per_iter": {f"{name} {clock}": t for (name, clock), t in times.items()},
                "calls_ms_per_iter": in_calls[0] / (iterations * repeats) * 1e3, "histogram_s": histograms,
                "snapshot": solvers["with"].param.snapshot}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=7, help="alternating rounds; the medians are compared")
    parser.add_argument("--mnist", default=os.path.join("data", "mnist"), help="the folder of mnist_train_lmdb")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(RESULT_TAG + json.dumps(measure(args.iterations, args.warmup, args.repeats, args.mnist)))
        return 0
    cmd = [sys.executable, "-m", "kaffe.tools.benchmark_tensorboard", "--child", "--iterations",
           str(args.iterations), "--warmup", str(args.warmup), "--repeats", str(args.repeats), "--mnist", args.mnist]
    out = subprocess.run(cmd, env=_thread_env(2, True), capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if not lines:
        raise SystemExit(f"benchmark failed:\n{out.stdout}\n{out.stderr}")
    result = json.loads(lines[0][len(RESULT_TAG):])
    times = result["ms_per_iter"]
    for i, values in enumerate(zip(*(times[k] for k in ("without wall", "with wall", "without cpu", "with cpu"))), 1):
        print("round {}: wall {:.2f} / {:.2f} ms/iter, CPU {:.2f} / {:.2f} ms/iter (without / with)".format(i, *values))
    for clock in ("wall", "cpu"):
        without, with_board = statistics.median(times[f"without {clock}"]), statistics.median(times[f"with {clock}"])
        print(f"LeNet training, {clock} time, median of {args.repeats} rounds of {args.iterations} iterations: "
              f"without {without:.2f} ms/iter, with --tensorboard {with_board:.2f} ms/iter: "
              f"{100 * (with_board / without - 1):+.1f}%")
    without = statistics.median(times["without cpu"])
    share = result["histogram_s"] * 1e3 / (result["snapshot"] * without) if result["snapshot"] else 0.0
    print(f"CPU time inside the TensorBoard calls: {result['calls_ms_per_iter'] * 1e3:.1f} us/iter "
          f"({100 * result['calls_ms_per_iter'] / without:.3f}% of a step); the histograms of a snapshot take "
          f"{result['histogram_s'] * 1e3:.0f} ms, {100 * share:.3f}% of its {result['snapshot']} iterations")
    return 0


if __name__ == "__main__":
    sys.exit(main())
