"""Load time back into a model, against Keras's loaders and a one-thread read floor.

On the disk target every load starts with the file evicted from the page cache
(`posix_fadvise(DONTNEED)` on that file alone), so it reads from the device; on tmpfs the
file is memory either way.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable

import keras

import fastckpt
from fastckpt.bench import floors
from fastckpt.bench.context import Context, file_bytes
from fastckpt.bench.measure import Trial, interleave
from fastckpt.bench.models import TrainingSetup, state_bytes
from fastckpt.bench.training import case_name

READ_FLOOR = "floor: read, 1 thread"
DEVICE_FLOOR = "floor: read, every core"


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    del out
    return seconds


def run_load(ctx: Context, setup: TrainingSetup) -> None:
    for i, target in enumerate(ctx.targets):
        _load_on(ctx, setup, target, warmup=i == 0)
        ctx.clear(target)
        gc.collect()


def _load_on(ctx: Context, setup: TrainingSetup, target: str, warmup: bool) -> None:
    reps = ctx.settings.load_reps
    model = setup.model
    case = case_name(setup)
    nbytes = state_bytes(model)
    cold = target != "tmpfs"
    files = {
        "keras.weights.h5": model.save_weights,
        "keras.keras": model.save,
        "fck.weights.h5": lambda p: fastckpt.save(model, p),
        "fck.safetensors": lambda p: fastckpt.save(model, p),
        "fck.keras": lambda p: fastckpt.save(model, p),
    }
    paths = {name: ctx.path(target, name) for name in files}
    for name, write in files.items():
        write(paths[name])
        floors.make_durable(paths[name])
    buf = floors.touched(
        max(file_bytes(paths[name]) for name in ("fck.safetensors", "fck.weights.h5"))
    )

    def ours(p: str) -> None:
        fastckpt.load(model, p)

    def trial(name: str, file: str, fn: Callable[[str], object]) -> Trial:
        path = paths[file]
        setup_fn = (lambda: floors.drop_from_page_cache(path)) if cold else None
        return Trial(name, lambda: _timed(lambda: fn(path)), setup=setup_fn, warmup=warmup)

    trials = [
        trial(READ_FLOOR, "fck.safetensors", lambda p: floors.read_floor(p, buf)),
        trial(DEVICE_FLOOR, "fck.weights.h5", lambda p: floors.read_floor_parallel(p, buf)),
        trial("keras model.load_weights(.weights.h5)", "keras.weights.h5", model.load_weights),
        trial("fastckpt.load(.weights.h5 by Keras)", "keras.weights.h5", ours),
        trial("fastckpt.load(.weights.h5)", "fck.weights.h5", ours),
        trial("fastckpt.load(.safetensors)", "fck.safetensors", ours),
        trial("fastckpt.load(.keras)", "fck.keras", ours),
        trial("keras.saving.load_model(.keras)", "keras.keras", keras.saving.load_model),
        trial("fastckpt.load_model(.keras)", "fck.keras", fastckpt.load_model),
    ]
    where = "cold page cache" if cold else "in memory"
    ctx.progress.say(
        f"load: {case} on {target} ({where}): {len(trials)} contenders x {reps} rounds"
    )
    results = interleave(trials, reps)
    for name, stats in results.items():
        family = "floor" if name.startswith("floor") else name.split(".")[0].split()[0]
        ctx.add(
            "load", target, case, name, stats, family=family, state_bytes=nbytes, cold_cache=cold
        )
