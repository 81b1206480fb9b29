"""What Caffe's 01-learning-lenet notebook does, written afresh as a script: LeNet from NetSpec written to
prototxt files, an SGDSolver, and a hand-written loop of solver.step(1) that records the train loss, the
first test batch's scores, and the test accuracy every test_interval iterations.

Usage: learning_lenet.py MNIST_DIR OUT_DIR [NITER [TEST_BATCHES]]
(MNIST_DIR holds mnist_train_lmdb and mnist_test_lmdb; the notebook runs 200 iterations and tests on 100
batches, also in the solver's own test at iteration 0)
"""
import json
import os
import sys

import numpy as np

import caffe
from caffe import layers as L, params as P

mnist_dir, out_dir = sys.argv[1:3]
niter = int(sys.argv[3]) if len(sys.argv) > 3 else 200
test_batches = int(sys.argv[4]) if len(sys.argv) > 4 else 100


def lenet(lmdb, batch_size):
    n = caffe.NetSpec()
    n.data, n.label = L.Data(batch_size=batch_size, backend=P.Data.LMDB, source=lmdb,
                             transform_param=dict(scale=1. / 255), ntop=2)
    n.conv1 = L.Convolution(n.data, kernel_size=5, num_output=20, weight_filler=dict(type="xavier"))
    n.pool1 = L.Pooling(n.conv1, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    n.conv2 = L.Convolution(n.pool1, kernel_size=5, num_output=50, weight_filler=dict(type="xavier"))
    n.pool2 = L.Pooling(n.conv2, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    n.fc1 = L.InnerProduct(n.pool2, num_output=500, weight_filler=dict(type="xavier"))
    n.relu1 = L.ReLU(n.fc1, in_place=True)
    n.score = L.InnerProduct(n.relu1, num_output=10, weight_filler=dict(type="xavier"))
    n.loss = L.SoftmaxWithLoss(n.score, n.label)
    return n.to_proto()


train_path = os.path.join(out_dir, "lenet_auto_train.prototxt")
test_path = os.path.join(out_dir, "lenet_auto_test.prototxt")
solver_path = os.path.join(out_dir, "lenet_auto_solver.prototxt")
with open(train_path, "w") as f:
    f.write(str(lenet(os.path.join(mnist_dir, "mnist_train_lmdb"), 64)))
with open(test_path, "w") as f:
    f.write(str(lenet(os.path.join(mnist_dir, "mnist_test_lmdb"), 100)))
with open(solver_path, "w") as f:
    f.write(f'train_net: "{train_path}"\ntest_net: "{test_path}"\ntest_iter: {test_batches}\ntest_interval: 500\n'
            'base_lr: 0.01\nmomentum: 0.9\nweight_decay: 0.0005\nlr_policy: "inv"\ngamma: 0.0001\npower: 0.75\n'
            f'display: 100\nmax_iter: 10000\nsnapshot: 5000\nsnapshot_prefix: "{out_dir}/lenet"\n'
            'random_seed: 1\n')

caffe.set_mode_cpu()
solver = caffe.SGDSolver(solver_path)
print([(k, v.data.shape) for k, v in solver.net.blobs.items()])
print([(k, v[0].data.shape) for k, v in solver.net.params.items()])

solver.net.forward()            # the train net
solver.test_nets[0].forward()   # the test net
print("train labels:", solver.net.blobs["label"].data[:8])
print("test labels:", solver.test_nets[0].blobs["label"].data[:8])
solver.step(1)
first_gradient = float(np.abs(solver.net.params["conv1"][0].diff).sum())

test_interval = 25
train_loss = np.zeros(niter)
test_acc = np.zeros(int(np.ceil(niter / test_interval)))
output = np.zeros((niter, 8, 10))
for it in range(niter):
    solver.step(1)
    train_loss[it] = solver.net.blobs["loss"].data
    # the first test batch's scores (start at conv1: the data layer keeps its batch)
    solver.test_nets[0].forward(start="conv1")
    output[it] = solver.test_nets[0].blobs["score"].data[:8]
    if it % test_interval == 0:
        print("Iteration", it, "testing...")
        correct = 0
        for test_it in range(test_batches):
            solver.test_nets[0].forward()
            correct += sum(solver.test_nets[0].blobs["score"].data.argmax(1) == solver.test_nets[0].blobs["label"].data)
        test_acc[it // test_interval] = correct / (100.0 * test_batches)

print("train loss:", train_loss[::test_interval])
print("test accuracy:", test_acc)
print("RESULT", json.dumps({"iter": solver.iter, "first_loss": train_loss[0], "last_loss": train_loss[-1],
                           "test_acc": list(test_acc), "first_gradient": first_gradient,
                           "first_scores_change": float(np.abs(output[-1] - output[0]).max())}))
