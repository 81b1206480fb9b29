// Sum over i < n of TERM(i) in two passes: `reduce_partial` leaves one sum per work-group in `partial`,
// `sum_partials` (one work-group) adds those; one work-group's sum goes straight to the output. The sum is
// multiplied by `scale` where it is written out. Two launches instead of atomics: float atomics are not core
// OpenCL, and the fixed order gives the same result on every run.
//
// Compile-time settings (-D): GROUP_SIZE (a power of two, the work-group size), and the summed term:
// ASUM |x[i]|, SUMSQ x[i]^2 or DOT x[i] * y[i] (y is unused by the one-input terms).

#if defined(ASUM)
#define TERM(i) fabs(x[i])
#elif defined(SUMSQ)
#define TERM(i) (x[i] * x[i])
#elif defined(DOT)
#define TERM(i) (x[i] * y[i])
#endif

inline float group_sum(float v, __local float* scratch) {
    const int lid = get_local_id(0);
    scratch[lid] = v;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int stride = GROUP_SIZE / 2; stride > 0; stride >>= 1) {
        if (lid < stride)
            scratch[lid] += scratch[lid + stride];
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    return scratch[0];
}

__kernel __attribute__((reqd_work_group_size(GROUP_SIZE, 1, 1)))
void reduce_partial(const int n, __global const float* x, const int x_offset,
                    __global const float* y, const int y_offset, __global float* partial,
                    const int partial_offset, const float scale) {
    __local float scratch[GROUP_SIZE];
    x += x_offset;
    y += y_offset;
    float v = 0.0f;
    // grid-stride: neighbouring work-items read neighbouring values
    for (int i = get_global_id(0); i < n; i += get_global_size(0))
        v += TERM(i);
    const float s = group_sum(v, scratch);
    if (get_local_id(0) == 0)
        partial[partial_offset + get_group_id(0)] = s * scale;
}

__kernel __attribute__((reqd_work_group_size(GROUP_SIZE, 1, 1)))
void sum_partials(const int n, __global const float* partial, __global float* out, const int out_offset,
                  const float scale) {
    __local float scratch[GROUP_SIZE];
    float v = 0.0f;
    for (int i = get_local_id(0); i < n; i += GROUP_SIZE)
        v += partial[i];
    const float s = group_sum(v, scratch);
    if (get_local_id(0) == 0)
        out[out_offset] = s * scale;
}
