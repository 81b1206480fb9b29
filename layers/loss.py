"""Loss layers (SoftmaxWithLoss) and Accuracy, which takes the same (scores, labels) bottoms."""
import math

import numpy as np

from ..engine.blob import Blob
from ..engine import opencl
from ..engine.errors import KaffeError
from ..engine.layer import Layer, LossLayer, register_layer
from ..proto import caffe_pb2
from .common import axis_index, shape_text, softmax, softmax_gpu

FLT_MIN = np.finfo(np.float32).tiny
LossParameter = caffe_pb2.LossParameter


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
        self.ignore_label = loss_param.ignore_label if loss_param.HasField("ignore_label") else None
        # the deprecated `normalize` counts only when `normalization` is unset
        if not loss_param.HasField("normalization") and loss_param.HasField("normalize"):
            self.normalization = LossParameter.VALID if loss_param.normalize else LossParameter.BATCH_SIZE
        else:
            self.normalization = loss_param.normalization
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
        n = {LossParameter.FULL: outer * inner, LossParameter.VALID: valid_count,
             LossParameter.BATCH_SIZE: outer, LossParameter.NONE: 1}[self.normalization]
        return max(1.0, float(n))

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
        """Only the loss sum (and, for VALID with an ignore_label, the valid count) comes back to the host."""
        outer, channels, inner = self.dims
        x = bottom[0].gpu_data()
        prob = self.prob.mutable_gpu_data()
        softmax_gpu(x, prob, self.dims)
        losses, counts = opencl.empty(outer * inner), opencl.empty(outer * inner)
        opencl.launch("layers/loss.cl", "softmax_loss_forward", outer * inner, *opencl.device_args(prob),
               *opencl.device_args(bottom[1].gpu_data()), losses.data, counts.data, channels, inner, *self._label_args())
        total = opencl.asum(losses)  # the losses are >= 0: their asum is their sum
        if math.isnan(total):
            # a label out of range gives NaN; _read_labels raises the CPU path's error for it (a NaN from the
            # scores themselves passes through, as on the CPU)
            _read_labels(self, bottom[1], channels, self.ignore_label)
        if self.normalization == LossParameter.VALID and self.ignore_label is not None:
            self.valid_count = opencl.asum(counts)
        else:
            self.valid_count = outer * inner
        top[0].mutable_cpu_data()[...] = total / self.normalizer(self.valid_count)
        if len(top) == 2:
            top[1].share_data(self.prob)

    def backward_gpu(self, top, propagate_down, bottom):
        if not self._propagates(propagate_down):
            return
        _, channels, inner = self.dims
        scale = np.float32(top[0].cpu_diff().reshape(-1)[0] / self.normalizer(self.valid_count))
        prob, labels = self.prob.gpu_data(), bottom[1].gpu_data()
        opencl.launch("layers/loss.cl", "softmax_loss_backward", bottom[0].count, *opencl.device_args(prob), *opencl.device_args(labels),
               *opencl.device_args(bottom[0].mutable_gpu_diff()), channels, inner, *self._label_args(), scale)


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
