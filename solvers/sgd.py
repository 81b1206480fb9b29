"""SGD with momentum (Caffe's SGDSolver): normalisation, regularisation, gradient clipping, history."""
import numpy as np

from ..engine import device, opencl
from ..engine.blob import Blob
from ..engine.errors import KaffeError
from ..engine.log import logger
from .lr_policy import learning_rate
from .solver import Solver, register_solver


UPDATE_KERNELS = "solvers/updates.cl"


def on_device():
    """Whether updates run as OpenCL kernels (GPU mode): the weights never travel to the host for them."""
    return device.mode() == device.GPU


def launch_update(name, blob, history, *scalars):
    """Run update kernel `name` of updates.cl over one parameter: its diff (the gradient in, the update value
    out), its history blobs, then float scalars; one work-item per value, everything stays on the device."""
    arrays = [opencl.device_args(blob.mutable_gpu_diff())]
    arrays += [opencl.device_args(h.mutable_gpu_data()) for h in history]
    opencl.launch(UPDATE_KERNELS, name, blob.count, *(a for pair in arrays for a in pair),
                  *(np.float32(s) for s in scalars))


@register_solver("SGD")
class SGDSolver(Solver):
    def __init__(self, param):
        super().__init__(param)
        # one history blob per learnable parameter (momentum); rules with a second set (AdaDelta, Adam) append
        # it after the first, Caffe's order in the .solverstate
        self.history = []
        self.add_history_set()
        self.lr = 0.0

    def add_history_set(self):
        self.history += [Blob(p.shape) for p in self.net.learnable_params]

    def history_blobs(self):
        return self.history

    def learning_rate(self):
        rate, self.current_step = learning_rate(self.param, self.iter, self.current_step)
        return rate

    def apply_update(self):
        rate = self.learning_rate()
        self.lr = rate
        if self.param.display and self.iter % self.param.display == 0:
            logger.info(f"Iteration {self.iter}, lr = {format(rate, '.6g')}")
        self.clip_gradients()
        for i, blob in enumerate(self.net.learnable_params):
            self.normalize(blob)
            self.regularize(i, blob)
            self.compute_update_value(i, blob, rate)
        self.net.update()

    def clip_gradients(self):
        clip = self.param.clip_gradients
        if clip < 0:
            return
        norm = float(np.sqrt(sum(b.sumsq_diff() for b in self.net.learnable_params)))
        if norm > clip:
            factor = clip / norm
            logger.info(f"Gradient clipping: scaling down gradients (L2 norm {format(norm, '.6g')} > "
                        f"{format(clip, '.6g')}) by scale factor {format(factor, '.6g')}")
            for blob in self.net.learnable_params:
                blob.scale_diff(factor)

    def normalize(self, blob):
        if self.param.iter_size > 1:
            blob.scale_diff(1.0 / self.param.iter_size)

    def regularize(self, i, blob):
        decay = np.float32(self.param.weight_decay * self.net.params_weight_decay[i])
        if not decay:
            return
        kind = self.param.regularization_type
        if kind not in ("L1", "L2"):
            raise KaffeError(f"Unknown regularization type: '{kind}' (known: L1, L2)")
        if on_device():
            if kind == "L2":
                opencl.axpy(decay, blob.gpu_data(), blob.mutable_gpu_diff())
            else:
                opencl.add_scaled_sign(decay, blob.gpu_data(), blob.mutable_gpu_diff())
            return
        diff = blob.mutable_cpu_diff()
        diff += decay * (blob.cpu_data() if kind == "L2" else np.sign(blob.cpu_data()))

    def compute_update_value(self, i, blob, rate):
        """h = lr * lr_mult * g + momentum * h; the parameter then moves by -h."""
        local_rate = np.float32(rate * self.net.params_lr[i])
        momentum = np.float32(self.param.momentum)
        if on_device():
            history = self.history[i].mutable_gpu_data()
            opencl.axpby(local_rate, blob.gpu_diff(), momentum, history)
            opencl.copy(history, blob.mutable_gpu_diff())
            return
        history = self.history[i].mutable_cpu_data()
        diff = blob.mutable_cpu_diff()
        history *= momentum
        history += local_rate * diff
        diff[...] = history
