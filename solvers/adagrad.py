"""AdaGrad (Caffe's AdaGradSolver): per-value rates from the running sum of squared gradients."""
import numpy as np

from ..engine.errors import KaffeError
from .sgd import SGDSolver
from .solver import register_solver


@register_solver("AdaGrad")
class AdaGradSolver(SGDSolver):
    def _check_param(self):
        super()._check_param()
        if self.param.momentum != 0:
            raise KaffeError(f"solver: Momentum cannot be used with AdaGrad (momentum: "
                             f"{format(self.param.momentum, '.6g')}); remove the momentum field")

    device_rule = "ADAGRAD"

    def device_scalars(self):
        return (self.param.delta,)

    def update_values(self, i, rate, diff, history):
        """h += g^2; the parameter moves by -lr * lr_mult * g / (sqrt(h) + delta)."""
        history += np.square(diff)
        np.divide(diff, np.sqrt(history) + np.float32(self.param.delta), out=diff)
        diff *= np.float32(rate * self.net.params_lr[i])
