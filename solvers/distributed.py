"""Data-parallel training over MPI: `mpiexec -n K kaffe train`, and pycaffe's multi-GPU names on top of it.

Caffe's multi-GPU rules, over mpi4py instead of NCCL:
- every rank builds the same nets from the same files; rank 0's parameters are broadcast at the start;
- in TRAIN, the Data layer of rank r reads batch r of every K consecutive batches of the record stream, so K
  ranks with batch B consume per step the records that one process with batch K*B consumes, in the same order
  (Caffe's DataLayer::Skip deals the same records out one by one; whole batches keep BatchNorm's per-rank
  batches equal to the iter_size passes of one process);
- after backward the gradients are summed over the ranks and scaled by 1/K (Caffe's NCCL: ncclAllReduce, then
  caffe_gpu_scal(1 / solver_count)). Each rank's loss is normalised by its own batch, so the update equals one
  process with batch K*B; BatchNorm uses each rank's batch statistics, as in Caffe;
- gradients travel in buckets, each started (non-blocking allreduce) as soon as the layers that own its
  parameters finish backward, so the reduction overlaps the rest of backward;
- rank 0 logs, runs the test nets and writes snapshots (with every rank's data cursors); the others log errors;
- a failure on one rank stops all of them, naming the rank and the reason; a wait longer than KAFFE_MPI_TIMEOUT
  seconds (default 300) aborts the job instead of hanging.
mpi4py is imported only when a process was started by an MPI launcher with several ranks (or by pycaffe's NCCL).
"""
import atexit
import hashlib
import importlib.util
import logging
import os
import sys
import time

import numpy as np

from ..engine.errors import KaffeError
from ..engine.log import logger
from ..proto import caffe_pb2

TIMEOUT_ENV = "KAFFE_MPI_TIMEOUT"
BUCKET_BYTES = 1 << 20       # gradient bytes per allreduce: big enough to amortise latency, small enough to overlap
_FAILURE_TAG, _STATE_TAG, _HEARD_TAG = 7001, 7002, 7003
SPIN_S = 0.02            # how long a wait for the other ranks polls MPI without sleeping
HEARD_WAIT_S = 10        # how long a failed rank waits for the others to say why they stop before it aborts all
_STOP, _SNAPSHOT = 0, 1      # the slots of the per-iteration action vote
# launchers' environment: size and rank of the world (MPICH/Intel MPI hydra, Open MPI, MVAPICH)
_LAUNCHER_VARS = (("PMI_SIZE", "PMI_RANK"), ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"),
                  ("MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_RANK"))

# TRAIN data layers that every rank reads whole (only Data splits its records over the ranks), and how
UNSPLIT_SOURCES = {"ImageData": " (in its own shuffled order when shuffle is set)", "HDF5Data": "",
                   "WindowData": " (drawing its own windows)", "MemoryData": " (the arrays this rank was given)"}
_settings = {"count": None, "rank": None, "multiprocess": False}   # pycaffe's set_solver_count/... values
_world = None


def mpi():
    """mpi4py's MPI module, or a KaffeError naming the extra that provides it."""
    try:
        from mpi4py import MPI
    except ImportError:
        raise KaffeError('training over MPI needs mpi4py and an MPI library: pip install "kaffe[mpi]"') from None
    return MPI


def launched_size():
    """How many ranks the MPI launcher that started this process started (1 without one); MPI is not touched."""
    for size, _ in _LAUNCHER_VARS:
        if size in os.environ:
            return int(os.environ[size])
    return 1


# -- pycaffe's Caffe::solver_count / solver_rank / multiprocess ------------------------------------------
def solver_count():
    return _world.size if _settings["count"] is None and _world else _settings["count"] or 1


def solver_rank():
    return _world.rank if _settings["rank"] is None and _world else _settings["rank"] or 0


def set_solver_count(count):
    _settings["count"] = int(count)


def set_solver_rank(rank):
    _settings["rank"] = int(rank)


def set_multiprocess(multiprocess):
    _settings["multiprocess"] = bool(multiprocess)


def root_solver():
    return solver_rank() == 0


def has_nccl():
    """pycaffe's has_nccl: whether the multi-process reduction is available (here: mpi4py is installed)."""
    return importlib.util.find_spec("mpi4py") is not None


def record_share(phase):
    """(ranks K, rank r): a TRAIN Data layer of rank r reads batch r of every K consecutive batches of its
    records; TEST nets run on rank 0 only and read everything ((1, 0))."""
    if phase != caffe_pb2.TRAIN:
        return 1, 0
    return solver_count(), solver_rank()


def warn_uneven_share(owner, records, batch_size):
    """The data does not split sensibly over the ranks: say how (rank 0 logs it)."""
    count = solver_count()
    if count > 1 and records < count * batch_size:
        logger.warning(f"{owner}: {records} records are fewer than one step of {count} ranks x batch {batch_size}: "
                       f"records repeat within a step")
    elif count > 1 and records % count:
        logger.warning(f"{owner}: {records} records do not divide by {count} ranks: each epoch the ranks' shares "
                       f"shift by {records % count} record(s), so an epoch is not split evenly")


# -- the world of ranks ---------------------------------------------------------------------------------
def timeout():
    try:
        return float(os.environ.get(TIMEOUT_ENV, 300))
    except ValueError:
        raise KaffeError(f"{TIMEOUT_ENV} must be a number of seconds, got {os.environ[TIMEOUT_ENV]!r}") from None


def join():
    """The World of ranks when this process was started by an MPI launcher with several ranks, else None."""
    global _world
    if _world is None and launched_size() > 1:
        _world = World(mpi().COMM_WORLD)
    return _world


def _digest(message):
    return hashlib.sha256(message.SerializeToString(deterministic=True)).hexdigest()[:16]


def setup_digests(param):
    """What must be equal on every rank: kaffe's version, the solver (paths aside) and each net, by content."""
    from .. import __version__
    from ..engine.net import read_net_param
    solver = caffe_pb2.SolverParameter()
    solver.CopyFrom(param)
    for field in ("net", "train_net", "test_net", "snapshot_prefix"):
        solver.ClearField(field)
    digests = {"kaffe version": __version__, "solver file": _digest(solver)}
    for name in [param.net, param.train_net, *param.test_net]:
        if name:
            try:
                digests[f"net file {name}"] = _digest(read_net_param(name))
            except KaffeError as e:
                digests[f"net file {name}"] = f"unreadable ({e})"
    return digests


class PeerFailure(KaffeError):
    """Another rank failed (or stopped answering); this rank stops too."""


class World:
    """The ranks of one data-parallel job: rank roles, start-up agreement, failure propagation, watchdog."""

    def __init__(self, comm):
        self.MPI = mpi()
        self.comm = comm
        self.size, self.rank = comm.Get_size(), comm.Get_rank()
        local = comm.Split_type(self.MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank, self.local_size = local.Get_rank(), local.Get_size()
        local.Free()
        self.failed = False          # this rank failed: abort the job when the process exits
        self._notices = []           # failure notices on their way to the other ranks
        self._told_by = []           # ranks whose failure notice stopped this one: told when it has said so
        self.timeout = timeout()
        if self.rank:
            logger.setLevel(logging.ERROR)   # rank 0 writes the log; the others only errors
        share_cores(self.local_size)
        hook = sys.excepthook

        def excepthook(kind, value, traceback):   # a pycaffe script that dies stops the other ranks too
            if not isinstance(value, PeerFailure):
                self.tell_failure(f"{kind.__name__}: {value}")
            self.failed = True   # abort at exit, so that no rank waits for this one
            hook(kind, value, traceback)
        sys.excepthook = excepthook
        atexit.register(self._abort_if_failed)

    def where(self):
        return f"rank {self.rank} of {self.size}"

    # -- agreement ---------------------------------------------------------------------------------
    def check_same_setup(self, param):
        """Every rank must run the same kaffe on the same solver and net files: compared before anything else."""
        everyone = self.comm.allgather(setup_digests(param))
        mine = everyone[0]
        for rank, theirs in enumerate(everyone[1:], 1):
            for what in mine:
                if theirs.get(what) != mine[what]:
                    raise KaffeError(f"the ranks differ at start: rank {rank}'s {what} is {theirs.get(what)}, "
                                     f"rank 0's is {mine[what]}; every rank must run the same kaffe version on "
                                     f"the same solver and net files")

    def agree(self, error):
        """Every rank says whether its set-up failed; one failure fails all of them, naming rank and reason."""
        errors = self.comm.allgather(error)
        failed = [(rank, e) for rank, e in enumerate(errors) if e]
        if failed:
            raise KaffeError("; ".join(f"rank {rank} of {self.size} failed: {e}" for rank, e in failed))

    def solver(self, cls, param, **options):
        """A solver of class cls built on every rank, its parameters those of rank 0, reducing its gradients."""
        self.check_same_setup(param)
        solver, error = None, None
        if self.rank:   # rank 0 writes the TensorBoard events
            from .tensorboard import ENV
            options["tensorboard"] = None
            os.environ.pop(ENV, None)
        try:
            solver = cls(param, **options)
        except KaffeError as e:
            error = str(e)
        except Exception as e:   # a bug is a failure too: the other ranks must not wait for this one
            error = f"{type(e).__name__}: {e}"
        self.agree(error)
        for layer in solver.net.layers:
            if layer.type in UNSPLIT_SOURCES:
                logger.warning(f"{layer.type} layer '{layer.name}' is not split over the {self.size} ranks: each rank "
                               f"reads the whole source{UNSPLIT_SOURCES[layer.type]}; use a Data layer (LMDB/LevelDB) "
                               f"for K ranks to train as one process with a K times larger batch")
        trainer = DataParallel(solver, self)
        trainer.broadcast()
        solver.add_callback(trainer)
        solver.net.after_backward(trainer)
        return solver

    # -- failures ----------------------------------------------------------------------------------
    def tell_failure(self, reason):
        """Tell every other rank why this one stops (they are waiting in a reduction, or soon will be)."""
        self.failed = True
        message = f"rank {self.rank} of {self.size} failed: {reason}"
        self._notices = [self.comm.isend(message, dest=r, tag=_FAILURE_TAG) for r in range(self.size)
                         if r != self.rank]

    def check_peers(self):
        status = self.MPI.Status()
        if self.comm.Iprobe(source=self.MPI.ANY_SOURCE, tag=_FAILURE_TAG, status=status):
            self.failed = True
            self._told_by.append(status.Get_source())
            raise PeerFailure(f"{self.where()} stops: {self.comm.recv(source=status.Get_source(), tag=_FAILURE_TAG)}")

    def wait(self, requests, what):
        """Complete requests, watching for failure notices; a wait beyond the timeout is a failure.

        MPI moves data only inside its calls, so the first SPIN_S are spent calling it back to back (a reduction
        whose peers are ready completes 3x sooner than with a sleep between polls); after that the polls back
        off to at most one per millisecond, so that a rank waiting for a slow peer leaves the cores to it."""
        start = time.monotonic()
        pause = 0.0
        while not self.MPI.Request.Testall(requests):
            self.check_peers()
            waited = time.monotonic() - start
            if waited > self.timeout:
                raise KaffeError(f"no answer from the other ranks for {self.timeout:g} s while "
                                 f"{what}: a rank hung or died (set {TIMEOUT_ENV} for longer waits)")
            if waited > SPIN_S:
                pause = min(max(2 * pause, 2e-5), 1e-3)
                time.sleep(pause)

    def failures_stop_all(self):
        return _FailuresStopAll(self)

    def _abort_if_failed(self):
        if not self.failed:
            return
        sys.stdout.flush()
        sys.stderr.flush()
        # a rank stopped by another's failure has printed why by now (atexit): it tells the failed rank, which
        # waits for that (a loaded machine may take seconds) before its abort takes every rank down
        heard = [self.comm.isend(None, dest=rank, tag=_HEARD_TAG) for rank in self._told_by]
        waiting = {r for r in range(self.size) if r != self.rank} if self._notices else set()
        deadline = time.monotonic() + HEARD_WAIT_S
        while (waiting or not self.MPI.Request.Testall(heard + self._notices)) and time.monotonic() < deadline:
            for rank in [r for r in waiting if self.comm.Iprobe(source=r, tag=_HEARD_TAG)]:
                self.comm.recv(source=rank, tag=_HEARD_TAG)
                waiting.discard(rank)
            time.sleep(0.01)
        time.sleep(0.2)   # the launcher forwards the last lines of output
        self.comm.Abort(1)


class _FailuresStopAll:
    """`with world.failures_stop_all():` an error in the block is re-raised naming this rank, the other ranks are
    told, and the job is aborted when this process exits (so no rank waits forever)."""

    def __init__(self, world):
        self.world = world

    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback):
        if value is None:
            return False
        world = self.world
        if isinstance(value, PeerFailure):
            return False
        reason = str(value) if isinstance(value, KaffeError) else f"{kind.__name__}: {value}"
        if isinstance(value, KeyboardInterrupt):
            reason = "interrupted"
        world.tell_failure(reason)
        if isinstance(value, KaffeError):
            raise KaffeError(f"{world.where()}: {value}") from None
        return False


def rank_devices(devices):
    """Over MPI each rank takes one of the listed OpenCL devices: that of its rank on its node (--gpu all:
    rank i of a node on device i)."""
    world = join()
    if world is None or not devices:
        return devices
    return [devices[world.local_rank % len(devices)]]


def failures_stop_all():
    """A context in which an error stops every rank (nothing without MPI)."""
    import contextlib
    return _world.failures_stop_all() if _world else contextlib.nullcontext()


def share_cores(local_ranks):
    """Each rank's BLAS gets cores / ranks-on-this-node threads, unless the user chose (OPENBLAS_NUM_THREADS...)."""
    if local_ranks < 2 or any(v in os.environ for v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
                                                         "MKL_NUM_THREADS")):
        return
    set_blas_threads(max(1, (os.cpu_count() or 1) // local_ranks))


def set_blas_threads(threads):
    """Set the thread count of the OpenBLAS that numpy loaded (its symbol names carry a build suffix)."""
    import ctypes
    with open("/proc/self/maps") as maps:
        libraries = {line.split()[-1] for line in maps if "openblas" in line.lower() and "/" in line}
    for path in libraries:
        library = ctypes.CDLL(path)
        for name in ("scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_", "openblas_set_num_threads"):
            if hasattr(library, name):
                getattr(library, name)(ctypes.c_int(threads))
                break


# -- the gradient reduction -------------------------------------------------------------------------------
class _Bucket:
    """Gradients reduced together. Their host copies live side by side in one buffer, so the allreduce and the
    scaling work on the diffs themselves, with no copy in or out."""

    def __init__(self, blobs):
        self.blobs = blobs
        self.buffer = np.zeros(sum(b._diff.count for b in blobs), dtype=np.float32)
        self.request = None
        self._place()

    def _place(self):
        self.memories, offset = [], 0
        for blob in self.blobs:
            memory = blob._diff
            memory.place_on_host(self.buffer[offset:offset + memory.count])
            self.memories.append(memory)
            offset += memory.count

    def _placed(self):
        """Whether every diff still keeps its host copy here (a reshape that grows a blob gives it new memory)."""
        return all(blob._diff is memory and memory._host is not None and memory._host.base is self.buffer
                   for blob, memory in zip(self.blobs, self.memories))

    def start(self, world):
        if not self._placed():
            self.buffer = np.zeros(sum(b._diff.count for b in self.blobs), dtype=np.float32)
            self._place()
        for memory in self.memories:
            memory.cpu()   # a diff computed on an OpenCL device comes down into the buffer
        self.request = world.comm.Iallreduce(world.MPI.IN_PLACE, self.buffer, world.MPI.SUM)

    def finish(self, scale):
        np.multiply(self.buffer, scale, out=self.buffer)
        for memory in self.memories:
            memory.mutable_cpu()   # the reduced host copy is the newest
        self.request = None


class DataParallel:
    """Caffe's Solver::Callback for data parallelism (and the reduction behind pycaffe's NCCL).

    Called with a layer index after that layer's backward (net.after_backward): starts the buckets whose
    gradients are final. on_gradients_ready: starts the rest, votes on STOP/SNAPSHOT requests, waits, and
    leaves the sum over the ranks divided by the rank count in every diff."""

    def __init__(self, solver, world, bucket_bytes=BUCKET_BYTES):
        self.solver, self.world, self.net = solver, world, solver.net
        self.scale = np.float32(1.0 / world.size)
        self.buckets, self.ready_after = self._make_buckets(bucket_bytes)
        self._pass = 0
        self._in_step = False
        self._vote = np.zeros(2, dtype=np.int32)
        self._agreed = "none"
        self.exposed_s = 0.0        # time spent waiting for reductions after backward (what overlap did not hide)
        self.gathers_cursors = True   # snapshots are taken by every rank together and hold every rank's cursors
        self.overlap = True           # False: every bucket starts after backward (the benchmark's reference)
        solver.data_parallel = self
        solver.action_request = self._agreed_action

    def _make_buckets(self, bucket_bytes):
        """Buckets in backward order; a parameter is final after the lowest layer that uses it (shared ones
        included). Parameters with lr_mult 0 never change, so they are not reduced."""
        net = self.net
        final_at = {}
        for net_id, (layer_id, _) in enumerate(net._param_layer_indices):
            learnable = net.learnable_param_ids[net_id]
            final_at[learnable] = min(final_at.get(learnable, layer_id), layer_id)
        order = sorted((i for i in final_at if net.params_lr[i] != 0), key=lambda i: (-final_at[i], i))
        buckets, ready_after, members, size = [], {}, [], 0
        for position, i in enumerate(order):
            members.append(i)
            size += net.learnable_params[i].count * 4
            if size >= bucket_bytes or position == len(order) - 1:
                bucket = _Bucket([net.learnable_params[j] for j in members])
                buckets.append(bucket)
                ready_after.setdefault(min(final_at[j] for j in members), []).append(bucket)
                members, size = [], 0
        return buckets, ready_after

    def broadcast(self):
        """Every rank takes rank 0's parameters (and the other per-layer blobs, e.g. BatchNorm's statistics)."""
        blobs = [b for layer in self.net.layers for b in layer.blobs]
        flat = np.concatenate([b.cpu_data().reshape(-1) for b in blobs]) if blobs else np.zeros(0, np.float32)
        self.world.wait([self.world.comm.Ibcast(flat, root=0)], "broadcasting the parameters of rank 0")
        offset = 0
        for blob in blobs:
            blob.mutable_cpu_data().reshape(-1)[...] = flat[offset:offset + blob.count]
            offset += blob.count

    # -- Solver::Callback ---------------------------------------------------------------------------------
    def on_start(self):
        self._pass = 0
        self._in_step = True

    def __call__(self, layer_id):
        """After layer layer_id's backward: in the last pass of iter_size, start the buckets it completes."""
        if not (self._in_step and self.overlap):
            return   # a backward outside the solver's step (pycaffe) reduces nothing
        if layer_id == 0:
            self._pass += 1   # a forward/backward pass ends with layer 0
        if self._pass + (layer_id != 0) != self.solver.param.iter_size:
            return   # gradients still accumulate over iter_size passes
        for bucket in self.ready_after.get(layer_id, ()):
            if bucket.request is None:
                bucket.start(self.world)
        if any(b.request is not None for b in self.buckets):
            self.world.MPI.Request.Testall([b.request for b in self.buckets if b.request is not None])
            self.world.check_peers()

    def on_gradients_ready(self):
        world = self.world
        start = time.perf_counter()
        for bucket in self.buckets:   # what layer hooks did not start (pycaffe without after_backward(nccl))
            if bucket.request is None:
                bucket.start(world)
        self._vote[:] = 0
        for action in self.solver._pending_actions:
            self._vote[_STOP if action == "stop" else _SNAPSHOT] = 1
        del self.solver._pending_actions[:]
        vote = world.comm.Iallreduce(world.MPI.IN_PLACE, self._vote, world.MPI.SUM)
        world.wait([b.request for b in self.buckets] + [vote],
                   f"reducing the gradients of iteration {self.solver.iter}")
        for bucket in self.buckets:
            bucket.finish(self.scale)
        self.exposed_s += time.perf_counter() - start
        self._in_step = False
        # one action per iteration, as the loop reads one: a stop voted with a snapshot is voted again next time
        if self._vote[_SNAPSHOT]:
            self._agreed = "snapshot"
            if self._vote[_STOP]:
                self.solver._pending_actions.append("stop")
        elif self._vote[_STOP]:
            self._agreed = "stop"

    def _agreed_action(self):
        """The action all ranks agreed on at this iteration's reduction, once (the solver's action_request)."""
        action, self._agreed = self._agreed, "none"
        return action

    # -- snapshots: rank 0 writes, with every rank's data cursors ---------------------------------------------
    def all_resume_states(self, state):
        """Rank 0: its resume state with the other ranks' (solver_count, other_ranks); the others send theirs."""
        if not self.gathers_cursors:
            return state
        if self.world.rank:
            self.world.wait([self.world.comm.isend(state, dest=0, tag=_STATE_TAG)], "sending the data cursors")
            return state
        others = []
        for rank in range(1, self.world.size):
            request = self.world.comm.irecv(source=rank, tag=_STATE_TAG)
            start = time.monotonic()
            while True:
                done, value = request.test()
                if done:
                    break
                self.world.check_peers()
                if time.monotonic() - start > self.world.timeout:
                    raise KaffeError(f"rank {rank} did not send its data cursors for the "
                                     f"snapshot within {self.world.timeout:g} s")
                time.sleep(1e-4)
            others.append(value)
        return dict(state, solver_count=self.world.size, other_ranks=others)


def rank_resume_state(state):
    """This rank's part of a snapshot's resume state. Snapshots hold every rank's data cursors: with the same
    rank count each rank continues exactly; with another one the ranks restart from rank 0's cursors
    (each offset by its rank), which a warning says is not the data order of the original run."""
    saved = state.get("solver_count", 1)
    count, rank = solver_count(), solver_rank()
    if saved == count:
        return state if rank == 0 else state["other_ranks"][rank - 1]
    logger.warning(f"the snapshot was made by {saved} rank(s) and training resumes with {count}: the ranks take "
                   f"up rank 0's data position and the records are split anew, so the run does not continue with "
                   f"exactly the data order (or random draws) of the original")
    mine = dict(state if rank == 0 or rank > len(state.get("other_ranks", [])) else state["other_ranks"][rank - 1])
    mine["train_net"] = {name: dict(layer, skip_batches=rank) if "key" in layer else layer
                         for name, layer in state["train_net"].items()}
    return mine


class NCCL(DataParallel):
    """pycaffe's NCCL(solver, uid) on the MPI reduction, for Caffe's python/train.py pattern run by an MPI
    launcher (`mpiexec -n K python script.py`): set_solver_count(K), set_solver_rank(rank), SGDSolver(...),
    NCCL(solver, uid), bcast(), solver.add_callback(nccl), solver.net.after_backward(nccl), solver.step(n).
    (train.py's own multiprocessing start cannot join an MPI job: its processes are started by mpiexec here.)"""

    def __init__(self, solver, uid=""):
        world = join()
        if world is None:
            raise KaffeError("caffe.NCCL reduces gradients over MPI: start the ranks with an MPI launcher, e.g. "
                             "mpiexec -n 2 python script.py (one process per rank, each calling "
                             "set_solver_count(2) and set_solver_rank(its rank))")
        if (solver_count(), solver_rank()) != (world.size, world.rank):
            raise KaffeError(f"caffe.NCCL: set_solver_count({solver_count()}) / set_solver_rank({solver_rank()}) "
                             f"do not match the MPI job: {world.size} ranks, this one is rank {world.rank}")
        super().__init__(solver, world)
        self.gathers_cursors = False   # as in Caffe, rank 0 alone may snapshot (with its own data cursors)

    @staticmethod
    def new_uid():
        """The id Caffe's NCCL uses to find its ranks; MPI's launcher has already joined them, so any id does."""
        return os.urandom(16).hex()

    def bcast(self):
        self.broadcast()
