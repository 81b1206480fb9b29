"""Data layers: Input, DummyData, MemoryData and Data (LMDB records with a prefetch thread)."""
import copy
import os
import queue
import threading
import weakref

import numpy as np

from ..engine import device
from ..engine.errors import KaffeError
from ..engine.filler import fill
from ..engine.layer import Layer, register_layer
from ..engine.log import logger
from ..proto import caffe_pb2
from .transform import DataTransformer


class _SourceLayer(Layer):
    """A layer with no bottoms whose tops are produced on the host."""
    exact_num_bottom_blobs = 0

    def reshape(self, bottom, top):
        pass  # the tops are shaped in setup (or per batch, in forward)

    def forward_gpu(self, bottom, top):
        # nothing to compute: the host tops reach the device when a later layer asks for them
        self.forward_cpu(bottom, top)


def _pick(values, index, what, layer, num_top):
    """Caffe's "one value for all tops, or one per top" rule for repeated fields."""
    if len(values) == 1:
        return values[0]
    if len(values) != num_top:
        raise KaffeError(f"{layer.type} layer '{layer.name}': must specify '{what}' once, or once per top blob "
                         f"({num_top}); specified {len(values)}")
    return values[index]


@register_layer("Input")
class InputLayer(_SourceLayer):
    """The tops are the net's inputs: the user writes them; forward does nothing."""
    min_top_blobs = 1

    def layer_setup(self, bottom, top):
        shapes = self.layer_param.input_param.shape
        if len(shapes) not in (0, 1, len(top)):
            raise KaffeError(f"Input layer '{self.name}': must specify 'shape' once, once per top blob "
                             f"({len(top)}), or not at all; specified {len(shapes)}")
        if shapes:
            for i, blob in enumerate(top):
                blob.reshape(_pick(shapes, i, "shape", self, len(top)))

    def forward_cpu(self, bottom, top):
        pass


@register_layer("DummyData")
class DummyDataLayer(_SourceLayer):
    """Tops filled by fillers (constant 0 by default); constant tops are filled once, others every forward."""
    min_top_blobs = 1

    def layer_setup(self, bottom, top):
        param = self.layer_param.dummy_data_param
        num_top = len(top)
        fillers = list(param.data_filler)
        if len(fillers) not in (0, 1, num_top):
            raise KaffeError(f"DummyData layer '{self.name}': the number of data fillers must be 0, 1 or equal to "
                             f"the number of tops ({num_top}); you specified {len(fillers)}")
        legacy = [("num", param.num), ("channels", param.channels), ("height", param.height),
                  ("width", param.width)]
        if any(len(values) for _, values in legacy):
            if len(param.shape):
                raise KaffeError(f"DummyData layer '{self.name}': both shape and legacy num/channels/height/width "
                                 f"were specified")
            for i, blob in enumerate(top):
                blob.reshape([_pick(values, i, what, self, num_top) for what, values in legacy])
        else:
            if not len(param.shape):
                raise KaffeError(f"DummyData layer '{self.name}': must specify 'shape' once, or once per top blob "
                                 f"({num_top}); specified 0")
            for i, blob in enumerate(top):
                blob.reshape(_pick(param.shape, i, "shape", self, num_top))
        if not fillers:
            fillers = [caffe_pb2.FillerParameter()]  # the schema's default filler: constant 0
        self.fillers = [fillers[0] if len(fillers) == 1 else fillers[i] for i in range(num_top)]
        # constant tops never change, so they are filled here only, as Caffe's refill_ rule does
        for blob, filler in zip(top, self.fillers):
            if filler.type == "constant":
                fill(blob, filler)

    def forward_cpu(self, bottom, top):
        for blob, filler in zip(top, self.fillers):
            if filler.type != "constant":
                fill(blob, filler)


@register_layer("MemoryData")
class MemoryDataLayer(_SourceLayer):
    """Emits batches of arrays given to reset() (pycaffe's set_input_arrays), wrapping around."""
    exact_num_top_blobs = 2

    def layer_setup(self, bottom, top):
        param = self.layer_param.memory_data_param
        self.batch_size = int(param.batch_size)
        self.item_shape = (int(param.channels), int(param.height), int(param.width))
        if self.batch_size * int(np.prod(self.item_shape)) <= 0:
            raise KaffeError(f"MemoryData layer '{self.name}': batch_size, channels, height and width must be "
                             f"specified and positive in memory_data_param")
        top[0].reshape(self.batch_size, *self.item_shape)
        top[1].reshape(self.batch_size)
        self._data = None
        self._labels = None
        self._pos = 0

    def reset(self, data, labels):
        """Use `data` (N x C x H x W) and `labels` (N or N x 1 x 1 x 1); N must be a multiple of batch_size."""
        data = np.ascontiguousarray(data, dtype=np.float32)
        labels = np.ascontiguousarray(labels, dtype=np.float32)
        where = f"MemoryData layer '{self.name}'"
        if data.ndim != 4 or data.shape[1:] != self.item_shape:
            raise KaffeError(f"{where}: data must be N x {' x '.join(map(str, self.item_shape))}, "
                             f"got shape {data.shape}")
        if labels.shape not in ((data.shape[0],), (data.shape[0], 1, 1, 1)):
            raise KaffeError(f"{where}: labels must have shape ({data.shape[0]},) or ({data.shape[0]}, 1, 1, 1) "
                             f"for {data.shape[0]} data items, got {labels.shape}")
        if data.shape[0] == 0 or data.shape[0] % self.batch_size:
            raise KaffeError(f"{where}: the number of items ({data.shape[0]}) must be a positive multiple of "
                             f"the batch size ({self.batch_size})")
        if self.layer_param.HasField("transform_param"):
            logger.warning(f"{where} does not transform array data on reset()")
        self._data = data
        self._labels = labels.reshape(-1)
        self._pos = 0

    def forward_cpu(self, bottom, top):
        if self._data is None:
            raise KaffeError(f"MemoryData layer '{self.name}' has no data: call reset(data, labels) "
                             f"(net.set_input_arrays) first")
        end = self._pos + self.batch_size
        top[0].reshape(self.batch_size, *self.item_shape)
        top[1].reshape(self.batch_size)
        top[0].mutable_cpu_data()[...] = self._data[self._pos:end]
        top[1].mutable_cpu_data()[...] = self._labels[self._pos:end]
        self._pos = end % len(self._data)


# -- LMDB --------------------------------------------------------------------------------------------
_envs = {}  # real path -> [lmdb.Environment, users]: LMDB forbids opening one file twice in a process
_envs_lock = threading.Lock()


def _open_lmdb(path, owner):
    try:
        import lmdb
    except ImportError:
        raise KaffeError(f"{owner}: reading LMDB needs the 'lmdb' package (pip install lmdb)") from None
    hint = "(data_param.source must be the LMDB directory, the one that holds data.mdb, not data.mdb itself)"
    if not os.path.exists(path):
        raise KaffeError(f"{owner}: data source {path} does not exist {hint}")
    if not os.path.isdir(path):
        raise KaffeError(f"{owner}: data source {path} is a file, not an LMDB directory {hint}")
    if not os.path.isfile(os.path.join(path, "data.mdb")):
        raise KaffeError(f"{owner}: data source {path} is not an LMDB: it has no data.mdb {hint}")
    key = os.path.realpath(path)
    with _envs_lock:
        entry = _envs.get(key)
        if entry is None:
            try:
                # lock=False: a read-only reader needs no lock file, so sources on read-only disks work
                env = lmdb.open(path, readonly=True, lock=False, readahead=False, max_readers=512)
            except lmdb.Error as e:
                raise KaffeError(f"{owner}: cannot open data source {path} as an LMDB: {e} {hint}") from None
            entry = _envs[key] = [env, 0]
        entry[1] += 1
    return entry[0], key


def _release_lmdb(key):
    with _envs_lock:
        entry = _envs.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del _envs[key]
            entry[0].close()


def _position(cursor, key):
    """Put the cursor on `key`, or on the next record after it (wrapping), e.g. when the DB changed."""
    if not cursor.set_range(key):
        cursor.first()


class _BatchReader:
    """Reads Datum records in key order (wrapping at the end) and queues whole transformed batches.

    The thread owns the cursor and the private RNG while it runs; each queued batch carries the state
    (next key, RNG state) from which the batch after it is made, which is what an exact resume needs.
    """

    def __init__(self, owner, env, transformer, batch_size, depth):
        self.owner = owner
        self.env = env
        self.transformer = transformer
        self.batch_size = batch_size
        self.depth = depth
        self._thread = None
        self._stop = None
        self._queue = None

    def start(self, key, rng):
        self._stop = threading.Event()
        self._queue = queue.Queue(self.depth)
        self._thread = threading.Thread(target=self._run, args=(key, rng, self._stop, self._queue),
                                        name=f"kaffe-prefetch-{self.owner}", daemon=True)
        self._thread.start()

    def stop(self):
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        self._queue = None  # what it read ahead is dropped with it

    @property
    def running(self):
        return self._thread is not None and self._thread.is_alive()

    def next(self):
        """The next (data, labels, state after it) from the queue, waiting for the thread if need be."""
        if self._queue is None:
            raise KaffeError(f"{self.owner}: the prefetch thread has stopped (the layer was closed)")
        while True:
            try:
                item = self._queue.get(timeout=0.5)
                break
            except queue.Empty:
                if not self.running:
                    raise KaffeError(f"{self.owner}: the prefetch thread has stopped") from None
        if isinstance(item, BaseException):
            raise item
        return item

    def _put(self, item, stop, out):
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return
            except queue.Full:
                pass

    def _run(self, key, rng, stop, out):
        try:
            with self.env.begin() as txn:
                cursor = txn.cursor()
                _position(cursor, key)
                while not stop.is_set():
                    data, labels = self._read_batch(cursor, rng)
                    self._put((data, labels, {"key": cursor.key().hex(), "rng": rng.bit_generator.state}),
                              stop, out)
        except KaffeError as e:
            self._put(e, stop, out)
        except Exception as e:  # anything else (a corrupt DB page...) reaches the caller, not just a log
            self._put(KaffeError(f"{self.owner}: reading the data source failed: {e!r}"), stop, out)

    def _read_batch(self, cursor, rng):
        items, labels = [], np.empty(self.batch_size, dtype=np.float32)
        datum = caffe_pb2.Datum()
        for i in range(self.batch_size):
            key, value = cursor.item()
            try:
                datum.ParseFromString(value)
            except Exception:
                raise KaffeError(f"{self.owner}: the record with key {key!r} is not a Datum") from None
            items.append(self.transformer.datum_array(datum, f" {key!r}"))
            labels[i] = datum.label
            if not cursor.next():
                cursor.first()  # wrap around: the data is read as an endless stream, as Caffe does
        return self._transform(items, rng), labels

    def _transform(self, items, rng):
        shapes = {a.shape for a in items}
        if len(shapes) == 1:
            return self.transformer.transform(np.stack(items), rng)
        if not self.transformer.crop_size:
            raise KaffeError(f"{self.owner}: the items of a batch differ in size ({sorted(shapes)}); "
                             f"without crop_size they must all have the first one's size")
        # differently sized items cropped to one size: transform each group of one size as a batch
        out = None
        for shape in sorted(shapes):
            index = [i for i, a in enumerate(items) if a.shape == shape]
            part = self.transformer.transform(np.stack([items[i] for i in index]), rng)
            if out is None:
                out = np.empty((len(items),) + part.shape[1:], dtype=np.float32)
            if part.shape[1:] != out.shape[1:]:
                raise KaffeError(f"{self.owner}: the items of a batch have different channel counts "
                                 f"({sorted(shapes)})")
            out[index] = part
        return out


def _shutdown(reader, env_key):
    reader.stop()
    _release_lmdb(env_key)


@register_layer("Data")
class DataLayer(_SourceLayer):
    """Datum records from an LMDB in key order, transformed, in batches prepared by a background thread."""
    min_top_blobs = 1
    max_top_blobs = 2

    def layer_setup(self, bottom, top):
        param = self.layer_param.data_param
        owner = f"Data layer '{self.name}'"
        self.close()
        if param.batch_size <= 0:
            raise KaffeError(f"{owner}: data_param.batch_size must be positive")
        if param.backend != caffe_pb2.DataParameter.LMDB:
            default = "" if param.HasField("backend") else " (Caffe's default when data_param.backend is unset)"
            raise KaffeError(f"{owner}: the LEVELDB backend{default} is not supported yet (it arrives with the "
                             f"data pipeline); use an LMDB source and set `backend: LMDB` in data_param")
        self.batch_size = int(param.batch_size)
        self.transformer = DataTransformer(self.layer_param.transform_param, self.phase, owner,
                                           force_color=param.force_encoded_color)
        # a private generator, so the thread's draws neither disturb nor depend on the main thread's
        rng = np.random.default_rng(device.rng().integers(2 ** 63))
        env, env_key = _open_lmdb(param.source, owner)
        try:
            with env.begin() as txn:
                entries = txn.stat()["entries"]
                if entries == 0:
                    raise KaffeError(f"{owner}: data source {param.source} is empty (an LMDB with no records)")
                cursor = txn.cursor()
                cursor.first()
                if param.rand_skip:
                    skip = int(rng.integers(param.rand_skip)) % entries
                    logger.info(f"Skipping first {skip} data points.")
                    for _ in range(skip):
                        cursor.next()
                start_key, value = cursor.item()
            datum = caffe_pb2.Datum()
            try:
                datum.ParseFromString(value)
            except Exception:
                raise KaffeError(f"{owner}: the record with key {start_key!r} in {param.source} is not a Datum; "
                                 f"is this a Caffe data LMDB?") from None
            item_shape = self.transformer.output_shape(self.transformer.datum_array(datum, f" {start_key!r}").shape)
        except BaseException:
            _release_lmdb(env_key)
            raise
        top[0].reshape(self.batch_size, *item_shape)
        if len(top) > 1:
            top[1].reshape(self.batch_size)
        logger.info(f"output data size: {','.join(str(d) for d in top[0].shape)}")
        self._reader = _BatchReader(owner, env, self.transformer, self.batch_size, max(int(param.prefetch), 1))
        self._finalizer = weakref.finalize(self, _shutdown, self._reader, env_key)
        self._next_state = {"key": start_key.hex(), "rng": rng.bit_generator.state}
        self._reader.start(start_key, rng)

    def forward_cpu(self, bottom, top):
        data, labels, self._next_state = self._reader.next()
        top[0].reshape(data.shape)
        top[0].mutable_cpu_data()[...] = data
        if len(top) > 1:
            top[1].reshape(labels.shape)
            top[1].mutable_cpu_data()[...] = labels

    def get_resume_state(self):
        """Where the NEXT batch this layer hands out starts: its first key (hex) and the RNG state before it."""
        return copy.deepcopy(self._next_state)

    def set_resume_state(self, state):
        try:
            key = bytes.fromhex(state["key"])
            rng = np.random.default_rng()
            rng.bit_generator.state = state["rng"]
        except (KeyError, TypeError, ValueError) as e:
            raise KaffeError(f"Data layer '{self.name}': bad resume state {state!r}: {e}") from None
        self._reader.stop()  # the batches it read ahead came from the old position: drop them
        self._next_state = {"key": key.hex(), "rng": rng.bit_generator.state}
        self._reader.start(key, rng)

    def close(self):
        """Stop the prefetch thread and release the LMDB (also done when the layer is garbage collected)."""
        finalizer = getattr(self, "_finalizer", None)
        if finalizer is not None:
            finalizer()
