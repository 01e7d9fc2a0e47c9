"""`.shards.json` in one process: the set a multi-process save writes (tests/test_distributed.py
starts the real multi-process set-ups), here with one process writing every part. Read with
the stock `safetensors` package and `json`, converted to a `.weights.h5` that stock Keras
loads, and checked against hostile indexes."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest
import safetensors.numpy

import fastckpt
from callback_support import BATCH, X, Y, fresh_model, h5_datasets, list_files


def trained() -> keras.Model:
    model = fresh_model()
    model.fit(X, Y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    return model


def index_of(path: Path) -> dict:
    return json.loads(path.read_text())


def parts_named(path: Path) -> list[Path]:
    return [path.parent / name for name in sorted(part_files(index_of(path)))]


def part_files(index: dict) -> set[str]:
    return {p["file"] for t in index["tensors"].values() for p in t["parts"]}


def test_a_save_is_an_index_and_a_safetensors_file_of_whole_values(tmp_path):
    """Every value whole in one part (one process holds all of it), named by the weight
    path and its block; the values are Keras's own (`save_weights` read with h5py)."""
    model = trained()
    target = tmp_path / "ckpt.shards.json"
    result = fastckpt.save(model, target)
    model.save_weights(tmp_path / "oracle.weights.h5")
    index = index_of(target)
    assert index["format"] == "fastckpt.shards" and index["processes"] == 1
    (part,) = parts_named(target)
    assert sorted(result.paths) == sorted([str(target), str(part)])
    assert list_files(tmp_path) == sorted(["ckpt.shards.json", part.name, "oracle.weights.h5"])
    tensors = safetensors.numpy.load_file(str(part))
    oracle = h5_datasets(tmp_path / "oracle.weights.h5")
    # h5py's dataset names are Keras's weight paths with "/vars/" and the index.
    assert sorted(index["tensors"]) == sorted(oracle)
    for path, spec in index["tensors"].items():
        (block,) = spec["parts"]
        expected = oracle[path]
        assert block["start"] == [0] * expected.ndim and block["shape"] == list(expected.shape)
        assert spec["dtype"] == expected.dtype.name and spec["shape"] == list(expected.shape)
        spans = ",".join(f"0:{n}" for n in expected.shape)
        assert block["tensor"] == f"{path}[{spans}]"
        np.testing.assert_array_equal(tensors[block["tensor"]], expected)


def test_a_new_save_replaces_the_set_and_removes_the_old_parts(tmp_path):
    model = trained()
    target = tmp_path / "ckpt.shards.json"
    fastckpt.save(model, target)
    (first,) = parts_named(target)
    model.fit(X, Y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    fastckpt.save(model, target)
    (second,) = parts_named(target)
    assert second != first and not first.exists()
    assert list_files(tmp_path) == sorted(["ckpt.shards.json", second.name])
    restored = fresh_model()
    fastckpt.load(restored, target)
    for a, b in zip(model.variables, restored.variables, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_converts_to_a_weights_h5_that_stock_keras_loads(tmp_path):
    model = trained()
    fastckpt.save(model, tmp_path / "ckpt.shards.json")
    fastckpt.convert(tmp_path / "ckpt.shards.json", tmp_path / "plain.weights.h5")
    model.save_weights(tmp_path / "oracle.weights.h5")
    restored = fresh_model()
    restored.load_weights(tmp_path / "plain.weights.h5")
    oracle = h5_datasets(tmp_path / "oracle.weights.h5")
    ours = h5_datasets(tmp_path / "plain.weights.h5")
    assert sorted(ours) == sorted(oracle)
    for name, value in oracle.items():
        np.testing.assert_array_equal(ours[name], value)
    for a, b in zip(model.variables, restored.variables, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_latest_names_the_index_never_a_part(tmp_path):
    model = trained()
    fastckpt.save(model, tmp_path / "ckpt.shards.json")
    assert fastckpt.latest(tmp_path) == str(tmp_path / "ckpt.shards.json")


def test_model_checkpoint_with_max_to_keep_deletes_whole_sets(tmp_path):
    model = fresh_model()
    ckpt = fastckpt.ModelCheckpoint(
        str(tmp_path / "e{epoch}.shards.json"), save_weights_only=True, max_to_keep=1
    )
    model.fit(X, Y, batch_size=BATCH, epochs=3, shuffle=False, verbose=0, callbacks=[ckpt])
    (part,) = parts_named(tmp_path / "e3.shards.json")
    assert list_files(tmp_path) == sorted(["e3.shards.json", part.name])
    restored = fresh_model()
    fastckpt.load(restored, tmp_path / "e3.shards.json")
    for a, b in zip(model.variables, restored.variables, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_model_checkpoint_refuses_a_whole_model_in_shards(tmp_path):
    with pytest.raises(ValueError, match="save_weights_only"):
        fastckpt.ModelCheckpoint(str(tmp_path / "m.shards.json"))


# Hostile or damaged sets ---------------------------------------------------------------------


def _edit(target: Path, edit) -> None:
    index = index_of(target)
    edit(index)
    target.write_text(json.dumps(index))


def _first_kernel(index: dict) -> dict:
    return next(t for t in index["tensors"].values() if len(t["shape"]) == 2)


def _split_rows(index: dict, first_rows: int, second_start: int) -> None:
    """The first kernel as two parts: its first `first_rows` rows, and the rest of its
    rows from row `second_start`."""
    kernel = _first_kernel(index)
    rows, cols = kernel["shape"]
    (whole,) = kernel["parts"]
    kernel["parts"] = [
        dict(whole, start=[0, 0], shape=[first_rows, cols]),
        dict(whole, start=[second_start, 0], shape=[rows - first_rows, cols]),
    ]


@pytest.mark.parametrize(
    ("edit", "error"),
    [
        (lambda i: _split_rows(i, 2, 1), "overlap"),  # as many elements, one row twice
        (lambda i: _first_kernel(i)["parts"][0].update(shape=[1, 8]), "parts hold 8 elements"),
        (lambda i: _first_kernel(i)["parts"][0].update(start=[1, 0]), "lies outside"),
        (lambda i: _first_kernel(i)["parts"][0].update(file="../elsewhere.safetensors"), "beside"),
        (lambda i: _first_kernel(i)["parts"][0].update(start=[0]), "wrong rank"),
        (lambda i: i.update(version=99), "version 99"),
        (lambda i: i.update(format="other"), "no `format`"),
    ],
)
def test_a_hostile_index_is_refused_naming_the_file_and_value(tmp_path, edit, error):
    target = tmp_path / "ckpt.shards.json"
    fastckpt.save(trained(), target)
    _edit(target, edit)
    with pytest.raises(fastckpt.CheckpointContentError, match=error) as caught:
        fastckpt.load(fresh_model(), target)
    assert str(target) in str(caught.value)


def test_a_missing_part_file_is_named(tmp_path):
    target = tmp_path / "ckpt.shards.json"
    fastckpt.save(trained(), target)
    (part,) = parts_named(target)
    part.unlink()
    with pytest.raises(fastckpt.CheckpointContentError, match=f"{part.name}.* is missing"):
        fastckpt.load(fresh_model(), target)


def test_a_part_that_is_not_what_the_index_says_is_named(tmp_path):
    target = tmp_path / "ckpt.shards.json"
    fastckpt.save(trained(), target)

    def misname(index: dict) -> None:
        _first_kernel(index)["parts"][0]["tensor"] = "not/there[0:1]"

    _edit(target, misname)
    with pytest.raises(fastckpt.CheckpointContentError, match=r"no part not/there\[0:1\]"):
        fastckpt.load(fresh_model(), target)
