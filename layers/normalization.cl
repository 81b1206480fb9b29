// Kernels of layers/normalization.py; the per-channel sums and broadcasts are common.cl's channel_reduce and
// channel_apply. Data is seen as (outer, channels, inner).

// BatchNorm with global statistics: mean and variance are the stored sums divided by the moving-average factor
// (a factor of 0 gives 0), read on the device so that no value comes back to the host.
__kernel void bn_global_stats(const int n, __global const float* mean_sum, const int mean_sum_offset,
                              __global const float* variance_sum, const int variance_sum_offset,
                              __global const float* factor, const int factor_offset,
                              __global float* mean, const int mean_offset,
                              __global float* variance, const int variance_offset) {
    const int c = get_global_id(0);
    if (c >= n)
        return;
    const float s = factor[factor_offset];
    const float scale = s == 0.0f ? 0.0f : 1.0f / s;
    mean[mean_offset + c] = scale * mean_sum[mean_sum_offset + c];
    variance[variance_offset + c] = scale * variance_sum[variance_sum_offset + c];
}

// dx = (dy - a[c] - b[c] * y) / std[c]: BatchNorm's and MVN's backward, with a the channel's mean of dy and
// b its mean of dy * y. In place (dx is dy) is fine.
__kernel void normalize_backward(const int n, __global const float* dy, const int dy_offset,
                                 __global const float* y, const int y_offset, __global float* dx, const int dx_offset,
                                 __global const float* a, const int a_offset,
                                 __global const float* b, const int b_offset,
                                 __global const float* std, const int std_offset, const int channels, const int inner) {
    const int i = get_global_id(0);
    if (i >= n)
        return;
    const int c = (i / inner) % channels;
    dx[dx_offset + i] = (dy[dy_offset + i] - a[a_offset + c] - b[b_offset + c] * y[y_offset + i])
                        / std[std_offset + c];
}
