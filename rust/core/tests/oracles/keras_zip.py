"""h5py and Keras as oracles for `.keras` zips that fastckpt writes.

Usage:
  python keras_zip.py make-h5 OUT.h5          write an HDF5 file with h5py
  python keras_zip.py check-h5 ZIP            read model.weights.h5 from ZIP through zipfile + h5py
  python keras_zip.py make-keras DIR          save a small model with Keras to DIR/model.keras,
                                              unpack its members into DIR/members/, print their
                                              names in order as JSON
  python keras_zip.py load-keras ZIP DIR      keras.saving.load_model(ZIP) must predict what the
                                              model saved by make-keras predicted
"""

import json
import os
import sys
import zipfile

import numpy as np


def arrays():
    rng = np.random.default_rng(7)
    return {
        "vars/0": rng.standard_normal((300, 70)).astype("float32"),
        "vars/1": np.arange(1000, dtype="int64"),
        "zeros": np.zeros(100_000, dtype="float32"),
        "layers/dense/vars/0": rng.standard_normal((5,)).astype("float64"),
    }


def make_h5(path):
    import h5py

    with h5py.File(path, "w") as f:
        for name, a in arrays().items():
            f.create_dataset(name, data=a)
        f["vars"].attrs["note"] = "written by h5py"


def check_h5(path):
    import h5py

    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None
        with zf.open("model.weights.h5") as member, h5py.File(member, "r") as f:
            for name, a in arrays().items():
                got = f[name][()]
                assert got.dtype == a.dtype and np.array_equal(got, a), name
            assert f["vars"].attrs["note"] == "written by h5py"
    print("h5py read every dataset from the zip")


def model_and_inputs():
    import keras

    keras.utils.set_random_seed(3)
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(16, activation="relu", name="hidden"),
            keras.layers.Dense(3, name="out"),
        ]
    )
    x = np.linspace(-1, 1, 24, dtype="float32").reshape(4, 6)
    return model, x


def make_keras(out_dir):
    model, x = model_and_inputs()
    path = os.path.join(out_dir, "model.keras")
    model.save(path)
    np.save(os.path.join(out_dir, "pred.npy"), model.predict(x, verbose=0))
    members = os.path.join(out_dir, "members")
    names = []
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            names.append(info.filename)
            target = os.path.join(members, info.filename)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "wb") as f:
                f.write(zf.read(info))
    print(json.dumps(names))


def load_keras(path, out_dir):
    import keras

    _, x = model_and_inputs()
    model = keras.saving.load_model(path)
    want = np.load(os.path.join(out_dir, "pred.npy"))
    got = model.predict(x, verbose=0)
    assert np.array_equal(got, want), (got, want)
    print("keras.saving.load_model predicted the same")


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    {"make-h5": make_h5, "check-h5": check_h5, "make-keras": make_keras, "load-keras": load_keras}[
        cmd
    ](*args)
