"""Data layers: Input, DummyData, MemoryData, Data (LMDB/LevelDB), ImageData, HDF5Data, HDF5Output, WindowData.

Data, ImageData, HDF5Data and WindowData make whole batches on a background thread (depth data_param.prefetch), so that
reading and transforming overlap the net's compute; each batch carries the state (cursor, private RNGs) from
which the next one is made, so that a solver snapshot resumes exactly.
"""
import copy
import io
import os
import queue
import threading
import weakref

import numpy as np

from ..engine import device
from ..engine.bad_records import RecordChecker
from ..engine.hdf5_io import H5PY_ERRORS
from ..engine.errors import KaffeError
from ..engine.filler import fill
from ..engine.layer import Layer, register_layer
from ..engine.log import logger
from ..engine.memory_limits import check_count
from ..proto import caffe_pb2
from .transform import DataTransformer, read_image, resize_bilinear


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


# -- databases of Datum records -----------------------------------------------------------------------
_handles = {}  # (backend, real path) -> [open handle, users]: neither LMDB nor LevelDB may be opened twice
_handles_lock = threading.Lock()
BACKENDS = {caffe_pb2.DataParameter.LMDB: "lmdb", caffe_pb2.DataParameter.LEVELDB: "leveldb"}
_NAMES = {"lmdb": "LMDB", "leveldb": "LevelDB"}
_A_NAMES = {"lmdb": "an LMDB", "leveldb": "a LevelDB"}


def _looks_like(path):
    """Which kind of database the folder holds, by its files (for hints about a wrong backend)."""
    if os.path.isfile(os.path.join(path, "data.mdb")):
        return "lmdb"
    if os.path.isfile(os.path.join(path, "CURRENT")):
        return "leveldb"
    return None


def _check_db_path(path, backend, owner):
    name = _NAMES[backend]
    hint = f"(the source must be the {name} directory" + (", the one that holds data.mdb, not data.mdb itself)"
                                                          if backend == "lmdb" else ")")
    if not os.path.exists(path):
        raise KaffeError(f"{owner}: data source {path} does not exist {hint}")
    if not os.path.isdir(path):
        raise KaffeError(f"{owner}: data source {path} is a file, not {_A_NAMES[backend]} directory {hint}")
    kind = _looks_like(path)
    if kind is None:
        marker = "data.mdb" if backend == "lmdb" else "CURRENT file"
        raise KaffeError(f"{owner}: data source {path} is not {_A_NAMES[backend]}: it has no {marker} {hint}")
    if kind != backend:
        field = "LMDB" if kind == "lmdb" else "LEVELDB"
        default = " (LEVELDB is Caffe's default when data_param.backend is unset)" if kind == "lmdb" else ""
        raise KaffeError(f"{owner}: data source {path} is {_A_NAMES[kind]}, not {_A_NAMES[backend]}: set "
                         f"`backend: {field}`{default}")


def _open_lmdb(path, owner):
    import lmdb
    try:
        # lock=False: a read-only reader needs no lock file, so sources on read-only disks work
        return lmdb.open(path, readonly=True, lock=False, readahead=False, max_readers=512)
    except lmdb.Error as e:
        raise KaffeError(f"{owner}: cannot open data source {path} as an LMDB: {e}") from None


def _open_leveldb(path, owner):
    try:
        import plyvel
    except ImportError:
        raise KaffeError(f"{owner}: reading LevelDB needs the 'plyvel' package (pip install plyvel)") from None
    try:
        return plyvel.DB(path, create_if_missing=False)
    except (plyvel.Error, OSError) as e:
        busy = " (another process has it open: a LevelDB can be used by one process at a time)" \
            if "lock" in str(e).lower() else ""
        raise KaffeError(f"{owner}: cannot open data source {path} as a LevelDB: {e}{busy}") from None


class _LmdbCursor:
    def __init__(self, env):
        self._txn = env.begin()
        self._cursor = self._txn.cursor()

    def first(self):
        return self._cursor.first()

    def seek(self, key):
        """Put the cursor on `key`, or on the next record after it (wrapping), e.g. when the DB changed."""
        return self._cursor.set_range(key) or self._cursor.first()

    def item(self):
        return self._cursor.item()

    def advance(self):
        if not self._cursor.next():
            self._cursor.first()  # the records are read as an endless stream, as Caffe does

    def close(self):
        self._txn.abort()


class _LevelDBCursor:
    def __init__(self, db):
        self._iterator = db.iterator()
        self._item = None

    def _load(self):
        self._item = next(self._iterator, None)
        return self._item is not None

    def first(self):
        self._iterator.seek_to_start()
        return self._load()

    def seek(self, key):
        self._iterator.seek(key)
        return self._load() or self.first()

    def item(self):
        return self._item

    def advance(self):
        if not self._load():
            self.first()

    def close(self):
        self._iterator.close()


class Database:
    """A read-only LMDB or LevelDB (backend "lmdb" / "leveldb"), shared by all its readers in this process."""

    def __init__(self, path, backend, owner):
        path = os.fspath(path)
        _check_db_path(path, backend, owner)
        self.path, self.backend, self.owner = path, backend, owner
        self._key = (backend, os.path.realpath(path))
        with _handles_lock:
            entry = _handles.get(self._key)
            if entry is None:
                opener = _open_lmdb if backend == "lmdb" else _open_leveldb
                entry = _handles[self._key] = [opener(path, owner), 0]
            entry[1] += 1
        self._handle = entry[0]

    def cursor(self):
        """A cursor (first/seek/item/advance/close); use it in one thread only."""
        if self._handle is None:
            raise KaffeError(f"{self.owner}: the data source {self.path} was closed")
        return _LmdbCursor(self._handle) if self.backend == "lmdb" else _LevelDBCursor(self._handle)

    def count(self):
        """The number of records (a pass over the keys for a LevelDB, which keeps no count)."""
        if self.backend == "lmdb":
            return self._handle.stat()["entries"]
        return sum(1 for _ in self._handle.iterator(include_value=False))

    def records(self):
        """(key, value) of every record in key order, once."""
        cursor = self.cursor()
        try:
            if not cursor.first():
                return
            first = cursor.item()[0]
            while True:
                yield cursor.item()
                cursor.advance()
                if cursor.item()[0] == first:
                    return
        finally:
            cursor.close()

    def close(self):
        if self._handle is None:
            return
        self._handle = None
        with _handles_lock:
            entry = _handles.get(self._key)
            entry[1] -= 1
            if entry[1] == 0:
                del _handles[self._key]
                entry[0].close()


def parse_datum(value, key, owner):
    datum = caffe_pb2.Datum()
    try:
        datum.ParseFromString(value)
    except Exception:
        raise KaffeError(f"{owner}: the record with key {key!r} is not a Datum (is this a Caffe data "
                         f"database?)") from None
    return datum


# -- whole-batch prefetching ------------------------------------------------------------------------------
def _rng_from(state):
    rng = np.random.default_rng()
    rng.bit_generator.state = state
    return rng


def _size_mismatch(owner, name, shape, first_name, first_shape):
    return KaffeError(f"{owner}: {name} is {' x '.join(map(str, shape))} but {first_name}, the first item of its "
                      f"batch, is {' x '.join(map(str, first_shape))}; the items of a batch must have one size "
                      f"(resize them, e.g. with convert_imageset --resize_height/--resize_width or "
                      f"image_data_param new_height/new_width, or crop them to one size with crop_size)")


def _transform_items(owner, transformer, items, names, rng):
    """Stack and transform the items of one batch; differently sized items only with crop_size, as in Caffe."""
    first = items[0].shape
    if all(a.shape == first for a in items):
        return transformer.transform(np.stack(items), rng)
    bad = next(i for i, a in enumerate(items) if a.shape != first)
    if not transformer.crop_size or items[bad].shape[0] != first[0]:
        raise _size_mismatch(owner, names[bad], items[bad].shape, names[0], first)
    # differently sized items cropped to one size: transform each group of one size as a batch
    out = None
    for shape in sorted({a.shape for a in items}):
        index = [i for i, a in enumerate(items) if a.shape == shape]
        part = transformer.transform(np.stack([items[i] for i in index]), rng)
        if out is None:
            out = np.empty((len(items),) + part.shape[1:], dtype=np.float32)
        out[index] = part
    return out


class _Prefetcher:
    """A background thread that queues whole batches made by source.batches(state).

    The generator yields (tops, state after): the state from which the batch after this one is made, which
    is what an exact resume needs. The thread owns the source's cursor and private RNGs while it runs.
    """

    def __init__(self, owner, source, depth):
        self.owner = owner
        self.source = source
        self.depth = depth
        self._thread = None
        self._stop = None
        self._queue = None

    def start(self, state):
        self._stop = threading.Event()
        self._queue = queue.Queue(self.depth)
        self._thread = threading.Thread(target=self._run, args=(state, self._stop, self._queue),
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
        """The next (tops, state after them), waiting for the thread if need be."""
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

    @staticmethod
    def _put(item, stop, out):
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def _run(self, state, stop, out):
        try:
            batches = self.source.batches(state)
            try:
                for item in batches:
                    if not self._put(item, stop, out):
                        return
            finally:
                batches.close()
        except KaffeError as e:
            self._put(e, stop, out)
        except Exception as e:  # anything else (a corrupt DB page...) reaches the caller, not just a log
            self._put(KaffeError(f"{self.owner}: reading the data source failed: {e!r}"), stop, out)


def _shutdown(prefetcher, source):
    prefetcher.stop()
    source.close()


class _PrefetchingLayer(_SourceLayer):
    """Tops made by a source object (never the layer itself, so that the layer can be collected) on a
    background thread, a whole transformed batch at a time; the host tops reach the device in one upload."""

    def _start(self, source, state):
        depth = max(int(self.layer_param.data_param.prefetch), 1)  # Caffe reads it for every prefetching layer
        self._source = source
        self._prefetcher = _Prefetcher(source.owner, source, depth)
        self._finalizer = weakref.finalize(self, _shutdown, self._prefetcher, source)
        self._next_state = state
        self._prefetcher.start(state)

    def forward_cpu(self, bottom, top):
        arrays, self._next_state = self._prefetcher.next()
        for blob, array in zip(top, arrays):
            blob.reshape(array.shape)
            blob.mutable_cpu_data()[...] = array

    def get_resume_state(self):
        """Where the NEXT batch this layer hands out starts (cursor, private RNG states), JSON-friendly."""
        return copy.deepcopy(self._next_state)

    def set_resume_state(self, state):
        try:
            state = self._source.check_state(state)
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise KaffeError(f"{self.type} layer '{self.name}': bad resume state {state!r}: {e!r}") from None
        self._prefetcher.stop()  # the batches it read ahead came from the old position: drop them
        self._next_state = state
        self._prefetcher.start(state)

    def close(self):
        """Stop the prefetch thread and release the source (also done when the layer is garbage collected)."""
        finalizer = getattr(self, "_finalizer", None)
        if finalizer is not None:
            finalizer()


# -- Data ----------------------------------------------------------------------------------------------
class _DatumSource:
    def __init__(self, owner, db, transformer, batch_size, labels, gap=0):
        self.owner, self.db, self.transformer = owner, db, transformer
        self.batch_size, self.labels = batch_size, labels
        self.gap = gap   # over MPI: the records of the other ranks' batches, skipped after each batch
        self.checker = RecordChecker(f"data source {db.path}", db.count)

    def check_state(self, state):
        bytes.fromhex(state["key"])
        _rng_from(state["rng"])
        # skip_batches: a resume with another rank count starts this rank's share after rank 0's position
        skip = {"skip_batches": int(state["skip_batches"])} if state.get("skip_batches") else {}
        return {"key": state["key"], "rng": state["rng"], **skip}

    def batches(self, state):
        rng = _rng_from(state["rng"])
        cursor = self.db.cursor()
        try:
            if not cursor.seek(bytes.fromhex(state["key"])):
                raise KaffeError(f"{self.owner}: data source {self.db.path} is empty")
            for _ in range(state.get("skip_batches", 0) * self.batch_size):
                cursor.advance()
            while True:
                tops = self._read_batch(cursor, rng)
                for _ in range(self.gap):
                    cursor.advance()
                yield tops, {"key": cursor.item()[0].hex(), "rng": rng.bit_generator.state}
        finally:
            cursor.close()

    def _read_record(self, key, value, first):
        """The Datum and its pixels (decoded when encoded), or a KaffeError naming the source, key and reason;
        without crop_size, its size must be that of the first item of its batch (`first`: key, pixels), as in
        Caffe."""
        try:
            datum = parse_datum(value, key, self.owner)
            item = self.transformer.datum_array(datum, f" {key!r}")
            if first and item.shape != first[1].shape and not self.transformer.crop_size:
                raise _size_mismatch(self.owner, f"the record with key {key!r}", item.shape,
                                     f"the record with key {first[0]!r}", first[1].shape)
            return datum, item
        except KaffeError as e:
            raise KaffeError(f"{e} (data source {self.db.path})") from None

    def _read_batch(self, cursor, rng):
        keys, datums, items = [], [], []
        while len(datums) < self.batch_size:
            key, value = cursor.item()
            cursor.advance()
            try:
                datum, item = self._read_record(key, value, (keys[0], items[0]) if items else None)
            except KaffeError as e:
                self.checker.bad(e)
                continue
            self.checker.good()
            keys.append(key)
            datums.append(datum)
            items.append(item)
        labels = np.array([d.label for d in datums], dtype=np.float32)
        first = datums[0]
        shape = (first.channels, first.height, first.width)
        size = shape[0] * shape[1] * shape[2]
        if size and all(not d.encoded and len(d.data) == size and (d.channels, d.height, d.width) == shape
                        for d in datums):
            # the common case, raw 8-bit pixels of one size: the batch is one buffer, no per-item arrays
            pixels = np.frombuffer(b"".join(d.data for d in datums), dtype=np.uint8).reshape((-1,) + shape)
            data = self.transformer.transform(pixels, rng)
        else:
            data = _transform_items(self.owner, self.transformer, items,
                                    [f"the record with key {k!r}" for k in keys], rng)
        return (data, labels) if self.labels else (data,)

    def close(self):
        self.db.close()


@register_layer("Data")
class DataLayer(_PrefetchingLayer):
    """Datum records (raw or PNG/JPEG-encoded) from an LMDB or LevelDB in key order, transformed, in batches."""
    min_top_blobs = 1
    max_top_blobs = 2

    def layer_setup(self, bottom, top):
        param = self.layer_param.data_param
        owner = f"Data layer '{self.name}'"
        self.close()
        if param.batch_size <= 0:
            raise KaffeError(f"{owner}: data_param.batch_size must be positive")
        self.batch_size = int(param.batch_size)
        self.transformer = DataTransformer(self.layer_param.transform_param, self.phase, owner,
                                           force_color=param.force_encoded_color)
        # a private generator, so the thread's draws neither disturb nor depend on the main thread's
        rng = np.random.default_rng(device.rng().integers(2 ** 63))
        from ..solvers.distributed import record_share, warn_uneven_share
        ranks, rank = record_share(self.phase)   # over MPI: this rank's share of the records
        db = Database(param.source, BACKENDS[param.backend], owner)
        try:
            cursor = db.cursor()
            try:
                if not cursor.first():
                    raise KaffeError(f"{owner}: data source {param.source} is empty ({_A_NAMES[db.backend]} with "
                                     f"no records)")
                if param.rand_skip:
                    skip = int(rng.integers(param.rand_skip))
                    logger.info(f"Skipping first {skip} data points.")
                    for _ in range(skip):
                        cursor.advance()
                for _ in range(rank * self.batch_size):
                    cursor.advance()
                start_key, value = cursor.item()
            finally:
                cursor.close()
            datum = parse_datum(value, start_key, owner)
            if not datum.encoded and (self.transformer.force_color or self.transformer.force_gray):
                logger.warning(f"{owner}: force_color/force_gray apply to encoded Datums only; the records of "
                               f"{param.source} are raw and are used as they are")
            item_shape = self.transformer.output_shape(self.transformer.datum_array(datum, f" {start_key!r}").shape)
        except BaseException:
            db.close()
            raise
        top[0].reshape(self.batch_size, *item_shape)
        if len(top) > 1:
            top[1].reshape(self.batch_size)
        logger.info(f"output data size: {','.join(str(d) for d in top[0].shape)}")
        if ranks > 1:
            warn_uneven_share(f"{owner} ({param.source})", db.count(), self.batch_size)
        source = _DatumSource(owner, db, self.transformer, self.batch_size, len(top) > 1,
                              (ranks - 1) * self.batch_size)
        self._start(source, {"key": start_key.hex(), "rng": rng.bit_generator.state})


# -- ImageData -------------------------------------------------------------------------------------------
def read_image_list(path, owner):
    """The (image path, label, line number) entries of a `path label` list; the label follows the LAST space."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise KaffeError(f"{owner}: cannot read the image list {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise KaffeError(f"{owner}: the image list {path} is not a text file") from None
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.rstrip()
        if not line:
            continue
        name, _, label = line.rpartition(" ")
        try:
            label = int(label)
        except ValueError:
            label = None
        if not name or label is None:
            raise KaffeError(f"{owner}: {path}:{number}: expected `<image path> <integer label>`, got {line!r}")
        entries.append((name, label, number))
    return entries


class _ImageListSource:
    def __init__(self, owner, list_path, entries, root, height, width, is_color, shuffle, transformer, batch_size):
        self.owner, self.list_path, self.entries, self.root = owner, list_path, entries, root
        self.height, self.width, self.is_color, self.shuffle = height, width, is_color, shuffle
        self.transformer, self.batch_size = transformer, batch_size
        self.checker = RecordChecker(f"image list {list_path}", lambda: len(entries))

    def load(self, entry):
        name, _, number = entry
        path = self.root + name  # Caffe concatenates root_folder and the listed path as they are
        try:
            return read_image(path, self.height, self.width, self.is_color)
        except OSError as e:
            raise KaffeError(f"{self.owner}: could not load image {path} ({self.list_path}:{number}): {e}") from None

    def order(self, state):
        """The entry order of the current epoch, and the generator that draws the following ones."""
        if state is None:
            return np.arange(len(self.entries)), None
        shuffler = _rng_from(state)
        return shuffler.permutation(len(self.entries)), shuffler

    def check_state(self, state):
        index = int(state["index"])
        if not 0 <= index < len(self.entries):
            raise ValueError(f"index {index} is outside the list of {len(self.entries)} images")
        if (state["order"] is None) == self.shuffle:
            raise ValueError("the state's shuffling does not match image_data_param.shuffle")
        if state["order"] is not None:
            _rng_from(state["order"])
        _rng_from(state["rng"])
        return {"index": index, "order": state["order"], "rng": state["rng"]}

    def batches(self, state):
        rng = _rng_from(state["rng"])
        order_state, index = state["order"], state["index"]
        order, shuffler = self.order(order_state)
        while True:
            items, names, labels = [], [], np.empty(self.batch_size, dtype=np.float32)
            while len(items) < self.batch_size:
                entry = self.entries[order[index]]
                try:
                    item = self.load(entry)
                    self.checker.good()
                except KaffeError as e:
                    self.checker.bad(e)
                    item = None
                if item is not None:
                    labels[len(items)] = entry[1]
                    items.append(item)
                    names.append(f"image {self.root + entry[0]} ({self.list_path}:{entry[2]})")
                index += 1
                if index == len(self.entries):  # an epoch ends: start again, in a new order if shuffling
                    index = 0
                    if shuffler is not None:
                        order_state = shuffler.bit_generator.state
                        order = shuffler.permutation(len(self.entries))
            data = _transform_items(self.owner, self.transformer, items, names, rng)
            yield (data, labels), {"index": index, "order": order_state, "rng": rng.bit_generator.state}

    def close(self):
        pass


@register_layer("ImageData")
class ImageDataLayer(_PrefetchingLayer):
    """Images named in a `path label` list file, read as Caffe's OpenCV does (BGR), optionally resized and
    shuffled every epoch with the layer's private generator (seeded from the solver's random_seed)."""
    exact_num_top_blobs = 2

    def layer_setup(self, bottom, top):
        param = self.layer_param.image_data_param
        owner = f"ImageData layer '{self.name}'"
        self.close()
        if (param.new_height == 0) != (param.new_width == 0):
            raise KaffeError(f"{owner}: new_height and new_width must be set together (got {param.new_height} "
                             f"and {param.new_width})")
        if param.batch_size <= 0:
            raise KaffeError(f"{owner}: image_data_param.batch_size must be positive")
        self.batch_size = int(param.batch_size)
        self.transformer = DataTransformer(self.layer_param.transform_param, self.phase, owner)
        logger.info(f"Opening file {param.source}")
        entries = read_image_list(param.source, owner)
        if not entries:
            raise KaffeError(f"{owner}: the image list {param.source} names no images")
        rng = np.random.default_rng(device.rng().integers(2 ** 63))
        order_state = None
        if param.shuffle:
            logger.info("Shuffling data")
            order_state = np.random.default_rng(device.rng().integers(2 ** 63)).bit_generator.state
        logger.info(f"A total of {len(entries)} images.")
        source = _ImageListSource(owner, param.source, entries, param.root_folder, int(param.new_height),
                                  int(param.new_width), param.is_color, param.shuffle, self.transformer,
                                  self.batch_size)
        index = 0
        if param.rand_skip:
            index = int(rng.integers(param.rand_skip))
            logger.info(f"Skipping first {index} data points.")
            if index >= len(entries):
                raise KaffeError(f"{owner}: not enough images ({len(entries)}) to skip {index} (rand_skip "
                                 f"{param.rand_skip})")
        order, _ = source.order(order_state)
        item_shape = self.transformer.output_shape(source.load(entries[order[index]]).shape)
        top[0].reshape(self.batch_size, *item_shape)
        top[1].reshape(self.batch_size)
        logger.info(f"output data size: {','.join(str(d) for d in top[0].shape)}")
        self._start(source, {"index": index, "order": order_state, "rng": rng.bit_generator.state})


# -- HDF5Data / HDF5Output ---------------------------------------------------------------------------------
def _h5py(owner):
    try:
        import h5py
    except ImportError:
        raise KaffeError(f"{owner}: HDF5 files need the 'h5py' package (pip install h5py)") from None
    return h5py


class _HDF5Source:
    def __init__(self, owner, list_path, files, datasets, batch_size, shuffle):
        self.owner, self.list_path, self.files = owner, list_path, files
        self.datasets, self.batch_size, self.shuffle = datasets, batch_size, shuffle
        self.row_shapes = None

    def load(self, index):
        """Every top's dataset of file `index` as float32 arrays with one row per sample."""
        h5py = _h5py(self.owner)
        path = self.files[index]
        try:
            with h5py.File(path, "r") as f:
                arrays = []
                for name in self.datasets:
                    if name not in f or not isinstance(f[name], h5py.Dataset):
                        raise KaffeError(f"{self.owner}: {path} has no dataset '{name}' (the datasets are named "
                                         f"after the tops; the file has {sorted(f.keys())})")
                    dataset = f[name]
                    if dataset.dtype.kind not in "fiub" or dataset.ndim < 1:
                        raise KaffeError(f"{self.owner}: dataset '{name}' in {path} must be a numeric array of at "
                                         f"least one axis, got {dataset.dtype} of shape {dataset.shape}")
                    check_count(dataset.shape, f"{self.owner}: dataset '{name}' in {path} of")
                    arrays.append(np.asarray(dataset[()], dtype=np.float32))
        except KaffeError:
            raise
        except H5PY_ERRORS as e:   # an unreadable or corrupt file
            raise KaffeError(f"{self.owner}: cannot read HDF5 file {path} (listed in {self.list_path}): "
                             f"{e}") from None
        rows = {len(a) for a in arrays}
        if len(rows) > 1:
            raise KaffeError(f"{self.owner}: the datasets of {path} have different numbers of rows: "
                             + ", ".join(f"{n} {a.shape[0]}" for n, a in zip(self.datasets, arrays)))
        if not arrays[0].shape[0]:
            raise KaffeError(f"{self.owner}: the datasets of {path} have no rows")
        shapes = [a.shape[1:] for a in arrays]
        if self.row_shapes is None:
            self.row_shapes = shapes
        elif shapes != self.row_shapes:
            raise KaffeError(f"{self.owner}: the rows of {path} are {shapes} but those of the first file are "
                             f"{self.row_shapes}; every file must have the same row shapes")
        logger.debug(f"Successfully loaded {arrays[0].shape[0]} rows from {path}")
        return arrays

    def check_state(self, state):
        files = [int(i) for i in state["files"]]
        if sorted(files) != list(range(len(self.files))):
            raise ValueError(f"files must be an order of the {len(self.files)} listed files")
        position = int(state["file"])
        files[position]
        if (state["order"] is None) == self.shuffle:
            raise ValueError("the state's shuffling does not match hdf5_data_param.shuffle")
        if state["order"] is not None:
            _rng_from(state["order"])
        return {"files": files, "file": position, "row": int(state["row"]), "order": state["order"]}

    def _open(self, index, order_state):
        arrays = self.load(index)
        rows = len(arrays[0])
        if order_state is None:
            return arrays, np.arange(rows), None
        shuffler = _rng_from(order_state)
        return arrays, shuffler.permutation(rows), shuffler

    def batches(self, state):
        files, position, row, order_state = list(state["files"]), state["file"], state["row"], state["order"]
        arrays, rows, shuffler = self._open(files[position], order_state)
        while True:
            out = [np.empty((self.batch_size,) + shape, dtype=np.float32) for shape in self.row_shapes]
            filled = 0
            while filled < self.batch_size:
                if row == len(rows):  # the file is used up: on to the next one (Caffe reloads only several)
                    if len(files) > 1:
                        position += 1
                        if position == len(files):
                            position = 0
                            if shuffler is not None:
                                files = [files[i] for i in shuffler.permutation(len(files))]
                    row = 0
                    if shuffler is not None:
                        order_state = shuffler.bit_generator.state
                    if len(files) > 1:
                        arrays, rows, shuffler = self._open(files[position], order_state)
                    elif shuffler is not None:
                        rows = shuffler.permutation(len(rows))
                take = min(self.batch_size - filled, len(rows) - row)
                picked = rows[row:row + take]
                for target, array in zip(out, arrays):
                    target[filled:filled + take] = array[picked]
                filled += take
                row += take
            yield tuple(out), {"files": files, "file": position, "row": row, "order": order_state}

    def close(self):
        pass


@register_layer("HDF5Data")
class HDF5DataLayer(_PrefetchingLayer):
    """Rows of the HDF5 files listed in `source`, one dataset per top (named after it), file after file."""
    min_top_blobs = 1

    def layer_setup(self, bottom, top):
        param = self.layer_param.hdf5_data_param
        owner = f"HDF5Data layer '{self.name}'"
        self.close()
        if self.layer_param.HasField("transform_param"):
            raise KaffeError(f"{owner}: HDF5Data does not transform data; remove transform_param")
        if param.batch_size <= 0:
            raise KaffeError(f"{owner}: hdf5_data_param.batch_size must be positive")
        logger.info(f"Loading list of HDF5 filenames from: {param.source}")
        try:
            with open(param.source, encoding="utf-8") as f:
                files = f.read().split()  # whitespace-separated paths, relative to the working directory
        except OSError as e:
            raise KaffeError(f"{owner}: failed to open source file {param.source}: {e.strerror}") from None
        logger.info(f"Number of HDF5 files: {len(files)}")
        if not files:
            raise KaffeError(f"{owner}: must have at least 1 HDF5 filename listed in {param.source}")
        for path in files:
            if not os.path.isfile(path):
                raise KaffeError(f"{owner}: HDF5 file {path} (listed in {param.source}) does not exist"
                                 + (" (paths in the list are relative to the working directory, as in Caffe)"
                                    if not os.path.isabs(path) else ""))
        names = list(self.layer_param.top)
        if len(names) != len(top):
            raise KaffeError(f"{owner}: name every top after the HDF5 dataset it reads")
        source = _HDF5Source(owner, param.source, files, names, int(param.batch_size), param.shuffle)
        order = list(range(len(files)))
        order_state = None
        if param.shuffle:
            shuffler = np.random.default_rng(device.rng().integers(2 ** 63))
            order = [int(i) for i in shuffler.permutation(len(files))]
            order_state = shuffler.bit_generator.state
        source.load(order[0])  # fixes the row shapes, and reports a bad first file here rather than later
        for blob, shape in zip(top, source.row_shapes):
            blob.reshape(int(param.batch_size), *shape)
        self._start(source, {"files": order, "file": 0, "row": 0, "order": order_state})


@register_layer("HDF5Output")
class HDF5OutputLayer(Layer):
    """Writes bottom[0] as dataset "data" and bottom[1] as "label" of file_name (float32, N x C x H x W).

    The file is created (emptied) at setup. Caffe's layer can only save one batch (a second forward fails, the
    datasets exist); kaffe appends the rows of every forward, so that a whole `kaffe test` run is kept.
    """
    exact_num_bottom_blobs = 2
    exact_num_top_blobs = 0

    def layer_setup(self, bottom, top):
        self.file_name = self.layer_param.hdf5_output_param.file_name
        h5py = _h5py(f"HDF5Output layer '{self.name}'")
        try:
            h5py.File(self.file_name, "w").close()
        except OSError as e:
            raise KaffeError(f"HDF5Output layer '{self.name}': failed to create HDF5 file {self.file_name}: "
                             f"{e}") from None

    def reshape(self, bottom, top):
        pass

    @staticmethod
    def _legacy(blob):
        # Caffe copies into blobs shaped num x channels x height x width
        return tuple(blob.legacy_shape(i) for i in range(4)) if blob.num_axes <= 4 else blob.shape

    def forward_cpu(self, bottom, top):
        data, label = bottom
        if not data.num_axes or not label.num_axes or data.shape[0] != label.shape[0]:
            raise KaffeError(f"HDF5Output layer '{self.name}': data and label must have the same number of rows, "
                             f"got {data.shape_string()} and {label.shape_string()}")
        h5py = _h5py(f"HDF5Output layer '{self.name}'")
        logger.info(f"Saving HDF5 file {self.file_name}")
        try:
            with h5py.File(self.file_name, "a") as f:
                for name, blob in (("data", data), ("label", label)):
                    values = blob.cpu_data().reshape(self._legacy(blob))
                    if name not in f:
                        f.create_dataset(name, data=values, maxshape=(None,) + values.shape[1:], chunks=True)
                        continue
                    dataset = f[name]
                    if dataset.shape[1:] != values.shape[1:]:
                        raise KaffeError(f"HDF5Output layer '{self.name}': {name} rows are "
                                         f"{values.shape[1:]}, but {self.file_name} holds rows of "
                                         f"{dataset.shape[1:]}")
                    dataset.resize(dataset.shape[0] + len(values), axis=0)
                    dataset[-len(values):] = values
        except OSError as e:
            raise KaffeError(f"HDF5Output layer '{self.name}': cannot write {self.file_name}: {e}") from None
        logger.info(f"Successfully saved {data.shape[0]} rows")

    def forward_gpu(self, bottom, top):
        self.forward_cpu(bottom, top)  # a file sink: the bottoms come to the host once, as in Caffe's GPU code

    def backward_gpu(self, top, propagate_down, bottom):
        pass


# -- WindowData ------------------------------------------------------------------------------------------
_WINDOW_CHANNELS = 3  # Caffe reads every image with cv::imread(IMREAD_COLOR): 3 channels, BGR
# columns of the window tables: the image's position in the file, class, box (inclusive), window-file line
_IMAGE, _LABEL, _X1, _Y1, _X2, _Y2, _LINE = range(7)


def read_window_file(path, root, fg_threshold, bg_threshold, owner):
    """Parse an R-CNN window file (whitespace-separated tokens, as Caffe's stream reads it).

    Returns (images, fg, bg): images a list of (root + path, line of the path); fg and bg int64 tables of the
    foreground (overlap >= fg_threshold) and background (overlap < bg_threshold, class forced to 0) windows,
    one row per window with the columns _IMAGE ... _LINE. Windows in between are dropped, as in Caffe.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise KaffeError(f"{owner}: cannot read the window file {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise KaffeError(f"{owner}: the window file {path} is not a text file") from None
    tokens = [(word, number) for number, line in enumerate(text.splitlines(), 1) for word in line.split()]
    if not tokens:
        raise KaffeError(f"{owner}: the window file {path} is empty")
    position = 0

    def take(kind, what):
        nonlocal position
        if position == len(tokens):
            raise KaffeError(f"{owner}: {path}: the file ends where {what} was expected")
        word, number = tokens[position]
        position += 1
        try:
            return kind(word), number
        except ValueError:
            raise KaffeError(f"{owner}: {path}:{number}: expected {what}, got {word!r}") from None

    images, rows, overlaps = [], [], []
    while position < len(tokens):
        mark, number = take(str, "'#'")
        if mark != "#":
            raise KaffeError(f"{owner}: {path}:{number}: expected '# <image index>' to start an image's entry, "
                             f"got {mark!r}")
        index, index_line = take(int, "the image index after '#'")
        name, name_line = take(str, "an image path")
        channels, _ = take(int, "the image's channel count")
        take(int, "the image's height")
        take(int, "the image's width")
        count, _ = take(int, "the number of windows")
        if channels != _WINDOW_CHANNELS:
            raise KaffeError(f"{owner}: {path}:{name_line}: image {name} is declared with {channels} channels; "
                             f"WindowData reads every image as 3-channel colour (BGR), as Caffe does")
        images.append((root + name, name_line))  # Caffe concatenates root_folder and the path as they are
        for _ in range(count):
            label, line = take(int, "a window's class index")
            overlap, _ = take(float, "a window's overlap")
            box = [take(int, f"the window's {corner}")[0] for corner in ("x1", "y1", "x2", "y2")]
            rows.append((index, label, *box, line))
            overlaps.append(overlap)
        if index < 0:
            raise KaffeError(f"{owner}: {path}:{index_line}: negative image index {index}")
    table = np.array(rows, dtype=np.int64).reshape(-1, 7)
    # Caffe indexes its image list by the index written after '#' (not by the entry's position)
    stray = table[:, _IMAGE] >= len(images)
    if stray.any():
        row = table[np.argmax(stray)]
        raise KaffeError(f"{owner}: {path}:{row[_LINE]}: the window refers to image index {row[_IMAGE]} but the "
                         f"file lists {len(images)} images (indices count from 0 in file order)")
    overlaps = np.array(overlaps, dtype=np.float32)  # compared in float, as Caffe does
    fg = overlaps >= np.float32(fg_threshold)
    bg = ~fg & (overlaps < np.float32(bg_threshold))
    unlabelled = fg & (table[:, _LABEL] <= 0)
    if unlabelled.any():
        row = table[np.argmax(unlabelled)]
        raise KaffeError(f"{owner}: {path}:{row[_LINE]}: a foreground window (overlap >= fg_threshold "
                         f"{fg_threshold:g}) has class {row[_LABEL]}; foreground classes must be > 0")
    background = table[bg]
    background[:, _LABEL] = 0
    return images, table[fg], background


def _round(value):
    """C's round() of a float: halves away from zero."""
    value = float(value)
    return int(np.copysign(np.floor(abs(value) + 0.5), value))


class _WindowSource:
    def __init__(self, owner, window_path, images, cache, fg, bg, num_fg, batch_size, crop_size, context_pad,
                 square, mirror, mean, scale):
        self.owner, self.window_path, self.images, self.cache = owner, window_path, images, cache
        self.fg, self.bg, self.num_fg, self.batch_size = fg, bg, num_fg, batch_size
        self.crop_size, self.context_pad, self.square, self.mirror = crop_size, context_pad, square, mirror
        self.mean, self.scale = mean, scale

    def check_state(self, state):
        _rng_from(state["rng"])
        return {"rng": state["rng"]}

    def batches(self, state):
        rng = _rng_from(state["rng"])
        while True:
            tops = self._batch(rng)
            yield tops, {"rng": rng.bit_generator.state}

    def load(self, index):
        path, line = self.images[index]
        try:
            return read_image(io.BytesIO(self.cache[index]) if self.cache else path)
        except OSError as e:
            raise KaffeError(f"{self.owner}: could not load image {path} ({self.window_path}:{line}): "
                             f"{e}") from None

    def geometry(self, window, height, width, flip):
        """Caffe's window placement: the (clipped) source box x1, y1, x2, y2, the size it is warped to, and
        where that goes in the crop_size square (the rest stays 0). Caffe's float32 arithmetic is kept, so that
        the rounding lands on the same pixels."""
        crop = self.crop_size
        x1, y1, x2, y2 = (int(v) for v in window[_X1:_Y2 + 1])
        pad_w = pad_h = 0
        out_w = out_h = crop
        if self.context_pad > 0 or self.square:
            f32 = np.float32
            # enlarge the box so that, warped to crop_size, it has context_pad pixels of context on every side
            context_scale = f32(crop) / f32(crop - 2 * self.context_pad)
            half_h, half_w = f32((y2 - y1 + 1) / 2), f32((x2 - x1 + 1) / 2)
            center_x, center_y = f32(x1) + half_w, f32(y1) + half_h
            if self.square:
                half_h = half_w = max(half_h, half_w)
            x1, x2 = _round(center_x - half_w * context_scale), _round(center_x + half_w * context_scale)
            y1, y2 = _round(center_y - half_h * context_scale), _round(center_y + half_h * context_scale)
            full_w, full_h = x2 - x1 + 1, y2 - y1 + 1
            # the part beyond the image is not sampled: it becomes zero padding of the proportional size
            beyond_x1, beyond_y1 = max(0, -x1), max(0, -y1)
            beyond_x2, beyond_y2 = max(0, x2 - width + 1), max(0, y2 - height + 1)
            x1, y1, x2, y2 = x1 + beyond_x1, y1 + beyond_y1, x2 - beyond_x2, y2 - beyond_y2
            scale_x, scale_y = f32(crop) / f32(full_w), f32(crop) / f32(full_h)
            out_w, out_h = _round(f32(x2 - x1 + 1) * scale_x), _round(f32(y2 - y1 + 1) * scale_y)
            pad_h = _round(f32(beyond_y1) * scale_y)
            pad_w = _round(f32(beyond_x2 if flip else beyond_x1) * scale_x)  # a flip mirrors the padding too
            out_h, out_w = min(out_h, crop - pad_h), min(out_w, crop - pad_w)  # rounding may overshoot
        if not (0 <= x1 <= x2 < width and 0 <= y1 <= y2 < height) or out_w <= 0 or out_h <= 0:
            path, _ = self.images[window[_IMAGE]]
            raise KaffeError(f"{self.owner}: the window {' '.join(str(v) for v in window[_X1:_Y2 + 1])} at "
                             f"{self.window_path}:{window[_LINE]} does not lie inside its image {path} "
                             f"({width} x {height})")
        return (x1, y1, x2, y2), (out_h, out_w), (pad_h, pad_w)

    def _batch(self, rng):
        crop, size = self.crop_size, self.batch_size
        num_bg = size - self.num_fg
        # background windows first, then foreground, drawn uniformly with replacement, as in Caffe
        windows = np.concatenate([self.bg[rng.integers(len(self.bg), size=num_bg)] if num_bg else self.bg[:0],
                                  self.fg[rng.integers(len(self.fg), size=self.num_fg)] if self.num_fg
                                  else self.fg[:0]])
        flips = rng.integers(0, 2, size=size).astype(bool) if self.mirror else np.zeros(size, dtype=bool)
        data = np.zeros((size, _WINDOW_CHANNELS, crop, crop), dtype=np.float32)
        inside = np.zeros((size, 1, crop, crop), dtype=bool)
        images = {}  # each image is read once per batch, however many of its windows were drawn
        # one warp per window: the boxes, images and output sizes all differ, so this loop is per item
        for item, (window, flip) in enumerate(zip(windows, flips)):
            index = int(window[_IMAGE])
            if index not in images:
                images[index] = self.load(index)
            image = images[index]
            (x1, y1, x2, y2), (out_h, out_w), (pad_h, pad_w) = self.geometry(window, *image.shape[1:], flip)
            warped = resize_bilinear(image[:, y1:y2 + 1, x1:x2 + 1], out_h, out_w)
            if flip:
                warped = warped[:, :, ::-1]
            data[item, :, pad_h:pad_h + out_h, pad_w:pad_w + out_w] = warped
            inside[item, :, pad_h:pad_h + out_h, pad_w:pad_w + out_w] = True
        # the mean is subtracted where a window landed (at the output position, never flipped); padding stays 0
        if self.mean is not None:
            data -= self.mean * inside
        if self.scale != 1:
            data *= self.scale
        return data, windows[:, _LABEL].astype(np.float32)

    def close(self):
        pass


@register_layer("WindowData")
class WindowDataLayer(_PrefetchingLayer):
    """R-CNN's window sampler: every batch draws background windows, then fg_fraction foreground ones, from a
    window file, each cut out of its image (with context padding, in warp or square mode), warped to
    crop_size x crop_size, optionally mirrored, mean-subtracted and scaled.

    As Caffe's layer reads them: crop_size, mirror, mean_file and mean_value come from transform_param, scale
    from window_data_param; sampling and flips use the layer's private generator in both phases."""
    exact_num_top_blobs = 2

    def layer_setup(self, bottom, top):
        param = self.layer_param.window_data_param
        transform = self.layer_param.transform_param
        owner = f"WindowData layer '{self.name}'"
        self.close()
        unread = [f for f in ("crop_size", "mirror", "mean_file") if param.HasField(f)]
        if unread:
            logger.warning(f"{owner}: window_data_param.{'/'.join(unread)} is ignored: Caffe's WindowData reads "
                           f"crop_size, mirror and mean_file from transform_param")
        if transform.scale != 1:
            logger.warning(f"{owner}: transform_param.scale is ignored: Caffe's WindowData scales by "
                           f"window_data_param.scale")
        crop_size = int(transform.crop_size)
        if crop_size <= 0:
            hint = " (window_data_param.crop_size is not read)" if param.crop_size else ""
            raise KaffeError(f"{owner}: transform_param.crop_size must be positive: it is the size the windows "
                             f"are warped to{hint}")
        if param.batch_size <= 0:
            raise KaffeError(f"{owner}: window_data_param.batch_size must be positive")
        if param.crop_mode not in ("warp", "square"):
            raise KaffeError(f"{owner}: crop_mode must be \"warp\" or \"square\", got {param.crop_mode!r}")
        if 2 * param.context_pad >= crop_size:
            raise KaffeError(f"{owner}: context_pad {param.context_pad} leaves no room for the window in a "
                             f"crop of {crop_size} (needs 2 * context_pad < crop_size)")
        if not 0 <= param.fg_fraction <= 1:
            raise KaffeError(f"{owner}: fg_fraction must be in [0, 1], got {param.fg_fraction:g}")
        batch_size = int(param.batch_size)
        transformer = DataTransformer(transform, self.phase, owner)  # reads mean_file / mean_value, checked
        mean = self._mean(transformer, crop_size, owner)

        logger.info(f"Window data layer: foreground (object) overlap threshold: {param.fg_threshold:g}, "
                    f"background (non-object) overlap threshold: {param.bg_threshold:g}, foreground sampling "
                    f"fraction: {param.fg_fraction:g}, cache_images: {param.cache_images}, root_folder: "
                    f"{param.root_folder!r}")
        images, fg, bg = read_window_file(param.source, param.root_folder, param.fg_threshold, param.bg_threshold,
                                          owner)
        logger.info(f"Number of images: {len(images)}")
        classes, counts = np.unique(np.concatenate([[0], fg[:, _LABEL]]), return_counts=True)
        counts[0] = len(bg)
        for label, count in zip(classes, counts):
            logger.info(f"class {label} has {count} samples")
        num_fg = int(np.float32(batch_size) * np.float32(param.fg_fraction))  # truncated, as Caffe's cast
        if num_fg and not len(fg):
            raise KaffeError(f"{owner}: {param.source} has no foreground windows (overlap >= fg_threshold "
                             f"{param.fg_threshold:g}) to draw {num_fg} per batch from")
        if batch_size - num_fg and not len(bg):
            raise KaffeError(f"{owner}: {param.source} has no background windows (overlap < bg_threshold "
                             f"{param.bg_threshold:g}) to draw {batch_size - num_fg} per batch from")
        used = np.unique(np.concatenate([fg[:, _IMAGE], bg[:, _IMAGE]]))
        for index in used:  # a missing image fails here, not in the middle of training
            path, line = images[index]
            if not os.path.isfile(path):
                raise KaffeError(f"{owner}: could not find image {path} ({param.source}:{line})")
        cache = None
        if param.cache_images:  # the encoded files, decoded for every window, as Caffe keeps them
            cache = {}
            for index in used:
                path, line = images[index]
                try:
                    with open(path, "rb") as f:
                        cache[index] = f.read()
                except OSError as e:
                    raise KaffeError(f"{owner}: could not read image {path} ({param.source}:{line}): "
                                     f"{e.strerror}") from None
        logger.info(f"Amount of context padding: {param.context_pad}")
        logger.info(f"Crop mode: {param.crop_mode}")
        top[0].reshape(batch_size, _WINDOW_CHANNELS, crop_size, crop_size)
        top[1].reshape(batch_size)
        logger.info(f"output data size: {','.join(str(d) for d in top[0].shape)}")
        # a private generator, so the thread's draws neither disturb nor depend on the main thread's
        rng = np.random.default_rng(device.rng().integers(2 ** 63))
        source = _WindowSource(owner, param.source, images, cache, fg, bg, num_fg, batch_size, crop_size,
                               int(param.context_pad), param.crop_mode == "square", transform.mirror, mean,
                               np.float32(param.scale))
        self._start(source, {"rng": rng.bit_generator.state})

    @staticmethod
    def _mean(transformer, crop_size, owner):
        """The mean to subtract at each output pixel: a mean file's central crop_size square (its offset taken
        from the width for both axes, as Caffe does), or per-channel values."""
        if transformer.mean is not None:
            channels, height, width = transformer.mean.shape
            offset = (width - crop_size) // 2
            if channels != _WINDOW_CHANNELS or width < crop_size or offset + crop_size > height:
                raise KaffeError(f"{owner}: mean_file {transformer.mean_file} is {channels} x {height} x {width}; "
                                 f"it must have {_WINDOW_CHANNELS} channels and hold the central {crop_size} x "
                                 f"{crop_size} square")
            return transformer.mean[:, offset:offset + crop_size, offset:offset + crop_size].copy()
        if len(transformer.mean_values):
            if len(transformer.mean_values) not in (1, _WINDOW_CHANNELS):
                raise KaffeError(f"{owner}: specify either 1 mean_value or as many as channels "
                                 f"({_WINDOW_CHANNELS}); got {len(transformer.mean_values)}")
            return np.broadcast_to(transformer.mean_values, (_WINDOW_CHANNELS,)).reshape(-1, 1, 1).copy()
        return None
