"""A short seeded mutation-fuzzing run of every Python-facing reader (see
`fuzz_readers.py`): about 12 s per format, in a child process under RLIMIT_AS. The long,
coverage-guided runs (atheris, cargo fuzz) live in `fuzz/`.

A crash of the child (libhdf5 is C) fails the test with the input that caused it.
"""

from __future__ import annotations

import shutil

import keras
import pytest

import fastckpt

SECONDS = 12


def tiny_model() -> keras.Model:
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4), keras.layers.Dense(2, name="head")]
    )
    model.compile(optimizer="adam", loss="mse")
    model.optimizer.build(model.trainable_variables)
    return model


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    """Our files and Keras's own, for every format."""
    folder = tmp_path_factory.mktemp("seeds")
    model = tiny_model()
    out: dict[str, list[str]] = {}
    for suffix in (".safetensors", ".zst.safetensors", ".weights.h5", ".keras", ".h5"):
        ours = folder / f"ours{suffix}"
        fastckpt.save(model, ours)
        out[suffix] = [str(ours)]
    model.save_weights(folder / "keras.weights.h5")
    out[".weights.h5"].append(str(folder / "keras.weights.h5"))
    model.save(folder / "keras.keras")
    out[".keras"].append(str(folder / "keras.keras"))
    tiny_model().save(folder / "keras.h5")  # a fresh model: see test_faults.states
    out[".h5"].append(str(folder / "keras.h5"))
    return out


@pytest.mark.parametrize(
    "suffix", [".safetensors", ".zst.safetensors", ".weights.h5", ".keras", ".h5"]
)
def test_fuzz_readers(forkserver, seeds, tmp_path, suffix):
    work = str(tmp_path / f"input{suffix}")
    child = forkserver.start(
        "fuzz_readers", seeds=seeds[suffix], work=work, seconds=SECONDS, seed=1234
    )
    status = child.wait_exit(timeout=SECONDS + 120)
    findings = child.events_named("finding")
    if status != {"code": 0}:
        kept = shutil.copy(work, tmp_path / "crash-input")
        pytest.fail(f"the fuzzing child died ({status}); input kept at {kept}: {child.seen[-3:]}")
    stats = child.events_named("stats")[0]
    print(f"\n{suffix}: {stats}")
    assert not findings, "\n\n".join(f["message"] for f in findings[:3])
    assert stats["execs"] > 50
