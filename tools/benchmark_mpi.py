"""Data-parallel scaling over MPI: LeNet training images/s with 1 and 2 ranks, and how much of the gradient
reduction the overlap with backward hides; then what K = 8 and 64 nodes would give for ResNet-50.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python -m kaffe.tools.benchmark_mpi \\
        [--source data/mnist/mnist_train_lmdb] [--batch 64] [--iterations 300] [--repeats 3]

Every rank trains with batch --batch (Caffe's multi-GPU: each device its own batch) and one BLAS thread,
reading the LMDB of `kaffe data mnist`. The three runs (1 rank; 2 ranks; 2 ranks reducing only after backward)
take turns for --repeats rounds and the medians are reported, so a slow spell of a shared machine does not
decide the ratio. Exposed reduction time: the wait for the gradients after backward, per iteration.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from ..engine.errors import KaffeError

RESULT_TAG = "BENCHMARK_RESULT "
LENET = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "lenet",
                     "lenet_train_test.prototxt")
LENET_DEPLOY = os.path.join(os.path.dirname(LENET), "lenet_deploy.prototxt")
RESNET50 = os.path.join(os.path.dirname(LENET), "..", "resnet50", "deploy.prototxt")
RUNS = (("1 rank", 1, "on"), ("2 ranks", 2, "on"), ("2 ranks, reduction after backward", 2, "off"))


def lenet_solver(source, batch):
    """Caffe's LeNet solver on LeNet's TRAIN net, reading `source` with `batch` images per rank; no tests."""
    from ..engine.net import read_net_param
    from ..proto import caffe_pb2
    net = read_net_param(LENET)
    for layer in net.layer:
        if layer.type == "Data":
            layer.data_param.source = source
            layer.data_param.batch_size = batch
    param = caffe_pb2.SolverParameter(base_lr=0.01, momentum=0.9, weight_decay=0.0005, lr_policy="inv",
                                      gamma=0.0001, power=0.75, max_iter=10 ** 9, random_seed=1)
    param.train_net_param.CopyFrom(net)
    return param


def worker(args):
    """One rank of a run (started by mpiexec): times --iterations steps after --warmup; rank 0 prints."""
    from ..solvers import distributed, get_solver
    solver = get_solver(lenet_solver(args.source, args.batch))
    trainer = solver.data_parallel
    if trainer:
        trainer.overlap = args.overlap == "on"
    world = distributed.join()
    solver.step(args.warmup)
    if world:
        world.comm.Barrier()
    exposed = trainer.exposed_s if trainer else 0.0
    start = time.perf_counter()
    solver.step(args.iterations)
    if world:
        world.comm.Barrier()
    elapsed = time.perf_counter() - start
    result = {"images_per_s": distributed.solver_count() * args.batch * args.iterations / elapsed,
              "exposed_ms": ((trainer.exposed_s if trainer else 0.0) - exposed) / args.iterations * 1e3,
              "allreduce_ms": allreduce_ms(trainer, world) if trainer else 0.0}
    if distributed.root_solver():
        print(RESULT_TAG + json.dumps(result), flush=True)


def allreduce_ms(trainer, world, repeats=20):
    """The reduction of all gradient buckets alone, the ranks started together (no waiting for a slower one)."""
    times = []
    for _ in range(repeats):
        world.comm.Barrier()
        start = time.perf_counter()
        for bucket in trainer.buckets:
            bucket.start(world)
        world.wait([b.request for b in trainer.buckets], "timing the reduction")
        times.append(time.perf_counter() - start)
        for bucket in trainer.buckets:
            bucket.request = None
    return statistics.median(times) * 1e3


def run(ranks, overlap, args):
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    for var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):   # forced older OpenBLAS kernels run at half speed
        env.pop(var, None)
    command = ["mpiexec", "-n", str(ranks), sys.executable, "-m", "kaffe.tools.benchmark_mpi", "--worker",
               "--overlap", overlap, "--source", args.source, "--batch", str(args.batch),
               "--iterations", str(args.iterations), "--warmup", str(args.warmup)]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    lines = [line for line in result.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if result.returncode or not lines:
        raise KaffeError(f"the {ranks}-rank run failed: {(result.stderr or result.stdout).strip()[-2000:]}")
    return json.loads(lines[0][len(RESULT_TAG):])


def net_cost(path):
    """(learnable parameters, forward multiply-adds x 2 per image) of a deploy net, from its layer shapes."""
    from ..engine.net import Net
    from ..proto import caffe_pb2
    net = Net(path, caffe_pb2.TEST)
    flops = 0
    for layer, tops in zip(net.layers, net.top_vecs):
        if layer.type in ("Convolution", "InnerProduct") and layer.blobs:
            positions = tops[0].count // tops[0].shape[0] // tops[0].shape[1]   # output positions per channel
            flops += 2 * layer.blobs[0].count * positions
    return sum(b.count for b in net.learnable_params), flops


def resnet50_model(node_tflops, node_batch, core_gflops):
    """Ring allreduce (each rank sends and receives 2 (K - 1) / K of the gradient bytes) against the compute
    time of one step (forward + backward = 3 x forward FLOPs) at node_tflops, for K = 8 and 64 nodes; and
    a node of 32 cores at the GFLOP/s kaffe reached here per core."""
    params, flops = net_cost(RESNET50)
    gradient_bytes = 4 * params
    compute_s = 3 * flops * node_batch / (node_tflops * 1e12)
    print(f"ResNet-50: {params / 1e6:.1f} M parameters = {gradient_bytes / 1e6:.1f} MB of float32 gradients, "
          f"{flops / 1e9:.2f} GFLOP per image forward; a step of batch {node_batch} per node at "
          f"{node_tflops:g} TFLOP/s takes {compute_s * 1e3:.0f} ms (backward about 2/3 of it)")
    for nodes in (8, 64):
        for gbits in (25, 100):
            allreduce_s = 2 * (nodes - 1) / nodes * gradient_bytes / (gbits * 1e9 / 8)
            hidden = min(allreduce_s, 2 / 3 * compute_s)   # at best the whole backward hides it
            print(f"  K = {nodes:2d}, {gbits:3d} Gbit/s: allreduce {allreduce_s * 1e3:5.0f} ms; step "
                  f"{(compute_s + allreduce_s) * 1e3:5.0f} ms without overlap ({compute_s / (compute_s + allreduce_s):.0%}"
                  f" efficiency), {(compute_s + allreduce_s - hidden) * 1e3:5.0f} ms with full overlap "
                  f"({compute_s / (compute_s + allreduce_s - hidden):.0%}); {nodes * node_batch} images per step")
    cpu_s = 3 * flops * node_batch / (32 * core_gflops * 1e9)
    print(f"  a CPU node of 32 cores at kaffe's {core_gflops:.1f} GFLOP/s per core: {cpu_s:.1f} s per step, so the "
          f"allreduce is {2 * gradient_bytes / (25e9 / 8) / cpu_s:.0%} of it at 25 Gbit/s")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m kaffe.tools.benchmark_mpi", description=__doc__.split("\n")[0])
    parser.add_argument("--source", default=os.path.join("data", "mnist", "mnist_train_lmdb"))
    parser.add_argument("--batch", type=int, default=64, help="images per rank and step")
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--node_tflops", type=float, default=7.0, help="ResNet-50 model: sustained TFLOP/s per node")
    parser.add_argument("--node_batch", type=int, default=32, help="ResNet-50 model: images per node and step")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--overlap", default="on", choices=("on", "off"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    from ..engine.log import logger
    logger.setLevel("WARNING")   # the nets' set-up logs
    if args.worker:
        return worker(args)
    if not os.path.isdir(args.source):
        raise KaffeError(f"{args.source} not found: make it with `kaffe data mnist` (or give --source)")
    results = {name: [] for name, _, _ in RUNS}
    for round_ in range(args.repeats):
        for name, ranks, overlap in RUNS:
            results[name].append(run(ranks, overlap, args))
            print(f"round {round_ + 1}: {name}: {results[name][-1]['images_per_s']:.0f} images/s", flush=True)
    median = {name: {key: statistics.median(r[key] for r in runs) for key in runs[0]} for name, runs in results.items()}
    one, two, blocking = (median[name] for name, _, _ in RUNS)
    print(f"LeNet, batch {args.batch} per rank, 1 BLAS thread per rank, {args.iterations} iterations, medians of "
          f"{args.repeats} alternating rounds:")
    print(f"  1 rank : {one['images_per_s']:7.0f} images/s")
    print(f"  2 ranks: {two['images_per_s']:7.0f} images/s = {two['images_per_s'] / one['images_per_s']:.2f}x")
    hidden = 1 - two["exposed_ms"] / blocking["exposed_ms"] if blocking["exposed_ms"] else 0.0
    print(f"  allreduce of the gradients alone: {two['allreduce_ms']:.2f} ms (ranks started together); wait after backward per "
          f"iteration (the allreduce and any lag of the other rank): {blocking['exposed_ms']:.2f} ms when it starts "
          f"after backward ({blocking['images_per_s']:.0f} images/s), {two['exposed_ms']:.2f} ms when buckets start "
          f"as layers finish backward: {hidden:.0%} of it hidden by the overlap")
    core_gflops = 3 * net_cost(LENET_DEPLOY)[1] * one["images_per_s"] / 1e9
    print(f"  kaffe's LeNet training on one core: {core_gflops:.1f} GFLOP/s")
    resnet50_model(args.node_tflops, args.node_batch, core_gflops)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KaffeError as e:
        print(f"benchmark_mpi: error: {e}", file=sys.stderr)
        sys.exit(1)
