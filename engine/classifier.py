"""pycaffe's Classifier (`kaffe.Classifier`): a Net that classifies images, from the centre crop or averaged
over the 10 oversampled crops, with pycaffe's constructor arguments and crop rule."""
import numpy as np

from ..proto import caffe_pb2
from . import caffe_io
from .errors import KaffeIndexError
from .net import Net


def input_transformer(net, mean, input_scale, raw_scale, channel_swap):
    """The Transformer of pycaffe's Classifier and Detector for the net's first input: H x W x K images to
    K x H x W, then the optional preprocessing steps."""
    in_ = net.inputs[0]
    transformer = caffe_io.Transformer({in_: net.blobs[in_].data.shape})
    transformer.set_transpose(in_, (2, 0, 1))
    if mean is not None:
        transformer.set_mean(in_, mean)
    if input_scale is not None:
        transformer.set_input_scale(in_, input_scale)
    if raw_scale is not None:
        transformer.set_raw_scale(in_, raw_scale)
    if channel_swap is not None:
        transformer.set_channel_swap(in_, channel_swap)
    return transformer


class Classifier(Net):
    """A Net (TEST phase) for class prediction of images: resized to image_dims (default: the net's input size),
    then centre-cropped or oversampled to the input size. mean, input_scale, raw_scale, channel_swap: as the
    Transformer's set_* take them."""

    def __init__(self, model_file, pretrained_file, image_dims=None, mean=None, input_scale=None, raw_scale=None,
                 channel_swap=None):
        super().__init__(model_file, caffe_pb2.TEST, weights=pretrained_file)
        self.transformer = input_transformer(self, mean, input_scale, raw_scale, channel_swap)
        self.crop_dims = np.array(self.blobs[self.inputs[0]].data.shape[2:])
        if image_dims is None or not len(image_dims):
            image_dims = self.crop_dims
        self.image_dims = image_dims

    def predict(self, inputs, oversample=True):
        """(N x C) class probabilities of N H x W x K images: the mean over the 10 crops of caffe_io.oversample,
        or with oversample=False the centre crop's."""
        if not len(inputs):
            raise KaffeIndexError("Classifier.predict: no images to classify")
        images = np.zeros((len(inputs), self.image_dims[0], self.image_dims[1], inputs[0].shape[2]),
                          dtype=np.float32)
        for ix, image in enumerate(inputs):
            images[ix] = caffe_io.resize_image(image, self.image_dims)
        if oversample:
            images = caffe_io.oversample(images, self.crop_dims)
        else:
            center = np.array(self.image_dims) / 2.0
            crop = np.concatenate([center - self.crop_dims / 2.0, center + self.crop_dims / 2.0]).astype(int)
            images = images[:, crop[0]:crop[2], crop[1]:crop[3], :]
        in_ = self.inputs[0]
        caffe_in = np.zeros(np.array(images.shape)[[0, 3, 1, 2]], dtype=np.float32)
        for ix, image in enumerate(images):
            caffe_in[ix] = self.transformer.preprocess(in_, image)
        predictions = self.forward_all(**{in_: caffe_in})[self.outputs[0]]
        if oversample:
            predictions = predictions.reshape((len(predictions) // 10, 10, -1)).mean(1)
        return predictions
