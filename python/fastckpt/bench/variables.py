"""Per-variable overhead: one layer of N tiny variables, saved by every contender.

fastckpt walks the model once and reuses the plan; the first save of a model also pays the
walk, reported on its own ("fastckpt plan walk").
"""

from __future__ import annotations

import gc

from fastckpt import _walk
from fastckpt.bench import floors
from fastckpt.bench.contenders import (
    fastckpt_save,
    keras_model_save,
    keras_save_weights,
    safetensors_save_file,
)
from fastckpt.bench.context import Context, remove
from fastckpt.bench.measure import Trial, interleave, timed
from fastckpt.bench.models import many_variables_model, state_bytes
from fastckpt.bench.throughput import contender_trial, first_save

FLOOR = "floor: memcpy + write+fsync, 1 thread"
WALK = "fastckpt plan walk (first save only)"


def run_variables(ctx: Context) -> None:
    s = ctx.settings
    contenders = [
        fastckpt_save(".weights.h5"),
        fastckpt_save(".keras"),
        fastckpt_save(".safetensors"),
        keras_save_weights(),
        keras_model_save(".keras"),
        safetensors_save_file(),
    ]
    contenders = [c for c in contenders if c.available]
    families = {c.name: c.family for c in contenders}
    for count in s.variable_counts:
        ctx.progress.say(f"variables: building a layer of {count} variables")
        _one_count(ctx, count, contenders, families)
        gc.collect()


def _one_count(ctx: Context, count: int, contenders: list, families: dict[str, str]) -> None:
    reps = ctx.settings.variable_reps
    model = many_variables_model(count)
    nbytes = state_bytes(model)
    buf = floors.touched(nbytes)
    snap = floors.SnapshotFloor(floors.state_views(model), buf)
    case = f"{count} variables"
    for i, target in enumerate(ctx.targets):
        path = ctx.path(target, "floor.bin")

        def floor(path: str = path) -> float:
            return snap() + floors.write_floor(buf, path)

        def cleanup(path: str = path) -> None:
            remove(path)

        trials = [Trial(FLOOR, floor, cleanup=cleanup)]
        if i == 0:  # no I/O: once is enough
            trials.append(Trial(WALK, lambda: timed(lambda: _walk.walk(model))[0]))
            first_save(ctx, "variables", target, case, model, variables=count, state_bytes=nbytes)
        trials += [contender_trial(ctx, target, model, c, "") for c in contenders]
        ctx.progress.say(f"variables: {case} on {target}: {len(trials)} contenders x {reps} rounds")
        results = interleave(trials, reps)
        for name, stats in results.items():
            ctx.add(
                "variables",
                target,
                case,
                name,
                stats,
                family=families.get(name, "floor" if name == FLOOR else "fastckpt"),
                variables=count,
                state_bytes=nbytes,
            )
        ctx.clear(target)
