"""The SGD solver against float64 references of Caffe's formulas; lr policies; snapshots; exact resume."""
import math
import re

import numpy as np
import pytest
from google.protobuf import text_format

import kaffe as caffe
from kaffe.engine.errors import KaffeError
from kaffe.proto import caffe_pb2
from kaffe.solvers.lr_policy import learning_rate

NET = """
name: "linear"
layer { name: "data" type: "Input" top: "data" top: "label"
        input_param { shape { dim: 6 dim: 4 } shape { dim: 6 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
        param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
        inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.3 }
                              bias_filler { type: "constant" value: 0.2 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""


def solver_param(extra="", net=NET):
    """A small solver; `extra` overrides the defaults here (text_format.Merge lets later fields win)."""
    text = f"net_param {{ {net} }}\n" + "base_lr: 0.5 momentum: 0.9 lr_policy: \"step\" gamma: 0.5 stepsize: 2 " \
           "max_iter: 6 display: 0 snapshot_after_train: false random_seed: 3\n"
    param = text_format.Parse(text, caffe_pb2.SolverParameter())
    return text_format.Merge(extra, param)


def reference_sgd(w, b, x, label, param, iterations):
    """Caffe's SGD in float64: normalize, clip, regularize, h = lr*lr_mult*g + m*h, w -= h."""
    w, b = w.astype(np.float64), b.astype(np.float64)
    hw, hb = np.zeros_like(w), np.zeros_like(b)
    current_step = 0
    for it in range(iterations):
        logits = x @ w.T + b
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        d = p.copy()
        d[np.arange(len(label)), label] -= 1
        d /= len(label)
        gw, gb = d.T @ x, d.sum(0)   # iter_size identical passes average to the same gradient
        if param.clip_gradients >= 0:
            norm = math.sqrt((gw ** 2).sum() + (gb ** 2).sum())
            if norm > param.clip_gradients:
                gw, gb = gw * param.clip_gradients / norm, gb * param.clip_gradients / norm
        reg = np.sign(w) if param.regularization_type == "L1" else w
        gw = gw + param.weight_decay * 1.0 * reg        # decay_mult 1 on weights, 0 on the bias
        rate, current_step = learning_rate(param, it, current_step)
        hw = rate * 1.0 * gw + param.momentum * hw
        hb = rate * 2.0 * gb + param.momentum * hb
        w, b = w - hw, b - hb
    return w, b


@pytest.mark.parametrize("extra", [
    "weight_decay: 0.01",
    "weight_decay: 0.01 regularization_type: \"L1\"",
    "weight_decay: 0.001 clip_gradients: 0.05",
    "weight_decay: 0.01 iter_size: 3",
    "lr_policy: \"inv\" gamma: 0.1 power: 0.75 weight_decay: 0.0005",
    "lr_policy: \"multistep\" stepvalue: 1 stepvalue: 3 weight_decay: 0.0",
])
def test_sgd_matches_float64_reference(extra):
    param = solver_param(extra)
    solver = caffe.get_solver(param)
    assert isinstance(solver, caffe.SGDSolver)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 4)).astype(np.float32)
    label = np.array([0, 1, 2, 2, 1, 0])
    solver.net.blobs["data"].data[...] = x
    solver.net.blobs["label"].data[...] = label
    w0 = solver.net.params["ip"][0].data.copy()
    b0 = solver.net.params["ip"][1].data.copy()
    solver.step(6)
    w, b = reference_sgd(w0, b0, x.astype(np.float64), label, param, 6)
    np.testing.assert_allclose(solver.net.params["ip"][0].data, w, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(solver.net.params["ip"][1].data, b, rtol=1e-4, atol=1e-5)
    assert solver.iter == 6


@pytest.mark.parametrize("policy,fields,expect", [
    ("fixed", "", lambda it: 0.1),
    ("step", "gamma: 0.5 stepsize: 3", lambda it: 0.1 * 0.5 ** (it // 3)),
    ("exp", "gamma: 0.9", lambda it: 0.1 * 0.9 ** it),
    ("inv", "gamma: 0.0001 power: 0.75", lambda it: 0.1 * (1 + 0.0001 * it) ** -0.75),
    ("multistep", "gamma: 0.1 stepvalue: 2 stepvalue: 5", lambda it: 0.1 * 0.1 ** ((it >= 2) + (it >= 5))),
    ("poly", "power: 2 max_iter: 10", lambda it: 0.1 * (1 - it / 10) ** 2),
    ("sigmoid", "gamma: -0.5 stepsize: 4", lambda it: 0.1 / (1 + math.exp(0.5 * (it - 4)))),
])
def test_lr_policies(policy, fields, expect):
    param = text_format.Parse(f'base_lr: 0.1 lr_policy: "{policy}" {fields}', caffe_pb2.SolverParameter())
    step = 0
    for it in range(9):
        rate, step = learning_rate(param, it, step)
        assert rate == pytest.approx(expect(it), rel=1e-6)


def test_caffe_lenet_lr_at_iteration_100():
    param = text_format.Parse('base_lr: 0.01 lr_policy: "inv" gamma: 0.0001 power: 0.75', caffe_pb2.SolverParameter())
    assert format(learning_rate(param, 100, 0)[0], ".6g") == "0.00992565"   # Caffe's LeNet log line


def test_unknown_policy_and_bad_solver_params():
    param = solver_param('lr_policy: "cosine"')
    with pytest.raises(KaffeError, match="Unknown learning rate policy: 'cosine'"):
        caffe.get_solver(param).step(1)
    with pytest.raises(KaffeError, match="must specify a train net"):
        caffe.get_solver(text_format.Parse("base_lr: 0.1", caffe_pb2.SolverParameter()))
    both = solver_param('train_net: "x.prototxt"')
    with pytest.raises(KaffeError, match="more than one"):
        caffe.get_solver(both)
    with pytest.raises(KaffeError, match="Unknown solver type: 'Bogus'"):
        caffe.get_solver(solver_param('type: "Bogus"'))
    with pytest.raises(KaffeError, match="test_interval"):
        caffe.get_solver(solver_param("test_iter: 2"))
    with pytest.raises(KaffeError, match="iter_size"):
        caffe.get_solver(solver_param("iter_size: 0"))
    with pytest.raises(KaffeError, match="solver_type.*type.*both"):
        caffe.get_solver(_read_solver_text('net: "a" solver_type: ADAM type: "SGD"'))


def _read_solver_text(text, tmp=[]):
    import tempfile
    from kaffe.solvers import read_solver_param
    f = tempfile.NamedTemporaryFile("w", suffix=".prototxt", delete=False)
    f.write(text)
    f.close()
    return read_solver_param(f.name)


def test_test_nets_display_and_test_schedule(kaffe_log):
    param = solver_param("test_iter: 2 test_interval: 3 display: 2 max_iter: 6", net=NET)
    param.test_compute_loss = True
    solver = caffe.get_solver(param)
    assert len(solver.test_nets) == 1
    solver.solve()
    tests = [m for m in kaffe_log if "Testing net" in m]
    assert tests == ["Iteration 0, Testing net (#0)", "Iteration 3, Testing net (#0)",
                     "Iteration 6, Testing net (#0)"]
    assert any(re.fullmatch(r"Iteration 2 \([\d.e+-]+ iter/s, [\d.e+-]+s/2 iters\), loss = [\d.e+-]+", m)
               for m in kaffe_log)
    assert any(re.fullmatch(r"    Train net output #0: loss = [\d.e+-]+ \(\* 1 = [\d.e+-]+ loss\)", m)
               for m in kaffe_log)
    assert any(re.fullmatch(r"    Test net output #0: loss = [\d.e+-]+ \(\* 1 = [\d.e+-]+ loss\)", m)
               for m in kaffe_log)
    assert "Iteration 2, lr = 0.25" in kaffe_log
    assert "Optimization Done." in kaffe_log


def test_nan_loss_stops_with_the_iteration():
    solver = caffe.get_solver(solver_param("max_iter: 50"))
    solver.net.blobs["label"].data[...] = 0
    solver.step(2)
    solver.net.blobs["data"].data[0, 0] = np.inf     # an overflowing input poisons the loss
    with pytest.raises(KaffeError, match=r"diverged: the loss is nan at iteration 2\b"):
        solver.step(5)


def test_snapshot_files_parse_as_caffe_messages(tmp_path):
    param = solver_param(f'snapshot: 3 snapshot_prefix: "{tmp_path}/lin"')
    solver = caffe.get_solver(param)
    solver.step(6)
    for it in (3, 6):
        model = caffe_pb2.NetParameter.FromString((tmp_path / f"lin_iter_{it}.caffemodel").read_bytes())
        assert [layer.name for layer in model.layer] == ["data", "ip", "loss"]
        assert list(model.layer[1].blobs[0].shape.dim) == [3, 4]
        state = caffe_pb2.SolverState.FromString((tmp_path / f"lin_iter_{it}.solverstate").read_bytes())
        assert state.iter == it and state.learned_net == f"{tmp_path}/lin_iter_{it}.caffemodel"
        assert len(state.history) == 2 and list(state.history[0].shape.dim) == [3, 4]
    np.testing.assert_array_equal(np.array(model.layer[1].blobs[0].data).reshape(3, 4),
                                  solver.net.params["ip"][0].data)
    assert not list(tmp_path.glob(".tmp-*"))   # atomic writes leave no temporaries


def test_restore_rejects_bad_state_files(tmp_path):
    solver = caffe.get_solver(solver_param(f'snapshot_prefix: "{tmp_path}/lin"'))
    bad = tmp_path / "bad.solverstate"
    bad.write_bytes(b"\xff\xff\xff garbage")
    with pytest.raises(KaffeError, match="bad.solverstate.*not a valid binary SolverState"):
        solver.restore(str(bad))
    wrong = caffe_pb2.SolverState(iter=3)
    wrong.history.add()
    (tmp_path / "wrong.solverstate").write_bytes(wrong.SerializeToString())
    with pytest.raises(KaffeError, match="Incorrect length of history blobs"):
        solver.restore(str(tmp_path / "wrong.solverstate"))


LENET_DROPOUT_SOLVER = """
net: "{repo}/models/lenet/lenet_train_test.prototxt"
test_iter: 3 test_interval: 20
base_lr: 0.01 momentum: 0.9 weight_decay: 0.0005 lr_policy: "inv" gamma: 0.0001 power: 0.75
display: 10 max_iter: 40 snapshot: 20 snapshot_prefix: "{out}/lenet" random_seed: 5
"""


def _lenet_with_dropout(repo, mnist, out):
    text = (repo / "models" / "lenet" / "lenet_train_test.prototxt").read_text()
    text = text.replace("data/mnist/", f"{mnist}/")
    text = text.replace('''layer {
  name: "ip2"''', '''layer {
  name: "drop1"
  type: "Dropout"
  bottom: "ip1"
  top: "ip1"
  dropout_param { dropout_ratio: 0.5 }
}
layer {
  name: "ip2"''')
    text = text.replace("transform_param { scale: 0.00390625 }",
                        "transform_param { scale: 0.00390625 crop_size: 26 mirror: true }")
    net = out / "net.prototxt"
    net.write_text(text)
    solver = out / "solver.prototxt"
    solver.write_text(LENET_DROPOUT_SOLVER.format(repo=repo, out=out).replace(
        f'net: "{repo}/models/lenet/lenet_train_test.prototxt"', f'net: "{net}"'))
    return str(solver)


def test_resume_is_exact_with_dropout_crops_and_mirrors(tmp_path, mnist_lmdb):
    from conftest import REPO
    from kaffe.solvers import read_solver_param
    solver_file = _lenet_with_dropout(REPO, mnist_lmdb, tmp_path)
    full = caffe.get_solver(read_solver_param(solver_file))
    full.solve()
    final = {k: [b.data.copy() for b in v] for k, v in full.net.params.items()}
    caffe.set_random_seed(12345)          # whatever the new process's seed, the resume restores the state
    resumed = caffe.get_solver(read_solver_param(solver_file))
    resumed.solve(str(tmp_path / "lenet_iter_20.solverstate"))
    assert resumed.iter == 40
    for name, blobs in final.items():
        for a, b in zip(blobs, resumed.net.params[name]):
            assert np.abs(a - b.data).max() <= 1e-6, name
