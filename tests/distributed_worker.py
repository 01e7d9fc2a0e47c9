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


def global_values(model: keras.Model) -> list[np.ndarray]:
    """Every model and optimizer variable's whole value, on every process (gathered where
    a layout splits it over processes)."""
    from jax.experimental import multihost_utils

    out = []
    for v in [*model.variables, *model.optimizer.variables]:
        value = v.value
        if getattr(value, "is_fully_addressable", True):
            out.append(np.asarray(value))
        else:
            out.append(np.asarray(multihost_utils.process_allgather(value, tiled=True)))
    return out


def global_digest(model: keras.Model) -> str:
    h = hashlib.sha256()
    for value in global_values(model):
        h.update(np.ascontiguousarray(value).tobytes())
    return h.hexdigest()


def split_over_processes(model: keras.Model) -> list[str]:
    """The variables no process holds whole (some device of each holds only a part)."""
    return [
        v.path
        for v in model.variables
        if not any(s.data.shape == v.value.shape for s in v.value.addressable_shards)
    ]


def write_values(model: keras.Model, path: str) -> None:
    values = global_values(model)
    if PROCESS == 0:
        np.savez(path, *values)


def parts_checkpoint() -> fastckpt.ModelCheckpoint:
    return fastckpt.ModelCheckpoint(
        os.path.join(FOLDER, "epochs", "{epoch}.shards.json"),
        save_weights_only=True,
        max_to_keep=2,
    )


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
        except ValueError as e:
            emit("raised", type=type(e).__name__, message=str(e))
    elif SCENARIO == "parts":
        # Every process writes its parts of a split variable; restored under the same
        # layout, and under another one (every variable replicated).
        model = build(layout=True)
        fit(model, [parts_checkpoint()])
        path = os.path.join(FOLDER, "model.shards.json")
        fastckpt.save(model, path)
        emit("trained", digest=global_digest(model), split=split_over_processes(model))
        write_values(model, os.path.join(FOLDER, "trained.npz"))
        same = build(layout=True)
        fastckpt.load(same, path)
        emit("loaded", layout="model parallel", digest=global_digest(same))
        other = build()
        fastckpt.load(other, path)
        emit("loaded", layout="data parallel", digest=global_digest(other))
    elif SCENARIO in ("parts failed", "parts killed"):
        # A save whose write fails (or is killed) on process 1: the set saved before it
        # stays whole.
        model = build(layout=True)
        path = os.path.join(FOLDER, "model.shards.json")
        fastckpt.save(model, path)
        write_values(model, os.path.join(FOLDER, "before.npz"))
        fit(model, [])
        if PROCESS == 1:
            testing = fastckpt._fastckpt.testing
            if SCENARIO == "parts failed":
                testing.inject_fault("fsync")
            else:
                testing.inject_delay(1000)  # the test kills this process mid-write
        emit("saving")
        try:
            fastckpt.save(model, path)
        except Exception as e:
            emit("raised", type=type(e).__name__, message=str(e))
    elif SCENARIO == "parts restored":
        model = build(layout=True)
        fastckpt.load(model, os.path.join(FOLDER, "model.shards.json"))
        emit("loaded", digest=global_digest(model))
        write_values(model, os.path.join(FOLDER, f"restored-{PROCESS}.npz"))
    else:
        raise SystemExit(f"unknown scenario {SCENARIO!r}")
    emit("done")


if __name__ == "__main__":
    main()
