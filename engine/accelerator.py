"""The optional compiled CPU accelerator: numba kernels for what numpy cannot make fast (`pip install
"kaffe[accel]"`): depthwise convolution, Winograd's transforms, pooling, LRN, col2im (layers/cpu_kernels.py) and
the solver's host update (solvers/cpu_kernels.py).

Without numba, or with KAFFE_ACCEL=0, the layers run their numpy code, the reference the kernels are tested
against. numba is imported when a layer with a kernel first runs and each kernel is compiled at its first call,
then cached on disk (numba's cache: the package's __pycache__, numba's folder under ~/.cache where the package
is read-only, or NUMBA_CACHE_DIR), so that `import kaffe` does not pay for it. The kernels are parallel over the
planes of the batch (numba's prange) but run on one thread unless NUMBA_NUM_THREADS is set.
"""
import os

from .log import logger

_kernels = None
_update_kernels = None
_numba_installed = None


def enabled():
    """Whether the compiled kernels run: numba is installed and KAFFE_ACCEL is not 0."""
    global _numba_installed
    if os.environ.get("KAFFE_ACCEL", "1") == "0":
        return False
    if _numba_installed is None:
        try:
            import numba  # noqa: F401
            _numba_installed = True
        except ImportError:
            _numba_installed = False
            logger.info('depthwise convolution and max pooling run in numpy: pip install "kaffe[accel]" (numba) '
                        'compiles them')
    return _numba_installed


def kernels():
    """The module of compiled layer kernels (numba imported and its thread count set on the first call)."""
    global _kernels
    if _kernels is None:
        _set_threads()
        from ..layers import cpu_kernels
        _kernels = cpu_kernels
    return _kernels


def update_kernels():
    """The module of compiled solver updates (solvers/cpu_kernels.py)."""
    global _update_kernels
    if _update_kernels is None:
        _set_threads()
        from ..solvers import cpu_kernels
        _update_kernels = cpu_kernels
    return _update_kernels


def _set_threads():
    import numba

    # one thread unless NUMBA_NUM_THREADS asks for more: measured on 2 shared cores, a parallel kernel
    # waits at its barrier for whichever thread the OS has set aside, and lost to the one-thread kernel
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS if "NUMBA_NUM_THREADS" in os.environ else 1)
