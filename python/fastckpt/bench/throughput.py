"""Durable throughput against the write floor, over checkpoint sizes and writer threads.

Each case writes one model's weights (no optimizer) with every contender, interleaved, on
each target; the floors are measured in the same rounds.
"""

from __future__ import annotations

import gc
from collections.abc import Callable

import keras
import numpy as np

from fastckpt.bench import floors, machine
from fastckpt.bench.contenders import SaveContender, fastckpt_save, save_contenders
from fastckpt.bench.context import Context, file_bytes, remove
from fastckpt.bench.measure import Stats, Trial, fmt_bytes, interleave
from fastckpt.bench.models import sized_model, state_bytes

WRITE_FLOOR = "floor: write+fsync, 1 thread"
DD_FLOOR = "floor: dd conv=fsync"
SNAPSHOT_FLOOR = "floor: memcpy (snapshot)"


def floor_trials(ctx: Context, target: str, nbytes: int, buf: np.ndarray) -> list[Trial]:
    path = ctx.path(target, "floor.bin")
    trials = [
        Trial(WRITE_FLOOR, lambda: floors.write_floor(buf, path), cleanup=lambda: remove(path))
    ]
    if floors.dd_available():
        trials.append(
            Trial(DD_FLOOR, lambda: floors.dd_floor(nbytes, path), cleanup=lambda: remove(path))
        )
    return trials


FIRST_SAVE = "fastckpt .weights.h5 (first save of a model, background)"


def first_save(ctx: Context, section: str, target: str, case: str, model: keras.Model, **extra):
    """The first fastckpt save of a model walks it, and the first background save touches a
    fresh snapshot arena; later saves reuse both. Timed once here (a background save,
    waited for), shown as its own row, so the interleaved rounds that follow measure the
    steady state every later checkpoint sees."""
    path = ctx.path(target, "first.weights.h5")
    seconds = fastckpt_save(".weights.h5", background=True).save(model, path)["seconds"]
    remove(path)
    ctx.add(
        section, target, case, FIRST_SAVE, {"seconds": Stats([seconds])}, family="fastckpt", **extra
    )


def contender_trial(
    ctx: Context, target: str, model: keras.Model, c: SaveContender, tag: str
) -> Trial:
    path = ctx.path(target, f"{tag}{c.suffix}")

    def run() -> dict[str, float]:
        got = c.save(model, path)
        return {**got, "bytes": float(file_bytes(path))}

    return Trial(c.name + tag, run, cleanup=lambda: remove(path))


def run_interleaved(
    ctx: Context,
    section: str,
    target: str,
    case: str,
    trials: list[Trial],
    reps: int,
    families: dict[str, str],
    extra: dict,
    label: Callable[[str], str] = lambda name: name,
) -> None:
    ctx.progress.say(f"{section}: {case} on {target}: {len(trials)} contenders x {reps} rounds")
    results = interleave(
        trials,
        reps,
        on_rep=lambda r: ctx.progress.say(f"  round {r + 1}/{reps} done") if reps > 2 else None,
    )
    for name, stats in results.items():
        family = families.get(name, "floor")
        ctx.add(section, target, case, label(name), stats, family=family, **extra)
    ctx.clear(target)


def available_memory() -> int:
    return machine.memory_bytes().get("MemAvailable", 1 << 62)


MARGIN = 1 << 30  # left free for the rest of the machine


def run_sizes(ctx: Context) -> None:
    s = ctx.settings
    for size in s.sizes:
        # The model, the floors' buffer and fastckpt's arena: three copies of the state.
        if 3 * size + MARGIN > available_memory():
            ctx.add(
                "throughput",
                "*",
                fmt_bytes(size),
                "all",
                available=False,
                note=f"skipped {fmt_bytes(size)}: needs ~{fmt_bytes(3 * size + MARGIN)} of "
                f"memory, {fmt_bytes(available_memory())} available",
            )
            continue
        model = sized_model(size)
        nbytes = state_bytes(model)
        case = fmt_bytes(nbytes)
        extra = {"state_bytes": nbytes, "variables": len(model.variables)}
        buf = floors.touched(nbytes)
        snap = floors.SnapshotFloor(floors.state_views(model), buf)
        contenders = [
            c
            for c in save_contenders()
            if c.available and (c.suffix != ".h5" or size <= s.legacy_h5_max)
        ]
        for c in save_contenders():
            if not c.available:
                ctx.add(
                    "throughput", "*", case, c.name, family=c.family, available=False, note=c.note
                )
        families = {c.name: c.family for c in contenders}
        reps = s.reps_for(nbytes)
        for i, target in enumerate(ctx.targets):
            trials = floor_trials(ctx, target, nbytes, buf)
            if i == 0:
                trials.append(Trial(SNAPSHOT_FLOOR, snap))
                first_save(ctx, "throughput", target, case, model, **extra)
            # A file on tmpfs is memory too.
            on_tmpfs = target == "tmpfs"
            fits = []
            for c in contenders:
                need = int((c.extra_copies + on_tmpfs) * nbytes) + MARGIN
                if need > available_memory():
                    ctx.add(
                        "throughput",
                        target,
                        case,
                        c.name,
                        family=c.family,
                        available=False,
                        note=f"skipped at {case}: needs ~{fmt_bytes(need)} more memory",
                    )
                else:
                    fits.append(c)
            trials += [contender_trial(ctx, target, model, c, "") for c in fits]
            run_interleaved(ctx, "throughput", target, case, trials, reps, families, extra)
        del model, snap, buf
        gc.collect()


def run_threads(ctx: Context) -> None:
    s = ctx.settings
    model = sized_model(s.thread_size)
    nbytes = state_bytes(model)
    case = fmt_bytes(nbytes)
    buf = floors.touched(nbytes)
    contenders = {n: fastckpt_save(".weights.h5", threads=n) for n in s.thread_counts}
    families = {c.name: "fastckpt" for c in contenders.values()}
    threads_of = {c.name: n for n, c in contenders.items()}
    first_save(ctx, "threads", next(iter(ctx.targets)), case, model, state_bytes=nbytes)
    ctx.records.pop()  # the same as the throughput figure's row; only the priming matters
    for target in ctx.targets:
        trials = floor_trials(ctx, target, nbytes, buf)[:1]
        trials += [contender_trial(ctx, target, model, c, "") for c in contenders.values()]
        counts = ", ".join(map(str, s.thread_counts))
        ctx.progress.say(f"threads: {case} .weights.h5 on {target}, threads {counts}")
        results = interleave(trials, s.reps_for(nbytes))
        for name, stats in results.items():
            ctx.add(
                "threads",
                target,
                case,
                name,
                stats,
                family=families.get(name, "floor"),
                threads=threads_of.get(name, 1),
                state_bytes=nbytes,
            )
        ctx.clear(target)
    del model, buf
    gc.collect()
