"""The native writer on its own: every dtype, shape and size, read back by the
`safetensors` package (an independent reader), and the GIL released during I/O."""

import os
import threading
import time

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.numpy import load_file

from fastckpt import _fastckpt

DTYPES = [
    np.bool_,
    np.uint8,
    np.uint16,
    np.uint32,
    np.uint64,
    np.int8,
    np.int16,
    np.int32,
    np.int64,
    np.float16,
    ml_dtypes.bfloat16,
    np.float32,
    np.float64,
]


def random_array(rng: np.random.Generator, dtype, shape) -> np.ndarray:
    dtype = np.dtype(dtype)
    raw = rng.integers(
        0, 256, size=int(np.prod(shape, dtype=np.int64)) * dtype.itemsize, dtype=np.uint8
    )
    arr = raw.view(dtype).reshape(shape) if raw.size else np.empty(shape, dtype)
    if dtype == np.bool_:
        arr = (raw.reshape(shape) & 1).astype(np.bool_) if raw.size else arr
    return np.asarray(arr)


def write(path, tensors, metadata=None, **kw):
    planned = _fastckpt.plan_safetensors(str(path), tensors, metadata or {})
    return _fastckpt.write([planned], options=_fastckpt.WriteOptions(**kw)).result()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_every_dtype_round_trips_through_safetensors(tmp_path, dtype):
    rng = np.random.default_rng(1)
    tensors = {
        "scalar": random_array(rng, dtype, ()),
        "empty": random_array(rng, dtype, (0, 3)),
        "matrix": random_array(rng, dtype, (5, 7)),
    }
    path = tmp_path / "t.safetensors"
    write(path, list(tensors.items()))
    if np.dtype(dtype) == ml_dtypes.bfloat16:
        # safetensors.numpy has no bfloat16; safe_open(framework="numpy") neither:
        # compare raw bytes through the header the package parsed.
        with safe_open(str(path), framework="numpy") as f:
            assert set(f.keys()) == set(tensors)
        loaded = {k: v.view(ml_dtypes.bfloat16) for k, v in _read_raw(path).items()}
    else:
        loaded = load_file(str(path))
        with safe_open(str(path), framework="numpy") as f:
            assert sorted(f.keys()) == sorted(tensors)
            assert f.get_tensor("matrix").tobytes() == tensors["matrix"].tobytes()
    for name, arr in tensors.items():
        got = loaded[name]
        assert got.shape == arr.shape and got.tobytes() == arr.tobytes(), name


def _read_raw(path) -> dict[str, np.ndarray]:
    """An independent minimal reader: header JSON + byte slices (for bf16, which the
    safetensors numpy API cannot return)."""
    import json

    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        assert info["dtype"] == "BF16"
        out[name] = np.frombuffer(data[8 + n + begin : 8 + n + end], np.uint16).reshape(
            info["shape"]
        )
    return out


@given(
    specs=st.lists(
        st.tuples(
            st.sampled_from(DTYPES[:10] + DTYPES[11:]),
            st.lists(st.integers(0, 6), max_size=4),
        ),
        max_size=12,
    ),
    threads=st.integers(1, 4),
)
def test_random_tensor_sets_round_trip(tmp_path_factory, specs, threads):
    rng = np.random.default_rng(len(specs))
    tensors = [(f"t/{i}", random_array(rng, d, tuple(s))) for i, (d, s) in enumerate(specs)]
    path = tmp_path_factory.mktemp("p") / "r.safetensors"
    write(path, tensors, threads=threads)
    loaded = load_file(str(path))
    assert sorted(loaded) == sorted(n for n, _ in tensors)
    for name, arr in tensors:
        assert loaded[name].dtype == arr.dtype and loaded[name].tobytes() == arr.tobytes()


def test_ten_thousand_tensors(tmp_path):
    rng = np.random.default_rng(2)
    tensors = [
        (f"layers/l{i}/vars/0", rng.normal(size=(i % 7 + 1,)).astype("float32"))
        for i in range(10_000)
    ]
    path = tmp_path / "many.safetensors"
    result = write(path, tensors, {"k": "v"}, threads=2)
    loaded = load_file(str(path))
    assert len(loaded) == 10_000
    for name, arr in tensors[::97]:
        assert np.array_equal(loaded[name], arr)
    with safe_open(str(path), framework="numpy") as f:
        assert f.metadata()["k"] == "v"
    assert result.bytes == os.path.getsize(path)


def test_checksums_are_crc32c_of_each_payload(tmp_path):
    import json

    import zstandard  # noqa: F401  (its presence is part of the test environment)

    arr = np.arange(1000, dtype=np.int32)
    path = tmp_path / "c.safetensors"
    write(path, [("a", arr)])
    with safe_open(str(path), framework="numpy") as f:
        sums = json.loads(f.metadata()["fastckpt.crc32c"])
    assert int(sums["a"], 16) == _crc32c(arr.tobytes())


def _crc32c(data: bytes) -> int:
    """Bitwise CRC-32C (Castagnoli), written from the definition: an oracle independent of
    the crate the writer uses."""
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


def test_write_releases_the_gil(tmp_path):
    """A Python thread keeps running while a 1 GiB write is in flight."""
    big = np.ones(1 << 28, dtype=np.float32)  # 1 GiB
    target = "/dev/shm" if os.path.isdir("/dev/shm") else str(tmp_path)
    path = os.path.join(target, f"gil-{os.getpid()}.safetensors")
    ticks = []
    stop = threading.Event()

    def count():
        while not stop.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.001)

    counter = threading.Thread(target=count)
    counter.start()
    try:
        time.sleep(0.02)
        before = len(ticks)
        started = time.perf_counter()
        write(path, [("big", big)], threads=2)
        elapsed = time.perf_counter() - started
        during = [t for t in ticks[before:] if started <= t <= started + elapsed]
    finally:
        stop.set()
        counter.join()
        if os.path.exists(path):
            os.remove(path)
    # With the GIL held for the whole write the counter could not tick at all.
    assert len(during) >= 5, f"counter ticked {len(during)} times during a {elapsed:.2f} s write"


def test_background_job_reports_and_keeps_arrays_alive(tmp_path):
    path = tmp_path / "bg.safetensors"
    planned = _fastckpt.plan_safetensors(
        str(path), [("x", np.full((256, 1024), 7, np.float64))], {}
    )
    job = _fastckpt.write([planned], options=_fastckpt.WriteOptions(background=True))
    # The only reference to the array is the job's own.
    assert job.wait(30)
    assert job.done() and job.exception() is None
    report = job.result()
    assert report.paths == [path] and report.bytes == os.path.getsize(path)
    assert report.seconds > 0 and report.kept is None
    assert np.all(load_file(str(path))["x"] == 7)


@pytest.mark.parametrize(
    ("value", "error", "words"),
    [
        (np.zeros(3, dtype=object), TypeError, "dtype object is not supported"),
        (np.zeros(3, dtype=np.complex64), TypeError, "dtype complex64 is not supported"),
        (np.zeros((4, 4), np.float32)[:, ::2], ValueError, "not C-contiguous"),
        ([1.0, 2.0], TypeError, "expected a numpy array"),
        (np.zeros(3, dtype=">f4"), ValueError, "big-endian"),
    ],
)
def test_bad_input_names_the_tensor(tmp_path, value, error, words):
    with pytest.raises(error, match=words) as info:
        write(tmp_path / "bad.safetensors", [("layers/dense/vars/0", value)])
    assert "layers/dense/vars/0" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_duplicate_names_are_refused(tmp_path):
    from fastckpt import CheckpointContentError

    a = np.zeros(2, np.float32)
    with pytest.raises(CheckpointContentError, match="appears twice"):
        write(tmp_path / "d.safetensors", [("a", a), ("a", a)])
