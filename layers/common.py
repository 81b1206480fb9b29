"""Plumbing and shape layers (Split, Flatten, Reshape, Concat, Slice, Tile, Eltwise, Silence, Filter, BatchReindex,
Parameter), Softmax, and the small computing layers Embed, Reduction, ArgMax, Bias and Scale.

Also the device helpers other layer modules share: channel_reduce_gpu / channel_apply_gpu work on data seen as
(outer, channels, inner), the layout of every per-channel broadcast and reduction (Bias, Scale, PReLU, BatchNorm).
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


# -- Concat and Slice: one axis cut into consecutive slabs ----------------------------------------------------
def check_axis_or_legacy(layer, param, legacy):
    """Caffe's rule that axis and the legacy field (concat_dim, slice_dim) exclude each other."""
    if param.HasField("axis") and param.HasField(legacy):
        raise KaffeError(f"{layer.type} layer '{layer.name}': either axis or {legacy} should be specified; not both")


def axis_or_legacy(layer, blob, param, legacy):
    """The cut axis: the legacy field when set (non-negative only), else param.axis (negatives count from the end)."""
    if param.HasField(legacy):
        axis = getattr(param, legacy)
        if axis >= blob.num_axes:
            raise KaffeError(f"{layer.type} layer '{layer.name}': {legacy} {axis} out of range for an input of "
                             f"shape {shape_text(blob.shape)}")
        return axis
    return axis_index(layer, blob, param.axis)


def slab_indices(axis, sizes):
    """numpy indices of consecutive slabs of the given sizes along axis."""
    offset = 0
    for size in sizes:
        yield (slice(None),) * axis + (slice(offset, offset + size),)
        offset += size


def copy_slabs_gpu(whole, whole_buffer, parts, part_buffer, axis, to_whole):
    """One strided concat_copy per part between its own buffer and its slab along axis of whole's buffer,
    part -> whole when to_whole, else back. part_buffer(i) gives part i's buffer, or None to skip that part."""
    inner = whole.count_axes(axis + 1)
    whole_block = whole.shape[axis] * inner
    offset = 0
    for i, part in enumerate(parts):
        part_block = part.shape[axis] * inner
        buffer = part_buffer(i)
        if buffer is not None:
            opencl.launch(KERNELS, "concat_copy", part.count, *opencl.device_args(buffer),
                          *opencl.device_args(whole_buffer), part_block, whole_block, offset, to_whole)
        offset += part_block


@register_layer("Concat")
class ConcatLayer(Layer):
    """Joins the bottoms along concat_param.axis (or the legacy concat_dim)."""
    min_bottom_blobs = 1
    exact_num_top_blobs = 1

    def layer_setup(self, bottom, top):
        check_axis_or_legacy(self, self.layer_param.concat_param, "concat_dim")

    def reshape(self, bottom, top):
        first = bottom[0]
        axis = axis_or_legacy(self, first, self.layer_param.concat_param, "concat_dim")
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
        return slab_indices(self.axis, [b.shape[self.axis] for b in bottom])

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

    def forward_gpu(self, bottom, top):
        if len(bottom) > 1:
            copy_slabs_gpu(top[0], top[0].mutable_gpu_data(), bottom, lambda i: bottom[i].gpu_data(), self.axis,
                           to_whole=True)

    def backward_gpu(self, top, propagate_down, bottom):
        if len(bottom) > 1:
            copy_slabs_gpu(top[0], top[0].gpu_diff(), bottom,
                           lambda i: bottom[i].mutable_gpu_diff() if propagate_down[i] else None, self.axis,
                           to_whole=False)


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
        elif self.op == caffe_pb2.EltwiseParameter.SUM and all(c == 1 for c in self.coeffs):
            # plain sums (ResNet's shortcuts) in one pass each, straight into the top: 1 * x is x
            out = top[0].mutable_cpu_data()
            np.add(data[0], data[1], out=out)
            for d in data[2:]:
                np.add(out, d, out=out)
            return
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

    Caffe's passes (the maximum of each position, exp(x - max), the sum of each position, the division) in
    one work-item per position, one launch.
    """
    outer, channels, inner = dims
    opencl.launch("layers/common.cl", "channel_softmax", outer * inner, *opencl.device_args(x),
                  *opencl.device_args(out), channels, inner)


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


# -- device helpers over (outer, channels, inner) data ------------------------------------------------------------
KERNELS = "layers/common.cl"
# channel_reduce's summed terms and channel_apply's operations (the TERM_* / APPLY_* of common.cl)
TERM_X, TERM_XY, TERM_XY_NONPOSITIVE_Y, TERM_ABS, TERM_SQUARE = range(5)
APPLY_ADD, APPLY_MULTIPLY, APPLY_SUBTRACT, APPLY_DIVIDE = range(4)


def channel_reduce_gpu(x, dims, out, alpha=1.0, beta=0.0, term=TERM_X, y=None):
    """out[c] = alpha * sum over (outer, inner) of term(x, y) + beta * out[c], for x seen as dims = (outer,
    channels, inner); one work-group per channel, its size fitted to the values each channel has."""
    outer, channels, inner = dims
    if channels == 0:
        return
    group = 32
    while group < 256 and group < outer * inner:
        group *= 2
    opencl.kernel(KERNELS, "channel_reduce", {"REDUCE_GROUP": group})(
        opencl.queue(), (channels * group,), (group,), np.int32(outer), np.int32(channels), np.int32(inner),
        *opencl.device_args(x), *opencl.device_args(x if y is None else y), *opencl.device_args(out),
        np.float32(alpha), np.float32(beta), np.int32(term))


def channel_apply_gpu(x, out, values, channels, inner, op):
    """out = x (op) values[channel], the channel of flat index i being (i // inner) % channels; out may be x."""
    opencl.launch(KERNELS, "channel_apply", x.size, *opencl.device_args(x), *opencl.device_args(out),
                  *opencl.device_args(values), channels, inner, op)


def channel_sums(array, dims):
    """The per-channel sums of a host array seen as dims = (outer, channels, inner)."""
    return array.reshape(dims).sum(axis=(0, 2))


# -- Slice, Tile ------------------------------------------------------------------------------------------------
@register_layer("Slice")
class SliceLayer(Layer):
    """Cuts the bottom along an axis at slice_point (or into equal parts); legacy slice_dim names the axis."""
    exact_num_bottom_blobs = 1
    min_top_blobs = 1

    def layer_setup(self, bottom, top):
        check_axis_or_legacy(self, self.layer_param.slice_param, "slice_dim")

    def reshape(self, bottom, top):
        param = self.layer_param.slice_param
        x = bottom[0]
        axis = axis_or_legacy(self, x, param, "slice_dim")
        size = x.shape[axis]
        points = list(param.slice_point)
        if points:
            if len(points) != len(top) - 1:
                raise KaffeError(f"Slice layer '{self.name}': {len(points)} slice_point values for {len(top)} tops "
                                 f"(needs one fewer than the tops)")
            if len(top) > size:
                raise KaffeError(f"Slice layer '{self.name}': {len(top)} tops, more than the {size} values of "
                                 f"axis {axis} of {shape_text(x.shape)}")
            sizes, previous = [], 0
            for point in points + [size]:
                if point <= previous:
                    raise KaffeError(f"Slice layer '{self.name}': slice points {points} must increase strictly "
                                     f"within (0, {size}) (axis {axis} of {shape_text(x.shape)})")
                sizes.append(point - previous)
                previous = point
        else:
            if size % len(top):
                raise KaffeError(f"Slice layer '{self.name}': number of top blobs ({len(top)}) should evenly divide "
                                 f"input slice axis ({size}, axis {axis} of {shape_text(x.shape)})")
            sizes = [size // len(top)] * len(top)
        self.axis, self.sizes = axis, sizes
        for t, part in zip(top, sizes):
            t.reshape(x.shape[:axis] + (part,) + x.shape[axis + 1:])
        if len(top) == 1:
            top[0].share_data(x)
            top[0].share_diff(x)

    def _slices(self):
        return slab_indices(self.axis, self.sizes)

    def forward_cpu(self, bottom, top):
        if len(top) == 1:
            return
        x = bottom[0].cpu_data()
        for t, index in zip(top, self._slices()):
            t.mutable_cpu_data()[...] = x[index]

    def backward_cpu(self, top, propagate_down, bottom):
        if len(top) == 1 or not propagate_down[0]:
            return
        dx = bottom[0].mutable_cpu_diff()
        for t, index in zip(top, self._slices()):
            dx[index] = t.cpu_diff()

    # Concat's copies with the roles turned: each top is a slab ("part") of the bottom ("whole").
    def forward_gpu(self, bottom, top):
        if len(top) > 1:
            copy_slabs_gpu(bottom[0], bottom[0].gpu_data(), top, lambda i: top[i].mutable_gpu_data(), self.axis,
                           to_whole=False)

    def backward_gpu(self, top, propagate_down, bottom):
        if len(top) > 1 and propagate_down[0]:
            copy_slabs_gpu(bottom[0], bottom[0].mutable_gpu_diff(), top, lambda i: top[i].gpu_diff(), self.axis,
                           to_whole=True)


@register_layer("Tile")
class TileLayer(Layer):
    """Repeats the bottom `tiles` times along `axis` (each block of axes [axis, end) is repeated whole)."""
    exact_num_bottom_blobs = 1
    exact_num_top_blobs = 1

    def layer_setup(self, bottom, top):
        param = self.layer_param.tile_param
        if not param.HasField("tiles"):
            raise KaffeError(f"Tile layer '{self.name}': number of tiles must be specified")
        if param.tiles <= 0:
            raise KaffeError(f"Tile layer '{self.name}': number of tiles must be positive, got {param.tiles}")
        self.tiles = param.tiles

    def reshape(self, bottom, top):
        _refuse_in_place(self, bottom, top)
        axis = axis_index(self, bottom[0], self.layer_param.tile_param.axis)
        self.outer, self.inner = bottom[0].count_axes(0, axis), bottom[0].count_axes(axis)
        shape = list(bottom[0].shape)
        shape[axis] *= self.tiles
        top[0].reshape(shape)

    def forward_cpu(self, bottom, top):
        x = bottom[0].cpu_data().reshape(self.outer, 1, self.inner)
        top[0].mutable_cpu_data().reshape(self.outer, self.tiles, self.inner)[...] = x

    def backward_cpu(self, top, propagate_down, bottom):
        if propagate_down[0]:
            dy = top[0].cpu_diff().reshape(self.outer, self.tiles, self.inner)
            bottom[0].mutable_cpu_diff()[...] = dy.sum(axis=1).reshape(bottom[0].shape)

    def forward_gpu(self, bottom, top):
        opencl.launch(KERNELS, "tile_forward", top[0].count, *opencl.device_args(bottom[0].gpu_data()),
                      *opencl.device_args(top[0].mutable_gpu_data()), self.tiles, self.inner)

    def backward_gpu(self, top, propagate_down, bottom):
        if propagate_down[0]:
            opencl.launch(KERNELS, "tile_backward", bottom[0].count, *opencl.device_args(top[0].gpu_diff()),
                          *opencl.device_args(bottom[0].mutable_gpu_diff()), self.tiles, self.inner)


# -- Reduction, ArgMax ----------------------------------------------------------------------------------------------
_REDUCTION = caffe_pb2.ReductionParameter
_REDUCTION_TERMS = {_REDUCTION.SUM: TERM_X, _REDUCTION.MEAN: TERM_X, _REDUCTION.ASUM: TERM_ABS,
                    _REDUCTION.SUMSQ: TERM_SQUARE}


@register_layer("Reduction")
class ReductionLayer(Layer):
    """coeff * SUM / ASUM / SUMSQ / MEAN over all axes from `axis` on; the top keeps the axes before it."""
    exact_num_bottom_blobs = 1
    exact_num_top_blobs = 1

    def layer_setup(self, bottom, top):
        self.op = self.layer_param.reduction_param.operation

    def reshape(self, bottom, top):
        param = self.layer_param.reduction_param
        axis = axis_index(self, bottom[0], param.axis)
        top[0].reshape(bottom[0].shape[:axis])
        self.num, self.dim = bottom[0].count_axes(0, axis), bottom[0].count_axes(axis)
        self.coeff = np.float32(param.coeff)
        if self.op == _REDUCTION.MEAN:
            self.coeff /= np.float32(self.dim)

    def forward_cpu(self, bottom, top):
        x = bottom[0].cpu_data().reshape(self.num, self.dim)
        if self.op == _REDUCTION.ASUM:
            x = np.abs(x)
        elif self.op == _REDUCTION.SUMSQ:
            x = x * x
        top[0].mutable_cpu_data().reshape(self.num)[...] = self.coeff * x.sum(axis=1)

    def backward_cpu(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        g = self.coeff * top[0].cpu_diff().reshape(self.num, 1)
        x = bottom[0].cpu_data().reshape(self.num, self.dim)
        if self.op == _REDUCTION.ASUM:
            dx = g * np.sign(x)
        elif self.op == _REDUCTION.SUMSQ:
            dx = 2 * g * x
        else:
            dx = np.broadcast_to(g, x.shape)
        bottom[0].mutable_cpu_diff()[...] = dx.reshape(bottom[0].shape)

    def forward_gpu(self, bottom, top):
        channel_reduce_gpu(bottom[0].gpu_data(), (1, self.num, self.dim), top[0].mutable_gpu_data(),
                           alpha=self.coeff, term=_REDUCTION_TERMS[self.op])

    def backward_gpu(self, top, propagate_down, bottom):
        if propagate_down[0]:
            opencl.launch(KERNELS, "reduction_backward", bottom[0].count, *opencl.device_args(bottom[0].gpu_data()),
                          *opencl.device_args(top[0].gpu_diff()), *opencl.device_args(bottom[0].mutable_gpu_diff()),
                          self.dim, float(self.coeff), int(self.op))


@register_layer("ArgMax")
class ArgMaxLayer(Layer):
    """The top_k indices (or, with out_max_val, indices and values) of the largest values.

    Without `axis`, over the flattened values of each item: the top is (N, 1 or 2, top_k) padded with 1s to the
    bottom's number of axes, indices first then values. With `axis`, along it: the top has top_k there, holding the
    values (out_max_val) or the indices. Ties go to the higher index (Caffe sorts (value, index) pairs descending).
    CPU only, as in Caffe; no backward.
    """
    exact_num_bottom_blobs = 1
    exact_num_top_blobs = 1

    def layer_setup(self, bottom, top):
        param = self.layer_param.argmax_param
        self.top_k, self.out_max_val, self.has_axis = param.top_k, param.out_max_val, param.HasField("axis")
        if self.top_k < 1:
            raise KaffeError(f"ArgMax layer '{self.name}': top_k must not be less than 1, got {self.top_k}")
        if self.has_axis:
            axis = axis_index(self, bottom[0], param.axis)
            if bottom[0].shape[axis] < self.top_k:
                raise KaffeError(f"ArgMax layer '{self.name}': top_k ({self.top_k}) must be less than or equal to "
                                 f"the dimension of axis {axis} of {shape_text(bottom[0].shape)}")
        elif self.top_k > bottom[0].count_axes(1):
            raise KaffeError(f"ArgMax layer '{self.name}': top_k ({self.top_k}) must be less than or equal to the "
                             f"number of classes ({bottom[0].count_axes(1)}, input {shape_text(bottom[0].shape)})")

    def reshape(self, bottom, top):
        x = bottom[0]
        if self.has_axis:
            self.axis = axis_index(self, x, self.layer_param.argmax_param.axis)
            shape = list(x.shape)
            shape[self.axis] = self.top_k
            self.dims = (x.count_axes(0, self.axis), x.shape[self.axis], x.count_axes(self.axis + 1))
        else:
            shape = [1] * max(x.num_axes, 3)
            shape[0], shape[2] = x.shape[0], self.top_k
            if self.out_max_val:
                shape[1] = 2
            self.dims = (x.shape[0], x.count_axes(1), 1)
        top[0].reshape(shape)

    def forward_cpu(self, bottom, top):
        v = bottom[0].cpu_data().reshape(self.dims)
        dim = self.dims[1]
        # a stable descending sort of the reversed axis puts the higher index first among equal values
        order = np.argsort(-v[:, ::-1, :], axis=1, kind="stable")[:, :self.top_k, :]
        index = (dim - 1) - order
        values = np.take_along_axis(v, index, axis=1)
        if self.has_axis:
            out = values if self.out_max_val else index
        elif self.out_max_val:
            out = np.concatenate([index, values], axis=1)
        else:
            out = index
        top[0].mutable_cpu_data()[...] = out.reshape(top[0].shape)

    def backward_cpu(self, top, propagate_down, bottom):
        if propagate_down[0]:
            raise KaffeError(f"ArgMax layer '{self.name}' has no backward (not implemented in Caffe either)")


# -- Bias, Scale ----------------------------------------------------------------------------------------------------
def _broadcast_shape(layer, bottom, axis_param, num_axes):
    """The shape of a learned Bias/Scale parameter: bottom's axes [axis, axis + num_axes) (num_axes -1: to the end)."""
    axis = axis_index(layer, bottom, axis_param)
    if num_axes < -1:
        raise KaffeError(f"{layer.type} layer '{layer.name}': num_axes must be non-negative, or -1 to extend to the "
                         f"end of bottom[0]; got {num_axes}")
    if num_axes >= 0 and bottom.num_axes < axis + num_axes:
        raise KaffeError(f"{layer.type} layer '{layer.name}': the parameter's shape extends past bottom[0]'s shape "
                         f"{shape_text(bottom.shape)} when applied starting with axis {axis} over {num_axes} axes")
    return bottom.shape[axis:] if num_axes == -1 else bottom.shape[axis:axis + num_axes]


def _broadcast_dims(layer, bottom, operand, axis_param):
    """(outer, dim, inner) of bottom for an operand that spans its axes from axis on (a scalar operand: axis 0)."""
    axis = 0 if operand.num_axes == 0 else axis_index(layer, bottom, axis_param)
    end = axis + operand.num_axes
    if bottom.num_axes < end or bottom.shape[axis:end] != operand.shape:
        raise KaffeError(f"{layer.type} layer '{layer.name}': dimension mismatch between bottom[0] "
                         f"{shape_text(bottom.shape)} from axis {axis} and the operand {shape_text(operand.shape)}")
    return bottom.count_axes(0, axis), operand.count, bottom.count_axes(end)


@register_layer("Bias")
class BiasLayer(Layer):
    """bottom[0] + b, b being bottom[1] or a learned parameter, broadcast over the axes around [axis, axis + n)."""
    min_bottom_blobs = 1
    max_bottom_blobs = 2
    exact_num_top_blobs = 1

    def layer_setup(self, bottom, top):
        param = self.layer_param.bias_param
        if len(bottom) == 1 and not self.blobs:
            self.init_params((_broadcast_shape(self, bottom[0], param.axis, param.num_axes), param.filler))

    def reshape(self, bottom, top):
        bias = bottom[1] if len(bottom) > 1 else self.blobs[0]
        self.dims = _broadcast_dims(self, bottom[0], bias, self.layer_param.bias_param.axis)
        if top[0] is not bottom[0]:
            top[0].reshape_like(bottom[0])

    def _bias(self, bottom):
        return bottom[1] if len(bottom) > 1 else self.blobs[0]

    def _bias_gradient_wanted(self, bottom, propagate_down):
        return propagate_down[1] if len(bottom) > 1 else self.param_propagate_down[0]

    def forward_cpu(self, bottom, top):
        outer, dim, inner = self.dims
        b = self._bias(bottom).cpu_data().reshape(1, dim, 1)
        y = bottom[0].cpu_data().reshape(self.dims) + b
        top[0].mutable_cpu_data()[...] = y.reshape(top[0].shape)

    def backward_cpu(self, top, propagate_down, bottom):
        dy = top[0].cpu_diff()
        if self._bias_gradient_wanted(bottom, propagate_down):
            bias = self._bias(bottom)
            sums = channel_sums(dy, self.dims).reshape(bias.shape)
            if len(bottom) > 1:
                bias.mutable_cpu_diff()[...] = sums
            else:  # parameter gradients accumulate
                bias.mutable_cpu_diff()[...] += sums
        if propagate_down[0] and bottom[0] is not top[0]:
            bottom[0].mutable_cpu_diff()[...] = dy

    def forward_gpu(self, bottom, top):
        _, dim, inner = self.dims
        channel_apply_gpu(bottom[0].gpu_data(), top[0].mutable_gpu_data(), self._bias(bottom).gpu_data(), dim, inner,
                          APPLY_ADD)

    def backward_gpu(self, top, propagate_down, bottom):
        dy = top[0].gpu_diff()
        if self._bias_gradient_wanted(bottom, propagate_down):
            channel_reduce_gpu(dy, self.dims, self._bias(bottom).mutable_gpu_diff(), beta=float(len(bottom) == 1))
        if propagate_down[0] and bottom[0] is not top[0]:
            opencl.copy(dy, bottom[0].mutable_gpu_diff())


@register_layer("Scale")
class ScaleLayer(Layer):
    """bottom[0] * s (+ b with bias_term), s being bottom[1] or a learned parameter (filler default constant 1).

    Parameter blobs: [scale, bias] with a learned scale, [bias] when the scale is bottom[1]; the bias has the
    scale's shape. In place, the input is kept for the scale's gradient.
    """
    min_bottom_blobs = 1
    max_bottom_blobs = 2
    exact_num_top_blobs = 1

    def layer_setup(self, bottom, top):
        param = self.layer_param.scale_param
        specs = []
        if len(bottom) == 1:
            filler = param.filler
            if not param.HasField("filler"):
                filler = caffe_pb2.FillerParameter(type="constant", value=1.0)
            specs.append((_broadcast_shape(self, bottom[0], param.axis, param.num_axes), filler))
        if param.bias_term:
            num_axes = bottom[1].num_axes if len(bottom) > 1 else param.num_axes
            specs.append((_broadcast_shape(self, bottom[0], param.axis, num_axes), param.bias_filler))
        if specs:
            self.init_params(*specs)
        self.bias_term = param.bias_term
        self.saved_input = None

    def _scale(self, bottom):
        return bottom[1] if len(bottom) > 1 else self.blobs[0]

    def reshape(self, bottom, top):
        self.dims = _broadcast_dims(self, bottom[0], self._scale(bottom), self.layer_param.scale_param.axis)
        if top[0] is not bottom[0]:
            top[0].reshape_like(bottom[0])

    def _scale_gradient_wanted(self, bottom, propagate_down):
        return propagate_down[1] if len(bottom) > 1 else self.param_propagate_down[0]

    def forward_cpu(self, bottom, top):
        _, dim, _ = self.dims
        x = bottom[0].cpu_data()
        if top[0] is bottom[0]:
            self.saved_input = x.copy()
        y = x.reshape(self.dims) * self._scale(bottom).cpu_data().reshape(1, dim, 1)
        if self.bias_term:
            y += self.blobs[-1].cpu_data().reshape(1, dim, 1)
        top[0].mutable_cpu_data()[...] = y.reshape(top[0].shape)

    def backward_cpu(self, top, propagate_down, bottom):
        _, dim, _ = self.dims
        dy = top[0].cpu_diff()
        scale = self._scale(bottom)
        if self.bias_term and self.param_propagate_down[-1]:
            self.blobs[-1].mutable_cpu_diff()[...] += channel_sums(dy, self.dims).reshape(self.blobs[-1].shape)
        if self._scale_gradient_wanted(bottom, propagate_down):
            x = self.saved_input if top[0] is bottom[0] else bottom[0].cpu_data()
            sums = channel_sums(dy * x, self.dims).reshape(scale.shape)
            if len(bottom) > 1:
                scale.mutable_cpu_diff()[...] = sums
            else:
                scale.mutable_cpu_diff()[...] += sums
        if propagate_down[0]:
            dx = dy.reshape(self.dims) * scale.cpu_data().reshape(1, dim, 1)
            bottom[0].mutable_cpu_diff()[...] = dx.reshape(bottom[0].shape)

    def forward_gpu(self, bottom, top):
        _, dim, inner = self.dims
        x = bottom[0].gpu_data()
        if top[0] is bottom[0]:
            self.saved_input = opencl.copy(x, opencl.scratch(self, "input", x.size)[:x.size])
        out = top[0].mutable_gpu_data()
        channel_apply_gpu(x, out, self._scale(bottom).gpu_data(), dim, inner, APPLY_MULTIPLY)
        if self.bias_term:
            channel_apply_gpu(out, out, self.blobs[-1].gpu_data(), dim, inner, APPLY_ADD)

    def backward_gpu(self, top, propagate_down, bottom):
        _, dim, inner = self.dims
        dy = top[0].gpu_diff()
        scale = self._scale(bottom)
        if self.bias_term and self.param_propagate_down[-1]:
            channel_reduce_gpu(dy, self.dims, self.blobs[-1].mutable_gpu_diff(), beta=1.0)
        if self._scale_gradient_wanted(bottom, propagate_down):
            x = self.saved_input if top[0] is bottom[0] else bottom[0].gpu_data()
            channel_reduce_gpu(dy, self.dims, scale.mutable_gpu_diff(), beta=float(len(bottom) == 1), term=TERM_XY,
                               y=x)
        if propagate_down[0]:
            channel_apply_gpu(dy, bottom[0].mutable_gpu_diff(), scale.gpu_data(), dim, inner, APPLY_MULTIPLY)


# -- Embed, BatchReindex, Filter, Parameter ---------------------------------------------------------------------------
def _row_indices(layer, values, rows, what):
    """Host float values as integer row indices in [0, rows), or a KaffeError naming the layer."""
    flat = values.reshape(-1)
    index = flat.astype(np.int64)
    bad = (flat < 0) | (flat >= rows) | (index != flat)
    if bad.any():
        raise KaffeError(f"{layer.type} layer '{layer.name}': {what} {flat[bad][0]:g} is not an integer in "
                         f"[0, {rows})")
    return index


@register_layer("Embed")
class EmbedLayer(Layer):
    """A lookup table: each bottom value (an integer index stored as a float, in [0, input_dim)) gives row
    `index` of the weight (input_dim, num_output), plus the bias (num_output,). The top appends num_output axis.

    The OpenCL forward gives zeros for an invalid index (the CPU raises); the weight gradient adds with atomics.
    """
    exact_num_bottom_blobs = 1
    exact_num_top_blobs = 1

    def layer_setup(self, bottom, top):
        param = self.layer_param.embed_param
        self.num_output, self.input_dim, self.bias_term = param.num_output, param.input_dim, param.bias_term
        if self.num_output <= 0:
            raise KaffeError(f"Embed layer '{self.name}': num_output must be positive, got {self.num_output}")
        if self.input_dim <= 0:
            raise KaffeError(f"Embed layer '{self.name}': input_dim must be positive, got {self.input_dim}")
        specs = [((self.input_dim, self.num_output), param.weight_filler)]
        if self.bias_term:
            specs.append(((self.num_output,), param.bias_filler))
        self.init_params(*specs)

    def allow_force_backward(self, bottom_index):
        return False

    def reshape(self, bottom, top):
        top[0].reshape(bottom[0].shape + (self.num_output,))

    def forward_cpu(self, bottom, top):
        index = _row_indices(self, bottom[0].cpu_data(), self.input_dim, "index")
        y = self.blobs[0].cpu_data()[index]
        if self.bias_term:
            y += self.blobs[1].cpu_data()
        top[0].mutable_cpu_data()[...] = y.reshape(top[0].shape)

    def backward_cpu(self, top, propagate_down, bottom):
        if propagate_down[0]:
            raise KaffeError(f"Embed layer '{self.name}': can't backpropagate to the Embed input (indices)")
        dy = top[0].cpu_diff().reshape(-1, self.num_output)
        if self.param_propagate_down[0]:
            index = _row_indices(self, bottom[0].cpu_data(), self.input_dim, "index")
            np.add.at(self.blobs[0].mutable_cpu_diff(), index, dy)
        if self.bias_term and self.param_propagate_down[1]:
            self.blobs[1].mutable_cpu_diff()[...] += dy.sum(axis=0)

    def forward_gpu(self, bottom, top):
        out = top[0].mutable_gpu_data()
        opencl.launch(KERNELS, "gather_rows", top[0].count, *opencl.device_args(self.blobs[0].gpu_data()),
                      *opencl.device_args(out), *opencl.device_args(bottom[0].gpu_data()), self.num_output,
                      self.input_dim)
        if self.bias_term:
            channel_apply_gpu(out, out, self.blobs[1].gpu_data(), self.num_output, 1, APPLY_ADD)

    def backward_gpu(self, top, propagate_down, bottom):
        if propagate_down[0]:
            raise KaffeError(f"Embed layer '{self.name}': can't backpropagate to the Embed input (indices)")
        dy = top[0].gpu_diff()
        if self.param_propagate_down[0]:
            weight_diff = self.blobs[0].mutable_gpu_diff()
            opencl.launch(KERNELS, "embed_weight_backward", top[0].count, *opencl.device_args(dy),
                          *opencl.device_args(bottom[0].gpu_data()), *opencl.device_args(weight_diff),
                          self.num_output, self.input_dim)
        if self.bias_term and self.param_propagate_down[1]:
            channel_reduce_gpu(dy, (bottom[0].count, self.num_output, 1), self.blobs[1].mutable_gpu_diff(), beta=1.0)


@register_layer("BatchReindex")
class BatchReindexLayer(Layer):
    """top[i] = bottom[0][bottom[1][i]] along axis 0; backward sums the diffs of repeated indices."""
    exact_num_bottom_blobs = 2
    exact_num_top_blobs = 1

    def allow_force_backward(self, bottom_index):
        return bottom_index == 0

    def reshape(self, bottom, top):
        if bottom[1].num_axes != 1:
            raise KaffeError(f"BatchReindex layer '{self.name}': the index bottom must be 1-D, got "
                             f"{shape_text(bottom[1].shape)}")
        top[0].reshape(bottom[1].shape[:1] + bottom[0].shape[1:])

    def _indices(self, bottom):
        # Caffe checks the indices on the host in either mode
        return _row_indices(self, bottom[1].cpu_data(), bottom[0].shape[0], "index")

    def forward_cpu(self, bottom, top):
        top[0].mutable_cpu_data()[...] = bottom[0].cpu_data()[self._indices(bottom)]

    def _check_propagate(self, propagate_down):
        if propagate_down[1]:
            raise KaffeError(f"BatchReindex layer '{self.name}': cannot backprop to the index")
        return propagate_down[0]

    def backward_cpu(self, top, propagate_down, bottom):
        if not self._check_propagate(propagate_down):
            return
        dx = np.zeros(bottom[0].shape, np.float32)
        np.add.at(dx, self._indices(bottom), top[0].cpu_diff())
        bottom[0].mutable_cpu_diff()[...] = dx

    def forward_gpu(self, bottom, top):
        self._indices(bottom)
        opencl.launch(KERNELS, "gather_rows", top[0].count, *opencl.device_args(bottom[0].gpu_data()),
                      *opencl.device_args(top[0].mutable_gpu_data()), *opencl.device_args(bottom[1].gpu_data()),
                      bottom[0].count_axes(1), bottom[0].shape[0])

    def backward_gpu(self, top, propagate_down, bottom):
        if not self._check_propagate(propagate_down):
            return
        opencl.launch(KERNELS, "reindex_backward", bottom[0].count, *opencl.device_args(top[0].gpu_diff()),
                      *opencl.device_args(bottom[0].mutable_gpu_diff()), *opencl.device_args(bottom[1].gpu_data()),
                      bottom[1].count, bottom[0].count_axes(1))


@register_layer("Filter")
class FilterLayer(Layer):
    """Keeps the items (axis 0) of every bottom but the last whose selector (the last bottom) is non-zero.

    As in Caffe, the first reshape (at setup) keeps every item, and the selector is read on the host in either mode
    (it decides the top shapes).
    """
    min_bottom_blobs = 2
    min_top_blobs = 1

    def layer_setup(self, bottom, top):
        if len(top) != len(bottom) - 1:
            raise KaffeError(f"Filter layer '{self.name}' needs one top per filtered bottom: {len(bottom)} bottoms "
                             f"(the last is the selector), {len(top)} tops")
        self.first_reshape = True
        self.selector_index = len(bottom) - 1

    def allow_force_backward(self, bottom_index):
        return bottom_index != self.selector_index

    def reshape(self, bottom, top):
        selector = bottom[-1]
        if any(d != 1 for d in selector.shape[1:]):
            raise KaffeError(f"Filter layer '{self.name}': selector blob dimensions must be singletons (1), except "
                             f"the first; got {shape_text(selector.shape)}")
        for b in bottom[:-1]:
            if b.num_axes == 0 or b.shape[0] != selector.shape[0]:
                raise KaffeError(f"Filter layer '{self.name}': each bottom should have the same 0th dimension as "
                                 f"the selector blob; got {shape_text(b.shape)} and {shape_text(selector.shape)}")
        self.indices = np.flatnonzero(selector.cpu_data().reshape(-1))
        kept = len(self.indices)
        if self.first_reshape:
            kept = selector.shape[0]
            self.first_reshape = False
        for t, b in zip(top, bottom):
            t.reshape((kept,) + b.shape[1:])

    def forward_cpu(self, bottom, top):
        for t, b in zip(top, bottom):
            t.mutable_cpu_data()[...] = b.cpu_data()[self.indices]

    def _check_propagate(self, propagate_down):
        if propagate_down[-1]:
            raise KaffeError(f"Filter layer '{self.name}' cannot backpropagate to the selector input")

    def backward_cpu(self, top, propagate_down, bottom):
        self._check_propagate(propagate_down)
        for t, b, down in zip(top, bottom, propagate_down):
            if down:
                dx = np.zeros(b.shape, np.float32)
                dx[self.indices] = t.cpu_diff()
                b.mutable_cpu_diff()[...] = dx

    def _device_indices(self):
        return opencl.to_device(self.indices.astype(np.float32)) if len(self.indices) else None

    def forward_gpu(self, bottom, top):
        index = self._device_indices()
        for t, b in zip(top, bottom):
            if index is not None:
                opencl.launch(KERNELS, "gather_rows", t.count, *opencl.device_args(b.gpu_data()),
                              *opencl.device_args(t.mutable_gpu_data()), *opencl.device_args(index), b.count_axes(1),
                              b.shape[0])

    def backward_gpu(self, top, propagate_down, bottom):
        self._check_propagate(propagate_down)
        index = self._device_indices()
        for t, b, down in zip(top, bottom, propagate_down):
            if down:
                diff = b.mutable_gpu_diff()
                opencl.fill(diff, 0.0)
                if index is not None:
                    opencl.launch(KERNELS, "scatter_rows", t.count, *opencl.device_args(t.gpu_diff()),
                                  *opencl.device_args(diff), index.data, b.count_axes(1))


@register_layer("Parameter")
class ParameterLayer(Layer):
    """Exposes its one parameter blob (parameter_param.shape, zeros) as its top, sharing data and diff."""
    exact_num_bottom_blobs = 0
    exact_num_top_blobs = 1

    def layer_setup(self, bottom, top):
        if not self.blobs:
            self.init_params((tuple(self.layer_param.parameter_param.shape.dim), None))
        elif len(self.blobs) != 1:
            raise KaffeError(f"Parameter layer '{self.name}' has one parameter blob, the LayerParameter stores "
                             f"{len(self.blobs)}")

    def reshape(self, bottom, top):
        top[0].reshape(self.blobs[0].shape)
        top[0].share_data(self.blobs[0])
        top[0].share_diff(self.blobs[0])

    def forward_cpu(self, bottom, top):
        pass  # the top is the parameter blob

    def backward_cpu(self, top, propagate_down, bottom):
        pass  # the top's diff is the parameter's diff

    forward_gpu = forward_cpu
    backward_gpu = backward_cpu
