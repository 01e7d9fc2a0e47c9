"""Device-to-host snapshot cost on a GPU (never part of CI: run by hand where a GPU is).

Keras's save path reads each variable to host separately (`convert_to_numpy`); a
checkpoint only needs *one* consistent copy of all of them, so batching the transfers and
landing them in host memory that is already touched (and, for torch, pinned) is the floor.
For each backend available (`KERAS_BACKEND=jax` or `torch`) this prints, for a model with
~1 GiB of state (weights + Adam):

- per-variable `convert_to_numpy` (what `save_weights` pays),
- one batched transfer into fresh host memory,
- one batched transfer into a reused host arena (pinned for torch),
- `fastckpt.save(..., background=True)`: the time until training could go on,
and the ratio of each to the arena floor.

    KERAS_BACKEND=jax python benches/gpu_snapshot.py [--gib 1.0] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import keras
import numpy as np


def build(gib: float) -> keras.Model:
    width = 4096
    # Adam keeps two slots per weight: state = 3 x weights.
    layers = max(1, round(gib * 2**30 / 3 / (width * width * 4)))
    model = keras.Sequential(
        [keras.Input((width,))] + [keras.layers.Dense(width) for _ in range(layers)]
    )
    model.compile(optimizer="adam", loss="mse")
    x = np.ones((64, width), "float32")
    model.fit(x, x, epochs=1, batch_size=64, verbose=0)
    return model


def timeit(fn, repeats: int, refresh=None) -> tuple[float, float, float]:
    """Median, min and max of `repeats` timed calls; `refresh` (untimed) gives the
    variables new device buffers first, as a training step would: JAX caches an array's
    host copy, so timing repeated reads of unchanged arrays would measure the cache."""
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if refresh is not None:
            refresh()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times), max(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    backend = keras.backend.backend()
    model = build(args.gib)
    variables = list(model.variables) + list(model.optimizer.variables)
    nbytes = sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in variables)
    print(f"backend {backend}, {len(variables)} variables, {nbytes / 2**30:.2f} GiB of state")

    from keras.src import backend as kb

    def refresh():
        for v in variables:
            v.assign(v.value + 0)
        keras.ops.convert_to_numpy(
            variables[-1].value[..., :1] if variables[-1].shape else variables[-1].value
        )

    results = {}
    results["per-variable convert_to_numpy"] = timeit(
        lambda: [np.asarray(kb.convert_to_numpy(v)) for v in variables], args.repeats, refresh
    )
    if backend == "jax":
        import jax

        values = lambda: [v.value for v in variables]  # noqa: E731
        results["batched jax.device_get (fresh memory)"] = timeit(
            lambda: jax.device_get(values()), args.repeats, refresh
        )
        arena = [np.empty(v.shape, np.dtype(v.dtype)) for v in variables]
        for a in arena:
            a.fill(0)

        def into_arena():
            for a, host in zip(arena, jax.device_get(values()), strict=True):
                np.copyto(a, host)

        results["batched device_get + copy into reused arena"] = timeit(
            into_arena, args.repeats, refresh
        )
    elif backend == "torch":
        import torch

        pinned = [
            torch.empty(tuple(v.shape), dtype=v.value.dtype, pin_memory=True) for v in variables
        ]

        def into_pinned():
            for p, v in zip(pinned, variables, strict=True):
                p.copy_(v.value, non_blocking=True)
            torch.cuda.synchronize()

        results["non-blocking copies into reused pinned buffers"] = timeit(
            into_pinned, args.repeats, refresh
        )
        results["batched .cpu() (fresh memory)"] = timeit(
            lambda: [v.value.cpu() for v in variables], args.repeats, refresh
        )

    import fastckpt

    folder = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    path = os.path.join(folder, f"gpu-snapshot-{os.getpid()}.safetensors")
    jobs = []

    def background_save():
        job = fastckpt.save(model, path, background=True)
        jobs.append(job)

    def stall():
        background_save()

    median = []
    for _ in range(args.repeats + 1):
        refresh()
        start = time.perf_counter()
        stall()
        median.append(time.perf_counter() - start)
        jobs[-1].result()
    results["fastckpt.save(background=True) until it returns"] = (
        statistics.median(median[1:]),
        min(median[1:]),
        max(median[1:]),
    )
    write = jobs[-1].result()
    os.remove(path)

    floor = (
        min(r[0] for k, r in results.items() if "arena" in k or "pinned" in k)
        if any("arena" in k or "pinned" in k for k in results)
        else None
    )
    print(f"{'snapshot':55} {'median':>9} {'min':>9} {'max':>9} {'GB/s':>7} {'x floor':>8}")
    for name, (med, lo, hi) in results.items():
        ratio = f"{med / floor:8.2f}" if floor else "       -"
        print(
            f"{name:55} {med * 1e3:7.1f}ms {lo * 1e3:7.1f}ms {hi * 1e3:7.1f}ms "
            f"{nbytes / med / 1e9:7.2f} {ratio}"
        )
    print(f"background write of {write.bytes / 2**30:.2f} GiB took {write.seconds:.2f} s")


if __name__ == "__main__":
    main()
