"""pycaffe's pure-Python layer (`caffe.pycaffe`): batched runs of a Net, Timer, log and init_log.

Net takes its batched runs (forward_all, backward_all, forward_backward_all) from NetBatches. The classes that
pycaffe.py re-exports from _caffe (Net, the solvers, NCCL) are kaffe's own, looked up on first use: this module
is imported while engine/net.py itself loads.
"""
import importlib
import itertools
import logging
import time

import numpy as np

from . import device
from .errors import KaffeValueError
from .log import init_log as _init_glog_style_log, logger

# pycaffe.py's names that live elsewhere in kaffe
_KAFFE_NAMES = ("Net", "SGDSolver", "NesterovSolver", "AdaGradSolver", "RMSPropSolver", "AdaDeltaSolver",
                "AdamSolver", "NCCL")

# glog's minimum levels 0..3 (INFO, WARNING, ERROR, FATAL)
_GLOG_LEVELS = (logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL)


def __getattr__(name):
    if name in _KAFFE_NAMES:
        return getattr(importlib.import_module("kaffe"), name)
    raise AttributeError(f"module 'kaffe.pycaffe' has no attribute '{name}'")


class NetBatches:
    """pycaffe's forward_all / backward_all / forward_backward_all: inputs of any length run through the net in
    batches of its batch size; the last batch is padded with zeros and the padding dropped from the results."""

    def forward_all(self, blobs=None, **kwargs):
        """{blob name: array of every item} for the outputs and `blobs`, inputs given by name as in forward()."""
        return self._every_item(lambda batch: self.forward(blobs=blobs, **batch), self.outputs + list(blobs or []),
                                kwargs)

    def backward_all(self, diffs=None, **kwargs):
        """{blob name: array of every item's diff} for the inputs and `diffs`, output diffs given by name."""
        return self._every_item(lambda batch: self.backward(diffs=diffs, **batch), self.inputs + list(diffs or []),
                                kwargs)

    def _every_item(self, run, names, kwargs):
        """run(batch) over the batches of kwargs, the named arrays collected item by item; without kwargs one run
        on what the net holds (its data layers' batch)."""
        if not kwargs:
            return {name: array.copy() for name, array in run({}).items()}
        collected = {name: [] for name in set(names)}
        for batch in self._batch(kwargs):
            for name, array in run(batch).items():
                collected[name].extend(array.copy())
        return self._unpad(collected, kwargs)

    def forward_backward_all(self, blobs=None, diffs=None, **kwargs):
        """(outputs, diffs) of forward_all and backward_all in one pass per batch; kwargs name inputs (for
        forward) and outputs (for backward); a side without arrays runs on what the net holds."""
        outs = {name: [] for name in set(self.outputs + list(blobs or []))}
        all_diffs = {name: [] for name in set(self.inputs + list(diffs or []))}
        forward_batches = self._batch({name: kwargs[name] for name in self.inputs if name in kwargs})
        backward_batches = self._batch({name: kwargs[name] for name in self.outputs if name in kwargs})
        pairs = list(itertools.zip_longest(forward_batches, backward_batches, fillvalue={})) or [({}, {})]
        for inputs, top_diffs in pairs:
            for name, array in self.forward(blobs=blobs, **inputs).items():
                outs[name].extend(array.copy())
            for name, array in self.backward(diffs=diffs, **top_diffs).items():
                all_diffs[name].extend(array.copy())
        return self._unpad(outs, kwargs), self._unpad(all_diffs, kwargs)

    def _batch(self, blobs):
        """Yield {name: batch} dicts of the net's batch size (pycaffe's Net._batch), the last one zero-padded."""
        if not blobs:
            return
        lengths = {name: len(values) for name, values in blobs.items()}
        if len(set(lengths.values())) > 1:
            raise KaffeValueError(f"inputs of different lengths: {lengths}")
        num = next(iter(lengths.values()))
        batch_size = self._blobs[0].shape[0]
        for start in range(0, num - num % batch_size, batch_size):
            yield {name: values[start:start + batch_size] for name, values in blobs.items()}
        remainder = num % batch_size
        if remainder:
            yield {name: np.concatenate([values[-remainder:],
                                         np.zeros((batch_size - remainder,) + np.shape(values)[1:])])
                   for name, values in blobs.items()}

    @staticmethod
    def _unpad(collected, kwargs):
        """Arrays of the collected items, without the padding of the last batch."""
        num = len(next(iter(kwargs.values()))) if kwargs else None
        return {name: np.asarray(items)[:num] for name, items in collected.items()}


class Timer:
    """Caffe's Timer: start(), stop(), and `ms`, the time between them (reading it stops a running timer).

    On the CPU `ms` counts whole milliseconds, as Caffe's boost clock does; in GPU mode the device queue is
    drained at start and stop, so that the time covers the device's work (Caffe records CUDA events).
    """

    def __init__(self):
        self._running = False
        self._has_run = False
        self._started = self._stopped = 0.0

    def _now(self):
        if device.mode() == device.GPU:
            device.synchronize()
        return time.perf_counter()

    def start(self):
        if not self._running:
            self._started = self._now()
            self._running = True
            self._has_run = True

    def stop(self):
        if self._running:
            self._stopped = self._now()
            self._running = False

    @property
    def ms(self):
        if not self._has_run:
            logger.warning("Timer has never been run before reading time.")
            return 0.0
        self.stop()
        elapsed = (self._stopped - self._started) * 1e3
        return elapsed if device.mode() == device.GPU else float(int(elapsed))


def init_log(level=0, stderr=True):
    """pycaffe's init_log([level[, stderr]]): show messages of glog level `level` and above (0 INFO, 1 WARNING,
    2 ERROR, 3 FATAL) on stderr. With stderr=False glog writes log files and shows only errors on stderr; kaffe
    writes no log files, so only ERROR and above are shown."""
    minimum = _GLOG_LEVELS[min(max(int(level), 0), len(_GLOG_LEVELS) - 1)]
    _init_glog_style_log(level=minimum if stderr else max(minimum, logging.ERROR))


def log(message):
    """pycaffe's log: one INFO line in kaffe's (glog-format) log."""
    logger.info(message)
