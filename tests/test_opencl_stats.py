"""OpenCL command counts (kaffe.engine.opencl.stats): a GPU-mode training iteration enqueues its work without
a host transfer or a blocking wait between display steps, in few launches. The counts do not depend on the
device, so PoCL (CI) checks what a GPU run does."""
import numpy as np
import pytest
from google.protobuf import text_format

import kaffe as caffe
from kaffe.engine import device, opencl
from kaffe.proto import caffe_pb2

from conftest import REPO
from gradient_check import opencl_available

pytestmark = [pytest.mark.opencl,
              pytest.mark.skipif(not opencl_available(), reason="no OpenCL platform (install pocl-opencl-icd)")]

DISPLAY = 6
# launches of one LeNet training iteration (forward, backward, SGD update with momentum and weight decay)
LENET_LAUNCHES = 0


def synthetic(net_path, batch, image):
    """The TRAIN net of a train_val prototxt with its Data layer swapped for constant DummyData of the same
    shapes: no data source is needed, and constant tops are filled once, so an iteration moves no data."""
    net = caffe_pb2.NetParameter()
    text_format.Parse(net_path.read_text(), net)
    kept = [layer for layer in net.layer if not any(rule.phase == caffe_pb2.TEST for rule in layer.include)]
    del net.layer[:]
    net.layer.extend(kept)
    data = net.layer[0]
    data.ClearField("transform_param")
    data.ClearField("data_param")
    data.ClearField("include")
    data.type = "DummyData"
    param = data.dummy_data_param
    param.shape.add().dim.extend((batch, *image))
    param.shape.add().dim.extend((batch,))
    param.data_filler.add(type="constant", value=0.25)
    param.data_filler.add(type="constant", value=3)
    return net


def solver_for(net, solver_type="SGD"):
    param = caffe_pb2.SolverParameter(base_lr=0.01, momentum=0.9 if solver_type in ("SGD", "Nesterov") else 0,
                                      weight_decay=0.0005, lr_policy="inv", gamma=0.0001, power=0.75,
                                      display=DISPLAY, max_iter=100, random_seed=1, type=solver_type)
    param.net_param.CopyFrom(net)
    return param


def counts_between_displays(param):
    """opencl.stats() per iteration over the iterations between two display steps (0 and DISPLAY), counted
    from the start of iteration 1 to the start of iteration DISPLAY - 1 (iteration 0 builds the programs and
    uploads the weights); and the solver."""
    device.set_mode_gpu()
    try:
        solver = caffe.get_solver(param)
        counts = {}

        def on_start():
            if solver.iter == 1:
                opencl.reset_stats()
            elif solver.iter == DISPLAY - 1:
                counts.update(opencl.stats())
        solver.add_callback(on_start, lambda: None)
        solver.step(DISPLAY + 1)
        return {name: value / (DISPLAY - 2) for name, value in counts.items()}, solver
    finally:
        device.set_mode_cpu()


def assert_no_host_round_trip(counts):
    assert counts["waits"] == 0, counts
    assert counts["downloads"] == counts["download_bytes"] == 0, counts
    assert counts["uploads"] == counts["upload_bytes"] == 0, counts
    assert counts["builds"] == 0, counts


def test_lenet_training_iteration_stays_on_the_device():
    counts, _ = counts_between_displays(solver_for(synthetic(REPO / "models/lenet/lenet_train_test.prototxt",
                                                             64, (1, 28, 28))))
    print("LeNet per iteration:", counts)
    assert_no_host_round_trip(counts)
