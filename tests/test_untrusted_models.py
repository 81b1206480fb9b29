"""Untrusted model files: loading a prototxt runs no code but a Python layer's module, imported by name from
sys.path only (never from the model's folder unless --python-path names it); Net(..., allow_python_layers=False)
and `kaffe test/time --no-python-layers` refuse Python layers; `kaffe zoo fetch` checks the checksum before the
file enters the cache and never writes outside it."""
import hashlib
import subprocess
import sys

import pytest
from google.protobuf import text_format

from kaffe.engine.errors import KaffeError
from kaffe.engine.net import Net
from kaffe.proto import caffe_pb2
from kaffe.tools import zoo
from test_zoo import served  # noqa: F401  (a local web server and a zoo in tmp_path)

MODULE = "stranger_layer_for_kaffe_tests"
NET = f"""
name: "stranger"
layer {{ name: "in" type: "Input" top: "x" input_param {{ shape {{ dim: 2 dim: 3 }} }} }}
layer {{ name: "py" type: "Python" bottom: "x" top: "y" python_param {{ module: "{MODULE}" layer: "Copy" }} }}
"""
# importing the module leaves a mark: that is what must not happen for a model from a stranger
LAYER_CODE = f"""
import pathlib
import kaffe
pathlib.Path(__file__).with_name("imported").write_text("the model's code ran")


class Copy(kaffe.Layer):
    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        top[0].data[...] = bottom[0].data

    def backward(self, top, propagate_down, bottom):
        pass
"""


@pytest.fixture
def stranger(tmp_path):
    """A model folder with a prototxt whose Python layer module lies beside it."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "net.prototxt").write_text(NET)
    (folder / f"{MODULE}.py").write_text(LAYER_CODE)
    return folder


def kaffe(*args, cwd):
    return subprocess.run([sys.executable, "-m", "kaffe.tools.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("where", ["from the model's folder", "from its parent"])
def test_a_python_layer_module_is_not_imported_from_the_model_folder(stranger, where):
    cwd, model = (stranger, "net.prototxt") if where == "from the model's folder" else (stranger.parent,
                                                                                       "model/net.prototxt")
    result = kaffe("time", "--model", model, "--iterations", "1", cwd=cwd)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"Python layer 'py': cannot import module '{MODULE}'" in result.stderr
    assert not (stranger / "imported").exists()


def test_python_path_names_the_folder_to_import_from(stranger):
    result = kaffe("time", "--model", "model/net.prototxt", "--iterations", "1", "--python-path", "model",
                   cwd=stranger.parent)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (stranger / "imported").exists()


@pytest.mark.parametrize("command", ["test", "time"])
def test_no_python_layers_refuses_them_before_importing(stranger, command):
    weights = ["--weights", "none.caffemodel"] if command == "test" else []
    result = kaffe(command, "--model", "net.prototxt", *weights, "--no-python-layers", "--python-path", ".",
                   cwd=stranger)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert (f"kaffe {command}: error: net.prototxt: layer 'py' is a Python layer (module '{MODULE}'), and Python "
            f"layers are not allowed here (allow_python_layers=False, --no-python-layers)") in result.stderr
    assert not (stranger / "imported").exists()


def test_net_refuses_python_layers_when_asked(stranger, monkeypatch):
    monkeypatch.syspath_prepend(str(stranger))
    with pytest.raises(KaffeError, match="layer 'py' is a Python layer"):
        Net(str(stranger / "net.prototxt"), caffe_pb2.TEST, allow_python_layers=False)
    param = text_format.Parse(NET, caffe_pb2.NetParameter())
    with pytest.raises(KaffeError, match="net 'stranger': layer 'py' is a Python layer"):
        Net(param, caffe_pb2.TEST, allow_python_layers=False)
    assert MODULE not in sys.modules and not (stranger / "imported").exists()
    Net(param, caffe_pb2.TEST)   # allowed by default, as in pycaffe, from sys.path
    assert (stranger / "imported").exists()
    sys.modules.pop(MODULE)


@pytest.mark.parametrize("module", ["../evil", "/tmp/evil", "evil.py", "os.path; import x", ""])
def test_a_module_that_is_not_a_dotted_name_is_refused(module):
    text = NET.replace(MODULE, module)
    with pytest.raises(KaffeError, match="Python layer 'py'"):
        Net(text_format.Parse(text, caffe_pb2.NetParameter()), caffe_pb2.TEST)


# -- kaffe zoo fetch -------------------------------------------------------------------------------------------------
def test_a_download_with_the_wrong_checksum_never_enters_the_cache(served, tmp_path, capsys):
    payload, url, model = served
    model("net", url, f"sha1: {hashlib.sha1(payload).hexdigest()}")
    assert zoo.main(["fetch", "net"]) == 0
    readme = tmp_path / "models" / "net" / "README.md"
    readme.write_text(readme.read_text().replace(hashlib.sha1(payload).hexdigest(), "0" * 40))
    assert zoo.main(["fetch", "net", "--force"]) == 1
    assert "did not download correctly" in capsys.readouterr().err
    cached = tmp_path / "cache" / "net" / "w.caffemodel"
    assert cached.read_bytes() == payload   # the checked file was never replaced by the unchecked one
    assert sorted(p.name for p in cached.parent.iterdir()) == ["w.caffemodel"]


def zoo_model(tmp_path, url, caffemodel):
    (tmp_path / "models" / "net").mkdir(parents=True)
    (tmp_path / "models" / "net" / "README.md").write_text(
        f"---\nname: net\ncaffemodel: '{caffemodel}'\ncaffemodel_url: {url}\nsha1: {'0' * 40}\n---\n")


@pytest.mark.parametrize("caffemodel", ["../../outside.caffemodel", "/tmp/outside.caffemodel", "..", "a/b.caffemodel"])
def test_a_readme_cannot_make_fetch_write_outside_the_cache(served, tmp_path, capsys, caffemodel):
    zoo_model(tmp_path, served[1], caffemodel)
    assert zoo.main(["fetch", "net"]) == 1
    assert f"refusing the caffemodel file name {caffemodel!r}: it must be a plain name" in capsys.readouterr().err
    assert not (tmp_path / "outside.caffemodel").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("name", ["../models", "/etc", "..", "a/../../b"])
def test_fetch_refuses_model_names_that_are_paths(served, capsys, name):
    assert zoo.main(["fetch", name]) == 1
    assert f"refusing the model name {name!r}" in capsys.readouterr().err
