"""Neuron layers: one bottom, one top of the same shape, computed element by element; in place allowed.

The elementwise activations are each stated once, as a `Formula`: a forward `y = f(x, p, ops)` and a backward
`dx = g(x, y, dy, p, ops)` written with arithmetic/comparison operators and the functions of `ops` only.
`p` holds the layer's parameter values as float scalars. On the CPU, `ops` is `NUMPY_OPS` and the operands are
numpy arrays; an OpenCL code generator passes symbolic operands and a symbolic `ops` to the same functions and
reads C expressions out. So a formula stays a pure expression: no Python `if` on data or parameters, no
in-place or numpy-only calls on the operands (choose with ops.where, also between Caffe's special cases of a
parameter, as Power does). In GPU mode the same functions give the OpenCL kernels
(engine.opencl.elementwise_kernel). Derived constants (Exp's inner/outer scale) come from the params reader.

Adding an activation is one `elementwise_layer(...)` call. PReLU (a learned slope per channel) and Dropout have
their own classes.
"""
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

import numpy as np

from ..engine import device
from ..engine import opencl
from ..engine.errors import KaffeError
from ..engine.layer import Layer, register_layer
from ..proto import caffe_pb2
from .common import TERM_XY_NONPOSITIVE_Y, channel_reduce_gpu

NUMPY_OPS = SimpleNamespace(where=np.where, exp=np.exp, log=np.log, log1p=np.log1p, tanh=np.tanh, abs=np.abs,
                            maximum=np.maximum, minimum=np.minimum, sqrt=np.sqrt, pow=np.power)

KERNELS = ("layers/random.cl", "layers/neuron.cl")  # Dropout draws counter_bits (random.cl)
# values per numpy pass of a formula on the CPU: its temporaries stay in the cache and are reused, instead of
# being fresh (page-faulting) blob-sized arrays, each written and read back through memory
BLOCK = 65536


def evaluate_blockwise(formula, out, *arrays):
    """out = formula(*arrays) element by element, in blocks of BLOCK values (the same values as one call on the
    whole arrays; out may be one of them: each block is read before it is written)."""
    flat_out = out.reshape(-1)
    flats = [a.reshape(-1) for a in arrays]
    with np.errstate(all="ignore"):
        for start in range(0, flat_out.size, BLOCK):
            end = start + BLOCK
            flat_out[start:end] = formula(*(f[start:end] for f in flats))


def no_params(layer_param):
    return {}


def field_params(field, *names):
    """A `params` reader taking `names` from the LayerParameter's sub-message `field` (schema defaults apply)."""
    def read(layer_param):
        message = getattr(layer_param, field)
        return {name: getattr(message, name) for name in names}
    return read


@dataclass(frozen=True)
class Formula:
    forward: Callable   # (x, p, ops) -> y
    backward: Callable = None  # (x, y, dy, p, ops) -> dx, or None: the layer has no backward (Threshold)
    params: Callable = no_params  # LayerParameter -> {name: value}
    in_place: bool = True  # False: the layer refuses top == bottom (AbsVal, as Caffe)
    # True: backward needs x itself, so in place the forward keeps a copy of it. False: backward may be handed y's
    # storage as x in place (Caffe's ReLU/ELU rule, reading the sign that y shares with x)
    backward_reads_input: bool = False


class NeuronLayer(Layer):
    exact_num_bottom_blobs = 1
    exact_num_top_blobs = 1

    def reshape(self, bottom, top):
        if top[0] is not bottom[0]:
            top[0].reshape_like(bottom[0])


def _keeps_input(layer, bottom, top):
    return layer.formula.backward_reads_input and top[0] is bottom[0]


class FormulaLayer(NeuronLayer):
    """Runs its class's `formula` forward with numpy (OpenCL: the kernel generated from it); every array is read
    before the top (maybe the bottom) is written. numpy evaluates both sides of ops.where, so floating-point
    warnings from the side not taken are silenced. Without a backward formula, backward raises as Caffe does."""
    formula = None

    def layer_setup(self, bottom, top):
        if not self.formula.in_place and top[0] is bottom[0]:
            raise KaffeError(f"{self.type} layer '{self.name}' does not allow in-place computation")
        values = self.formula.params(self.layer_param)
        # float32 scalars keep numpy's arithmetic in float32
        self.p = SimpleNamespace(**{name: np.float32(v) for name, v in values.items()})
        self.saved_input = None

    def forward_cpu(self, bottom, top):
        x = bottom[0].cpu_data()
        if _keeps_input(self, bottom, top):
            self.saved_input = x.copy()
        evaluate_blockwise(lambda xb: self.formula.forward(xb, self.p, NUMPY_OPS), top[0].mutable_cpu_data(), x)

    def _kernel(self, direction, inputs):
        # one kernel per (type, direction), cached by elementwise_kernel; parameter values are kernel arguments
        return opencl.elementwise_kernel(f"{self.type}_{direction}", getattr(self.formula, direction), inputs,
                                         tuple(vars(self.p)))

    def forward_gpu(self, bottom, top):
        x = bottom[0].gpu_data()
        if _keeps_input(self, bottom, top):
            self.saved_input = opencl.copy(x, opencl.scratch(self, "input", x.size)[:x.size])
        self._kernel("forward", ("x",))(top[0].mutable_gpu_data(), x, p=self.p)

    def _no_backward(self, propagate_down):
        if propagate_down[0]:
            raise KaffeError(f"{self.type} layer '{self.name}' has no backward (not implemented in Caffe either); "
                             f"nothing that needs a gradient may come before it")

    def backward_cpu(self, top, propagate_down, bottom):
        self._no_backward(propagate_down)

    def backward_gpu(self, top, propagate_down, bottom):
        self._no_backward(propagate_down)


class ElementwiseLayer(FormulaLayer):
    """A formula layer with a backward formula."""

    def backward_cpu(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        x = self.saved_input if _keeps_input(self, bottom, top) else bottom[0].cpu_data()
        evaluate_blockwise(lambda xb, yb, dyb: self.formula.backward(xb, yb, dyb, self.p, NUMPY_OPS),
                           bottom[0].mutable_cpu_diff(), x, top[0].cpu_data(), top[0].cpu_diff())

    def backward_gpu(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        x = self.saved_input if _keeps_input(self, bottom, top) else bottom[0].gpu_data()
        inputs = x, top[0].gpu_data(), top[0].gpu_diff()
        self._kernel("backward", ("x", "y", "dy"))(bottom[0].mutable_gpu_diff(), *inputs, p=self.p)


def elementwise_layer(type_name, forward, backward=None, params=no_params, **options):
    """Create and register the layer class for `type: "<type_name>"` from its formulas: an ElementwiseLayer,
    or a forward-only FormulaLayer when there is no backward. `options`: Formula's in_place, backward_reads_input."""
    base = ElementwiseLayer if backward is not None else FormulaLayer
    cls = type(f"{type_name}Layer", (base,),
               {"formula": Formula(forward, backward, params, **options), "__module__": __name__,
                "__doc__": f"{type_name}: an elementwise activation given by its formula."})
    return register_layer(type_name)(cls)


def relu(x, out):
    """out = ReLU(x) with negative_slope 0, the formula's values in one numpy pass: max(x, 0), and NaN for
    x = -inf, where the formula's 0 * min(x, 0) gives NaN (as Caffe). out may be x."""
    minus_infinite = x == -np.inf if x.size and np.fmin.reduce(x, axis=None) == -np.inf else None  # fmin skips NaN
    np.maximum(x, 0, out=out)
    if minus_infinite is not None:
        out[minus_infinite] = np.nan


@register_layer("ReLU")
class ReLULayer(ElementwiseLayer):
    """ReLU: an elementwise activation given by its formula. On the CPU, the usual negative_slope 0 takes one
    numpy pass each way, with the formula's values: forward max(x, 0) (the formula's 0 * min(x, 0) term only
    matters for x = -inf, which it turns into NaN, as Caffe: such inputs take the formula), backward dy * (x > 0)
    (the formula's dy * 1 and dy * 0, NaN for an infinite dy included)."""
    formula = Formula(
        forward=lambda x, p, ops: ops.maximum(x, 0) + p.negative_slope * ops.minimum(x, 0),
        # Caffe's rule, reading the bottom's sign: in place x holds y, which has x's sign when negative_slope >= 0
        backward=lambda x, y, dy, p, ops: dy * ((x > 0) + p.negative_slope * (x <= 0)),
        params=field_params("relu_param", "negative_slope"))

    def forward_cpu(self, bottom, top):
        if self.p.negative_slope != 0:
            return super().forward_cpu(bottom, top)
        relu(bottom[0].cpu_data(), top[0].mutable_cpu_data())

    def backward_cpu(self, top, propagate_down, bottom):
        if self.p.negative_slope != 0 or not propagate_down[0]:
            return super().backward_cpu(top, propagate_down, bottom)
        with np.errstate(all="ignore"):
            np.multiply(top[0].cpu_diff(), bottom[0].cpu_data() > 0, out=bottom[0].mutable_cpu_diff())

SigmoidLayer = elementwise_layer(
    "Sigmoid",
    # the tanh form cannot overflow, unlike 1 / (1 + exp(-x))
    forward=lambda x, p, ops: 0.5 * ops.tanh(0.5 * x) + 0.5,
    backward=lambda x, y, dy, p, ops: dy * y * (1 - y))

TanHLayer = elementwise_layer(
    "TanH",
    forward=lambda x, p, ops: ops.tanh(x),
    backward=lambda x, y, dy, p, ops: dy * (1 - y * y))


def _sigmoid(v, ops):
    # the tanh form cannot overflow, unlike 1 / (1 + exp(-v))
    return 0.5 * ops.tanh(0.5 * v) + 0.5


def _ratio_to_successor(e):
    """e / (e + 1): BNLL's slope from e = exp(x)."""
    return e / (e + 1)


AbsValLayer = elementwise_layer(
    "AbsVal",
    forward=lambda x, p, ops: ops.abs(x),
    backward=lambda x, y, dy, p, ops: ops.where(x > 0, dy, ops.where(x < 0, -dy, 0)),  # sign(0) = 0
    in_place=False)

# Caffe's backward caps x at 50 before exp
BNLL_THRESHOLD = 50.0

BNLLLayer = elementwise_layer(
    "BNLL",
    # log(1 + e^x) without overflow for large |x|
    forward=lambda x, p, ops: ops.maximum(x, 0) + ops.log1p(ops.exp(-ops.abs(x))),
    backward=lambda x, y, dy, p, ops: dy * _ratio_to_successor(ops.exp(ops.minimum(x, BNLL_THRESHOLD))),
    backward_reads_input=True)


ELULayer = elementwise_layer(
    "ELU",
    forward=lambda x, p, ops: ops.maximum(x, 0) + p.alpha * (ops.exp(ops.minimum(x, 0)) - 1),
    backward=lambda x, y, dy, p, ops: dy * ((x > 0) + (p.alpha + y) * (x <= 0)),
    params=field_params("elu_param", "alpha"))


def _power_params(layer_param):
    param = layer_param.power_param
    return {"power": param.power, "scale": param.scale, "shift": param.shift,
            "diff_scale": np.float32(param.power) * np.float32(param.scale)}


def _power_backward(x, y, dy, p, ops):
    """Caffe's cases: a constant (diff_scale 0) has gradient 0; power 1 gives diff_scale; power 2 the linear
    form; otherwise y / x * power when shift is 0, else diff_scale * y / (shift + scale x)."""
    general = ops.where(p.shift == 0, p.power * y / x, p.diff_scale * y / (p.scale * x + p.shift))
    slope = ops.where(p.power == 1, p.diff_scale,
                      ops.where(p.power == 2, p.diff_scale * p.scale * x + p.diff_scale * p.shift, general))
    return ops.where(p.diff_scale == 0, 0, dy * slope)


PowerLayer = elementwise_layer(
    "Power",
    # with diff_scale 0 (power 0 or scale 0) the output is the constant 1 (power 0) or shift^power
    forward=lambda x, p, ops: ops.where(p.diff_scale == 0, ops.where(p.power == 0, 1, ops.pow(p.shift, p.power)),
                                        ops.pow(p.scale * x + p.shift, p.power)),
    backward=_power_backward,
    params=_power_params,
    backward_reads_input=True)


def _log_of_base(layer_param, field):
    """ln(base) of exp_param/log_param (base -1 means e), with Caffe's checks on the base."""
    base = getattr(layer_param, field).base
    if base == -1:
        return 1.0
    if not base > 0:
        raise KaffeError(f"{layer_param.type} layer '{layer_param.name}': base must be strictly positive "
                         f"(or -1 for e), got {base}")
    return float(np.log(np.float32(base)))


def _exp_params(layer_param):
    param = layer_param.exp_param
    log_base = _log_of_base(layer_param, "exp_param")
    # base^(shift + scale x) = base^shift * e^(ln(base) scale x)
    outer = 1.0 if param.shift == 0 else float(np.exp(log_base * np.float32(param.shift)))
    return {"inner_scale": log_base * param.scale, "outer_scale": outer}


ExpLayer = elementwise_layer(
    "Exp",
    forward=lambda x, p, ops: p.outer_scale * ops.exp(p.inner_scale * x),
    backward=lambda x, y, dy, p, ops: dy * y * p.inner_scale,
    params=_exp_params)


def _log_params(layer_param):
    param = layer_param.log_param
    log_base = _log_of_base(layer_param, "log_param")
    if log_base == 0:
        raise KaffeError(f"Log layer '{layer_param.name}': base 1 has no logarithm (log(base) = 0)")
    return {"scale": param.scale, "shift": param.shift, "base_scale": 1.0 / log_base,
            "backward_num_scale": param.scale / log_base}


LogLayer = elementwise_layer(
    "Log",
    forward=lambda x, p, ops: ops.log(p.scale * x + p.shift) * p.base_scale,
    backward=lambda x, y, dy, p, ops: dy * (p.backward_num_scale / (p.scale * x + p.shift)),
    params=_log_params,
    backward_reads_input=True)

ThresholdLayer = elementwise_layer(
    "Threshold",
    forward=lambda x, p, ops: ops.where(x > p.threshold, 1, 0),
    params=field_params("threshold_param", "threshold"))

ClipLayer = elementwise_layer(
    "Clip",
    forward=lambda x, p, ops: ops.maximum(p.min, ops.minimum(x, p.max)),
    backward=lambda x, y, dy, p, ops: dy * ((x >= p.min) * (x <= p.max)),
    params=field_params("clip_param", "min", "max"),
    backward_reads_input=True)

SwishLayer = elementwise_layer(
    "Swish",
    forward=lambda x, p, ops: x * _sigmoid(p.beta * x, ops),
    backward=lambda x, y, dy, p, ops: dy * (p.beta * y + _sigmoid(p.beta * x, ops) * (1 - p.beta * y)),
    params=field_params("swish_param", "beta"),
    backward_reads_input=True)


@register_layer("PReLU")
class PReLULayer(NeuronLayer):
    """max(0, x) + a_c min(0, x) with a learned slope a per channel (axis 1), or one shared slope.

    The slope blob is (C,), or a scalar blob (no axes) with channel_shared, as Caffe makes it; the filler defaults
    to constant 0.25. In place, the input is kept for backward.
    """

    def layer_setup(self, bottom, top):
        param = self.layer_param.prelu_param
        self._check_axes(bottom)
        self.channel_shared = param.channel_shared
        channels = bottom[0].shape[1]
        if not self.blobs:
            filler = param.filler if param.HasField("filler") else caffe_pb2.FillerParameter(type="constant",
                                                                                               value=0.25)
            self.init_params(((() if self.channel_shared else (channels,)), filler))
        expected = 1 if self.channel_shared else channels
        if len(self.blobs) != 1 or self.blobs[0].count != expected:
            raise KaffeError(f"PReLU layer '{self.name}': negative slope size is inconsistent with prototxt config: "
                             f"stored {[b.shape_string() for b in self.blobs]}, expected {expected} value(s)")
        self.saved_input = None

    def _check_axes(self, bottom):
        if bottom[0].num_axes < 2:
            raise KaffeError(f"PReLU layer '{self.name}': number of axes of bottom blob must be >= 2, got "
                             f"{bottom[0].shape_string()}")

    def reshape(self, bottom, top):
        self._check_axes(bottom)
        super().reshape(bottom, top)
        x = bottom[0]
        self.dims = (1, 1, x.count) if self.channel_shared else (x.shape[0], x.shape[1], x.count_axes(2))

    def _slope(self):
        return self.blobs[0].cpu_data().reshape(1, -1, 1)

    def forward_cpu(self, bottom, top):
        x = bottom[0].cpu_data()
        if top[0] is bottom[0]:
            self.saved_input = x.copy()
        v = x.reshape(self.dims)
        top[0].mutable_cpu_data()[...] = (np.maximum(v, 0) + self._slope() * np.minimum(v, 0)).reshape(x.shape)

    def backward_cpu(self, top, propagate_down, bottom):
        x = (self.saved_input if top[0] is bottom[0] else bottom[0].cpu_data()).reshape(self.dims)
        dy = top[0].cpu_diff().reshape(self.dims)
        negative = x <= 0
        # the slope gradient first: in place, the bottom diff written next is the top diff
        if self.param_propagate_down[0]:
            grad = (dy * x * negative).sum(axis=(0, 2))
            self.blobs[0].mutable_cpu_diff()[...] += grad.reshape(self.blobs[0].shape)
        if propagate_down[0]:
            dx = dy * np.where(negative, self._slope(), np.float32(1))
            bottom[0].mutable_cpu_diff()[...] = dx.reshape(bottom[0].shape)

    def _launch(self, name, *args):
        _, channels, inner = self.dims
        opencl.launch(KERNELS, name, args[0].size, *[a for array in args
                                                               for a in opencl.device_args(array)],
                      channels, inner)

    def forward_gpu(self, bottom, top):
        x = bottom[0].gpu_data()
        if top[0] is bottom[0]:
            self.saved_input = opencl.copy(x, opencl.scratch(self, "input", x.size)[:x.size])
        self._launch("prelu_forward", x, top[0].mutable_gpu_data(), self.blobs[0].gpu_data())

    def backward_gpu(self, top, propagate_down, bottom):
        x = self.saved_input if top[0] is bottom[0] else bottom[0].gpu_data()
        dy = top[0].gpu_diff()
        if self.param_propagate_down[0]:
            channel_reduce_gpu(dy, self.dims, self.blobs[0].mutable_gpu_diff(), beta=1.0,
                               term=TERM_XY_NONPOSITIVE_Y, y=x)
        if propagate_down[0]:
            self._launch("prelu_backward", dy, x, bottom[0].mutable_gpu_diff(), self.blobs[0].gpu_data())


# splitmix64's constants: the golden-ratio increment and its output mixer
_GOLDEN_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX = (np.uint64(30), np.uint64(0xBF58476D1CE4E5B9), np.uint64(27), np.uint64(0x94D049BB133111EB), np.uint64(31))


def dropout_bits(seed, count):
    """32 random bits for each of the values 0 .. count-1 of a Dropout forward with this 64-bit seed.

    Counter-based (the top half of splitmix64's output for the state seed + (i + 1) * gamma), as in
    layers/neuron.cl, so the CPU and OpenCL masks are the same bits and backward needs only the seed.
    """
    z = np.arange(1, count + 1, dtype=np.uint64)  # uint64 arithmetic wraps modulo 2^64, as C's ulong
    z *= _GOLDEN_GAMMA
    z += np.uint64(seed)
    shift_a, mul_a, shift_b, mul_b, shift_c = _MIX
    z ^= z >> shift_a
    z *= mul_a
    z ^= z >> shift_b
    z *= mul_b
    z ^= z >> shift_c
    return (z >> np.uint64(32)).astype(np.uint32)


@register_layer("Dropout")
class DropoutLayer(NeuronLayer):
    """TRAIN: keep each value with probability 1 - ratio and scale the kept ones by 1 / (1 - ratio); TEST: identity.

    Each TRAIN forward draws one 64-bit seed from device.rng() (so the solver's saved generator state makes a
    resume exact) and keeps value i when dropout_bits(seed, ...)[i] >= ratio * 2^32, in either mode.
    """

    def layer_setup(self, bottom, top):
        ratio = self.layer_param.dropout_param.dropout_ratio
        if not 0 <= ratio < 1:
            raise KaffeError(f"Dropout layer '{self.name}': dropout_ratio must be in [0, 1), got {ratio}")
        # ratio is a float32, so ratio * 2^32 is exact and at most 2^32 - 256: it fits a uint32
        self.threshold = np.uint32(int(ratio * 2.0 ** 32))
        self.scale = np.float32(1.0 / (1.0 - ratio))
        self.seed = None

    def _scaled_mask(self, shape):
        keep = dropout_bits(self.seed, int(np.prod(shape, dtype=np.int64))) >= self.threshold
        return np.where(keep, self.scale, np.float32(0)).reshape(shape)

    def _draw_seed(self):
        self.seed = device.rng().integers(0, np.iinfo(np.uint64).max, dtype=np.uint64, endpoint=True)

    def forward_cpu(self, bottom, top):
        x = bottom[0].cpu_data()
        if self.phase == caffe_pb2.TRAIN:
            self._draw_seed()
            top[0].mutable_cpu_data()[...] = x * self._scaled_mask(x.shape)
        elif top[0] is not bottom[0]:
            top[0].mutable_cpu_data()[...] = x

    def backward_cpu(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        dy = top[0].cpu_diff()
        if self.phase == caffe_pb2.TRAIN:
            bottom[0].mutable_cpu_diff()[...] = dy * self._scaled_mask(dy.shape)
        elif top[0] is not bottom[0]:
            bottom[0].mutable_cpu_diff()[...] = dy

    def _apply_gpu(self, source, target):
        """target = source * the scaled mask (TRAIN) or source (TEST); in place is fine (element by element)."""
        if self.phase == caffe_pb2.TRAIN:
            opencl.launch(KERNELS, "dropout_apply", source.size, *opencl.device_args(source), *opencl.device_args(target),
                   np.uint64(self.seed), self.threshold, self.scale)
        else:
            opencl.copy(source, target)

    def forward_gpu(self, bottom, top):
        if self.phase == caffe_pb2.TRAIN:
            self._draw_seed()
        if self.phase == caffe_pb2.TRAIN or top[0] is not bottom[0]:
            self._apply_gpu(bottom[0].gpu_data(), top[0].mutable_gpu_data())

    def backward_gpu(self, top, propagate_down, bottom):
        if propagate_down[0] and (self.phase == caffe_pb2.TRAIN or top[0] is not bottom[0]):
            self._apply_gpu(top[0].gpu_diff(), bottom[0].mutable_gpu_diff())
