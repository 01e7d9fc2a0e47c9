"""How fast this machine's disk gives a file back from a cold page cache, by every way of
reading it that a loader could use: through the page cache or with direct I/O, on several
threads, in pieces of several sizes. The bound on any load from a cold cache (README,
"Loading"). Writes a `--mib` file of random bytes into `--folder` (on the disk under
test, not tmpfs), then reads it `--rounds` times with each method, interleaved, each read
after the file's pages are dropped (`posix_fadvise(DONTNEED)`), and prints each method's
times and median.

    python benches/cold_reads.py --folder <a folder on the disk> [--mib 480] [--rounds 3]
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np

from fastckpt.bench.floors import drop_from_page_cache, read_floor_parallel
from fastckpt.bench.measure import MIB

# (name, direct I/O, threads, piece size)
METHODS = [
    ("page cache, 2 threads, 8 MiB", False, 2, 8 * MIB),
    ("page cache, 8 threads, 8 MiB", False, 8, 8 * MIB),
    ("direct, 2 threads, 8 MiB", True, 2, 8 * MIB),
    ("direct, 4 threads, 8 MiB", True, 4, 8 * MIB),
    ("direct, 8 threads, 8 MiB", True, 8, 8 * MIB),
    ("direct, 4 threads, 32 MiB", True, 4, 32 * MIB),
    ("direct, 16 threads, 2 MiB", True, 16, 2 * MIB),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", required=True, help="a folder on the disk under test")
    parser.add_argument("--mib", type=int, default=480)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    fd, path = tempfile.mkstemp(dir=args.folder, prefix="cold-reads-")
    try:
        with os.fdopen(fd, "wb") as f:
            for _ in range(args.mib):
                f.write(os.urandom(MIB))
            f.flush()
            os.fsync(f.fileno())
        # Page-aligned (a mapping), as direct reads need; the loaders' reads land in
        # memory already touched too.
        buf = np.frombuffer(mmap.mmap(-1, args.mib * MIB), np.uint8)
        buf.fill(1)
        times: dict[str, list[float]] = {name: [] for name, *_ in METHODS}
        for _ in range(args.rounds):
            for name, direct, threads, piece in METHODS:
                drop_from_page_cache(path)
                seconds = read_floor_parallel(path, buf, threads, piece=piece, direct=direct)
                times[name].append(seconds)
        for name, runs in times.items():
            each = " ".join(f"{s * 1e3:5.0f}" for s in runs)
            print(f"{name:28s} {each} ms   median {statistics.median(runs) * 1e3:.0f} ms")
    finally:
        os.remove(path)


if __name__ == "__main__":
    main()
