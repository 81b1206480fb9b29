"""pycaffe's draw: a NetParameter as a Graphviz graph (layers as boxes, blobs as octagons, pycaffe's labels and
colours), as DOT text without pydot, rendered to .svg/.png/.pdf by Graphviz's `dot` program.

get_pydot_graph() still returns a pydot graph (the `viz` extra) whose nodes, edges and attributes are real
pycaffe's; DOT text written here is the same text for ordinary names, so that drawing never depends on pydot.
"""
import os
import re
import shutil
import subprocess

from ..proto import caffe_pb2
from .errors import KaffeAssertionError, KaffeError, KaffeFileNotFoundError, KaffeImportError, KaffeValueError
from .io import atomic_path

LAYER_STYLE_DEFAULT = {'shape': 'record', 'fillcolor': '#6495ED', 'style': 'filled'}
NEURON_LAYER_STYLE = {'shape': 'record', 'fillcolor': '#90EE90', 'style': 'filled'}
BLOB_STYLE = {'shape': 'octagon', 'fillcolor': '#E0E0E0', 'style': 'filled'}

# formats written as the DOT text itself; every other one is rendered by `dot -T<format>`
TEXT_FORMATS = ('dot', 'gv', 'raw')


def get_pooling_types_dict():
    """Pooling method number -> name (0 -> 'MAX')."""
    return {value.number: name for name, value in
            caffe_pb2.PoolingParameter.PoolMethod.DESCRIPTOR.values_by_name.items()}


def get_edge_label(layer):
    """The label of a layer's edges to its tops: the batch size of a Data layer, the outputs of a learned one."""
    if layer.type == 'Data':
        return f'Batch {layer.data_param.batch_size}'
    if layer.type in ('Convolution', 'Deconvolution'):
        return str(layer.convolution_param.num_output)
    if layer.type == 'InnerProduct':
        return str(layer.inner_product_param.num_output)
    return '""'


def get_layer_lr_mult(layer):
    """(weights, bias) learning rate multipliers of a Convolution, Deconvolution or InnerProduct layer."""
    if layer.type not in ('Convolution', 'Deconvolution', 'InnerProduct'):
        raise KaffeValueError(f"{layer.type} layers do not have a learning rate multiplier")
    if len(layer.param) > 2:
        raise KaffeValueError("Could not parse the learning rate multiplier")
    lr_mults = [spec.lr_mult for spec in layer.param] + [1.0, 1.0]
    return tuple(lr_mults[:2])


def get_layer_label(layer, rankdir, display_lrm=False):
    """A layer's node text, quoted: its name, type, geometry (kernel, stride, pad) and, with display_lrm, its
    non-zero learning rate multipliers; words go on one line for a vertical graph (TB, BT), one per line else."""
    separator = ' ' if rankdir in ('TB', 'BT') else r'\n'
    if layer.type == 'Pooling':
        descriptors = [layer.name, f'({layer.type} {get_pooling_types_dict()[layer.pooling_param.pool]})']
    else:
        descriptors = [layer.name, f'({layer.type})']
    if layer.type in ('Convolution', 'Deconvolution', 'Pooling'):
        if layer.type == 'Pooling':
            geometry = layer.pooling_param
            kernel, stride, pad = geometry.kernel_size, geometry.stride, geometry.pad
        else:
            geometry = layer.convolution_param
            kernel, stride, pad = (values[0] if len(values) else default for values, default in
                                   ((geometry.kernel_size, 1), (geometry.stride, 1), (geometry.pad, 0)))
        descriptors.append(separator.join([f'kernel size: {kernel}', f'stride: {stride}', f'pad: {pad}']))
    if display_lrm and layer.type in ('Convolution', 'Deconvolution', 'InnerProduct'):
        lr_mults = get_layer_lr_mult(layer)
        if any(lr_mults):
            descriptors.append('lr mult: %.1f, %.1f' % lr_mults)
    return f'"{separator.join(descriptors)}"'  # quoted, else Graphviz misreads the colons


def choose_color_by_layertype(layertype):
    """A layer node's fill colour by type."""
    return {'Convolution': '#FF5050', 'Deconvolution': '#FF5050', 'Pooling': '#FF9900',
            'InnerProduct': '#CC33FF'}.get(layertype, '#6495ED')


def _in_phase(layer, phase):
    if phase is None:
        return True
    if len(layer.include) and len(layer.exclude):
        raise KaffeValueError(f'layer {layer.name} has both include and exclude specified.')
    if len(layer.include):
        return any(rule.phase == phase for rule in layer.include)
    return not any(rule.phase == phase for rule in layer.exclude)


def net_graph(caffe_net, rankdir, label_edges=True, phase=None, display_lrm=False):
    """The graph of `caffe_net` as pycaffe draws it: (nodes, edges), nodes a dict key -> (node name, attributes)
    in order of first appearance, edges a list of (source key, destination key, label). A blob keeps the style of
    its last appearance: an octagon as a bottom, plain as a top."""
    nodes, edges = {}, []
    for layer in caffe_net.layer:
        if not _in_phase(layer, phase):
            continue
        layer_key = f'{layer.name}_{layer.type}'
        in_place = len(layer.bottom) == 1 and len(layer.top) == 1 and layer.bottom[0] == layer.top[0]
        style = NEURON_LAYER_STYLE if in_place else dict(LAYER_STYLE_DEFAULT,
                                                         fillcolor=choose_color_by_layertype(layer.type))
        nodes[layer_key] = (get_layer_label(layer, rankdir, display_lrm), dict(style))
        for bottom in layer.bottom:
            nodes[f'{bottom}_blob'] = (bottom, dict(BLOB_STYLE))
            edges.append((f'{bottom}_blob', layer_key, '""'))
        for top in layer.top:
            nodes[f'{top}_blob'] = (top, {})
            edges.append((layer_key, f'{top}_blob', get_edge_label(layer) if label_edges else '""'))
    return nodes, edges


def _graph_name(caffe_net):
    return caffe_net.name if caffe_net.name else 'Net'


def get_pydot_graph(caffe_net, rankdir, label_edges=True, phase=None, display_lrm=False):
    """The graph of `caffe_net` as a pydot.Dot (needs pydot: the `viz` extra)."""
    try:
        import pydot
    except ImportError:
        raise KaffeImportError('get_pydot_graph needs pydot: pip install "kaffe[viz]" (drawing to a file '
                               'does not: draw_net_to_file and `kaffe draw_net` write DOT text themselves)') from None
    nodes, edges = net_graph(caffe_net, rankdir, label_edges, phase, display_lrm)
    graph = pydot.Dot(_graph_name(caffe_net), graph_type='digraph', rankdir=rankdir)
    pydot_nodes = {key: pydot.Node(name, **attributes) for key, (name, attributes) in nodes.items()}
    for node in pydot_nodes.values():
        graph.add_node(node)
    for source, destination, label in edges:
        graph.add_edge(pydot.Edge(pydot_nodes[source], pydot_nodes[destination], label=label))
    return graph


_DOT_KEYWORDS = {'graph', 'subgraph', 'digraph', 'node', 'edge', 'strict'}
_PLAIN_ID = re.compile(r'[_a-zA-Z][a-zA-Z0-9_]*|[0-9]+\.?[0-9]*|[0-9]*\.[0-9]+|"(?:[^"\\]|\\.)*"', re.S)


def _dot_id(text):
    """`text` as a DOT ID, quoted unless it is a plain name, a number or already quoted (pydot's choices)."""
    if text.lower() not in _DOT_KEYWORDS and (_PLAIN_ID.fullmatch(text) or text.isalnum() and not text[0].isdigit()):
        return text
    return '"' + text.replace('"', r'\"').replace('\n', r'\n').replace('\r', r'\r') + '"'


def _dot_attributes(attributes):
    if not attributes:
        return ''
    return ' [' + ', '.join(f'{key}={_dot_id(value)}' for key, value in attributes.items()) + ']'


def dot_source(caffe_net, rankdir='LR', label_edges=True, phase=None, display_lrm=False):
    """The graph of `caffe_net` as DOT text (what get_pydot_graph(...).to_string() gives), without pydot."""
    nodes, edges = net_graph(caffe_net, rankdir, label_edges, phase, display_lrm)
    lines = [f'digraph {_dot_id(_graph_name(caffe_net))} {{', f'rankdir={_dot_id(rankdir)};']
    lines += [f'{_dot_id(name)}{_dot_attributes(attributes)};' for name, attributes in nodes.values()]
    lines += [f'{_dot_id(nodes[source][0])} -> {_dot_id(nodes[destination][0])}{_dot_attributes({"label": label})};'
              for source, destination, label in edges]
    return '\n'.join(lines) + '\n}\n'


def render_dot(source, ext):
    """DOT text rendered by Graphviz's `dot` into format `ext` (svg, png, pdf, ...), as bytes."""
    if ext in TEXT_FORMATS:
        return source.encode('utf-8')
    program = shutil.which('dot')
    if program is None:
        raise KaffeFileNotFoundError(f'drawing a .{ext} file needs the dot program of Graphviz, which is not '
                                     f'installed: install Graphviz (apt-get install graphviz, brew install graphviz '
                                     f'or conda install graphviz), or write the graph as .dot text')
    result = subprocess.run([program, f'-T{ext}'], input=source.encode('utf-8'), capture_output=True)
    if result.returncode != 0:
        reason = result.stderr.decode('utf-8', 'replace').strip().splitlines()
        raise KaffeAssertionError(f'Graphviz dot cannot write .{ext}: {reason[0] if reason else "it failed"}')
    return result.stdout


def draw_net(caffe_net, rankdir, ext='png', phase=None, display_lrm=False):
    """The drawing of `caffe_net` in format `ext`, as bytes ('dot' gives the DOT text)."""
    return render_dot(dot_source(caffe_net, rankdir, phase=phase, display_lrm=display_lrm), ext)


def draw_net_to_file(caffe_net, filename, rankdir='LR', phase=None, display_lrm=False):
    """Draw `caffe_net` into `filename`, in the format its extension names (.svg, .png, .pdf; .dot, .gv or .raw
    for the DOT text)."""
    ext = os.path.splitext(filename)[1][1:].lower()
    if not ext:
        raise KaffeValueError(f"{filename}: give the drawing an extension that names its format "
                              f"(.svg, .png, .pdf or .dot)")
    drawing = draw_net(caffe_net, rankdir, ext, phase, display_lrm)
    with atomic_path(filename) as path:
        with open(path, 'wb') as f:
            f.write(drawing)
