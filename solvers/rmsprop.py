"""RMSProp (Caffe's RMSPropSolver): per-value rates from a decaying mean of squared gradients."""
import numpy as np

from ..engine.errors import KaffeError
from .sgd import SGDSolver
from .solver import register_solver


@register_solver("RMSProp")
class RMSPropSolver(SGDSolver):
    def _check_param(self):
        super()._check_param()
        p = self.param
        if p.momentum != 0:
            raise KaffeError(f"solver: Momentum cannot be used with RMSProp (momentum: "
                             f"{format(p.momentum, '.6g')}); remove the momentum field")
        if not 0 <= p.rms_decay < 1:
            raise KaffeError(f"solver: rms_decay should lie between 0 and 1 (0 <= rms_decay < 1), got "
                             f"{format(p.rms_decay, '.6g')}")

    device_rule = "RMSPROP"

    def device_scalars(self):
        return self.param.rms_decay, self.param.delta

    def update_values(self, i, rate, diff, history):
        """h = rms_decay * h + (1 - rms_decay) * g^2; the parameter moves by -lr * lr_mult * g / (sqrt(h) + delta)."""
        decay = np.float32(self.param.rms_decay)
        history *= decay
        history += (np.float32(1) - decay) * np.square(diff)
        np.divide(diff, np.sqrt(history) + np.float32(self.param.delta), out=diff)
        diff *= np.float32(rate * self.net.params_lr[i])
