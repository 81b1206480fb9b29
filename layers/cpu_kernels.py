"""Compiled CPU kernels (numba) for what numpy cannot make fast: a convolution's bias and ReLU in one pass,
depthwise convolution (forward, both backward directions), im2col into batch-outer columns, col2im of the
batch-innermost columns (convolution's backward to its input), the forward of 2-D MAX pooling (with or without
the argmax that backward reads), its backward pass, the scale of LRN across channels, and the input and output
transforms of Winograd F(4x4, 3x3) convolutions.

engine/accelerator.py imports this module on first use, only when numba is installed and KAFFE_ACCEL is not 0;
the numpy code of layers/vision.py is the reference they are tested against (the direct sums for Winograd).
Every kernel runs in parallel over the planes of the batch (sample x channel, or the output channels for the
depthwise forward and weight gradient); the arrays are C-contiguous NCHW float32, windows and taps as in
layers/vision.py (tap_span).
"""
import numba
import numpy as np
from numba import prange, uint64

# reassociation lets the multiply-adds vectorise.
# Inner loops index with unsigned integers: numba wraps negative signed indices, which stops LLVM vectorising.
conv_kernel = numba.njit(parallel=True, cache=True, fastmath={"reassoc", "contract"})
pool_kernel = numba.njit(parallel=True, cache=True)


@numba.njit(cache=True)
def tap_runs(taps, dilation, pad, stride, in_size, out_size):
    """Per kernel tap along one axis, the run of outputs o whose input o * stride + tap * dilation - pad lies in
    [0, in_size): rows (first output, first input, length), unsigned (tap_span of layers/vision.py)."""
    runs = np.empty((taps, 3), dtype=np.uint64)
    for tap in range(taps):
        offset = tap * dilation - pad
        lo = max(0, (stride - 1 - offset) // stride)
        hi = min(out_size, (in_size - 1 - offset) // stride + 1)
        runs[tap, 0], runs[tap, 1], runs[tap, 2] = lo, lo * stride + offset, max(hi - lo, 0)
    return runs


@numba.njit(inline="always")
def relu(value):
    """layers/neuron.py's relu on one value: max(value, 0) (+0 for -0), NaN kept, NaN for -inf."""
    if value > 0 or value != value:
        return value
    return np.float32(np.nan) if value == -np.inf else np.float32(0)


@conv_kernel
def bias_relu(y, bias, residual, add_bias, add_residual, fused_relu):
    """y[n, o] += bias[o] when add_bias, then += residual[n, o] when add_residual (an Eltwise sum fused into
    the convolution), then through relu when fused_relu: a convolution's epilogue in one pass over its top (num,
    outputs, positions), where numpy needs one for each sum and two for the ReLU. residual must not overlap y
    (LLVM vectorises the loop only when it does not)."""
    num, outputs, length = y.shape
    for plane in prange(num * outputs):
        n, o = plane // outputs, plane % outputs
        row, extra, shift = y[n, o], residual[n, o], bias[o]
        for i in range(length):
            value = row[i] + shift if add_bias else row[i]
            value = value + extra[i] if add_residual else value
            row[i] = relu(value) if fused_relu else value


@conv_kernel
def depthwise_forward(x, weight, bias, y, sh, sw, ph, pw, dh, dw, fused_relu):
    """y[n, o] = bias[o] + the correlation of x[n, o // multiplier] with weight[o] (KH, KW), through relu when
    fused_relu (each plane while it is in cache, not a pass over the blob after).

    Each tap is one long contiguous multiply-add, not one short run per output row (MobileNet's 14x14 and 7x7
    planes): the zero-padded input plane is split into stride_h x stride_w phase planes, phase (a, b) holding
    padded[i * stride_h + a, j * stride_w + b], rows qw wide, so that every tap reads one phase at one offset for
    all outputs at once; the qw - out_w extra columns per row are computed and dropped. Per output, the same
    operations in the same order as a direct loop (the bias, then the taps row by row, padding adding w * 0)."""
    num, channels, height, width = x.shape
    outputs, out_h, out_w = y.shape[1], y.shape[2], y.shape[3]
    kh, kw = weight.shape[1], weight.shape[2]
    multiplier = outputs // channels
    qh = out_h + ((kh - 1) * dh) // sh + 1  # one more row: the last taps read up to qw - out_w past the end
    qw = out_w + ((kw - 1) * dw) // sw
    span = uint64(out_h * qw)
    for o in prange(outputs):
        phases = np.zeros((sh * sw, qh * qw), dtype=np.float32)  # padding cells stay 0: only the image is copied
        total = np.empty(out_h * qw, dtype=np.float32)
        w = weight[o]
        for n in range(num):
            image = x[n, o // multiplier]
            for a in range(sh):
                for b in range(sw):
                    phase = phases[a * sw + b]
                    first = max(0, (pw - b + sw - 1) // sw)  # the phase's columns that lie in the image
                    count = uint64(max(min(qw, (width - 1 + pw - b) // sw + 1) - first, 0))
                    for i in range(qh):
                        row = i * sh + a - ph
                        if 0 <= row < height:
                            source, target = image[row], uint64(i * qw + first)
                            start, step = uint64(first * sw + b - pw), uint64(sw)
                            for j in range(count):
                                phase[target + j] = source[start + j * step]
            total[:] = bias[o]
            for ky in range(kh):
                for kx in range(kw):
                    phase = phases[((ky * dh) % sh) * sw + (kx * dw) % sw]
                    offset, value = uint64(((ky * dh) // sh) * qw + (kx * dw) // sw), w[ky, kx]
                    for q in range(span):
                        total[q] += value * phase[q + offset]
            out = y[n, o]
            for oy in range(out_h):
                line, start = out[oy], uint64(oy * qw)
                if fused_relu:
                    for ox in range(uint64(out_w)):
                        line[ox] = relu(total[start + ox])
                else:
                    for ox in range(uint64(out_w)):
                        line[ox] = total[start + ox]


@conv_kernel
def depthwise_backward_data(dy, weight, dx, sh, sw, ph, pw, dh, dw):
    """dx[n, c] = the sum over the outputs o of channel c (o // multiplier == c) of dy[n, o] spread back
    through weight[o]."""
    num, channels, height, width = dx.shape
    outputs, out_h, out_w = dy.shape[1], dy.shape[2], dy.shape[3]
    multiplier, step = outputs // channels, uint64(sw)
    runs = tap_runs(weight.shape[2], dw, pw, sw, width, out_w)
    for plane in prange(num * channels):
        n, c = plane // channels, plane % channels
        image = dx[n, c]
        image[:] = 0
        for o in range(c * multiplier, (c + 1) * multiplier):
            grad, w = dy[n, o], weight[o]
            for oy in range(out_h):
                row = grad[oy]
                for ky in range(w.shape[0]):
                    iy = oy * sh - ph + ky * dh
                    if 0 <= iy < height:
                        target = image[iy]
                        for kx in range(w.shape[1]):
                            first, start, count = runs[kx, 0], runs[kx, 1], runs[kx, 2]
                            value = w[ky, kx]
                            for i in range(count):
                                target[start + i * step] += value * row[first + i]


@conv_kernel
def depthwise_backward_weight(x, dy, dweight, dbias, sh, sw, ph, pw, dh, dw):
    """dweight[o] += the correlation of dy[:, o] with x[:, o // multiplier]; dbias[o] += the sum of dy[:, o]
    where dbias has entries. Sums over an output row in float32, over the rows in float64."""
    num, channels, height, width = x.shape
    outputs, out_h, out_w = dy.shape[1], dy.shape[2], dy.shape[3]
    multiplier, step = outputs // channels, uint64(sw)
    kh, kw = dweight.shape[1], dweight.shape[2]
    runs = tap_runs(kw, dw, pw, sw, width, out_w)
    for o in prange(outputs):
        total = np.zeros((kh, kw))
        bias_total = 0.0
        for n in range(num):
            image, grad = x[n, o // multiplier], dy[n, o]
            for oy in range(out_h):
                row = grad[oy]
                bias_total += row.sum()
                for ky in range(kh):
                    iy = oy * sh - ph + ky * dh
                    if 0 <= iy < height:
                        source = image[iy]
                        for kx in range(kw):
                            first, start, count = runs[kx, 0], runs[kx, 1], runs[kx, 2]
                            partial = np.float32(0)
                            for i in range(count):
                                partial += row[first + i] * source[start + i * step]
                            total[ky, kx] += partial
        for ky in range(kh):
            for kx in range(kw):
                dweight[o, ky, kx] += np.float32(total[ky, kx])
        if dbias.size:
            dbias[o] += np.float32(bias_total)


@pool_kernel
def im2col_batch_outer(x, col, sh, sw, ph, pw, dh, dw):
    """col (C, KH, KW, num, OH, OW) = im2col's batch-outer columns of x (num, C, H, W): each tap's window of
    each sample, row by row, zero where it reads padding. One pass of contiguous runs over the output rows
    (numpy's path pads the whole input first, then copies one window per tap, a Python step each)."""
    num, channels, height, width = x.shape
    kh, kw, out_h, out_w = col.shape[1], col.shape[2], col.shape[4], col.shape[5]
    runs = tap_runs(kw, dw, pw, sw, width, out_w)
    step = uint64(sw)
    for c in prange(channels):
        for ky in range(kh):
            for kx in range(kw):
                first, begin, count = runs[kx, 0], uint64(runs[kx, 1]), uint64(runs[kx, 2])
                for n in range(num):
                    image, target = x[n, c], col[c, ky, kx, n]
                    for oy in range(out_h):
                        line, row = target[oy], oy * sh - ph + ky * dh
                        if row < 0 or row >= height:
                            line[:] = 0
                            continue
                        source = image[row]
                        line[:first] = 0
                        for i in range(count):
                            line[first + i] = source[begin + i * step]
                        line[first + count:] = 0


@pool_kernel
def col2im_batch_last(col, padded, sh, sw, dh, dw):
    """padded (C, H + 2 pad_h, W + 2 pad_w, num), zeros, += im2col's batch-innermost columns col (C, KH, KW, OH,
    OW, num) summed back into the cells their windows read: tap by tap in row-major order, as the numpy path
    adds them (the same bits), each output position's num samples one contiguous run (with stride 1, a whole
    output row's)."""
    channels, kh, kw, out_h, out_w, num = col.shape
    run = uint64(out_w * num) if sw == 1 else uint64(num)
    for c in prange(channels):
        plane = padded[c]
        for ky in range(kh):
            for kx in range(kw):
                for oy in range(out_h):
                    source = col[c, ky, kx, oy].reshape(-1)
                    target = plane[oy * sh + ky * dh].reshape(-1)
                    for ox in range(1 if sw == 1 else out_w):
                        begin, at = uint64((ox * sw + kx * dw) * num), uint64(ox * num)
                        for i in range(run):
                            target[begin + i] += source[at + i]


@pool_kernel
def lrn_across_scale(x, size, factor, offset, scale):
    """scale = offset + factor * the sum of x^2 over the `size` channels centred on each (zero past the edges),
    for x and scale (num, channels, positions): the arithmetic of layers/vision.py's numpy path (float32 squares
    summed in window order from zero, times factor, plus offset, no fused multiply-adds), so the same bits, in
    one pass that reads the window's channels from the cache."""
    num, channels, positions = x.shape
    half = (size - 1) // 2
    for plane in prange(num * channels):
        n, c = plane // channels, plane % channels
        out = scale[n, c]
        out[:] = 0
        for source in range(max(c - half, 0), min(c + half + 1, channels)):
            values = x[n, source]
            for i in range(positions):
                out[i] += values[i] * values[i]
        for i in range(positions):
            out[i] = out[i] * factor + offset


@pool_kernel
def max_pool_forward(x, y, kh, kw, sh, sw, ph, pw, start):
    """y = each window's maximum by Caffe's rule: from `start` (-FLT_MAX), a cell replaces the value only when it
    is greater (NaN and -inf never do; a window over padding only keeps start). The rule is a maximum over start
    and the window's non-NaN cells, so it is taken along the window rows first, then per kernel column over the
    run of outputs that column reaches (tap_runs), both in contiguous vectorised loops."""
    num, channels, height, width = x.shape
    out_h, out_w = y.shape[2], y.shape[3]
    step = uint64(sw)
    runs = tap_runs(kw, 1, pw, sw, width, out_w)
    for plane in prange(num * channels):
        n, c = plane // channels, plane % channels
        image, out = x[n, c], y[n, c]
        column_max = np.empty(width, dtype=np.float32)
        for oy in range(out_h):
            first_row = oy * sh - ph
            column_max[:] = start
            for iy in range(max(first_row, 0), min(first_row + kh, height)):
                row = image[iy]
                for i in range(width):
                    value = row[i]
                    column_max[i] = value if value > column_max[i] else column_max[i]
            target = out[oy]
            target[:] = start
            for kx in range(kw):
                first, begin, count = runs[kx, 0], runs[kx, 1], runs[kx, 2]
                for i in range(count):
                    value = column_max[begin + i * step]
                    target[first + i] = value if value > target[first + i] else target[first + i]


@pool_kernel
def max_pool_forward_argmax(x, y, window_argmax, kh, kw, sh, sw, ph, pw, start):
    """max_pool_forward's values, and in window_argmax the row-major tap index of each window's first maximum
    (Caffe's tie rule). The columns are reduced first, each keeping the first row of its maximum; along the row
    of columns a maximum replaces the current one when it is greater, or equal with a lower tap index, which
    picks the tap that comes first in row-major order. A window left at `start` has no maximum (Caffe's argmax
    is -1 there): the caller checks for those."""
    num, channels, height, width = x.shape
    out_h, out_w = y.shape[2], y.shape[3]
    step = uint64(sw)
    runs = tap_runs(kw, 1, pw, sw, width, out_w)
    for plane in prange(num * channels):
        n, c = plane // channels, plane % channels
        image, out, argmax = x[n, c], y[n, c], window_argmax[n, c]
        column_max = np.empty(width, dtype=np.float32)
        column_tap = np.empty(width, dtype=np.int32)   # the row of each column's maximum, as a tap index
        for oy in range(out_h):
            first_row = oy * sh - ph
            column_max[:] = start
            column_tap[:] = 0
            for iy in range(max(first_row, 0), min(first_row + kh, height)):
                row, row_tap = image[iy], np.int32((iy - first_row) * kw)
                for i in range(uint64(width)):
                    value, current = row[i], column_max[i]
                    better = value > current
                    column_max[i] = value if better else current
                    column_tap[i] = row_tap if better else column_tap[i]
            target, index = out[oy], argmax[oy]
            target[:] = start
            index[:] = 0
            for kx in range(kw):
                first, begin, count = runs[kx, 0], runs[kx, 1], runs[kx, 2]
                for i in range(count):
                    value, current, old = column_max[begin + i * step], target[first + i], index[first + i]
                    tap = column_tap[begin + i * step] + kx
                    better = (value > current) | ((value == current) & (tap < old))
                    target[first + i] = value if better else current
                    index[first + i] = tap if better else old


@pool_kernel
def max_pool_backward(dy, window_argmax, dx, kh, kw, sh, sw, ph, pw):
    """dx = 0, plus each dy at its window's maximum: window_argmax holds its row-major tap index (the numpy
    forward's, Caffe's first-maximum rule; every window has a real maximum there), turned into an offset in the
    plane by a table (no division per output). The outputs are visited last to first, so that a cell shared by
    windows sums in the numpy path's order (by tap) to the same bits."""
    num, channels, height, width = dx.shape
    out_h, out_w = dy.shape[2], dy.shape[3]
    tap_offset = np.empty(kh * kw, dtype=np.int64)
    for tap in range(kh * kw):
        tap_offset[tap] = tap // kw * width + tap % kw
    for plane in prange(num * channels):
        n, c = plane // channels, plane % channels
        image, grad, taps = dx[n, c].reshape(-1), dy[n, c], window_argmax[n, c]
        image[:] = 0
        for oy in range(out_h - 1, -1, -1):
            corner = (oy * sh - ph) * width - pw
            for ox in range(out_w - 1, -1, -1):
                image[uint64(corner + ox * sw + tap_offset[taps[oy, ox]])] += grad[oy, ox]


# Winograd F(4x4, 3x3) (Lavin & Gray, interpolation points 0, 1, -1, 2, -2): a 3x3 stride-1 convolution of a
# 6x6 input tile d gives the 4x4 output tile A^T [(G w G^T) * (B^T d B)] A, 36 products where direct needs 144.
# B^T and A^T have small integer entries, written out below; G (fractions) is applied in float64 by the caller.
@numba.njit(inline="always", fastmath={"reassoc", "contract"})
def winograd_bt(i, d0, d1, d2, d3, d4, d5):
    """Row i of B^T (6 x 6) times the column (d0 .. d5)."""
    if i == 0:
        return 4 * d0 - 5 * d2 + d4
    if i == 1:
        return d3 + d4 - 4 * (d1 + d2)
    if i == 2:
        return 4 * (d1 - d2) - d3 + d4
    if i == 3:
        return 2 * (d3 - d1) - d2 + d4
    if i == 4:
        return 2 * (d1 - d3) - d2 + d4
    return 4 * d1 - 5 * d3 + d5


@numba.njit(inline="always", fastmath={"reassoc", "contract"})
def winograd_at(i, m0, m1, m2, m3, m4, m5):
    """Row i of A^T (4 x 6) times the column (m0 .. m5)."""
    if i == 0:
        return m0 + m1 + m2 + m3 + m4
    if i == 1:
        return m1 - m2 + 2 * (m3 - m4)
    if i == 2:
        return m1 + m2 + 4 * (m3 + m4)
    return m1 - m2 + 8 * (m3 - m4) + m5


@conv_kernel
def winograd_input(padded, transformed):
    """transformed[6 i + j, c, tile] = (B^T d B)[i, j] for each 6x6 tile d of the zero-bordered planes padded
    (num, C, 4 tiles_h + 2, 4 tiles_w + 2), tiles 4 apart, tile = (n * tiles_h + ty) * tiles_w + tx. B^T goes
    down the tile rows over the whole plane width first, then along each row, both as vectorised loops."""
    num, channels, height, width = padded.shape
    tiles_h, tiles_w = (height - 2) // 4, uint64((width - 2) // 4)
    for plane in prange(num * channels):
        n, c = plane // channels, plane % channels
        image = padded[n, c]
        rows = np.empty((6, width), dtype=np.float32)
        for ty in range(tiles_h):
            y = 4 * ty
            d0, d1, d2, d3, d4, d5 = image[y], image[y + 1], image[y + 2], image[y + 3], image[y + 4], image[y + 5]
            for i in range(6):
                row = rows[i]
                for x in range(uint64(width)):
                    row[x] = winograd_bt(i, d0[x], d1[x], d2[x], d3[x], d4[x], d5[x])
            first = uint64((n * tiles_h + ty)) * tiles_w
            for i in range(6):
                row = rows[i]
                for j in range(6):
                    target = transformed[6 * i + j, c]
                    for tx in range(tiles_w):
                        x = 4 * tx
                        target[first + tx] = winograd_bt(j, row[x], row[x + 1], row[x + 2], row[x + 3], row[x + 4],
                                                         row[x + 5])


@conv_kernel
def winograd_output(product, bias, y, fused_relu):
    """y[n, o] = bias[o] + A^T m A for each tile's 6x6 m = product[:, o, tile] (winograd_input's tiles), the
    tiles' rows and columns past y's edge dropped; through relu when fused_relu."""
    num, outputs, out_h, out_w = y.shape
    tiles_h, tiles_w = (out_h + 3) // 4, uint64((out_w + 3) // 4)
    for plane in prange(num * outputs):
        n, o = plane // outputs, plane % outputs
        out, shift = y[n, o], bias[o]
        half = np.empty((24, tiles_w), dtype=np.float32)  # A^T m: 4 rows x 6 columns per tile
        for ty in range(tiles_h):
            first = uint64((n * tiles_h + ty)) * tiles_w
            for j in range(6):
                m0, m1, m2 = product[j, o], product[6 + j, o], product[12 + j, o]
                m3, m4, m5 = product[18 + j, o], product[24 + j, o], product[30 + j, o]
                for i in range(4):
                    row = half[6 * i + j]
                    for tx in range(tiles_w):
                        t = first + tx
                        row[tx] = winograd_at(i, m0[t], m1[t], m2[t], m3[t], m4[t], m5[t])
            for i in range(min(4, out_h - 4 * ty)):
                line = out[4 * ty + i]
                h0, h1, h2, h3, h4, h5 = half[6 * i], half[6 * i + 1], half[6 * i + 2], half[6 * i + 3], \
                    half[6 * i + 4], half[6 * i + 5]
                for j in range(4):
                    column = uint64(j)
                    for tx in range(uint64((out_w - j + 3) // 4)):
                        value = shift + winograd_at(j, h0[tx], h1[tx], h2[tx], h3[tx], h4[tx], h5[tx])
                        line[4 * tx + column] = relu(value) if fused_relu else value
