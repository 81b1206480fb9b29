"""The summary block `kaffe train` logs when training ends (also on Ctrl-C or an error): what the run did.

Its lines follow Caffe's "Optimization Done." and avoid the patterns Caffe's log tools look for ("Iteration N",
"lr = ", "net output #"), so parse_log reads a log with the report as it reads one without.
"""
import time

from ..engine.log import logger


def _fmt(value):
    return format(float(value), ".6g")


def _names(names):
    return ", ".join(names) if names else "none"


class RunReport:
    """Collects what the solver reports (the solver calls start/test/snapshot/resume) and formats it."""

    def __init__(self, solver):
        self.solver = solver
        self.started = None          # (perf_counter, iteration) at the first step
        self.tests = {}              # (net id, output name) -> [(iteration, value)]
        self.snapshots = []
        self.weights = []            # (file, copied layers, ignored source layers)
        self.tensorboard = None      # the TensorBoardLog, if the run writes one

    def start(self):
        if self.started is None:
            self.started = (time.perf_counter(), self.solver.iter)

    def resume(self, run):
        self.started = None

    def display(self, smoothed_loss, raw_loss, iter_per_s):
        pass

    def test(self, net_id, outputs, loss=None):
        if loss is not None:
            self.tests.setdefault((net_id, "loss (test_compute_loss)"), []).append((self.solver.iter, loss))
        for name, values in outputs.items():
            for j, value in enumerate(values):
                key = (net_id, name if len(values) == 1 else f"{name}[{j}]")
                self.tests.setdefault(key, []).append((self.solver.iter, float(value)))

    def snapshot(self, files):
        self.snapshots.extend(files)

    def close(self):
        pass

    def copied_weights(self, source, copied, ignored):
        self.weights.append((source, copied, ignored))

    def _lower_is_better(self, net_id, name):
        net = self.solver.test_nets[net_id]
        weights = dict(zip(net.outputs, net.output_loss_weights))
        return weights.get(name.split("[")[0], 1) != 0

    def finish(self):
        """Log the report and close the TensorBoard files."""
        for line in self.lines():
            logger.info(line)
        if self.tensorboard is not None:
            self.tensorboard.close()

    def lines(self):
        solver = self.solver
        began, first = self.started or (time.perf_counter(), solver.iter)
        seconds = time.perf_counter() - began
        done = solver.iter - first
        lines = ["Run report:",
                 f"  iterations: {done} done ({first} -> {solver.iter}) in {seconds:.1f} s, "
                 f"{_fmt(done / seconds if seconds > 0 else 0.0)} iter/s"]
        for (net_id, name), history in self.tests.items():
            last_iter, last = history[-1]
            pick = min if self._lower_is_better(net_id, name) else max
            best_iter, best = pick(history, key=lambda item: item[1])
            lines.append(f"  test net #{net_id} {name}: last {_fmt(last)} (iteration {last_iter}), "
                         f"best {_fmt(best)} (iteration {best_iter})")
        lines.append(f"  snapshots written: {_names(self.snapshots)}")
        if self.weights:
            copied = sorted({name for _, names, _ in self.weights for name in names})
            with_params = [layer.name for layer in solver.net.layers if layer.blobs]
            lines.append(f"  weights: {', '.join(source for source, _, _ in self.weights)}")
            lines.append(f"    copied by name: {_names([n for n in with_params if n in copied])}")
            lines.append(f"    freshly filled (not in the weights): "
                         f"{_names([n for n in with_params if n not in copied])}")
            ignored = sorted({name for _, _, names in self.weights for name in names})
            lines.append(f"    skipped (not in this net): {_names(ignored)}")
        if self.tensorboard is not None and self.tensorboard.run is not None:
            lines.append(f"  TensorBoard: {self.tensorboard.run_dir} (tensorboard --logdir {self.tensorboard.logdir})")
        return lines
