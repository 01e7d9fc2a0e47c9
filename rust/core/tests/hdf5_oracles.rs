//! The HDF5 writer against oracles that share no code with it: libhdf5 1.10's command-line
//! tools (`h5dump`, `h5ls`, `h5diff`), h5py with its bundled libhdf5, and Keras itself.
//!
//! Needs `h5dump`, `h5ls`, `h5diff` on PATH and a Python with h5py, numpy and Keras
//! (`FASTCKPT_PYTHON`, else `<repo>/.venv`). Missing ones fail the test: it never skips.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Instant;

use fastckpt_core::format::hdf5::{plan, AttrValue, Node};
use fastckpt_core::io::{write_file, WriteOptions};
use fastckpt_core::{DType, Tensor};
use serde_json::{json, Value};

const ORACLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/hdf5_oracle.py");

use common::python;

fn tool(name: &str) -> Command {
    let found = std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(name).is_file()));
    assert!(
        found,
        "{name} is not on PATH (Debian package hdf5-tools); this test does not skip"
    );
    Command::new(name)
}

fn run(mut cmd: Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    out
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn succeed(cmd: Command) -> String {
    let desc = format!("{cmd:?}");
    let out = run(cmd);
    let all = text(&out);
    assert!(
        out.status.success(),
        "{desc} failed ({}):\n{all}",
        out.status
    );
    all
}

fn oracle(args: &[&str]) -> String {
    let mut cmd = Command::new(python());
    cmd.arg(ORACLE).args(args);
    cmd.env("TF_CPP_MIN_LOG_LEVEL", "3")
        .env("KERAS_BACKEND", "tensorflow");
    succeed(cmd)
}

fn write(path: &Path, nodes: &[Node], tensors: &[Tensor]) {
    let layout = plan(nodes, tensors).unwrap();
    write_file(path, &layout, tensors, &WriteOptions::with_threads(2)).unwrap();
}

// ------------------------------------------------------------------------------ manifests

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn attr_json(name: &str, value: &AttrValue) -> Value {
    match value {
        AttrValue::Utf8(s) => json!({"name": name, "kind": "utf8", "value": s}),
        AttrValue::Bytes(b) => json!({"name": name, "kind": "bytes", "value": hex(b)}),
        AttrValue::StrArray(v) => json!({"name": name, "kind": "str_array", "value": v}),
        AttrValue::FixedBytesArray { width, items } => json!({
            "name": name, "kind": "fixed_bytes_array", "width": width,
            "value": items.iter().map(|i| hex(i)).collect::<Vec<_>>(),
        }),
        AttrValue::EmptyList => json!({"name": name, "kind": "empty_list"}),
    }
}

fn attr_from_json(a: &Value) -> (String, AttrValue) {
    let strs = |v: &Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_owned())
            .collect()
    };
    let value = match a["kind"].as_str().unwrap() {
        "utf8" => AttrValue::Utf8(a["value"].as_str().unwrap().into()),
        "bytes" => AttrValue::Bytes(unhex(a["value"].as_str().unwrap())),
        "str_array" => AttrValue::StrArray(strs(&a["value"])),
        "fixed_bytes_array" => AttrValue::FixedBytesArray {
            width: a["width"].as_u64().unwrap() as usize,
            items: strs(&a["value"]).iter().map(|h| unhex(h)).collect(),
        },
        "empty_list" => AttrValue::EmptyList,
        other => panic!("unknown attribute kind {other}"),
    };
    (a["name"].as_str().unwrap().into(), value)
}

fn manifest(nodes: &[Node], tensors: &[Tensor]) -> Value {
    let objects: Vec<Value> = nodes
        .iter()
        .map(|n| {
            let attrs: Vec<Value> = n.attrs.iter().map(|(k, v)| attr_json(k, v)).collect();
            match n.tensor {
                None => json!({"path": n.path, "kind": "group", "attrs": attrs}),
                Some(i) => {
                    let t = &tensors[i];
                    json!({"path": n.path, "kind": "dataset", "dtype": t.dtype.numpy_name(),
                           "shape": t.shape, "data": hex(t.bytes()), "attrs": attrs})
                }
            }
        })
        .collect();
    json!({ "objects": objects })
}

fn from_manifest(m: &Value) -> (Vec<Node>, Vec<Tensor>) {
    let mut nodes = Vec::new();
    let mut tensors = Vec::new();
    for o in m["objects"].as_array().unwrap() {
        let path = o["path"].as_str().unwrap().to_owned();
        let attrs = o["attrs"]
            .as_array()
            .unwrap()
            .iter()
            .map(attr_from_json)
            .collect();
        let tensor = (o["kind"] == "dataset").then(|| {
            let dtype = DType::from_numpy_name(o["dtype"].as_str().unwrap()).unwrap();
            let shape = o["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap())
                .collect();
            let data = unhex(o["data"].as_str().unwrap());
            tensors.push(Tensor::from_vec(path.clone(), dtype, shape, data).unwrap());
            tensors.len() - 1
        });
        nodes.push(Node {
            path,
            tensor,
            attrs,
        });
    }
    (nodes, tensors)
}

fn check_with_h5py(file: &Path, nodes: &[Node], tensors: &[Tensor]) -> String {
    let m = file.with_extension("manifest.json");
    std::fs::write(&m, manifest(nodes, tensors).to_string()).unwrap();
    oracle(&["check", file.to_str().unwrap(), m.to_str().unwrap()])
}

// ------------------------------------------------------------------------------ test data

/// Deterministic bytes (xorshift), valid for `dtype` (bools are 0 or 1).
fn sample_bytes(dtype: DType, n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n * dtype.size())
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if dtype == DType::Bool {
                (x & 1) as u8
            } else {
                x as u8
            }
        })
        .collect()
}

struct Tree {
    nodes: Vec<Node>,
    tensors: Vec<Tensor>,
}

impl Tree {
    fn new() -> Tree {
        Tree {
            nodes: Vec::new(),
            tensors: Vec::new(),
        }
    }

    fn group(&mut self, path: &str, attrs: Vec<(&str, AttrValue)>) {
        self.nodes.push(Node {
            path: path.into(),
            tensor: None,
            attrs: attrs.into_iter().map(|(k, v)| (k.into(), v)).collect(),
        });
    }

    fn dataset(&mut self, path: &str, dtype: DType, shape: &[u64]) {
        let n = shape.iter().product::<u64>() as usize;
        let data = sample_bytes(dtype, n, self.tensors.len() as u64 + 1);
        self.tensors
            .push(Tensor::from_vec(path, dtype, shape.to_vec(), data).unwrap());
        let mut attrs = Vec::new();
        if dtype == DType::BF16 {
            attrs.push(("dtype".into(), AttrValue::Utf8("bfloat16".into())));
        }
        self.nodes.push(Node {
            path: path.into(),
            tensor: Some(self.tensors.len() - 1),
            attrs,
        });
    }
}

fn utf8(s: &str) -> AttrValue {
    AttrValue::Utf8(s.into())
}

// ------------------------------------------------------------------------------ tests

/// Every dtype, 0-d, zero-size, UTF-8 and 300-byte names, nested groups with `name`,
/// root attributes of every kind, a 60 KB attribute: h5dump, h5ls and h5py all agree with
/// what was written, and libhdf5 can edit the file in place.
#[test]
fn oracles_read_every_feature() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("features.h5");
    let mut t = Tree::new();
    let big: String = "ü€ abc".repeat(6_700); // 9 bytes each
    assert!(big.len() >= 60_000);
    t.group(
        "/",
        vec![
            ("backend", utf8("tensorflow")),
            (
                "model_config",
                AttrValue::Bytes("{\"name\": \"dénse\"}".as_bytes().to_vec()),
            ),
            (
                "layer_names",
                AttrValue::StrArray(vec!["dense".into(), "dénse_1".into(), "".into()]),
            ),
            (
                "weight_names0",
                AttrValue::FixedBytesArray {
                    width: 5,
                    items: vec![b"ab".to_vec(), b"cdefg".to_vec()],
                },
            ),
            ("empty", AttrValue::EmptyList),
            ("big", AttrValue::Utf8(big)),
            ("ünï", utf8("")),
        ],
    );
    for d in DType::ALL {
        let g = format!("/dtypes/{d}");
        t.group(&format!("{g}/vars"), vec![("name", utf8(d.numpy_name()))]);
        t.dataset(&format!("{g}/vars/0"), d, &[]);
        t.dataset(&format!("{g}/vars/1"), d, &[5]);
        t.dataset(&format!("{g}/vars/2"), d, &[2, 3, 1]);
        t.dataset(&format!("{g}/vars/3"), d, &[0, 3]);
    }
    t.dataset("/zero", DType::F32, &[0]);
    t.dataset("/large", DType::F32, &[300, 100]);
    t.group("/ünïcødé/変数", vec![("name", utf8("名前"))]);
    t.dataset("/ünïcødé/変数/0", DType::F16, &[4]);
    let long = "n".repeat(300);
    let long_utf8 = "é".repeat(150);
    t.dataset(&format!("/long/{long}"), DType::I32, &[2]);
    t.group(&format!("/long/{long_utf8}"), vec![("name", utf8(&long))]);
    t.group("/layers/empty/vars", vec![("name", utf8("empty"))]);
    t.group("/a.b/..c", vec![]);

    let start = Instant::now();
    write(&file, &t.nodes, &t.tensors);
    eprintln!("wrote {} objects in {:?}", t.nodes.len(), start.elapsed());

    let mut h5dump = tool("h5dump");
    h5dump.args(["-H", "-p"]).arg(&file);
    let dump = succeed(h5dump);
    for want in [
        "H5T_STD_U8LE",
        "H5T_STD_U16LE",
        "H5T_STD_U32LE",
        "H5T_STD_U64LE",
        "H5T_STD_I8LE",
        "H5T_STD_I16LE",
        "H5T_STD_I32LE",
        "H5T_STD_I64LE",
        "H5T_IEEE_F32LE",
        "H5T_IEEE_F64LE",
        "\"FALSE\"            0",
        "\"TRUE\"             1",
        "OPAQUE_TAG \"\"",
        "DATASPACE  SCALAR",
        "SIMPLE { ( 0, 3 ) / ( 0, 3 ) }",
        "SIMPLE { ( 2, 3, 1 ) / ( 2, 3, 1 ) }",
        "CONTIGUOUS",
        "OFFSET 18446744073709551615",
        "STRSIZE H5T_VARIABLE",
        "H5T_CSET_UTF8",
        "H5T_CSET_ASCII",
        "STRSIZE 5",
        "H5T_STR_NULLPAD",
        "SIMPLE { ( 0 ) / ( 0 ) }",
        "ATTRIBUTE \"name\"",
        "ATTRIBUTE \"big\"",
    ] {
        assert!(dump.contains(want), "h5dump -H -p lacks {want:?}:\n{dump}");
    }
    // libhdf5 1.10 has no name for IEEE half floats; later versions call it H5T_IEEE_F16LE.
    assert!(
        dump.contains("16-bit little-endian floating-point") || dump.contains("H5T_IEEE_F16LE")
    );
    let datasets = t.nodes.iter().filter(|n| n.tensor.is_some()).count();
    assert_eq!(dump.matches("DATASET \"").count(), datasets, "{dump}");
    assert!(!dump.to_lowercase().contains("error"), "{dump}");

    let mut h5ls = tool("h5ls");
    h5ls.args(["-r", "-v"]).arg(&file);
    let ls = succeed(h5ls);
    for want in [
        "/dtypes/float32/vars/2   Dataset {2/2, 3/3, 1/1}",
        "/dtypes/int64/vars/0     Dataset {SCALAR}",
        "/dtypes/uint8/vars/3     Dataset {0/0, 3/3}",
        "Attribute: name scalar",
        "Type:      variable-length null-terminated UTF-8 string",
        "Attribute: layer_names {3}",
        "Type:      variable-length null-terminated ASCII string",
        "Attribute: empty {0}",
        "Type:      native double",
        "/layers/empty/vars       Group",
    ] {
        assert!(ls.contains(want), "h5ls -r -v lacks {want:?}:\n{ls}");
    }
    assert!(
        ls.contains(&format!("/long/{long} Dataset {{2/2}}")),
        "{ls}"
    );
    let listed = ls.lines().filter(|l| l.starts_with('/')).count();
    // Every node, the root, and the intermediate groups (/dtypes, /dtypes/<d>, /long, /layers, ...).
    let intermediate = 1 + DType::ALL.len() + 1 + 1 + 2 + 1;
    assert_eq!(listed, t.nodes.len() + intermediate, "{ls}");

    let out = check_with_h5py(&file, &t.nodes, &t.tensors);
    assert!(out.contains("r+ edit ok"), "{out}");
}

/// 20,000 datasets in one group: compact links in one header. h5py reads every value
/// back; prints how long planning takes.
#[test]
fn twenty_thousand_datasets_in_one_group() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("many.weights.h5");
    let n = 20_000;
    let mut nodes = vec![Node {
        path: "/optimizer/vars".into(),
        tensor: None,
        attrs: vec![("name".into(), utf8("adam"))],
    }];
    let tensors: Vec<Tensor> = (0..n)
        .map(|i| {
            let dtype = if i % 3 == 0 { DType::F16 } else { DType::F32 };
            let shape = vec![(i % 4) as u64];
            let data = sample_bytes(dtype, i % 4, i as u64 + 7);
            Tensor::from_vec(format!("{i}"), dtype, shape, data).unwrap()
        })
        .collect();
    nodes.extend((0..n).map(|i| Node {
        path: format!("/optimizer/vars/{i}"),
        tensor: Some(i),
        attrs: vec![],
    }));
    let start = Instant::now();
    let layout = plan(&nodes, &tensors).unwrap();
    let planned = start.elapsed();
    write_file(&file, &layout, &tensors, &WriteOptions::with_threads(2)).unwrap();
    eprintln!(
        "planned {n} datasets in {planned:?} (this build's profile; see the report for release)"
    );

    let mut h5ls = tool("h5ls");
    h5ls.arg(format!("{}/optimizer/vars", file.display()));
    let ls = succeed(h5ls);
    assert_eq!(
        ls.lines().filter(|l| l.contains(" Dataset {")).count(),
        n,
        "{ls}"
    );

    let out = check_with_h5py(&file, &nodes, &tensors);
    assert!(out.contains(&format!("{} objects match", n + 3)), "{out}");
}

/// Keras's own files (`save_weights`, a bf16 model, the legacy full-model `.h5`, and its
/// split of a long name list), rebuilt by our planner from h5py's dump of them: `h5diff`
/// finds no difference, h5py sees the same tree, and Keras loads ours bit-exact.
#[test]
fn matches_keras_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    oracle(&["keras-make", d.to_str().unwrap()]);
    let files: Value =
        serde_json::from_slice(&std::fs::read(d.join("files.json")).unwrap()).unwrap();
    let files = files.as_object().unwrap();
    assert_eq!(files.len(), 4);
    for (key, name) in files {
        let name = name.as_str().unwrap();
        let m: Value =
            serde_json::from_slice(&std::fs::read(d.join(format!("{key}.json"))).unwrap()).unwrap();
        let (nodes, tensors) = from_manifest(&m);
        let (keras, ours) = (d.join(name), d.join(format!("ours.{name}")));
        write(&ours, &nodes, &tensors);

        let mut h5diff = tool("h5diff");
        h5diff.arg("-c").arg(&keras).arg(&ours);
        let out = succeed(h5diff);
        assert!(!out.contains("not comparable"), "h5diff {name}: {out}");

        // The oracle must notice a difference: one changed attribute, one changed byte.
        let mut changed_attr = nodes.clone();
        let (_, v) = changed_attr
            .iter_mut()
            .flat_map(|n| n.attrs.iter_mut())
            .next()
            .expect("every Keras file has attributes");
        *v = match v {
            AttrValue::Utf8(_) => utf8("changed"),
            AttrValue::StrArray(items) => {
                AttrValue::StrArray(items.iter().map(|s| format!("{s}x")).collect())
            }
            AttrValue::FixedBytesArray { width, items } => AttrValue::FixedBytesArray {
                width: *width,
                items: items.iter().map(|_| b"x".to_vec()).collect(),
            },
            other => panic!("unexpected first attribute {other:?}"),
        };
        let bad = d.join(format!("bad_attr.{name}"));
        write(&bad, &changed_attr, &tensors);
        let mut h5diff = tool("h5diff");
        h5diff.arg(&keras).arg(&bad);
        assert_eq!(
            run(h5diff).status.code(),
            Some(1),
            "h5diff missed a changed attribute in {name}"
        );
        if let Some(t) = tensors.iter().position(|t| t.nbytes() > 0) {
            let mut changed = tensors.clone();
            let mut bytes = changed[t].bytes().to_vec();
            bytes[0] ^= 0x40;
            changed[t] =
                Tensor::from_vec("x", changed[t].dtype, changed[t].shape.clone(), bytes).unwrap();
            let bad = d.join(format!("bad_data.{name}"));
            write(&bad, &nodes, &changed);
            let mut h5diff = tool("h5diff");
            h5diff.arg(&keras).arg(&bad);
            assert_eq!(
                run(h5diff).status.code(),
                Some(1),
                "h5diff missed a changed byte in {name}"
            );
        }
    }
    let out = oracle(&["keras-load", d.to_str().unwrap()]);
    assert!(out.contains("bit-exact"), "{out}");
}

#[test]
fn plan_errors_name_the_path() {
    let t = vec![Tensor::from_vec("t", DType::F32, vec![1], vec![0; 4]).unwrap()];
    let node = |path: &str, tensor: Option<usize>| Node {
        path: path.into(),
        tensor,
        attrs: vec![],
    };
    let err = |nodes: &[Node]| plan(nodes, &t).unwrap_err().to_string();
    assert!(err(&[node("/a", Some(0)), node("/a", None)]).contains("\"/a\" appears twice"));
    assert!(
        err(&[node("/a", Some(0)), node("/a/b", None)]).contains("its parent \"/a\" is a dataset")
    );
    assert!(err(&[node("/a//b", None)]).contains("\"/a//b\" has an empty name"));
    let huge = Node {
        path: "/g".into(),
        tensor: None,
        attrs: vec![("names".into(), AttrValue::StrArray(vec!["n".into(); 5000]))],
    };
    let e = err(&[huge]);
    assert!(
        e.contains("\"/g\": attribute \"names\" needs a") && e.contains("65535"),
        "{e}"
    );
    let long_name = format!("/{}", "x".repeat(70_000));
    assert!(err(&[node(&long_name, None)]).contains("link name \"xxxx"));
    let rank33 = vec![Tensor::from_vec("r", DType::U8, vec![1; 33], vec![0]).unwrap()];
    let e = plan(&[node("/r", Some(0))], &rank33)
        .unwrap_err()
        .to_string();
    assert!(e.contains("\"/r\": 33 dimensions"), "{e}");
}
