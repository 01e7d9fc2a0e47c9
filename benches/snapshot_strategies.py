"""Which snapshot is fastest *including what it costs the next training steps*?

TensorFlow CPU, a model with ~0.75 GiB of state (weights + Adam). For each strategy: the
snapshot's own time (the stall), and the time of the next training step against a step
with no snapshot held (TensorFlow copies a variable's buffer on write while a snapshot
still references it). Interleaved, medians of `--repeats`.

- `arena` (what fastckpt does): read each variable, copy large ones into host buffers
  reused from one save to the next; the variables' buffers are released at once.
- `zero-copy`: hold the read tensors (DLPack views) until the write is done.
- `fresh`: `.numpy()` per variable, new memory each time (what Keras's save does).

    python benches/snapshot_strategies.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np

from fastckpt import _readers, _snapshot, _walk


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    width = 4096
    model = keras.Sequential(
        [keras.Input((width,))] + [keras.layers.Dense(width) for _ in range(4)]
    )
    model.compile(optimizer="adam", loss="mse")
    x = np.ones((8, width), "float32")
    model.train_on_batch(x, x)
    plan = _walk.plan_for(model)
    nbytes = sum(v.numpy().nbytes for v in model.variables + model.optimizer.variables)
    snapshotter = _snapshot.snapshotter_for(plan)

    def arena():
        return snapshotter.take()

    def zero_copy():
        from tensorflow.python.ops import gen_resource_variable_ops as ops

        return [
            _readers._host_view(ops.read_variable_op(e.source.value.handle, e.source.value.dtype))
            for e in plan.entries
        ]

    def fresh():
        return [np.asarray(e.source.numpy()) for e in plan.entries]

    def step():
        start = time.perf_counter()
        model.train_on_batch(x, x)
        return time.perf_counter() - start

    strategies = {"arena": arena, "zero-copy": zero_copy, "fresh": fresh}
    for fn in strategies.values():  # warm-up (and the arena's first touch)
        fn()
        step()
    stall = {k: [] for k in strategies}
    next_step = {k: [] for k in strategies}
    plain = []
    for _ in range(args.repeats):
        plain.append(step())
        for name, fn in strategies.items():
            start = time.perf_counter()
            held = fn()
            stall[name].append(time.perf_counter() - start)
            next_step[name].append(step())  # the snapshot is still held, as during a write
            del held
            step()
    base = statistics.median(plain)
    print(f"state {nbytes / 2**30:.2f} GiB; a training step alone: {base * 1e3:.1f} ms (median)")
    print(f"{'strategy':10} {'stall':>9} {'next step':>10} {'extra':>9} {'stall + extra':>14}")
    for name in strategies:
        s, n = statistics.median(stall[name]), statistics.median(next_step[name])
        print(
            f"{name:10} {s * 1e3:7.1f}ms {n * 1e3:8.1f}ms {(n - base) * 1e3:7.1f}ms "
            f"{(s + n - base) * 1e3:12.1f}ms"
        )


if __name__ == "__main__":
    main()
