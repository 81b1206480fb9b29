"""Recurrent layers: RNN and LSTM over T time steps of N streams, and LSTMUnit (one LSTM step).

Caffe unrolls RNN/LSTM into an internal net of InnerProduct/Scale/Eltwise/LSTMUnit layers; kaffe computes the
same recurrence directly, with the parameter blobs in the order and shapes that internal net creates them (so
.caffemodel weights load) and the same state rules:
- bottoms x (T x N x ...), cont (T x N; 0 starts a sequence: the previous state is multiplied by cont),
  an optional static input x_static (N x ...) added to every step, and with expose_hidden the initial state
  (h_0, and c_0 for LSTM, each 1 x N x H); tops the outputs (T x N x H) and with expose_hidden the final state.
- Without expose_hidden the final state of one forward is the initial state of the next (zeros at first).
- Backward reaches x, x_static and the parameters (accumulated into their diffs), not the initial state, and
  ignores the diffs of the exposed final-state tops: Caffe's unrolled net shares only their data.
RNN and LSTM run on the host in GPU mode (one GEMM per time step on small matrices); LSTMUnit has kernels.
"""
import numpy as np

from ..engine import opencl
from ..engine.errors import KaffeError
from ..engine.layer import Layer, register_layer

KERNELS = "layers/recurrent.cl"


def sigmoid(x):
    return 0.5 * np.tanh(0.5 * x) + 0.5


def lstm_step(gates, c_prev, cont):
    """One LSTM step on gate pre-activations (N, 4H) in Caffe's order i, f, o, g; cont (N,) scales the forget
    gate. Returns c, h and the activations (i, sigmoid of f, o, g) backward needs."""
    hidden = c_prev.shape[-1]
    i, f, o = (sigmoid(gates[:, k * hidden:(k + 1) * hidden]) for k in range(3))
    g = np.tanh(gates[:, 3 * hidden:])
    c = cont[:, None] * f * c_prev + i * g
    h = o * np.tanh(c)
    return c, h, (i, f, o, g)


def lstm_step_backward(dc, dh, c_prev, c, acts, cont):
    """Gradients (d gates (N, 4H), d c_prev) of one step given those of c and h.

    The forget gate's term carries cont, the exact derivative (Caffe's GPU code; its CPU code agrees whenever
    cont is 0 or 1, the values sequence indicators take).
    """
    i, f, o, g = acts
    cont = cont[:, None]
    tanh_c = np.tanh(c)
    dc_total = dc + dh * o * (1 - tanh_c * tanh_c)
    dgates = np.concatenate([dc_total * g * i * (1 - i),
                             dc_total * c_prev * cont * f * (1 - f),
                             dh * tanh_c * o * (1 - o),
                             dc_total * i * (1 - g * g)], axis=1)
    return dgates, dc_total * cont * f


class RecurrentLayer(Layer):
    """The shared plumbing of RNN and LSTM; subclasses give state_names, param_specs, run and run_backward."""
    state_names = ()

    def __init__(self, param):
        super().__init__(param)
        self.expose_hidden = param.recurrent_param.expose_hidden
        exposed = len(self.state_names) if self.expose_hidden else 0
        self.min_bottom_blobs = 2 + exposed
        self.max_bottom_blobs = 3 + exposed
        self.exact_num_top_blobs = 1 + exposed

    def allow_force_backward(self, bottom_index):
        return bottom_index != 1  # the sequence indicators

    def _error(self, message):
        return KaffeError(f"{self.type} layer '{self.name}': {message}")

    def _check_inputs(self, bottom):
        x, cont = bottom[0], bottom[1]
        if x.num_axes < 2:
            raise self._error(f"bottom[0] must have at least 2 axes (#timesteps, #streams, ...), "
                              f"got {x.shape_string()}")
        if cont.num_axes != 2 or cont.shape != x.shape[:2]:
            raise self._error(f"bottom[1] (sequence continuation indicators) must be #timesteps x #streams = "
                              f"{x.shape[0]} x {x.shape[1]}, got {cont.shape_string()}")

    def layer_setup(self, bottom, top):
        self._check_inputs(bottom)
        self.T = bottom[0].shape[0]
        self.hidden = self.layer_param.recurrent_param.num_output
        if self.hidden <= 0:
            raise self._error(f"recurrent_param.num_output must be positive, got {self.hidden}")
        exposed = len(self.state_names) if self.expose_hidden else 0
        self.static_input = len(bottom) > 2 + exposed
        self.input_dim = bottom[0].count_axes(2)
        self.static_dim = 0
        if self.static_input:
            if bottom[2].num_axes < 1 or bottom[2].shape[0] != bottom[0].shape[1]:
                raise self._error(f"the static input must be #streams x ..., {bottom[0].shape[1]} streams, got "
                                  f"{bottom[2].shape_string()}")
            self.static_dim = bottom[2].count_axes(1)
        p = self.layer_param.recurrent_param
        self.init_params(*self.param_specs(p.weight_filler, p.bias_filler))
        self.state = None
        self.cache = None

    def reshape(self, bottom, top):
        self._check_inputs(bottom)
        x = bottom[0]
        if x.shape[0] != self.T:
            raise self._error(f"input number of timesteps changed: {self.T} at setup, now {x.shape_string()}")
        if x.count_axes(2) != self.input_dim:
            raise self._error(f"input {x.shape_string()} has {x.count_axes(2)} values per step and stream; the "
                              f"weights expect {self.input_dim}")
        self.N = x.shape[1]
        state_shape = (1, self.N, self.hidden)
        offset = 2
        if self.static_input:
            static = bottom[2]
            if static.shape[0] != self.N or static.count_axes(1) != self.static_dim:
                raise self._error(f"static input {static.shape_string()} must be {self.N} streams of "
                                  f"{self.static_dim} values")
            offset = 3
        for name, blob in zip(self.state_names, bottom[offset:]):
            if blob.shape != state_shape:
                raise self._error(f"initial state {name}_0 must have shape {' '.join(map(str, state_shape))}, "
                                  f"got {blob.shape_string()}")
        if self.state is None or self.state[0].shape != (self.N, self.hidden):
            self.state = [np.zeros((self.N, self.hidden), np.float32) for _ in self.state_names]
        top[0].reshape((self.T, self.N, self.hidden))
        for t in top[1:]:
            t.reshape(state_shape)

    def _inputs(self, bottom):
        x = bottom[0].cpu_data().reshape(self.T * self.N, self.input_dim)
        cont = bottom[1].cpu_data()
        static = bottom[2].cpu_data().reshape(self.N, self.static_dim) if self.static_input else None
        return x, cont, static

    def forward_cpu(self, bottom, top):
        x, cont, static = self._inputs(bottom)
        if self.expose_hidden:
            initial = [b.cpu_data().reshape(self.N, self.hidden) for b in bottom[2 + self.static_input:]]
        else:
            initial = self.state
        params = [b.cpu_data() for b in self.blobs]
        outputs, final, self.cache = self.run(params, x, cont, static, initial)
        top[0].mutable_cpu_data()[...] = outputs.reshape(top[0].shape)
        self.state = [s.copy() for s in final]
        for t, s in zip(top[1:], final):
            t.mutable_cpu_data()[...] = s.reshape(t.shape)

    def backward_cpu(self, top, propagate_down, bottom):
        if propagate_down[1]:
            raise self._error("cannot backpropagate to sequence indicators")
        x, cont, static = self._inputs(bottom)
        params = [b.cpu_data() for b in self.blobs]
        dtop = top[0].cpu_diff().reshape(self.T, self.N, self.hidden)
        dx, dstatic, dparams = self.run_backward(params, x, cont, static, dtop, self.cache)
        if propagate_down[0]:
            bottom[0].mutable_cpu_diff()[...] = dx.reshape(bottom[0].shape)
        if self.static_input and propagate_down[2]:
            bottom[2].mutable_cpu_diff()[...] = dstatic.reshape(bottom[2].shape)
        for blob, grad, needed in zip(self.blobs, dparams, self.param_propagate_down):
            if needed:
                blob.mutable_cpu_diff()[...] += grad

    def _input_transform(self, x, static, w, b, w_static):
        """W x_t + b for every step (T, N, G), plus W_static x_static when there is a static input."""
        out = (x @ w.T + b).reshape(self.T, self.N, -1)
        if static is not None:
            out += static @ w_static.T
        return out

    def _input_gradients(self, dpre, x, static, w, w_static):
        """Gradients of (x, x_static, W, b, W_static) from those of the per-step inputs W x_t + b (+ static)."""
        flat = dpre.reshape(self.T * self.N, -1)
        dx, dw, db = flat @ w, flat.T @ x, flat.sum(axis=0)
        if static is None:
            return dx, None, dw, db, None
        per_stream = dpre.sum(axis=0)
        return dx, per_stream @ w_static, dw, db, per_stream.T @ static

    def _split_params(self, params):
        """(input weight, input bias, static weight or None, the rest) in Caffe's blob order."""
        if self.static_input:
            return params[0], params[1], params[2], params[3:]
        return params[0], params[1], None, params[2:]

    def _join_grads(self, dw, db, dw_static, rest):
        return [dw, db] + ([dw_static] if self.static_input else []) + rest


@register_layer("LSTM")
class LSTMLayer(RecurrentLayer):
    """Long short-term memory; parameters W_xc (4H x I), b_c (4H), [W_xc_static (4H x I_static)], W_hc (4H x H),
    gates in the order i, f, o, g. Each step: gates = W_xc x_t + b_c [+ W_xc_static x_static] + W_hc (cont_t h_{t-1});
    c_t = cont_t sigmoid(f) c_{t-1} + sigmoid(i) tanh(g); h_t = sigmoid(o) tanh(c_t). The output is h."""
    state_names = ("h", "c")

    def param_specs(self, weight_filler, bias_filler):
        gates = 4 * self.hidden
        specs = [((gates, self.input_dim), weight_filler), ((gates,), bias_filler)]
        if self.static_input:
            specs.append(((gates, self.static_dim), weight_filler))
        specs.append(((gates, self.hidden), weight_filler))
        return specs

    def run(self, params, x, cont, static, initial):
        w_x, b, w_static, (w_h,) = self._split_params(params)
        pre = self._input_transform(x, static, w_x, b, w_static)
        h, c = initial
        hs, cs, conted, c_prevs, acts = [], [], [], [], []
        for t in range(self.T):
            h_conted = cont[t][:, None] * h
            c_prevs.append(c)
            c, h, step_acts = lstm_step(pre[t] + h_conted @ w_h.T, c, cont[t])
            conted.append(h_conted)
            acts.append(step_acts)
            hs.append(h)
            cs.append(c)
        return np.stack(hs), (h, c), (conted, c_prevs, cs, acts)

    def run_backward(self, params, x, cont, static, dtop, cache):
        w_x, _, w_static, (w_h,) = self._split_params(params)
        conted, c_prevs, cs, acts = cache
        dpre = np.empty((self.T, self.N, 4 * self.hidden), np.float32)
        dh_next = np.zeros((self.N, self.hidden), np.float32)
        dc_next = np.zeros_like(dh_next)
        for t in reversed(range(self.T)):
            dpre[t], dc_next = lstm_step_backward(dc_next, dtop[t] + dh_next, c_prevs[t], cs[t], acts[t], cont[t])
            dh_next = cont[t][:, None] * (dpre[t] @ w_h)
        dw_h = dpre.reshape(-1, 4 * self.hidden).T @ np.stack(conted).reshape(-1, self.hidden)
        dx, dstatic, dw_x, db, dw_static = self._input_gradients(dpre, x, static, w_x, w_static)
        return dx, dstatic, self._join_grads(dw_x, db, dw_static, [dw_h])


@register_layer("RNN")
class RNNLayer(RecurrentLayer):
    """Elman network; parameters W_xh (H x I), b_h (H), [W_xh_static (H x I_static)], W_hh (H x H), W_ho (H x H),
    b_o (H). Each step: h_t = tanh(W_xh x_t + b_h [+ W_xh_static x_static] + W_hh (cont_t h_{t-1}));
    o_t = tanh(W_ho h_t + b_o). The output is o."""
    state_names = ("h",)

    def param_specs(self, weight_filler, bias_filler):
        h = self.hidden
        specs = [((h, self.input_dim), weight_filler), ((h,), bias_filler)]
        if self.static_input:
            specs.append(((h, self.static_dim), weight_filler))
        specs += [((h, h), weight_filler), ((h, h), weight_filler), ((h,), bias_filler)]
        return specs

    def run(self, params, x, cont, static, initial):
        w_x, b, w_static, (w_hh, w_ho, b_o) = self._split_params(params)
        pre = self._input_transform(x, static, w_x, b, w_static)
        (h,) = initial
        hs, conted = [], []
        for t in range(self.T):
            h_conted = cont[t][:, None] * h
            h = np.tanh(pre[t] + h_conted @ w_hh.T)
            conted.append(h_conted)
            hs.append(h)
        hs = np.stack(hs)
        outputs = np.tanh(hs.reshape(-1, self.hidden) @ w_ho.T + b_o)
        return outputs, (h,), (hs, conted, outputs)

    def run_backward(self, params, x, cont, static, dtop, cache):
        w_x, _, w_static, (w_hh, w_ho, _) = self._split_params(params)
        hs, conted, outputs = cache
        d_out = dtop.reshape(-1, self.hidden) * (1 - outputs * outputs)
        dw_ho, db_o = d_out.T @ hs.reshape(-1, self.hidden), d_out.sum(axis=0)
        dh_out = (d_out @ w_ho).reshape(self.T, self.N, self.hidden)
        dpre = np.empty_like(dh_out)
        dh_next = np.zeros((self.N, self.hidden), np.float32)
        for t in reversed(range(self.T)):
            dpre[t] = (dh_out[t] + dh_next) * (1 - hs[t] * hs[t])
            dh_next = cont[t][:, None] * (dpre[t] @ w_hh)
        dw_hh = dpre.reshape(-1, self.hidden).T @ np.stack(conted).reshape(-1, self.hidden)
        dx, dstatic, dw_x, db, dw_static = self._input_gradients(dpre, x, static, w_x, w_static)
        return dx, dstatic, self._join_grads(dw_x, db, dw_static, [dw_hh, dw_ho, db_o])


@register_layer("LSTMUnit")
class LSTMUnitLayer(Layer):
    """One LSTM step: bottoms c_{t-1} (1 x N x H), gate inputs (1 x N x 4H, order i, f, o, g), cont (1 x N);
    tops c_t and h_t (1 x N x H each)."""
    exact_num_bottom_blobs = 3
    exact_num_top_blobs = 2

    def allow_force_backward(self, bottom_index):
        return bottom_index != 2

    def reshape(self, bottom, top):
        c_prev, gates, cont = bottom
        n = c_prev.shape[1] if c_prev.num_axes > 1 else None
        ok = (c_prev.num_axes == 3 and gates.num_axes == 3 and cont.num_axes == 2
              and all(b.shape[0] == 1 and b.shape[1] == n for b in bottom)
              and gates.shape[2] == 4 * c_prev.shape[2])
        if not ok:
            raise KaffeError(f"LSTMUnit layer '{self.name}': bottoms must be c_prev 1 x N x H, gate inputs "
                             f"1 x N x 4H and cont 1 x N; got {c_prev.shape_string()}, {gates.shape_string()}, "
                             f"{cont.shape_string()}")
        self.N, self.hidden = n, c_prev.shape[2]
        for t in top:
            t.reshape_like(c_prev)

    def _inputs(self, bottom):
        return (bottom[0].cpu_data().reshape(self.N, self.hidden),
                bottom[1].cpu_data().reshape(self.N, 4 * self.hidden), bottom[2].cpu_data().reshape(self.N))

    def forward_cpu(self, bottom, top):
        c_prev, gates, cont = self._inputs(bottom)
        c, h, _ = lstm_step(gates, c_prev, cont)
        top[0].mutable_cpu_data()[...] = c.reshape(top[0].shape)
        top[1].mutable_cpu_data()[...] = h.reshape(top[1].shape)

    def _refuse_cont(self, propagate_down):
        if propagate_down[2]:
            raise KaffeError(f"LSTMUnit layer '{self.name}' cannot backpropagate to sequence indicators")
        return propagate_down[0] or propagate_down[1]

    def backward_cpu(self, top, propagate_down, bottom):
        if not self._refuse_cont(propagate_down):
            return
        c_prev, gates, cont = self._inputs(bottom)
        c, _, acts = lstm_step(gates, c_prev, cont)
        dc = top[0].cpu_diff().reshape(self.N, self.hidden)
        dh = top[1].cpu_diff().reshape(self.N, self.hidden)
        dgates, dc_prev = lstm_step_backward(dc, dh, c_prev, c, acts, cont)
        bottom[0].mutable_cpu_diff()[...] = dc_prev.reshape(bottom[0].shape)
        bottom[1].mutable_cpu_diff()[...] = dgates.reshape(bottom[1].shape)

    def forward_gpu(self, bottom, top):
        opencl.launch(KERNELS, "lstm_unit_forward", self.N * self.hidden, self.hidden,
                      *opencl.device_args(bottom[0].gpu_data()), *opencl.device_args(bottom[1].gpu_data()),
                      *opencl.device_args(bottom[2].gpu_data()), *opencl.device_args(top[0].mutable_gpu_data()),
                      *opencl.device_args(top[1].mutable_gpu_data()))

    def backward_gpu(self, top, propagate_down, bottom):
        if not self._refuse_cont(propagate_down):
            return
        opencl.launch(KERNELS, "lstm_unit_backward", self.N * self.hidden, self.hidden,
                      *opencl.device_args(bottom[0].gpu_data()), *opencl.device_args(bottom[1].gpu_data()),
                      *opencl.device_args(bottom[2].gpu_data()), *opencl.device_args(top[0].gpu_data()),
                      *opencl.device_args(top[0].gpu_diff()), *opencl.device_args(top[1].gpu_diff()),
                      *opencl.device_args(bottom[0].mutable_gpu_diff()),
                      *opencl.device_args(bottom[1].mutable_gpu_diff()))
