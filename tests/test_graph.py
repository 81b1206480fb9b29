"""NetState filtering and Split insertion, on NetParameters only (no layers are run)."""
import pytest
from google.protobuf import text_format

from kaffe.engine.errors import KaffeError
from kaffe.engine.graph import filter_net, insert_splits, state_meets_rule
from kaffe.proto import caffe_pb2


def net(text):
    return text_format.Parse(text, caffe_pb2.NetParameter())


def names(param):
    return [layer.name for layer in param.layer]


RULES = """
state { phase: TRAIN level: 2 stage: "a" stage: "b" }
layer { name: "always" type: "X" }
layer { name: "train" type: "X" include { phase: TRAIN } }
layer { name: "test" type: "X" include { phase: TEST } }
layer { name: "not_test" type: "X" exclude { phase: TEST } }
layer { name: "level_ok" type: "X" include { min_level: 1 max_level: 2 } }
layer { name: "level_low" type: "X" include { min_level: 3 } }
layer { name: "level_high" type: "X" include { max_level: 1 } }
layer { name: "stages_ok" type: "X" include { stage: "a" stage: "b" } }
layer { name: "stage_missing" type: "X" include { stage: "a" stage: "c" } }
layer { name: "not_stage" type: "X" include { not_stage: "b" } }
layer { name: "any_rule" type: "X" include { phase: TEST } include { stage: "b" } }
layer { name: "excluded_by_stage" type: "X" exclude { stage: "a" } }
"""


def test_filter_net_applies_every_rule_kind():
    kept = names(filter_net(net(RULES)))
    assert kept == ["always", "train", "not_test", "level_ok", "stages_ok", "any_rule"]


def test_include_and_exclude_together_is_an_error():
    with pytest.raises(KaffeError, match="either include rules or exclude rules"):
        filter_net(net('layer { name: "x" type: "X" include { phase: TRAIN } exclude { phase: TEST } }'))


def test_state_meets_rule_phase():
    state = caffe_pb2.NetState(phase=caffe_pb2.TEST)
    assert state_meets_rule(state, caffe_pb2.NetStateRule(phase=caffe_pb2.TEST), "x")
    assert not state_meets_rule(state, caffe_pb2.NetStateRule(phase=caffe_pb2.TRAIN), "x")


def test_insert_splits_names_like_caffe():
    param = insert_splits(net("""
        layer { name: "data" type: "Input" top: "data" top: "label" }
        layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" }
        layer { name: "acc" type: "Accuracy" bottom: "ip" bottom: "label" top: "acc" }
        layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
    """))
    assert names(param) == ["data", "label_data_1_split", "ip", "ip_ip_0_split", "acc", "loss"]
    split = param.layer[1]
    assert split.type == "Split" and list(split.bottom) == ["label"]
    assert list(split.top) == ["label_data_1_split_0", "label_data_1_split_1"]
    assert list(param.layer[4].bottom) == ["ip_ip_0_split_0", "label_data_1_split_0"]
    assert list(param.layer[5].bottom) == ["ip_ip_0_split_1", "label_data_1_split_1"]


def test_insert_splits_moves_an_explicit_loss_weight_to_the_split():
    param = insert_splits(net("""
        layer { name: "data" type: "Input" top: "x" }
        layer { name: "f" type: "X" bottom: "x" top: "y" loss_weight: 2 }
        layer { name: "g" type: "X" bottom: "y" top: "z" }
    """))
    assert names(param) == ["data", "f", "y_f_0_split", "g"]
    assert list(param.layer[1].loss_weight) == []
    assert list(param.layer[2].loss_weight) == [2.0, 0.0]
    assert list(param.layer[3].bottom) == ["y_f_0_split_1"]


def test_in_place_chain_splits_the_last_producer():
    param = insert_splits(net("""
        layer { name: "data" type: "Input" top: "x" }
        layer { name: "relu" type: "ReLU" bottom: "x" top: "x" }
        layer { name: "a" type: "X" bottom: "x" top: "a" }
        layer { name: "b" type: "X" bottom: "x" top: "b" }
    """))
    assert names(param) == ["data", "relu", "x_relu_0_split", "a", "b"]
    assert list(param.layer[1].bottom) == ["x"]


def test_unknown_bottom_is_reported_with_layer_and_index():
    with pytest.raises(KaffeError, match=r"Unknown bottom blob 'nope' \(layer 'f', bottom index 1\)"):
        insert_splits(net('layer { name: "d" type: "Input" top: "x" } '
                          'layer { name: "f" type: "X" bottom: "x" bottom: "nope" top: "y" }'))
