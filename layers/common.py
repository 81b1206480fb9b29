"""Plumbing and shape layers (Split, Flatten, Reshape, Concat, Eltwise, Silence) and Softmax.

Also the OpenCL launch helpers the layer modules share (device_args, launch). engine.opencl is imported inside
the GPU methods: pyopencl is optional for CPU-only installs.
"""
import numpy as np

from ..engine import opencl
from ..engine.errors import KaffeError
from ..engine.layer import Layer, register_layer
from ..proto import caffe_pb2


def shape_text(shape):
    return "(" + ", ".join(str(d) for d in shape) + ")"


def axis_index(layer, blob, axis, what="axis"):
    """blob.canonical_axis_index with an error that names the layer."""
    if not -blob.num_axes <= axis < blob.num_axes:
        raise KaffeError(f"{layer.type} layer '{layer.name}': {what} {axis} is out of range for an input of "
                         f"shape {shape_text(blob.shape)}")
    return blob.canonical_axis_index(axis)


def _elementwise(name, formula, inputs):
    return opencl.elementwise_kernel(name, formula, inputs)


def _add(a, b, p, ops):
    return a + b


def _multiply(a, b, p, ops):
    return a * b


def _quotient_gradient(y, x, dy, p, ops):
    return y / x * dy


def _refuse_in_place(layer, bottom, top):
    if any(t is bottom[0] for t in top):
        raise KaffeError(f"{layer.type} layer '{layer.name}' does not allow in-place computation")


@register_layer("Split")
class SplitLayer(Layer):
    """Every top shares the bottom's data; backward sums the tops' diffs into the bottom's."""
    exact_num_bottom_blobs = 1
    min_top_blobs = 1

    def reshape(self, bottom, top):
        _refuse_in_place(self, bottom, top)
        for t in top:
            t.reshape_like(bottom[0])
            t.share_data(bottom[0])

    def forward_cpu(self, bottom, top):
        pass  # the tops are views of the bottom

    def backward_cpu(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        diff = bottom[0].mutable_cpu_diff()
        diff[...] = top[0].cpu_diff()
        for t in top[1:]:
            diff += t.cpu_diff()

    def forward_gpu(self, bottom, top):
        pass

    def backward_gpu(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        if len(top) == 1:
            opencl.copy(top[0].gpu_diff(), bottom[0].mutable_gpu_diff())
            return
        first, second = top[0].gpu_diff(), top[1].gpu_diff()
        diff = bottom[0].mutable_gpu_diff()
        _elementwise("add", _add, ("a", "b"))(diff, first, second)
        for t in top[2:]:
            opencl.axpy(1.0, t.gpu_diff(), diff)


class _ViewLayer(Layer):
    """A top that is the bottom under another shape: data and diff are shared, nothing is computed."""
    exact_num_bottom_blobs = 1
    exact_num_top_blobs = 1

    def layer_setup(self, bottom, top):
        _refuse_in_place(self, bottom, top)

    def top_shape(self, bottom):
        raise NotImplementedError

    def reshape(self, bottom, top):
        shape = self.top_shape(bottom[0])
        top[0].reshape(shape)
        if top[0].count != bottom[0].count:
            raise KaffeError(f"{self.type} layer '{self.name}': output count {top[0].count} "
                             f"(shape {shape_text(shape)}) must match input count {bottom[0].count} "
                             f"(shape {shape_text(bottom[0].shape)})")
        top[0].share_data(bottom[0])
        top[0].share_diff(bottom[0])

    def forward_cpu(self, bottom, top):
        pass

    def backward_cpu(self, top, propagate_down, bottom):
        pass

    # the shared SyncedMemory serves the device side too: nothing to copy
    forward_gpu = forward_cpu
    backward_gpu = backward_cpu


@register_layer("Flatten")
class FlattenLayer(_ViewLayer):
    """Merges the axes [axis, end_axis] into one."""

    def top_shape(self, bottom):
        param = self.layer_param.flatten_param
        start = axis_index(self, bottom, param.axis)
        end = axis_index(self, bottom, param.end_axis, "end_axis")
        return bottom.shape[:start] + (bottom.count_axes(start, end + 1),) + bottom.shape[end + 1:]


@register_layer("Reshape")
class ReshapeLayer(_ViewLayer):
    """Replaces the axes [axis, axis + num_axes) by reshape_param.shape; 0 copies a dimension, one -1 is inferred."""

    def layer_setup(self, bottom, top):
        super().layer_setup(bottom, top)
        dims = list(self.layer_param.reshape_param.shape.dim)
        self.copy_axes = [i for i, d in enumerate(dims) if d == 0]
        inferred = [i for i, d in enumerate(dims) if d == -1]
        if len(inferred) > 1:
            raise KaffeError(f"Reshape layer '{self.name}': new shape {shape_text(dims)} contains multiple -1 dims; "
                             f"at most a single (1) value of -1 may be specified")
        if any(d < -1 for d in dims):
            raise KaffeError(f"Reshape layer '{self.name}': new shape {shape_text(dims)} has a dimension below -1")
        self.inferred_axis = inferred[0] if inferred else None
        self.dims = dims

    def top_shape(self, bottom):
        param = self.layer_param.reshape_param
        n = bottom.num_axes
        start = param.axis if param.axis >= 0 else n + param.axis + 1
        if not 0 <= start <= n:
            raise KaffeError(f"Reshape layer '{self.name}': axis {param.axis} out of range for a {n}-D input "
                             f"of shape {shape_text(bottom.shape)}")
        if param.num_axes < -1:
            raise KaffeError(f"Reshape layer '{self.name}': num_axes must be >= 0, or -1 for all; "
                             f"got {param.num_axes}")
        end = n if param.num_axes == -1 else start + param.num_axes
        if end > n:
            raise KaffeError(f"Reshape layer '{self.name}': end_axis = axis + num_axes = {end} is out of range "
                             f"for an input of shape {shape_text(bottom.shape)}")
        shape = list(bottom.shape[:start]) + self.dims + list(bottom.shape[end:])
        for i in self.copy_axes:
            if start + i >= n:
                raise KaffeError(f"Reshape layer '{self.name}': new shape {shape_text(self.dims)} contains a 0, but "
                                 f"there was no corresponding bottom axis to copy (input shape "
                                 f"{shape_text(bottom.shape)})")
            shape[start + i] = bottom.shape[start + i]
        if self.inferred_axis is not None:
            shape[start + self.inferred_axis] = 1
            explicit = int(np.prod(shape, dtype=np.int64))
            if explicit == 0 or bottom.count % explicit:
                raise KaffeError(f"Reshape layer '{self.name}': bottom count ({bottom.count}, shape "
                                 f"{shape_text(bottom.shape)}) must be divisible by the product of the specified "
                                 f"dimensions ({explicit})")
            shape[start + self.inferred_axis] = bottom.count // explicit
        return tuple(shape)


@register_layer("Concat")
class ConcatLayer(Layer):
    """Joins the bottoms along concat_param.axis (or the legacy concat_dim)."""
    min_bottom_blobs = 1
    exact_num_top_blobs = 1

    def layer_setup(self, bottom, top):
        param = self.layer_param.concat_param
        if param.HasField("axis") and param.HasField("concat_dim"):
            raise KaffeError(f"Concat layer '{self.name}': either axis or concat_dim should be specified; not both")

    def reshape(self, bottom, top):
        param = self.layer_param.concat_param
        first = bottom[0]
        if param.HasField("concat_dim"):
            axis = param.concat_dim
            if axis >= first.num_axes:
                raise KaffeError(f"Concat layer '{self.name}': concat_dim {axis} out of range for an input of "
                                 f"shape {shape_text(first.shape)}")
        else:
            axis = axis_index(self, first, param.axis)
        shape = list(first.shape)
        for b in bottom[1:]:
            if b.num_axes != first.num_axes or any(
                    j != axis and d != e for j, (d, e) in enumerate(zip(b.shape, first.shape))):
                raise KaffeError(f"Concat layer '{self.name}': all inputs must have the same shape, except at "
                                 f"concat axis {axis}; got {shape_text(first.shape)} and {shape_text(b.shape)}")
            shape[axis] += b.shape[axis]
        self.axis = axis
        top[0].reshape(shape)
        if len(bottom) == 1:
            top[0].share_data(first)
            top[0].share_diff(first)

    def _slices(self, bottom):
        offset = 0
        for b in bottom:
            size = b.shape[self.axis]
            yield (slice(None),) * self.axis + (slice(offset, offset + size),)
            offset += size

    def forward_cpu(self, bottom, top):
        if len(bottom) == 1:
            return
        out = top[0].mutable_cpu_data()
        for b, index in zip(bottom, self._slices(bottom)):
            out[index] = b.cpu_data()

    def backward_cpu(self, top, propagate_down, bottom):
        if len(bottom) == 1:
            return
        dy = top[0].cpu_diff()
        for b, index, down in zip(bottom, self._slices(bottom), propagate_down):
            if down:
                b.mutable_cpu_diff()[...] = dy[index]

    def _copy_gpu(self, bottom, top, forward, propagate_down=None):
        """One strided copy per bottom: bottom -> its slab of the top (forward), or back (backward)."""
        inner = top[0].count_axes(self.axis + 1)
        whole_block = top[0].shape[self.axis] * inner
        whole = top[0].mutable_gpu_data() if forward else top[0].gpu_diff()
        offset = 0
        for i, b in enumerate(bottom):
            part_block = b.shape[self.axis] * inner
            if forward or propagate_down[i]:
                part = b.gpu_data() if forward else b.mutable_gpu_diff()
                opencl.launch("layers/common.cl", "concat_copy", b.count, *opencl.device_args(part), *opencl.device_args(whole),
                       part_block, whole_block, offset, forward)
            offset += part_block

    def forward_gpu(self, bottom, top):
        if len(bottom) > 1:
            self._copy_gpu(bottom, top, forward=True)

    def backward_gpu(self, top, propagate_down, bottom):
        if len(bottom) > 1:
            self._copy_gpu(bottom, top, forward=False, propagate_down=propagate_down)


@register_layer("Eltwise")
class EltwiseLayer(Layer):
    """PROD, SUM (with one optional coeff per bottom) or MAX of same-shaped bottoms."""
    min_bottom_blobs = 2
    exact_num_top_blobs = 1

    def layer_setup(self, bottom, top):
        param = self.layer_param.eltwise_param
        if param.coeff and len(param.coeff) != len(bottom):
            raise KaffeError(f"Eltwise layer '{self.name}' takes one coefficient per bottom blob: "
                             f"{len(param.coeff)} coeffs for {len(bottom)} bottoms")
        if param.operation == caffe_pb2.EltwiseParameter.PROD and param.coeff:
            raise KaffeError(f"Eltwise layer '{self.name}' only takes coefficients for summation")
        self.op = param.operation
        self.coeffs = [np.float32(c) for c in param.coeff] or [np.float32(1)] * len(bottom)
        self.stable_prod_grad = param.stable_prod_grad
        self.max_idx = None
        self.max_idx_gpu = None  # MAX's argmax on the device (int32)

    def reshape(self, bottom, top):
        for b in bottom[1:]:
            if b.shape != bottom[0].shape:
                raise KaffeError(f"Eltwise layer '{self.name}': all bottoms must have the same shape; got "
                                 f"{shape_text(bottom[0].shape)} and {shape_text(b.shape)}")
        top[0].reshape_like(bottom[0])

    def forward_cpu(self, bottom, top):
        data = [b.cpu_data() for b in bottom]
        if self.op == caffe_pb2.EltwiseParameter.PROD:
            out = data[0] * data[1]
            for d in data[2:]:
                out *= d
        elif self.op == caffe_pb2.EltwiseParameter.SUM:
            out = self.coeffs[0] * data[0]
            for c, d in zip(self.coeffs[1:], data[1:]):
                out += c * d
        else:
            # ties between the first two go to bottom 1, later bottoms must be strictly greater (Caffe's order)
            first = data[0] > data[1]
            out = np.where(first, data[0], data[1])
            self.max_idx = np.where(first, 0, 1).astype(np.int32)
            for i, d in enumerate(data[2:], start=2):
                better = d > out
                out = np.where(better, d, out)
                self.max_idx[better] = i
        top[0].mutable_cpu_data()[...] = out

    def backward_cpu(self, top, propagate_down, bottom):
        dy = top[0].cpu_diff()
        for i, b in enumerate(bottom):
            if not propagate_down[i]:
                continue
            if self.op == caffe_pb2.EltwiseParameter.PROD:
                if self.stable_prod_grad:
                    others = [o.cpu_data() for j, o in enumerate(bottom) if j != i]
                    grad = others[0].copy()
                    for o in others[1:]:
                        grad *= o
                else:
                    grad = top[0].cpu_data() / b.cpu_data()
                dx = grad * dy
            elif self.op == caffe_pb2.EltwiseParameter.SUM:
                dx = dy if self.coeffs[i] == 1 else self.coeffs[i] * dy
            else:
                dx = np.where(self.max_idx == i, dy, np.float32(0))
            b.mutable_cpu_diff()[...] = dx

    def forward_gpu(self, bottom, top):
        data = [b.gpu_data() for b in bottom]
        out = top[0].mutable_gpu_data()
        if self.op == caffe_pb2.EltwiseParameter.PROD:
            multiply = _elementwise("multiply", _multiply, ("a", "b"))
            multiply(out, data[0], data[1])
            for d in data[2:]:
                multiply(out, out, d)
        elif self.op == caffe_pb2.EltwiseParameter.SUM:
            opencl.scale(self.coeffs[0], data[0], out=out)
            for c, d in zip(self.coeffs[1:], data[1:]):
                opencl.axpy(c, d, out)
        else:
            import pyopencl.array as cla  # an int32 array: opencl.empty makes float32 ones
            dev = opencl.current()
            self.max_idx_gpu = cla.empty(dev.queue, out.size, np.int32, allocator=dev.allocator)
            for i in range(1, len(data)):
                opencl.launch("layers/common.cl", "eltwise_max_forward", out.size, *opencl.device_args(data[0]),
                       *opencl.device_args(data[i]), *opencl.device_args(out), self.max_idx_gpu.data, i)

    def backward_gpu(self, top, propagate_down, bottom):
        dy = top[0].gpu_diff()
        for i, b in enumerate(bottom):
            if not propagate_down[i]:
                continue
            if self.op == caffe_pb2.EltwiseParameter.PROD:
                if self.stable_prod_grad:
                    # the product of the other bottoms, times dy
                    factors = [o.gpu_data() for j, o in enumerate(bottom) if j != i] + [dy]
                    diff = b.mutable_gpu_diff()
                    multiply = _elementwise("multiply", _multiply, ("a", "b"))
                    multiply(diff, factors[0], factors[1])
                    for f in factors[2:]:
                        multiply(diff, diff, f)
                else:
                    y, x = top[0].gpu_data(), b.gpu_data()
                    _elementwise("quotient_gradient", _quotient_gradient, ("y", "x", "dy"))(
                        b.mutable_gpu_diff(), y, x, dy)
            elif self.op == caffe_pb2.EltwiseParameter.SUM:
                if self.coeffs[i] == 1:
                    opencl.copy(dy, b.mutable_gpu_diff())
                else:
                    opencl.scale(self.coeffs[i], dy, out=b.mutable_gpu_diff())
            else:
                opencl.launch("layers/common.cl", "eltwise_max_backward", dy.size, *opencl.device_args(dy),
                       self.max_idx_gpu.data, *opencl.device_args(b.mutable_gpu_diff()), i)


@register_layer("Silence")
class SilenceLayer(Layer):
    """Takes bottoms and gives nothing; backward zeroes the bottoms' diffs."""
    min_bottom_blobs = 1
    exact_num_top_blobs = 0

    def reshape(self, bottom, top):
        pass

    def forward_cpu(self, bottom, top):
        pass

    def backward_cpu(self, top, propagate_down, bottom):
        for b, down in zip(bottom, propagate_down):
            if down:
                b.mutable_cpu_diff()[...] = 0

    def forward_gpu(self, bottom, top):
        pass

    def backward_gpu(self, top, propagate_down, bottom):
        for b, down in zip(bottom, propagate_down):
            if down:
                opencl.fill(b.mutable_gpu_diff(), 0.0)


def softmax(x, axis):
    """Softmax of a float32 array along `axis`, shifted by the maximum so that exp cannot overflow."""
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    e /= e.sum(axis=axis, keepdims=True)
    return e


def channel_split(blob, axis):
    """(outer, channels, inner) sizes of a blob around `axis` (a canonical index)."""
    return blob.count_axes(0, axis), blob.shape[axis], blob.count_axes(axis + 1)


def softmax_gpu(x, out, dims):
    """out = softmax of the device array x seen as `dims` (outer, channels, inner), over channels; out may be x.

    Caffe's passes: the maximum of each position, exp(x - max), the sum of each position, the division.
    """
    outer, channels, inner = dims
    per_position = opencl.empty(outer * inner)
    opencl.launch("layers/common.cl", "channel_max", outer * inner, *opencl.device_args(x), per_position.data, channels, inner)
    opencl.launch("layers/common.cl", "channel_subtract_exp", x.size, *opencl.device_args(x), *opencl.device_args(out),
           per_position.data, channels, inner)
    opencl.launch("layers/common.cl", "channel_sum", outer * inner, *opencl.device_args(out), per_position.data, channels, inner)
    opencl.launch("layers/common.cl", "channel_divide", x.size, *opencl.device_args(out), per_position.data, channels, inner)


@register_layer("Softmax")
class SoftmaxLayer(Layer):
    exact_num_bottom_blobs = 1
    exact_num_top_blobs = 1

    def reshape(self, bottom, top):
        self.axis = axis_index(self, bottom[0], self.layer_param.softmax_param.axis)
        if top[0] is not bottom[0]:
            top[0].reshape_like(bottom[0])

    def forward_cpu(self, bottom, top):
        top[0].mutable_cpu_data()[...] = softmax(bottom[0].cpu_data(), self.axis)

    def backward_cpu(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        y = top[0].cpu_data()
        dy = top[0].cpu_diff()
        dx = dy - (dy * y).sum(axis=self.axis, keepdims=True)
        dx *= y
        bottom[0].mutable_cpu_diff()[...] = dx

    def forward_gpu(self, bottom, top):
        x = bottom[0].gpu_data()
        softmax_gpu(x, top[0].mutable_gpu_data(), channel_split(bottom[0], self.axis))

    def backward_gpu(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        outer, channels, inner = channel_split(top[0], self.axis)
        y, dy = top[0].gpu_data(), top[0].gpu_diff()
        dot = opencl.empty(outer * inner)
        opencl.launch("layers/common.cl", "channel_dot", outer * inner, *opencl.device_args(dy), *opencl.device_args(y), dot.data,
               channels, inner)
        opencl.launch("layers/common.cl", "channel_subtract_multiply", y.size, *opencl.device_args(dy), *opencl.device_args(y),
               *opencl.device_args(bottom[0].mutable_gpu_diff()), dot.data, channels, inner)
