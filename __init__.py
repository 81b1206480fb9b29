"""kaffe: a Caffe-compatible deep-learning engine in Python.

`import kaffe as caffe` runs ordinary pycaffe scripts: Net, get_solver, SGDSolver, set_mode_cpu/gpu, ...
pycaffe's submodules (`kaffe.io`, `kaffe.draw`, `kaffe.net_spec`, ...) are imported on first use;
`kaffe.install_as_caffe()` makes unchanged `import caffe` scripts run on kaffe.
"""
import importlib

from .engine.blob import Blob
from .engine.classifier import Classifier
from .engine.detector import Detector
from .engine.device import set_device, set_mode_cpu, set_mode_gpu, set_random_seed
from .engine.errors import KaffeError
from .engine.layer import Layer, layer_type_list
from .engine.net import Net
from .engine.net_spec import NetSpec, params, to_proto
from .engine.pycaffe import Timer, init_log, log
from .engine.pycaffe_modules import SUBMODULES as _PYCAFFE_SUBMODULES, install_as_caffe, install_submodules
from .proto import caffe_pb2
from .solvers import AdaDeltaSolver, AdaGradSolver, AdamSolver, NesterovSolver, RMSPropSolver, SGDSolver, get_solver
from .solvers.distributed import (NCCL, has_nccl, set_multiprocess, set_solver_count, set_solver_rank, solver_count,
                                  solver_rank)

__version__ = "1.0.0"

TRAIN = caffe_pb2.TRAIN
TEST = caffe_pb2.TEST

init_log()
install_submodules()


def __getattr__(name):
    if name in _PYCAFFE_SUBMODULES or name == "layers":  # layers: also pycaffe's `caffe.layers`
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'kaffe' has no attribute '{name}'")
