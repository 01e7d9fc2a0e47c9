"""Direct I/O, seen from the kernel: where the filesystem reports direct-I/O alignment
(`statx` STATX_DIOALIGN, read here with ctypes, independently of fastckpt), the page-aligned
middle of every large payload is written through a second descriptor of the temp file
opened with `O_DIRECT`, in page-aligned pieces; nowhere else is `O_DIRECT` used, and
`FASTCKPT_DIRECT_IO=0` turns it off. Every file is then read back by the stock readers.

Why: buffered writes cost training a core's worth of kernel CPU while a background save
runs (README, "Training while a checkpoint is written").
"""

from __future__ import annotations

import ctypes
import os
import struct
import textwrap
from pathlib import Path

import numpy as np
import pytest

from children import SUFFIXES
from fastckpt import _fastckpt
from oracles import check_target, model_states
from strace_log import Call, on_descriptor, opens_of, run_traced, temp_name_re, write_size

STATX_DIOALIGN = 0x2000
PAGE = 4096
TESTS = Path(__file__).resolve().parent

CHILD = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    import fastckpt
    from children import set_state, state_arrays, state_model
    model = state_model(1024)
    set_state(model, state_arrays(model, "A"))
    for path in sys.argv[1:]:
        # Synchronous saves write from TensorFlow's own buffers (not page aligned: a
        # bounce buffer); background saves from fastckpt's page-aligned arena.
        if "_bg" in path:
            fastckpt.save(model, path, background=True).result()
        else:
            fastckpt.save(model, path)
    """
)


def dio_alignment(folder: Path) -> tuple[int, int] | None:
    """(memory, offset) alignment for direct I/O on `folder`'s filesystem, or None.
    Filesystems report it for regular files only: this asks about a probe file."""
    probe = folder / ".dio-probe"
    probe.write_bytes(b"")
    try:
        return _statx_dio(probe)
    finally:
        probe.unlink()


def _statx_dio(path: Path) -> tuple[int, int] | None:
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(256)  # struct statx is 256 bytes
    if libc.statx(-100, os.fsencode(path), 0, STATX_DIOALIGN, buf) != 0:  # AT_FDCWD
        raise OSError(ctypes.get_errno(), f"statx {path}")
    mask = struct.unpack_from("I", buf, 0)[0]
    mem, offset = struct.unpack_from("II", buf, 152)  # stx_dio_mem_align, _offset_align
    return (mem, offset) if mask & STATX_DIOALIGN and mem and offset else None


@pytest.fixture
def dio_folder(tmp_path):
    """A folder on a filesystem with direct I/O: the test's own, or one in the checkout
    (CI's disk) where the temp folder lives on tmpfs."""
    if dio_alignment(tmp_path):
        yield tmp_path
        return
    folder = TESTS.parent / "target" / f"direct-io-{os.getpid()}"
    folder.mkdir(parents=True, exist_ok=True)
    if not dio_alignment(folder):
        pytest.fail(f"neither {tmp_path} nor {folder} is on a filesystem with direct I/O")
    yield folder
    for p in folder.iterdir():
        p.unlink()
    folder.rmdir()


def _direct_writes(calls, target: str) -> tuple[int, list]:
    """How many times the temp file of `target` was opened, and the writes made through
    descriptors of it opened with O_DIRECT."""
    name = os.path.basename(target)
    temp_re = temp_name_re(target)
    temps = {m.group(0) for c in calls if c.name == "openat" for m in [temp_re.search(c.args)] if m}
    assert len(temps) == 1, f"{name}: expected one temp file, saw {temps}"
    opened = opens_of(calls, temps.pop())
    direct = [o for o in opened if "O_DIRECT" in o.args]
    writes = [c for o in direct for c in on_descriptor(calls, o) if c.name == "pwrite64"]
    return len(direct), writes


def _save_traced(
    folder: Path, log: Path, env=None, syscalls: str = "openat,close,pwrite64"
) -> tuple[dict[str, str], list[Call]]:
    """Saves state A in every format, synchronously and in the background, under strace;
    returns {target: format} and the calls."""
    targets = {
        str(folder / f"ckpt{mode}{s}"): fmt for fmt, s in SUFFIXES.items() for mode in ("", "_bg")
    }
    calls = run_traced(CHILD.format(tests=str(TESTS)), list(targets), log, syscalls, env=env)
    return targets, calls


def _check_files(targets: dict[str, str]) -> None:
    model, states = model_states(1024)
    for target, fmt in targets.items():
        assert check_target(target, fmt, model, states) == "A", target


def test_large_payloads_go_to_disk_directly(dio_folder, tmp_path):
    targets, calls = _save_traced(dio_folder, tmp_path / "strace.log")
    figures = {}
    for target in targets:
        opened, writes = _direct_writes(calls, target)
        name = os.path.basename(target)
        assert opened == 1, f"{name}: the temp file was opened {opened} times with O_DIRECT"
        assert writes, f"{name}: nothing was written through the O_DIRECT descriptor"
        for w in writes:
            offset, n = write_size(w)
            assert offset % PAGE == 0 and n > 0 and n % PAGE == 0, f"{name}: {w.args} = {w.ret}"
        direct = sum(write_size(w)[1] for w in writes)
        size = os.path.getsize(target)
        figures[name] = f"{direct / size:.0%} of {size / 2**20:.1f} MiB direct"
        # Two 1024x1024 kernels and their Adam slots, 4 MiB each, are 97% of every file.
        assert direct >= 0.9 * size, f"{name}: only {figures[name]}"
    print(f"\n{figures}")
    _check_files(targets)


def test_switched_off_by_the_environment(dio_folder, tmp_path):
    env = {**os.environ, "FASTCKPT_DIRECT_IO": "0"}
    targets, calls = _save_traced(dio_folder, tmp_path / "strace.log", env=env)
    for target in targets:
        assert _direct_writes(calls, target)[0] == 0, f"{target}: O_DIRECT with it switched off"
    _check_files(targets)


def test_not_tried_where_the_filesystem_has_none(memory_folder, tmp_path):
    assert dio_alignment(memory_folder) is None, "tmpfs reports direct I/O here"
    targets, calls = _save_traced(memory_folder, tmp_path / "strace.log")
    for target in targets:
        assert _direct_writes(calls, target)[0] == 0, f"{target}: O_DIRECT on tmpfs"
    _check_files(targets)


def test_files_in_memory_are_written_through_a_mapping_when_waited_for(memory_folder, tmp_path):
    """On tmpfs a write that somebody waits for (a synchronous save, a background one once
    `result()` waits for it) copies its payloads into a shared mapping of the temp file
    rather than `pwrite` them, which costs half the CPU there; every file still reads back
    with the stock readers. Seen from the kernel: the temp file's descriptor is mapped
    shared, and what is written to it with `pwrite` is a small part of the file (metadata,
    a background write's first pieces before it was waited for)."""
    syscalls = "openat,close,pwrite64,mmap"
    targets, calls = _save_traced(memory_folder, tmp_path / "strace.log", syscalls=syscalls)
    for target in targets:
        name = os.path.basename(target)
        temps = {
            m.group(0)
            for c in calls
            if c.name == "openat"
            for m in [temp_name_re(target).search(c.args)]
            if m
        }
        [opened] = [o for t in temps for o in opens_of(calls, t)]
        fd = opened.ret.split()[0]
        mapped = [
            c
            for c in calls
            if c.name == "mmap"
            and "MAP_SHARED" in c.args
            and c.args.split(", ")[4] == fd
            and c.start > opened.end
        ]
        assert mapped, f"{name}: its temp file was never mapped"
        written = sum(
            write_size(w)[1] for w in on_descriptor(calls, opened) if w.name == "pwrite64"
        )
        size = os.path.getsize(target)
        assert written < 0.5 * size, f"{name}: {written} of {size} bytes written by pwrite"
    _check_files(targets)


@pytest.mark.parametrize("skew", [0, 1, 7, 4096])
def test_any_memory_offset_and_length(dio_folder, skew):
    """Payloads starting at odd file offsets (SafeTensors packs them) and odd addresses."""
    from safetensors.numpy import load_file

    rng = np.random.default_rng(skew)
    raw = rng.integers(0, 256, (9 << 20) + skew, dtype=np.uint8)
    tensors = [
        ("a", raw[skew : skew + 3]),
        ("b", raw[skew + 3 : skew + (3 << 20) + 5]),  # 3 MiB + 2, at an odd address
        ("c", raw[skew + (3 << 20) + 5 : skew + (9 << 20)]),
    ]
    path = dio_folder / f"odd{skew}.safetensors"
    _fastckpt.write(
        [_fastckpt.plan_safetensors(path, tensors, {})], options=_fastckpt.WriteOptions(threads=2)
    ).result()
    back = load_file(str(path))
    for name, arr in tensors:
        assert np.array_equal(back[name], arr), name
