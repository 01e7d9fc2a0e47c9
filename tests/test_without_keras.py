"""`import fastckpt` imports neither Keras nor TensorFlow, and the command line's `--help`,
`inspect` and `verify` work where Keras cannot be imported at all (a child process in which
`import keras` / `import tensorflow` / `import jax` fail)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

import fastckpt
from children import state_model

BLOCK = textwrap.dedent(
    """
    import sys
    for name in ("keras", "tensorflow", "jax", "torch"):
        sys.modules[name] = None  # `import name` raises ImportError
    from fastckpt.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    return subprocess.run(
        [sys.executable, "-c", BLOCK, *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_importing_fastckpt_imports_no_framework():
    code = textwrap.dedent(
        """
        import sys, fastckpt
        from fastckpt import formats, verify, inspection, cli
        loaded = [m for m in ("keras", "tensorflow", "jax", "torch") if m in sys.modules]
        print(",".join(loaded))
        """
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == ""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("files")
    model = state_model(64)
    out = {}
    for suffix in (".weights.h5", ".safetensors", ".keras", ".h5"):
        out[suffix] = folder / f"m{suffix}"
        fastckpt.save(model, out[suffix])
    out["sharded"] = folder / "s.weights.json"
    fastckpt.save(model, out["sharded"], max_shard_size=0.00005)
    return out


def test_help_without_keras():
    run = run_cli("--help")
    assert run.returncode == 0, run.stderr
    assert "inspect" in run.stdout and "verify" in run.stdout


@pytest.mark.parametrize("kind", [".weights.h5", ".safetensors", ".keras", ".h5", "sharded"])
def test_inspect_and_verify_without_keras(files, kind):
    path = str(files[kind])
    inspected = run_cli("inspect", path, "--json")
    assert inspected.returncode == 0, inspected.stderr
    described = json.loads(inspected.stdout)
    assert described["tensors"] and described["path"] == path
    verified = run_cli("verify", path)
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_verify_without_keras_fails_a_damaged_file(files, tmp_path):
    damaged = tmp_path / "d.safetensors"
    data = bytearray(files[".safetensors"].read_bytes())
    data[-3] ^= 0xFF
    damaged.write_bytes(bytes(data))
    run = run_cli("verify", str(damaged))
    assert run.returncode == 1, run.stdout + run.stderr


def test_saving_without_keras_says_what_is_missing(tmp_path):
    code = BLOCK.replace(
        "from fastckpt.cli import main\nsys.exit(main(sys.argv[1:]))",
        "import fastckpt\nfastckpt.save(None, 'x.weights.h5')",
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode != 0
    assert "keras" in run.stderr.lower()
