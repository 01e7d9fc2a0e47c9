"""A Python script run in a fresh interpreter, with the tests' helpers and fastckpt
importable: for what must start in a process of its own (a backend chosen at import, a
library loaded at start-up)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import fastckpt

TESTS = Path(__file__).resolve().parent


def run_script(script: str, *, what: str, timeout: float, **env: str) -> str:
    """Runs `script` (dedented) with `env` over this process's environment; returns its
    stdout, failing with `what` and the end of its output if it exits non-zero."""
    path = [str(TESTS), str(Path(fastckpt.__file__).parent.parent), os.environ.get("PYTHONPATH")]
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p), **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, f"{what}:\n{(done.stdout + done.stderr)[-4000:]}"
    return done.stdout
