// The update rules of kaffe's solvers (Caffe's *_update_gpu) over every learnable parameter in one launch: the
// parameters' data, diffs and histories lie side by side in flat buffers (solvers/flat_update.py), one work-item
// per value. starts[p] is where parameter p begins; rates[p] and decays[p] are its lr_mult and weight_decay *
// decay_mult. Each work-item normalises (iter_size) and regularises its gradient, computes the update value of
// the rule chosen by -D RULE_..., leaves it in the diff (as Caffe does) and subtracts it from the data.
// a, b, c are the rule's scalars (momentum, delta, ...; see each rule).

inline int parameter_of(const int i, __global const int* starts, const int count) {
    int lo = 0, hi = count - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (starts[mid] <= i)
            lo = mid;
        else
            hi = mid - 1;
    }
    return lo;
}

__kernel void update_parameters(const int n, __global float* w, __global float* g, __global float* h,
                                __global float* u, __global const int* starts, const int count,
                                __global const float* rates, __global const float* decays,
                                const float rate, const float norm, const float a, const float b, const float c) {
    const int i = get_global_id(0);
    if (i >= n)
        return;
    const int p = parameter_of(i, starts, count);
    const float wi = w[i];
#if L1
    const float gi = g[i] * norm + decays[p] * sign(wi);   // sign(0) = 0, as Caffe's L1
#else
    const float gi = g[i] * norm + decays[p] * wi;
#endif
    const float local_rate = rate * rates[p];
    float step;
#if defined(RULE_SGD)                      // a = momentum
    step = local_rate * gi + a * h[i];
    h[i] = step;
#elif defined(RULE_NESTEROV)               // a = momentum
    const float previous = h[i];
    const float current = a * previous + local_rate * gi;
    h[i] = current;
    // step back to where plain momentum would be, then over-step along the new momentum
    step = (1.0f + a) * current - a * previous;
#elif defined(RULE_ADAGRAD)                // a = delta
    const float hi = h[i] + gi * gi;
    h[i] = hi;
    step = local_rate * gi / (sqrt(hi) + a);
#elif defined(RULE_RMSPROP)                // a = rms_decay, b = delta
    const float hi = a * h[i] + (1.0f - a) * gi * gi;
    h[i] = hi;
    step = local_rate * gi / (sqrt(hi) + b);
#elif defined(RULE_ADADELTA)               // h: mean squared gradient, u: mean squared update; a = momentum, b = delta
    const float hi = a * h[i] + (1.0f - a) * gi * gi;
    h[i] = hi;
    const float s = gi * sqrt((u[i] + b) / (hi + b));
    u[i] = a * u[i] + (1.0f - a) * s * s;
    step = local_rate * s;
#elif defined(RULE_ADAM)                   // h: m, u: v; a = beta1, b = beta2, c = delta; rate is bias-corrected
    const float mi = a * h[i] + (1.0f - a) * gi;
    const float vi = b * u[i] + (1.0f - b) * gi * gi;
    h[i] = mi;
    u[i] = vi;
    step = local_rate * mi / (sqrt(vi) + c);
#endif
    g[i] = step;
    w[i] = wi - step;
}
