"""Durability order, seen from the kernel: a save runs under `strace -f`, and for every format
the temp file's payload writes all end before its fdatasync starts, the rename onto the
target follows the fdatasync, and an fsync of the folder follows the rename. Without that
order a power cut can leave a renamed but empty or partial file (the data not yet on disk),
or lose the rename itself.

strace is a test dependency (`make test` installs it): without it the test fails.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

from children import SUFFIXES

SYSCALLS = (
    "openat,close,pwrite64,write,fdatasync,fsync,rename,renameat,renameat2,fallocate,ftruncate"
)

CHILD = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    import fastckpt
    from children import state_model
    model = state_model(1024)  # 13 MB: payloads split over the writer threads
    for path in sys.argv[1:]:
        fastckpt.save(model, path, threads=4)
    """
)


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


def _fd(call: Call) -> int | None:
    m = re.match(r"\s*(\d+)", call.args)
    return int(m.group(1)) if m else None


def check_order(calls: list[Call], target: str) -> dict[str, int]:
    """Asserts the durable order for one save to `target`; returns counts for the report."""
    folder, name = os.path.split(target)
    temp_re = re.compile(re.escape(folder) + r"/\." + re.escape(name) + r"\.fastckpt-\d+-\d+\.tmp")
    opened = [
        c for c in calls if c.name == "openat" and temp_re.search(c.args) and "O_CREAT" in c.args
    ]
    assert len(opened) == 1, f"{name}: expected one temp file created, saw {len(opened)}"
    create = opened[0]
    temp = temp_re.search(create.args).group(0)
    fd = int(create.ret.split()[0])
    closed = next(
        (c for c in calls if c.start > create.end and c.name == "close" and _fd(c) == fd),
        None,
    )
    life_end = closed.start if closed else len(calls) * 10**6
    on_temp = [c for c in calls if create.end < c.start < life_end and _fd(c) == fd]
    writes = [c for c in on_temp if c.name in ("pwrite64", "write")]
    syncs = [c for c in on_temp if c.name == "fdatasync"]
    assert writes, f"{name}: no writes to the temp file"
    assert len(syncs) == 1, f"{name}: expected one fdatasync of the temp file, saw {len(syncs)}"
    sync = syncs[0]
    late = [c for c in writes if c.end > sync.start]
    assert not late, f"{name}: {len(late)} writes to the temp file end after its fdatasync"
    renames = [
        c
        for c in calls
        if c.name.startswith("rename") and temp in c.args and f'"{target}"' in c.args
    ]
    assert len(renames) == 1, f"{name}: expected one rename temp -> target, saw {renames}"
    rename = renames[0]
    assert rename.start > sync.end, f"{name}: rename starts before the fdatasync returned"
    assert rename.ret.startswith("0"), f"{name}: rename failed: {rename.ret}"
    dir_opens = [
        c for c in calls if c.name == "openat" and c.start > rename.end and f'"{folder}"' in c.args
    ]
    assert dir_opens, f"{name}: the folder is never opened after the rename"
    dir_fd = int(dir_opens[0].ret.split()[0])
    fsyncs = [
        c for c in calls if c.name == "fsync" and c.start > dir_opens[0].end and _fd(c) == dir_fd
    ]
    assert fsyncs, f"{name}: no fsync of the folder after the rename"
    assert fsyncs[0].ret.startswith("0")
    return {"writes": len(writes), "writer_threads": len({c.tid for c in writes})}


def test_payloads_then_fdatasync_then_rename_then_folder_fsync(tmp_path):
    strace = shutil.which("strace")
    assert strace, (
        "strace is not installed: this test needs it (apt-get install strace; "
        "`make test` installs it via `make system-deps`)"
    )
    targets = [str(tmp_path / f"ckpt{suffix}") for suffix in SUFFIXES.values()]
    log = tmp_path / "strace.log"
    script = CHILD.format(tests=str(Path(__file__).resolve().parent))
    run = subprocess.run(
        [
            strace,
            "-f",
            "-qq",
            "--seccomp-bpf",
            "-o",
            str(log),
            "-e",
            f"trace={SYSCALLS}",
            sys.executable,
            "-c",
            script,
            *targets,
        ],
        capture_output=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr.decode(errors="replace")[-3000:]
    calls = parse(log.read_text())
    figures = {os.path.basename(t): check_order(calls, t) for t in targets}
    print(f"\n{figures}")
    assert any(f["writer_threads"] > 1 for f in figures.values()), (
        "the payloads were never written by more than one thread: the test would not see "
        "a thread's write racing the fdatasync"
    )
