"""The snapshot on every backend and device: Keras's path, fastckpt's, and the copy floor,
as ratios measured in one run (never part of CI; the GPU figures need a machine with one).

A checkpoint stalls training for as long as it takes to get one consistent copy of the
state into host memory. For each backend installed (TensorFlow, JAX, torch; each in a
child process, since Keras picks its backend at import) and a model with `--gib` of state
(Dense 4096x4096 weights + Adam's two slots), on whatever device Keras puts it:

- Keras: per-variable `convert_to_numpy`, what `save_weights` pays to read the state.
- fastckpt: `fastckpt.save(..., background=True)` until it returns (the snapshot and the
  hand-off to the writer: the stall a `ModelCheckpoint` save adds), and the snapshot alone.
- floor: on a GPU, one transfer of all the bytes from a single device buffer into pinned
  host memory (torch: non-blocking copies into reused pinned buffers, waited for once);
  on a CPU, one thread copying the state into host memory already touched.

After the rounds, the last file saved and a new snapshot are compared with what Keras reads
from the variables, byte for byte: on a GPU that checks the device path on real hardware
(exit status 1 if a value differs or a backend's run failed; one not installed is skipped).

Each figure is a median of `--repeats` interleaved rounds (one run of each contender a
round), each run after a step that gives every variable a new value (JAX caches an
array's host copy: repeated reads of unchanged arrays would measure the cache).

    python benches/gpu_snapshot.py [--gib 1.0] [--repeats 5] [--backends jax,torch]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

BACKENDS = ("tensorflow", "jax", "torch")


def build(gib: float) -> Any:
    import keras
    import numpy as np

    width = 4096 if gib >= 0.5 else 1024
    # Adam keeps two slots per weight: state = 3 x weights.
    layers = max(1, round(gib * 2**30 / 3 / (width * width * 4)))
    model = keras.Sequential(
        [keras.Input((width,))] + [keras.layers.Dense(width) for _ in range(layers)]
    )
    model.compile(optimizer="adam", loss="mse")
    x = np.ones((64, width), "float32")
    model.fit(x, x, epochs=1, batch_size=64, verbose=0)
    return model


def interleaved_ms(
    contenders: dict[str, Callable[[], Any]], repeats: int, refresh: Callable[[], None]
) -> dict[str, tuple[float, float, float]]:
    """(median, min, max) milliseconds of each contender, measured in interleaved rounds
    (one run of each per round, each after `refresh`), so that a noisy stretch of the
    machine spoils every contender alike."""
    for fn in contenders.values():
        refresh()
        fn()  # warm-up: compiles, allocates what is reused
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            refresh()
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {n: (statistics.median(t), min(t), max(t)) for n, t in times.items()}


def child(gib: float, repeats: int) -> dict[str, Any]:
    """Runs in the backend's own process: the measurements, as a dict."""
    import keras
    import numpy as np

    import fastckpt
    from fastckpt import _snapshot, _walk

    backend = keras.backend.backend()
    model = build(gib)
    variables = list(model.variables) + list(model.optimizer.variables)
    nbytes = sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in variables)

    def sync() -> None:
        # Every new value computed before a timer starts (JAX and CUDA dispatch work
        # asynchronously): what is timed is the copy, not the step that made the values.
        if backend == "jax":
            import jax

            jax.block_until_ready([v.value for v in variables])
        elif backend == "torch":
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()
        else:
            keras.ops.convert_to_numpy(keras.ops.sum(variables[0].value))

    def refresh() -> None:
        for v in variables:
            v.assign(v.value + keras.ops.cast(0, v.dtype))
        sync()

    device, floor = _floor(backend, variables, nbytes)
    from keras.src import backend as kb

    plan = _walk.plan_for(model)
    snapper = _snapshot.snapshotter_for(plan)
    snapper.prepare(1)
    folder = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    path = os.path.join(folder, f"gpu-snapshot-{os.getpid()}.safetensors")
    jobs: list[Any] = []

    def background_save() -> None:
        jobs.append(fastckpt.save(model, path, background=True))

    def refresh_after_write() -> None:
        if jobs:
            jobs[-1].result()  # the previous write ends before the next stall is timed
        refresh()

    timed = interleaved_ms(
        {
            "keras": lambda: [np.asarray(kb.convert_to_numpy(v)) for v in variables],
            "floor": floor,
            "snapshot": lambda: snapper.take(background=True).release(),
            "save": background_save,
        },
        repeats,
        refresh_after_write,
    )
    jobs[-1].result()
    # The state has not changed since the last save: its file, and a snapshot taken now,
    # must hold what Keras reads, byte for byte (on a GPU, the one check of the device
    # path against real hardware).
    wrong = _differences(plan, path, snapper.take(background=True))
    os.remove(path)
    result: dict[str, Any] = {
        "wrong": wrong,
        "backend": backend,
        "device": device,
        "variables": len(variables),
        "bytes": nbytes,
        "reader": type(snapper._read).__name__,
        "on_device": bool(snapper._read is not None and snapper._read.on_device),
    }
    for name, (median, low, high) in timed.items():
        result[f"{name}_ms"] = median
        result[f"{name}_range_ms"] = [low, high]
    return result


def _differences(plan: Any, path: str, snap: Any) -> list[str]:
    """The values (by path) where the file at `path` or the snapshot `snap` differ from
    what Keras reads from the variables now."""
    import numpy as np
    import safetensors.numpy
    from keras.src import backend as kb

    try:
        saved = safetensors.numpy.load_file(path)
        wrong = []
        for entry, taken in zip(plan.entries, snap.arrays, strict=True):
            want = np.asarray(kb.convert_to_numpy(entry.source))
            for what, got in (("file", saved.get(entry.path)), ("snapshot", taken)):
                if got is None or np.asarray(got).tobytes() != want.tobytes():
                    wrong.append(f"{entry.path} ({what})")
        return wrong
    finally:
        snap.release()


def _floor(backend: str, variables: list[Any], nbytes: int) -> tuple[str, Callable[[], None]]:
    """The device the state lives on, and the copy floor there."""
    import numpy as np

    if backend == "torch":
        import torch

        values = [v.value for v in variables]
        if values[0].device.type == "cuda":
            pinned = [torch.empty_like(t, device="cpu").pin_memory() for t in values]
            stream = torch.cuda.Stream()

            def pinned_copies() -> None:
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    for p, v in zip(pinned, variables, strict=True):
                        p.copy_(v.value.detach(), non_blocking=True)
                stream.synchronize()

            return f"cuda ({torch.cuda.get_device_name()})", pinned_copies
    if backend == "jax":
        import jax

        dev = next(iter(variables[0].value.devices()))
        if dev.platform != "cpu":
            return f"{dev.platform} ({dev.device_kind})", _one_pinned_transfer(
                jax.numpy.zeros(nbytes // 4, "float32").__dlpack__, nbytes
            )
    if backend == "tensorflow":
        import tensorflow as tf

        if "GPU" in variables[0].value.device:
            with tf.device(variables[0].value.device):
                big = tf.zeros([nbytes // 4], tf.float32)
            return "gpu", _one_pinned_transfer(
                lambda: tf.experimental.dlpack.to_dlpack(big), nbytes
            )
    # A CPU: one thread copying every value into memory already touched.
    host = [np.asarray(__import__("keras").ops.convert_to_numpy(v.value)) for v in variables]
    dests = [np.ones_like(h) for h in host]

    def one_thread_copy() -> None:
        for d, h in zip(dests, host, strict=True):
            np.copyto(d, h)

    return "cpu", one_thread_copy


def _one_pinned_transfer(capsule: Callable[[], Any], nbytes: int) -> Callable[[], None]:
    """One device buffer of `nbytes` into pinned host memory: the link's speed."""
    import numpy as np

    from fastckpt import _fastckpt, _readers

    block = _readers.page_aligned(nbytes // 4 * 4)
    pinned = _fastckpt.pin_host(block)
    dest = block.view(np.float32)

    def transfer() -> None:
        _fastckpt.copy_from_dlpack([(capsule(), dest)])

    transfer.pinned = pinned  # type: ignore[attr-defined]  # kept alive with the function
    return transfer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.gib, args.repeats)))
        return
    results, failed = [], []
    for backend in args.backends.split(","):
        module = "tensorflow" if backend == "tensorflow" else backend
        if importlib.util.find_spec(module) is None:
            print(f"{backend}: not installed here, skipped", file=sys.stderr)
            continue
        env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
        cmd = [
            sys.executable,
            __file__,
            "--child",
            f"--gib={args.gib}",
            f"--repeats={args.repeats}",
        ]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{backend}: failed\n{done.stderr[-3000:]}", file=sys.stderr)
            failed.append(backend)
            continue
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(
        f"{'backend':11} {'device':24} {'GiB':>5} {'Keras':>9} {'snapshot':>9} {'save()':>9} "
        f"{'floor':>9} {'snap/floor':>10} {'save/floor':>10} {'Keras/save':>10}"
    )
    for r in results:
        if r["device"] == "cpu":
            print(
                f"{r['backend']}: no GPU visible, measured on the CPU (the floor is one thread "
                "copying the state into touched host memory, not a pinned device-to-host copy)",
                file=sys.stderr,
            )
    for r in results:
        print(
            f"{r['backend']:11} {r['device'][:24]:24} {r['bytes'] / 2**30:5.2f} "
            f"{r['keras_ms']:7.1f}ms {r['snapshot_ms']:7.1f}ms {r['save_ms']:7.1f}ms "
            f"{r['floor_ms']:7.1f}ms {r['snapshot_ms'] / r['floor_ms']:9.2f}x "
            f"{r['save_ms'] / r['floor_ms']:9.2f}x {r['keras_ms'] / r['save_ms']:9.1f}x"
        )
    for r in results:
        if r["wrong"]:
            print(f"{r['backend']}: WRONG VALUES: {', '.join(r['wrong'][:10])}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    if failed or any(r["wrong"] for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
