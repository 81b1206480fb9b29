"""DataTransformer: Caffe's per-item preprocessing (crop, mirror, mean, scale), vectorised over a batch.

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
        from PIL import Image
        try:
            image = Image.open(io.BytesIO(encoded))
            image.load()
        except Exception as e:  # Pillow raises several types for corrupt images
            raise KaffeError(f"{self.owner}: cannot decode the encoded image in Datum{where}: {e}") from None
        if self.force_gray:
            mode = "L"
        elif self.force_color:
            mode = "RGB"
        elif image.mode in ("1", "L", "I", "I;16", "F"):
            mode = "L"
        elif image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
            mode = "RGBA"
        else:
            mode = "RGB"
        pixels = np.asarray(image.convert(mode), dtype=np.uint8)
        if pixels.ndim == 2:
            return pixels[np.newaxis]
        # Pillow gives RGB(A) HWC; Caffe's images are BGR(A) CHW
        order = [2, 1, 0, 3] if mode == "RGBA" else [2, 1, 0]
        return np.ascontiguousarray(pixels.transpose(2, 0, 1)[order])

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
