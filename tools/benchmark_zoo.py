"""Forward time of each zoo deploy net at batch 1 and 16: kaffe on the CPU and on the OpenCL device, next to
OpenCV dnn (cv2.dnn.readNetFromCaffe) on the same net and weights, in the same run.

    python -m kaffe.tools.benchmark_zoo [--nets caffenet,googlenet] [--batches 1,16] [--iterations 3]

kaffe's time is `kaffe time --phase TEST`'s forward pass (layer by layer, the device synchronised); each cell
is the fastest of at least --iterations timed passes (more for quick nets, up to 1 s) after one untimed pass.
Weights are random (speed does not depend on them); kaffe writes them as a .caffemodel that OpenCV reads.
"""
import argparse
import os
import tempfile
import time

import numpy as np

from ..engine import device, opencl
from ..engine.log import init_log
from ..engine.net import Net, read_net_param
from ..proto import caffe_pb2

MODELS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models")


def deploy_nets():
    return sorted(d for d in os.listdir(MODELS) if os.path.exists(os.path.join(MODELS, d, "deploy.prototxt"))
                  and os.path.exists(os.path.join(MODELS, d, "README.md")))


def build(name, batch):
    """Zoo net `name`'s deploy net in the TEST phase with its Input's batch size set to `batch`."""
    param = read_net_param(os.path.join(MODELS, name, "deploy.prototxt"))
    for layer in param.layer:
        if layer.type == "Input":
            for shape in layer.input_param.shape:
                shape.dim[0] = batch
    param.state.phase = caffe_pb2.TEST
    return Net(param)


def best_ms(run, iterations, min_seconds=1.0, max_iterations=50):
    """The fastest pass: at least `iterations`, and more for quick nets until `min_seconds` have passed
    (the minimum filters out the stalls of a busy machine)."""
    run()
    times = []
    while len(times) < iterations or (sum(times) < min_seconds and len(times) < max_iterations):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def kaffe_forward_ms(net, iterations):
    def run():
        for i, layer in enumerate(net.layers):
            layer.forward(net.bottom_vecs[i], net.top_vecs[i])
        device.synchronize()
    return best_ms(run, iterations)


def opencv_forward_ms(name, weights, x, iterations):
    import cv2
    cv_net = cv2.dnn.readNetFromCaffe(os.path.join(MODELS, name, "deploy.prototxt"), weights)
    cv_net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    cv_net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)

    def run():
        cv_net.setInput(x)
        cv_net.forward()
    return best_ms(run, iterations)


def measure(name, batch, iterations, gpu, folder):
    net = build(name, batch)
    rng = np.random.default_rng(0)
    for layer in net.layers:
        for blob in layer.blobs:
            blob.mutable_cpu_data()[...] = rng.uniform(0.5, 1.5, blob.shape) if layer.type == "BatchNorm" else \
                rng.standard_normal(blob.shape, np.float32) * 0.01
    x = rng.standard_normal(net.blobs[net.inputs[0]].shape, np.float32)
    net.blobs[net.inputs[0]].data[...] = x
    weights = os.path.join(folder, f"{name}.caffemodel")
    if not os.path.exists(weights):
        net.save(weights)
    row = {"cpu": kaffe_forward_ms(net, iterations)}
    if gpu is not None:
        device.set_device(gpu)
        device.set_mode_gpu()
        try:
            row["opencl"] = kaffe_forward_ms(net, iterations)
        finally:
            device.set_mode_cpu()
    try:
        row["opencv"] = opencv_forward_ms(name, weights, x, iterations)
    except (ImportError, AttributeError):  # no OpenCV, or OpenCV 5, which dropped the Caffe importer
        row["opencv"] = None
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(prog="benchmark_zoo", description=__doc__.splitlines()[0])
    parser.add_argument("--nets", default=",".join(deploy_nets()))
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--gpu", type=int, default=0, help="OpenCL device id; -1 = CPU only")
    args = parser.parse_args(argv)
    init_log(level=30)
    gpu = args.gpu if args.gpu >= 0 and opencl.devices() else None
    if gpu is not None:
        print(f"OpenCL device {gpu}: {opencl.devices()[gpu][1].name}")
    print("| net | batch | kaffe CPU (ms) | kaffe OpenCL (ms) | OpenCV dnn (ms) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as folder:
        for name in args.nets.split(","):
            for batch in (int(b) for b in args.batches.split(",")):
                row = measure(name, batch, args.iterations, gpu, folder)
                cells = [f"{row[k]:.1f}" if row.get(k) is not None else "-" for k in ("cpu", "opencl", "opencv")]
                print(f"| {name} | {batch} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
