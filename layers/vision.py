"""Vision layers: Convolution, Deconvolution, Im2col, Pooling (MAX / AVE / STOCHASTIC), SPP, Crop and LRN, with
Caffe's shapes, defaults, parameter blobs and error checks.

Convolution and Deconvolution share BaseConvolutionLayer; im2col / col2im also serve the Im2col layer.
Windows are handled one kernel tap at a time: a tap reads a strided slice of the whole batch, so no Python
loop runs over samples or pixels.
"""
import itertools
import math

import numpy as np
import pyopencl.array as cla

from ..engine import accelerator, blas, device, opencl
from ..engine.blob import Blob
from ..engine.errors import KaffeError
from ..engine.layer import Layer, register_layer
from ..proto import caffe_pb2
from .neuron import BLOCK, dropout_bits, relu

FLT_MAX = np.float32(np.finfo(np.float32).max)
# the convolution epilogue's residual when it adds none: an array of its own, as one that might overlap the top
# keeps LLVM from vectorising the kernel's loop
NO_RESIDUAL = np.zeros((1, 1, 1), dtype=np.float32)
KERNELS = ("layers/random.cl", "layers/vision.cl")  # stochastic pooling draws counter_bits
LAUNCH_GROUP = 256  # work-group size of the one-work-item-per-element kernels
SUM_GROUP = 256  # work-group size of channel_sum
# the most floats one convolution's column buffer may hold: a batch whose columns need more is done in chunks
# of samples (one GEMM per group and chunk) so that memory stays bounded for big images and batches
COLUMN_BUFFER_LIMIT = 1 << 25
# shifted_taps (ConvolutionLayer): positions per slice of the output that all taps add into before the next,
# and the largest output map (positions per sample) left to im2col when the batch has several samples
SHIFTED_TAPS_SLICE = 4096
SHIFTED_TAPS_SMALL_MAP = 64
SHIFTED_TAPS_LARGE_COLUMNS = 1 << 22  # im2col columns (floats) too large for the cache: their copies dominate
# winograd (ConvolutionLayer): the fewest input and output channels, and the smallest output side, for which
# Winograd F(4x4, 3x3) measured faster than the GEMM paths
WINOGRAD_MIN_CHANNELS = 96
WINOGRAD_MIN_SIDE = 12
# F(4x4, 3x3)'s weight transform G (6 x 3; layers/cpu_kernels.py has B^T and A^T)
WINOGRAD_G = np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6], [1 / 24, 1 / 12, 1 / 6],
                       [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]])
_work_buffers = {}


def work_buffer(role, count):
    """A flat float32 array of `count` values that every layer shares for one role of short-lived work (layers
    run one at a time): a fresh large array page-faults on every first touch, which costs as much as the copy
    into it. Roles: "inference columns" (convolutions that never run backward keep no columns), "rows" (a
    transposed top diff), "rows product" and "columns product" (GEMM results before they are laid out),
    "padded image" (a zero-bordered input of the shifted_taps and winograd forwards), "winograd input" (its
    transformed tiles)."""
    buffer = _work_buffers.get(role)
    if buffer is None or buffer.size < count:
        buffer = _work_buffers[role] = np.empty(count, dtype=np.float32)
    return buffer[:count]


def _shape(shape):
    return "(" + ", ".join(str(d) for d in shape) + ")"


# -- OpenCL helpers -----------------------------------------------------------------------------------
def run_kernel(name, total, *args):
    """Run vision.cl kernel `name` with one work-item per i < total (see engine.opencl.launch)."""
    opencl.launch(KERNELS, name, total, *args, defines={"SUM_GROUP": SUM_GROUP})


def run_group_sum(name, outputs, *args):
    """Run vision.cl reduction `name` with one SUM_GROUP work-group per output value (Python ints become int32)."""
    opencl.kernel(KERNELS, name, {"SUM_GROUP": SUM_GROUP})(
        opencl.queue(), (outputs * SUM_GROUP,), (SUM_GROUP,), *(np.int32(a) if isinstance(a, int) else a for a in args))


def channel_sum(x, num, channels, inner, out):
    """out[c] += the sum of x (num, channels, inner) over num and inner (a bias gradient), on the device."""
    run_group_sum("channel_sum", channels, num, channels, inner, *opencl.device_args(x), *opencl.device_args(out))


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


def transpose_into(src, dst, block=128):
    """dst[...] = src.T for 2-D arrays, copied in blocks of `block` source rows: numpy's plain transposed copy
    walks memory with a large stride and runs several times slower once the arrays outgrow the cache."""
    for i in range(0, src.shape[0], block):
        dst[:, i:i + block] = src[i:i + block].T
    return dst


def _tap_windows(kernel, stride, dilation, out):
    """(tap index tuple, slices of the zero-padded input it reads) for every kernel tap, row-major."""
    for taps in itertools.product(*(range(k) for k in kernel)):
        yield taps, tuple(slice(t * d, t * d + s * (o - 1) + 1, s)
                          for t, d, s, o in zip(taps, dilation, stride, out))


def _out_shape(spatial, kernel, stride, pad, dilation):
    return [conv_out_size(n, k, s, p, d) for n, k, s, p, d in zip(spatial, kernel, stride, pad, dilation)]


def _padded_layout(channels, num, spatial, pad, batch_last):
    """The zero-bordered working array of im2col/col2im, (C, *padded, num) or (C, num, *padded), and the index
    prefix that selects all of its non-spatial axes before a spatial window."""
    padded = tuple(n + 2 * p for n, p in zip(spatial, pad))
    shape = (channels, *padded, num) if batch_last else (channels, num, *padded)
    return np.zeros(shape, dtype=np.float32), (slice(None),) if batch_last else (slice(None), slice(None))


def im2col(data, kernel, stride, pad, dilation, batch_last=True, out=None):
    """(num, C, *spatial) -> columns of shape (C, *kernel, *out, num), or (C, *kernel, num, *out).

    Reshaped to (C*prod(kernel), positions*num), row c*K + k holds tap k of channel c at every output position
    of every sample, so a filter bank (O, C*K) times it is the convolution of the whole batch. With the batch
    innermost each tap's copy moves runs of out_w * num contiguous floats (num with strides > 1): the better
    layout when the columns are big; with the batch outer the result maps to NCHW by cheaper transposes.
    `out`, if given, receives the columns (any array of that many floats that reshapes to their layout). 2-D
    batch-outer columns (or one sample's) come from the compiled kernel where the accelerator is on.
    """
    num, channels, *spatial = data.shape
    out_shape = _out_shape(spatial, kernel, stride, pad, dilation)
    layout = (channels, *kernel, *out_shape, num) if batch_last else (channels, *kernel, num, *out_shape)
    col = np.empty(layout, dtype=np.float32) if out is None else out.reshape(layout)
    if len(spatial) == 2 and (num == 1 or not batch_last) and accelerator.enabled():   # one sample: both layouts
        accelerator.kernels().im2col_batch_outer(data, col.reshape(channels, *kernel, num, *out_shape), *stride,
                                                 *pad, *dilation)
        return col
    padded, lead = _padded_layout(channels, num, spatial, pad, batch_last)
    interior = lead + tuple(slice(p, p + n) for n, p in zip(spatial, pad))
    padded[interior] = np.moveaxis(data, 0, -1) if batch_last else data.swapaxes(0, 1)
    for taps, window in _tap_windows(kernel, stride, dilation, out_shape):
        col[(slice(None),) + taps] = padded[lead + window]
    return col


def col2im(col, image_shape, kernel, stride, pad, dilation, out=None, batch_last=True):
    """The adjoint of im2col: sum columns (any reshape of im2col's layout) into (num, C, *spatial).

    `out`, if given, is overwritten (e.g. a bottom diff).
    """
    num, channels, *spatial = image_shape
    out_shape = _out_shape(spatial, kernel, stride, pad, dilation)
    col = col.reshape((channels, *kernel, *out_shape, num) if batch_last else (channels, *kernel, num, *out_shape))
    padded, lead = _padded_layout(channels, num, spatial, pad, batch_last)
    if batch_last and len(spatial) == 2 and col.flags.c_contiguous and accelerator.enabled():
        accelerator.kernels().col2im_batch_last(col, padded, *stride, *dilation)   # numpy's sums in one pass
    else:
        for taps, window in _tap_windows(kernel, stride, dilation, out_shape):
            padded[lead + window] += col[(slice(None),) + taps]
    inner = padded[lead + tuple(slice(p, p + n) for n, p in zip(spatial, pad))]
    image = np.moveaxis(inner, -1, 0) if batch_last else inner.swapaxes(0, 1)
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


def conv_args_2d(num, channels, spatial, out_spatial, kernel, stride, pad, dilation):
    """The geometry arguments (vision.cl's CONV_GEOMETRY) of a 1-D or 2-D convolution (1-D: a unit row)."""
    lead = 2 - len(spatial)
    (h, w), (oh, ow), (kh, kw), (sh, sw), (ph, pw), (dh, dw) = [
        (fill,) * lead + tuple(values) for fill, values in
        ((1, spatial), (1, out_spatial), (1, kernel), (1, stride), (0, pad), (1, dilation))]
    return (num, channels, h, w, kh, kw, ph, pw, sh, sw, dh, dw, oh, ow)


def transform_args_2d(num, channels, spatial, out_spatial, kernel, stride, pad, dilation, row_stride, sample_stride):
    """The geometry arguments of vision.cl's im2col / col2im for a 1-D or 2-D transform.

    row_stride / sample_stride place the columns: tap row r of sample n starts at r * row_stride +
    n * sample_stride (the convolutions' (C*K, num*L) matrix: num*L and L; Im2col's (num, C*K, L): L and C*K*L).
    """
    return conv_args_2d(num, channels, spatial, out_spatial, kernel, stride, pad, dilation) + (row_stride,
                                                                                              sample_stride)


# -- Convolution and Deconvolution ------------------------------------------------------------------
class BaseConvolutionLayer(Layer):
    """What Convolution and Deconvolution share (Caffe's BaseConvolutionLayer): parameters, weights, the column
    transform and the per-group GEMMs.

    Both are written in terms of one convolution: its input side (the "image", whose im2col columns the
    weights multiply) and its output side (the "rows", conv_out_channels x the column positions). For
    Convolution the image is the bottom and the rows the top; Deconvolution is the transpose, so its image
    is the top and its rows the bottom. The weights are (conv_out_channels, conv_in_channels / group, *kernel).
    Several bottom/top pairs of one shape may share the weights; the spatial axes are all axes after the
    channel axis (`axis`), those before it are the batch.

    OpenCL: 1-D and 2-D (1-D as 2-D with a unit row) run the im2col/col2im kernels of vision.cl and one GEMM per
    group over the columns of all samples side by side, (C/group * kernel) x (num * positions), in chunks of
    samples only when those columns would exceed COLUMN_BUFFER_LIMIT floats. Two kinds skip the columns: a
    depthwise layer (each group one image-side channel) runs vision.cl's depthwise kernels, one launch per
    direction for the whole batch, and a pointwise Convolution (1x1, stride 1, no pad) multiplies its NCHW
    bottom as it is. 3-D and higher run the CPU code (the base class's fallback, with its one-time warning).
    """
    min_bottom_blobs = 1
    min_top_blobs = 1
    equal_num_bottom_top_blobs = True
    transposed = False  # True: the top is the convolution's input side (Deconvolution)

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
        if self.transposed:
            self.conv_in_channels, self.conv_out_channels = self.num_output, self.channels
        else:
            self.conv_in_channels, self.conv_out_channels = self.channels, self.num_output
        specs = [((self.conv_out_channels, self.conv_in_channels // self.group, *self.kernel), p.weight_filler)]
        if self.bias_term:
            specs.append(((self.num_output,), p.bias_filler))
        self.init_params(*specs)
        self.kernel_dim = self.blobs[0].count // self.conv_out_channels  # column rows per group
        # a 1x1 convolution with stride 1 and no padding is its own column matrix: a GEMM on the NCHW data
        self.pointwise = (not self.transposed and all(k == 1 for k in self.kernel) and
                          all(s == 1 for s in self.stride) and not any(self.pad))
        # each group convolves one channel of the image side (depthwise; with a channel multiplier when
        # conv_out_channels > group): OpenCL computes it directly, without columns or GEMMs
        self.depthwise = 1 < self.group == self.conv_in_channels

    def top_spatial(self, spatial, where):
        """The top's spatial shape for a bottom's (checked)."""
        raise NotImplementedError

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
        spatial = first.shape[self.channel_axis + 1:]
        out_spatial = self.top_spatial(spatial, where)
        self.image_spatial, self.column_spatial = (out_spatial, spatial) if self.transposed else (spatial, out_spatial)
        self.num = first.count_axes(0, self.channel_axis)
        self.column_count = math.prod(self.column_spatial)
        # CPU layout: the batch innermost when the columns (C * kernel rows) outweigh the rows (conv_out
        # channels) the GEMM turns them into: the column copies then dominate, and they run faster that way
        self.batch_last = self.kernel_dim * self.group >= 4 * self.conv_out_channels and not self.pointwise
        self.top_count = math.prod(out_spatial)
        top_shape = first.shape[:self.channel_axis] + (self.num_output,) + out_spatial
        for t in top:
            t.reshape(top_shape)

    # -- CPU: the whole batch at once ------------------------------------------------------------------
    def _image_shape(self):
        return (self.num, self.conv_in_channels) + self.image_spatial

    def _weights(self):
        return self.blobs[0].cpu_data().reshape(self.group, self.conv_out_channels // self.group, self.kernel_dim)

    def _bias(self):
        """The bias broadcast over (num, num_output, positions), or None."""
        return self.blobs[1].cpu_data().reshape(1, -1, 1) if self.bias_term else None

    def _im2col(self, image, extra_rows=0, reuse=None):
        """(group, C/group * prod(kernel), positions * num): the columns of an image-side array. With extra_rows
        (group 1 only) they come as the first rows of a taller, otherwise uninitialised array. `reuse`: an
        earlier result of the same shape to overwrite (a fresh array of this size page-faults on every touch)."""
        rows = self.kernel_dim * self.group
        shape = (rows + extra_rows, self.column_count * self.num)
        col = reuse.reshape(shape) if reuse is not None and reuse.size == math.prod(shape) else \
            np.empty(shape, dtype=np.float32)
        im2col(image.reshape(self._image_shape()), self.kernel, self.stride, self.pad, self.dilation,
               self.batch_last, out=col[:rows])
        return col.reshape(self.group, -1, self.column_count * self.num)

    def _col2im(self, col, image):
        col2im(col, self._image_shape(), self.kernel, self.stride, self.pad, self.dilation,
               out=image.reshape(self._image_shape()), batch_last=self.batch_last)

    def _columns_by_sample(self, col):
        """Batch-outer columns (group, rows, num * positions) as (num, group, rows, positions); a pointwise
        layer's columns come in that shape already."""
        if col.ndim == 4:
            return col
        return col.reshape(self.group, -1, self.num, self.column_count).transpose(2, 0, 1, 3)

    def _rows(self, x):
        """A rows-side array (num, conv_out_channels, positions) in the columns' order: for the batch innermost
        a transposed copy (group, out/group, positions * num), for the batch outer a view (num, group,
        out/group, positions)."""
        if not self.batch_last:
            return x.reshape(self.num, self.group, self.conv_out_channels // self.group, self.column_count)
        rows = work_buffer("rows", self.conv_out_channels * self.column_count * self.num).reshape(-1, self.num)
        transpose_into(x.reshape(self.num, -1), rows)
        return rows.reshape(self.group, -1, self.column_count * self.num)

    def _rows_product(self, weight, col, out):
        """out, a rows-side array (num, conv_out_channels, positions), = weight (group, out/group, col rows) @ col.

        Batch innermost: one GEMM per group over the whole batch, then a transpose into NCHW. Batch outer: one
        GEMM per sample and group, written straight into NCHW (numpy's matmul loops over them in C)."""
        if self.batch_last and self.num > 1:
            product = work_buffer("rows product", self.conv_out_channels * col.shape[2])
            product = np.matmul(weight, col, out=product.reshape(self.group, -1, col.shape[2]))
            transpose_into(product.reshape(-1, self.num), out.reshape(self.num, -1))
        elif self.batch_last:   # one sample: the product is already in NCHW order
            np.matmul(weight, col, out=out.reshape(self.group, -1, col.shape[2]))
        else:
            np.matmul(weight, self._columns_by_sample(col), out=self._rows(out))

    def _columns_product(self, rows):
        """W^T @ rows (see _rows): columns in this layer's layout."""
        weight_t = self._weights().transpose(0, 2, 1)
        if self.batch_last:
            product = work_buffer("columns product", self.group * self.kernel_dim * rows.shape[2])
            return np.matmul(weight_t, rows, out=product.reshape(self.group, self.kernel_dim, -1))
        col = work_buffer("columns product", self.group * self.kernel_dim * self.num * self.column_count)
        col = col.reshape(self.group, self.kernel_dim, -1)
        np.matmul(weight_t, rows, out=self._columns_by_sample(col))
        return col

    def _weight_gradient(self, rows, col):
        """rows (see _rows) @ col^T per group: (group, out/group, col rows). Batch innermost: computed as
        (col @ rows^T)^T, the orientation OpenBLAS runs faster for these tall columns. Batch outer: per-sample
        products, summed (in chunks of samples that keep those partial products about a column buffer's size)."""
        if self.batch_last:
            return np.matmul(col, rows.transpose(0, 2, 1)).transpose(0, 2, 1)
        col = self._columns_by_sample(col)
        step = max(1, COLUMN_BUFFER_LIMIT // 8 // (rows.shape[2] * col.shape[2]))
        return sum(np.matmul(rows[n:n + step], col[n:n + step].transpose(0, 1, 3, 2)).sum(axis=0)
                   for n in range(0, self.num, step))

    def _add_bias_gradient(self, top_diff):
        if self.bias_term and self.param_propagate_down[1]:
            self.blobs[1].mutable_cpu_diff()[...] += top_diff.reshape(
                self.num, self.num_output, self.top_count).sum(axis=(0, 2))

    # -- OpenCL ------------------------------------------------------------------------------------------
    def _chunks(self):
        """(first sample, samples) ranges whose columns fit COLUMN_BUFFER_LIMIT (at least one sample each)."""
        per_sample = self.kernel_dim * self.group * self.column_count
        step = max(1, min(self.num, COLUMN_BUFFER_LIMIT // max(per_sample, 1)))
        return [(n0, min(step, self.num - n0)) for n0 in range(0, self.num, step)]

    def _transform_args(self, samples):
        width = samples * self.column_count
        return transform_args_2d(samples, self.conv_in_channels, self.image_spatial, self.column_spatial,
                                 self.kernel, self.stride, self.pad, self.dilation, width, self.column_count)

    def _image_size(self):
        return self.conv_in_channels * math.prod(self.image_spatial)

    def _rows_size(self):
        return self.conv_out_channels * self.column_count

    def _im2col_gpu(self, image, first, samples, kept=None):
        """The columns of samples [first, first + samples) of a device image-side array, in this layer's scratch
        (with `kept`, a bottom index, in a scratch of its own that backward reads again: _kept_columns_gpu)."""
        name = "columns" if kept is None else f"kept columns {kept}"
        col = opencl.scratch(self, name, self.kernel_dim * self.group * samples * self.column_count)
        run_kernel("im2col", self.conv_in_channels * samples * self.column_count,
                   *opencl.device_args(image, first * self._image_size()), *self._transform_args(samples),
                   *opencl.device_args(col))
        return col

    def _col2im_gpu(self, col, image, first, samples):
        run_kernel("col2im", samples * self._image_size(), *opencl.device_args(col), *self._transform_args(samples),
                   *opencl.device_args(image, first * self._image_size()))

    def _backward_columns_gpu(self, index, blob, image, first, samples):
        """The columns of `image` for backward: those forward kept for bottom `index` (`blob`) while its data
        has not changed since, else im2col's; a pointwise layer's one sample (C, L) is its own columns."""
        if self.pointwise and samples == 1:
            return image[first * self._image_size():]
        kept = getattr(self, "_kept_columns", {})
        if index in kept and kept[index] == blob.data_version():
            return opencl.scratch(self, f"kept columns {index}", 0)
        return self._im2col_gpu(image, first, samples)

    def _to_rows_gpu(self, x, first, samples):
        """Samples [first, first + samples) of a device rows-side array as (conv_out_channels, samples * positions)."""
        rows = opencl.scratch(self, "rows", self._rows_size() * samples)
        run_kernel("nchw_to_rows", self._rows_size() * samples, *opencl.device_args(x, first * self._rows_size()),
                   samples, self.conv_out_channels, self.column_count, *opencl.device_args(rows))
        return rows

    def _group_gemm_gpu(self, product, samples, a, b, c, rows_at=None, bias_diff=None):
        """One GEMM per group; product picks which: "columns" = W^T @ rows, "weight" = rows @ col^T added to the
        weight diff (W @ col: _rows_product_gpu). The rows side is a regrouped (O, N * L) copy, or, with rows_at
        (a first sample), read straight from the (N, O, L) array (a convolution's top diff): the columns as one
        batched GEMM over the samples (a pointwise layer's written straight into c, its (N, C, L) image-side
        array), the weight with K running over the samples' blocks, and with bias_diff the bias gradient (the
        rows' sums) in the same launch."""
        out_per_group, positions = self.conv_out_channels // self.group, self.column_count
        width = samples * positions
        weight_step, rows_step, col_step = out_per_group * self.kernel_dim, out_per_group * width, \
            self.kernel_dim * width
        nchw = rows_at is not None
        rows_offset = (rows_at or 0) * self._rows_size()
        # where group g's columns of the first sample start, their row stride and the step between samples
        c_at, ldc, c_step = ((rows_at or 0) * self._image_size(), positions, self._image_size()) if self.pointwise \
            else (0, width, positions)
        for g in range(self.group):
            rows_g = rows_offset + g * out_per_group * positions if nchw else g * rows_step
            if product == "columns" and nchw:
                opencl.gemm(True, False, self.kernel_dim, positions, out_per_group, 1.0, a, b, 0.0, c,
                            a_offset=g * weight_step, b_offset=rows_g, c_offset=c_at + g * self.kernel_dim * ldc,
                            batch=samples, strides=(0, self._rows_size(), c_step), ldb=positions, ldc=ldc)
            elif product == "columns":
                opencl.gemm(True, False, self.kernel_dim, width, out_per_group, 1.0, a, b, 0.0, c,
                            a_offset=g * weight_step, b_offset=rows_g, c_offset=g * col_step)
            else:  # accumulated (beta 1), as Caffe accumulates parameter diffs
                opencl.gemm(False, True, out_per_group, self.kernel_dim, width, 1.0, a, b, 1.0, c,
                            a_offset=rows_g, b_offset=g * col_step, c_offset=g * weight_step,
                            a_blocks=(positions, self._rows_size()) if nchw else None,
                            row_sums=None if bias_diff is None else bias_diff[g * out_per_group:])

    def _rows_product_gpu(self, weight, col, out, first, samples, add_bias):
        """W @ col for samples [first, first + samples), written into the device rows-side array out (N, O, L):
        per group one batched GEMM, sample n reading its columns from col and writing its rows straight into
        out, the bias added as they are written. A pointwise layer's col is its (N, C, L) bottom as it is."""
        out_per_group, width = self.conv_out_channels // self.group, samples * self.column_count
        bias = self.blobs[1].gpu_data() if add_bias else None
        # where the first sample's columns start, their row stride and the step between samples
        col_at, ldb, col_step = (first * self._image_size(), self.column_count, self._image_size()) \
            if self.pointwise else (0, width, self.column_count)
        for g in range(self.group):
            opencl.gemm(False, False, out_per_group, self.column_count, self.kernel_dim, 1.0, weight, col, 0.0, out,
                        a_offset=g * out_per_group * self.kernel_dim, b_offset=col_at + g * self.kernel_dim * ldb,
                        c_offset=first * self._rows_size() + g * out_per_group * self.column_count,
                        batch=samples, strides=(0, col_step, self._rows_size()), ldb=ldb,
                        ldc=self.column_count, bias=bias[g * out_per_group:] if add_bias else None, bias_axis=0)

    def _columns_product_gpu(self, weight, rows, image, first, samples, rows_at=None):
        """W^T @ rows for samples [first, first + samples), folded (col2im) into the device image-side array
        (rows_at: see _group_gemm_gpu); a pointwise layer's product is that array itself."""
        if self.pointwise:
            return self._group_gemm_gpu("columns", samples, weight, rows, image, rows_at)
        col = opencl.scratch(self, "columns", self.kernel_dim * self.group * samples * self.column_count)
        self._group_gemm_gpu("columns", samples, weight, rows, col, rows_at)
        self._col2im_gpu(col, image, first, samples)

    def _add_bias_gradient_gpu(self, top_diff):
        if self.bias_term and self.param_propagate_down[1]:
            channel_sum(top_diff, self.num, self.num_output, self.top_count, self.blobs[1].mutable_gpu_diff())

    def _depthwise_args(self):
        """vision.cl's depthwise geometry: CONV_GEOMETRY over the image side's channels, then the multiplier."""
        return conv_args_2d(self.num, self.group, self.image_spatial, self.column_spatial, self.kernel, self.stride,
                            self.pad, self.dilation) + (self.conv_out_channels // self.group,)

    def _depthwise_gpu(self, to_rows, source, out, bias=None):
        """A depthwise layer's rows (to_rows: vision.cl's depthwise_conv) or image side (depthwise_conv_transposed)
        from the other side's device array, written into out for the whole batch in one launch, with bias (a
        device array) added."""
        weight = self.blobs[0].gpu_data()
        run_kernel("depthwise_conv" if to_rows else "depthwise_conv_transposed", out.size,
                   *opencl.device_args(source), *opencl.device_args(weight), bias is not None,
                   *opencl.device_args(weight if bias is None else bias), *self._depthwise_args(),
                   *opencl.device_args(out))

    def _depthwise_forward_gpu(self, bottom, top):
        bias = self.blobs[1].gpu_data() if self.bias_term else None
        for b, t in zip(bottom, top):
            self._depthwise_gpu(not self.transposed, b.gpu_data(), t.mutable_gpu_data(), bias)

    def _depthwise_backward_gpu(self, top, propagate_down, bottom):
        """The bias gradient (channel_sum), the weight gradient (one work-group per weight value) and the bottom
        diff (the other direction of forward), each one launch over the whole batch."""
        for t, down, b in zip(top, propagate_down, bottom):
            top_diff = t.gpu_diff()
            self._add_bias_gradient_gpu(top_diff)
            if self.param_propagate_down[0]:
                rows, image = (b.gpu_data(), top_diff) if self.transposed else (top_diff, b.gpu_data())
                run_group_sum("depthwise_weight_gradient", self.blobs[0].count, *opencl.device_args(rows),
                              *opencl.device_args(image), *self._depthwise_args(),
                              *opencl.device_args(self.blobs[0].mutable_gpu_diff()))
            if down:
                self._depthwise_gpu(self.transposed, top_diff, b.mutable_gpu_diff())

    def forward_gpu(self, bottom, top):
        """Convolution: W @ im2col(bottom), the bias added as the rows are written into the top. Deconvolution:
        W^T @ (bottom as rows) folded into the top by col2im, then the bias."""
        if self.num_spatial > 2:
            return super().forward_gpu(bottom, top)
        if self.depthwise:
            return self._depthwise_forward_gpu(bottom, top)
        weight = self.blobs[0].gpu_data()
        chunks = [(0, self.num)] if self.pointwise else self._chunks()
        # one chunk of a layer that learns its weights: backward's weight gradient reuses these columns
        keep = len(chunks) == 1 and self.needs_backward and self.param_propagate_down[0] and not self.transposed \
            and not self.pointwise
        self._kept_columns = {i: b.data_version() for i, b in enumerate(bottom)} if keep else {}
        for i, (b, t) in enumerate(zip(bottom, top)):
            data, out = b.gpu_data(), t.mutable_gpu_data()
            for first, samples in chunks:
                if self.pointwise:
                    self._rows_product_gpu(weight, data, out, first, samples, self.bias_term)
                elif self.transposed:
                    self._columns_product_gpu(weight, self._to_rows_gpu(data, first, samples), out, first, samples)
                else:
                    self._rows_product_gpu(weight, self._im2col_gpu(data, first, samples, i if keep else None),
                                           out, first, samples, self.bias_term)
            if self.transposed and self.bias_term:
                run_kernel("add_bias", t.count, *opencl.device_args(out),
                           *opencl.device_args(self.blobs[1].gpu_data()), self.num_output, self.top_count)

    def backward_gpu(self, top, propagate_down, bottom):
        """The weight gradient is rows @ col^T for both; the bottom diff is W^T @ rows folded by col2im for a
        Convolution (its top diff is the rows side) and W @ col for a Deconvolution (its top diff is the image
        side, whose columns im2col makes). The in-order queue runs each GEMM before the next step overwrites
        the scratch it reads."""
        if self.num_spatial > 2:
            return super().backward_gpu(top, propagate_down, bottom)
        if self.depthwise:
            return self._depthwise_backward_gpu(top, propagate_down, bottom)
        want_weight = self.param_propagate_down[0]
        # a Convolution's bias gradient comes out of the weight gradient's GEMMs (the sums of the rows they read)
        bias_in_gemm = want_weight and not self.transposed and self.bias_term and self.param_propagate_down[1]
        bias_diff = self.blobs[1].mutable_gpu_diff() if bias_in_gemm else None
        for i, (t, down, b) in enumerate(zip(top, propagate_down, bottom)):
            top_diff = t.gpu_diff()
            if not bias_in_gemm:
                self._add_bias_gradient_gpu(top_diff)
            if not (want_weight or down):
                continue
            rows_side, image_side = (b.gpu_data(), top_diff) if self.transposed else (top_diff, b.gpu_data())
            for first, samples in self._chunks():
                # a Convolution reads its top diff (the rows side) as it is; a Deconvolution regroups its bottom
                rows, rows_at = (rows_side, first) if not self.transposed else \
                    (self._to_rows_gpu(rows_side, first, samples) if want_weight else None, None)
                col = self._backward_columns_gpu(i, b, image_side, first, samples) \
                    if want_weight or self.transposed else None
                if want_weight:
                    self._group_gemm_gpu("weight", samples, rows, col, self.blobs[0].mutable_gpu_diff(), rows_at,
                                         bias_diff)
                if down and self.transposed:
                    self._rows_product_gpu(self.blobs[0].gpu_data(), col, b.mutable_gpu_diff(), first, samples, False)
                elif down:
                    self._columns_product_gpu(self.blobs[0].gpu_data(), rows, b.mutable_gpu_diff(), first, samples,
                                              rows_at)


@register_layer("Convolution")
class ConvolutionLayer(BaseConvolutionLayer):
    """N-d convolution with groups and dilation: im2col + one GEMM per group over the whole batch.

    Output size per axis: (in + 2 pad - (dilation (kernel - 1) + 1)) / stride + 1.
    With `shifted_taps` (set by the deploy-time optimiser, engine/optimize.py) the CPU forward of a 2-D,
    stride-1, one-group convolution runs one GEMM per kernel tap instead (see _forward_shifted_taps): the same
    sums in another order, within float32 rounding of im2col's. With `winograd` (set by the optimiser at its
    "full" level, where only the net's outputs are kept) a 3x3 stride-1 one runs Winograd F(4x4, 3x3) instead
    (see _forward_winograd): a quarter of the multiplications, each output within about 1e-5 of its blob's scale
    of the direct sums. With `fused_relu` (set by the optimiser while it runs a step whose ReLU works in place
    on this top) the CPU forward applies that ReLU as it writes the top; with `fused_residual` (an array the
    optimiser sets while it runs an Eltwise sum fused into this layer, see writes_top_after_gemm) it adds that
    array first.
    """
    shifted_taps = False
    winograd = False
    fused_relu = False
    fused_residual = None

    def layer_setup(self, bottom, top):
        super().layer_setup(bottom, top)
        self._cached_columns = {}
        self._derived_weights = {}
        # CPU, group 1: the bias rides in the GEMMs, as the weights' last column times a row of ones under
        # the columns; that saves a pass over the top in forward and over its diff for the bias gradient
        self.fold_bias = self.bias_term and self.group == 1 and not self.pointwise

    def top_spatial(self, spatial, where):
        out = tuple(conv_out_size(n, k, s, p, d) for n, k, s, p, d in
                    zip(spatial, self.kernel, self.stride, self.pad, self.dilation))
        if any(o <= 0 for o in out):
            raise KaffeError(f"{where}: the dilated kernel {_shape(self.kernel)} (dilation "
                             f"{_shape(self.dilation)}) is larger than the padded input {_shape(spatial)} "
                             f"(pad {_shape(self.pad)})")
        return out

    def _columns(self, blob, forward=False):
        """The columns of a bottom's data (with the ones row when fold_bias).

        Columns of at most COLUMN_BUFFER_LIMIT floats are kept for the backward pass, which reuses them
        while the bottom's data is unchanged (Caffe recomputes them; keeping them saves a third of the work).
        Forward always makes them anew: a caller may have written the data through an array it kept
        (`d = net.blobs['data'].data`), which the data version does not see.
        """
        if self.pointwise:
            return blob.cpu_data().reshape(self.num, self.group, self.kernel_dim, self.column_count)
        key = (id(blob), blob.data_version())
        cached = self._cached_columns.get(id(blob))
        if cached is not None and cached[0] == key and not forward:
            return cached[1]
        reuse = cached[1] if cached is not None else None
        if not self.needs_backward:
            reuse = work_buffer("inference columns",
                                (self.kernel_dim * self.group + self.fold_bias) * self.column_count * self.num)
        col = self._im2col(blob.cpu_data(), extra_rows=int(self.fold_bias), reuse=reuse)
        if self.fold_bias:
            col[0, -1] = 1
        if col.size <= COLUMN_BUFFER_LIMIT and self.needs_backward:
            self._cached_columns[id(blob)] = (key, col)
        return col

    def _compiled_depthwise(self):
        """2-D depthwise convolutions run the numba kernels where the accelerator is on."""
        return self.depthwise and self.num_spatial == 2 and accelerator.enabled()

    def _planes(self, array, channels):
        """A bottom- or top-side array as (num, channels, H, W)."""
        return array.reshape((self.num, channels) + array.shape[-2:])

    def _forward_depthwise(self, bottom, top):
        bias = self.blobs[1].cpu_data() if self.bias_term else np.zeros(self.num_output, dtype=np.float32)
        weight = self.blobs[0].cpu_data().reshape(self.num_output, *self.kernel)
        for b, t in zip(bottom, top):
            accelerator.kernels().depthwise_forward(
                self._planes(b.cpu_data(), self.channels), weight, bias,
                self._planes(t.mutable_cpu_data(), self.num_output), *self.stride, *self.pad, *self.dilation,
                self.fused_relu)

    def _backward_depthwise(self, top, propagate_down, bottom):
        kernels, geometry = accelerator.kernels(), (*self.stride, *self.pad, *self.dilation)
        want_bias = self.bias_term and self.param_propagate_down[1]
        weight = self.blobs[0].cpu_data().reshape(self.num_output, *self.kernel)
        for t, down, b in zip(top, propagate_down, bottom):
            top_diff = self._planes(t.cpu_diff(), self.num_output)
            if self.param_propagate_down[0]:  # the bias gradient comes with it
                bias_diff = self.blobs[1].mutable_cpu_diff() if want_bias else np.zeros(0, dtype=np.float32)
                kernels.depthwise_backward_weight(self._planes(b.cpu_data(), self.channels), top_diff,
                                                  self.blobs[0].mutable_cpu_diff().reshape(weight.shape),
                                                  bias_diff, *geometry)
            elif want_bias:
                self._add_bias_gradient(top_diff)
            if down:
                kernels.depthwise_backward_data(top_diff, weight, self._planes(b.mutable_cpu_diff(), self.channels),
                                                *geometry)

    def writes_top_after_gemm(self):
        """Whether the CPU forward ends in one pass over its top after the GEMMs (im2col, 1x1): the pass that
        adds the bias, and can add fused_residual and apply fused_relu on the way."""
        return not (self._compiled_depthwise() or self._runs_winograd() or self._runs_shifted_taps())

    def _runs_shifted_taps(self):
        """Whether this forward runs as one GEMM per kernel tap (see _forward_shifted_taps): 2-D, stride 1, one
        group, and a shape where that beat im2col and one GEMM over all taps (measured with numpy's OpenBLAS on 2
        cores over the zoo's layers): enough input channels that each tap's GEMM, which sums over them, is not
        thin (96, or 64 when the outputs are at most twice as many or the columns outgrow the cache, so that
        im2col's copies weigh more), and not
        small maps of several samples, where the grid's extra positions cost more than the columns."""
        if not (self.shifted_taps and self.num_spatial == 2 and self.group == 1 and not self.pointwise and
                all(s == 1 for s in self.stride) and blas.available()):
            return False
        columns = self.kernel_dim * self.column_count * self.num
        wide = self.channels >= 96 or (self.channels >= 64 and (self.num_output <= 2 * self.channels or
                                                               columns >= SHIFTED_TAPS_LARGE_COLUMNS))
        return wide and (self.num == 1 or self.column_count > SHIFTED_TAPS_SMALL_MAP)

    def _derived_from_weights(self, role, derive):
        """derive(the weights as (num_output, channels, kernel taps)), kept per role while the weights' data is
        unchanged."""
        key = (id(self.blobs[0]), self.blobs[0].data_version())
        cached = self._derived_weights.get(role)
        if cached is None or cached[0] != key:
            weight = self.blobs[0].cpu_data().reshape(self.num_output, self.channels, -1)
            cached = self._derived_weights[role] = (key, derive(weight))
        return cached[1]

    def _tap_weights(self):
        """The weights as one contiguous (num_output, channels) matrix per kernel tap, row-major taps."""
        return self._derived_from_weights("taps", lambda weight: np.ascontiguousarray(weight.transpose(2, 0, 1)))

    def _runs_winograd(self):
        """Whether this forward runs as Winograd F(4x4, 3x3) (see _forward_winograd): 3x3, stride 1, no dilation,
        one group, 2-D, the compiled transforms at hand, and a shape where it measured faster than the GEMM paths
        (numpy's OpenBLAS on 2 cores over the zoo's layers): enough channels on both sides that the 36 GEMMs
        outweigh the transforms, and outputs large enough that 4x4 tiles waste little at the edges."""
        return (self.winograd and self.num_spatial == 2 and self.group == 1 and tuple(self.kernel) == (3, 3) and
                tuple(self.stride) == (1, 1) and tuple(self.dilation) == (1, 1) and accelerator.enabled() and
                min(self.channels, self.num_output) >= WINOGRAD_MIN_CHANNELS and
                min(self.column_spatial) >= WINOGRAD_MIN_SIDE)

    def _winograd_weights(self):
        """G w G^T per (output, input) pair, computed in float64: (36, num_output, channels), element 6 i + j."""
        def transform(weight):
            kernels = weight.reshape(self.num_output, self.channels, 3, 3).astype(np.float64)
            transformed = np.einsum("ai,kcij,bj->abkc", WINOGRAD_G, kernels, WINOGRAD_G)
            return np.ascontiguousarray(transformed.reshape(36, self.num_output, self.channels), dtype=np.float32)
        return self._derived_from_weights("winograd", transform)

    def _forward_winograd(self, bottom, top):
        """The convolution by Winograd F(4x4, 3x3): the zero-bordered input cut into 6x6 tiles 4 apart, each
        transformed (B^T d B, compiled), 36 GEMMs (one per transformed element: weights (outputs x channels) times
        the tiles' values (channels x tiles)), and each product tile transformed back (A^T m A, compiled) with the
        bias (and the fused ReLU) into the top; in chunks of samples. An inf or NaN in the input spreads NaN over
        the 4x4 outputs of each tile that reads it."""
        kernels = accelerator.kernels()
        (height, width), (out_h, out_w), (ph, pw) = self.image_spatial, self.column_spatial, self.pad
        tiles_h, tiles_w = -(-out_h // 4), -(-out_w // 4)
        rows, length, tiles = 4 * tiles_h + 2, 4 * tiles_w + 2, tiles_h * tiles_w
        weights = self._winograd_weights()
        bias = self.blobs[1].cpu_data() if self.bias_term else np.zeros(self.num_output, dtype=np.float32)
        # samples per chunk: as few as keep the tiles of a chunk at least a quarter of the smaller channel count,
        # so that each chunk's GEMMs read the transformed weights (36 x outputs x channels) for enough columns,
        # while the tiles' transforms stay in the cache (measured on the zoo's layers at batch 16)
        step = min(self.num, -(-min(self.channels, self.num_output) // (4 * tiles)))
        for b, t in zip(bottom, top):
            image = b.cpu_data().reshape(self._image_shape())
            out = t.mutable_cpu_data().reshape(self.num, self.num_output, out_h, out_w)
            for first in range(0, self.num, step):
                count = min(step, self.num - first)
                padded = work_buffer("padded image", count * self.channels * rows * length).reshape(
                    count, self.channels, rows, length)
                padded[:, :, :ph] = 0
                padded[:, :, ph + height:] = 0
                padded[:, :, ph:ph + height, :pw] = 0
                padded[:, :, ph:ph + height, pw + width:] = 0
                padded[:, :, ph:ph + height, pw:pw + width] = image[first:first + count]
                transformed = work_buffer("winograd input", 36 * self.channels * count * tiles)
                product = work_buffer("rows product", 36 * self.num_output * count * tiles)
                kernels.winograd_input(padded, transformed.reshape(36, self.channels, -1))
                np.matmul(weights, transformed.reshape(36, self.channels, -1),
                          out=product.reshape(36, self.num_output, -1))
                kernels.winograd_output(product.reshape(36, self.num_output, -1), bias, out[first:first + count],
                                        self.fused_relu)

    def _tap_grid(self):
        """The flat layout of the shifted_taps input: (lead, rows per sample, row length). Sample n's pixel
        (y, x) lies at lead + (n * rows + y) * row_length + x and every other place holds zero. Padding comes
        after each row and each sample; when the window reaches exactly pad past both sides ((kernel - 1) *
        dilation == 2 pad, "same" convolutions) the pad after one row is also the pad before the next, so rows
        and samples need only one pad between them, else two. The lead is the pad before the first pixel."""
        (height, width), (ph, pw) = self.image_spatial, self.pad
        shared = [(k - 1) * d == 2 * p for k, d, p in zip(self.kernel, self.dilation, self.pad)]
        rows, length = height + (ph if shared[0] else 2 * ph), width + (pw if shared[1] else 2 * pw)
        return ph * length + pw, rows, length

    def _forward_shifted_taps(self, bottom, top):
        """The convolution as a sum over the kernel taps (i, j) of weight[:, :, i, j] @ the padded input shifted
        by that tap, with no columns. The samples lie one after another in one zero-bordered (C, positions)
        array (_tap_grid), where the output at (n, y, x) is the sum over taps of the input at its own flat place
        plus the tap's offset (i * dilation_h * row_length + j * dilation_w), so each GEMM reads the input in
        place. The outputs come on the grid (M, N, rows, row_length), in slices of positions to which the taps
        add in turn (BLAS's beta = 1); the top receives each sample's out_h x out_w corner, with the bias added
        (and the fused ReLU) on the way."""
        (kh, kw), (dh, dw) = self.kernel, self.dilation
        (height, width), (out_h, out_w) = self.image_spatial, self.column_spatial
        lead, rows, length = self._tap_grid()
        span = self.num * rows * length
        offsets = [i * dh * length + j * dw for i in range(kh) for j in range(kw)]
        size = lead + span + offsets[-1]  # the last tap's view runs past the grid
        channels, outputs = self.channels, self.num_output
        taps = self._tap_weights()
        padded = work_buffer("padded image", channels * size).reshape(channels, size)
        product = work_buffer("rows product", outputs * span).reshape(outputs, span)
        grid = padded[:, lead:lead + span].reshape(channels, self.num, rows, length)
        padded[:, :lead] = 0
        padded[:, lead + span:] = 0
        grid[:, :, height:] = 0
        grid[:, :, :height, width:] = 0
        tap_size, weights, source, target = (outputs * channels * 4, blas.address(taps), blas.address(padded),
                                             blas.address(product))
        for b, t in zip(bottom, top):
            grid[:, :, :height, :width] = b.cpu_data().reshape(self._image_shape()).swapaxes(0, 1)
            for first in range(0, span, SHIFTED_TAPS_SLICE):
                positions = min(SHIFTED_TAPS_SLICE, span - first)
                for tap, offset in enumerate(offsets):
                    blas.gemm(outputs, positions, channels, weights + tap * tap_size, channels,
                              source + 4 * (offset + first), size, target + 4 * first, span, accumulate=tap > 0)
            result = product.reshape(outputs, self.num, rows, length)[:, :, :out_h, :out_w].swapaxes(0, 1)
            self._write_top(result, t.mutable_cpu_data().reshape(self.num, outputs, out_h, out_w), self.bias_term)

    def _write_top(self, result, out, add_bias):
        """out (num, num_output, ...) = result, plus the bias when add_bias, plus fused_residual when set, then
        ReLU when fused_relu. result may be out: then the compiled kernel does it all in one pass over it (numpy
        takes one per sum and two for the ReLU); when it is not (the shifted_taps grid, which never has a
        residual), the ReLU follows the copy a contiguous block of one sample's channels at a time, while the
        block is still in the cache."""
        residual = self.fused_residual
        if result is out and accelerator.enabled():
            bias = self.blobs[1].cpu_data() if add_bias else np.zeros(self.num_output, dtype=np.float32)
            rows = (self.num, self.num_output, -1)
            accelerator.kernels().bias_relu(out.reshape(rows), bias, NO_RESIDUAL if residual is None else
                                            residual.reshape(rows), add_bias, residual is not None, self.fused_relu)
            return
        bias = self.blobs[1].cpu_data().reshape((1, -1) + (1,) * (out.ndim - 2)) if add_bias else None
        if result is out or not self.fused_relu:
            if bias is not None:
                np.add(result, bias, out=out)
            elif result is not out:
                out[...] = result
            if residual is not None:
                np.add(out, residual.reshape(out.shape), out=out)
            if self.fused_relu:
                relu(out, out)
            return
        step = max(1, BLOCK // out[0, 0].size)
        for n in range(self.num):
            for first in range(0, self.num_output, step):
                block, source = out[n, first:first + step], result[n, first:first + step]
                if bias is not None:
                    np.add(source, bias[0, first:first + step], out=block)
                else:
                    block[...] = source
                relu(block, block)

    def forward_cpu(self, bottom, top):
        if self._compiled_depthwise():
            return self._forward_depthwise(bottom, top)
        if self._runs_winograd():
            return self._forward_winograd(bottom, top)
        if self._runs_shifted_taps():
            return self._forward_shifted_taps(bottom, top)
        weight = self._weights()
        if self.fold_bias:
            weight = np.concatenate((weight, self.blobs[1].cpu_data().reshape(1, -1, 1)), axis=2)
        add_bias = self.bias_term and not self.fold_bias
        for b, t in zip(bottom, top):
            out = t.mutable_cpu_data()
            self._rows_product(weight, self._columns(b, forward=True), out)
            if add_bias or self.fused_relu or self.fused_residual is not None:
                out = out.reshape(self.num, self.num_output, -1)
                self._write_top(out, out, add_bias)

    def backward_cpu(self, top, propagate_down, bottom):
        if self._compiled_depthwise():
            return self._backward_depthwise(top, propagate_down, bottom)
        want_weight = self.param_propagate_down[0]
        want_bias = self.bias_term and self.param_propagate_down[1]
        for t, down, b in zip(top, propagate_down, bottom):
            top_diff = t.cpu_diff()
            rows = self._rows(top_diff) if want_weight or down else None
            if want_weight:
                gradient = self._weight_gradient(rows, self._columns(b))
                self.blobs[0].mutable_cpu_diff()[...] += gradient[..., :self.kernel_dim].reshape(self.blobs[0].shape)
                if self.fold_bias and want_bias:
                    self.blobs[1].mutable_cpu_diff()[...] += gradient[0, :, -1]
            if want_bias and not (self.fold_bias and want_weight):
                self._add_bias_gradient(top_diff)
            if down and self.pointwise:
                np.matmul(self._weights().transpose(0, 2, 1), rows,
                          out=b.mutable_cpu_diff().reshape(self.num, self.group, self.kernel_dim, -1))
            elif down:
                self._col2im(self._columns_product(rows), b.mutable_cpu_diff())


@register_layer("Deconvolution")
class DeconvolutionLayer(BaseConvolutionLayer):
    """Transposed convolution: forward is Convolution's backward-data pass (GEMM with the transposed weights,
    then col2im into the top), backward is its forward (im2col of the top diff) plus the weight gradient.

    Weights (C_in, num_output / group, *kernel); output size per axis:
    stride (in - 1) + dilation (kernel - 1) + 1 - 2 pad. With the bilinear filler and kernel 2f - f % 2,
    stride f, pad ceil((f - 1) / 2) it is FCN's fixed upsampling by f.
    """
    transposed = True

    def top_spatial(self, spatial, where):
        out = tuple(s * (n - 1) + d * (k - 1) + 1 - 2 * p for n, k, s, p, d in
                    zip(spatial, self.kernel, self.stride, self.pad, self.dilation))
        if any(o <= 0 for o in out):
            raise KaffeError(f"{where}: the padding {_shape(self.pad)} leaves no output for the input "
                             f"{_shape(spatial)} (kernel {_shape(self.kernel)}, stride {_shape(self.stride)}, "
                             f"dilation {_shape(self.dilation)}); the output would be {_shape(out)}")
        return out

    def _add_bias(self, top_data):
        top_data.reshape(self.num, self.num_output, self.top_count)[...] += self._bias()

    def forward_cpu(self, bottom, top):
        for b, t in zip(bottom, top):
            out = t.mutable_cpu_data()
            self._col2im(self._columns_product(self._rows(b.cpu_data())), out)
            if self.bias_term:
                self._add_bias(out)

    def backward_cpu(self, top, propagate_down, bottom):
        for t, down, b in zip(top, propagate_down, bottom):
            top_diff = t.cpu_diff()
            self._add_bias_gradient(top_diff)
            if not (self.param_propagate_down[0] or down):
                continue
            col = self._im2col(top_diff)
            if self.param_propagate_down[0]:
                self.blobs[0].mutable_cpu_diff()[...] += self._weight_gradient(
                    self._rows(b.cpu_data()), col).reshape(self.blobs[0].shape)
            if down:
                self._rows_product(self._weights(), col, b.mutable_cpu_diff())


@register_layer("Im2col")
class Im2colLayer(Layer):
    """The convolution's column transform as a layer (convolution_param: kernel, stride, pad, dilation, axis).

    Each sample's columns, in Caffe's layout: the channel axis becomes C * prod(kernel) (row c * K + k is tap k
    of channel c) and the spatial axes the convolution's output positions. Backward is col2im. OpenCL: 1-D and
    2-D (higher dimensions run the CPU code).
    """
    exact_num_bottom_blobs = 1
    exact_num_top_blobs = 1

    def layer_setup(self, bottom, top):
        p = self.layer_param.convolution_param
        where = f"{self.type} layer '{self.name}'"
        self.channel_axis = bottom[0].canonical_axis_index(p.axis)
        self.num_spatial = bottom[0].num_axes - self.channel_axis - 1
        if self.num_spatial < 1:
            raise KaffeError(f"{where}: the input needs a spatial axis after the channel axis {self.channel_axis}, "
                             f"got {bottom[0].shape_string()}")
        self.kernel, self.stride, self.pad, self.dilation = conv_geometry(p, self.num_spatial, where)

    def reshape(self, bottom, top):
        where = f"{self.type} layer '{self.name}'"
        if bottom[0].num_axes != self.channel_axis + 1 + self.num_spatial:
            raise KaffeError(f"{where}: bottom num_axes may not change (set up for "
                             f"{self.channel_axis + 1 + self.num_spatial} axes, got {bottom[0].shape_string()})")
        self.num = bottom[0].count_axes(0, self.channel_axis)
        self.channels = bottom[0].shape[self.channel_axis]
        self.spatial = bottom[0].shape[self.channel_axis + 1:]
        self.out_spatial = tuple(conv_out_size(n, k, s, p, d) for n, k, s, p, d in
                                 zip(self.spatial, self.kernel, self.stride, self.pad, self.dilation))
        if any(o <= 0 for o in self.out_spatial):
            raise KaffeError(f"{where}: the dilated kernel {_shape(self.kernel)} (dilation {_shape(self.dilation)}) "
                             f"is larger than the padded input {_shape(self.spatial)} (pad {_shape(self.pad)})")
        self.rows = self.channels * int(np.prod(self.kernel))
        self.positions = int(np.prod(self.out_spatial, dtype=np.int64))
        top[0].reshape(bottom[0].shape[:self.channel_axis] + (self.rows,) + self.out_spatial)

    def _image_shape(self):
        return (self.num, self.channels) + self.spatial

    def forward_cpu(self, bottom, top):
        col = im2col(bottom[0].cpu_data().reshape(self._image_shape()), self.kernel, self.stride, self.pad,
                     self.dilation)
        top[0].mutable_cpu_data().reshape(self.num, self.rows, self.positions)[...] = \
            col.reshape(self.rows, self.positions, self.num).transpose(2, 0, 1)

    def backward_cpu(self, top, propagate_down, bottom):
        if propagate_down[0]:
            col = top[0].cpu_diff().reshape(self.num, self.rows, self.positions).transpose(1, 2, 0)
            col2im(np.ascontiguousarray(col), self._image_shape(), self.kernel, self.stride, self.pad, self.dilation,
                   out=bottom[0].mutable_cpu_diff().reshape(self._image_shape()))

    def _transform_args(self):
        return transform_args_2d(self.num, self.channels, self.spatial, self.out_spatial, self.kernel, self.stride,
                                 self.pad, self.dilation, self.positions, self.rows * self.positions)

    def forward_gpu(self, bottom, top):
        if self.num_spatial > 2:
            return super().forward_gpu(bottom, top)
        run_kernel("im2col", self.channels * self.num * self.positions, *opencl.device_args(bottom[0].gpu_data()),
                   *self._transform_args(), *opencl.device_args(top[0].mutable_gpu_data()))

    def backward_gpu(self, top, propagate_down, bottom):
        if self.num_spatial > 2:
            return super().backward_gpu(top, propagate_down, bottom)
        if propagate_down[0]:
            run_kernel("col2im", bottom[0].count, *opencl.device_args(top[0].gpu_diff()), *self._transform_args(),
                       *opencl.device_args(bottom[0].mutable_gpu_diff()))


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
    """2-D MAX / AVE / STOCHASTIC pooling.

    MAX may give a second top: the argmax of each window as a flat h*W+w index into the input plane.
    STOCHASTIC (no padding; the inputs are taken to be non-negative, e.g. after a ReLU): TRAIN outputs one
    element of each window, drawn with probability proportional to its value, and backward routes the gradient
    to it; TEST outputs the activation-weighted average sum(x^2) / sum(x). Caffe has it on the GPU only; here
    both run, with Caffe's draw: u in (0, 1] per output, the first element at which the running window sum
    reaches u * the window sum. The u come from the counter-based generator of Dropout (one 64-bit seed from
    device.rng() per TRAIN forward), so the CPU and OpenCL draws are the same. TEST backward, which Caffe
    leaves undefined, is the gradient of the weighted average.
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
        self.window_argmax = None  # set by the MAX fast path: the tap index of each window's maximum
        self._geometry_for = None  # the bottom shape the window geometry was computed for
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
        if bottom[0].shape != self._geometry_for:  # the window geometry depends on the input's shape only
            self._set_geometry(bottom[0])
            self._geometry_for = bottom[0].shape
        for t in top:
            t.reshape(bottom[0].shape[:2] + self.out_spatial)

    def _set_geometry(self, bottom):
        where = f"{self.type} layer '{self.name}'"
        if bottom.num_axes != 4:
            raise KaffeError(f"{where}: input must have 4 axes (num, channels, height, width), got "
                             f"{bottom.shape_string()}")
        self.in_spatial = bottom.shape[2:]
        if self.global_pooling:
            self.kernel = self.in_spatial
        self.out_spatial = tuple(pooled_size(n, k, s, p, self.ceil_mode) for n, k, s, p in
                                 zip(self.in_spatial, self.kernel, self.stride, self.pad))
        if min(self.out_spatial) <= 0:
            raise KaffeError(f"{where}: kernel {_shape(self.kernel)} with pad {_shape(self.pad)} does not fit the "
                             f"input {bottom.shape_string()}")
        self.taps = list(_tap_spans(self.in_spatial, self.out_spatial, self.kernel, self.stride, self.pad,
                                    (1, 1)))
        # per axis, (output slice, input slice) of each kernel row / column that reads real input: MAX and AVE
        # are separable, so the fast paths reduce along the rows of the windows, then along their columns
        self.axis_taps = [[span for span in (tap_span(n, o, i, s, p) for i in range(k)) if span]
                          for n, o, k, s, p in zip(self.in_spatial, self.out_spatial, self.kernel, self.stride,
                                                   self.pad)]
        # windows that tile the input exactly (LeNet's 2x2/2) take a reshape-based fast path
        self.tiled = (self.stride == self.kernel and not any(self.pad) and
                      all(o * k == n for o, k, n in zip(self.out_spatial, self.kernel, self.in_spatial)))
        if self.method == caffe_pb2.PoolingParameter.AVE:
            self.divisors = np.multiply.outer(
                *(ave_pool_divisors(n, o, k, s, p) for n, o, k, s, p in
                  zip(self.in_spatial, self.out_spatial, self.kernel, self.stride, self.pad))).astype(np.float32)

    def _forward_max_fast(self, x, y, top):
        """MAX reduced along the window rows, then along the window columns. Returns False (use the general
        path) when an output is NaN, -inf or -FLT_MAX: Caffe's semantics for those (NaN never wins; -FLT_MAX is
        the start value that only a greater cell replaces) are the general path's. Windows that tile the input
        (LeNet's 2x2/2) take reshapes instead of strided views."""
        (kh, kw), (oh, ow) = self.kernel, self.out_spatial
        num, channels, height, _ = x.shape
        if self.tiled:
            row_cells = x.reshape(num, channels, height, ow, kw)
            row_max = row_cells[..., 0] if kw == 1 else np.maximum(row_cells[..., 0], row_cells[..., 1])
            for j in range(2, kw):
                np.maximum(row_max, row_cells[..., j], out=row_max)
            window_rows = row_max.reshape(num, channels, oh, kh, ow)
            np.copyto(y, window_rows[:, :, :, 0])
            for i in range(1, kh):
                np.maximum(y, window_rows[:, :, :, i], out=y)  # np.maximum passes a NaN on, to the check below
        else:  # fmax skips a NaN cell, as Caffe's `>` does; windows of NaN only stay -inf for the check below
            taps_h, taps_w = self.axis_taps
            row_max = np.full((num, channels, height, ow), -np.inf, dtype=np.float32)
            for out_s, in_s in taps_w:
                np.fmax(row_max[..., out_s], x[..., in_s], out=row_max[..., out_s])
            y[...] = -np.inf
            for out_s, in_s in taps_h:
                np.fmax(y[..., out_s, :], row_max[..., in_s, :], out=y[..., out_s, :])
        if not (y > -FLT_MAX).all():
            return False
        self.window_argmax = None
        if self.needs_backward or len(top) > 1:
            self._find_window_argmax(x, y, top)
        return True

    def _find_window_argmax(self, x, y, top):
        """The row-major tap index of the FIRST cell equal to each window's max (Caffe's tie rule), built from
        the last tap backwards: local = (local + 1) * (cell_k != max) leaves k where tap k is the first maximum
        (a tap that does not reach an output, being in the padding, counts as unequal there)."""
        kh, kw = self.kernel
        local = np.zeros(y.shape, dtype=np.uint8 if kh * kw < 256 else np.int32)
        spans = {taps: (out_s, in_s) for taps, out_s, in_s in self.taps}
        for k in range(kh * kw - 2, -1, -1):
            local += 1
            span = spans.get(divmod(k, kw))
            if span:
                window = (Ellipsis,) + span[0]
                local[window] *= np.not_equal(x[(Ellipsis,) + span[1]], y[window])
        self.window_argmax = local
        self._write_argmax_top(top)

    def _forward_max_compiled(self, x, y, top):
        """The compiled MAX forward that also keeps each window's argmax tap; False as _forward_max_fast."""
        dtype = np.uint8 if self.kernel[0] * self.kernel[1] < 256 else np.int32
        if self.window_argmax is None or self.window_argmax.shape != y.shape or self.window_argmax.dtype != dtype:
            self.window_argmax = np.empty(y.shape, dtype=dtype)
        accelerator.kernels().max_pool_forward_argmax(x, y, self.window_argmax, *self.kernel, *self.stride,
                                                      *self.pad, -FLT_MAX)
        if not (y > -FLT_MAX).all():
            self.window_argmax = None
            return False
        self._write_argmax_top(top)
        return True

    def _write_argmax_top(self, top):
        """A second top gets each window's argmax as Caffe's flat input index (as floats)."""
        if len(top) > 1:
            (oh, ow), (sh, sw), (ph, pw), kw = self.out_spatial, self.stride, self.pad, self.kernel[1]
            rows = (np.arange(oh) * sh - ph)[:, None] + self.window_argmax // kw
            cols = (np.arange(ow) * sw - pw)[None, :] + self.window_argmax % kw
            top[1].mutable_cpu_data()[...] = rows * self.in_spatial[1] + cols

    def _backward_max_fast(self, dy, dx):
        kw = self.kernel[1]
        if not self.tiled:
            dx[...] = 0
        for taps, out_s, in_s in self.taps:
            k = taps[0] * kw + taps[1]
            window = (Ellipsis,) + out_s
            if self.tiled:  # every input cell is in exactly one window
                np.multiply(dy, self.window_argmax == k, out=dx[(Ellipsis,) + in_s])
            else:
                dx[(Ellipsis,) + in_s] += dy[window] * (self.window_argmax[window] == k)

    # -- STOCHASTIC: the windows have no padding, so self.taps covers each window's elements in row-major order --
    def _draw_seed(self):
        self.seed = device.rng().integers(0, np.iinfo(np.uint64).max, dtype=np.uint64, endpoint=True)

    def _uniforms(self, shape):
        """u in (0, 1] per output: 24 random bits, so that u is exact in float32 on the host and the device."""
        bits = dropout_bits(self.seed, int(np.prod(shape, dtype=np.int64)))
        return (((bits >> np.uint32(8)) + np.uint32(1)).astype(np.float32) * np.float32(2.0 ** -24)).reshape(shape)

    def _forward_stochastic_train(self, x, y):
        """Sums in the OpenCL kernel's order (float32, row-major), so both pick the same element."""
        window_sum = np.zeros(y.shape, dtype=np.float32)
        for _, out_s, in_s in self.taps:
            window_sum[(Ellipsis,) + out_s] += x[(Ellipsis,) + in_s]
        threshold = self._uniforms(y.shape) * window_sum
        running = np.zeros_like(window_sum)
        index = np.full(y.shape, -1, dtype=np.int32)  # stays -1 only for a window with NaN
        flat_index = np.arange(x.shape[2] * x.shape[3], dtype=np.int32).reshape(x.shape[2:])
        y[...] = 0
        for _, out_s, in_s in self.taps:
            window = (Ellipsis,) + out_s
            candidate = x[(Ellipsis,) + in_s]
            running[window] += candidate
            chosen = (index[window] < 0) & (running[window] >= threshold[window])
            index[window] = np.where(chosen, flat_index[in_s], index[window])
            y[window] = np.where(chosen, candidate, y[window])
        self.argmax = index

    def _forward_stochastic_test(self, x, y):
        window_sum = np.full(y.shape, np.finfo(np.float32).tiny, dtype=np.float32)  # FLT_MIN: never 0 / 0
        squares = np.zeros(y.shape, dtype=np.float32)
        for _, out_s, in_s in self.taps:
            window = (Ellipsis,) + out_s
            candidate = x[(Ellipsis,) + in_s]
            window_sum[window] += candidate
            squares[window] += candidate * candidate
        np.divide(squares, window_sum, out=y)
        self.window_sum = window_sum

    def _stochastic_train(self):
        return self.method == caffe_pb2.PoolingParameter.STOCHASTIC and self.phase == caffe_pb2.TRAIN

    def forward_cpu(self, bottom, top):
        x = bottom[0].cpu_data()
        y = top[0].mutable_cpu_data()
        max_pool, compiled = self.method == caffe_pb2.PoolingParameter.MAX, accelerator.enabled()
        if max_pool and compiled and not (self.needs_backward or len(top) > 1):   # no argmax wanted: one pass
            self.window_argmax = None
            accelerator.kernels().max_pool_forward(x, y, *self.kernel, *self.stride, *self.pad, -FLT_MAX)
            return
        # with the argmax: compiled for overlapping or padded windows; the reshapes of the numpy path measured
        # faster where windows tile the input (LeNet's 2x2/2: 0.89 against 1.07 ms at batch 64)
        if max_pool and compiled and not self.tiled and self._forward_max_compiled(x, y, top):
            return
        if max_pool and self._forward_max_fast(x, y, top):
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
        elif self.method == caffe_pb2.PoolingParameter.AVE:  # window sums along the rows, then the columns
            taps_h, taps_w = self.axis_taps
            row_sum = np.zeros(x.shape[:3] + y.shape[3:], dtype=np.float32)
            for out_s, in_s in taps_w:
                row_sum[..., out_s] += x[..., in_s]
            y[...] = 0
            for out_s, in_s in taps_h:
                y[..., out_s, :] += row_sum[..., in_s, :]
            y /= self.divisors
        elif self._stochastic_train():
            self._draw_seed()
            self._forward_stochastic_train(x, y)
        else:
            self._forward_stochastic_test(x, y)

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
        elif self._stochastic_train():
            self._draw_seed()
            index = opencl.scratch(self, "argmax", top[0].count, np.int32)
            run_kernel("sto_pool_forward_train", top[0].count, *opencl.device_args(data), *self._pool_geometry(),
                       np.uint64(self.seed), *opencl.device_args(out), index.data)
        else:
            run_kernel("sto_pool_forward_test", top[0].count, *opencl.device_args(data), *self._pool_geometry(),
                       *opencl.device_args(out), opencl.scratch(self, "window_sum", top[0].count).data)

    def backward_gpu(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        top_diff, bottom_diff = top[0].gpu_diff(), bottom[0].mutable_gpu_diff()
        if self.method == caffe_pb2.PoolingParameter.MAX or self._stochastic_train():
            run_kernel("max_pool_backward", bottom[0].count, *opencl.device_args(top_diff), opencl.scratch(self, "argmax", 0).data,
                   *self._pool_geometry(), *opencl.device_args(bottom_diff))
        elif self.method == caffe_pb2.PoolingParameter.AVE:
            run_kernel("ave_pool_backward", bottom[0].count, *opencl.device_args(top_diff), *self._pool_geometry(),
                   *opencl.device_args(bottom_diff))
        else:
            run_kernel("sto_pool_backward_test", bottom[0].count, *opencl.device_args(bottom[0].gpu_data()),
                       *opencl.device_args(top[0].gpu_data()), *opencl.device_args(top_diff),
                       opencl.scratch(self, "window_sum", top[0].count).data, *self._pool_geometry(),
                       *opencl.device_args(bottom_diff))

    def backward_cpu(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        dy = top[0].cpu_diff()
        dx = bottom[0].mutable_cpu_diff()
        if self.method == caffe_pb2.PoolingParameter.MAX and self.window_argmax is not None:
            if accelerator.enabled():  # the numba kernel scatters in one pass, not one per tap
                return accelerator.kernels().max_pool_backward(dy, self.window_argmax, dx, *self.kernel,
                                                               *self.stride, *self.pad)
            self._backward_max_fast(dy, dx)
            return
        dx[...] = 0
        if self.method == caffe_pb2.PoolingParameter.MAX or self._stochastic_train():
            mask = top[1].cpu_data() if len(top) > 1 else self.argmax
            flat_index = np.arange(dx.shape[2] * dx.shape[3], dtype=mask.dtype).reshape(dx.shape[2:])
            for _, out_s, in_s in self.taps:
                window = (Ellipsis,) + out_s
                dx[(Ellipsis,) + in_s] += np.where(mask[window] == flat_index[in_s], dy[window], 0)
        elif self.method == caffe_pb2.PoolingParameter.AVE:  # spread over the columns, then along the rows
            taps_h, taps_w = self.axis_taps
            share = dy / self.divisors
            row_diff = np.zeros(dx.shape[:3] + dy.shape[3:], dtype=np.float32)
            for out_s, in_s in taps_h:
                row_diff[..., in_s, :] += share[..., out_s, :]
            for out_s, in_s in taps_w:
                dx[..., in_s] += row_diff[..., out_s]
        else:  # d(sum x^2 / sum x)/dx_j = (2 x_j - y) / sum x
            x, y = bottom[0].cpu_data(), top[0].cpu_data()
            share = dy / self.window_sum
            for _, out_s, in_s in self.taps:
                window = (Ellipsis,) + out_s
                dx[(Ellipsis,) + in_s] += share[window] * (2 * x[(Ellipsis,) + in_s] - y[window])


# -- SPP and Crop -------------------------------------------------------------------------------------
def copy_columns_gpu(src, src_cols, src_col0, dst, dst_cols, dst_col0, rows, cols):
    """dst[r, dst_col0 : dst_col0 + cols] = src[r, src_col0 : src_col0 + cols] for r < rows, on the device."""
    run_kernel("copy_columns", rows * cols, *opencl.device_args(src), src_cols, src_col0, *opencl.device_args(dst),
               dst_cols, dst_col0, cols)


@register_layer("SPP")
class SPPLayer(Layer):
    """Spatial pyramid pooling: level i pools the image into about 2^i x 2^i bins, and the levels, each
    flattened to (num, C * bins), are joined along axis 1. With pyramid_height 1 the output is the one level's
    (num, C, 1, 1), unflattened.

    Caffe builds it from Split / Pooling / Flatten / Concat; here one internal Pooling layer per level (so the
    bins, divisors and checks are Pooling's) writes into its part of the top. Level i uses, per axis, kernel
    k = ceil(size / 2^i), stride k and pad ceil((k 2^i - size) / 2). The levels get this layer's phase (Caffe's
    get TRAIN whatever the net's phase, which only matters for STOCHASTIC).
    """
    exact_num_bottom_blobs = 1
    exact_num_top_blobs = 1

    def layer_setup(self, bottom, top):
        p = self.layer_param.spp_param
        self.pyramid_height = p.pyramid_height
        if self.pyramid_height < 1:
            raise KaffeError(f"{self.type} layer '{self.name}': pyramid_height must be at least 1, "
                             f"got {self.pyramid_height}")
        self.input_shape = None
        self.levels = []  # (Pooling layer, its top)
        self.level_bottom = Blob()  # backward of levels after the first: bottom data, a diff of its own

    def _pooling_param(self, level, height, width):
        p = self.layer_param.spp_param
        bins = 2 ** level
        param = caffe_pb2.LayerParameter(name=f"{self.name} pyramid level {level}", type="Pooling", phase=self.phase)
        q = param.pooling_param
        q.pool = p.pool  # SPPParameter.PoolMethod has PoolingParameter's values
        q.kernel_h, q.kernel_w = -(-height // bins), -(-width // bins)
        q.stride_h, q.stride_w = q.kernel_h, q.kernel_w
        q.pad_h, q.pad_w = (q.kernel_h * bins - height + 1) // 2, (q.kernel_w * bins - width + 1) // 2
        return param

    def reshape(self, bottom, top):
        x = bottom[0]
        if x.num_axes != 4:
            raise KaffeError(f"{self.type} layer '{self.name}': input must have 4 axes (num, channels, height, "
                             f"width), got {x.shape_string()}")
        if min(x.shape[2:]) <= 0:
            raise KaffeError(f"{self.type} layer '{self.name}': input dimensions cannot be zero, got {x.shape_string()}")
        if x.shape != self.input_shape:  # the bins depend on the input size
            self.input_shape = x.shape
            self.levels = []
            for level in range(self.pyramid_height):
                pool = PoolingLayer(self._pooling_param(level, *x.shape[2:]))
                pooled = Blob()
                pool.setup([x], [pooled])
                self.levels.append((pool, pooled))
        for pool, pooled in self.levels:
            pool.reshape([x], [pooled])
        if self.pyramid_height == 1:
            top[0].reshape(self.levels[0][1].shape)
        else:
            top[0].reshape(x.shape[0], sum(pooled.count // x.shape[0] for _, pooled in self.levels))

    def _parts(self):
        """(level layer, its top, first column in the top) per level."""
        start = 0
        for pool, pooled in self.levels:
            yield pool, pooled, start
            start += pooled.count // self.input_shape[0]

    def forward_cpu(self, bottom, top):
        out = top[0].mutable_cpu_data().reshape(self.input_shape[0], -1)
        for pool, pooled, start in self._parts():
            pool.forward(bottom, [pooled])
            part = pooled.cpu_data().reshape(out.shape[0], -1)
            out[:, start:start + part.shape[1]] = part

    def forward_gpu(self, bottom, top):
        num, width = self.input_shape[0], top[0].count // self.input_shape[0]
        out = top[0].mutable_gpu_data()
        for pool, pooled, start in self._parts():
            pool.forward(bottom, [pooled])
            cols = pooled.count // num
            copy_columns_gpu(pooled.gpu_data(), cols, 0, out, width, start, num, cols)

    def _backward(self, bottom, take_part, add_diff):
        """Each level's backward from its part of the top diff; the bottom diff is their sum."""
        self.level_bottom.reshape(bottom[0].shape)
        self.level_bottom.share_data(bottom[0])
        for i, (pool, pooled, start) in enumerate(self._parts()):
            take_part(pooled, start)
            pool.backward([pooled], [True], [bottom[0] if i == 0 else self.level_bottom])
            if i:
                add_diff()

    def backward_cpu(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        if self.pyramid_height == 1:
            return self.levels[0][0].backward(top, propagate_down, bottom)
        dy = top[0].cpu_diff().reshape(self.input_shape[0], -1)

        def take_part(pooled, start):
            pooled.mutable_cpu_diff().reshape(dy.shape[0], -1)[...] = dy[:, start:start + pooled.count // dy.shape[0]]

        def add_diff():
            bottom[0].mutable_cpu_diff()[...] += self.level_bottom.cpu_diff()

        self._backward(bottom, take_part, add_diff)

    def backward_gpu(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        if self.pyramid_height == 1:
            return self.levels[0][0].backward(top, propagate_down, bottom)
        num, width = self.input_shape[0], top[0].count // self.input_shape[0]
        dy = top[0].gpu_diff()

        def take_part(pooled, start):
            cols = pooled.count // num
            copy_columns_gpu(dy, width, start, pooled.mutable_gpu_diff(), cols, 0, num, cols)

        def add_diff():
            opencl.axpy(1.0, self.level_bottom.gpu_diff(), bottom[0].mutable_gpu_diff())

        self._backward(bottom, take_part, add_diff)


@register_layer("Crop")
class CropLayer(Layer):
    """Crops bottom[0] to bottom[1]'s shape on the axes from `axis` on, starting at `offset` (one value for all
    those axes, one per axis, or none: 0). Axes before `axis` are kept. Backward reaches bottom[0] only."""
    exact_num_bottom_blobs = 2
    exact_num_top_blobs = 1

    def layer_setup(self, bottom, top):
        p = self.layer_param.crop_param
        self.start_axis = bottom[0].canonical_axis_index(p.axis)
        self.offset = list(p.offset)
        if len(self.offset) > 1 and self.start_axis + len(self.offset) != bottom[0].num_axes:
            raise KaffeError(f"{self.type} layer '{self.name}': the number of offset values ({len(self.offset)}) "
                             f"must be equal to the number of dimensions following axis {self.start_axis} of "
                             f"bottom[0] {bottom[0].shape_string()}")

    def reshape(self, bottom, top):
        source, reference = bottom
        if source.num_axes != reference.num_axes:
            raise KaffeError(f"{self.type} layer '{self.name}': the bottoms need the same number of axes, got "
                             f"{source.shape_string()} and {reference.shape_string()}")
        if len(self.offset) > 1 and self.start_axis + len(self.offset) != source.num_axes:
            raise KaffeError(f"{self.type} layer '{self.name}': bottom num_axes may not change "
                             f"(got {source.shape_string()})")
        offsets, shape = [0] * source.num_axes, list(source.shape)
        for i in range(self.start_axis, source.num_axes):
            offset = self.offset[0 if len(self.offset) == 1 else i - self.start_axis] if self.offset else 0
            if source.shape[i] - offset < reference.shape[i]:
                raise KaffeError(f"{self.type} layer '{self.name}': the crop for dimension {i} is out-of-bounds "
                                 f"with size {reference.shape[i]} and offset {offset} (bottom[0] "
                                 f"{source.shape_string()}, bottom[1] {reference.shape_string()})")
            offsets[i], shape[i] = offset, reference.shape[i]
        self.window = tuple(slice(o, o + n) for o, n in zip(offsets, shape))
        strides = np.cumprod((source.shape[1:] + (1,))[::-1])[::-1]
        self.base = int(np.dot(offsets, strides))
        self.geometry = np.array(list(shape) + list(strides), dtype=np.int32)
        top[0].reshape(shape)

    def forward_cpu(self, bottom, top):
        top[0].mutable_cpu_data()[...] = bottom[0].cpu_data()[self.window]

    def backward_cpu(self, top, propagate_down, bottom):
        if propagate_down[0]:
            dx = bottom[0].mutable_cpu_diff()
            dx[...] = 0
            dx[self.window] = top[0].cpu_diff()

    def _copy_gpu(self, src, dst, forward):
        """The crop on the device: the shape and strides go to the device once per geometry."""
        key = (opencl.current().index, self.geometry.tobytes())
        if getattr(self, "_device_geometry", (None,))[0] != key:
            self._device_geometry = (key, cla.to_device(opencl.queue(), self.geometry))
        run_kernel("crop_copy", int(np.prod(self.geometry[:len(self.window)])), *opencl.device_args(src),
                   *opencl.device_args(dst), self._device_geometry[1].data, len(self.window), self.base, forward)

    def forward_gpu(self, bottom, top):
        self._copy_gpu(bottom[0].gpu_data(), top[0].mutable_gpu_data(), True)

    def backward_gpu(self, top, propagate_down, bottom):
        if propagate_down[0]:
            dx = bottom[0].mutable_gpu_diff()
            opencl.fill(dx, 0.0)
            self._copy_gpu(top[0].gpu_diff(), dx, False)


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
        self.scale = None  # offset + factor * the window sums of x^2, kept for backward as Caffe's scale_ blob

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
        if self.across and accelerator.enabled():   # the same values in one compiled pass
            if self.scale is None or self.scale.shape != x.shape:
                self.scale = np.empty_like(x)
            accelerator.kernels().lrn_across_scale(
                x.reshape(x.shape[0], x.shape[1], -1), self.size, np.float32(self._window_mean_factor()),
                np.float32(offset), self.scale.reshape(x.shape[0], x.shape[1], -1))
        else:
            scale = _window_sum(x * x, self.size, self._axes())
            scale *= np.float32(self._window_mean_factor())
            scale += np.float32(offset)
            self.scale = scale
        y = top[0].mutable_cpu_data()
        power = y if top[0].memory is not bottom[0].memory else np.empty_like(x)   # in place: x is still read
        np.power(self.scale, np.float32(-self.beta), out=power)
        np.multiply(x, power, out=y)

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
