"""`kaffe data`: fetch and convert public datasets into Caffe's LMDB format.

`kaffe data mnist` does what Caffe's get_mnist.sh + convert_mnist_data do: it reads the four MNIST IDX
files (from a folder, or downloaded from a public mirror and checked against the canonical MD5s) and writes
mnist_train_lmdb and mnist_test_lmdb of raw uint8 1 x 28 x 28 Datums with keys "%08d".
"""
import argparse
import gzip
import hashlib
import http.client
import os
import shutil
import sys
import urllib.error
import urllib.request

import numpy as np

from ..engine.errors import KaffeError
from ..engine.log import logger
from ..proto import caffe_pb2

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


# -- LMDB --------------------------------------------------------------------------------------------
def write_datum_lmdb(path, images, labels, commit_every=1000):
    """Write N x C x H x W uint8 images and N labels as Datums with keys "%08d" into a new LMDB at `path`.

    Refuses to overwrite an existing path (as Caffe does). The DB is built under a temporary name and
    renamed at the end, so an interrupted conversion leaves nothing that blocks the next one.
    """
    import lmdb
    images = np.asarray(images)
    labels = np.asarray(labels).reshape(-1)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise KaffeError(f"write_datum_lmdb needs N x C x H x W uint8 images, got {images.dtype} {images.shape}")
    if len(labels) != len(images):
        raise KaffeError(f"write_datum_lmdb: {len(images)} images but {len(labels)} labels")
    if os.path.exists(path):
        raise KaffeError(f"{path} already exists; remove it first (rm -r {path}) to write it again")
    partial = path + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    _, channels, height, width = images.shape
    # room for the pixels plus B-tree and Datum overhead; grown if it proves too small
    map_size = 2 * images.nbytes + 64 * len(images) + (64 << 20)
    env = lmdb.open(partial, map_size=map_size, subdir=True, lock=True)
    try:
        datum = caffe_pb2.Datum(channels=channels, height=height, width=width)
        start = 0
        while start < len(images):
            stop = min(start + commit_every, len(images))
            try:
                with env.begin(write=True) as txn:
                    for i in range(start, stop):
                        datum.data = images[i].tobytes()
                        datum.label = int(labels[i])
                        txn.put(b"%08d" % i, datum.SerializeToString())
            except lmdb.MapFullError:
                map_size *= 2
                env.set_mapsize(map_size)
                continue  # the aborted transaction wrote nothing: redo it
            start = stop
    finally:
        env.close()
    os.replace(partial, path)
    logger.info(f"Processed {len(images)} files into {path}")


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
    """Fetch url into target (via a .part file), printing a progress line."""
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
        done = 0
        try:
            while True:
                chunk = response.read(1 << 16)
                if not chunk:
                    break
                out.write(chunk)
                done += len(chunk)
                if progress:
                    share = f"{100 * done // total:3d}% of {total / 1e6:.1f} MB" if total else f"{done / 1e6:.1f} MB"
                    progress.write(f"\rDownloading {url}: {share}")
                    progress.flush()
        finally:
            if progress and done:
                progress.write("\n")


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


def convert_mnist(out_dir, source=None, mirrors=None, verify=True, progress=sys.stderr):
    """Write out_dir/mnist_train_lmdb and out_dir/mnist_test_lmdb; returns their paths."""
    outputs = [os.path.join(out_dir, f"mnist_{split}_lmdb") for split in ("train", "test")]
    for path in outputs:
        if os.path.exists(path):
            raise KaffeError(f"{path} already exists; remove it first (rm -r {path}) to convert again")
    if source is not None:
        contents = load_mnist_folder(source, verify)
    else:
        contents = download_mnist(os.path.join(out_dir, "raw"), mirrors, progress)
    os.makedirs(out_dir, exist_ok=True)
    for path, prefix in zip(outputs, ("train", "t10k")):
        images, labels = _mnist_split(contents, prefix)
        logger.info(f"A total of {len(images)} items. Rows: {images.shape[2]} Cols: {images.shape[3]}")
        write_datum_lmdb(path, images, labels)
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
    args = parser.parse_args(argv)
    outputs = convert_mnist(args.out, args.source, verify=not args.skip_md5)
    for path in outputs:
        print(f"Wrote {path}")
    return 0
