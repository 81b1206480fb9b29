"""`kaffe export onnx --model DEPLOY.prototxt [--weights W.caffemodel] --out MODEL.onnx [--opset N]
[--batch dynamic|N]`.

Builds the net in the TEST phase (with its weights, if given) and writes the ONNX model that computes what it
computes; engine/onnx_export.py says how each layer maps. Bad flags are one error line, as every other error.
"""
import argparse

from ..engine.errors import KaffeError
from ..engine.log import logger
from ..engine.net import Net
from ..engine.onnx_export import DEFAULT_OPSET, export_onnx, parse_batch
from ..proto import caffe_pb2


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise KaffeError(message)


def _parser():
    parser = _Parser(prog="kaffe export", description="Export a Caffe net to another format.")
    formats = parser.add_subparsers(dest="format", metavar="format", required=True)
    onnx = formats.add_parser("onnx", help="a net prototxt (+ .caffemodel) -> an ONNX model")
    onnx.add_argument("--model", required=True, help="the net prototxt (deploy, or a TEST-phase net)")
    onnx.add_argument("--weights", default="", help="comma-separated .caffemodel files (default: the fillers')")
    onnx.add_argument("--out", required=True, help="the .onnx file to write")
    onnx.add_argument("--opset", type=int, default=None, help=f"ONNX opset version (default {DEFAULT_OPSET})")
    onnx.add_argument("--batch", default=None,
                      help="'dynamic' (a symbolic batch dimension) or a batch size (default: the net's)")
    onnx.add_argument("--level", type=int, default=0, help="NetState level")
    onnx.add_argument("--stage", default="", help="comma-separated NetState stages")
    return parser


def main(argv):
    args = _parser().parse_args(argv)
    batch = None if args.batch is None else parse_batch(args.batch)
    net = Net(args.model, caffe_pb2.TEST, level=args.level, stages=[s for s in args.stage.split(",") if s],
              allow_python_layers=False)
    if args.weights:
        net.copy_from(args.weights)
    model = export_onnx(net, args.out, opset=args.opset, batch=batch)
    logger.info(f"Exported {args.model} to {args.out}: {len(model.graph.node)} ONNX nodes, opset "
                f"{model.opset_import[0].version}, inputs {', '.join(i.name for i in model.graph.input)}, "
                f"outputs {', '.join(o.name for o in model.graph.output)}")
