//! Zips written by `io::write_file` from a `format::zip` plan, checked by readers that share
//! no code with ours: Python's `zipfile`, h5py and Keras (through `tests/oracles/*.py`), and
//! Info-ZIP's `unzip` where it is installed.
//!
//! Python is required: set `FASTCKPT_PYTHON`, or keep a `.venv` at the repository root. A
//! missing interpreter fails these tests; it never skips them.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use fastckpt_core::format::zip::{self, DosDateTime, Member, ZipOptions, ZIP64_LIMIT};
use fastckpt_core::io::{write_file, WriteOptions};
use fastckpt_core::{DType, PlannedFile, Region, Slot, Tensor};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

use common::python;

fn oracle(script: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/oracles")
        .join(script)
}

/// Runs Python with `args`; panics with its output unless it succeeds; returns stdout.
fn run_python(args: &[&str]) -> String {
    let out = Command::new(python())
        .args(args)
        .env("TF_CPP_MIN_LOG_LEVEL", "3")
        .output()
        .expect("cannot start Python");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "python {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Checks `spec` (see `oracles/zip_check.py`) with zipfile; returns what zipfile saw.
fn check_with_zipfile(dir: &Path, spec: Value) -> Vec<Value> {
    let path = dir.join("spec.json");
    std::fs::write(&path, spec.to_string()).unwrap();
    let out = run_python(&[
        oracle("zip_check.py").to_str().unwrap(),
        path.to_str().unwrap(),
    ]);
    serde_json::from_str(out.lines().last().unwrap_or_default()).expect("zip_check.py report")
}

/// Second oracle, Info-ZIP: `unzip -t` (every CRC) or `unzip -l` (directory only).
fn check_with_unzip(path: &Path, test_data: bool) {
    let flag = if test_data { "-tq" } else { "-l" };
    match Command::new("unzip").arg(flag).arg(path).output() {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("unzip is not installed: second oracle not run")
        }
        Err(e) => panic!("cannot run unzip: {e}"),
        Ok(out) => assert!(
            out.status.success(),
            "unzip {flag} {}:\n{}{}",
            path.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

fn opts(align: u16) -> ZipOptions {
    ZipOptions {
        modified: DosDateTime::new(2024, 2, 29, 13, 45, 30).unwrap(),
        align,
    }
}
const DATE_TIME: [u16; 6] = [2024, 2, 29, 13, 45, 30];

/// Bytes that differ everywhere, so a misplaced byte shows.
fn pattern(n: u64, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn u8_tensor(name: &str, data: Vec<u8>) -> Tensor {
    let n = data.len() as u64;
    Tensor::from_vec(name, DType::U8, vec![n], data).unwrap()
}

/// An embedded file's bytes as the writer leaves them: zeros, payloads, then regions.
fn materialise(file: &PlannedFile, tensors: &[Tensor]) -> Vec<u8> {
    let mut b = vec![0u8; file.len as usize];
    for s in &file.slots {
        let t = tensors[s.tensor].bytes();
        b[s.offset as usize..][..t.len()].copy_from_slice(t);
    }
    for r in &file.regions {
        b[r.offset as usize..][..r.bytes.len()].copy_from_slice(&r.bytes);
    }
    b
}

fn save(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p.to_str().unwrap().to_owned()
}

/// A weights-file-shaped plan: a header, payloads at aligned offsets with metadata between
/// them, zero gaps, a trailer. Payloads are the tensors at `indices`.
fn weights_like(tensors: &[Tensor], indices: &[usize], seed: u64) -> PlannedFile {
    let mut regions = vec![Region {
        offset: 0,
        bytes: pattern(512, seed),
    }];
    let mut slots = Vec::new();
    let mut at = 2048u64;
    for (k, &i) in indices.iter().enumerate() {
        at = at.next_multiple_of(if k % 2 == 0 { 4096 } else { 64 });
        slots.push(Slot {
            offset: at,
            tensor: i,
        });
        at += tensors[i].nbytes();
        regions.push(Region {
            offset: at + 8,
            bytes: pattern(40 + k as u64, seed + 1 + k as u64),
        });
        at += 8 + 40 + k as u64;
    }
    regions.push(Region {
        offset: at + 100,
        bytes: pattern(300, seed + 99),
    });
    PlannedFile {
        len: at + 400,
        regions,
        slots,
    }
}

#[test]
fn bytes_and_planned_members_with_several_threads() {
    let dir = tempfile::tempdir().unwrap();
    let f32s = |name: &str, n: u64, seed| {
        Tensor::from_vec(name, DType::F32, vec![n / 4], pattern(n, seed)).unwrap()
    };
    let tensors = vec![
        u8_tensor("big_a", pattern(9 * MIB + 3, 1)), // split into two write pieces
        f32s("big_b", 17 * MIB, 2),                  // three pieces
        u8_tensor("small_a", pattern(100, 3)),       // batched with its neighbours
        u8_tensor("small_b", pattern(3000, 4)),
        u8_tensor("medium", pattern(250 << 10, 5)),
        u8_tensor("empty", vec![]),
        Tensor::from_vec("empty_f32", DType::F32, vec![0, 4], vec![]).unwrap(),
    ];
    let weights = weights_like(&tensors, &[2, 0, 5, 3, 1, 6, 4], 10);
    // A second embedded file reusing tensors, and one with no payloads at all.
    let side = weights_like(&tensors, &[3, 2, 5], 20);
    let bare = PlannedFile {
        len: 0,
        regions: vec![],
        slots: vec![],
    };
    let members = vec![
        Member::Bytes {
            name: "metadata.json".into(),
            data: br#"{"keras_version": "3.15.1"}"#.to_vec(),
        },
        Member::Bytes {
            name: "config.json".into(),
            data: pattern(5000, 30),
        },
        Member::Planned {
            name: "model.weights.h5".into(),
            file: weights.clone(),
        },
        Member::Bytes {
            name: "assets/tokenizer/vocabulary-\u{4e2d}\u{6587}.txt".into(),
            data: "\u{e9}\n".repeat(100).into_bytes(),
        },
        Member::Bytes {
            name: "assets/empty".into(),
            data: vec![],
        },
        Member::Planned {
            name: "assets/\u{e9}t\u{e9}.h5".into(),
            file: side.clone(),
        },
        Member::Planned {
            name: "assets/bare.h5".into(),
            file: bare,
        },
    ];
    let mut expected = Vec::new();
    for m in &members {
        let (bytes, align) = match m {
            Member::Bytes { data, .. } => (data.clone(), Value::Null),
            Member::Planned { file, .. } => (materialise(file, &tensors), json!(4096)),
        };
        let path = save(dir.path(), &format!("member{}", expected.len()), &bytes);
        expected
            .push(json!({"name": m.name(), "size": bytes.len(), "expected": path, "align": align}));
    }
    let layout = zip::plan(members, &tensors, &opts(4096)).unwrap();
    for threads in [1, 2, 4] {
        let path = dir.path().join(format!("t{threads}.keras"));
        let len = write_file(
            &path,
            &layout,
            &tensors,
            &WriteOptions::with_threads(threads),
        )
        .unwrap();
        assert_eq!(len, std::fs::metadata(&path).unwrap().len());
        let report = check_with_zipfile(
            dir.path(),
            json!({"zip": path, "testzip": true, "date_time": DATE_TIME, "members": expected}),
        );
        let offsets: Vec<u64> = report
            .iter()
            .map(|r| r["data_offset"].as_u64().unwrap())
            .collect();
        assert_eq!(
            offsets,
            layout.data_offsets(),
            "zipfile finds the data where we planned it"
        );
        check_with_unzip(&path, true);
    }
}

#[test]
fn byte_members_match_zipfile_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let members = vec![
        (
            "metadata.json",
            br#"{"keras_version": "3.15.1", "date_saved": "2024-02-29@13:45:30"}"#.to_vec(),
        ),
        ("config.json", pattern(70_000, 1)),
        ("assets/\u{e9}t\u{e9}/\u{1f600}.txt", b"smile".to_vec()),
        ("assets/empty", vec![]),
    ];
    let mut spec = Vec::new();
    for (i, (name, data)) in members.iter().enumerate() {
        spec.push(json!([name, save(dir.path(), &format!("m{i}"), data)]));
    }
    let theirs = dir.path().join("zipfile.zip");
    let script = "import json, sys, zipfile\n\
        out, date_time, members = json.loads(sys.argv[1])\n\
        with zipfile.ZipFile(out, 'w') as zf:\n\
        \x20   for name, path in members:\n\
        \x20       zf.writestr(zipfile.ZipInfo(name, tuple(date_time)), open(path, 'rb').read())\n";
    run_python(&["-c", script, &json!([theirs, DATE_TIME, spec]).to_string()]);

    let ours = dir.path().join("ours.zip");
    let members = members
        .into_iter()
        .map(|(name, data)| Member::Bytes {
            name: name.into(),
            data,
        })
        .collect();
    let layout = zip::plan(members, &[], &opts(4096)).unwrap();
    write_file(&ours, &layout, &[], &WriteOptions::with_threads(2)).unwrap();
    assert!(
        std::fs::read(&ours).unwrap() == std::fs::read(&theirs).unwrap(),
        "our zip differs from zipfile.writestr's"
    );
}

#[test]
fn many_members_use_the_zip64_end_records() {
    let dir = tempfile::tempdir().unwrap();
    let count = 70_000u32;
    let members: Vec<Member> = (0..count)
        .map(|i| Member::Bytes {
            name: format!("assets/{i:05}"),
            data: i.to_le_bytes()[..(i % 5) as usize].to_vec(),
        })
        .collect();
    let expected: Vec<Value> = members
        .iter()
        .map(|m| match m {
            Member::Bytes { name, data } => {
                json!({"name": name, "size": data.len(), "crc": crc32fast::hash(data)})
            }
            Member::Planned { .. } => unreachable!(),
        })
        .collect();
    let layout = zip::plan(members, &[], &opts(64)).unwrap();
    assert!(layout.is_zip64());
    let path = dir.path().join("many.zip");
    write_file(&path, &layout, &[], &WriteOptions::with_threads(2)).unwrap();
    check_with_zipfile(
        dir.path(),
        json!({"zip": path, "testzip": true, "members": expected}),
    );
    check_with_unzip(&path, true);
}

/// CRC-32 of a member that is zeros but for `pieces`, by hashing the pieces and 1 MiB zero
/// blocks: independent of the planner's CRC combination.
fn sparse_crc(len: u64, pieces: &[(u64, &[u8])]) -> u32 {
    let block = vec![0u8; MIB as usize];
    let block_crc = crc32fast::hash(&block);
    let mut h = crc32fast::Hasher::new();
    let zeros = |h: &mut crc32fast::Hasher, mut n: u64| {
        while n >= MIB {
            h.combine(&crc32fast::Hasher::new_with_initial_len(block_crc, MIB));
            n -= MIB;
        }
        h.update(&block[..n as usize]);
    };
    let mut at = 0;
    for &(offset, bytes) in pieces {
        zeros(&mut h, offset - at);
        h.update(bytes);
        at = offset + bytes.len() as u64;
    }
    zeros(&mut h, len - at);
    h.finalize()
}

/// A zip whose embedded file is `len` bytes, nearly all of them an unwritten (sparse) gap,
/// followed by members that then sit past the zip64 limit. With `full`, every byte is read
/// back and CRC-checked by zipfile and unzip; otherwise the directory, the CRCs we claim
/// (against an independent computation) and the real bytes are checked.
fn sparse_zip64_case(len: u64, full: bool) {
    // Beside the target, on a real filesystem: fallocate reserves the gap without writing
    // it (tmpfs would hold it in memory).
    let dir = tempfile::tempdir().unwrap();
    let tensors = vec![
        u8_tensor("first", pattern(9 * MIB + 5, 1)),
        u8_tensor("last", pattern(3000, 2)),
        u8_tensor("after", pattern(777, 3)),
    ];
    let head = pattern(512, 4);
    let middle = pattern(100, 5);
    let tail = pattern(300, 6);
    let last_at = len - MIB + 100;
    let big = PlannedFile {
        len,
        regions: vec![
            Region {
                offset: 0,
                bytes: head.clone(),
            },
            Region {
                offset: len / 2,
                bytes: middle.clone(),
            },
            Region {
                offset: len - 300,
                bytes: tail.clone(),
            },
        ],
        slots: vec![
            Slot {
                offset: 4096,
                tensor: 0,
            },
            Slot {
                offset: last_at,
                tensor: 1,
            },
        ],
    };
    let big_pieces: Vec<(u64, &[u8])> = vec![
        (0, &head),
        (4096, tensors[0].bytes()),
        (len / 2, &middle),
        (last_at, tensors[1].bytes()),
        (len - 300, &tail),
    ];
    let big_crc = sparse_crc(len, &big_pieces);
    let after = PlannedFile {
        len: 2000,
        regions: vec![Region {
            offset: 0,
            bytes: b"after".to_vec(),
        }],
        slots: vec![Slot {
            offset: 1024,
            tensor: 2,
        }],
    };
    let config = br#"{"class_name": "Big"}"#.to_vec();
    let members = vec![
        Member::Bytes {
            name: "config.json".into(),
            data: config.clone(),
        },
        Member::Planned {
            name: "model.weights.h5".into(),
            file: big,
        },
        Member::Bytes {
            name: "after.json".into(),
            data: config.clone(),
        },
        Member::Planned {
            name: "assets/after.h5".into(),
            file: after.clone(),
        },
    ];
    let layout = zip::plan(members, &tensors, &opts(4096)).unwrap();
    assert!(layout.is_zip64());
    let path = dir.path().join("big.keras");
    write_file(&path, &layout, &tensors, &WriteOptions::with_threads(2)).unwrap();

    let pieces: Vec<Value> = big_pieces
        .iter()
        .enumerate()
        .map(|(i, (offset, bytes))| json!([offset, save(dir.path(), &format!("piece{i}"), bytes)]))
        .collect();
    let config_path = save(dir.path(), "config", &config);
    let after_path = save(dir.path(), "after", &materialise(&after, &tensors));
    let report = check_with_zipfile(
        dir.path(),
        json!({"zip": path, "testzip": full, "date_time": DATE_TIME, "members": [
            {"name": "config.json", "size": config.len(), "expected": config_path},
            {"name": "model.weights.h5", "size": len, "crc": big_crc, "align": 4096,
             "pieces": pieces},
            {"name": "after.json", "size": config.len(), "expected": config_path},
            {"name": "assets/after.h5", "size": 2000, "align": 4096, "expected": after_path},
        ]}),
    );
    let versions: Vec<u64> = report
        .iter()
        .map(|r| r["extract_version"].as_u64().unwrap())
        .collect();
    assert_eq!(
        versions,
        [20, 45, 45, 45],
        "zip64 fields for the big member and all after it"
    );
    assert!(report[2]["header_offset"].as_u64().unwrap() > ZIP64_LIMIT);
    check_with_unzip(&path, full);
    drop(dir); // the sparse file goes with it
}

#[test]
fn zip64_fields_for_a_sparse_member_past_2gib() {
    sparse_zip64_case(ZIP64_LIMIT + 64 * MIB, false);
}

#[test]
#[ignore = "slow: reads back 4 GiB (zipfile.testzip and unzip -t); run with --ignored"]
fn zip64_member_past_4gib_read_in_full() {
    sparse_zip64_case((4 << 30) + 5 * MIB, true);
}

/// Presents a real file as a planned one: its longest run of zeros becomes a gap the writer
/// leaves unwritten; the rest is split between metadata regions and payload slots (tensors
/// numbered from `first_tensor`).
fn planned_from_bytes(bytes: &[u8], first_tensor: usize) -> (PlannedFile, Vec<Tensor>) {
    let (mut best, mut run_start) = ((0, 0), None);
    for (i, &b) in bytes.iter().chain([&1u8]).enumerate() {
        match (b, run_start) {
            (0, None) => run_start = Some(i),
            (0, Some(_)) => {}
            (_, Some(s)) => {
                if i - s > best.1 - best.0 {
                    best = (s, i);
                }
                run_start = None;
            }
            (_, None) => {}
        }
    }
    let (z0, z1) = best;
    assert!(z1 - z0 >= 64, "expected a run of zeros in the HDF5 file");
    let (a, b) = (z0 / 2, z1 + (bytes.len() - z1) / 2);
    let tensors = vec![
        u8_tensor("before_gap", bytes[a..z0].to_vec()),
        u8_tensor("after_gap", bytes[z1..b].to_vec()),
    ];
    let mut file = PlannedFile {
        len: bytes.len() as u64,
        regions: vec![
            Region {
                offset: 0,
                bytes: bytes[..a].to_vec(),
            },
            Region {
                offset: b as u64,
                bytes: bytes[b..].to_vec(),
            },
        ],
        slots: vec![
            Slot {
                offset: a as u64,
                tensor: 0,
            },
            Slot {
                offset: z1 as u64,
                tensor: 1,
            },
        ],
    };
    assert_eq!(
        materialise(&file, &tensors),
        bytes,
        "the split covers the file"
    );
    for s in &mut file.slots {
        s.tensor += first_tensor;
    }
    (file, tensors)
}

#[test]
fn h5py_reads_weights_embedded_in_our_zip() {
    let dir = tempfile::tempdir().unwrap();
    let h5 = dir.path().join("weights.h5");
    run_python(&[
        oracle("keras_zip.py").to_str().unwrap(),
        "make-h5",
        h5.to_str().unwrap(),
    ]);
    let bytes = std::fs::read(&h5).unwrap();
    let (file, tensors) = planned_from_bytes(&bytes, 0);
    let members = vec![
        Member::Bytes {
            name: "metadata.json".into(),
            data: br#"{"keras_version": "3.15.1"}"#.to_vec(),
        },
        Member::Bytes {
            name: "config.json".into(),
            data: b"{}".to_vec(),
        },
        Member::Planned {
            name: "model.weights.h5".into(),
            file,
        },
    ];
    let layout = zip::plan(members, &tensors, &opts(4096)).unwrap();
    let path = dir.path().join("weights.keras");
    write_file(&path, &layout, &tensors, &WriteOptions::with_threads(2)).unwrap();
    let out = run_python(&[
        oracle("keras_zip.py").to_str().unwrap(),
        "check-h5",
        path.to_str().unwrap(),
    ]);
    assert!(out.contains("h5py read every dataset"), "{out}");
}

#[test]
fn keras_load_model_reads_our_zip_of_a_keras_made_model() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let out = run_python(&[oracle("keras_zip.py").to_str().unwrap(), "make-keras", d]);
    let names: Vec<String> = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(
        names[..3],
        ["metadata.json", "config.json", "model.weights.h5"]
    );
    let mut tensors = Vec::new();
    let members = names
        .iter()
        .map(|name| {
            let bytes = std::fs::read(dir.path().join("members").join(name)).unwrap();
            if name == "model.weights.h5" {
                let (file, t) = planned_from_bytes(&bytes, tensors.len());
                tensors.extend(t);
                Member::Planned {
                    name: name.clone(),
                    file,
                }
            } else {
                Member::Bytes {
                    name: name.clone(),
                    data: bytes,
                }
            }
        })
        .collect();
    let layout = zip::plan(members, &tensors, &ZipOptions::default()).unwrap();
    let path = dir.path().join("ours.keras");
    write_file(&path, &layout, &tensors, &WriteOptions::with_threads(2)).unwrap();
    let out = run_python(&[
        oracle("keras_zip.py").to_str().unwrap(),
        "load-keras",
        path.to_str().unwrap(),
        d,
    ]);
    assert!(out.contains("predicted the same"), "{out}");
}
