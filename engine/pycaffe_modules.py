"""pycaffe's module names (`caffe.io`, `caffe.draw`, ...) as importable submodules of kaffe, and `caffe` itself.

The code lives in the project's folders (engine/, tools/, ...); an import hook maps each pycaffe name onto the
module that holds it, lazily, so that `import kaffe` does not pay for scikit-image or pydot.
"""
import importlib
import importlib.abc
import importlib.util
import sys

# pycaffe submodule name -> the kaffe module that implements it
SUBMODULES = {
    "io": "kaffe.engine.caffe_io",
    "net_spec": "kaffe.engine.net_spec",
    "coord_map": "kaffe.engine.coord_map",
    "draw": "kaffe.engine.draw",
    "classifier": "kaffe.engine.classifier",
    "detector": "kaffe.engine.detector",
    "pycaffe": "kaffe.engine.pycaffe",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds `<prefix>.<name>` for every pycaffe name and loads it as the module that implements it."""

    def __init__(self, targets):
        self.targets = targets  # full alias name -> real module name

    def find_spec(self, fullname, path=None, target=None):
        if fullname in self.targets:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        return importlib.import_module(self.targets[spec.name])

    def exec_module(self, module):
        pass  # the real module ran when it was imported


def _kaffe_targets():
    return {f"kaffe.{name}": real for name, real in SUBMODULES.items()}


def install_submodules():
    """Makes `import kaffe.io` (and every other pycaffe name) work."""
    if not any(isinstance(f, _Alias) and "kaffe.io" in f.targets for f in sys.meta_path):
        sys.meta_path.append(_Alias(_kaffe_targets()))


def install_as_caffe():
    """Registers kaffe as `caffe`, so that unchanged scripts' `import caffe`, `from caffe.proto import caffe_pb2`,
    `import caffe.io` and `from caffe import layers as L` run on kaffe (as PyMySQL's install_as_MySQLdb)."""
    kaffe = importlib.import_module("kaffe")
    sys.modules["caffe"] = kaffe
    targets = {f"caffe.{name}": real for name, real in SUBMODULES.items()}
    for name in ("proto", "proto.caffe_pb2", "layers"):
        targets[f"caffe.{name}"] = f"kaffe.{name}"
    if not any(isinstance(f, _Alias) and "caffe.io" in f.targets for f in sys.meta_path):
        sys.meta_path.insert(0, _Alias(targets))
