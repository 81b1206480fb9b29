// Kernels of the vision layers (Convolution, Deconvolution, Im2col, Pooling, SPP, Crop, LRN) and InnerProduct's bias.
//
// Every launch covers the whole batch: one work-item per output element unless a kernel says otherwise, with
// the fastest-varying index on the innermost (contiguous) axis so that neighbouring work-items touch
// neighbouring addresses. `total` is the number of work-items that do work (the launch is rounded up to the
// work-group size). Array arguments come with an offset in floats (views of a bigger buffer).
//
// Compile-time setting (-D): SUM_GROUP, the work-group size of the reductions channel_sum and
// depthwise_weight_gradient (a power of two).

// -- convolution ------------------------------------------------------------------------------------------
// The column matrix of a batch of N images: tap (i, j) of channel c is row (c * KH + i) * KW + j, and output
// position (oh, ow) of sample n is column oh * OW + ow of that sample; element (row, n, position) lies at
// row * row_stride + n * sample_stride + position. Convolutions keep the samples side by side in one
// (C * KH * KW) x (N * OH * OW) matrix (row_stride N * OH * OW, sample_stride OH * OW); the Im2col layer gives
// each sample its own (C * KH * KW) x (OH * OW) block (row_stride OH * OW, sample_stride C * KH * KW * OH * OW).
// Taps that fall in the padding are 0. One work-item per (c, n, oh, ow) writes its KH * KW taps.
#define CONV_GEOMETRY const int N, const int C, const int H, const int W, const int KH, const int KW, \
                      const int pad_h, const int pad_w, const int stride_h, const int stride_w, \
                      const int dil_h, const int dil_w, const int OH, const int OW
#define TRANSFORM_GEOMETRY CONV_GEOMETRY, const int row_stride, const int sample_stride

// The coordinates (a, b, y, x) of element idx of a row-major (A, B, Y, X) array.
#define UNRAVEL(idx, B, Y, X, a, b, y, x) \
    const int x = (idx) % (X); \
    const int y = (idx) / (X) % (Y); \
    const int b = (idx) / ((X) * (Y)) % (B); \
    const int a = (idx) / ((X) * (Y) * (B))

// Runs BODY for every tap (i, j) and output position (oh, ow) whose window reads image element (h, w).
#define FOR_COVERING_TAPS(h, w, BODY) \
    for (int i = 0; i < KH; ++i) { \
        const int th = (h) + pad_h - i * dil_h; /* oh * stride_h when tap i of output row oh reads row h */ \
        if (th < 0 || th % stride_h || th / stride_h >= OH) \
            continue; \
        const int oh = th / stride_h; \
        for (int j = 0; j < KW; ++j) { \
            const int tw = (w) + pad_w - j * dil_w; \
            if (tw >= 0 && tw % stride_w == 0 && tw / stride_w < OW) { \
                const int ow = tw / stride_w; \
                BODY; \
            } \
        } \
    }

__kernel void im2col(const int total, __global const float* im, const int im_off, TRANSFORM_GEOMETRY,
                     __global float* col, const int col_off) {
    const int idx = get_global_id(0);
    if (idx >= total)
        return;
    UNRAVEL(idx, N, OH, OW, c, n, oh, ow);
    __global float* out = col + col_off + (c * KH * KW) * row_stride + n * sample_stride + oh * OW + ow;
    __global const float* plane = im + im_off + (n * C + c) * H * W;
    const int h0 = oh * stride_h - pad_h, w0 = ow * stride_w - pad_w;
    for (int i = 0; i < KH; ++i) {
        const int h = h0 + i * dil_h;
        const bool row_inside = h >= 0 && h < H;
        for (int j = 0; j < KW; ++j) {
            const int w = w0 + j * dil_w;
            *out = (row_inside && w >= 0 && w < W) ? plane[h * W + w] : 0.0f;
            out += row_stride;
        }
    }
}

// The adjoint of im2col: one work-item per image element (n, c, h, w) gathers the column entries of every
// tap that read it (no atomics), and overwrites the image.
__kernel void col2im(const int total, __global const float* col, const int col_off, TRANSFORM_GEOMETRY,
                     __global float* im, const int im_off) {
    const int idx = get_global_id(0);
    if (idx >= total)
        return;
    UNRAVEL(idx, C, H, W, n, c, h, w);
    __global const float* sample = col + col_off + n * sample_stride;
    float sum = 0.0f;
    FOR_COVERING_TAPS(h, w, sum += sample[((c * KH + i) * KW + j) * row_stride + oh * OW + ow]);
    im[im_off + idx] = sum;
}

// rows (O, N * L) = x (N, O, L) with the channel axis first (a convolution's top diff as its GEMMs take it).
__kernel void nchw_to_rows(const int total, __global const float* x, const int x_off,
                           const int N, const int O, const int L, __global float* rows, const int rows_off) {
    const int idx = get_global_id(0);
    if (idx >= total)
        return;
    const int l = idx % L;
    const int rest = idx / L;
    const int n = rest % N;
    const int o = rest / N;
    rows[rows_off + idx] = x[x_off + (n * O + o) * L + l];
}

// The sum of every work-item's v over a SUM_GROUP work-group, a tree sum in `scratch` (SUM_GROUP floats of
// local memory): valid in work-item 0. The same order on every run (no atomics).
inline float group_sum(__local float* scratch, const float v) {
    const int lid = get_local_id(0);
    scratch[lid] = v;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int stride = SUM_GROUP / 2; stride > 0; stride >>= 1) {
        if (lid < stride)
            scratch[lid] += scratch[lid + stride];
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    return scratch[0];
}

// out[o] += the sum of x (N, O, L) over n and l: one work-group per channel o.
__kernel __attribute__((reqd_work_group_size(SUM_GROUP, 1, 1)))
void channel_sum(const int N, const int O, const int L, __global const float* x, const int x_off,
                 __global float* out, const int out_off) {
    __local float scratch[SUM_GROUP];
    const int o = get_group_id(0), lid = get_local_id(0);
    float v = 0.0f;
    for (int i = lid; i < N * L; i += SUM_GROUP) {
        const int n = i / L, l = i - n * L;
        v += x[x_off + (n * O + o) * L + l];
    }
    v = group_sum(scratch, v);
    if (lid == 0)
        out[out_off + o] += v;
}

// -- depthwise convolution --------------------------------------------------------------------------------
// Each of the C image channels (N, C, H, W) has its own M filters of KH x KW taps (weights (C * M, KH, KW)):
// output channel o of the rows (N, C * M, OH, OW) convolves image channel o / M (M = 1: depthwise; M > 1:
// a channel multiplier). Geometry as im2col's. Convolution's forward and Deconvolution's bottom diff are
// depthwise_conv, the other way depthwise_conv_transposed; both add bias[channel] when has_bias (bias may be
// any buffer otherwise).

// One work-item per output value (n, o, oh, ow).
__kernel void depthwise_conv(const int total, __global const float* im, const int im_off,
                             __global const float* weight, const int weight_off, const int has_bias,
                             __global const float* bias, const int bias_off, CONV_GEOMETRY, const int M,
                             __global float* rows, const int rows_off) {
    const int idx = get_global_id(0);
    if (idx >= total)
        return;
    UNRAVEL(idx, C * M, OH, OW, n, o, oh, ow);
    __global const float* plane = im + im_off + (n * C + o / M) * H * W;
    __global const float* filter = weight + weight_off + o * KH * KW;
    const int h0 = oh * stride_h - pad_h, w0 = ow * stride_w - pad_w;
    float sum = 0.0f;
    for (int i = 0; i < KH; ++i) {
        const int h = h0 + i * dil_h;
        if (h < 0 || h >= H)
            continue;
        for (int j = 0; j < KW; ++j) {
            const int w = w0 + j * dil_w;
            if (w >= 0 && w < W)
                sum += filter[i * KW + j] * plane[h * W + w];
        }
    }
    rows[rows_off + idx] = has_bias ? sum + bias[bias_off + o] : sum;
}

// The adjoint: one work-item per image value (n, c, h, w) gathers, over its channel's M filters, the outputs
// whose windows cover it (as col2im; no atomics), and overwrites the image.
__kernel void depthwise_conv_transposed(const int total, __global const float* rows, const int rows_off,
                                        __global const float* weight, const int weight_off, const int has_bias,
                                        __global const float* bias, const int bias_off, CONV_GEOMETRY,
                                        const int M, __global float* im, const int im_off) {
    const int idx = get_global_id(0);
    if (idx >= total)
        return;
    UNRAVEL(idx, C, H, W, n, c, h, w);
    float sum = 0.0f;
    for (int o = c * M; o < (c + 1) * M; ++o) {
        __global const float* plane = rows + rows_off + (n * C * M + o) * OH * OW;
        __global const float* filter = weight + weight_off + o * KH * KW;
        FOR_COVERING_TAPS(h, w, sum += filter[i * KW + j] * plane[oh * OW + ow]);
    }
    im[im_off + idx] = has_bias ? sum + bias[bias_off + c] : sum;
}

// weight_diff[o, i, j] += the sum over samples and output positions of rows[n, o, oh, ow] times the image
// value tap (i, j) of that output reads: one work-group per weight value, a tree sum (deterministic).
__kernel __attribute__((reqd_work_group_size(SUM_GROUP, 1, 1)))
void depthwise_weight_gradient(__global const float* rows, const int rows_off, __global const float* im,
                               const int im_off, CONV_GEOMETRY, const int M, __global float* weight_diff,
                               const int diff_off) {
    __local float scratch[SUM_GROUP];
    const int tap = get_group_id(0), lid = get_local_id(0);
    const int j = tap % KW, i = tap / KW % KH, o = tap / (KH * KW);
    const int positions = OH * OW;
    const int dh = i * dil_h - pad_h, dw = j * dil_w - pad_w;
    float v = 0.0f;
    for (int p = lid; p < N * positions; p += SUM_GROUP) {
        const int n = p / positions, q = p - n * positions;
        const int oh = q / OW, ow = q - oh * OW;
        const int h = oh * stride_h + dh, w = ow * stride_w + dw;
        if (h >= 0 && h < H && w >= 0 && w < W)
            v += rows[rows_off + (n * C * M + o) * positions + q] * im[im_off + ((n * C + o / M) * H + h) * W + w];
    }
    v = group_sum(scratch, v);
    if (lid == 0)
        weight_diff[diff_off + tap] += v;
}

// y[i] += bias[(i / inner) % O] (InnerProduct: inner = 1).
__kernel void add_bias(const int total, __global float* y, const int y_off,
                       __global const float* bias, const int bias_off, const int O, const int inner) {
    const int idx = get_global_id(0);
    if (idx < total)
        y[y_off + idx] += bias[bias_off + (idx / inner) % O];
}

// -- pooling ----------------------------------------------------------------------------------------------
// Window (ph, pw) covers input rows [ph * SH - PAD_H, + KH) and columns likewise; the arguments after the
// arrays are always H, W, PH, PW, KH, KW, SH, SW, PAD_H, PAD_W (input size, pooled size, kernel, stride, pad).
#define POOL_GEOMETRY const int H, const int W, const int PH, const int PW, const int KH, const int KW, \
                      const int SH, const int SW, const int PAD_H, const int PAD_W

// Pooled output idx: its plane and (ph, pw), its window clipped to the input, rows [hstart, hend) and columns
// [wstart, wend), and p, its input plane in x. pad_h, pad_w: PAD_H, PAD_W, or 0 for stochastic pooling.
#define POOLED_WINDOW(idx, x, pad_h, pad_w) \
    const int pw = (idx) % PW; \
    const int ph = ((idx) / PW) % PH; \
    const int plane = (idx) / (PW * PH); \
    const int hstart = max(ph * SH - (pad_h), 0), hend = min(ph * SH - (pad_h) + KH, H); \
    const int wstart = max(pw * SW - (pad_w), 0), wend = min(pw * SW - (pad_w) + KW, W); \
    __global const float* p = (x) + plane * H * W

// One work-item per output: strict > in row-major order, so ties go to the first maximum and NaN never wins
// (a window of NaNs only gives -FLT_MAX and index -1). The flat index h * W + w goes to `mask`, and to
// `top_mask` as a float when write_top_mask.
__kernel void max_pool_forward(const int total, __global const float* x, const int x_off, POOL_GEOMETRY,
                               __global float* y, const int y_off, __global int* mask,
                               const int write_top_mask, __global float* top_mask, const int top_mask_off) {
    const int idx = get_global_id(0);
    if (idx >= total)
        return;
    POOLED_WINDOW(idx, x + x_off, PAD_H, PAD_W);
    float best = -FLT_MAX;
    int best_index = -1;
    for (int h = hstart; h < hend; ++h)
        for (int w = wstart; w < wend; ++w)
            if (p[h * W + w] > best) {
                best = p[h * W + w];
                best_index = h * W + w;
            }
    y[y_off + idx] = best;
    mask[idx] = best_index;
    if (write_top_mask)
        top_mask[top_mask_off + idx] = (float)best_index;
}

// The first and one-past-last windows along an axis that cover input position `at` (padding included).
#define COVERING(at, K, S, P, first, last) \
    const int first = ((at) < (K)) ? 0 : ((at) - (K)) / (S) + 1; \
    const int last = min((at) / (S) + 1, P)

// Input element idx: its plane and (h, w), and the windows [phstart, phend) x [pwstart, pwend) that cover it.
#define COVERING_WINDOWS(idx, pad_h, pad_w) \
    const int w = (idx) % W; \
    const int h = ((idx) / W) % H; \
    const int plane = (idx) / (W * H); \
    COVERING(h + (pad_h), KH, SH, PH, phstart, phend); \
    COVERING(w + (pad_w), KW, SW, PW, pwstart, pwend)

// One work-item per input element: the top diffs of the windows whose argmax it is.
__kernel void max_pool_backward(const int total, __global const float* dy, const int dy_off,
                                __global const int* mask, POOL_GEOMETRY, __global float* dx, const int dx_off) {
    const int idx = get_global_id(0);
    if (idx >= total)
        return;
    COVERING_WINDOWS(idx, PAD_H, PAD_W);
    const int offset = plane * PH * PW;
    const int index = h * W + w;
    float sum = 0.0f;
    for (int ph = phstart; ph < phend; ++ph)
        for (int pw = pwstart; pw < pwend; ++pw)
            if (mask[offset + ph * PW + pw] == index)
                sum += dy[dy_off + offset + ph * PW + pw];
    dx[dx_off + idx] = sum;
}

// Caffe's divisor: the window clipped to the padded input (padding counts, the overhang beyond it does not).
inline int ave_pool_size(int ph, int pw, POOL_GEOMETRY) {
    const int hstart = ph * SH - PAD_H, wstart = pw * SW - PAD_W;
    return (min(hstart + KH, H + PAD_H) - hstart) * (min(wstart + KW, W + PAD_W) - wstart);
}

__kernel void ave_pool_forward(const int total, __global const float* x, const int x_off, POOL_GEOMETRY,
                               __global float* y, const int y_off) {
    const int idx = get_global_id(0);
    if (idx >= total)
        return;
    POOLED_WINDOW(idx, x + x_off, PAD_H, PAD_W);
    float sum = 0.0f;
    for (int h = hstart; h < hend; ++h)
        for (int w = wstart; w < wend; ++w)
            sum += p[h * W + w];
    y[y_off + idx] = sum / ave_pool_size(ph, pw, H, W, PH, PW, KH, KW, SH, SW, PAD_H, PAD_W);
}

__kernel void ave_pool_backward(const int total, __global const float* dy, const int dy_off, POOL_GEOMETRY,
                                __global float* dx, const int dx_off) {
    const int idx = get_global_id(0);
    if (idx >= total)
        return;
    COVERING_WINDOWS(idx, PAD_H, PAD_W);
    __global const float* d = dy + dy_off + plane * PH * PW;
    float sum = 0.0f;
    for (int ph = phstart; ph < phend; ++ph)
        for (int pw = pwstart; pw < pwend; ++pw)
            sum += d[ph * PW + pw] / ave_pool_size(ph, pw, H, W, PH, PW, KH, KW, SH, SW, PAD_H, PAD_W);
    dx[dx_off + idx] = sum;
}

// -- stochastic pooling (no padding: window (ph, pw) covers rows [ph * SH, min(ph * SH + KH, H)), likewise columns)
// TRAIN: u in (0, 1] from 24 random bits (exact in float); the output is the first element at which the
// running window sum reaches u * the window sum, and its flat index h * W + w goes to `index` (backward then
// runs max_pool_backward on it). Sums in row-major order, as the CPU code, so both pick the same element.
__kernel void sto_pool_forward_train(const int total, __global const float* x, const int x_off, POOL_GEOMETRY,
                                     const ulong seed, __global float* y, const int y_off, __global int* index) {
    const int idx = get_global_id(0);
    if (idx >= total)
        return;
    POOLED_WINDOW(idx, x + x_off, 0, 0);
    float window_sum = 0.0f;
    for (int h = hstart; h < hend; ++h)
        for (int w = wstart; w < wend; ++w)
            window_sum += p[h * W + w];
    const float u = (float)((counter_bits(seed, (ulong)idx) >> 8) + 1u) * (1.0f / 16777216.0f);
    const float threshold = u * window_sum;
    float running = 0.0f, value = 0.0f;
    int chosen = -1;  // stays -1 only for a window with NaN
    for (int h = hstart; h < hend && chosen < 0; ++h)
        for (int w = wstart; w < wend && chosen < 0; ++w) {
            running += p[h * W + w];
            if (running >= threshold) {
                chosen = h * W + w;
                value = p[chosen];
            }
        }
    y[y_off + idx] = value;
    index[idx] = chosen;
}

// TEST: sum(x^2) / sum(x), the sum starting at FLT_MIN (never 0 / 0); the sum is kept for backward.
__kernel void sto_pool_forward_test(const int total, __global const float* x, const int x_off, POOL_GEOMETRY,
                                    __global float* y, const int y_off, __global float* sums) {
    const int idx = get_global_id(0);
    if (idx >= total)
        return;
    POOLED_WINDOW(idx, x + x_off, 0, 0);
    float window_sum = FLT_MIN, squares = 0.0f;
    for (int h = hstart; h < hend; ++h)
        for (int w = wstart; w < wend; ++w) {
            const float v = p[h * W + w];
            window_sum += v;
            squares += v * v;
        }
    y[y_off + idx] = squares / window_sum;
    sums[idx] = window_sum;
}

// TEST backward, one work-item per input element: the sum over its windows of dy * (2 x - y) / window sum.
__kernel void sto_pool_backward_test(const int total, __global const float* x, const int x_off,
                                     __global const float* y, const int y_off, __global const float* dy,
                                     const int dy_off, __global const float* sums, POOL_GEOMETRY,
                                     __global float* dx, const int dx_off) {
    const int idx = get_global_id(0);
    if (idx >= total)
        return;
    COVERING_WINDOWS(idx, 0, 0);
    const int offset = plane * PH * PW;
    const float twice = 2.0f * x[x_off + idx];
    float sum = 0.0f;
    for (int ph = phstart; ph < phend; ++ph)
        for (int pw = pwstart; pw < pwend; ++pw) {
            const int at = offset + ph * PW + pw;
            sum += dy[dy_off + at] * (twice - y[y_off + at]) / sums[at];
        }
    dx[dx_off + idx] = sum;
}

// -- SPP and Crop ---------------------------------------------------------------------------------------------
// dst[r, dst_col0 + c] = src[r, src_col0 + c] for r < rows, c < cols (rows of src_cols / dst_cols floats): one
// pyramid level's block of each SPP output row, and back for its diff. total = rows * cols.
__kernel void copy_columns(const int total, __global const float* src, const int src_off, const int src_cols,
                           const int src_col0, __global float* dst, const int dst_off, const int dst_cols,
                           const int dst_col0, const int cols) {
    const int idx = get_global_id(0);
    if (idx >= total)
        return;
    const int r = idx / cols, c = idx % cols;
    dst[dst_off + r * dst_cols + dst_col0 + c] = src[src_off + r * src_cols + src_col0 + c];
}

// Crop, one work-item per top element: geometry holds the top's shape (D values), then bottom[0]'s strides;
// top element idx is bottom element base + sum over axes of its coordinate * stride (base: the offsets). Forward
// copies bottom -> top; backward top diff -> bottom diff (zeroed before; no two top elements share one).
__kernel void crop_copy(const int total, __global const float* src, const int src_off, __global float* dst,
                        const int dst_off, __global const int* geometry, const int D, const int base,
                        const int forward) {
    const int idx = get_global_id(0);
    if (idx >= total)
        return;
    int rest = idx, at = base;
    for (int d = D - 1; d >= 0; --d) {
        at += (rest % geometry[d]) * geometry[D + d];
        rest /= geometry[d];
    }
    if (forward)
        dst[dst_off + idx] = src[src_off + at];
    else
        dst[dst_off + at] = src[src_off + idx];
}

// -- LRN --------------------------------------------------------------------------------------------------
// ACROSS_CHANNELS: one work-item per (n, s) of the (N, C, S) blob walks the channels with a running window
// sum (add the channel entering, drop the one leaving): O(C) per work-item whatever the window size.
// scale[c] = k + alpha_over_size * sum of x^2 over channels [c - (size-1)/2, c + (size-1)/2].
__kernel void lrn_across_scale(const int total, __global const float* x, const int x_off,
                               const int C, const int S, const int size, const float alpha_over_size,
                               const float k, __global float* scale) {
    const int idx = get_global_id(0);
    if (idx >= total)
        return;
    const int base = (idx / S) * C * S + idx % S;
    __global const float* p = x + x_off + base;
    const int post = size - 1 - (size - 1) / 2;  // channels after the centre
    float accum = 0.0f;
    for (int c = 0; c < C + post; ++c) {
        if (c < C)
            accum += p[c * S] * p[c * S];
        if (c >= size)
            accum -= p[(c - size) * S] * p[(c - size) * S];
        if (c >= post)
            scale[base + (c - post) * S] = k + alpha_over_size * accum;
    }
}

// y = x * scale^-beta (both regions).
__kernel void lrn_output(const int total, __global const float* x, const int x_off, __global const float* scale,
                         const float neg_beta, __global float* y, const int y_off) {
    const int idx = get_global_id(0);
    if (idx < total)
        y[y_off + idx] = x[x_off + idx] * pow(scale[idx], neg_beta);
}

// dx = dy * scale^-beta - cache_ratio * x * (window sum over channels of dy * y / scale), with the same
// running window as lrn_across_scale.
__kernel void lrn_across_backward(const int total, __global const float* x, const int x_off,
                                  __global const float* y, const int y_off, __global const float* dy,
                                  const int dy_off, __global const float* scale, const int C, const int S,
                                  const int size, const float neg_beta, const float cache_ratio,
                                  __global float* dx, const int dx_off) {
    const int idx = get_global_id(0);
    if (idx >= total)
        return;
    const int base = (idx / S) * C * S + idx % S;
    const int post = size - 1 - (size - 1) / 2;
#define LRN_RATIO(c) (dy[dy_off + base + (c) * S] * y[y_off + base + (c) * S] / scale[base + (c) * S])
    float accum = 0.0f;
    for (int c = 0; c < C + post; ++c) {
        if (c < C)
            accum += LRN_RATIO(c);
        if (c >= size)
            accum -= LRN_RATIO(c - size);
        if (c >= post) {
            const int at = base + (c - post) * S;
            dx[dx_off + at] = dy[dy_off + at] * pow(scale[at], neg_beta) - cache_ratio * x[x_off + at] * accum;
        }
    }
#undef LRN_RATIO
}

// The sum of v (squared when `square`) over the size x size window centred on (h, w) of an H x W plane,
// zero beyond its edges.
inline float plane_window_sum(__global const float* plane, int h, int w, int H, int W, int size, bool square) {
    const int reach = (size - 1) / 2;  // positions on each side of the centre
    const int hstart = max(h - reach, 0), hend = min(h + reach + 1, H);
    const int wstart = max(w - reach, 0), wend = min(w + reach + 1, W);
    float sum = 0.0f;
    for (int i = hstart; i < hend; ++i)
        for (int j = wstart; j < wend; ++j) {
            const float v = plane[i * W + j];
            sum += square ? v * v : v;
        }
    return sum;
}

// WITHIN_CHANNEL: scale = 1 + alpha_over_area * sum of x^2 over the size x size window of the plane.
__kernel void lrn_within_scale(const int total, __global const float* x, const int x_off, const int H,
                               const int W, const int size, const float alpha_over_area, __global float* scale) {
    const int idx = get_global_id(0);
    if (idx >= total)
        return;
    const int w = idx % W, h = (idx / W) % H;
    __global const float* plane = x + x_off + (idx / (W * H)) * H * W;
    scale[idx] = 1.0f + alpha_over_area * plane_window_sum(plane, h, w, H, W, size, true);
}

// ratio = dy * y / scale, the term the backward window sum spreads.
__kernel void lrn_ratio(const int total, __global const float* y, const int y_off, __global const float* dy,
                        const int dy_off, __global const float* scale, __global float* ratio) {
    const int idx = get_global_id(0);
    if (idx < total)
        ratio[idx] = dy[dy_off + idx] * y[y_off + idx] / scale[idx];
}

__kernel void lrn_within_backward(const int total, __global const float* x, const int x_off,
                                  __global const float* dy, const int dy_off, __global const float* scale,
                                  __global const float* ratio, const int H, const int W, const int size,
                                  const float neg_beta, const float cache_ratio,
                                  __global float* dx, const int dx_off) {
    const int idx = get_global_id(0);
    if (idx >= total)
        return;
    const int w = idx % W, h = (idx / W) % H;
    __global const float* plane = ratio + (idx / (W * H)) * H * W;
    dx[dx_off + idx] = dy[dy_off + idx] * pow(scale[idx], neg_beta) -
                       cache_ratio * x[x_off + idx] * plane_window_sum(plane, h, w, H, W, size, false);
}
