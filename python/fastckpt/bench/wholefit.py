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

What a background writer costs outside the hooks shows in the training steps: each step is
timed from the last callback's `on_train_batch_begin` to the first callback's
`on_train_batch_end` (the step alone, no hook in it), and their sum is compared with the
fit without a callback in the same process. *Felt per checkpoint* adds the two: hooks plus
the steps' extra time, over the checkpoints, the cost a user feels in the fit's length
without the multi-second stalls that this VM puts between some steps of every fit
(performance.md, "Stall").

Cases: a short fit (3 checkpoints) and a long one (20), with checkpoints far apart (a
background write can end before the next) or back to back (every 2 steps); the copy floor
(one copy of the saved state into memory already touched, one thread) is measured in the
same rounds. Each round runs in a child process (`python -m fastckpt.bench.wholefit`), for
each backend this environment can import, and the parent merges the rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
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
    # A new file name for every checkpoint: nothing to drop, no file to write into again.
    named = (f"{KERAS} {{n}}.weights.h5", f"{FASTCKPT} {{n}}.weights.h5")
    return [
        Case(
            "far apart, short fit",
            3,
            "epoch",
            12,
            (*pair, f"{KERAS} .keras", f"{FASTCKPT} .keras"),
            rounds,
        ),
        Case("far apart, long fit", 20, "epoch", 8, pair, 1),
        Case("back to back, short fit", 3, 2, 6, (*ALL_FORMATS, *named), rounds),
        Case("back to back, long fit", 20, 2, 8, (*pair, *named), 1),
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


class StepClock:
    """Times each training step alone: a callback placed last starts the clock when every
    other `on_train_batch_begin` has run, one placed first stops it before any
    `on_train_batch_end` runs."""

    def __init__(self) -> None:
        import keras

        self.seconds: list[float] = []
        clock = self

        class Start(keras.callbacks.Callback):
            def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
                clock._began = time.perf_counter()

        class Stop(keras.callbacks.Callback):
            def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
                clock.seconds.append(time.perf_counter() - clock._began)

        self._began = 0.0
        self.start, self.stop = Start(), Stop()

    def around(self, callback: Any | None) -> list[Any]:
        """The callback list of a fit: `callback` between the clock's two halves."""
        return [self.stop, *([] if callback is None else [callback]), self.start]


def summarize(case: Case, calls: list[tuple[str, float]]) -> dict[str, float]:
    """Per checkpoint, first checkpoint, steady state and end-of-fit wait of one fit."""
    saves = _save_hooks(case, calls)
    total = sum(s for _, s in calls)
    first = sum(s for _, s in calls[: saves[0] + 1]) if saves else 0.0
    later = sorted(calls[i][1] for i in saves[1:])
    steady = later[len(later) // 2] if later else 0.0
    end = sum(s for hook, s in calls if hook == "on_train_end")
    begin = sum(s for hook, s in calls if hook == "on_train_begin")
    return {
        "per_checkpoint": total / max(len(saves), 1),
        "train_begin": begin,
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

    def fit(self, case: Case, callback: Any | None) -> tuple[float, list[float], Any]:
        """A new model's fit with `callback`: its seconds, each step's seconds, the model."""
        import numpy as np

        model = self.model()
        n = case.steps_per_epoch * self.batch
        idx = np.arange(n) % len(self.x)
        clock = StepClock()
        start = time.perf_counter()
        model.fit(
            self.x[idx],
            self.y[idx],
            batch_size=self.batch,
            epochs=case.epochs,
            shuffle=False,
            verbose=0,
            callbacks=clock.around(callback),
        )
        return time.perf_counter() - start, clock.seconds, model

    def copy_floor(self, model: Any) -> float:
        from fastckpt.bench import floors

        views = floors.state_views(model)
        return floors.SnapshotFloor(views)()

    def clear(self) -> None:
        for name in os.listdir(self.folder):
            # fastckpt removes its kept files on a thread of its own: they may go first.
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(self.folder, name))


def run_round(
    backend: str, mode: str, case_index: int, round_index: int, folder: str
) -> dict[str, dict[str, float]]:
    """One round of one case in this process (whose Keras backend is `backend`): every
    contender's fit once, in an order rotated by the round. Returns {contender: figures}."""
    from fastckpt.bench.models import state_bytes

    quick = mode == "quick"
    case = cases(mode)[case_index]
    bench = Bench(512 if quick else 2048, 4 if quick else 12, 16 if quick else 64, folder)
    names = (NO_CALLBACK, *case.contenders)
    shift = round_index % len(names)
    out: dict[str, dict[str, float]] = {}
    for name in names[shift:] + names[:shift]:
        gc.collect()
        inner = None if name == NO_CALLBACK else bench.callback(name, case)
        timer = None if inner is None else _hook_timer(inner)
        seconds, steps, model = bench.fit(case, timer)
        got = {"fit_seconds": seconds, "steps": sum(steps), "first_step": steps[0]}
        if timer is not None:
            got.update(summarize(case, timer.calls))
        else:
            got[COPY_FLOOR] = min(bench.copy_floor(model) for _ in range(3))
            got["state_bytes"] = state_bytes(model)
        out[name] = got
        del model, timer, inner
        bench.clear()
    # What each callback cost the steps, against the fit without one in this process.
    plain = out[NO_CALLBACK]["steps"]
    for name, got in out.items():
        if name != NO_CALLBACK:
            got["extra_steps"] = got["steps"] - plain
            got["felt"] = (got["blocked"] + got["extra_steps"]) / case.checkpoints
    return out


def run_backend(
    backend: str, mode: str, targets: dict[str, str], say: Any = print
) -> list[dict[str, Any]]:
    """Runs every case on the targets, each round in a child process of its own (one
    backend per process, chosen at import; and TensorFlow keeps about a checkpoint's worth
    of memory for every model a process has trained, so many fresh models in one process
    would run out); returns the records."""
    from fastckpt.bench.measure import Stats

    records: list[dict[str, Any]] = []
    first_target = next(iter(targets))
    for target, folder in targets.items():
        for i, case in enumerate(cases(mode)):
            if target != first_target and (backend != "tensorflow" or "short" not in case.name):
                continue  # the other targets: short fits, one backend (minutes each)
            say(
                f"wholefit ({backend}): {case.name} on {target}: "
                f"{len(case.contenders) + 1} fits x {case.rounds} rounds, "
                f"{case.checkpoints} checkpoints each"
            )
            runs: dict[str, dict[str, list[float]]] = {}
            for rnd in range(case.rounds):
                for name, got in _child_round(backend, mode, i, rnd, folder).items():
                    for k, v in got.items():
                        runs.setdefault(name, {}).setdefault(k, []).append(v)
            floor = runs[NO_CALLBACK].pop(COPY_FLOOR)
            extra = {
                "backend": backend,
                "state_bytes": int(runs[NO_CALLBACK].pop("state_bytes")[0]),
                "checkpoints": case.checkpoints,
                "every": case.every,
                "steps": case.steps,
            }
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
                        "case": f"{case.name}, {backend}",
                        "contender": name,
                        "family": family,
                        "available": True,
                        "note": "",
                        "quantities": {k: Stats(v).to_json() for k, v in q.items()},
                        **extra,
                    }
                )
    return records


def _child_round(
    backend: str, mode: str, case: int, rnd: int, folder: str
) -> dict[str, dict[str, float]]:
    out = os.path.join(folder, f".round-{backend}-{case}-{rnd}.json")
    cmd = [sys.executable, "-m", "fastckpt.bench.wholefit", "--backend", backend]
    cmd += ["--mode", mode, "--case", str(case), "--round", str(rnd)]
    cmd += ["--folder", folder, "--json", out]
    env = {**os.environ, "KERAS_BACKEND": backend}
    proc = subprocess.run(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if "WARNING" not in line]
        raise RuntimeError(
            f"wholefit on {backend}, case {case}, round {rnd} failed (exit status "
            f"{proc.returncode}):\n" + "\n".join(lines[-40:])
        )
    with open(out) as f:
        got = json.load(f)
    os.remove(out)
    return got


def backends_available() -> list[str]:
    """The Keras backends whose framework this environment can import (torch is not in
    the bench environment by default: run the bench from `.venv-torch` to include it)."""
    import importlib.util

    from fastckpt.bench.settings import BACKENDS

    return [b for b in BACKENDS if importlib.util.find_spec(b) is not None]


def run_all(
    mode: str, targets: dict[str, str], say: Any, backends: Sequence[str] = ()
) -> list[dict[str, Any]]:
    """The section, for `backends` (default: every backend available)."""
    available = backends_available()
    missing = [b for b in backends if b not in available]
    if missing:
        raise ValueError(
            f"whole-fit backend(s) {missing} cannot be imported here; this environment has "
            f"{', '.join(available) or 'none'}"
        )
    records: list[dict[str, Any]] = []
    for backend in backends or available:
        folders = {}
        for name, folder in targets.items():
            folders[name] = os.path.join(folder, f"wholefit-{backend}")
            os.makedirs(folders[name], exist_ok=True)
        records += run_backend(backend, mode, folders, say)
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="One round of a whole-fit case (a child).")
    parser.add_argument("--backend", required=True)
    parser.add_argument("--mode", default="default", choices=("quick", "default", "full"))
    parser.add_argument("--case", type=int, required=True)
    parser.add_argument("--round", type=int, required=True)
    parser.add_argument("--folder", required=True)
    parser.add_argument("--json", required=True)
    args = parser.parse_args(argv)
    if os.environ.get("KERAS_BACKEND") != args.backend:
        parser.error(f"run with KERAS_BACKEND={args.backend}")
    got = run_round(args.backend, args.mode, args.case, args.round, args.folder)
    with open(args.json, "w") as f:
        json.dump(got, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
