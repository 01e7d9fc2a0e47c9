"""Coverage-guided fuzzing of the Python-facing readers (zip, HDF5 through h5py, the
SafeTensors header from Python) with atheris, on the harness the suite's short run uses
(`tests/fuzz_readers.py`): any exception out of `fastckpt.verify`, a crash, a hang (libFuzzer's
-timeout) or a memory blow-up (-rss_limit_mb) is a finding.

    pip install --target .venv-fuzz atheris
    FUZZ_SUFFIX=.keras PYTHONPATH=python:tests:.venv-fuzz .venv/bin/python \\
        fuzz/atheris_readers.py fuzz/corpus/keras -max_total_time=600 -timeout=20 \\
        -rss_limit_mb=4096

FUZZ_SUFFIX picks the reader: .keras, .weights.h5, .h5 (legacy), .safetensors. An empty
corpus folder is seeded with fastckpt's and Keras's own files of a tiny model.
"""

import os
import sys
import tempfile

import atheris
import h5py  # noqa: F401  (imported before instrumentation: not instrumented)
import keras
import numpy  # noqa: F401

with atheris.instrument_imports(include=["fastckpt"]):
    import fastckpt
    from fastckpt import verify  # noqa: F401

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import fuzz_readers

SUFFIX = os.environ.get("FUZZ_SUFFIX", ".keras")
WORK = os.path.join(tempfile.mkdtemp(prefix="fastckpt-fuzz-"), "input" + SUFFIX)


def seed(folder: str) -> None:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), keras.layers.Dense(2)])
    model.compile(optimizer="adam", loss="mse")
    model.optimizer.build(model.trainable_variables)
    fastckpt.save(model, os.path.join(folder, "ours" + SUFFIX))
    if SUFFIX == ".weights.h5":
        model.save_weights(os.path.join(folder, "keras" + SUFFIX))
    elif SUFFIX in (".keras", ".h5"):
        model.save(os.path.join(folder, "keras" + SUFFIX))


def test_one_input(data: bytes) -> None:
    fuzz_readers.one_input(data, WORK)


if __name__ == "__main__":
    corpus = [a for a in sys.argv[1:] if not a.startswith("-")]
    if corpus:
        os.makedirs(corpus[0], exist_ok=True)
        if not os.listdir(corpus[0]):
            seed(corpus[0])
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
