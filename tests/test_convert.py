"""`fastckpt convert SRC DST`: every conversion path, fastckpt's files and Keras's own as
sources, each result opened by the stock reader of its format (`load_weights`,
`keras.saving.load_model`, h5py, the `safetensors` package, `zstandard`); the command line
through a subprocess (exit codes, output, `--json`, progress on a terminal), without Keras
where the format allows, and in bounded memory."""

from __future__ import annotations

import json
import os
import pty
import shutil
import subprocess
import sys
import textwrap
import warnings

import h5py
import keras
import numpy as np
import pytest
import zstandard
from safetensors.numpy import load_file, save_file

import fastckpt
from conftest import assert_same_state
from fastckpt import CheckpointContentError, CheckpointNotFoundError, _walk
from fastckpt._progress import size_text

SUFFIXES = [".weights.h5", ".weights.json", ".keras", ".h5", ".safetensors", ".zst.safetensors"]
# Shards of about 20 kB: the test model's files are split over several.
SHARD_GB = 0.00002
# The formats that carry no model config, and those that need one.
WEIGHTS_ONLY = {".weights.h5", ".weights.json"}
NEEDS_CONFIG = {".keras", ".h5"}


def model_in_state(seed: int, compiled: bool = True) -> keras.Model:
    """Dense -> BatchNormalization -> Dense, Adam with its slots (if `compiled`), every
    value set from `seed`."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((48,)),
            keras.layers.Dense(64, name="d1"),
            keras.layers.BatchNormalization(name="bn"),
            keras.layers.Dense(4, name="head"),
        ]
    )
    if compiled:
        model.compile(optimizer="adam", loss="mse")
        model.optimizer.build(model.trainable_variables)
    rng = np.random.default_rng(seed)
    for v in model.variables + (model.optimizer.variables if compiled else []):
        v.assign(rng.integers(1, 100, size=v.shape).astype(v.dtype))
    return model


@pytest.fixture(scope="module")
def model():
    return model_in_state(1)


def by_path(model: keras.Model, optimizer: bool = True) -> dict[str, np.ndarray]:
    return {
        e.path: np.asarray(keras.ops.convert_to_numpy(e.source))
        for e in _walk.plan_for(model).entries
        if optimizer or not e.path.startswith("optimizer/")
    }


def shards(path: str) -> dict[str, float]:
    """The `max_shard_size` argument for a file at `path`: small shards for sharded weights."""
    return {"max_shard_size": SHARD_GB} if path.endswith(".weights.json") else {}


def write_source(model: keras.Model, path: str, writer: str) -> None:
    if writer == "fastckpt":
        fastckpt.save(model, path, **shards(path))
    elif path.endswith((".weights.h5", ".weights.json")):
        model.save_weights(path, **shards(path))
    else:
        model.save(path)


def check_with_stock_reader(path: str, model: keras.Model, optimizer: bool = True) -> None:
    """`path` holds `model`'s state, as the stock reader of its format sees it."""
    if path.endswith((".weights.h5", ".weights.json")):
        fresh = model_in_state(2, compiled=optimizer)
        fresh.load_weights(path)
        if optimizer:
            assert_same_state(model, fresh)
        for a, b in zip(model.variables, fresh.variables, strict=True):
            assert np.array_equal(a.numpy(), b.numpy()), a.path
        if path.endswith(".weights.h5"):
            with h5py.File(path) as f:
                want = by_path(model, optimizer)
                got = {n: f[n][()] for n in want}
                assert all(np.array_equal(got[n], want[n]) for n in want)
                assert f["layers/dense/vars"].attrs["name"] == "d1"
    elif path.endswith(".keras"):
        back = keras.saving.load_model(path)
        if optimizer:
            assert_same_state(model, back)
        for a, b in zip(model.variables, back.variables, strict=True):
            assert np.array_equal(a.numpy(), b.numpy()), a.path
    elif path.endswith(".h5"):
        back = keras.saving.load_model(path, compile=False)
        for a, b in zip(model.variables, back.variables, strict=True):
            assert np.array_equal(a.numpy(), b.numpy()), a.path
    else:
        want = by_path(model, optimizer)
        stored = load_file(path)
        assert set(stored) == set(want)
        for name, value in want.items():
            raw = stored[name]
            if path.endswith(".zst.safetensors"):
                decoded = zstandard.ZstdDecompressor().decompress(raw.tobytes())
                assert decoded == value.tobytes(), name
            else:
                assert raw.dtype == value.dtype and np.array_equal(raw, value), name


def converted(source: str, destination: str) -> fastckpt.ConvertResult:
    """`fastckpt.convert`; from a legacy `.h5` file, Keras's loader may be unable to compile
    the model (keras#19330), which the conversion must say in a warning."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        result = fastckpt.convert(source, destination, **shards(destination))
    for w in caught:
        assert source.endswith(".h5") and not source.endswith(".weights.h5"), w.message
        assert "without the optimizer state" in str(w.message)
    return result


def refusal(src: str, dst: str) -> str | None:
    """Why converting `src` to `dst` cannot be done, if it cannot."""
    if src in WEIGHTS_ONLY and dst in NEEDS_CONFIG:
        return "config"
    return None


@pytest.mark.parametrize("dst", SUFFIXES)
@pytest.mark.parametrize("src", SUFFIXES)
def test_every_conversion_path(tmp_path, model, src, dst):
    source = str(tmp_path / f"src{src}")
    write_source(model, source, "fastckpt")
    destination = str(tmp_path / "out" / f"dst{dst}")
    os.makedirs(os.path.dirname(destination))
    if refusal(src, dst):
        with pytest.raises(ValueError, match="config"):
            fastckpt.convert(source, destination, **shards(destination))
        assert not os.listdir(os.path.dirname(destination))
        return
    result = converted(source, destination)
    assert result.verified and result.path == destination
    assert result.bytes == sum(os.path.getsize(p) for p in result.paths)
    if dst == ".weights.json" and result.tensor_bytes > SHARD_GB * 1024**3:
        assert len(result.paths) > 2, "the shards are split as asked"
    # Through the legacy `.h5` layout the optimizer's state takes Keras's own path (its
    # loader): only the model's variables are compared.
    check_with_stock_reader(destination, model, optimizer=".h5" not in (src, dst))


@pytest.mark.parametrize("dst", SUFFIXES)
@pytest.mark.parametrize("src", [".weights.h5", ".weights.json", ".keras", ".h5"])
def test_keras_s_own_files_convert(tmp_path, src, dst):
    # A model of its own: Keras's legacy save drops the optimizer from the model's compile
    # config.
    model = model_in_state(1)
    source = str(tmp_path / f"src{src}")
    write_source(model, source, "keras")
    destination = str(tmp_path / f"dst{dst}")
    if refusal(src, dst):
        with pytest.raises(ValueError, match="config"):
            fastckpt.convert(source, destination, **shards(destination))
        return
    result = converted(source, destination)
    assert result.verified
    check_with_stock_reader(destination, model, optimizer=".h5" not in (src, dst))


def test_a_keras_file_keeps_its_metadata_and_assets(tmp_path, model):
    import zipfile

    source = tmp_path / "m.keras"
    model.save(source)
    once = tmp_path / "once.safetensors"
    twice = tmp_path / "twice.keras"
    fastckpt.convert(source, once)
    fastckpt.convert(once, twice)
    with zipfile.ZipFile(source) as a, zipfile.ZipFile(twice) as b:
        assert json.loads(a.read("config.json")) == json.loads(b.read("config.json"))
    direct = tmp_path / "direct.keras"
    fastckpt.convert(source, direct)
    with zipfile.ZipFile(source) as a, zipfile.ZipFile(direct) as b:
        assert a.read("metadata.json") == b.read("metadata.json")
    assert_same_state(model, keras.saving.load_model(twice))


def test_a_missing_source_is_not_found(tmp_path):
    with pytest.raises(CheckpointNotFoundError):
        fastckpt.convert(tmp_path / "none.weights.h5", tmp_path / "x.safetensors")


@pytest.mark.parametrize(
    ("suffix", "words"),
    [
        (".safetensors", "checksum mismatch"),  # found by the check after the copy
        (".zst.safetensors", "zstd frame at offset"),  # found by the decoder as it copies
    ],
)
def test_a_damaged_source_is_refused_and_nothing_is_left(tmp_path, model, suffix, words):
    source = tmp_path / f"m{suffix}"
    fastckpt.save(model, source)
    data = bytearray(source.read_bytes())
    data[-3] ^= 0xFF  # the last tensor's payload, or its frame's checksum
    source.write_bytes(bytes(data))
    with pytest.raises(CheckpointContentError, match=words):
        fastckpt.convert(source, tmp_path / "out.weights.h5")
    assert sorted(p.name for p in tmp_path.iterdir()) == [source.name]


def test_the_source_is_never_the_destination(tmp_path, model):
    path = tmp_path / "m.safetensors"
    fastckpt.save(model, path)
    with pytest.raises(ValueError, match="same file"):
        fastckpt.convert(path, path)


# The command line ---------------------------------------------------------------------------

# Runs the command line in a child; with `block`, `import keras` (and the frameworks) fail
# there.
CLI = textwrap.dedent(
    """
    import sys
    if sys.argv[1] == "block":
        for name in ("keras", "tensorflow", "jax", "torch"):
            sys.modules[name] = None
    from fastckpt.cli import main
    sys.exit(main(sys.argv[2:]))
    """
)


def run_cli(*args: str, keras_importable: bool = True) -> subprocess.CompletedProcess:
    flag = "allow" if keras_importable else "block"
    return subprocess.run(
        [sys.executable, "-c", CLI, flag, *args], capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def sources(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sources")
    out = {}
    for suffix in SUFFIXES:
        out[suffix] = str(folder / f"m{suffix}")
        fastckpt.save(model, out[suffix], **shards(out[suffix]))
    return out


def test_cli_converts_and_says_what_it_did(tmp_path, sources, model):
    destination = str(tmp_path / "m.zst.safetensors")
    run = run_cli("convert", sources[".weights.h5"], destination)
    assert run.returncode == 0, run.stderr
    assert "verified" in run.stdout and destination in run.stdout
    # Not a terminal: plain progress lines, the last with the total.
    assert "converting" in run.stderr and "done" in run.stderr
    check_with_stock_reader(destination, model)


def test_cli_json_result(tmp_path, sources, model):
    destination = str(tmp_path / "m.weights.json")
    run = run_cli(
        "convert", sources[".keras"], destination, "--json", "--quiet", "--max-shard-size", "1"
    )
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""
    result = json.loads(run.stdout)
    assert result["path"] == destination and result["verified"] is True
    assert result["tensors"] == len(_walk.plan_for(model).entries)
    assert result["bytes"] == sum(os.path.getsize(p) for p in result["paths"])


def test_cli_exit_status_2_when_it_cannot_convert(tmp_path, sources):
    missing = run_cli("convert", str(tmp_path / "none.keras"), str(tmp_path / "x.safetensors"))
    assert missing.returncode == 2 and "none.keras" in missing.stderr
    no_config = run_cli("convert", sources[".weights.h5"], str(tmp_path / "x.keras"))
    assert no_config.returncode == 2 and "config" in no_config.stderr
    assert not (tmp_path / "x.keras").exists()
    unknown = run_cli("convert", sources[".weights.h5"], str(tmp_path / "x.ckpt"))
    assert unknown.returncode == 2


def test_cli_exit_status_1_when_the_copy_does_not_match(tmp_path):
    # The copy is replaced, before the check, by a file of the same layout holding other
    # values (HDF5 records no checksums): the check must see it differ from its source.
    code = textwrap.dedent(
        """
        import sys, shutil
        import fastckpt.conversion as convert
        real = convert._compare

        def swapped(checkpoint, dst, *args):
            shutil.copyfile(sys.argv[3], dst)
            return real(checkpoint, dst, *args)

        convert._compare = swapped
        from fastckpt.cli import main
        sys.exit(main(["convert", sys.argv[1], sys.argv[2]]))
        """
    )
    source = tmp_path / "a.safetensors"
    other = tmp_path / "b.weights.h5"
    fastckpt.save(model_in_state(1), source)
    fastckpt.save(model_in_state(2), other)
    destination = tmp_path / "a.weights.h5"
    run = subprocess.run(
        [sys.executable, "-c", code, str(source), str(destination), str(other)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 1, run.stderr
    assert "does not match its source" in run.stderr
    assert not destination.exists(), "a copy that failed its check is removed"


def test_a_copy_that_does_not_match_is_removed(tmp_path, model, monkeypatch):
    from fastckpt import conversion as convert

    other = tmp_path / "other.weights.h5"
    fastckpt.save(model_in_state(2), other)
    real = convert._compare

    def swapped(checkpoint, dst, *args):
        shutil.copyfile(other, dst)
        return real(checkpoint, dst, *args)

    monkeypatch.setattr(convert, "_compare", swapped)
    source = tmp_path / "m.keras"
    fastckpt.save(model, source)
    with pytest.raises(convert.CopyMismatchError, match="tensors differ"):
        fastckpt.convert(source, tmp_path / "m.weights.h5")
    assert not (tmp_path / "m.weights.h5").exists()


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        (".weights.h5", ".safetensors"),
        (".safetensors", ".weights.json"),
        (".keras", ".zst.safetensors"),
        (".zst.safetensors", ".keras"),
        (".weights.json", ".weights.h5"),
    ],
)
def test_cli_converts_without_keras(tmp_path, sources, model, src, dst):
    destination = str(tmp_path / f"x{dst}")
    run = run_cli("convert", sources[src], destination, keras_importable=False)
    assert run.returncode == 0, run.stderr
    check_with_stock_reader(destination, model)


def test_cli_says_the_legacy_layout_needs_keras(tmp_path, sources):
    run = run_cli(
        "convert", sources[".h5"], str(tmp_path / "x.safetensors"), keras_importable=False
    )
    assert run.returncode == 2
    assert "Keras must be installed" in run.stderr


def test_cli_inspect_and_verify_a_container(sources):
    inspected = run_cli("inspect", sources[".zst.safetensors"], "--json")
    assert inspected.returncode == 0, inspected.stderr
    info = json.loads(inspected.stdout)
    assert info["format"] == "safetensors_zstd"
    assert all(0 < t["stored_bytes"] for t in info["tensors"])
    table = run_cli("inspect", sources[".zst.safetensors"])
    assert table.returncode == 0 and "stored" in table.stdout
    assert run_cli("verify", sources[".zst.safetensors"]).returncode == 0


def test_cli_inspect_says_why_it_cannot(tmp_path):
    run = run_cli("inspect", str(tmp_path / "none.zst.safetensors"), keras_importable=False)
    assert run.returncode == 2
    assert "none.zst.safetensors: cannot inspect" in run.stderr and "Traceback" not in run.stderr


def test_cli_draws_a_bar_on_a_terminal(tmp_path, sources):
    parent, child = pty.openpty()
    destination = str(tmp_path / "x.weights.h5")
    try:
        proc = subprocess.Popen(
            [sys.executable, "-c", CLI, "allow", "convert", sources[".safetensors"], destination],
            stdout=subprocess.DEVNULL,
            stderr=child,
        )
        os.close(child)
        child = -1
        seen = b""
        while True:
            try:
                chunk = os.read(parent, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        assert proc.wait(timeout=300) == 0, seen
    finally:
        os.close(parent)
        if child >= 0:
            os.close(child)
    text = seen.decode()
    assert "\r" in text and "converting" in text and "done" in text


# Memory -------------------------------------------------------------------------------------

# The child's peak resident memory (VmHWM: its own, where getrusage's maxrss would carry
# over the parent's peak across exec) grown by a conversion.
PEAK = textwrap.dedent(
    """
    import sys
    import fastckpt
    from fastckpt import formats

    def peak():
        with open("/proc/self/status") as f:
            line = next(x for x in f if x.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024

    formats.open_checkpoint(sys.argv[1])  # every import and reader loaded
    before = peak()
    fastckpt.convert(sys.argv[1], sys.argv[2], threads=2)
    print(peak() - before)
    """
)


@pytest.mark.parametrize("dst", [".weights.h5", ".zst.safetensors", ".keras"])
def test_a_conversion_holds_a_few_pieces_not_the_checkpoint(tmp_path, dst):
    # 4 tensors of 64 MiB (random, so that zstd keeps them about as large). Memory holds a
    # few pieces of a tensor per thread (and zstd's own buffers), never the checkpoint.
    rng = np.random.default_rng(0)
    source = tmp_path / "big.safetensors"
    save_file(
        {f"layers/dense_{i}/vars/0": rng.random((4096, 4096), "float32") for i in range(4)},
        str(source),
        metadata={"keras.config": "{}"} if dst == ".keras" else None,
    )
    total = os.path.getsize(source)
    run = subprocess.run(
        [sys.executable, "-c", PEAK, str(source), str(tmp_path / f"out{dst}")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    grew = int(run.stdout.split()[-1])
    for p in tmp_path.iterdir():
        p.unlink()
    assert grew < total / 2, f"peak memory grew by {grew} bytes for a {total}-byte checkpoint"


def test_progress_is_quiet_by_default_and_reports_when_verbose(tmp_path, model, capfd):
    fastckpt.save(model, tmp_path / "a.safetensors")
    fastckpt.load(model, tmp_path / "a.safetensors")
    fastckpt.convert(tmp_path / "a.safetensors", tmp_path / "b.weights.h5")
    assert capfd.readouterr().err == ""
    fastckpt.save(model, tmp_path / "c.zst.safetensors", verbose=True)
    fastckpt.load(model, tmp_path / "c.zst.safetensors", verbose=True)
    fastckpt.convert(tmp_path / "c.zst.safetensors", tmp_path / "d.keras", verbose=True)
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line]
    nbytes = sum(v.nbytes for v in by_path(model).values())
    for verb in ("saving", "loading", "converting"):
        (line,) = [x for x in lines if x.startswith(verb) and ": done," in x]
        assert "/s)" in line, line
    assert any(f"{size_text(nbytes)} in" in x for x in lines if x.startswith("saving"))
