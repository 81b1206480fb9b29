"""Untrusted model files: loading a prototxt runs no code but a Python layer's module, imported by name from
sys.path only (never from the model's folder unless --python-path names it); Net(..., allow_python_layers=False)
and `kaffe test/time --no-python-layers` refuse Python layers; `kaffe zoo fetch` checks the checksum before the
file enters the cache and never writes outside it."""
import hashlib
import http.server
import subprocess
import sys
import threading

import pytest
from google.protobuf import text_format

from kaffe.engine.errors import KaffeError
from kaffe.engine.net import Net
from kaffe.proto import caffe_pb2
from kaffe.tools import zoo

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
@pytest.fixture
def web(tmp_path, monkeypatch):
    """A local web server with a weights file and a stranger's replacement of it; a zoo in tmp_path."""
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "w.caffemodel").write_bytes(b"the published weights" * 1000)
    (tmp_path / "www" / "tampered.caffemodel").write_bytes(b"someone else's weights" * 1000)

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(tmp_path / "www"), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(zoo, "MODELS", str(tmp_path / "models"))
    monkeypatch.setenv("KAFFE_CACHE", str(tmp_path / "cache"))
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def zoo_model(tmp_path, name, caffemodel, url):
    digest = hashlib.sha1((tmp_path / "www" / "w.caffemodel").read_bytes()).hexdigest()
    (tmp_path / "models" / name).mkdir(parents=True)
    (tmp_path / "models" / name / "README.md").write_text(
        f"---\nname: {name}\ncaffemodel: '{caffemodel}'\ncaffemodel_url: {url}\nsha1: {digest}\n---\n")


def test_a_download_with_the_wrong_checksum_never_enters_the_cache(web, tmp_path, capsys):
    zoo_model(tmp_path, "net", "w.caffemodel", f"{web}/w.caffemodel")
    assert zoo.main(["fetch", "net"]) == 0
    cached = tmp_path / "cache" / "net" / "w.caffemodel"
    good = cached.read_bytes()
    (tmp_path / "models" / "net" / "README.md").write_text(
        (tmp_path / "models" / "net" / "README.md").read_text().replace("/w.caffemodel", "/tampered.caffemodel"))
    assert zoo.main(["fetch", "net", "--force"]) == 1
    assert "did not download correctly" in capsys.readouterr().err
    assert cached.read_bytes() == good   # the checked file was never replaced by the unchecked one
    assert sorted(p.name for p in cached.parent.iterdir()) == ["w.caffemodel"]


@pytest.mark.parametrize("caffemodel", ["../../outside.caffemodel", "/tmp/outside.caffemodel", "..", "a/b.caffemodel"])
def test_a_readme_cannot_make_fetch_write_outside_the_cache(web, tmp_path, capsys, caffemodel):
    zoo_model(tmp_path, "net", caffemodel, f"{web}/w.caffemodel")
    assert zoo.main(["fetch", "net"]) == 1
    assert f"refusing the caffemodel file name {caffemodel!r}: it must be a plain name" in capsys.readouterr().err
    assert not (tmp_path / "outside.caffemodel").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("name", ["../models", "/etc", "..", "a/../../b"])
def test_fetch_refuses_model_names_that_are_paths(web, capsys, name):
    assert zoo.main(["fetch", name]) == 1
    assert f"refusing the model name {name!r}" in capsys.readouterr().err
