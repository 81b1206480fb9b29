"""The solver update of every learnable parameter in one OpenCL launch (GPU mode).

The device copies of the parameters' data, of their diffs and of each history set are moved into flat buffers,
one region per parameter, so that the update kernel (updates.cl) and the clearing of the diffs run once over all
of them. The host copies stay per blob: reading `blob.data` or writing a snapshot works as before.
"""
import numpy as np

from ..engine import device, opencl

UPDATE_KERNELS = "solvers/updates.cl"
# each parameter starts at a multiple of this many floats (128 bytes): kernels keep their aligned vector loads
ALIGNMENT = 32


class FlatParameters:
    """The flat device buffers of a net's learnable parameters and a solver's history blobs."""

    def __init__(self, params, history, rates, decays):
        self.params, self.history_blobs = list(params), list(history)
        sets = len(history) // max(len(self.params), 1)
        self.history = [history[k * len(self.params):(k + 1) * len(self.params)] for k in range(sets)]
        sizes = [-(-blob.memory.count // ALIGNMENT) * ALIGNMENT for blob in self.params]
        starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.size = int(starts[-1])
        self.memories = [[b._data for b in self.params], [b._diff for b in self.params]]
        self.memories += [[b._data for b in blobs] for blobs in self.history]
        self.buffers = []
        for memories in self.memories:
            buffer = opencl.zeros(max(self.size, 1))   # the padding between parameters stays finite
            for memory, start in zip(memories, starts):
                memory.place_on_device(buffer[int(start):int(start) + memory.count])
            self.buffers.append(buffer)
        self.starts = opencl.upload(starts[:-1], opencl.scratch(self, "starts", len(self.params), np.int32))
        self.rates = opencl.to_device(np.asarray(rates, np.float32))
        self.decays = opencl.to_device(np.asarray(decays, np.float32))

    def holds(self, params, history):
        """Whether these are the blobs placed here and they still keep their device copies in the flat buffers
        (a reshape that grows a blob gives it new memory)."""
        return params == self.params and history == self.history_blobs and self._intact()

    def _intact(self):
        current = [[b._data for b in self.params], [b._diff for b in self.params]]
        current += [[b._data for b in blobs] for blobs in self.history]
        return all(now is placed and placed._device.base_data == buffer.base_data
                   for blobs, memories, buffer in zip(current, self.memories, self.buffers)
                   for now, placed in zip(blobs, memories))

    def zero_diffs(self):
        """In GPU mode, diff = 0 for every parameter in one launch; False (nothing done) in CPU mode or when the
        diffs are no longer all here."""
        if device.mode() != device.GPU or not self._intact():
            return False
        for memory in self.memories[1]:
            memory.mutable_gpu()   # every diff now lives on the device (a host copy would be stale)
        opencl.fill(self.buffers[1], 0.0, n=self.size)
        return True

    def update(self, rule, rate, norm, scalars, l1):
        """Run update rule `rule` (RULE_<rule> of updates.cl) with learning rate `rate`, gradient factor `norm`
        (1 / iter_size) and the rule's scalars (a, b, c) over every parameter; the data and diffs are left on
        the device."""
        for memories in self.memories:
            for memory in memories:
                memory.mutable_gpu()
        data, diff, *history = self.buffers
        first = history[0] if history else diff
        second = history[1] if len(history) > 1 else first
        a, b, c = (list(scalars) + [0.0, 0.0, 0.0])[:3]
        opencl.launch(UPDATE_KERNELS, "update_parameters", self.size, data.data, diff.data, first.data, second.data,
                      self.starts.data, len(self.params), self.rates.data, self.decays.data, float(rate),
                      float(norm), float(a), float(b), float(c), defines={f"RULE_{rule}": True, "L1": l1})
