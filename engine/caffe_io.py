"""pycaffe's `caffe.io` (`kaffe.io`): image loading and resizing, the 10-crop oversampling, the Transformer that
prepares images for a net's input, and conversions between numpy arrays and BlobProto / Datum messages.

Names, signatures, defaults, checks and numbers are pycaffe's (python/caffe/io.py); images are read and resized
with scikit-image as pycaffe does, so the numbers are those of pycaffe run with today's scikit-image (whose
resize smooths before it shrinks). scikit-image is imported on first use only.
"""
import numpy as np

from ..proto import caffe_pb2
from .blob import Blob, proto_shape
from .errors import KaffeFileNotFoundError, KaffeImportError, KaffeOSError, KaffeTypeError, KaffeValueError


def _skimage():
    try:
        import skimage
        import skimage.io
        import skimage.transform
    except ImportError:
        raise KaffeImportError('kaffe.io reads and resizes images with scikit-image: pip install "kaffe[pycaffe]"') \
            from None
    return skimage


# -- proto / datum / ndarray conversion ---------------------------------------------------------------------
def blobproto_to_array(blob, return_diff=False):
    """The data (or, with return_diff, the diff) of a BlobProto as an array of the stored shape (the legacy
    num/channels/height/width when any of them is set)."""
    values = np.array(blob.diff if return_diff else blob.data)
    return values.reshape(proto_shape(blob))


def array_to_blobproto(arr, diff=None):
    """A BlobProto of an N-d array (and of its diff, which must have the same shape; not checked, as pycaffe)."""
    blob = Blob(*arr.shape)
    blob.data[...] = arr
    if diff is not None:
        blob.diff[...] = diff
    return blob.to_proto(write_diff=diff is not None)


def arraylist_to_blobprotovector_str(arraylist):
    """A list of arrays as a serialized BlobProtoVector."""
    vec = caffe_pb2.BlobProtoVector()
    vec.blobs.extend(array_to_blobproto(arr) for arr in arraylist)
    return vec.SerializeToString()


def blobprotovector_str_to_arraylist(str):
    """A serialized BlobProtoVector as a list of arrays."""
    vec = caffe_pb2.BlobProtoVector()
    vec.ParseFromString(str)
    return [blobproto_to_array(blob) for blob in vec.blobs]


def array_to_datum(arr, label=None):
    """A Datum of a C x H x W array: uint8 arrays are stored as bytes (`data`), others as `float_data`."""
    if arr.ndim != 3:
        raise KaffeValueError('Incorrect array shape.')
    datum = caffe_pb2.Datum()
    datum.channels, datum.height, datum.width = arr.shape
    if arr.dtype == np.uint8:
        datum.data = arr.tobytes()
    else:
        datum.float_data.extend(arr.astype(float).flat)
    if label is not None:
        datum.label = label
    return datum


def datum_to_array(datum):
    """The C x H x W array of a Datum (uint8 from `data`, float64 from `float_data`); the label is datum.label."""
    shape = (datum.channels, datum.height, datum.width)
    if len(datum.data):
        return np.frombuffer(datum.data, dtype=np.uint8).reshape(shape).copy()
    return np.array(datum.float_data).astype(float).reshape(shape)


# -- pre-processing -----------------------------------------------------------------------------------------
class Transformer:
    """Formats images for a net's inputs. `inputs`: {input name: its blob shape (N, K, H, W)}, e.g.
    `Transformer({'data': net.blobs['data'].data.shape})`."""

    def __init__(self, inputs):
        self.inputs = inputs
        self.transpose = {}
        self.channel_swap = {}
        self.raw_scale = {}
        self.mean = {}
        self.input_scale = {}

    def __check_input(self, in_):
        if in_ not in self.inputs:
            raise KaffeValueError('{} is not one of the net inputs: {}'.format(in_, self.inputs))

    def preprocess(self, in_, data):
        """An H' x W' x K image as the K x H x W input of `in_`: as float32, resized to the input's H x W, then
        transposed, channels reordered, times raw_scale, minus the mean, times input_scale."""
        self.__check_input(in_)
        caffe_in = np.array(data, dtype=np.float32)  # a copy: the caller's array is never scaled in place
        in_dims = tuple(self.inputs[in_][2:])
        if caffe_in.shape[:2] != in_dims:
            caffe_in = resize_image(caffe_in, in_dims)
        transpose = self.transpose.get(in_)
        if transpose is not None:
            caffe_in = caffe_in.transpose(transpose)
        channel_swap = self.channel_swap.get(in_)
        if channel_swap is not None:
            caffe_in = caffe_in[channel_swap, :, :]
        raw_scale = self.raw_scale.get(in_)
        if raw_scale is not None:
            caffe_in *= raw_scale
        mean = self.mean.get(in_)
        if mean is not None:
            caffe_in -= mean
        input_scale = self.input_scale.get(in_)
        if input_scale is not None:
            caffe_in *= input_scale
        return caffe_in

    def deprocess(self, in_, data):
        """Undo preprocess (except the resize): a K x H x W input back to an H x W x K image."""
        self.__check_input(in_)
        decaf_in = data.copy().squeeze()
        input_scale = self.input_scale.get(in_)
        if input_scale is not None:
            decaf_in /= input_scale
        mean = self.mean.get(in_)
        if mean is not None:
            decaf_in += mean
        raw_scale = self.raw_scale.get(in_)
        if raw_scale is not None:
            decaf_in /= raw_scale
        channel_swap = self.channel_swap.get(in_)
        if channel_swap is not None:
            decaf_in = decaf_in[np.argsort(channel_swap), :, :]
        transpose = self.transpose.get(in_)
        if transpose is not None:
            decaf_in = decaf_in.transpose(np.argsort(transpose))
        return decaf_in

    def set_transpose(self, in_, order):
        """The order of dimensions: (2, 0, 1) turns H x W x K into K x H x W."""
        self.__check_input(in_)
        if len(order) != len(self.inputs[in_]) - 1:
            raise KaffeValueError('Transpose order needs to have the same number of dimensions as the input.')
        self.transpose[in_] = order

    def set_channel_swap(self, in_, order):
        """The order to take the channels in, after the transpose: (2, 1, 0) turns RGB into BGR."""
        self.__check_input(in_)
        if len(order) != self.inputs[in_][1]:
            raise KaffeValueError('Channel swap needs to have the same number of dimensions as the input '
                                  'channels.')
        self.channel_swap[in_] = order

    def set_raw_scale(self, in_, scale):
        """Multiply the raw image by `scale` (255 for nets trained on [0, 255] pixels, as CaffeNet)."""
        self.__check_input(in_)
        self.raw_scale[in_] = scale

    def set_mean(self, in_, mean):
        """The mean to subtract: a vector of one value per channel, or a K x H x W (or H x W) array, which is
        resized to the input's H x W when its size differs."""
        self.__check_input(in_)
        ms = mean.shape
        if mean.ndim == 1:
            if ms[0] != self.inputs[in_][1]:
                raise KaffeValueError('Mean channels incompatible with input.')
            mean = mean[:, np.newaxis, np.newaxis]
        else:
            if len(ms) == 2:
                ms = (1,) + ms
            if len(ms) != 3:
                raise KaffeValueError('Mean shape invalid')
            if ms[0] not in (1, self.inputs[in_][1]):  # pycaffe fails later, in preprocess
                raise KaffeValueError('Mean channels incompatible with input.')
            in_shape = tuple(self.inputs[in_][1:])
            if ms != in_shape:
                # resized in [0, 1], as resize_image wants, and scaled back
                m_min, m_max = mean.min(), mean.max()
                normal_mean = (mean.reshape(ms) - m_min) / (m_max - m_min)  # pycaffe fails on H x W here
                mean = resize_image(normal_mean.transpose((1, 2, 0)), in_shape[1:]).transpose((2, 0, 1)) * \
                    (m_max - m_min) + m_min
        self.mean[in_] = mean

    def set_input_scale(self, in_, scale):
        """Multiply the preprocessed input by `scale`, after the mean is subtracted (raw_scale comes before)."""
        self.__check_input(in_)
        self.input_scale[in_] = scale

    @classmethod
    def from_net(cls, net, data_layer_or_param):
        """A Transformer that prepares `load_image` output (RGB in [0, 1]) as a data layer's transform_param
        prepares its Datums: channels to BGR (3-channel inputs), pixels times 255, minus the mean (mean_file,
        resized to the input size when it differs, or mean_value), times `scale`.

        net: the net to feed (its first input, or the data layer's first top for a net without inputs, gives
        the name and shape). data_layer_or_param: the data layer (a LayerParameter, a layer of a Net, the name
        of a layer of `net`), the path of a prototxt whose first data layer of net's phase is taken, or a
        TransformationParameter.
        """
        from ..layers.transform import DataTransformer
        name, param, top = _transform_param(net, data_layer_or_param)
        in_ = net.inputs[0] if net.inputs else top
        if in_ is None or in_ not in net.blobs:
            raise KaffeValueError("Transformer.from_net: the net has no input to prepare (no input blob, and the "
                                  "data layer names no top of this net)")
        shape = tuple(net.blobs[in_].data.shape)
        if len(shape) != 4:
            raise KaffeValueError(f"Transformer.from_net: input '{in_}' is {shape}, not N x K x H x W")
        crop = param.crop_size
        if crop and shape[2:] != (crop, crop):
            raise KaffeValueError(f"Transformer.from_net: {name} crops {crop} x {crop} but input '{in_}' is "
                                  f"{shape[2]} x {shape[3]}")
        data = DataTransformer(param, net.phase, f"Transformer.from_net: {name}")
        transformer = cls({in_: shape})
        transformer.set_transpose(in_, (2, 0, 1))
        if shape[1] == 3:
            transformer.set_channel_swap(in_, (2, 1, 0))
        transformer.set_raw_scale(in_, 255.0)
        if data.mean is not None:
            transformer.set_mean(in_, data.mean)  # float32, as blobproto_to_array gives it
        elif len(data.mean_values):
            values = data.mean_values.astype(float)
            transformer.set_mean(in_, np.repeat(values, shape[1]) if len(values) == 1 else values)
        if param.scale != 1:
            transformer.set_input_scale(in_, param.scale)
        return transformer


def _transform_param(net, source):
    """(a name for messages, the TransformationParameter, the data layer's first top or None) of from_net's
    second argument."""
    if isinstance(source, caffe_pb2.TransformationParameter):
        return "transform_param", source, None
    if isinstance(source, str):
        if source in net.layer_dict:
            source = net.layer_dict[source]
        else:
            source = _first_data_layer(source, net.phase)
    layer_param = getattr(source, "layer_param", source)
    if not isinstance(layer_param, caffe_pb2.LayerParameter):
        raise KaffeTypeError(f"Transformer.from_net: expected a data layer, a layer name, a prototxt path or a "
                             f"TransformationParameter, got {type(source).__name__}")
    top = layer_param.top[0] if len(layer_param.top) else None
    return f"layer '{layer_param.name}'", layer_param.transform_param, top


def _first_data_layer(path, phase):
    from .graph import filter_net
    from .net import read_net_param
    param = read_net_param(path)
    param.state.phase = phase
    for layer in filter_net(param).layer:
        if layer.HasField("transform_param"):
            return layer
    raise KaffeValueError(f"Transformer.from_net: {path} has no layer with a transform_param in phase "
                          f"{caffe_pb2.Phase.Name(phase)} (and the net has no layer of that name)")


# -- image IO -----------------------------------------------------------------------------------------------
def load_image(filename, color=True):
    """An image file as float32 in [0, 1]: H x W x 3 RGB (gray images repeated, alpha dropped), or with
    color=False H x W x 1 intensity (colour converted with scikit-image's rgb2gray)."""
    skimage = _skimage()
    try:
        pixels = skimage.io.imread(filename, as_gray=not color)
    except FileNotFoundError:
        raise KaffeFileNotFoundError(f"{filename}: no such image file") from None
    except (OSError, ValueError, SyntaxError) as e:  # what imageio and Pillow raise for files they cannot decode
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise KaffeOSError(f"{filename}: not an image file that can be read ({reason})") from None
    img = skimage.img_as_float(pixels).astype(np.float32)
    if img.ndim == 2:
        img = img[:, :, np.newaxis]
        if color:
            img = np.tile(img, (1, 1, 3))
    elif img.shape[2] == 4:
        img = img[:, :, :3]
    return img


def resize_image(im, new_dims, interp_order=1):
    """An H x W x K array resized to new_dims = (height, width), interpolated with order interp_order (linear).
    1- and 3-channel images go through scikit-image's resize in [0, 1], others through scipy's zoom."""
    if im.shape[-1] == 1 or im.shape[-1] == 3:
        im_min, im_max = im.min(), im.max()
        if im_max <= im_min:  # a constant image: nothing to interpolate (and no division by 0)
            return np.full((new_dims[0], new_dims[1], im.shape[-1]), im_min, dtype=np.float32)
        im_std = (im - im_min) / (im_max - im_min)
        resized_std = _skimage().transform.resize(im_std, new_dims, order=interp_order, mode='constant')
        resized_im = resized_std * (im_max - im_min) + im_min
    else:
        _skimage()  # scipy comes with scikit-image
        from scipy.ndimage import zoom
        scale = tuple(np.array(new_dims, dtype=float) / np.array(im.shape[:2]))
        resized_im = zoom(im, scale + (1,), order=interp_order)
    return resized_im.astype(np.float32)


def oversample(images, crop_dims):
    """The 10 crops of each H x W x K image: the four corners (top-left, top-right, bottom-left, bottom-right)
    and the centre, then the same five mirrored left-right; (10 N) x crop H x crop W x K float32."""
    im_shape = np.array(images[0].shape)
    crop_dims = np.array(crop_dims)
    corners = [(i, j) for i in (0, im_shape[0] - crop_dims[0]) for j in (0, im_shape[1] - crop_dims[1])]
    boxes = np.empty((5, 4), dtype=int)
    boxes[:4] = [(i, j, i + crop_dims[0], j + crop_dims[1]) for i, j in corners]
    center = im_shape[:2] / 2.0
    boxes[4] = np.concatenate([center - crop_dims / 2.0, center + crop_dims / 2.0])  # truncated, as pycaffe
    crops = np.empty((10 * len(images), crop_dims[0], crop_dims[1], im_shape[-1]), dtype=np.float32)
    for n, im in enumerate(images):
        for k, (top, left, bottom, right) in enumerate(boxes):
            crops[10 * n + k] = im[top:bottom, left:right, :]
        crops[10 * n + 5:10 * n + 10] = crops[10 * n:10 * n + 5, :, ::-1, :]
    return crops
