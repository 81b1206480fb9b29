"""What Caffe's 02-fine-tuning notebook does, written afresh as a script (a small net on MNIST stands in for
CaffeNet on ImageNet and Flickr Style): a net is trained and saved; a second net, whose last layer is renamed and
so re-initialised, takes the other weights by name with solver.net.copy_from and learns with the layers before
it frozen, next to the same net trained from scratch; both are then scored from their saved weights.

Usage: fine_tuning.py MNIST_DIR OUT_DIR [PRETRAIN_ITERS [FINETUNE_ITERS]]
"""
import json
import os
import sys
import tempfile

import numpy as np

import caffe
from caffe import layers as L, params as P
from caffe.proto import caffe_pb2

mnist_dir, out_dir = sys.argv[1:3]
pretrain_iters = int(sys.argv[3]) if len(sys.argv) > 3 else 100
finetune_iters = int(sys.argv[4]) if len(sys.argv) > 4 else 40
caffe.set_mode_cpu()

weight_param = dict(lr_mult=1, decay_mult=1)
bias_param = dict(lr_mult=2, decay_mult=0)
learned_param = [weight_param, bias_param]
frozen_param = [dict(lr_mult=0)] * 2


def small_net(lmdb, batch_size, train=True, classifier_name="fc8", learn_all=True):
    """Returns the name of a temporary prototxt, as the notebook's caffenet() does."""
    param = learned_param if learn_all else frozen_param
    n = caffe.NetSpec()
    n.data, n.label = L.Data(batch_size=batch_size, backend=P.Data.LMDB, source=lmdb,
                             transform_param=dict(scale=1. / 255), ntop=2)
    n.conv1 = L.Convolution(n.data, kernel_size=5, num_output=20, param=param,
                            weight_filler=dict(type="gaussian", std=0.05), bias_filler=dict(type="constant", value=0.1))
    n.pool1 = L.Pooling(n.conv1, pool=P.Pooling.MAX, kernel_size=2, stride=2)
    n.fc7 = L.InnerProduct(n.pool1, num_output=100, param=param,
                           weight_filler=dict(type="gaussian", std=0.01), bias_filler=dict(type="constant", value=0.1))
    n.relu7 = L.ReLU(n.fc7, in_place=True)
    if train:
        n.drop7 = fc8input = L.Dropout(n.relu7, in_place=True)
    else:
        fc8input = n.relu7
    fc8 = L.InnerProduct(fc8input, num_output=10, param=learned_param, weight_filler=dict(type="xavier"))
    n.__setattr__(classifier_name, fc8)
    n.loss = L.SoftmaxWithLoss(fc8, n.label)
    n.acc = L.Accuracy(fc8, n.label)
    with tempfile.NamedTemporaryFile("w", suffix=".prototxt", dir=out_dir, delete=False) as f:
        f.write(str(n.to_proto()))
        return f.name


def solver(train_net_path, base_lr=0.01, random_seed=0xCAFFE):
    s = caffe_pb2.SolverParameter()
    s.train_net = train_net_path
    s.test_interval = 1000   # no test nets: the loop below scores from saved weights
    s.iter_size = 1
    s.max_iter = 100000
    s.type = "SGD"
    s.base_lr = base_lr
    s.lr_policy = "step"
    s.gamma = 0.1
    s.stepsize = 20000
    s.momentum = 0.9
    s.weight_decay = 5e-4
    s.display = 1000
    s.snapshot = 0
    s.snapshot_prefix = os.path.join(out_dir, "finetune")
    s.random_seed = random_seed
    s.solver_mode = caffe_pb2.SolverParameter.CPU
    with tempfile.NamedTemporaryFile("w", suffix=".prototxt", dir=out_dir, delete=False) as f:
        f.write(str(s))
        return f.name


def run_solvers(niter, solvers, disp_interval=10):
    """Step each solver in turn, recording the loss and accuracy; save and return each net's weights."""
    blobs = ("loss", "acc")
    loss, acc = ({name: np.zeros(niter) for name, _ in solvers} for _ in blobs)
    for it in range(niter):
        for name, s in solvers:
            s.step(1)
            loss[name][it], acc[name][it] = (s.net.blobs[b].data.copy() for b in blobs)
        if it % disp_interval == 0 or it + 1 == niter:
            print("%3d) %s" % (it, "; ".join("%s: loss=%.3f, acc=%2d%%" % (n, loss[n][it], np.round(100 * acc[n][it]))
                                             for n, _ in solvers)))
    weights = {}
    for name, s in solvers:
        weights[name] = os.path.join(out_dir, "weights.%s.caffemodel" % name)
        s.net.save(weights[name])
    return loss, acc, weights


train_lmdb = os.path.join(mnist_dir, "mnist_train_lmdb")
test_lmdb = os.path.join(mnist_dir, "mnist_test_lmdb")

# the "pretrained" model
pretrain_solver = caffe.get_solver(solver(small_net(train_lmdb, 64), random_seed=1))
_, _, pretrained = run_solvers(pretrain_iters, [("pretrained", pretrain_solver)])
pretrained = pretrained["pretrained"]
del pretrain_solver

# fine-tune a renamed classifier on frozen features, and the same net from scratch
style_net = small_net(train_lmdb, 64, classifier_name="fc8_new", learn_all=False)
finetune = caffe.get_solver(solver(style_net))
finetune.net.copy_from(pretrained)
scratch = caffe.get_solver(solver(style_net))

source = caffe.Net(small_net(test_lmdb, 100, train=False), pretrained, caffe.TEST)
copied = all(np.array_equal(finetune.net.params[name][i].data, source.params[name][i].data)
             for name in ("conv1", "fc7") for i in range(2))
renamed_kept_its_init = not np.array_equal(finetune.net.params["fc8_new"][0].data, source.params["fc8"][0].data)
frozen = finetune.net.params["conv1"][0].data.copy()

loss, acc, weights = run_solvers(finetune_iters, [("finetuned", finetune), ("scratch", scratch)])
still_frozen = bool(np.array_equal(finetune.net.params["conv1"][0].data, frozen))


def eval_net(weights, test_iters=10):
    test_net = caffe.Net(small_net(test_lmdb, 100, train=False, classifier_name="fc8_new"), weights, caffe.TEST)
    accuracy = 0
    for _ in range(test_iters):
        accuracy += test_net.forward()["acc"]
    return float(accuracy / test_iters)


accuracy = {name: eval_net(path) for name, path in weights.items()}
print("accuracy:", accuracy)
print("RESULT", json.dumps({"copied": copied, "renamed_kept_its_init": renamed_kept_its_init,
                           "still_frozen": still_frozen, "accuracy": accuracy,
                           "final_loss": {name: float(values[-1]) for name, values in loss.items()}}))
