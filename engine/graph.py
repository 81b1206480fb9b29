"""Net-definition rewriting done before a Net is built: NetState filtering and Split insertion (Caffe's rules)."""
from ..proto import caffe_pb2
from .errors import KaffeError
from .log import logger


def state_meets_rule(state, rule, layer_name):
    """Whether a NetState satisfies a NetStateRule (phase, min/max level, stage, not_stage)."""
    if rule.HasField("phase") and rule.phase != state.phase:
        logger.debug(f"The NetState phase ({state.phase}) differed from the phase ({rule.phase}) "
                     f"specified by a rule in layer {layer_name}")
        return False
    if rule.HasField("min_level") and state.level < rule.min_level:
        return False
    if rule.HasField("max_level") and state.level > rule.max_level:
        return False
    stages = set(state.stage)
    if any(stage not in stages for stage in rule.stage):
        return False
    if any(stage in stages for stage in rule.not_stage):
        return False
    return True


def filter_net(param):
    """A copy of the NetParameter keeping only the layers whose include/exclude rules admit param.state."""
    filtered = caffe_pb2.NetParameter()
    filtered.CopyFrom(param)
    del filtered.layer[:]
    for layer in param.layer:
        if len(layer.include) and len(layer.exclude):
            raise KaffeError(f"layer '{layer.name}': specify either include rules or exclude rules; not both")
        included = not len(layer.include)
        if any(state_meets_rule(param.state, rule, layer.name) for rule in layer.exclude):
            included = False
        if any(state_meets_rule(param.state, rule, layer.name) for rule in layer.include):
            included = True
        if included:
            filtered.layer.add().CopyFrom(layer)
    return filtered


def split_layer_name(layer_name, blob_name, top_index):
    return f"{blob_name}_{layer_name}_{top_index}_split"


def split_blob_name(layer_name, blob_name, top_index, split_index):
    return f"{blob_name}_{layer_name}_{top_index}_split_{split_index}"


def insert_splits(param):
    """Give every top that is read more than once (a loss counts as a read) its own Split layer.

    Split layers follow their producer; consumers read `<blob>_<layer>_<i>_split_<k>`, as in Caffe.
    """
    last_top = {}          # blob name -> (layer index, top index) of its latest producer
    source_of_bottom = {}  # (layer, bottom) -> (layer, top)
    reads = {}             # (layer, top) -> number of readers
    loss_weight = {}       # (layer, top) -> explicit loss weight
    for i, layer in enumerate(param.layer):
        for j, blob_name in enumerate(layer.bottom):
            if blob_name not in last_top:
                raise KaffeError(f"Unknown bottom blob '{blob_name}' (layer '{layer.name}', bottom index {j})")
            source = last_top[blob_name]
            source_of_bottom[(i, j)] = source
            reads[source] = reads.get(source, 0) + 1
        for j, blob_name in enumerate(layer.top):
            last_top[blob_name] = (i, j)
        for j in range(min(len(layer.loss_weight), len(layer.top))):
            source = last_top[layer.top[j]]
            loss_weight[source] = layer.loss_weight[j]
            if loss_weight[source]:
                reads[source] = reads.get(source, 0) + 1

    result = caffe_pb2.NetParameter()
    result.CopyFrom(param)
    del result.layer[:]
    next_split = {}
    for i, original in enumerate(param.layer):
        layer = result.layer.add()
        layer.CopyFrom(original)
        for j, blob_name in enumerate(layer.bottom):
            source = source_of_bottom[(i, j)]
            if reads.get(source, 0) > 1:
                k = next_split.get(source, 0)
                next_split[source] = k + 1
                layer.bottom[j] = split_blob_name(param.layer[source[0]].name, blob_name, source[1], k)
        for j, blob_name in enumerate(layer.top):
            count = reads.get((i, j), 0)
            if count <= 1:
                continue
            weight = loss_weight.get((i, j), 0.0)
            split = result.layer.add()
            split.name = split_layer_name(layer.name, blob_name, j)
            split.type = "Split"
            split.bottom.append(blob_name)
            for k in range(count):
                split.top.append(split_blob_name(layer.name, blob_name, j, k))
                if weight:
                    split.loss_weight.append(weight if k == 0 else 0.0)
            if weight:
                # the loss now comes from the split's first top, which the split reserves for it
                del layer.loss_weight[:]
                next_split[(i, j)] = next_split.get((i, j), 0) + 1
    return result
