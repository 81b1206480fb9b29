"""ONNX -> Caffe: `import_onnx` turns an ONNX model into a V2 net (an Input layer first) and its weights.

Shape arithmetic (Shape/Gather/Unsqueeze/Concat/Constant... feeding a Reshape, as PyTorch exports it) is folded
into constants once the input shapes are fixed; every other node becomes one or a few Caffe layers computing
exactly what ONNX computes, or the import stops with one line naming the node and why Caffe cannot express it.
"""
import os

import numpy as np

from ..layers.vision import ave_pool_divisors, pooled_size
from ..proto import caffe_pb2
from .blob import Blob
from .errors import KaffeError, KaffeImportError, KaffeValueError

ONNX_EXTRA = 'pip install "kaffe[onnx]"'
FLT_MAX = float(np.finfo(np.float32).max)
Pool = caffe_pb2.PoolingParameter
Eltwise = caffe_pb2.EltwiseParameter

# elementwise operators that are a chain of Caffe layers: op type -> attributes -> [(layer type, its parameter
# field, {key: value})]
NEURONS = {
    "Relu": lambda a: [("ReLU", None, {})],
    "LeakyRelu": lambda a: [("ReLU", "relu_param", {"negative_slope": a.get("alpha", 0.01)})],
    "Sigmoid": lambda a: [("Sigmoid", None, {})],
    "Tanh": lambda a: [("TanH", None, {})],
    "Elu": lambda a: [("ELU", "elu_param", {"alpha": a.get("alpha", 1.0)})],
    "Selu": lambda a: [("ELU", "elu_param", {"alpha": a.get("alpha", 1.67326319217681884765625)}),
                       ("Power", "power_param", {"scale": a.get("gamma", 1.05070102214813232421875)})],
    "HardSigmoid": lambda a: [("Power", "power_param", {"scale": a.get("alpha", 0.2), "shift": a.get("beta", 0.5)}),
                              ("Clip", "clip_param", {"min": 0.0, "max": 1.0})],
    "Abs": lambda a: [("AbsVal", None, {})],
    "Exp": lambda a: [("Exp", None, {})],
    "Log": lambda a: [("Log", None, {})],
    "Softplus": lambda a: [("BNLL", None, {})],
    "Neg": lambda a: [("Power", "power_param", {"scale": -1.0})],
    "Sqrt": lambda a: [("Power", "power_param", {"power": 0.5})],
    "Reciprocal": lambda a: [("Power", "power_param", {"power": -1.0})],
}

# operators of a blob and a constant scalar that are one Caffe layer: op type -> (layer type, field, its key)
SCALAR_OPERAND = {"Pow": ("Power", "power_param", "power"), "Greater": ("Threshold", "threshold_param", "threshold")}


def onnx_module():
    """The onnx package, or a KaffeImportError naming the extra that installs it."""
    try:
        import onnx
    except ImportError:
        raise KaffeImportError(f"ONNX support needs the onnx package: {ONNX_EXTRA}") from None
    return onnx


def import_onnx(model, batch=None):
    """(NetParameter, weights NetParameter) for an ONNX model (a path, bytes or an onnx.ModelProto).

    `batch` fixes the dynamic first dimensions of the inputs (default 1); a static batch stays. The
    net reads its inputs from an Input layer whose tops are the ONNX input names; blobs keep the ONNX tensor
    names, layers the node names. The weights NetParameter is the net with each layer's parameter blobs.
    """
    if batch is not None and (not isinstance(batch, int) or batch < 1):
        raise KaffeValueError(f"batch must be a positive integer, got {batch!r}")
    return _Importer(model, batch).run()


def _dims(value_info):
    """The static shape of a tensor, or None where a dimension is unknown."""
    tensor = value_info.type.tensor_type
    if not tensor.HasField("shape"):
        return None
    dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim)
    return None if any(d < 0 for d in dims) else dims


def _only_indices(name, readers):
    """Whether tensor `name` is read, and only as the indices of Gathers (an Embed takes them as floats)."""
    return bool(readers) and all(r.op_type == "Gather" and list(r.input[1:]) == [name] for r in readers)


def _add_blob(layer, value):
    """Appends `value` to the layer's parameter blobs, as float32 (Caffe's BlobProto)."""
    value = np.asarray(value, dtype=np.float32)
    blob = Blob(value.shape)
    blob.mutable_cpu_data()[...] = value
    blob.to_proto(layer.blobs.add())


def _aligned(shape, rank, axis):
    """The shape, padded with trailing ones, that lines `shape` up from `axis` of a `rank`-D tensor."""
    return tuple(shape) + (1,) * (rank - axis % rank - len(shape))


def _copy(message):
    copy = type(message)()
    copy.CopyFrom(message)
    return copy


def _shape_text(shape):
    return "x".join(map(str, shape)) if len(shape) else "scalar"


class _Importer:
    def __init__(self, model, batch):
        self.onnx = onnx_module()
        self.model = self._load(model)
        self.opset = next((o.version for o in self.model.opset_import if o.domain in ("", "ai.onnx")), 1)
        self.batch = batch
        self.const = {}        # tensor name -> numpy value, for initializers and folded nodes
        self.alias = {}        # tensor name -> the Caffe blob that holds it (Identity, Cast)
        self.producer = {}     # Caffe blob name -> the LayerParameter that writes it
        self.readers = {}      # tensor name -> the nodes that read it
        self.uses = {}         # tensor name -> number of reading nodes and graph outputs
        self.zero_pads = {}    # output of a zero Pad -> (the Pad node, its input, pads before, pads after)
        self.net = caffe_pb2.NetParameter(name=self.model.graph.name or "onnx")
        self.names = set()       # layer names taken
        self.blob_names = {name for node in self.model.graph.node for name in list(node.input) + list(node.output)}
        self.blob_names.update(i.name for i in self.model.graph.input)

    # -- reading ------------------------------------------------------------------------------
    def _load(self, model):
        onnx = self.onnx
        source = "<model>"
        if isinstance(model, onnx.ModelProto):
            parsed = model  # read only: the import works on copies of its nodes and inputs
        else:
            try:
                if isinstance(model, (bytes, bytearray)):
                    parsed = onnx.load_model_from_string(bytes(model))
                else:  # a file, with the weights that big models keep in files beside it
                    source = os.fspath(model)
                    parsed = onnx.load_model(source)
            except OSError as e:
                raise KaffeError(f"{source}: cannot read the ONNX model: {e.strerror or e}") from None
            except onnx.checker.ValidationError as e:  # weights in a file beside the model that is not there
                raise KaffeError(f"{source}: cannot read the ONNX model's weights: {str(e).strip()}") from None
            except Exception as e:  # protobuf's DecodeError, or a RuntimeError from its C++ parser
                raise KaffeError(f"{source}: not an ONNX model (the file does not parse as an ONNX ModelProto: "
                                 f"{str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        if not parsed.ir_version or not parsed.HasField("graph") or not len(parsed.graph.output):
            raise KaffeError(f"{source}: not an ONNX model (no IR version or no graph with outputs)")
        return parsed

    def _fix_inputs(self):
        """Copies of the graph inputs (not initializers) with every dimension static: a dynamic first one becomes
        `batch`."""
        inputs = [_copy(i) for i in self.model.graph.input if i.name not in self.const]
        dynamic = False
        for value in inputs:
            tensor = value.type.tensor_type
            if tensor.elem_type not in (self.onnx.TensorProto.FLOAT, self.onnx.TensorProto.DOUBLE,
                                        self.onnx.TensorProto.FLOAT16) and not _only_indices(
                    value.name, [n for n in self.model.graph.node if value.name in n.input]):
                raise KaffeError(f"input '{value.name}' holds {self.onnx.TensorProto.DataType.Name(tensor.elem_type)}"
                                 f" values; Caffe blobs hold floats")
            for axis, dim in enumerate(tensor.shape.dim):
                if axis == 0 and not dim.HasField("dim_value"):
                    dim.Clear()
                    dim.dim_value = self.batch or 1
                    dynamic = True
                elif not dim.HasField("dim_value"):
                    raise KaffeError(f"input '{value.name}' has the dynamic dimension "
                                     f"'{dim.dim_param or '?'}' at axis {axis}: Caffe nets have fixed input shapes "
                                     f"(only the batch may be left open)")
        batches = [v.type.tensor_type.shape.dim[0].dim_value for v in inputs if v.type.tensor_type.shape.dim]
        if self.batch and not dynamic and self.batch not in batches:
            raise KaffeError(f"the model's inputs have the static batch {batches[0] if batches else 'none'}: "
                             f"shapes computed in the model may depend on it, so only a dynamic batch can be set "
                             f"(to {self.batch})")
        return inputs

    def _infer(self, nodes, inputs):
        """The static shapes of all tensors (None where unknown). Big constants enter the inference as typed
        inputs: their shapes are all it needs, and serializing their values would take most of the time."""
        helper = self.onnx.helper
        read = {name for node in nodes for name in node.input}
        small = [self.onnx.numpy_helper.from_array(v, n) for n, v in self.const.items()
                 if n in read and (v.size <= 4096 or v.dtype.kind != "f")]
        big = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
               for n, v in self.const.items() if n in read and v.size > 4096 and v.dtype.kind == "f"]
        graph = helper.make_graph(nodes, "shapes", list(inputs) + big, self.model.graph.output, small)
        # the current IR version: old ones (< 4) see only the initializers that are also graph inputs
        model = helper.make_model(graph, opset_imports=self.model.opset_import)
        try:
            inferred = self.onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
        except Exception as e:  # onnx.shape_inference.InferenceError, or a type error it reports as RuntimeError
            raise KaffeError(f"ONNX shape inference failed: {str(e).strip().splitlines()[-1]}") from None
        graph = inferred.graph
        return {v.name: _dims(v) for v in list(graph.input) + list(graph.value_info) + list(graph.output)}

    def _fold(self, nodes):
        """Evaluate the nodes whose inputs are all constants (and Shape of a static shape); the rest remain."""
        kept = []
        for node in nodes:
            inputs = [n for n in node.input if n]
            if node.op_type in ("Shape", "Size") and self.shapes.get(node.input[0]) is not None:
                shape = np.array(self.shapes[node.input[0]], dtype=np.int64)
                a = self._attributes(node)
                self.const[node.output[0]] = (shape[a.get("start", 0):a.get("end", len(shape))]
                                              if node.op_type == "Shape" else np.array(shape.prod()))
            elif all(n in self.const for n in inputs) and not node.op_type.startswith("Random"):
                self._evaluate(node)
            else:
                kept.append(node)
        return kept

    def _evaluate(self, node):
        helper = self.onnx.helper
        from onnx.reference import ReferenceEvaluator
        inputs = [n for n in node.input if n]
        graph = helper.make_graph([node], "fold", [helper.make_value_info(n, self.onnx.TypeProto()) for n in inputs],
                                  [helper.make_value_info(n, self.onnx.TypeProto()) for n in node.output if n])
        model = helper.make_model(graph, opset_imports=self.model.opset_import)
        try:
            values = ReferenceEvaluator(model).run(None, {n: self.const[n] for n in inputs})
        except Exception as e:  # whatever the reference implementation raises for this node
            raise KaffeError(f"node '{node.name}' ({node.op_type}): cannot fold its constant inputs: {e}") from None
        for name, value in zip([n for n in node.output if n], values):
            self.const[name] = np.asarray(value)

    def run(self):
        graph = self.model.graph
        nodes = [_copy(node) for node in graph.node]
        for index, node in enumerate(nodes):
            node.name = node.name or f"{node.op_type}_{index}"
            if node.domain not in ("", "ai.onnx"):
                self._refuse(node, f"operator of domain '{node.domain}' has no Caffe layer")
        for t in graph.initializer:
            self.const[t.name] = self.onnx.numpy_helper.to_array(t)
        inputs = self._fix_inputs()
        self.shapes = self._infer(nodes, inputs)
        nodes = self._fold(nodes)
        # once folded, the remaining graph's shapes are inferred again: Reshape targets are constants now
        self.shapes = self._infer(nodes, inputs)
        for node in nodes:
            for name in node.input:
                self.readers.setdefault(name, []).append(node)
        outputs = [o.name for o in graph.output]
        self.uses = {name: len(readers) for name, readers in self.readers.items()}
        for name in outputs:
            self.uses[name] = self.uses.get(name, 0) + 1
        data = self._layer("input", "Input", [], [i.name for i in inputs])
        for i in inputs:
            data.input_param.shape.add().dim.extend(self.shapes[i.name])
        for node in nodes:
            self._convert(node)
        self._finish(outputs)
        weights = caffe_pb2.NetParameter()
        weights.CopyFrom(self.net)
        for layer in self.net.layer:
            del layer.blobs[:]
        return self.net, weights

    def _finish(self, outputs):
        """Graph outputs that alias another blob get a copy under their own name; dangling tops are silenced."""
        for name in outputs:
            if name in self.zero_pads:
                self._refuse(self.zero_pads[name][0], "Caffe pads only inside a Convolution; this padding is a "
                                                      "graph output")
            if name in self.const:
                raise KaffeError(f"output '{name}' is a constant; a Caffe net computes its outputs from its inputs")
            if self.alias.get(name, name) != name:
                self._layer(f"{name}_copy", "Split", [self.alias[name]], [name])
        read = {b for layer in self.net.layer for b in layer.bottom}
        dangling = [t for layer in self.net.layer for t in layer.top if t not in read and t not in outputs]
        if dangling:
            self._layer("silence", "Silence", dangling, [])

    # -- helpers ------------------------------------------------------------------------------
    def _attributes(self, node):
        values = {a.name: self.onnx.helper.get_attribute_value(a) for a in node.attribute}
        return {k: v.decode() if isinstance(v, bytes) else v for k, v in values.items()}

    def _unique(self, name, taken):
        base, n = name, 1
        while name in taken:
            name, n = f"{base}_{n}", n + 1
        taken.add(name)
        return name

    def _layer(self, name, kind, bottoms, tops, blobs=()):
        layer = self.net.layer.add(name=self._unique(name, self.names), type=kind)
        layer.bottom.extend(bottoms)
        layer.top.extend(tops)
        for top in tops:
            self.producer[top] = layer
        for value in blobs:
            _add_blob(layer, value)
        return layer

    def _temporary(self, name):
        """A new blob name, unused by the ONNX graph and by the layers made so far."""
        return self._unique(name, self.blob_names)

    def _blob(self, node, name):
        """The Caffe blob holding a computed input of `node`."""
        if name in self.zero_pads:
            self._refuse(self.zero_pads[name][0], "Caffe pads only inside a Convolution; this padding is read by "
                                                  f"node '{node.name}' ({node.op_type})")
        if name in self.const:
            self._refuse(node, f"input '{name}' is a constant where Caffe needs a computed blob")
        return self.alias.get(name, name)

    def _shape(self, node, name):
        shape = self.const[name].shape if name in self.const else self.shapes.get(name)
        if shape is None:
            self._refuse(node, f"the shape of '{name}' depends on the data at run time (a dynamic shape Caffe "
                               f"cannot express)")
        return shape

    def _constant(self, node, index, what):
        name = node.input[index] if index < len(node.input) else ""
        if name not in self.const:
            self._refuse(node, f"its {what} must be a constant (an initializer), not a computed tensor")
        return self.const[name]

    def _optional_constant(self, node, index, what, default):
        return self._constant(node, index, what) if index < len(node.input) and node.input[index] else default

    def _extra_outputs_used(self, node):
        return any(self.uses.get(name) for name in node.output[1:] if name)

    def _refuse(self, node, why):
        raise KaffeError(f"node '{node.name}' ({node.op_type}): {why}")

    def _convert(self, node):
        a = self._attributes(node)
        if node.op_type in NEURONS:
            self._chain(node, NEURONS[node.op_type](a), node.output[0])
            return
        if node.op_type in SCALAR_OPERAND:
            self._scalar_operand(node)
            return
        handler = getattr(self, f"_op_{node.op_type}", None)
        if handler is None:
            self._refuse(node, "operator has no Caffe counterpart")
        handler(node, a)

    def _chain(self, node, steps, out):
        """The node's input through the layers of `steps` (layer type, parameter field, values), into `out`."""
        x = self._blob(node, node.input[0])
        for i, (kind, field, values) in enumerate(steps):
            top = out if i == len(steps) - 1 else self._temporary(f"{out}_{kind.lower()}")
            layer = self._layer(node.name, kind, [x], [top])
            for key, value in values.items():
                setattr(getattr(layer, field), key, value)
            x = top

    def _op_HardSwish(self, node, a):
        gate = self._temporary(f"{node.output[0]}_gate")
        self._chain(node, NEURONS["HardSigmoid"]({"alpha": 1 / 6}), gate)
        product = self._layer(node.name, "Eltwise", [self._blob(node, node.input[0]), gate], [node.output[0]])
        product.eltwise_param.operation = Eltwise.PROD

    # -- convolution and pooling --------------------------------------------------------------
    def _pads(self, a, in_spatial, kernel, strides, dilations):
        """ONNX's (begin, end) padding per spatial axis, with auto_pad resolved."""
        n = len(in_spatial)
        auto = a.get("auto_pad", "NOTSET")
        if auto == "VALID":
            return [0] * n, [0] * n
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            extents = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
            totals = [max(0, (-(-i // s) - 1) * s + e - i) for i, s, e in zip(in_spatial, strides, extents)]
            small = [t // 2 for t in totals]
            large = [t - t // 2 for t in totals]
            return (small, large) if auto == "SAME_UPPER" else (large, small)
        pads = list(a.get("pads", [0] * 2 * n))
        return pads[:n], pads[n:]

    def _spatial(self, node, a, kernel):
        n = len(kernel)
        strides = list(a.get("strides", [1] * n))
        dilations = list(a.get("dilations", [1] * n))
        in_spatial = self._shape(node, node.input[0])[2:]
        out_spatial = self._shape(node, node.output[0])[2:]
        return strides, dilations, in_spatial, out_spatial

    @staticmethod
    def _per_axis(param, field, values, default=None):
        """Fill a repeated per-axis field, once when every axis has the same value (skipped when the default)."""
        values = [int(v) for v in values]
        if len(set(values)) == 1:
            if values[0] != default:
                getattr(param, field).append(values[0])
        else:
            getattr(param, field).extend(values)

    def _op_Conv(self, node, a):
        weights = self._constant(node, 1, "weights")
        kernel = list(a.get("kernel_shape", weights.shape[2:]))
        strides, dilations, in_spatial, out_spatial = self._spatial(node, a, kernel)
        begin, end = self._pads(a, in_spatial, kernel, strides, dilations)
        x = node.input[0]
        if x in self.zero_pads:  # a zero Pad before the convolution joins its padding
            _, x, before, after = self.zero_pads[x]
            in_spatial = self._shape(node, x)[2:]
            begin, end = [b + p for b, p in zip(begin, before)], [e + p for e, p in zip(end, after)]
        for axis, (i, o, k, s, d, b) in enumerate(zip(in_spatial, out_spatial, kernel, strides, dilations, begin)):
            if (i + 2 * b - ((k - 1) * d + 1)) // s + 1 != o:
                self._refuse(node, f"padding {b} before and {end[axis]} after along spatial axis {axis} gives "
                                   f"{o} outputs, which Caffe's symmetric padding {b} does not (Caffe pads both "
                                   f"ends alike)")
        self._convolution(node, a, "Convolution", x, weights.shape[0], kernel, begin, strides, dilations)

    def _op_ConvTranspose(self, node, a):
        weights = self._constant(node, 1, "weights")
        kernel = list(a.get("kernel_shape", weights.shape[2:]))
        strides, dilations, in_spatial, out_spatial = self._spatial(node, a, kernel)
        full = [s * (i - 1) + (k - 1) * d + 1 for i, s, k, d in zip(in_spatial, strides, kernel, dilations)]
        auto = a.get("auto_pad", "NOTSET")
        if "output_shape" in a or auto in ("SAME_UPPER", "SAME_LOWER"):  # the padding that gives this output size
            extra = list(a.get("output_padding", [0] * len(kernel)))
            totals = [f + x - o for f, x, o in zip(full, extra, out_spatial)]
            begin = [t // 2 if auto == "SAME_UPPER" else t - t // 2 for t in totals]
        else:
            begin = self._pads(a, in_spatial, kernel, strides, dilations)[0]
        # ONNX keeps rows [b, b + o) of the full transposed convolution, Caffe rows [pad, full - pad): Caffe pads
        # by the smaller margin, and a Slice cuts the rest (output_padding, asymmetric padding)
        pads = [min(b, f - b - o) for b, f, o in zip(begin, full, out_spatial)]
        for axis, (b, f, o, p) in enumerate(zip(begin, full, out_spatial, pads)):
            if p < 0:
                self._refuse(node, f"output rows {b} to {b + o - 1} along spatial axis {axis} reach past the {f} "
                                   f"rows of the transposed convolution (output_padding larger than the end "
                                   f"padding): rows that hold only the bias, which Caffe's Deconvolution lacks")
        shape = self._shape(node, node.output[0])[:2] + tuple(f - 2 * p for f, p in zip(full, pads))
        cuts = [(axis, b - p, b - p + o) for axis, b, p, o in zip(range(2, len(shape)), begin, pads, out_spatial)
                if (b - p, o) != (0, shape[axis])]
        top = self._temporary(f"{node.output[0]}_uncut") if cuts else node.output[0]
        self._convolution(node, a, "Deconvolution", node.input[0], weights.shape[1] * a.get("group", 1), kernel,
                          pads, strides, dilations, top)
        if cuts:
            self._cut(node, top, shape, cuts, node.output[0])

    def _convolution(self, node, a, kind, x, num_output, kernel, pads, strides, dilations, top=None):
        """The Convolution / Deconvolution layer of a Conv / ConvTranspose node (weights in Caffe's layout)."""
        bias = self._optional_constant(node, 2, "bias", None)
        layer = self._layer(node.name, kind, [self._blob(node, x)], [top or node.output[0]],
                            [self.const[node.input[1]]] + ([] if bias is None else [bias]))
        p = layer.convolution_param
        p.num_output = num_output
        p.bias_term = bias is not None
        self._per_axis(p, "kernel_size", kernel)
        self._per_axis(p, "pad", pads, 0)
        self._per_axis(p, "stride", strides, 1)
        self._per_axis(p, "dilation", dilations, 1)
        if a.get("group", 1) != 1:
            p.group = a["group"]

    def _pool(self, node, a, method):
        if len(self._shape(node, node.input[0])) != 4:
            self._refuse(node, f"Caffe pools 4-D blobs (num, channels, height, width), not "
                               f"{_shape_text(self._shape(node, node.input[0]))}")
        if self._extra_outputs_used(node):
            self._refuse(node, "the Indices output has no Caffe counterpart")
        kernel = list(a["kernel_shape"])
        strides, dilations, in_spatial, out_spatial = self._spatial(node, a, kernel)
        if any(d != 1 for d in dilations):
            self._refuse(node, f"dilated pooling (dilations {dilations}) has no Caffe counterpart")
        begin, end = self._pads(a, in_spatial, kernel, strides, dilations)
        geometry = list(zip(in_spatial, kernel, strides, begin))
        # one window covering the whole input is Caffe's global pooling, whatever ONNX's padding around it
        covering = out_spatial == (1, 1) and all(k - b >= n for n, k, s, b in geometry)
        modes = [m for m in (Pool.CEIL, Pool.FLOOR) if all(
            pooled_size(n, k, s, b, m == Pool.CEIL) == o for (n, k, s, b), o in zip(geometry, out_spatial))]
        if any(b >= k for b, k in zip(begin, kernel)) and not covering:
            self._refuse(node, f"padding {begin} is not smaller than the kernel {kernel}, as Caffe requires")
        if not modes and not covering:
            self._refuse(node, f"output {_shape_text(out_spatial)} from input {_shape_text(in_spatial)} (kernel "
                               f"{kernel}, stride {strides}, padding {begin} before and {end} after) is not a "
                               f"size Caffe's pooling gives with either rounding")
        top = node.output[0]
        correction = None
        if method == Pool.AVE:
            # ONNX divides by the window's cells inside the input (count_include_pad: inside the padded input),
            # Caffe by the window clipped to the padded input: a fixed per-position factor makes up the difference
            include = a.get("count_include_pad", 0)
            onnx_divisors = [np.minimum(np.arange(o) * s - b + k, n + (e if include else 0))
                             - np.maximum(np.arange(o) * s - b, -b if include else 0)
                             for (n, k, s, b), e, o in zip(geometry, end, out_spatial)]
            caffe_divisors = [np.array([n]) if covering else ave_pool_divisors(n, o, k, s, b)
                              for (n, k, s, b), o in zip(geometry, out_spatial)]
            if min(d.min() for d in onnx_divisors) <= 0:
                self._refuse(node, "a window lies entirely in the padding")
            correction = np.multiply.outer(*caffe_divisors) / np.multiply.outer(*onnx_divisors)
            if np.all(correction == 1):
                correction = None
            else:
                top = self._temporary(f"{top}_caffe_divisor")
        layer = self._layer(node.name, "Pooling", [self._blob(node, node.input[0])], [top])
        p = layer.pooling_param
        p.pool = method
        if covering:
            p.global_pooling = True
        elif modes[0] == Pool.FLOOR:
            p.round_mode = Pool.FLOOR
        fields = () if covering else (("kernel", kernel, None), ("stride", strides, 1), ("pad", begin, 0))
        for field, values, default in fields:
            if values[0] != values[1]:
                setattr(p, f"{field}_h", values[0])
                setattr(p, f"{field}_w", values[1])
            elif values[0] != default:
                setattr(p, "kernel_size" if field == "kernel" else field, values[0])
        if correction is not None:  # a fixed factor: the solver leaves it alone (lr_mult 0)
            fixed = self._layer(f"{node.name}_divisor", "Scale", [top], [node.output[0]], [correction])
            fixed.scale_param.axis, fixed.scale_param.num_axes = 2, 2
            fixed.param.add(lr_mult=0, decay_mult=0)

    def _op_MaxPool(self, node, a):
        if a.get("storage_order", 0):
            self._refuse(node, "column-major storage_order has no Caffe counterpart")
        self._pool(node, a, Pool.MAX)

    def _op_AveragePool(self, node, a):
        self._pool(node, a, Pool.AVE)

    def _global_pool(self, node, method):
        if len(self._shape(node, node.input[0])) != 4:
            self._refuse(node, f"Caffe pools 4-D blobs, not {_shape_text(self._shape(node, node.input[0]))}")
        layer = self._layer(node.name, "Pooling", [self._blob(node, node.input[0])], [node.output[0]])
        layer.pooling_param.pool = method
        layer.pooling_param.global_pooling = True

    def _op_GlobalAveragePool(self, node, a):
        self._global_pool(node, Pool.AVE)

    def _op_GlobalMaxPool(self, node, a):
        self._global_pool(node, Pool.MAX)

    # -- inner products -----------------------------------------------------------------------
    def _inner_product(self, node, weights, bias, axis):
        layer = self._layer(node.name, "InnerProduct", [self._blob(node, node.input[0])], [node.output[0]],
                            [weights] + ([] if bias is None else [bias]))
        p = layer.inner_product_param
        p.num_output = weights.shape[0]
        p.bias_term = bias is not None
        if axis != 1:
            p.axis = axis

    def _op_Gemm(self, node, a):
        if a.get("transA", 0):
            self._refuse(node, "transA = 1 (a transposed input) has no Caffe counterpart")
        matrix = self._constant(node, 1, "B (the weights)")
        weights = matrix if a.get("transB", 0) else matrix.T
        if a.get("alpha", 1.0) != 1:
            weights = a["alpha"] * weights
        bias = self._optional_constant(node, 2, "C (the bias)", None)
        if bias is not None:
            if bias.size not in (1, weights.shape[0]) or bias.ndim == 2 and bias.shape[0] != 1:
                self._refuse(node, f"C of shape {_shape_text(bias.shape)} is not a bias of {weights.shape[0]} "
                                   f"values broadcast over the rows")
            bias = a.get("beta", 1.0) * np.broadcast_to(bias.reshape(-1), weights.shape[:1])
        self._inner_product(node, weights, bias, 1)

    def _op_MatMul(self, node, a):
        matrix = self._constant(node, 1, "second operand (the weights)")
        if matrix.ndim != 2:
            self._refuse(node, f"weights of shape {_shape_text(matrix.shape)}: Caffe's InnerProduct takes a "
                               f"2-D matrix")
        self._inner_product(node, matrix.T, None, len(self._shape(node, node.input[0])) - 1)

    def _fuse_bias(self, node, x, value):
        """Add of a constant (N,) right after a bias-less InnerProduct or Embed (MatMul + Add, Gather + Add)
        becomes its bias."""
        layer = self.producer.get(self.alias.get(x, x))
        if layer is None or layer.type not in ("InnerProduct", "Embed"):
            return False
        p = layer.inner_product_param if layer.type == "InnerProduct" else layer.embed_param
        if (p.bias_term or self.uses.get(x, 0) != 1 or layer.top[0] != x
                or value.size != p.num_output or value.shape[-1:] != (value.size,)):
            return False
        p.bias_term = True
        _add_blob(layer, value.reshape(-1))
        layer.top[0] = node.output[0]
        self.producer[node.output[0]] = layer
        return True

    # -- elementwise arithmetic ---------------------------------------------------------------
    @staticmethod
    def _broadcast_axes(big, small):
        """(axis, num_axes) of the contiguous axes of `big` that a tensor of shape `small` varies along, when it
        broadcasts over all the others (a Caffe Bias/Scale); None otherwise."""
        if len(small) > len(big):
            return None
        small = (1,) * (len(big) - len(small)) + tuple(small)
        if any(s not in (1, b) for s, b in zip(small, big)):
            return None
        varying = [i for i, s in enumerate(small) if s != 1]
        if not varying:
            return 0, 0
        first, last = varying[0], varying[-1]
        if any(small[i] != big[i] for i in range(first, last + 1)):
            return None
        return first, last - first + 1

    def _binary(self, node, a, operation):
        """Add, Sub, Mul, Div: Eltwise between equal shapes, Bias/Scale for a broadcast operand."""
        first, second = node.input[0], node.input[1]
        out_shape = self._shape(node, node.output[0])
        # before opset 7, `broadcast` with `axis` lines the second operand up from that axis, not from the end
        legacy_axis = a.get("axis") if self.opset < 7 and a.get("broadcast") else None
        x = None
        if first in self.const:
            first, second = second, first
            if operation in ("Sub", "Div"):  # c - x, c / x: -x, 1 / x (a Power layer), then Bias / Scale by c
                x = self._temporary(f"{node.output[0]}_{'negated' if operation == 'Sub' else 'inverted'}")
                flip = self._layer(f"{node.name}_{operation.lower()}", "Power", [self._blob(node, first)], [x])
                setattr(flip.power_param, "scale" if operation == "Sub" else "power", -1)
                operation = "Add" if operation == "Sub" else "Mul"
        if second in self.const:
            value = self.const[second].astype(np.float32)
            if legacy_axis is not None:
                value = value.reshape(_aligned(value.shape, len(out_shape), legacy_axis))
            if operation == "Sub":
                value, operation = -value, "Add"
            elif operation == "Div":
                value, operation = 1 / value, "Mul"
            if x is None and operation == "Add" and self._fuse_bias(node, first, value):
                return
            x = x or self._blob(node, first)
            axes = self._broadcast_axes(self._shape(node, first), value.shape)
            if axes is None or self._shape(node, first) != out_shape:
                self._refuse(node, f"constant of shape {_shape_text(value.shape)} does not broadcast over "
                                   f"{_shape_text(self._shape(node, first))} along contiguous axes, as Caffe's "
                                   f"Bias/Scale needs")
            if not out_shape:  # a 0-D blob, which Bias / Scale cannot take: Power's shift or scale
                layer = self._layer(node.name, "Power", [x], [node.output[0]])
                setattr(layer.power_param, "shift" if operation == "Add" else "scale", float(value.reshape(())))
                return
            axis, num_axes = axes
            kind = "Bias" if operation == "Add" else "Scale"
            layer = self._layer(node.name, kind, [x], [node.output[0]],
                                [value.reshape(out_shape[axis:axis + num_axes])])
            p = layer.bias_param if kind == "Bias" else layer.scale_param
            p.axis, p.num_axes = axis, num_axes
            return
        shapes = [self._shape(node, n) for n in (first, second)]
        if legacy_axis is not None:
            shapes[1] = _aligned(shapes[1], len(out_shape), legacy_axis)
        bottoms = [self._blob(node, n) for n in (first, second)]
        if operation == "Div":  # a * (1 / b)
            inverted = self._temporary(f"{second}_inverted")
            self._layer(f"{node.name}_invert", "Power", [bottoms[1]], [inverted]).power_param.power = -1
            bottoms[1], operation = inverted, "Mul"
        if shapes[0] == shapes[1]:
            layer = self._layer(node.name, "Eltwise", bottoms, [node.output[0]])
            layer.eltwise_param.operation = Eltwise.PROD if operation == "Mul" else Eltwise.SUM
            if operation == "Sub":
                layer.eltwise_param.coeff.extend([1, -1])
            return
        if operation == "Sub":  # a + (-b)
            negated = self._temporary(f"{second}_negated")
            self._layer(f"{node.name}_negate", "Power", [bottoms[1]], [negated]).power_param.scale = -1
            bottoms[1], operation = negated, "Add"
        big = 0 if shapes[0] == out_shape else 1
        axes = self._broadcast_axes(shapes[big], shapes[1 - big])
        if axes is None:
            self._refuse(node, f"broadcasting {_shape_text(shapes[0])} against {_shape_text(shapes[1])} has no "
                               f"Caffe counterpart")
        axis, num_axes = axes
        small = bottoms[1 - big]
        target = shapes[big][axis:axis + num_axes]
        if shapes[1 - big] != target:
            small = self._reshape_to(f"{node.name}_operand", small, shapes[1 - big], target)
        kind = "Bias" if operation == "Add" else "Scale"
        layer = self._layer(node.name, kind, [bottoms[big], small], [node.output[0]])
        p = layer.bias_param if kind == "Bias" else layer.scale_param
        p.axis = axis

    def _op_Add(self, node, a):
        self._binary(node, a, "Add")

    def _op_Sub(self, node, a):
        self._binary(node, a, "Sub")

    def _op_Mul(self, node, a):
        self._binary(node, a, "Mul")

    def _op_Div(self, node, a):
        self._binary(node, a, "Div")

    def _variadic(self, node, operation, bottoms=None, out=None, coeff=1.0):
        """Sum, Max, Mean, Min of inputs of one shape: an Eltwise layer (SUM with coefficients for Mean)."""
        shapes = {self._shape(node, n) for n in node.input}
        if len(shapes) != 1:
            self._refuse(node, f"inputs of different shapes ({', '.join(_shape_text(s) for s in shapes)}): "
                               f"Caffe's Eltwise does not broadcast")
        bottoms = bottoms or [self._blob(node, n) for n in node.input]
        if len(bottoms) == 1:
            self.alias[node.output[0]] = bottoms[0]
            return
        layer = self._layer(node.name, "Eltwise", bottoms, [out or node.output[0]])
        layer.eltwise_param.operation = operation
        if coeff != 1:
            layer.eltwise_param.coeff.extend([coeff] * len(bottoms))

    def _op_Sum(self, node, a):
        self._variadic(node, Eltwise.SUM)

    def _op_Mean(self, node, a):
        self._variadic(node, Eltwise.SUM, coeff=1 / len(node.input))

    def _op_Max(self, node, a):
        self._variadic(node, Eltwise.MAX)

    def _op_Min(self, node, a):
        """-max(-a, -b, ...): negations (Power scale -1) are exact."""
        if len(node.input) == 1:
            self._variadic(node, Eltwise.MAX)
            return
        negated = []
        for name in node.input:
            negated.append(self._temporary(f"{name}_negated"))
            self._layer(f"{node.name}_negate", "Power", [self._blob(node, name)], [negated[-1]]).power_param.scale = -1
        largest = self._temporary(f"{node.output[0]}_negated")
        self._variadic(node, Eltwise.MAX, negated, largest)
        self._layer(f"{node.name}_negate", "Power", [largest], [node.output[0]]).power_param.scale = -1

    # -- activations and normalization --------------------------------------------------------
    def _op_Clip(self, node, a):
        if self.opset < 11:
            low, high = a.get("min", -FLT_MAX), a.get("max", FLT_MAX)
        else:
            low = float(self._optional_constant(node, 1, "min", -FLT_MAX))
            high = float(self._optional_constant(node, 2, "max", FLT_MAX))
        layer = self._layer(node.name, "Clip", [self._blob(node, node.input[0])], [node.output[0]])
        layer.clip_param.min, layer.clip_param.max = max(low, -FLT_MAX), min(high, FLT_MAX)

    def _op_PRelu(self, node, a):
        slope = self._constant(node, 1, "slope")
        shape = self._shape(node, node.input[0])
        shared = slope.size == 1
        if self.opset < 7 and len(shape) > 1 and slope.shape == shape[1:2]:  # per channel before broadcasting
            slope = slope.reshape(slope.shape + (1,) * (len(shape) - 2))
        if not shared and (len(shape) < 2 or self._broadcast_axes(shape, slope.shape) != (1, 1)):
            self._refuse(node, f"slope of shape {_shape_text(slope.shape)}: Caffe's PReLU has one slope, or one "
                               f"per channel (axis 1)")
        layer = self._layer(node.name, "PReLU", [self._blob(node, node.input[0])], [node.output[0]],
                            [slope.reshape(() if shared else (-1,))])
        if shared:
            layer.prelu_param.channel_shared = True

    def _op_BatchNormalization(self, node, a):
        if self._extra_outputs_used(node) or a.get("training_mode", 0):
            self._refuse(node, "training-mode outputs (running mean and variance) have no Caffe counterpart")
        scale, bias, mean, var = (self._constant(node, i, what)
                                  for i, what in enumerate(("scale", "bias", "mean", "variance"), 1))
        channels = self._shape(node, node.input[0])[1:2]
        if not a.get("spatial", 1) or any(v.shape != channels for v in (scale, bias, mean, var)):
            self._refuse(node, "statistics per activation (spatial 0): Caffe's BatchNorm keeps one per channel")
        norm = self._layer(node.name, "BatchNorm", [self._blob(node, node.input[0])], [node.output[0]],
                           [mean, var, [1.0]])
        p = norm.batch_norm_param
        p.use_global_stats = True
        p.eps = a.get("epsilon", 1e-5)
        p.moving_average_fraction = a.get("momentum", 0.9)
        affine = self._layer(f"{node.name}_scale", "Scale", [node.output[0]], [node.output[0]], [scale, bias])
        affine.scale_param.bias_term = True

    def _op_LRN(self, node, a):
        size = a["size"]
        if size % 2 == 0:
            self._refuse(node, f"even size {size}: Caffe's LRN takes odd local sizes")
        if len(self._shape(node, node.input[0])) != 4:
            self._refuse(node, "Caffe's LRN takes 4-D blobs")
        layer = self._layer(node.name, "LRN", [self._blob(node, node.input[0])], [node.output[0]])
        p = layer.lrn_param
        p.local_size, p.alpha, p.beta, p.k = size, a.get("alpha", 1e-4), a.get("beta", 0.75), a.get("bias", 1.0)

    def _op_Softmax(self, node, a):
        shape = self._shape(node, node.input[0])
        axis = a.get("axis", -1 if self.opset >= 13 else 1) % len(shape)
        x = self._blob(node, node.input[0])
        if self.opset >= 13 or axis == len(shape) - 1:
            layer = self._layer(node.name, "Softmax", [x], [node.output[0]])
            layer.softmax_param.axis = axis
            return
        # before opset 13 Softmax normalizes over all the axes from `axis` on, taken as one
        flat_shape = shape[:axis] + (int(np.prod(shape[axis:])),)
        flat = self._reshape_to(f"{node.name}_flatten", x, shape, flat_shape)
        normalized = self._temporary(f"{node.output[0]}_flat")
        self._layer(node.name, "Softmax", [flat], [normalized]).softmax_param.axis = axis
        self._reshape_to(f"{node.name}_unflatten", normalized, flat_shape, shape, node.output[0])

    def _op_Dropout(self, node, a):
        if self._extra_outputs_used(node):
            self._refuse(node, "the mask output has no Caffe counterpart")
        ratio = a.get("ratio", 0.5) if self.opset < 12 else float(self._optional_constant(node, 1, "ratio", 0.5))
        layer = self._layer(node.name, "Dropout", [self._blob(node, node.input[0])], [node.output[0]])
        layer.dropout_param.dropout_ratio = ratio

    def _op_Identity(self, node, a):
        self.alias[node.output[0]] = self._blob(node, node.input[0])

    def _op_Cast(self, node, a):
        """A cast to a float type, of the integers or booleans ArgMax / Threshold give, or to the indices of a
        Gather (an Embed layer truncates them as the cast does) leaves the values."""
        types = self.onnx.TensorProto
        source = self.producer.get(self._blob(node, node.input[0]))
        if a["to"] not in (types.FLOAT, types.DOUBLE, types.FLOAT16) and not _only_indices(
                node.output[0], self.readers.get(node.output[0], [])) and (
                source is None or source.type not in ("ArgMax", "Threshold")):
            self._refuse(node, f"cast to {types.DataType.Name(a['to'])}: Caffe blobs hold floats")
        self._op_Identity(node, a)

    # -- shapes -------------------------------------------------------------------------------
    def _reshape_to(self, name, bottom, in_shape, out_shape, top=None):
        """A Reshape layer from `in_shape` to `out_shape` that keeps working for another batch size: the first
        axis is copied (0) when it stays, and inferred (-1) when it changes."""
        top = top or self._temporary(f"{bottom}_reshaped")
        layer = self._layer(name, "Reshape", [bottom], [top])
        dims = list(out_shape)
        if dims and in_shape and dims[0] == in_shape[0]:
            dims[0] = 0
        elif dims:
            dims[0] = -1
        layer.reshape_param.shape.dim.extend(dims)
        return top

    def _reshape(self, node):
        in_shape = self._shape(node, node.input[0])
        self._reshape_to(node.name, self._blob(node, node.input[0]), in_shape, self._shape(node, node.output[0]),
                         node.output[0])

    def _op_Flatten(self, node, a):
        if a.get("axis", 1) == 1 and len(self._shape(node, node.input[0])) > 1:
            self._layer(node.name, "Flatten", [self._blob(node, node.input[0])], [node.output[0]])
        else:
            self._reshape(node)

    def _op_Reshape(self, node, a):
        self._constant(node, 1, "target shape")
        self._reshape(node)

    def _op_Squeeze(self, node, a):
        self._reshape(node)

    def _op_Unsqueeze(self, node, a):
        self._reshape(node)

    def _op_Concat(self, node, a):
        axis = a["axis"] % len(self._shape(node, node.output[0]))
        layer = self._layer(node.name, "Concat", [self._blob(node, n) for n in node.input], [node.output[0]])
        layer.concat_param.axis = axis

    def _op_Split(self, node, a):
        shape = self._shape(node, node.input[0])
        axis = a.get("axis", 0) % len(shape)
        sizes = [self._shape(node, o)[axis] for o in node.output]
        layer = self._layer(node.name, "Slice", [self._blob(node, node.input[0])], list(node.output))
        layer.slice_param.axis = axis
        layer.slice_param.slice_point.extend(np.cumsum(sizes)[:-1].tolist())

    def _op_Slice(self, node, a):
        shape = self._shape(node, node.input[0])
        if self.opset < 10:
            starts, ends = a["starts"], a["ends"]
            axes, steps = a.get("axes", range(len(starts))), [1] * len(starts)
        else:
            starts, ends = self._constant(node, 1, "starts"), self._constant(node, 2, "ends")
            axes = self._optional_constant(node, 3, "axes", range(len(starts)))
            steps = self._optional_constant(node, 4, "steps", [1] * len(starts))
        cuts = []
        for start, end, axis, step in zip(starts, ends, axes, steps):
            axis = int(axis) % len(shape)
            begin, stop, step = slice(int(start), int(end), int(step)).indices(shape[axis])
            if step != 1:
                self._refuse(node, f"step {step} along axis {axis}: Caffe's Slice takes contiguous ranges")
            if stop <= begin:
                self._refuse(node, f"the range along axis {axis} is empty; Caffe blobs cannot be")
            if (begin, stop) != (0, shape[axis]):
                cuts.append((axis, begin, stop))
        self._cut(node, self._blob(node, node.input[0]), shape, cuts, node.output[0])

    def _cut(self, node, x, shape, cuts, out):
        """Blob `x` of `shape` cut to the ranges [begin, stop) of (axis, begin, stop) `cuts`, into blob `out`: one
        Slice layer per axis, whose other parts are left to the final Silence layer."""
        if not cuts:
            self.alias[out] = x
        for n, (axis, begin, stop) in enumerate(cuts):
            points = [p for p in (begin, stop) if 0 < p < shape[axis]]
            keep = out if n == len(cuts) - 1 else self._temporary(f"{out}_{axis}")
            tops = [self._temporary(f"{out}_unused") for _ in range(len(points) + 1)]
            tops[1 if begin else 0] = keep
            layer = self._layer(node.name, "Slice", [x], tops)
            layer.slice_param.axis = axis
            layer.slice_param.slice_point.extend(points)
            x = keep

    def _op_Tile(self, node, a):
        repeats = self._constant(node, 1, "repeats")
        x = self._blob(node, node.input[0])
        tiled = [(axis, int(n)) for axis, n in enumerate(repeats) if n != 1]
        if not tiled:
            self.alias[node.output[0]] = x
        for i, (axis, tiles) in enumerate(tiled):
            top = node.output[0] if i == len(tiled) - 1 else self._temporary(f"{node.output[0]}_{axis}")
            layer = self._layer(node.name, "Tile", [x], [top])
            layer.tile_param.axis, layer.tile_param.tiles = axis, tiles
            x = top

    # -- reductions and comparisons -----------------------------------------------------------
    def _reduce(self, node, a, operation):
        shape = self._shape(node, node.input[0])
        if "axes" in a:
            axes = a["axes"]
        else:
            axes = self._optional_constant(node, 1, "axes", [])
            if not len(axes) and a.get("noop_with_empty_axes", 0):
                self.alias[node.output[0]] = self._blob(node, node.input[0])
                return
        axes = sorted(int(axis) % len(shape) for axis in axes) or list(range(len(shape)))
        if axes != list(range(axes[0], len(shape))):
            self._refuse(node, f"axes {axes} of a {len(shape)}-D input: Caffe's Reduction reduces all the axes "
                               f"from one on")
        out = node.output[0]
        top = self._temporary(f"{out}_reduced") if a.get("keepdims", 1) else out
        layer = self._layer(node.name, "Reduction", [self._blob(node, node.input[0])], [top])
        layer.reduction_param.operation = operation
        layer.reduction_param.axis = axes[0]
        if top != out:
            self._reshape_to(f"{node.name}_keepdims", top, shape[:axes[0]], self._shape(node, out), out)

    def _op_ReduceSum(self, node, a):
        self._reduce(node, a, caffe_pb2.ReductionParameter.SUM)

    def _op_ReduceMean(self, node, a):
        self._reduce(node, a, caffe_pb2.ReductionParameter.MEAN)

    def _op_ReduceSumSquare(self, node, a):
        self._reduce(node, a, caffe_pb2.ReductionParameter.SUMSQ)

    def _op_ReduceL1(self, node, a):
        self._reduce(node, a, caffe_pb2.ReductionParameter.ASUM)

    def _op_ArgMax(self, node, a):
        if a.get("select_last_index", 0):
            self._refuse(node, "select_last_index has no Caffe counterpart")
        shape = self._shape(node, node.input[0])
        axis = a.get("axis", 0) % len(shape)
        out = node.output[0]
        top = out if a.get("keepdims", 1) else self._temporary(f"{out}_kept")
        layer = self._layer(node.name, "ArgMax", [self._blob(node, node.input[0])], [top])
        layer.argmax_param.axis = axis
        if top != out:
            kept = shape[:axis] + (1,) + shape[axis + 1:]
            self._reshape_to(f"{node.name}_squeeze", top, kept, self._shape(node, out), out)

    def _scalar_operand(self, node):
        kind, field, key = SCALAR_OPERAND[node.op_type]
        value = self._constant(node, 1, key)
        if value.size != 1:
            self._refuse(node, f"a non-scalar {key} has no Caffe counterpart ({kind} takes one)")
        layer = self._layer(node.name, kind, [self._blob(node, node.input[0])], [node.output[0]])
        setattr(getattr(layer, field), key, float(value.reshape(())))

    def _op_Pad(self, node, a):
        """Zero padding of the spatial axes, for the convolutions that read it (Caffe has no Pad layer)."""
        rank = len(self._shape(node, node.input[0]))
        if self.opset < 11:
            pads, value = a["pads"], a.get("value", 0.0)
        else:
            pads = self._constant(node, 1, "pads")
            value = self._optional_constant(node, 2, "constant value", 0.0)
            axes = self._optional_constant(node, 3, "axes", range(rank))
            full = np.zeros(2 * rank, dtype=np.int64)
            for i, axis in enumerate(int(axis) % rank for axis in axes):
                full[axis], full[rank + axis] = pads[i], pads[len(axes) + i]
            pads = full
        if a.get("mode", "constant") != "constant" or np.any(np.asarray(value) != 0):
            self._refuse(node, "only zero padding has a Caffe counterpart (a Convolution's pad)")
        if any(pads[:2]) or any(pads[rank:rank + 2]) or min(pads) < 0:
            self._refuse(node, f"pads {list(pads)}: Caffe pads only the spatial axes, by non-negative amounts")
        self.zero_pads[node.output[0]] = (node, node.input[0], list(pads[2:rank]), list(pads[rank + 2:]))

    def _op_Gather(self, node, a):
        """Rows of a constant table picked by computed indices: Embed."""
        table = self._constant(node, 0, "table (data)")
        if table.ndim != 2 or a.get("axis", 0) != 0:
            self._refuse(node, "Caffe's Embed picks rows (axis 0) of a 2-D table")
        layer = self._layer(node.name, "Embed", [self._blob(node, node.input[1])], [node.output[0]], [table])
        p = layer.embed_param
        p.input_dim, p.num_output, p.bias_term = table.shape[0], table.shape[1], False

    def _op_Resize(self, node, a):
        """Nearest-neighbour upsampling by whole factors: a Deconvolution whose fixed one-hot kernels copy each
        pixel into its factor-by-factor block (output size factor x input, as ONNX computes it)."""
        in_shape, out_shape = self._shape(node, node.input[0]), self._shape(node, node.output[0])
        # Upsample and Resize before opset 11 map output pixel i to input pixel floor(i / factor)
        coordinates = a.get("coordinate_transformation_mode", "asymmetric" if node.op_type == "Upsample" or
                            self.opset < 11 else "half_pixel")
        rounding = a.get("nearest_mode", "floor" if coordinates == "asymmetric" else "round_prefer_floor")
        factors = [o // i for i, o in zip(in_shape, out_shape)]
        if a.get("mode", "nearest") != "nearest" or len(in_shape) != 4 or factors[:2] != [1, 1] or any(
                i * f != o for i, f, o in zip(in_shape, factors, out_shape)):
            self._refuse(node, f"{a.get('mode', 'nearest')} resizing of {_shape_text(in_shape)} to "
                               f"{_shape_text(out_shape)}: Caffe upsamples (a Deconvolution) only 4-D blobs, "
                               f"nearest, by whole factors of the spatial axes")
        if (coordinates, rounding) not in (("asymmetric", "floor"), ("half_pixel", "round_prefer_floor"),
                                           ("half_pixel", "round_prefer_ceil"),
                                           ("pytorch_half_pixel", "round_prefer_floor"),
                                           ("pytorch_half_pixel", "round_prefer_ceil")):
            self._refuse(node, f"coordinate_transformation_mode '{coordinates}' with nearest_mode '{rounding}' "
                               f"does not copy each pixel into its block")
        channels, kernel = in_shape[1], factors[2:]
        layer = self._layer(node.name, "Deconvolution", [self._blob(node, node.input[0])], [node.output[0]],
                            [np.ones((channels, 1, *kernel))])
        p = layer.convolution_param
        p.num_output, p.group, p.bias_term = channels, channels, False
        self._per_axis(p, "kernel_size", kernel)
        self._per_axis(p, "stride", kernel, 1)
        layer.param.add(lr_mult=0, decay_mult=0)

    _op_Upsample = _op_Resize
