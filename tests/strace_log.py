"""`strace -f` logs as calls: split lines joined, in the order the calls began."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Call:
    start: int  # line index where the call began
    end: int  # line index where it returned
    tid: int
    name: str
    args: str
    ret: str


_LINE = re.compile(r"^(\d+)\s+(.*)$")
_FULL = re.compile(r"^(\w+)\((.*)\)\s+=\s+(.*)$")
_UNFINISHED = re.compile(r"^(\w+)\((.*) <unfinished \.\.\.>$")
_RESUMED = re.compile(r"^<\.\.\. (\w+) resumed>(.*)\)\s+=\s+(.*)$")


def parse(log: str) -> list[Call]:
    """Calls in the order they started, with `strace -f`'s split lines joined."""
    calls: list[Call] = []
    pending: dict[tuple[int, str], tuple[int, str]] = {}
    for i, raw in enumerate(log.splitlines()):
        m = _LINE.match(raw)
        if not m:
            continue
        tid, rest = int(m.group(1)), m.group(2)
        if full := _FULL.match(rest):
            calls.append(Call(i, i, tid, full.group(1), full.group(2), full.group(3)))
        elif unfinished := _UNFINISHED.match(rest):
            pending[(tid, unfinished.group(1))] = (i, unfinished.group(2))
        elif resumed := _RESUMED.match(rest):
            start, args = pending.pop((tid, resumed.group(1)), (i, ""))
            name, tail, ret = resumed.groups()
            calls.append(Call(start, i, tid, name, args + tail, ret))
    return sorted(calls, key=lambda c: c.start)


def temp_name_re(target: str) -> re.Pattern[str]:
    """The names fastckpt gives the temp file of a save to `target`."""
    folder, name = os.path.split(target)
    return re.compile(
        re.escape(folder) + r"/\." + re.escape(name) + r"\.fastckpt-[0-9a-f]{8}-\d+-\d+\.tmp"
    )


def fd_of(call: Call) -> int | None:
    """The descriptor a call acts on (its first argument)."""
    m = re.match(r"\s*(\d+)", call.args)
    return int(m.group(1)) if m else None


def opens_of(calls: list[Call], path: str) -> list[Call]:
    """The successful `openat` calls of exactly `path`."""
    return [
        c
        for c in calls
        if c.name == "openat" and f'"{path}"' in c.args and not c.ret.startswith("-")
    ]


def on_descriptor(calls: list[Call], opened: Call) -> list[Call]:
    """The calls on the descriptor `opened` returned, from the open to its close."""
    fd = int(opened.ret.split()[0])
    closed = next(
        (c for c in calls if c.start > opened.end and c.name == "close" and fd_of(c) == fd),
        None,
    )
    end = closed.start if closed else len(calls) * 10**6
    return [c for c in calls if opened.end < c.start < end and fd_of(c) == fd]


def write_size(call: Call) -> tuple[int, int]:
    """`(offset, bytes written)` of a `pwrite64`."""
    offset = int(call.args.rsplit(",", 1)[1])
    return offset, int(call.ret.split()[0])


def run_traced(
    script: str, args: list[str], log: Path, syscalls: str, env=None, prefix: list[str] = ()
) -> list[Call]:
    """Runs `python -c script *args` under `strace -f` (itself under `prefix`, a command
    that runs the rest) and returns the traced calls."""
    strace = shutil.which("strace")
    assert strace, (
        "strace is not installed: this test needs it (apt-get install strace; "
        "`make test` installs it via `make system-deps`)"
    )
    trace = [strace, "-f", "-qq", "--seccomp-bpf", "-o", str(log), "-e", f"trace={syscalls}"]
    run = subprocess.run(
        [*prefix, *trace, sys.executable, "-c", script, *args],
        capture_output=True,
        timeout=300,
        env=env,
    )
    assert run.returncode == 0, run.stderr.decode(errors="replace")[-3000:]
    return parse(log.read_text())
