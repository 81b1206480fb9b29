"""`kaffe upgrade_net_proto_text|upgrade_net_proto_binary|upgrade_solver_proto_text IN OUT`: Caffe's upgrade tools.

Each reads a file of any format generation, applies the upgrades that loading it would apply, and writes the
current format, so that the upgrade happens once instead of on every load.
"""
import sys

from ..engine.errors import KaffeError
from ..engine.io import read_binary_proto, read_text_proto, write_binary_proto, write_text_proto
from ..engine.log import init_log, logger
from ..engine.upgrade import upgrade_net_param, upgrade_solver_param
from ..proto import caffe_pb2


def upgrade_net_text(in_path, out_path):
    param = read_text_proto(in_path, caffe_pb2.NetParameter())
    if not upgrade_net_param(param, source=in_path):
        logger.info(f"File already in latest proto format: {in_path}")
    write_text_proto(param, out_path)
    logger.info(f"Wrote upgraded NetParameter text proto to {out_path}")


def upgrade_net_binary(in_path, out_path):
    param = read_binary_proto(in_path, caffe_pb2.NetParameter())
    if not upgrade_net_param(param, source=in_path):
        logger.info(f"File already in latest proto format: {in_path}")
    write_binary_proto(param, out_path)
    logger.info(f"Wrote upgraded NetParameter binary proto to {out_path}")


def upgrade_solver_text(in_path, out_path):
    param = read_text_proto(in_path, caffe_pb2.SolverParameter())
    if not upgrade_solver_param(param, source=in_path):
        logger.info(f"File already in latest proto format: {in_path}")
    write_text_proto(param, out_path)
    logger.info(f"Wrote upgraded SolverParameter text proto to {out_path}")


COMMANDS = {
    "upgrade_net_proto_text": (upgrade_net_text, "a net prototxt (V0/V1/legacy inputs) to the current format"),
    "upgrade_net_proto_binary": (upgrade_net_binary, "a binary .caffemodel (V0/V1 layers) to the current format"),
    "upgrade_solver_proto_text": (upgrade_solver_text, "a solver prototxt (solver_type enum) to the current format"),
}


def main(argv=None):
    """argv: [command, IN, OUT] with command one of COMMANDS. Returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS or len(argv) != 3:
        usage = "\n".join(f"  kaffe {name} IN OUT    upgrade {what}" for name, (_, what) in COMMANDS.items())
        print(f"usage:\n{usage}", file=sys.stderr)
        return 2
    command, in_path, out_path = argv
    try:
        COMMANDS[command][0](in_path, out_path)
    except KaffeError as e:
        print(f"kaffe {command}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    init_log()
    sys.exit(main())
