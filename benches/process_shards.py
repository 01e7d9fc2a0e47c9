"""What a save costs when every process writes its own parts (`.shards.json`).

Two local processes (`jax.distributed`, gloo collectives on 127.0.0.1, one CPU device
each) train the same model. Under `ModelParallel` a `LayoutMap` splits every kernel (and
so its Adam moments) over the two processes, and each process writes the parts it holds;
under `DataParallel` every variable is replicated and process 0 writes the whole
`.safetensors` file alone (the one-writer path). For each, per save (medians):

- bytes per process: what each process wrote (its part file, and the index for process 0);
- save: the time `fastckpt.save` took on each process, from the call to its return;
- commit (shards only): on process 0, from the moment every process's part was durable
  (the collective that tells it) to the index renamed and its folder synced.

    python benches/process_shards.py [--layers 6] [--width 2048] [--saves 5] [--folder DIR]

The folder defaults to a fresh one under the system's temp folder; the figures are for
that file system (say which in the README).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any


def worker(layout: str, process: int, port: int, folder: str, layers: int, width: int, saves: int):
    os.environ["KERAS_BACKEND"] = "jax"
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process
    )
    import keras
    import numpy as np

    import fastckpt
    from fastckpt import _processes

    devices = jax.devices()
    if layout == "model":
        mesh = keras.distribution.DeviceMesh((2,), ["model"], devices)
        layouts = keras.distribution.LayoutMap(mesh)
        layouts[".*kernel"] = (None, "model")
        distribution = keras.distribution.ModelParallel(layout_map=layouts, batch_dim_name=None)
        target = os.path.join(folder, "model.shards.json")
    else:
        distribution = keras.distribution.DataParallel(devices=devices)
        target = os.path.join(folder, "model.safetensors")
    distribution.auto_shard_dataset = False
    keras.distribution.set_distribution(distribution)
    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [keras.Input((width,))] + [keras.layers.Dense(width, name=f"d{i}") for i in range(layers)]
    )
    model.compile(optimizer="adam", loss="mse")
    x = np.random.default_rng(0).normal(size=(16, width)).astype("float32")
    model.fit(x, x, batch_size=16, epochs=1, verbose=0)

    # The collective after the parts are written: the commit starts when it returns.
    real_outcomes = _processes.outcomes
    agreed: list[float] = []

    def outcomes(ok: bool) -> list[bool]:
        got = real_outcomes(ok)
        agreed.append(time.perf_counter())
        return got

    _processes.outcomes = outcomes
    rounds = []
    for _ in range(saves):
        agreed.clear()
        started = time.perf_counter()
        result = fastckpt.save(model, target)
        ended = time.perf_counter()
        mine = [
            p
            for p in result.paths
            if layout == "data" or p.endswith(f"-{process:05d}-of-00002.safetensors")
        ]
        if process == 0 and layout == "model":
            mine.append(target)
        writes = layout == "model" or process == 0
        written = sum(os.path.getsize(p) for p in mine) if writes else 0
        rounds.append(
            {
                "save_s": ended - started,
                "commit_s": (ended - agreed[0]) if agreed else None,
                "bytes": written,
            }
        )
    print(json.dumps({"process": process, "rounds": rounds}), flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(layout: str, folder: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    port = free_port()
    children = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--worker",
                layout,
                str(process),
                str(port),
                folder,
                f"--layers={args.layers}",
                f"--width={args.width}",
                f"--saves={args.saves}",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for process in (0, 1)
    ]
    out = []
    for child in children:
        stdout, _ = child.communicate(timeout=900)
        if child.returncode != 0:
            raise SystemExit(f"a {layout} worker failed (exit {child.returncode})")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return sorted(out, key=lambda r: r["process"])


def median(rounds: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--saves", type=int, default=5)
    parser.add_argument("--folder", default=None)
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        layout, process, port, folder = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
        args = parser.parse_args(sys.argv[6:])
        worker(layout, process, port, folder, args.layers, args.width, args.saves)
        return
    args = parser.parse_args()
    state = args.layers * (args.width * args.width + args.width) * 4 * 3  # weights + Adam's 2
    print(
        f"{args.layers} x Dense({args.width}) + Adam: {state / 2**20:.0f} MiB of state, "
        f"2 processes, {args.saves} saves each (medians)"
    )
    with tempfile.TemporaryDirectory(dir=args.folder) as folder:
        figures = {layout: run(layout, folder, args) for layout in ("model", "data")}
    print()
    print("| layout, file | process | MiB written | save (s) | commit (ms) |")
    print("|---|---|---|---|---|")
    names = {"model": "ModelParallel, `.shards.json`", "data": "DataParallel, `.safetensors`"}
    for layout, processes in figures.items():
        for p in processes:
            rounds = p["rounds"]
            commit = median(rounds, "commit_s") * 1e3 if layout == "model" else None
            print(
                f"| {names[layout]} | {p['process']} | {median(rounds, 'bytes') / 2**20:.1f} | "
                f"{median(rounds, 'save_s'):.3f} | "
                f"{'' if commit is None else f'{commit:.1f}'} |"
            )
    model_s = max(median(p["rounds"], "save_s") for p in figures["model"])
    data_s = max(median(p["rounds"], "save_s") for p in figures["data"])
    print(f"\nsave, slowest process: shards / one writer = {model_s / data_s:.2f}x")


if __name__ == "__main__":
    main()
