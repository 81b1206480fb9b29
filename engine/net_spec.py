"""pycaffe's net_spec: nets written as Python calls, `n.conv1 = L.Convolution(n.data, kernel_size=5, num_output=20)`.

A layer call makes a Function (the layer's type, its bottoms and its keyword parameters) and returns its Top(s).
NetSpec names tops by attribute assignment; to_proto() emits every layer the tops need, bottoms first, with
pycaffe's automatic names (`Convolution1`, ...) for the unnamed ones, so a script prints the same prototxt text
as it does with real pycaffe. A keyword goes to the layer type's `<type>_param` message when that message has
such a field, otherwise to LayerParameter itself (`param`, `include`, `loss_weight`, `*_param`).
"""
from collections import Counter, OrderedDict

from ..proto import caffe_pb2
from .errors import KaffeAttributeError, KaffeMissingAttributeKeyError, KaffeTypeError, KaffeValueError


def param_name_dict():
    """Layer type -> the name of its parameter field without `_param` (Convolution -> convolution, LRN -> lrn),
    read from the schema: every `<name>_param` field of LayerParameter holds a `<Type>Parameter` message."""
    names = {}
    for field in caffe_pb2.LayerParameter.DESCRIPTOR.fields:
        if field.name.endswith("_param") and field.message_type is not None:
            names[field.message_type.name[:-len("Parameter")]] = field.name[:-len("_param")]
    return names


_PARAM_NAMES = param_name_dict()


def assign_proto(proto, name, val):
    """Set field `name` of `proto` from a Python value: a dict fills a message, a list fills a repeated field (a
    list of dicts adds one message per dict), a lone value given to a repeated field becomes a one-item list."""
    if name not in proto.DESCRIPTOR.fields_by_name:
        raise KaffeAttributeError(f"{proto.DESCRIPTOR.name} has no field '{name}'")
    field = getattr(proto, name)
    values = [val] if hasattr(field, "extend") and not isinstance(val, list) else val
    try:
        if isinstance(values, list):
            if values and isinstance(values[0], dict):
                for item in values:
                    _fill(field.add(), item)
            else:
                field.extend(values)
        elif isinstance(values, dict):
            _fill(field, values)
        elif hasattr(values, "DESCRIPTOR") and hasattr(field, "CopyFrom"):
            field.CopyFrom(values)  # a message given as a message (pycaffe only takes dicts)
        else:
            setattr(proto, name, values)
    except TypeError as e:
        raise KaffeTypeError(f"{proto.DESCRIPTOR.name}.{name} = {val!r}: {e}") from None
    except ValueError as e:
        raise KaffeValueError(f"{proto.DESCRIPTOR.name}.{name} = {val!r}: {e}") from None
    except AttributeError as e:
        raise KaffeAttributeError(f"{proto.DESCRIPTOR.name}.{name} = {val!r}: {e}") from None


def _fill(message, values):
    if not hasattr(message, "DESCRIPTOR"):
        raise KaffeTypeError(f"a dict {values!r} given for a field that is not a message")
    for key, value in values.items():
        assign_proto(message, key, value)


class Top:
    """One output blob: top `n` of the layer `fn`."""

    def __init__(self, fn, n):
        self.fn = fn
        self.n = n

    def to_proto(self):
        """A NetParameter of every layer this top needs."""
        return to_proto(self)

    def _to_proto(self, layers, names, autonames):
        self.fn._to_proto(layers, names, autonames)


def _auto_name(key, type_name, names, autonames):
    """The name of a top or layer: the one it was given, else its type numbered in order of need (`ReLU2`)."""
    if key not in names:
        autonames[type_name] += 1
        names[key] = f"{type_name}{autonames[type_name]}"
    return names[key]


class Function:
    """A layer: its type, its bottoms (Tops of other layers) and its parameters; `ntop` and `in_place` are ours."""

    def __init__(self, type_name, inputs, params):
        for index, bottom in enumerate(inputs):
            if not isinstance(bottom, Top):
                raise KaffeTypeError(f"{type_name} input {index} is not a Top (type is {type(bottom)})")
        self.type_name = type_name
        self.inputs = inputs
        self.ntop = params.pop("ntop", 1)
        self.in_place = params.pop("in_place", False)
        self.params = params
        self.tops = tuple(Top(self, n) for n in range(self.ntop))

    def _name(self, names, autonames):
        if self not in names and self.ntop > 0:
            names[self] = _auto_name(self.tops[0], self.type_name, names, autonames)
        return _auto_name(self, self.type_name, names, autonames)

    def _field_owner(self, layer, key):
        """The message a keyword parameter belongs in: the type's `<type>_param` when it has that field."""
        param = _PARAM_NAMES.get(self.type_name)
        if not key.endswith("param") and param is not None:
            message = getattr(layer, f"{param}_param")
            if key in message.DESCRIPTOR.fields_by_name:
                return message
        return layer

    def _hint(self, key):
        # Deconvolution has no deconvolution_param: pycaffe users write its fields in convolution_param
        if self.type_name == "Deconvolution" and key in caffe_pb2.ConvolutionParameter.DESCRIPTOR.fields_by_name:
            return " (Deconvolution's fields go inside convolution_param=dict(...))"
        return ""

    def _to_proto(self, layers, names, autonames):
        if self in layers:
            return
        bottoms = []
        for bottom in self.inputs:
            bottom._to_proto(layers, names, autonames)
            bottoms.append(layers[bottom.fn].top[bottom.n])
        layer = caffe_pb2.LayerParameter(type=self.type_name, bottom=bottoms)
        if self.in_place:
            layer.top.extend(bottoms)
        else:
            layer.top.extend(_auto_name(top, self.type_name, names, autonames) for top in self.tops)
        layer.name = self._name(names, autonames)
        for key, value in self.params.items():
            try:
                assign_proto(self._field_owner(layer, key), key, value)
            except (KaffeAttributeError, KaffeTypeError, KaffeValueError) as e:
                raise type(e)(f"{self.type_name} layer '{layer.name}', parameter '{key}': {e}"
                              f"{self._hint(key)}") from None
        layers[self] = layer


def _net_parameter(tops, names):
    """The NetParameter of every layer that `tops` need, in order of need."""
    layers = OrderedDict()
    autonames = Counter()
    for top in tops:
        top._to_proto(layers, names, autonames)
    net = caffe_pb2.NetParameter()
    net.layer.extend(layers.values())
    return net


def _check_top(top, what):
    if not isinstance(top, (Top, Function)):
        raise KaffeTypeError(f"{what} is a {type(top).__name__}, not a Top (unpack the tops of a layer with "
                             f"ntop > 1: n.a, n.b = L.Type(..., ntop=2))")


def to_proto(*tops):
    """A NetParameter of every layer that `tops` need, with automatic names for all of them."""
    for index, top in enumerate(tops):
        _check_top(top, f"to_proto argument {index}")
    return _net_parameter(tops, {})


class NetSpec:
    """Named tops: `n.name = L.Type(...)` names the top (and its layer) `name`; to_proto() emits every layer that
    the assigned tops need."""

    def __init__(self):
        super().__setattr__("tops", OrderedDict())

    def __setattr__(self, name, value):
        self.tops[name] = value

    def __getattr__(self, name):
        tops = self.__dict__.get("tops", {})
        if name not in tops:
            raise KaffeMissingAttributeKeyError(f"NetSpec has no top named '{name}'")
        return tops[name]

    def __setitem__(self, key, value):
        self.__setattr__(key, value)

    def __getitem__(self, item):
        return self.__getattr__(item)

    def to_proto(self):
        names = {}
        for name, top in self.tops.items():
            _check_top(top, f"NetSpec top '{name}'")
            names[top] = name
        return _net_parameter(self.tops.values(), names)


def layer_factory(type_name):
    """The function that `L.<type_name>(*bottoms, **params)` calls: its Top, its tuple of Tops (ntop > 1), or the
    Function itself for a layer without tops (ntop=0)."""
    def make_layer(*bottoms, **params):
        fn = Function(type_name, bottoms, params)
        if fn.ntop == 0:
            return fn
        return fn.tops[0] if fn.ntop == 1 else fn.tops
    make_layer.__name__ = make_layer.__qualname__ = type_name
    return make_layer


class Layers:
    """pycaffe's `layers` pseudo-module: any attribute is the factory of that layer type."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return layer_factory(name)


class _Enums:
    """The constants of one `<Name>Parameter` message: `P.Pooling.MAX` is PoolingParameter.MAX."""

    def __init__(self, message):
        self._message = message

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return getattr(self._message, name)
        except AttributeError:
            raise KaffeAttributeError(f"{self._message.DESCRIPTOR.name} has no value '{name}'") from None


class Parameters:
    """pycaffe's `params` pseudo-module: `P.Pooling.MAX`, `P.Data.LMDB`, `P.Eltwise.SUM`."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        message = getattr(caffe_pb2, f"{name}Parameter", None)
        if message is None:
            raise KaffeAttributeError(f"params.{name}: the schema has no message {name}Parameter")
        return _Enums(message)


layers = Layers()
params = Parameters()
