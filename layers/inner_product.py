"""InnerProduct (fully connected): y = x W^T + b over the axes from `axis` on, flattened."""
import numpy as np

from ..engine import opencl
from ..engine.errors import KaffeError
from ..engine.layer import Layer, register_layer


@register_layer("InnerProduct")
class InnerProductLayer(Layer):
    """Weight (num_output, K), or (K, num_output) with transpose; bias (num_output,).

    The axes before `axis` are independent samples (M of them), those from `axis` on are flattened to K.
    OpenCL: forward is one GEMM and a bias kernel; backward one GEMM per gradient, the bias gradient a GEMM
    with a ones vector (Caffe's gemv), all accumulating into the parameter diffs as Caffe does.
    """
    exact_num_bottom_blobs = 1
    exact_num_top_blobs = 1

    def layer_setup(self, bottom, top):
        p = self.layer_param.inner_product_param
        self.num_output = p.num_output
        self.bias_term = p.bias_term
        self.transpose = p.transpose
        if self.num_output <= 0:
            raise KaffeError(f"{self.type} layer '{self.name}': num_output must be positive, got {self.num_output}")
        axis = bottom[0].canonical_axis_index(p.axis)
        self.inputs = bottom[0].count_axes(axis)
        weight_shape = (self.inputs, self.num_output) if self.transpose else (self.num_output, self.inputs)
        specs = [(weight_shape, p.weight_filler)]
        if self.bias_term:
            specs.append(((self.num_output,), p.bias_filler))
        self.init_params(*specs)

    def reshape(self, bottom, top):
        axis = bottom[0].canonical_axis_index(self.layer_param.inner_product_param.axis)
        inputs = bottom[0].count_axes(axis)
        if inputs != self.inputs:
            raise KaffeError(f"{self.type} layer '{self.name}': input size incompatible with inner product "
                             f"parameters: bottom {bottom[0].shape_string()} flattened from axis {axis} has "
                             f"{inputs} inputs per sample, the weights {self.blobs[0].shape_string()} expect "
                             f"{self.inputs}")
        self.samples = bottom[0].count_axes(0, axis)
        top[0].reshape(bottom[0].shape[:axis] + (self.num_output,))

    def _weight_nk(self, weight):
        """The weight as (num_output, K), a view either way."""
        return weight.T if self.transpose else weight

    def forward_cpu(self, bottom, top):
        x = bottom[0].cpu_data().reshape(self.samples, self.inputs)
        y = top[0].mutable_cpu_data().reshape(self.samples, self.num_output)
        np.matmul(x, self._weight_nk(self.blobs[0].cpu_data()).T, out=y)
        if self.bias_term:
            y += self.blobs[1].cpu_data()

    def backward_cpu(self, top, propagate_down, bottom):
        dy = top[0].cpu_diff().reshape(self.samples, self.num_output)
        if self.param_propagate_down[0]:
            x = bottom[0].cpu_data().reshape(self.samples, self.inputs)
            self._weight_nk(self.blobs[0].mutable_cpu_diff())[...] += dy.T @ x
        if self.bias_term and self.param_propagate_down[1]:
            self.blobs[1].mutable_cpu_diff()[...] += dy.sum(axis=0)
        if propagate_down[0]:
            np.matmul(dy, self._weight_nk(self.blobs[0].cpu_data()),
                      out=bottom[0].mutable_cpu_diff().reshape(self.samples, self.inputs))

    def forward_gpu(self, bottom, top):
        cl = opencl
        out = top[0].mutable_gpu_data()
        # the weight is op(B) = W^T (K x num_output): stored (num_output, K) it is read transposed; the bias is
        # added as the GEMM writes the top
        cl.gemm(False, not self.transpose, self.samples, self.num_output, self.inputs, 1.0, bottom[0].gpu_data(),
                self.blobs[0].gpu_data(), 0.0, out, bias=self.blobs[1].gpu_data() if self.bias_term else None)

    def backward_gpu(self, top, propagate_down, bottom):
        cl = opencl
        top_diff = top[0].gpu_diff()
        M, N, K = self.samples, self.num_output, self.inputs
        want_bias = self.bias_term and self.param_propagate_down[1]
        bias_diff = self.blobs[1].mutable_gpu_diff() if want_bias else None
        if self.param_propagate_down[0]:
            data, weight_diff = bottom[0].gpu_data(), self.blobs[0].mutable_gpu_diff()
            if self.transpose:  # (K, N) += x^T dy
                cl.gemm(True, False, K, N, M, 1.0, data, top_diff, 1.0, weight_diff)
            else:  # (N, K) += dy^T x, and the bias gradient (dy^T's row sums) in the same launch
                cl.gemm(True, False, N, K, M, 1.0, top_diff, data, 1.0, weight_diff, row_sums=bias_diff)
                want_bias = False
        if want_bias:
            cl.gemm(False, False, 1, N, M, 1.0, self._ones(M), top_diff, 1.0, bias_diff)
        if propagate_down[0]:
            cl.gemm(False, self.transpose, M, K, N, 1.0, top_diff, self.blobs[0].gpu_data(), 0.0,
                    bottom[0].mutable_gpu_diff())

    def _ones(self, n):
        """A device vector of at least n ones (filled when it is made or grown)."""
        ones = opencl.scratch(self, "ones", n)
        if getattr(self, "_ones_filled", 0) < ones.size:
            opencl.fill(ones, 1.0)
            self._ones_filled = ones.size
        return ones
