"""Process-wide mode (CPU or GPU), device id and random number generator, like Caffe's `Caffe` singleton."""
import numpy as np

CPU = "CPU"
GPU = "GPU"

_state = {"mode": CPU, "device_id": 0, "rng": np.random.default_rng()}


def mode():
    return _state["mode"]


def set_mode_cpu():
    _state["mode"] = CPU


def set_mode_gpu():
    from . import opencl  # imported here: engine.opencl imports this module
    opencl.select_device(_state["device_id"])
    _state["mode"] = GPU


def set_device(device_id):
    device_id = int(device_id)
    _state["device_id"] = device_id
    if _state["mode"] == GPU:
        from . import opencl
        opencl.select_device(device_id)


def device_id():
    return _state["device_id"]


def set_random_seed(seed):
    """Seed kaffe's generator: fillers, Dropout masks, data shuffling and crops all draw from it."""
    _state["rng"] = np.random.default_rng(int(seed))


def rng():
    return _state["rng"]


def rng_state():
    """JSON-friendly state of the global generator, saved in snapshots so that a resume is exact."""
    return _state["rng"].bit_generator.state


def set_rng_state(state):
    _state["rng"].bit_generator.state = state


def synchronize():
    """Wait for queued device work (timings); nothing to wait for on the CPU."""
    if _state["mode"] == GPU:
        from . import opencl
        opencl.finish()
