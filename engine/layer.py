"""Layer base class and the registry of layer types, after Caffe's Layer and LayerRegistry.

A layer implements layer_setup / reshape / forward_cpu / backward_cpu, and, where it has OpenCL
kernels, forward_gpu / backward_gpu. Without them the layer runs its CPU code in GPU mode after a
one-time warning naming its type (the blobs sync to the host and back lazily).
"""
import contextlib
import difflib

import numpy as np

from . import device, opencl
from .blob import Blob
from .errors import KaffeError
from .log import logger
from .syncedmem import HEAD_AT_GPU

_REGISTRY = {}
_warned_fallback = set()


def register_layer(type_name):
    """Class decorator: make the class the implementation of `type: "<type_name>"`."""
    def register(cls):
        if type_name in _REGISTRY:
            raise KaffeError(f"layer type {type_name} registered twice")
        cls.type = type_name
        _REGISTRY[type_name] = cls
        return cls
    return register


def layer_type_list():
    _load_builtin_layers()
    return sorted(_REGISTRY)


def create_layer(param, phase=None):
    """Instantiate the layer for a LayerParameter, with Caffe's error for an unknown type."""
    _load_builtin_layers()
    cls = _REGISTRY.get(param.type)
    if cls is None:
        known = ", ".join(sorted(_REGISTRY))
        by_lower = {name.lower(): name for name in _REGISTRY}
        close = ([by_lower[param.type.lower()]] if param.type.lower() in by_lower
                 else difflib.get_close_matches(param.type, list(_REGISTRY), n=1))
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise KaffeError(f"Unknown layer type: '{param.type}' (layer '{param.name}').{hint} "
                         f"Known types: {known}")
    return cls(param)


def _load_builtin_layers():
    from .. import layers  # noqa: F401  (importing the package registers every built-in layer)


class Layer:
    type = None
    # bottom/top count rules (None = no rule), as Caffe's ExactNumBottomBlobs() and friends
    exact_num_bottom_blobs = None
    min_bottom_blobs = None
    max_bottom_blobs = None
    exact_num_top_blobs = None
    min_top_blobs = None
    max_top_blobs = None
    equal_num_bottom_top_blobs = False
    # a layer that can create its tops itself: the number of tops it wants (e.g. loss layers: 1)
    auto_top_blobs = False

    def __init__(self, param):
        self.layer_param = param
        self.phase = param.phase
        self.blobs = []
        for stored in param.blobs:  # a LayerParameter may carry its weights (e.g. read from a .caffemodel)
            blob = Blob()
            blob.from_proto(stored)
            self.blobs.append(blob)
        self.param_propagate_down = [True] * len(self.blobs)
        self.loss_weights = []
        # False once a Net has found that it never runs this layer's backward: forward may then skip what
        # only backward reads (e.g. max pooling's argmax)
        self.needs_backward = True

    # -- what subclasses implement ------------------------------------------------------------
    def layer_setup(self, bottom, top):
        pass

    def reshape(self, bottom, top):
        raise NotImplementedError

    def forward_cpu(self, bottom, top):
        raise NotImplementedError

    def backward_cpu(self, top, propagate_down, bottom):
        pass

    def forward_gpu(self, bottom, top):
        self._warn_fallback()
        self.forward_cpu(bottom, top)

    def backward_gpu(self, top, propagate_down, bottom):
        self._warn_fallback()
        self.backward_cpu(top, propagate_down, bottom)

    def allow_force_backward(self, bottom_index):
        return True

    def get_resume_state(self):
        """Extra state (data cursor, private RNG) that an exact resume needs; JSON-friendly, or None."""
        return None

    def set_resume_state(self, state):
        pass

    # -- the fixed driver ---------------------------------------------------------------------
    @property
    def name(self):
        return self.layer_param.name

    def setup(self, bottom, top):
        self.check_blob_counts(bottom, top)
        self.layer_setup(bottom, top)
        self.reshape(bottom, top)
        self.set_loss_weights(top)

    def check_blob_counts(self, bottom, top):
        def check(what, blobs, exact, low, high):
            n = len(blobs)
            if exact is not None and n != exact:
                raise KaffeError(f"{self.type} layer '{self.name}' takes exactly {exact} {what} blob(s), got {n}")
            if low is not None and n < low:
                raise KaffeError(f"{self.type} layer '{self.name}' takes at least {low} {what} blob(s), got {n}")
            if high is not None and n > high:
                raise KaffeError(f"{self.type} layer '{self.name}' takes at most {high} {what} blob(s), got {n}")
        check("bottom", bottom, self.exact_num_bottom_blobs, self.min_bottom_blobs, self.max_bottom_blobs)
        check("top", top, self.exact_num_top_blobs, self.min_top_blobs, self.max_top_blobs)
        if self.equal_num_bottom_top_blobs and len(bottom) != len(top):
            raise KaffeError(f"{self.type} layer '{self.name}' needs as many tops as bottoms "
                             f"({len(bottom)} bottoms, {len(top)} tops)")

    def set_loss_weights(self, top):
        """Store each top's loss weight in its diff, where backward finds it (Caffe's trick)."""
        weights = list(self.layer_param.loss_weight)
        if weights and len(weights) != len(top):
            raise KaffeError(f"layer '{self.name}' has {len(weights)} loss_weight values for {len(top)} tops")
        if not weights:
            weights = [self.default_loss_weight(i) for i in range(len(top))]
        self.loss_weights = weights
        for blob, weight in zip(top, weights):
            if weight:
                blob.mutable_cpu_diff()[...] = weight

    def default_loss_weight(self, top_index):
        return 0.0

    def loss(self, top_index):
        return self.loss_weights[top_index] if top_index < len(self.loss_weights) else 0.0

    def forward(self, bottom, top):
        """Reshape, run the device's forward, and return this layer's weighted loss."""
        self.reshape(bottom, top)
        self._written_loss = None
        if device.mode() == device.GPU:
            self.forward_gpu(bottom, top)
        else:
            self.forward_cpu(bottom, top)
        loss = 0.0
        for index, (blob, weight) in enumerate(zip(top, self.loss_weights)):
            if weight:
                if index == 0 and self._written_loss is not None:   # the forward's kernel wrote it already
                    loss += self._written_loss
                elif blob.memory.head == HEAD_AT_GPU:   # read on the device: one value comes back, or none yet
                    deferred = _deferred["losses"]
                    loss += deferred.add(blob) if deferred else opencl.dot(blob.gpu_data(), blob.gpu_diff())
                else:
                    loss += float(np.dot(blob.cpu_data().ravel(), blob.cpu_diff().ravel()))
        return loss

    def weighted_loss_slot(self):
        """GPU mode, losses deferred: where a loss layer's forward kernel may write top 0's weighted loss (its
        data times the loss weight in its diff, as Layer.forward's dot computes it) to save that launch; a
        one-value device view, or None. A forward that writes it calls wrote_weighted_loss() after the launch."""
        deferred = _deferred["losses"]
        return deferred.next_slot() if deferred and self.loss_weights and self.loss_weights[0] else None

    def wrote_weighted_loss(self):
        self._written_loss = _deferred["losses"].take()

    def backward(self, top, propagate_down, bottom):
        if device.mode() == device.GPU:
            self.backward_gpu(top, propagate_down, bottom)
        else:
            self.backward_cpu(top, propagate_down, bottom)

    def _warn_fallback(self):
        if self.type not in _warned_fallback:
            _warned_fallback.add(self.type)
            logger.warning(f"{self.type} layer has no OpenCL implementation; running it on the CPU "
                           f"(data is copied between host and device)")

    # -- helpers for subclasses -----------------------------------------------------------------
    def init_params(self, *specs):
        """Create the parameter blobs from (shape, FillerParameter or None) pairs, in Caffe's order.

        Blobs that came stored in the LayerParameter are kept instead, after a shape check.
        """
        from .filler import fill
        shapes = [tuple(int(d) for d in shape) for shape, _ in specs]
        if self.blobs:
            if len(self.blobs) != len(specs):
                raise KaffeError(f"{self.type} layer '{self.name}' needs {len(specs)} parameter blobs, "
                                 f"the LayerParameter stores {len(self.blobs)}")
            for i, (blob, shape) in enumerate(zip(self.blobs, shapes)):
                if blob.shape != shape:
                    raise KaffeError(f"{self.type} layer '{self.name}': stored parameter {i} has shape "
                                     f"{blob.shape_string()}, the layer expects {' '.join(map(str, shape))}")
        else:
            for shape, (_, filler_param) in zip(shapes, specs):
                blob = Blob(shape)
                fill(blob, filler_param)
                self.blobs.append(blob)
        self.param_propagate_down = [True] * len(self.blobs)

    def __repr__(self):
        return f"<{self.type} layer '{self.name}'>"


_deferred = {"losses": None}


@contextlib.contextmanager
def deferred_losses(losses):
    """In GPU mode, Layer.forward returns the weighted losses that its device computed as PendingLoss values
    held in `losses` (a DeviceLosses), instead of reading each from the device."""
    saved, _deferred["losses"] = _deferred["losses"], losses
    try:
        yield losses
    finally:
        _deferred["losses"] = saved


class DeviceLosses:
    """Loss values left on the device, one slot each, read back in one transfer (a training run reads the
    losses of all the iterations since the last display at once)."""
    INITIAL_SLOTS = 256

    def __init__(self):
        self.values = None
        self.slots = []   # the one-value views of values, made once
        self.used = 0

    def next_slot(self):
        """The one-value device view that the next loss goes to (take() claims it)."""
        if self.values is None or self.used == self.values.size:
            grown = opencl.empty(max(self.INITIAL_SLOTS, 2 * self.used))
            if self.used:
                opencl.copy(self.values, grown, n=self.used)
            self.values, self.slots = grown, []
        if self.used == len(self.slots):
            self.slots.append(self.values[self.used:self.used + 1])
        return self.slots[self.used]

    def take(self):
        """The next slot, written by now, as a PendingLoss."""
        self.used += 1
        return PendingLoss((self.used - 1,))

    def add(self, blob):
        """Enqueue the weighted loss of a loss top (the dot of its data and the loss weights in its diff)
        into the next slot; returns it as a PendingLoss."""
        opencl.dot(blob.gpu_data(), blob.gpu_diff(), out=self.next_slot())
        return self.take()

    def read(self):
        """The values of every slot since the last read, as a host array; the slots are free again."""
        values = opencl.download(self.values[:self.used]) if self.used else np.zeros(0, np.float32)
        self.used = 0
        return values


class PendingLoss:
    """A loss not read yet: a sum of DeviceLosses slots plus host terms, divided by `divisor`. Sums and
    division follow the host arithmetic on floats (the slots are added in order, then divided)."""

    def __init__(self, slots=(), host=0.0, divisor=1.0):
        self.slots, self.host, self.divisor = tuple(slots), host, divisor

    def __add__(self, other):
        if isinstance(other, PendingLoss):
            if self.divisor != 1.0 or other.divisor != 1.0:
                raise KaffeError("pending losses are summed before they are divided")
            return PendingLoss(self.slots + other.slots, self.host + other.host)
        return PendingLoss(self.slots, self.host + float(other), self.divisor)

    __radd__ = __add__

    def __truediv__(self, divisor):
        return PendingLoss(self.slots, self.host, self.divisor * float(divisor))

    def value(self, values):
        """The loss, given the host array that DeviceLosses.read returned."""
        total = self.host
        for slot in self.slots:
            total += float(values[slot])
        return total / self.divisor if self.divisor != 1.0 else total


class LossLayer(Layer):
    """Losses take (prediction, label) and give one scalar top with loss weight 1 by default."""
    exact_num_bottom_blobs = 2
    exact_num_top_blobs = 1
    auto_top_blobs = True

    def default_loss_weight(self, top_index):
        return 1.0 if top_index == 0 else 0.0

    def allow_force_backward(self, bottom_index):
        return bottom_index != 1

    def check_num_matches(self, bottom):
        if bottom[0].shape[0] != bottom[1].shape[0]:
            raise KaffeError(f"{self.type} layer '{self.name}': the number of predictions "
                             f"({bottom[0].shape_string()}) must match the number of labels "
                             f"({bottom[1].shape_string()})")
