"""kaffe: a Caffe-compatible deep-learning engine in Python.

`import kaffe as caffe` runs ordinary pycaffe scripts: Net, get_solver, SGDSolver, set_mode_cpu/gpu, ...
"""
from .engine.blob import Blob
from .engine.device import set_device, set_mode_cpu, set_mode_gpu, set_random_seed
from .engine.errors import KaffeError
from .engine.layer import Layer, layer_type_list
from .engine.log import init_log
from .engine.net import Net
from .proto import caffe_pb2
from .solvers import AdaDeltaSolver, AdaGradSolver, AdamSolver, NesterovSolver, RMSPropSolver, SGDSolver, get_solver

__version__ = "1.0.0"

TRAIN = caffe_pb2.TRAIN
TEST = caffe_pb2.TEST

init_log()
