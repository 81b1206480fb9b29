"""OpenCL speed next to numpy's in the same run: GEMM GFLOP/s, and (--lenet) LeNet training iterations/s.

    python -m kaffe.tools.benchmark_opencl [--gpu N] [--sizes 1024,256x4096x500] [--lenet]
"""
import argparse
import os
import time

import numpy as np

from ..engine import device, opencl
from ..engine.log import init_log, logger

DEFAULT_SIZES = "1024,2048,256,20x36864x25,50x4096x500,64x500x800"
LENET = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                     "models", "lenet", "lenet_train_test.prototxt")
MNIST_IMAGE_SHAPE = (1, 28, 28)


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


def lenet_param():
    """LeNet's TRAIN net; Data layers whose LMDB is absent become DummyData of MNIST's shapes."""
    from ..engine.net import read_net_param
    from ..proto import caffe_pb2
    param = read_net_param(LENET)
    for layer in param.layer:
        if layer.type != "Data" or os.path.exists(layer.data_param.source):
            continue
        logger.info(f"{layer.data_param.source} is absent: layer '{layer.name}' becomes DummyData "
                    f"(run `kaffe data mnist` for the real data)")
        batch = layer.data_param.batch_size
        scale = layer.transform_param.scale
        layer.type = "DummyData"
        layer.ClearField("data_param")
        layer.ClearField("transform_param")
        dummy = layer.dummy_data_param
        dummy.shape.add().dim.extend((batch,) + MNIST_IMAGE_SHAPE)
        dummy.shape.add().dim.extend((batch,))
        dummy.data_filler.add(type="uniform", min=0.0, max=255 * scale)
        dummy.data_filler.add(type="constant", value=3.0)  # any valid class label
    param.state.phase = caffe_pb2.TRAIN
    return param


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
        net = Net(lenet_param())

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
    args = parser.parse_args(argv)
    init_log()

    device.set_device(args.gpu)
    dev = opencl.select_device(args.gpu)
    backends = ["kaffe"] + (["clblast"] if opencl._pyclblast() is not None else [])
    logger.info(f"GEMM GFLOP/s on {dev.device.name.strip()} ({', '.join(backends)}) and numpy "
                f"(its BLAS) on the host, best of {args.repeat}")
    for size in args.sizes.split(","):
        M, N, K = parse_size(size)
        rates = gemm_gflops(M, N, K, args.repeat, backends)
        logger.info(f"{M:>6} x {N:>6} x {K:>6}: " + "  ".join(f"{k} {v:8.1f}" for k, v in rates.items()))
    opencl.set_gemm_backend("kaffe")

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
