"""The native module's hand-written stub matches the module (mypy's stubtest), with the
explicit allowlist of what it leaves out (python/stubtest-allowlist.txt)."""

import subprocess
import sys
from pathlib import Path

ALLOWLIST = Path(__file__).resolve().parent.parent / "python" / "stubtest-allowlist.txt"


def test_stub_matches_the_native_module():
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy.stubtest",
            "fastckpt._fastckpt",
            "--allowlist",
            str(ALLOWLIST),
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout + run.stderr
