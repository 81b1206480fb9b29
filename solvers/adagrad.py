"""AdaGrad (Caffe's AdaGradSolver): per-value rates from the running sum of squared gradients."""
import numpy as np

from ..engine.errors import KaffeError
from .sgd import SGDSolver, launch_update
from .solver import register_solver


@register_solver("AdaGrad")
class AdaGradSolver(SGDSolver):
    def _check_param(self):
        super()._check_param()
        if self.param.momentum != 0:
            raise KaffeError(f"solver: Momentum cannot be used with AdaGrad (momentum: "
                             f"{format(self.param.momentum, '.6g')}); remove the momentum field")

    def update_on_device(self, i, blob, rate):
        """h += g^2; the parameter moves by -lr * lr_mult * g / (sqrt(h) + delta)."""
        launch_update("adagrad_update", blob, [self.history[i]], self.param.delta, rate * self.net.params_lr[i])

    def update_values(self, i, rate, diff, history):
        history += np.square(diff)
        np.divide(diff, np.sqrt(history) + np.float32(self.param.delta), out=diff)
        diff *= np.float32(rate * self.net.params_lr[i])
