"""What Caffe's brewing-logreg notebook does, written afresh as a script: a two-class problem written to HDF5
files with h5py, a logistic regression and a net with one hidden layer from NetSpec, solved with get_solver and
scored by running the test net over the test set.

Usage: brewing_logreg.py OUT_DIR [MAX_ITER]
"""
import json
import os
import sys

import h5py
import numpy as np

import caffe
from caffe import layers as L
from caffe.proto import caffe_pb2

out_dir = sys.argv[1]
max_iter = int(sys.argv[2]) if len(sys.argv) > 2 else 1000

# 10,000 points of 4 features: two informative ones whose classes form two clusters each, two of noise
rng = np.random.default_rng(0)
y = rng.integers(2, size=10000)
cluster = rng.integers(2, size=10000)
centres = np.array([[[-2.0, -1.0], [-0.5, 2.0]], [[2.0, 1.0], [0.5, -2.0]]])[y, cluster]
X = np.hstack([centres + rng.normal(scale=1.0, size=(10000, 2)), rng.normal(size=(10000, 2))])
X, Xt, y, yt = X[:7500], X[7500:], y[:7500], y[7500:]

train_filename = os.path.join(out_dir, "train.h5")
test_filename = os.path.join(out_dir, "test.h5")
with h5py.File(train_filename, "w") as f:
    f["data"] = X
    f["label"] = y.astype(np.float32)
with open(os.path.join(out_dir, "train.txt"), "w") as f:
    f.write(train_filename + "\n")
    f.write(train_filename + "\n")   # the same file twice: HDF5Data reads the list in turn
with h5py.File(test_filename, "w") as f:
    f.create_dataset("data", data=Xt, compression="gzip", compression_opts=1)
    f.create_dataset("label", data=yt.astype(np.float32), compression="gzip", compression_opts=1)
with open(os.path.join(out_dir, "test.txt"), "w") as f:
    f.write(test_filename + "\n")


def logreg(hdf5, batch_size):
    n = caffe.NetSpec()
    n.data, n.label = L.HDF5Data(batch_size=batch_size, source=hdf5, ntop=2)
    n.ip1 = L.InnerProduct(n.data, num_output=2, weight_filler=dict(type="xavier"))
    n.accuracy = L.Accuracy(n.ip1, n.label)
    n.loss = L.SoftmaxWithLoss(n.ip1, n.label)
    return n.to_proto()


def nonlinear_net(hdf5, batch_size):
    n = caffe.NetSpec()
    n.data, n.label = L.HDF5Data(batch_size=batch_size, source=hdf5, ntop=2)
    n.ip1 = L.InnerProduct(n.data, num_output=40, weight_filler=dict(type="xavier"))
    n.relu1 = L.ReLU(n.ip1, in_place=True)
    n.ip2 = L.InnerProduct(n.ip1, num_output=2, weight_filler=dict(type="xavier"))
    n.accuracy = L.Accuracy(n.ip2, n.label)
    n.loss = L.SoftmaxWithLoss(n.ip2, n.label)
    return n.to_proto()


def solver(train_net_path, test_net_path, prefix):
    s = caffe_pb2.SolverParameter()
    s.train_net = train_net_path
    s.test_net.append(test_net_path)
    s.test_interval = 1000
    s.test_iter.append(250)
    s.max_iter = max_iter
    s.base_lr = 0.01
    s.lr_policy = "step"
    s.gamma = 0.1
    s.stepsize = 5000
    s.momentum = 0.9
    s.weight_decay = 5e-4
    s.display = 1000
    s.snapshot = 10000
    s.snapshot_prefix = prefix
    s.random_seed = 7
    s.solver_mode = caffe_pb2.SolverParameter.CPU
    return s


def train_and_score(name, make_net):
    train_net_path = os.path.join(out_dir, name + "_auto_train.prototxt")
    test_net_path = os.path.join(out_dir, name + "_auto_test.prototxt")
    solver_path = os.path.join(out_dir, name + "_solver.prototxt")
    with open(train_net_path, "w") as f:
        f.write(str(make_net(os.path.join(out_dir, "train.txt"), 10)))
    with open(test_net_path, "w") as f:
        f.write(str(make_net(os.path.join(out_dir, "test.txt"), 10)))
    with open(solver_path, "w") as f:
        f.write(str(solver(train_net_path, test_net_path, os.path.join(out_dir, name))))

    caffe.set_mode_cpu()
    s = caffe.get_solver(solver_path)
    s.solve()
    accuracy = 0
    batch_size = s.test_nets[0].blobs["data"].num
    test_iters = int(len(Xt) / batch_size)
    for i in range(test_iters):
        s.test_nets[0].forward()
        accuracy += s.test_nets[0].blobs["accuracy"].data
    accuracy /= test_iters
    print(f"{name} accuracy: {accuracy:.3f}")
    return float(accuracy)


results = {"logreg": train_and_score("logreg", logreg), "nonlinear": train_and_score("nonlinear", nonlinear_net)}
print("RESULT", json.dumps(results))
