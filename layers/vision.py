"""Vision layers: Convolution, Pooling and LRN, with Caffe's shapes, defaults and error checks.

im2col / col2im are shared with the layers built on the same column transform (Deconvolution, Im2col).
Windows are handled one kernel tap at a time: a tap reads a strided slice of the whole batch, so no Python
loop runs over samples or pixels.
"""
import itertools

import numpy as np

from ..engine import opencl
from ..engine.errors import KaffeError
from ..engine.layer import Layer, register_layer
from ..proto import caffe_pb2

FLT_MAX = np.float32(np.finfo(np.float32).max)
KERNELS = "layers/vision.cl"
LAUNCH_GROUP = 256  # work-group size of the one-work-item-per-element kernels
SUM_GROUP = 256  # work-group size of channel_sum
# the most floats one convolution's column buffer may hold: a batch whose columns need more is done in chunks
# of samples (one GEMM per group and chunk) so that memory stays bounded for big images and batches
COLUMN_BUFFER_LIMIT = 1 << 25


def _shape(shape):
    return "(" + ", ".join(str(d) for d in shape) + ")"


# -- OpenCL helpers -----------------------------------------------------------------------------------
def run_kernel(name, total, *args):
    """Run vision.cl kernel `name` with one work-item per i < total (see engine.opencl.launch)."""
    opencl.launch(KERNELS, name, total, *args, defines={"SUM_GROUP": SUM_GROUP})


def channel_sum(x, num, channels, inner, out):
    """out[c] += the sum of x (num, channels, inner) over num and inner (a bias gradient), on the device."""
    cl = opencl
    cl.kernel(KERNELS, "channel_sum", {"SUM_GROUP": SUM_GROUP})(
        cl.queue(), (channels * SUM_GROUP,), (SUM_GROUP,), np.int32(num), np.int32(channels), np.int32(inner),
        *opencl.device_args(x), *opencl.device_args(out))


# -- the column transform ---------------------------------------------------------------------------
def conv_out_size(size, kernel, stride, pad, dilation=1):
    return (size + 2 * pad - (dilation * (kernel - 1) + 1)) // stride + 1


def tap_span(in_size, out_size, offset, stride, pad):
    """Where one kernel tap (at `offset`, dilation included) reads real input along one axis.

    Output position o reads input o*stride + offset - pad. Returns (output slice, input slice) over the
    outputs whose input lies inside [0, in_size), or None when there are none (the tap sees only padding).
    """
    first = offset - pad
    lo = max(0, -(first // stride))
    hi = min(out_size, (in_size - 1 - first) // stride + 1)
    if hi <= lo:
        return None
    start = lo * stride + first
    return slice(lo, hi), slice(start, start + (hi - lo - 1) * stride + 1, stride)


def _tap_spans(in_shape, out_shape, kernel, stride, pad, dilation):
    """(tap index tuple, output slices, input slices) for every tap, row-major, that reads some real input."""
    per_axis = [[tap_span(n, o, i * d, s, p) for i in range(k)]
                for n, o, k, s, p, d in zip(in_shape, out_shape, kernel, stride, pad, dilation)]
    for taps in itertools.product(*(range(k) for k in kernel)):
        spans = [per_axis[a][i] for a, i in enumerate(taps)]
        if any(span is None for span in spans):
            continue
        yield taps, tuple(s[0] for s in spans), tuple(s[1] for s in spans)


def im2col(data, kernel, stride, pad, dilation):
    """(num, C, *spatial) -> columns of shape (C, *kernel, num, *out).

    Reshaped to (C*prod(kernel), num*prod(out)), row c*K + k holds tap k of channel c for every output
    position of every sample, so a filter bank (O, C*K) times it is the convolution of the whole batch.
    The taps are expanded one spatial axis at a time, last axis first, so that the big copies of the
    later stages move long contiguous runs.
    """
    num, channels, *spatial = data.shape
    dims = len(spatial)
    out = [conv_out_size(n, k, s, p, d) for n, k, s, p, d in zip(spatial, kernel, stride, pad, dilation)]
    current = data.swapaxes(0, 1)  # (C, num, *spatial)
    for axis in reversed(range(dims)):
        # current: (C, taps of the later axes, num, spatial[:axis + 1], out[axis + 1:])
        taps = dims - 1 - axis
        shape = current.shape[:1] + (kernel[axis],) + current.shape[1:2 + taps + axis] + (out[axis],) + \
            current.shape[3 + taps + axis:]
        # with no padding on this axis every cell is written; otherwise those reading padding stay 0
        expanded = (np.zeros if pad[axis] else np.empty)(shape, dtype=np.float32)
        for i in range(kernel[axis]):
            span = tap_span(spatial[axis], out[axis], i * dilation[axis], stride[axis], pad[axis])
            if span is not None:
                expanded[(slice(None), i) + (slice(None),) * (taps + 1 + axis) + (span[0],)] = \
                    current[(slice(None),) * (taps + 2 + axis) + (span[1],)]
        current = expanded
    return np.ascontiguousarray(current)


def col2im(col, image_shape, kernel, stride, pad, dilation, out=None):
    """The adjoint of im2col: sum columns (any reshape of (C, *kernel, num, *out)) into (num, C, *spatial).

    The taps are folded back one spatial axis at a time, first axis first (long contiguous runs while the
    array is biggest). `out`, if given, is overwritten (e.g. a bottom diff).
    """
    num, channels, *spatial = image_shape
    dims = len(spatial)
    out_shape = [conv_out_size(n, k, s, p, d) for n, k, s, p, d in zip(spatial, kernel, stride, pad, dilation)]
    current = col.reshape(channels, *kernel, num, *out_shape)
    for axis in range(dims):
        # current: (C, taps of this and later axes, num, spatial[:axis], out[axis:])
        taps = dims - axis
        shape = current.shape[:1] + current.shape[2:2 + taps + axis] + (spatial[axis],) + \
            current.shape[3 + taps + axis:]
        folded = np.zeros(shape, dtype=np.float32)
        for i in range(kernel[axis]):
            span = tap_span(spatial[axis], out_shape[axis], i * dilation[axis], stride[axis], pad[axis])
            if span is not None:
                folded[(slice(None),) * (taps + 1 + axis) + (span[1],)] += \
                    current[(slice(None), i) + (slice(None),) * (taps + axis) + (span[0],)]
        current = folded
    image = current.swapaxes(0, 1)
    if out is None:
        return np.ascontiguousarray(image)
    out[...] = image
    return out


def conv_geometry(param, num_spatial, where):
    """kernel, stride, pad, dilation tuples from a ConvolutionParameter, with Caffe's checks.

    Each is given once for all spatial axes or once per axis; kernel/stride/pad also as the 2-D-only
    *_h/*_w pairs, which may not be mixed with the repeated form. `where` names the layer in errors.
    """
    def per_axis(name, values, default):
        if len(values) not in (0, 1, num_spatial) or (default is None and not values):
            raise KaffeError(f"{where}: {name} must be specified once, or once per spatial dimension "
                             f"({name} specified {len(values)} times; {num_spatial} spatial dims)")
        if not values:
            return (default,) * num_spatial
        return tuple(int(values[0 if len(values) == 1 else i]) for i in range(num_spatial))

    def from_param(name, repeated_name, default):
        h, w = f"{name}_h", f"{name}_w"
        if param.HasField(h) or param.HasField(w):
            if num_spatial != 2:
                raise KaffeError(f"{where}: {h} & {w} can only be used for 2D convolution "
                                 f"(the input has {num_spatial} spatial axes)")
            if len(getattr(param, repeated_name)):
                raise KaffeError(f"{where}: either {repeated_name} or {h}/{w} should be specified; not both")
            return (getattr(param, h), getattr(param, w))
        return per_axis(repeated_name, getattr(param, repeated_name), default)

    kernel = from_param("kernel", "kernel_size", None)
    stride = from_param("stride", "stride", 1)
    pad = from_param("pad", "pad", 0)
    dilation = per_axis("dilation", param.dilation, 1)
    for name, values in (("kernel_size", kernel), ("stride", stride), ("dilation", dilation)):
        if any(v <= 0 for v in values):
            raise KaffeError(f"{where}: {name} must be nonzero in every spatial dimension, got {_shape(values)}")
    return kernel, stride, pad, dilation


# -- Convolution ----------------------------------------------------------------------------------
@register_layer("Convolution")
class ConvolutionLayer(Layer):
    """N-d convolution with groups and dilation as im2col + one GEMM per group over the whole batch.

    Several bottom/top pairs of one shape may share the weights; the spatial axes are all axes after
    the channel axis (`axis`), those before it are the batch.

    OpenCL: 1-D and 2-D convolutions (1-D as 2-D with a unit row) run the im2col/col2im kernels of vision.cl
    and one GEMM per group over the columns of all samples side by side, (C/group * kernel) x (num * out),
    in chunks of samples only when those columns would exceed COLUMN_BUFFER_LIMIT floats; a kernel then adds
    the bias and regroups the product per sample. 3-D and higher convolutions run the CPU code (the base
    class's fallback, with its one-time warning).
    """
    min_bottom_blobs = 1
    min_top_blobs = 1
    equal_num_bottom_top_blobs = True

    def layer_setup(self, bottom, top):
        p = self.layer_param.convolution_param
        where = f"{self.type} layer '{self.name}'"
        self.channel_axis = bottom[0].canonical_axis_index(p.axis)
        self.num_spatial = bottom[0].num_axes - self.channel_axis - 1
        self.kernel, self.stride, self.pad, self.dilation = conv_geometry(p, self.num_spatial, where)
        self.channels = bottom[0].shape[self.channel_axis]
        self.num_output = p.num_output
        self.group = p.group
        self.bias_term = p.bias_term
        if self.num_output <= 0:
            raise KaffeError(f"{where}: num_output must be positive, got {self.num_output}")
        if self.group <= 0 or self.channels % self.group or self.num_output % self.group:
            raise KaffeError(f"{where}: group {self.group} must divide both the input channels "
                             f"({self.channels}, bottom {bottom[0].shape_string()}) and num_output "
                             f"({self.num_output})")
        specs = [((self.num_output, self.channels // self.group, *self.kernel), p.weight_filler)]
        if self.bias_term:
            specs.append(((self.num_output,), p.bias_filler))
        self.init_params(*specs)
        self._cached_columns = {}

    def reshape(self, bottom, top):
        where = f"{self.type} layer '{self.name}'"
        first = bottom[0]
        if first.num_axes != self.channel_axis + 1 + self.num_spatial:
            raise KaffeError(f"{where}: bottom num_axes may not change (set up for "
                             f"{self.channel_axis + 1 + self.num_spatial} axes, got {first.shape_string()})")
        if first.shape[self.channel_axis] != self.channels:
            raise KaffeError(f"{where}: input size incompatible with convolution kernel: bottom "
                             f"{first.shape_string()} has {first.shape[self.channel_axis]} channels on axis "
                             f"{self.channel_axis}, the weights expect {self.channels}")
        for i, b in enumerate(bottom[1:], 1):
            if b.shape != first.shape:
                raise KaffeError(f"{where}: all inputs must have the same shape: bottom[0] is "
                                 f"{first.shape_string()}, bottom[{i}] is {b.shape_string()}")
        self.spatial = first.shape[self.channel_axis + 1:]
        self.out_spatial = tuple(conv_out_size(n, k, s, p, d) for n, k, s, p, d in
                                 zip(self.spatial, self.kernel, self.stride, self.pad, self.dilation))
        if any(o <= 0 for o in self.out_spatial):
            raise KaffeError(f"{where}: the dilated kernel {_shape(self.kernel)} (dilation "
                             f"{_shape(self.dilation)}) is larger than the padded input {_shape(self.spatial)} "
                             f"(pad {_shape(self.pad)})")
        self.num = first.count_axes(0, self.channel_axis)
        self.out_count = int(np.prod(self.out_spatial, dtype=np.int64))
        top_shape = first.shape[:self.channel_axis] + (self.num_output,) + self.out_spatial
        for t in top:
            t.reshape(top_shape)

    def _image_shape(self):
        return (self.num, self.channels) + self.spatial

    def _columns(self, blob):
        """im2col of a bottom's data as (group, C/group * prod(kernel), num * prod(out)).

        Columns of at most COLUMN_BUFFER_LIMIT floats are kept for the backward pass, which reuses them
        while the bottom's data is unchanged (Caffe recomputes them; keeping them saves a third of the work).
        """
        key = (id(blob), blob.data_version())
        cached = self._cached_columns.get(id(blob))
        if cached is not None and cached[0] == key:
            return cached[1]
        data = blob.cpu_data().reshape(self._image_shape())
        col = im2col(data, self.kernel, self.stride, self.pad, self.dilation)
        col = col.reshape(self.group, self.blobs[0].count // self.num_output, self.num * self.out_count)
        if col.size <= COLUMN_BUFFER_LIMIT:
            self._cached_columns[id(blob)] = (key, col)
        return col

    def forward_cpu(self, bottom, top):
        weight = self.blobs[0].cpu_data().reshape(self.group, self.num_output // self.group, -1)
        bias = self.blobs[1].cpu_data().reshape(1, -1, 1) if self.bias_term else np.float32(0)
        for b, t in zip(bottom, top):
            product = np.matmul(weight, self._columns(b))  # (group, O/group, num * L)
            by_sample = product.reshape(self.num_output, self.num, self.out_count).transpose(1, 0, 2)
            np.add(by_sample, bias, out=t.mutable_cpu_data().reshape(self.num, self.num_output, self.out_count))

    # -- OpenCL ----------------------------------------------------------------------------------------
    def _geometry_2d(self):
        """Spatial size, output size, kernel, stride, pad and dilation as (h, w) pairs (1-D: h is a unit axis)."""
        lead = 2 - self.num_spatial
        return [(fill,) * lead + tuple(values) for fill, values in
                ((1, self.spatial), (1, self.out_spatial), (1, self.kernel), (1, self.stride), (0, self.pad),
                 (1, self.dilation))]

    def _chunks(self):
        """(first sample, samples) ranges whose columns fit COLUMN_BUFFER_LIMIT (at least one sample each)."""
        per_sample = self.blobs[0].count // self.num_output * self.group * self.out_count
        step = max(1, min(self.num, COLUMN_BUFFER_LIMIT // max(per_sample, 1)))
        return [(n0, min(step, self.num - n0)) for n0 in range(0, self.num, step)]

    def _transform_args(self, samples):
        (h, w), (oh, ow), (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self._geometry_2d()
        return (samples, self.channels, h, w, kh, kw, ph, pw, sh, sw, dh, dw, oh, ow)

    def _image_size(self):
        return self.channels * int(np.prod(self.spatial, dtype=np.int64))

    def _im2col_gpu(self, data, first, samples):
        """The columns of samples [first, first + samples) of a device image array, in this layer's scratch."""
        col = opencl.scratch(self, "columns", self.blobs[0].count // self.num_output * self.group * samples *
                      self.out_count)
        run_kernel("im2col", self.channels * samples * self.out_count,
               *opencl.device_args(data, first * self._image_size()), *self._transform_args(samples), *opencl.device_args(col))
        return col

    def forward_gpu(self, bottom, top):
        if self.num_spatial > 2:
            return super().forward_gpu(bottom, top)
        cl = opencl
        out_per_group = self.num_output // self.group
        rows_per_group = self.blobs[0].count // self.num_output
        weight = self.blobs[0].gpu_data()
        for b, t in zip(bottom, top):
            data, out = b.gpu_data(), t.mutable_gpu_data()
            for first, samples in self._chunks():
                col = self._im2col_gpu(data, first, samples)
                width = samples * self.out_count
                product = opencl.scratch(self, "rows", self.num_output * width)
                for g in range(self.group):
                    cl.gemm(False, False, out_per_group, width, rows_per_group, 1.0, weight, col, 0.0, product,
                            a_offset=g * out_per_group * rows_per_group, b_offset=g * rows_per_group * width,
                            c_offset=g * out_per_group * width)
                bias = self.blobs[1].gpu_data() if self.bias_term else product
                run_kernel("rows_to_nchw", samples * self.num_output * self.out_count, *opencl.device_args(product),
                       samples, self.num_output, self.out_count, *opencl.device_args(bias), self.bias_term,
                       *opencl.device_args(out, first * self.num_output * self.out_count))

    def backward_gpu(self, top, propagate_down, bottom):
        if self.num_spatial > 2:
            return super().backward_gpu(top, propagate_down, bottom)
        cl = opencl
        out_per_group = self.num_output // self.group
        rows_per_group = self.blobs[0].count // self.num_output
        want_weight = self.param_propagate_down[0]
        for t, down, b in zip(top, propagate_down, bottom):
            top_diff = t.gpu_diff()
            if self.bias_term and self.param_propagate_down[1]:
                channel_sum(top_diff, self.num, self.num_output, self.out_count, self.blobs[1].mutable_gpu_diff())
            if not (want_weight or down):
                continue
            for first, samples in self._chunks():
                width = samples * self.out_count
                grouped = opencl.scratch(self, "rows", self.num_output * width)
                run_kernel("nchw_to_rows", self.num_output * width,
                       *opencl.device_args(top_diff, first * self.num_output * self.out_count),
                       samples, self.num_output, self.out_count, *opencl.device_args(grouped))
                if want_weight:
                    col = self._im2col_gpu(b.gpu_data(), first, samples)
                    weight_diff = self.blobs[0].mutable_gpu_diff()
                    for g in range(self.group):  # accumulated (beta 1), as Caffe accumulates parameter diffs
                        cl.gemm(False, True, out_per_group, rows_per_group, width, 1.0, grouped, col, 1.0,
                                weight_diff, a_offset=g * out_per_group * width, b_offset=g * rows_per_group * width,
                                c_offset=g * out_per_group * rows_per_group)
                if down:
                    col = opencl.scratch(self, "columns", rows_per_group * self.group * width)
                    weight = self.blobs[0].gpu_data()
                    for g in range(self.group):
                        cl.gemm(True, False, rows_per_group, width, out_per_group, 1.0, weight, grouped, 0.0, col,
                                a_offset=g * out_per_group * rows_per_group, b_offset=g * out_per_group * width,
                                c_offset=g * rows_per_group * width)
                    run_kernel("col2im", samples * self._image_size(), *opencl.device_args(col), *self._transform_args(samples),
                           *opencl.device_args(b.mutable_gpu_diff(), first * self._image_size()))

    def backward_cpu(self, top, propagate_down, bottom):
        weight = self.blobs[0].cpu_data().reshape(self.group, self.num_output // self.group, -1)
        want_weight = self.param_propagate_down[0]
        want_bias = self.bias_term and self.param_propagate_down[1]
        for t, down, b in zip(top, propagate_down, bottom):
            top_diff = t.cpu_diff().reshape(self.num, self.num_output, self.out_count)
            if want_bias:
                self.blobs[1].mutable_cpu_diff()[...] += top_diff.sum(axis=(0, 2))
            if not (want_weight or down):
                continue
            # (group, O/group, num * L): output channels first, as the columns are laid out
            grouped = np.ascontiguousarray(top_diff.transpose(1, 0, 2)).reshape(
                self.group, self.num_output // self.group, self.num * self.out_count)
            if want_weight:
                weight_diff = np.matmul(grouped, self._columns(b).transpose(0, 2, 1))
                self.blobs[0].mutable_cpu_diff()[...] += weight_diff.reshape(self.blobs[0].shape)
            if down:
                col_diff = np.matmul(weight.transpose(0, 2, 1), grouped)
                col2im(col_diff, self._image_shape(), self.kernel, self.stride, self.pad, self.dilation,
                       out=b.mutable_cpu_diff().reshape(self._image_shape()))


# -- Pooling --------------------------------------------------------------------------------------
def pooled_size(size, kernel, stride, pad, ceil_mode):
    """Caffe's pooled extent: rounded up by default, and never starting a window inside the padding."""
    span = size + 2 * pad - kernel
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if pad and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def ave_pool_divisors(size, out, kernel, stride, pad):
    """Per output position along one axis: the window length counting padding but not the overhang."""
    start = np.arange(out) * stride - pad
    return np.minimum(start + kernel, size + pad) - start


@register_layer("Pooling")
class PoolingLayer(Layer):
    """2-D MAX / AVE pooling (STOCHASTIC has no CPU implementation, as in Caffe).

    MAX may give a second top: the argmax of each window as a flat h*W+w index into the input plane.
    """
    exact_num_bottom_blobs = 1
    min_top_blobs = 1

    @property
    def max_top_blobs(self):
        return 2 if self.layer_param.pooling_param.pool == caffe_pb2.PoolingParameter.MAX else 1

    def layer_setup(self, bottom, top):
        p = self.layer_param.pooling_param
        where = f"{self.type} layer '{self.name}'"
        self.method = p.pool
        self.window_argmax = None  # set by the tiled MAX fast path
        self.global_pooling = p.global_pooling
        self.ceil_mode = p.round_mode == caffe_pb2.PoolingParameter.CEIL
        has_square = p.HasField("kernel_size")
        has_rect = p.HasField("kernel_h") and p.HasField("kernel_w")
        if self.global_pooling:
            if has_square or p.HasField("kernel_h") or p.HasField("kernel_w"):
                raise KaffeError(f"{where}: with global_pooling: true the filter size cannot be specified")
        elif has_square == has_rect:
            raise KaffeError(f"{where}: the filter size is kernel_size OR kernel_h and kernel_w (both are "
                             f"required for non-square filters); not both")
        if p.HasField("pad") and (p.HasField("pad_h") or p.HasField("pad_w")) or \
                p.HasField("pad_h") != p.HasField("pad_w"):
            raise KaffeError(f"{where}: pad is pad OR pad_h and pad_w are required")
        if p.HasField("stride") and (p.HasField("stride_h") or p.HasField("stride_w")) or \
                p.HasField("stride_h") != p.HasField("stride_w"):
            raise KaffeError(f"{where}: stride is stride OR stride_h and stride_w are required")
        self.kernel = (p.kernel_size, p.kernel_size) if has_square else (p.kernel_h, p.kernel_w)
        self.pad = (p.pad_h, p.pad_w) if p.HasField("pad_h") else (p.pad, p.pad)
        self.stride = (p.stride_h, p.stride_w) if p.HasField("stride_h") else (p.stride, p.stride)
        if self.global_pooling:
            if self.pad != (0, 0) or self.stride != (1, 1):
                raise KaffeError(f"{where}: with global_pooling: true only pad = 0 and stride = 1 are allowed, "
                                 f"got pad {_shape(self.pad)} stride {_shape(self.stride)}")
            self.kernel = tuple(bottom[0].shape[2:4])
        if min(self.kernel) <= 0:
            raise KaffeError(f"{where}: filter dimensions cannot be zero, got kernel {_shape(self.kernel)}")
        if min(self.stride) <= 0:
            raise KaffeError(f"{where}: stride must be nonzero, got {_shape(self.stride)}")
        if any(self.pad):
            if self.method not in (caffe_pb2.PoolingParameter.MAX, caffe_pb2.PoolingParameter.AVE):
                raise KaffeError(f"{where}: padding is implemented only for average and max pooling")
            if self.pad[0] >= self.kernel[0] or self.pad[1] >= self.kernel[1]:
                raise KaffeError(f"{where}: pad {_shape(self.pad)} must be smaller than the kernel "
                                 f"{_shape(self.kernel)}")

    def reshape(self, bottom, top):
        where = f"{self.type} layer '{self.name}'"
        if bottom[0].num_axes != 4:
            raise KaffeError(f"{where}: input must have 4 axes (num, channels, height, width), got "
                             f"{bottom[0].shape_string()}")
        self.in_spatial = bottom[0].shape[2:]
        if self.global_pooling:
            self.kernel = self.in_spatial
        self.out_spatial = tuple(pooled_size(n, k, s, p, self.ceil_mode) for n, k, s, p in
                                 zip(self.in_spatial, self.kernel, self.stride, self.pad))
        if min(self.out_spatial) <= 0:
            raise KaffeError(f"{where}: kernel {_shape(self.kernel)} with pad {_shape(self.pad)} does not fit the "
                             f"input {bottom[0].shape_string()}")
        shape = bottom[0].shape[:2] + self.out_spatial
        for t in top:
            t.reshape(shape)
        self.taps = list(_tap_spans(self.in_spatial, self.out_spatial, self.kernel, self.stride, self.pad,
                                    (1, 1)))
        # windows that tile the input exactly (LeNet's 2x2/2) take a reshape-based fast path
        self.tiled = (self.stride == self.kernel and not any(self.pad) and
                      all(o * k == n for o, k, n in zip(self.out_spatial, self.kernel, self.in_spatial)))
        if self.method == caffe_pb2.PoolingParameter.AVE:
            self.divisors = np.multiply.outer(
                *(ave_pool_divisors(n, o, k, s, p) for n, o, k, s, p in
                  zip(self.in_spatial, self.out_spatial, self.kernel, self.stride, self.pad))).astype(np.float32)

    def _tiles(self, array):
        """The kh*kw strided views of a tiled input, one per window cell, in row-major cell order."""
        kh, kw = self.kernel
        return [array[..., i::kh, j::kw] for i in range(kh) for j in range(kw)]

    def _forward_max_tiled(self, x, y, top):
        """MAX over exactly tiling windows; returns False (use the general path) when a window is all NaN."""
        tiles = self._tiles(x)
        y[...] = tiles[0]
        for tile in tiles[1:]:
            np.fmax(y, tile, out=y)  # fmax: a NaN never wins, as in Caffe's strict > comparison
        if np.isnan(y).any():
            return False
        # index of the FIRST cell equal to the max (Caffe's tie rule), built from the last cell backwards:
        # local = (local + 1) * (cell_k != max) leaves k where cell k is the first maximum
        local = np.zeros(y.shape, dtype=np.uint8 if len(tiles) < 256 else np.int32)
        for tile in reversed(tiles[:-1]):
            local += 1
            local *= np.not_equal(tile, y)
        self.window_argmax = local
        if len(top) > 1:
            (oh, ow), (kh, kw) = self.out_spatial, self.kernel
            rows = np.arange(oh)[:, None] * kh + local // kw
            cols = np.arange(ow)[None, :] * kw + local % kw
            top[1].mutable_cpu_data()[...] = rows * self.in_spatial[1] + cols
        return True

    def _backward_max_tiled(self, dy, dx):
        for k, tile in enumerate(self._tiles(dx)):
            np.multiply(dy, self.window_argmax == k, out=tile)

    def _not_implemented(self, where):
        return KaffeError(f"{self.type} layer '{self.name}': STOCHASTIC pooling is not implemented on {where} yet")

    def _not_on_cpu(self):
        return self._not_implemented("the CPU")

    def forward_cpu(self, bottom, top):
        x = bottom[0].cpu_data()
        y = top[0].mutable_cpu_data()
        if self.method == caffe_pb2.PoolingParameter.MAX and self.tiled and self._forward_max_tiled(x, y, top):
            return
        if self.method == caffe_pb2.PoolingParameter.MAX:
            self.window_argmax = None
            # strict > in row-major tap order: ties go to the first maximum, padding never wins and NaN
            # never replaces a value (fmax); branch-free selects, as masked copies are slow on random masks
            if len(top) > 1:
                mask = top[1].mutable_cpu_data()
            else:
                self.argmax = mask = np.empty(y.shape, dtype=np.int32)
            flat_index = np.arange(x.shape[2] * x.shape[3], dtype=mask.dtype).reshape(x.shape[2:])
            y[...] = -FLT_MAX
            mask[...] = -1
            for _, out_s, in_s in self.taps:
                window = (Ellipsis,) + out_s
                candidate = x[(Ellipsis,) + in_s]
                better = candidate > y[window]
                np.fmax(y[window], candidate, out=y[window])
                mask[window] = np.where(better, flat_index[in_s], mask[window])
        elif self.method == caffe_pb2.PoolingParameter.AVE:
            y[...] = 0
            for _, out_s, in_s in self.taps:
                y[(Ellipsis,) + out_s] += x[(Ellipsis,) + in_s]
            y /= self.divisors
        else:
            raise self._not_on_cpu()

    # -- OpenCL: one work-item per output forward, per input element backward (gathering, no atomics) -------
    def _pool_geometry(self):
        return (*self.in_spatial, *self.out_spatial, *self.kernel, *self.stride, *self.pad)

    def forward_gpu(self, bottom, top):
        data, out = bottom[0].gpu_data(), top[0].mutable_gpu_data()
        if self.method == caffe_pb2.PoolingParameter.MAX:
            # the argmax stays on the device for backward; a second top gets it as floats too
            mask = opencl.scratch(self, "argmax", top[0].count, np.int32)
            top_mask = top[1].mutable_gpu_data() if len(top) > 1 else out
            run_kernel("max_pool_forward", top[0].count, *opencl.device_args(data), *self._pool_geometry(), *opencl.device_args(out),
                   mask.data, len(top) > 1, *opencl.device_args(top_mask))
        elif self.method == caffe_pb2.PoolingParameter.AVE:
            run_kernel("ave_pool_forward", top[0].count, *opencl.device_args(data), *self._pool_geometry(), *opencl.device_args(out))
        else:
            raise self._not_implemented("OpenCL")

    def backward_gpu(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        top_diff, bottom_diff = top[0].gpu_diff(), bottom[0].mutable_gpu_diff()
        if self.method == caffe_pb2.PoolingParameter.MAX:
            run_kernel("max_pool_backward", bottom[0].count, *opencl.device_args(top_diff), opencl.scratch(self, "argmax", 0).data,
                   *self._pool_geometry(), *opencl.device_args(bottom_diff))
        elif self.method == caffe_pb2.PoolingParameter.AVE:
            run_kernel("ave_pool_backward", bottom[0].count, *opencl.device_args(top_diff), *self._pool_geometry(),
                   *opencl.device_args(bottom_diff))
        else:
            raise self._not_implemented("OpenCL")

    def backward_cpu(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        dy = top[0].cpu_diff()
        dx = bottom[0].mutable_cpu_diff()
        dx[...] = 0
        if self.method == caffe_pb2.PoolingParameter.MAX and self.window_argmax is not None:
            self._backward_max_tiled(dy, dx)
        elif self.method == caffe_pb2.PoolingParameter.MAX:
            mask = top[1].cpu_data() if len(top) > 1 else self.argmax
            flat_index = np.arange(dx.shape[2] * dx.shape[3], dtype=mask.dtype).reshape(dx.shape[2:])
            for _, out_s, in_s in self.taps:
                window = (Ellipsis,) + out_s
                dx[(Ellipsis,) + in_s] += np.where(mask[window] == flat_index[in_s], dy[window], 0)
        elif self.method == caffe_pb2.PoolingParameter.AVE:
            share = dy / self.divisors
            for _, out_s, in_s in self.taps:
                dx[(Ellipsis,) + in_s] += share[(Ellipsis,) + out_s]
        else:
            raise self._not_on_cpu()


# -- LRN ------------------------------------------------------------------------------------------
def _window_sum(values, size, axes):
    """Sum over a centred window of odd `size` along each of `axes`, zero beyond the edges (self-adjoint)."""
    half = (size - 1) // 2
    for axis in axes:
        n = values.shape[axis]
        pad_width = [(0, 0)] * values.ndim
        pad_width[axis] = (half, half)
        padded = np.pad(values, pad_width)
        total = np.zeros_like(values)
        for offset in range(size):
            total += padded[(slice(None),) * axis + (slice(offset, offset + n),)]
        values = total
    return values


@register_layer("LRN")
class LRNLayer(Layer):
    """Local response normalisation of a 4-D blob.

    ACROSS_CHANNELS: y = x * (k + alpha/n * sum of x^2 over the n channels centred on x)^-beta.
    WITHIN_CHANNEL: Caffe composes it from Split/Power/Pooling(AVE, kernel n, pad (n-1)/2, stride 1)/Eltwise,
    y = x * (1 + alpha * avgpool(x^2))^-beta; with that pad and stride every window's divisor is n*n (the
    windows never overhang beyond the padding) and k is unused. Both are computed directly here.
    """
    exact_num_bottom_blobs = 1
    exact_num_top_blobs = 1

    def layer_setup(self, bottom, top):
        p = self.layer_param.lrn_param
        self.size = p.local_size
        if self.size % 2 != 1:
            raise KaffeError(f"{self.type} layer '{self.name}': LRN only supports odd values for local_size, "
                             f"got {self.size}")
        self.alpha, self.beta, self.k = p.alpha, p.beta, p.k
        self.across = p.norm_region == caffe_pb2.LRNParameter.ACROSS_CHANNELS

    def reshape(self, bottom, top):
        if bottom[0].num_axes != 4:
            raise KaffeError(f"{self.type} layer '{self.name}': input must have 4 axes (num, channels, height, "
                             f"width), got {bottom[0].shape_string()}")
        top[0].reshape_like(bottom[0])

    def _window_mean_factor(self):
        return self.alpha / self.size if self.across else self.alpha / (self.size * self.size)

    def _axes(self):
        return (1,) if self.across else (2, 3)

    def forward_cpu(self, bottom, top):
        x = bottom[0].cpu_data()
        offset = self.k if self.across else 1.0
        scale = _window_sum(x * x, self.size, self._axes())
        scale *= np.float32(self._window_mean_factor())
        scale += np.float32(offset)
        self.scale = scale  # kept for backward, as Caffe keeps its scale_ blob
        np.multiply(x, np.power(scale, np.float32(-self.beta)), out=top[0].mutable_cpu_data())

    def backward_cpu(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        x = bottom[0].cpu_data()
        y = top[0].cpu_data()
        dy = top[0].cpu_diff()
        # d/dx_j of x_i * s_i^-beta with s_i = offset + c * sum_{j in window(i)} x_j^2, summed over i;
        # the windows are symmetric, so the sum over the i whose window holds j is the same window sum
        spread = _window_sum(dy * y / self.scale, self.size, self._axes())
        coefficient = np.float32(2.0 * self.beta * self._window_mean_factor())
        dx = bottom[0].mutable_cpu_diff()
        dx[...] = dy * np.power(self.scale, np.float32(-self.beta)) - coefficient * x * spread

    # -- OpenCL: Caffe's scale / output / diff kernels; the scale stays on the device for backward -----------
    def forward_gpu(self, bottom, top):
        num, channels, height, width = bottom[0].shape
        data = bottom[0].gpu_data()
        scale = opencl.scratch(self, "scale", bottom[0].count)
        if self.across:
            run_kernel("lrn_across_scale", num * height * width, *opencl.device_args(data), channels, height * width,
                   self.size, self._window_mean_factor(), self.k, scale.data)
        else:
            run_kernel("lrn_within_scale", bottom[0].count, *opencl.device_args(data), height, width, self.size,
                   self._window_mean_factor(), scale.data)
        run_kernel("lrn_output", bottom[0].count, *opencl.device_args(data), scale.data, -self.beta,
               *opencl.device_args(top[0].mutable_gpu_data()))

    def backward_gpu(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        num, channels, height, width = bottom[0].shape
        data, out, top_diff = bottom[0].gpu_data(), top[0].gpu_data(), top[0].gpu_diff()
        scale = opencl.scratch(self, "scale", bottom[0].count)
        coefficient = 2.0 * self.beta * self._window_mean_factor()
        bottom_diff = bottom[0].mutable_gpu_diff()
        if self.across:
            run_kernel("lrn_across_backward", num * height * width, *opencl.device_args(data), *opencl.device_args(out),
                   *opencl.device_args(top_diff), scale.data, channels, height * width, self.size, -self.beta, coefficient,
                   *opencl.device_args(bottom_diff))
        else:
            ratio = opencl.scratch(self, "ratio", bottom[0].count)
            run_kernel("lrn_ratio", bottom[0].count, *opencl.device_args(out), *opencl.device_args(top_diff), scale.data, ratio.data)
            run_kernel("lrn_within_backward", bottom[0].count, *opencl.device_args(data), *opencl.device_args(top_diff), scale.data,
                   ratio.data, height, width, self.size, -self.beta, coefficient, *opencl.device_args(bottom_diff))
