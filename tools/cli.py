"""`kaffe`: the command-line tool, with Caffe's commands and flags (`-solver x`, `--solver=x`, `--solver x`)."""
import argparse
import importlib
import os
import signal
import sys
import time

import numpy as np

from ..engine import device, opencl
from ..engine.bad_records import set_skip_bad_records
from ..engine.errors import KaffeError
from ..engine.log import init_log, logger
from ..proto import caffe_pb2
from .progress import Progress, stream

SIGNAL_EFFECTS = ("stop", "snapshot", "none")


def _flag(parser, name, **kwargs):
    """A flag accepted as -name, --name (with a space or '=')."""
    parser.add_argument(f"-{name}", f"--{name}", **kwargs)


def _add_common(parser, iterations=True):
    _flag(parser, "python-path", default="", help=f"folders ('{os.pathsep}'-separated) to import Python layer "
                                                  f"modules from, besides sys.path")
    _flag(parser, "gpu", default="", help="OpenCL device id(s): '0', '0,1' or 'all'; empty = CPU "
                                          "(unless the solver says solver_mode: GPU)")
    _flag(parser, "level", type=int, default=0, help="NetState level")
    _flag(parser, "stage", default="", help="comma-separated NetState stages")
    if iterations:
        _flag(parser, "iterations", type=int, default=50, help="number of iterations")


def _build_parser():
    parser = argparse.ArgumentParser(prog="kaffe", description="kaffe: Caffe's command-line tool, in Python.")
    commands = parser.add_subparsers(dest="command", metavar="command")

    train = commands.add_parser("train", help="train or fine-tune a model")
    _flag(train, "solver", default="", help="solver prototxt")
    _flag(train, "snapshot", default="", help=".solverstate to resume training from; 'auto': the newest complete "
                                              "snapshot of the solver's snapshot_prefix, or a fresh start")
    _flag(train, "snapshot_failure", default="stop", choices=("stop", "continue"),
          help="what a snapshot that cannot be written (full disk) does: stop, or warn and train on")
    _flag(train, "skip_bad_records", action="store_true",
          help="skip data records that do not decode (counted in the log) instead of stopping")
    _flag(train, "weights", default="", help="comma-separated .caffemodel files to fine-tune from")
    _flag(train, "sigint_effect", default="stop", choices=SIGNAL_EFFECTS, help="what Ctrl-C does")
    _flag(train, "sighup_effect", default="snapshot", choices=SIGNAL_EFFECTS, help="what SIGHUP does")
    _add_common(train, iterations=False)
    _flag(train, "iterations", type=int, default=None, help="override the solver's max_iter")
    _flag(train, "tensorboard", default="", metavar="DIR",
          help="write TensorBoard event files into DIR/<run> (default: $KAFFE_TENSORBOARD)")
    _flag(train, "debug_info", action="store_true",
          help="the solver's debug_info: per-layer mean |data| and |diff| at each display and test")

    test = commands.add_parser("test", help="score a model")
    _flag(test, "model", default="", help="net prototxt")
    _flag(test, "weights", default="", help="comma-separated .caffemodel files")
    _flag(test, "quiet", action="store_true", help="no progress bar on a terminal")
    _flag(test, "no-python-layers", action="store_true", help="refuse Python layers (for model files from strangers)")
    _flag(test, "no-optimize", action="store_true", help="run every layer as written (no deploy-time optimiser)")
    _add_common(test)

    timing = commands.add_parser("time", help="benchmark a model's execution time")
    _flag(timing, "model", default="", help="net prototxt")
    _flag(timing, "phase", default="TRAIN", choices=("TRAIN", "TEST"), help="net phase")
    _flag(timing, "no-python-layers", action="store_true", help="refuse Python layers (for model files from "
                                                                 "strangers)")
    _flag(timing, "no-optimize", action="store_true", help="--phase TEST: time every layer as written, backward "
                                                            "included (no deploy-time optimiser)")
    _flag(timing, "stats", action="store_true", help="--gpu: also log the OpenCL launches, transfers and waits "
                                                      "per iteration (as KAFFE_OPENCL_STATS=1)")
    _add_common(timing)

    query = commands.add_parser("device_query", help="show the OpenCL devices (all, or --gpu N)")
    _flag(query, "gpu", default="", help="device id to query; empty or 'all' = every device")
    _flag(query, "tune", action="store_true", help="measure the GEMM tile candidates of device --gpu (default 0) and "
                                                    "write its tuning cache under ~/.cache/kaffe/gemm_tuning")
    _flag(query, "tune-quick", action="store_true", help="--tune on small shapes (seconds; CPU devices always)")
    _flag(query, "tune-classes", default="", help="--tune only these shape classes, comma-separated (large, "
                                                   "medium, small_m, small_output; default all)")

    for name, (_, _, text) in TOOL_COMMANDS.items():
        commands.add_parser(name, help=text, add_help=False)
    return parser


def _gpus(flag):
    if not flag:
        return []
    if flag == "all":
        return list(range(len(opencl.devices())))
    try:
        return [int(g) for g in flag.split(",")]
    except ValueError:
        raise KaffeError(f"--gpu must be a device id, a comma-separated list or 'all', got '{flag}'") from None


def _select_mode(gpus):
    if not gpus:
        logger.info("Use CPU.")
        device.set_mode_cpu()
        return
    if len(gpus) > 1:
        logger.warning(f"kaffe trains on one device; using device {gpus[0]} of {gpus}")
    device.set_device(gpus[0])
    device.set_mode_gpu()


def _stages(flag):
    return [s for s in flag.split(",") if s]


def train(args):
    from ..solvers import distributed, get_solver, read_solver_param
    from ..solvers.snapshot_files import auto_resume
    if not args.solver:
        raise KaffeError("Need a solver definition to train (--solver).")
    if args.snapshot and args.snapshot != "auto" and args.weights:
        raise KaffeError("Give a snapshot to resume training or weights to finetune but not both.")
    param = read_solver_param(args.solver)
    if args.snapshot == "auto":   # --weights then apply only to a fresh start
        args.snapshot = auto_resume(param.snapshot_prefix) or ""
    param.train_state.level = args.level
    param.train_state.stage.extend(_stages(args.stage))
    if args.iterations is not None:
        param.max_iter = args.iterations
    gpu_flag = args.gpu
    if not gpu_flag and param.HasField("solver_mode") and param.solver_mode == caffe_pb2.SolverParameter.GPU:
        gpu_flag = str(param.device_id)
    _select_mode(distributed.rank_devices(_gpus(gpu_flag)))   # over MPI: the device of the node-local rank
    if args.snapshot:
        del param.weights[:]
    elif args.weights:
        del param.weights[:]
        param.weights.append(args.weights)
    if args.debug_info:
        param.debug_info = True
    set_skip_bad_records(args.skip_bad_records)
    solver = get_solver(param, tensorboard=args.tensorboard or None)
    solver.snapshot_failure = args.snapshot_failure
    # over `ulimit -f`, a write fails with EFBIG (a clear message, partial files removed) instead of a kill
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    restore_signals = solver.handle_signals(args.sigint_effect, args.sighup_effect)
    try:
        if args.snapshot:
            logger.info(f"Resuming from {args.snapshot}")
        with distributed.failures_stop_all():   # over MPI: a failure stops every rank, naming this one
            solver.solve(args.snapshot or None)
        logger.info("Optimization Done.")
    finally:
        restore_signals()
        solver.report.finish()   # also after Ctrl-C or an error


def test(args):
    from ..engine.net import Net
    if not args.model:
        raise KaffeError("Need a model definition to score (--model).")
    if not args.weights:
        raise KaffeError("Need model weights to score (--weights).")
    _select_mode(_gpus(args.gpu))
    net = Net(args.model, caffe_pb2.TEST, level=args.level, stages=_stages(args.stage),
              allow_python_layers=not args.no_python_layers, optimize="none" if args.no_optimize else "full")
    net.copy_from(args.weights)
    logger.info(f"Running for {args.iterations} iterations.")
    totals, loss = None, 0.0
    bar = Progress(args.iterations, "Scoring", stream(args.quiet), unit="batch", lines=False)
    for i in range(args.iterations):
        loss += net.forward_from_to(0, len(net.layers) - 1)
        values = [b.cpu_data().astype(np.float64).ravel() for b in net.output_blobs]
        for name, vals in zip(net.outputs, values):
            for v in vals:
                logger.info(f"Batch {i}, {name} = {format(v, '.6g')}")
        totals = values if totals is None else [t + v for t, v in zip(totals, values)]
        bar.update()
    logger.info(f"Loss: {format(loss / args.iterations, '.6g')}")
    for name, weight, total in zip(net.outputs, net.output_loss_weights, totals):
        for v in total / args.iterations:
            extra = f" (* {format(weight, '.6g')} = {format(weight * v, '.6g')} loss)" if weight else ""
            logger.info(f"{name} = {format(v, '.6g')}{extra}")


def time_model(args):
    from ..engine.net import Net
    if not args.model:
        raise KaffeError("Need a model definition to time (--model).")
    _select_mode(_gpus(args.gpu))
    phase = caffe_pb2.Phase.Value(args.phase)
    optimize = "full" if phase == caffe_pb2.TEST and not args.no_optimize else "none"
    net = Net(args.model, phase, level=args.level, stages=_stages(args.stage),
              allow_python_layers=not args.no_python_layers, optimize=optimize)
    logger.info("Performing Forward")
    loss = net.forward_from_to(0, len(net.layers) - 1)
    logger.info(f"Initial loss: {format(loss, '.6g')}")
    steps = net.forward_steps
    backward = optimize == "none"
    if backward:
        logger.info("Performing Backward")
        net.backward_from_to(len(net.layers) - 1, 0)
    else:
        logger.info("Backward not timed: the TEST net is optimised for inference (--no-optimize times it)")
    n = len(net.layers)
    forward_ms, backward_ms = np.zeros(n), np.zeros(n)
    forward_total = backward_total = 0.0
    logger.info("*** Benchmark begins ***")
    logger.info(f"Testing for {args.iterations} iterations.")
    clock = time.perf_counter
    stats = device.mode() == device.GPU and (args.stats or opencl.stats_enabled())
    opencl.reset_stats()
    total_start = clock()
    for j in range(args.iterations):
        iter_start = clock()
        for first, last, runner in steps:  # a folded chain's time is its first layer's
            t0 = clock()
            if runner is not None:
                runner.forward(net.bottom_vecs[first], net.top_vecs[last])
            device.synchronize()
            forward_ms[first] += (clock() - t0) * 1e3
        forward_total += (clock() - iter_start) * 1e3
        backward_start = clock()
        for i in range(n - 1, -1, -1) if backward else ():
            t0 = clock()
            net.layers[i].backward(net.top_vecs[i], net.bottom_need_backward[i], net.bottom_vecs[i])
            device.synchronize()
            backward_ms[i] += (clock() - t0) * 1e3
        backward_total += (clock() - backward_start) * 1e3
        logger.info(f"Iteration: {j + 1} forward-backward time: {(clock() - iter_start) * 1e3:.0f} ms.")
    total_ms = (clock() - total_start) * 1e3
    iters = args.iterations
    logger.info("Average time per layer: ")
    for i, name in enumerate(net.layer_names):
        logger.info(f"{name:>10}\tforward: {format(forward_ms[i] / iters, '.6g')} ms.")
        logger.info(f"{name:>10}\tbackward: {format(backward_ms[i] / iters, '.6g')} ms.")
    logger.info(f"Average Forward pass: {format(forward_total / iters, '.6g')} ms.")
    logger.info(f"Average Backward pass: {format(backward_total / iters, '.6g')} ms.")
    logger.info(f"Average Forward-Backward: {format(total_ms / iters, '.6g')} ms.")
    logger.info(f"Total Time: {format(total_ms, '.6g')} ms.")
    if stats:   # the timing itself waits for the device after every layer, as Caffe's timer does
        logger.info(opencl.stats_per_iteration(opencl.stats(), iters))
    logger.info("*** Benchmark ends ***")


def device_query(args):
    from . import device_query as query
    query.run(args.gpu, args.tune, args.tune_quick, args.tune_classes)


COMMANDS = {"train": train, "test": test, "time": time_model, "device_query": device_query}

# commands that are programs of their own under tools/ (each parses its own flags: `kaffe zoo --help`):
# name -> (module, arguments put before the user's, help)
TOOL_COMMANDS = {
    "data": ("data", [], "download and convert datasets: kaffe data mnist|cifar10 --help"),
    "convert_imageset": ("convert_imageset", [], "images listed in a file -> LMDB/LevelDB of Datums"),
    "compute_image_mean": ("compute_image_mean", [], "the mean image of a database, as a .binaryproto"),
    "upgrade_net_proto_text": ("upgrade", ["upgrade_net_proto_text"], "upgrade an old net prototxt"),
    "upgrade_net_proto_binary": ("upgrade", ["upgrade_net_proto_binary"], "upgrade an old binary net (weights)"),
    "upgrade_solver_proto_text": ("upgrade", ["upgrade_solver_proto_text"], "upgrade an old solver prototxt"),
    "zoo": ("zoo", [], "our model zoo: kaffe zoo list|show NAME|fetch NAME"),
    "draw_net": ("draw_net", [], "a net prototxt drawn as a graph: .svg, .png, .pdf or .dot"),
    "classify": ("classify", [], "classify images (a file, a folder or a .npy) -> .npy of probabilities "
                                 "(Caffe's python/classify.py)"),
    "extract_features": ("extract_features", [], "a trained net's blob features for its data -> LMDB/LevelDB of "
                                                 "Datums"),
    "parse_log": ("parse_log", [], "a training log -> LOG.train / LOG.test CSV tables (Caffe's parse_log.py)"),
    "plot": ("plot", [], "plot training logs (loss, lr or an output vs iterations or seconds) to PNG/SVG"),
    "import": ("import_model", [], "an ONNX model -> net prototxt + .caffemodel: kaffe import onnx --help"),
    "export": ("export_model", [], "a net (+ weights) -> an ONNX model: kaffe export onnx --help"),
    "run": ("run", [], "run an unchanged pycaffe script (import caffe) on kaffe: kaffe run SCRIPT.py [ARGS]"),
}


def run_tool(name, argv):
    module, prefix, _ = TOOL_COMMANDS[name]
    return importlib.import_module(f"{__package__}.{module}").main(prefix + argv) or 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    init_log()
    if argv and argv[0] in TOOL_COMMANDS:
        try:
            return run_tool(argv[0], argv[1:])
        except KaffeError as e:
            print(f"kaffe {argv[0]}: error: {e}", file=sys.stderr)
            return 1
    parser = _build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help(sys.stderr)
        return 2
    for folder in reversed(getattr(args, "python_path", "").split(os.pathsep)):
        if folder:
            sys.path.insert(0, os.path.abspath(folder))
    try:
        COMMANDS[args.command](args)
    except KaffeError as e:
        print(f"kaffe {args.command}: error: {e}", file=sys.stderr)
        return 1
    except MemoryError:   # set-up refuses what cannot fit; this is memory taken by others in the meantime
        print(f"kaffe {args.command}: error: out of memory (the machine's memory is taken by other programs or "
              f"by this one's earlier blobs)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"kaffe {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    # `python -m` puts the working directory first on sys.path; a model's folder must not provide Python layer
    # modules unless --python-path names it (the `kaffe` script has its own folder there instead)
    if sys.path and sys.path[0] in ("", os.getcwd()):
        del sys.path[0]
    sys.exit(main())
