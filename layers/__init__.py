"""Built-in layers; importing this package registers every layer type (one module per family)."""
from . import common, data, inner_product, loss, neuron, vision  # noqa: F401
