// The update rules of kaffe's solvers (Caffe's *_update_gpu), one work-item per parameter value.
// g is the parameter's diff: the regularized gradient on entry, the value that Net::Update subtracts on exit.
// Every array comes with its offset in floats.

__kernel void nesterov_update(const int n, __global float* g, const int g_off, __global float* h, const int h_off,
                              const float momentum, const float local_rate) {
    const int i = get_global_id(0);
    if (i < n) {
        const float previous = h[h_off + i];
        const float current = momentum * previous + local_rate * g[g_off + i];
        h[h_off + i] = current;
        // step back to where plain momentum would be, then over-step along the new momentum
        g[g_off + i] = (1.0f + momentum) * current - momentum * previous;
    }
}

__kernel void adagrad_update(const int n, __global float* g, const int g_off, __global float* h, const int h_off,
                             const float delta, const float local_rate) {
    const int i = get_global_id(0);
    if (i < n) {
        const float gi = g[g_off + i];
        const float hi = h[h_off + i] + gi * gi;
        h[h_off + i] = hi;
        g[g_off + i] = local_rate * gi / (sqrt(hi) + delta);
    }
}

__kernel void rmsprop_update(const int n, __global float* g, const int g_off, __global float* h, const int h_off,
                             const float rms_decay, const float delta, const float local_rate) {
    const int i = get_global_id(0);
    if (i < n) {
        const float gi = g[g_off + i];
        const float hi = rms_decay * h[h_off + i] + (1.0f - rms_decay) * gi * gi;
        h[h_off + i] = hi;
        g[g_off + i] = local_rate * gi / (sqrt(hi) + delta);
    }
}

// h: running mean of squared gradients, u: running mean of squared updates; momentum is their decay
__kernel void adadelta_update(const int n, __global float* g, const int g_off, __global float* h, const int h_off,
                              __global float* u, const int u_off, const float momentum, const float delta,
                              const float local_rate) {
    const int i = get_global_id(0);
    if (i < n) {
        const float gi = g[g_off + i];
        const float hi = momentum * h[h_off + i] + (1.0f - momentum) * gi * gi;
        h[h_off + i] = hi;
        const float step = gi * sqrt((u[u_off + i] + delta) / (hi + delta));
        u[u_off + i] = momentum * u[u_off + i] + (1.0f - momentum) * step * step;
        g[g_off + i] = local_rate * step;
    }
}

// corrected_rate = local_rate * sqrt(1 - beta2^t) / (1 - beta1^t), computed on the host once per parameter
__kernel void adam_update(const int n, __global float* g, const int g_off, __global float* m, const int m_off,
                          __global float* v, const int v_off, const float beta1, const float beta2,
                          const float eps_hat, const float corrected_rate) {
    const int i = get_global_id(0);
    if (i < n) {
        const float gi = g[g_off + i];
        const float mi = beta1 * m[m_off + i] + (1.0f - beta1) * gi;
        const float vi = beta2 * v[v_off + i] + (1.0f - beta2) * gi * gi;
        m[m_off + i] = mi;
        v[v_off + i] = vi;
        g[g_off + i] = corrected_rate * mi / (sqrt(vi) + eps_hat);
    }
}
