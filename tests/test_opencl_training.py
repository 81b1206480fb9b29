"""Training in GPU mode (OpenCL; PoCL in CI): the same numbers as the CPU, and snapshots across modes."""
import re
import subprocess
import sys

import numpy as np
import pytest
from google.protobuf import text_format

import kaffe as caffe
from kaffe.engine import device
from kaffe.proto import caffe_pb2

from conftest import MNIST_RAW, REPO
from gradient_check import opencl_available

pytestmark = [pytest.mark.opencl,
              pytest.mark.skipif(not opencl_available(), reason="no OpenCL platform (install pocl-opencl-icd)")]

NET = """
name: "mlp"
layer { name: "data" type: "DummyData" top: "data" top: "label"
        dummy_data_param { shape { dim: 16 dim: 3 dim: 6 dim: 6 } shape { dim: 16 }
                           data_filler { type: "gaussian" } data_filler { type: "constant" value: 2 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1 weight_filler { type: "xavier" } } }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "ip" type: "InnerProduct" bottom: "pool" top: "ip"
        inner_product_param { num_output: 5 weight_filler { type: "xavier" } } }
layer { name: "relu" type: "ReLU" bottom: "ip" top: "ip" }
layer { name: "drop" type: "Dropout" bottom: "ip" top: "ip" dropout_param { dropout_ratio: 0.3 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""


def solver(prefix):
    text = (f'net_param {{ {NET} }} base_lr: 0.05 momentum: 0.9 weight_decay: 0.001 lr_policy: "fixed" '
            f'max_iter: 10 display: 0 snapshot: 5 snapshot_prefix: "{prefix}" random_seed: 7')
    return text_format.Parse(text, caffe_pb2.SolverParameter())


def train(param, mode, resume=None):
    (device.set_mode_gpu if mode == device.GPU else device.set_mode_cpu)()
    try:
        s = caffe.get_solver(param)
        s.solve(resume)
        return {name: [b.data.copy() for b in blobs] for name, blobs in s.net.params.items()}
    finally:
        device.set_mode_cpu()


def assert_close(a, b, tol):
    for name in a:
        for x, y in zip(a[name], b[name]):
            np.testing.assert_allclose(x, y, rtol=tol, atol=tol, err_msg=name)


def test_gpu_training_follows_the_cpu(tmp_path):
    cpu = train(solver(tmp_path / "cpu"), device.CPU)
    gpu = train(solver(tmp_path / "gpu"), device.GPU)
    assert_close(cpu, gpu, 1e-4)


def test_snapshots_resume_across_modes(tmp_path):
    gpu_full = train(solver(tmp_path / "gpu"), device.GPU)
    cpu_full = train(solver(tmp_path / "cpu"), device.CPU)
    # GPU snapshot -> CPU resume, and CPU snapshot -> GPU resume: both continue as the uninterrupted run
    from_gpu = train(solver(tmp_path / "gpu_resumed"), device.CPU, resume=str(tmp_path / "gpu_iter_5.solverstate"))
    from_cpu = train(solver(tmp_path / "cpu_resumed"), device.GPU, resume=str(tmp_path / "cpu_iter_5.solverstate"))
    assert_close(gpu_full, from_gpu, 1e-4)
    assert_close(cpu_full, from_cpu, 1e-4)


def _losses(log):
    return {int(it): float(loss) for it, loss in re.findall(r"Iteration (\d+) \(.*\), loss = ([\d.e+-]+)", log)}


@pytest.mark.slow
def test_lenet_trains_on_the_opencl_device(tmp_path):
    """`kaffe train --gpu 0`: 2000 LeNet iterations reach >= 0.98 and follow the CPU run's loss curve."""
    if not MNIST_RAW.exists():
        pytest.skip(f"real MNIST not found at {MNIST_RAW}")
    (tmp_path / "models").symlink_to(REPO / "models")
    subprocess.run([sys.executable, "-m", "kaffe.tools.cli", "data", "mnist", "--from", str(MNIST_RAW)],
                   cwd=tmp_path, check=True, capture_output=True)
    solver_text = (REPO / "models" / "lenet" / "lenet_solver.prototxt").read_text()  # random_seed: 1
    (tmp_path / "solver.prototxt").write_text(solver_text.replace("test_interval: 500", "test_interval: 2000"))
    logs = {}
    for mode, flags in (("gpu", ["--gpu", "0"]), ("cpu", [])):
        result = subprocess.run([sys.executable, "-m", "kaffe.tools.cli", "train", "--solver", "solver.prototxt",
                                 "--iterations", "2000", *flags], cwd=tmp_path, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]
        logs[mode] = result.stderr
    accuracy = float(re.findall(r"Test net output #0: accuracy = ([\d.]+)", logs["gpu"])[-1])
    print(f"LeNet on OpenCL, 2000 iterations: test accuracy {accuracy}")
    assert accuracy >= 0.98
    gpu, cpu = _losses(logs["gpu"]), _losses(logs["cpu"])
    assert sorted(gpu) == sorted(cpu) and len(gpu) >= 20
    early = [abs(gpu[it] - cpu[it]) for it in sorted(gpu) if it <= 300]
    assert max(early) < 0.02, early            # same seed: the curves coincide at first...
    late = [abs(gpu[it] - cpu[it]) for it in sorted(gpu)]
    assert np.mean(late) < 0.05, late          # ...and stay close (float rounding slowly drifts apart)
    assert "has no OpenCL implementation" not in logs["gpu"]
