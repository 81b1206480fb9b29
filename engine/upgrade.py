"""Caffe's format upgrades, applied to every net and solver as it is read (Caffe's upgrade_proto).

Nets: V0 (`layers { layer { type: "conv" } }`, separate padding layers) -> V1, data-transform fields ->
`transform_param`, V1 (`layers { type: CONVOLUTION }`, `blobs_lr`, ...) -> V2 (`layer { type: "Convolution" }`),
legacy net inputs (`input:` + `input_dim:`/`input_shape:`) -> an Input layer, BatchNorm's old three `param {}`
-> lr_mult = decay_mult = 0. Solvers: the `solver_type` enum -> the `type` string. Text files written for
a common fork spelling (`pooling_param { ceil_mode: ... }`) are rewritten before parsing.
Every upgrade is logged with the file it came from.
"""
import re

from ..proto import caffe_pb2
from .errors import KaffeError
from .log import logger

# V0 layer type strings -> V1 LayerType enum names.
V0_LAYER_TYPES = {
    "accuracy": "ACCURACY", "bnll": "BNLL", "concat": "CONCAT", "conv": "CONVOLUTION", "data": "DATA",
    "dropout": "DROPOUT", "euclidean_loss": "EUCLIDEAN_LOSS", "flatten": "FLATTEN", "hdf5_data": "HDF5_DATA",
    "hdf5_output": "HDF5_OUTPUT", "im2col": "IM2COL", "images": "IMAGE_DATA", "infogain_loss": "INFOGAIN_LOSS",
    "innerproduct": "INNER_PRODUCT", "lrn": "LRN", "multinomial_logistic_loss": "MULTINOMIAL_LOGISTIC_LOSS",
    "pool": "POOLING", "relu": "RELU", "sigmoid": "SIGMOID", "softmax": "SOFTMAX", "softmax_loss": "SOFTMAX_LOSS",
    "split": "SPLIT", "tanh": "TANH", "window_data": "WINDOW_DATA",
}

# V1 LayerType enum names -> V2 type strings (every value of the enum).
V1_LAYER_TYPES = {
    "NONE": "", "ABSVAL": "AbsVal", "ACCURACY": "Accuracy", "ARGMAX": "ArgMax", "BNLL": "BNLL",
    "CONCAT": "Concat", "CONTRASTIVE_LOSS": "ContrastiveLoss", "CONVOLUTION": "Convolution",
    "DECONVOLUTION": "Deconvolution", "DATA": "Data", "DROPOUT": "Dropout", "DUMMY_DATA": "DummyData",
    "EUCLIDEAN_LOSS": "EuclideanLoss", "ELTWISE": "Eltwise", "EXP": "Exp", "FLATTEN": "Flatten",
    "HDF5_DATA": "HDF5Data", "HDF5_OUTPUT": "HDF5Output", "HINGE_LOSS": "HingeLoss", "IM2COL": "Im2col",
    "IMAGE_DATA": "ImageData", "INFOGAIN_LOSS": "InfogainLoss", "INNER_PRODUCT": "InnerProduct", "LRN": "LRN",
    "MEMORY_DATA": "MemoryData", "MULTINOMIAL_LOGISTIC_LOSS": "MultinomialLogisticLoss", "MVN": "MVN",
    "POOLING": "Pooling", "POWER": "Power", "RELU": "ReLU", "SIGMOID": "Sigmoid",
    "SIGMOID_CROSS_ENTROPY_LOSS": "SigmoidCrossEntropyLoss", "SILENCE": "Silence", "SOFTMAX": "Softmax",
    "SOFTMAX_LOSS": "SoftmaxWithLoss", "SPLIT": "Split", "SLICE": "Slice", "TANH": "TanH",
    "WINDOW_DATA": "WindowData", "THRESHOLD": "Threshold",
}

# V0 layer fields -> {V0 type: (V1 sub-message, field)}; a field set on another type is dropped with an error log.
_V0_FIELDS = {
    "num_output": {"conv": ("convolution_param", "num_output"),
                   "innerproduct": ("inner_product_param", "num_output")},
    "biasterm": {"conv": ("convolution_param", "bias_term"), "innerproduct": ("inner_product_param", "bias_term")},
    "weight_filler": {"conv": ("convolution_param", "weight_filler"),
                      "innerproduct": ("inner_product_param", "weight_filler")},
    "bias_filler": {"conv": ("convolution_param", "bias_filler"),
                    "innerproduct": ("inner_product_param", "bias_filler")},
    "pad": {"conv": ("convolution_param", "pad"), "pool": ("pooling_param", "pad")},
    "kernelsize": {"conv": ("convolution_param", "kernel_size"), "pool": ("pooling_param", "kernel_size")},
    "group": {"conv": ("convolution_param", "group")},
    "stride": {"conv": ("convolution_param", "stride"), "pool": ("pooling_param", "stride")},
    "pool": {"pool": ("pooling_param", "pool")},
    "dropout_ratio": {"dropout": ("dropout_param", "dropout_ratio")},
    "local_size": {"lrn": ("lrn_param", "local_size")},
    "alpha": {"lrn": ("lrn_param", "alpha")},
    "beta": {"lrn": ("lrn_param", "beta")},
    "k": {"lrn": ("lrn_param", "k")},
    "source": {"data": ("data_param", "source"), "hdf5_data": ("hdf5_data_param", "source"),
               "images": ("image_data_param", "source"), "window_data": ("window_data_param", "source"),
               "infogain_loss": ("infogain_loss_param", "source")},
    "batchsize": {"data": ("data_param", "batch_size"), "hdf5_data": ("hdf5_data_param", "batch_size"),
                  "images": ("image_data_param", "batch_size"), "window_data": ("window_data_param", "batch_size")},
    "rand_skip": {"data": ("data_param", "rand_skip"), "images": ("image_data_param", "rand_skip")},
    "shuffle_images": {"images": ("image_data_param", "shuffle")},
    "new_height": {"images": ("image_data_param", "new_height")},
    "new_width": {"images": ("image_data_param", "new_width")},
    "concat_dim": {"concat": ("concat_param", "concat_dim")},
    "det_fg_threshold": {"window_data": ("window_data_param", "fg_threshold")},
    "det_bg_threshold": {"window_data": ("window_data_param", "bg_threshold")},
    "det_fg_fraction": {"window_data": ("window_data_param", "fg_fraction")},
    "det_context_pad": {"window_data": ("window_data_param", "context_pad")},
    "det_crop_mode": {"window_data": ("window_data_param", "crop_mode")},
    "hdf5_output_param": {"hdf5_output": ("hdf5_output_param", None)},
}
# V0 fields that go to transform_param whatever the layer type.
_V0_TRANSFORM_FIELDS = {"scale": "scale", "meanfile": "mean_file", "cropsize": "crop_size", "mirror": "mirror"}

# V1 data layers whose own parameter message held the transformation fields.
_DATA_TRANSFORM_PARAMS = {"DATA": "data_param", "IMAGE_DATA": "image_data_param",
                          "WINDOW_DATA": "window_data_param"}
_TRANSFORM_FIELDS = ("scale", "mean_file", "crop_size", "mirror")

_LEGACY_SOLVER_TYPES = {"SGD": "SGD", "NESTEROV": "Nesterov", "ADAGRAD": "AdaGrad", "RMSPROP": "RMSProp",
                        "ADADELTA": "AdaDelta", "ADAM": "Adam"}

# Fields and layer types of widespread Caffe forks, for a helpful error message.
_FORKS = {"ssd": "SSD (weiliu89/caffe)", "rcnn": "Fast/Faster R-CNN (rbgirshick/caffe-fast-rcnn)",
          "segnet": "SegNet (alexgkendall/caffe-segnet)", "deeplab": "DeepLab / PSPNet",
          "yolo": "YOLO ports of Caffe"}
_FORK_FIELDS = {
    "permute_param": "ssd", "prior_box_param": "ssd", "detection_output_param": "ssd",
    "multibox_loss_param": "ssd", "normalize_param": "ssd", "annotated_data_param": "ssd",
    "detection_evaluate_param": "ssd", "roi_pooling_param": "rcnn", "smooth_l1_loss_param": "rcnn",
    "bn_param": "segnet", "upsample_param": "segnet", "interp_param": "deeplab", "region_param": "yolo",
    "reorg_param": "yolo",
}
_FORK_LAYER_TYPES = {
    "PriorBox": "ssd", "Permute": "ssd", "DetectionOutput": "ssd", "MultiBoxLoss": "ssd", "Normalize": "ssd",
    "AnnotatedData": "ssd", "DetectionEvaluate": "ssd", "ROIPooling": "rcnn", "SmoothL1Loss": "rcnn",
    "BN": "segnet", "Upsample": "segnet", "Interp": "deeplab", "Region": "yolo", "Reorg": "yolo",
}


def _log_step(source, what):
    logger.info(f"{source}: upgraded {what}")


# -- nets ----------------------------------------------------------------------------------------
def net_needs_v0_upgrade(param):
    return any(layer.HasField("layer") for layer in param.layers)


def net_needs_data_upgrade(param):
    for layer in param.layers:
        field = _DATA_TRANSFORM_PARAMS.get(caffe_pb2.V1LayerParameter.LayerType.Name(layer.type))
        if field and any(getattr(layer, field).HasField(f) for f in _TRANSFORM_FIELDS):
            return True
    return False


def net_needs_batchnorm_upgrade(param):
    return any(layer.type == "BatchNorm" and len(layer.param) == 3 for layer in param.layer)


def upgrade_net_param(param, source="net"):
    """Upgrade a NetParameter of any generation in place (Caffe's UpgradeNetAsNeeded, in its order).

    Returns the list of upgrades done; each one is logged naming `source`.
    """
    done = []
    if net_needs_v0_upgrade(param):
        _upgrade_v0_net(param)
        done.append("V0LayerParameter (layers { layer { type: \"conv\" } }) to V1")
    if net_needs_data_upgrade(param):
        _upgrade_data_transformation(param)
        done.append("data transformation fields (scale/mean_file/crop_size/mirror) into transform_param")
    if len(param.layers):
        _upgrade_v1_net(param, source)
        done.append("V1LayerParameter (layers { type: ENUM }, blobs_lr, weight_decay) to "
                    "LayerParameter (layer { type: \"String\" })")
    if len(param.input):
        _upgrade_net_input(param, source)
        done.append("net input fields (input/input_dim/input_shape) to an Input layer")
    if net_needs_batchnorm_upgrade(param):
        _upgrade_batchnorm(param)
        done.append("BatchNorm layers' three param {} specs to lr_mult: 0 decay_mult: 0")
    for what in done:
        _log_step(source, what)
    if done:
        logger.info(f"{source}: use `kaffe upgrade_net_proto_text` (prototxt) or `kaffe upgrade_net_proto_binary` "
                    f"(weights) to save the upgraded file")
    return done


def _upgrade_v0_padding_layers(param):
    """Fold each V0 "padding" layer into the pad of the conv/pool layer that reads its output."""
    connections = list(param.layers)
    last_writer = {name: None for name in param.input}
    kept = []
    for index, connection in enumerate(connections):
        v0 = connection.layer
        if v0.type != "padding":
            kept.append(connection)
        for j, blob_name in enumerate(connection.bottom):
            if blob_name not in last_writer:
                raise KaffeError(f"Unknown blob input {blob_name} to layer '{v0.name}' (bottom {j})")
            writer = last_writer[blob_name]
            if writer is None or connections[writer].layer.type != "padding":
                continue
            padding = connections[writer]
            if v0.type not in ("conv", "pool"):
                raise KaffeError(f"Padding layer input to non-convolutional / non-pooling layer type {v0.type} "
                                 f"(layer '{v0.name}')")
            if len(connection.bottom) != 1 or len(padding.bottom) != 1 or len(padding.top) != 1:
                raise KaffeError(f"layer '{v0.name}': a V0 padding layer must have one bottom and one top, and "
                                 f"feed a conv/pool layer with a single bottom")
            connection.layer.pad = padding.layer.pad
            connection.bottom[j] = padding.bottom[0]
        for blob_name in connection.top:
            last_writer[blob_name] = index
    return kept


def _set_field(message, field, value):
    descriptor = message.DESCRIPTOR.fields_by_name[field]
    if descriptor.is_repeated:
        getattr(message, field).append(value)
    elif descriptor.message_type is not None:
        getattr(message, field).CopyFrom(value)
    elif descriptor.enum_type is not None and isinstance(value, int):
        # V0's PoolMethod and PoolingParameter's share their names, not necessarily their numbers
        source_name = caffe_pb2.V0LayerParameter.PoolMethod.Name(value)
        setattr(message, field, descriptor.enum_type.values_by_name[source_name].number)
    else:
        setattr(message, field, value)


def _upgrade_v0_layer(connection):
    v1 = caffe_pb2.V1LayerParameter()
    v1.bottom.extend(connection.bottom)
    v1.top.extend(connection.top)
    if not connection.HasField("layer"):
        return v1
    v0 = connection.layer
    if v0.HasField("name"):
        v1.name = v0.name
    if v0.HasField("type"):
        if v0.type not in V0_LAYER_TYPES:
            raise KaffeError(f"Unknown V0 layer type: '{v0.type}' (layer '{v0.name}')")
        v1.type = caffe_pb2.V1LayerParameter.LayerType.Value(V0_LAYER_TYPES[v0.type])
    v1.blobs.extend(v0.blobs)
    v1.blobs_lr.extend(v0.blobs_lr)
    v1.weight_decay.extend(v0.weight_decay)
    for field, targets in _V0_FIELDS.items():
        if not v0.HasField(field):
            continue
        if v0.type not in targets:
            logger.error(f"Unknown parameter {field} for layer type {v0.type} (layer '{v0.name}'): dropped")
            continue
        message_name, target_field = targets[v0.type]
        value = getattr(v0, field)
        if target_field is None:
            getattr(v1, message_name).CopyFrom(value)
        else:
            _set_field(getattr(v1, message_name), target_field, value)
    for field, target_field in _V0_TRANSFORM_FIELDS.items():
        if v0.HasField(field):
            setattr(v1.transform_param, target_field, getattr(v0, field))
    return v1


def _upgrade_v0_net(param):
    kept = _upgrade_v0_padding_layers(param)
    upgraded = [_upgrade_v0_layer(connection) for connection in kept]
    name, inputs, dims = param.name, list(param.input), list(param.input_dim)
    force_backward = param.force_backward if param.HasField("force_backward") else None
    param.Clear()
    if name:
        param.name = name
    param.layers.extend(upgraded)
    param.input.extend(inputs)
    param.input_dim.extend(dims)
    if force_backward is not None:
        param.force_backward = force_backward


def _upgrade_data_transformation(param):
    for layer in param.layers:
        field = _DATA_TRANSFORM_PARAMS.get(caffe_pb2.V1LayerParameter.LayerType.Name(layer.type))
        if not field:
            continue
        data_param = getattr(layer, field)
        for name in _TRANSFORM_FIELDS:
            if data_param.HasField(name):
                setattr(layer.transform_param, name, getattr(data_param, name))
                data_param.ClearField(name)


# V1 sub-messages carried over unchanged: every `*_param` that the current LayerParameter also has.
_V1_PARAM_MESSAGES = tuple(
    f.name for f in caffe_pb2.V1LayerParameter.DESCRIPTOR.fields
    if f.message_type is not None and f.name.endswith("_param")
    and f.name in caffe_pb2.LayerParameter.DESCRIPTOR.fields_by_name)


def _param_spec(layer, index):
    while len(layer.param) <= index:
        layer.param.add()
    return layer.param[index]


def _upgrade_v1_layer(v1, layer):
    layer.bottom.extend(v1.bottom)
    layer.top.extend(v1.top)
    if v1.HasField("name"):
        layer.name = v1.name
    layer.include.extend(v1.include)
    layer.exclude.extend(v1.exclude)
    if v1.HasField("type"):
        layer.type = V1_LAYER_TYPES[caffe_pb2.V1LayerParameter.LayerType.Name(v1.type)]
    # weights move (not copy) so that a large V1 .caffemodel is not held twice
    layer.blobs.extend(v1.blobs)
    del v1.blobs[:]
    for i, name in enumerate(v1.param):
        _param_spec(layer, i).name = name
    for i, mode in enumerate(v1.blob_share_mode):
        _param_spec(layer, i).share_mode = caffe_pb2.ParamSpec.DimCheckMode.Value(
            caffe_pb2.V1LayerParameter.DimCheckMode.Name(mode))
    for i, lr in enumerate(v1.blobs_lr):
        _param_spec(layer, i).lr_mult = lr
    for i, decay in enumerate(v1.weight_decay):
        _param_spec(layer, i).decay_mult = decay
    layer.loss_weight.extend(v1.loss_weight)
    for field in _V1_PARAM_MESSAGES:
        if v1.HasField(field):
            getattr(layer, field).CopyFrom(getattr(v1, field))
    if v1.HasField("layer"):
        logger.error(f"layer '{v1.name}': V1 layer also holds a V0 layer definition; ignoring it")


def _upgrade_v1_net(param, source):
    if len(param.layer):
        raise KaffeError(f"{source}: refusing to upgrade an inconsistent NetParameter: it has both 'layer' and "
                         f"'layers' fields. The current format uses layer {{ type: \"Layer\" ... }}, not "
                         f"layers {{ type: LAYER ... }}; switch the definition to the 'layer' format by hand")
    for v1 in param.layers:
        _upgrade_v1_layer(v1, param.layer.add())
    param.ClearField("layers")


def _upgrade_net_input(param, source):
    """Legacy `input` fields -> one Input layer named "input", first in the net; `input` alone is dropped."""
    inputs, shapes, dims = list(param.input), list(param.input_shape), list(param.input_dim)
    if shapes or dims:
        if shapes and len(shapes) != len(inputs):
            raise KaffeError(f"{source}: {len(inputs)} input blobs but {len(shapes)} input_shape entries")
        if not shapes and len(dims) != 4 * len(inputs):
            raise KaffeError(f"{source}: input_dim must give 4 values per input: {len(inputs)} inputs, "
                             f"{len(dims)} input_dim values")
        layer = caffe_pb2.LayerParameter(name="input", type="Input", top=inputs)
        for i in range(len(inputs)):
            shape = layer.input_param.shape.add()
            if shapes:
                shape.CopyFrom(shapes[i])
            else:
                shape.dim.extend(dims[4 * i:4 * i + 4])
        layers = list(param.layer)
        del param.layer[:]
        param.layer.append(layer)
        param.layer.extend(layers)
    param.ClearField("input")
    param.ClearField("input_shape")
    param.ClearField("input_dim")


def _upgrade_batchnorm(param):
    for layer in param.layer:
        if layer.type == "BatchNorm" and len(layer.param) == 3:
            for spec in layer.param:
                spec.lr_mult = 0
                spec.decay_mult = 0


# -- solvers -------------------------------------------------------------------------------------
def upgrade_solver_param(param, source="solver"):
    """Turn the legacy `solver_type` enum into the `type` string (Caffe's UpgradeSolverAsNeeded)."""
    if not param.HasField("solver_type"):
        return False
    if param.HasField("type"):
        raise KaffeError(f"{source}: Failed to upgrade solver: old solver_type field (enum) and new type field "
                         f"(string) cannot be both specified (solver_type: "
                         f"{caffe_pb2.SolverParameter.SolverType.Name(param.solver_type)}, type: \"{param.type}\")")
    param.type = _LEGACY_SOLVER_TYPES[caffe_pb2.SolverParameter.SolverType.Name(param.solver_type)]
    param.ClearField("solver_type")
    _log_step(source, f"the solver_type enum to type: \"{param.type}\"")
    return True


# -- fork spellings and messages -----------------------------------------------------------------
_TOKEN = re.compile(r"""(?P<comment>\#[^\n]*)
                      |(?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
                      |(?P<ident>[A-Za-z_][A-Za-z0-9_]*)
                      |(?P<number>[-+]?[0-9][0-9A-Za-z_.+-]*)
                      |(?P<open>[{<])|(?P<close>[}>])|(?P<colon>:)|(?P<other>\S)""", re.VERBOSE)
_TRUE, _FALSE = ("true", "True", "t", "1"), ("false", "False", "f", "0")


def _tokens(text):
    return [(m.lastgroup, m.group(), m.start(), m.end()) for m in _TOKEN.finditer(text)
            if m.lastgroup != "comment"]


def rewrite_fork_spellings(text, source="<string>"):
    """`pooling_param { ceil_mode: true|false }` (a fork's spelling) -> `round_mode: CEIL|FLOOR`.

    Only that field, directly inside a pooling_param block, is rewritten, on its own line, so that parse
    errors still point at the right line; every other unknown field stays a parse error.
    """
    if "ceil_mode" not in text:
        return text
    tokens = _tokens(text)
    stack, edits = [], []
    for i, (kind, value, start, _) in enumerate(tokens):
        if kind == "open":
            j = i - 1 if i and tokens[i - 1][0] != "colon" else i - 2
            stack.append(tokens[j][1] if j >= 0 and tokens[j][0] == "ident" else None)
        elif kind == "close":
            if stack:
                stack.pop()
        elif (kind == "ident" and value == "ceil_mode" and stack and stack[-1] == "pooling_param"
              and i + 2 < len(tokens) and tokens[i + 1][0] == "colon" and tokens[i + 2][1] in _TRUE + _FALSE):
            mode = "CEIL" if tokens[i + 2][1] in _TRUE else "FLOOR"
            edits.append((start, tokens[i + 2][3], f"round_mode: {mode}"))
    for start, end, replacement in edits:
        line = text.count("\n", 0, start) + 1
        _log_step(source, f"pooling_param {{ {text[start:end]} }} (line {line}, a Caffe fork's spelling) "
                          f"to {replacement}")
    for start, end, replacement in reversed(edits):
        text = text[:start] + replacement + text[end:]
    return text


def unknown_field_hint(field):
    """Why a field is unknown: most unknown `*_param` fields come from a Caffe fork."""
    fork = _FORK_FIELDS.get(field)
    if fork:
        return (f" '{field}' is not in BVLC Caffe's schema: it comes from the {_FORKS[fork]} fork of Caffe, "
                f"which kaffe does not implement")
    if field.endswith("_param"):
        return (f" '{field}' is not in BVLC Caffe's schema: it comes from a Caffe fork, which kaffe does not "
                f"implement (kaffe reads BVLC Caffe master's format)")
    return ""


def unknown_layer_type_hint(type_name):
    fork = _FORK_LAYER_TYPES.get(type_name)
    if fork:
        return (f" '{type_name}' is not a BVLC Caffe layer type: it comes from the {_FORKS[fork]} fork of Caffe, "
                f"which kaffe does not implement.")
    return ""


def check_layer_types(param, path):
    """Fail on an unregistered layer type with file:line (found by a search of the text), before building."""
    from .layer import create_layer, layer_type_list
    known = set(layer_type_list())
    for layer in param.layer:
        if layer.type in known:
            continue
        try:
            create_layer(layer)
        except KaffeError as e:
            message = str(e)
        else:
            continue
        where = path
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
            match = re.search(r"\btype\s*:\s*[\"']" + re.escape(layer.type) + r"[\"']", text)
            if match:
                where = f"{path}:{text.count(chr(10), 0, match.start()) + 1}"
        except OSError:
            pass
        head, known_sep, known_list = message.partition(" Known types:")
        raise KaffeError(f"{where}: {head}{unknown_layer_type_hint(layer.type)}{known_sep}{known_list}")
