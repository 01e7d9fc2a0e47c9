"""Extra host memory during background saves, each probe in a fresh process.

A fresh interpreter per probe keeps memory freed by earlier sections (which the allocator
could hand back without growing RSS) from hiding what a save really takes. The probe builds
the training model, takes its RSS, then saves `saves` times (one save in flight at a time,
as `fastckpt.ModelCheckpoint` does) while a thread samples RSS every 2 ms.

Run as `python -m fastckpt.bench.memory --probe fastckpt --folder DIR ...`; prints JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from typing import Any

import keras

from fastckpt.bench.context import Context, file_bytes, remove
from fastckpt.bench.measure import RssSampler, Stats, fmt_bytes, rss_bytes

PROBES = {
    "fastckpt": ("fastckpt .weights.h5 (background)", ".weights.h5", "fastckpt"),
    "keras_weights": ("keras model.save_weights", ".weights.h5", "keras"),
    "keras_model": ("keras model.save(.keras)", ".keras", "keras"),
}


def probe(kind: str, folder: str, weight_bytes: int, saves: int) -> dict[str, Any]:
    import fastckpt
    from fastckpt.bench.models import state_bytes, training_model

    setup = training_model(weight_bytes)
    model = setup.model
    name, suffix, _ = PROBES[kind]
    path = os.path.join(folder, f"memory{suffix}")
    gc.collect()
    baseline = rss_bytes()
    after = []
    size = 0
    with RssSampler() as sampler:
        for _ in range(saves):
            if kind == "fastckpt":
                fastckpt.save(model, path, background=True).result()
            elif kind == "keras_weights":
                model.save_weights(path)
            else:
                model.save(path)
            size = file_bytes(path)
            remove(path)
            after.append(rss_bytes())
    return {
        "contender": name,
        "state_bytes": state_bytes(model),
        "file_bytes": size,
        "baseline_rss": baseline,
        "peak_rss": sampler.peak,
        "rss_after_each": after,
        "samples": sampler.samples,
    }


def run_probe(kind: str, folder: str, weight_bytes: int, saves: int) -> dict[str, Any]:
    import fastckpt

    root = os.path.dirname(os.path.dirname(os.path.abspath(fastckpt.__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    env["KERAS_BACKEND"] = keras.backend.backend()
    cmd = [sys.executable, "-m", "fastckpt.bench.memory", "--probe", kind, "--folder", folder]
    cmd += ["--weight-bytes", str(weight_bytes), "--saves", str(saves)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"memory probe {kind} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_memory(ctx: Context) -> None:
    s = ctx.settings
    first = next(iter(ctx.targets))
    if s.memory_keras:
        plan = [("fastckpt", t, s.memory_saves) for t in ctx.targets]
        plan += [("keras_weights", first, 2), ("keras_model", first, 2)]
    else:
        plan = [("fastckpt", first, s.memory_saves)]
    for kind, target, saves in plan:
        ctx.progress.say(f"memory: {PROBES[kind][0]} on {target}, {saves} saves (fresh process)")
        got = run_probe(kind, ctx.targets[target], s.stall_weight_bytes, saves)
        extra_peak = got["peak_rss"] - got["baseline_rss"]
        after = got["rss_after_each"]
        ctx.add(
            "memory",
            target,
            f"{fmt_bytes(got['state_bytes'])} checkpoint, {saves} saves",
            got["contender"],
            {"rss_after_save": Stats([float(a - got["baseline_rss"]) for a in after])},
            family=PROBES[kind][2],
            state_bytes=got["state_bytes"],
            file_bytes=got["file_bytes"],
            saves=saves,
            extra_peak_bytes=extra_peak,
            extra_peak_ratio=extra_peak / got["state_bytes"],
            drift_bytes=after[-1] - after[0],
        )
        ctx.clear(target)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--probe", choices=sorted(PROBES), required=True)
    parser.add_argument("--folder", required=True)
    parser.add_argument("--weight-bytes", type=int, required=True)
    parser.add_argument("--saves", type=int, default=10)
    args = parser.parse_args(argv)
    print(json.dumps(probe(args.probe, args.folder, args.weight_bytes, args.saves)))


if __name__ == "__main__":
    main()
