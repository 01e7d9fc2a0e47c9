//! Mutation fuzzing of the SafeTensors header parser on stable Rust: real files written by
//! the writer, mutated (bit flips, byte stores, truncations, insertions, deletions, header
//! lengths and JSON numbers set to boundary values), must never make `parse_header` panic,
//! and whatever it accepts must be self-consistent: payloads back to back, inside the file,
//! sized by dtype and shape.
//!
//! `cargo test` runs 3,000 cases (about a second); FASTCKPT_FUZZ_CASES=N runs N. The
//! coverage-guided counterpart is `fuzz/` (cargo fuzz, nightly).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::OnceLock;

use fastckpt_core::format::safetensors::{self, parse_header};
use fastckpt_core::io::{write_file, WriteOptions};
use fastckpt_core::{DType, Tensor};
use proptest::prelude::*;

const INTERESTING: [u64; 12] = [
    0,
    1,
    7,
    8,
    255,
    65_535,
    1 << 31,
    1 << 32,
    1 << 53,
    (1 << 63) - 1,
    1 << 63,
    u64::MAX,
];

#[derive(Clone, Debug)]
enum Mutation {
    FlipBit(usize, u8),
    SetByte(usize, u8),
    Truncate(usize),
    Insert(usize, Vec<u8>),
    Delete(usize, usize),
    HeaderLen(u64),
    JsonNumber(usize, u64),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(p, b)| Mutation::FlipBit(p, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(p, v)| Mutation::SetByte(p, v)),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(p, b)| Mutation::Insert(p, b)),
        (any::<usize>(), 1usize..64).prop_map(|(p, n)| Mutation::Delete(p, n)),
        prop::sample::select(INTERESTING.to_vec()).prop_map(Mutation::HeaderLen),
        (any::<usize>(), prop::sample::select(INTERESTING.to_vec()))
            .prop_map(|(i, v)| Mutation::JsonNumber(i, v)),
    ]
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    let len = bytes.len().max(1);
    match m {
        Mutation::FlipBit(p, b) if !bytes.is_empty() => bytes[p % len] ^= 1 << b,
        Mutation::SetByte(p, v) if !bytes.is_empty() => bytes[p % len] = *v,
        Mutation::Truncate(n) => bytes.truncate(n % len),
        Mutation::Insert(p, b) => {
            let at = p % (bytes.len() + 1);
            bytes.splice(at..at, b.iter().copied());
        }
        Mutation::Delete(p, n) if !bytes.is_empty() => {
            let at = p % len;
            let end = (at + n).min(bytes.len());
            bytes.drain(at..end);
        }
        Mutation::HeaderLen(v) if bytes.len() >= 8 => bytes[..8].copy_from_slice(&v.to_le_bytes()),
        Mutation::JsonNumber(i, v) => {
            // Replace the i-th run of digits in the header with `v`.
            let text = String::from_utf8_lossy(bytes).into_owned();
            let runs: Vec<(usize, usize)> = digit_runs(text.as_bytes());
            if let Some(&(a, b)) = runs.get(i % runs.len().max(1)) {
                if a >= 8 && b <= bytes.len() {
                    bytes.splice(a..b, v.to_string().into_bytes());
                }
            }
        }
        _ => {}
    }
}

fn digit_runs(b: &[u8]) -> Vec<(usize, usize)> {
    let mut runs = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i].is_ascii_digit() {
            let start = i;
            while i < b.len() && b[i].is_ascii_digit() {
                i += 1;
            }
            runs.push((start, i));
        } else {
            i += 1;
        }
    }
    runs
}

fn seed_files() -> &'static [Vec<u8>] {
    static SEEDS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    SEEDS.get_or_init(write_seeds)
}

fn write_seeds() -> Vec<Vec<u8>> {
    let dir = tempfile::tempdir().unwrap();
    let sets: Vec<Vec<Tensor>> = vec![
        vec![
            Tensor::from_vec("a", DType::F32, vec![2, 3], vec![1; 24]).unwrap(),
            Tensor::from_vec("b", DType::I8, vec![3], vec![1, 2, 3]).unwrap(),
            Tensor::from_vec("c", DType::BF16, vec![0, 4], vec![]).unwrap(),
        ],
        vec![Tensor::from_vec("x", DType::F64, vec![], 2.5f64.to_le_bytes().to_vec()).unwrap()],
        vec![],
    ];
    sets.into_iter()
        .enumerate()
        .map(|(i, tensors)| {
            let path = dir.path().join(format!("s{i}.safetensors"));
            let meta = BTreeMap::from([("format".to_string(), "keras".to_string())]);
            let layout = safetensors::plan(&tensors, meta).unwrap();
            write_file(&path, &layout, &tensors, &WriteOptions::with_threads(1)).unwrap();
            std::fs::read(path).unwrap()
        })
        .collect()
}

/// What an accepted header must satisfy, whatever the bytes were.
fn check_accepted(bytes: &[u8]) {
    let len = bytes.len() as u64;
    let Ok(header) = parse_header(Path::new("fuzz"), bytes, len) else {
        return;
    };
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    let mut at = 8 + n;
    for t in &header.tensors {
        assert_eq!(t.offset, at, "{}: not back to back", t.name);
        let elems = t
            .shape
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .unwrap();
        assert_eq!(elems * t.dtype.size() as u64, t.nbytes, "{}: size", t.name);
        at += t.nbytes;
    }
    assert_eq!(at, len, "payloads do not end at the file's end");
}

fn cases() -> u32 {
    std::env::var("FASTCKPT_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn mutated_headers_never_panic(
        which in 0usize..3,
        mutations in prop::collection::vec(mutation(), 1..8),
    ) {
        let mut bytes = seed_files()[which].clone();
        for m in &mutations {
            apply(&mut bytes, m);
        }
        check_accepted(&bytes);
    }

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        check_accepted(&bytes);
    }
}
