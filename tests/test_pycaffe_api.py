"""pycaffe's Net and Solver API beyond forward/backward (pycaffe.py and _caffe.cpp), `import caffe` and `kaffe run`."""
import collections
import logging
import os
import subprocess
import sys
import time

import numpy as np
import pytest

import kaffe as caffe
from kaffe.engine.errors import KaffeError
from kaffe.engine.log import logger
from kaffe.tools import cli

# pycaffe's test_net.py net: DummyData, Convolution, InnerProduct, SoftmaxWithLoss
SIMPLE = """name: 'testnet' force_backward: true
layer { type: 'DummyData' name: 'data' top: 'data' top: 'label'
  dummy_data_param { num: 5 channels: 2 height: 3 width: 4  num: 5 channels: 1 height: 1 width: 1
    data_filler { type: 'gaussian' std: 1 } data_filler { type: 'constant' } } }
layer { type: 'Convolution' name: 'conv' bottom: 'data' top: 'conv'
  convolution_param { num_output: 11 kernel_size: 2 pad: 3
    weight_filler { type: 'gaussian' std: 1 } bias_filler { type: 'constant' value: 2 } }
  param { decay_mult: 1 } param { decay_mult: 0 } }
layer { type: 'InnerProduct' name: 'ip' bottom: 'conv' top: 'ip_blob'
  inner_product_param { num_output: 13 weight_filler { type: 'gaussian' std: 2.5 }
    bias_filler { type: 'constant' value: -3 } } }
layer { type: 'SoftmaxWithLoss' name: 'loss' bottom: 'ip_blob' bottom: 'label' top: 'loss' }
"""

# a deploy net of batch 4: ip = W x + b, then a ReLU
DEPLOY = """name: 'deploy' force_backward: true
layer { type: 'Input' name: 'data' top: 'data' input_param { shape { dim: 4 dim: 3 } } }
layer { type: 'InnerProduct' name: 'ip' bottom: 'data' top: 'ip'
  inner_product_param { num_output: 5 weight_filler { type: 'gaussian' std: 1 }
    bias_filler { type: 'gaussian' std: 1 } } }
layer { type: 'ReLU' name: 'relu' bottom: 'ip' top: 'out' }
"""

SOLVER = """net: '{net}' test_iter: 2 test_interval: 10 base_lr: 0.01 momentum: 0.9 weight_decay: 0.0005
lr_policy: 'inv' gamma: 0.0001 power: 0.75 display: 100 max_iter: 100 snapshot_after_train: false
snapshot_prefix: "model" random_seed: 3
"""


def _file(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.fixture
def net(tmp_path):
    net = caffe.Net(_file(tmp_path, "simple.prototxt", SIMPLE), caffe.TRAIN)
    net.blobs["label"].data[...] = np.random.default_rng(0).integers(13, size=net.blobs["label"].data.shape)
    return net


@pytest.fixture
def deploy(tmp_path):
    return caffe.Net(_file(tmp_path, "deploy.prototxt", DEPLOY), caffe.TEST)


@pytest.fixture
def solver(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    net_file = _file(tmp_path, "simple.prototxt", SIMPLE)
    solver = caffe.SGDSolver(_file(tmp_path, "solver.prototxt", SOLVER.format(net=net_file)))
    for n in [solver.net] + solver.test_nets:
        n.blobs["label"].data[...] = np.random.default_rng(1).integers(13, size=n.blobs["label"].data.shape)
    return solver


def _deploy_expected(deploy, x):
    w, b = deploy.params["ip"][0].data, deploy.params["ip"][1].data
    return np.maximum(x @ w.T + b, 0)


# -- forward_all / backward_all / forward_backward_all -------------------------------------------------------
@pytest.mark.parametrize("num", [4, 8, 10, 1, 0])
def test_forward_all_batches_and_drops_the_padding(deploy, num):
    x = np.random.default_rng(num).normal(size=(num, 3)).astype(np.float32)
    out = deploy.forward_all(data=x)
    assert set(out) == {"out"} and out["out"].shape[0] == num
    if num:
        np.testing.assert_allclose(out["out"], _deploy_expected(deploy, x), rtol=1e-5, atol=1e-6)


def test_forward_all_extra_blobs_and_last_batch_padded_with_zeros(deploy):
    x = np.random.default_rng(2).normal(size=(6, 3)).astype(np.float32)
    out = deploy.forward_all(blobs=["ip", "data"], data=x)
    assert set(out) == {"out", "ip", "data"}
    np.testing.assert_array_equal(out["data"], x)
    assert out["ip"].shape == (6, 5)
    # the last batch was items 4, 5 and two zero rows: the net still holds it
    np.testing.assert_array_equal(deploy.blobs["data"].data[2:], 0)


def test_forward_all_without_inputs_runs_the_data_layers_once(net):
    out = net.forward_all(blobs=["ip_blob"])
    assert set(out) == {"loss", "ip_blob"} and out["ip_blob"].shape == (5, 13)
    out["ip_blob"][...] = 7  # a copy, not the blob's memory
    assert not (net.blobs["ip_blob"].data == 7).all()


def test_forward_all_inputs_of_different_lengths(tmp_path):
    two = DEPLOY.replace("layer { type: 'InnerProduct'",
                         "layer { type: 'Input' name: 'd2' top: 'd2' input_param { shape { dim: 4 dim: 3 } } }\n"
                         "layer { type: 'Eltwise' name: 'sum' bottom: 'data' bottom: 'd2' top: 'both' }\n"
                         "layer { type: 'InnerProduct'")
    net = caffe.Net(_file(tmp_path, "two.prototxt", two), caffe.TEST)
    with pytest.raises(ValueError, match="different lengths") as error:
        net.forward_all(data=np.zeros((5, 3)), d2=np.zeros((6, 3)))
    assert isinstance(error.value, KaffeError)


def test_backward_all_gives_every_items_input_diff(tmp_path):
    linear = caffe.Net(_file(tmp_path, "linear.prototxt", DEPLOY.split("layer { type: 'ReLU'")[0]), caffe.TEST)
    g = np.random.default_rng(3).normal(size=(7, 5)).astype(np.float32)
    diffs = linear.backward_all(diffs=["ip"], ip=g)
    assert set(diffs) == {"data", "ip"} and diffs["data"].shape == (7, 3)
    np.testing.assert_allclose(diffs["data"], g @ linear.params["ip"][0].data, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(diffs["ip"], g)


def test_forward_backward_all(deploy):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(9, 3)).astype(np.float32)
    g = rng.normal(size=(9, 5)).astype(np.float32)
    outs, diffs = deploy.forward_backward_all(blobs=["ip"], diffs=["ip"], data=x, out=g)
    y = x @ deploy.params["ip"][0].data.T + deploy.params["ip"][1].data
    np.testing.assert_allclose(outs["out"], np.maximum(y, 0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(outs["ip"], y, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(diffs["ip"], g * (y > 0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(diffs["data"], (g * (y > 0)) @ deploy.params["ip"][0].data, rtol=1e-5, atol=1e-5)
    assert outs["out"].shape == (9, 5) and diffs["data"].shape == (9, 3)


# -- _forward / _backward and the layer hooks --------------------------------------------------------------
def test_index_forward_backward_and_bad_indices(net):
    assert net._layer_names == ["data", "conv", "ip", "loss"]
    loss = net._forward(0, len(net.layers) - 1)
    assert loss == pytest.approx(float(net.blobs["loss"].data))
    net._backward(len(net.layers) - 1, 0)
    assert np.abs(net.params["conv"][0].diff).sum() > 0
    for call in (lambda: net._forward(0, 4), lambda: net._forward(-1, 2), lambda: net._backward(4, 0)):
        with pytest.raises(IndexError, match="out of range") as error:
            call()
        assert isinstance(error.value, KaffeError)
    with pytest.raises(ValueError, match="no layer named 'nope'"):
        net.forward(start="nope")


def test_hooks_run_with_the_layer_index_in_caffes_order(net):
    calls = []
    net.before_forward(lambda i: calls.append(("before_forward", i)))
    net.after_forward(lambda i: calls.append(("after_forward", i)))
    net.before_backward(lambda i: calls.append(("before_backward", i)))
    net.after_backward(lambda i: calls.append(("after_backward", i)))
    net.forward(start="conv", end="ip")
    assert calls == [("before_forward", 1), ("after_forward", 1), ("before_forward", 2), ("after_forward", 2)]
    calls.clear()
    net.backward()
    # every layer's backward hooks run, also for layers that need no backward (the data layer)
    assert calls == [(kind, i) for i in (3, 2, 1, 0) for kind in ("before_backward", "after_backward")]


def test_per_layer_timers_as_pythons_train_py(net):
    forward = [caffe.Timer() for _ in net.layers]
    net.before_forward(lambda i: forward[i].start())
    net.after_forward(lambda i: forward[i].stop())
    net.forward()
    assert all(t.ms >= 0 and t.ms == int(t.ms) for t in forward)


# -- index views, blob_loss_weights, params, layers ----------------------------------------------------------
def test_index_views_agree_with_the_named_views(net):
    assert net._blob_names == list(net.blobs)
    assert net._inputs == [] and [net._blob_names[i] for i in net._outputs] == net.outputs == ["loss"]
    assert net._blob_loss_weights == [0.0, 0.0, 0.0, 0.0, 1.0]
    assert net.blob_loss_weights == collections.OrderedDict(
        [("data", 0.0), ("label", 0.0), ("conv", 0.0), ("ip_blob", 0.0), ("loss", 1.0)])
    for i, name in enumerate(net._layer_names):
        assert [net._blob_names[j] for j in net._top_ids(i)] == net.top_names[name]
        assert [net._blob_names[j] for j in net._bottom_ids(i)] == net.bottom_names[name]
        assert net.layer_dict[name].type == net.layers[i].type
    assert [layer.type for layer in net.layers] == ["DummyData", "Convolution", "InnerProduct", "SoftmaxWithLoss"]


def test_deploy_inputs_by_index(deploy):
    assert [deploy._blob_names[i] for i in deploy._inputs] == deploy.inputs == ["data"]


def test_params_is_an_ordered_dict_of_the_layers_blobs(net):
    assert isinstance(net.params, collections.OrderedDict)
    assert list(net.params) == ["conv", "ip"]
    assert net.params["ip"] is net.layers[2].blobs
    assert [b.shape for b in net.params["conv"]] == [(11, 2, 2, 2), (11,)]


def test_layer_blobs_written_in_place_change_the_output(deploy):
    layer = deploy.layer_dict["ip"]
    layer.blobs[0].data[...] = 0
    layer.blobs[1].data[...] = [1, -1, 2, -2, 3]
    out = deploy.forward(data=np.ones((4, 3)))
    np.testing.assert_array_equal(out["out"], np.tile([1, 0, 2, 0, 3], (4, 1)))
    deploy.params["ip"][0].data.flat = np.arange(15)  # as net_surgery writes through .flat
    np.testing.assert_array_equal(deploy.layers[1].blobs[0].data, np.arange(15).reshape(5, 3))


def test_layer_reshape_follows_a_new_bottom_shape(deploy):
    deploy.blobs["data"].reshape(2, 3)
    ip = deploy.layers[1]
    ip.reshape([deploy.blobs["data"]], [deploy.blobs["ip"]])
    assert deploy.blobs["ip"].shape == (2, 5)


# -- the solver -------------------------------------------------------------------------------------------
def test_apply_update_moves_by_the_learning_rate_and_counts_the_iteration(solver):
    data = solver.net.layers[1].blobs[0].data
    data[...] = 0
    solver.net.layers[1].blobs[0].diff[...] = 1
    assert solver.iter == 0 and solver.lr == pytest.approx(0.01)
    solver.apply_update()
    np.testing.assert_allclose(data, -0.01, atol=1e-7)  # pycaffe's test_apply_update
    assert solver.iter == 1
    assert solver.lr == pytest.approx(0.01 * (1 + 0.0001) ** -0.75)  # the 'inv' rate of iteration 1


def test_solve_and_step_count_iterations(solver):
    solver.step(3)
    assert solver.iter == 3
    solver.solve()
    assert solver.iter == 100


def test_callbacks_run_around_every_iteration(solver):
    calls = []

    class Callback:  # Caffe's Solver::Callback: an object with both methods
        def on_start(self):
            calls.append("object start")

        def on_gradients_ready(self):
            calls.append("object ready")

    def on_gradients_ready():
        assert np.abs(solver.net.params["ip"][0].diff).sum() > 0  # the gradients are there, not applied yet
        calls.append(("ready", solver.iter))

    solver.add_callback(lambda: calls.append(("start", solver.iter)), on_gradients_ready)
    solver.add_callback(Callback())
    solver.step(2)
    assert calls == [("start", 0), "object start", ("ready", 0), "object ready",
                     ("start", 1), "object start", ("ready", 1), "object ready"]


def test_test_nets_share_with_the_train_net(solver, tmp_path):
    test_net = solver.test_nets[0]
    assert test_net.params["ip"][0].data is not solver.net.params["ip"][0].data
    solver.net.params["ip"][0].data[...] = 0.5
    test_net.share_with(solver.net)
    np.testing.assert_array_equal(test_net.params["ip"][0].data, 0.5)
    other = caffe.Net(str(tmp_path / "simple.prototxt"), caffe.TEST)
    solver.share_weights(other)
    solver.net.params["conv"][1].data[...] = 9
    np.testing.assert_array_equal(other.params["conv"][1].data, 9)


def test_snapshot_names_and_param(solver, tmp_path):
    solver.snapshot()
    assert (tmp_path / "model_iter_0.caffemodel").is_file() and (tmp_path / "model_iter_0.solverstate").is_file()
    assert solver.param.max_iter == 100 and solver.param.display == 100
    solver.param.base_lr = 0.1
    assert solver.lr == pytest.approx(0.1)


# -- Timer, log, layer_type_list, names --------------------------------------------------------------------
def test_timer_measures_whole_milliseconds_and_stops_when_read(kaffe_log):
    timer = caffe.Timer()
    assert timer.ms == 0 and kaffe_log == ["Timer has never been run before reading time."]
    timer.start()
    time.sleep(0.03)
    elapsed = timer.ms  # reading stops the timer
    time.sleep(0.02)
    assert elapsed >= 30 and elapsed == int(elapsed) and timer.ms == elapsed
    timer.start()
    timer.stop()
    assert timer.ms < elapsed


def test_log_and_init_log_levels(kaffe_log):
    handlers, level = list(logger.handlers), logger.level
    try:
        caffe.log("Using devices [0]")
        assert kaffe_log == ["Using devices [0]"]
        caffe.init_log(1)
        logger.addHandler(handlers[-1])
        caffe.log("hidden")
        logger.warning("shown")
        assert kaffe_log == ["Using devices [0]", "shown"]
        caffe.init_log(0, False)
        assert not logger.isEnabledFor(logging.WARNING) and logger.isEnabledFor(logging.ERROR)
        caffe.init_log(2)
        assert logger.isEnabledFor(logging.ERROR) and not logger.isEnabledFor(logging.WARNING)
    finally:
        logger.handlers[:] = handlers
        logger.setLevel(level)


def test_layer_type_list_and_version():
    types = caffe.layer_type_list()
    assert {"Data", "Convolution", "InnerProduct", "Python"} <= set(types) and types == sorted(types)
    assert caffe.__version__ == "1.0.0"


def test_pycaffe_module_names():
    import kaffe.pycaffe as pycaffe
    for name in ("Net", "SGDSolver", "NesterovSolver", "AdaGradSolver", "RMSPropSolver", "AdaDeltaSolver",
                 "AdamSolver", "Timer"):
        assert getattr(pycaffe, name) is getattr(caffe, name)
    names = ("init_log", "log", "set_mode_cpu", "set_mode_gpu", "set_device", "Layer", "get_solver",
             "layer_type_list", "set_random_seed", "TRAIN", "TEST", "Net", "SGDSolver", "Timer")
    assert all(hasattr(caffe, name) for name in names)


# -- import caffe and kaffe run -----------------------------------------------------------------------------
def _run(args, cwd):
    return subprocess.run([sys.executable, "-m", "kaffe.tools.cli"] + args, cwd=cwd, capture_output=True,
                          text=True, timeout=120)


SCRIPT = """import sys
import caffe
import caffe.pycaffe
from caffe.proto import caffe_pb2
from caffe import pycaffe
assert caffe.Net is pycaffe.Net and caffe_pb2.TEST == caffe.TEST
print("args", sys.argv, __name__)
if sys.argv[1:] == ["fail"]:
    def deep():
        raise ValueError("the script's own error")
    deep()
sys.exit(int(sys.argv[1]) if sys.argv[1:] else 0)
"""


def test_kaffe_run_passes_argv_and_the_exit_status(tmp_path):
    script = _file(tmp_path, "script.py", SCRIPT)
    done = _run(["run", script, "7"], tmp_path)
    assert done.returncode == 7 and f"args ['{script}', '7'] __main__" in done.stdout
    done = _run(["run", script], tmp_path)
    assert done.returncode == 0, done.stderr


def test_kaffe_run_shows_the_scripts_traceback(tmp_path):
    script = _file(tmp_path, "script.py", SCRIPT)
    done = _run(["run", script, "fail"], tmp_path)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert lines[0] == "Traceback (most recent call last):" and script in lines[1]
    assert "in deep" in done.stderr and lines[-1] == "ValueError: the script's own error"
    assert "runpy" not in done.stderr and "tools/run.py" not in done.stderr


def test_kaffe_run_a_missing_script_is_one_line(tmp_path):
    done = _run(["run", "missing.py"], tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == "kaffe run: error: cannot open script 'missing.py': no such file"
    assert "Traceback" not in done.stderr


def test_python_m_kaffe_tools_run(tmp_path):
    script = _file(tmp_path, "script.py", SCRIPT)
    done = subprocess.run([sys.executable, "-m", "kaffe.tools.run", script, "3"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 3 and "__main__" in done.stdout


NOTEBOOK = """import os
import matplotlib.pyplot as plt
get_ipython().run_line_magic('matplotlib', 'inline')
x = 2
get_ipython().run_line_magic('time', 'y = x * 21')
get_ipython().system('echo from the shell')
import matplotlib
print("backend", matplotlib.get_backend(), y)
get_ipython().run_line_magic('load_ext', 'autoreload')
"""


def test_kaffe_run_an_exported_notebook(tmp_path):
    done = _run(["run", _file(tmp_path, "notebook.py", NOTEBOOK)], tmp_path)
    assert "backend agg 42" in done.stdout.lower() and "from the shell" in done.stdout
    assert "Wall time:" in done.stdout
    assert done.returncode == 1 and "the notebook magic %load_ext is not supported" in done.stderr


def test_kaffe_run_in_process_restores_argv_and_path(tmp_path, capsys):
    script = _file(tmp_path, "script.py", SCRIPT)
    argv, path = list(sys.argv), list(sys.path)
    assert cli.main(["run", script, "0"]) == 0
    assert sys.argv == argv and sys.path == path and sys.modules["caffe"] is caffe
    assert "args" in capsys.readouterr().out


def test_install_as_caffe_in_a_fresh_interpreter(tmp_path):
    code = ("import kaffe; kaffe.install_as_caffe()\n"
            "import caffe, caffe.pycaffe\nfrom caffe.proto import caffe_pb2\n"
            "from caffe.pycaffe import Net, Timer\n"
            "assert caffe is kaffe and Net is kaffe.Net and caffe_pb2 is kaffe.caffe_pb2\n"
            "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ))
    assert done.stdout.strip() == "ok", done.stderr


def test_timer_and_hooks_in_gpu_mode(gpu_mode, deploy):
    timers = [caffe.Timer() for _ in deploy.layers]
    deploy.before_forward(lambda i: timers[i].start())
    deploy.after_forward(lambda i: timers[i].stop())
    x = np.random.default_rng(6).normal(size=(6, 3)).astype(np.float32)
    out = deploy.forward_all(data=x)
    np.testing.assert_allclose(out["out"], _deploy_expected(deploy, x), rtol=1e-4, atol=1e-5)
    assert all(t.ms > 0 for t in timers)  # device time, not rounded to whole milliseconds
