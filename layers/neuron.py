"""Neuron layers: one bottom, one top of the same shape, computed element by element; in place allowed.

The elementwise activations are each stated once, as a `Formula`: a forward `y = f(x, p, ops)` and a backward
`dx = g(x, y, dy, p, ops)` written with arithmetic/comparison operators and the functions of `ops` only.
`p` holds the layer's parameter values as float scalars. On the CPU, `ops` is `NUMPY_OPS` and the operands are
numpy arrays; an OpenCL code generator passes symbolic operands and a symbolic `ops` to the same functions and
reads C expressions out. So a formula stays a pure expression: no Python `if` on data, no in-place or
numpy-only calls on the operands (choose with ops.where). In GPU mode the same functions give the OpenCL
kernels (engine.opencl.elementwise_kernel).

Adding an activation is one `elementwise_layer(...)` call.
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

NUMPY_OPS = SimpleNamespace(where=np.where, exp=np.exp, log=np.log, log1p=np.log1p, tanh=np.tanh, abs=np.abs,
                            maximum=np.maximum, minimum=np.minimum, sqrt=np.sqrt, pow=np.power)


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
    backward: Callable  # (x, y, dy, p, ops) -> dx; x is y's storage when the layer runs in place
    params: Callable = no_params  # LayerParameter -> {name: value}


class NeuronLayer(Layer):
    exact_num_bottom_blobs = 1
    exact_num_top_blobs = 1

    def reshape(self, bottom, top):
        if top[0] is not bottom[0]:
            top[0].reshape_like(bottom[0])


class ElementwiseLayer(NeuronLayer):
    """Runs its class's `formula` with numpy; every array is read before the top (maybe the bottom) is written."""
    formula = None

    def layer_setup(self, bottom, top):
        values = self.formula.params(self.layer_param)
        # float32 scalars keep numpy's arithmetic in float32
        self.p = SimpleNamespace(**{name: np.float32(v) for name, v in values.items()})

    def forward_cpu(self, bottom, top):
        y = self.formula.forward(bottom[0].cpu_data(), self.p, NUMPY_OPS)
        top[0].mutable_cpu_data()[...] = y

    def backward_cpu(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        dx = self.formula.backward(bottom[0].cpu_data(), top[0].cpu_data(), top[0].cpu_diff(), self.p, NUMPY_OPS)
        bottom[0].mutable_cpu_diff()[...] = dx

    def _kernel(self, direction, inputs):
        # one kernel per (type, direction), cached by elementwise_kernel; parameter values are kernel arguments
        return opencl.elementwise_kernel(f"{self.type}_{direction}", getattr(self.formula, direction), inputs,
                                         tuple(vars(self.p)))

    def forward_gpu(self, bottom, top):
        x = bottom[0].gpu_data()
        self._kernel("forward", ("x",))(top[0].mutable_gpu_data(), x, p=self.p)

    def backward_gpu(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        inputs = bottom[0].gpu_data(), top[0].gpu_data(), top[0].gpu_diff()
        self._kernel("backward", ("x", "y", "dy"))(bottom[0].mutable_gpu_diff(), *inputs, p=self.p)


def elementwise_layer(type_name, forward, backward, params=no_params):
    """Create and register the ElementwiseLayer subclass for `type: "<type_name>"`."""
    cls = type(f"{type_name}Layer", (ElementwiseLayer,),
               {"formula": Formula(forward, backward, params), "__module__": __name__,
                "__doc__": f"{type_name}: an elementwise activation given by its formula."})
    return register_layer(type_name)(cls)


ReLULayer = elementwise_layer(
    "ReLU",
    forward=lambda x, p, ops: ops.maximum(x, 0) + p.negative_slope * ops.minimum(x, 0),
    # Caffe's rule, reading the bottom's sign: in place x holds y, which has x's sign when negative_slope >= 0
    backward=lambda x, y, dy, p, ops: dy * ((x > 0) + p.negative_slope * (x <= 0)),
    params=field_params("relu_param", "negative_slope"))

SigmoidLayer = elementwise_layer(
    "Sigmoid",
    # the tanh form cannot overflow, unlike 1 / (1 + exp(-x))
    forward=lambda x, p, ops: 0.5 * ops.tanh(0.5 * x) + 0.5,
    backward=lambda x, y, dy, p, ops: dy * y * (1 - y))

TanHLayer = elementwise_layer(
    "TanH",
    forward=lambda x, p, ops: ops.tanh(x),
    backward=lambda x, y, dy, p, ops: dy * (1 - y * y))


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
            opencl.launch("layers/neuron.cl", "dropout_apply", source.size, *opencl.device_args(source), *opencl.device_args(target),
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
