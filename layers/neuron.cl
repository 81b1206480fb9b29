// Dropout's mask from a counter-based generator: value i of a forward with seed s is kept when
// counter_bits(s, i) >= threshold (layers/random.cl). layers/neuron.py computes the same bits with numpy (dropout_bits), so the
// CPU and OpenCL masks are the same bits and nothing but the 64-bit seed is kept for backward.

// out = in * (kept ? scale : 0): forward on the data, backward on the diffs; in place is fine (same index)
__kernel void dropout_apply(const int n, __global const float* in, const int in_offset,
                            __global float* out, const int out_offset,
                            const ulong seed, const uint threshold, const float scale) {
    const int i = get_global_id(0);
    if (i < n)
        out[out_offset + i] = in[in_offset + i] * (counter_bits(seed, (ulong)i) >= threshold ? scale : 0.0f);
}

// PReLU on data seen as (outer, channels, inner): value i has slope[(i / inner) % channels] (a shared slope is
// channels = 1). In place is fine: each work-item reads its value before writing it.
__kernel void prelu_forward(const int n, __global const float* x, const int x_offset,
                            __global float* y, const int y_offset, __global const float* slope, const int slope_offset,
                            const int channels, const int inner) {
    const int i = get_global_id(0);
    if (i >= n)
        return;
    const float v = x[x_offset + i];
    y[y_offset + i] = fmax(v, 0.0f) + slope[slope_offset + (i / inner) % channels] * fmin(v, 0.0f);
}

__kernel void prelu_backward(const int n, __global const float* dy, const int dy_offset,
                             __global const float* x, const int x_offset, __global float* dx, const int dx_offset,
                             __global const float* slope, const int slope_offset, const int channels, const int inner) {
    const int i = get_global_id(0);
    if (i >= n)
        return;
    const float g = dy[dy_offset + i];
    dx[dx_offset + i] = x[x_offset + i] > 0.0f ? g : g * slope[slope_offset + (i / inner) % channels];
}
