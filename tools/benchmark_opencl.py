"""OpenCL speed on one device, next to the host in the same run: GEMM GFLOP/s (numpy beside it); with
--training, LeNet (batch 64) and CIFAR-10 quick (batch 100) SGD training iterations/s, OpenCL and CPU mode in
alternating rounds (medians), with the OpenCL commands per iteration; with --zoo, forward ms of zoo nets at
batch 1 and 32 (random weights: the speed does not depend on them); --lenet: LeNet forward+backward.

    python -m kaffe.tools.benchmark_opencl [--gpu N] [--sizes 1024,256x4096x500] [--training] [--lenet]
        [--zoo alexnet,googlenet,resnet50,mobilenet_v1] [--batches 1,32]
"""
import argparse
import os
import statistics
import time

import numpy as np

from ..engine import device, opencl
from ..engine.log import init_log, logger

DEFAULT_SIZES = "1024,2048,256,20x36864x25,50x4096x500,64x500x800"
MODELS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models")
LENET = os.path.join(MODELS, "lenet", "lenet_train_test.prototxt")
MNIST_IMAGE_SHAPE = (1, 28, 28)
TRAINING_NETS = {"LeNet": (LENET, MNIST_IMAGE_SHAPE),
                 "CIFAR-10 quick": (os.path.join(MODELS, "cifar10_quick", "train_val.prototxt"), (3, 32, 32))}


def parse_size(text):
    """'1024' -> (1024, 1024, 1024); '20x36864x25' -> (M, N, K)."""
    dims = [int(d) for d in text.lower().split("x")]
    return tuple(dims * 3) if len(dims) == 1 else tuple(dims)


def best_seconds(run, repeat):
    """The fastest of `repeat` timed runs, after one untimed run (program builds, caches, clocks)."""
    run()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def gemm_gflops(M, N, K, repeat, backends):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((M, K), dtype=np.float32)
    b = rng.standard_normal((K, N), dtype=np.float32)
    flops = 2.0 * M * N * K
    rates = {"numpy": flops / best_seconds(lambda: a @ b, repeat) / 1e9}
    A, B, C = opencl.to_device(a), opencl.to_device(b), opencl.zeros(M * N)
    for backend in backends:
        opencl.set_gemm_backend(backend)

        def run():
            opencl.gemm(False, False, M, N, K, 1.0, A, B, 0.0, C)
            opencl.finish()
        rates[backend] = flops / best_seconds(run, repeat) / 1e9
        # a fast wrong answer is no result
        error = np.abs(C.get().reshape(M, N) - a @ b).max() / max(1.0, np.abs(a @ b).max())
        if error > 1e-4:
            logger.warning(f"{backend} GEMM {M}x{N}x{K}: relative error {error:.2g}")
    return rates


def train_param(path=LENET, image_shape=MNIST_IMAGE_SHAPE):
    """A train_val net's TRAIN net; Data layers whose LMDB is absent become DummyData of the images' shapes."""
    from ..engine.net import read_net_param
    from ..proto import caffe_pb2
    param = read_net_param(path)
    for layer in param.layer:
        if layer.type != "Data" or os.path.exists(layer.data_param.source):
            continue
        logger.info(f"{layer.data_param.source} is absent: layer '{layer.name}' becomes DummyData "
                    f"(run `kaffe data` for the real data)")
        batch = layer.data_param.batch_size
        scale = layer.transform_param.scale or 1.0
        layer.type = "DummyData"
        layer.ClearField("data_param")
        layer.ClearField("transform_param")
        dummy = layer.dummy_data_param
        dummy.shape.add().dim.extend((batch,) + image_shape)
        dummy.shape.add().dim.extend((batch,))
        dummy.data_filler.add(type="uniform", min=0.0, max=255 * scale)
        dummy.data_filler.add(type="constant", value=3.0)  # any valid class label
    param.state.phase = caffe_pb2.TRAIN
    return param


def training_iterations_per_second(net_param, iterations, rounds, modes=("CPU", "OpenCL")):
    """{mode: median iterations/s} of SGD training (forward, backward, update; momentum and weight decay) in
    each of `modes` (CPU, OpenCL), one solver each, timed in alternating rounds after one warm-up round; and
    the OpenCL commands of one iteration (opencl.stats over the timed OpenCL rounds)."""
    from ..proto import caffe_pb2
    from ..solvers.solver import get_solver
    solvers, times = {}, {mode: [] for mode in modes}
    for mode in times:
        (device.set_mode_gpu if mode == "OpenCL" else device.set_mode_cpu)()
        param = caffe_pb2.SolverParameter(base_lr=0.001, momentum=0.9, weight_decay=0.0005, lr_policy="fixed",
                                          display=0, max_iter=10 ** 9, random_seed=1)
        param.net_param.CopyFrom(net_param)
        solvers[mode] = get_solver(param)
        solvers[mode].step(1)   # program builds, weight uploads
    counts = dict.fromkeys(opencl.STATS_FIELDS, 0)
    try:
        for _ in range(rounds):
            for mode, solver in solvers.items():
                (device.set_mode_gpu if mode == "OpenCL" else device.set_mode_cpu)()
                opencl.reset_stats()
                start = time.perf_counter()
                solver.step(iterations)
                device.synchronize()
                times[mode].append(iterations / (time.perf_counter() - start))
                if mode == "OpenCL":
                    counts = {k: counts[k] + v for k, v in opencl.stats().items()}
    finally:
        device.set_mode_cpu()
    return {mode: statistics.median(values) for mode, values in times.items()}, \
        opencl.stats_per_iteration(counts, iterations * rounds)


def zoo_forward_ms(name, batch, rounds):
    """Median ms of a forward of models/<name>/deploy.prototxt at `batch` in OpenCL mode (its fillers' weights)."""
    from ..engine.net import Net
    from ..proto import caffe_pb2
    device.set_mode_gpu()
    try:
        net = Net(os.path.join(MODELS, name, "deploy.prototxt"), caffe_pb2.TEST)
        for blob_name in net.inputs:
            blob = net.blobs[blob_name]
            blob.reshape((batch,) + blob.shape[1:])
        net.reshape()
        times = []
        for _ in range(rounds + 1):   # the first builds the programs
            start = time.perf_counter()
            net.forward()
            device.synchronize()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times[1:])
    finally:
        device.set_mode_cpu()


def lenet_iterations_per_second(iterations, gpu):
    """Forward + backward iterations/s of LeNet's TRAIN net on the CPU or, with gpu, on the OpenCL device.

    Layers without OpenCL code yet run their CPU code in GPU mode, so the GPU figure grows as they get it.
    """
    from ..engine.net import Net
    if gpu:
        device.set_mode_gpu()
    else:
        device.set_mode_cpu()
    try:
        net = Net(train_param())

        def run():
            for _ in range(iterations):
                net.forward()
                net.backward()
            device.synchronize()
        return iterations / best_seconds(run, repeat=1)
    finally:
        device.set_mode_cpu()


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m kaffe.tools.benchmark_opencl", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", "-gpu", type=int, default=0, help="OpenCL device id (kaffe device_query)")
    parser.add_argument("--sizes", default=DEFAULT_SIZES,
                        help="comma-separated GEMM sizes: N for N^3, or MxNxK (C is M x N)")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per size (the best counts)")
    parser.add_argument("--lenet", action="store_true",
                        help="also time LeNet forward+backward, CPU vs OpenCL (needs the layers' OpenCL code "
                             "for a meaningful GPU figure)")
    parser.add_argument("--iterations", type=int, default=20, help="LeNet iterations per timing")
    parser.add_argument("--training", action="store_true",
                        help="LeNet and CIFAR-10 quick training iterations/s, OpenCL and CPU mode")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timed rounds (--training, --zoo)")
    parser.add_argument("--no-cpu", action="store_true", help="--training: time OpenCL mode only (a slow host "
                                                                "CPU would take most of the run)")
    parser.add_argument("--zoo", default="", help="comma-separated zoo nets (models/<name>/deploy.prototxt) "
                                                  "to time forward, e.g. alexnet,googlenet,resnet50,mobilenet_v1")
    parser.add_argument("--batches", default="1,32", help="batch sizes for --zoo")
    args = parser.parse_args(argv)
    init_log()

    device.set_device(args.gpu)
    dev = opencl.select_device(args.gpu)
    logger.info(f"OpenCL device {args.gpu}: {dev.device.name.strip()} ({dev.platform.name.strip()} "
                f"{dev.platform.version.strip()}, driver {dev.device.driver_version.strip()})")
    backends = ["kaffe"] + (["clblast"] if opencl._pyclblast() is not None else [])
    logger.info(f"GEMM GFLOP/s on {dev.device.name.strip()} ({', '.join(backends)}) and numpy "
                f"(its BLAS) on the host, best of {args.repeat}")
    for size in args.sizes.split(","):
        M, N, K = parse_size(size)
        rates = gemm_gflops(M, N, K, args.repeat, backends)
        logger.info(f"{M:>6} x {N:>6} x {K:>6}: " + "  ".join(f"{k} {v:8.1f}" for k, v in rates.items()))
    opencl.set_gemm_backend("kaffe")

    if args.training:
        for name, (path, shape) in TRAINING_NETS.items():
            modes = ("OpenCL",) if args.no_cpu else ("CPU", "OpenCL")
            rates, commands = training_iterations_per_second(train_param(path, shape), args.iterations, args.rounds,
                                                             modes)
            logger.info(f"{name} training: " + ", ".join(f"{m} {rates[m]:.1f} iter/s" for m in reversed(modes))
                        + f" (median of {args.rounds} rounds of {args.iterations})")
            logger.info(f"{name} {commands}")
    for name in filter(None, args.zoo.split(",")):
        for batch in (int(b) for b in args.batches.split(",")):
            logger.info(f"{name} forward, batch {batch}: {zoo_forward_ms(name, batch, args.rounds):.2f} ms "
                        f"(median of {args.rounds})")

    if args.lenet:
        cpu = lenet_iterations_per_second(args.iterations, gpu=False)
        logger.info(f"LeNet TRAIN forward+backward: CPU {cpu:.1f} iter/s")
        try:
            gpu = lenet_iterations_per_second(args.iterations, gpu=True)
        except Exception as error:  # noqa: BLE001 -- the report goes on; the layers' OpenCL code is in progress
            logger.warning(f"LeNet in GPU mode failed: {type(error).__name__}: {error}")
        else:
            logger.info(f"LeNet TRAIN forward+backward: OpenCL device {args.gpu} {gpu:.1f} iter/s "
                        f"({gpu / cpu:.2f}x the CPU)")


if __name__ == "__main__":
    main()
