"""GEMM tile sizes tuned per device: a short measured run over gemm.cl's variants for each shape class, kept in
a cache file per device that opencl.gemm consults (as Caffe's OpenCL branch autotunes its libdnn kernels).

The tuning runs only when asked (`kaffe device_query --tune`, or tune() from Python). Without a cache, or with
KAFFE_GEMM_TUNING=off, opencl.gemm_rule_tiles' fixed rule decides. The cache is
$XDG_CACHE_HOME/kaffe/gemm_tuning/<device>-<hash>.json (~/.cache without XDG_CACHE_HOME), one per device name,
platform and driver version; it also records a hash of gemm.cl, so that a changed kernel makes it stale (ignored
with a warning, as a corrupt file is).
"""
import hashlib
import json
import math
import os
import re
import time

import numpy as np

from . import opencl
from .errors import KaffeError
from .io import write_file_atomically
from .log import logger

CACHE_ENV = "KAFFE_GEMM_TUNING"
CACHE_FORMAT = 1

# name -> what it holds; a C is classed by its size against the device's compute units (shape_class)
SHAPE_CLASSES = {
    "large": "at least one 128x128 tile per compute unit (e.g. 4096^3)",
    "medium": "fewer 128x128 tiles than compute units, more 64x64 ones (e.g. 1024^3)",
    "small_m": "M <= 64 and a long N (a convolution's forward: few output channels, many positions)",
    "small_output": "fewer 64x64 tiles than compute units (a weight gradient: long K, split-K)",
}

# candidates beside each shape's rule tiles, the likeliest first (a spent budget skips the last):
# (TS_M, TS_N, TS_K, WPT_M, WPT_N, LOCAL_VEC, PREFETCH)
GPU_CANDIDATES = {
    "large": [(128, 128, 16, 8, 8, 4, 2), (128, 128, 16, 8, 8, 4, 1), (128, 128, 32, 8, 8, 4, 1),
              (128, 128, 32, 8, 8, 4, 0), (128, 128, 16, 8, 8, 4, 0), (128, 64, 16, 8, 4, 4, 2),
              (64, 128, 16, 4, 8, 4, 2), (128, 256, 16, 8, 16, 4, 1)],
    "medium": [(64, 64, 16, 4, 4, 4, 2), (64, 64, 16, 4, 4, 4, 1), (64, 64, 32, 4, 4, 4, 1),
               (128, 64, 16, 8, 4, 4, 2), (64, 64, 16, 8, 8, 4, 2), (32, 64, 16, 4, 4, 4, 1)],
    "small_m": [(64, 64, 16, 4, 4), (32, 64, 16, 4, 4, 4, 1), (32, 128, 16, 4, 8, 4, 2), (16, 128, 16, 2, 4),
                (64, 64, 16, 4, 4, 4, 2)],
    "small_output": [(64, 64, 16, 4, 4, 4, 2), (32, 32, 16, 2, 2), (32, 64, 16, 4, 4, 4, 1), (16, 64, 16, 2, 4)],
}
CPU_CANDIDATES = {
    "large": [(64, 64, 16, 8, 8, 4, 0), (64, 64, 16, 8, 8, 4, 2)],
    "medium": [(64, 64, 16, 8, 8, 4, 0), (32, 64, 16, 4, 8)],
    "small_m": [(16, 64, 16, 4, 4, 4, 0)],
    "small_output": [(16, 64, 16, 2, 4, 1, 1)],
}
TIMED_SECONDS = 0.05    # each candidate is timed over at least this long (or MAX_RUNS runs), best of ROUNDS
MAX_RUNS, ROUNDS = 20, 3


# -- the cache ---------------------------------------------------------------------------------------------
def kernel_hash():
    """A hash of gemm.cl's text: the cache of another kernel version is stale."""
    return hashlib.sha256(opencl._kernel_file("gemm.cl").encode()).hexdigest()[:16]


def device_identity(dev):
    d = dev.device
    return {"device": d.name.strip(), "platform": dev.platform.name.strip(), "driver": d.driver_version.strip()}


def cache_path(dev):
    """The cache file of `dev`: named after the device, with a hash of its name, platform and driver."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    identity = device_identity(dev)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", identity["device"]).strip("-")[:48] or "device"
    digest = hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
    return os.path.join(root, "kaffe", "gemm_tuning", f"{slug}-{digest}.json")


def _cached_entries(dev):
    """The shape classes' entries of dev's cache file ({} without one, or with KAFFE_GEMM_TUNING=off); a corrupt
    or stale file is ignored with a warning."""
    if os.environ.get(CACHE_ENV, "").lower() in ("off", "0", "no"):
        return {}
    path = cache_path(dev)
    try:
        with open(path, encoding="utf-8") as f:
            cache = json.load(f)
        problem = _stale_reason(cache, dev)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        problem = f"unreadable ({error})"
    except (KeyError, TypeError, AttributeError) as error:
        problem = f"malformed ({type(error).__name__}: {error})"
    if problem:
        logger.warning(f"Ignoring the GEMM tuning cache {path}: {problem}; rerun "
                       f"`kaffe device_query --tune --gpu {dev.index}`")
        return {}
    return cache["classes"]


def _load(dev):
    """{shape class: (GemmTiles, backend)} from dev's cache file."""
    return {name: (opencl.GemmTiles(*entry["tiles"]), entry["backend"])
            for name, entry in _cached_entries(dev).items()}


def _stale_reason(cache, dev):
    if cache.get("format") != CACHE_FORMAT:
        return f"format {cache.get('format')!r}, not {CACHE_FORMAT}"
    for key, value in device_identity(dev).items():
        if cache.get(key) != value:
            return f"made for {key} {cache.get(key)!r}, this is {value!r}"
    if cache.get("kernel") != kernel_hash():
        return "made for another version of gemm.cl"
    for name, entry in cache["classes"].items():
        if name not in SHAPE_CLASSES:
            return f"unknown shape class {name!r}"
        if entry["backend"] not in opencl.GEMM_BACKENDS:
            return f"unknown backend {entry['backend']!r}"
        invalid = invalid_reason(opencl.GemmTiles(*entry["tiles"]), dev)
        if invalid:
            return f"the tiles {entry['tiles']} of class {name} are invalid here: {invalid}"
    return None


def _tuned(dev):
    table = getattr(dev, "gemm_tuned", None)
    if table is None:
        table = dev.gemm_tuned = _load(dev)
    return table


def tuned_tiles(M, N, dev):
    """The cached GemmTiles of the shape class of an M x N C on `dev`, or None."""
    entry = _tuned(dev).get(shape_class(M, N, dev))
    return entry and entry[0]


def tuned_backend(M, N, dev):
    """'clblast' where the cache says CLBlast won the shape class of an M x N C (and pyclblast is installed),
    else 'kaffe'."""
    entry = _tuned(dev).get(shape_class(M, N, dev))
    return "clblast" if entry and entry[1] == "clblast" and opencl._pyclblast() is not None else "kaffe"


def shape_class(M, N, dev):
    """The SHAPE_CLASSES name of an M x N C on `dev`."""
    units = dev.device.max_compute_units
    if -(-M // 64) * -(-N // 64) < units:
        return "small_output"
    if M <= 64:
        return "small_m"
    return "large" if -(-M // 128) * -(-N // 128) >= units else "medium"


# -- candidates --------------------------------------------------------------------------------------------
def invalid_reason(tiles, dev):
    """Why gemm.cl cannot run `tiles` on `dev` (None when it can): the register blocks must divide the tiles,
    the work-group fit the device and the local tiles its local memory."""
    ts_m, ts_n, ts_k, wpt_m, wpt_n, local_vec, prefetch = tiles
    d = dev.device
    if min(tiles[:5]) < 1 or ts_m % wpt_m or ts_n % wpt_n or local_vec not in (1, 4) or prefetch not in (0, 1, 2):
        return "the register block does not divide the tile"
    if wpt_m % local_vec or wpt_n % local_vec:
        return "LOCAL_VEC must divide the register block"
    group = (ts_n // wpt_n, ts_m // wpt_m)
    if group[0] * group[1] > d.max_work_group_size or any(g > s for g, s in zip(group, d.max_work_item_sizes)):
        return f"a work-group of {group[0]}x{group[1]} exceeds the device's {d.max_work_group_size}"
    local_bytes = (2 if prefetch == 2 else 1) * ts_k * (ts_m + ts_n + 2 * local_vec) * opencl.FLOAT_BYTES
    if local_bytes > d.local_mem_size:
        return f"{local_bytes} bytes of local memory exceed the device's {d.local_mem_size}"
    return None


def candidates(name, shape, dev):
    """The rule's tiles for `shape` first, then the class's other candidates that the device can run."""
    listed = (GPU_CANDIDATES if dev.is_gpu else CPU_CANDIDATES)[name]
    found = [opencl.gemm_rule_tiles(shape[0], shape[1], dev)]
    for tiles in map(lambda t: opencl.GemmTiles(*t), listed):
        if tiles not in found and invalid_reason(tiles, dev) is None:
            found.append(tiles)
    return found


def class_shapes(dev, quick=False):
    """{shape class: (M, N, K)} measured on `dev`: shapes of that class on this device (by its compute units);
    quick: small ones, for CPU devices and tests."""
    units = dev.device.max_compute_units
    side = 128 * max(1, math.isqrt(max(units - 1, 1)))       # fewer 128-tiles than units, more 64-tiles
    if quick:
        big = 128 * math.isqrt(units - 1) + 128                # at least `units` 128-tiles
        shapes = {"large": (big, big, 64), "medium": (side, side, 64), "small_m": (16, 64 * units + 40, 32),
                  "small_output": (20, 25, 1003)}
    else:
        long_n = 64 * units * 4
        shapes = {"large": (4096, 4096, 4096), "medium": (side, side, side), "small_m": (32, long_n + 100, 576),
                  "small_output": (50, min(500, 64 * (units - 1)) or 25, 36864)}
    return {name: shape for name, shape in shapes.items() if shape_class(shape[0], shape[1], dev) == name}


# -- measuring ---------------------------------------------------------------------------------------------
class _Problem:
    """One GEMM shape's operands on the device and numpy's product in float64, to check every candidate."""

    def __init__(self, shape, rng):
        M, N, K = self.shape = shape
        a = rng.standard_normal((M, K), dtype=np.float32)
        b = rng.standard_normal((K, N), dtype=np.float32)
        self.A, self.B, self.C = opencl.to_device(a), opencl.to_device(b), opencl.empty(M * N)
        self.expected = (a.astype(np.float64) @ b.astype(np.float64)).astype(np.float32)
        self.tolerance = 2e-5 * math.sqrt(K) * float(np.abs(self.expected).max(initial=1.0))

    def run(self):
        M, N, K = self.shape
        opencl.gemm(False, False, M, N, K, 1.0, self.A, self.B, 0.0, self.C)

    def error(self):
        """The largest difference from numpy's product, after one run."""
        self.C.fill(np.nan)
        self.run()
        got = opencl.download(self.C).reshape(self.expected.shape)
        return float(np.nan_to_num(np.abs(got - self.expected), nan=np.inf).max(initial=0.0))

    def gflops(self):
        """The best of ROUNDS rounds of back-to-back runs (the first run, timed alone, sets their number)."""
        opencl.finish()
        start = time.perf_counter()
        self.run()
        opencl.finish()
        runs = int(min(MAX_RUNS, max(1, TIMED_SECONDS / max(time.perf_counter() - start, 1e-6))))
        best = math.inf
        for _ in range(ROUNDS):
            start = time.perf_counter()
            for _ in range(runs):
                self.run()
            opencl.finish()
            best = min(best, (time.perf_counter() - start) / runs)
        return 2.0 * math.prod(self.shape) / best / 1e9


def _measure(problem, dev, name, tiles):
    """(GFLOP/s, None) of `tiles` (or CLBlast when tiles is None) for the shape class `name`, or (0, why)."""
    saved_table, saved_backend = _tuned(dev), opencl.explicit_gemm_backend()
    dev.gemm_tuned = {name: (tiles, "kaffe")} if tiles is not None else {}
    opencl.set_gemm_backend("clblast" if tiles is None else "kaffe")
    try:
        error = problem.error()
        if not error <= problem.tolerance:
            return 0.0, f"wrong result (max error {error:.3g}, tolerance {problem.tolerance:.3g})"
        return problem.gflops(), None
    except (KaffeError, opencl.cl.Error) as failure:
        return 0.0, str(failure).splitlines()[0]
    finally:
        dev.gemm_tuned = saved_table
        opencl.set_gemm_backend(saved_backend)


def tune(dev, quick=False, classes=tuple(SHAPE_CLASSES), budget_seconds=40.0, seed=0):
    """Measure each shape class's candidates on `dev` (an opencl.Device, made current), log them, write the
    cache and return what it holds: {shape class: entry}, entry = {"shape", "tiles" (the best GemmTiles as a
    list), "backend" ('clblast' where CLBlast beat them), "gflops", "default_gflops" (the rule's tiles),
    "candidates"}. Only the shape classes named in `classes` are measured; the cache keeps its entries of the
    others. Candidates left when budget_seconds have passed are skipped (the rule's are always run)."""
    unknown = sorted(set(classes) - set(SHAPE_CLASSES))
    if unknown:
        raise KaffeError(f"unknown GEMM shape classes {unknown}; the classes are {', '.join(SHAPE_CLASSES)}")
    rng = np.random.default_rng(seed)
    started = time.perf_counter()
    kept = _cached_entries(dev)
    measured = {}
    for name, shape in class_shapes(dev, quick).items():
        if name not in classes:
            continue
        problem = _Problem(shape, rng)
        logger.info(f"Tuning GEMM class {name} ({SHAPE_CLASSES[name]}) at {'x'.join(map(str, shape))}")
        options = candidates(name, shape, dev) + ([None] if opencl._pyclblast() is not None else [])
        tried = []
        for tiles in options:
            if tried and time.perf_counter() - started > budget_seconds:
                logger.info(f"  the {budget_seconds:g} s budget is spent: {len(options) - len(tried)} candidates "
                            f"skipped")
                break
            gflops, failure = _measure(problem, dev, name, tiles)
            tried.append({"tiles": tiles and list(tiles), "gflops": round(gflops, 1), "failure": failure})
            label = "CLBlast (pyclblast)" if tiles is None else str(tiles)
            logger.info(f"  {label}: " + (f"{gflops:.1f} GFLOP/s" if failure is None else f"rejected, {failure}"))
        best = max((t for t in tried if t["tiles"]), key=lambda t: t["gflops"])
        clblast = [t for t in tried if t["tiles"] is None and t["gflops"] > best["gflops"]]
        if best["gflops"] <= 0:
            logger.warning(f"  no candidate of class {name} gave the right result: the rule stays")
            continue
        default = tried[0]
        measured[name] = {"shape": list(shape), "quick": bool(quick), "tiles": best["tiles"],
                          "backend": "clblast" if clblast else "kaffe",
                          "gflops": max([best["gflops"]] + [t["gflops"] for t in clblast]),
                          "default_gflops": default["gflops"], "candidates": tried}
        winner = "CLBlast" if clblast else str(opencl.GemmTiles(*best["tiles"]))
        logger.info(f"  class {name} at {'x'.join(map(str, shape))}: {winner} wins with "
                    f"{measured[name]['gflops']:.1f} GFLOP/s; the rule's {opencl.GemmTiles(*default['tiles'])}: "
                    f"{default['gflops']:.1f} GFLOP/s")
    cache = {"format": CACHE_FORMAT, **device_identity(dev), "kernel": kernel_hash(), "classes": {**kept, **measured}}
    path = cache_path(dev)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_file_atomically(path, json.dumps(cache, indent=1).encode())
    logger.info(f"Wrote the GEMM tuning cache {path} ({time.perf_counter() - started:.1f} s of tuning)")
    dev.gemm_tuned = None   # read back from the file at the next GEMM
    return measured
