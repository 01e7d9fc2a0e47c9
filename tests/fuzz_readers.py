"""Fuzzing harness for the Python-facing readers (`fastckpt.formats`): `keras_zip` (zip), the
h5py-backed `weights_h5` / `legacy_h5`, `safetensors` (the native header parser seen
from Python) and the zstd container (its header and the native frame decoder), all
through `fastckpt.verify`, which opens a file and reads every tensor.

The contract under test: for any bytes, `verify` returns a report (damaged files are
`ok=False`), never raises, crashes or blows up memory. `one_input` raises `Finding` when the
contract breaks.

Two drivers use it: `test_fuzz.py` (a seeded mutation loop, in the default suite) and
`fuzz/atheris_readers.py` (coverage-guided, long runs).
"""

from __future__ import annotations

import os
import random
import struct
import traceback

from fastckpt.verify import verify


class Finding(Exception):
    """The readers broke their contract on this input."""


def one_input(data: bytes, path: str) -> bool:
    """Writes `data` to `path` (its suffix picks the format) and verifies it; returns
    whether the file was accepted as whole."""
    with open(path, "wb") as f:
        f.write(data)
    try:
        return verify(path).ok
    except MemoryError:
        raise Finding(f"MemoryError on a {len(data)}-byte file") from None
    except BaseException as e:
        raise Finding(f"{type(e).__name__}: {e}\n{traceback.format_exc()}") from e


_INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 2**63, 2**64 - 1]


def mutate(data: bytes, rng: random.Random, seeds: list[bytes]) -> bytes:
    """One to eight random edits: bit flips, byte stores, boundary integers written over
    size and offset fields, truncation, deletion, duplication, splices from another seed."""
    b = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        op = rng.randrange(8)
        n = len(b)
        if op == 0 and n:
            b[rng.randrange(n)] ^= 1 << rng.randrange(8)
        elif op == 1 and n:
            b[rng.randrange(n)] = rng.randrange(256)
        elif op == 2 and n >= 8:
            width, fmt = rng.choice([(2, "<H"), (4, "<I"), (8, "<Q")])
            value = rng.choice(_INTERESTING) & ((1 << (8 * width)) - 1)
            at = rng.randrange(n - width + 1)
            b[at : at + width] = struct.pack(fmt, value)
        elif op == 3 and n:
            del b[rng.randrange(n) :]
        elif op == 4 and n:
            at = rng.randrange(n)
            del b[at : at + rng.randint(1, 256)]
        elif op == 5 and n:
            at = rng.randrange(n)
            b[at:at] = b[at : at + rng.randint(1, 256)]
        elif op == 6:
            other = rng.choice(seeds)
            if other:
                at, size = rng.randrange(len(other)), rng.randint(1, 512)
                dst = rng.randrange(n + 1)
                b[dst : dst + size] = other[at : at + size]
        elif op == 7 and n:
            at = rng.randrange(n)
            b[at : at + 4] = rng.randbytes(4)
    return bytes(b)


def run(seeds: list[bytes], path: str, seconds: float, seed: int, on_finding) -> dict:
    """Mutates seeds for `seconds`; calls `on_finding(data, message)` for each finding.
    Returns execution figures."""
    import time

    rng = random.Random(seed)
    deadline = time.monotonic() + seconds
    execs = accepted = findings = 0
    for s in seeds:  # the seeds themselves must pass
        if not one_input(s, path):
            raise Finding(f"a seed is not accepted: {verify(path)}")
    while time.monotonic() < deadline:
        data = mutate(rng.choice(seeds), rng, seeds)
        try:
            accepted += one_input(data, path)
        except Finding as e:
            findings += 1
            on_finding(data, str(e))
        execs += 1
    os.remove(path)
    return {"execs": execs, "accepted": accepted, "findings": findings}
