"""The deploy-time graph optimiser: a forward plan for nets that infer (Net(..., optimize=...)).

Levels:
- "none": every layer runs as written (TRAIN nets, `--no-optimize`).
- "safe" (the default for TEST nets built from Python): only rewrites after which every blob in net.blobs holds
  what Caffe holds after forward. A BatchNorm (global statistics) / Scale / Bias chain that works in place on a
  Convolution's or InnerProduct's top (ResNet's conv -> BatchNorm -> Scale, all writing one blob) is folded into
  that layer's weights and bias, TEST-phase Dropout in place, an identity, is skipped, and the CPU forward of
  2-D stride-1 convolutions runs one GEMM per kernel tap instead of im2col (ConvolutionLayer.shifted_taps); a
  ReLU working in place on a convolution's top is applied as the convolution writes it. An in-place chain that
  follows no producer (BatchNorm -> Scale -> ReLU on a block's input in DenseNet) becomes one affine pass.
  Layers that a backward pass would run are left alone.
- "full" (kaffe test, kaffe time --phase TEST, the benchmarks): also folds chains whose intermediate blobs are
  read by nothing else (conv -> bn -> scale writing three blobs), whatever backward would need, fuses an Eltwise
  sum (and the ReLU after it) into the convolution whose top only that sum reads (FusedSum), and runs the
  CPU forward of 3x3 stride-1 convolutions of enough channels by Winograd F(4x4, 3x3)
  (ConvolutionLayer.winograd), which keeps each output within about 1e-5 of its blob's scale rather than within
  float32 rounding of each value; only the inputs, the outputs and the blobs the caller keeps are sure to hold
  their values, and backward is refused.

Folding never touches the parameters users see (net.params, save, snapshots, copy_from): the folded weights live
in a private copy of the layer and are derived again whenever the data version of a source blob changes (a
copy_from, surgery through net.params[...][i].data, a solver's update of weights a TEST net shares).
"""
import numpy as np

from ..layers.neuron import BLOCK, relu
from ..proto import caffe_pb2
from . import device
from .blob import Blob
from .errors import KaffeError
from .layer import Layer, create_layer
from .syncedmem import SyncedMemory

LEVELS = ("none", "safe", "full")
PRODUCERS = ("Convolution", "InnerProduct")


def compose_affine(layers, scale, shift):
    """(scale, shift), float64 per channel, of the map x -> layers(scale * x + shift) for a chain of BatchNorm
    (global statistics), Scale and Bias layers."""
    for layer in layers:
        values = [blob.cpu_data().astype(np.float64).ravel() for blob in layer.blobs]
        if layer.type == "BatchNorm":  # as BatchNormLayer with global statistics
            factor = 0.0 if values[2][0] == 0 else 1 / values[2][0]
            std = np.sqrt(factor * values[1] + float(layer.eps))
            scale, shift = scale / std, (shift - factor * values[0]) / std
        elif layer.type == "Scale":
            scale, shift = scale * values[0], shift * values[0]
            if layer.bias_term:
                shift = shift + values[1]
        else:  # Bias
            shift = shift + values[0]
    return scale, shift


class FoldedAffine:
    """A BatchNorm (global statistics) / Scale / Bias chain that follows no Convolution or InnerProduct (the
    BN -> Scale -> ReLU on the input of DenseNet's and pre-activation ResNets' blocks): composed into one
    per-channel y = a x + c, with the ReLU that works in place after it, if any, in one pass over the data
    (on the CPU; a GPU runs the layers as written). a and c are derived again when a source blob changes."""

    def __init__(self, layers, vecs, relu, channels):
        self.layers, self.vecs, self.relu, self.channels = layers, vecs, relu, channels
        self.sources = [blob for layer in layers for blob in layer.blobs]
        self.versions = self.scale = self.shift = None

    def forward(self, bottom, top):
        if device.mode() == device.GPU:
            return sum(layer.forward(*vecs) for layer, vecs in zip((*self.layers, *self.relu), self.vecs))
        versions = [blob.data_version() for blob in self.sources]
        if versions != self.versions:
            scale, shift = compose_affine(self.layers, np.ones(self.channels), np.zeros(self.channels))
            self.scale, self.shift = scale.astype(np.float32), shift.astype(np.float32)
            self.versions = versions
        top[0].reshape(bottom[0].shape)
        num = bottom[0].shape[0]
        x = bottom[0].cpu_data().reshape(num, self.channels, -1)
        y = top[0].mutable_cpu_data().reshape(num, self.channels, -1)
        step = max(1, BLOCK // x.shape[2])
        for n in range(num):   # blocks of one sample's channels, each finished while in the cache
            for first in range(0, self.channels, step):
                block = y[n, first:first + step]
                np.multiply(x[n, first:first + step], self.scale[first:first + step, None], out=block)
                block += self.shift[first:first + step, None]
                if self.relu:
                    relu(block, block)
        return 0.0


class FoldedProducer:
    """A Convolution or InnerProduct whose weights and bias have the per-channel affine maps of the BatchNorm,
    Scale and Bias layers after it folded in: y = a * (W x + b) + c becomes (a W) x + (a b + c)."""

    def __init__(self, producer, followers, bottom, top):
        self.producer, self.followers = producer, followers
        param = caffe_pb2.LayerParameter()
        param.CopyFrom(producer.layer_param)
        del param.blobs[:]
        getattr(param, "convolution_param" if producer.type == "Convolution" else "inner_product_param") \
            .bias_term = True
        self.channels = producer.num_output
        self.layer = create_layer(param)
        # the blobs exist before set-up, so no filler draws random numbers (the RNG stream stays the net's)
        self.layer.blobs = [Blob(producer.blobs[0].shape), Blob((self.channels,))]
        self.layer.setup(bottom, top)
        self.layer.needs_backward = False
        self.sources = [blob for layer in (producer, *followers) for blob in layer.blobs]
        self.versions = None

    def _fold(self):
        producer = self.producer
        weight = producer.blobs[0].cpu_data().astype(np.float64)
        shift = (producer.blobs[1].cpu_data().astype(np.float64) if producer.bias_term
                 else np.zeros(self.channels))
        scale, shift = compose_affine(self.followers, np.ones(self.channels), shift)
        transposed = producer.type == "InnerProduct" and producer.transpose  # weights (K, num_output)
        per_output = scale.reshape((1, -1) if transposed else (-1,) + (1,) * (weight.ndim - 1))
        self.layer.blobs[0].mutable_cpu_data()[...] = weight * per_output
        self.layer.blobs[1].mutable_cpu_data()[...] = shift

    def forward(self, bottom, top):
        versions = [blob.data_version() for blob in self.sources]
        if versions != self.versions:
            self._fold()
            self.versions = versions
        return self.layer.forward(bottom, top)


class FusedReLU:
    """A Convolution step (as written or folded) whose top a ReLU with negative_slope 0 then rewrites in place:
    on the CPU the convolution applies the ReLU while it writes its top (ConvolutionLayer.fused_relu), which
    saves a pass over it; on a GPU both run as written. The flag is set only while this step runs, so the
    layer's own forward (a range that cuts the step, an unoptimised net) is unchanged."""

    def __init__(self, runner, convolution, relu, relu_vecs):
        self.runner, self.convolution, self.relu, self.relu_vecs = runner, convolution, relu, relu_vecs

    def forward(self, bottom, top):
        if device.mode() == device.GPU:
            return self.runner.forward(bottom, top) + self.relu.forward(*self.relu_vecs)
        self.convolution.fused_relu = True
        try:
            return self.runner.forward(bottom, top)
        finally:
            self.convolution.fused_relu = False


class FusedSum:
    """A Convolution step (as written or folded) whose one top only an Eltwise SUM of two bottoms with
    coefficients 1 reads, with the ReLU working in place on the sum, if any (ResNet's branch2c + shortcut + ReLU).
    Full level, CPU: the convolution writes the sum's top itself, adding the other bottom (and applying the ReLU)
    in the pass that adds its bias (ConvolutionLayer.fused_residual), so the sum and the ReLU take no pass of their
    own and the convolution's own top is never written; the same values (the sum of two is either order). Where
    its forward has no such pass (depthwise, Winograd, shifted taps) and on a GPU the layers run as written."""

    def __init__(self, runner, convolution, runner_vecs, other, layers, layer_vecs):
        self.runner, self.convolution, self.runner_vecs, self.other = runner, convolution, runner_vecs, other
        self.layers, self.layer_vecs = layers, layer_vecs   # the Eltwise (and the ReLU) as written

    def forward(self, bottom, top):
        convolution = self.convolution
        if device.mode() == device.GPU or not convolution.writes_top_after_gemm():
            loss = self.runner.forward(*self.runner_vecs)
            return loss + sum(layer.forward(*vecs) for layer, vecs in zip(self.layers, self.layer_vecs))
        convolution.fused_residual = self.other.cpu_data()
        convolution.fused_relu = len(self.layers) > 1
        try:
            return self.runner.forward(bottom, top)
        finally:
            convolution.fused_residual, convolution.fused_relu = None, False


def _affine_channels(layer, bottom):
    """The channel count of a BatchNorm (global statistics) / Scale / Bias layer that maps each channel (axis 1)
    of its one bottom affinely with learned values, else None."""
    if len(layer.layer_param.bottom) != 1:
        return None
    if layer.type == "BatchNorm":
        return layer.channels if layer.use_global_stats else None
    if layer.type in ("Scale", "Bias"):
        outer, channels, _ = layer.dims
        if outer == bottom.shape[0] and all(b.count == channels for b in layer.blobs):
            return channels
    return None


class ForwardPlan:
    """The steps of an optimised forward: (first layer, last layer, what runs: a layer, a FoldedProducer, a
    FoldedAffine, a FusedReLU, or None for a skipped identity)."""

    def __init__(self, net, level, keep=()):
        self.net, self.level = net, level
        kept = set(net.inputs) | set(net.outputs) | set(keep)
        readers = {}
        for bottom_ids in net.bottom_ids:
            for blob_id in bottom_ids:
                readers[blob_id] = readers.get(blob_id, 0) + 1
        self.steps = []
        i, count = 0, len(net.layers)
        while i < count:
            last = self._chain_end(i, readers, kept) if net.layers[i].type in PRODUCERS else i
            if last > i:
                runner = FoldedProducer(net.layers[i], net.layers[i + 1:last + 1], net.bottom_vecs[i],
                                        net.top_vecs[last])
            elif self._is_test_dropout_in_place(i):
                runner = None
            elif (chain := self._affine_chain(i, readers, kept)) is not None:
                runner, last = chain
            else:
                runner = net.layers[i]
            computing = runner.layer if isinstance(runner, FoldedProducer) else runner
            if isinstance(computing, Layer) and computing.type == "Convolution" and self._may_rewrite(i):
                computing.shifted_taps = True  # a GEMM per kernel tap, no columns (layers/vision.py)
                computing.winograd = self.level == "full"  # its rounding is not float32's: outputs only
                if self._is_relu_in_place_on(last + 1, last):
                    runner = FusedReLU(runner, computing, net.layers[last + 1],
                                       (net.bottom_vecs[last + 1], net.top_vecs[last + 1]))
                    last += 1
                elif (fused := self._fused_sum(i, last, runner, computing, readers, kept)) is not None:
                    runner, last = fused
            self.steps.append((i, last, runner))
            i = last + 1
        self.folded = [step for step in self.steps if step[0] != step[1]]
        self.shared_bytes = self._share_memory(kept) if level == "full" else 0

    def _may_rewrite(self, layer_id):
        return self.level == "full" or not self.net.layer_need_backward[layer_id]

    def _chain_end(self, first, readers, kept):
        """The last layer of the foldable affine chain after producer `first` (first itself: none)."""
        net = self.net
        if len(net.bottom_ids[first]) != 1 or len(net.top_ids[first]) != 1 or not self._may_rewrite(first):
            return first
        producer = net.layers[first]
        if producer.type == "InnerProduct" and net.bottom_vecs[first][0].canonical_axis_index(
                producer.layer_param.inner_product_param.axis) != 1:
            return first
        return self._affine_run_end(first, producer.num_output, readers, kept)

    def _affine_run_end(self, first, channels, readers, kept):
        """The last of the affine layers (BatchNorm with global statistics, Scale, Bias) of `channels` channels
        that follow layer `first` on its one top, each working in place or, at the full level, on a blob that
        only the next one reads (first itself: none)."""
        net = self.net
        last, blob_id = first, net.top_ids[first][0]
        for j in range(first + 1, len(net.layers)):
            layer = net.layers[j]
            if net.bottom_ids[j] != [blob_id] or len(net.top_ids[j]) != 1 or not self._may_rewrite(j):
                break
            if _affine_channels(layer, net.bottom_vecs[j][0]) != channels:
                break
            top_id = net.top_ids[j][0]
            in_place = top_id == blob_id
            if not in_place and not (self.level == "full" and readers.get(blob_id) == 1
                                     and net.blob_names[blob_id] not in kept):
                break
            last, blob_id = j, top_id
        return last

    def _affine_chain(self, first, readers, kept):
        """A FoldedAffine step (runner, last layer) for the affine chain starting at layer `first`, or None."""
        net = self.net
        layer = net.layers[first]
        if len(net.bottom_ids[first]) != 1 or len(net.top_ids[first]) != 1 or not self._may_rewrite(first):
            return None
        channels = _affine_channels(layer, net.bottom_vecs[first][0])
        if channels is None or net.bottom_vecs[first][0].num_axes < 2:
            return None
        last = self._affine_run_end(first, channels, readers, kept)
        has_relu = self._is_relu_in_place_on(last + 1, last)
        end = last + 1 if has_relu else last
        runner = FoldedAffine(net.layers[first:last + 1], list(zip(net.bottom_vecs[first:end + 1],
                                                                  net.top_vecs[first:end + 1])),
                              net.layers[last + 1:end + 1], channels)
        return runner, end

    def _share_memory(self, kept):
        """Full level: blobs whose lifetimes (first step writing them .. last step reading them) do not overlap
        take turns with a pool of buffers. Blobs that share memory already (Split and Flatten tops, in-place
        chains) move together; inputs, outputs, kept blobs and data layers' tops keep their own. Returns the
        bytes saved."""
        net = self.net
        groups = {}  # id of a SyncedMemory -> the blob ids using it
        for blob_id, blob in enumerate(net._blobs):
            groups.setdefault(id(blob.memory), []).append(blob_id)
        group_of = {blob_id: key for key, ids in groups.items() for blob_id in ids}
        fixed = {group_of[i] for i, name in enumerate(net.blob_names) if name in kept}
        fixed |= {group_of[i] for layer_id, ids in enumerate(net.top_ids) if not net.bottom_ids[layer_id] for i in ids}
        first_write, last_read = {}, {}
        for step, (first, last, runner) in enumerate(self.steps):
            if runner is None:
                continue
            for i in {i for layer_id in range(first, last + 1) for i in net.bottom_ids[layer_id]}:
                last_read[group_of[i]] = step   # a fused sum's other bottom too
            for i in net.top_ids[last]:
                first_write.setdefault(group_of[i], step)
                last_read[group_of[i]] = max(last_read.get(group_of[i], step), step)
        free, pool, before = [], [], 0
        ends = {}
        for key, step in sorted(first_write.items(), key=lambda item: item[1]):
            if key in fixed:
                continue
            for done_step in [s for s in ends if s < step]:
                free.extend(ends.pop(done_step))
            count = max(net._blobs[i].count for i in groups[key])
            before += count
            fits = [m for m in free if m.count >= count]
            memory = min(fits, key=lambda m: m.count) if fits else None
            if memory is None:
                memory = SyncedMemory(count)
                pool.append(memory)
            else:
                free.remove(memory)
            for i in groups[key]:
                net._blobs[i].use_memory(memory)
            ends.setdefault(last_read[key], []).append(memory)
        return 4 * (before - sum(m.count for m in pool))

    def _fused_sum(self, first, last, runner, convolution, readers, kept):
        """Full level: a FusedSum step (runner, last layer) for the Eltwise sum that alone reads the one top of the
        convolution step first..last (and the ReLU in place after it), or None."""
        net = self.net
        add = last + 1
        if self.level != "full" or add >= len(net.layers) or len(net.top_ids[last]) != 1:
            return None
        layer, produced = net.layers[add], net.top_ids[last][0]
        if not (layer.type == "Eltwise" and layer.op == caffe_pb2.EltwiseParameter.SUM and len(net.bottom_ids[add]) == 2
                and all(c == 1 for c in layer.coeffs) and produced in net.bottom_ids[add]
                and net.blob_names[produced] not in kept
                and not set(net.top_ids[add]) & set(net.bottom_ids[add])):
            return None
        # the in-place layers of the step (a folded BatchNorm / Scale) read it too; after it only the sum may
        if readers[produced] - sum(net.bottom_ids[j].count(produced) for j in range(first, last + 1)) != 1:
            return None
        other = net.bottom_vecs[add][1 - net.bottom_ids[add].index(produced)]
        end = add + 1 if self._is_relu_in_place_on(add + 1, add) else add
        vecs = [(net.bottom_vecs[j], net.top_vecs[j]) for j in range(add, end + 1)]
        return FusedSum(runner, convolution, (net.bottom_vecs[first], net.top_vecs[last]), other,
                        net.layers[add:end + 1], vecs), end

    def _is_relu_in_place_on(self, layer_id, producer_id):
        """Whether layer layer_id is a ReLU (negative_slope 0) working in place on the one top of producer_id."""
        net = self.net
        return (layer_id < len(net.layers) and net.layers[layer_id].type == "ReLU"
                and net.layers[layer_id].layer_param.relu_param.negative_slope == 0
                and len(net.top_ids[producer_id]) == 1
                and net.bottom_ids[layer_id] == net.top_ids[layer_id] == net.top_ids[producer_id]
                and self._may_rewrite(layer_id))

    def _is_test_dropout_in_place(self, layer_id):
        net = self.net
        return (net.layers[layer_id].type == "Dropout" and net.phase == caffe_pb2.TEST
                and net.bottom_ids[layer_id] == net.top_ids[layer_id])

    def forward(self, start, end):
        """Forward layers start..end (inclusive); a step that the range cuts runs its own layers as written."""
        net = self.net
        loss = 0.0
        for first, last, runner in self.steps:
            if last < start or first > end:
                continue
            if start <= first and last <= end:
                if runner is not None:
                    loss += runner.forward(net.bottom_vecs[first], net.top_vecs[last])
                continue
            for i in range(max(first, start), min(last, end) + 1):
                loss += net.layers[i].forward(net.bottom_vecs[i], net.top_vecs[i])
        return loss


def forward_plan(net, level=None, keep=()):
    """The ForwardPlan of `level` for a set-up net (default: "safe" for TEST nets, "none" otherwise), or None."""
    level = level or ("safe" if net.phase == caffe_pb2.TEST else "none")
    if level not in LEVELS:
        raise KaffeError(f"optimize must be one of {', '.join(repr(v) for v in LEVELS)}; got {level!r}")
    return None if level == "none" else ForwardPlan(net, level, keep)
