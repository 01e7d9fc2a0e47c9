"""Several files that commit together (`_fastckpt.write` of a set; a sharded save's shards
and index), seen from the kernel under `strace -f`: every file is written and fdatasync'd
before anything is renamed; the shards are renamed, their folder fsync'd, and only then is
the index renamed and the folder fsync'd again. A reader that finds the new index finds
every shard it names complete and durable."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import h5py
import numpy as np

import fastckpt
from children import state_model
from strace_log import on_descriptor, opens_of, run_traced, temp_name_re
from test_durability_order import SYSCALLS

CHILD = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    import fastckpt
    from children import state_model
    model = state_model(1024)  # 13 MB: four shards of 4 MB
    fastckpt.save(model, sys.argv[1], max_shard_size=0.004, threads=2)
    """
)


def test_shards_then_folder_fsync_then_index_then_folder_fsync(tmp_path):
    index = str(tmp_path / "ckpt.weights.json")
    script = CHILD.format(tests=str(Path(__file__).resolve().parent))
    calls = run_traced(script, [index], tmp_path / "strace.log", SYSCALLS)
    with open(index) as f:
        shard_names = sorted(
            {
                n
                for v in json.load(f)["weight_map"].values()
                for n in (v if isinstance(v, list) else [v])
            }
        )
    assert len(shard_names) >= 3, shard_names
    shards = [str(tmp_path / n) for n in shard_names]

    def history(target: str) -> tuple[int, int]:
        """(end of the temp file's fdatasync, start of its rename onto `target`)."""
        temp_re = temp_name_re(target)
        created = [
            c
            for c in calls
            if c.name == "openat" and temp_re.search(c.args) and "O_CREAT" in c.args
        ]
        assert len(created) == 1, target
        temp = temp_re.search(created[0].args).group(0)
        on_temp = [c for o in opens_of(calls, temp) for c in on_descriptor(calls, o)]
        syncs = [c for c in on_temp if c.name == "fdatasync"]
        writes = [c for c in on_temp if c.name in ("pwrite64", "write")]
        assert len(syncs) == 1 and writes, target
        assert max(c.end for c in writes) < syncs[0].start, f"{target}: a write ends late"
        renames = [
            c
            for c in calls
            if c.name.startswith("rename") and temp in c.args and f'"{target}"' in c.args
        ]
        assert len(renames) == 1 and renames[0].ret.startswith("0"), target
        return syncs[0].end, renames[0].start

    shard_history = [history(s) for s in shards]
    index_sync, index_rename = history(index)
    last_sync = max([index_sync, *(sync for sync, _ in shard_history)])
    first_rename = min(rename for _, rename in shard_history)
    assert last_sync < first_rename, "a file was renamed before every file was fdatasync'd"
    last_shard_rename = max(rename for _, rename in shard_history)
    folder_fsyncs = [
        c
        for opened in opens_of(calls, str(tmp_path))
        for c in on_descriptor(calls, opened)
        if c.name == "fsync" and c.ret.startswith("0")
    ]
    between = [c for c in folder_fsyncs if last_shard_rename < c.start and c.end < index_rename]
    assert between, "the index was renamed before the shards' renames were fsync'd"
    assert [c for c in folder_fsyncs if c.start > index_rename], "no folder fsync after the index"


def test_a_sharded_save_is_one_job_and_loads_with_keras(tmp_path):
    model = state_model(1024)
    job = fastckpt.save(model, tmp_path / "m.weights.json", max_shard_size=0.004, background=True)
    result = job.result()
    names = sorted(os.listdir(tmp_path))
    assert result.paths[0] == str(tmp_path / "m.weights.json")
    assert sorted(os.path.basename(p) for p in result.paths) == names
    assert result.bytes == sum(os.path.getsize(tmp_path / n) for n in names)
    theirs = state_model(1024)
    theirs.load_weights(tmp_path / "m.weights.json")
    for a, b in zip(model.weights, theirs.weights, strict=True):
        assert np.array_equal(a.numpy(), b.numpy())
    with h5py.File(tmp_path / "m_00000.weights.h5") as f:
        assert "layers" in f or "vars" in f
