"""One process of a 2-process `jax.distributed` training on CPU (gloo collectives),
started by test_distributed.py: `python distributed_worker.py SCENARIO PROCESS PORT FOLDER`.

Every process runs the same script with the same seeds, as a user's would; it prints one
JSON line per event on stdout (`{"event": ..., ...}`) for the test to read.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

os.environ["KERAS_BACKEND"] = "jax"

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")

SCENARIO, PROCESS, PORT, FOLDER = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{PORT}", num_processes=2, process_id=PROCESS
)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import fastckpt  # noqa: E402

EPOCHS = 3


def emit(event: str, **fields) -> None:
    print(json.dumps({"event": event, "process": PROCESS, **fields}), flush=True)


def digest(model: keras.Model) -> str:
    """A hash of every model and optimizer variable's bytes, in order."""
    h = hashlib.sha256()
    for v in [*model.variables, *model.optimizer.variables]:
        h.update(np.ascontiguousarray(keras.ops.convert_to_numpy(v)).tobytes())
    return h.hexdigest()


def build(layout: bool = False) -> keras.Model:
    devices = jax.devices()
    if layout:
        mesh = keras.distribution.DeviceMesh((2,), ["model"], devices)
        layouts = keras.distribution.LayoutMap(mesh)
        layouts[".*hidden/kernel"] = (None, "model")  # the kernel split over the 2 processes
        distribution = keras.distribution.ModelParallel(layout_map=layouts, batch_dim_name=None)
    else:
        distribution = keras.distribution.DataParallel(devices=devices)
        distribution.auto_shard_dataset = False  # in-memory arrays, the same in each process
    keras.distribution.set_distribution(distribution)
    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, name="hidden"),
            keras.layers.Dense(1, name="head"),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    return model


def data() -> tuple[np.ndarray, np.ndarray]:
    x = np.random.default_rng(0).normal(size=(64, 8)).astype("float32")
    return x, x[:, :2].sum(axis=1, keepdims=True)


class StopAt(keras.callbacks.Callback):
    """Ends the run (as a crash would) when `epoch` begins."""

    def __init__(self, epoch: int) -> None:
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        emit("epoch", epoch=epoch)
        if epoch == self.epoch:
            raise KeyboardInterrupt


def fit(model: keras.Model, callbacks: list) -> None:
    x, y = data()
    model.fit(x, y, batch_size=16, epochs=EPOCHS, verbose=0, shuffle=False, callbacks=callbacks)


def checkpoints() -> list:
    return [
        fastckpt.ModelCheckpoint(
            os.path.join(FOLDER, "epochs", "{epoch}.weights.h5"),
            save_weights_only=True,
            max_to_keep=2,
        ),
        fastckpt.ModelCheckpoint(
            os.path.join(FOLDER, "best.keras"), monitor="loss", save_best_only=True, verbose=1
        ),
    ]


def main() -> None:
    if SCENARIO == "fit":
        model = build()
        fit(model, checkpoints())
        fastckpt.save(model, os.path.join(FOLDER, "plain.safetensors"))
        emit("trained", digest=digest(model))
        fresh = build()
        fastckpt.load(fresh, os.path.join(FOLDER, "plain.safetensors"))
        emit("loaded", digest=digest(fresh))
    elif SCENARIO == "interrupted":
        model = build()
        backup = fastckpt.BackupAndRestore(os.path.join(FOLDER, "backup"))
        try:
            fit(model, [backup, StopAt(2)])
        except KeyboardInterrupt:
            emit("interrupted")
    elif SCENARIO == "resumed":
        model = build()
        fit(model, [fastckpt.BackupAndRestore(os.path.join(FOLDER, "backup")), StopAt(-1)])
        emit("trained", digest=digest(model))
    elif SCENARIO == "uninterrupted":
        model = build()
        fit(model, [])
        emit("trained", digest=digest(model))
    elif SCENARIO == "failed write":
        model = build()
        path = os.path.join(FOLDER, "plain.safetensors")
        fastckpt.save(model, path)
        fit(model, [])
        if PROCESS == 0:
            fastckpt._fastckpt.testing.inject_fault("fsync")
        try:
            fastckpt.save(model, path)
        except Exception as e:
            emit("raised", type=type(e).__name__, message=str(e))
    elif SCENARIO == "agree":
        from fastckpt import _processes

        mine = 0.1234567890123456789 if PROCESS == 0 else 7.0
        emit("agreed", value=_processes.agree(mine).hex())
    elif SCENARIO == "model parallel":
        model = build(layout=True)
        try:
            fastckpt.save(model, os.path.join(FOLDER, "sharded.weights.h5"))
        except NotImplementedError as e:
            emit("raised", type=type(e).__name__, message=str(e))
    else:
        raise SystemExit(f"unknown scenario {SCENARIO!r}")
    emit("done")


if __name__ == "__main__":
    main()
