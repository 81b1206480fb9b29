"""An independent check of kaffe's .caffemodel files and forward pass: OpenCV's Caffe importer
(cv2.dnn.readNetFromCaffe, opencv-python-headless < 5) reads each zoo deploy net with random weights written
by kaffe, and its outputs match kaffe's."""
import os

import numpy as np
import pytest

from kaffe.engine.layer import layer_type_list
from kaffe.engine.net import read_net_param
from kaffe.tools.benchmark_zoo import MODELS, build

cv2 = pytest.importorskip("cv2")
if not hasattr(cv2.dnn, "readNetFromCaffe"):
    pytest.skip("this OpenCV has no Caffe importer (it was removed in OpenCV 5); "
                "install opencv-python-headless<5", allow_module_level=True)

DEPLOY_NETS = sorted(d for d in os.listdir(MODELS) if os.path.exists(os.path.join(MODELS, d, "deploy.prototxt")))
SLOW = {"vgg16", "alexnet"}  # 553 and 244 MB .caffemodel files (CaffeNet covers the same layer types)


def deploy_path(name):
    return os.path.join(MODELS, name, "deploy.prototxt")


def randomize(net, seed=0):
    """Weights that keep activations O(1) through deep nets: He-scaled filters, plausible BN statistics."""
    rng = np.random.default_rng(seed)
    for layer in net.layers:
        blobs = layer.blobs
        if layer.type == "BatchNorm":
            c = blobs[0].count
            blobs[0].mutable_cpu_data()[...] = rng.normal(0, 0.2, c)
            blobs[1].mutable_cpu_data()[...] = rng.uniform(0.5, 1.5, c)
            blobs[2].mutable_cpu_data()[...] = 1.0
        elif layer.type == "Scale":
            blobs[0].mutable_cpu_data()[...] = rng.uniform(0.8, 1.2, blobs[0].shape)
            if len(blobs) > 1:
                blobs[1].mutable_cpu_data()[...] = rng.normal(0, 0.1, blobs[1].shape)
        elif blobs:
            weights = blobs[0]
            fan_in = weights.count // weights.shape[0]
            weights.mutable_cpu_data()[...] = rng.standard_normal(weights.shape, np.float32) * np.sqrt(2.0 / fan_in)
            for bias in blobs[1:]:
                bias.mutable_cpu_data()[...] = rng.normal(0, 0.1, bias.shape)


def logits_layer(net):
    """The layer feeding the final Softmax (compared too, so that a saturated softmax cannot hide a mismatch)."""
    prob = net.layers[-1]
    source = net.bottom_names[prob.name][0]
    return next(n for n, tops in reversed(net.top_names.items()) if source in tops and n != prob.name)


def relative_error(ours, theirs):
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64).reshape(ours.shape)
    return np.abs(ours - theirs).max() / max(np.abs(theirs).max(), 1e-30)


def missing_types(name):
    return sorted({layer.type for layer in read_net_param(deploy_path(name)).layer} - set(layer_type_list()))


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in DEPLOY_NETS])
def test_deploy_net_matches_opencv(name, tmp_path):
    missing = missing_types(name)
    if missing:
        pytest.skip(f"layer types not implemented yet: {', '.join(missing)}")
    net = build(name, batch=2)
    randomize(net)
    weights = tmp_path / f"{name}.caffemodel"
    net.save(str(weights))
    data_name = net.inputs[0]
    x = np.random.default_rng(1).normal(0, 1, net.blobs[data_name].shape).astype(np.float32)
    out_name = net.outputs[0]
    logits = logits_layer(net)
    ours = net.forward(**{data_name: x})
    ours_out, ours_logits = ours[out_name].copy(), net.blobs[net.top_names[logits][0]].data.copy()
    del net

    cv_net = cv2.dnn.readNetFromCaffe(deploy_path(name), str(weights))
    if hasattr(cv_net, "enableWinograd"):  # exact float32 convolutions, not Winograd's approximation
        cv_net.enableWinograd(False)
    cv_net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    cv_net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
    cv_net.setInput(x)
    theirs_out, theirs_logits = cv_net.forward([out_name, logits])
    assert relative_error(ours_logits, theirs_logits) <= 1e-4, f"{name}: logits ({logits}) differ from OpenCV's"
    assert relative_error(ours_out, theirs_out) <= 1e-4, f"{name}: {out_name} differs from OpenCV's"
    assert np.abs(ours_out.reshape(2, -1).sum(axis=1) - 1).max() < 1e-4  # a probability per image
