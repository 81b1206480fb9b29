"""The snapshot files of a solver's snapshot_prefix on disk: the write probe, the newest complete snapshot
(for `kaffe train --snapshot auto`) and the temporaries that a killed run leaves behind.

Snapshots are `<prefix>_iter_<N>.solverstate` (+ `.caffemodel`) or `.solverstate.h5` (+ `.caffemodel.h5`);
each file is written under a temporary name and renamed (engine.io.atomic_path), the solver state after its
weights, so a state on disk names weights that are complete.
"""
import glob
import os
import re

from ..engine import hdf5_io
from ..engine.errors import KaffeError
from ..engine.io import TEMP_PREFIX, read_binary_proto
from ..engine.log import logger
from ..engine.net import read_weights_param
from ..proto import caffe_pb2

STATE_EXTENSIONS = (".solverstate", ".solverstate.h5")


def check_writable(prefix, iteration):
    """Caffe's CheckSnapshotWritePermissions: write and remove a probe file, so that a missing or read-only
    snapshot folder is found before training, not at the first snapshot."""
    probe = f"{prefix}_iter_{iteration}.tempfile"
    try:
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise KaffeError(f"Cannot write to snapshot prefix '{prefix}' ({e.strerror}). Make sure that the "
                         f"directory exists and is writable.") from None


def _iteration(path, prefix):
    match = re.fullmatch(re.escape(prefix) + r"_iter_(\d+)(\.solverstate(?:\.h5)?)", path)
    return int(match.group(1)) if match else None


def snapshot_states(prefix):
    """The solver states of `prefix` on disk, newest (highest iteration) first."""
    found = []
    for extension in STATE_EXTENSIONS:
        for path in glob.glob(glob.escape(prefix) + "_iter_*" + extension):
            iteration = _iteration(path, prefix)
            if iteration is not None:
                found.append((iteration, path.endswith(".h5"), path))
    return [path for *_, path in sorted(found, reverse=True)]


def weights_file(learned_net, state_file):
    """The weights a state names: as written, else the file of that name beside the state (a moved folder)."""
    if learned_net and not os.path.exists(learned_net):
        beside = os.path.join(os.path.dirname(state_file), os.path.basename(learned_net))
        if os.path.exists(beside):
            return beside
    return learned_net


def check_complete(state_file):
    """Raise a KaffeError unless the state and the weights it names both read back."""
    if state_file.endswith(".h5"):
        learned_net = hdf5_io.read_learned_net(state_file)
    else:
        state = read_binary_proto(state_file, caffe_pb2.SolverState())
        learned_net = state.learned_net if state.HasField("learned_net") else None
    weights = weights_file(learned_net, state_file)
    if not weights:
        return
    if not os.path.exists(weights):
        raise KaffeError(f"{state_file}: the weights it names, {weights}, are missing")
    if read_weights_param(weights) is None:
        hdf5_io.check_weights(weights)


def latest_complete(prefix):
    """The newest snapshot of `prefix` whose state and weights read back, or None; incomplete ones are logged."""
    for state_file in snapshot_states(prefix):
        try:
            check_complete(state_file)
        except KaffeError as e:
            logger.warning(f"Skipping snapshot {state_file}: {e}")
            continue
        return state_file
    return None


def remove_temporaries(prefix):
    """Remove what a killed run may have left: half-written snapshot files (atomic_path's temporary names) and
    the write probe of check_writable."""
    folder, stem = os.path.split(prefix)
    leftovers = glob.glob(os.path.join(glob.escape(folder or "."), glob.escape(f"{TEMP_PREFIX}{stem}_iter_") + "*"))
    leftovers += glob.glob(glob.escape(prefix) + "_iter_*.tempfile")
    for path in leftovers:
        logger.info(f"Removing {path}, left by an interrupted run")
        try:
            os.remove(path)
        except OSError as e:
            logger.warning(f"Cannot remove {path}: {e.strerror}")


def auto_resume(prefix):
    """`--snapshot auto`: the newest complete snapshot of `prefix` to resume from, or None for a fresh start."""
    remove_temporaries(prefix)
    state_file = latest_complete(prefix)
    if state_file is None:
        logger.info(f"No complete snapshot of '{prefix}' yet: starting from scratch")
    else:
        logger.info(f"Newest complete snapshot of '{prefix}': {state_file}")
    return state_file
