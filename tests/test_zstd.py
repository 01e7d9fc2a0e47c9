"""The zstd container (`compression="zstd"`, `.zst.safetensors`): each tensor one standard
zstd frame with its content size and checksum, decoded by the `zstandard` package on its
own, read back by `fastckpt.load` bit for bit; the `safetensors` package reads every frame
as the `uint8` array it is."""

import json
import struct

import keras
import numpy as np
import pytest
import zstandard
from safetensors.numpy import load_file

import fastckpt
from conftest import assert_same_state, small_model
from fastckpt import CheckpointContentError
from fastckpt.inspection import describe
from fastckpt.verify import verify


def header_of(path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def state_by_path(model: keras.Model) -> dict[str, np.ndarray]:
    """Every saved value by its weight path, from Keras's own `.weights.h5` naming."""
    from fastckpt import _walk

    return {
        e.path: np.asarray(keras.ops.convert_to_numpy(e.source))
        for e in _walk.plan_for(model).entries
    }


def mixed_model() -> keras.Model:
    """float32 and bfloat16 weights, a big layer (its frame compressed on every thread)
    and Adam's state."""
    keras.utils.set_random_seed(5)
    model = keras.Sequential(
        [
            keras.Input((1024,)),
            keras.layers.Dense(9000, name="big"),  # 36 MiB: one frame on every thread
            keras.layers.Dense(8, name="half", dtype="bfloat16"),
            keras.layers.Dense(2, name="head"),
        ]
    )
    model.compile(optimizer="adam", loss="mse")
    model.optimizer.build(model.trainable_variables)
    return model


@pytest.fixture(scope="module")
def mixed():
    return mixed_model()


# The dtypes of the mixed model's values, as safetensors names them ("int": an optimizer's
# count, int64 under TensorFlow, int32 under JAX and torch).
SAFETENSORS_CODES = {"bfloat16": "BF16", "float32": "F32", "int32": "I32", "int64": "I64"}


@pytest.mark.parametrize(
    ("name", "compression"), [("m.zst.safetensors", None), ("m.safetensors", "zstd")]
)
def test_every_frame_decodes_on_its_own_with_zstandard(tmp_path, mixed, name, compression):
    path = tmp_path / name
    fastckpt.save(mixed, path, compression=compression)
    header = header_of(path)
    assert header["__metadata__"]["fastckpt.codec"] == "zstd"
    frames = load_file(path)  # the stock reader: each frame a uint8 array
    want = state_by_path(mixed)
    assert set(frames) == set(want)
    for name_, value in want.items():
        frame = frames[name_].tobytes()
        params = zstandard.get_frame_parameters(frame)
        assert params.has_checksum, name_
        assert params.content_size == value.nbytes, name_
        decoded = zstandard.ZstdDecompressor().decompress(frame)
        described = header[name_]["decoded"]
        assert described["shape"] == list(value.shape)
        assert decoded == np.ascontiguousarray(value).tobytes(), name_
        assert described["dtype"] == SAFETENSORS_CODES[value.dtype.name], name_
    assert any(v.dtype.name == "bfloat16" for v in want.values())


def test_load_reads_the_container_back_bit_exact(tmp_path, mixed):
    path = tmp_path / "m.zst.safetensors"
    fastckpt.save(mixed, path)
    other = mixed_model()
    for v in other.variables + other.optimizer.variables:
        v.assign(np.ones(v.shape, v.dtype))
    fastckpt.load(other, path)
    assert_same_state(mixed, other)
    back = fastckpt.load_model(path)
    assert_same_state(mixed, back)


def test_compressible_state_takes_less_room(tmp_path):
    model = small_model()
    big = keras.Sequential([keras.Input((512,)), keras.layers.Dense(512)])
    big.layers[0].kernel.assign(np.zeros((512, 512), "float32"))
    for m, tag in ((model, "small"), (big, "zeros")):
        plain = fastckpt.save(m, tmp_path / f"{tag}.safetensors")
        packed = fastckpt.save(m, tmp_path / f"{tag}.zst.safetensors")
        if tag == "zeros":
            assert packed.bytes < plain.bytes / 10
        assert describe(packed.path)["tensor_bytes"] == describe(plain.path)["tensor_bytes"]


def test_a_damaged_frame_is_refused(tmp_path, trained_model):
    path = tmp_path / "m.zst.safetensors"
    fastckpt.save(trained_model, path)
    header = header_of(path)
    start = 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]
    name = "layers/dense/vars/0"
    _, end = header[name]["data_offsets"]
    data = bytearray(path.read_bytes())
    data[start + end - 2] ^= 0xFF  # in the frame's checksum or last block
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointContentError, match="zstd frame"):
        fastckpt.load(small_model(1), path)
    report = verify(path)
    assert not report.ok and "zstd frame" in report.problems[0]


def test_a_frame_longer_than_its_content_size_says_is_refused(tmp_path, trained_model):
    path = tmp_path / "m.zst.safetensors"
    fastckpt.save(trained_model, path, include_optimizer=False)
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    name = "layers/dense/vars/0"
    header[name]["decoded"]["shape"] = [4, 4]  # 64 bytes, the frame says 48
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4)])
    with pytest.raises(CheckpointContentError):
        fastckpt.load(model, path)
    assert not verify(path).ok


def test_a_header_declaring_more_than_its_frame_can_hold_is_refused_before_reading(
    tmp_path, trained_model
):
    # A decompression bomb: a few stored bytes said to decode to a terabyte.
    path = tmp_path / "m.zst.safetensors"
    fastckpt.save(trained_model, path, include_optimizer=False)
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    header["layers/dense/vars/0"]["decoded"] = {"dtype": "F32", "shape": [2**38]}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])
    with pytest.raises(CheckpointContentError, match=r"more than a .*zstd frame can hold"):
        fastckpt.load(small_model(1), path)
    assert not verify(path).ok


def test_verify_checks_every_frame(tmp_path, trained_model):
    path = tmp_path / "m.zst.safetensors"
    fastckpt.save(trained_model, path)
    report = verify(path)
    assert report.ok, str(report)
    assert report.checksums == report.tensors == len(header_of(path)) - 1


@pytest.mark.parametrize("name", ["m.keras", "m.weights.h5", "m.h5"])
def test_formats_keras_reads_have_no_compressed_form(tmp_path, trained_model, name):
    with pytest.raises(ValueError, match=r"zst\.safetensors"):
        fastckpt.save(trained_model, tmp_path / name, compression="zstd")
    assert not list(tmp_path.iterdir())


def test_an_unknown_compression_is_refused(tmp_path, trained_model):
    with pytest.raises(ValueError, match=r"Received: compression='lz4'"):
        fastckpt.save(trained_model, tmp_path / "m.safetensors", compression="lz4")


@pytest.mark.parametrize(
    ("filepath", "compression"),
    [("ckpt/e{epoch}.zst.safetensors", None), ("ckpt/e{epoch}.safetensors", "zstd")],
)
def test_model_checkpoint_writes_the_container(tmp_path, filepath, compression):
    model = small_model()
    x = np.ones((16, 4), "float32")
    callback = fastckpt.ModelCheckpoint(
        str(tmp_path / filepath), save_weights_only=True, compression=compression
    )
    model.fit(x, x[:, :2], epochs=2, batch_size=8, verbose=0, callbacks=[callback])
    last = tmp_path / filepath.format(epoch=2)
    assert header_of(last)["__metadata__"]["fastckpt.codec"] == "zstd"
    back = small_model(seed=1)
    fastckpt.load(back, last)
    assert_same_state(model, back)


def test_model_checkpoint_refuses_compression_it_cannot_write(tmp_path):
    with pytest.raises(ValueError, match=r"Received: path="):
        fastckpt.ModelCheckpoint(str(tmp_path / "m.keras"), compression="zstd")


@pytest.mark.parametrize("stage", ["write", "fsync", "rename"])
def test_a_failed_save_keeps_the_previous_container(tmp_path, mixed, fault_injection, stage):
    from fastckpt import _fastckpt

    path = tmp_path / "m.zst.safetensors"
    first = small_model()
    fastckpt.save(first, path)
    before = path.read_bytes()
    _fastckpt.testing.inject_fault(stage)
    with pytest.raises(OSError) as info:
        fastckpt.save(mixed, path)  # its large tensor takes the every-thread path
    _fastckpt.testing.inject_fault(None)
    assert info.value.filename == str(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name], "no temp file is left"


def test_a_background_save_writes_the_container_too(tmp_path, trained_model):
    path = tmp_path / "m.safetensors"
    job = fastckpt.save_async(trained_model, path, compression="zstd")
    assert job.result().path == str(path)
    assert header_of(path)["__metadata__"]["fastckpt.codec"] == "zstd"
    back = small_model(seed=1)
    fastckpt.load(back, path)
    assert_same_state(trained_model, back)
