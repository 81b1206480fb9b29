"""Memory that lives on the host (numpy) and/or an OpenCL device, copied lazily, as Caffe's SyncedMemory.

The head says where the newest copy is. Reading one side copies only when the other side was
written last; asking for a mutable side moves the head there, so the other copy goes stale.
"""
import numpy as np

from . import opencl

UNINITIALIZED = "uninitialized"
HEAD_AT_CPU = "head at cpu"
HEAD_AT_GPU = "head at gpu"
SYNCED = "synced"


class SyncedMemory:
    def __init__(self, count):
        self.count = int(count)
        self._host = None
        self._device = None
        self._views = {}  # count -> the view of the device copy's first count values, made once
        self.head = UNINITIALIZED
        self.version = 0  # bumped by every mutable access: lets layers cache what they derived from it

    def _to_cpu(self):
        if self.head == UNINITIALIZED:
            if self._host is None:
                self._host = np.zeros(self.count, dtype=np.float32)
            else:
                self._host[...] = 0   # placed (place_on_host) before it held anything
            self.head = HEAD_AT_CPU
        elif self.head == HEAD_AT_GPU:
            if self._host is None:
                self._host = np.empty(self.count, dtype=np.float32)
            opencl.download(self._device, out=self._host)
            self.head = SYNCED

    def _to_gpu(self):
        if self.head == UNINITIALIZED:
            if self._device is None:
                self._set_device(opencl.empty(self.count))
            opencl.fill(self._device, 0.0)
            self.head = HEAD_AT_GPU
        elif self.head == HEAD_AT_CPU:
            if self._device is None:
                self._set_device(opencl.empty(self.count))
            opencl.upload(self._host, self._device)
            self.head = SYNCED

    def place_on_device(self, array):
        """Keep the device copy in `array` (count floats, e.g. a view of a buffer that holds several memories
        side by side), moving the values there on the device when the device copy is current."""
        if self.head in (HEAD_AT_GPU, SYNCED):
            opencl.copy(self._device, array, n=self.count)
        self._set_device(array)

    def place_on_host(self, array):
        """Keep the host copy in `array` (count float32 values, e.g. a view of a buffer that several memories share
        side by side, as a gradient bucket does), moving the values there when the host copy is current."""
        if self.head in (HEAD_AT_CPU, SYNCED):
            array[...] = self._host
        self._host = array

    def _set_device(self, array):
        self._device = array
        self._views = {}

    def cpu(self):
        """The flat float32 host array, for reading."""
        self._to_cpu()
        return self._host

    def mutable_cpu(self):
        """The flat float32 host array, for writing: the device copy becomes stale."""
        self._to_cpu()
        self.head = HEAD_AT_CPU
        self.version += 1
        return self._host

    def gpu(self):
        """The flat float32 device array (pyopencl.array.Array), for reading."""
        self._to_gpu()
        return self._device

    def mutable_gpu(self):
        self._to_gpu()
        self.head = HEAD_AT_GPU
        self.version += 1
        return self._device

    def gpu_view(self, count, mutable=False):
        """The device copy's first `count` values (gpu() or mutable_gpu()): blobs smaller than their memory
        read a view, kept here because slicing a pyopencl array costs more than the launch that uses it."""
        if self.head != HEAD_AT_GPU and self.head != SYNCED:
            self._to_gpu()
        if mutable:
            self.head = HEAD_AT_GPU
            self.version += 1
        view = self._views.get(count)
        if view is None:
            view = self._views[count] = self._device[:count]
        return view
