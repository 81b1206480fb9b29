"""kaffe.draw and `kaffe draw_net` against pycaffe's draw.py: the expected DOT texts are what real pycaffe's
get_pydot_graph(...).to_string() gives for the same net (checked by running Caffe's file over kaffe's schema with
pydot 4); every net of models/ and the shared zoo is drawn, and drawings are rendered by Graphviz's dot."""
import glob
import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, SHARED
from google.protobuf import text_format

import kaffe
from kaffe import KaffeError, draw
from kaffe.engine.io import read_text_proto
from kaffe.proto import caffe_pb2
from kaffe.tools import cli

needs_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot is not installed")

SMALL_NET = '''
name: "Small"
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TRAIN }
        data_param { source: "train_lmdb" batch_size: 64 } }
layer { name: "data" type: "Input" top: "data" top: "label" include { phase: TEST }
        input_param { shape { dim: 10 dim: 1 dim: 28 dim: 28 } shape { dim: 10 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" param { lr_mult: 1 } param { lr_mult: 2 }
        convolution_param { num_output: 20 kernel_size: 5 stride: 2 pad: 1 } }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
        pooling_param { pool: AVE kernel_size: 3 stride: 2 } }
layer { name: "relu1" type: "ReLU" bottom: "pool1" top: "pool1" }
layer { name: "up" type: "Deconvolution" bottom: "pool1" top: "up" param { lr_mult: 0 }
        convolution_param { num_output: 4 kernel_size: 4 stride: 2 } }
layer { name: "ip1" type: "InnerProduct" bottom: "up" top: "ip1" param { lr_mult: 0 } param { lr_mult: 0 }
        inner_product_param { num_output: 10 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip1" bottom: "label" top: "loss" exclude { phase: TEST } }
'''

LR_DRAWING = r'''digraph Small {
rankdir=LR;
"data\n(Data)" [shape=record, fillcolor="#6495ED", style=filled];
data [shape=octagon, fillcolor="#E0E0E0", style=filled];
label [shape=octagon, fillcolor="#E0E0E0", style=filled];
"data\n(Input)" [shape=record, fillcolor="#6495ED", style=filled];
"conv1\n(Convolution)\nkernel size: 5\nstride: 2\npad: 1\nlr mult: 1.0, 2.0" [shape=record, fillcolor="#FF5050", style=filled];
conv1 [shape=octagon, fillcolor="#E0E0E0", style=filled];
"pool1\n(Pooling AVE)\nkernel size: 3\nstride: 2\npad: 0" [shape=record, fillcolor="#FF9900", style=filled];
pool1 [shape=octagon, fillcolor="#E0E0E0", style=filled];
"relu1\n(ReLU)" [shape=record, fillcolor="#90EE90", style=filled];
"up\n(Deconvolution)\nkernel size: 4\nstride: 2\npad: 0\nlr mult: 0.0, 1.0" [shape=record, fillcolor="#FF5050", style=filled];
up [shape=octagon, fillcolor="#E0E0E0", style=filled];
"ip1\n(InnerProduct)" [shape=record, fillcolor="#CC33FF", style=filled];
ip1 [shape=octagon, fillcolor="#E0E0E0", style=filled];
"loss\n(SoftmaxWithLoss)" [shape=record, fillcolor="#6495ED", style=filled];
loss;
"data\n(Data)" -> data [label="Batch 64"];
"data\n(Data)" -> label [label="Batch 64"];
"data\n(Input)" -> data [label=""];
"data\n(Input)" -> label [label=""];
data -> "conv1\n(Convolution)\nkernel size: 5\nstride: 2\npad: 1\nlr mult: 1.0, 2.0" [label=""];
"conv1\n(Convolution)\nkernel size: 5\nstride: 2\npad: 1\nlr mult: 1.0, 2.0" -> conv1 [label=20];
conv1 -> "pool1\n(Pooling AVE)\nkernel size: 3\nstride: 2\npad: 0" [label=""];
"pool1\n(Pooling AVE)\nkernel size: 3\nstride: 2\npad: 0" -> pool1 [label=""];
pool1 -> "relu1\n(ReLU)" [label=""];
"relu1\n(ReLU)" -> pool1 [label=""];
pool1 -> "up\n(Deconvolution)\nkernel size: 4\nstride: 2\npad: 0\nlr mult: 0.0, 1.0" [label=""];
"up\n(Deconvolution)\nkernel size: 4\nstride: 2\npad: 0\nlr mult: 0.0, 1.0" -> up [label=4];
up -> "ip1\n(InnerProduct)" [label=""];
"ip1\n(InnerProduct)" -> ip1 [label=10];
ip1 -> "loss\n(SoftmaxWithLoss)" [label=""];
label -> "loss\n(SoftmaxWithLoss)" [label=""];
"loss\n(SoftmaxWithLoss)" -> loss [label=""];
}
'''

# the TEST phase, top to bottom, edges without labels
TB_TEST_DRAWING = r'''digraph Small {
rankdir=TB;
"data (Input)" [shape=record, fillcolor="#6495ED", style=filled];
data [shape=octagon, fillcolor="#E0E0E0", style=filled];
label;
"conv1 (Convolution) kernel size: 5 stride: 2 pad: 1" [shape=record, fillcolor="#FF5050", style=filled];
conv1 [shape=octagon, fillcolor="#E0E0E0", style=filled];
"pool1 (Pooling AVE) kernel size: 3 stride: 2 pad: 0" [shape=record, fillcolor="#FF9900", style=filled];
pool1 [shape=octagon, fillcolor="#E0E0E0", style=filled];
"relu1 (ReLU)" [shape=record, fillcolor="#90EE90", style=filled];
"up (Deconvolution) kernel size: 4 stride: 2 pad: 0" [shape=record, fillcolor="#FF5050", style=filled];
up [shape=octagon, fillcolor="#E0E0E0", style=filled];
"ip1 (InnerProduct)" [shape=record, fillcolor="#CC33FF", style=filled];
ip1;
"data (Input)" -> data [label=""];
"data (Input)" -> label [label=""];
data -> "conv1 (Convolution) kernel size: 5 stride: 2 pad: 1" [label=""];
"conv1 (Convolution) kernel size: 5 stride: 2 pad: 1" -> conv1 [label=""];
conv1 -> "pool1 (Pooling AVE) kernel size: 3 stride: 2 pad: 0" [label=""];
"pool1 (Pooling AVE) kernel size: 3 stride: 2 pad: 0" -> pool1 [label=""];
pool1 -> "relu1 (ReLU)" [label=""];
"relu1 (ReLU)" -> pool1 [label=""];
pool1 -> "up (Deconvolution) kernel size: 4 stride: 2 pad: 0" [label=""];
"up (Deconvolution) kernel size: 4 stride: 2 pad: 0" -> up [label=""];
up -> "ip1 (InnerProduct)" [label=""];
"ip1 (InnerProduct)" -> ip1 [label=""];
}
'''


def net_param(text=SMALL_NET):
    return text_format.Parse(text, caffe_pb2.NetParameter())


def test_dot_text_is_pycaffe_drawing():
    assert draw.dot_source(net_param(), 'LR', display_lrm=True) == LR_DRAWING
    assert draw.dot_source(net_param(), 'TB', label_edges=False, phase=kaffe.TEST) == TB_TEST_DRAWING


def test_pydot_graph_is_pycaffe_drawing():
    pytest.importorskip("pydot")
    assert draw.get_pydot_graph(net_param(), 'LR', display_lrm=True).to_string() == LR_DRAWING
    assert draw.get_pydot_graph(net_param(), 'TB', label_edges=False, phase=kaffe.TEST).to_string() \
        == TB_TEST_DRAWING


def test_train_phase_and_labels():
    text = draw.dot_source(net_param(), 'RL', phase=kaffe.TRAIN)
    assert '"data\\n(Data)"' in text and '(Input)' not in text and '"loss\\n(SoftmaxWithLoss)"' in text
    assert 'lr mult' not in text and 'label="Batch 64"' in text
    layer = net_param().layer[2]
    assert draw.get_layer_label(layer, 'BT') == '"conv1 (Convolution) kernel size: 5 stride: 2 pad: 1"'
    assert draw.get_layer_lr_mult(layer) == (1.0, 2.0)
    del layer.param[:]
    assert draw.get_layer_lr_mult(layer) == (1.0, 1.0)


def zoo_nets():
    paths = glob.glob(str(REPO / 'models' / '**' / '*.prototxt'), recursive=True)
    paths += glob.glob(str(SHARED / 'zoo' / 'bvlc' / '**' / '*.prototxt'), recursive=True)
    return sorted(p for p in paths if 'solver' not in os.path.basename(p))


def test_every_zoo_net_draws_as_pydot_does():
    """pycaffe's test_draw draws every net of Caffe's models/ and examples/; here each one's DOT text written
    without pydot is also pydot's text, in both orientations and every phase."""
    pytest.importorskip("pydot")
    paths = zoo_nets()
    assert len(paths) >= 10
    for path in paths:
        net = read_text_proto(path, caffe_pb2.NetParameter())
        for rankdir, phase in (('LR', None), ('TB', kaffe.TRAIN), ('BT', kaffe.TEST)):
            assert draw.dot_source(net, rankdir, phase=phase, display_lrm=True) == \
                draw.get_pydot_graph(net, rankdir, phase=phase, display_lrm=True).to_string(), path


@needs_dot
def test_render_svg_and_png(tmp_path):
    svg, png = tmp_path / 'net.svg', tmp_path / 'net.PNG'
    draw.draw_net_to_file(net_param(), str(svg), 'TB', kaffe.TEST, display_lrm=True)
    draw.draw_net_to_file(net_param(), str(png))
    drawing = svg.read_text()
    assert drawing.startswith('<?xml') and '<svg' in drawing and 'conv1 (Convolution)' in drawing
    assert '#ff5050' in drawing.lower() and 'SoftmaxWithLoss' not in drawing
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert draw.draw_net(net_param(), 'LR', ext='pdf')[:5] == b'%PDF-'


def test_dot_text_needs_no_graphviz(tmp_path, monkeypatch):
    monkeypatch.setenv('PATH', str(tmp_path))  # no dot program on the PATH
    draw.draw_net_to_file(net_param(), str(tmp_path / 'net.dot'), 'TB', None, True)
    assert (tmp_path / 'net.dot').read_text() == draw.dot_source(net_param(), 'TB', display_lrm=True)
    with pytest.raises(OSError, match='install Graphviz') as error:
        draw.draw_net_to_file(net_param(), str(tmp_path / 'net.svg'))
    assert isinstance(error.value, KaffeError) and not (tmp_path / 'net.svg').exists()


def test_pydot_graph_without_pydot(monkeypatch):
    monkeypatch.setitem(sys.modules, 'pydot', None)  # import pydot fails, as where the viz extra is missing
    with pytest.raises(ImportError, match=r'kaffe\[viz\]') as error:
        draw.get_pydot_graph(net_param(), 'LR')
    assert isinstance(error.value, KaffeError)
    assert draw.draw_net(net_param(), 'LR', ext='dot').startswith(b'digraph Small {')


def test_bad_drawings(tmp_path):
    both = net_param(SMALL_NET + 'layer { name: "odd" type: "ReLU" bottom: "ip1" top: "ip1" '
                                 'include { phase: TRAIN } exclude { phase: TEST } }')
    draw.dot_source(both, 'LR')  # without a phase, rules are not read
    with pytest.raises(ValueError, match='layer odd has both include and exclude specified.') as error:
        draw.dot_source(both, 'LR', phase=kaffe.TRAIN)
    assert isinstance(error.value, KaffeError)
    with pytest.raises(ValueError, match='ReLU layers do not have a learning rate multiplier'):
        draw.get_layer_lr_mult(both.layer[4])
    three = net_param().layer[2]
    three.param.add()
    with pytest.raises(ValueError, match='Could not parse the learning rate multiplier') as error:
        draw.get_layer_label(three, 'LR', display_lrm=True)
    assert isinstance(error.value, KaffeError)
    with pytest.raises(ValueError, match='extension'):
        draw.draw_net_to_file(net_param(), str(tmp_path / 'drawing'))


@needs_dot
def test_cli_draws(tmp_path, capsys):
    net = tmp_path / 'net.prototxt'
    net.write_text(SMALL_NET)
    out = tmp_path / 'net.svg'
    assert cli.main(['draw_net', str(net), str(out), '--rankdir', 'TB', '--phase', 'TRAIN', '--display_lrm']) == 0
    assert capsys.readouterr().out == f'Drawing net to {out}\n'
    drawing = out.read_text()
    assert 'lr mult: 1.0, 2.0' in drawing and 'Batch 64' in drawing and '(Input)' not in drawing


@pytest.mark.parametrize('content, args, message', [
    ('layer { name: "x" type: "ReLU" bottom: "a" top: "a" oops: 1 }', [], 'no field named "oops"'),
    ('\x89PNG\r\n\x1a\n\x00\x00', [], 'binary'),
    ('', [], 'no layers to draw'),
    (SMALL_NET, ['--phase', 'VAL'], 'Unknown phase: VAL'),
    (SMALL_NET, ['--rankdir', 'XY'], 'Unknown rankdir: XY'),
    (SMALL_NET + 'layer { name: "odd" type: "ReLU" bottom: "ip1" top: "ip1" include { phase: TRAIN } '
                 'exclude { phase: TEST } }', ['--phase', 'TEST'], 'both include and exclude'),
])
def test_cli_bad_input(tmp_path, capsys, content, args, message):
    net = tmp_path / 'bad.prototxt'
    net.write_bytes(content.encode('latin-1'))
    assert cli.main(['draw_net', str(net), str(tmp_path / 'out.svg')] + args) == 1
    error = capsys.readouterr().err
    assert error.startswith('kaffe draw_net: error: ') and message in error and error.count('\n') == 1


def test_cli_missing_file_exits_without_traceback(tmp_path):
    run = subprocess.run([sys.executable, '-m', 'kaffe.tools.cli', 'draw_net', str(tmp_path / 'none.prototxt'),
                          str(tmp_path / 'out.png')], capture_output=True, text=True)
    assert run.returncode == 1 and 'Traceback' not in run.stderr
    assert run.stderr.strip().splitlines() == [f'kaffe draw_net: error: {tmp_path / "none.prototxt"}: file not '
                                               f'found (expected a NetParameter file)']


def test_cli_upgrades_old_nets(tmp_path, capsys):
    old = SHARED / 'zoo' / 'legacy_v1' / 'examples' / 'mnist' / 'mnist_autoencoder.prototxt'
    assert cli.main(['draw_net', str(old), str(tmp_path / 'net.dot')]) == 0
    drawing = (tmp_path / 'net.dot').read_text()
    assert '"encode1\\n(InnerProduct)"' in drawing and 'sigmoid' in drawing.lower()
