"""`kaffe device_query [--gpu N] [--tune [--tune-quick] [--tune-classes C,...]]`: the OpenCL devices' properties,
as Caffe's device_query logs them, with a self-test that builds and runs a kernel on each; --tune measures the
GEMM tile candidates of each shape class and writes the device's tuning cache (engine/gemm_tuning.py)."""
import numpy as np

from ..engine import gemm_tuning, opencl
from ..engine.errors import KaffeError
from ..engine.log import logger

SELF_TEST_SOURCE = """
__kernel void self_test(__global const float* x, __global float* y) {
    const int i = get_global_id(0);
    y[i] = 2.0f * x[i] + 1.0f;
}
"""


def _mib(n_bytes):
    return f"{n_bytes / 2**20:.0f} MiB ({n_bytes} bytes)"


def self_test(index):
    """'passed' or 'FAILED: why' after computing 2x + 1 on device `index` (which becomes the current one)."""
    try:
        opencl.select_device(index)
        x = np.arange(1024, dtype=np.float32)
        y = opencl.empty(x.size)
        knl = opencl.kernel(SELF_TEST_SOURCE, "self_test")
        knl(opencl.queue(), (x.size,), None, opencl.to_device(x).data, y.data)
        result = opencl.download(y)
    except (KaffeError, opencl.cl.Error) as error:
        return f"FAILED: {error}"
    wrong = np.flatnonzero(result != 2 * x + 1)
    return "passed" if not wrong.size else f"FAILED: {wrong.size} wrong values, first at index {wrong[0]}"


def query(index, platform, dev):
    logger.info(f"Device id:                     {index}")
    logger.info(f"Name:                          {dev.name.strip()}")
    logger.info(f"Vendor:                        {dev.vendor.strip()}")
    logger.info(f"Platform:                      {platform.name.strip()} ({platform.version.strip()})")
    logger.info(f"Version:                       {dev.version.strip()}")
    logger.info(f"Driver version:                {dev.driver_version.strip()}")
    logger.info(f"Compute units:                 {dev.max_compute_units}")
    logger.info(f"Max clock rate:                {dev.max_clock_frequency} MHz")
    logger.info(f"Total global memory:           {_mib(dev.global_mem_size)}")
    logger.info(f"Local memory per work-group:   {dev.local_mem_size / 2**10:.0f} KiB")
    logger.info(f"Max work-group size:           {dev.max_work_group_size}")
    logger.info(f"Max work-item sizes:           {tuple(dev.max_work_item_sizes)}")
    logger.info(f"Self-test (2x + 1 kernel):     {self_test(index)}")


def _indices(gpu_flag, found, default):
    flag = str(gpu_flag).strip()
    if flag in ("", "all"):
        return default if flag == "" else range(len(found))
    try:
        indices = [int(i) for i in flag.split(",")]
    except ValueError:
        raise KaffeError(f"--gpu must be a device id, a comma-separated list of them or 'all', "
                         f"got {gpu_flag!r}") from None
    for index in indices:
        if not 0 <= index < len(found):
            opencl.select_device(index)  # raises, listing the devices
    return indices


def tune(index, quick=False, classes=tuple(gemm_tuning.SHAPE_CLASSES)):
    """Tune device `index`'s GEMM (quick: small shapes; CPU devices always measure those)."""
    dev = opencl.select_device(index)
    quick = quick or not dev.is_gpu
    logger.info(f"Tuning the GEMM of OpenCL device {index} ({dev.device.name.strip()}, driver "
                f"{dev.device.driver_version.strip()}){' on small shapes' if quick else ''}")
    measured = gemm_tuning.tune(dev, quick=quick, classes=classes)
    for name, entry in measured.items():
        shape = "x".join(map(str, entry["shape"]))
        winner = "CLBlast" if entry["backend"] == "clblast" else str(opencl.GemmTiles(*entry["tiles"]))
        logger.info(f"GEMM {name} {shape}: rule {entry['default_gflops']:.1f} GFLOP/s, tuned "
                    f"{entry['gflops']:.1f} GFLOP/s ({winner})")


def run(gpu_flag, tune_gemm=False, quick=False, classes=""):
    """Query device `gpu_flag` (an id, as `--gpu N`), or every device when it is empty or 'all'; with tune_gemm,
    tune the GEMM of device `gpu_flag` (0 when empty) instead."""
    found = opencl.devices()
    if not found:
        raise KaffeError(f"no OpenCL platform found: {opencl.NO_PLATFORM_HINT}")
    if tune_gemm:
        names = tuple(c.strip() for c in classes.split(",") if c.strip()) or tuple(gemm_tuning.SHAPE_CLASSES)
        for index in _indices(gpu_flag, found, [0]):
            tune(index, quick, names)
        return
    for index in _indices(gpu_flag, found, range(len(found))):
        logger.info(f"Querying OpenCL device {index}")
        query(index, *found[index])
