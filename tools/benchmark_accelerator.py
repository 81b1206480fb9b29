"""What the compiled CPU accelerator (engine/accelerator.py, `pip install "kaffe[accel]"`) buys: zoo deploy nets
timed with it on and off (KAFFE_ACCEL=1 / 0) in one process, the two taking turns for --rounds rounds.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python -m kaffe.tools.benchmark_accelerator \\
        [--nets mobilenet_v1,cifar10_quick] [--batches 1,16] [--train-batch 100] [--rounds 5] [--passes 3]

Per net and batch: the whole forward (deploy-time optimiser on, as `kaffe time --phase TEST`), and per layer
that has a kernel (depthwise convolutions, MAX pooling) its forward and backward time; with --train-batch, also
forward + backward of the net as written at that batch (force_backward, as a training step without its data
and loss layers). A cell is the median over the rounds of each round's median pass, after one untimed pass (the
kernels compile there, or load from numba's cache). --threads sets the BLAS's threads (the kernels': see
engine/accelerator.py).
"""
import argparse
import os
import statistics
import sys

from ..engine import accelerator
from ..engine.log import init_log
from ..proto import caffe_pb2
from .benchmark_zoo import build, median_pass_ms


def accelerated_layers(net):
    """(index, name) of the layers with a compiled kernel."""
    return [(i, name) for i, (name, layer) in enumerate(zip(net.layer_names, net.layers))
            if layer.type == "Pooling" and layer.method == caffe_pb2.PoolingParameter.MAX or
            getattr(layer, "depthwise", False)]


def timings(net, backward, passes):
    """{label: median ms} of one round: the whole pass and each accelerated layer."""
    last = len(net.layers) - 1

    def whole():
        net.forward_from_to(0, last)
        if backward:
            net.backward_from_to(last, 0)
    result = {"net": median_pass_ms(whole, passes)}
    for i, name in accelerated_layers(net):
        layer, bottom, top = net.layers[i], net.bottom_vecs[i], net.top_vecs[i]
        result[f"{name} forward"] = median_pass_ms(lambda: layer.forward(bottom, top), passes)
        if backward:
            result[f"{name} backward"] = median_pass_ms(
                lambda: layer.backward(top, net.bottom_need_backward[i], bottom), passes)
    return result


def compare(name, batch, backward, rounds, passes):
    net = build(name, batch, optimize="none" if backward else "full", train=backward)
    data = net.blobs[net.inputs[0]]
    data.data[...] = 0.5
    runs = {"1": [], "0": []}
    for _ in range(rounds):
        for accel in runs:
            os.environ["KAFFE_ACCEL"] = accel
            runs[accel].append(timings(net, backward, passes))
    what = "forward+backward" if backward else "forward"
    print(f"\n{name} batch {batch}, {what} (ms, median of {rounds} alternating rounds)")
    print(f"{'':34} {'numba':>9} {'numpy':>9} {'ratio':>7}")
    for label in runs["1"][0]:
        on, off = (statistics.median(r[label] for r in runs[accel]) for accel in ("1", "0"))
        print(f"{label:34} {on:9.2f} {off:9.2f} {on / off:7.2f}")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="benchmark_accelerator", description=__doc__.split("\n\n")[0])
    parser.add_argument("--nets", default="mobilenet_v1,cifar10_quick")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--train-batch", type=int, default=100, help="0: no forward+backward timing")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    threads = str(args.threads)
    if os.environ.get("OPENBLAS_NUM_THREADS") != threads:  # the BLAS reads it when numpy loads: start afresh
        env = dict(os.environ, OMP_NUM_THREADS=threads, OPENBLAS_NUM_THREADS=threads)
        argv = sys.argv[1:] if argv is None else argv
        os.execve(sys.executable, [sys.executable, "-m", "kaffe.tools.benchmark_accelerator", *argv], env)
    init_log(level=30)
    os.environ.pop("KAFFE_ACCEL", None)
    if not accelerator.enabled():
        print('numba is not installed (pip install "kaffe[accel]"): nothing to compare')
        return 1
    for name in args.nets.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            compare(name, batch, False, args.rounds, args.passes)
        if args.train_batch:
            compare(name, args.train_batch, True, args.rounds, args.passes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
