"""Built-in layers; importing this package registers every layer type (one module per family)."""
from . import (common, data, inner_product, loss, neuron, normalization, python_layer, recurrent,  # noqa: F401
               vision)
