"""Nesterov's accelerated gradient (Caffe's NesterovSolver): SGD's momentum history with a look-ahead step."""
import numpy as np

from .sgd import SGDSolver, launch_update
from .solver import register_solver


@register_solver("Nesterov")
class NesterovSolver(SGDSolver):
    def update_on_device(self, i, blob, rate):
        """h' = momentum * h + lr * lr_mult * g; the parameter moves by -((1 + momentum) * h' - momentum * h)."""
        launch_update("nesterov_update", blob, [self.history[i]], self.param.momentum, rate * self.net.params_lr[i])

    def update_values(self, i, rate, diff, history):
        momentum = np.float32(self.param.momentum)
        previous = history.copy()
        history *= momentum
        history += np.float32(rate * self.net.params_lr[i]) * diff
        np.multiply(history, np.float32(1) + momentum, out=diff)
        diff -= momentum * previous
