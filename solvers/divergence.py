"""Which layer made the loss NaN or infinite: the first one whose parameters or outputs are not finite."""
import numpy as np


def _count(values):
    nan = int(np.isnan(values).sum())
    inf = int(values.size - nan - np.isfinite(values).sum())
    return f"{nan} NaN and {inf} infinite values"


def first_non_finite(net):
    """A sentence naming the first layer of `net` that holds non-finite parameters or computes non-finite tops
    from finite bottoms. Layers with bottoms are run forward again on the batch still in their bottoms (the data
    layers are not, so the data cursors do not move): in-place layers overwrite their inputs, so the blobs as
    the failed pass left them cannot tell which layer started it."""
    blob_names = net.blob_names
    for i, (name, layer) in enumerate(zip(net.layer_names, net.layers)):
        for j, blob in enumerate(layer.blobs):
            values = blob.cpu_data()
            if not np.isfinite(values).all():
                return f"Layer '{name}' ({layer.type}) has non-finite weights: param blob {j} holds {_count(values)}."
        if net.bottom_vecs[i]:
            layer.forward(net.bottom_vecs[i], net.top_vecs[i])
        for top_id, blob in zip(net.top_ids[i], net.top_vecs[i]):
            values = blob.cpu_data()
            if not np.isfinite(values).all():
                source = "from finite inputs" if net.bottom_vecs[i] else "(its data)"
                return (f"The first non-finite value comes from layer '{name}' ({layer.type}): its top blob "
                        f"'{blob_names[top_id]}' holds {_count(values)} {source}.")
    return "Run on the same batch again, every layer's output is finite (a random layer such as Dropout?)."
