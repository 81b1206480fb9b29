"""The Solver loop shared by every update rule: nets, testing, display, snapshots, restore, signals."""
import contextlib
import json
import math
import os
import signal
import time

import numpy as np

from ..engine import device, hdf5_io, opencl
from ..engine.errors import KaffeError, StorageError
from ..engine.io import read_binary_proto, read_text_proto, write_binary_proto
from ..engine.layer import DeviceLosses, PendingLoss, deferred_losses
from ..engine.log import logger
from ..engine.net import Net, read_net_param
from ..engine.upgrade import upgrade_solver_param
from ..proto import caffe_pb2
from . import distributed
from .divergence import first_non_finite
from .lr_policy import check_policy
from .run_report import RunReport
from .snapshot_files import check_writable, weights_file
from .tensorboard import ENV as TENSORBOARD_ENV, TensorBoardLog

SOLVER_TYPES = {}

NONE, STOP, SNAPSHOT = "none", "stop", "snapshot"
PENDING_LOSSES_MAX = 1000   # GPU mode without display steps still reads the losses, every this many iterations
SNAPSHOT_FAILURES = ("stop", "continue")   # what a snapshot that cannot be written does


def register_solver(type_name):
    def register(cls):
        cls.type = type_name
        SOLVER_TYPES[type_name] = cls
        return cls
    return register


def _fmt(value):
    return format(float(value), ".6g")


def read_solver_param(path):
    """A SolverParameter from a prototxt, upgraded (solver_type enum) and with snapshot_prefix resolved."""
    param = read_text_proto(path, caffe_pb2.SolverParameter())
    upgrade_solver_param(param, source=path)
    if not param.snapshot_prefix or os.path.isdir(param.snapshot_prefix):
        stem = os.path.splitext(os.path.basename(path))[0]
        directory = param.snapshot_prefix or os.path.dirname(path)
        param.snapshot_prefix = os.path.join(directory, stem)
    if param.net:
        param.net = _resolve(param.net, path)
    if param.train_net:
        param.train_net = _resolve(param.train_net, path)
    for i, name in enumerate(param.test_net):
        param.test_net[i] = _resolve(name, path)
    return param


def _resolve(net_path, solver_path):
    """Net files are relative to the working directory, as in Caffe; failing that, found beside the solver."""
    if os.path.exists(net_path) or os.path.isabs(net_path):
        return net_path
    folder = os.path.dirname(solver_path)
    for candidate in (os.path.join(folder, net_path), os.path.join(folder, os.path.basename(net_path))):
        if os.path.exists(candidate):
            return candidate
    return net_path


@contextlib.contextmanager
def _removed_on_failure(path):
    try:
        yield
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(path)
        raise


def get_solver(solver, tensorboard=None):
    """pycaffe's get_solver: a solver of the class that the file's `type` names (tensorboard: see Solver)."""
    param = solver if isinstance(solver, caffe_pb2.SolverParameter) else read_solver_param(os.fspath(solver))
    from . import adadelta, adagrad, adam, nesterov, rmsprop, sgd  # noqa: F401  (register the built-in types)
    cls = SOLVER_TYPES.get(param.type)
    if cls is None:
        raise KaffeError(f"Unknown solver type: '{param.type}' (known: {', '.join(sorted(SOLVER_TYPES))})")
    world = distributed.join()   # several ranks started by an MPI launcher: data-parallel training
    if world is not None:
        return world.solver(cls, param, tensorboard=tensorboard)
    return cls(param, tensorboard=tensorboard)


class Solver:
    """Caffe's Solver: owns the train net and the test nets and runs the optimisation loop."""
    type = None

    def __init__(self, param, tensorboard=None):
        if isinstance(param, (str, os.PathLike)):
            param = read_solver_param(os.fspath(param))
        self.param = param
        self._check_param()
        if param.snapshot and distributed.root_solver():   # rank 0 writes the snapshots
            check_writable(param.snapshot_prefix, 0)
        self.snapshot_failure = "stop"
        if param.random_seed >= 0:
            device.set_random_seed(param.random_seed + distributed.solver_rank())   # as Caffe: draws per rank
        self.iter = 0
        self.current_step = 0
        self.losses = []
        self.smoothed_loss = 0.0
        self._device_losses = DeviceLosses()
        self._pending_losses = []   # (iteration, loss) not checked and smoothed yet: see _settle_losses
        self.requested_early_exit = False
        self.action_request = None   # a function returning NONE/STOP/SNAPSHOT (set by signal handlers)
        self._pending_actions = []
        self._callbacks = []         # (on_start, on_gradients_ready) pairs of add_callback
        self.data_parallel = None    # over MPI: the gradient reduction of solvers/distributed.py
        self.report = RunReport(self)
        self.watchers = [self.report]  # told of each start, display, test pass, snapshot and restore
        tensorboard = tensorboard or os.environ.get(TENSORBOARD_ENV)
        if tensorboard:
            self.report.tensorboard = TensorBoardLog(tensorboard, self)
            self.watchers.append(self.report.tensorboard)
        self.net = self._init_train_net()
        self.test_nets = self._init_test_nets()
        for weights in self.param.weights:  # fine-tuning: `weights` in the solver or --weights
            self.report.copied_weights(weights, *self.net.copy_from(weights))
            for net in self.test_nets:
                net.copy_from(weights)
        logger.info("Solver scaffolding done.")

    def _check_param(self):
        p = self.param
        for field in ("display", "snapshot", "test_interval", "max_iter", "average_loss", "iter_size"):
            if getattr(p, field) < 0:
                raise KaffeError(f"solver: {field} must be >= 0, got {getattr(p, field)}")
        if p.average_loss < 1:
            raise KaffeError(f"solver: average_loss should be non-negative and at least 1, got {p.average_loss}")
        if p.iter_size < 1:
            raise KaffeError(f"solver: iter_size must be at least 1, got {p.iter_size}")
        if p.snapshot and not p.snapshot_prefix:
            raise KaffeError("solver: snapshot is set but snapshot_prefix is empty")
        check_policy(p)

    # -- nets --------------------------------------------------------------------------------
    def _init_train_net(self):
        p = self.param
        given = [f for f in ("net", "net_param", "train_net", "train_net_param") if p.HasField(f)]
        if not given:
            raise KaffeError("SolverParameter must specify a train net using one of these fields: "
                             "net, net_param, train_net, train_net_param")
        if len(given) > 1:
            raise KaffeError("SolverParameter must not contain more than one of these fields specifying a "
                             f"train_net: net, net_param, train_net, train_net_param (found {', '.join(given)})")
        field = given[0]
        if field.endswith("_param"):
            logger.info(f"Creating training net specified in {field}.")
            net_param = caffe_pb2.NetParameter()
            net_param.CopyFrom(getattr(p, field))
        else:
            logger.info(f"Creating training net from {field} file: {getattr(p, field)}")
            net_param = read_net_param(getattr(p, field))
        state = caffe_pb2.NetState(phase=caffe_pb2.TRAIN)
        state.MergeFrom(net_param.state)
        state.MergeFrom(p.train_state)
        net_param.state.CopyFrom(state)
        return Net(net_param)

    def _init_test_nets(self):
        p = self.param
        generic = [f for f in ("net_param", "net") if p.HasField(f)]
        specific = len(p.test_net_param) + len(p.test_net)
        if generic and len(p.test_iter) < specific:
            raise KaffeError("test_iter must be specified for each test network.")
        if not generic and len(p.test_iter) != specific:
            raise KaffeError(f"test_iter must be specified for each test network "
                             f"({len(p.test_iter)} test_iter for {specific} test nets).")
        sources = []
        for net_param in p.test_net_param:
            sources.append(("test_net_param", net_param))
        for path in p.test_net:
            sources.append((f"test_net file: {path}", read_net_param(path)))
        for _ in range(len(p.test_iter) - len(sources)):
            if generic[0] == "net_param":
                sources.append(("net_param", p.net_param))
            else:
                sources.append((f"net file: {p.net}", read_net_param(p.net)))
        if len(p.test_state) and len(p.test_state) != len(sources):
            raise KaffeError("test_state must be unspecified or specified once per test net.")
        if sources and p.test_interval <= 0:
            raise KaffeError("solver: test_interval must be > 0 when there are test nets")
        nets = []
        for i, (source, net_param) in enumerate(sources):
            param = caffe_pb2.NetParameter()
            param.CopyFrom(net_param)
            state = caffe_pb2.NetState(phase=caffe_pb2.TEST)
            state.MergeFrom(param.state)
            if len(p.test_state):
                state.MergeFrom(p.test_state[i])
            param.state.CopyFrom(state)
            logger.info(f"Creating test net (#{i}) specified by {source}")
            net = Net(param)
            net.debug_info = p.debug_info   # as Caffe: every test pass logs its layers too
            net.share_trained_layers_with(self.net)
            nets.append(net)
        return nets

    # -- the loop ------------------------------------------------------------------------------
    def solve(self, resume_file=None):
        logger.info(f"Solving {self.net.name}")
        logger.info(f"Learning Rate Policy: {self.param.lr_policy}")
        self.requested_early_exit = False
        if resume_file:
            logger.info(f"Restoring previous solver status from {resume_file}")
            self.restore(resume_file)
        start_iter = self.iter
        self.step(self.param.max_iter - self.iter)
        p = self.param
        if p.snapshot_after_train and (not p.snapshot or self.iter % p.snapshot != 0):
            self.snapshot()
        if self.requested_early_exit:
            logger.info("Optimization stopped early.")
            return
        if p.display and self.iter % p.display == 0:
            loss = self.net.forward_from_to(0, len(self.net.layers) - 1)
            self._update_smoothed_loss(loss, start_iter)
            logger.info(f"Iteration {self.iter}, loss = {_fmt(self.smoothed_loss)}")
        if p.test_interval and self.iter % p.test_interval == 0:
            self.test_all()
        logger.info("Optimization Done.")

    def step(self, iters):
        p = self.param
        start_iter = self.iter
        stop_iter = self.iter + iters
        self.losses = []
        self.smoothed_loss = 0.0
        self._pending_losses = []   # what a step that raised left behind
        self._device_losses.read()
        timer = time.perf_counter()
        iterations_last = self.iter
        for watcher in self.watchers:
            watcher.start()
        while self.iter < stop_iter:
            self.net.clear_param_diffs()
            if p.test_interval and self.iter % p.test_interval == 0 and (self.iter > 0 or p.test_initialization):
                self.test_all()
                if self.requested_early_exit:
                    break
            for on_start, _ in self._callbacks:
                on_start()
            display = p.display and self.iter % p.display == 0
            self.net.debug_info = bool(display and p.debug_info)
            loss = 0.0
            with self._deferred_losses():
                for _ in range(p.iter_size):
                    loss += self.net.forward_backward()
            loss /= p.iter_size
            self._pending_losses.append((self.iter, loss))
            if display or not isinstance(loss, PendingLoss) or len(self._pending_losses) >= PENDING_LOSSES_MAX:
                loss = self._settle_losses(start_iter)
            if display:
                lapse = time.perf_counter() - timer
                per_s = (self.iter - iterations_last) / (lapse or 1.0)
                logger.info(f"Iteration {self.iter} ({_fmt(per_s)} iter/s, {_fmt(lapse)}s/{p.display} iters), "
                            f"loss = {_fmt(self.smoothed_loss)}")
                timer = time.perf_counter()
                if device.mode() == device.GPU and opencl.stats_enabled():   # KAFFE_OPENCL_STATS=1
                    logger.info(opencl.stats_per_iteration(opencl.stats(), self.iter - iterations_last))
                    opencl.reset_stats()
                iterations_last = self.iter
                self._log_outputs("Train", self.net, [b.cpu_data().ravel() for b in self.net.output_blobs])
                for watcher in self.watchers:
                    watcher.display(self.smoothed_loss, loss, per_s)
            for _, on_gradients_ready in self._callbacks:
                on_gradients_ready()
            self.apply_update()
            if self.net.debug_info:
                self.net.update_debug_info()
            request = self._requested_action()
            if (p.snapshot and self.iter % p.snapshot == 0) or request == SNAPSHOT:
                self.snapshot()
            if request == STOP:
                self.requested_early_exit = True
                break
        self._settle_losses(start_iter)

    def _deferred_losses(self):
        """In GPU mode the losses of the iterations stay on the device until a display step reads them all."""
        return deferred_losses(self._device_losses) if device.mode() == device.GPU else contextlib.nullcontext()

    def _settle_losses(self, start_iter):
        """Check and smooth the losses recorded since the last call, reading those left on the device in one
        transfer; returns the last one. A non-finite loss stops training, naming its iteration."""
        pending = self._pending_losses
        values = self._device_losses.read() if any(isinstance(l, PendingLoss) for _, l in pending) else None
        loss = None
        for iteration, loss in pending:
            loss = loss.value(values) if isinstance(loss, PendingLoss) else loss
            if not math.isfinite(loss):
                self._pending_losses = []
                raise KaffeError(f"Training diverged: the loss is {loss} at iteration {iteration}. "
                                 f"{first_non_finite(self.net)} "
                                 f"Lower base_lr, check the data and the fillers, or set clip_gradients.")
            self._update_smoothed_loss(loss, start_iter, iteration)
        self._pending_losses = []
        return loss

    def _update_smoothed_loss(self, loss, start_iter, iteration=None):
        window = self.param.average_loss
        if len(self.losses) < window:
            self.losses.append(loss)
            self.smoothed_loss = (self.smoothed_loss * (len(self.losses) - 1) + loss) / len(self.losses)
        else:
            index = ((self.iter if iteration is None else iteration) - start_iter) % window
            self.smoothed_loss += (loss - self.losses[index]) / window
            self.losses[index] = loss

    @staticmethod
    def _log_outputs(kind, net, values):
        index = 0
        for name, weight, vals in zip(net.outputs, net.output_loss_weights, values):
            for v in vals:
                extra = f" (* {_fmt(weight)} = {_fmt(weight * v)} loss)" if weight else ""
                logger.info(f"    {kind} net output #{index}: {name} = {_fmt(v)}{extra}")
                index += 1

    def test_all(self):
        if not distributed.root_solver():
            return   # rank 0 runs the test nets (Caffe's multi-GPU rule)
        for i in range(len(self.test_nets)):
            if self.requested_early_exit:
                break
            self.test(i)

    def test(self, test_net_id=0):
        logger.info(f"Iteration {self.iter}, Testing net (#{test_net_id})")
        net = self.test_nets[test_net_id]
        net.share_trained_layers_with(self.net)
        iterations = self.param.test_iter[test_net_id]
        scores = None
        loss = 0.0
        for _ in range(iterations):
            request = self._requested_action()
            while request != NONE:
                if request == SNAPSHOT:
                    self.snapshot()
                elif request == STOP:
                    self.requested_early_exit = True
                request = self._requested_action()
            if self.requested_early_exit:
                break
            iter_loss = net.forward_from_to(0, len(net.layers) - 1)
            loss += iter_loss
            outputs = [b.cpu_data().astype(np.float64).ravel() for b in net.output_blobs]
            scores = outputs if scores is None else [s + o for s, o in zip(scores, outputs)]
        if self.requested_early_exit:
            logger.info("Test interrupted.")
            return None
        if self.param.test_compute_loss:
            logger.info(f"Test loss: {_fmt(loss / iterations)}")
        means = [s / iterations for s in scores or []]
        self._log_outputs("Test", net, means)
        outputs = dict(zip(net.outputs, means))
        for watcher in self.watchers:
            watcher.test(test_net_id, outputs, loss / iterations if self.param.test_compute_loss else None)
        return outputs

    def add_callback(self, on_start, on_gradients_ready=None):
        """pycaffe's add_callback: on_start() runs before each iteration's forward/backward passes,
        on_gradients_ready() after them, before the update. One argument: an object with both methods
        (Caffe's Solver::Callback, e.g. an NCCL)."""
        if on_gradients_ready is None:
            on_start, on_gradients_ready = on_start.on_start, on_start.on_gradients_ready
        self._callbacks.append((on_start, on_gradients_ready))

    def share_weights(self, net):
        """pycaffe's share_weights: make `net`'s parameters views of the train net's, by layer name."""
        net.share_trained_layers_with(self.net)

    # -- updates (the update rules implement these) ---------------------------------------------
    def apply_update(self):
        """Update the weights from their diffs and count the iteration (`iter` += 1), as Caffe's ApplyUpdate."""
        raise NotImplementedError

    def history_blobs(self):
        """The per-parameter state saved in the .solverstate, in Caffe's order."""
        raise NotImplementedError

    # -- signals -------------------------------------------------------------------------------
    def request_action(self, action):
        """Ask the loop to STOP or SNAPSHOT at the next check (signal handlers call this)."""
        self._pending_actions.append(action)

    def _requested_action(self):
        if self.action_request is not None:   # over MPI: the action that every rank agreed on
            return self.action_request()
        if self._pending_actions:
            return self._pending_actions.pop(0)
        return NONE

    def handle_signals(self, sigint_effect=STOP, sighup_effect=SNAPSHOT):
        """Install SIGINT/SIGHUP handlers as Caffe's --sigint_effect / --sighup_effect; returns a restorer."""
        previous = {}
        for signum, effect in ((signal.SIGINT, sigint_effect), (signal.SIGHUP, sighup_effect)):
            if effect == NONE:
                continue
            previous[signum] = signal.signal(signum, lambda *_, e=effect: self.request_action(e))

        def restore():
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        return restore

    # -- snapshots -------------------------------------------------------------------------------
    def snapshot_filename(self, extension):
        return f"{self.param.snapshot_prefix}_iter_{self.iter}{extension}"

    def snapshot(self):
        """Write a snapshot pair; returns both paths. A write that fails (a full disk, `ulimit -f`) leaves the
        previous snapshots as they were and stops training, or, with snapshot_failure "continue", is logged and
        training goes on (returns None)."""
        if self.data_parallel is not None and self.data_parallel.world.rank:
            self._resume_state()   # over MPI, rank 0 writes the snapshot; the others send it their data cursors
            return None
        try:
            files = self._write_snapshot()
            for watcher in self.watchers:
                watcher.snapshot(files)
            return files
        except StorageError as e:
            message = f"Snapshot at iteration {self.iter} failed: {e}. The previous snapshots are intact"
            if self.snapshot_failure != "continue":
                raise KaffeError(f"{message}; free some space (or fix snapshot_prefix) and resume with "
                                 f"--snapshot auto, or train on without snapshots that fail with "
                                 f"--snapshot_failure continue") from None
            logger.warning(f"{message}; training goes on (--snapshot_failure continue)")
            return None

    def _write_snapshot(self):
        """Write the weights, then the solver state that names them, in snapshot_format, each atomically: at
        every instant the newest state on disk and its weights are complete. Without the state, the new
        weights are removed again.

        BINARYPROTO: <prefix>_iter_N.caffemodel + .solverstate; HDF5: .caffemodel.h5 + .solverstate.h5.
        """
        resume_state = json.dumps(self._resume_state())
        if self.param.snapshot_format == caffe_pb2.SolverParameter.HDF5:
            model_file = self.snapshot_filename(".caffemodel.h5")
            logger.info(f"Snapshotting to HDF5 file {model_file}")
            self.net.save_hdf5(model_file, self.param.snapshot_diff)
            state_file = self.snapshot_filename(".solverstate.h5")
            logger.info(f"Snapshotting solver state to HDF5 file {state_file}")
            with _removed_on_failure(model_file):
                hdf5_io.write_solver_state(state_file, self.iter, model_file, self.current_step,
                                           self.history_blobs(), resume_state)
            return model_file, state_file
        model_file = self.snapshot_filename(".caffemodel")
        logger.info(f"Snapshotting to binary proto file {model_file}")
        write_binary_proto(self.net.to_proto(self.param.snapshot_diff), model_file)
        state = caffe_pb2.SolverState(iter=self.iter, learned_net=model_file, current_step=self.current_step)
        for blob in self.history_blobs():
            blob.to_proto(state.history.add())
        state.kaffe_resume_state = resume_state
        state_file = self.snapshot_filename(".solverstate")
        logger.info(f"Snapshotting solver state to binary proto file {state_file}")
        with _removed_on_failure(model_file):
            write_binary_proto(state, state_file)
        return model_file, state_file

    def _resume_state(self):
        state = {"rng": device.rng_state(), "train_net": self.net.resume_state(),
                 "test_nets": [net.resume_state() for net in self.test_nets]}
        if self.report.tensorboard:   # a resumed run appends to the same TensorBoard run
            state["tensorboard_run"] = self.report.tensorboard.open_run()
        if self.data_parallel is not None:   # over MPI, the snapshot holds every rank's data cursors
            state = self.data_parallel.all_resume_states(state)
        return state

    def restore(self, state_file):
        """Load a .solverstate (binary) or, when the name ends in .h5 as Caffe decides, a .solverstate.h5."""
        state_file = os.fspath(state_file)
        history = self.history_blobs()
        if state_file.endswith(".h5"):
            self.iter, weights, self.current_step, extra = hdf5_io.read_solver_state(state_file, history)
        else:
            state = read_binary_proto(state_file, caffe_pb2.SolverState())
            if len(state.history) != len(history):
                raise KaffeError(f"{state_file}: Incorrect length of history blobs: the file has "
                                 f"{len(state.history)}, this solver and net need {len(history)} "
                                 f"(is it a .solverstate of this net and solver type?)")
            for blob, stored in zip(history, state.history):
                blob.from_proto(stored, reshape=False)
            self.iter, self.current_step = state.iter, state.current_step
            weights = state.learned_net if state.HasField("learned_net") else None
            extra = state.kaffe_resume_state or None
        weights = weights_file(weights, state_file)
        if weights:
            self.net.copy_from(weights)
        if extra:
            extra = distributed.rank_resume_state(json.loads(extra))
            device.set_rng_state(extra["rng"])
            self.net.set_resume_state(extra["train_net"])
            for net, net_state in zip(self.test_nets, extra.get("test_nets", [])):
                net.set_resume_state(net_state)
        for watcher in self.watchers:
            watcher.resume(extra.get("tensorboard_run") if extra else None)
