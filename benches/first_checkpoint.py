"""Where a whole `fit`'s checkpoint time goes, hook by hook: the far-apart short fit of the
whole-fit bench (`fastckpt.bench.wholefit`, case 0: 576 MiB of state, 3 checkpoints 12
steps apart, on tmpfs), run `--fits` times in this process with one contender, printing
every hook that took over a millisecond and the first checkpoint against the steady one.
The first fit of a process pays for what the process does once (imports, Keras's first
traversal); later fits show what every `fit` pays.

    KERAS_BACKEND=tensorflow python benches/first_checkpoint.py [--contender ".keras"]

To compare commits, run it from a checkout of each (`PYTHONPATH=<checkout>/python`) in one
session.
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from fastckpt.bench import wholefit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contender", default=".weights.h5", help="file suffix")
    parser.add_argument("--who", choices=("fastckpt", "keras"), default="fastckpt")
    parser.add_argument("--fits", type=int, default=2)
    args = parser.parse_args()
    case = wholefit.cases("default")[0]
    folder = tempfile.mkdtemp(dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    bench = wholefit.Bench(2048, 12, 64, folder)
    who = wholefit.FASTCKPT if args.who == "fastckpt" else wholefit.KERAS
    for fit in range(args.fits):
        timer = wholefit._hook_timer(bench.callback(f"{who} {args.contender}", case))
        bench.fit(case, timer)
        got = wholefit.summarize(case, timer.calls)
        print(
            f"fit {fit}: first {got['first'] * 1e3:.1f} ms, steady {got['steady'] * 1e3:.1f} ms "
            f"({got['first'] / got['steady']:.2f}x), per checkpoint "
            f"{got['per_checkpoint'] * 1e3:.1f} ms, end-of-fit wait "
            f"{got['end_of_fit_wait'] * 1e3:.1f} ms"
        )
        for i, (hook, seconds) in enumerate(timer.calls):
            if seconds > 1e-3:
                print(f"  {i:3d} {hook:22s} {seconds * 1e3:7.1f} ms")
        bench.clear()
    os.rmdir(folder)


if __name__ == "__main__":
    main()
