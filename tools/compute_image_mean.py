"""compute_image_mean: the mean image of an LMDB or LevelDB of Datums, as a BlobProto, as Caffe's tool.

    compute_image_mean [--backend lmdb|leveldb] INPUT_DB [OUTPUT_FILE]

The mean is 1 x C x H x W (the legacy num/channels/height/width fields, as Caffe writes it), usable as
transform_param.mean_file; the per-channel means (for mean_value) are logged. Encoded records are decoded
as they are stored (gray stays gray).
"""
import argparse
import sys

import numpy as np

from ..engine.errors import KaffeError
from ..engine.io import write_binary_proto
from ..engine.log import logger
from ..layers.data import Database, parse_datum
from ..layers.transform import DataTransformer
from ..proto import caffe_pb2
from .convert_imageset import gflags_argv, run
from .progress import Progress, add_quiet_flag, stream

PROG = "compute_image_mean"


def compute_image_mean(db_path, backend="lmdb", output=None, progress=sys.stderr):
    """The mean of every record of the database (C x H x W float32); written to `output` when given."""
    owner = PROG
    decoder = DataTransformer(caffe_pb2.TransformationParameter(), caffe_pb2.TEST, owner)
    db = Database(db_path, backend, owner)
    try:
        bar = Progress(db.count(), f"Averaging {db_path}", progress)
        total, first, count = None, None, 0
        for key, value in db.records():
            pixels = decoder.datum_array(parse_datum(value, key, owner), f" {key!r}")
            if total is None:
                total, first = np.zeros(pixels.shape, dtype=np.float64), (key, pixels.shape)
            elif pixels.shape != total.shape:
                raise KaffeError(f"{owner}: the record with key {key!r} is {' x '.join(map(str, pixels.shape))} but "
                                 f"the first record ({first[0]!r}) is {' x '.join(map(str, first[1]))}; all records "
                                 f"must have one size")
            total += pixels
            count += 1
            bar.update()
            if count % 10000 == 0:
                logger.info(f"Processed {count} files.")
    finally:
        db.close()
    if not count:
        raise KaffeError(f"{owner}: {db_path} is empty: there are no records to average")
    if count % 10000:
        logger.info(f"Processed {count} files.")
    mean = (total / count).astype(np.float32)
    channels, height, width = mean.shape
    if output:
        logger.info(f"Write to {output}")
        proto = caffe_pb2.BlobProto(num=1, channels=channels, height=height, width=width)
        proto.data.extend(mean.ravel().tolist())
        write_binary_proto(proto, output)
    logger.info(f"Number of channels: {channels}")
    for c, value in enumerate(mean.reshape(channels, -1).mean(axis=1, dtype=np.float64)):
        logger.info(f"mean_value channel [{c}]: {value:g}")
    return mean


def build_parser():
    parser = argparse.ArgumentParser(
        prog=PROG, usage=f"{PROG} [--backend lmdb|leveldb] INPUT_DB [OUTPUT_FILE]",
        description="Compute the mean image of a database of Datums and save it as a binaryproto (for "
                    "transform_param.mean_file); the per-channel means (for mean_value) are logged.")
    parser.add_argument("--backend", default="lmdb", choices=("lmdb", "leveldb"),
                        help="the input database's format (default: lmdb)")
    add_quiet_flag(parser)
    parser.add_argument("db", metavar="INPUT_DB", help="the LMDB or LevelDB directory")
    parser.add_argument("output", metavar="OUTPUT_FILE", nargs="?",
                        help="where to write the mean BlobProto (e.g. mean.binaryproto); omitted: only log it")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(gflags_argv(sys.argv[1:] if argv is None else argv, parser))
    mean = compute_image_mean(args.db, args.backend, args.output, progress=stream(args.quiet))
    per_channel = mean.reshape(mean.shape[0], -1).mean(axis=1, dtype=np.float64)
    print("mean_value per channel: " + " ".join(f"{v:g}" for v in per_channel))
    return 0


def cli():
    """The program's entry point (a console script): errors as one line and an exit status."""
    return run(main, PROG)


if __name__ == "__main__":
    sys.exit(cli())
