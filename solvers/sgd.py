"""SGD with momentum (Caffe's SGDSolver): normalisation, regularisation, gradient clipping, history."""
import numpy as np

from ..engine import accelerator, device
from ..engine.blob import Blob
from ..engine.errors import KaffeError
from ..engine.log import logger
from .flat_update import FlatParameters
from .lr_policy import learning_rate
from .solver import Solver, register_solver


UPDATE_BLOCK = 1 << 16  # values per block of a host update: the blocks of all its arrays fit a core's L2


def on_device():
    """Whether updates run as OpenCL kernels (GPU mode): the weights never travel to the host for them."""
    return device.mode() == device.GPU


@register_solver("SGD")
class SGDSolver(Solver):
    def __init__(self, param, **options):
        super().__init__(param, **options)
        # one history blob per learnable parameter (momentum); rules with a second set (AdaDelta, Adam) append
        # it after the first, Caffe's order in the .solverstate
        self.history = []
        self.add_history_set()
        self._scratch_values = np.empty(0, dtype=np.float32)  # see _scratch

    def add_history_set(self):
        self.history += [Blob(p.shape) for p in self.net.learnable_params]

    def history_blobs(self):
        return self.history

    def learning_rate(self):
        rate, self.current_step = learning_rate(self.param, self.iter, self.current_step)
        return rate

    @property
    def lr(self):
        """pycaffe's `lr`: the learning rate of the current iteration (Caffe's GetLearningRate)."""
        return self.learning_rate()

    def apply_update(self):
        rate = self.learning_rate()
        if self.param.display and self.iter % self.param.display == 0:
            logger.info(f"Iteration {self.iter}, lr = {format(rate, '.6g')}")
        self.clip_gradients()
        if on_device():
            self.update_on_device(rate)
        else:
            for i, blob in enumerate(self.net.learnable_params):
                self.update_on_host(i, blob, rate)
        self.iter += 1  # as Caffe: `iter` counts the updates of the weights

    # the rule's name in updates.cl and its scalars a, b, c there
    device_rule = "SGD"

    def device_scalars(self):
        return (self.param.momentum,)

    def device_rate(self, rate):
        return rate

    def flat_parameters(self):
        """The net's FlatParameters (made at the first GPU-mode update, again when a parameter got new memory);
        Net.clear_param_diffs clears its diffs in one launch."""
        params = self.net.learnable_params
        flat = self.net.flat_params
        if flat is None or not flat.holds(params, self.history):
            decays = [self._decay(i) for i in range(len(params))]
            flat = self.net.flat_params = FlatParameters(params, self.history, self.net.params_lr, decays)
        return flat

    def update_on_device(self, rate):
        """Normalise, regularise, compute the update value (left in the diffs, as in Caffe) and apply it, for
        every parameter in one launch."""
        norm = 1.0 / self.param.iter_size if self.param.iter_size > 1 else 1.0
        self.flat_parameters().update(self.device_rule, self.device_rate(rate), norm, self.device_scalars(),
                                      self.param.regularization_type == "L1")

    def update_on_host(self, i, blob, rate):
        """Normalise, regularise, turn the gradient into the update value (left in the diff, as in Caffe) and
        apply it, one block of values at a time: each step is a memory-bound pass, and over a block that
        stays in cache they run about twice as fast as over whole arrays, read from memory each time."""
        arrays = [a.reshape(-1) for a in [blob.mutable_cpu_data(), blob.mutable_cpu_diff()] +
                  [h.mutable_cpu_data() for h in self.history[i::len(self.net.learnable_params)]]]
        if self._compiled_update():
            norm = np.float32(1.0 / self.param.iter_size) if self.param.iter_size > 1 else np.float32(1)
            accelerator.update_kernels().sgd_update(*arrays, norm, self._decay(i),
                                                    np.float32(rate * self.net.params_lr[i]),
                                                    np.float32(self.param.momentum))
            return
        for start in range(0, blob.count, UPDATE_BLOCK):
            data, diff, *history = (a[start:start + UPDATE_BLOCK] for a in arrays)
            if self.param.iter_size > 1:
                diff *= np.float32(1.0 / self.param.iter_size)
            self.regularize_values(i, data, diff)
            self.update_values(i, rate, diff, *history)
            data -= diff

    def _compiled_update(self):
        """Whether the update is plain SGD's with L2 or no decay, which the accelerator runs in one pass (a rule
        that redefines regularize_values or update_values, and L1, run the numpy code)."""
        return (type(self).update_values is SGDSolver.update_values and
                type(self).regularize_values is SGDSolver.regularize_values and
                self.param.regularization_type != "L1" and accelerator.enabled())

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

    def _decay(self, i):
        decay = np.float32(self.param.weight_decay * self.net.params_weight_decay[i])
        kind = self.param.regularization_type
        if decay and kind not in ("L1", "L2"):
            raise KaffeError(f"Unknown regularization type: '{kind}' (known: L1, L2)")
        return decay

    def _scratch(self, like):
        """A reused host array shaped like `like`: temporaries of this size cost more to allocate than to fill."""
        if self._scratch_values.size < like.size:
            self._scratch_values = np.empty(max(like.size, UPDATE_BLOCK), dtype=np.float32)
        return self._scratch_values[:like.size]

    def regularize_values(self, i, data, diff):
        """diff += decay * (data for L2, sign(data) for L1), on host arrays."""
        decay = self._decay(i)
        if decay:
            term = np.sign(data, out=self._scratch(data)) if self.param.regularization_type == "L1" else data
            diff += np.multiply(term, decay, out=self._scratch(data))

    def update_values(self, i, rate, diff, history):
        """h = lr * lr_mult * g + momentum * h; the parameter then moves by -h (the diff becomes h)."""
        history *= np.float32(self.param.momentum)
        history += np.multiply(diff, np.float32(rate * self.net.params_lr[i]), out=self._scratch(diff))
        diff[...] = history
