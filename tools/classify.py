"""classify: classify images from the command line with kaffe.Classifier, as Caffe's python/classify.py.

    classify INPUT_FILE OUTPUT_FILE [--model_def M] [--pretrained_model W] [--center_only] [--images_dim 256,256]
             [--mean_file F] [--input_scale S] [--raw_scale 255] [--channel_swap 2,1,0] [--ext jpg] [--gpu]

INPUT_FILE is an image, a folder (its *.EXT images) or a .npy of H x W x K images; OUTPUT_FILE gets the N x C
class probabilities (.npy). The defaults are classify.py's, for our CaffeNet: models/caffenet/deploy.prototxt,
the weights `kaffe zoo fetch caffenet` downloads, and ImageNet's per-channel mean (104, 117, 123 in BGR order,
where classify.py loads its ilsvrc_2012_mean.npy).
"""
import argparse
import glob
import os
import sys
import time

import numpy as np

from ..engine import caffe_io, device
from ..engine.errors import KaffeError
from ..proto import caffe_pb2
from . import zoo
from .convert_imageset import run

PROG = "classify"
DEFAULT_MODEL = "caffenet"
IMAGENET_MEAN_BGR = "104,117,123"


def default_weights():
    _, fields, _ = zoo.model_info(DEFAULT_MODEL)
    return zoo.weights_path(DEFAULT_MODEL, fields)


def read_mean(spec):
    """The mean for the Transformer: a .npy array (classify.py's form), a .binaryproto (compute_image_mean's; its
    1 x C x H x W becomes C x H x W), or comma-separated per-channel values."""
    if not spec:
        return None
    if spec.endswith(".npy"):
        return _load_npy(spec, "--mean_file")
    if spec.endswith(".binaryproto"):
        from ..engine.io import read_binary_proto
        mean = caffe_io.blobproto_to_array(read_binary_proto(spec, caffe_pb2.BlobProto()))
        return mean[0] if mean.ndim == 4 and mean.shape[0] == 1 else mean
    try:
        return np.array([float(v) for v in spec.split(",")])
    except ValueError:
        raise KaffeError(f"--mean_file {spec}: expected a .npy or .binaryproto file, or per-channel values such "
                         f"as {IMAGENET_MEAN_BGR}") from None


def _load_npy(path, what):
    try:
        return np.load(path)
    except FileNotFoundError:
        raise KaffeError(f"{what} {path}: no such file") from None
    except (OSError, ValueError) as e:
        raise KaffeError(f"{what} {path}: not a numpy .npy file ({e})") from None


def _int_list(text, flag):
    try:
        return [int(s) for s in text.split(",")]
    except ValueError:
        raise KaffeError(f"{flag} takes comma-separated integers, got '{text}'") from None


def load_inputs(input_file, ext):
    """The images of a .npy file, of a folder's *.ext files (sorted) or of one image file."""
    input_file = os.path.expanduser(input_file)
    if input_file.endswith("npy"):
        print(f"Loading file: {input_file}")
        return _load_npy(input_file, "input")
    if os.path.isdir(input_file):
        print(f"Loading folder: {input_file}")
        names = sorted(glob.glob(os.path.join(glob.escape(input_file), f"*.{ext}")))
        if not names:
            raise KaffeError(f"{input_file}: no *.{ext} images in the folder (--ext picks the extension)")
        return [caffe_io.load_image(name) for name in names]
    print(f"Loading file: {input_file}")
    return [caffe_io.load_image(input_file)]


def build_parser():
    parser = argparse.ArgumentParser(prog=PROG, description="Classify images with a trained net (Caffe's "
                                                            "python/classify.py); saves the class probabilities.")
    parser.add_argument("input_file", help="Input image, directory, or npy.")
    parser.add_argument("output_file", help="Output npy filename.")
    parser.add_argument("--model_def", default=os.path.join(zoo.MODELS, DEFAULT_MODEL, "deploy.prototxt"),
                        help="Model definition file (default: our CaffeNet deploy net).")
    parser.add_argument("--pretrained_model", default=None,
                        help="Trained model weights file (default: CaffeNet's weights from `kaffe zoo fetch "
                             "caffenet`).")
    parser.add_argument("--gpu", action="store_true", help="Switch for gpu computation.")
    parser.add_argument("--center_only", action="store_true",
                        help="Switch for prediction from center crop alone instead of averaging predictions "
                             "across crops (default).")
    parser.add_argument("--images_dim", default="256,256", help="Canonical 'height,width' dimensions of input "
                                                                "images.")
    parser.add_argument("--mean_file", default=IMAGENET_MEAN_BGR,
                        help="Data set image mean of [Channels x Height x Width] dimensions (a .npy array or a "
                             ".binaryproto), or per-channel values (default: ImageNet's, BGR). Set to '' for no "
                             "mean subtraction.")
    parser.add_argument("--input_scale", type=float,
                        help="Multiply input features by this scale to finish preprocessing.")
    parser.add_argument("--raw_scale", type=float, default=255.0,
                        help="Multiply raw input by this scale before preprocessing.")
    parser.add_argument("--channel_swap", default="2,1,0",
                        help="Order to permute input channels. The default converts RGB -> BGR since BGR is the "
                             "Caffe default by way of OpenCV.")
    parser.add_argument("--ext", default="jpg",
                        help="Image file extension to take as input when a directory is given as the input file.")
    return parser


def main(argv=None):
    from ..engine.classifier import Classifier
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    image_dims = _int_list(args.images_dim, "--images_dim")
    channel_swap = _int_list(args.channel_swap, "--channel_swap") if args.channel_swap else None
    mean = read_mean(args.mean_file)
    pretrained = args.pretrained_model or default_weights()
    if not os.path.exists(pretrained):
        hint = " (fetch them with `kaffe zoo fetch caffenet`)" if args.pretrained_model is None else ""
        raise KaffeError(f"--pretrained_model {pretrained}: no such file{hint}")
    if args.gpu:
        device.set_mode_gpu()
        print("GPU mode")
    else:
        device.set_mode_cpu()
        print("CPU mode")
    inputs = load_inputs(args.input_file, args.ext)  # before the net, so that a bad image fails at once
    classifier = Classifier(args.model_def, pretrained, image_dims=image_dims, mean=mean,
                            input_scale=args.input_scale, raw_scale=args.raw_scale, channel_swap=channel_swap)
    print(f"Classifying {len(inputs)} inputs.")
    start = time.time()
    predictions = classifier.predict(inputs, not args.center_only)
    print(f"Done in {time.time() - start:.2f} s.")
    print(f"Saving results into {args.output_file}")
    try:
        np.save(args.output_file, predictions)
    except OSError as e:
        raise KaffeError(f"cannot write {args.output_file}: {e.strerror or e}") from None
    return 0


if __name__ == "__main__":
    sys.exit(run(main, PROG))
