"""convert_imageset: the images of a `path label` list -> a new LMDB or LevelDB of Datums, as Caffe's tool.

    convert_imageset [FLAGS] ROOTFOLDER/ LISTFILE DB_NAME

Each image is read as Caffe's OpenCV does (3-channel BGR, or gray with --gray), optionally resized (bilinear),
and stored raw (C x H x W uint8) or, with --encoded, as a PNG/JPEG file; keys are "%08d_<listed path>" in
list order (after --shuffle), committed every 1000 images. ROOTFOLDER is prepended to each listed path as
is, so it normally ends with a slash. Caffe's gflags spellings (-gray, --gray=true, -backend leveldb) work too.
"""
import argparse
import io
import os
import sys

import numpy as np

from ..engine.errors import KaffeError
from ..engine.log import init_log, logger
from ..layers.data import read_image_list
from ..layers.transform import array_to_datum, encode_image, image_to_chw, open_image, resize_bilinear
from ..proto import caffe_pb2
from .data import DatumWriter
from .progress import Progress, add_quiet_flag, stream

PROG = "convert_imageset"


# -- command lines in Caffe's gflags style -------------------------------------------------------------------
_TRUE, _FALSE = ("true", "1", "yes", "t", "y"), ("false", "0", "no", "f", "n")


def gflags_argv(argv, parser):
    """Caffe's tools take gflags: -flag, --flag=value, --flag=true|false and --noflag for booleans. Rewrite them
    into the argparse forms (--flag value; a boolean flag present or absent, all of them default to false)."""
    booleans = {a.option_strings[0][2:] for a in parser._actions if a.option_strings and a.nargs == 0}
    out = []
    for arg in argv:
        if arg.startswith("-") and not arg.startswith("--") and len(arg) > 2 and arg[1].isalpha():
            arg = "-" + arg  # -backend=lmdb -> --backend=lmdb
        if arg.startswith("--"):
            name, equals, value = arg[2:].partition("=")
            if name in booleans and equals:
                if value.lower() not in _TRUE + _FALSE:
                    parser.error(f"--{name} takes true or false, got '{value}'")
                if value.lower() in _FALSE:
                    continue
                arg = f"--{name}"
            elif name.startswith("no") and name[2:] in booleans and not equals:
                continue
        out.append(arg)
    return out


def run(main, prog, argv=None):
    """Run a tool's main(argv) as a program: glog-style log on stderr, a KaffeError as one line, exit status."""
    init_log()
    try:
        return main(sys.argv[1:] if argv is None else argv)
    except KaffeError as e:
        message = str(e)
        print(message if message.startswith(f"{prog}:") else f"{prog}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


# -- the conversion ---------------------------------------------------------------------------------------------
def _extension(name):
    return name.rsplit(".", 1)[1].lower() if "." in os.path.basename(name) else ""


def _same_encoding(name, encoding):
    """Whether the file is already in `encoding` (Caffe then stores the file's own bytes)."""
    ext, encoding = _extension(name), encoding.lower()
    return ext == encoding or (encoding == "jpg" and ext == "jpeg")


def convert_imageset(root, list_file, db_path, gray=False, shuffle=False, backend="lmdb", resize_height=0,
                     resize_width=0, check_size=False, encoded=False, encode_type="", progress=sys.stderr):
    """Write the listed images into a new database at db_path; returns the number of images written."""
    owner = PROG
    if resize_height < 0 or resize_width < 0:
        raise KaffeError(f"{owner}: --resize_height and --resize_width must be >= 0")
    entries = read_image_list(list_file, owner)
    if shuffle:
        logger.info("Shuffling data")
        entries = [entries[i] for i in np.random.default_rng().permutation(len(entries))]
    logger.info(f"A total of {len(entries)} images.")
    if encode_type and not encoded:
        logger.info("encode_type specified, assuming encoded=true.")
        encoded = True
    resize = resize_height > 0 and resize_width > 0
    first_shape = None
    bar = Progress(len(entries), f"Converting {list_file}", progress)
    with DatumWriter(db_path, backend) as db:
        for index, (name, label, number) in enumerate(entries):
            path = root + name  # as in Caffe: the root folder is a prefix, not joined with a separator
            where = f"{path} ({list_file}:{number})"
            try:
                with open(path, "rb") as f:
                    payload = f.read()
                pixels = image_to_chw(open_image(io.BytesIO(payload), gray=gray), "L" if gray else "RGB")
            except OSError as e:
                raise KaffeError(f"{owner}: could not read image {where}: {e.strerror or e}") from None
            if resize:
                pixels = resize_bilinear(pixels, resize_height, resize_width)
            if check_size:
                if first_shape is None:
                    first_shape = pixels.shape
                elif pixels.shape != first_shape:
                    raise KaffeError(f"{owner}: image {where} is {' x '.join(map(str, pixels.shape))} but the first "
                                     f"image is {' x '.join(map(str, first_shape))} (--check_size); resize them "
                                     f"with --resize_height and --resize_width")
            if encoded:
                encoding = encode_type or _extension(name)
                if not encoding:
                    raise KaffeError(f"{owner}: cannot guess the encoding of {where} from its name; give "
                                     f"--encode_type png or jpg")
                data = payload if not resize and _same_encoding(name, encoding) else encode_image(pixels, encoding)
                datum = caffe_pb2.Datum(data=data, label=label, encoded=True)
            else:
                datum = array_to_datum(pixels, label)
            db.put(b"%08d_" % index + name.encode(), datum.SerializeToString())
            bar.update()
            if db.count % 1000 == 0:
                logger.info(f"Processed {db.count} files.")
    if len(entries) % 1000:
        logger.info(f"Processed {len(entries)} files.")
    return len(entries)


def build_parser():
    parser = argparse.ArgumentParser(
        prog=PROG, usage=f"{PROG} [FLAGS] ROOTFOLDER/ LISTFILE DB_NAME",
        description="Convert a set of images to an LMDB or LevelDB of Datums, the input of a Data layer. LISTFILE "
                    "has one `subfolder/file.jpg label` line per image (the label follows the last space); "
                    "ROOTFOLDER is prepended to each path as is.")
    parser.add_argument("--gray", action="store_true",
                        help="read the images as grayscale (1 channel) instead of BGR color")
    parser.add_argument("--shuffle", action="store_true", help="store the images in a random order")
    parser.add_argument("--backend", default="lmdb", choices=("lmdb", "leveldb"),
                        help="database format (default: lmdb)")
    parser.add_argument("--resize_width", type=int, default=0, metavar="W",
                        help="resize the images to this width (bilinear; with --resize_height; default 0: keep)")
    parser.add_argument("--resize_height", type=int, default=0, metavar="H",
                        help="resize the images to this height (bilinear; with --resize_width; default 0: keep)")
    parser.add_argument("--check_size", action="store_true",
                        help="stop at the first image whose size differs from the first image's")
    parser.add_argument("--encoded", action="store_true",
                        help="store the images as encoded files (PNG/JPEG) rather than raw pixels")
    parser.add_argument("--encode_type", default="", metavar="png|jpg",
                        help="the encoding for --encoded (implies it); default: each file's own format")
    add_quiet_flag(parser)
    parser.add_argument("root", metavar="ROOTFOLDER/", help="the folder the listed paths are relative to")
    parser.add_argument("list_file", metavar="LISTFILE", help="the `path label` list")
    parser.add_argument("db", metavar="DB_NAME", help="the database to create (it must not exist)")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(gflags_argv(sys.argv[1:] if argv is None else argv, parser))
    count = convert_imageset(args.root, args.list_file, args.db, gray=args.gray, shuffle=args.shuffle,
                             backend=args.backend, resize_height=args.resize_height,
                             resize_width=args.resize_width, check_size=args.check_size, encoded=args.encoded,
                             encode_type=args.encode_type, progress=stream(args.quiet))
    print(f"Wrote {count} images to {args.db}")
    return 0


def cli():
    """The program's entry point (a console script): errors as one line and an exit status."""
    return run(main, PROG)


if __name__ == "__main__":
    sys.exit(cli())
