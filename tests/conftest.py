"""Shared fixtures. The backend under test is `KERAS_BACKEND`'s, TensorFlow (CPU) unless
it says otherwise: `make test` runs the whole suite under TensorFlow and the backend tests
(the Makefile's BACKEND_TESTS) under JAX and torch too.

A test that holds only for some backends says so with `@pytest.mark.backends(...)`; under
another backend it is deselected (pytest counts it as such), never silently passed.
"""

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import pytest
from hypothesis import HealthCheck, settings

BACKEND = keras.backend.backend()


def pytest_collection_modifyitems(config, items):
    """Deselects the tests marked for other backends than the one under test."""
    kept, dropped = [], []
    for item in items:
        marker = item.get_closest_marker("backends")
        (kept if marker is None or BACKEND in marker.args else dropped).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


def pytest_report_header(config):
    return f"fastckpt: Keras {keras.__version__}, backend {BACKEND}"


settings.register_profile(
    "ci", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=15, deadline=None)
settings.register_profile("long", max_examples=500, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def small_architecture() -> keras.Model:
    """Input(4) -> Dense(3) -> BatchNormalization -> Dense(2, name="head"), compiled with
    Adam, not trained (the optimizer has no slot variables yet)."""
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(3),
            keras.layers.BatchNormalization(),
            keras.layers.Dense(2, name="head"),
        ]
    )
    model.compile(optimizer="adam", loss="mse")
    return model


def small_model(seed: int = 0) -> keras.Model:
    """`small_architecture()` trained one epoch, so the optimizer has its slot variables."""
    keras.utils.set_random_seed(seed)
    model = small_architecture()
    x = np.random.default_rng(seed).normal(size=(16, 4)).astype("float32")
    model.fit(x, x[:, :2], epochs=1, batch_size=8, verbose=0)
    return model


@pytest.fixture
def trained_model() -> keras.Model:
    return small_model()


def assert_same_state(a: keras.Model, b: keras.Model) -> None:
    """Every model and optimizer variable of `b` equals `a`'s, bit for bit."""
    pairs = list(zip(a.variables, b.variables, strict=True))
    if a.optimizer is not None:
        pairs += list(zip(a.optimizer.variables, b.optimizer.variables, strict=True))
    for x, y in pairs:
        xa, ya = np.asarray(x.numpy()), np.asarray(y.numpy())
        assert xa.dtype == ya.dtype and xa.shape == ya.shape, x.path
        assert xa.tobytes() == ya.tobytes(), f"{x.path} differs"


@pytest.fixture(scope="session")
def forkserver(tmp_path_factory):
    """Cheap child processes that run the whole save path (see tests/forkserver.py)."""
    from forkserver import ForkServer

    server = ForkServer(tmp_path_factory.mktemp("forkserver") / "server.log")
    yield server
    server.close()


@pytest.fixture
def fault_injection():
    """The test build's fault switch (`inject_fault`, `inject_delay`), off again after."""
    from fastckpt import _fastckpt

    testing = getattr(_fastckpt, "testing", None)
    if testing is None:
        pytest.fail(
            "this build of fastckpt has no test hooks: build the extension with "
            "`make dev` (cargo build -p fastckpt-python --features fault-injection)"
        )
    testing.inject_fault(None)
    yield
    testing.inject_fault(None)
    testing.inject_delay(0)


@pytest.fixture
def memory_folder():
    """A new folder on tmpfs (`/dev/shm`): files there are memory, which fastckpt touches
    ahead where it reserves room (tmp_path is on disk here)."""
    if not os.path.isdir("/dev/shm"):
        pytest.fail("no /dev/shm: the tests need a tmpfs folder")
    path = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="fastckpt-test-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 1 MiB tmpfs mounted for this test."""
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("the full-disk test needs root to mount a tmpfs; CI runs as root")
        pytest.skip("mounting a tmpfs needs root (RLIMIT_FSIZE covers out-of-space here)")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True
    )
    if run.returncode != 0:
        if os.environ.get("FASTCKPT_NO_MOUNT") == "1":
            pytest.skip(f"FASTCKPT_NO_MOUNT=1 and mount failed: {run.stderr.decode()}")
        pytest.fail(
            "running as root but `mount -t tmpfs` failed (no CAP_SYS_ADMIN in this "
            f"container?): {run.stderr.decode().strip()}. Set FASTCKPT_NO_MOUNT=1 to skip."
        )
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
