"""What Caffe's 00-classification notebook does, written afresh as a script: a CaffeNet deploy net with weights,
an input Transformer, a batch of 50 reshaped, the top-5 labels, the blob and parameter shapes, filter pictures.

Usage: classification.py DEPLOY.prototxt WEIGHTS.caffemodel MEAN.npy IMAGE SYNSET_WORDS.txt OUT_DIR
"""
import json
import os
import sys

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import caffe  # noqa: E402

model_def, model_weights, mean_file, image_file, labels_file, out_dir = sys.argv[1:7]

caffe.set_mode_cpu()
net = caffe.Net(model_def, model_weights, caffe.TEST)

# the per-channel (BGR) mean of the mean image
mu = np.load(mean_file).mean(1).mean(1)
print("mean-subtracted values:", list(zip("BGR", mu)))

transformer = caffe.io.Transformer({"data": net.blobs["data"].data.shape})
transformer.set_transpose("data", (2, 0, 1))      # H x W x C -> C x H x W
transformer.set_mean("data", mu)                  # subtract the mean of each channel
transformer.set_raw_scale("data", 255)            # [0, 1] -> [0, 255]
transformer.set_channel_swap("data", (2, 1, 0))   # RGB -> BGR

height, width = net.blobs["data"].data.shape[2:]
net.blobs["data"].reshape(50, 3, height, width)   # a batch of 50

image = caffe.io.load_image(image_file)
transformed_image = transformer.preprocess("data", image)
net.blobs["data"].data[...] = transformed_image   # the same image in every slot of the batch

output = net.forward()
output_prob = output["prob"][0]
print("predicted class is:", output_prob.argmax())

labels = np.loadtxt(labels_file, str, delimiter="\t")
print("output label:", labels[output_prob.argmax()])
top_inds = output_prob.argsort()[::-1][:5]
print("probabilities and labels:")
for probability, label in zip(output_prob[top_inds], labels[top_inds]):
    print(f"  {probability:.6f} {label}")

for layer_name, blob in net.blobs.items():
    print(layer_name + "\t" + str(blob.data.shape))
for layer_name, param in net.params.items():
    print(layer_name + "\t" + str(param[0].data.shape), str(param[1].data.shape))


def tile(data):
    """Lay n arrays of H x W (x 3) out in a square grid, normalised to [0, 1], one pixel of white between them."""
    data = (data - data.min()) / (data.max() - data.min())
    n = int(np.ceil(np.sqrt(data.shape[0])))
    pad = ((0, n * n - data.shape[0]), (0, 1), (0, 1)) + ((0, 0),) * (data.ndim - 3)
    data = np.pad(data, pad, mode="constant", constant_values=1)
    data = data.reshape((n, n) + data.shape[1:]).transpose((0, 2, 1, 3) + tuple(range(4, data.ndim + 1)))
    return data.reshape((n * data.shape[1], n * data.shape[3]) + data.shape[4:])


for name, picture in (("conv1_filters", tile(net.params["conv1"][0].data.transpose(0, 2, 3, 1))),
                      ("conv1_outputs", tile(net.blobs["conv1"].data[0, :36]))):
    plt.figure()
    plt.imshow(picture)
    plt.axis("off")
    plt.savefig(os.path.join(out_dir, name + ".png"))
    plt.close()

np.savez(os.path.join(out_dir, "classification.npz"), prob=output["prob"], transformed=transformed_image)
print("RESULT", json.dumps({"top5": [int(i) for i in top_inds], "labels": [str(x) for x in labels[top_inds]],
                           "batch": int(output["prob"].shape[0]), "mean": [float(m) for m in mu]}))
