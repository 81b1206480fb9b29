"""Forward time and peak memory of each zoo deploy net at batch 1 and 16: kaffe with the deploy-time optimiser
(`optimize="full"`), kaffe with every layer as written (`"none"`), OpenCV dnn (cv2.dnn.readNetFromCaffe) on the
same net and weights, and kaffe on an OpenCL device when one is given, in one run.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python -m kaffe.tools.benchmark_zoo \\
        [--nets caffenet,googlenet] [--batches 1,16] [--rounds 3] [--passes 3] [--gpu N]

Every measurement runs in a fresh process, so that its peak RSS is its own (the interpreter, numpy and the
library included), with --threads threads for BLAS and OpenCV. The measurements of one net and batch take turns
for --rounds rounds; a cell is the median over the rounds of each round's median pass (after one untimed pass).
Weights are random (speed does not depend on them); kaffe writes them as a .caffemodel that OpenCV reads.
Some machines set OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE, which put numpy's OpenBLAS on an older kernel at half
speed: unset them in the benchmark command, as above.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from ..engine import device, opencl
from ..engine.log import init_log
from ..engine.net import Net, read_net_param
from ..proto import caffe_pb2

MODELS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models")
KINDS = ("kaffe", "kaffe-none", "opencv", "kaffe-opencl")
HEADINGS = {"kaffe": "kaffe optimised", "kaffe-none": "kaffe as written", "opencv": "OpenCV dnn",
            "kaffe-opencl": "kaffe OpenCL"}


def deploy_nets():
    return sorted(d for d in os.listdir(MODELS) if os.path.exists(os.path.join(MODELS, d, "deploy.prototxt"))
                  and os.path.exists(os.path.join(MODELS, d, "README.md")))


def build(name, batch, optimize=None, train=False):
    """Zoo net `name`'s deploy net in the TEST phase with its Input's batch size set to `batch` (train: in the
    TRAIN phase with force_backward, as a training step without its data and loss layers)."""
    param = read_net_param(os.path.join(MODELS, name, "deploy.prototxt"))
    for layer in param.layer:
        if layer.type == "Input":
            for shape in layer.input_param.shape:
                shape.dim[0] = batch
    param.state.phase = caffe_pb2.TRAIN if train else caffe_pb2.TEST
    param.force_backward = train
    return Net(param, optimize=optimize)


def write_weights(name, path):
    """Random weights for zoo net `name` (BatchNorm statistics in a sensible range), as a .caffemodel."""
    net = build(name, 1, optimize="none")
    rng = np.random.default_rng(0)
    for layer in net.layers:
        for blob in layer.blobs:
            blob.mutable_cpu_data()[...] = rng.uniform(0.5, 1.5, blob.shape) if layer.type == "BatchNorm" else \
                rng.standard_normal(blob.shape, np.float32) * 0.01
    net.save(path)


def median_pass_ms(run, passes):
    run()
    times = []
    for _ in range(passes):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def measure(kind, name, batch, weights, passes, gpu):
    """One measurement, in this (fresh) process: the median pass in ms."""
    x = None
    if kind == "opencv":
        import cv2
        cv2.setNumThreads(int(os.environ.get("OMP_NUM_THREADS", "2")))
        cv_net = cv2.dnn.readNetFromCaffe(os.path.join(MODELS, name, "deploy.prototxt"), weights)
        cv_net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
        cv_net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
        shape = build(name, batch, optimize="none").blobs["data"].shape
        x = np.random.default_rng(1).standard_normal(shape, np.float32)

        def run():
            cv_net.setInput(x)
            cv_net.forward()
        return median_pass_ms(run, passes)
    net = build(name, batch, optimize="none" if kind == "kaffe-none" else "full")
    net.copy_from(weights)
    data = net.blobs[net.inputs[0]]
    data.data[...] = np.random.default_rng(1).standard_normal(data.shape, np.float32)
    if kind == "kaffe-opencl":
        device.set_device(gpu)
        device.set_mode_gpu()
    last = len(net.layers) - 1

    def run():
        net.forward_from_to(0, last)
        device.synchronize()
    return median_pass_ms(run, passes)


def run_worker(kind, name, batch, weights, passes, gpu, threads):
    """A measurement in a fresh process: (ms, peak RSS in MB), or None when that peer is not available."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads))
    done = subprocess.run([sys.executable, "-m", "kaffe.tools.benchmark_zoo", "--worker", kind, name, str(batch),
                           weights, str(passes), str(gpu)], env=env, capture_output=True, text=True)
    if done.returncode:
        print(f"{kind} {name} batch {batch}: failed: {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return (result["ms"], result["rss_mb"]) if result else None


def worker_main(kind, name, batch, weights, passes, gpu):
    init_log(level=30)
    try:
        ms = measure(kind, name, int(batch), weights, int(passes), int(gpu))
    except (ImportError, AttributeError):  # no OpenCV, or OpenCV 5, which dropped the Caffe importer
        print(json.dumps(None))
        return
    print(json.dumps({"ms": ms, "rss_mb": peak_rss_mb()}))


def peak_rss_mb():
    """This process's own peak resident memory. Linux's getrusage maxrss survives exec, so a worker started by
    a big parent would report the parent's size: the memory map's high-water mark (VmHWM) is the worker's."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker_main(*argv[1:])
    parser = argparse.ArgumentParser(prog="benchmark_zoo", description=__doc__.splitlines()[0])
    parser.add_argument("--nets", default=",".join(deploy_nets()))
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gpu", type=int, default=-1, help="OpenCL device id; -1 (the default) = CPU only")
    args = parser.parse_args(argv)
    init_log(level=30)
    kinds = list(KINDS[:3])
    if args.gpu >= 0 and opencl.devices():
        print(f"OpenCL device {args.gpu}: {opencl.devices()[args.gpu][1].name}")
        kinds.append("kaffe-opencl")
    print("| net | batch | " + " | ".join(f"{HEADINGS[k]} ms (peak RSS MB)" for k in kinds) +
          " | optimised / OpenCV |")
    print("| --- | ---: | " + " | ".join("---:" for _ in kinds) + " | ---: |")
    with tempfile.TemporaryDirectory() as folder:
        for name in args.nets.split(","):
            weights = os.path.join(folder, f"{name}.caffemodel")
            write_weights(name, weights)
            for batch in (int(b) for b in args.batches.split(",")):
                rounds = {k: [] for k in kinds}
                for _ in range(args.rounds):
                    for kind in kinds:
                        result = run_worker(kind, name, batch, weights, args.passes, args.gpu, args.threads)
                        if result:
                            rounds[kind].append(result)
                cells, ms = [], {}
                for kind in kinds:
                    if rounds[kind]:
                        ms[kind] = statistics.median(r[0] for r in rounds[kind])
                        cells.append(f"{ms[kind]:.1f} ({max(r[1] for r in rounds[kind]):.0f})")
                    else:
                        cells.append("-")
                ratio = f"{ms['kaffe'] / ms['opencv']:.2f}" if "kaffe" in ms and "opencv" in ms else "-"
                print(f"| {name} | {batch} | " + " | ".join(cells) + f" | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
