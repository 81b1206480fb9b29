"""Adam (Caffe's AdamSolver): bias-corrected first and second moment estimates.

beta1 = `momentum`, beta2 = `momentum2`, epsilon = `delta`. History: all first moments, then all second
moments (the .solverstate keeps that order).
"""
import math

import numpy as np

from ..engine.errors import KaffeError
from .sgd import SGDSolver, launch_update, on_device
from .solver import register_solver


@register_solver("Adam")
class AdamSolver(SGDSolver):
    def __init__(self, param):
        super().__init__(param)
        self.add_history_set()

    def _check_param(self):
        super()._check_param()
        # Caffe has no check here; a beta of 1 or more makes the bias correction divide by zero or go
        # imaginary, so kaffe refuses it up front
        for field in ("momentum", "momentum2"):
            value = getattr(self.param, field)
            if not 0 <= value < 1:
                raise KaffeError(f"solver: Adam needs 0 <= {field} < 1, got {format(value, '.6g')}")

    def compute_update_value(self, i, blob, rate):
        """m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g^2; with t = iter + 1 the parameter moves by
        -lr * lr_mult * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + delta)."""
        beta1, beta2 = self.param.momentum, self.param.momentum2
        t = self.iter + 1
        corrected_rate = np.float32(rate * self.net.params_lr[i] * math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t))
        delta = np.float32(self.param.delta)
        second = self.history[i + len(self.net.learnable_params)]
        if on_device():
            launch_update("adam_update", blob, [self.history[i], second], beta1, beta2, delta, corrected_rate)
            return
        beta1, beta2 = np.float32(beta1), np.float32(beta2)
        m = self.history[i].mutable_cpu_data()
        v = second.mutable_cpu_data()
        diff = blob.mutable_cpu_diff()
        m *= beta1
        m += (np.float32(1) - beta1) * diff
        v *= beta2
        v += (np.float32(1) - beta2) * np.square(diff)
        np.divide(m, np.sqrt(v) + delta, out=diff)
        diff *= corrected_rate
