"""Nesterov's accelerated gradient (Caffe's NesterovSolver): SGD's momentum history with a look-ahead step."""
import numpy as np

from .sgd import SGDSolver, launch_update, on_device
from .solver import register_solver


@register_solver("Nesterov")
class NesterovSolver(SGDSolver):
    def compute_update_value(self, i, blob, rate):
        """h' = momentum * h + lr * lr_mult * g; the parameter moves by -((1 + momentum) * h' - momentum * h)."""
        local_rate = np.float32(rate * self.net.params_lr[i])
        momentum = np.float32(self.param.momentum)
        if on_device():
            launch_update("nesterov_update", blob, [self.history[i]], momentum, local_rate)
            return
        history = self.history[i].mutable_cpu_data()
        diff = blob.mutable_cpu_diff()
        previous = history.copy()
        history *= momentum
        history += local_rate * diff
        np.multiply(history, np.float32(1) + momentum, out=diff)
        diff -= momentum * previous
