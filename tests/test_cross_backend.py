"""Files move between backends: a checkpoint fastckpt saved under one backend loads under
every other one to exactly the values Keras's own loader gives there, from Keras's own
file of the same model saved under the first backend.

Each backend runs in its own child process (Keras picks its backend at import). The
backends are those `FASTCKPT_TEST_BACKENDS` names (default: TensorFlow and JAX, the ones
`.venv` has); one that this environment cannot import fails the test: `make test` runs
this file in `.venv`, and in `.venv-torch` with all three.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from child_script import run_script

BACKENDS = [
    b.strip()
    for b in os.environ.get("FASTCKPT_TEST_BACKENDS", "tensorflow,jax").split(",")
    if b.strip()
]


def run_under(backend: str, script: str) -> dict:
    """Runs `script` under `backend` in a child; returns the JSON it printed last."""
    out = run_script(script, what=f"under {backend}", timeout=600, KERAS_BACKEND=backend)
    return json.loads(out.strip().splitlines()[-1])


SAVE = """
    import json, keras, fastckpt
    from backend_models import bag_model
    folder, backend = {folder!r}, keras.backend.backend()
    model = bag_model(0)
    fastckpt.save(model, f"{{folder}}/{{backend}}.weights.h5")
    fastckpt.save(model, f"{{folder}}/{{backend}}.safetensors")
    model.save_weights(f"{{folder}}/{{backend}}-keras.weights.h5")
    print(json.dumps({{"backend": backend}}))
"""

LOAD = """
    import json, keras, numpy as np, fastckpt
    from backend_models import bag_model, held_state
    folder, sources = {folder!r}, {sources!r}
    def state(load, path):
        model = bag_model(1)
        load(model, path)
        return [(a.dtype.str, a.shape, a.tobytes().hex()) for a in held_state(model)]
    report = {{}}
    for source in sources:
        # Keras's own loader, here, of Keras's own file saved under `source`: the oracle.
        want = state(lambda m, p: m.load_weights(p), f"{{folder}}/{{source}}-keras.weights.h5")
        got = {{
            "fastckpt.load(.weights.h5)": state(fastckpt.load, f"{{folder}}/{{source}}.weights.h5"),
            "fastckpt.load(.safetensors)": state(
                fastckpt.load, f"{{folder}}/{{source}}.safetensors"
            ),
            "fastckpt.load(Keras's file)": state(
                fastckpt.load, f"{{folder}}/{{source}}-keras.weights.h5"
            ),
            "load_weights(fastckpt's file)": state(
                lambda m, p: m.load_weights(p), f"{{folder}}/{{source}}.weights.h5"
            ),
        }}
        report[source] = [name for name, values in got.items() if values != want]
    print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("backends")
    for backend in BACKENDS:
        assert run_under(backend, SAVE.format(folder=str(folder)))["backend"] == backend
    return folder


@pytest.mark.parametrize("target", BACKENDS)
def test_files_saved_under_the_other_backends_load_as_keras_loads_them(saved, target):
    sources = [b for b in BACKENDS if b != target]
    assert sources, "one backend only: nothing crosses"
    report = run_under(target, LOAD.format(folder=str(saved), sources=sources))
    assert report == {source: [] for source in sources}
