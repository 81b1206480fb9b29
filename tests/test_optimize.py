"""The deploy-time optimiser (engine/optimize.py): folded BatchNorm/Scale/Bias chains, skipped TEST Dropout, the
full level's memory plan; every level gives the unoptimised net's outputs, and the parameters users see stay
the originals."""
import numpy as np
import pytest
from google.protobuf import text_format

import kaffe
from kaffe.engine.errors import KaffeError
from kaffe.engine.net import Net, read_net_param
from kaffe.proto import caffe_pb2
from kaffe.tools.benchmark_zoo import MODELS, deploy_nets

BLOCK = """
name: "block"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 9 dim: 9 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }
layer { name: "scale1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2"
        convolution_param { num_output: 4 kernel_size: 1 bias_term: false } }
layer { name: "bn2" type: "BatchNorm" bottom: "conv2" top: "bn2" }
layer { name: "scale2" type: "Scale" bottom: "bn2" top: "scale2" }
layer { name: "bias2" type: "Bias" bottom: "scale2" top: "scale2" }
layer { name: "sum" type: "Eltwise" bottom: "conv1" bottom: "scale2" top: "sum" }
layer { name: "pool" type: "Pooling" bottom: "sum" top: "pool" pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "fc" type: "InnerProduct" bottom: "pool" top: "fc" inner_product_param { num_output: 5 } }
layer { name: "bnfc" type: "BatchNorm" bottom: "fc" top: "fc" }
layer { name: "drop" type: "Dropout" bottom: "fc" top: "fc" }
layer { name: "fc2" type: "InnerProduct" bottom: "fc" top: "fc2" inner_product_param { num_output: 3 transpose: true } }
layer { name: "bnfc2" type: "BatchNorm" bottom: "fc2" top: "fc2" }
"""


def randomize(net, seed=0):
    """Random weights, and BatchNorm statistics that make sense (variances > 0, a scale factor != 1)."""
    rng = np.random.default_rng(seed)
    for name, blobs in net.params.items():
        for i, blob in enumerate(blobs):
            values = rng.standard_normal(blob.data.shape).astype(np.float32)
            if net.layer_dict[name].type == "BatchNorm":
                values = np.abs(values) * 3 + 0.5 if i else values
                values = np.full(blob.data.shape, 2.5, np.float32) if i == 2 else values
            blob.data[...] = values


def build(text=BLOCK, **kwargs):
    return Net(text_format.Parse(text, caffe_pb2.NetParameter()), caffe_pb2.TEST, **kwargs)


def forward_all_blobs(net, x):
    net.blobs["data"].data[...] = x
    net.forward()
    return {name: blob.data.copy() for name, blob in net.blobs.items()}


@pytest.fixture
def nets(tmp_path):
    """The block at each level, with the same weights (written by the unoptimised net, read by copy_from)."""
    reference = build(optimize="none")
    randomize(reference)
    weights = str(tmp_path / "block.caffemodel")
    reference.save(weights)
    levels = {"none": reference}
    for level in ("safe", "full"):
        levels[level] = build(optimize=level)
        levels[level].copy_from(weights)
    return levels, weights


def assert_close(actual, expected):
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5 * (np.abs(expected).max() + 1e-30))


def test_safe_level_keeps_every_blob_and_full_level_the_outputs(nets):
    levels, _ = nets
    x = np.random.default_rng(1).standard_normal((2, 3, 9, 9)).astype(np.float32)
    expected = forward_all_blobs(levels["none"], x)
    safe = forward_all_blobs(levels["safe"], x)
    for name in expected:
        assert_close(safe[name], expected[name])
    assert_close(forward_all_blobs(levels["full"], x)["fc2"], expected["fc2"])


def test_what_each_level_folds(nets):
    levels, _ = nets
    folded = {level: [levels[level].layer_names[first] + ".." + levels[level].layer_names[last]
                      for first, last, _ in levels[level]._plan.folded] for level in ("safe", "full")}
    # safe: only in-place chains (conv2 -> bn2 -> scale2 writes three blobs); full: that chain too, and the sum
    # that alone reads its top (relu1 works in place on conv1's folded top: the convolution applies it)
    assert folded["safe"] == ["conv1..relu1", "scale2..bias2", "fc..bnfc", "fc2..bnfc2"]
    assert folded["full"] == ["conv1..relu1", "conv2..sum", "fc..bnfc", "fc2..bnfc2"]   # conv2 adds conv1
    assert levels["none"]._plan is None
    assert levels["full"]._plan.shared_bytes > 0


def test_folding_leaves_the_parameters_users_see(nets, tmp_path):
    levels, weights = nets
    levels["safe"].blobs["data"].data[...] = 1
    levels["safe"].forward()
    original = Net(text_format.Parse(BLOCK, caffe_pb2.NetParameter()), caffe_pb2.TEST, weights=weights,
                   optimize="none")
    for name, blobs in original.params.items():
        for mine, theirs in zip(levels["safe"].params[name], blobs):
            np.testing.assert_array_equal(mine.data, theirs.data)
    saved = str(tmp_path / "again.caffemodel")
    levels["safe"].save(saved)
    assert open(saved, "rb").read() == open(weights, "rb").read()


@pytest.mark.parametrize("level", ["safe", "full"])
def test_folded_weights_follow_surgery_and_copy_from(nets, tmp_path, level):
    levels, _ = nets
    net, reference = levels[level], levels["none"]
    x = np.random.default_rng(2).standard_normal((2, 3, 9, 9)).astype(np.float32)
    forward_all_blobs(net, x)
    for target in (net, reference):   # surgery through net.params[...][i].data, after a forward
        target.params["conv1"][0].data[...] *= -1
        target.params["bn1"][1].data[...] += 1
        target.params["scale2"][0].data.flat[0] = 7
    assert_close(forward_all_blobs(net, x)["fc2"], forward_all_blobs(reference, x)["fc2"])
    randomize(reference, seed=5)
    other = str(tmp_path / "other.caffemodel")
    reference.save(other)
    net.copy_from(other)
    assert_close(forward_all_blobs(net, x)["fc2"], forward_all_blobs(reference, x)["fc2"])


def test_a_test_net_sharing_a_training_nets_weights_sees_each_update():
    train_text = BLOCK.replace('name: "block"', 'name: "block" force_backward: true')
    train = Net(text_format.Parse(train_text, caffe_pb2.NetParameter()), caffe_pb2.TRAIN)
    randomize(train)
    test, reference = build(), build(optimize="none")
    test.share_trained_layers_with(train)
    reference.share_trained_layers_with(train)
    x = np.random.default_rng(3).standard_normal((2, 3, 9, 9)).astype(np.float32)
    for _ in range(3):
        for blob in train.learnable_params:   # what a solver's update does to the shared weights
            blob.mutable_cpu_data()[...] += np.float32(0.1)
        assert_close(forward_all_blobs(test, x)["fc2"], forward_all_blobs(reference, x)["fc2"])


def test_safe_level_leaves_what_backward_needs():
    """With force_backward every layer runs backward: nothing is folded and the gradients are Caffe's."""
    text = BLOCK.replace('name: "block"', 'name: "block" force_backward: true')
    safe, plain = build(text), build(text, optimize="none")
    assert safe._plan.folded == []
    randomize(plain)
    for name, blobs in plain.params.items():
        for mine, theirs in zip(safe.params[name], blobs):
            mine.data[...] = theirs.data
    for net in (safe, plain):
        net.blobs["data"].data[...] = 1
        net.forward()
        net.blobs["fc2"].diff[...] = 1
        net.backward()
    np.testing.assert_allclose(safe.blobs["data"].diff, plain.blobs["data"].diff, rtol=1e-5)


def test_full_level_refuses_backward_and_keeps_named_blobs(nets):
    levels, _ = nets
    with pytest.raises(KaffeError, match="optimize='full'"):
        levels["full"].backward()
    kept = build(optimize="full", keep=["conv2", "pool"])
    kept.copy_from(nets[1])
    x = np.random.default_rng(4).standard_normal((2, 3, 9, 9)).astype(np.float32)
    expected = forward_all_blobs(levels["none"], x)
    blobs = forward_all_blobs(kept, x)
    for name in ("conv2", "pool", "fc2"):
        assert_close(blobs[name], expected[name])


RELU_AFTER_CONVOLUTIONS = """
name: "relus"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 96 dim: 6 dim: 7 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 64 kernel_size: 3 pad: 1 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2"
        convolution_param { num_output: 8 kernel_size: 1 } }
layer { name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }
layer { name: "conv3" type: "Convolution" bottom: "conv2" top: "conv3"
        convolution_param { num_output: 8 kernel_size: 3 stride: 2 } }
layer { name: "relu3" type: "ReLU" bottom: "conv3" top: "conv3" }
layer { name: "conv4" type: "Convolution" bottom: "conv3" top: "conv4"
        convolution_param { num_output: 8 kernel_size: 1 } }
layer { name: "leaky" type: "ReLU" bottom: "conv4" top: "conv4" relu_param { negative_slope: 0.1 } }
"""


def nets_at_every_level(text):
    """The net of `text` at each level, with the same random weights."""
    nets = {level: build(text, optimize=level) for level in ("none", "safe", "full")}
    randomize(nets["none"])
    for net in (nets["safe"], nets["full"]):
        for name, blobs in nets["none"].params.items():
            for mine, theirs in zip(net.params[name], blobs):
                mine.data[...] = theirs.data
    return nets


def test_relus_in_place_are_applied_by_the_convolutions_with_caffes_values():
    """Each path of the convolution (a GEMM per tap, a 1x1 GEMM, im2col) applies the ReLU on its top as Caffe's
    formula: -inf becomes NaN, NaN stays; a leaky ReLU keeps its own layer; a forward that stops at a
    convolution leaves its top before the ReLU."""
    nets = nets_at_every_level(RELU_AFTER_CONVOLUTIONS)
    folded = [nets["safe"].layer_names[first] + ".." + nets["safe"].layer_names[last]
              for first, last, _ in nets["safe"]._plan.folded]
    assert folded == ["conv1..relu1", "conv2..relu2", "conv3..relu3"]
    x = np.random.default_rng(6).standard_normal((2, 96, 6, 7)).astype(np.float32)
    expected = forward_all_blobs(nets["none"], x)
    for name, value in forward_all_blobs(nets["safe"], x).items():
        assert_close(value, expected[name])
    assert_close(forward_all_blobs(nets["full"], x)["conv4"], expected["conv4"])
    x[0, :, 0, 0] = -np.inf
    x[1, :, 2, 3] = np.nan
    for net in nets.values():
        net.params["conv1"][0].data[...] = np.abs(net.params["conv1"][0].data)
    expected = forward_all_blobs(nets["none"], x)
    assert np.isnan(expected["conv1"]).any()
    actual = forward_all_blobs(nets["safe"], x)
    for name in ("conv1", "conv2", "conv4"):
        np.testing.assert_array_equal(np.isnan(actual[name]), np.isnan(expected[name]))
    nets["safe"].blobs["data"].data[...] = np.random.default_rng(7).standard_normal((2, 96, 6, 7))
    nets["none"].blobs["data"].data[...] = nets["safe"].blobs["data"].data
    nets["safe"].forward(end="conv1")
    nets["none"].forward(end="conv1")
    assert (nets["safe"].blobs["conv1"].data < 0).any()
    assert_close(nets["safe"].blobs["conv1"].data, nets["none"].blobs["conv1"].data)


def computing_layers(net):
    """The layer that computes each step of the net's forward (a folded copy for a FoldedProducer, the
    convolution of a FusedReLU); the layers themselves without a plan."""
    for _, _, runner in net._plan.steps if net._plan else [(0, 0, layer) for layer in net.layers]:
        runner = getattr(runner, "runner", runner)
        yield getattr(runner, "layer", runner)


WINOGRAD_BLOCK = """
name: "winograd"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 96 dim: 13 dim: 14 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 128 kernel_size: 3 pad: 1 } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" batch_norm_param { use_global_stats: true } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2"
        convolution_param { num_output: 96 kernel_size: 3 pad: 1 } }
"""


def test_full_level_runs_large_3x3_convolutions_by_winograd(monkeypatch):
    """Only the full level (where intermediate blobs are not promised), only with the compiled transforms, and
    the outputs stay within the levels' tolerance; BatchNorm folded into the Winograd layer and its ReLU fused."""
    pytest.importorskip("numba")
    monkeypatch.setenv("KAFFE_ACCEL", "1")
    nets = nets_at_every_level(WINOGRAD_BLOCK)
    x = np.random.default_rng(8).standard_normal((2, 96, 13, 14)).astype(np.float32)
    expected = forward_all_blobs(nets["none"], x)
    for level, net in nets.items():
        layers = list(computing_layers(net))
        used = [layer.name for layer in layers if layer.type == "Convolution" and layer._runs_winograd()]
        assert used == (["conv1", "conv2"] if level == "full" else []), level
        assert_close(forward_all_blobs(net, x)["conv2"], expected["conv2"])
    monkeypatch.setenv("KAFFE_ACCEL", "0")
    assert not any(layer._runs_winograd() for layer in layers if layer.type == "Convolution")


def test_relus_after_convolutions_on_opencl(gpu_mode):
    nets = nets_at_every_level(RELU_AFTER_CONVOLUTIONS)
    x = np.random.default_rng(8).standard_normal((2, 96, 6, 7)).astype(np.float32)
    expected = forward_all_blobs(nets["none"], x)
    for name, value in forward_all_blobs(nets["safe"], x).items():
        assert_close(value, expected[name])


DENSE_BLOCK = """
name: "dense"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 6 dim: 5 dim: 4 } } }
layer { name: "bn1" type: "BatchNorm" bottom: "data" top: "bn1" }
layer { name: "scale1" type: "Scale" bottom: "bn1" top: "bn1" scale_param { bias_term: true } }
layer { name: "relu1" type: "ReLU" bottom: "bn1" top: "bn1" }
layer { name: "conv1" type: "Convolution" bottom: "bn1" top: "conv1"
        convolution_param { num_output: 3 kernel_size: 3 pad: 1 bias_term: false } }
layer { name: "concat" type: "Concat" bottom: "data" bottom: "conv1" top: "concat" }
layer { name: "bn2" type: "BatchNorm" bottom: "concat" top: "bn2" }
layer { name: "scale2" type: "Scale" bottom: "bn2" top: "scale2" }
layer { name: "bias2" type: "Bias" bottom: "scale2" top: "scale2" }
"""


@pytest.mark.parametrize("gpu", [False, True])
def test_affine_chains_without_a_producer_become_one_pass(request, gpu):
    """DenseNet's BatchNorm -> Scale -> ReLU on a block's input: one affine pass (and the ReLU) at both levels,
    the chains' blobs holding Caffe's values at the safe level, new statistics seen at the next forward; on a
    GPU the layers run as written."""
    if gpu:
        request.getfixturevalue("gpu_mode")
    nets = nets_at_every_level(DENSE_BLOCK)
    folded = {level: [nets[level].layer_names[first] + ".." + nets[level].layer_names[last]
                      for first, last, _ in nets[level]._plan.folded] for level in ("safe", "full")}
    assert folded == {"safe": ["bn1..relu1", "scale2..bias2"], "full": ["bn1..relu1", "bn2..bias2"]}
    x = np.random.default_rng(10).standard_normal((2, 6, 5, 4)).astype(np.float32)
    expected = forward_all_blobs(nets["none"], x)
    for name, value in forward_all_blobs(nets["safe"], x).items():
        assert_close(value, expected[name])
    assert_close(forward_all_blobs(nets["full"], x)["scale2"], expected["scale2"])
    for net in nets.values():
        net.params["bn1"][0].data[...] += 1
        net.params["bn2"][1].data[...] *= 2
    expected = forward_all_blobs(nets["none"], x)
    assert_close(forward_all_blobs(nets["safe"], x)["scale2"], expected["scale2"])
    assert_close(forward_all_blobs(nets["full"], x)["scale2"], expected["scale2"])


RESIDUAL_BLOCKS = """
name: "residual"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 96 dim: 9 dim: 9 } } }
layer { name: "expand" type: "Convolution" bottom: "data" top: "expand"
        convolution_param { num_output: 96 kernel_size: 1 bias_term: false } }
layer { name: "bn" type: "BatchNorm" bottom: "expand" top: "expand" }
layer { name: "scale" type: "Scale" bottom: "expand" top: "expand" scale_param { bias_term: true } }
layer { name: "sum1" type: "Eltwise" bottom: "data" bottom: "expand" top: "sum1" }
layer { name: "relu1" type: "ReLU" bottom: "sum1" top: "sum1" }
layer { name: "same" type: "Convolution" bottom: "sum1" top: "same"
        convolution_param { num_output: 96 kernel_size: 3 pad: 1 } }
layer { name: "sum2" type: "Eltwise" bottom: "same" bottom: "sum1" top: "sum2" }
layer { name: "relu2" type: "ReLU" bottom: "sum2" top: "sum2" }
layer { name: "project" type: "Convolution" bottom: "sum2" top: "project"
        convolution_param { num_output: 96 kernel_size: 1 } }
layer { name: "sum3" type: "Eltwise" bottom: "project" bottom: "sum2" top: "sum3" }
layer { name: "weighted" type: "Convolution" bottom: "sum3" top: "weighted"
        convolution_param { num_output: 96 kernel_size: 1 } }
layer { name: "sum4" type: "Eltwise" bottom: "weighted" bottom: "sum3" top: "sum4"
        eltwise_param { coeff: 1 coeff: 2 } }
"""


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")   # the NaN and -inf in the input
@pytest.mark.parametrize("accel", ["1", "0"])
def test_full_level_fuses_a_sum_that_alone_reads_a_convolution_into_it(monkeypatch, accel):
    """ResNet's branch2c (+ folded BatchNorm/Scale) + shortcut + ReLU, and MobileNet v2's linear projection +
    shortcut: the convolution adds the other bottom (and applies the ReLU) as it writes the sum's top, with the
    values of the layers as written (NaN and -inf included); a 3x3 convolution whose GEMM per tap writes no such
    pass runs its sum as written; a sum with coefficients keeps its own layer; the safe level fuses nothing."""
    monkeypatch.setenv("KAFFE_ACCEL", accel)
    nets = nets_at_every_level(RESIDUAL_BLOCKS)
    steps = {level: [(net.layer_names[first], net.layer_names[last], type(runner).__name__)
                     for first, last, runner in net._plan.steps] for level, net in nets.items() if net._plan}
    assert ("expand", "relu1", "FusedSum") in steps["full"] and ("project", "sum3", "FusedSum") in steps["full"]
    assert ("same", "relu2", "FusedSum") in steps["full"] and ("weighted", "weighted", "ConvolutionLayer") in \
        steps["full"]
    assert not any(kind == "FusedSum" for *_, kind in steps["safe"])
    same = nets["full"].layers[list(nets["full"].layer_names).index("same")]
    assert same._runs_shifted_taps() and not same.writes_top_after_gemm()
    x = np.random.default_rng(11).standard_normal((2, 96, 9, 9)).astype(np.float32)
    x[0, 3, 1, 1], x[1, 5, 2, 2] = -np.inf, np.nan
    expected = forward_all_blobs(nets["none"], x)
    actual = forward_all_blobs(nets["full"], x)["sum4"]
    np.testing.assert_array_equal(np.isnan(actual), np.isnan(expected["sum4"]))
    finite = np.isfinite(expected["sum4"])
    assert_close(actual[finite], expected["sum4"][finite])
    unfused = forward_all_blobs(nets["safe"], x)["sum4"]   # the same layers run unfused: the same bits
    np.testing.assert_array_equal(actual.view(np.uint32), unfused.view(np.uint32))


def test_fused_sums_run_as_written_on_opencl(gpu_mode):
    nets = nets_at_every_level(RESIDUAL_BLOCKS)
    x = np.random.default_rng(12).standard_normal((2, 96, 9, 9)).astype(np.float32)
    assert_close(forward_all_blobs(nets["full"], x)["sum4"], forward_all_blobs(nets["none"], x)["sum4"])


def test_unknown_level_is_refused():
    with pytest.raises(KaffeError, match="optimize must be one of"):
        build(optimize="fast")


def test_training_nets_are_not_optimised_by_default():
    train = Net(text_format.Parse(BLOCK, caffe_pb2.NetParameter()), caffe_pb2.TRAIN)
    assert train._plan is None


def zoo_net(name, batch, level):
    param = read_net_param(f"{MODELS}/{name}/deploy.prototxt")
    for layer in param.layer:
        if layer.type == "Input":
            for shape in layer.input_param.shape:
                shape.dim[0] = batch
    return Net(param, caffe_pb2.TEST, optimize=level)


@pytest.mark.slow
@pytest.mark.parametrize("name", deploy_nets())
def test_every_zoo_net_gives_the_same_outputs_at_every_level(name, tmp_path):
    reference = zoo_net(name, 2, "none")
    randomize(reference)
    for layer_name, blobs in reference.params.items():   # keep activations O(1) through deep nets
        if reference.layer_dict[layer_name].type in ("Convolution", "InnerProduct"):
            weights = blobs[0].data
            weights *= np.float32(1 / np.sqrt(weights[0].size))
    weights = str(tmp_path / "w.caffemodel")
    reference.save(weights)
    x = np.random.default_rng(9).standard_normal(reference.blobs["data"].data.shape).astype(np.float32)
    expected = forward_all_blobs(reference, x)
    for level in ("safe", "full"):
        net = zoo_net(name, 2, level)
        net.copy_from(weights)
        blobs = forward_all_blobs(net, x)
        for output in reference.outputs:
            assert_close(blobs[output], expected[output])


def test_pycaffe_default_for_test_nets_is_safe():
    net = kaffe.Net(text_format.Parse(BLOCK, caffe_pb2.NetParameter()), kaffe.TEST)
    assert net._plan.level == "safe"


def test_kaffe_time_phase_test_times_the_optimised_forward(tmp_path, capsys):
    from kaffe.tools import cli
    model = tmp_path / "block.prototxt"
    model.write_text(BLOCK)
    assert cli.main(["time", "--model", str(model), "--phase", "TEST", "--iterations", "2"]) == 0
    log = capsys.readouterr().err
    assert "Backward not timed" in log and "Performing Backward" not in log
    assert log.count("\tforward:") == 17   # every layer (16 + a Split) keeps its line; a folded one says 0
    assert cli.main(["time", "--model", str(model), "--phase", "TEST", "--iterations", "2", "--no-optimize"]) == 0
    assert "Performing Backward" in capsys.readouterr().err


def test_kaffe_test_gives_the_same_scores_with_and_without_the_optimiser(tmp_path, nets, capsys):
    from kaffe.tools import cli
    model = tmp_path / "block.prototxt"
    model.write_text(BLOCK)
    scores = []
    for extra in ([], ["--no-optimize"]):
        assert cli.main(["test", "--model", str(model), "--weights", nets[1], "--iterations", "1", *extra]) == 0
        scores.append([float(line.split("= ")[1]) for line in capsys.readouterr().err.splitlines()
                       if "] fc2 = " in line])
    assert len(scores[0]) == 6
    np.testing.assert_allclose(scores[0], scores[1], rtol=1e-4)
