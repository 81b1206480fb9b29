"""pycaffe's Detector (`kaffe.Detector`): windowed detection, R-CNN style: each window of an image is cropped
(with `context_pad` pixels of surrounding context, padded with the mean where it leaves the image), warped to
the net's input size and classified."""
import os

import numpy as np

from ..proto import caffe_pb2
from . import caffe_io
from .classifier import input_transformer
from .errors import KaffeAssertionError, KaffeImportError, KaffeIndexError, KaffeValueError
from .net import Net


class Detector(Net):
    """A Net (TEST phase) that classifies windows of images. mean, input_scale, raw_scale, channel_swap: as the
    Transformer's set_* take them; context_pad: the border of the net's input, in pixels, that shows context
    around the window (R-CNN's feature extraction)."""

    def __init__(self, model_file, pretrained_file, mean=None, input_scale=None, raw_scale=None,
                 channel_swap=None, context_pad=None):
        super().__init__(model_file, caffe_pb2.TEST, weights=pretrained_file)
        self.transformer = input_transformer(self, mean, input_scale, raw_scale, channel_swap)
        self.configure_crop(context_pad)

    def detect_windows(self, images_windows):
        """[{'window', 'prediction', 'filename'}] for every window of an iterable of (image filename, windows);
        a window is (ymin, xmin, ymax, xmax)."""
        images_windows = [(name, list(windows)) for name, windows in images_windows]  # read twice below
        window_inputs = []
        for image_fname, windows in images_windows:
            image = caffe_io.load_image(image_fname).astype(np.float32)
            for window in windows:
                window_inputs.append(self.crop(image, window))
        if not window_inputs:
            raise KaffeIndexError("Detector.detect_windows: no windows to classify")
        in_ = self.inputs[0]
        caffe_in = np.zeros((len(window_inputs), window_inputs[0].shape[2]) + self.blobs[in_].data.shape[2:],
                            dtype=np.float32)
        for ix, window_in in enumerate(window_inputs):
            caffe_in[ix] = self.transformer.preprocess(in_, window_in)
        predictions = iter(self.forward_all(**{in_: caffe_in})[self.outputs[0]])
        return [{'window': window, 'prediction': next(predictions), 'filename': image_fname}
                for image_fname, windows in images_windows for window in windows]

    def detect_selective_search(self, image_fnames):
        """detect_windows over Selective Search proposals. They come from selective_search_ijcv_with_python, a
        MATLAB program that is not on PyPI; without it this raises a KaffeImportError saying so."""
        try:
            import selective_search_ijcv_with_python as selective_search
        except ImportError:
            raise KaffeImportError(
                "Detector.detect_selective_search needs the MATLAB program selective_search_ijcv_with_python "
                "(https://github.com/sergeyk/selective_search_ijcv_with_python; not on PyPI) and MATLAB; "
                "give your own windows to detect_windows instead") from None
        image_fnames = [os.path.abspath(f) for f in image_fnames]  # absolute, so that MATLAB finds them
        windows_list = selective_search.get_windows(image_fnames, cmd='selective_search_rcnn')
        return self.detect_windows(zip(image_fnames, windows_list))

    def crop(self, im, window):
        """The window (ymin, xmin, ymax, xmax) of an H x W x K image; with context_pad, the window grown so that
        context fills a context_pad border of the net's input, out-of-image parts filled with the mean."""
        window = np.asarray(window)
        crop = im[window[0]:window[2], window[1]:window[3]]
        if not self.context_pad:
            if not crop.size:
                raise KaffeValueError(f"Detector.crop: window {window.tolist()} (ymin, xmin, ymax, xmax) holds no "
                                      f"pixel of the {im.shape[0]} x {im.shape[1]} image")
            return crop
        crop_size = self.blobs[self.inputs[0]].data.shape[3]  # assumes a square input, as pycaffe
        scale = crop_size / (1. * crop_size - self.context_pad * 2)
        half_h = (window[2] - window[0] + 1) / 2.
        half_w = (window[3] - window[1] + 1) / 2.
        center = (window[0] + half_h, window[1] + half_w)
        box = np.round(np.tile(center, 2) + scale * np.array((-half_h, -half_w, half_h, half_w)))
        scale_h = crop_size / (box[2] - box[0] + 1)
        scale_w = crop_size / (box[3] - box[1] + 1)
        pad_y = int(round(max(0, -box[0]) * scale_h))  # the part above / left of the image
        pad_x = int(round(max(0, -box[1]) * scale_w))
        im_h, im_w = im.shape[:2]
        box = np.clip(box, 0., [im_h, im_w, im_h, im_w])
        clip_h = box[2] - box[0] + 1
        clip_w = box[3] - box[1] + 1
        if not (clip_h > 0 and clip_w > 0):
            raise KaffeAssertionError(f"Detector.crop: window {window.tolist()} lies outside the {im_h} x {im_w} "
                                      f"image")
        crop_h = min(int(round(clip_h * scale_h)), crop_size - pad_y)
        crop_w = min(int(round(clip_w * scale_w)), crop_size - pad_x)
        top, left, bottom, right = box.astype(int)
        context_crop = caffe_io.resize_image(im[top:bottom, left:right], (crop_h, crop_w))
        crop = np.ones(self.crop_dims, dtype=np.float32) * self.crop_mean
        crop[pad_y:pad_y + crop_h, pad_x:pad_x + crop_w] = context_crop
        return crop

    def configure_crop(self, context_pad):
        """crop_dims (the input's H x W x K) and, for context padding, crop_mean: the mean in the space of
        unprocessed images (before channel swap and raw scale), which fills the padding."""
        in_ = self.inputs[0]
        transpose = self.transformer.transpose[in_]
        inv_transpose = [transpose[t] for t in transpose]
        self.crop_dims = np.array(self.blobs[in_].data.shape[1:])[inv_transpose]
        self.context_pad = context_pad
        if not self.context_pad:
            return
        mean = self.transformer.mean.get(in_)
        if mean is None:
            self.crop_mean = np.zeros(self.crop_dims, dtype=np.float32)
            return
        crop_mean = mean.copy().transpose(inv_transpose)
        channel_order = self.transformer.channel_swap.get(in_)
        if channel_order is not None:
            crop_mean = crop_mean[:, :, np.argsort(channel_order)]
        raw_scale = self.transformer.raw_scale.get(in_)
        if raw_scale is not None:
            crop_mean /= raw_scale
        self.crop_mean = crop_mean
