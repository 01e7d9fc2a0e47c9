"""Could `ModelCheckpoint` let Keras run its batch hooks off the training thread?

Under thread-safe backends (JAX, torch) Keras dispatches `on_train_batch_end` to a thread
pool when every callback that overrides it sets `async_safe = True`; the training loop
goes on to the next step meanwhile. This measures, for each such backend, what a snapshot
taken in such a hook gets, against the same training with the hook on the training thread:

- torn: snapshots that differ from the synchronous run's snapshot of the same step (a
  snapshot racing with the next step's in-place updates, or reading state half-synced);
- failed: snapshots that raised (under JAX, reading buffers the next step donated);
- diverged: whether training itself ended elsewhere (under JAX the hook's state sync can
  hand an older step's state back to the loop);
- the fit's wall time and the time spent in the hooks, with each dispatch.

Same data, same seed, same order in both runs, so any difference is the dispatch's.

    python benches/async_hooks.py [--steps 60] [--every 2] [--width 1024]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from typing import Any


def child(steps: int, every: int, width: int, dispatch: str) -> dict[str, Any]:
    import keras
    import numpy as np

    from fastckpt import _snapshot, _walk

    class Snapshots(keras.callbacks.Callback):
        """Takes fastckpt's snapshot every `every` steps, keeping a digest of each."""

        def __init__(self, async_safe: bool) -> None:
            super().__init__()
            self.async_safe = async_safe
            self.digests: dict[int, str] = {}
            self.failed = 0
            self.seconds = 0.0

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            if (batch + 1) % every:
                return
            start = time.perf_counter()
            try:
                snap = _snapshot.snapshot(_walk.plan_for(self.model), background=True)
                digest = hashlib.blake2b()
                for a in snap.arrays:
                    digest.update(np.ascontiguousarray(a).tobytes())
                snap.release()
                self.digests[batch] = digest.hexdigest()
            except Exception:  # what an off-thread read of donated buffers raises
                self.failed += 1
            self.seconds += time.perf_counter() - start

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((width,)), keras.layers.Dense(width), keras.layers.Dense(width)]
    )
    model.compile(optimizer="adam", loss="mse")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(steps * 8, width)).astype("float32")
    callback = Snapshots(async_safe=dispatch == "async")
    model.fit(x, x, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[callback])
    start = time.perf_counter()
    model.fit(x, x, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[callback])
    wall = time.perf_counter() - start
    final = hashlib.blake2b()
    for v in model.weights:
        final.update(np.asarray(keras.ops.convert_to_numpy(v.value)).tobytes())
    callbacks = keras.callbacks.CallbackList([callback], model=model)
    return {
        "backend": keras.backend.backend(),
        "dispatch": dispatch,
        "keras_dispatched_async": callbacks._async_train,
        "digests": callback.digests,
        "failed": callback.failed,
        "final": final.hexdigest(),
        "fit_s": wall,
        "hook_s": callback.seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=2)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--backends", default="jax,torch")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.steps, args.every, args.width, args.child)))
        return
    for backend in args.backends.split(","):
        runs = {}
        for dispatch in ("sync", "async"):
            env = {**os.environ, "KERAS_BACKEND": backend}
            cmd = [
                sys.executable,
                __file__,
                f"--child={dispatch}",
                f"--steps={args.steps}",
                f"--every={args.every}",
                f"--width={args.width}",
            ]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"{backend} {dispatch}: failed\n{done.stderr[-3000:]}", file=sys.stderr)
                break
            runs[dispatch] = json.loads(done.stdout.strip().splitlines()[-1])
        if len(runs) < 2:
            continue
        sync, par = runs["sync"], runs["async"]
        torn = sum(1 for b, d in par["digests"].items() if sync["digests"].get(b) != d)
        print(
            f"{backend}: Keras dispatched async: {par['keras_dispatched_async']}; "
            f"{len(par['digests'])} snapshots off the training thread, {torn} torn, "
            f"{par['failed']} failed; training diverged: {par['final'] != sync['final']}; "
            f"fit {sync['fit_s']:.2f} s (hooks {sync['hook_s']:.2f} s) synchronous, "
            f"{par['fit_s']:.2f} s (hooks {par['hook_s']:.2f} s) async "
            f"({par['fit_s'] / sync['fit_s']:.2f}x)"
        )


if __name__ == "__main__":
    main()
