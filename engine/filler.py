"""Weight fillers with Caffe's formulas (filler.hpp)."""
import numpy as np

from . import device
from .errors import KaffeError
from .memory_limits import FILL_BYTES, check_count


def _fans(blob, param):
    count = blob.count
    fan_in = count / blob.shape[0]
    fan_out = count / blob.shape[1] if blob.num_axes > 1 else count
    norm = param.variance_norm
    if norm == param.FAN_IN:
        return fan_in
    if norm == param.FAN_OUT:
        return fan_out
    return (fan_in + fan_out) / 2.0


def _constant(blob, param):
    return np.full(blob.shape, param.value)


def _uniform(blob, param):
    return device.rng().uniform(param.min, param.max, size=blob.shape)


def _gaussian(blob, param):
    values = device.rng().normal(param.mean, param.std, size=blob.shape)
    if param.sparse >= 0:
        # keep each weight with probability sparse / num_outputs, as Caffe's sparse Gaussian filler
        if blob.num_axes < 1:
            raise KaffeError("the sparse gaussian filler needs a blob with at least one axis")
        keep = param.sparse / blob.shape[0]
        values *= device.rng().random(size=blob.shape) < keep
    return values


def _positive_unitball(blob, param):
    values = device.rng().uniform(0.0, 1.0, size=blob.shape)
    rows = values.reshape(blob.shape[0], -1)
    rows /= rows.sum(axis=1, keepdims=True)
    return values


def _xavier(blob, param):
    scale = np.sqrt(3.0 / _fans(blob, param))
    return device.rng().uniform(-scale, scale, size=blob.shape)


def _msra(blob, param):
    std = np.sqrt(2.0 / _fans(blob, param))
    return device.rng().normal(0.0, std, size=blob.shape)


def _bilinear(blob, param):
    if blob.num_axes != 4 or blob.shape[2] != blob.shape[3]:
        raise KaffeError(f"the bilinear filler needs a 4-D blob with square kernels, got {blob.shape_string()}")
    size = blob.shape[3]
    f = np.ceil(size / 2.0)
    c = (size - 1) / (2.0 * f)
    taps = 1.0 - np.abs(np.arange(size) / f - c)
    kernel = np.outer(taps, taps)  # (y, x): row y, column x
    return np.broadcast_to(kernel, blob.shape)


FILLERS = {
    "constant": _constant,
    "uniform": _uniform,
    "gaussian": _gaussian,
    "positive_unitball": _positive_unitball,
    "xavier": _xavier,
    "msra": _msra,
    "bilinear": _bilinear,
}


def fill(blob, param=None):
    """Fill blob's data according to a FillerParameter (None: Caffe's default, constant 0)."""
    if param is None:
        from ..proto import caffe_pb2
        param = caffe_pb2.FillerParameter()
    make = FILLERS.get(param.type)
    if make is None:
        raise KaffeError(f"Unknown filler name: '{param.type}'. Known fillers: {', '.join(sorted(FILLERS))}")
    if param.sparse >= 0 and param.type != "gaussian":
        raise KaffeError(f"sparse is only supported by the gaussian filler, not by '{param.type}'")
    if blob.count:
        check_count(blob.shape, "filling blob", FILL_BYTES)   # the float64 draws must fit too
        blob.mutable_cpu_data()[...] = make(blob, param)
