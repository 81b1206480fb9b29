"""`kaffe draw_net NET OUT [--rankdir LR|TB|BT|RL] [--phase TRAIN|TEST|ALL] [--display_lrm]`: Caffe's draw_net.py.

Draws a net prototxt (any format generation) as a graph of its layers and blobs, in the format that OUT's
extension names: .svg, .png, .pdf (rendered by Graphviz's `dot`) or .dot (the DOT text, no Graphviz needed).
"""
import argparse

from ..engine.draw import draw_net_to_file
from ..engine.errors import KaffeError
from ..engine.io import read_text_proto
from ..engine.upgrade import upgrade_net_param
from ..proto import caffe_pb2

PHASES = {"TRAIN": caffe_pb2.TRAIN, "TEST": caffe_pb2.TEST, "ALL": None}
RANKDIRS = ("LR", "TB", "BT", "RL")


def build_parser():
    parser = argparse.ArgumentParser(prog="kaffe draw_net", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input_net_proto_file", metavar="NET", help="input network prototxt file")
    parser.add_argument("output_image_file", metavar="OUT", help="output image file (.svg, .png, .pdf or .dot)")
    parser.add_argument("--rankdir", default="LR", help="direction of the graph: LR (left to right, the "
                        "default), TB (top to bottom), BT or RL")
    parser.add_argument("--phase", default="ALL", help="the layers of which phase to draw: TRAIN, TEST or ALL "
                        "(the default: every layer regardless of phase)")
    parser.add_argument("--display_lrm", action="store_true", help="show the learning rate multipliers, when "
                        "non-zero, of the learning layers (Convolution, Deconvolution, InnerProduct)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.phase not in PHASES:
        raise KaffeError(f"Unknown phase: {args.phase} (expected TRAIN, TEST or ALL)")
    if args.rankdir not in RANKDIRS:
        raise KaffeError(f"Unknown rankdir: {args.rankdir} (expected LR, TB, BT or RL)")
    net = read_text_proto(args.input_net_proto_file, caffe_pb2.NetParameter())
    upgrade_net_param(net, source=args.input_net_proto_file)
    if not len(net.layer):
        raise KaffeError(f"{args.input_net_proto_file}: the net has no layers to draw")
    print(f"Drawing net to {args.output_image_file}")
    draw_net_to_file(net, args.output_image_file, args.rankdir, PHASES[args.phase], args.display_lrm)
    return 0
