"""The Python data layer of fcn.py (the part FCN's voc_layers.py plays): synthetic segmentation images, one per
forward, as FCN feeds batches of one. Each image is noise with a red and a green rectangle; the label map marks
the red pixels 1, the green 2, the rest 0, and the pixels of a thin frame around each rectangle 255 (ignored).

param_str: a dict literal with split ('train' or 'val'), seed and size.
"""
import ast

import numpy as np

import caffe


def segmentation_example(seed, size):
    """(image C x H x W, BGR, mean subtracted as FCN's layers do, label 1 x H x W) of one synthetic example."""
    rng = np.random.default_rng(seed)
    image = rng.uniform(60, 120, (3, size, size))
    label = np.zeros((1, size, size))
    for cls, channel in ((1, 2), (2, 1)):   # red (BGR channel 2) is class 1, green class 2
        h, w = rng.integers(size // 4, size // 2, 2)
        y, x = rng.integers(1, size - h - 1), rng.integers(1, size - w - 1)
        label[0, y - 1:y + h + 1, x - 1:x + w + 1] = 255
        label[0, y:y + h, x:x + w] = cls
        image[channel, y:y + h, x:x + w] += 100
    return (image - 120) / 60, label


class SegDataLayer(caffe.Layer):
    def setup(self, bottom, top):
        params = ast.literal_eval(self.param_str)
        self.split, self.size = params["split"], params.get("size", 32)
        self.seed = params.get("seed", 0) + (0 if self.split == "train" else 10 ** 6)
        self.index = 0
        if len(top) != 2:
            raise Exception("Need to define two tops: data and label.")
        if len(bottom) != 0:
            raise Exception("Do not define a bottom.")

    def reshape(self, bottom, top):
        self.data, self.label = segmentation_example(self.seed + self.index, self.size)
        top[0].reshape(1, *self.data.shape)
        top[1].reshape(1, *self.label.shape)

    def forward(self, bottom, top):
        top[0].data[...] = self.data
        top[1].data[...] = self.label
        self.index += 1

    def backward(self, top, propagate_down, bottom):
        pass
