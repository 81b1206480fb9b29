"""Loss layers and Accuracy (which takes SoftmaxWithLoss's (scores, labels) bottoms).

SoftmaxWithLoss, SigmoidCrossEntropyLoss, EuclideanLoss and ContrastiveLoss have OpenCL kernels (loss.cl);
MultinomialLogisticLoss, InfogainLoss and HingeLoss run on the host in GPU mode, as Caffe has no GPU code for them.
"""
import math

import numpy as np

from ..engine import opencl
from ..engine.blob import Blob
from ..engine.errors import KaffeError
from ..engine.io import read_binary_proto
from ..engine.layer import Layer, LossLayer, register_layer
from ..engine.syncedmem import HEAD_AT_GPU
from ..proto import caffe_pb2
from .common import axis_index, shape_text, softmax, softmax_gpu

FLT_MIN = np.finfo(np.float32).tiny
LOG_THRESHOLD = 1e-20  # Caffe's kLOG_THRESHOLD: the smallest probability a log loss takes the log of
LossParameter = caffe_pb2.LossParameter
KERNELS = "layers/loss.cl"
# SoftmaxWithLoss's forward in one launch for small batches: the softmax and asum of common.cl and reduce.cl
SOFTMAX_LOSS_SUM = ("reduce.cl", "layers/common.cl", KERNELS)
SOFTMAX_LOSS_SUM_DEFINES = {"GROUP_SIZE": opencl.REDUCE_GROUP, "ASUM": 1}


def normalization_mode(loss_param, default):
    """loss_param's normalization; the deprecated `normalize` counts only when it is unset; else `default`
    (each loss has its own: VALID for SoftmaxWithLoss, BATCH_SIZE for SigmoidCrossEntropyLoss)."""
    if loss_param.HasField("normalization"):
        return loss_param.normalization
    if loss_param.HasField("normalize"):
        return LossParameter.VALID if loss_param.normalize else LossParameter.BATCH_SIZE
    return default


def normalizer(mode, outer, inner, valid_count):
    """Caffe's get_normalizer: what a summed loss is divided by, never less than 1."""
    n = {LossParameter.FULL: outer * inner, LossParameter.VALID: valid_count,
         LossParameter.BATCH_SIZE: outer, LossParameter.NONE: 1}[mode]
    return max(1.0, float(n))


def sigmoid(x):
    """1 / (1 + exp(-x)) in a form that cannot overflow."""
    return 0.5 * np.tanh(0.5 * x) + 0.5


def ignore_label_of(loss_param):
    return loss_param.ignore_label if loss_param.HasField("ignore_label") else None


def loss_weight(top):
    """The loss weight Net put in the loss top's diff (Caffe reads it there at backward time)."""
    return float(top[0].cpu_diff().reshape(-1)[0])


def _check_host_labels(layer, labels_blob, num_classes, ignore_label):
    """Raise the CPU path's error for a label out of range where the labels' host copy is current (data layers
    write them there), without a transfer; labels made on the device give a NaN loss instead."""
    if labels_blob.memory.head != HEAD_AT_GPU:
        _read_labels(layer, labels_blob, num_classes, ignore_label)


def _device_loss(layer, top, total, terms, counts, n, count_on_device, normalizer):
    """Write a loss top on the device: total(terms) divided by `normalizer`, or, with count_on_device, by the
    sum of `counts` (at least 1), also left on the device. Returns the valid count for backward: a number, or
    a device array of one value."""
    out = top.mutable_gpu_data()
    if not count_on_device:
        total(terms, n=n, out=out, scale=1.0 / normalizer)
        return normalizer
    valid = opencl.asum(counts, n=n, out=opencl.scratch(layer, "valid_count", 1))
    total(terms, n=n, out=out)
    _DIVIDE_BY_COUNT(out, out, valid)
    return valid


def _gradient_scale(top, normalizer):
    """The kernel arguments (scale, count buffer, its offset, whether to divide by it) giving backward's
    loss_weight / normalizer, where the normalizer may be a device count (see _device_loss)."""
    if isinstance(normalizer, (int, float)):
        return (float(loss_weight(top) / normalizer), *opencl.device_args(top[0].gpu_diff()), 0)
    return (float(loss_weight(top)), *opencl.device_args(normalizer), 1)


def refuse_label_backward(layer, propagate_down, what="label inputs", index=1):
    if len(propagate_down) > index and propagate_down[index]:
        raise KaffeError(f"{layer.type} layer '{layer.name}' cannot backpropagate to {what}")


def _ones(owner, n):
    """A device vector of at least n ones, kept on `owner` (sums as dot products with it)."""
    ones = opencl.scratch(owner, "ones", n)
    if owner.__dict__.get("_ones_filled", 0) < ones.size:
        opencl.fill(ones, 1.0)
        owner._ones_filled = ones.size
    return ones


_DIVIDE_BY_COUNT = opencl.elementwise_kernel("divide_by_count", lambda t, c, p, ops: t / ops.maximum(c, 1.0),
                                             ("t", "c"))
_SUBTRACT = opencl.elementwise_kernel("subtract", lambda a, b, p, ops: a - b, ("a", "b"))
_SQUARE = opencl.elementwise_kernel("square", lambda a, p, ops: a * a, ("a",))


def _class_axis_split(layer, scores, labels, axis):
    """Canonical class axis, and (outer, classes, inner) sizes; the labels must number outer * inner."""
    axis = axis_index(layer, scores, axis)
    outer, inner = scores.count_axes(0, axis), scores.count_axes(axis + 1)
    if outer * inner != labels.count:
        raise KaffeError(f"{layer.type} layer '{layer.name}': number of labels must match number of predictions; "
                         f"predictions {shape_text(scores.shape)} with class axis {axis} need {outer * inner} "
                         f"labels (e.g. N*H*W for axis 1 of N,C,H,W), got {labels.count} "
                         f"(labels {shape_text(labels.shape)})")
    return axis, (outer, scores.shape[axis], inner)


def _read_labels(layer, labels_blob, num_classes, ignore_label):
    """Integer labels shaped (outer, inner), as Caffe's static_cast<int>, and the mask of those not ignored."""
    labels = labels_blob.cpu_data().reshape(-1).astype(np.int64)
    valid = labels != ignore_label if ignore_label is not None else np.ones(labels.shape, dtype=bool)
    bad = valid & ((labels < 0) | (labels >= num_classes))
    if bad.any():
        raise KaffeError(f"{layer.type} layer '{layer.name}': label {labels[bad][0]} is outside [0, {num_classes}) "
                         f"for predictions with {num_classes} classes")
    return labels, valid


def _pick(values, labels):
    """values (outer, C, inner), labels (outer, inner) in range -> values at each label, (outer, inner)."""
    return np.take_along_axis(values, labels[:, None, :], axis=1)[:, 0, :]


@register_layer("SoftmaxWithLoss")
class SoftmaxWithLossLayer(LossLayer):
    """Softmax over softmax_param.axis, then the mean (per loss_param's normalization) of -log p(label).

    An optional second top gives the probabilities.
    """
    exact_num_top_blobs = None
    min_top_blobs = 1
    max_top_blobs = 2

    def layer_setup(self, bottom, top):
        loss_param = self.layer_param.loss_param
        self.ignore_label = ignore_label_of(loss_param)
        self.normalization = normalization_mode(loss_param, loss_param.normalization)
        self.prob = Blob()
        self.valid_count = None  # the GPU forward's count of labels not ignored, for its backward

    def reshape(self, bottom, top):
        self.check_num_matches(bottom)
        self.axis, self.dims = _class_axis_split(self, bottom[0], bottom[1], self.layer_param.softmax_param.axis)
        top[0].reshape(())
        self.prob.reshape_like(bottom[0])
        if len(top) == 2:
            top[1].reshape_like(bottom[0])

    def normalizer(self, valid_count):
        outer, _, inner = self.dims
        return normalizer(self.normalization, outer, inner, valid_count)

    def forward_cpu(self, bottom, top):
        prob = softmax(bottom[0].cpu_data(), self.axis)
        self.prob.mutable_cpu_data()[...] = prob
        labels, valid = _read_labels(self, bottom[1], self.dims[1], self.ignore_label)
        picked = _pick(prob.reshape(self.dims), np.where(valid, labels, 0).reshape(self.dims[0], self.dims[2]))
        losses = -np.log(np.maximum(picked.reshape(-1)[valid], FLT_MIN))
        top[0].mutable_cpu_data()[...] = losses.sum(dtype=np.float64) / self.normalizer(int(valid.sum()))
        if len(top) == 2:
            top[1].share_data(self.prob)

    def _propagates(self, propagate_down):
        if propagate_down[1]:
            raise KaffeError(f"SoftmaxWithLoss layer '{self.name}' cannot backpropagate to label inputs")
        return propagate_down[0]

    def backward_cpu(self, top, propagate_down, bottom):
        if not self._propagates(propagate_down):
            return
        outer, _, inner = self.dims
        labels, valid = _read_labels(self, bottom[1], self.dims[1], self.ignore_label)
        index = np.where(valid, labels, 0).reshape(outer, 1, inner)
        dx = self.prob.cpu_data().reshape(self.dims).copy()
        np.put_along_axis(dx, index, np.take_along_axis(dx, index, axis=1) - 1, axis=1)
        dx *= valid.reshape(outer, 1, inner)  # ignored positions get no gradient
        dx *= np.float32(top[0].cpu_diff().reshape(-1)[0] / self.normalizer(int(valid.sum())))
        bottom[0].mutable_cpu_diff()[...] = dx.reshape(bottom[0].shape)

    def _label_args(self):
        return self.ignore_label is not None, self.ignore_label or 0

    def forward_gpu(self, bottom, top):
        """The loss stays on the device; with VALID normalization and an ignore_label, so does the count of
        valid labels, which divides it here and scales the gradient in backward."""
        outer, channels, inner = self.dims
        _check_host_labels(self, bottom[1], channels, self.ignore_label)
        x = bottom[0].gpu_data()
        prob = self.prob.mutable_gpu_data()
        count_on_device = self.normalization == LossParameter.VALID and self.ignore_label is not None
        if outer * inner <= opencl.REDUCE_GROUP and not count_on_device:   # one work-group does it all
            self.valid_count = self.normalizer(outer * inner)
            slot = self.weighted_loss_slot()
            out = top[0].mutable_gpu_data()
            opencl.kernel(SOFTMAX_LOSS_SUM, "softmax_loss_forward_sum", SOFTMAX_LOSS_SUM_DEFINES)(
                opencl.queue(), (opencl.REDUCE_GROUP,), (opencl.REDUCE_GROUP,), outer * inner,
                *opencl.device_args(x), *opencl.device_args(prob), *opencl.device_args(bottom[1].gpu_data()),
                *opencl.device_args(out), channels, inner, *self._label_args(), 1.0 / self.valid_count,
                *opencl.device_args(out if slot is None else slot), *opencl.device_args(top[0].gpu_diff()),
                int(slot is not None))
            if slot is not None:
                self.wrote_weighted_loss()
            if len(top) == 2:
                top[1].share_data(self.prob)
            return
        softmax_gpu(x, prob, self.dims)
        losses, counts = opencl.scratch(self, "losses", outer * inner), opencl.scratch(self, "counts", outer * inner)
        opencl.launch(KERNELS, "softmax_loss_forward", outer * inner, *opencl.device_args(prob),
                      *opencl.device_args(bottom[1].gpu_data()), losses.data, counts.data, channels, inner,
                      *self._label_args())
        self.valid_count = _device_loss(self, top[0], opencl.asum, losses, counts, outer * inner,  # losses >= 0
                                        count_on_device, self.normalizer(outer * inner))
        if len(top) == 2:
            top[1].share_data(self.prob)

    def backward_gpu(self, top, propagate_down, bottom):
        if not self._propagates(propagate_down):
            return
        _, channels, inner = self.dims
        prob, labels = self.prob.gpu_data(), bottom[1].gpu_data()
        opencl.launch(KERNELS, "softmax_loss_backward", bottom[0].count, *opencl.device_args(prob),
                      *opencl.device_args(labels), *opencl.device_args(bottom[0].mutable_gpu_diff()), channels, inner,
                      *self._label_args(), *_gradient_scale(top, self.valid_count))


@register_layer("Accuracy")
class AccuracyLayer(Layer):
    """Top-k accuracy along accuracy_param.axis; an optional second top gives the accuracy of each class.

    As in Caffe, a label is right when fewer than top_k other classes score at least as high: ties count as wrong.
    """
    exact_num_bottom_blobs = 2
    min_top_blobs = 1
    max_top_blobs = 2

    def layer_setup(self, bottom, top):
        param = self.layer_param.accuracy_param
        self.top_k = param.top_k
        self.ignore_label = param.ignore_label if param.HasField("ignore_label") else None

    def reshape(self, bottom, top):
        _, self.dims = _class_axis_split(self, bottom[0], bottom[1], self.layer_param.accuracy_param.axis)
        if self.top_k > self.dims[1]:
            raise KaffeError(f"Accuracy layer '{self.name}': top_k ({self.top_k}) must be less than or equal to "
                             f"the number of classes ({self.dims[1]}, predictions {shape_text(bottom[0].shape)})")
        top[0].reshape(())
        if len(top) == 2:
            top[1].reshape((self.dims[1],))

    def forward_cpu(self, bottom, top):
        outer, classes, inner = self.dims
        scores = bottom[0].cpu_data().reshape(self.dims)
        labels, valid = _read_labels(self, bottom[1], classes, self.ignore_label)
        labels = np.where(valid, labels, 0)
        true_score = _pick(scores, labels.reshape(outer, inner))
        # the true class itself is among those scoring >= its score
        at_least_as_high = (scores >= true_score[:, None, :]).sum(axis=1).reshape(-1)
        correct = valid & (at_least_as_high - 1 < self.top_k)
        count = int(valid.sum())
        top[0].mutable_cpu_data()[...] = correct.sum() / count if count else 0.0
        if len(top) == 2:
            totals = np.bincount(labels[valid], minlength=classes)
            hits = np.bincount(labels[correct], minlength=classes)
            top[1].mutable_cpu_data()[...] = np.where(totals > 0, hits / np.maximum(totals, 1), 0.0)

    # Accuracy stays on the host in GPU mode: it reads back only its bottoms (scores and labels, small next to
    # a net's activations), once per test iteration; called explicitly to skip the fallback warning.
    def forward_gpu(self, bottom, top):
        self.forward_cpu(bottom, top)

    def backward_gpu(self, top, propagate_down, bottom):
        self.backward_cpu(top, propagate_down, bottom)

    def allow_force_backward(self, bottom_index):
        return False  # force_backward must not ask a metric for gradients it cannot give

    def backward_cpu(self, top, propagate_down, bottom):
        if any(propagate_down):
            raise KaffeError(f"Accuracy layer '{self.name}' has no backward; it cannot propagate to its bottoms")


@register_layer("SigmoidCrossEntropyLoss")
class SigmoidCrossEntropyLossLayer(LossLayer):
    """-[t log s(x) + (1 - t) log(1 - s(x))] summed over every value, in the overflow-free form
    log(1 + exp(-|x|)) - x (t - [x >= 0]); values whose target (as an int) is ignore_label count nothing.

    Normalized per loss_param (default BATCH_SIZE: the first axis; VALID counts the values not ignored).
    """

    def layer_setup(self, bottom, top):
        loss_param = self.layer_param.loss_param
        self.ignore_label = ignore_label_of(loss_param)
        self.normalization = normalization_mode(loss_param, LossParameter.BATCH_SIZE)
        self.sigmoid = Blob()
        self.valid_count = None

    def reshape(self, bottom, top):
        self.check_num_matches(bottom)
        if bottom[0].count != bottom[1].count:
            raise KaffeError(f"SigmoidCrossEntropyLoss layer '{self.name}': inputs must have the same count; "
                             f"predictions {bottom[0].shape_string()}, targets {bottom[1].shape_string()}")
        self.outer, self.inner = bottom[0].shape[0], bottom[0].count_axes(1)
        top[0].reshape(())
        self.sigmoid.reshape_like(bottom[0])

    def _valid(self, target):
        if self.ignore_label is None:
            return None
        return target.astype(np.int64) != self.ignore_label  # Caffe compares static_cast<int>(target)

    def forward_cpu(self, bottom, top):
        x, t = bottom[0].cpu_data(), bottom[1].cpu_data().reshape(bottom[0].shape)  # same count, any shape
        self.sigmoid.mutable_cpu_data()[...] = sigmoid(x)
        positive = (x >= 0).astype(np.float32)
        losses = np.log1p(np.exp(-np.abs(x))) - x * (t - positive)
        valid = self._valid(t)
        if valid is not None:
            losses = losses[valid]
        self.valid_count = losses.size
        total = losses.sum(dtype=np.float64)
        top[0].mutable_cpu_data()[...] = total / normalizer(self.normalization, self.outer, self.inner,
                                                            self.valid_count)

    def backward_cpu(self, top, propagate_down, bottom):
        refuse_label_backward(self, propagate_down)
        if not propagate_down[0]:
            return
        t = bottom[1].cpu_data().reshape(bottom[0].shape)
        dx = self.sigmoid.cpu_data() - t
        valid = self._valid(t)
        if valid is not None:
            dx *= valid
        scale = loss_weight(top) / normalizer(self.normalization, self.outer, self.inner, self.valid_count)
        bottom[0].mutable_cpu_diff()[...] = dx * np.float32(scale)

    def _label_args(self):
        return self.ignore_label is not None, self.ignore_label or 0

    def forward_gpu(self, bottom, top):
        n = bottom[0].count
        losses, counts = opencl.scratch(self, "losses", n), opencl.scratch(self, "counts", n)
        opencl.launch(KERNELS, "sigmoid_ce_forward", n, *opencl.device_args(bottom[0].gpu_data()),
                      *opencl.device_args(bottom[1].gpu_data()), losses.data, counts.data,
                      *opencl.device_args(self.sigmoid.mutable_gpu_data()), *self._label_args())
        ones = _ones(self, n)

        def total(terms, n, out, scale=1.0):   # a true sum: targets outside [0, 1] may give negative terms
            return opencl.dot(terms, ones, n=n, out=out, scale=scale)
        self.valid_count = _device_loss(
            self, top[0], total, losses, counts, n,
            self.normalization == LossParameter.VALID and self.ignore_label is not None,
            normalizer(self.normalization, self.outer, self.inner, n))

    def backward_gpu(self, top, propagate_down, bottom):
        refuse_label_backward(self, propagate_down)
        if not propagate_down[0]:
            return
        opencl.launch(KERNELS, "sigmoid_ce_backward", bottom[0].count, *opencl.device_args(self.sigmoid.gpu_data()),
                      *opencl.device_args(bottom[1].gpu_data()), *opencl.device_args(bottom[0].mutable_gpu_diff()),
                      *self._label_args(), *_gradient_scale(top, self.valid_count))


@register_layer("EuclideanLoss")
class EuclideanLossLayer(LossLayer):
    """sum((a - b)^2) / (2 N), N the first axis; both inputs get gradients (+-(a - b) / N)."""

    def layer_setup(self, bottom, top):
        self.difference = Blob()

    def reshape(self, bottom, top):
        self.check_num_matches(bottom)
        if bottom[0].count_axes(1) != bottom[1].count_axes(1):
            raise KaffeError(f"EuclideanLoss layer '{self.name}': inputs must have the same dimension; "
                             f"got {bottom[0].shape_string()} and {bottom[1].shape_string()}")
        top[0].reshape(())
        self.difference.reshape_like(bottom[0])

    def allow_force_backward(self, bottom_index):
        return True

    def forward_cpu(self, bottom, top):
        d = self.difference.mutable_cpu_data()
        np.subtract(bottom[0].cpu_data(), bottom[1].cpu_data().reshape(d.shape), out=d)
        top[0].mutable_cpu_data()[...] = np.dot(d.ravel(), d.ravel()) / bottom[0].shape[0] / 2

    def backward_cpu(self, top, propagate_down, bottom):
        for i, sign in ((0, 1.0), (1, -1.0)):
            if propagate_down[i]:
                alpha = np.float32(sign * loss_weight(top) / bottom[i].shape[0])
                bottom[i].mutable_cpu_diff()[...] = (alpha * self.difference.cpu_data()).reshape(bottom[i].shape)

    def forward_gpu(self, bottom, top):
        d = self.difference.mutable_gpu_data()
        _SUBTRACT(d, bottom[0].gpu_data(), bottom[1].gpu_data())
        opencl.sumsq(d, out=top[0].mutable_gpu_data(), scale=0.5 / bottom[0].shape[0])

    def backward_gpu(self, top, propagate_down, bottom):
        for i, sign in ((0, 1.0), (1, -1.0)):
            if propagate_down[i]:
                opencl.scale(sign * loss_weight(top) / bottom[i].shape[0], self.difference.gpu_data(),
                             out=bottom[i].mutable_gpu_diff())


def _sample_labels(layer, labels_blob, dim):
    """One integer label per sample (static_cast<int>), each in [0, dim)."""
    labels = labels_blob.cpu_data().reshape(-1).astype(np.int64)
    bad = (labels < 0) | (labels >= dim)
    if bad.any():
        raise KaffeError(f"{layer.type} layer '{layer.name}': label {labels[bad][0]} is outside [0, {dim}) "
                         f"for predictions with {dim} values per sample")
    return labels


def _check_one_label_per_sample(layer, bottom):
    layer.check_num_matches(bottom)
    labels = bottom[1]
    if labels.num_axes > 4 or labels.count != labels.shape[0]:
        raise KaffeError(f"{layer.type} layer '{layer.name}': the labels must be one value per sample "
                         f"(N or N x 1 x 1 x 1), got {labels.shape_string()}")


@register_layer("MultinomialLogisticLoss")
class MultinomialLogisticLossLayer(LossLayer):
    """-log(max(p[label], 1e-20)) averaged over the samples; bottom[0] holds probabilities (N x dim)."""

    def reshape(self, bottom, top):
        _check_one_label_per_sample(self, bottom)
        top[0].reshape(())

    def _picked(self, bottom):
        num = bottom[0].shape[0]
        probs = bottom[0].cpu_data().reshape(num, -1)
        labels = _sample_labels(self, bottom[1], probs.shape[1])
        return num, labels, np.maximum(probs[np.arange(num), labels], np.float32(LOG_THRESHOLD))

    def forward_cpu(self, bottom, top):
        num, _, picked = self._picked(bottom)
        top[0].mutable_cpu_data()[...] = -np.log(picked).sum(dtype=np.float64) / num

    def backward_cpu(self, top, propagate_down, bottom):
        refuse_label_backward(self, propagate_down)
        if not propagate_down[0]:
            return
        num, labels, picked = self._picked(bottom)
        diff = bottom[0].mutable_cpu_diff().reshape(num, -1)
        diff[...] = 0
        diff[np.arange(num), labels] = np.float32(-loss_weight(top) / num) / picked


@register_layer("InfogainLoss")
class InfogainLossLayer(LossLayer):
    """Softmax over infogain_loss_param.axis, then -sum_k H[label, k] log(max(p_k, 1e-20)) per position,
    normalized per loss_param (default VALID); H (classes x classes) is bottom[2] or the binaryproto `source`.

    An optional second top gives the probabilities.
    """
    exact_num_bottom_blobs = None
    min_bottom_blobs = 2
    max_bottom_blobs = 3
    exact_num_top_blobs = None
    min_top_blobs = 1
    max_top_blobs = 2

    def layer_setup(self, bottom, top):
        loss_param = self.layer_param.loss_param
        if loss_param.HasField("normalize"):
            raise KaffeError(f"InfogainLoss layer '{self.name}': loss_param.normalize is deprecated and not "
                             f"accepted here; use normalization")
        self.ignore_label = ignore_label_of(loss_param)
        self.normalization = loss_param.normalization
        self.prob = Blob()
        self.stored_h = None
        if len(bottom) < 3:
            source = self.layer_param.infogain_loss_param.source
            if not source:
                raise KaffeError(f"InfogainLoss layer '{self.name}': the infogain matrix needs "
                                 f"infogain_loss_param.source (a binaryproto) or a third bottom")
            self.stored_h = Blob()
            self.stored_h.from_proto(read_binary_proto(source, caffe_pb2.BlobProto()))

    def reshape(self, bottom, top):
        self.check_num_matches(bottom)
        self.axis, self.dims = _class_axis_split(self, bottom[0], bottom[1],
                                                 self.layer_param.infogain_loss_param.axis)
        classes = self.dims[1]
        h = self._h_blob(bottom)
        if h.count != classes * classes:
            raise KaffeError(f"InfogainLoss layer '{self.name}': the infogain matrix has {h.count} values "
                             f"({h.shape_string()}); {classes} classes need {classes} x {classes}")
        top[0].reshape(())
        self.prob.reshape_like(bottom[0])
        if len(top) == 2:
            top[1].reshape_like(bottom[0])

    def _h_blob(self, bottom):
        return bottom[2] if len(bottom) == 3 else self.stored_h

    def _terms(self, bottom):
        """(probabilities (outer, C, inner), H (C, C), labels (outer, inner) with ignored ones at 0, valid mask)."""
        outer, classes, inner = self.dims
        prob = self.prob.cpu_data().reshape(self.dims)
        h = self._h_blob(bottom).cpu_data().reshape(classes, classes)
        labels, valid = _read_labels(self, bottom[1], classes, self.ignore_label)
        return prob, h, np.where(valid, labels, 0).reshape(outer, inner), valid.reshape(outer, inner)

    def forward_cpu(self, bottom, top):
        self.prob.mutable_cpu_data()[...] = softmax(bottom[0].cpu_data(), self.axis)
        prob, h, labels, valid = self._terms(bottom)
        log_p = np.log(np.maximum(prob, np.float32(LOG_THRESHOLD)))  # (outer, C, inner)
        weights = np.moveaxis(h[labels], -1, 1)  # H's row of each position's label: (outer, C, inner)
        per_position = -(weights.astype(np.float64) * log_p).sum(axis=1)
        count = int(valid.sum())
        top[0].mutable_cpu_data()[...] = per_position[valid].sum() / self._normalizer(count)
        if len(top) == 2:
            top[1].share_data(self.prob)

    def _normalizer(self, valid_count):
        outer, _, inner = self.dims
        return normalizer(self.normalization, outer, inner, valid_count)

    def backward_cpu(self, top, propagate_down, bottom):
        refuse_label_backward(self, propagate_down)
        refuse_label_backward(self, propagate_down, "the infogain matrix input", index=2)
        if not propagate_down[0]:
            return
        prob, h, labels, valid = self._terms(bottom)
        row_sums = h.sum(axis=1)
        dx = prob * row_sums[labels][:, None, :] - np.moveaxis(h[labels], -1, 1)
        dx *= valid[:, None, :]
        dx *= np.float32(loss_weight(top) / self._normalizer(int(valid.sum())))
        bottom[0].mutable_cpu_diff()[...] = dx.reshape(bottom[0].shape)

    def allow_force_backward(self, bottom_index):
        return bottom_index == 0


@register_layer("HingeLoss")
class HingeLossLayer(LossLayer):
    """One-vs-all hinge: with s = -1 at the label and +1 elsewhere, sum(max(0, 1 + s x)) / N (L1) or
    sum(max(0, 1 + s x)^2) / N (L2); bottom[0] is N x dim."""

    def layer_setup(self, bottom, top):
        self.norm = self.layer_param.hinge_loss_param.norm
        self.margins = Blob()

    def reshape(self, bottom, top):
        _check_one_label_per_sample(self, bottom)
        top[0].reshape(())
        self.margins.reshape_like(bottom[0])

    def _signed(self, bottom):
        num = bottom[0].shape[0]
        sign = np.ones((num, bottom[0].count // num), dtype=np.float32)
        sign[np.arange(num), _sample_labels(self, bottom[1], sign.shape[1])] = -1
        return sign

    def forward_cpu(self, bottom, top):
        num = bottom[0].shape[0]
        m = self.margins.mutable_cpu_data().reshape(num, -1)
        np.maximum(0, 1 + self._signed(bottom) * bottom[0].cpu_data().reshape(num, -1), out=m)
        l1 = self.norm == caffe_pb2.HingeLossParameter.L1
        total = m.sum(dtype=np.float64) if l1 else np.dot(m.ravel(), m.ravel())
        top[0].mutable_cpu_data()[...] = total / num

    def backward_cpu(self, top, propagate_down, bottom):
        refuse_label_backward(self, propagate_down)
        if not propagate_down[0]:
            return
        num = bottom[0].shape[0]
        g = self.margins.cpu_data().reshape(num, -1) * self._signed(bottom)
        if self.norm == caffe_pb2.HingeLossParameter.L1:
            g = np.sign(g) * np.float32(loss_weight(top) / num)
        else:
            g = g * np.float32(2 * loss_weight(top) / num)
        bottom[0].mutable_cpu_diff()[...] = g.reshape(bottom[0].shape)


@register_layer("ContrastiveLoss")
class ContrastiveLossLayer(LossLayer):
    """Siamese loss over pairs (a_i, b_i) with similarity y_i (as an int: nonzero = similar), d = ||a - b||:
    sum(y d^2 + (1 - y) max(margin - d, 0)^2) / 2N, or with legacy_version max(margin - d^2, 0) for the
    dissimilar pairs. Both feature inputs get gradients."""
    exact_num_bottom_blobs = 3

    def layer_setup(self, bottom, top):
        p = self.layer_param.contrastive_loss_param
        self.margin, self.legacy = p.margin, p.legacy_version
        a, b, y = bottom
        for blob in (a, b, y):
            if blob.num_axes > 4:
                raise KaffeError(f"ContrastiveLoss layer '{self.name}': inputs have at most 4 axes, got "
                                 f"{blob.shape_string()}")
        if a.channels != b.channels or (a.height, a.width, b.height, b.width) != (1, 1, 1, 1):
            raise KaffeError(f"ContrastiveLoss layer '{self.name}': the two feature inputs must be N x C "
                             f"(x 1 x 1) with the same C; got {a.shape_string()} and {b.shape_string()}")
        if (y.channels, y.height, y.width) != (1, 1, 1):
            raise KaffeError(f"ContrastiveLoss layer '{self.name}': the similarity input must hold one value "
                             f"per pair, got {y.shape_string()}")
        self.difference, self.dist_sq, self.diff_sq = Blob(), Blob(), Blob()

    def reshape(self, bottom, top):
        self.check_num_matches(bottom)
        if bottom[2].shape[0] != bottom[0].shape[0]:
            raise KaffeError(f"ContrastiveLoss layer '{self.name}': {bottom[0].shape[0]} pairs but "
                             f"{bottom[2].shape[0]} similarity labels")
        self.num, self.channels = bottom[0].shape[0], bottom[0].channels
        top[0].reshape(())
        self.difference.reshape((self.num, self.channels))
        self.diff_sq.reshape((self.num, self.channels))
        self.dist_sq.reshape((self.num,))

    def allow_force_backward(self, bottom_index):
        return bottom_index != 2

    def forward_cpu(self, bottom, top):
        d = self.difference.mutable_cpu_data()
        np.subtract(bottom[0].cpu_data().reshape(d.shape), bottom[1].cpu_data().reshape(d.shape), out=d)
        dist_sq = self.dist_sq.mutable_cpu_data()
        dist_sq[...] = np.einsum("ij,ij->i", d, d)
        similar = bottom[2].cpu_data().reshape(-1).astype(np.int64) != 0
        if self.legacy:
            dissimilar = np.maximum(self.margin - dist_sq, 0)
        else:
            dissimilar = np.maximum(self.margin - np.sqrt(dist_sq), 0) ** 2
        total = np.where(similar, dist_sq, dissimilar).sum(dtype=np.float64)
        top[0].mutable_cpu_data()[...] = total / self.num / 2

    def backward_cpu(self, top, propagate_down, bottom):
        refuse_label_backward(self, propagate_down, "the similarity input", index=2)
        similar = bottom[2].cpu_data().reshape(-1).astype(np.int64) != 0
        dist_sq = self.dist_sq.cpu_data()
        if self.legacy:
            mdist = self.margin - dist_sq
            factor = np.float32(-1)
        else:
            dist = np.sqrt(dist_sq)
            mdist = self.margin - dist
            factor = -mdist / (dist + np.float32(1e-4))
        # per pair, the multiple of alpha (a - b) each input's gradient is
        coeff = np.where(similar, 1.0, np.where(mdist > 0, factor, 0.0)).astype(np.float32)
        for i, sign in ((0, 1.0), (1, -1.0)):
            if propagate_down[i]:
                alpha = np.float32(sign * loss_weight(top) / self.num)
                grad = alpha * coeff[:, None] * self.difference.cpu_data()
                bottom[i].mutable_cpu_diff()[...] = grad.reshape(bottom[i].shape)

    def forward_gpu(self, bottom, top):
        n, c = self.num, self.channels
        d = self.difference.mutable_gpu_data()
        _SUBTRACT(d, bottom[0].gpu_data(), bottom[1].gpu_data(), n=n * c)
        _SQUARE(self.diff_sq.mutable_gpu_data(), d)
        opencl.gemm(False, False, n, 1, c, 1.0, self.diff_sq.gpu_data(), _ones(self, c), 0.0,
                    self.dist_sq.mutable_gpu_data())
        terms = opencl.scratch(self, "terms", n)
        opencl.launch(KERNELS, "contrastive_forward", n, *opencl.device_args(self.dist_sq.gpu_data()),
                      *opencl.device_args(bottom[2].gpu_data()), terms.data, float(self.margin), int(self.legacy))
        opencl.asum(terms, n=n, out=top[0].mutable_gpu_data(), scale=0.5 / n)  # every term is >= 0

    def backward_gpu(self, top, propagate_down, bottom):
        refuse_label_backward(self, propagate_down, "the similarity input", index=2)
        for i, sign in ((0, 1.0), (1, -1.0)):
            if propagate_down[i]:
                opencl.launch(KERNELS, "contrastive_backward", self.num * self.channels, self.channels,
                              *opencl.device_args(self.difference.gpu_data()),
                              *opencl.device_args(self.dist_sq.gpu_data()), *opencl.device_args(bottom[2].gpu_data()),
                              *opencl.device_args(bottom[i].mutable_gpu_diff()), float(self.margin),
                              int(self.legacy), float(sign * loss_weight(top) / self.num))
