"""Nesterov's accelerated gradient (Caffe's NesterovSolver): SGD's momentum history with a look-ahead step."""
import numpy as np

from .sgd import SGDSolver
from .solver import register_solver


@register_solver("Nesterov")
class NesterovSolver(SGDSolver):
    device_rule = "NESTEROV"

    def update_values(self, i, rate, diff, history):
        """h' = momentum * h + lr * lr_mult * g; the parameter moves by -((1 + momentum) * h' - momentum * h)."""
        momentum = np.float32(self.param.momentum)
        previous = history.copy()
        history *= momentum
        history += np.float32(rate * self.net.params_lr[i]) * diff
        np.multiply(history, np.float32(1) + momentum, out=diff)
        diff -= momentum * previous
