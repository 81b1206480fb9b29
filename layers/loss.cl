// Kernels of SoftmaxWithLoss (layers/loss.py) on probabilities seen as (outer, channels, inner); the labels are
// floats, one per (outer, inner) position, read as ints as Caffe's static_cast<int>.

// Per position p: loss[p] = -log(max(prob of its label, FLT_MIN)) and count[p] = 1, or 0 and 0 where the label is
// ignored. A label outside [0, channels) gives a NaN loss (no read out of bounds); the host then finds it.
__kernel void softmax_loss_forward(const int n, __global const float* prob, const int prob_offset,
                                   __global const float* label, const int label_offset,
                                   __global float* loss, __global float* count,
                                   const int channels, const int inner, const int has_ignore, const int ignore_label) {
    const int p = get_global_id(0);
    if (p >= n)
        return;
    const int target = (int)label[label_offset + p];
    if (has_ignore && target == ignore_label) {
        loss[p] = 0.0f;
        count[p] = 0.0f;
    } else if (target < 0 || target >= channels) {
        loss[p] = NAN;
        count[p] = 1.0f;
    } else {
        const float picked = prob[prob_offset + ((p / inner) * channels + target) * inner + p % inner];
        // not fmax, which would turn a NaN probability into FLT_MIN: NaN propagates as on the CPU (np.maximum)
        loss[p] = -log(picked < FLT_MIN ? FLT_MIN : picked);
        count[p] = 1.0f;
    }
}

// diff = (prob - [channel == label]) * scale, and 0 at ignored positions
__kernel void softmax_loss_backward(const int n, __global const float* prob, const int prob_offset,
                                    __global const float* label, const int label_offset,
                                    __global float* diff, const int diff_offset,
                                    const int channels, const int inner, const int has_ignore, const int ignore_label,
                                    const float scale) {
    const int i = get_global_id(0);
    if (i >= n)
        return;
    const int s = i % inner;
    const int c = (i / inner) % channels;
    const int target = (int)label[label_offset + (i / (inner * channels)) * inner + s];
    diff[diff_offset + i] = (has_ignore && target == ignore_label)
        ? 0.0f : (prob[prob_offset + i] - (c == target ? 1.0f : 0.0f)) * scale;
}
