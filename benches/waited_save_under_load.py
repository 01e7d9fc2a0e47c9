"""How long a waited background save takes while other processes keep every core busy:
what an end-of-fit wait (or any wait) costs on a shared machine. Starts `--hogs` busy
processes (default: one per core), then makes `--saves` background saves of the
bench's training model (160 MiB of weights + Adam, 480 MiB) into `--folder`, each waited
for at once, and prints the snapshot and the wait of each.

    KERAS_BACKEND=tensorflow python benches/waited_save_under_load.py [--folder /dev/shm]

Whether the writers may return from nice 19 decides much of it: run it once as is and
once without `CAP_SYS_NICE`, as most containers run
(`setpriv --inh-caps=-sys_nice --bounding-set=-sys_nice python ...`). To compare
commits, run it from a checkout of each (`PYTHONPATH=<checkout>/python`) in one session.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import fastckpt
from fastckpt.bench.machine import may_raise_priority
from fastckpt.bench.measure import MIB
from fastckpt.bench.models import training_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", default="/dev/shm" if os.path.isdir("/dev/shm") else None)
    parser.add_argument("--saves", type=int, default=8)
    parser.add_argument("--hogs", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args()
    model = training_model(160 * MIB).model
    folder = tempfile.mkdtemp(dir=args.folder)
    print(f"may raise a writer's priority: {may_raise_priority()}; {args.hogs} busy processes")
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.hogs)]
    try:
        time.sleep(0.5)
        for i in range(args.saves):
            path = os.path.join(folder, f"ckpt{i}.weights.h5")
            start = time.perf_counter()
            job = fastckpt.save(model, path, background=True)
            taken = time.perf_counter()
            job.result()
            done = time.perf_counter()
            snapshot, wait = 1e3 * (taken - start), 1e3 * (done - taken)
            print(f"save {i}: snapshot {snapshot:6.0f} ms, wait {wait:6.0f} ms")
            os.remove(path)
    finally:
        for hog in hogs:
            hog.kill()
        os.rmdir(folder)


if __name__ == "__main__":
    main()
