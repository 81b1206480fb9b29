"""extract_features: the features a trained net computes for its input data, saved as Datums, as Caffe's tool.

    extract_features WEIGHTS NET BLOB1[,BLOB2...] DB1[,DB2...] NUM_BATCHES [--backend lmdb|leveldb]

The net (TEST phase) reads its data layer NUM_BATCHES times; after each forward pass every item of each named
blob becomes one Datum in that blob's new database: float_data holds the item's values, channels/height/width
the blob's legacy shape, keys are the item's index as 10 digits ("0000000000"), committed every 1000 records.
Caffe's own spelling works too: `... NUM_BATCHES lmdb [CPU|GPU] [DEVICE_ID]`.
"""
import argparse
import contextlib
import sys

from ..engine import device
from ..engine.errors import KaffeError
from ..engine.log import logger
from ..engine.net import Net
from ..proto import caffe_pb2
from .convert_imageset import run
from .data import DatumWriter
from .progress import Progress, add_quiet_flag, stream

PROG = "extract_features"
COMMIT_EVERY = 1000  # records per transaction, and how often progress is logged (Caffe's)


def extract_features(weights, net_path, blob_names, db_names, num_batches, backend="lmdb", progress=sys.stderr):
    """Run the net num_batches times and write each blob's items into its new database; returns the record
    counts. A failure leaves no database behind (each is built under NAME.partial)."""
    if len(blob_names) != len(db_names):
        raise KaffeError(f"the number of blob names ({len(blob_names)}) and dataset names ({len(db_names)}) "
                         f"must be equal")
    net = Net(net_path, caffe_pb2.TEST)
    net.copy_from(weights)
    for name in blob_names:
        if name not in net.blobs:
            raise KaffeError(f"Unknown feature blob name {name} in the network {net_path}")
    with contextlib.ExitStack() as stack:
        writers = []
        for db_name in db_names:
            logger.info(f"Opening dataset {db_name}")
            writers.append(stack.enter_context(DatumWriter(db_name, backend, commit_every=COMMIT_EVERY)))
        logger.error("Extracting Features")
        bar = Progress(num_batches, "Extracting features", progress, unit="batch", lines=False)
        for _ in range(num_batches):
            net.forward()
            for name, writer in zip(blob_names, writers):
                _write_items(net.blobs[name], name, writer)
            bar.update()
        for name, writer in zip(blob_names, writers):
            logger.error(f"Extracted features of {writer.count} query images for feature blob {name}")
    logger.error("Successfully extracted the features!")
    return [writer.count for writer in writers]


def _write_items(blob, name, writer):
    """One Datum per item of the blob: its values as float_data, the blob's legacy C x H x W, key %010d."""
    for features in blob.data.reshape(blob.num, -1):
        datum = caffe_pb2.Datum(channels=blob.channels, height=blob.height, width=blob.width,
                                float_data=features.tolist())
        writer.put(b"%010d" % writer.count, datum.SerializeToString())
        if writer.count % COMMIT_EVERY == 0:
            logger.error(f"Extracted features of {writer.count} query images for feature blob {name}")


def build_parser():
    parser = argparse.ArgumentParser(
        prog=PROG, usage=f"{PROG} WEIGHTS NET BLOB1[,BLOB2...] DB1[,DB2...] NUM_BATCHES [--backend lmdb|leveldb]",
        description="Run a trained net over its data layer and save the features of the named blobs, one Datum "
                    "per item, into new databases (one per blob).")
    parser.add_argument("weights", metavar="WEIGHTS", help="the trained .caffemodel")
    parser.add_argument("net", metavar="NET", help="the net prototxt (TEST phase), whose data layer feeds it")
    parser.add_argument("blobs", metavar="BLOB1[,BLOB2...]", help="the blobs to save, comma-separated")
    parser.add_argument("dbs", metavar="DB1[,DB2...]", help="a new database for each blob, comma-separated")
    parser.add_argument("num_batches", metavar="NUM_BATCHES", type=int, help="how many forward passes to run")
    parser.add_argument("caffe_args", metavar="DB_TYPE [CPU|GPU] [DEVICE_ID]", nargs="*",
                        help="Caffe's positional spelling of the backend and the device")
    parser.add_argument("--backend", choices=("lmdb", "leveldb"), help="the databases' format (default: lmdb)")
    add_quiet_flag(parser)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    extra = args.caffe_args
    if len(extra) > 3 or (extra and extra[0] not in ("lmdb", "leveldb")) or extra[1:2] not in ([], ["CPU"], ["GPU"]):
        parser.error(f"expected DB_TYPE (lmdb or leveldb) [CPU|GPU] [DEVICE_ID] after NUM_BATCHES, got "
                     f"{' '.join(extra)}")
    db_type, mode, device_id = extra + [None, "CPU", "0"][len(extra):]
    if db_type and args.backend and db_type != args.backend:
        parser.error(f"DB_TYPE {db_type} contradicts --backend {args.backend}")
    if mode == "GPU":
        logger.error("Using GPU")
        if not device_id.isdigit():
            parser.error(f"DEVICE_ID must be a number >= 0, got {device_id}")
        logger.error(f"Using Device_id={device_id}")
        device.set_device(int(device_id))
        device.set_mode_gpu()
    else:
        logger.error("Using CPU")
        device.set_mode_cpu()
    extract_features(args.weights, args.net, args.blobs.split(","), args.dbs.split(","), args.num_batches,
                     db_type or args.backend or "lmdb", stream(args.quiet))
    return 0


if __name__ == "__main__":
    sys.exit(run(main, PROG))
