"""The native module's hand-written stub matches the module (mypy's stubtest)."""

import subprocess
import sys


def test_stub_matches_the_native_module():
    run = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "fastckpt._fastckpt", "--ignore-missing-stub"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout + run.stderr
