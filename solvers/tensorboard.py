"""TensorBoard event files of a training run, written with tensorboardX (`pip install "kaffe[tensorboard]"`).

`kaffe train --tensorboard DIR`, `KAFFE_TENSORBOARD=DIR` or `Solver(..., tensorboard=DIR)` write into
DIR/<run>/, where <run> is the snapshot prefix's name (`lenet`; `lenet-2`, ... when taken by an earlier run):
- at every display: train/smoothed_loss (the logged loss), train/raw_loss, train/lr, train/iter_per_s and
  train/<output> for every train net output;
- at every test pass: test/<net index>/<output> (and test/<net index>/loss with test_compute_loss);
- at every snapshot: histograms params/<layer>/<index> of every parameter blob and params/<layer>/<index>/grad
  of its last gradient;
- once: the net graph (a GraphDef of layers and blobs, for the Graphs tab) and the solver and net prototxt.
A run resumed from a snapshot appends to the run that wrote it (its name is in the snapshot's kaffe state) and
hides that run's events from the resumed iteration on, so no curve goes back in steps. Events reach the disk
at least every FLUSH_SECS seconds.
"""
import atexit
import itertools
import os

import numpy as np
from google.protobuf import text_format

from ..engine.errors import KaffeError
from .lr_policy import learning_rate

ENV = "KAFFE_TENSORBOARD"
FLUSH_SECS = 5
# event files are named by the second they open in: a counter keeps two of one second apart, in order
_FILES = itertools.count()


def _summary_writer():
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        raise KaffeError('TensorBoard event files need the tensorboardX package: pip install "kaffe[tensorboard]"') \
            from None
    return SummaryWriter


def _indented(text):
    """Markdown code block: TensorBoard's text tab keeps the prototxt's lines and indentation."""
    return "\n".join("    " + line for line in text.splitlines())


def net_graph(net):
    """TensorBoard's GraphDef of a net: a node per layer (op = its type) fed by the layers that wrote its
    bottoms, each node's top shapes as `_output_shapes` (shown on the edges)."""
    from tensorboardX.proto.attr_value_pb2 import AttrValue
    from tensorboardX.proto.graph_pb2 import GraphDef
    from tensorboardX.proto.tensor_shape_pb2 import TensorShapeProto
    from tensorboardX.proto.versions_pb2 import VersionDef
    graph = GraphDef(versions=VersionDef(producer=22))
    writer_of = {}   # blob name -> "layer" or "layer:top index", the last layer that wrote it
    bottom_names, top_names = net.bottom_names, net.top_names
    for layer_id, (name, layer) in enumerate(zip(net.layer_names, net.layers)):
        bottoms, tops = bottom_names[name], top_names[name]
        shapes = [TensorShapeProto(dim=[TensorShapeProto.Dim(size=d) for d in blob.shape])
                  for blob in net.top_vecs[layer_id]]
        graph.node.add(name=name, op=layer.type, input=[writer_of[b] for b in bottoms if b in writer_of],
                       attr={"_output_shapes": AttrValue(list=AttrValue.ListValue(shape=shapes)),
                             "top": AttrValue(list=AttrValue.ListValue(s=[t.encode() for t in tops]))})
        for index, top in enumerate(tops):
            writer_of[top] = name if index == 0 else f"{name}:{index}"
    return graph


class TensorBoardLog:
    """The event files of one solver's training; the solver calls display/test/snapshot as it goes."""

    def __init__(self, logdir, solver):
        self.writer_class = _summary_writer()
        self.logdir, self.solver = os.fspath(logdir), solver
        self.run = None           # the run's folder name under logdir, decided when the first event comes
        self.resumed_run = None   # after a restore: the run that wrote the snapshot, whose curves go on
        self.writer = None

    @property
    def run_dir(self):
        return os.path.join(self.logdir, self.run)

    def resume(self, run):
        """The solver was restored from a snapshot written by run `run` (None: unknown, or not with TensorBoard).
        The next event reopens the files there (or in this solver's own run), hiding what comes after."""
        self.resumed_run = run or self.run
        self.close()

    def _new_run_name(self):
        base = os.path.basename(self.solver.param.snapshot_prefix) or self.solver.net.name or "run"
        name, n = base, 1
        while os.path.isdir(os.path.join(self.logdir, name)) and os.listdir(os.path.join(self.logdir, name)):
            n += 1
            name = f"{base}-{n}"
        return name

    def _open(self):
        if self.writer is not None:
            return self.writer
        start, first = self.solver.iter, self.run is None
        if self.resumed_run and os.path.isdir(os.path.join(self.logdir, self.resumed_run)):
            self.run, purge = self.resumed_run, start   # TensorBoard hides that run's events from `start` on
        else:
            self.run, purge = self.run or self._new_run_name(), None
        self.resumed_run = None
        self.writer = self.writer_class(self.run_dir, purge_step=purge, flush_secs=FLUSH_SECS,
                                        filename_suffix=f".iter{start:09d}.{os.getpid()}.{next(_FILES):03d}")
        atexit.register(self.close)
        if first and purge is None:
            from tensorboardX.proto.event_pb2 import Event
            self.writer._get_file_writer().add_event(
                Event(graph_def=net_graph(self.solver.net).SerializeToString()))
            self.writer.add_text("solver", _indented(text_format.MessageToString(self.solver.param)), start)
            self.writer.add_text("net", _indented(text_format.MessageToString(self.solver.net.param)), start)
        return self.writer

    def open_run(self):
        """The run's name, the event file opened if it was not yet."""
        self._open()
        return self.run

    def start(self):
        pass

    def display(self, smoothed_loss, raw_loss, iter_per_s):
        writer, solver = self._open(), self.solver
        step = solver.iter
        writer.add_scalar("train/smoothed_loss", smoothed_loss, step)
        writer.add_scalar("train/raw_loss", raw_loss, step)
        if solver.param.lr_policy:
            writer.add_scalar("train/lr", learning_rate(solver.param, step, solver.current_step)[0], step)
        writer.add_scalar("train/iter_per_s", iter_per_s, step)
        for name, blob in zip(solver.net.outputs, solver.net.output_blobs):
            self._outputs(f"train/{name}", blob.cpu_data().ravel(), step)

    def test(self, net_id, outputs, loss=None):
        """outputs: {name: mean values} of one test pass."""
        writer = self._open()
        step = self.solver.iter
        if loss is not None:
            writer.add_scalar(f"test/{net_id}/loss", loss, step)
        for name, values in outputs.items():
            self._outputs(f"test/{net_id}/{name}", values, step)

    def _outputs(self, tag, values, step):
        if len(values) == 1:
            self.writer.add_scalar(tag, float(values[0]), step)
        else:
            for j, value in enumerate(values):
                self.writer.add_scalar(f"{tag}/{j}", float(value), step)

    def snapshot(self, files):
        writer, net = self._open(), self.solver.net
        step = self.solver.iter
        for name, layer in zip(net.layer_names, net.layers):
            for index, blob in enumerate(layer.blobs):
                for suffix, values in (("", blob.cpu_data()), ("/grad", blob.cpu_diff())):
                    if values.size and np.isfinite(values).all():
                        writer.add_histogram(f"params/{name}/{index}{suffix}", values.ravel(), step)
        writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()
            self.writer = None
