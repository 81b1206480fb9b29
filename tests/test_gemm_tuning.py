"""GEMM tuning per device: gemm.cl's variants against numpy, the candidates a device can run, the tuning run
(`kaffe device_query --tune`, quick mode on PoCL), its cache file read back by opencl.gemm, and stale or corrupt
caches ignored with a warning."""
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("pyopencl", reason="pyopencl is not installed (pip install kaffe[opencl])")

from kaffe.engine import gemm_tuning, opencl  # noqa: E402
from kaffe.engine.opencl import GemmTiles  # noqa: E402
from kaffe.tools import cli  # noqa: E402

pytestmark = [pytest.mark.opencl,
              pytest.mark.skipif(not opencl.devices(), reason="no OpenCL platform (install pocl-opencl-icd)")]

H200 = SimpleNamespace(is_gpu=True, index=0, device=SimpleNamespace(
    max_compute_units=132, max_work_group_size=1024, max_work_item_sizes=[1024, 1024, 64], local_mem_size=49152))


def small_gpu(local_mem_size=16384, max_work_group_size=256):
    return SimpleNamespace(is_gpu=True, index=0, device=SimpleNamespace(
        max_compute_units=8, max_work_group_size=max_work_group_size, max_work_item_sizes=[256, 256, 256],
        local_mem_size=local_mem_size))


@pytest.fixture
def dev(tmp_path, monkeypatch):
    """The current device with its tuning cache under a fresh XDG_CACHE_HOME, read anew by the test."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv(gemm_tuning.CACHE_ENV, raising=False)
    device = opencl.current()
    device.gemm_tuned = None
    yield device
    device.gemm_tuned = None   # later tests read their own (absent) cache


def force_tiles(device, tiles):
    device.gemm_tuned = {name: (GemmTiles(*tiles), "kaffe") for name in gemm_tuning.SHAPE_CLASSES}


def rand(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def op(matrix, transposed):
    return matrix.T.astype(np.float64) if transposed else matrix.astype(np.float64)


def assert_close(actual, expected):
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    assert np.abs(actual - expected).max(initial=0.0) <= 1e-4 * scale


# -- every variant of gemm.cl computes numpy's product ---------------------------------------------------
# each kernel variant (float4 local reads or not, prefetch or not, square and oblong register blocks) once
VARIANTS = [(16, 64, 16, 2, 4, 1, 1), (32, 64, 16, 4, 8, 4, 0), (64, 64, 16, 8, 8, 4, 2)]


@pytest.mark.parametrize("tiles", VARIANTS)
@pytest.mark.parametrize("trans_a,trans_b,M,N,K", [(False, False, 133, 261, 37), (True, False, 70, 260, 36),
                                                   (False, True, 65, 68, 36), (True, True, 17, 130, 67)])
def test_variants_match_numpy_on_odd_shapes(dev, tiles, trans_a, trans_b, M, N, K):
    """M, N, K are not multiples of the tiles; the multiples of 4 take the vector loads, the others not."""
    rng = np.random.default_rng(0)
    force_tiles(dev, tiles)
    a = rand(rng, *((K, M) if trans_a else (M, K)))
    b = rand(rng, *((N, K) if trans_b else (K, N)))
    c = rand(rng, M * N)
    C = opencl.to_device(c)
    opencl.gemm(trans_a, trans_b, M, N, K, 0.5, opencl.to_device(a), opencl.to_device(b), -1.0, C)
    assert_close(C.get().reshape(M, N), 0.5 * op(a, trans_a) @ op(b, trans_b) - c.reshape(M, N))


@pytest.mark.parametrize("tiles", VARIANTS)
def test_variants_batch_bias_blocked_k_and_split_k(dev, tiles):
    """A batched GEMM writing NCHW with the bias per row, one with the bias per column, and a weight gradient
    whose K runs over the samples' blocks, split into 3 chunks."""
    rng = np.random.default_rng(1)
    force_tiles(dev, tiles)
    samples, out, k, positions = 3, 37, 29, 75
    w, col, bias = rand(rng, out, k), rand(rng, k, samples * positions), rand(rng, out)
    top = opencl.zeros(samples * out * positions)
    opencl.gemm(False, False, out, positions, k, 1.0, opencl.to_device(w), opencl.to_device(col), 0.0, top,
                batch=samples, strides=(0, positions, out * positions), ldb=samples * positions, ldc=positions,
                bias=opencl.to_device(bias), bias_axis=0)
    expected = np.stack([op(w, False) @ col[:, n * positions:(n + 1) * positions] + bias[:, None]
                         for n in range(samples)])
    assert_close(opencl.download(top).reshape(expected.shape), expected)
    x, weights, bias_n = rand(rng, 19, k), rand(rng, out, k), rand(rng, out)
    y = opencl.zeros(19 * out)
    opencl.gemm(False, True, 19, out, k, 1.0, opencl.to_device(x), opencl.to_device(weights), 0.0, y,
                bias=opencl.to_device(bias_n))
    assert_close(opencl.download(y).reshape(19, out), op(x, False) @ op(weights, True) + bias_n)
    dy = rand(rng, samples, out, positions)
    dw = opencl.to_device(np.ones((out, k), np.float32))
    opencl.gemm(False, True, out, k, samples * positions, 1.0, opencl.to_device(dy), opencl.to_device(col), 1.0,
                dw, a_blocks=(positions, out * positions), split_k=3)
    rows = dy.transpose(1, 0, 2).reshape(out, samples * positions)
    assert_close(opencl.download(dw).reshape(out, k), 1 + op(rows, False) @ op(col, True))


@pytest.mark.slow
def test_every_listed_candidate_matches_numpy(dev):
    """Each tiling the tuning may choose on a GPU or a CPU device (those this device can run)."""
    rng = np.random.default_rng(2)
    listed = {GemmTiles(*t) for table in (gemm_tuning.GPU_CANDIDATES, gemm_tuning.CPU_CANDIDATES)
              for tiles in table.values() for t in tiles}
    M, N, K = 133, 260, 67
    a, b = rand(rng, K, M), rand(rng, K, N)
    for tiles in sorted(t for t in listed if gemm_tuning.invalid_reason(t, dev) is None):
        force_tiles(dev, tiles)
        C = opencl.zeros(M * N)
        opencl.gemm(True, False, M, N, K, 1.0, opencl.to_device(a), opencl.to_device(b), 0.0, C)
        assert_close(C.get().reshape(M, N), op(a, True) @ op(b, False))


# -- candidates and shape classes --------------------------------------------------------------------------
def test_shape_classes_on_an_h200():
    assert gemm_tuning.shape_class(4096, 4096, H200) == "large"
    assert gemm_tuning.shape_class(1024, 1024, H200) == "medium"
    assert gemm_tuning.shape_class(20, 36864, H200) == "small_m"
    assert gemm_tuning.shape_class(50, 500, H200) == "small_output"
    shapes = gemm_tuning.class_shapes(H200)
    assert list(shapes) == list(gemm_tuning.SHAPE_CLASSES) and shapes["large"] == (4096, 4096, 4096)
    assert list(gemm_tuning.class_shapes(H200, quick=True)) == list(gemm_tuning.SHAPE_CLASSES)


def test_every_gpu_candidate_fits_an_h200_and_the_rule_comes_first():
    for name, listed in gemm_tuning.GPU_CANDIDATES.items():
        shape = gemm_tuning.class_shapes(H200)[name]
        found = gemm_tuning.candidates(name, shape, H200)
        assert found[0] == opencl.gemm_rule_tiles(shape[0], shape[1], H200)
        assert set(map(lambda t: GemmTiles(*t), listed)) <= set(found)


def test_candidates_beyond_the_device_are_left_out():
    assert "local memory" in gemm_tuning.invalid_reason(GemmTiles(128, 128, 32, 8, 8, 4), small_gpu())
    assert "work-group" in gemm_tuning.invalid_reason(GemmTiles(64, 64, 16, 2, 2), small_gpu())
    assert "register block" in gemm_tuning.invalid_reason(GemmTiles(64, 60, 16, 4, 8), small_gpu())
    assert "LOCAL_VEC" in gemm_tuning.invalid_reason(GemmTiles(32, 32, 16, 2, 2, 4), small_gpu())
    found = gemm_tuning.candidates("large", (4096, 4096, 4096), small_gpu(local_mem_size=20000))
    assert found and all(gemm_tuning.invalid_reason(t, small_gpu(20000)) is None for t in found[1:])
    assert GemmTiles(128, 128, 32, 8, 8, 4, 0) not in found


# -- the tuning run and its cache -------------------------------------------------------------------------
def test_tuning_writes_the_cache_that_gemm_then_uses(dev, capsys, log_back_on_stderr):
    code = cli.main(["device_query", "--tune", "--tune-quick", "--gpu", str(dev.index),
                     "--tune-classes", "large,small_output"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "GEMM large" in err and "rule" in err and "tuned" in err and "GFLOP/s" in err
    path = gemm_tuning.cache_path(dev)
    cache = json.loads(open(path).read())
    assert cache["device"] == dev.device.name.strip() and cache["kernel"] == gemm_tuning.kernel_hash()
    assert set(cache["classes"]) == {"large", "small_output"}
    for name, entry in cache["classes"].items():
        measured = [t for t in entry["candidates"] if t["failure"] is None]
        assert entry["tiles"] == max(measured, key=lambda t: t["gflops"])["tiles"]
        assert entry["default_gflops"] == entry["candidates"][0]["gflops"] > 0
        M, N, _ = entry["shape"]
        assert opencl._gemm_tiles(M, N, dev) == GemmTiles(*entry["tiles"])
    # a medium C has no entry: the rule decides
    assert opencl._gemm_tiles(128, 128, dev) == opencl.gemm_rule_tiles(128, 128, dev)

    # tuning one more class keeps the others; with no budget only the rule's tiles are measured
    gemm_tuning.tune(dev, quick=True, classes=("medium",), budget_seconds=0)
    cache = json.loads(open(path).read())
    assert set(cache["classes"]) == {"large", "small_output", "medium"}
    assert len(cache["classes"]["medium"]["candidates"]) == 1

    # gemm runs what the cache says, here tiles no rule picks
    cache["classes"]["large"]["tiles"] = [32, 32, 16, 4, 4, 4, 1]
    open(path, "w").write(json.dumps(cache))
    dev.gemm_tuned = None
    M, N, K = cache["classes"]["large"]["shape"]
    rng = np.random.default_rng(3)
    a, b = rand(rng, M, K), rand(rng, K, N)
    C = opencl.zeros(M * N)
    opencl.gemm(False, False, M, N, K, 1.0, opencl.to_device(a), opencl.to_device(b), 0.0, C)
    assert_close(C.get().reshape(M, N), op(a, False) @ op(b, False))
    # no other test runs these tiles: their program was built for this GEMM
    assert any({"-DTS_M=32", "-DTS_N=32", "-DWPT_M=4", "-DLOCAL_VEC=4", "-DPREFETCH=1"} <= set(options)
               for _, options in dev.programs)


def test_a_wrong_result_is_rejected(dev):
    problem = gemm_tuning._Problem((40, 50, 30), np.random.default_rng(4))
    rule = opencl.gemm_rule_tiles(40, 50, dev)
    assert gemm_tuning._measure(problem, dev, "small_output", rule)[0] > 0
    problem.expected[7, 9] += 0.5   # the kernel's answer now differs there
    gflops, failure = gemm_tuning._measure(problem, dev, "small_output", rule)
    assert gflops == 0 and failure.startswith("wrong result")


def valid_cache(dev):
    entry = {"shape": [64, 64, 64], "quick": True, "tiles": [32, 32, 16, 4, 4, 4, 1], "backend": "kaffe",
             "gflops": 1.0, "default_gflops": 1.0, "candidates": []}
    return {"format": gemm_tuning.CACHE_FORMAT, **gemm_tuning.device_identity(dev),
            "kernel": gemm_tuning.kernel_hash(), "classes": {name: entry for name in gemm_tuning.SHAPE_CLASSES}}


def spoil(cache, field, value):
    cache[field] = value
    return cache


@pytest.mark.parametrize("spoiled,reason", [
    (lambda c: spoil(c, "kernel", "0123456789abcdef"), "another version of gemm.cl"),
    (lambda c: spoil(c, "driver", "0.0"), "made for driver '0.0'"),
    (lambda c: spoil(c, "format", 0), "format 0"),
    (lambda c: spoil(c, "classes", {"huge": c["classes"]["large"]}), "unknown shape class 'huge'"),
    (lambda c: spoil(c, "classes", {"large": {**c["classes"]["large"], "tiles": [64, 60, 16, 4, 8]}}),
     "invalid here"),
    (lambda c: spoil(c, "classes", {"large": {**c["classes"]["large"], "backend": "cublas"}}), "unknown backend"),
    (lambda c: spoil(c, "classes", {"large": {"tiles": [32, 32, 16, 4, 4]}}), "malformed (KeyError"),
    (lambda c: spoil(c, "classes", [1, 2]), "malformed (AttributeError"),
])
def test_a_stale_or_malformed_cache_is_ignored_with_a_warning(dev, kaffe_log, spoiled, reason):
    path = gemm_tuning.cache_path(dev)
    os.makedirs(os.path.dirname(path))
    open(path, "w").write(json.dumps(spoiled(valid_cache(dev))))
    assert opencl._gemm_tiles(512, 512, dev) == opencl.gemm_rule_tiles(512, 512, dev)
    assert any(m.startswith(f"Ignoring the GEMM tuning cache {path}") and reason in m
               and "kaffe device_query --tune" in m for m in kaffe_log), kaffe_log


def test_a_corrupt_cache_is_ignored_and_off_ignores_any(dev, kaffe_log, monkeypatch):
    path = gemm_tuning.cache_path(dev)
    os.makedirs(os.path.dirname(path))
    open(path, "w").write('{"format": 1, "classes": {"lar')
    assert opencl._gemm_tiles(512, 512, dev) == opencl.gemm_rule_tiles(512, 512, dev)
    assert any("unreadable" in m for m in kaffe_log)
    open(path, "w").write(json.dumps(valid_cache(dev)))
    dev.gemm_tuned = None
    assert opencl._gemm_tiles(512, 512, dev) == GemmTiles(32, 32, 16, 4, 4, 4, 1)
    monkeypatch.setenv(gemm_tuning.CACHE_ENV, "off")
    dev.gemm_tuned = None
    assert opencl._gemm_tiles(512, 512, dev) == opencl.gemm_rule_tiles(512, 512, dev)


def test_cache_path_follows_xdg_cache_home_and_names_the_device(dev, tmp_path, monkeypatch):
    path = gemm_tuning.cache_path(dev)
    assert path.startswith(str(tmp_path / "xdg" / "kaffe" / "gemm_tuning")) and path.endswith(".json")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert gemm_tuning.cache_path(dev).startswith(str(tmp_path / "home" / ".cache" / "kaffe"))


def test_unknown_shape_classes_are_refused(dev, capsys, log_back_on_stderr):
    assert cli.main(["device_query", "--tune", "--tune-classes", "large,huge"]) == 1
    assert "kaffe device_query: error: unknown GEMM shape classes ['huge']" in capsys.readouterr().err


def test_device_query_without_tune_still_queries(dev, capsys, log_back_on_stderr):
    assert cli.main(["device_query", "--gpu", str(dev.index)]) == 0
    err = capsys.readouterr().err
    assert "Self-test (2x + 1 kernel):     passed" in err and "Tuning" not in err
    assert cli.main(["device_query", "--tune", "--gpu", "x"]) == 1
    assert "--gpu must be a device id" in capsys.readouterr().err
    assert not os.path.exists(gemm_tuning.cache_path(dev))
