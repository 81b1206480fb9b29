"""DataTransformer: Caffe's per-item preprocessing (crop, mirror, mean, scale), vectorised over a batch, and
the image helpers that stand in for Caffe's OpenCV calls (load, resize, encode, decode; BGR, channels first).

Order, as in Caffe: crop and mirror pick the source pixels, then out = (x - mean) * scale. Crops are random
in TRAIN and centred in TEST; mirroring is a random flip (p = 0.5) in both phases. A mean file is the size
of the uncropped item and is cropped at the same offsets (and read at the same, possibly flipped, pixels).
"""
import io

import numpy as np

from ..engine.blob import Blob
from ..engine.errors import KaffeError
from ..engine.io import read_binary_proto
from ..proto import caffe_pb2

_GRAY_MODES = ("1", "L", "I", "I;16", "I;16B", "I;16L", "F")
_RESIZE_BITS = 11  # OpenCV's INTER_RESIZE_COEF_BITS: bilinear weights are fixed point with 11 bits


# -- images as OpenCV gives them to Caffe ------------------------------------------------------------------
def _to_8bit(image):
    """16-bit images are scaled to 8 bits as OpenCV's IMREAD_COLOR/GRAYSCALE do (Pillow would clip)."""
    if image.mode.startswith("I;16") or image.mode == "I":
        from PIL import Image
        return Image.fromarray((np.asarray(image, dtype=np.uint32) >> 8).astype(np.uint8))
    return image


def _luma(image, source_format):
    """Gray pixels of a colour image as OpenCV's IMREAD_GRAYSCALE gives them: libpng's own conversion for PNG
    (weights 9797, 19234, 3737 / 2^15, truncated), cvtColor's (4899, 9617, 1868 / 2^14, rounded) otherwise.
    (JPEGs are decoded straight to their luma channel by open_image(gray=True), as libjpeg does for OpenCV.)"""
    rgb = np.asarray(image.convert("RGB"), dtype=np.int32)
    if source_format == "PNG":
        weights, shift, rounding = (9797, 19234, 3737), 15, 0
    else:
        weights, shift, rounding = (4899, 9617, 1868), 14, 1 << 13
    gray = rgb[..., 0] * weights[0] + rgb[..., 1] * weights[1] + rgb[..., 2] * weights[2] + rounding
    return (gray >> shift).astype(np.uint8)


def image_to_chw(image, mode):
    """A Pillow image converted to `mode` ("L", "RGB" or "RGBA") as C x H x W uint8, colour in BGR(A) order,
    with OpenCV's gray and colour conversions."""
    source_format = image.format
    image = _to_8bit(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # through RGBA, as Pillow asks for palettes with transparency
    if mode == "L":
        if image.mode in _GRAY_MODES or image.mode == "LA":
            return np.asarray(image.convert("L"), dtype=np.uint8)[np.newaxis]
        return _luma(image, source_format)[np.newaxis]
    pixels = np.asarray(image.convert(mode), dtype=np.uint8)
    order = [2, 1, 0, 3] if mode == "RGBA" else [2, 1, 0]
    return np.ascontiguousarray(pixels.transpose(2, 0, 1)[order])


def open_image(source, gray=False):
    """A decoded Pillow image from a path or file object; OSError (missing, unreadable or not an image) is left
    to the caller to name. gray: a JPEG is decoded to its luma channel, as libjpeg does for OpenCV."""
    from PIL import Image, UnidentifiedImageError
    try:
        image = Image.open(source)
        if gray and image.format == "JPEG":
            image.draft("L", image.size)
        image.load()
    except UnidentifiedImageError as e:
        raise OSError(f"not an image file Pillow can decode ({e})") from None
    except OSError as e:
        raise OSError(e.strerror or str(e)) from None
    return image


def read_image(path, height=0, width=0, is_color=True):
    """Caffe's ReadImageToCVMat: 3-channel BGR (is_color) or 1-channel gray, resized when height and width > 0."""
    pixels = image_to_chw(open_image(path, gray=not is_color), "RGB" if is_color else "L")
    if height > 0 and width > 0:
        pixels = resize_bilinear(pixels, height, width)
    return pixels


def _linear_taps(source, target, clamp_weights):
    """OpenCV's INTER_LINEAR sampling along one axis, positions in float32 as OpenCV computes them: the two source
    indices of each output and their fixed-point weights. Along x a position past an edge takes the edge pixel
    with full weight; along y OpenCV keeps the fractional weights and repeats the edge row instead."""
    position = ((np.arange(target) + 0.5) * (1.0 / (target / source)) - 0.5).astype(np.float32)
    low = np.floor(position)
    frac = position - low
    low = low.astype(np.int64)
    if clamp_weights:
        outside = (low < 0) | (low >= source - 1)
        frac[outside] = 0
        low[low >= source - 1] = source - 1
    weight = np.rint((np.float32(1) - frac) * np.float32(1 << _RESIZE_BITS)).astype(np.int64)
    return np.clip(low, 0, source - 1), np.clip(low + 1, 0, source - 1), weight, (1 << _RESIZE_BITS) - weight


def resize_bilinear(pixels, height, width):
    """Resize C x H x W uint8 as cv::resize(..., INTER_LINEAR) does, bit for bit with OpenCV 4's vectorised code:
    half-pixel centres, no antialiasing, 11-bit weights, the vertical pass in 16-bit products (Pillow's bilinear
    filter antialiases when shrinking, so it differs)."""
    _, src_h, src_w = pixels.shape
    if (src_h, src_w) == (height, width):
        return pixels
    top, bottom, weight_top, weight_bottom = _linear_taps(src_h, height, clamp_weights=False)
    left, right, weight_left, weight_right = _linear_taps(src_w, width, clamp_weights=True)
    src = pixels.astype(np.int64)
    rows = src[:, :, left] * weight_left + src[:, :, right] * weight_right
    out = ((((rows[:, top] >> 4) * weight_top[:, None]) >> 16)
           + (((rows[:, bottom] >> 4) * weight_bottom[:, None]) >> 16))
    return np.clip((out + 2) >> 2, 0, 255).astype(np.uint8)


def encode_image(pixels, encoding):
    """C x H x W uint8 (BGR or gray) as the bytes of a PNG or JPEG file (JPEG quality 95, OpenCV's default)."""
    from PIL import Image
    encoding = encoding.lower()
    formats = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "bmp": "BMP"}
    if encoding not in formats:
        raise KaffeError(f"unsupported image encoding '{encoding}': use png, jpg or bmp")
    hwc = pixels[0] if pixels.shape[0] == 1 else pixels[[2, 1, 0]].transpose(1, 2, 0)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(hwc)).save(buffer, format=formats[encoding],
                                                    **({"quality": 95} if encoding != "png" else {}))
    return buffer.getvalue()


def array_to_datum(pixels, label=0):
    """C x H x W uint8 -> a raw Datum (pycaffe's caffe.io.array_to_datum for uint8 arrays)."""
    channels, height, width = pixels.shape
    return caffe_pb2.Datum(channels=channels, height=height, width=width, data=pixels.tobytes(), label=int(label))


class DataTransformer:
    def __init__(self, param, phase, owner, force_color=False):
        """param: a TransformationParameter; owner: how errors name the layer, e.g. "Data layer 'mnist'"."""
        self.owner = owner
        self.phase = phase
        self.scale = np.float32(param.scale)
        self.mirror = param.mirror
        self.crop_size = int(param.crop_size)
        self.force_color = param.force_color or force_color
        self.force_gray = param.force_gray
        if self.force_color and self.force_gray:
            raise KaffeError(f"{owner}: force_color and force_gray cannot both be set")
        self.mean_values = np.asarray(param.mean_value, dtype=np.float32)
        self.mean_file = param.mean_file if param.HasField("mean_file") else None
        self.mean = None
        if self.mean_file is not None:
            if len(self.mean_values):
                raise KaffeError(f"{owner}: cannot specify mean_file and mean_value at the same time")
            blob = Blob()
            blob.from_proto(read_binary_proto(self.mean_file, caffe_pb2.BlobProto()))
            if blob.num_axes > 4 or blob.num != 1:
                raise KaffeError(f"{owner}: mean_file {self.mean_file} must hold one 1 x C x H x W mean, "
                                 f"it has shape {blob.shape_string()}")
            self.mean = blob.cpu_data().reshape(blob.channels, blob.height, blob.width).copy()

    @property
    def needs_rand(self):
        return self.mirror or (self.phase == caffe_pb2.TRAIN and self.crop_size > 0)

    # -- one item ---------------------------------------------------------------------------------
    def datum_array(self, datum, where=""):
        """The Datum's pixels as a C x H x W array: uint8 for `data`, float32 for `float_data`, decoded if encoded."""
        if datum.encoded:
            return self.decode(datum.data, where)
        shape = (datum.channels, datum.height, datum.width)
        count = shape[0] * shape[1] * shape[2]
        values = np.frombuffer(datum.data, dtype=np.uint8) if datum.data else \
            np.asarray(datum.float_data, dtype=np.float32)
        if values.size != count or count == 0:
            raise KaffeError(f"{self.owner}: Datum{where} declares {shape[0]} x {shape[1]} x {shape[2]} "
                             f"but holds {values.size} values")
        return values.reshape(shape)

    def decode(self, encoded, where=""):
        """Decode a JPEG/PNG to C x H x W uint8 in OpenCV's channel order (BGR, BGRA, or one gray channel)."""
        try:
            image = open_image(io.BytesIO(encoded), gray=self.force_gray)
        except Exception as e:  # Pillow raises several types for corrupt images
            raise KaffeError(f"{self.owner}: cannot decode the encoded image in Datum{where}: {e}") from None
        return image_to_chw(image, self.decode_mode(image))

    def decode_mode(self, image):
        """OpenCV's IMREAD_UNCHANGED (gray stays gray, alpha is kept) unless force_color/force_gray."""
        if self.force_gray:
            return "L"
        if self.force_color:
            return "RGB"
        if image.mode in _GRAY_MODES:
            return "L"
        if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
            return "RGBA"
        return "RGB"

    def output_shape(self, item_shape):
        """(C, H, W) of the transformed item for an input item of shape (C, H, W)."""
        channels, height, width = item_shape
        if self.crop_size:
            if height < self.crop_size or width < self.crop_size:
                raise KaffeError(f"{self.owner}: crop_size {self.crop_size} is larger than the input "
                                 f"({channels} x {height} x {width})")
            return channels, self.crop_size, self.crop_size
        return channels, height, width

    # -- a batch ------------------------------------------------------------------------------------
    def _mean_for(self, channels, height, width):
        if self.mean is not None:
            if self.mean.shape != (channels, height, width):
                raise KaffeError(f"{self.owner}: mean_file {self.mean_file} is {' x '.join(map(str, self.mean.shape))}"
                                 f" but the data is {channels} x {height} x {width} (before cropping)")
            return self.mean
        if len(self.mean_values):
            if len(self.mean_values) not in (1, channels):
                raise KaffeError(f"{self.owner}: specify either 1 mean_value or as many as channels "
                                 f"({channels}); got {len(self.mean_values)}")
            return np.broadcast_to(self.mean_values, (channels,)).reshape(channels, 1, 1)
        return None

    def transform(self, batch, rng=None):
        """Transform an N x C x H x W batch (uint8 or float) into a new float32 array.

        rng (a numpy Generator) draws the crops and flips; it is needed only when needs_rand.
        """
        n, channels, height, width = batch.shape
        _, out_h, out_w = self.output_shape((channels, height, width))
        mean = self._mean_for(channels, height, width)
        flips = rng.integers(0, 2, size=n).astype(bool) if self.mirror else None
        if self.crop_size and self.phase == caffe_pb2.TRAIN:
            h_off = rng.integers(0, height - out_h + 1, size=n)
            w_off = rng.integers(0, width - out_w + 1, size=n)
        else:
            h_off = np.full(n, (height - out_h) // 2)
            w_off = np.full(n, (width - out_w) // 2)

        if flips is None and not (self.crop_size and self.phase == caffe_pb2.TRAIN):
            # one window for the whole batch: plain slicing
            rows = slice(h_off[0], h_off[0] + out_h)
            cols = slice(w_off[0], w_off[0] + out_w)
            out = batch[:, :, rows, cols].astype(np.float32)
            if mean is not None:
                out -= mean if mean.shape[1:] == (1, 1) else mean[:, rows, cols]
        else:
            # per-item windows: gather rows and (possibly reversed) columns with index arrays
            rows = (h_off[:, None] + np.arange(out_h))[:, None, :, None]
            cols = w_off[:, None] + np.arange(out_w)
            if flips is not None:
                cols = np.where(flips[:, None], cols[:, ::-1], cols)
            cols = cols[:, None, None, :]
            chans = np.arange(channels)[None, :, None, None]
            out = batch[np.arange(n)[:, None, None, None], chans, rows, cols].astype(np.float32)
            if mean is not None:
                out -= mean if mean.shape[1:] == (1, 1) else mean[chans, rows, cols]
        if self.scale != 1:
            out *= self.scale
        return out
