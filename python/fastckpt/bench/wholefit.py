"""What a whole `fit` feels: the time checkpointing blocks training, first save and end-of-fit
wait included (performance.md, "Stall").

Each fit is a new model's first `fit` (a fresh model, compiled, trained from scratch), so the
first checkpoint is a real first one and every contender pays its own one-time costs. The
time `fit` spends inside the checkpoint callback's hooks is timed directly, hook by hook (a
callback right before and right after it would time the same), and divided by the number of
checkpoints: *per checkpoint*. Beside it: the first checkpoint (`on_train_begin` and every
hook up to the first save), the steady state (median hook of the later saves), the
end-of-fit wait (`on_train_end`, until every checkpoint is durable), and the whole fit's
time against a fit without a callback in the same round.

Cases: a short fit (3 checkpoints) and a long one (20), with checkpoints far apart (a
background write can end before the next) or back to back (every 2 steps); the copy floor
(one copy of the saved state into memory already touched, one thread) is measured in the
same rounds. One backend per process: `fastckpt bench` runs this module as a child for
each backend it can import (`python -m fastckpt.bench.wholefit --backend jax ...`), and
merges the records.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import subprocess
import sys
import time
from typing import Any

SECTION = "wholefit"
NO_CALLBACK = "fit without a callback"
COPY_FLOOR = "floor: copy of the state, 1 thread"


@dataclasses.dataclass(frozen=True)
class Case:
    """One schedule: `checkpoints` saves, one every `every` steps (`"epoch"`: at each
    epoch's end, epochs of `steps_per_epoch`)."""

    name: str
    checkpoints: int
    every: int | str
    steps_per_epoch: int
    contenders: tuple[str, ...]
    rounds: int

    @property
    def epochs(self) -> int:
        if self.every == "epoch":
            return self.checkpoints
        total = self.checkpoints * int(self.every)
        return -(-total // self.steps_per_epoch)

    @property
    def steps(self) -> int:
        return self.epochs * self.steps_per_epoch


# Contenders: who, and the file name it saves to (`{n}`: a new name for every checkpoint).
FASTCKPT = "fastckpt ModelCheckpoint"
KERAS = "keras ModelCheckpoint"
ALL_FORMATS = (
    f"{KERAS} .weights.h5",
    f"{KERAS} .keras",
    f"{KERAS} .h5",
    f"{FASTCKPT} .weights.h5",
    f"{FASTCKPT} .keras",
    f"{FASTCKPT} .h5",
    f"{FASTCKPT} .safetensors",
)


def cases(mode: str) -> list[Case]:
    """The cases of a mode; `quick` only checks that the section runs."""
    if mode == "quick":
        pair = (f"{KERAS} .weights.h5", f"{FASTCKPT} .weights.h5")
        return [
            Case("far apart, short fit", 2, "epoch", 3, pair, 1),
            Case("back to back, short fit", 2, 2, 4, pair, 1),
        ]
    rounds = 3 if mode == "full" else 2
    pair = (f"{KERAS} .weights.h5", f"{FASTCKPT} .weights.h5")
    return [
        Case(
            "far apart, short fit",
            3,
            "epoch",
            12,
            (*pair, f"{KERAS} .keras", f"{FASTCKPT} .keras"),
            rounds,
        ),
        Case("far apart, long fit", 20, "epoch", 12, pair, 1),
        Case(
            "back to back, short fit",
            3,
            2,
            6,
            (*ALL_FORMATS, f"{FASTCKPT} {{n}}.weights.h5"),
            rounds,
        ),
        Case("back to back, long fit", 20, 2, 8, (*pair, f"{FASTCKPT} {{n}}.weights.h5"), 1),
    ]


def _hook_timer(inner: Any) -> Any:
    """Wraps a callback; records every hook call's seconds in order."""
    import keras

    class HookTimer(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.inner = inner
            self.async_safe = getattr(inner, "async_safe", False)
            self.calls: list[tuple[str, float]] = []

        def set_model(self, model):
            super().set_model(model)
            self.inner.set_model(model)

        def set_params(self, params):
            super().set_params(params)
            self.inner.set_params(params)

        def _timed(self, hook: str, *args: Any, **kwargs: Any) -> None:
            start = time.perf_counter()
            try:
                getattr(self.inner, hook)(*args, **kwargs)
            finally:
                self.calls.append((hook, time.perf_counter() - start))

    for hook in (
        "on_train_begin",
        "on_train_end",
        "on_epoch_begin",
        "on_epoch_end",
        "on_train_batch_begin",
        "on_train_batch_end",
    ):

        def method(self, *args, _hook=hook, **kwargs):
            self._timed(_hook, *args, **kwargs)

        setattr(HookTimer, hook, method)
    return HookTimer()


def _save_hooks(case: Case, calls: list[tuple[str, float]]) -> list[int]:
    """Indexes into `calls` of the hooks where a save was due."""
    out, step = [], 0
    for i, (hook, _) in enumerate(calls):
        if case.every == "epoch" and hook == "on_epoch_end":
            out.append(i)
        elif case.every != "epoch" and hook == "on_train_batch_end":
            step += 1
            if step % int(case.every) == 0:
                out.append(i)
    return out[: case.checkpoints]


def summarize(case: Case, calls: list[tuple[str, float]]) -> dict[str, float]:
    """Per checkpoint, first checkpoint, steady state and end-of-fit wait of one fit."""
    saves = _save_hooks(case, calls)
    total = sum(s for _, s in calls)
    first = sum(s for _, s in calls[: saves[0] + 1]) if saves else 0.0
    later = sorted(calls[i][1] for i in saves[1:])
    steady = later[len(later) // 2] if later else 0.0
    end = sum(s for hook, s in calls if hook == "on_train_end")
    return {
        "per_checkpoint": total / max(len(saves), 1),
        "first": first,
        "steady": steady,
        "end_of_fit_wait": end,
        "blocked": total,
    }


class Bench:
    """Models, data and contenders for one backend in this process."""

    def __init__(self, width: int, depth: int, batch: int, folder: str) -> None:
        import numpy as np

        self.width, self.depth, self.batch, self.folder = width, depth, batch, folder
        rng = np.random.default_rng(0)
        self.x = rng.standard_normal((64 * batch, width), dtype=np.float32)
        self.y = np.zeros_like(self.x)

    def model(self) -> Any:
        import keras

        keras.utils.set_random_seed(0)
        layers = [keras.layers.Dense(self.width) for _ in range(self.depth)]
        model = keras.Sequential([keras.Input((self.width,)), *layers])
        model.compile(optimizer="adam", loss="mse")
        return model

    def callback(self, contender: str, case: Case) -> Any:
        import keras

        import fastckpt

        who, name = contender.rsplit(" ", 1)
        suffix = name.replace("{n}", "")
        stem = "{epoch}-{batch}" if "{n}" in name else "ckpt"
        if case.every == "epoch" and "{n}" in name:
            stem = "{epoch}"
        path = os.path.join(self.folder, f"{stem}{suffix}")
        weights_only = suffix in (".weights.h5", ".safetensors")
        if who == KERAS:
            return keras.callbacks.ModelCheckpoint(
                path, save_weights_only=weights_only, save_freq=case.every
            )
        return fastckpt.ModelCheckpoint(path, save_weights_only=weights_only, save_freq=case.every)

    def fit(self, case: Case, callback: Any | None) -> tuple[float, Any]:
        import numpy as np

        model = self.model()
        n = case.steps_per_epoch * self.batch
        idx = np.arange(n) % len(self.x)
        start = time.perf_counter()
        model.fit(
            self.x[idx],
            self.y[idx],
            batch_size=self.batch,
            epochs=case.epochs,
            shuffle=False,
            verbose=0,
            callbacks=[callback] if callback is not None else [],
        )
        return time.perf_counter() - start, model

    def copy_floor(self, model: Any) -> float:
        from fastckpt.bench import floors

        views = floors.state_views(model)
        return floors.SnapshotFloor(views)()

    def clear(self) -> None:
        for name in os.listdir(self.folder):
            os.remove(os.path.join(self.folder, name))


def run_backend(
    backend: str, mode: str, targets: dict[str, str], say: Any = print
) -> list[dict[str, Any]]:
    """Runs every case on every target in this process (whose Keras backend is `backend`);
    returns the records."""
    from fastckpt.bench.measure import Stats
    from fastckpt.bench.models import state_bytes

    width, depth = (2048, 12) if mode != "quick" else (512, 4)
    records: list[dict[str, Any]] = []
    for target, folder in targets.items():
        bench = Bench(width, depth, 64 if mode != "quick" else 16, folder)
        for case in cases(mode):
            if target != next(iter(targets)) and "long" in case.name:
                continue  # long fits on the first target only: they take minutes each
            runs: dict[str, dict[str, list[float]]] = {}
            names = (NO_CALLBACK, *case.contenders)
            say(
                f"wholefit ({backend}): {case.name} on {target}: {len(names)} fits x "
                f"{case.rounds} rounds, {case.checkpoints} checkpoints each"
            )
            state = 0
            for rnd in range(case.rounds):
                shift = rnd % len(names)
                for name in names[shift:] + names[:shift]:
                    gc.collect()
                    timer = None if name == NO_CALLBACK else bench.callback(name, case)
                    callback = None if timer is None else _hook_timer(timer)
                    seconds, model = bench.fit(case, callback)
                    got = {"fit_seconds": seconds}
                    if callback is not None:
                        got.update(summarize(case, callback.calls))
                    else:
                        got[COPY_FLOOR] = min(bench.copy_floor(model) for _ in range(3))
                        state = state_bytes(model)
                    for k, v in got.items():
                        runs.setdefault(name, {}).setdefault(k, []).append(v)
                    del model, callback, timer
                    bench.clear()
            floor = runs[NO_CALLBACK].pop(COPY_FLOOR)
            extra = {
                "backend": backend,
                "state_bytes": state,
                "checkpoints": case.checkpoints,
                "every": case.every,
                "steps": case.steps,
            }
            label = f"{case.name}, {backend}"
            for name, q in [(COPY_FLOOR, {"seconds": floor}), *runs.items()]:
                family = (
                    "floor"
                    if name == COPY_FLOOR
                    else "baseline"
                    if name == NO_CALLBACK
                    else "fastckpt"
                    if name.startswith(FASTCKPT)
                    else "keras"
                )
                records.append(
                    {
                        "section": SECTION,
                        "target": target,
                        "case": label,
                        "contender": name,
                        "family": family,
                        "available": True,
                        "note": "",
                        "quantities": {k: Stats(v).to_json() for k, v in q.items()},
                        **extra,
                    }
                )
    return records


def backends_available() -> list[str]:
    """The Keras backends whose framework this environment can import."""
    import importlib.util

    out = []
    for backend, module in (("tensorflow", "tensorflow"), ("jax", "jax"), ("torch", "torch")):
        if importlib.util.find_spec(module) is not None:
            out.append(backend)
    return out


def run_children(mode: str, targets: dict[str, str], say: Any) -> list[dict[str, Any]]:
    """Runs `run_backend` in a child process per backend (the Keras backend is chosen at
    import), and returns their records. A child that fails is reported, not fatal."""
    records: list[dict[str, Any]] = []
    for backend in backends_available():
        if backend == "torch":
            continue  # torch's snapshot is issue [4/6]'s: not measured here yet
        out = os.path.join(next(iter(targets.values())), f"wholefit-{backend}.json")
        env = {**os.environ, "KERAS_BACKEND": backend}
        cmd = [sys.executable, "-m", "fastckpt.bench.wholefit"]
        cmd += ["--backend", backend, "--mode", mode, "--json", out]
        for name, folder in targets.items():
            cmd += ["--target", f"{name}={folder}"]
        proc = subprocess.run(cmd, env=env, stdout=sys.stdout, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"wholefit on {backend} failed:\n{proc.stderr[-3000:]}")
        with open(out) as f:
            records += json.load(f)
        os.remove(out)
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", required=True)
    parser.add_argument("--mode", default="default", choices=("quick", "default", "full"))
    parser.add_argument("--target", action="append", required=True, metavar="NAME=FOLDER")
    parser.add_argument("--json", required=True)
    args = parser.parse_args(argv)
    if os.environ.get("KERAS_BACKEND") != args.backend:
        parser.error(f"run with KERAS_BACKEND={args.backend}")
    targets = {}
    for spec in args.target:
        name, folder = spec.split("=", 1)
        targets[name] = os.path.join(folder, f"wholefit-{args.backend}")
        os.makedirs(targets[name], exist_ok=True)
    from fastckpt.bench.measure import Progress

    progress = Progress()
    records = run_backend(args.backend, args.mode, targets, progress.say)
    with open(args.json, "w") as f:
        json.dump(records, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
