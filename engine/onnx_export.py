"""Caffe -> ONNX: `export_onnx` writes a set-up TEST-phase Net as an ONNX model that computes what kaffe computes.

Every layer becomes the ONNX operators that reproduce Caffe's own arithmetic, read from the set-up kaffe layer
(its geometry, divisors and parameter values), so the rules live in one place: Pooling gets explicit end pads
that give Caffe's ceil-with-clip output size and, for AVE, a constant map of Caffe's divisors where its windows
overhang the padding; BatchNorm's moving-average factor is folded into the mean and variance; Reshape and
Flatten keep Caffe's 0 / -1 / axis / num_axes meaning while leaving the batch free. A layer type (or setting)
without an exact counterpart stops the export with one line naming the layer.

Names: graph inputs and outputs are the Caffe blob names; the tops of a blob that in-place layers rewrite are
`<blob>/<layer>` except the last, which is the blob's name. Caffe parameter blobs are initializers named
`<layer>_<index>` (shaped to broadcast where ONNX needs it); derived constants are `<layer>_<what>`. Layers
without bottoms (Input, Data, ImageData, MemoryData, HDF5Data, WindowData, DummyData) give the graph inputs:
the tensors those layers would hand to the net, after their transform_param, which metadata_props records.
"""
import numpy as np
from google.protobuf import text_format

from ..layers.common import axis_index
from ..proto import caffe_pb2
from .errors import KaffeError, KaffeValueError
from .io import write_file_atomically
from .onnx_import import onnx_module

FLT_MIN = float(np.finfo(np.float32).tiny)   # Caffe's floor under a probability, and STOCHASTIC's start sum
DEFAULT_OPSET = 17
MIN_OPSET = 13   # Softmax over one axis, Split/ReduceSum/Tile taking their sizes as inputs
DYNAMIC = "dynamic"
BATCH_DIM = "batch"
Pool = caffe_pb2.PoolingParameter
Eltwise = caffe_pb2.EltwiseParameter
Reduction = caffe_pb2.ReductionParameter
CONVERTERS = {}   # layer type -> function(exporter, _Layer)


def export_onnx(net, path=None, opset=None, batch=None):
    """The onnx.ModelProto of a TEST-phase Net (written to `path` when given).

    batch: None keeps the net's batch size, an int N fixes it to N, "dynamic" makes it a symbolic dimension
    `batch` of every graph input (the first axis of every input blob is taken to be its batch).
    """
    model = _Exporter(net, opset, batch).run()
    if path is not None:
        write_file_atomically(path, model.SerializeToString())
    return model


def parse_batch(text):
    """The `batch` argument from its command-line spelling: 'dynamic' or a positive integer."""
    if text == DYNAMIC:
        return DYNAMIC
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise KaffeValueError(f"--batch must be 'dynamic' or a positive integer, got '{text}'")
    return value


def _is_source(layer):
    """Data layers and Input: the layers without bottoms, except Parameter (whose top is a learned blob)."""
    return not layer.layer_param.bottom and layer.type != "Parameter"


def converts(*types):
    def register(function):
        for name in types:
            CONVERTERS[name] = function
        return function
    return register


class _Layer:
    """One layer's view for its converter: the set-up kaffe layer and its blobs, the ONNX names of its bottoms
    (inputs) and of its tops (outputs)."""

    def __init__(self, layer, bottoms, tops, inputs, outputs):
        self.layer, self.param = layer, layer.layer_param
        self.name, self.type = layer.name, layer.type
        self.bottoms, self.inputs, self.outputs = bottoms, inputs, outputs
        self.bottom_shapes = [b.shape for b in bottoms]
        self.top_shapes = [t.shape for t in tops]

    @property
    def x(self):
        return self.inputs[0]

    @property
    def y(self):
        return self.outputs[0]

    def fail(self, why):
        raise KaffeError(f"{self.type} layer '{self.name}': {why}")


class _Exporter:
    def __init__(self, net, opset, batch):
        self.onnx = onnx_module()
        self.helper = self.onnx.helper
        if net.phase != caffe_pb2.TEST:
            raise KaffeError(f"net '{net.name}': only a TEST-phase net can be exported to ONNX (TRAIN-phase "
                             f"BatchNorm and Dropout depend on the batch and on random draws)")
        self.opset = DEFAULT_OPSET if opset is None else int(opset)
        newest = self.onnx.defs.onnx_opset_version()
        if not MIN_OPSET <= self.opset <= newest:
            raise KaffeValueError(f"--opset must be between {MIN_OPSET} and {newest} (the installed onnx "
                                  f"package's newest), got {self.opset}")
        if batch is not None and batch != DYNAMIC and not (isinstance(batch, int) and batch > 0):
            raise KaffeValueError(f"batch must be None, 'dynamic' or a positive integer, got {batch!r}")
        self.net, self.batch = net, batch
        inputs = [tops for tops, layer in zip(net.top_vecs, net.layers) if _is_source(layer)]
        self.net_batch = next((t[0].shape[0] for t in inputs if t and t[0].num_axes), None)
        self.nodes, self.initializers, self.graph_inputs, self.metadata = [], [], [], {}
        self.current = {}      # Caffe blob name -> the ONNX tensor now holding it
        self.used = set()      # ONNX tensor names taken
        self.input_blobs = set()
        self.last_writer = {}  # blob name -> index of the last layer that writes it
        for i, tops in enumerate(net.top_ids):
            for blob_id in tops:
                self.last_writer[net.blob_names[blob_id]] = i

    # -- building blocks ---------------------------------------------------------------------------------------
    def fresh(self, name):
        """An unused tensor name based on `name`."""
        candidate, n = name, 1
        while candidate in self.used:
            candidate, n = f"{name}_{n}", n + 1
        self.used.add(candidate)
        return candidate

    def node(self, op, inputs, output=None, outputs=1, **attributes):
        """Adds an ONNX node; returns its output name (or names when outputs > 1). `output` names the first, or as
        a list all of them."""
        names = list(output) if isinstance(output, list) else [output or self.fresh(f"{self.where}/{op}")]
        names += [self.fresh(f"{self.where}/{op}") for _ in range(outputs - len(names))]
        self.nodes.append(self.helper.make_node(op, list(inputs), names, name=names[0], **attributes))
        return names[0] if outputs == 1 else names

    def constant(self, name, value, dtype=np.float32):
        """An initializer named `name` holding `value`."""
        self.initializers.append(self.onnx.numpy_helper.from_array(np.asarray(value, dtype=dtype),
                                                                   self.fresh(name)))
        return self.initializers[-1].name

    def ints(self, name, values):
        return self.constant(name, values, np.int64)

    def param(self, c, index, shape=None, value=None):
        """Caffe parameter blob `index` of the layer as the initializer `<layer>_<index>` (reshaped, or replaced
        by a derived value, for ONNX's operators)."""
        data = c.layer.blobs[index].data if value is None else value
        return self.constant(f"{c.name}_{index}", data if shape is None else data.reshape(shape))

    def reduce(self, op, x, axis, output=None, keepdims=0):
        """ReduceSum or ReduceMean of x over one axis (its axes are an input from opset 13 for ReduceSum, from 18
        for ReduceMean)."""
        if op == "ReduceSum" or self.opset >= 18:
            return self.node(op, [x, self.ints(f"{self.where}_axes", [axis])], output, keepdims=keepdims)
        return self.node(op, [x], output, keepdims=keepdims, axes=[axis])

    def reshape(self, x, target, output=None):
        return self.node("Reshape", [x, self.ints(f"{self.where}_shape", target)], output)

    def static_batch(self, c, why):
        """Refuses an export whose batch differs from the net's when the layer's ONNX form fixes the batch."""
        if self.batch is not None and self.batch != self.net_batch:
            c.fail(f"{why} fixes the batch size: export it with the net's batch ({self.net_batch})")

    def top_name(self, index, blob):
        """The ONNX name of a layer's top: the blob's name (kept free for it) for its last writer, `<blob>/<layer>`
        before (and for in-place rewrites of a graph input)."""
        if self.last_writer[blob] == index and blob not in self.input_blobs:
            return blob
        return self.fresh(f"{blob}/{self.net.layer_names[index]}")

    # -- the graph ---------------------------------------------------------------------------------------------
    def run(self):
        net = self.net
        self.used.update(net.blob_names)   # blob names are reserved for the blobs themselves
        for index, layer in enumerate(net.layers):
            self.where = layer.name
            bottoms = [net.blob_names[i] for i in net.bottom_ids[index]]
            tops = [net.blob_names[i] for i in net.top_ids[index]]
            if _is_source(layer):
                self.add_inputs(layer, tops, net.top_vecs[index])
                continue
            converter = CONVERTERS.get(layer.type)
            if converter is None:
                raise KaffeError(f"{layer.type} layer '{layer.name}' has no ONNX counterpart; the export stops "
                                 f"(see the layer table under ONNX in README.md)")
            c = _Layer(layer, net.bottom_vecs[index], net.top_vecs[index], [self.current[b] for b in bottoms],
                       [self.top_name(index, blob) for blob in tops])
            aliases = converter(self, c)
            for blob, name in zip(tops, aliases or c.outputs):
                self.current[blob] = name
        outputs = []
        for blob in net.outputs:
            name = self.current[blob]
            if name != blob and blob not in self.input_blobs:   # an alias (Split, Dropout) ends the net
                self.where = blob
                name = self.node("Identity", [name], blob)
            outputs.append(self.helper.make_tensor_value_info(name, self.onnx.TensorProto.FLOAT, None))
        checked = self.check(self.model(outputs, weights_as_inputs=True))
        model = self.model(checked.graph.output, checked.graph.value_info)
        for key, value in self.metadata.items():
            model.metadata_props.add(key=key, value=value)
        return model

    def model(self, outputs, value_info=(), weights_as_inputs=False):
        """The ModelProto of the nodes built. weights_as_inputs: the float initializers (the weights) become
        graph inputs of their shapes, a model that infers and checks alike without copying the weights."""
        inputs, initializers = list(self.graph_inputs), self.initializers
        if weights_as_inputs:
            weights = [t for t in initializers if t.data_type == self.onnx.TensorProto.FLOAT]
            inputs += [self.helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in weights]
            initializers = [t for t in initializers if t.data_type != self.onnx.TensorProto.FLOAT]
        graph = self.helper.make_graph(self.nodes, self.net.name or "kaffe", inputs, outputs, initializers,
                                       value_info=value_info)
        opsets = [self.helper.make_opsetid("", self.opset)]
        return self.helper.make_model(graph, opset_imports=opsets, producer_name="kaffe",
                                      ir_version=self.helper.find_min_ir_version_for(opsets))

    def check(self, model):
        """The model with every shape inferred (outputs included) and onnx's checks passed, or a KaffeError."""
        try:
            inferred = self.onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True,
                                                              data_prop=True)
            known = {v.name: v for v in inferred.graph.value_info}
            for output in inferred.graph.output:
                if output.name in known:
                    output.type.CopyFrom(known[output.name].type)
            self.onnx.checker.check_model(inferred)
        except (self.onnx.checker.ValidationError, self.onnx.shape_inference.InferenceError) as e:
            raise KaffeError(f"net '{self.net.name}': the exported ONNX model does not pass onnx's checker: "
                             f"{str(e).strip().splitlines()[0]}") from None
        return inferred

    def add_inputs(self, layer, tops, blobs):
        """A source layer's tops become graph inputs; the data layers' transform is recorded in the metadata."""
        for blob, data in zip(tops, blobs):
            shape = list(data.shape)
            if shape and self.batch is not None:
                shape[0] = BATCH_DIM if self.batch == DYNAMIC else self.batch
            self.graph_inputs.append(self.helper.make_tensor_value_info(blob, self.onnx.TensorProto.FLOAT, shape))
            self.current[blob] = blob
            self.input_blobs.add(blob)
            self.metadata[f"kaffe.input.{blob}"] = f"{layer.type} layer '{layer.name}'"
        if layer.type != "Input" and layer.layer_param.HasField("transform_param") and tops:
            self.metadata[f"kaffe.transform_param.{tops[0]}"] = text_format.MessageToString(
                layer.layer_param.transform_param, as_one_line=True)


# -- vision -----------------------------------------------------------------------------------------------------
def _spatial_attributes(layer, group=None):
    return dict(kernel_shape=list(layer.kernel), strides=list(layer.stride), dilations=list(layer.dilation),
                pads=list(layer.pad) * 2, group=group or layer.group)


@converts("Convolution", "Deconvolution")
def _convolution(ex, c):
    layer = c.layer
    if layer.channel_axis != 1:
        c.fail(f"convolution over axis {layer.channel_axis}: ONNX convolves with the channels on axis 1")
    inputs = [ex.param(c, i) for i in range(len(layer.blobs))]
    op = "ConvTranspose" if layer.transposed else "Conv"
    for x, y in zip(c.inputs, c.outputs):
        ex.node(op, [x] + inputs, y, **_spatial_attributes(layer))


@converts("Im2col")
def _im2col(ex, c):
    """A convolution whose weights pick one tap each: row c K + k of the columns is tap k of channel c (exact:
    every output is one input value times 1 plus zeros)."""
    layer = c.layer
    if layer.channel_axis != 1:
        c.fail(f"columns over axis {layer.channel_axis}: ONNX convolves with the channels on axis 1")
    taps = np.eye(layer.rows).reshape((layer.rows, layer.channels) + tuple(layer.kernel))
    ex.node("Conv", [c.x, ex.constant(f"{c.name}_taps", taps)], c.y, **_spatial_attributes(layer, group=1))


@converts("Pooling")
def _pooling(ex, c):
    layer = c.layer
    if layer.method == Pool.STOCHASTIC and layer.phase == caffe_pb2.TRAIN:
        c.fail("STOCHASTIC pooling draws at random in the TRAIN phase; ONNX has no counterpart")
    if layer.global_pooling and len(c.outputs) == 1 and layer.method != Pool.STOCHASTIC:
        ex.node("GlobalMaxPool" if layer.method == Pool.MAX else "GlobalAveragePool", [c.x], c.y)
        return
    # Caffe's last window starts inside the input or its leading pad (ceil with clip); the end pad that
    # makes ONNX's floor rounding give the same count is within [needed, needed + stride) and never negative
    end_pads = [max((o - 1) * s + k - n - p, 0) for n, o, k, s, p in
                zip(layer.in_spatial, layer.out_spatial, layer.kernel, layer.stride, layer.pad)]
    attributes = dict(kernel_shape=list(layer.kernel), strides=list(layer.stride),
                      pads=list(layer.pad) + end_pads)
    if layer.method == Pool.MAX:
        if len(c.outputs) == 1:
            ex.node("MaxPool", [c.x], c.y, **attributes)
            return
        _, index = ex.node("MaxPool", [c.x], c.y, outputs=2, **attributes)
        # ONNX indexes the whole N x C x H x W tensor, Caffe's mask the H x W plane
        plane = ex.node("Mod", [index, ex.ints(f"{c.name}_plane", layer.in_spatial[0] * layer.in_spatial[1])])
        ex.node("Cast", [plane], c.outputs[1], to=ex.onnx.TensorProto.FLOAT)
        return
    area = int(np.prod(layer.kernel))
    if layer.method == Pool.STOCHASTIC:   # TEST: sum(x^2) / (FLT_MIN + sum(x)) over each window, no padding
        size = ex.constant(f"{c.name}_area", area)
        sums = [ex.node("Mul", [ex.node("AveragePool", [v], count_include_pad=1, **attributes), size])
                for v in (ex.node("Mul", [c.x, c.x]), c.x)]
        ex.node("Div", [sums[0], ex.node("Add", [sums[1], ex.constant(f"{c.name}_flt_min", FLT_MIN)])], c.y)
        return
    # every ONNX window lies within the padded input, so ONNX divides by the kernel area; Caffe divides by
    # the window clipped at the input plus its (leading) pad: its own divisors correct the windows that differ
    if np.all(layer.divisors == area):
        ex.node("AveragePool", [c.x], c.y, count_include_pad=1, **attributes)
        return
    average = ex.node("AveragePool", [c.x], count_include_pad=1, **attributes)
    ex.node("Mul", [average, ex.constant(f"{c.name}_divisor_ratio", area / layer.divisors)], c.y)


@converts("SPP")
def _spp(ex, c):
    """Each pyramid level is the set-up Pooling layer the SPP layer holds, flattened; the levels concatenated."""
    levels = []
    for i, (pool, pooled) in enumerate(c.layer.levels):
        levels.append(c.y if len(c.layer.levels) == 1 else ex.fresh(f"{c.name}/level{i}"))
        _pooling(ex, _Layer(pool, c.bottoms, [pooled], c.inputs, levels[-1:]))
    if len(levels) > 1:
        ex.node("Concat", [ex.reshape(level, [0, -1]) for level in levels], c.y, axis=1)


@converts("LRN")
def _lrn(ex, c):
    layer = c.layer
    if layer.across:
        ex.node("LRN", [c.x], c.y, size=layer.size, alpha=float(layer.alpha), beta=float(layer.beta),
                bias=float(layer.k))
        return
    # WITHIN_CHANNEL: x * (1 + alpha * mean of x^2 over the size x size window, zero padded)^-beta; with pad
    # (size - 1) / 2 and stride 1 no window leaves the padded plane, so the mean divides by size^2 everywhere
    half = (layer.size - 1) // 2
    square = ex.node("Mul", [c.x, c.x])
    mean = ex.node("AveragePool", [square], kernel_shape=[layer.size] * 2, pads=[half] * 4, count_include_pad=1)
    scaled = ex.node("Mul", [mean, ex.constant(f"{c.name}_alpha", layer.alpha)])
    base = ex.node("Add", [scaled, ex.constant(f"{c.name}_one", 1.0)])
    factor = ex.node("Pow", [base, ex.constant(f"{c.name}_power", -layer.beta)])
    ex.node("Mul", [c.x, factor], c.y)


@converts("Crop")
def _crop(ex, c):
    axes = [i for i, (w, n) in enumerate(zip(c.layer.window, c.bottom_shapes[0])) if (w.start, w.stop) != (0, n)]
    if 0 in axes:
        ex.static_batch(c, "cropping the batch axis")
    if not axes:
        return [c.x]
    ex.node("Slice", [c.x, ex.ints(f"{c.name}_starts", [c.layer.window[i].start for i in axes]),
                      ex.ints(f"{c.name}_ends", [c.layer.window[i].stop for i in axes]),
                      ex.ints(f"{c.name}_axes", axes)], c.y)


# -- fully connected, lookup -------------------------------------------------------------------------------------
@converts("InnerProduct")
def _inner_product(ex, c):
    layer = c.layer
    axis = axis_index(layer, c.bottoms[0], layer.layer_param.inner_product_param.axis)
    weight = ex.param(c, 0)
    bias = [ex.param(c, 1)] if layer.bias_term else []
    if axis == 1:   # Gemm on (N, K): weights (num_output, K), or (K, num_output) with transpose
        x = c.x if len(c.bottom_shapes[0]) == 2 else ex.node("Flatten", [c.x], axis=1)
        ex.node("Gemm", [x, weight] + bias, c.y, transB=0 if layer.transpose else 1)
        return
    if axis == 0:
        ex.static_batch(c, "an inner product over the batch axis")
    rows = ex.reshape(c.x, [0] * axis + [-1])
    if not layer.transpose:
        weight = ex.node("Transpose", [weight])
    if not bias:
        ex.node("MatMul", [rows, weight], c.y)
        return
    ex.node("Add", [ex.node("MatMul", [rows, weight]), bias[0]], c.y)


@converts("Embed")
def _embed(ex, c):
    index = ex.node("Cast", [c.x], to=ex.onnx.TensorProto.INT64)   # Caffe's static_cast truncates too
    if not c.layer.bias_term:
        ex.node("Gather", [ex.param(c, 0), index], c.y, axis=0)
        return
    ex.node("Add", [ex.node("Gather", [ex.param(c, 0), index], axis=0), ex.param(c, 1)], c.y)


# -- activations -------------------------------------------------------------------------------------------------
def _chain(ex, c, steps):
    """Applies (op, constant or None) steps to the bottom, the last one writing the top."""
    value = c.x
    for i, (op, operand) in enumerate(steps):
        inputs = [value] if operand is None else [value, ex.constant(f"{c.name}_{op.lower()}", operand)]
        value = ex.node(op, inputs, c.y if i == len(steps) - 1 else None)
    if not steps:
        ex.node("Identity", [value], c.y)


def _affine(scale, shift):
    """The steps of scale * x + shift, skipping the identity parts."""
    return ([("Mul", scale)] if scale != 1 else []) + ([("Add", shift)] if shift != 0 else [])


@converts("ReLU")
def _relu(ex, c):
    slope = c.layer.p.negative_slope
    if slope == 0:
        ex.node("Relu", [c.x], c.y)
    else:
        ex.node("LeakyRelu", [c.x], c.y, alpha=float(slope))


SIMPLE = {"Sigmoid": "Sigmoid", "TanH": "Tanh", "AbsVal": "Abs", "BNLL": "Softplus"}


@converts(*SIMPLE)
def _simple(ex, c):
    ex.node(SIMPLE[c.type], [c.x], c.y)


@converts("ELU")
def _elu(ex, c):
    ex.node("Elu", [c.x], c.y, alpha=float(c.layer.p.alpha))


@converts("Power")
def _power(ex, c):
    p = c.layer.p
    if p.diff_scale == 0:   # Caffe's constant cases: 1 for power 0, shift^power for scale 0
        value = np.float32(1) if p.power == 0 else np.power(p.shift, p.power)
        ex.node("Expand", [ex.constant(f"{c.name}_value", value), ex.node("Shape", [c.x])], c.y)
        return
    _chain(ex, c, _affine(p.scale, p.shift) + ([("Pow", p.power)] if p.power != 1 else []))


@converts("Exp")
def _exp(ex, c):
    p = c.layer.p   # base^(shift + scale x) = outer_scale * e^(inner_scale x)
    _chain(ex, c, _affine(p.inner_scale, 0) + [("Exp", None)] + _affine(p.outer_scale, 0))


@converts("Log")
def _log(ex, c):
    p = c.layer.p   # log_base(shift + scale x) = ln(shift + scale x) / ln(base)
    _chain(ex, c, _affine(p.scale, p.shift) + [("Log", None)] + _affine(p.base_scale, 0))


@converts("Threshold")
def _threshold(ex, c):
    above = ex.node("Greater", [c.x, ex.constant(f"{c.name}_threshold", c.layer.p.threshold)])
    ex.node("Cast", [above], c.y, to=ex.onnx.TensorProto.FLOAT)


@converts("Clip")
def _clip(ex, c):
    p = c.layer.p
    ex.node("Clip", [c.x, ex.constant(f"{c.name}_min", p.min), ex.constant(f"{c.name}_max", p.max)], c.y)


@converts("Swish")
def _swish(ex, c):
    beta = c.layer.p.beta
    scaled = c.x if beta == 1 else ex.node("Mul", [c.x, ex.constant(f"{c.name}_beta", beta)])
    ex.node("Mul", [c.x, ex.node("Sigmoid", [scaled])], c.y)


@converts("PReLU")
def _prelu(ex, c):
    shape = (1,) if c.layer.channel_shared else (-1,) + (1,) * (len(c.bottom_shapes[0]) - 2)
    ex.node("PRelu", [c.x, ex.param(c, 0, shape)], c.y)


@converts("Dropout", "Split")
def _identity(ex, c):
    return [c.x] * len(c.outputs)   # aliases: TEST-phase Dropout passes its input through


# -- normalisation, per-channel operands ------------------------------------------------------------------------
@converts("BatchNorm")
def _batch_norm(ex, c):
    layer = c.layer
    if not layer.use_global_stats:
        c.fail("use_global_stats: false normalises with the batch's own statistics; ONNX inference uses stored "
               "ones")
    if len(c.bottom_shapes[0]) < 2:
        c.fail("ONNX BatchNormalization needs a channel axis (the input is 1-D)")
    factor = layer.blobs[2].data[0]
    scale = np.float32(0 if factor == 0 else 1 / factor)   # the moving-average factor, folded in as kaffe does
    channels = layer.channels
    ex.node("BatchNormalization", [c.x, ex.constant(f"{c.name}_scale", np.ones(channels)),
                                   ex.constant(f"{c.name}_bias", np.zeros(channels)),
                                   ex.param(c, 0, value=scale * layer.blobs[0].data),
                                   ex.param(c, 1, value=scale * layer.blobs[1].data)],
            c.y, epsilon=float(layer.eps))


def _operand(ex, c, index, axis, operand_shape):
    """A Scale/Bias operand laid out to broadcast against bottom[0] from `axis` on (ONNX aligns the last axes):
    the parameter blob `index`, or bottom[1] when the layer has two bottoms and index is None."""
    trailing = len(c.bottom_shapes[0]) - axis - len(operand_shape)
    if index is not None:
        if axis == 0 and operand_shape:
            ex.static_batch(c, "a learned operand over the batch axis")
        return ex.param(c, index, tuple(operand_shape) + (1,) * trailing)
    if not trailing:
        return c.inputs[1]
    return ex.reshape(c.inputs[1], [0] * len(operand_shape) + [1] * trailing)


def _operand_axis(c, field):
    operand = c.bottom_shapes[1] if len(c.inputs) > 1 else c.layer.blobs[0].shape
    if not operand:
        return 0, operand
    return axis_index(c.layer, c.bottoms[0], getattr(c.param, field).axis), operand


@converts("MVN")
def _mvn(ex, c):
    layer = c.layer
    # rows of Caffe's legacy num x channels (or num alone across channels), each normalised on its own
    rows = ex.reshape(c.x, [0, -1] if layer.across_channels or len(c.bottom_shapes[0]) < 2 else [0, 0, -1])
    axis = 1 if layer.across_channels or len(c.bottom_shapes[0]) < 2 else 2
    centered = ex.node("Sub", [rows, ex.reduce("ReduceMean", rows, axis, keepdims=1)])
    if layer.normalize_variance:   # divided by the biased std plus eps
        variance = ex.reduce("ReduceMean", ex.node("Mul", [centered, centered]), axis, keepdims=1)
        std = ex.node("Add", [ex.node("Sqrt", [variance]), ex.constant(f"{c.name}_eps", layer.eps)])
        centered = ex.node("Div", [centered, std])
    ex.reshape(centered, [0] + list(c.bottom_shapes[0][1:]), c.y)


@converts("Scale")
def _scale(ex, c):
    axis, shape = _operand_axis(c, "scale_param")
    learned = len(c.inputs) == 1
    scale = _operand(ex, c, 0 if learned else None, axis, shape)
    if not c.layer.bias_term:
        ex.node("Mul", [c.x, scale], c.y)
        return
    product = ex.node("Mul", [c.x, scale])
    ex.node("Add", [product, _operand(ex, c, len(c.layer.blobs) - 1, axis, shape)], c.y)


@converts("Bias")
def _bias(ex, c):
    axis, shape = _operand_axis(c, "bias_param")
    ex.node("Add", [c.x, _operand(ex, c, 0 if len(c.inputs) == 1 else None, axis, shape)], c.y)


@converts("Softmax")
def _softmax(ex, c):
    ex.node("Softmax", [c.x], c.y, axis=axis_index(c.layer, c.bottoms[0], c.param.softmax_param.axis))


# -- shapes ------------------------------------------------------------------------------------------------------
def _reshape_target(ex, c, start, end, dims):
    """ONNX Reshape's target for Caffe's replacement of axes [start, end) by `dims` (0 copies, -1 infers).

    The axes before start are copied (0) and Caffe's 0 copies the axis of the same index, as ONNX's does, so
    the batch stays free; the axes after end are written out, but the batch's own axis among them is inferred.
    """
    shape = c.bottom_shapes[0]
    trailing = list(shape[end:])
    if end == 0 and shape:
        if -1 in dims:
            ex.static_batch(c, "a new shape with -1 in front of the batch axis")
        else:
            trailing[0] = -1
    return [0] * start + list(dims) + trailing


@converts("Flatten")
def _flatten(ex, c):
    param, blob = c.param.flatten_param, c.bottoms[0]
    start = axis_index(c.layer, blob, param.axis)
    end = axis_index(c.layer, blob, param.end_axis, "end_axis") + 1
    ex.reshape(c.x, _reshape_target(ex, c, start, end, [-1]), c.y)


@converts("Reshape")
def _reshape(ex, c):
    param, n = c.param.reshape_param, len(c.bottom_shapes[0])
    start = param.axis if param.axis >= 0 else n + param.axis + 1
    end = n if param.num_axes == -1 else start + param.num_axes
    ex.reshape(c.x, _reshape_target(ex, c, start, end, list(param.shape.dim)), c.y)


@converts("Concat")
def _concat(ex, c):
    if len(c.inputs) == 1:
        return [c.x]
    ex.node("Concat", c.inputs, c.y, axis=c.layer.axis)


@converts("Slice")
def _slice(ex, c):
    if len(c.outputs) == 1:
        return [c.x]
    if c.layer.axis == 0:
        ex.static_batch(c, "slicing the batch axis")
    sizes = ex.ints(f"{c.name}_split", c.layer.sizes)
    ex.node("Split", [c.x, sizes], c.outputs, outputs=len(c.outputs), axis=c.layer.axis)


@converts("Tile")
def _tile(ex, c):
    repeats = [1] * len(c.bottom_shapes[0])
    repeats[axis_index(c.layer, c.bottoms[0], c.param.tile_param.axis)] = c.layer.tiles
    ex.node("Tile", [c.x, ex.ints(f"{c.name}_repeats", repeats)], c.y)


@converts("Eltwise")
def _eltwise(ex, c):
    layer = c.layer
    if layer.op == Eltwise.PROD:   # in bottom order, as Caffe multiplies
        product = c.inputs[0]
        for i, x in enumerate(c.inputs[1:], 2):
            product = ex.node("Mul", [product, x], c.y if i == len(c.inputs) else None)
        return
    if layer.op == Eltwise.MAX:
        ex.node("Max", c.inputs, c.y)
        return
    terms = [x if coeff == 1 else ex.node("Mul", [x, ex.constant(f"{c.name}_coeff", coeff)])
             for x, coeff in zip(c.inputs, layer.coeffs)]
    ex.node("Sum", terms, c.y)


@converts("Reduction")
def _reduction(ex, c):
    layer, param = c.layer, c.param.reduction_param
    axis = axis_index(layer, c.bottoms[0], param.axis)
    # Caffe sums each sample's values from axis on (flattened), then scales by coeff (coeff / count for MEAN)
    rows = c.x if axis == len(c.bottom_shapes[0]) - 1 else ex.reshape(c.x, [0] * axis + [-1])
    if param.operation == Reduction.ASUM:
        rows = ex.node("Abs", [rows])
    elif param.operation == Reduction.SUMSQ:
        rows = ex.node("Mul", [rows, rows])
    # MEAN divides by the count it reduces, which a dynamic batch changes when axis is 0
    op = "ReduceMean" if param.operation == Reduction.MEAN else "ReduceSum"
    coeff = np.float32(param.coeff)
    total = ex.reduce(op, rows, axis, c.y if coeff == 1 else None)
    if coeff != 1:
        ex.node("Mul", [total, ex.constant(f"{c.name}_coeff", coeff)], c.y)


@converts("ArgMax")
def _argmax(ex, c):
    layer = c.layer
    if layer.has_axis:
        axis, x = layer.axis, c.x
    else:   # over each sample's values, flattened
        axis, x = 1, ex.reshape(c.x, [0, -1])
    size = layer.dims[1]
    # Caffe ranks equal values by the higher index first; TopK by the lower: rank the reversed axis
    reversed_x = ex.node("Slice", [x, ex.ints(f"{c.name}_start", [-1]),
                                   ex.ints(f"{c.name}_end", [np.iinfo(np.int64).min]),
                                   ex.ints(f"{c.name}_axis", [axis]), ex.ints(f"{c.name}_step", [-1])])
    values_only = layer.has_axis and layer.out_max_val
    values, order = ex.node("TopK", [reversed_x, ex.ints(f"{c.name}_k", [layer.top_k])],
                            c.y if values_only else None, outputs=2, axis=axis)
    if values_only:
        return
    index = ex.node("Sub", [ex.ints(f"{c.name}_last", size - 1), order])
    index = ex.node("Cast", [index], c.y if layer.has_axis else None, to=ex.onnx.TensorProto.FLOAT)
    if layer.has_axis:
        return
    rows = [1, layer.top_k] + [1] * (len(c.top_shapes[0]) - 3)
    if not layer.out_max_val:
        ex.reshape(index, [0] + rows, c.y)
        return
    parts = [ex.reshape(v, [0] + rows) for v in (index, values)]
    ex.node("Concat", parts, c.y, axis=1)


# -- losses and accuracy: a TEST net's scores with its labels (graph inputs too) ---------------------------------------
Loss = caffe_pb2.LossParameter


def _class_labels(ex, c, axis):
    """The labels (bottom[1]) as int64 indices shaped like the scores with one class on `axis`, ignored labels
    turned into 0, and the float mask of the labels that count (None: all count)."""
    shape = list(c.bottom_shapes[0])
    shape[axis] = 1
    if axis:
        shape[0] = -1   # the batch
    else:
        ex.static_batch(c, "a class axis of 0")
    labels = ex.node("Cast", [ex.reshape(c.inputs[1], shape)], to=ex.onnx.TensorProto.INT64)
    if c.layer.ignore_label is None:
        return labels, None
    ignored = ex.node("Equal", [labels, ex.ints(f"{c.name}_ignore_label", c.layer.ignore_label)])
    valid = ex.node("Cast", [ex.node("Not", [ignored])], to=ex.onnx.TensorProto.FLOAT)
    return ex.node("Where", [ignored, ex.ints(f"{c.name}_zero", 0), labels]), valid


def _count(ex, values, valid):
    """How many of `values` count: the sum of the mask, or their number."""
    if valid is not None:
        return ex.node("ReduceSum", [valid], keepdims=0)
    return ex.node("Cast", [ex.node("Size", [values])], to=ex.onnx.TensorProto.FLOAT)


def _at_least_one(ex, c, value):
    return ex.node("Max", [value, ex.constant(f"{c.name}_one", 1.0)])


def _normalized(ex, c, losses, valid, mode, inner):
    """Caffe's loss: the sum of the losses that count over get_normalizer (never below 1)."""
    if valid is not None:
        losses = ex.node("Mul", [losses, valid])
    total = ex.node("ReduceSum", [losses], c.y if mode == Loss.NONE else None, keepdims=0)
    if mode == Loss.NONE:
        return
    count = _count(ex, losses, valid if mode == Loss.VALID else None)
    if mode == Loss.BATCH_SIZE and inner != 1:
        count = ex.node("Div", [count, ex.constant(f"{c.name}_inner", inner)])
    ex.node("Div", [total, _at_least_one(ex, c, count)], c.y)


@converts("SoftmaxWithLoss")
def _softmax_loss(ex, c):
    layer = c.layer
    prob = ex.node("Softmax", [c.x], c.outputs[1] if len(c.outputs) > 1 else None, axis=layer.axis)
    index, valid = _class_labels(ex, c, layer.axis)
    picked = ex.node("GatherElements", [prob, index], axis=layer.axis)
    floor = ex.node("Max", [picked, ex.constant(f"{c.name}_flt_min", FLT_MIN)])
    _normalized(ex, c, ex.node("Neg", [ex.node("Log", [floor])]), valid, layer.normalization, layer.dims[2])


@converts("InfogainLoss")
def _infogain_loss(ex, c):
    layer, axis = c.layer, c.layer.axis
    classes = layer.dims[1]
    prob = ex.node("Softmax", [c.x], c.outputs[1] if len(c.outputs) > 1 else None, axis=axis)
    floor = ex.node("Max", [prob, ex.constant(f"{c.name}_threshold", 1e-20)])   # Caffe's kLOG_THRESHOLD
    # the log-probabilities with the classes last, against the rows of H that each position's label picks
    rank = len(c.bottom_shapes[0])
    logs = ex.node("Transpose", [ex.node("Log", [floor])], perm=[i for i in range(rank) if i != axis] + [axis])
    h = c.inputs[2] if len(c.inputs) > 2 else ex.constant(f"{c.name}_infogain", layer.stored_h.data)
    index, valid = [None if v is None else ex.node("Squeeze", [v, ex.ints(f"{c.name}_class_axis", [axis])])
                    for v in _class_labels(ex, c, axis)]
    rows = ex.node("Gather", [ex.reshape(h, [classes, classes]), index], axis=0)
    terms = ex.reduce("ReduceSum", ex.node("Mul", [logs, rows]), rank - 1)
    _normalized(ex, c, ex.node("Neg", [terms]), valid, layer.normalization, layer.dims[2])


@converts("Accuracy")
def _accuracy(ex, c):
    layer = c.layer
    if len(c.outputs) > 1:
        c.fail("the per-class accuracy top has no ONNX form here")
    axis = axis_index(layer, c.bottoms[0], c.param.accuracy_param.axis)
    index, valid = _class_labels(ex, c, axis)
    # right when fewer than top_k other classes score at least as high (ties count as wrong), as Caffe counts
    true_score = ex.node("GatherElements", [c.x, index], axis=axis)
    as_high = ex.node("Cast", [ex.node("GreaterOrEqual", [c.x, true_score])], to=ex.onnx.TensorProto.FLOAT)
    ranks = ex.reduce("ReduceSum", as_high, axis, keepdims=1)
    right = ex.node("Cast", [ex.node("Less", [ranks, ex.constant(f"{c.name}_top_k", layer.top_k + 1)])],
                    to=ex.onnx.TensorProto.FLOAT)
    if valid is not None:
        right = ex.node("Mul", [right, valid])
    hits = ex.node("ReduceSum", [right], keepdims=0)
    ex.node("Div", [hits, _at_least_one(ex, c, _count(ex, right, valid))], c.y)   # no labels: 0


@converts("SigmoidCrossEntropyLoss")
def _sigmoid_cross_entropy_loss(ex, c):
    layer = c.layer
    x = c.x
    targets = ex.reshape(c.inputs[1], [0] + list(c.bottom_shapes[0][1:]))
    # log(1 + exp(-|x|)) - x (t - [x >= 0]), the overflow-free form
    positive = ex.node("Cast", [ex.node("GreaterOrEqual", [x, ex.constant(f"{c.name}_zero", 0.0)])],
                       to=ex.onnx.TensorProto.FLOAT)
    softplus = ex.node("Softplus", [ex.node("Neg", [ex.node("Abs", [x])])])
    losses = ex.node("Sub", [softplus, ex.node("Mul", [x, ex.node("Sub", [targets, positive])])])
    valid = None
    if layer.ignore_label is not None:   # Caffe compares static_cast<int>(target)
        target_ints = ex.node("Cast", [targets], to=ex.onnx.TensorProto.INT64)
        kept = ex.node("Not", [ex.node("Equal", [target_ints, ex.ints(f"{c.name}_ignore_label",
                                                                      layer.ignore_label)])])
        valid = ex.node("Cast", [kept], to=ex.onnx.TensorProto.FLOAT)
    _normalized(ex, c, losses, valid, layer.normalization, layer.inner)


def _sample_scores(ex, c):
    """bottom[0] as (N, values per sample) and the labels (one per sample) as int64 (N, 1)."""
    scores = ex.reshape(c.x, [0, -1])
    return scores, ex.node("Cast", [ex.reshape(c.inputs[1], [-1, 1])], to=ex.onnx.TensorProto.INT64)


def _per_sample(ex, c, values):
    """The sum of `values` over the number of samples (Caffe's num)."""
    total = ex.node("ReduceSum", [values], keepdims=0)
    num = ex.node("Cast", [ex.node("Gather", [ex.node("Shape", [c.x]), ex.ints(f"{c.name}_batch_axis", 0)])],
                  to=ex.onnx.TensorProto.FLOAT)
    return ex.node("Div", [total, num], c.y)


@converts("MultinomialLogisticLoss")
def _multinomial_logistic_loss(ex, c):
    scores, labels = _sample_scores(ex, c)
    picked = ex.node("GatherElements", [scores, labels], axis=1)
    floor = ex.node("Max", [picked, ex.constant(f"{c.name}_threshold", 1e-20)])   # Caffe's kLOG_THRESHOLD
    _per_sample(ex, c, ex.node("Neg", [ex.node("Log", [floor])]))


@converts("HingeLoss")
def _hinge_loss(ex, c):
    scores, labels = _sample_scores(ex, c)
    # the sign is -1 at each sample's label, +1 elsewhere
    classes = np.arange(c.bottoms[0].count // c.bottom_shapes[0][0])
    at_label = ex.node("Equal", [ex.ints(f"{c.name}_classes", classes), labels])
    signed = ex.node("Where", [at_label, ex.node("Neg", [scores]), scores])
    margins = ex.node("Relu", [ex.node("Add", [signed, ex.constant(f"{c.name}_one", 1.0)])])
    if c.param.hinge_loss_param.norm == caffe_pb2.HingeLossParameter.L2:
        margins = ex.node("Mul", [margins, margins])
    _per_sample(ex, c, margins)


@converts("EuclideanLoss")
def _euclidean_loss(ex, c):
    difference = ex.node("Sub", [c.x, ex.reshape(c.inputs[1], [0] + list(c.bottom_shapes[0][1:]))])
    halves = ex.node("Mul", [ex.node("Mul", [difference, difference]), ex.constant(f"{c.name}_half", 0.5)])
    _per_sample(ex, c, halves)


@converts("ContrastiveLoss")
def _contrastive_loss(ex, c):
    layer = c.layer
    pairs = [ex.reshape(x, [0, -1]) for x in c.inputs[:2]]
    difference = ex.node("Sub", pairs)
    dist_sq = ex.reduce("ReduceSum", ex.node("Mul", [difference, difference]), 1)
    margin = ex.constant(f"{c.name}_margin", layer.margin)
    zero = ex.constant(f"{c.name}_zero", 0.0)
    if layer.legacy:   # max(margin - d^2, 0)
        dissimilar = ex.node("Max", [ex.node("Sub", [margin, dist_sq]), zero])
    else:              # max(margin - d, 0)^2
        gap = ex.node("Max", [ex.node("Sub", [margin, ex.node("Sqrt", [dist_sq])]), zero])
        dissimilar = ex.node("Mul", [gap, gap])
    similarity = ex.node("Cast", [ex.reshape(c.inputs[2], [-1])], to=ex.onnx.TensorProto.INT64)
    similar = ex.node("Not", [ex.node("Equal", [similarity, ex.ints(f"{c.name}_dissimilar", 0)])])
    terms = ex.node("Where", [similar, dist_sq, dissimilar])
    _per_sample(ex, c, ex.node("Mul", [terms, ex.constant(f"{c.name}_half", 0.5)]))


@converts("BatchReindex")
def _batch_reindex(ex, c):
    ex.node("Gather", [c.x, ex.node("Cast", [c.inputs[1]], to=ex.onnx.TensorProto.INT64)], c.y, axis=0)


@converts("Parameter")
def _parameter(ex, c):
    ex.node("Identity", [ex.param(c, 0)], c.y)


@converts("Silence")
def _silence(ex, c):
    return []
