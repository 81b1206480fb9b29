// LSTMUnit (layers/recurrent.py): one work-item per (stream n, hidden unit d) of N x H; the gate inputs of stream n
// are 4H values in the order i, f, o, g, so neighbouring work-items read neighbouring values of each gate.

inline float sigmoid_of(const float x) { return 0.5f * tanh(0.5f * x) + 0.5f; }

// the activated gates i, f, o (sigmoid) and g (tanh) of hidden unit d from a stream's 4H gate inputs
inline void lstm_gates(__global const float* g_in, const int hidden, const int d,
                       float* i, float* f, float* o, float* g) {
    *i = sigmoid_of(g_in[d]);
    *f = sigmoid_of(g_in[hidden + d]);
    *o = sigmoid_of(g_in[2 * hidden + d]);
    *g = tanh(g_in[3 * hidden + d]);
}

__kernel void lstm_unit_forward(const int n, const int hidden,
                                __global const float* c_prev, const int c_prev_offset,
                                __global const float* gates, const int gates_offset,
                                __global const float* cont, const int cont_offset,
                                __global float* c_out, const int c_out_offset,
                                __global float* h_out, const int h_out_offset) {
    const int index = get_global_id(0);
    if (index >= n)
        return;
    const int s = index / hidden;
    const int d = index % hidden;
    __global const float* g_in = gates + gates_offset + 4 * hidden * s;
    float i, f, o, g;
    lstm_gates(g_in, hidden, d, &i, &f, &o, &g);
    const float c = cont[cont_offset + s] * f * c_prev[c_prev_offset + index] + i * g;
    c_out[c_out_offset + index] = c;
    h_out[h_out_offset + index] = o * tanh(c);
}

// the exact derivatives (the forget gate's carries cont); c is the forward's c output
__kernel void lstm_unit_backward(const int n, const int hidden,
                                 __global const float* c_prev, const int c_prev_offset,
                                 __global const float* gates, const int gates_offset,
                                 __global const float* cont, const int cont_offset,
                                 __global const float* c_out, const int c_out_offset,
                                 __global const float* c_diff, const int c_diff_offset,
                                 __global const float* h_diff, const int h_diff_offset,
                                 __global float* c_prev_diff, const int c_prev_diff_offset,
                                 __global float* gates_diff, const int gates_diff_offset) {
    const int index = get_global_id(0);
    if (index >= n)
        return;
    const int s = index / hidden;
    const int d = index % hidden;
    __global const float* g_in = gates + gates_offset + 4 * hidden * s;
    __global float* g_diff = gates_diff + gates_diff_offset + 4 * hidden * s;
    float i, f, o, g;
    lstm_gates(g_in, hidden, d, &i, &f, &o, &g);
    const float k = cont[cont_offset + s];
    const float tanh_c = tanh(c_out[c_out_offset + index]);
    const float dh = h_diff[h_diff_offset + index];
    const float dc = c_diff[c_diff_offset + index] + dh * o * (1.0f - tanh_c * tanh_c);
    c_prev_diff[c_prev_diff_offset + index] = dc * k * f;
    g_diff[d] = dc * g * i * (1.0f - i);
    g_diff[hidden + d] = dc * c_prev[c_prev_offset + index] * k * f * (1.0f - f);
    g_diff[2 * hidden + d] = dh * tanh_c * o * (1.0f - o);
    g_diff[3 * hidden + d] = dc * i * (1.0f - g * g);
}
