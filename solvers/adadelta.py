"""AdaDelta (Caffe's AdaDeltaSolver): rates from decaying means of squared gradients and squared updates.

`momentum` is the decay of both means; Caffe's examples use base_lr 1. History: all gradient means first,
then all update means (the .solverstate keeps that order).
"""
import numpy as np

from .sgd import SGDSolver
from .solver import register_solver


@register_solver("AdaDelta")
class AdaDeltaSolver(SGDSolver):
    def __init__(self, param, **options):
        super().__init__(param, **options)
        self.add_history_set()

    device_rule = "ADADELTA"

    def device_scalars(self):
        return self.param.momentum, self.param.delta

    def update_values(self, i, rate, diff, gradients, squared_updates):
        """h = m*h + (1-m)*g^2; s = g * sqrt((u + delta) / (h + delta)); u = m*u + (1-m)*s^2; moves by -lr*s."""
        momentum = np.float32(self.param.momentum)
        delta = np.float32(self.param.delta)
        keep = np.float32(1) - momentum
        gradients *= momentum
        gradients += keep * np.square(diff)
        diff *= np.sqrt((squared_updates + delta) / (gradients + delta))
        squared_updates *= momentum
        squared_updates += keep * np.square(diff)
        diff *= np.float32(rate * self.net.params_lr[i])
