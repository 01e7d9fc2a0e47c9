"""fastckpt.ModelCheckpoint from R through reticulate, with R keras's `period` argument.

Needs Rscript and the reticulate package: `apt-get install -y r-base-core
r-cran-reticulate` (Debian/Ubuntu; `make test` installs them).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import fastckpt
from callback_support import list_files, safetensors_tensors

SCRIPT = Path(__file__).parent / "r" / "checkpoint_period.R"
INSTALL = "apt-get install -y r-base-core r-cran-reticulate"


def test_r_reticulate_period_saves_epochs_2_and_4(tmp_path):
    rscript = shutil.which("Rscript")
    if rscript is None:
        pytest.fail(f"Rscript is not installed; the R test needs R and reticulate: {INSTALL}")
    env = {
        **os.environ,
        # The fastckpt these tests import, for the Python that R embeds.
        "PYTHONPATH": os.pathsep.join(
            [str(Path(fastckpt.__file__).parent.parent), os.environ.get("PYTHONPATH", "")]
        ),
        "KERAS_BACKEND": "tensorflow",
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    folder = tmp_path / "ckpt"
    done = subprocess.run(
        [rscript, str(SCRIPT), sys.executable, str(folder)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,  # not the repository: reticulate would take pyproject.toml for Poetry's
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n(R needs: {INSTALL})"
    assert "saved: ckpt-02.safetensors ckpt-04.safetensors" in done.stdout
    assert "Epoch 2: finished saving model to" in done.stdout
    assert list_files(folder) == ["ckpt-02.safetensors", "ckpt-04.safetensors"]
    for name in list_files(folder):
        tensors, metadata = safetensors_tensors(folder / name)
        assert tensors["layers/dense/vars/0"].shape == (4, 8)
        assert "keras.config" not in metadata
