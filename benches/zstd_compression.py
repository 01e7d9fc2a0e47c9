"""What `compression="zstd"` buys and costs: the ratio, and the save and load speed of the
zstd container against the uncompressed `.safetensors` file, for three kinds of state:

- `float32`: a Keras model's weights after a few Adam steps (random-normal initial values
  plus small updates: what a checkpoint early in training holds);
- `bfloat16`: the same weights cast to bfloat16 (Keras layers with `dtype="bfloat16"`);
- `optimizer`: that model's Adam state (iteration, learning rate, first and second
  moments).

Both files are written by the same native writer (`plan_safetensors` / `plan_zstd`, durable:
fdatasync, rename, folder fsync) and read by the same reader (`Checkpoint.read`, zstd frames
decoded in parallel), so the difference is the codec. Loads read from the page cache (the
file was just written). Medians of `--repeats` interleaved rounds; nothing is asserted.

    python benches/zstd_compression.py [--mib 64] [--repeats 5] [--level 3] [--dir /dev/shm]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import ml_dtypes
import numpy as np

from fastckpt import _fastckpt, formats
from fastckpt._environment import direct_io_allowed
from fastckpt._progress import size_text


def trained_state(mib: int) -> dict[str, list[tuple[str, np.ndarray]]]:
    """The three kinds of state, about `mib` MiB of float32 weights."""
    width = 1024
    layers = max(1, round(mib * 2**20 / (4 * width * width)))
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((width,))] + [keras.layers.Dense(width) for _ in range(layers)]
    )
    model.compile(optimizer="adam", loss="mse")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, width)).astype("float32")
    for _ in range(3):
        model.train_on_batch(x, x)
    weights = [(f"w/{i}", np.asarray(v.numpy())) for i, v in enumerate(model.variables)]
    return {
        "float32": weights,
        "bfloat16": [(n, a.astype(ml_dtypes.bfloat16)) for n, a in weights],
        "optimizer": [
            (f"o/{i}", np.ascontiguousarray(v.numpy()))
            for i, v in enumerate(model.optimizer.variables)
        ],
    }


def timed_save(plan, path: str, tensors, level: int) -> float:
    if os.path.exists(path):
        os.remove(path)
    options = _fastckpt.WriteOptions(direct_io=direct_io_allowed())
    started = time.perf_counter()
    if plan == "zstd":
        files = [_fastckpt.plan_zstd(path, tensors, {}, level=level)]
    else:
        files = [_fastckpt.plan_safetensors(path, tensors, {})]
    _fastckpt.write(files, options=options).result()
    return time.perf_counter() - started


def timed_load(path: str) -> float:
    started = time.perf_counter()
    checkpoint = formats.open_checkpoint(path)
    checkpoint.read(list(checkpoint.tensors))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=64, help="float32 weights, in MiB")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--level", type=int, default=_fastckpt.ZSTD_DEFAULT_LEVEL)
    parser.add_argument("--dir", default=None, help="where the files go (default: a temp dir)")
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="fastckpt-zstd-", dir=args.dir)
    try:
        kinds = trained_state(args.mib)
        print(
            f"zstd level {args.level}, {os.cpu_count()} cores, medians of {args.repeats}; "
            f"files in {folder}"
        )
        print(
            f"{'state':<10} {'raw':>10} {'stored':>10} {'ratio':>6}  "
            f"{'save zstd':>11} {'save plain':>11} {'x':>5}  "
            f"{'load zstd':>11} {'load plain':>11} {'x':>5}"
        )
        for kind, tensors in kinds.items():
            raw = sum(a.nbytes for _, a in tensors)
            paths = {
                "zstd": os.path.join(folder, f"{kind}.zst.safetensors"),
                "plain": os.path.join(folder, f"{kind}.safetensors"),
            }
            saves: dict[str, list[float]] = {"zstd": [], "plain": []}
            loads: dict[str, list[float]] = {"zstd": [], "plain": []}
            for _ in range(args.repeats):
                for which, path in paths.items():  # interleaved
                    saves[which].append(timed_save(which, path, tensors, args.level))
                    loads[which].append(timed_load(path))
            stored = os.path.getsize(paths["zstd"])
            save = {k: statistics.median(v) for k, v in saves.items()}
            load = {k: statistics.median(v) for k, v in loads.items()}

            def rate(seconds: float, raw: int = raw) -> str:
                return f"{size_text(raw / seconds)}/s"

            print(
                f"{kind:<10} {size_text(raw):>10} {size_text(stored):>10} "
                f"{raw / stored:>5.2f}x  {rate(save['zstd']):>11} {rate(save['plain']):>11} "
                f"{save['plain'] / save['zstd']:>4.2f}x  {rate(load['zstd']):>11} "
                f"{rate(load['plain']):>11} {load['plain'] / load['zstd']:>4.2f}x"
            )
            for path in paths.values():
                os.remove(path)
        print("ratio: raw / stored; x: zstd's speed as a share of the uncompressed file's")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
