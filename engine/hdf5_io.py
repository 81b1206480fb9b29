"""Caffe's HDF5 files through h5py: weights (.caffemodel.h5) and solver states (.solverstate.h5).

Layouts, as Caffe writes them:
- weights: group `data/<layer name>/<param index>` (float32 datasets in the blob's shape), one group per layer
  (layers without parameters get an empty one); only parameters that own their data are written, shared
  copies are not. With snapshot_diff, group `diff/...` holds every parameter's diff.
- solver state: int32 datasets `iter` and `current_step` (shape (1,)), string dataset `learned_net`, group
  `history/<i>` with every history blob in the solver's order. kaffe adds the string dataset
  `kaffe_resume_state` (its exact-resume extras), which Caffe never looks at.
Files are made in memory, then written to a temporary file beside the target and renamed, so a crash or a full
disk never leaves half a snapshot.
"""
import contextlib
import io
import os

import h5py
import numpy as np

from .errors import KaffeError
from .io import write_file_atomically
from .log import logger
from .memory_limits import check_count

MAX_BLOB_AXES = 32   # Caffe's kMaxBlobAxes
# what h5py raises for a damaged file, beyond OSError: corrupt headers, heaps, datatypes
H5PY_ERRORS = (OSError, RuntimeError, KeyError, ValueError, TypeError)
RESUME_STATE = "kaffe_resume_state"


@contextlib.contextmanager
def _atomic_file(path):
    """An h5py file made in memory, then written to `path` atomically (engine.io.write_file_atomically): the disk
    is written by Python, whose errors (a full disk) are raised, not lost in HDF5's buffered writes at close."""
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        yield f
    write_file_atomically(path, buffer.getvalue())


@contextlib.contextmanager
def _open(path, what):
    if not os.path.exists(path):
        raise KaffeError(f"{path}: file not found (expected a {what} file)")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise KaffeError(f"{path}: not a readable HDF5 file (expected a {what} file): {e}") from None
    with f:
        try:
            yield f
        except KaffeError:
            raise
        except H5PY_ERRORS as e:   # the file opens but its insides are corrupt
            raise KaffeError(f"{path}: a corrupt HDF5 file (expected a {what} file): {e}") from None


def _save_string(group, name, text):
    # a NUL-terminated fixed-length string, as H5LTmake_dataset_string stores it
    group.create_dataset(name, data=np.bytes_(text.encode("utf-8") + b"\0"))


def _load_string(group, name):
    value = group[name][()]
    if isinstance(value, str):   # a variable-length string written by another tool
        return value
    return bytes(value).split(b"\0", 1)[0].decode("utf-8")


def _save_int(group, name, value):
    group.create_dataset(name, data=np.array([value], dtype=np.int32))


def _load_int(group, name, path):
    if name not in group:
        raise KaffeError(f"{path}: Failed to load int dataset with name {name} (not a Caffe solver state?)")
    return int(np.asarray(group[name][()]).reshape(-1)[0])


def _dataset_array(dataset, path):
    """A dataset's values as float32, with Caffe's checks (float or integer class, at most 32 axes)."""
    if not isinstance(dataset, h5py.Dataset):
        raise KaffeError(f"{path}: {dataset.name} is a group, expected a dataset of blob values")
    if dataset.dtype.kind not in "fiu":
        raise KaffeError(f"{path}: {dataset.name} holds {dataset.dtype} values; blobs need float or integer")
    if dataset.ndim > MAX_BLOB_AXES:
        raise KaffeError(f"{path}: {dataset.name} has {dataset.ndim} axes (at most {MAX_BLOB_AXES})")
    check_count(dataset.shape, f"{path}: {dataset.name} of")   # a corrupt header may claim terabytes
    return np.asarray(dataset[()], dtype=np.float32)


def _load_into(blob, dataset, path):
    values = _dataset_array(dataset, path)
    if values.shape != blob.shape:
        shown = " ".join(map(str, values.shape)) + f" ({values.size})"
        raise KaffeError(f"{path}: Cannot load blob {dataset.name} from hdf5; shape mismatch. Source shape is "
                         f"{shown} target shape is {blob.shape_string()}")
    blob.mutable_cpu_data()[...] = values


# -- weights ---------------------------------------------------------------------------------------------
def _net_param_ids(net):
    """(layer id, param index) -> the net's parameter id."""
    return {key: i for i, key in enumerate(net._param_layer_indices)}


def save_net(net, path, write_diff=False):
    """Caffe's Net::ToHDF5."""
    ids = _net_param_ids(net)
    with _atomic_file(path) as f:
        data = f.create_group("data")
        diff = f.create_group("diff") if write_diff else None
        for layer_id, (name, layer) in enumerate(zip(net._layer_names, net.layers)):
            layer_data = data.create_group(name)
            layer_diff = diff.create_group(name) if write_diff else None
            for j, blob in enumerate(layer.blobs):
                if net._param_owners[ids[layer_id, j]] == -1:
                    layer_data.create_dataset(str(j), data=blob.cpu_data())
                if write_diff:   # diffs of shared parameters too, as Caffe
                    layer_diff.create_dataset(str(j), data=blob.cpu_diff())


def load_net(net, path):
    """Caffe's Net::CopyTrainedLayersFromHDF5: by layer name; shared parameters may be absent. Returns the names
    of the layers copied and of the file's layers that the net does not have."""
    ids = _net_param_ids(net)
    with _open(path, "HDF5 weights (.caffemodel.h5)") as f:
        if not isinstance(f.get("data"), h5py.Group):
            raise KaffeError(f"{path}: Error reading weights: no 'data' group (not a .caffemodel.h5 file)")
        data = f["data"]
        copied, ignored = [], []
        for name in data:
            layer_id = net._layer_index.get(name)
            if layer_id is None:
                ignored.append(name)
                logger.info(f"Ignoring source layer {name}")
                continue
            source = data[name]
            target = net.layers[layer_id].blobs
            if len(source) > len(target):
                raise KaffeError(f"{path}: Incompatible number of blobs for layer {name}: the net has "
                                 f"{len(target)}, the weights have {len(source)}")
            for j, blob in enumerate(target):
                if str(j) not in source:
                    if net._param_owners[ids[layer_id, j]] != -1:
                        continue     # weight-shared in this net: its owner brings the values
                    raise KaffeError(f"{path}: Incompatible number of blobs for layer {name}: param {j} "
                                     f"is missing from the weights")
                _load_into(blob, source[str(j)], path)
            if len(source):
                copied.append(name)
        missing = [n for n, layer in zip(net._layer_names, net.layers) if layer.blobs and n not in data]
        if missing:
            logger.info(f"Layers not in the weights (keep their initialization): {', '.join(missing)}")
    return copied, ignored


def check_weights(path):
    """Raise a KaffeError unless `path` is a readable .caffemodel.h5 (its `data` group and every dataset)."""
    with _open(path, "HDF5 weights (.caffemodel.h5)") as f:
        if not isinstance(f.get("data"), h5py.Group):
            raise KaffeError(f"{path}: Error reading weights: no 'data' group (not a .caffemodel.h5 file)")
        for layer in f["data"].values():
            if not isinstance(layer, h5py.Group):
                raise KaffeError(f"{path}: {layer.name} is not a group of parameter blobs")
            for dataset in layer.values():
                _dataset_array(dataset, path)


# -- solver state ------------------------------------------------------------------------------------------
def write_solver_state(path, iteration, learned_net, current_step, history, resume_state=None):
    """SGDSolver::SnapshotSolverStateToHDF5, plus kaffe's resume extras (a JSON string) when given."""
    with _atomic_file(path) as f:
        _save_int(f, "iter", iteration)
        _save_string(f, "learned_net", learned_net)
        _save_int(f, "current_step", current_step)
        group = f.create_group("history")
        for i, blob in enumerate(history):
            group.create_dataset(str(i), data=blob.cpu_data())
        if resume_state is not None:
            _save_string(f, RESUME_STATE, resume_state)


def read_learned_net(path):
    """The weights file a .solverstate.h5 names (or None), after checking that its fields are there."""
    with _open(path, "HDF5 solver state (.solverstate.h5)") as f:
        _load_int(f, "iter", path)
        _load_int(f, "current_step", path)
        if not isinstance(f.get("history"), h5py.Group):
            raise KaffeError(f"{path}: Error reading history: no 'history' group")
        return _load_string(f, "learned_net") if isinstance(f.get("learned_net"), h5py.Dataset) else None


def read_solver_state(path, history):
    """Load the history blobs (checked against the solver's) and return (iter, learned_net or None,
    current_step, kaffe resume state or None)."""
    with _open(path, "HDF5 solver state (.solverstate.h5)") as f:
        iteration = _load_int(f, "iter", path)
        current_step = _load_int(f, "current_step", path)
        learned_net = _load_string(f, "learned_net") if isinstance(f.get("learned_net"), h5py.Dataset) else None
        group = f.get("history")
        if not isinstance(group, h5py.Group):
            raise KaffeError(f"{path}: Error reading history: no 'history' group")
        if len(group) != len(history):
            raise KaffeError(f"{path}: Incorrect length of history blobs: the file has {len(group)}, this "
                             f"solver and net need {len(history)} (is it a .solverstate.h5 of this net and "
                             f"solver type?)")
        for i, blob in enumerate(history):
            if str(i) not in group:
                raise KaffeError(f"{path}: history/{i} is missing")
            _load_into(blob, group[str(i)], path)
        extra = _load_string(f, RESUME_STATE) if RESUME_STATE in f else None
    return iteration, learned_net, current_step, extra
