"""Hostile and damaged files: `fastckpt.load`, `fastckpt.load_model` and `fastckpt verify`
answer each with a clear `CheckpointContentError` (a ValueError) or, where the damage cannot
be seen, a clean load; never a crash, a hang, a memory blow-up or code execution.

Each case runs in a child process (crash-proof) under RLIMIT_AS of 1 GiB above what the
process already maps, with a time limit, and with pickle's and numpy.load's entry points
replaced by tripwires.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest

import fastckpt
from children import set_state, state_arrays, state_model
from fastckpt import CheckpointContentError
from fastckpt.verify import verify

SUFFIX = {"S": ".safetensors", "W": ".weights.h5", "K": ".keras", "L": ".h5"}


class Evil:
    """Unpickling this creates a marker file: proof of code execution if it ever appears."""

    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("originals")
    model = state_model(64)
    set_state(model, state_arrays(model, "A"))
    out = {}
    for key in "SWK":
        out[key] = folder / f"a{SUFFIX[key]}"
        fastckpt.save(model, out[key])
    out["L"] = folder / "a.h5"
    fastckpt.save(state_model(64), out["L"])  # a separate model: see test_faults.states
    return out


# ---- crafting helpers --------------------------------------------------------------------


def cut(src: Path, dst: Path, at: int) -> Path:
    dst.write_bytes(src.read_bytes()[:at])
    return dst


def flip(src: Path, dst: Path, at: int) -> Path:
    data = bytearray(src.read_bytes())
    data[at] ^= 0x5A
    dst.write_bytes(bytes(data))
    return dst


def st_parts(src: Path) -> tuple[dict, bytes]:
    data = src.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def st_file(dst: Path, header: dict | bytes, payload: bytes, declared: int | None = None):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(raw) if declared is None else declared
    dst.write_bytes(struct.pack("<Q", n) + raw + payload)
    return dst


def st_edit(src: Path, dst: Path, edit: Callable[[dict], None]) -> Path:
    header, payload = st_parts(src)
    edit(header)
    return st_file(dst, header, payload)


def first_tensor(header: dict) -> dict:
    return next(v for k, v in header.items() if k != "__metadata__" and v["shape"])


def h5_copy(src: Path, dst: Path, edit: Callable[[h5py.File], None]) -> Path:
    dst.write_bytes(src.read_bytes())
    with h5py.File(dst, "r+") as f:
        edit(f)
    return dst


def replace_dataset(f: h5py.File, path: str, **kwargs) -> None:
    attrs = dict(f[path].attrs)
    del f[path]
    ds = f.create_dataset(path, **kwargs)
    ds.attrs.update(attrs)


def zip_rewrite(src: Path, dst: Path, edit: Callable[[list], None]) -> Path:
    """Re-packs a .keras file member by member (stored), after `edit(members)`."""
    with zipfile.ZipFile(src) as zf:
        members = [(i.filename, zf.read(i)) for i in zf.infolist()]
    edit(members)
    with warnings.catch_warnings(), zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zf:
        warnings.simplefilter("ignore")  # "Duplicate name": wanted, for one case
        for name, data in members:
            zf.writestr(zipfile.ZipInfo(name), data)
    return dst


def patch_central_size(src: Path, dst: Path, member: str, size: int) -> Path:
    """Makes the central directory claim `size` uncompressed bytes for `member`."""
    data = bytearray(src.read_bytes())
    name = member.encode()
    at = data.find(b"PK\x01\x02")
    while at >= 0:
        n = struct.unpack_from("<H", data, at + 28)[0]
        if bytes(data[at + 46 : at + 46 + n]) == name:
            struct.pack_into("<I", data, at + 24, size)
            break
        at = data.find(b"PK\x01\x02", at + 4)
    dst.write_bytes(bytes(data))
    return dst


# ---- the cases ---------------------------------------------------------------------------
# (id, original, make(original, dst_folder) -> path, loader, expected load, expected verify)
# expected: "error" (CheckpointContentError), "ok" (loads state A bit-exact), "blind" (loads
# without error: the damage is in data the format has no checksum for).


def _cases():
    cases = []

    def case(ident, key, make, load="error", check="error", loader="load"):
        cases.append(pytest.param(key, make, loader, load, check, id=ident))

    # SafeTensors
    for frac in (0, 0.02, 0.5, 0.999):
        case(
            f"st-truncated-{frac}",
            "S",
            lambda s, d, frac=frac: cut(
                s, d / "t.safetensors", max(4, int(s.stat().st_size * frac))
            ),
        )
    case(
        "st-header-only",
        "S",
        lambda s, d: cut(s, d / "t.safetensors", 8 + st_parts(s)[0].__len__()),
    )
    case("st-payload-flipped", "S", lambda s, d: flip(s, d / "t.safetensors", s.stat().st_size - 3))
    case("st-header-flipped", "S", lambda s, d: flip(s, d / "t.safetensors", 20))
    case(
        "st-header-length-past-end",
        "S",
        lambda s, d: st_file(d / "t.safetensors", *st_parts(s), declared=s.stat().st_size),
    )
    case(
        "st-header-length-huge",
        "S",
        lambda s, d: st_file(d / "t.safetensors", *st_parts(s), declared=2**63),
    )

    def overlap(h):
        a, b = [v for k, v in h.items() if k != "__metadata__"][:2]
        b["data_offsets"] = [
            a["data_offsets"][0],
            a["data_offsets"][0] + b["data_offsets"][1] - b["data_offsets"][0],
        ]

    case("st-offsets-overlap", "S", lambda s, d: st_edit(s, d / "t.safetensors", overlap))

    def past_end(h):
        t = first_tensor(h)
        t["data_offsets"] = [t["data_offsets"][0] + 2**40, t["data_offsets"][1] + 2**40]

    case("st-offsets-past-end", "S", lambda s, d: st_edit(s, d / "t.safetensors", past_end))

    def huge_shape(h):
        first_tensor(h)["shape"] = [2**31, 2**31, 2**31]

    case("st-huge-shape", "S", lambda s, d: st_edit(s, d / "t.safetensors", huge_shape))

    def zero_dim_huge(h):
        t = first_tensor(h)
        t["shape"] = [0, 2**62, 2**62]
        t["data_offsets"] = [t["data_offsets"][0], t["data_offsets"][0]]

    case("st-zero-dim-huge-shape", "S", lambda s, d: st_edit(s, d / "t.safetensors", zero_dim_huge))

    def dtype_swap(h):
        t = next(v for k, v in h.items() if k != "__metadata__" and v["dtype"] == "F32")
        t["dtype"] = "I32"

    # A consistent file that does not match the model: verify passes, load refuses.
    case(
        "st-dtype-mismatch",
        "S",
        lambda s, d: st_edit(s, d / "t.safetensors", dtype_swap),
        check="ok",
    )

    def shape_swap(h):
        t = next(v for k, v in h.items() if k != "__metadata__" and len(v["shape"]) == 2)
        t["shape"] = [t["shape"][0] * t["shape"][1]]  # same bytes, another shape

    case(
        "st-shape-mismatch",
        "S",
        lambda s, d: st_edit(s, d / "t.safetensors", shape_swap),
        check="ok",
    )

    def bad_config(h):
        h["__metadata__"]["keras.config"] = '{"class_name": "Sequential", "config": [}'

    case(
        "st-config-garbage",
        "S",
        lambda s, d: st_edit(s, d / "t.safetensors", bad_config),
        loader="load_model",
        check="ok",
    )
    case(
        "st-is-a-pickle",
        "S",
        lambda s, d: _pickle_file(d / "t.safetensors", d),
    )

    # .weights.h5
    for frac in (0.01, 0.3, 0.9, 0.999):
        case(
            f"h5-truncated-{frac}",
            "W",
            lambda s, d, frac=frac: cut(s, d / "t.weights.h5", int(s.stat().st_size * frac)),
        )
    case("h5-superblock-flipped", "W", lambda s, d: flip(s, d / "t.weights.h5", 20))
    case(
        "h5-payload-flipped",
        "W",
        lambda s, d: flip(s, d / "t.weights.h5", s.stat().st_size - 3),
        load="blind",
        check="ok",
    )
    kernel = "layers/dense/vars/0"

    def soft(f):
        del f[kernel]
        f[kernel] = h5py.SoftLink("/layers/dense_1/vars/0")

    case("h5-soft-link", "W", lambda s, d: h5_copy(s, d / "t.weights.h5", soft))

    def external_link(f, target=None):
        del f[kernel]
        f[kernel] = h5py.ExternalLink(str(target), "/layers/dense/vars/0")

    case(
        "h5-external-link",
        "W",
        lambda s, d: h5_copy(s, d / "t.weights.h5", lambda f: external_link(f, s)),
    )

    def external_storage(f, target=None):
        ds = f[kernel]
        shape, dtype = ds.shape, ds.dtype
        replace_dataset(
            f, kernel, shape=shape, dtype=dtype, external=[(str(target), 0, h5py.h5f.UNLIMITED)]
        )

    case(
        "h5-external-dataset",
        "W",
        lambda s, d: h5_copy(s, d / "t.weights.h5", lambda f: external_storage(f, s)),
    )

    def declared_huge(f):
        replace_dataset(f, kernel, shape=(2**32,), dtype="f4")  # 16 GiB, nothing stored

    case(
        "h5-declared-far-past-file", "W", lambda s, d: h5_copy(s, d / "t.weights.h5", declared_huge)
    )

    def gzip_bomb(f):
        replace_dataset(
            f, kernel, shape=(2**32,), dtype="f4", chunks=(2**20,), compression="gzip", fillvalue=0
        )
        f[kernel][: 2**20] = 0

    case("h5-gzip-bomb", "W", lambda s, d: h5_copy(s, d / "t.weights.h5", gzip_bomb))

    def vlen_strings(f):
        replace_dataset(
            f, kernel, data=np.array(["x" * 10] * 4, dtype=object), dtype=h5py.string_dtype()
        )

    case("h5-string-dtype", "W", lambda s, d: h5_copy(s, d / "t.weights.h5", vlen_strings))

    def pickled_opaque(f, folder=None):
        blob = _evil_pickle(folder)
        replace_dataset(f, kernel, data=np.void(blob))

    case(
        "h5-pickle-in-opaque",
        "W",
        lambda s, d: h5_copy(s, d / "t.weights.h5", lambda f: pickled_opaque(f, d)),
    )

    def big_endian(f):
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset) and obj.dtype.kind == "f":
                data = obj[()]
                replace_dataset(f, name, data=data.astype(data.dtype.newbyteorder(">")))

        names = []
        f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        for n in names:
            visit(n, f[n])

    case(
        "h5-big-endian",
        "W",
        lambda s, d: h5_copy(s, d / "t.weights.h5", big_endian),
        load="ok",
        check="ok",
    )

    def hard_cycle(f):
        f["layers/dense/loop"] = f["layers"]

    case(
        "h5-hard-link-cycle",
        "W",
        lambda s, d: h5_copy(s, d / "t.weights.h5", hard_cycle),
        load="any",
        check="any",
    )

    # .keras
    for at in (10, 0.5, -22, -1):
        case(
            f"keras-truncated-{at}",
            "K",
            lambda s, d, at=at: cut(
                s,
                d / "t.keras",
                int(s.stat().st_size * at) if isinstance(at, float) else at % s.stat().st_size,
            ),
        )
    case(
        "keras-weights-payload-flipped",
        "K",
        lambda s, d: flip(s, d / "t.keras", _kernel_offset(s) + 5),
        # The loader checks the stored member's CRC-32 before h5py opens it in place.
        load="error",
        check="error",
    )
    case(
        "keras-member-dotdot",
        "K",
        lambda s, d: zip_rewrite(s, d / "t.keras", lambda m: m.append(("../../evil.txt", b"x"))),
    )
    case(
        "keras-member-absolute",
        "K",
        lambda s, d: zip_rewrite(s, d / "t.keras", lambda m: m.append(("/tmp/evil.txt", b"x"))),
    )
    case(
        "keras-member-twice",
        "K",
        lambda s, d: zip_rewrite(
            s, d / "t.keras", lambda m: m.append(("model.weights.h5", b"not hdf5"))
        ),
    )
    case(
        "keras-bomb-declared-size",
        "K",
        lambda s, d: patch_central_size(s, d / "t.keras", "config.json", 0xFFFFFFF0),
    )
    case(
        "keras-local-header-renamed",
        "K",
        lambda s, d: _rename_local_header(s, d / "t.keras"),
    )
    case(
        "keras-npz-pickle-instead-of-h5",
        "K",
        lambda s, d: zip_rewrite(
            s,
            d / "t.keras",
            lambda m: m.__setitem__(
                slice(None),
                [(n, b) for n, b in m if n != "model.weights.h5"]
                + [("model.weights.npz", _evil_npz(d))],
            ),
        ),
        loader="load_model",
    )
    case(
        "keras-config-is-a-pickle",
        "K",
        lambda s, d: zip_rewrite(
            s,
            d / "t.keras",
            lambda m: m.__setitem__(
                slice(None),
                [(n, _evil_pickle(d) if n == "config.json" else b) for n, b in m],
            ),
        ),
        loader="load_model",
        check="error",  # config.json must be JSON: verify says so
    )
    case(
        "keras-lambda-layer",
        "K",
        lambda s, d: _lambda_model(d / "t.keras"),
        loader="load_model",
        check="ok",
    )

    # legacy .h5
    case("legacy-truncated", "L", lambda s, d: cut(s, d / "t.h5", s.stat().st_size // 2))
    # libhdf5 loops forever on a free-space heap object of size 0 (found by fuzzing)
    case("legacy-global-heap-loop", "L", lambda s, d: _heap_loop(s, d / "t.h5"))

    def legacy_soft(f):
        name = next(iter(f["model_weights"]))
        del f[f"model_weights/{name}"]
        f[f"model_weights/{name}"] = h5py.SoftLink("/model_weights")

    case("legacy-soft-link", "L", lambda s, d: h5_copy(s, d / "t.h5", legacy_soft))

    def legacy_external(f, target=None):
        name = next(iter(f["model_weights"]))
        del f[f"model_weights/{name}"]
        f[f"model_weights/{name}"] = h5py.ExternalLink(str(target), f"/model_weights/{name}")

    case(
        "legacy-external-link",
        "L",
        lambda s, d: h5_copy(s, d / "t.h5", lambda f: legacy_external(f, s)),
    )
    case(
        "legacy-external-link-load-model",
        "L",
        lambda s, d: h5_copy(s, d / "t.h5", lambda f: legacy_external(f, s)),
        loader="load_model",
    )
    return cases


def _evil_pickle(folder: Path) -> bytes:
    Evil.marker = str(folder / "EXECUTED")
    return pickle.dumps(Evil())


def _evil_npz(folder: Path) -> bytes:
    import io

    Evil.marker = str(folder / "EXECUTED")
    buf = io.BytesIO()
    np.savez(buf, x=np.array([Evil(), 1], dtype=object))  # an object array: pickled
    return buf.getvalue()


def _heap_loop(src: Path, dst: Path) -> Path:
    """Zeroes the header of the global heap's second object: a free-space object of size
    0, on which libhdf5 1.14 spins while reading any string attribute."""
    data = bytearray(src.read_bytes())
    at = data.find(b"GCOL\x01\x00\x00\x00") + 16
    (size,) = struct.unpack_from("<Q", data, at + 8)
    at += 16 + (size + 7) // 8 * 8
    data[at : at + 16] = bytes(16)
    dst.write_bytes(bytes(data))
    return dst


def _kernel_offset(path: Path) -> int:
    from fastckpt import formats

    return formats.open_checkpoint(path).tensors["layers/dense/vars/0"].offset


def _pickle_file(dst: Path, folder: Path) -> Path:
    dst.write_bytes(_evil_pickle(folder))
    return dst


def _rename_local_header(src: Path, dst: Path) -> Path:
    data = bytearray(src.read_bytes())
    with zipfile.ZipFile(src) as zf:
        info = zf.getinfo("model.weights.h5")
    at = info.header_offset + 30
    assert data[at : at + 16] == b"model.weights.h5"
    data[at : at + 16] = b"model.weights.h6"
    dst.write_bytes(bytes(data))
    return dst


def _lambda_model(dst: Path) -> Path:
    marker = str(dst.parent / "EXECUTED")
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Lambda(lambda x: x + (Path(marker).touch() or 0))]
    )
    model.save(dst)  # Keras's own file: its config carries the lambda's bytecode
    if os.path.exists(marker):
        os.remove(marker)  # tracing the model at save time ran it here, not the loader
    return dst


@pytest.mark.parametrize(("key", "make", "loader", "load", "check"), _cases())
def test_hostile_file(forkserver, originals, tmp_path, key, make, loader, load, check):
    path = make(originals[key], tmp_path)
    child = forkserver.start("load_hostile", path=str(path), loader=loader)
    done = child.expect("done", timeout=120)
    status = child.wait_exit(60)
    assert status == {"code": 0}, f"the loading child crashed: {status}"
    results, tripped = done["results"], done["tripped"]
    assert not tripped, f"unpickling was attempted: {tripped}"
    assert not (tmp_path / "EXECUTED").exists(), "code from the file was executed"
    for step, want in (("load", load), ("verify", check)):
        got = results[step]
        if want == "error":
            assert "CheckpointContentError" in got.get("mro", ()) or got.get("ok") is False, (
                f"{step}: wanted a CheckpointContentError, got {got}"
            )
            if "mro" in got:
                assert "ValueError" in got["mro"]
        elif want == "ok":
            assert got.get("ok") is True, f"{step}: wanted success, got {got}"
            if step == "load":
                assert got["matches_A"], "loaded values differ from the original"
        elif want == "blind":
            assert got.get("ok") is True, f"{step}: wanted a clean load, got {got}"
        else:  # "any": an answer, not a crash or a hang
            assert got.get("ok") is True or "CheckpointContentError" in got.get("mro", ()), got


def test_missing_file_is_an_os_error_not_a_content_error(tmp_path):
    model = state_model(64)
    for suffix in SUFFIX.values():
        with pytest.raises(FileNotFoundError):
            fastckpt.load(model, tmp_path / f"none{suffix}")
        with pytest.raises(FileNotFoundError):
            verify(tmp_path / f"none{suffix}")


def test_verify_reports_what_it_checked(originals):
    reports = {key: verify(path) for key, path in originals.items()}
    assert all(r.ok for r in reports.values()), [str(r) for r in reports.values()]
    assert reports["S"].checksums == reports["S"].tensors > 0 and reports["S"].unchecked == 0
    assert reports["K"].checksums >= 3 and reports["K"].unchecked == 0  # one per zip member
    assert reports["W"].checksums == 0 and reports["W"].unchecked == reports["W"].tensors
    assert issubclass(CheckpointContentError, ValueError)


def test_cli_verify_and_inspect(originals, tmp_path, capsys):
    from fastckpt.cli import main

    assert main(["verify", str(originals["S"]), str(originals["K"])]) == 0
    bad = flip(originals["S"], tmp_path / "b.safetensors", originals["S"].stat().st_size - 1)
    assert main(["verify", str(bad)]) == 1
    assert "checksum mismatch" in capsys.readouterr().out
    assert main(["verify", str(tmp_path / "none.safetensors")]) == 2
    assert main(["inspect", str(originals["W"])]) == 0
    assert "layers/dense/vars/0" in capsys.readouterr().out
