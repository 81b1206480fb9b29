"""What Caffe's net_surgery notebook does, written afresh as a script.

1. Designer filters: a one-layer Convolution net whose filters are written by hand (a Gaussian blur and Sobel
   edge filters) through net.params, run on a grayscale image.
2. A classifier cast into a fully convolutional net: the InnerProduct layers' weights are copied into
   Convolution layers of the same shape through `.flat`, the new net is saved and reloaded, and it classifies
   every window of a larger image at once.

Usage: net_surgery.py GRAY_IMAGE COLOR_IMAGE OUT_DIR
"""
import json
import os
import sys

import numpy as np

import caffe

gray_file, color_file, out_dir = sys.argv[1:4]
caffe.set_mode_cpu()


def write(name, text):
    path = os.path.join(out_dir, name)
    with open(path, "w") as f:
        f.write(text)
    return path


# -- 1. designer filters -------------------------------------------------------------------------------------
conv_def = write("conv.prototxt", """name: "convolution"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 1 dim: 100 dim: 100 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 3 kernel_size: 5 stride: 1
    weight_filler { type: "gaussian" std: 0.01 } bias_filler { type: "constant" value: 0 } } }
""")
net = caffe.Net(conv_def, caffe.TEST)
print("blobs {}\nparams {}".format(list(net.blobs.keys()), list(net.params.keys())))

im = np.array(caffe.io.load_image(gray_file, color=False)).squeeze()
im_input = im[np.newaxis, np.newaxis, :, :]
net.blobs["data"].reshape(*im_input.shape)
net.blobs["data"].data[...] = im_input

net.params["conv"][1].data[0] = 1.   # a bias on the first output only
net.forward()
biased = net.blobs["conv"].data[0, 0].copy()
random_filter = net.params["conv"][0].data[0, 0].copy()

ksize = net.params["conv"][0].data.shape[2:]
sigma = 1.
y, x = np.mgrid[-ksize[0] // 2 + 1:ksize[0] // 2 + 1, -ksize[1] // 2 + 1:ksize[1] // 2 + 1]
gaussian = np.exp(-(x ** 2 + y ** 2) / (2. * sigma ** 2))
gaussian /= gaussian.sum()
sobel = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]])
net.params["conv"][0].data[0] = gaussian
net.params["conv"][0].data[1:] = 0.
net.params["conv"][0].data[1, 0, 1:-1, 1:-1] = sobel     # horizontal gradient
net.params["conv"][0].data[2, 0, 1:-1, 1:-1] = sobel.T   # vertical gradient
net.forward()
designed = net.blobs["conv"].data[0].copy()

# -- 2. a classifier made fully convolutional ----------------------------------------------------------------
TRUNK = """layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 8 kernel_size: 3 weight_filler { type: "gaussian" std: 0.01 }
    bias_filler { type: "gaussian" std: 0.1 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
"""
classifier_def = write("classifier.prototxt", """name: "classifier"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 16 dim: 16 } } }
""" + TRUNK + """layer { name: "fc6" type: "InnerProduct" bottom: "pool1" top: "fc6"
  inner_product_param { num_output: 16 weight_filler { type: "gaussian" std: 0.1 }
    bias_filler { type: "gaussian" std: 0.1 } } }
layer { name: "relu6" type: "ReLU" bottom: "fc6" top: "fc6" }
layer { name: "fc7" type: "InnerProduct" bottom: "fc6" top: "fc7"
  inner_product_param { num_output: 10 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "prob" type: "Softmax" bottom: "fc7" top: "prob" }
""")
full_conv_def = write("classifier_full_conv.prototxt", """name: "classifier_full_conv"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 24 dim: 24 } } }
""" + TRUNK + """layer { name: "fc6-conv" type: "Convolution" bottom: "pool1" top: "fc6-conv"
  convolution_param { num_output: 16 kernel_size: 7 } }
layer { name: "relu6" type: "ReLU" bottom: "fc6-conv" top: "fc6-conv" }
layer { name: "fc7-conv" type: "Convolution" bottom: "fc6-conv" top: "fc7-conv"
  convolution_param { num_output: 10 kernel_size: 1 } }
layer { name: "prob" type: "Softmax" bottom: "fc7-conv" top: "prob" }
""")
weights = os.path.join(out_dir, "classifier.caffemodel")
caffe.Net(classifier_def, caffe.TEST).save(weights)   # stands in for a trained model

net = caffe.Net(classifier_def, weights, caffe.TEST)
params = ["fc6", "fc7"]
fc_params = {pr: (net.params[pr][0].data, net.params[pr][1].data) for pr in params}
for fc in params:
    print("{} weights are {} dimensional and biases are {} dimensional".format(
        fc, fc_params[fc][0].shape, fc_params[fc][1].shape))

net_full_conv = caffe.Net(full_conv_def, weights, caffe.TEST)   # conv1 is copied by name, fc6-conv is not
params_full_conv = ["fc6-conv", "fc7-conv"]
conv_params = {pr: (net_full_conv.params[pr][0].data, net_full_conv.params[pr][1].data) for pr in params_full_conv}
for conv in params_full_conv:
    print("{} weights are {} dimensional and biases are {} dimensional".format(
        conv, conv_params[conv][0].shape, conv_params[conv][1].shape))
for pr, pr_conv in zip(params, params_full_conv):
    conv_params[pr_conv][0].flat = fc_params[pr][0].flat   # flat unrolls the arrays
    conv_params[pr_conv][1][...] = fc_params[pr][1]
full_conv_weights = os.path.join(out_dir, "classifier_full_conv.caffemodel")
net_full_conv.save(full_conv_weights)

reloaded = caffe.Net(full_conv_def, full_conv_weights, caffe.TEST)
im = caffe.io.load_image(color_file)
transformer = caffe.io.Transformer({"data": reloaded.blobs["data"].data.shape})
transformer.set_transpose("data", (2, 0, 1))
transformer.set_channel_swap("data", (2, 1, 0))
transformer.set_raw_scale("data", 255.0)
image = transformer.preprocess("data", im)
out = reloaded.forward_all(data=np.asarray([image]))
print("classification map:\n", out["prob"][0].argmax(axis=0))

# every position of the map is the classifier on the 16 x 16 window at twice that position (pool1's stride)
largest = 0.0
for i in range(out["prob"].shape[2]):
    for j in range(out["prob"].shape[3]):
        window = net.forward(data=image[np.newaxis, :, 2 * i:2 * i + 16, 2 * j:2 * j + 16])["prob"][0]
        largest = max(largest, float(np.abs(window - out["prob"][0, :, i, j]).max()))
print("largest difference from the classifier on each window:", largest)

np.savez(os.path.join(out_dir, "net_surgery.npz"), image=im_input[0, 0], biased=biased, random_filter=random_filter,
         designed=designed,
         gaussian=gaussian, sobel=sobel, prob_map=out["prob"])
print("RESULT", json.dumps({"map_shape": list(out["prob"].shape), "largest_difference": largest,
                           "conv1_copied": bool(np.array_equal(reloaded.params["conv1"][0].data,
                                                               net.params["conv1"][0].data))}))
