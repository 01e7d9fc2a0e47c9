"""Durability order, seen from the kernel: a save runs under `strace -f`, and for every format
the temp file's payload writes all end before its fdatasync starts, the rename onto the
target follows the fdatasync, and an fsync of the folder follows the rename. Without that
order a power cut can leave a renamed but empty or partial file (the data not yet on disk),
or lose the rename itself.

strace is a test dependency (`make test` installs it): without it the test fails.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

from children import SUFFIXES
from strace_log import Call, on_descriptor, opens_of, run_traced, temp_name_re

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


def check_order(calls: list[Call], target: str) -> dict[str, int]:
    """Asserts the durable order for one save to `target`; returns counts for the report.

    The temp file may be open twice: once as created, once with `O_DIRECT` for the large
    payloads (see test_direct_io.py); writes through either must end before the fdatasync."""
    folder, name = os.path.split(target)
    temp_re = temp_name_re(target)
    created = [
        c for c in calls if c.name == "openat" and temp_re.search(c.args) and "O_CREAT" in c.args
    ]
    assert len(created) == 1, f"{name}: expected one temp file created, saw {len(created)}"
    temp = temp_re.search(created[0].args).group(0)
    on_temp = [c for opened in opens_of(calls, temp) for c in on_descriptor(calls, opened)]
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
    dir_opens = [c for c in opens_of(calls, folder) if c.start > rename.end]
    assert dir_opens, f"{name}: the folder is never opened after the rename"
    fsyncs = [c for c in on_descriptor(calls, dir_opens[0]) if c.name == "fsync"]
    assert fsyncs, f"{name}: no fsync of the folder after the rename"
    assert fsyncs[0].ret.startswith("0")
    return {"writes": len(writes), "writer_threads": len({c.tid for c in writes})}


def test_payloads_then_fdatasync_then_rename_then_folder_fsync(tmp_path):
    targets = [str(tmp_path / f"ckpt{suffix}") for suffix in SUFFIXES.values()]
    script = CHILD.format(tests=str(Path(__file__).resolve().parent))
    calls = run_traced(script, targets, tmp_path / "strace.log", SYSCALLS)
    figures = {os.path.basename(t): check_order(calls, t) for t in targets}
    print(f"\n{figures}")
    assert any(f["writer_threads"] > 1 for f in figures.values()), (
        "the payloads were never written by more than one thread: the test would not see "
        "a thread's write racing the fdatasync"
    )
