"""`MemberWindow`, the in-place view of a stored zip member that h5py reads `.keras` weights
through, behaves as a file holding exactly the member's bytes: compared operation by
operation with a real file of those bytes (the oracle), then used end to end."""

from __future__ import annotations

import errno
import zipfile

import h5py
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fastckpt
from fastckpt.formats import open_checkpoint
from fastckpt.formats.keras_zip import MemberWindow

ops = st.lists(
    st.one_of(
        st.tuples(st.just("seek"), st.integers(-50, 400), st.sampled_from([0, 1, 2])),
        st.tuples(st.just("read"), st.integers(-1, 300), st.just(0)),
        st.tuples(st.just("readinto"), st.integers(0, 300), st.just(0)),
    ),
    max_size=30,
)


@given(data=st.binary(min_size=0, max_size=300), base=st.integers(0, 40), ops=ops)
def test_reads_like_a_file_of_the_member(tmp_path_factory, data, base, ops):
    folder = tmp_path_factory.mktemp("window")
    (folder / "archive.bin").write_bytes(b"\xaa" * base + data + b"\xbb" * 17)
    (folder / "member.bin").write_bytes(data)
    with (
        MemberWindow(str(folder / "archive.bin"), base, len(data)) as window,
        open(folder / "member.bin", "rb", buffering=0) as oracle,
    ):
        for op, n, whence in ops:
            if op == "seek":
                assert _seek(window, n, whence) == _seek(oracle, n, whence)
            elif op == "read":
                assert window.read(n) == oracle.read(n)
            else:
                a, b = bytearray(n), bytearray(n)
                assert window.readinto(a) == oracle.readinto(b)
                assert a == b
            assert window.tell() == oracle.tell()


def _seek(f, offset: int, whence: int) -> int | str:
    """The new position, or the errno of a refusal."""
    try:
        return f.seek(offset, whence)
    except OSError as e:
        return f"refused: {errno.errorcode[e.errno]}"


def test_keras_loads_through_the_window(tmp_path, trained_model):
    path = tmp_path / "m.keras"
    fastckpt.save(trained_model, path)
    with zipfile.ZipFile(path) as zf:
        assert zf.getinfo("model.weights.h5").compress_type == zipfile.ZIP_STORED
    want = [v.numpy() for v in trained_model.weights]
    for v in trained_model.weights:
        v.assign(np.zeros(v.shape, v.dtype))
    fastckpt.load(trained_model, path)
    for v, w in zip(trained_model.weights, want, strict=True):
        np.testing.assert_array_equal(v.numpy(), w)


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_keras_with_a_chunked_dataset_loads(tmp_path, trained_model, compression):
    """A dataset h5py must decode (chunked, gzip) is read through h5py, from the window on
    a stored member or through zipfile's stream for a compressed one."""
    saved = tmp_path / "m.keras"
    fastckpt.save(trained_model, saved)
    weights = tmp_path / "model.weights.h5"
    with zipfile.ZipFile(saved) as zf:
        weights.write_bytes(zf.read("model.weights.h5"))
        others = [(i, zf.read(i)) for i in zf.infolist() if i.filename != "model.weights.h5"]
    with h5py.File(weights, "r+") as f:
        name = next(n for n in _datasets(f) if f[n].size > 1)
        data = f[name][()]
        del f[name]
        f.create_dataset(name, data=data, chunks=True, compression="gzip")
    path = tmp_path / "chunked.keras"
    with zipfile.ZipFile(path, "w") as zf:
        for info, data in others:
            zf.writestr(info, data)
        zf.write(weights, "model.weights.h5", compress_type=compression)
    assert any(t.offset < 0 for t in open_checkpoint(str(path)).tensors.values())
    want = [v.numpy() for v in trained_model.weights]
    for v in trained_model.weights:
        v.assign(np.zeros(v.shape, v.dtype))
    fastckpt.load(trained_model, path)
    for v, w in zip(trained_model.weights, want, strict=True):
        np.testing.assert_array_equal(v.numpy(), w)


def _datasets(f: h5py.File) -> list[str]:
    names: list[str] = []
    f.visititems(lambda n, obj: names.append(n) if isinstance(obj, h5py.Dataset) else None)
    return names
