"""OpenCL command counts (kaffe.engine.opencl.stats): a GPU-mode training iteration enqueues its work without
a host transfer or a blocking wait between display steps, in few launches. The counts do not depend on the
device, so PoCL (CI) checks what a GPU run does."""
import re
import subprocess
import sys

import numpy as np
import pytest
from google.protobuf import text_format

import kaffe as caffe
from kaffe.engine import device, opencl
from kaffe.engine.errors import KaffeError
from kaffe.proto import caffe_pb2

from conftest import REPO
from gradient_check import opencl_available

pytestmark = [pytest.mark.opencl,
              pytest.mark.skipif(not opencl_available(), reason="no OpenCL platform (install pocl-opencl-icd)")]

DISPLAY = 4
# launches of one LeNet training iteration (forward, backward, SGD update with momentum and weight decay) on a
# CPU device (PoCL); before the launches were counted and cut down: 72 launches and 8 device copies (31 before
# SoftmaxWithLoss became one launch for small batches, 29 before that launch wrote the weighted loss itself and
# the bias gradients came out of the weight gradients' GEMMs). A GPU adds
# one launch per GEMM that opencl.gemm_split_k splits (the convolutions' weight gradients).
LENET_LAUNCHES = 24


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
    assert counts["copies"] == 0
    if opencl.current().is_gpu:
        assert counts["launches"] <= LENET_LAUNCHES + 2, counts
    else:
        assert counts["launches"] == LENET_LAUNCHES, counts


def test_cifar10_quick_training_iteration_stays_on_the_device():
    counts, _ = counts_between_displays(solver_for(synthetic(REPO / "models/cifar10_quick/train_val.prototxt",
                                                             20, (3, 32, 32))))
    print("CIFAR-10 quick per iteration:", counts)
    assert_no_host_round_trip(counts)


RESNET_BLOCK = """
name: "resnet_block"
layer { name: "data" type: "DummyData" top: "data" top: "label"
        dummy_data_param { shape { dim: 8 dim: 16 dim: 8 dim: 8 } shape { dim: 8 }
                           data_filler { type: "constant" value: 0.5 } data_filler { type: "constant" value: 1 } } }
layer { name: "conv_a" type: "Convolution" bottom: "data" top: "conv_a"
        convolution_param { num_output: 16 kernel_size: 3 pad: 1 bias_term: false weight_filler { type: "msra" } } }
layer { name: "bn_a" type: "BatchNorm" bottom: "conv_a" top: "conv_a" }
layer { name: "scale_a" type: "Scale" bottom: "conv_a" top: "conv_a" scale_param { bias_term: true } }
layer { name: "relu_a" type: "ReLU" bottom: "conv_a" top: "conv_a" }
layer { name: "conv_b" type: "Convolution" bottom: "conv_a" top: "conv_b"
        convolution_param { num_output: 16 kernel_size: 3 pad: 1 bias_term: false weight_filler { type: "msra" } } }
layer { name: "bn_b" type: "BatchNorm" bottom: "conv_b" top: "conv_b" }
layer { name: "scale_b" type: "Scale" bottom: "conv_b" top: "conv_b" scale_param { bias_term: true } }
layer { name: "sum" type: "Eltwise" bottom: "data" bottom: "conv_b" top: "sum" }
layer { name: "relu_sum" type: "ReLU" bottom: "sum" top: "sum" }
layer { name: "pool" type: "Pooling" bottom: "sum" top: "pool" pooling_param { pool: AVE global_pooling: true } }
layer { name: "fc" type: "InnerProduct" bottom: "pool" top: "fc"
        inner_product_param { num_output: 4 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
"""


def test_resnet_block_training_iteration_stays_on_the_device():
    net = text_format.Parse(RESNET_BLOCK, caffe_pb2.NetParameter())
    counts, _ = counts_between_displays(solver_for(net))
    print("ResNet block per iteration:", counts)
    assert_no_host_round_trip(counts)


TINY = """
name: "tiny"
layer { name: "data" type: "DummyData" top: "data" top: "label"
        dummy_data_param { shape { dim: 4 dim: 6 } shape { dim: 4 }
                           data_filler { type: "%s" } data_filler { type: "constant" value: 1 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
        inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""


def tiny_solver(extra="", data_filler="gaussian", loss_weight=None):
    net = TINY % data_filler
    if loss_weight is not None:
        net = net.replace('top: "loss" }', f'top: "loss" loss_weight: {loss_weight} }}')
    return text_format.Merge(extra, text_format.Parse(f"net_param {{ {net} }} base_lr: 0.1 momentum: 0.9 weight_decay: 0.01 "
                             f'lr_policy: "fixed" display: 3 average_loss: 2 random_seed: 5',
                                                      caffe_pb2.SolverParameter()))


def losses_logged(log):
    return [line for line in log if ", loss = " in line or "Train net output" in line]


@pytest.mark.parametrize("loss_weight", [None, 2.5])
def test_losses_read_at_display_steps_match_the_cpu(kaffe_log, loss_weight):
    """The smoothed losses of the display lines, from losses kept on the device between display steps, are the
    CPU run's (gaussian data redrawn every iteration: each iteration's loss counts); SoftmaxWithLoss's kernel
    writes its weighted loss into the slot itself."""
    logs = {}
    for mode in (device.CPU, device.GPU):
        (device.set_mode_gpu if mode == device.GPU else device.set_mode_cpu)()
        try:
            kaffe_log.clear()
            caffe.get_solver(tiny_solver(loss_weight=loss_weight)).step(10)
            logs[mode] = losses_logged(kaffe_log)
        finally:
            device.set_mode_cpu()
    values = {mode: [float(line.rsplit("= ", 1)[-1].split()[0].rstrip(")")) for line in lines]
              for mode, lines in logs.items()}
    assert len(values[device.GPU]) == 8   # iterations 0, 3, 6, 9: the loss line and the output line each
    np.testing.assert_allclose(values[device.GPU], values[device.CPU], rtol=1e-5)
    untimed = {mode: [re.sub(r"\(.* iters\)", "", line.split("=")[0]) for line in lines] for mode, lines in logs.items()}
    assert untimed[device.GPU] == untimed[device.CPU]


def test_stats_line_only_with_the_environment_variable(monkeypatch, kaffe_log):
    device.set_mode_gpu()
    try:
        caffe.get_solver(tiny_solver(data_filler="constant")).step(7)
        assert not [m for m in kaffe_log if "OpenCL per iteration" in m]
        monkeypatch.setenv(opencl.STATS_ENV, "1")
        caffe.get_solver(tiny_solver(data_filler="constant")).step(7)
    finally:
        device.set_mode_cpu()
    lines = [m for m in kaffe_log if "OpenCL per iteration" in m]
    assert len(lines) == 3   # at iterations 0, 3 and 6
    # iterations 4 to 6 (the update of 3 on): no upload, no build, and at the display step two blocking reads:
    # the three losses at once, and the loss output of its line "Train net output #0"
    assert " 0 uploads (0 bytes), 0.666667 downloads (5.33333 bytes), 0.666667 blocking waits, 0 program builds" \
        in lines[2], lines[2]


def test_divergence_between_display_steps_names_its_iteration():
    """GPU mode checks the losses at the display step: the error names the iteration whose loss was NaN."""
    device.set_mode_gpu()
    try:
        solver = caffe.get_solver(tiny_solver("display: 5"))
        solver.step(1)
        solver.net.params["ip"][1].data[...] = np.nan   # a poisoned bias: every later loss is NaN
        with pytest.raises(KaffeError, match=r"diverged: the loss is nan at iteration 1\b"):
            solver.step(6)
    finally:
        device.set_mode_cpu()


def test_time_stats_flag(tmp_path):
    model = tmp_path / "tiny.prototxt"
    model.write_text(TINY % "constant")
    result = subprocess.run([sys.executable, "-m", "kaffe.tools.cli", "time", "--model", str(model), "--gpu", "0",
                             "--iterations", "2", "--stats"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    line = [m for m in result.stderr.splitlines() if "OpenCL per iteration" in m]
    assert len(line) == 1 and " 0 uploads (0 bytes)," in line[0] and " 0 program builds" in line[0], line


@pytest.mark.parametrize("split_k", [1, 3])
def test_gemm_batches_bias_and_blocked_k_match_numpy(split_k):
    """The GEMM forms that save the convolution's regrouping passes: a batched product writing NCHW with the
    bias in the epilogue, and a weight gradient whose K runs over the samples of an (N, O, L) array."""
    rng = np.random.default_rng(0)
    samples, out, k, positions = 3, 5, 7, 9
    w = rng.standard_normal((out, k), dtype=np.float32)
    col = rng.standard_normal((k, samples * positions), dtype=np.float32)
    bias = rng.standard_normal(out, dtype=np.float32)
    top = opencl.zeros(samples * out * positions)
    opencl.gemm(False, False, out, positions, k, 1.0, opencl.to_device(w), opencl.to_device(col), 0.0, top,
                batch=samples, strides=(0, positions, out * positions), ldb=samples * positions, ldc=positions,
                bias=opencl.to_device(bias), bias_axis=0)
    expected = np.stack([w @ col[:, n * positions:(n + 1) * positions] + bias[:, None] for n in range(samples)])
    np.testing.assert_allclose(opencl.download(top).reshape(expected.shape), expected, rtol=1e-5, atol=1e-5)
    dy = rng.standard_normal((samples, out, positions), dtype=np.float32)
    dw = opencl.to_device(np.ones((out, k), np.float32))
    opencl.gemm(False, True, out, k, samples * positions, 1.0, opencl.to_device(dy), opencl.to_device(col), 1.0, dw,
                a_blocks=(positions, out * positions), split_k=split_k)
    rows = dy.transpose(1, 0, 2).reshape(out, samples * positions)
    np.testing.assert_allclose(opencl.download(dw).reshape(out, k), 1 + rows @ col.T, rtol=1e-5, atol=1e-5)
