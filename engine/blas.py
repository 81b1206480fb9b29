"""numpy's own BLAS called directly, for the two things numpy's matmul cannot do: add a product into its output
(beta = 1) and read a matrix from any place in a larger array, whose rows lie any number of floats apart.

The convolutions that run as one GEMM per kernel tap over shifted views of the padded input (layers/vision.py,
shifted_taps) need both. The routine is cblas_sgemm of the OpenBLAS that numpy's wheels ship (numpy.libs),
called through ctypes, which releases the GIL. It must be numpy's library, not another copy: two OpenBLAS thread
pools in one process spin against each other on the cores. Where numpy was built against another BLAS (which
this module does not look for), `available()` is False and those convolutions keep the im2col path.
"""
import ctypes
import glob
import os

import numpy as np

ROW_MAJOR, NO_TRANS = 101, 111  # CBLAS's enums
# the exported names, and the integer type of their arguments: numpy's wheels (ILP64, symbols renamed by
# scipy-openblas), a plain ILP64 OpenBLAS, a plain LP64 one
SYMBOLS = (("scipy_cblas_sgemm64_", ctypes.c_int64), ("cblas_sgemm64_", ctypes.c_int64),
           ("cblas_sgemm", ctypes.c_int))
_sgemm = None
_loaded = False


def _numpy_blas_libraries():
    """The shared libraries beside numpy's package that may be its BLAS (numpy.libs on Linux and Windows,
    numpy/.dylibs on macOS)."""
    root = os.path.dirname(np.__file__)
    return [path for folder in (root + ".libs", os.path.join(root, ".libs"), os.path.join(root, ".dylibs"))
            for path in sorted(glob.glob(os.path.join(folder, "*openblas*")))]


def _load():
    """The sgemm function of numpy's BLAS, or None."""
    global _sgemm, _loaded
    if not _loaded:
        _loaded = True
        for path in _numpy_blas_libraries():
            try:
                library = ctypes.CDLL(path)
            except OSError:
                continue
            for name, integer in SYMBOLS:
                if hasattr(library, name):
                    function = getattr(library, name)
                    function.restype = None
                    function.argtypes = [ctypes.c_int] * 3 + [integer] * 3 + [
                        ctypes.c_float, ctypes.c_void_p, integer, ctypes.c_void_p, integer, ctypes.c_float,
                        ctypes.c_void_p, integer]
                    _sgemm = function
                    return _sgemm
    return _sgemm


def available():
    """Whether numpy's sgemm can be called."""
    return _load() is not None


def address(array):
    """The address of an array's first element."""
    return array.__array_interface__["data"][0]


def gemm(m, n, k, a, lda, b, ldb, c, ldc, accumulate=False):
    """Row-major C (m x n) = A (m x k) @ B (k x n), plus C when `accumulate`. a, b, c are addresses of float32
    data; lda, ldb, ldc the distances between their rows, in floats."""
    _sgemm(ROW_MAJOR, NO_TRANS, NO_TRANS, m, n, k, 1.0, a, lda, b, ldb, 1.0 if accumulate else 0.0, c, ldc)
