"""Property tests of the HDF5 writer through the Python boundary, with h5py (its own
libhdf5) as the reader: random group trees, UTF-8 and long names, every dtype, 0-d and
zero-size shapes, large attributes."""

import h5py
import ml_dtypes
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from fastckpt import _fastckpt
from test_native import DTYPES, random_array

name = st.text(
    alphabet=st.characters(blacklist_characters="/.\x00", blacklist_categories=("Cs",)),
    min_size=1,
    max_size=40,
).filter(lambda s: len(s.encode()) < 200)
long_name = st.text(alphabet="abcxyz", min_size=256, max_size=300)


@st.composite
def trees(draw):
    paths = draw(st.lists(st.lists(name | long_name, min_size=1, max_size=3), max_size=12))
    datasets = {}
    groups = {}
    for parts in paths:
        prefix = "/" + "/".join(parts[:-1]) if len(parts) > 1 else ""
        if any(p.startswith(f"{d}/") or p == d for d in datasets for p in [prefix]):
            continue
        path = f"{prefix}/{parts[-1]}"
        if path in datasets or path in groups or any(d.startswith(f"{path}/") for d in datasets):
            continue
        if draw(st.booleans()):
            groups[path] = draw(
                st.text(
                    alphabet=st.characters(
                        blacklist_characters="\x00", blacklist_categories=("Cs",)
                    ),
                    max_size=30,
                )
            )
        else:
            shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
            datasets[path] = (draw(st.sampled_from(DTYPES)), shape)
    # a dataset can't be the parent of anything
    groups = {g: v for g, v in groups.items() if not any(g.startswith(f"{d}/") for d in datasets)}
    return groups, datasets


@given(tree=trees())
def test_random_trees_read_back_with_h5py(tmp_path_factory, tree):
    groups, datasets = tree
    rng = np.random.default_rng(len(datasets))
    tensors, nodes = [], []
    for path, note in groups.items():
        nodes.append(_fastckpt.Node(path, None, [_fastckpt.Attr.Utf8("name", note)]))
    arrays = {}
    for path, (dtype, shape) in datasets.items():
        arr = random_array(rng, dtype, shape)
        arrays[path] = arr
        attrs = (
            [_fastckpt.Attr.Utf8("dtype", "bfloat16")] if arr.dtype == ml_dtypes.bfloat16 else []
        )
        nodes.append(_fastckpt.Node(path, len(tensors), attrs))
        tensors.append((path, arr))
    target = tmp_path_factory.mktemp("h") / "t.weights.h5"
    _fastckpt.write([_fastckpt.plan_hdf5(str(target), tensors, nodes)]).result()
    with h5py.File(target, "r") as f:
        for path, note in groups.items():
            assert isinstance(f[path], h5py.Group) and f[path].attrs["name"] == note
        for path, arr in arrays.items():
            ds = f[path]
            assert ds.shape == arr.shape
            got = ds[()]
            assert np.asarray(got).tobytes() == arr.tobytes(), path


def test_twenty_thousand_datasets_and_a_large_attribute(tmp_path):
    tensors = [(f"/g/{i}", np.full((2,), i, np.int32)) for i in range(20_000)]
    big = "é" * 30_000  # 60 KB of UTF-8
    nodes = [_fastckpt.Node("/g", None, [_fastckpt.Attr.Utf8("name", big)])]
    nodes += [_fastckpt.Node(path, i, []) for i, (path, _) in enumerate(tensors)]
    path = tmp_path / "many.weights.h5"
    _fastckpt.write(
        [_fastckpt.plan_hdf5(str(path), tensors, nodes)], options=_fastckpt.WriteOptions(threads=2)
    ).result()
    with h5py.File(path, "r") as f:
        assert len(f["g"]) == 20_000
        assert f["g"].attrs["name"] == big
        for i in (0, 7, 19_999):
            assert list(f[f"g/{i}"][()]) == [i, i]
