"""Neuron layers: one bottom, one top of the same shape, computed element by element; in place allowed.

The elementwise activations are each stated once, as a `Formula`: a forward `y = f(x, p, ops)` and a backward
`dx = g(x, y, dy, p, ops)` written with arithmetic/comparison operators and the functions of `ops` only.
`p` holds the layer's parameter values as float scalars. On the CPU, `ops` is `NUMPY_OPS` and the operands are
numpy arrays; an OpenCL code generator passes symbolic operands and a symbolic `ops` to the same functions and
reads C expressions out. So a formula stays a pure expression: no Python `if` on data, no in-place or
numpy-only calls on the operands (choose with ops.where).

Adding an activation is one `elementwise_layer(...)` call.
"""
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

import numpy as np

from ..engine import device
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


@register_layer("Dropout")
class DropoutLayer(NeuronLayer):
    """TRAIN: keep each value with probability 1 - ratio and scale the kept ones by 1 / (1 - ratio); TEST: identity."""

    def layer_setup(self, bottom, top):
        ratio = self.layer_param.dropout_param.dropout_ratio
        if not 0 <= ratio < 1:
            raise KaffeError(f"Dropout layer '{self.name}': dropout_ratio must be in [0, 1), got {ratio}")
        self.keep_probability = 1.0 - ratio
        self.scale = np.float32(1.0 / (1.0 - ratio))
        self.scaled_mask = None

    def forward_cpu(self, bottom, top):
        x = bottom[0].cpu_data()
        if self.phase == caffe_pb2.TRAIN:
            # Caffe's bernoulli(1 - ratio) draws u < 1 - ratio
            keep = device.rng().random(x.shape, dtype=np.float32) < self.keep_probability
            self.scaled_mask = keep * self.scale
            top[0].mutable_cpu_data()[...] = x * self.scaled_mask
        elif top[0] is not bottom[0]:
            top[0].mutable_cpu_data()[...] = x

    def backward_cpu(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        dy = top[0].cpu_diff()
        if self.phase == caffe_pb2.TRAIN:
            bottom[0].mutable_cpu_diff()[...] = dy * self.scaled_mask
        elif top[0] is not bottom[0]:
            bottom[0].mutable_cpu_diff()[...] = dy
