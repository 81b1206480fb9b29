"""AdaGrad (Caffe's AdaGradSolver): per-value rates from the running sum of squared gradients."""
import numpy as np

from ..engine.errors import KaffeError
from .sgd import SGDSolver, launch_update, on_device
from .solver import register_solver


@register_solver("AdaGrad")
class AdaGradSolver(SGDSolver):
    def _check_param(self):
        super()._check_param()
        if self.param.momentum != 0:
            raise KaffeError(f"solver: Momentum cannot be used with AdaGrad (momentum: "
                             f"{format(self.param.momentum, '.6g')}); remove the momentum field")

    def compute_update_value(self, i, blob, rate):
        """h += g^2; the parameter moves by -lr * lr_mult * g / (sqrt(h) + delta)."""
        local_rate = np.float32(rate * self.net.params_lr[i])
        delta = np.float32(self.param.delta)
        if on_device():
            launch_update("adagrad_update", blob, [self.history[i]], delta, local_rate)
            return
        history = self.history[i].mutable_cpu_data()
        diff = blob.mutable_cpu_diff()
        history += np.square(diff)
        np.divide(diff, np.sqrt(history) + delta, out=diff)
        diff *= local_rate
