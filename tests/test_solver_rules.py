"""Every update rule against a float64 reference of Caffe's formulas, on CPU and OpenCL; solver errors; LeNet."""
import math
import re
import time

import numpy as np
import pytest
from google.protobuf import text_format

import kaffe as caffe
from kaffe.engine import device
from kaffe.engine.errors import KaffeError
from kaffe.proto import caffe_pb2
from kaffe.solvers import read_solver_param, sgd

from gradient_check import opencl_available

from test_solver import NET  # the small linear net both solver test files train

# each rule's own fields; the cases below add the policy, decay, clipping and iter_size
RULES = {
    "SGD": 'base_lr: 0.1 momentum: 0.9',
    "Nesterov": 'base_lr: 0.1 momentum: 0.9',
    "AdaGrad": 'base_lr: 0.1 delta: 0.0001',
    "RMSProp": 'base_lr: 0.02 rms_decay: 0.9 delta: 0.0001',
    "AdaDelta": 'base_lr: 1.0 momentum: 0.95 delta: 0.000001',
    "Adam": 'base_lr: 0.02 momentum: 0.9 momentum2: 0.99 delta: 0.00000001',
}

CASES = {
    "multistep_L2_iter_size_3": ('lr_policy: "multistep" gamma: 0.5 stepvalue: 2 stepvalue: 4 '
                                 'weight_decay: 0.01 iter_size: 3',
                                 lambda base, it: base * 0.5 ** ((it >= 2) + (it >= 4))),
    "inv_L1": ('lr_policy: "inv" gamma: 0.1 power: 0.75 weight_decay: 0.02 regularization_type: "L1"',
               lambda base, it: base * (1 + 0.1 * it) ** -0.75),
    "step_clip_iter_size_2": ('lr_policy: "step" gamma: 0.5 stepsize: 3 weight_decay: 0.005 '
                              'clip_gradients: 0.3 iter_size: 2',
                              lambda base, it: base * 0.5 ** (it // 3)),
}

ITERATIONS = 6
BATCHES = 4


def solver_param(rule, extra):
    text = (f'net_param {{ {NET} }} type: "{rule}" {RULES[rule]} max_iter: 20 display: 0 '
            f'snapshot_after_train: false random_seed: 3 {extra}')
    return text_format.Parse(text, caffe_pb2.SolverParameter())


def data():
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((BATCHES, 6, 4)).astype(np.float32)
    labels = rng.integers(0, 3, (BATCHES, 6))
    return xs, labels


def feed_batches(net, xs, labels):
    """Give every forward/backward pass the next batch, so that the iter_size passes differ."""
    passes = iter(range(10 ** 9))
    forward_backward = net.forward_backward

    def next_batch_then_pass():
        k = next(passes) % len(xs)
        net.blobs["data"].data[...] = xs[k]
        net.blobs["label"].data[...] = labels[k]
        return forward_backward()
    net.forward_backward = next_batch_then_pass


def softmax_loss_gradients(w, b, x, label):
    logits = x @ w.T + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(len(label)), label] -= 1
    p /= len(label)
    return p.T @ x, p.sum(0)


def rule_step(rule, p, g, state, lr, it):
    """Caffe's ComputeUpdateValue in float64: returns the value subtracted from the parameter."""
    if rule == "SGD":
        state[0] = p.momentum * state[0] + lr * g
        return state[0]
    if rule == "Nesterov":
        previous = state[0]
        state[0] = p.momentum * previous + lr * g
        return (1 + p.momentum) * state[0] - p.momentum * previous
    if rule == "AdaGrad":
        state[0] = state[0] + g * g
        return lr * g / (np.sqrt(state[0]) + p.delta)
    if rule == "RMSProp":
        state[0] = p.rms_decay * state[0] + (1 - p.rms_decay) * g * g
        return lr * g / (np.sqrt(state[0]) + p.delta)
    if rule == "AdaDelta":
        state[0] = p.momentum * state[0] + (1 - p.momentum) * g * g
        step = g * np.sqrt((state[1] + p.delta) / (state[0] + p.delta))
        state[1] = p.momentum * state[1] + (1 - p.momentum) * step * step
        return lr * step
    if rule == "Adam":
        b1, b2, t = p.momentum, p.momentum2, it + 1
        state[0] = b1 * state[0] + (1 - b1) * g
        state[1] = b2 * state[1] + (1 - b2) * g * g
        return lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t) * state[0] / (np.sqrt(state[1]) + p.delta)
    raise AssertionError(rule)


def reference(rule, p, rate, w, b, xs, labels, iterations):
    """The solver loop in float64: accumulate iter_size passes, clip the sum, divide by iter_size, decay
    (decay_mult 1 on the weights, 0 on the bias), update (lr_mult 1 and 2)."""
    params = [w.astype(np.float64), b.astype(np.float64)]
    lr_mult, decay_mult = (1.0, 2.0), (1.0, 0.0)
    states = [[np.zeros_like(q), np.zeros_like(q)] for q in params]
    k = 0
    for it in range(iterations):
        grads = [np.zeros_like(q) for q in params]
        for _ in range(p.iter_size):
            gw, gb = softmax_loss_gradients(*params, xs[k % len(xs)].astype(np.float64), labels[k % len(xs)])
            grads[0] += gw
            grads[1] += gb
            k += 1
        if p.clip_gradients >= 0:
            norm = math.sqrt(sum((g ** 2).sum() for g in grads))
            if norm > p.clip_gradients:
                grads = [g * (p.clip_gradients / norm) for g in grads]
        for i, (q, g) in enumerate(zip(params, grads)):
            g = g / p.iter_size
            g = g + p.weight_decay * decay_mult[i] * (np.sign(q) if p.regularization_type == "L1" else q)
            params[i] = q - rule_step(rule, p, g, states[i], rate(p.base_lr, it) * lr_mult[i], it)
    return params


def run_rule(rule, case, mode):
    extra, rate = CASES[case]
    param = solver_param(rule, extra)
    xs, labels = data()
    (device.set_mode_gpu if mode == "gpu" else device.set_mode_cpu)()
    try:
        solver = caffe.get_solver(param)
        assert type(solver).__name__ == f"{rule}Solver" and solver.type == rule
        w0, b0 = (blob.data.copy() for blob in solver.net.params["ip"])
        feed_batches(solver.net, xs, labels)
        solver.step(ITERATIONS)
        got = [blob.data.copy() for blob in solver.net.params["ip"]]
    finally:
        device.set_mode_cpu()
    expected = reference(rule, param, rate, w0, b0, xs, labels, ITERATIONS)
    assert solver.iter == ITERATIONS
    for name, g, e, start in zip(("weights", "bias"), got, expected, (w0, b0)):
        assert np.abs(e - start).max() > 1e-3    # the case really trains
        np.testing.assert_allclose(g, e, rtol=2e-4, atol=2e-5, err_msg=f"{rule} {case} {name}")
    return got


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("block", [None, 5])
def test_rule_matches_float64_reference_cpu(rule, case, block, monkeypatch):
    """block 5: the host update runs in blocks (of 5 values here, so 12 weights make 5 + 5 + 2)."""
    if block:
        monkeypatch.setattr(sgd, "UPDATE_BLOCK", block)
    run_rule(rule, case, "cpu")


@pytest.mark.parametrize("case", sorted(CASES))
def test_compiled_sgd_update_gives_the_numpy_paths_bits(case, monkeypatch):
    """With numba (KAFFE_ACCEL=1) plain SGD updates each parameter in one compiled pass (L1 keeps numpy)."""
    pytest.importorskip("numba")
    runs = []
    for accel in ("1", "0"):
        monkeypatch.setenv("KAFFE_ACCEL", accel)
        runs.append(run_rule("SGD", case, "cpu"))
    for compiled, numpy_path in zip(*runs):
        np.testing.assert_array_equal(compiled, numpy_path)
    monkeypatch.setenv("KAFFE_ACCEL", "1")
    solver = caffe.get_solver(solver_param("SGD", CASES[case][0]))
    assert solver._compiled_update() == ("L1" not in case)
    assert not caffe.get_solver(solver_param("Nesterov", ""))._compiled_update()


@pytest.mark.opencl
@pytest.mark.skipif(not opencl_available(), reason="no OpenCL platform (install pocl-opencl-icd)")
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("rule", sorted(RULES))
def test_rule_matches_float64_reference_opencl(rule, case):
    gpu = run_rule(rule, case, "gpu")
    cpu = run_rule(rule, case, "cpu")
    for a, b in zip(gpu, cpu):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.opencl
@pytest.mark.skipif(not opencl_available(), reason="no OpenCL platform (install pocl-opencl-icd)")
@pytest.mark.parametrize("rule", ["Nesterov", "AdaGrad", "RMSProp", "AdaDelta", "Adam"])
def test_gpu_updates_keep_weights_and_history_on_the_device(rule):
    """In GPU mode an update leaves the newest weights and history on the device (no host round trip)."""
    from kaffe.engine.syncedmem import HEAD_AT_GPU
    device.set_mode_gpu()
    try:
        solver = caffe.get_solver(solver_param(rule, CASES["inv_L1"][0]))
        solver.net.blobs["label"].data[...] = 1
        solver.step(2)
        for blob in solver.net.learnable_params + solver.history:
            assert blob._data.head == HEAD_AT_GPU
    finally:
        device.set_mode_cpu()


def test_history_sets_follow_caffe():
    for rule, sets in (("SGD", 1), ("Nesterov", 1), ("AdaGrad", 1), ("RMSProp", 1), ("AdaDelta", 2), ("Adam", 2)):
        solver = caffe.get_solver(solver_param(rule, 'lr_policy: "fixed"'))
        shapes = [b.shape for b in solver.history_blobs()]
        assert shapes == [(3, 4), (3,)] * sets, rule


def test_python_api_classes():
    for rule in RULES:
        cls = getattr(caffe, f"{rule}Solver")
        solver = cls(solver_param(rule, 'lr_policy: "fixed"'))
        assert isinstance(solver, caffe.SGDSolver) and solver.type == rule


def _solver_file(tmp_path, text):
    (tmp_path / "net.prototxt").write_text(NET)
    path = tmp_path / "solver.prototxt"
    path.write_text(text)
    return str(path)


def test_legacy_solver_type_enum_picks_the_rule(tmp_path):
    solver = caffe.get_solver(_solver_file(tmp_path, 'net: "net.prototxt" solver_type: NESTEROV base_lr: 0.1 '
                                                     'lr_policy: "fixed"'))
    assert isinstance(solver, caffe.NesterovSolver)


@pytest.mark.parametrize("text,message", [
    ('type: "Adamax"', r"Unknown solver type: 'Adamax' \(known: AdaDelta, AdaGrad, Adam, Nesterov, RMSProp, SGD\)"),
    ('type: "AdaGrad" momentum: 0.9', "Momentum cannot be used with AdaGrad"),
    ('type: "RMSProp" momentum: 0.5', "Momentum cannot be used with RMSProp"),
    ('type: "RMSProp" rms_decay: 1', r"rms_decay should lie between 0 and 1.*got 1"),
    ('type: "RMSProp" rms_decay: -0.1', r"rms_decay should lie between 0 and 1.*got -0.1"),
    ('type: "Adam" momentum: 1', r"Adam needs 0 <= momentum < 1, got 1"),
    ('type: "Adam" momentum2: 1.5', r"Adam needs 0 <= momentum2 < 1, got 1.5"),
    ('lr_policy: "step" stepsize: 0', r"lr_policy 'step' needs stepsize > 0, got 0"),
    ('lr_policy: "sigmoid" gamma: 0.1', r"lr_policy 'sigmoid' needs stepsize > 0"),
    ('lr_policy: "exp" gamma: -0.5', r"lr_policy 'exp' needs gamma >= 0, got -0.5"),
    ('lr_policy: "step" stepsize: 2 gamma: -1', r"lr_policy 'step' needs gamma >= 0"),
    ('lr_policy: "poly" power: 2', r"lr_policy 'poly' needs max_iter > 0, got 0"),
    ('lr_policy: "cosine"', r"Unknown learning rate policy: 'cosine' \(known: fixed, step, exp, inv"),
    ('iter_size: 0', "iter_size must be at least 1"),
])
def test_bad_solver_prototxt_is_a_clear_error(tmp_path, text, message):
    policy = "" if "lr_policy" in text else 'lr_policy: "fixed"'
    path = _solver_file(tmp_path, f'net: "net.prototxt" base_lr: 0.1 {policy} {text}')
    with pytest.raises(KaffeError, match=message):
        caffe.get_solver(path)


def test_missing_net_and_conflicting_legacy_type(tmp_path):
    with pytest.raises(KaffeError, match="must specify a train net"):
        caffe.get_solver(_solver_file(tmp_path, 'type: "Adam" base_lr: 0.1 lr_policy: "fixed"'))
    with pytest.raises(KaffeError, match=r"solver_type.*type.*both specified \(solver_type: ADAGRAD, type: \"Adam\"\)"):
        read_solver_param(_solver_file(tmp_path, 'net: "net.prototxt" solver_type: ADAGRAD type: "Adam"'))


def test_missing_lr_policy_fails_at_the_first_update():
    param = solver_param("SGD", "")
    solver = caffe.get_solver(param)   # a solver used only for its nets needs no policy (pycaffe)
    solver.net.blobs["label"].data[...] = 0
    with pytest.raises(KaffeError, match="lr_policy is not set"):
        solver.step(1)


# -- LeNet on MNIST (slow) ---------------------------------------------------------------------------------
LENET_SOLVER = """
net: "{net}"
test_iter: 100 test_interval: {test_interval}
{rule}
display: 500 max_iter: 5000 snapshot: 0 snapshot_after_train: false random_seed: 1
"""


@pytest.mark.slow
@pytest.mark.parametrize("solver_name", ["lenet_solver_adam.prototxt", "lenet_solver_nesterov.prototxt"])
def test_lenet_reaches_caffe_accuracy(tmp_path, mnist_lmdb, kaffe_log, solver_name):
    from conftest import REPO
    net = (REPO / "models" / "lenet" / "lenet_train_test.prototxt").read_text()
    (tmp_path / "net.prototxt").write_text(net.replace("data/mnist/", f"{mnist_lmdb}/"))
    shipped = read_solver_param(str(REPO / "models" / "lenet" / solver_name))
    rule = (f'type: "{shipped.type}" base_lr: {shipped.base_lr} momentum: {shipped.momentum} '
            f'momentum2: {shipped.momentum2} weight_decay: {shipped.weight_decay} lr_policy: "{shipped.lr_policy}" '
            f'gamma: {shipped.gamma} power: {shipped.power}')
    path = tmp_path / "solver.prototxt"
    path.write_text(LENET_SOLVER.format(net=tmp_path / "net.prototxt", rule=rule,
                                        test_interval=shipped.test_interval))
    solver = caffe.get_solver(str(path))
    start = time.perf_counter()
    solver.solve()
    seconds = time.perf_counter() - start
    accuracies = [float(m) for m in re.findall(r"Test net output #0: accuracy = ([\d.]+)", "\n".join(kaffe_log))]
    print(f"{shipped.type} LeNet: test accuracy every {shipped.test_interval} iterations = {accuracies}, "
          f"{seconds:.0f} s")
    # the bar: the test accuracy reaches 0.985 within 5000 iterations (tested as often as the solver says)
    assert len(accuracies) == 5000 // shipped.test_interval + 1 and max(accuracies) >= 0.985
