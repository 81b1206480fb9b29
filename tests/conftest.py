import logging
import os
from pathlib import Path

import pytest

from kaffe.engine import device
from kaffe.engine.log import init_log, logger

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("KAFFE_SHARED", REPO.parent / "shared"))
MNIST_RAW = SHARED / "data" / "mnist"


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def kaffe_log():
    """The messages kaffe logs during the test (kaffe's logger does not propagate to caplog)."""
    handler = _Collect()
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)


@pytest.fixture
def log_back_on_stderr():
    """For tests that run cli.main, which sends kaffe's log to the test's captured stderr: afterwards the log goes
    back to the session's stderr, not to a capture stream that is closed."""
    yield
    init_log()


@pytest.fixture
def gpu_mode():
    """Runs the test in GPU (OpenCL) mode, back to CPU mode after it."""
    device.set_mode_gpu()
    try:
        yield
    finally:
        device.set_mode_cpu()


@pytest.fixture(scope="session")
def mnist_lmdb(tmp_path_factory):
    """MNIST converted to LMDB by `kaffe data mnist --from` the shared raw files (once per session)."""
    if not MNIST_RAW.exists():
        pytest.skip(f"real MNIST not found at {MNIST_RAW}")
    from kaffe.tools import data
    out = tmp_path_factory.mktemp("mnist")
    data.main(["mnist", "--from", str(MNIST_RAW), "--out", str(out)])
    return out
