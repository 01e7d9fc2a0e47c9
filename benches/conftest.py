"""pytest-benchmark cases over the same contenders as `fastckpt bench`.

Run: `pytest benches --benchmark-columns=median,min,max` (add `--benchmark-json=FILE` to keep
them). Targets: files go to `FASTCKPT_BENCH_DIR` if set (e.g. /dev/shm for tmpfs, a folder on
the disk under test otherwise), else to pytest's tmp_path. Benchmarks never assert a time:
compare a contender's row with the floor rows of the same run.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import shutil
import tempfile

import pytest

from fastckpt.bench import models


@pytest.fixture
def target(tmp_path):
    """A scratch folder on the benchmark's target file system."""
    parent = os.environ.get("FASTCKPT_BENCH_DIR")
    if not parent:
        yield str(tmp_path)
        return
    folder = tempfile.mkdtemp(prefix="fastckpt-benches-", dir=parent)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def model_64mib():
    return models.sized_model(64 * models.MIB)


@pytest.fixture(scope="session")
def model_1000_variables():
    return models.many_variables_model(1000)


@pytest.fixture(scope="session")
def training_setup():
    """16 MiB of Dense weights with Adam: a 48 MiB checkpoint."""
    return models.training_model(16 * models.MIB, steps=32)
