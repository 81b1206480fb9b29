"""Adam (Caffe's AdamSolver): bias-corrected first and second moment estimates.

beta1 = `momentum`, beta2 = `momentum2`, epsilon = `delta`. History: all first moments, then all second
moments (the .solverstate keeps that order).
"""
import math

import numpy as np

from ..engine.errors import KaffeError
from .sgd import SGDSolver
from .solver import register_solver


@register_solver("Adam")
class AdamSolver(SGDSolver):
    def __init__(self, param, **options):
        super().__init__(param, **options)
        self.add_history_set()

    def _check_param(self):
        super()._check_param()
        # Caffe has no check here; a beta of 1 or more makes the bias correction divide by zero or go
        # imaginary, so kaffe refuses it up front
        for field in ("momentum", "momentum2"):
            value = getattr(self.param, field)
            if not 0 <= value < 1:
                raise KaffeError(f"solver: Adam needs 0 <= {field} < 1, got {format(value, '.6g')}")

    def _corrected_rate(self, i, rate):
        t = self.iter + 1
        return rate * self.net.params_lr[i] * math.sqrt(1 - self.param.momentum2 ** t) / (1 - self.param.momentum ** t)

    device_rule = "ADAM"

    def device_scalars(self):
        return self.param.momentum, self.param.momentum2, self.param.delta

    def device_rate(self, rate):
        """The bias-corrected rate: with t = iter + 1, lr * sqrt(1 - b2^t) / (1 - b1^t)."""
        t = self.iter + 1
        return rate * math.sqrt(1 - self.param.momentum2 ** t) / (1 - self.param.momentum ** t)

    def update_values(self, i, rate, diff, m, v):
        """m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g^2; the parameter moves by
        -lr * lr_mult * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + delta)."""
        beta1, beta2 = np.float32(self.param.momentum), np.float32(self.param.momentum2)
        m *= beta1
        m += (np.float32(1) - beta1) * diff
        v *= beta2
        v += (np.float32(1) - beta2) * np.square(diff)
        np.divide(m, np.sqrt(v) + np.float32(self.param.delta), out=diff)
        diff *= np.float32(self._corrected_rate(i, rate))
