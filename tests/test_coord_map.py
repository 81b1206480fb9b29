"""kaffe.coord_map after pycaffe's test_coord_map cases, plus FCN-8s's crops and crops that a Net runs."""
import numpy as np
import pytest

import kaffe
from kaffe import KaffeError
from kaffe import layers as L
from kaffe import params as P
from kaffe.coord_map import AxisMismatchException, compose, coord_map_from_to, crop, inverse


def coord_net_spec(ks=3, stride=1, pad=0, pool=2, dstride=2, dpad=0, data_dim=(2, 1, 100, 100), nested=False):
    """conv -> pool -> deconv (kernel twice its stride), pycaffe's test net; `nested` puts the deconvolution's
    fields in convolution_param, where a net that runs needs them."""
    n = kaffe.NetSpec()
    n.data = L.Input(shape=dict(dim=list(data_dim)))
    n.aux = L.Input(shape=dict(dim=[2, 1, 20, 20]))
    n.conv = L.Convolution(n.data, num_output=10, kernel_size=ks, stride=stride, pad=pad)
    n.pool = L.Pooling(n.conv, pool=P.Pooling.MAX, kernel_size=pool, stride=pool, pad=0)
    deconv_ks = [s * 2 for s in dstride] if isinstance(dstride, list) else dstride * 2
    deconv = dict(num_output=10, kernel_size=deconv_ks, stride=dstride, pad=dpad)
    n.deconv = L.Deconvolution(n.pool, **(dict(convolution_param=deconv) if nested else deconv))
    return n


def test_conv_pool_deconv():
    n = coord_net_spec()
    ax, a, b = coord_map_from_to(n.deconv, n.data)
    assert (ax, a, b) == (1, 1, 0)  # 2x pool then 2x deconv: identity
    n = coord_net_spec(pool=4, dstride=4)
    ax, a, b = coord_map_from_to(n.deconv, n.data)
    assert (ax, a, b) == (1, 1, -1)  # 4x pool then 4x deconv: shifted by one


def test_pass_through_and_1x1_conv_are_identities():
    n = coord_net_spec()
    expected = coord_map_from_to(n.deconv, n.data)
    n.relu = L.ReLU(n.deconv)
    n.conv1x1 = L.Convolution(n.relu, num_output=10, kernel_size=1, stride=1, pad=0)
    for top in (n.relu, n.conv1x1):
        assert coord_map_from_to(top, n.data) == expected


@pytest.mark.parametrize("pad", [0, 3, 10])
def test_padding_shifts(pad):
    n = coord_net_spec()
    ax, a, b = coord_map_from_to(n.deconv, n.data)
    for kwargs, shift in ((dict(pad=pad), -pad), (dict(dpad=pad), pad), (dict(pad=pad, dpad=pad), 0)):
        n = coord_net_spec(**kwargs)
        _, a_pad, b_pad = coord_map_from_to(n.deconv, n.data)
        assert (a_pad, b_pad) == (a, b + shift)


def test_layer_with_two_bottoms_maps_each_alike():
    n = coord_net_spec()
    n.conv_data, n.conv_aux = L.Convolution(n.data, n.aux, ntop=2, num_output=10, kernel_size=5, stride=2, pad=0)
    assert coord_map_from_to(n.conv_data, n.data) == coord_map_from_to(n.conv_aux, n.aux)


def test_anisotropic_map_is_its_isotropic_parts():
    n3x3 = coord_net_spec(ks=3, stride=1, pad=0)
    n5x5 = coord_net_spec(ks=5, stride=2, pad=10)
    n3x5 = coord_net_spec(ks=[3, 5], stride=[1, 2], pad=[0, 10])
    ax_3, a_3, b_3 = coord_map_from_to(n3x3.deconv, n3x3.data)
    ax_5, a_5, b_5 = coord_map_from_to(n5x5.deconv, n5x5.data)
    ax_35, a_35, b_35 = coord_map_from_to(n3x5.deconv, n3x5.data)
    assert ax_3 == ax_5 == ax_35
    assert (a_35[0], b_35[0], a_35[1], b_35[1]) == (a_3, b_3, a_5, b_5)


def test_nd_conv():
    n = kaffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[2, 3, 100, 100, 100]))
    n.conv = L.Convolution(n.data, num_output=10, kernel_size=[3, 3, 3], stride=[1, 1, 1], pad=[0, 1, 2])
    n.pool = L.Pooling(n.conv, pool=P.Pooling.MAX, kernel_size=2, stride=2, pad=0)
    n.deconv = L.Deconvolution(n.pool, num_output=10, kernel_size=4, stride=2, pad=0)
    ax, a, b = coord_map_from_to(n.deconv, n.data)
    assert ax == 1 and len(a) == len(b) == 3 and np.all(a == 1)
    assert b[0] - 1 == b[1] and b[1] - 1 == b[2]


@pytest.mark.parametrize("offset", [0, 4, 10])
def test_crop_of_crop_adds_offset(offset):
    n = coord_net_spec()
    ax, a, b = coord_map_from_to(n.deconv, n.data)
    n.crop = L.Crop(n.deconv, n.data, axis=2, offset=offset)
    assert coord_map_from_to(n.crop, n.data) == (ax, a, b + offset)


def test_dilation_and_pooling_param_dict():
    n = kaffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 1, 50, 50]))
    n.conv = L.Convolution(n.data, convolution_param=dict(num_output=1, kernel_size=3, dilation=2))
    n.pool = L.Pooling(n.conv, pooling_param=dict(pool=P.Pooling.AVE, kernel_size=3, stride=3, pad=1))
    _, a, b = coord_map_from_to(n.pool, n.data)
    # pooled pixel i is centred on conv pixel 3i (its window starts at 3i - 1), which is centred on data pixel
    # 3i + 2 (the dilated kernel spans 5 pixels)
    assert (a, b) == (3, 2)


def test_compose_and_inverse():
    assert compose((None, 1, 0), (2, 0.5, -1)) == (2, 0.5, -1)
    assert inverse((1, 0.5, -1)) == (1, 2, 2)
    with pytest.raises(AxisMismatchException) as error:
        compose((1, 1, 0), (2, 1, 0))
    assert isinstance(error.value, KaffeError)


def test_crop_helper_defines_a_crop_layer():
    n = coord_net_spec(pool=4, dstride=4, nested=True)
    n.score = crop(n.deconv, n.data)
    layer = n.to_proto().layer[-1]
    assert (layer.name, layer.type, list(layer.bottom)) == ("score", "Crop", ["deconv", "data"])
    assert (layer.crop_param.axis, list(layer.crop_param.offset)) == (2, [1])


def fcn8s_offsets():
    """The three crops of FCN-8s's net.py (VGG16 trunk with pad 100, 2x, 2x and 8x upsampling)."""
    def conv_relu(bottom, nout, ks=3, pad=1):
        return L.ReLU(L.Convolution(bottom, kernel_size=ks, num_output=nout, pad=pad), in_place=True)

    def up(bottom, ks, stride):
        return L.Deconvolution(bottom, convolution_param=dict(num_output=21, kernel_size=ks, stride=stride,
                                                              bias_term=False), param=[dict(lr_mult=0)])
    n = kaffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, 500, 500]))
    top, pools = n.data, []
    for block, (nout, convs) in enumerate([(64, 2), (128, 2), (256, 3), (512, 3), (512, 3)]):
        for conv in range(convs):
            top = conv_relu(top, nout, pad=100 if block == conv == 0 else 1)
        top = L.Pooling(top, pool=P.Pooling.MAX, kernel_size=2, stride=2)
        pools.append(top)
    score_fr = L.Convolution(conv_relu(conv_relu(top, 4096, ks=7, pad=0), 4096, ks=1, pad=0), num_output=21,
                             kernel_size=1)
    upscore2 = up(score_fr, 4, 2)
    score_pool4c = crop(L.Convolution(pools[3], num_output=21, kernel_size=1), upscore2)
    upscore_pool4 = up(L.Eltwise(upscore2, score_pool4c, operation=P.Eltwise.SUM), 4, 2)
    score_pool3c = crop(L.Convolution(pools[2], num_output=21, kernel_size=1), upscore_pool4)
    upscore8 = up(L.Eltwise(upscore_pool4, score_pool3c, operation=P.Eltwise.SUM), 16, 8)
    score = crop(upscore8, n.data)
    return [c.fn.params['crop_param'] for c in (score_pool4c, score_pool3c, score)]


def test_fcn8s_crops():
    assert [(p['axis'], [int(o) for o in p['offset']]) for p in fcn8s_offsets()] == [(2, [5]), (2, [9]), (2, [31])]


@pytest.mark.parametrize("pad, pool", [(0, 2), (0, 4), (1, 2)])
def test_crop_aligns_shapes_in_a_net(tmp_path, pad, pool):
    n = coord_net_spec(pad=pad, pool=pool, dstride=pool, data_dim=(1, 1, 24, 24), nested=True)
    n.crop = crop(n.deconv, n.data)
    path = tmp_path / "crop.prototxt"
    path.write_text(str(n.to_proto()))
    net = kaffe.Net(str(path), kaffe.TEST)
    net.forward()
    assert net.blobs['crop'].data.shape == (1, 10, 24, 24)


def test_unconnected_tops():
    n = coord_net_spec()
    n.ip = L.InnerProduct(n.deconv, num_output=10)
    with pytest.raises(RuntimeError, match="connected by spatial layers") as error:
        coord_map_from_to(n.ip, n.data)
    assert isinstance(error.value, KaffeError)


@pytest.mark.parametrize("n, message", [
    (coord_net_spec(pool=3, dstride=2), "scale mismatch"),  # pool 3x, deconv 2x
    (coord_net_spec(dpad=10), "negative offset"),  # output smaller than input
    (coord_net_spec(ks=2, dstride=2), "noninteger offset"),  # an even kernel shifts by half a pixel
])
def test_impossible_crops(n, message):
    with pytest.raises(AssertionError, match=message) as error:
        crop(n.deconv, n.data)
    assert isinstance(error.value, KaffeError)


def test_layers_that_cannot_be_mapped():
    n = kaffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 1, 10, 10]))
    n.legacy = L.Convolution(n.data, num_output=1, kernel_h=3, kernel_w=3)
    n.nokernel = L.Pooling(n.data, global_pooling=True)
    with pytest.raises(AssertionError, match="legacy _h/_w") as error:
        coord_map_from_to(n.legacy, n.data)
    assert isinstance(error.value, KaffeError)
    with pytest.raises(KeyError, match="kernel_size") as error:
        coord_map_from_to(n.nokernel, n.data)
    assert isinstance(error.value, KaffeError)
