// Kernels of SoftmaxWithLoss (layers/loss.py) on probabilities seen as (outer, channels, inner); the labels are
// floats, one per (outer, inner) position, read as ints as Caffe's static_cast<int>.

// Per position p: loss[p] = -log(max(prob of its label, FLT_MIN)) and count[p] = 1, or 0 and 0 where the label is
// ignored. A label outside [0, channels) gives a NaN loss (no read out of bounds); the host then finds it.
inline float position_loss(__global const float* prob, const int target, const int p, const int channels,
                           const int inner, const int has_ignore, const int ignore_label) {
    if (has_ignore && target == ignore_label)
        return 0.0f;
    if (target < 0 || target >= channels)
        return NAN;
    const float picked = prob[((p / inner) * channels + target) * inner + p % inner];
    // not fmax, which would turn a NaN probability into FLT_MIN: NaN propagates as on the CPU (np.maximum)
    return -log(picked < FLT_MIN ? FLT_MIN : picked);
}

__kernel void softmax_loss_forward(const int n, __global const float* prob, const int prob_offset,
                                   __global const float* label, const int label_offset,
                                   __global float* loss, __global float* count,
                                   const int channels, const int inner, const int has_ignore, const int ignore_label) {
    const int p = get_global_id(0);
    if (p >= n)
        return;
    const int target = (int)label[label_offset + p];
    loss[p] = position_loss(prob + prob_offset, target, p, channels, inner, has_ignore, ignore_label);
    count[p] = has_ignore && target == ignore_label ? 0.0f : 1.0f;
}

#ifdef GROUP_SIZE
// The whole forward of a batch of at most GROUP_SIZE positions in one work-group (built after reduce.cl and
// common.cl): each position's softmax and loss, and out = scale * the sum of the losses, added in the order of
// reduce.cl's asum of one work-group, so that the loss is the same as the three launches' of the general case;
// with weigh, also the weighted loss that the net sums (Layer.weighted_loss_slot), saving the launch of its dot.
__kernel __attribute__((reqd_work_group_size(GROUP_SIZE, 1, 1)))
void softmax_loss_forward_sum(const int n, __global const float* x, const int x_offset,
                              __global float* prob, const int prob_offset,
                              __global const float* label, const int label_offset,
                              __global float* out, const int out_offset, const int channels, const int inner,
                              const int has_ignore, const int ignore_label, const float scale,
                              __global float* weighted, const int weighted_offset,
                              __global const float* weight, const int weight_offset, const int weigh) {
    __local float scratch[GROUP_SIZE];
    float v = 0.0f;
    for (int p = get_local_id(0); p < n; p += GROUP_SIZE) {
        position_softmax(x + x_offset + POSITION_BASE(p), prob + prob_offset + POSITION_BASE(p), channels, inner);
        v += fabs(position_loss(prob + prob_offset, (int)label[label_offset + p], p, channels, inner, has_ignore,
                                ignore_label));
    }
    const float s = group_sum(v, scratch);
    if (get_local_id(0) == 0) {
        const float loss = s * scale;
        out[out_offset] = loss;
        if (weigh)   // the weighted loss, the loss times the loss weight in the top's diff, into its slot
            weighted[weighted_offset] = loss * weight[weight_offset];
    }
}
#endif

// diff = (prob - [channel == label]) * scale, and 0 at ignored positions; with divide, scale is first divided by
// the count of valid labels that the forward left on the device (at least 1)
__kernel void softmax_loss_backward(const int n, __global const float* prob, const int prob_offset,
                                    __global const float* label, const int label_offset,
                                    __global float* diff, const int diff_offset,
                                    const int channels, const int inner, const int has_ignore, const int ignore_label,
                                    float scale, __global const float* count, const int count_offset,
                                    const int divide) {
    const int i = get_global_id(0);
    if (i >= n)
        return;
    if (divide)
        scale /= fmax(count[count_offset], 1.0f);
    const int s = i % inner;
    const int c = (i / inner) % channels;
    const int target = (int)label[label_offset + (i / (inner * channels)) * inner + s];
    diff[diff_offset + i] = (has_ignore && target == ignore_label)
        ? 0.0f : (prob[prob_offset + i] - (c == target ? 1.0f : 0.0f)) * scale;
}

// SigmoidCrossEntropyLoss: per value, the overflow-free loss log(1 + exp(-|x|)) - x (t - [x >= 0]) and a count of 1,
// or 0 and 0 where (int)t is the ignore label; also the sigmoid, which backward needs.
__kernel void sigmoid_ce_forward(const int n, __global const float* x, const int x_offset,
                                 __global const float* target, const int target_offset,
                                 __global float* loss, __global float* count,
                                 __global float* sigmoid, const int sigmoid_offset,
                                 const int has_ignore, const int ignore_label) {
    const int i = get_global_id(0);
    if (i >= n)
        return;
    const float v = x[x_offset + i];
    const float t = target[target_offset + i];
    sigmoid[sigmoid_offset + i] = 1.0f / (1.0f + exp(-v));
    if (has_ignore && (int)t == ignore_label) {
        loss[i] = 0.0f;
        count[i] = 0.0f;
    } else {
        loss[i] = log1p(exp(-fabs(v))) - v * (t - (v >= 0.0f ? 1.0f : 0.0f));
        count[i] = 1.0f;
    }
}

// diff = (sigmoid - t) * scale, 0 where (int)t is the ignore label
__kernel void sigmoid_ce_backward(const int n, __global const float* sigmoid, const int sigmoid_offset,
                                  __global const float* target, const int target_offset,
                                  __global float* diff, const int diff_offset,
                                  const int has_ignore, const int ignore_label, float scale,
                                  __global const float* count, const int count_offset, const int divide) {
    const int i = get_global_id(0);
    if (i >= n)
        return;
    if (divide)   // as softmax_loss_backward
        scale /= fmax(count[count_offset], 1.0f);
    const float t = target[target_offset + i];
    diff[diff_offset + i] = (has_ignore && (int)t == ignore_label) ? 0.0f : (sigmoid[sigmoid_offset + i] - t) * scale;
}

// ContrastiveLoss, per pair p: d^2 if similar ((int)y != 0), else max(margin - d, 0)^2 (legacy: max(margin - d^2, 0))
__kernel void contrastive_forward(const int n, __global const float* dist_sq, const int dist_offset,
                                  __global const float* similar, const int similar_offset,
                                  __global float* term, const float margin, const int legacy) {
    const int p = get_global_id(0);
    if (p >= n)
        return;
    const float d2 = dist_sq[dist_offset + p];
    if ((int)similar[similar_offset + p] != 0) {
        term[p] = d2;
    } else if (legacy) {
        term[p] = fmax(margin - d2, 0.0f);
    } else {
        const float m = fmax(margin - sqrt(d2), 0.0f);
        term[p] = m * m;
    }
}

// gradient of one feature input, one work-item per value: alpha (a - b) scaled per pair as the loss term requires
__kernel void contrastive_backward(const int n, const int channels,
                                   __global const float* difference, const int difference_offset,
                                   __global const float* dist_sq, const int dist_offset,
                                   __global const float* similar, const int similar_offset,
                                   __global float* diff, const int diff_offset,
                                   const float margin, const int legacy, const float alpha) {
    const int i = get_global_id(0);
    if (i >= n)
        return;
    const int p = i / channels;
    const float d = difference[difference_offset + i];
    float coeff;
    if ((int)similar[similar_offset + p] != 0) {
        coeff = 1.0f;
    } else {
        const float d2 = dist_sq[dist_offset + p];
        if (legacy) {
            coeff = margin - d2 > 0.0f ? -1.0f : 0.0f;
        } else {
            const float dist = sqrt(d2);
            const float mdist = margin - dist;
            coeff = mdist > 0.0f ? -mdist / (dist + 1e-4f) : 0.0f;
        }
    }
    diff[diff_offset + i] = alpha * coeff * d;
}
