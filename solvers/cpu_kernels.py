"""Compiled CPU kernels (numba) for the solver's host update: the memory-bound passes of a rule in one loop.

engine/accelerator.py imports this module on first use, only when numba is installed and KAFFE_ACCEL is not 0.
Each kernel does the numpy path's float32 operations in its order, one element at a time (no fast-math: no
reassociation, no fused multiply-adds), so the parameters it leaves are the same bits; the scalars come as
np.float32, as the numpy path multiplies by them.
"""
import numba


@numba.njit(cache=True)
def sgd_update(data, diff, history, norm, decay, rate, momentum):
    """SGDSolver's step on flat arrays: diff *= norm (iter_size > 1), diff += decay * data (L2, decay != 0),
    history = momentum * history + rate * diff, and the parameter moves by -history (left in diff, as Caffe)."""
    for i in range(data.size):
        gradient = diff[i]
        if norm != 1:
            gradient *= norm
        if decay != 0:
            gradient += data[i] * decay
        step = history[i] * momentum + gradient * rate
        history[i] = step
        diff[i] = step
        data[i] -= step
