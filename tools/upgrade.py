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
from .progress import Progress, stream


def _upgrade_file(in_path, out_path, message, read, upgrade, write, kind, progress=None):
    """Read `in_path` into `message`, apply the upgrades loading it would apply, and write it to `out_path`
    (a bar of the three steps on a terminal `progress` stream: large weight files take a while)."""
    bar = Progress(3, f"Upgrading {in_path}", progress, unit="step", lines=False)
    param = read(in_path, message)
    bar.update()
    if not upgrade(param, source=in_path):
        logger.info(f"File already in latest proto format: {in_path}")
    bar.update()
    write(param, out_path)
    bar.update()
    logger.info(f"Wrote upgraded {message.DESCRIPTOR.name} {kind} proto to {out_path}")


def upgrade_net_text(in_path, out_path):
    _upgrade_file(in_path, out_path, caffe_pb2.NetParameter(), read_text_proto, upgrade_net_param,
                  write_text_proto, "text")


def upgrade_net_binary(in_path, out_path, progress=sys.stderr):
    _upgrade_file(in_path, out_path, caffe_pb2.NetParameter(), read_binary_proto, upgrade_net_param,
                  write_binary_proto, "binary", progress)


def upgrade_solver_text(in_path, out_path):
    _upgrade_file(in_path, out_path, caffe_pb2.SolverParameter(), read_text_proto, upgrade_solver_param,
                  write_text_proto, "text")


COMMANDS = {
    "upgrade_net_proto_text": (upgrade_net_text, "a net prototxt (V0/V1/legacy inputs) to the current format"),
    "upgrade_net_proto_binary": (upgrade_net_binary, "a binary .caffemodel (V0/V1 layers) to the current format"),
    "upgrade_solver_proto_text": (upgrade_solver_text, "a solver prototxt (solver_type enum) to the current format"),
}


def main(argv=None):
    """argv: [command, IN, OUT] with command one of COMMANDS. Returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    quiet = "--quiet" in argv
    argv = [a for a in argv if a != "--quiet"]
    if not argv or argv[0] not in COMMANDS or len(argv) != 3:
        usage = "\n".join(f"  kaffe {name} IN OUT [--quiet]   upgrade {what}"
                          for name, (_, what) in COMMANDS.items())
        print(f"usage:\n{usage}", file=sys.stderr)
        return 2
    command, in_path, out_path = argv
    try:
        if command == "upgrade_net_proto_binary":
            upgrade_net_binary(in_path, out_path, stream(quiet))
        else:
            COMMANDS[command][0](in_path, out_path)
    except KaffeError as e:
        print(f"kaffe {command}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    init_log()
    sys.exit(main())
