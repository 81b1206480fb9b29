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

__kernel void channel_max(const int n, __global const float* x, const int x_offset,
                          __global float* per_position, const int channels, const int inner) {
    const int p = get_global_id(0);
    if (p >= n)
        return;
    x += x_offset + POSITION_BASE(p);
    float m = -INFINITY;
    for (int c = 0; c < channels; ++c)
        m = fmax(m, x[c * inner]);
    per_position[p] = m;
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
__kernel void channel_subtract_exp(const int n, __global const float* x, const int x_offset,
                                   __global float* out, const int out_offset,
                                   __global const float* per_position, const int channels, const int inner) {
    const int i = get_global_id(0);
    if (i < n)
        out[out_offset + i] = exp(x[x_offset + i] - per_position[POSITION_OF(i)]);
}

// x /= sum of x's position
__kernel void channel_divide(const int n, __global float* x, const int x_offset,
                             __global const float* per_position, const int channels, const int inner) {
    const int i = get_global_id(0);
    if (i < n)
        x[x_offset + i] /= per_position[POSITION_OF(i)];
}

// softmax backward: dx = (dy - dot(dy, y) of the position) * y
__kernel void channel_subtract_multiply(const int n, __global const float* dy, const int dy_offset,
                                        __global const float* y, const int y_offset,
                                        __global float* dx, const int dx_offset,
                                        __global const float* per_position, const int channels, const int inner) {
    const int i = get_global_id(0);
    if (i < n)
        dx[dx_offset + i] = (dy[dy_offset + i] - per_position[POSITION_OF(i)]) * y[y_offset + i];
}
