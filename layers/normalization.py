"""Normalization layers: BatchNorm (statistics only; a following Scale with bias_term learns the affine part) and MVN.

Both normalize data seen as (outer, channels, inner) per channel: BatchNorm over (num, spatial) for each channel
(axis 1), MVN over each row of `dim` values. On OpenCL the per-channel sums and broadcasts are common.cl's
channel_reduce / channel_apply, the rest is in normalization.cl.
"""
import numpy as np

from ..engine import opencl
from ..engine.errors import KaffeError
from ..engine.layer import Layer, register_layer
from ..proto import caffe_pb2
from .common import (APPLY_DIVIDE, APPLY_SUBTRACT, TERM_SQUARE, TERM_XY, channel_apply_gpu, channel_reduce_gpu,
                     shape_text)

KERNELS = "layers/normalization.cl"

_BN_STD = opencl.elementwise_kernel("bn_std", lambda v, p, ops: ops.sqrt(v + p.eps), ("v",), ("eps",))
_MVN_STD = opencl.elementwise_kernel("mvn_std", lambda v, p, ops: ops.sqrt(v) + p.eps, ("v",), ("eps",))
_MOVING_AVERAGE_FACTOR = opencl.elementwise_kernel("moving_average_factor", lambda s, p, ops: s * p.maf + 1,
                                                   ("s",), ("maf",))


def _normalize_backward_gpu(dy, y, dx, a, b, std, channels, inner):
    opencl.launch(KERNELS, "normalize_backward", dy.size, *opencl.device_args(dy), *opencl.device_args(y),
                  *opencl.device_args(dx), *opencl.device_args(a), *opencl.device_args(b), *opencl.device_args(std),
                  channels, inner)


def _vectors(layer, n, *names):
    """Per-layer device work vectors of n floats (kept between forward and backward)."""
    return [opencl.scratch(layer, name, n)[:n] for name in names]


@register_layer("BatchNorm")
class BatchNormLayer(Layer):
    """y = (x - mean) / sqrt(var + eps) per channel (axis 1; a 1-D input is one channel).

    TRAIN (use_global_stats false, the default outside TEST): the batch's mean and (biased) variance, and the
    running sums s <- s * maf + 1, mean_sum <- mean + maf * mean_sum, var_sum <- m/(m-1) var + maf * var_sum
    (m = values per channel). With global statistics: mean = mean_sum / s, var = var_sum / s (0 when s is 0).
    The three blobs are statistics, not parameters: they get lr_mult 0 and no gradient, as in Caffe.
    """
    exact_num_bottom_blobs = 1
    exact_num_top_blobs = 1

    def layer_setup(self, bottom, top):
        param = self.layer_param.batch_norm_param
        self.maf = np.float32(param.moving_average_fraction)
        self.use_global_stats = (param.use_global_stats if param.HasField("use_global_stats")
                                 else self.phase == caffe_pb2.TEST)
        self.channels = 1 if bottom[0].num_axes == 1 else bottom[0].shape[1]
        self.eps = np.float32(param.eps)
        shapes = ((self.channels,), (self.channels,), (1,))
        if not self.blobs:
            self.init_params(*((shape, None) for shape in shapes))
        else:
            # Caffe takes stored statistics without a shape check (older files store them 4-D): counts must fit
            if len(self.blobs) != 3 or any(b.count != int(np.prod(s)) for b, s in zip(self.blobs, shapes)):
                raise KaffeError(f"BatchNorm layer '{self.name}': stored statistics "
                                 f"{[b.shape_string() for b in self.blobs]} do not fit {self.channels} channels")
            for blob, shape in zip(self.blobs, shapes):
                blob.reshape(shape)
        # mask the statistics from the solver: lr_mult 0 on each (Caffe adds the missing param{} entries)
        params = self.layer_param.param
        for i in range(3):
            if len(params) == i:
                params.add().lr_mult = 0.0
            elif params[i].lr_mult != 0:
                raise KaffeError(f"BatchNorm layer '{self.name}': cannot configure batch normalization statistics "
                                 f"as layer parameters (param {i} has lr_mult {params[i].lr_mult}; it must be 0)")
        self.param_propagate_down = [False] * 3

    def reshape(self, bottom, top):
        x = bottom[0]
        if x.num_axes > 1 and x.shape[1] != self.channels:
            raise KaffeError(f"BatchNorm layer '{self.name}': the input {shape_text(x.shape)} has {x.shape[1]} "
                             f"channels, the layer was set up for {self.channels}")
        if top[0] is not x:
            top[0].reshape_like(x)
        num = x.shape[0]
        self.dims = (num, self.channels, x.count // (num * self.channels) if num * self.channels else 0)
        self.per_channel = num * self.dims[2]

    def _moving_average(self):
        m = self.per_channel
        return np.float32(m / (m - 1) if m > 1 else 1)

    def forward_cpu(self, bottom, top):
        x = bottom[0].cpu_data().reshape(self.dims)
        if self.use_global_stats:
            factor = self.blobs[2].cpu_data()[0]
            scale = np.float32(0 if factor == 0 else 1 / factor)
            mean, variance = scale * self.blobs[0].cpu_data(), scale * self.blobs[1].cpu_data()
        else:
            mean = x.sum(axis=(0, 2)) * np.float32(1 / self.per_channel)
        centered = x - mean.reshape(1, -1, 1)
        if not self.use_global_stats:
            variance = (centered * centered).sum(axis=(0, 2)) * np.float32(1 / self.per_channel)
            self.blobs[2].mutable_cpu_data()[...] = self.blobs[2].cpu_data() * self.maf + 1
            self.blobs[0].mutable_cpu_data()[...] = mean + self.maf * self.blobs[0].cpu_data()
            self.blobs[1].mutable_cpu_data()[...] = self._moving_average() * variance + \
                self.maf * self.blobs[1].cpu_data()
        self.std = np.sqrt(variance + self.eps)
        # kept for backward: a later in-place layer may overwrite the top
        self.x_norm = centered / self.std.reshape(1, -1, 1)
        top[0].mutable_cpu_data()[...] = self.x_norm.reshape(top[0].shape)

    def backward_cpu(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        dy = top[0].cpu_diff().reshape(self.dims)
        std = self.std.reshape(1, -1, 1)
        if self.use_global_stats:
            dx = dy / std
        else:
            y = self.x_norm
            inverse = np.float32(1 / self.per_channel)
            mean_dy = dy.sum(axis=(0, 2), keepdims=True) * inverse
            mean_dy_y = (dy * y).sum(axis=(0, 2), keepdims=True) * inverse
            dx = (dy - mean_dy - mean_dy_y * y) / std
        bottom[0].mutable_cpu_diff()[...] = dx.reshape(bottom[0].shape)

    def forward_gpu(self, bottom, top):
        channels, inner = self.channels, self.dims[2]
        x, out = bottom[0].gpu_data(), top[0].mutable_gpu_data()
        mean, variance, std = _vectors(self, channels, "mean", "variance", "std")
        inverse = float(np.float32(1 / self.per_channel)) if self.per_channel else 0.0
        if self.use_global_stats:
            opencl.launch(KERNELS, "bn_global_stats", channels, *opencl.device_args(self.blobs[0].gpu_data()),
                          *opencl.device_args(self.blobs[1].gpu_data()), *opencl.device_args(self.blobs[2].gpu_data()),
                          *opencl.device_args(mean), *opencl.device_args(variance))
        else:
            channel_reduce_gpu(x, self.dims, mean, alpha=inverse)
        channel_apply_gpu(x, out, mean, channels, inner, APPLY_SUBTRACT)
        if not self.use_global_stats:
            channel_reduce_gpu(out, self.dims, variance, alpha=inverse, term=TERM_SQUARE)
            factor = self.blobs[2].mutable_gpu_data()
            _MOVING_AVERAGE_FACTOR(factor, factor, p={"maf": self.maf})
            opencl.axpby(1.0, mean, self.maf, self.blobs[0].mutable_gpu_data())
            opencl.axpby(self._moving_average(), variance, self.maf, self.blobs[1].mutable_gpu_data())
        _BN_STD(std, variance, p={"eps": self.eps})
        channel_apply_gpu(out, out, std, channels, inner, APPLY_DIVIDE)
        self.x_norm_gpu = opencl.copy(out, opencl.scratch(self, "x_norm", out.size)[:out.size])

    def backward_gpu(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        channels, inner = self.channels, self.dims[2]
        dy, dx = top[0].gpu_diff(), bottom[0].mutable_gpu_diff()
        std, = _vectors(self, channels, "std")
        if self.use_global_stats:
            channel_apply_gpu(dy, dx, std, channels, inner, APPLY_DIVIDE)
            return
        mean_dy, mean_dy_y = _vectors(self, channels, "mean", "variance")  # free after forward
        inverse = float(np.float32(1 / self.per_channel))
        channel_reduce_gpu(dy, self.dims, mean_dy, alpha=inverse)
        channel_reduce_gpu(dy, self.dims, mean_dy_y, alpha=inverse, term=TERM_XY, y=self.x_norm_gpu)
        _normalize_backward_gpu(dy, self.x_norm_gpu, dx, mean_dy, mean_dy_y, std, channels, inner)


@register_layer("MVN")
class MVNLayer(Layer):
    """Subtracts the mean of each row and, with normalize_variance, divides by (std + eps).

    Rows are (num, channel) pairs, or whole items with across_channels; the input is read with Caffe's legacy
    num/channels accessors (at most 4 axes). The variance is the biased one; eps is added to the std.
    """
    exact_num_bottom_blobs = 1
    exact_num_top_blobs = 1

    def layer_setup(self, bottom, top):
        param = self.layer_param.mvn_param
        self.normalize_variance, self.across_channels = param.normalize_variance, param.across_channels
        self.eps = np.float32(param.eps)

    def reshape(self, bottom, top):
        x = bottom[0]
        if x.num_axes > 4:
            raise KaffeError(f"MVN layer '{self.name}' takes inputs of at most 4 axes, got {shape_text(x.shape)}")
        if top[0] is not x:
            top[0].reshape_like(x)
        rows = x.num if self.across_channels else x.num * x.channels
        self.rows, self.dim = rows, (x.count // rows if rows else 0)

    def forward_cpu(self, bottom, top):
        v = bottom[0].cpu_data().reshape(self.rows, self.dim)
        inverse = np.float32(1 / self.dim)
        y = v - (v.sum(axis=1, keepdims=True) * inverse)
        if self.normalize_variance:
            variance = (y * y).sum(axis=1, keepdims=True) * inverse
            self.std = np.sqrt(variance) + self.eps
            y /= self.std
        top[0].mutable_cpu_data()[...] = y.reshape(top[0].shape)

    def backward_cpu(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        dy = top[0].cpu_diff().reshape(self.rows, self.dim)
        inverse = np.float32(1 / self.dim)
        mean_dy = dy.sum(axis=1, keepdims=True) * inverse
        if self.normalize_variance:
            # Caffe's gradient, written with the top data y = (x - mean) / (std + eps)
            y = top[0].cpu_data().reshape(self.rows, self.dim)
            mean_dy_y = (dy * y).sum(axis=1, keepdims=True) * inverse
            dx = (dy - mean_dy - mean_dy_y * y) / self.std
        else:
            dx = dy - mean_dy
        bottom[0].mutable_cpu_diff()[...] = dx.reshape(bottom[0].shape)

    def forward_gpu(self, bottom, top):
        dims = (1, self.rows, self.dim)
        x, out = bottom[0].gpu_data(), top[0].mutable_gpu_data()
        mean, variance, std = _vectors(self, self.rows, "mean", "variance", "std")
        inverse = float(np.float32(1 / self.dim)) if self.dim else 0.0
        channel_reduce_gpu(x, dims, mean, alpha=inverse)
        channel_apply_gpu(x, out, mean, self.rows, self.dim, APPLY_SUBTRACT)
        if self.normalize_variance:
            channel_reduce_gpu(out, dims, variance, alpha=inverse, term=TERM_SQUARE)
            _MVN_STD(std, variance, p={"eps": self.eps})
            channel_apply_gpu(out, out, std, self.rows, self.dim, APPLY_DIVIDE)

    def backward_gpu(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        dims = (1, self.rows, self.dim)
        dy, dx = top[0].gpu_diff(), bottom[0].mutable_gpu_diff()
        mean_dy, mean_dy_y, std = _vectors(self, self.rows, "mean", "variance", "std")
        inverse = float(np.float32(1 / self.dim))
        channel_reduce_gpu(dy, dims, mean_dy, alpha=inverse)
        if self.normalize_variance:
            channel_reduce_gpu(dy, dims, mean_dy_y, alpha=inverse, term=TERM_XY, y=top[0].gpu_data())
            _normalize_backward_gpu(dy, top[0].gpu_data(), dx, mean_dy, mean_dy_y, std, self.rows, self.dim)
        else:
            channel_apply_gpu(dy, dx, mean_dy, self.rows, self.dim, APPLY_SUBTRACT)
