"""`kaffe import onnx MODEL.onnx --out-model NET.prototxt --out-weights W.caffemodel [--batch N]`.

Writes the Caffe net (V2 prototxt, an Input layer first) and its weights (.caffemodel) that compute what the
ONNX model computes; engine/onnx_import.py says how each operator maps.
"""
import argparse

from ..engine.io import write_binary_proto, write_text_proto
from ..engine.log import logger
from ..engine.onnx_import import import_onnx


def _parser():
    parser = argparse.ArgumentParser(prog="kaffe import", description="Import a model from another format.")
    formats = parser.add_subparsers(dest="format", metavar="format", required=True)
    onnx = formats.add_parser("onnx", help="an ONNX model -> a Caffe prototxt and .caffemodel")
    onnx.add_argument("model", help="the .onnx file")
    onnx.add_argument("--out-model", required=True, help="the net prototxt to write")
    onnx.add_argument("--out-weights", required=True, help="the .caffemodel to write")
    onnx.add_argument("--batch", type=int, default=None,
                      help="the batch size where the model leaves it dynamic (default 1)")
    return parser


def main(argv):
    args = _parser().parse_args(argv)
    net, weights = import_onnx(args.model, batch=args.batch)
    write_text_proto(net, args.out_model)
    write_binary_proto(weights, args.out_weights)
    logger.info(f"Imported {args.model}: {len(net.layer)} layers to {args.out_model}, weights to {args.out_weights}")
