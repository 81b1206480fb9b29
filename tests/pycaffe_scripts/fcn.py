"""What FCN's net.py, surgery.py, score.py and solve.py do (the fcn.berkeleyvision.org pattern), written afresh
and small: a fully convolutional net from NetSpec with a Python data layer (seg_layers.py, beside this script),
a Deconvolution upsampling aligned to the input by coord_map's crop, bilinear weights put in by net surgery, a
solver started from saved weights with copy_from, and segmentation scores (pixel accuracy, mean IU) computed on
the validation images by a test net that shares the train net's weights.

Usage: fcn.py OUT_DIR [ROUNDS [STEPS_PER_ROUND]]
"""
import json
import os
import sys

import numpy as np

import caffe
from caffe import layers as L, params as P
from caffe.coord_map import crop

out_dir = sys.argv[1]
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
steps = int(sys.argv[3]) if len(sys.argv) > 3 else 60
NUM_CLASSES = 3


# -- net.py ---------------------------------------------------------------------------------------------------
def conv_relu(bottom, nout, ks=3, stride=1, pad=1):
    conv = L.Convolution(bottom, kernel_size=ks, stride=stride, num_output=nout, pad=pad,
                         param=[dict(lr_mult=1, decay_mult=1), dict(lr_mult=2, decay_mult=0)],
                         weight_filler=dict(type="xavier"))
    return conv, L.ReLU(conv, in_place=True)


def max_pool(bottom, ks=2, stride=2):
    return L.Pooling(bottom, pool=P.Pooling.MAX, kernel_size=ks, stride=stride)


def fcn(split):
    n = caffe.NetSpec()
    pydata_params = dict(split=split, seed=1337, size=32)
    n.data, n.label = L.Python(module="seg_layers", layer="SegDataLayer", ntop=2, param_str=str(pydata_params))
    n.conv1, n.relu1 = conv_relu(n.data, 16)
    n.pool1 = max_pool(n.relu1)
    n.conv2, n.relu2 = conv_relu(n.pool1, 32)
    n.pool2 = max_pool(n.relu2)
    n.score_fr = L.Convolution(n.pool2, num_output=NUM_CLASSES, kernel_size=1, pad=0,
                               param=[dict(lr_mult=1, decay_mult=1), dict(lr_mult=2, decay_mult=0)],
                               weight_filler=dict(type="xavier"))
    n.upscore = L.Deconvolution(n.score_fr, convolution_param=dict(num_output=NUM_CLASSES, kernel_size=8, stride=4,
                                                                   bias_term=False), param=[dict(lr_mult=0)])
    n.score = crop(n.upscore, n.data)
    n.loss = L.SoftmaxWithLoss(n.score, n.label, loss_param=dict(normalize=False, ignore_label=255))
    return n.to_proto()


for split in ("train", "val"):
    with open(os.path.join(out_dir, f"{split}.prototxt"), "w") as f:
        f.write(str(fcn(split)))
with open(os.path.join(out_dir, "solver.prototxt"), "w") as f:
    f.write(f'train_net: "{out_dir}/train.prototxt"\ntest_net: "{out_dir}/val.prototxt"\ntest_iter: 20\n'
            'test_interval: 999999999\ndisplay: 20\naverage_loss: 20\nlr_policy: "fixed"\nbase_lr: 1e-4\n'
            'momentum: 0.9\niter_size: 1\nmax_iter: 100000\nweight_decay: 0.0005\nsnapshot: 0\n'
            f'snapshot_prefix: "{out_dir}/train"\ntest_initialization: false\nrandom_seed: 5\n')


# -- surgery.py ------------------------------------------------------------------------------------------------
def upsample_filt(size):
    """A 2-D bilinear kernel of the given size."""
    factor = (size + 1) // 2
    center = factor - 1 if size % 2 == 1 else factor - 0.5
    og = np.ogrid[:size, :size]
    return (1 - abs(og[0] - center) / factor) * (1 - abs(og[1] - center) / factor)


def interp(net, layers):
    """Bilinear weights for the deconvolutions of `layers` (each input channel upsampled into its own output)."""
    for l in layers:
        m, k, h, w = net.params[l][0].data.shape
        if m != k and k != 1:
            raise ValueError("input + output channels need to be the same or |output| == 1")
        if h != w:
            raise ValueError("filters need to be square")
        net.params[l][0].data[range(m), range(k), :, :] = upsample_filt(h)


# -- score.py ----------------------------------------------------------------------------------------------------
def fast_hist(a, b, n):
    k = (a >= 0) & (a < n)
    return np.bincount(n * a[k].astype(int) + b[k], minlength=n ** 2).reshape(n, n)


def compute_hist(net, dataset, layer="score", gt="label"):
    n_cl = net.blobs[layer].channels
    hist = np.zeros((n_cl, n_cl))
    loss = 0
    for _ in dataset:
        net.forward()
        hist += fast_hist(net.blobs[gt].data[0, 0].flatten(), net.blobs[layer].data[0].argmax(0).flatten(), n_cl)
        loss += net.blobs["loss"].data.flat[0]
    return hist, loss / len(dataset)


def seg_tests(solver, dataset, layer="score", gt="label"):
    solver.test_nets[0].share_with(solver.net)
    hist, loss = compute_hist(solver.test_nets[0], dataset, layer, gt=gt)
    with np.errstate(divide="ignore", invalid="ignore"):
        accuracy = np.diag(hist).sum() / hist.sum()
        iu = np.diag(hist) / (hist.sum(1) + hist.sum(0) - np.diag(hist))
    print(">>> Iteration", solver.iter, "loss", loss, "overall accuracy", accuracy, "mean IU", np.nanmean(iu))
    return float(accuracy), float(np.nanmean(iu))


# -- solve.py ---------------------------------------------------------------------------------------------------
caffe.set_mode_cpu()
base_weights = os.path.join(out_dir, "base.caffemodel")
caffe.Net(os.path.join(out_dir, "train.prototxt"), caffe.TRAIN).save(base_weights)   # stands in for VGG's

solver = caffe.SGDSolver(os.path.join(out_dir, "solver.prototxt"))
solver.net.copy_from(base_weights)
interp_layers = [k for k in solver.net.params.keys() if "up" in k]
interp(solver.net, interp_layers)
bilinear = solver.net.params["upscore"][0].data.copy()

val = np.arange(20)   # the validation image ids
scores = [seg_tests(solver, val)]
for _ in range(rounds):
    solver.step(steps)
    scores.append(seg_tests(solver, val))

print("RESULT", json.dumps({"crop_offset": list(solver.net.layer_dict["score"].layer_param.crop_param.offset),
                           "interp_layers": interp_layers, "iter": solver.iter, "scores": scores,
                           "upscore_kept": bool(np.array_equal(solver.net.params["upscore"][0].data, bilinear)),
                           "bilinear_centre": float(bilinear[0, 0, 3, 3])}))
