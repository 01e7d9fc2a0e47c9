"""Independent oracle for fastckpt's HDF5 writer: h5py (its bundled libhdf5) and Keras.

Used by `hdf5_oracles.rs`. A *manifest* is JSON describing an HDF5 tree:

    {"objects": [{"path": "/a/b", "kind": "group" | "dataset",
                  "dtype": "float32", "shape": [2, 3], "data": "<hex of C-order bytes>",
                  "attrs": [{"name": "n", "kind": "utf8", "value": "..."}, ...]}, ...]}

Attribute kinds mirror `AttrValue`: utf8 (value: str), bytes (value: hex), str_array
(value: [str]), fixed_bytes_array (width, value: [hex]), empty_list.

Commands:
    check FILE MANIFEST                h5py's view of FILE must equal MANIFEST; then edit
                                       FILE in place (r+) and check it again.
    keras-make DIR                     write Keras's own files into DIR, each with a manifest
                                       dumped from it by h5py.
    keras-load DIR                     load our files (DIR/ours.*) with Keras and compare
                                       every variable bit for bit with Keras's own files.
"""

import json
import os
import random
import sys

import h5py
import numpy as np

DTYPES = {
    "bool", "uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64",
    "float16", "float32", "float64",
}


def fail(msg):
    print(f"hdf5_oracle: {msg}", file=sys.stderr)
    sys.exit(1)


# ---------------------------------------------------------------------------- reading


def read_raw_strings(aid):
    """The stored bytes of a variable-length string attribute, whatever its charset."""
    out = np.empty(aid.shape, dtype=object)
    aid.read(out, mtype=h5py.h5t.py_create(h5py.string_dtype("ascii")))
    return out


def dump_attr(obj, name):
    aid = obj.attrs.get_id(name)
    dt = aid.dtype
    info = h5py.check_string_dtype(dt)
    shape = aid.shape
    if info is not None and info.length is None:
        raw = read_raw_strings(aid)
        if shape == () and info.encoding == "utf-8":
            value = obj.attrs[name]
            if not isinstance(value, str):
                fail(f"{obj.name}@{name}: h5py gave {type(value)}, not str")
            return {"name": name, "kind": "utf8", "value": raw[()].decode("utf-8")}
        if shape == () and info.encoding == "ascii":
            return {"name": name, "kind": "bytes", "value": raw[()].hex()}
        if len(shape) == 1 and info.encoding == "ascii":
            return {"name": name, "kind": "str_array", "value": [b.decode("utf-8") for b in raw]}
    if info is not None and info.length is not None and len(shape) == 1:
        tid = aid.get_type()
        if tid.get_strpad() != h5py.h5t.STR_NULLPAD or tid.get_cset() != h5py.h5t.CSET_ASCII:
            fail(f"{obj.name}@{name}: fixed string is not NUL-padded ASCII")
        items = [bytes(b).rstrip(b"\0").hex() for b in obj.attrs[name]]
        return {"name": name, "kind": "fixed_bytes_array", "width": info.length, "value": items}
    if dt == np.float64 and shape == (0,):
        return {"name": name, "kind": "empty_list"}
    fail(f"{obj.name}@{name}: attribute type {dt} shape {shape} is not one AttrValue covers")


def dump_attrs(obj):
    attrs = sorted((dump_attr(obj, n) for n in obj.attrs), key=lambda a: a["name"])
    # Iterating finds compact attributes even where H5Oget_info (which h5diff uses) counts
    # none: a version-2 header without an Attribute Info message.
    counted = h5py.h5o.get_info(obj.id).num_attrs
    if counted != len(attrs):
        fail(f"{obj.name}: H5Oget_info counts {counted} attributes, iteration finds {len(attrs)}")
    return attrs


def dataset_dtype(ds):
    tid = ds.id.get_type()
    if tid.get_class() == h5py.h5t.OPAQUE:
        if tid.get_size() != 2 or tid.get_tag() != b"":
            fail(f"{ds.name}: opaque type other than untagged 2 bytes")
        return "bfloat16"
    if tid.get_class() == h5py.h5t.ENUM:
        names = [tid.get_member_name(i) for i in range(tid.get_nmembers())]
        values = [tid.get_member_value(i) for i in range(tid.get_nmembers())]
        if names != [b"FALSE", b"TRUE"] or values != [0, 1] or ds.dtype != np.bool_:
            fail(f"{ds.name}: enum is not h5py's bool")
        return "bool"
    name = ds.dtype.name
    if name not in DTYPES or ds.dtype.byteorder not in "<=|":
        fail(f"{ds.name}: unexpected dtype {ds.dtype}")
    return name


def dump_dataset(ds):
    plist = ds.id.get_create_plist()
    if plist.get_layout() != h5py.h5d.CONTIGUOUS or plist.get_nfilters() != 0:
        fail(f"{ds.name}: not contiguous and unfiltered")
    data = np.asarray(ds[()])
    if data.shape != ds.shape:
        fail(f"{ds.name}: read shape {data.shape} != {ds.shape}")
    return {
        "path": ds.name,
        "kind": "dataset",
        "dtype": dataset_dtype(ds),
        "shape": list(ds.shape),
        "data": data.tobytes().hex(),
        "attrs": dump_attrs(ds),
    }


def dump(path, sample=None, expected=None):
    """h5py's view of a file as a manifest. Groups are walked by iterating their links, so
    each object is looked up by name once (libhdf5 scans compact links linearly). With
    `sample`, every link is still listed, but only `sample` of the datasets `expected`
    names (chosen at random) are opened and read."""
    skip = set()
    if sample is not None:
        # Datasets with attributes (such as an edited one) are always read.
        datasets = sorted(o["path"] for o in expected["objects"]
                          if o["kind"] == "dataset" and not o.get("attrs"))
        skip = set(datasets) - set(random.Random(0).sample(datasets, min(sample, len(datasets))))
    with h5py.File(path, "r") as f:
        objects = [{"path": "/", "kind": "group", "attrs": dump_attrs(f)}]
        walk(f, "/", skip, objects)
    return {"objects": sorted(objects, key=lambda o: o["path"])}


def walk(group, prefix, skip, objects):
    names = []
    group.id.links.iterate(names.append)
    for raw in names:
        name = raw.decode("utf-8")
        full = prefix + name
        if full in skip:
            objects.append({"path": full, "kind": "listed"})
            continue
        obj = group[raw]
        if isinstance(obj, h5py.Dataset):
            objects.append(dump_dataset(obj))
        else:
            objects.append({"path": full, "kind": "group", "attrs": dump_attrs(obj)})
            walk(obj, full + "/", skip, objects)


# ---------------------------------------------------------------------------- comparing


def normalize(manifest):
    """Sorted objects, sorted attributes, with implicit parent groups made explicit."""
    by_path = {}
    for o in manifest["objects"]:
        o = dict(o)
        if o["kind"] != "listed":
            o["attrs"] = sorted((dict(a) for a in o.get("attrs", [])), key=lambda a: a["name"])
        if o["kind"] == "group":
            o = {"path": o["path"], "kind": "group", "attrs": o["attrs"]}
        for a in o.get("attrs", []):
            if a["kind"] == "fixed_bytes_array":
                a["value"] = [bytes.fromhex(v).rstrip(b"\0").hex() for v in a["value"]]
        by_path[o["path"]] = o
    for path in list(by_path):
        parts = path.strip("/").split("/")
        for i in range(len(parts)):
            parent = "/" + "/".join(parts[:i])
            by_path.setdefault(parent, {"path": parent, "kind": "group", "attrs": []})
    return [by_path[p] for p in sorted(by_path)]


def compare(actual, expected, what):
    actual, expected = normalize(actual), normalize(expected)
    a_paths = [o["path"] for o in actual]
    e_paths = [o["path"] for o in expected]
    if a_paths != e_paths:
        missing = sorted(set(e_paths) - set(a_paths))[:10]
        extra = sorted(set(a_paths) - set(e_paths))[:10]
        fail(f"{what}: paths differ; missing {missing}, extra {extra}")
    checked = 0
    for a, e in zip(actual, expected):
        if "listed" in (a["kind"], e["kind"]):
            continue
        checked += 1
        if a != e:
            for key in sorted(set(a) | set(e)):
                if a.get(key) != e.get(key):
                    fail(f"{what}: {a['path']} differs in {key!r}:\n"
                         f"  file:     {str(a.get(key))[:400]}\n  expected: {str(e.get(key))[:400]}")
    return checked


# ---------------------------------------------------------------------------- commands


def check(path, manifest_path):
    with open(manifest_path) as fh:
        expected = json.load(fh)
    checked = compare(dump(path), expected, path)
    keras_semantics(path, expected)
    # Re-reading every object of a large file after the edit adds little over a sample.
    edit_in_place(path, expected, 200 if len(expected["objects"]) > 1000 else None)
    print(f"hdf5_oracle: {path}: {checked} objects match, r+ edit ok")


def keras_semantics(path, expected):
    """What Keras's loader tests: `name` attributes are `str`, bf16 is recognisable."""
    with h5py.File(path, "r") as f:
        for o in expected["objects"]:
            for a in o.get("attrs", []):
                if a["name"] == "dtype" and a["kind"] == "utf8" and a["value"] == "bfloat16":
                    ds = f[o["path"]]
                    if not (ds.attrs["dtype"] == "bfloat16"):
                        fail(f"{o['path']}: attrs['dtype'] == 'bfloat16' is False")


def edit_in_place(path, expected, sample):
    """libhdf5 must be able to modify the file: overwrite a dataset, add attributes and a
    dataset; everything else must read back unchanged."""
    objects = [dict(o) for o in expected["objects"]]
    target = next((o for o in objects if o["kind"] == "dataset" and o["dtype"] in
                   ("float32", "float64", "int32", "int64", "uint8") and o["data"]), None)
    with h5py.File(path, "r+") as f:
        f.attrs["fastckpt_edit"] = "root ✓"
        f.create_dataset("/fastckpt_added/values", data=np.arange(5, dtype=np.int16))
        if target is not None:
            ds = f[target["path"]]
            new = (np.frombuffer(bytes.fromhex(target["data"]), dtype=ds.dtype)[::-1]).reshape(ds.shape)
            ds[...] = new
            ds.attrs["edited"] = "yes"
            target["data"] = new.tobytes().hex()
            target["attrs"] = target.get("attrs", []) + [
                {"name": "edited", "kind": "utf8", "value": "yes"}]
    root = next((o for o in objects if o["path"] == "/"), None)
    if root is None:
        root = {"path": "/", "kind": "group", "attrs": []}
        objects.append(root)
    root["attrs"] = root.get("attrs", []) + [
        {"name": "fastckpt_edit", "kind": "utf8", "value": "root ✓"}]
    objects.append({"path": "/fastckpt_added/values", "kind": "dataset", "dtype": "int16",
                    "shape": [5], "data": np.arange(5, dtype=np.int16).tobytes().hex(),
                    "attrs": []})
    after = {"objects": objects}
    compare(dump(path, sample, after), after, f"{path} after r+ edit")


def keras_make(out):
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras
    from keras.src.legacy.saving import legacy_h5_format

    keras.utils.set_random_seed(1)
    model = keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(3),
        keras.layers.BatchNormalization(),
        keras.layers.Dense(2, name="head"),
    ])
    model.compile(optimizer="adam", loss="mse")
    model.fit(np.ones((8, 4)), np.ones((8, 2)), epochs=1, batch_size=8, verbose=0)
    files = {}
    model.save_weights(f"{out}/weights.weights.h5")
    files["weights"] = "weights.weights.h5"

    bf = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, dtype="bfloat16"),
                           keras.layers.Dropout(0.5), keras.layers.Dense(2)])
    bf.save_weights(f"{out}/bf16.weights.h5")
    files["bf16"] = "bf16.weights.h5"

    # Legacy full model (TF scope names must be ASCII, so no UTF-8 layer names here).
    legacy = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="first"),
                               keras.layers.Dropout(0.1), keras.layers.Dense(2)])
    legacy.compile(optimizer="adam", loss="mse")
    legacy.fit(np.ones((8, 4)), np.ones((8, 2)), epochs=1, batch_size=8, verbose=0)
    legacy.save(f"{out}/legacy.h5")
    files["legacy"] = "legacy.h5"

    # Keras's own splitting of a name list over 64,512 bytes into fixed-length chunks.
    with h5py.File(f"{out}/chunked.h5", "w") as f:
        names = [f"model/layer_{i:05d}/{'kernel' if i % 2 else 'bias'}".encode() for i in range(3000)]
        legacy_h5_format.save_attributes_to_hdf5_group(f.create_group("g"), "weight_names", names)
    files["chunked"] = "chunked.h5"

    for key, name in files.items():
        with open(f"{out}/{key}.json", "w") as fh:
            json.dump(dump(f"{out}/{name}"), fh)
    with open(f"{out}/files.json", "w") as fh:
        json.dump(files, fh)
    print("hdf5_oracle: made", ", ".join(files.values()))


def keras_load(out):
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras

    with open(f"{out}/files.json") as fh:
        files = json.load(fh)
    for key, name in files.items():
        with open(f"{out}/{key}.json") as fh:
            expected = json.load(fh)
        compare(dump(f"{out}/ours.{name}"), expected, f"ours.{name} vs Keras's {name}")

    def variables(m):
        vs = list(m.weights)
        if getattr(m, "optimizer", None) is not None:
            vs += list(m.optimizer.variables)
        return [np.asarray(keras.ops.convert_to_numpy(v)) for v in vs]

    def same(a, b, what):
        if len(a) != len(b) or any(x.dtype != y.dtype or x.shape != y.shape or
                                   x.tobytes() != y.tobytes() for x, y in zip(a, b)):
            fail(f"{what}: variables differ")

    def fresh(kind):
        if kind == "weights":
            m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3),
                                  keras.layers.BatchNormalization(),
                                  keras.layers.Dense(2, name="head")])
            m.compile(optimizer="adam", loss="mse")
            m.optimizer.build(m.trainable_variables)
            return m
        return keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, dtype="bfloat16"),
                                 keras.layers.Dropout(0.5), keras.layers.Dense(2)])

    for kind in ("weights", "bf16"):
        theirs, ours = fresh(kind), fresh(kind)
        theirs.load_weights(f"{out}/{files[kind]}")
        ours.load_weights(f"{out}/ours.{files[kind]}")
        same(variables(ours), variables(theirs), f"load_weights(ours.{files[kind]})")
        if kind == "bf16" and str(ours.layers[0].kernel.dtype) != "bfloat16":
            fail("bf16 kernel did not load as bfloat16")
    theirs = keras.models.load_model(f"{out}/{files['legacy']}", compile=False)
    ours = keras.models.load_model(f"{out}/ours.{files['legacy']}", compile=False)
    same(variables(ours), variables(theirs), "load_model(ours.legacy.h5)")
    if [l.name for l in ours.layers] != [l.name for l in theirs.layers]:
        fail("legacy layer names differ")
    print("hdf5_oracle: Keras loads our files bit-exact")


def main(argv):
    if len(argv) == 3 and argv[0] == "check":
        check(argv[1], argv[2])
    elif len(argv) == 2 and argv[0] == "keras-make":
        keras_make(argv[1])
    elif len(argv) == 2 and argv[0] == "keras-load":
        keras_load(argv[1])
    else:
        fail(f"usage: see the docstring; got {argv}")


if __name__ == "__main__":
    main(sys.argv[1:])
