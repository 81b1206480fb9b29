"""Built-in layers; importing this package registers every layer type (one module per family).

It is also pycaffe's `caffe.layers` (`from kaffe import layers as L`): any other attribute is net_spec's factory of
that layer type, `L.Convolution(n.data, kernel_size=5, num_output=20)`.
"""
import importlib
import importlib.util

from . import (common, data, inner_product, loss, neuron, normalization, python_layer, recurrent,  # noqa: F401
               vision)


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(f"module '{__name__}' has no attribute '{name}'")
    # a submodule not imported yet stays a module (`from kaffe.layers import some_module`)
    if name[:1].islower() and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")
    from ..engine.net_spec import layer_factory
    return layer_factory(name)
