"""pycaffe's coord_map: how coordinates of one NetSpec top map onto another's, to crop and align feature maps.

A layer maps input coordinates to output ones by an axis, a scale and a shift, `out = in * scale + shift`
(convolution and pooling shrink, deconvolution grows, pointwise layers pass through). Composing the maps along
the bottoms of two tops up to a common ancestor relates them; crop() turns that relation into the Crop layer that
aligns one top with the other, as FCN's net.py does (`n.score = crop(n.upscore, n.data)`).
"""
import numpy as np

from .errors import KaffeAssertionError, KaffeError, KaffeKeyError, KaffeRuntimeError
from .net_spec import layers as L

PASS_THROUGH_LAYERS = ['AbsVal', 'BatchNorm', 'Bias', 'BNLL', 'Dropout', 'Eltwise', 'ELU', 'Log', 'LRN', 'Exp',
                       'MVN', 'Power', 'ReLU', 'PReLU', 'Scale', 'Sigmoid', 'Split', 'TanH', 'Threshold']

_LEGACY_FIELDS = {'pad_h', 'pad_w', 'kernel_h', 'kernel_w', 'stride_h', 'stride_w'}


def _layer_params(fn, message):
    """The parameters of a NetSpec layer: its `message=dict(...)` when given so, else its keywords."""
    return fn.params.get(message, fn.params)


def conv_params(fn):
    """(axis, stride, effective kernel extent, pad) of a Convolution, Deconvolution, Im2col or Pooling layer, each
    an array with one entry per spatial axis (or one for all); dilation widens the kernel to (k - 1) * d + 1."""
    params = _layer_params(fn, 'pooling_param' if fn.type_name == 'Pooling' else 'convolution_param')
    legacy = _LEGACY_FIELDS & (set(params) | set(fn.params))
    if legacy:
        raise KaffeAssertionError(f"{fn.type_name}: cropping does not support legacy _h/_w params "
                                  f"({', '.join(sorted(legacy))})")
    if 'kernel_size' not in params:
        raise KaffeKeyError(f"{fn.type_name}: coord_map needs its kernel_size")
    kernel = np.array(params['kernel_size'], ndmin=1)
    dilation = np.array(params.get('dilation', 1), ndmin=1)
    return (params.get('axis', 1), np.array(params.get('stride', 1), ndmin=1), (kernel - 1) * dilation + 1,
            np.array(params.get('pad', 0), ndmin=1))


def crop_params(fn):
    """(axis, offset) of a Crop layer with Caffe's defaults: spatial crop (axis 2) by offset 0."""
    params = _layer_params(fn, 'crop_param')
    return params.get('axis', 2), np.array(params.get('offset', 0), ndmin=1)


class UndefinedMapException(KaffeError):
    """A layer without a coordinate mapping (InnerProduct, ...): the walk over bottoms stops there."""


class AxisMismatchException(KaffeError):
    """Two maps over different axes cannot compose."""


def coord_map(fn):
    """The map (axis, scale, shift) of one layer, `out[i * scale] <- in[i]`, shifted by `shift`; pointwise layers
    are the identity (None, 1, 0), whatever their axis."""
    if fn.type_name in ('Convolution', 'Pooling', 'Im2col'):
        axis, stride, kernel, pad = conv_params(fn)
        return axis, 1 / stride, (pad - (kernel - 1) / 2) / stride
    if fn.type_name == 'Deconvolution':
        axis, stride, kernel, pad = conv_params(fn)
        return axis, stride, (kernel - 1) / 2 - pad
    if fn.type_name in PASS_THROUGH_LAYERS:
        return None, 1, 0
    if fn.type_name == 'Crop':
        axis, offset = crop_params(fn)
        return axis - 1, 1, -offset  # the map's axis is the last axis before the cropped ones
    raise UndefinedMapException(f"{fn.type_name} layers have no coordinate mapping")


def compose(base_map, next_map):
    """The map `next_map` after `base_map`: scales multiply, the further shift is scaled by the base scale."""
    ax1, a1, b1 = base_map
    ax2, a2, b2 = next_map
    if ax1 is not None and ax2 is not None and ax1 != ax2:
        raise AxisMismatchException(f"cannot compose coordinate maps over axes {ax1} and {ax2}")
    return (ax2 if ax1 is None else ax1), a1 * a2, a1 * b2 + b1


def inverse(coord_map):
    """The backward map (for gradients): unshift, then unscale."""
    ax, a, b = coord_map
    return ax, 1 / a, -b / a


def _mappable_bottoms(top):
    # a Crop layer maps its first bottom only; the second just gives the output's size
    return top.fn.inputs[:1] if top.fn.type_name == 'Crop' else top.fn.inputs


def _walk_back(top):
    """(ancestor, map from the ancestor's coordinates to those of `top`) for `top` and each spatial ancestor."""
    maps = {top: (None, 1, 0)}
    frontier = [top]
    while frontier:
        top = frontier.pop()
        yield top, maps[top]
        try:
            layer_map = coord_map(top.fn)
        except UndefinedMapException:
            continue
        for bottom in _mappable_bottoms(top):
            maps[bottom] = compose(maps[top], layer_map)
            frontier.append(bottom)


def coord_map_from_to(top_from, top_to):
    """The map (axis, scale, shift) from the coordinates of `top_from` to those of `top_to`: both are walked back
    to a common ancestor, composing layer maps, and the `from` side is inverted."""
    from_maps = dict(_walk_back(top_from))
    for top, to_map in _walk_back(top_to):
        if top in from_maps:
            return compose(to_map, inverse(from_maps[top]))
    raise KaffeRuntimeError('Could not compute map between tops; are they connected by spatial layers?')


def crop(top_from, top_to):
    """A Crop layer that crops `top_from` to the extent of `top_to`, with the axis and offsets of their map."""
    ax, a, b = coord_map_from_to(top_from, top_to)
    if not np.all(a == 1):
        raise KaffeAssertionError(f'scale mismatch on crop (a = {a})')
    if not np.all(b <= 0):
        raise KaffeAssertionError(f'cannot crop negative offset (b = {b})')
    if not np.all(np.round(b) == b):
        raise KaffeAssertionError(f'cannot crop noninteger offset (b = {b})')
    axis = 2 if ax is None else ax + 1  # the first cropped axis follows the map's axis
    return L.Crop(top_from, top_to, crop_param=dict(axis=axis, offset=list(-np.round(b).astype(int))))
