"""`kaffe data`: fetch and convert public datasets into Caffe's LMDB (or LevelDB) format, and the database
writer that the dataset tools share.

`kaffe data mnist` does what Caffe's get_mnist.sh + convert_mnist_data do: it reads the four MNIST IDX
files (from a folder, or downloaded from a public mirror and checked against the canonical MD5s) and writes
mnist_train_lmdb and mnist_test_lmdb of raw uint8 1 x 28 x 28 Datums with keys "%08d".
`kaffe data cifar10` does what get_cifar10.sh + convert_cifar_data do: the binary CIFAR-10 batches become
cifar10_train_lmdb (data_batch_1..5, 50000 items) and cifar10_test_lmdb (test_batch, 10000) of raw uint8
3 x 32 x 32 Datums (the files' R, G, B planes, as Caffe stores them) with keys "%05d".
"""
import argparse
import gzip
import hashlib
import http.client
import io
import os
import shutil
import sys
import tarfile
import urllib.error
import urllib.request

import numpy as np

from ..engine.errors import KaffeError
from ..engine.log import logger
from ..proto import caffe_pb2
from .progress import Progress, add_quiet_flag, stream

# md5 of the uncompressed files (mirrors serve them gzipped, and gzip headers differ between mirrors)
MNIST_FILES = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
MIRRORS_ENV = "KAFFE_MNIST_MIRRORS"

# IDX element type codes -> big-endian numpy types
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


# -- IDX files ---------------------------------------------------------------------------------------
def _read_maybe_gzipped(path):
    try:
        with open(path, "rb") as f:
            payload = f.read()
    except OSError as e:
        raise KaffeError(f"cannot read {path}: {e.strerror}") from None
    if payload[:2] == b"\x1f\x8b":  # gzip magic, whatever the file is called
        try:
            payload = gzip.decompress(payload)
        except (OSError, EOFError) as e:
            raise KaffeError(f"{path} is a corrupt gzip file: {e}") from None
    return payload


def parse_idx(payload, name):
    """An IDX file's contents as a numpy array (native byte order); `name` is used in errors."""
    if len(payload) < 4 or payload[0] != 0 or payload[1] != 0 or payload[2] not in _IDX_TYPES:
        raise KaffeError(f"{name} is not an IDX file (bad magic number {payload[:4].hex() or 'none'})")
    ndim = payload[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(payload) < header:
        raise KaffeError(f"{name} is not a valid IDX file (header of {ndim} dimensions is truncated)")
    shape = tuple(int(d) for d in np.frombuffer(payload, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_TYPES[payload[2]])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(payload) != expected:
        raise KaffeError(f"{name} has the wrong size: its header promises {' x '.join(map(str, shape))} "
                         f"values ({expected} bytes) but the file has {len(payload)} bytes")
    return np.frombuffer(payload, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def read_idx(path):
    """Read an IDX file (gzipped or not) into a numpy array."""
    return parse_idx(_read_maybe_gzipped(path), str(path))


# -- writing databases ---------------------------------------------------------------------------------
class DatumWriter:
    """Puts (key, value) records into a NEW LMDB or LevelDB, committing every `commit_every` records.

    Refuses an existing path (as Caffe does). The database is built under PATH.partial and renamed when it is
    complete, so an interrupted conversion leaves nothing that blocks the next one. Use it as a context
    manager: an exception discards the partial database.
    """

    def __init__(self, path, backend="lmdb", commit_every=1000, size_hint=0):
        path = os.fspath(path)
        if backend not in ("lmdb", "leveldb"):
            raise KaffeError(f"unknown database backend '{backend}': use lmdb or leveldb")
        if os.path.exists(path):
            raise KaffeError(f"{path} already exists; remove it first (rm -r {path}) to write it again")
        self.path, self.backend, self.commit_every = path, backend, commit_every
        self.partial = path + ".partial"
        shutil.rmtree(self.partial, ignore_errors=True)
        self.count = 0
        self._pending = []
        if backend == "lmdb":
            import lmdb
            # room for the records plus B-tree overhead; doubled whenever it proves too small
            self._map_size = 2 * size_hint + (64 << 20)
            self._db = lmdb.open(self.partial, map_size=self._map_size, subdir=True, lock=True)
        else:
            try:
                import plyvel
            except ImportError:
                raise KaffeError("writing LevelDB needs the 'plyvel' package (pip install plyvel)") from None
            self._db = plyvel.DB(self.partial, create_if_missing=True, error_if_exists=True)

    def put(self, key, value):
        self._pending.append((key, value))
        self.count += 1
        if len(self._pending) >= self.commit_every:
            self.commit()

    def commit(self):
        if not self._pending:
            return
        if self.backend == "leveldb":
            with self._db.write_batch() as batch:
                for key, value in self._pending:
                    batch.put(key, value)
        else:
            import lmdb
            while True:
                try:
                    with self._db.begin(write=True) as txn:
                        for key, value in self._pending:
                            txn.put(key, value)
                    break
                except lmdb.MapFullError:  # the aborted transaction wrote nothing: grow the map and redo it
                    self._map_size *= 2
                    self._db.set_mapsize(self._map_size)
        self._pending = []

    def close(self):
        """Commit what is left and move the finished database into place."""
        self.commit()
        self._db.close()
        os.replace(self.partial, self.path)

    def discard(self):
        self._db.close()
        shutil.rmtree(self.partial, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback):
        if kind is None:
            self.close()
        else:
            self.discard()


def write_datums(path, images, labels, backend="lmdb", key_format="%08d", progress=None):
    """Write N x C x H x W uint8 images and N labels as raw Datums with keys key_format % index into a new DB."""
    images = np.asarray(images)
    labels = np.asarray(labels).reshape(-1)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise KaffeError(f"write_datums needs N x C x H x W uint8 images, got {images.dtype} {images.shape}")
    if len(labels) != len(images):
        raise KaffeError(f"write_datums: {len(images)} images but {len(labels)} labels")
    _, channels, height, width = images.shape
    bar = Progress(len(images), f"Writing {path}", progress)
    with DatumWriter(path, backend, size_hint=images.nbytes + 64 * len(images)) as db:
        datum = caffe_pb2.Datum(channels=channels, height=height, width=width)
        key_format = key_format.encode()
        for i in range(len(images)):
            datum.data = images[i].tobytes()
            datum.label = int(labels[i])
            db.put(key_format % i, datum.SerializeToString())
            bar.update()
    logger.info(f"Processed {len(images)} files into {path}")


def write_datum_lmdb(path, images, labels):
    """write_datums into an LMDB with keys "%08d" (convert_mnist_data's layout)."""
    write_datums(path, images, labels)


# -- MNIST -------------------------------------------------------------------------------------------
def mnist_mirrors(mirrors=None):
    """The mirror list: the argument, else $KAFFE_MNIST_MIRRORS (comma or space separated), else the default."""
    if mirrors is None:
        env = os.environ.get(MIRRORS_ENV, "").replace(",", " ").split()
        mirrors = env or MNIST_MIRRORS
    return [m if m.endswith("/") else m + "/" for m in mirrors]


def _md5_ok(payload, name):
    return hashlib.md5(payload).hexdigest() == MNIST_FILES[name]


def _download(url, target, progress):
    """Fetch url into target (via a .part file), showing its progress."""
    part = target + ".part"
    try:
        _fetch(url, part, progress)
    except BaseException:
        if os.path.exists(part):
            os.unlink(part)
        raise
    os.replace(part, target)


def _fetch(url, part, progress):
    with urllib.request.urlopen(url, timeout=30) as response, open(part, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0)
        with Progress(total, f"Downloading {url}", progress, unit="B") as bar:
            for chunk in iter(lambda: response.read(1 << 16), b""):
                out.write(chunk)
                bar.update(len(chunk))


def download_mnist(raw_dir, mirrors=None, progress=sys.stderr):
    """Make sure raw_dir holds the four verified MNIST files (gzipped); returns {name: uncompressed bytes}.

    Files already there with the right MD5 are reused; the others are fetched from the first mirror that
    serves a file with the right MD5.
    """
    os.makedirs(raw_dir, exist_ok=True)
    mirrors = mnist_mirrors(mirrors)
    contents = {}
    for name in MNIST_FILES:
        target = os.path.join(raw_dir, name + ".gz")
        if os.path.exists(target):
            try:
                payload = _read_maybe_gzipped(target)
                if _md5_ok(payload, name):
                    contents[name] = payload
                    continue
            except KaffeError:
                pass  # a damaged cache entry is fetched again
        failures = []
        for mirror in mirrors:
            url = mirror + name + ".gz"
            try:
                _download(url, target, progress)
                payload = _read_maybe_gzipped(target)
            except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
                failures.append(f"{url}: {getattr(e, 'reason', e)}")
                continue
            except KaffeError as e:
                failures.append(f"{url}: {e}")
                continue
            if _md5_ok(payload, name):
                contents[name] = payload
                break
            failures.append(f"{url}: MD5 mismatch (got {hashlib.md5(payload).hexdigest()}, "
                            f"expected {MNIST_FILES[name]})")
            os.unlink(target)
        else:
            offline = all("MD5" not in f for f in failures)
            advice = ("If this machine is offline, download the four MNIST files elsewhere and convert them with "
                      "`kaffe data mnist --from FOLDER`." if offline else
                      "The mirrors served a file that is not the canonical MNIST.")
            raise KaffeError(f"could not download {name} from any MNIST mirror ({'; '.join(failures)}). {advice}")
    return contents


def load_mnist_folder(folder, verify=True):
    """Read the four MNIST files (name or name.gz) from a folder; returns {name: uncompressed bytes}."""
    contents = {}
    for name in MNIST_FILES:
        candidates = [os.path.join(folder, name + ext) for ext in ("", ".gz")]
        path = next((p for p in candidates if os.path.isfile(p)), None)
        if path is None:
            raise KaffeError(f"{folder} has no {name} (nor {name}.gz); --from needs the four MNIST IDX files "
                             f"{', '.join(MNIST_FILES)}")
        payload = _read_maybe_gzipped(path)
        if verify and not _md5_ok(payload, name):
            raise KaffeError(f"{path} is not the canonical MNIST file: its MD5 (uncompressed) is "
                             f"{hashlib.md5(payload).hexdigest()}, expected {MNIST_FILES[name]} "
                             f"(the file is corrupt or truncated; use --skip-md5 to convert a look-alike "
                             f"dataset such as Fashion-MNIST)")
        contents[name] = payload
    return contents


def _mnist_split(contents, prefix):
    images = parse_idx(contents[f"{prefix}-images-idx3-ubyte"], f"{prefix}-images-idx3-ubyte")
    labels = parse_idx(contents[f"{prefix}-labels-idx1-ubyte"], f"{prefix}-labels-idx1-ubyte")
    if images.ndim != 3 or images.dtype != np.uint8:
        raise KaffeError(f"{prefix}-images-idx3-ubyte must hold N x rows x cols unsigned bytes, "
                         f"got {images.dtype} {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise KaffeError(f"{prefix}-labels-idx1-ubyte must hold one label per image ({len(images)}), "
                         f"got shape {labels.shape}")
    return images[:, np.newaxis], labels


def convert_mnist(out_dir, source=None, mirrors=None, verify=True, progress=sys.stderr, backend="lmdb"):
    """Write out_dir/mnist_train_<backend> and out_dir/mnist_test_<backend>; returns their paths."""
    outputs = [os.path.join(out_dir, f"mnist_{split}_{backend}") for split in ("train", "test")]
    _refuse_existing(outputs)
    if source is not None:
        contents = load_mnist_folder(source, verify)
    else:
        contents = download_mnist(os.path.join(out_dir, "raw"), mirrors, progress)
    os.makedirs(out_dir, exist_ok=True)
    for path, prefix in zip(outputs, ("train", "t10k")):
        images, labels = _mnist_split(contents, prefix)
        logger.info(f"A total of {len(images)} items. Rows: {images.shape[2]} Cols: {images.shape[3]}")
        write_datums(path, images, labels, backend, progress=progress)
    return outputs


def _refuse_existing(outputs):
    for path in outputs:
        if os.path.exists(path):
            raise KaffeError(f"{path} already exists; remove it first (rm -r {path}) to convert again")


# -- CIFAR-10 ----------------------------------------------------------------------------------------------
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"  # of the tarball, as published with it
CIFAR10_ARCHIVE = "cifar-10-binary.tar.gz"
CIFAR10_FOLDER = "cifar-10-batches-bin"  # the folder inside the tarball
CIFAR10_TRAIN = [f"data_batch_{i}.bin" for i in range(1, 6)]
CIFAR10_TEST = ["test_batch.bin"]
CIFAR10_RECORD = 1 + 3 * 32 * 32  # a label byte, then the 1024 red, 1024 green and 1024 blue bytes


def parse_cifar10_batch(payload, name):
    """A binary CIFAR-10 batch as (N x 3 x 32 x 32 uint8 images, N labels); `name` is used in errors."""
    if not payload or len(payload) % CIFAR10_RECORD:
        raise KaffeError(f"{name} is not a binary CIFAR-10 batch: its size ({len(payload)} bytes) is not a positive "
                         f"multiple of {CIFAR10_RECORD} (a label byte and 3 x 32 x 32 pixels per image)")
    records = np.frombuffer(payload, dtype=np.uint8).reshape(-1, CIFAR10_RECORD)
    labels = records[:, 0]
    if labels.max() > 9:
        bad = int(np.argmax(labels > 9))
        raise KaffeError(f"{name}: record {bad} has label {labels[bad]}, but CIFAR-10 labels are 0..9 (is this "
                         f"the binary version, not the python or CIFAR-100 one?)")
    return records[:, 1:].reshape(-1, 3, 32, 32), labels


def _tar_members(archive, name):
    """The batch files inside a CIFAR-10 tarball (bytes), by file name."""
    try:
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
            found = {}
            for member in tar.getmembers():
                base = os.path.basename(member.name)
                if member.isfile() and base in CIFAR10_TRAIN + CIFAR10_TEST:
                    found[base] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise KaffeError(f"{name} is not a readable .tar.gz: {e}") from None
    missing = [f for f in CIFAR10_TRAIN + CIFAR10_TEST if f not in found]
    if missing:
        raise KaffeError(f"{name} lacks {', '.join(missing)}; expected the binary CIFAR-10 tarball "
                         f"({CIFAR10_URL})")
    return found


def _check_cifar10_md5(payload, name):
    digest = hashlib.md5(payload).hexdigest()
    if digest != CIFAR10_MD5:
        raise KaffeError(f"{name} is not the canonical CIFAR-10 binary tarball: its MD5 is {digest}, expected "
                         f"{CIFAR10_MD5} (the download is corrupt or truncated; delete it and try again)")


def download_cifar10(raw_dir, url=None, progress=sys.stderr):
    """raw_dir/cifar-10-binary.tar.gz, fetched unless a copy with the right MD5 is there; returns its bytes."""
    url = url or CIFAR10_URL
    os.makedirs(raw_dir, exist_ok=True)
    target = os.path.join(raw_dir, CIFAR10_ARCHIVE)
    if os.path.exists(target):
        with open(target, "rb") as f:
            payload = f.read()
        if hashlib.md5(payload).hexdigest() == CIFAR10_MD5:
            return payload
    try:
        _download(url, target, progress)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        raise KaffeError(f"could not download {url} ({getattr(e, 'reason', e)}). If this machine is offline, "
                         f"download {CIFAR10_ARCHIVE} elsewhere (or its extracted {CIFAR10_FOLDER} folder) and "
                         f"convert it with `kaffe data cifar10 --from FOLDER`.") from None
    with open(target, "rb") as f:
        payload = f.read()
    try:
        _check_cifar10_md5(payload, url)
    except KaffeError:
        os.unlink(target)
        raise
    return payload


def load_cifar10_folder(folder, verify=True):
    """The six batch files from FOLDER, FOLDER/cifar-10-batches-bin, or a tarball in FOLDER; by file name."""
    for place in (folder, os.path.join(folder, CIFAR10_FOLDER)):
        if all(os.path.isfile(os.path.join(place, f)) for f in CIFAR10_TRAIN + CIFAR10_TEST):
            files = {}
            for name in CIFAR10_TRAIN + CIFAR10_TEST:
                try:
                    with open(os.path.join(place, name), "rb") as f:
                        files[name] = f.read()
                except OSError as e:
                    raise KaffeError(f"cannot read {os.path.join(place, name)}: {e.strerror}") from None
            return files
    archive = os.path.join(folder, CIFAR10_ARCHIVE)
    if os.path.isfile(archive):
        with open(archive, "rb") as f:
            payload = f.read()
        if verify:
            _check_cifar10_md5(payload, archive)
        return _tar_members(payload, archive)
    present = [f for f in CIFAR10_TRAIN + CIFAR10_TEST if os.path.isfile(os.path.join(folder, f))]
    missing = [f for f in CIFAR10_TRAIN + CIFAR10_TEST if f not in present]
    raise KaffeError(f"{folder} has no complete binary CIFAR-10 set (missing {', '.join(missing)}); --from needs "
                     f"{', '.join(CIFAR10_TRAIN + CIFAR10_TEST)} (in the folder or in {CIFAR10_FOLDER}/ below "
                     f"it) or {CIFAR10_ARCHIVE}")


def convert_cifar10(out_dir, source=None, url=None, verify=True, progress=sys.stderr, backend="lmdb"):
    """Write out_dir/cifar10_train_<backend> and out_dir/cifar10_test_<backend>; returns their paths."""
    outputs = [os.path.join(out_dir, f"cifar10_{split}_{backend}") for split in ("train", "test")]
    _refuse_existing(outputs)
    if source is not None:
        files = load_cifar10_folder(source, verify)
    else:
        archive = download_cifar10(os.path.join(out_dir, "raw"), url, progress)
        files = _tar_members(archive, CIFAR10_ARCHIVE)
    os.makedirs(out_dir, exist_ok=True)
    for path, names, split in zip(outputs, (CIFAR10_TRAIN, CIFAR10_TEST), ("Training", "Testing")):
        logger.info(f"Writing {split} data")
        batches = [parse_cifar10_batch(files[name], name) for name in names]
        images = np.concatenate([b[0] for b in batches])
        labels = np.concatenate([b[1] for b in batches])
        write_datums(path, images, labels, backend, key_format="%05d", progress=progress)
    return outputs


def main(argv=None):
    parser = argparse.ArgumentParser(prog="kaffe data", description="Fetch and convert datasets into LMDBs.")
    datasets = parser.add_subparsers(dest="dataset", metavar="DATASET", required=True)
    mnist = datasets.add_parser(
        "mnist", help="MNIST handwritten digits -> mnist_train_lmdb, mnist_test_lmdb",
        description="Read the four MNIST IDX files (downloaded from a public mirror, or from --from FOLDER), "
                    "check their MD5s and write DIR/mnist_train_lmdb and DIR/mnist_test_lmdb as Caffe's "
                    "convert_mnist_data does. Downloads are cached in DIR/raw. Mirrors can be replaced with "
                    f"${MIRRORS_ENV} (comma separated base URLs).")
    mnist.add_argument("--out", metavar="DIR", default=os.path.join("data", "mnist"),
                       help="output folder (default: data/mnist under the current directory)")
    mnist.add_argument("--from", dest="source", metavar="FOLDER",
                       help="read the IDX files (gzipped or not) from FOLDER instead of downloading them")
    mnist.add_argument("--skip-md5", action="store_true",
                       help="with --from: do not check the files against the canonical MNIST MD5s (for look-alike "
                            "datasets such as Fashion-MNIST)")
    cifar = datasets.add_parser(
        "cifar10", help="CIFAR-10 (binary version) -> cifar10_train_lmdb, cifar10_test_lmdb",
        description=f"Read the binary CIFAR-10 batches (downloaded from {CIFAR10_URL} and checked against its MD5, "
                    f"or from --from FOLDER) and write DIR/cifar10_train_lmdb (data_batch_1..5) and "
                    f"DIR/cifar10_test_lmdb (test_batch) as Caffe's convert_cifar_data does: raw 3 x 32 x 32 "
                    f"uint8 Datums with keys %05d. The download is cached in DIR/raw.")
    cifar.add_argument("--out", metavar="DIR", default=os.path.join("data", "cifar10"),
                       help="output folder (default: data/cifar10 under the current directory)")
    cifar.add_argument("--from", dest="source", metavar="FOLDER",
                       help=f"read data_batch_1..5.bin and test_batch.bin from FOLDER (or FOLDER/{CIFAR10_FOLDER}), "
                            f"or FOLDER/{CIFAR10_ARCHIVE}, instead of downloading")
    cifar.add_argument("--skip-md5", action="store_true",
                       help=f"with --from and a {CIFAR10_ARCHIVE}: do not check its MD5")
    for sub in (mnist, cifar):
        sub.add_argument("--backend", choices=("lmdb", "leveldb"), default="lmdb",
                         help="database format (default: lmdb; leveldb needs the plyvel package)")
        add_quiet_flag(sub)
    args = parser.parse_args(argv)
    convert = convert_mnist if args.dataset == "mnist" else convert_cifar10
    outputs = convert(args.out, args.source, verify=not args.skip_md5, progress=stream(args.quiet),
                      backend=args.backend)
    for path in outputs:
        print(f"Wrote {path}")
    return 0
