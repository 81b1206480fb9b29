"""Net: a DAG of layers built from a NetParameter, with Caffe's set-up rules and pycaffe's Python API."""
import collections
import os

import numpy as np

from ..proto import caffe_pb2
from .blob import Blob, proto_shape
from .errors import KaffeError, KaffeIndexError, KaffeValueError
from .graph import filter_net, insert_splits
from .io import read_binary_proto, read_text_proto
from .layer import create_layer
from .optimize import forward_plan
from .log import logger
from .pycaffe import NetBatches
from .memory_limits import BlobShapeError, check_total, net_holding, total_bytes
from .upgrade import check_layer_types, upgrade_net_param

AUTOMATIC_TOP = "(automatic)"


def read_net_param(path):
    """A NetParameter from a prototxt file of any format generation, upgraded (Caffe's ReadNetParamsFromTextFile)."""
    param = read_text_proto(path, caffe_pb2.NetParameter())
    upgrade_net_param(param, source=path)
    check_layer_types(param, path)
    return param


def read_weights_param(path):
    """A NetParameter with weights from a binary .caffemodel (or a .caffemodel.h5)."""
    if _is_hdf5(path):
        return None
    param = read_binary_proto(path, caffe_pb2.NetParameter())
    if not len(param.layer) and not len(param.layers):
        raise KaffeError(f"{path}: not a Caffe model: the file holds no layers "
                         f"(expected a binary NetParameter with weights, a .caffemodel)")
    upgrade_net_param(param, source=path)
    return param


def _is_hdf5(path):
    try:
        with open(path, "rb") as f:
            return f.read(8) == b"\x89HDF\r\n\x1a\n"
    except (OSError, ValueError):   # ValueError: a path with a NUL byte
        return False


def _format_number(value):
    return format(float(value), ".6g")


class Net(NetBatches):
    """Net(model, phase) / Net(model, weights, phase) / Net(model, phase=TEST, weights=..., level=, stages=).

    `model` is a prototxt path or a NetParameter. The Caffe names are kept: blobs, params, layers, inputs,
    outputs, forward, backward, copy_from, save, reshape.
    """

    def __init__(self, model, *args, phase=None, weights=None, level=0, stages=None, allow_python_layers=True,
                 optimize=None, keep=()):
        if len(args) == 2:          # legacy pycaffe form: Net(model, weights, phase)
            weights, phase = args
        elif len(args) == 1:
            if isinstance(args[0], str):
                weights = args[0]
            else:
                phase = args[0]
        elif args:
            raise TypeError("Net(model, [weights], phase)")
        if isinstance(model, caffe_pb2.NetParameter):
            param = caffe_pb2.NetParameter()
            param.CopyFrom(model)
            if phase is not None:
                param.state.phase = phase
        else:
            if phase is None:
                raise TypeError("Net(model, phase): phase (kaffe.TRAIN or kaffe.TEST) is required")
            param = read_net_param(os.fspath(model))
            param.state.phase = phase
            param.state.level = level
            for stage in stages or ():
                param.state.stage.append(stage)
        if not allow_python_layers:   # for model files from strangers: a Python layer would run their code
            from ..layers.python_layer import refuse_python_layers
            refuse_python_layers(param, model if isinstance(model, (str, os.PathLike)) else f"net '{param.name}'")
        self._init(param)
        # the deploy-time optimiser (engine/optimize.py): "safe" for TEST nets unless asked otherwise
        self._plan = forward_plan(self, optimize, keep)
        if weights:
            self.copy_from(weights)

    @classmethod
    def from_onnx(cls, model, phase, batch=None):
        """A net with its weights from an ONNX model (a path or onnx.ModelProto); see engine/onnx_import.py."""
        from .onnx_import import import_onnx
        param, weights = import_onnx(model, batch=batch)
        net = cls(param, phase)
        net.copy_trained_layers_from(weights)
        return net

    def to_onnx(self, path=None, opset=None, batch=None):
        """The net (TEST phase) as an onnx.ModelProto, written to `path` when given; see engine/onnx_export.py."""
        from .onnx_export import export_onnx
        return export_onnx(self, path, opset=opset, batch=batch)

    # -- construction (Caffe's Net::Init) ------------------------------------------------------
    def _init(self, in_param):
        self.phase = in_param.state.phase
        param = insert_splits(filter_net(in_param))
        self.param = param
        self.name = param.name
        self.layers = []
        self._layer_names = []
        self._blobs = []
        self._blob_names = []
        self._blob_need_backward = []
        self.bottom_vecs, self.top_vecs = [], []
        self.bottom_ids, self.top_ids = [], []
        self.bottom_need_backward = []
        self.layer_need_backward = []
        self._blob_loss_weights = []
        self._input_ids = []
        self._params = []            # every parameter blob, in layer order
        self._param_owners = []      # -1, or the index of the blob it shares
        self._param_layer_indices = []
        self._param_names_index = {}
        self.learnable_params = []
        self.flat_params = None   # a GPU-mode solver's flat device buffers of the parameters (solvers/flat_update.py)
        self.learnable_param_ids = []
        self.params_lr = []
        self.params_weight_decay = []
        self._has_params_lr = []
        self._has_params_decay = []
        blob_index = {}
        available = set()
        memory = 0
        for layer_id, layer_param in enumerate(param.layer):
            if not layer_param.HasField("phase"):
                layer_param.phase = self.phase
            if len(layer_param.propagate_down) and len(layer_param.propagate_down) != len(layer_param.bottom):
                raise KaffeError(f"layer '{layer_param.name}': propagate_down param must be specified either 0 "
                                 f"or bottom_size times ({len(layer_param.bottom)})")
            layer = create_layer(layer_param)
            self.layers.append(layer)
            self._layer_names.append(layer_param.name)
            logger.info(f"Creating Layer {layer_param.name}")
            self.bottom_vecs.append([])
            self.top_vecs.append([])
            self.bottom_ids.append([])
            self.top_ids.append([])
            self.bottom_need_backward.append([])
            need_backward = False
            for bottom_id, blob_name in enumerate(layer_param.bottom):
                if blob_name not in available:
                    raise KaffeError(f"Unknown bottom blob '{blob_name}' (layer '{layer_param.name}', "
                                     f"bottom index {bottom_id})")
                blob_id = blob_index[blob_name]
                logger.info(f"{layer_param.name} <- {blob_name}")
                self.bottom_vecs[layer_id].append(self._blobs[blob_id])
                self.bottom_ids[layer_id].append(blob_id)
                available.discard(blob_name)
                need = self._blob_need_backward[blob_id]
                if len(layer_param.propagate_down):
                    need = bool(layer_param.propagate_down[bottom_id])
                self.bottom_need_backward[layer_id].append(need)
                need_backward |= self._blob_need_backward[blob_id]
            for top_id, blob_name in enumerate(layer_param.top):
                blob_id = self._append_top(layer_id, top_id, blob_name, blob_index, available)
                if layer_param.type == "Input":
                    self._input_ids.append(blob_id)
            if layer.auto_top_blobs:
                needed = max(layer.min_top_blobs or 0, layer.exact_num_top_blobs or 0)
                for top_id in range(len(layer_param.top), needed):
                    self._append_top(layer_id, top_id, AUTOMATIC_TOP, None, None)
            try:  # a shape that cannot be allocated is refused here, before anything is allocated
                blobs = self._blobs + [b for each in self.layers for b in each.blobs]
                with net_holding(total_bytes(blobs)):
                    layer.setup(self.bottom_vecs[layer_id], self.top_vecs[layer_id])
                check_total(self._blobs + [b for each in self.layers for b in each.blobs], "the net's blobs")
            except BlobShapeError as e:
                raise KaffeError(f"{layer_param.type} layer '{layer_param.name}': {e}") from None
            except MemoryError:   # shapes that fit, but not beside what this process and others hold
                raise KaffeError(f"{layer_param.type} layer '{layer_param.name}': out of memory while setting it up "
                                 f"(its blobs fit the memory limit, not beside the memory already in use)") from None
            logger.info(f"Setting up {layer_param.name}")
            for top_id, blob in enumerate(self.top_vecs[layer_id]):
                blob_id = self.top_ids[layer_id][top_id]
                while len(self._blob_loss_weights) <= blob_id:
                    self._blob_loss_weights.append(0.0)
                self._blob_loss_weights[blob_id] = layer.loss(top_id)
                logger.info(f"Top shape: {blob.shape_string()}")
                if layer.loss(top_id):
                    logger.info(f"    with loss weight {_format_number(layer.loss(top_id))}")
                memory += blob.count
            logger.info(f"Memory required for data: {memory * 4}")
            num_specs = len(layer_param.param)
            if num_specs > len(layer.blobs):
                raise KaffeError(f"Too many params specified for layer {layer_param.name}: {num_specs} param "
                                 f"entries for {len(layer.blobs)} parameter blobs")
            default_spec = caffe_pb2.ParamSpec()
            for param_id in range(len(layer.blobs)):
                spec = layer_param.param[param_id] if param_id < num_specs else default_spec
                param_needs = spec.lr_mult != 0
                need_backward |= param_needs
                layer.param_propagate_down[param_id] = param_needs
            for param_id in range(len(layer.blobs)):
                self._append_param(layer_id, param_id)
            self.layer_need_backward.append(need_backward)
            if need_backward:
                for blob_id in self.top_ids[layer_id]:
                    self._blob_need_backward[blob_id] = True
        self._infer_backward(param)
        for layer, need in zip(self.layers, self.layer_need_backward):
            layer.needs_backward = need
        self._output_ids = [blob_index[name] for name in sorted(available)]
        for name in sorted(available):
            logger.info(f"This network produces output {name}")
        self._blob_index = blob_index
        self._layer_index = {name: i for i, name in enumerate(self._layer_names)}
        self._share_weights()
        self.debug_info = param.debug_info
        # pycaffe's before_forward/after_forward/before_backward/after_backward: callables run(layer_index)
        self._hooks = {"before_forward": [], "after_forward": [], "before_backward": [], "after_backward": []}
        logger.info("Network initialization done.")

    def _append_top(self, layer_id, top_id, blob_name, blob_index, available):
        layer_param = self.layers[layer_id].layer_param
        if (blob_index is not None and top_id < len(layer_param.bottom)
                and blob_name == layer_param.bottom[top_id]):
            logger.info(f"{layer_param.name} -> {blob_name} (in-place)")
            blob_id = blob_index[blob_name]
        elif blob_index is not None and blob_name in blob_index:
            raise KaffeError(f"Top blob '{blob_name}' produced by multiple sources "
                             f"(layer '{layer_param.name}' writes it again without being in-place)")
        else:
            logger.info(f"{layer_param.name} -> {blob_name}")
            blob_id = len(self._blobs)
            self._blobs.append(Blob())
            self._blob_names.append(blob_name)
            self._blob_need_backward.append(False)
            if blob_index is not None:
                blob_index[blob_name] = blob_id
        self.top_ids[layer_id].append(blob_id)
        self.top_vecs[layer_id].append(self._blobs[blob_id])
        if available is not None:
            available.add(blob_name)
        return blob_id

    def _append_param(self, layer_id, param_id):
        layer = self.layers[layer_id]
        layer_param = layer.layer_param
        spec = layer_param.param[param_id] if param_id < len(layer_param.param) else caffe_pb2.ParamSpec()
        name = spec.name
        net_param_id = len(self._params)
        self._params.append(layer.blobs[param_id])
        self._param_layer_indices.append((layer_id, param_id))
        if not name or name not in self._param_names_index:
            self._param_owners.append(-1)
            if name:
                self._param_names_index[name] = net_param_id
            self.learnable_param_ids.append(len(self.learnable_params))
            self.learnable_params.append(layer.blobs[param_id])
            self._has_params_lr.append(spec.HasField("lr_mult"))
            self._has_params_decay.append(spec.HasField("decay_mult"))
            self.params_lr.append(spec.lr_mult)
            self.params_weight_decay.append(spec.decay_mult)
            return
        owner_id = self._param_names_index[name]
        self._param_owners.append(owner_id)
        owner_layer_id, owner_param_id = self._param_layer_indices[owner_id]
        owner_layer = self._layer_names[owner_layer_id]
        logger.info(f"Sharing parameters '{name}' owned by layer '{owner_layer}', param index {owner_param_id}")
        this_blob = layer.blobs[param_id]
        owner_blob = self.layers[owner_layer_id].blobs[owner_param_id]
        if spec.share_mode == caffe_pb2.ParamSpec.PERMISSIVE:
            if this_blob.count != owner_blob.count:
                raise KaffeError(f"Cannot share param '{name}' owned by layer '{owner_layer}' with layer "
                                 f"'{layer.name}'; count mismatch. Owner layer param shape is "
                                 f"{owner_blob.shape_string()}; sharing layer shape is {this_blob.shape_string()}")
        elif this_blob.shape != owner_blob.shape:
            raise KaffeError(f"Cannot share param '{name}' owned by layer '{owner_layer}' with layer "
                             f"'{layer.name}'; shape mismatch. Owner layer param shape is "
                             f"{owner_blob.shape_string()}; sharing layer expects shape {this_blob.shape_string()}")
        learnable_id = self.learnable_param_ids[owner_id]
        self.learnable_param_ids.append(learnable_id)
        for has_field, has_list, values, what in (
                ("lr_mult", self._has_params_lr, self.params_lr, "lr_mult"),
                ("decay_mult", self._has_params_decay, self.params_weight_decay, "decay_mult")):
            if not spec.HasField(has_field):
                continue
            value = getattr(spec, has_field)
            if has_list[learnable_id]:
                if value != values[learnable_id]:
                    raise KaffeError(f"Shared param '{name}' has mismatched {what} "
                                     f"(layer '{layer.name}': {value}, owner: {values[learnable_id]})")
            else:
                has_list[learnable_id] = True
                values[learnable_id] = value

    def _infer_backward(self, param):
        """Caffe's backward inference: skip layers that do not lead to a loss or whose bottoms need nothing."""
        under_loss, skip_backprop = set(), set()
        for layer_id in range(len(self.layers) - 1, -1, -1):
            layer = self.layers[layer_id]
            contributes_loss = False
            skip_propagate = True
            for top_id, blob_id in enumerate(self.top_ids[layer_id]):
                name = self._blob_names[blob_id]
                if layer.loss(top_id) or name in under_loss:
                    contributes_loss = True
                if name not in skip_backprop:
                    skip_propagate = False
                if contributes_loss and not skip_propagate:
                    break
            if self.layer_need_backward[layer_id] and skip_propagate:
                self.layer_need_backward[layer_id] = False
                self.bottom_need_backward[layer_id] = [False] * len(self.bottom_ids[layer_id])
            if not contributes_loss:
                self.layer_need_backward[layer_id] = False
            needs = "needs" if self.layer_need_backward[layer_id] else "does not need"
            logger.info(f"{layer.name} {needs} backward computation.")
            for bottom_id, blob_id in enumerate(self.bottom_ids[layer_id]):
                name = self._blob_names[blob_id]
                if contributes_loss:
                    under_loss.add(name)
                else:
                    self.bottom_need_backward[layer_id][bottom_id] = False
                if not self.bottom_need_backward[layer_id][bottom_id]:
                    skip_backprop.add(name)
        if param.force_backward:
            for layer_id, layer in enumerate(self.layers):
                self.layer_need_backward[layer_id] = True
                for bottom_id, blob_id in enumerate(self.bottom_ids[layer_id]):
                    need = self.bottom_need_backward[layer_id][bottom_id] or layer.allow_force_backward(bottom_id)
                    self.bottom_need_backward[layer_id][bottom_id] = need
                    self._blob_need_backward[blob_id] = self._blob_need_backward[blob_id] or need
                layer.param_propagate_down = [True] * len(layer.blobs)

    def _share_weights(self):
        for i, owner in enumerate(self._param_owners):
            if owner >= 0:
                self._params[i].share_data(self._params[owner])
                self._params[i].share_diff(self._params[owner])

    # -- running -----------------------------------------------------------------------------
    def _layer_id(self, name):
        try:
            return self._layer_index[name]
        except KeyError:
            raise KaffeValueError(f"net '{self.name}' has no layer named '{name}'") from None

    def _check_layer_range(self, first, last):
        if not (0 <= first < len(self.layers) and 0 <= last < len(self.layers)):
            raise KaffeIndexError(f"layer indices {first}..{last} out of range: net '{self.name}' has "
                                  f"{len(self.layers)} layers (0..{len(self.layers) - 1})")

    def forward_from_to(self, start, end):
        """Forward layers start..end (inclusive); returns the summed weighted loss (pycaffe's _forward)."""
        self._check_layer_range(start, end)
        before, after = self._hooks["before_forward"], self._hooks["after_forward"]
        if self._plan is not None and not (before or after or self.debug_info):
            return self._plan.forward(start, end)
        loss = 0.0
        for i in range(start, end + 1):
            for run in before:
                run(i)
            loss += self.layers[i].forward(self.bottom_vecs[i], self.top_vecs[i])
            if self.debug_info:
                self._debug_forward(i)
            for run in after:
                run(i)
        return loss

    def backward_from_to(self, start, end):
        """Backward layers start down to end (inclusive) (pycaffe's _backward)."""
        self._check_layer_range(end, start)
        if self._plan is not None and self._plan.level == "full":
            raise KaffeError(f"net '{self.name}' was built with optimize='full', for inference only: build it with "
                             f"optimize='safe' or 'none' to run backward")
        before, after = self._hooks["before_backward"], self._hooks["after_backward"]
        for i in range(start, end - 1, -1):
            for run in before:
                run(i)
            if self.layer_need_backward[i]:
                self.layers[i].backward(self.top_vecs[i], self.bottom_need_backward[i], self.bottom_vecs[i])
                if self.debug_info:
                    self._debug_backward(i)
            for run in after:
                run(i)

    @property
    def forward_steps(self):
        """What a whole forward runs, as (first layer, last layer, runner) steps: one per layer, or the
        optimiser's plan (a runner is a layer, a folded chain, or None for a skipped identity)."""
        if self._plan is not None:
            return self._plan.steps
        return [(i, i, layer) for i, layer in enumerate(self.layers)]

    _forward = forward_from_to
    _backward = backward_from_to

    def before_forward(self, run):
        """Call run(layer_index) before each layer's forward (Caffe's Net callbacks, as pycaffe adds them)."""
        self._hooks["before_forward"].append(run)

    def after_forward(self, run):
        self._hooks["after_forward"].append(run)

    def before_backward(self, run):
        self._hooks["before_backward"].append(run)

    def after_backward(self, run):
        self._hooks["after_backward"].append(run)

    def forward_backward(self):
        loss = self.forward_from_to(0, len(self.layers) - 1)
        self.backward_from_to(len(self.layers) - 1, 0)
        return loss

    def forward(self, blobs=None, start=None, end=None, **inputs):
        """pycaffe's forward: set inputs given by name, run, return {output name: data array}."""
        blobs = list(blobs or [])
        start_id = self._layer_id(start) if start is not None else 0
        if end is not None:
            end_id = self._layer_id(end)
            outputs = set(self.top_names[end] + blobs)
        else:
            end_id = len(self.layers) - 1
            outputs = set(self.outputs + blobs)
        if inputs:
            if set(inputs) != set(self.inputs):
                raise KaffeError(f"Input blob arguments {sorted(inputs)} do not match net inputs {self.inputs}")
            for name, value in inputs.items():
                value = np.asarray(value)
                if value.shape[0] != self.blobs[name].shape[0]:
                    raise KaffeError(f"Input '{name}' is not batch sized: got {value.shape[0]} items, "
                                     f"the blob holds {self.blobs[name].shape[0]}")
                self.blobs[name].data[...] = value
        self.loss = self.forward_from_to(start_id, end_id)
        return {name: self.blobs[name].data for name in outputs}

    def backward(self, diffs=None, start=None, end=None, **top_diffs):
        """pycaffe's backward: set output diffs given by name, run, return {input name: diff array}."""
        diffs = list(diffs or [])
        start_id = self._layer_id(start) if start is not None else len(self.layers) - 1
        if end is not None:
            end_id = self._layer_id(end)
            outputs = set(self.bottom_names[end] + diffs)
        else:
            end_id = 0
            outputs = set(self.inputs + diffs)
        if top_diffs:
            if set(top_diffs) != set(self.outputs):
                raise KaffeError(f"Top diff arguments {sorted(top_diffs)} do not match net outputs {self.outputs}")
            for name, value in top_diffs.items():
                value = np.asarray(value)
                if value.shape[0] != self.blobs[name].shape[0]:
                    raise KaffeError(f"Diff '{name}' is not batch sized")
                self.blobs[name].diff[...] = value
        self.backward_from_to(start_id, end_id)
        return {name: self.blobs[name].diff for name in outputs}

    def reshape(self):
        for i, layer in enumerate(self.layers):
            layer.reshape(self.bottom_vecs[i], self.top_vecs[i])

    def clear_param_diffs(self):
        if self.flat_params is not None and self.flat_params.zero_diffs():   # GPU mode: one launch for all
            return
        for blob in self.learnable_params:
            blob.zero_diff()

    def update(self):
        for blob in self.learnable_params:
            blob.update()

    def set_input_arrays(self, data, labels):
        """Feed a MemoryData first layer (pycaffe's set_input_arrays)."""
        if not self.layers or self.layers[0].type != "MemoryData":
            raise KaffeError("set_input_arrays may only be called if the first layer is a MemoryData layer")
        self.layers[0].reset(data, labels)

    _set_input_arrays = set_input_arrays  # _caffe.cpp's name, which pycaffe's set_input_arrays calls

    def _debug_forward(self, layer_id):
        for blob_id, blob in zip(self.top_ids[layer_id], self.top_vecs[layer_id]):
            logger.info(f"    [Forward] Layer {self._layer_names[layer_id]}, top blob "
                        f"{self._blob_names[blob_id]} data: {_format_number(blob.asum_data() / max(blob.count, 1))}")
        for i, blob in enumerate(self.layers[layer_id].blobs):
            logger.info(f"    [Forward] Layer {self._layer_names[layer_id]}, param blob {i} data: "
                        f"{_format_number(blob.asum_data() / max(blob.count, 1))}")

    def _debug_backward(self, layer_id):
        """Caffe's BackwardDebugInfo: the bottoms and params that received a gradient."""
        for blob_id, blob, need in zip(self.bottom_ids[layer_id], self.bottom_vecs[layer_id],
                                       self.bottom_need_backward[layer_id]):
            if need:
                logger.info(f"    [Backward] Layer {self._layer_names[layer_id]}, bottom blob "
                            f"{self._blob_names[blob_id]} diff: "
                            f"{_format_number(blob.asum_diff() / max(blob.count, 1))}")
        layer = self.layers[layer_id]
        for i, blob in enumerate(layer.blobs):
            if not layer.param_propagate_down[i]:
                continue
            logger.info(f"    [Backward] Layer {self._layer_names[layer_id]}, param blob {i} diff: "
                        f"{_format_number(blob.asum_diff() / max(blob.count, 1))}")

    def update_debug_info(self):
        """Caffe's UpdateDebugInfo after an update: each parameter's mean |data| and |diff| (the update step)."""
        def display_name(net_param_id):
            layer_id, param_id = self._param_layer_indices[net_param_id]
            specs = self.layers[layer_id].layer_param.param
            return (specs[param_id].name if param_id < len(specs) else "") or str(param_id)

        for net_param_id, (blob, owner) in enumerate(zip(self._params, self._param_owners)):
            layer = self._layer_names[self._param_layer_indices[net_param_id][0]]
            diff = _format_number(blob.asum_diff() / max(blob.count, 1))
            if owner < 0:
                logger.info(f"    [Update] Layer {layer}, param {display_name(net_param_id)} data: "
                            f"{_format_number(blob.asum_data() / max(blob.count, 1))}; diff: {diff}")
            else:
                logger.info(f"    [Update] Layer {layer}, param blob {display_name(net_param_id)} (owned by layer "
                            f"{self._layer_names[self._param_layer_indices[owner][0]]}, param "
                            f"{display_name(owner)}) diff: {diff}")

    # -- weights -----------------------------------------------------------------------------
    def copy_trained_layers_from(self, weights_param):
        """Copy parameter blobs from a NetParameter by layer name, with Caffe's checks and messages."""
        copied, ignored = [], []
        for source in weights_param.layer:
            if source.name not in self._layer_index:
                ignored.append(source.name)
                logger.info(f"Ignoring source layer {source.name}")
                continue
            target = self.layers[self._layer_index[source.name]].blobs
            if len(target) != len(source.blobs):
                raise KaffeError(f"Incompatible number of blobs for layer {source.name}: the net has "
                                 f"{len(target)}, the weights have {len(source.blobs)}")
            for j, (blob, stored) in enumerate(zip(target, source.blobs)):
                if not blob.shape_equals_proto(stored):
                    shape = proto_shape(stored)
                    shown = " ".join(map(str, shape)) + f" ({int(np.prod(shape, dtype=np.int64))})"
                    raise KaffeError(f"Cannot copy param {j} weights from layer '{source.name}'; shape mismatch. "
                                     f"Source param shape is {shown}; target param shape is "
                                     f"{blob.shape_string()}. To learn this layer's parameters from scratch "
                                     f"rather than copying from a saved net, rename the layer.")
                blob.from_proto(stored, reshape=False)
            if source.blobs:
                copied.append(source.name)
        missing = [layer.name for layer in self.layers
                   if layer.blobs and layer.name not in {s.name for s in weights_param.layer}]
        if missing:
            logger.info(f"Layers not in the weights (keep their initialization): {', '.join(missing)}")
        return copied, ignored

    def copy_from(self, weights):
        """Load weights from one .caffemodel path, several comma-separated, or a NetParameter; returns the
        names of the layers copied and of the source layers this net does not have."""
        if isinstance(weights, caffe_pb2.NetParameter):
            return self.copy_trained_layers_from(weights)
        copied, ignored = [], []
        for path in str(weights).split(","):
            param = read_weights_param(path)
            if param is None:
                names = self.load_hdf5(path)
            else:
                names = self.copy_trained_layers_from(param)
            del param  # this file's weights are in the blobs now; free them before reading the next file
            copied += names[0]
            ignored += names[1]
        return copied, ignored

    def load_hdf5(self, path):
        """pycaffe's load_hdf5: copy weights from a .caffemodel.h5 (Caffe's data/<layer>/<i> layout)."""
        from . import hdf5_io
        return hdf5_io.load_net(self, os.fspath(path))

    def save_hdf5(self, path, write_diff=False):
        """pycaffe's save_hdf5: write the weights as a .caffemodel.h5."""
        from . import hdf5_io
        hdf5_io.save_net(self, os.fspath(path), write_diff)

    def share_trained_layers_with(self, other):
        """Make this net's parameters views of `other`'s, by layer name (the solver's test nets)."""
        for layer_id, name in enumerate(other._layer_names):
            if name not in self._layer_index:
                continue
            source = other.layers[layer_id].blobs
            target = self.layers[self._layer_index[name]].blobs
            if len(source) != len(target):
                raise KaffeError(f"Incompatible number of blobs for layer {name}")
            for s, t in zip(source, target):
                if s.shape != t.shape:
                    raise KaffeError(f"Cannot share param weights from layer '{name}'; shape mismatch. "
                                     f"Source param shape is {s.shape_string()}; target param shape is "
                                     f"{t.shape_string()}")
                t.share_data(s)

    share_with = share_trained_layers_with

    def to_proto(self, write_diff=False):
        """The net as a NetParameter with every layer (Caffe's Net::ToProto), weights included."""
        param = caffe_pb2.NetParameter()
        param.name = self.name
        for layer in self.layers:
            out = param.layer.add()
            out.CopyFrom(layer.layer_param)
            del out.blobs[:]
            for blob in layer.blobs:
                blob.to_proto(out.blobs.add(), write_diff=write_diff)
        return param

    def save(self, path, write_diff=False):
        from .io import write_binary_proto
        write_binary_proto(self.to_proto(write_diff), path)

    # -- pycaffe views -------------------------------------------------------------------------
    @property
    def blobs(self):
        return collections.OrderedDict(zip(self._blob_names, self._blobs))

    @property
    def params(self):
        return collections.OrderedDict((name, layer.blobs) for name, layer in zip(self._layer_names, self.layers)
                                       if layer.blobs)

    @property
    def layer_dict(self):
        return collections.OrderedDict(zip(self._layer_names, self.layers))

    @property
    def inputs(self):
        return [self._blob_names[i] for i in self._input_ids]

    @property
    def outputs(self):
        return [self._blob_names[i] for i in self._output_ids]

    @property
    def output_blobs(self):
        return [self._blobs[i] for i in self._output_ids]

    @property
    def output_loss_weights(self):
        return [self._blob_loss_weights[i] for i in self._output_ids]

    @property
    def top_names(self):
        return collections.OrderedDict((name, [self._blob_names[i] for i in ids])
                                       for name, ids in zip(self._layer_names, self.top_ids))

    @property
    def bottom_names(self):
        return collections.OrderedDict((name, [self._blob_names[i] for i in ids])
                                       for name, ids in zip(self._layer_names, self.bottom_ids))

    @property
    def layer_names(self):
        return list(self._layer_names)

    @property
    def blob_names(self):
        return list(self._blob_names)

    @property
    def blob_loss_weights(self):
        """{blob name: loss weight} (pycaffe's OrderedDict; `_blob_loss_weights` is Caffe's list by blob index)."""
        return collections.OrderedDict(zip(self._blob_names, self._blob_loss_weights))

    # Caffe's index views, under _caffe.cpp's names
    @property
    def _inputs(self):
        return list(self._input_ids)

    @property
    def _outputs(self):
        return list(self._output_ids)

    def _top_ids(self, layer_id):
        return list(self.top_ids[layer_id])

    def _bottom_ids(self, layer_id):
        return list(self.bottom_ids[layer_id])

    def resume_state(self):
        """Per-layer extra state (data cursors, private RNGs) for exact resumes."""
        states = {}
        for layer in self.layers:
            state = layer.get_resume_state()
            if state is not None:
                states[layer.name] = state
        return states

    def set_resume_state(self, states):
        for name, state in states.items():
            if name in self._layer_index:
                self.layers[self._layer_index[name]].set_resume_state(state)

