"""The main job: train a small model with fastckpt.ModelCheckpoint, show what was saved and
how long training paused for each checkpoint (next to keras.callbacks.ModelCheckpoint),
then reload the newest checkpoint with stock Keras, without fastckpt.

Run with `make demo`.
"""

import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np

import fastckpt


def timed(callback_class):
    """The same callback, recording how long each epoch-end hook held up training."""

    class Timed(callback_class):
        pauses: list[float]

        def on_epoch_end(self, epoch, logs=None):
            start = time.perf_counter()
            super().on_epoch_end(epoch, logs)
            self.pauses.append(time.perf_counter() - start)

    Timed.pauses = []
    return Timed


def build_model() -> keras.Model:
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((512,)),
            keras.layers.Dense(2048, activation="relu"),
            keras.layers.Dense(2048, activation="relu"),
            keras.layers.Dense(2048, activation="relu"),
            keras.layers.Dense(10),
        ]
    )
    model.compile(optimizer="adam", loss="mse", metrics=["mae"])
    return model


def main() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2048, 512)).astype("float32")
    y = rng.normal(size=(2048, 10)).astype("float32")
    folder = tempfile.mkdtemp(prefix="fastckpt-demo-")
    state_mib = None
    results = {}
    for name, cls in [
        ("keras.callbacks.ModelCheckpoint", keras.callbacks.ModelCheckpoint),
        ("fastckpt.ModelCheckpoint", fastckpt.ModelCheckpoint),
    ]:
        model = build_model()
        sub = "keras" if cls is keras.callbacks.ModelCheckpoint else "fastckpt"
        callback = timed(cls)(os.path.join(folder, sub, "epoch{epoch:02d}-{loss:.3f}.keras"))
        model.fit(x, y, epochs=4, batch_size=256, callbacks=[callback], verbose=0)
        if state_mib is None:
            n = sum(v.numpy().nbytes for v in model.variables + model.optimizer.variables)
            state_mib = n / 2**20
        results[name] = (model, callback.pauses, os.path.join(folder, sub))

    print(f"Model state (weights + Adam): {state_mib:.0f} MiB, 4 epochs, a .keras each epoch\n")
    print(f"{'callback':34} {'pause per checkpoint (median)':>30}")
    for name, (_, pauses, _) in results.items():
        print(f"{name:34} {np.median(pauses) * 1e3:27.1f} ms")
    keras_pause = np.median(results["keras.callbacks.ModelCheckpoint"][1])
    ours_pause = np.median(results["fastckpt.ModelCheckpoint"][1])
    print(f"training paused {keras_pause / ours_pause:.1f}x less with fastckpt\n")

    model, _, ours = results["fastckpt.ModelCheckpoint"]
    print(f"Saved by fastckpt in {ours}:")
    for f in sorted(os.listdir(ours)):
        print(f"  {f:32} {os.path.getsize(os.path.join(ours, f)) / 2**20:8.1f} MiB")
    newest = os.path.join(ours, sorted(os.listdir(ours))[-1])

    # Reload with stock Keras in a fresh interpreter that never imports fastckpt.
    check = (
        "import keras, numpy as np, sys; "
        "m = keras.saving.load_model(sys.argv[1]); "
        "x = np.random.default_rng(0).normal(size=(4, 512)).astype('float32'); "
        "np.save(sys.argv[2], m.predict(x, verbose=0)); "
        "print('  stock Keras loaded', sys.argv[1].rsplit('/', 1)[-1], 'without fastckpt')"
    )
    out = os.path.join(folder, "prediction.npy")
    subprocess.run([sys.executable, "-c", check, newest, out], check=True)
    x4 = np.random.default_rng(0).normal(size=(4, 512)).astype("float32")
    same = np.array_equal(np.load(out), model.predict(x4, verbose=0))
    print(f"  its predictions equal the trained model's: {same}")
    if not same:
        raise SystemExit("reloaded model differs from the trained one")


if __name__ == "__main__":
    main()
