// Kernels of layers/common.py: Concat's strided copy, Eltwise MAX, and Softmax's per-position passes.
// Every kernel takes the number of work-items n first, one work-item per output value or per position.

// Concat: a bottom ("part") is outer blocks of part_block values; block o sits at
// o * whole_block + block_offset in the top ("whole"). Copies part -> whole (forward) or back (backward).
__kernel void concat_copy(const int n, __global float* part, const int part_offset,
                          __global float* whole, const int whole_offset,
                          const int part_block, const int whole_block, const int block_offset, const int to_whole) {
    const int i = get_global_id(0);
    if (i >= n)
        return;
    const int k = whole_offset + (i / part_block) * whole_block + block_offset + i % part_block;
    if (to_whole)
        whole[k] = part[part_offset + i];
    else
        part[part_offset + i] = whole[k];
}

// Eltwise MAX, one bottom b at a time: b_index 1 compares bottoms 0 (a) and 1 (b), a tie going to bottom 1;
// a later bottom replaces the top only where it is strictly greater (a is unused then).
__kernel void eltwise_max_forward(const int n, __global const float* a, const int a_offset,
                                  __global const float* b, const int b_offset,
                                  __global float* top, const int top_offset,
                                  __global int* argmax, const int b_index) {
    const int i = get_global_id(0);
    if (i >= n)
        return;
    const float vb = b[b_offset + i];
    if (b_index == 1) {
        const float va = a[a_offset + i];
        top[top_offset + i] = va > vb ? va : vb;
        argmax[i] = va > vb ? 0 : 1;
    } else if (vb > top[top_offset + i]) {
        top[top_offset + i] = vb;
        argmax[i] = b_index;
    }
}

__kernel void eltwise_max_backward(const int n, __global const float* top_diff, const int top_diff_offset,
                                   __global const int* argmax, __global float* diff, const int diff_offset,
                                   const int index) {
    const int i = get_global_id(0);
    if (i < n)
        diff[diff_offset + i] = argmax[i] == index ? top_diff[top_diff_offset + i] : 0.0f;
}

// Softmax over the middle axis of (outer, channels, inner) data; one work-item per (outer, inner) position p
// walks its channels (neighbouring work-items read neighbouring values when inner > 1), the per-value kernels
// look up their position's value in `per_position`.
#define POSITION_BASE(p) (((p) / inner) * channels * inner + (p) % inner)
#define POSITION_OF(i) (((i) / (channels * inner)) * inner + (i) % inner)

// softmax of a position in one work-item: the maximum, exp(x - max) and their sum, then the division (Caffe's
// four passes, in one launch for the whole batch); x and out point at the position's first channel
inline void position_softmax(__global const float* x, __global float* out, const int channels, const int inner) {
    float m = -INFINITY;
    for (int c = 0; c < channels; ++c)
        m = fmax(m, x[c * inner]);
    float s = 0.0f;
    for (int c = 0; c < channels; ++c) {
        const float e = exp(x[c * inner] - m);
        out[c * inner] = e;
        s += e;
    }
    for (int c = 0; c < channels; ++c)
        out[c * inner] /= s;
}

__kernel void channel_softmax(const int n, __global const float* x, const int x_offset,
                              __global float* out, const int out_offset, const int channels, const int inner) {
    const int p = get_global_id(0);
    if (p < n)
        position_softmax(x + x_offset + POSITION_BASE(p), out + out_offset + POSITION_BASE(p), channels, inner);
}

__kernel void channel_sum(const int n, __global const float* x, const int x_offset,
                          __global float* per_position, const int channels, const int inner) {
    const int p = get_global_id(0);
    if (p >= n)
        return;
    x += x_offset + POSITION_BASE(p);
    float s = 0.0f;
    for (int c = 0; c < channels; ++c)
        s += x[c * inner];
    per_position[p] = s;
}

__kernel void channel_dot(const int n, __global const float* x, const int x_offset,
                          __global const float* y, const int y_offset,
                          __global float* per_position, const int channels, const int inner) {
    const int p = get_global_id(0);
    if (p >= n)
        return;
    x += x_offset + POSITION_BASE(p);
    y += y_offset + POSITION_BASE(p);
    float s = 0.0f;
    for (int c = 0; c < channels; ++c)
        s += x[c * inner] * y[c * inner];
    per_position[p] = s;
}

// out = exp(x - max of x's position)
// softmax backward: dx = (dy - dot(dy, y) of the position) * y
__kernel void channel_subtract_multiply(const int n, __global const float* dy, const int dy_offset,
                                        __global const float* y, const int y_offset,
                                        __global float* dx, const int dx_offset,
                                        __global const float* per_position, const int channels, const int inner) {
    const int i = get_global_id(0);
    if (i < n)
        dx[dx_offset + i] = (dy[dy_offset + i] - per_position[POSITION_OF(i)]) * y[y_offset + i];
}

// ---- Reductions and broadcasts over a middle axis, shared by Bias/Scale/Reduction/Embed and layers/neuron.py,
// layers/normalization.py. Data is seen as (outer, channels, inner); value v of channel c sits at
// (o * channels + c) * inner + k.

// work-items per channel in channel_reduce (a power of two; the Python side picks it by the channel's size)
#ifndef REDUCE_GROUP
#define REDUCE_GROUP 256
#endif

// The summed term of channel_reduce, chosen by `term`: x, x*y, x*y*(y <= 0) (PReLU's slope gradient, x the top
// diff and y the input), |x|, x*x.
#define TERM_X 0
#define TERM_XY 1
#define TERM_XY_NONPOSITIVE_Y 2
#define TERM_ABS 3
#define TERM_SQUARE 4

inline float reduce_term(const float a, const float b, const int term) {
    switch (term) {
        case TERM_XY: return a * b;
        case TERM_XY_NONPOSITIVE_Y: return b <= 0.0f ? a * b : 0.0f;
        case TERM_ABS: return fabs(a);
        case TERM_SQUARE: return a * a;
        default: return a;
    }
}

// out[c] = alpha * (sum over o, k of term(x, y)) + beta * out[c]; one work-group of REDUCE_GROUP work-items per
// channel, neighbouring work-items reading neighbouring k. beta == 0 does not read out (it may hold NaNs).
__kernel void channel_reduce(const int outer, const int channels, const int inner,
                             __global const float* x, const int x_offset, __global const float* y, const int y_offset,
                             __global float* out, const int out_offset, const float alpha, const float beta,
                             const int term) {
    __local float partial[REDUCE_GROUP];
    const int c = get_group_id(0);
    const int lid = get_local_id(0);
    const int total = outer * inner;
    float s = 0.0f;
    for (int j = lid; j < total; j += REDUCE_GROUP) {
        const int at = ((j / inner) * channels + c) * inner + j % inner;
        s += reduce_term(x[x_offset + at], y[y_offset + at], term);
    }
    partial[lid] = s;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int stride = REDUCE_GROUP / 2; stride > 0; stride >>= 1) {
        if (lid < stride)
            partial[lid] += partial[lid + stride];
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    if (lid == 0) {
        const float previous = beta == 0.0f ? 0.0f : beta * out[out_offset + c];
        out[out_offset + c] = alpha * partial[0] + previous;
    }
}

#define APPLY_ADD 0
#define APPLY_MULTIPLY 1
#define APPLY_SUBTRACT 2
#define APPLY_DIVIDE 3

// out[i] = x[i] (op) v[channel of i]; in place is fine
__kernel void channel_apply(const int n, __global const float* x, const int x_offset,
                            __global float* out, const int out_offset, __global const float* v, const int v_offset,
                            const int channels, const int inner, const int op) {
    const int i = get_global_id(0);
    if (i >= n)
        return;
    const float a = x[x_offset + i];
    const float b = v[v_offset + (i / inner) % channels];
    float r;
    switch (op) {
        case APPLY_ADD: r = a + b; break;
        case APPLY_MULTIPLY: r = a * b; break;
        case APPLY_SUBTRACT: r = a - b; break;
        default: r = a / b; break;
    }
    out[out_offset + i] = r;
}

// Tile: the bottom is (outer, inner); the top (outer, tiles, inner). One work-item per top value.
__kernel void tile_forward(const int n, __global const float* x, const int x_offset,
                           __global float* y, const int y_offset, const int tiles, const int inner) {
    const int i = get_global_id(0);
    if (i < n)
        y[y_offset + i] = x[x_offset + (i / (tiles * inner)) * inner + i % inner];
}

// One work-item per bottom value sums its tiles' diffs.
__kernel void tile_backward(const int n, __global const float* dy, const int dy_offset,
                            __global float* dx, const int dx_offset, const int tiles, const int inner) {
    const int i = get_global_id(0);
    if (i >= n)
        return;
    const int base = dy_offset + (i / inner) * tiles * inner + i % inner;
    float s = 0.0f;
    for (int t = 0; t < tiles; ++t)
        s += dy[base + t * inner];
    dx[dx_offset + i] = s;
}

#define REDUCTION_SUM 1
#define REDUCTION_ASUM 2
#define REDUCTION_SUMSQ 3
#define REDUCTION_MEAN 4

// Reduction backward over rows of `dim` values: dx = coeff * dy[row] * (1, sign(x) or 2x by operation)
__kernel void reduction_backward(const int n, __global const float* x, const int x_offset,
                                 __global const float* dy, const int dy_offset,
                                 __global float* dx, const int dx_offset, const int dim, const float coeff,
                                 const int op) {
    const int i = get_global_id(0);
    if (i >= n)
        return;
    const float g = coeff * dy[dy_offset + i / dim];
    const float v = x[x_offset + i];
    float r = g;
    if (op == REDUCTION_ASUM)
        r = g * (float)((v > 0.0f) - (v < 0.0f));
    else if (op == REDUCTION_SUMSQ)
        r = 2.0f * g * v;
    dx[dx_offset + i] = r;
}

// dst row r = src row index[r] (rows of `inner` values; index holds integers stored as floats). An index outside
// [0, rows) gives a row of zeros: a kernel cannot raise (the CPU code checks).
__kernel void gather_rows(const int n, __global const float* src, const int src_offset,
                          __global float* dst, const int dst_offset, __global const float* index,
                          const int index_offset, const int inner, const int rows) {
    const int i = get_global_id(0);
    if (i >= n)
        return;
    const int r = (int)index[index_offset + i / inner];
    dst[dst_offset + i] = (r >= 0 && r < rows) ? src[src_offset + r * inner + i % inner] : 0.0f;
}

// Filter backward: dst row index[r] = src row r (the indices are distinct)
__kernel void scatter_rows(const int n, __global const float* src, const int src_offset,
                           __global float* dst, const int dst_offset, __global const float* index,
                           const int inner) {
    const int i = get_global_id(0);
    if (i < n)
        dst[dst_offset + (int)index[i / inner] * inner + i % inner] = src[src_offset + i];
}

// BatchReindex backward, deterministic: bottom value (b, k) sums the top diffs of every row r with index[r] == b
__kernel void reindex_backward(const int n, __global const float* dy, const int dy_offset,
                               __global float* dx, const int dx_offset, __global const float* index,
                               const int index_offset, const int rows, const int inner) {
    const int i = get_global_id(0);
    if (i >= n)
        return;
    const int b = i / inner;
    const int k = i % inner;
    float s = 0.0f;
    for (int r = 0; r < rows; ++r)
        if ((int)index[index_offset + r] == b)
            s += dy[dy_offset + r * inner + k];
    dx[dx_offset + i] = s;
}

// OpenCL 1.2 has no float atomics: add through a compare-and-swap loop on the bits
inline void atomic_add_float(volatile __global float* address, const float value) {
    union { unsigned int bits; float f; } old_value, new_value;
    do {
        old_value.f = *address;
        new_value.f = old_value.f + value;
    } while (atomic_cmpxchg((volatile __global unsigned int*)address, old_value.bits, new_value.bits)
             != old_value.bits);
}

// Embed weight gradient: W row index[m] += dy row m; rows may repeat, hence the atomics
__kernel void embed_weight_backward(const int n, __global const float* dy, const int dy_offset,
                                    __global const float* index, const int index_offset,
                                    __global float* weight_diff, const int weight_diff_offset,
                                    const int num_output, const int input_dim) {
    const int i = get_global_id(0);
    if (i >= n)
        return;
    const int r = (int)index[index_offset + i / num_output];
    if (r >= 0 && r < input_dim)
        atomic_add_float(weight_diff + weight_diff_offset + r * num_output + i % num_output, dy[dy_offset + i]);
}
