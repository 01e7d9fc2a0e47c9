"""Loading a 48 MiB checkpoint (weights + Adam) back into the model."""

import os

import keras
import pytest

import fastckpt
from fastckpt.bench import floors

CASES = {
    "keras model.load_weights": ("keras.weights.h5", lambda m, p: m.load_weights(p)),
    "fastckpt.load .weights.h5": ("fck.weights.h5", fastckpt.load),
    "fastckpt.load .safetensors": ("fck.safetensors", fastckpt.load),
    "fastckpt.load .keras": ("fck.keras", fastckpt.load),
    "keras.saving.load_model .keras": ("keras.keras", lambda m, p: keras.saving.load_model(p)),
    "fastckpt.load_model .keras": ("fck.keras", lambda m, p: fastckpt.load_model(p)),
}


@pytest.fixture
def files(training_setup, target):
    model = training_setup.model
    paths = {}
    for name in {f for f, _ in CASES.values()}:
        path = paths[name] = os.path.join(target, name)
        if name.startswith("keras."):
            model.save_weights(path) if name.endswith(".weights.h5") else model.save(path)
            floors.make_durable(path)
        else:
            fastckpt.save(model, path)
    return paths


@pytest.mark.parametrize("case", list(CASES))
def test_load(benchmark, case, training_setup, files):
    file, load = CASES[case]
    benchmark.pedantic(load, args=(training_setup.model, files[file]), rounds=5, warmup_rounds=1)


def test_floor_read(benchmark, files):
    path = files["fck.safetensors"]
    buf = floors.touched(os.path.getsize(path))
    benchmark.pedantic(floors.read_floor, args=(path, buf), rounds=5, warmup_rounds=1)
