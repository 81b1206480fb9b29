"""`type: "Python"`: a layer written by the user in Python, as pycaffe's Python layer.

python_param names the module and the class in it. The module is imported by its dotted name from sys.path only
(PYTHONPATH, `kaffe ... --python-path DIR`), never from the model file's folder, and `Net(...,
allow_python_layers=False)` (`kaffe test/time --no-python-layers`) refuses Python layers: loading a model runs no
other code. The class subclasses
kaffe.Layer (caffe.Layer under `import kaffe as caffe`) and defines pycaffe's methods:
setup(bottom, top), reshape(bottom, top), forward(bottom, top), backward(top, propagate_down, bottom).
It is instantiated with the LayerParameter; before setup it gets `param_str` and `phase`, and `blobs`, a list
with pycaffe's `add_blob(*shape)` for parameter blobs.

The net holds a PythonLayer that drives the user's object: the user's class overrides the names of kaffe's
driver methods (setup, forward, backward), so the object itself cannot be the net's layer. Errors raised in the
user's code become KaffeErrors naming the layer, the module and class, and the user's file and line.
There is no OpenCL path (nor a GPU one in Caffe): in GPU mode the user's methods run on the host.
"""
import importlib
import os
import traceback

from ..engine.blob import Blob
from ..engine.errors import KaffeError, error_like
from ..engine.layer import Layer, register_layer

PYCAFFE_METHODS = ("setup", "reshape", "forward", "backward")


class BlobVec(list):
    """A layer's parameter blobs as pycaffe shows them: a list that can add_blob(*shape) (zero-filled)."""

    def add_blob(self, *shape):
        self.append(Blob(*shape))


@register_layer("Python")
class PythonLayer(Layer):

    def __init__(self, param):
        super().__init__(param)
        p = param.python_param
        self.module_name, self.class_name = p.module, p.layer
        self.stored_blobs = list(self.blobs)  # weights that came with the LayerParameter, set after setup
        self.blobs = BlobVec()
        if not self.module_name or not self.class_name:
            raise KaffeError(f"Python layer '{self.name}': python_param needs both `module` and `layer` "
                             f"(got module '{self.module_name}', layer '{self.class_name}')")
        user_class = getattr(self._import(), self.class_name, None)
        if user_class is None:
            raise KaffeError(f"Python layer '{self.name}': module '{self.module_name}' has no class "
                             f"'{self.class_name}'")
        if not (isinstance(user_class, type) and issubclass(user_class, Layer)):
            raise KaffeError(f"Python layer '{self.name}': {self._where()} must be a class deriving from "
                             f"kaffe.Layer (caffe.Layer)")
        self.user = self._call("__init__", user_class, param)
        self.user.blobs = self.blobs
        self.user.type = self.type

    def _where(self):
        return f"{self.module_name}.{self.class_name}"

    def _import(self):
        if not all(part.isidentifier() for part in self.module_name.split(".")):
            raise KaffeError(f"Python layer '{self.name}': module '{self.module_name}' is not a module name (a "
                             f"dotted name found on sys.path, not a file path)")
        try:
            return importlib.import_module(self.module_name)
        except Exception as error:  # ImportError, or any error raised while the module runs
            raise KaffeError(f"Python layer '{self.name}': cannot import module '{self.module_name}' "
                             f"({_describe(error)}); its directory must be on sys.path or PYTHONPATH") from None

    def _call(self, method, function, *args):
        """Run user code; its exceptions become a KaffeError with the user's message and location only."""
        try:
            return function(*args)
        except KaffeError as error:  # already names what went wrong (e.g. a Blob reshape)
            raise KaffeError(f"Python layer '{self.name}' ({self._where()}) failed in {method}: {error}") from None
        except Exception as error:  # also the user's exception class, as pycaffe passes it on
            raise error_like(error, f"Python layer '{self.name}' ({self._where()}) failed in {method}: "
                                    f"{_describe(error)}") from None

    def _user_method(self, name):
        """The user's method, or None where the class leaves kaffe.Layer's own (not a pycaffe method)."""
        if getattr(type(self.user), name) is getattr(Layer, name):
            return None
        return getattr(self.user, name)

    def _required(self, name):
        method = self._user_method(name)
        if method is None:
            raise KaffeError(f"Python layer '{self.name}': {self._where()} does not define {name}"
                             f"({'top, propagate_down, bottom' if name == 'backward' else 'bottom, top'})")
        return method

    def layer_setup(self, bottom, top):
        self.user.param_str = self.layer_param.python_param.param_str
        self.user.phase = self.phase
        setup = self._user_method("setup")
        if setup is not None:  # pycaffe's default setup does nothing
            self._call("setup", setup, bottom, top)
        self._restore_stored_blobs()
        self.param_propagate_down = [True] * len(self.blobs)

    def _restore_stored_blobs(self):
        if not self.stored_blobs:
            return
        if len(self.stored_blobs) != len(self.blobs):
            raise KaffeError(f"Python layer '{self.name}': the LayerParameter stores {len(self.stored_blobs)} "
                             f"parameter blobs, setup of {self._where()} made {len(self.blobs)}")
        for i, (blob, stored) in enumerate(zip(self.blobs, self.stored_blobs)):
            if blob.shape != stored.shape:
                raise KaffeError(f"Python layer '{self.name}': stored parameter {i} has shape "
                                 f"{stored.shape_string()}, setup made {blob.shape_string()}")
            blob.mutable_cpu_data()[...] = stored.cpu_data()
        self.stored_blobs = []

    def reshape(self, bottom, top):
        self._call("reshape", self._required("reshape"), bottom, top)

    def forward_cpu(self, bottom, top):
        self._call("forward", self._required("forward"), bottom, top)

    def backward_cpu(self, top, propagate_down, bottom):
        self._call("backward", self._required("backward"), top, list(propagate_down), bottom)

    # no OpenCL code (Caffe has no GPU path for Python layers either): run the user's methods, without the
    # fallback warning meant for built-in layers that lack kernels
    def forward_gpu(self, bottom, top):
        self.forward_cpu(bottom, top)

    def backward_gpu(self, top, propagate_down, bottom):
        self.backward_cpu(top, propagate_down, bottom)


def refuse_python_layers(param, source):
    """Raise a KaffeError naming the first Python layer of a NetParameter (V1 nets have no Python type)."""
    for layer in param.layer:
        if layer.type == "Python":
            raise KaffeError(f"{source}: layer '{layer.name}' is a Python layer (module "
                             f"'{layer.python_param.module}'), and Python layers are not allowed here "
                             f"(allow_python_layers=False, --no-python-layers): it would run code from outside "
                             f"the model files")


def _describe(error):
    """'ValueError: message (at file.py:12 in forward)': the user's frame, not kaffe's."""
    text = f"{type(error).__name__}: {error}"
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if not f.filename.startswith("<") and not _is_kaffe_file(f.filename)]
    if frames:
        last = frames[-1]
        text += f" (at {os.path.basename(last.filename)}:{last.lineno} in {last.name})"
    return text


_KAFFE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _is_kaffe_file(path):
    return os.path.abspath(path).startswith(_KAFFE_ROOT + os.sep)
