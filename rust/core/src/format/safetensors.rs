//! SafeTensors: `u64` header length, a JSON header, then the payloads back to back.
//!
//! Payloads are ordered by element size, largest first (stable otherwise), so that every
//! tensor starts aligned to its element size: the header is padded with spaces to 8 bytes.
//! `__metadata__` carries the caller's entries plus a CRC-32C per tensor under
//! [`CHECKSUM_KEY`], computed while the payload is written.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use serde_json::{json, Map, Value};

use crate::error::{Error, Result};
use crate::layout::{Digest, Layout, Region, Slot};
use crate::tensor::{DType, Tensor};

/// Metadata key holding `{"tensor name": "crc32c as 8 hex digits", ...}` as a JSON string.
pub const CHECKSUM_KEY: &str = "fastckpt.crc32c";
/// Headers larger than this are refused when reading (safetensors itself uses 100 MB).
pub const MAX_HEADER: u64 = 100_000_000;

/// The SafeTensors name of a dtype (`F32`, `BF16`, ...).
pub fn dtype_code(d: DType) -> &'static str {
    match d {
        DType::Bool => "BOOL",
        DType::U8 => "U8",
        DType::U16 => "U16",
        DType::U32 => "U32",
        DType::U64 => "U64",
        DType::I8 => "I8",
        DType::I16 => "I16",
        DType::I32 => "I32",
        DType::I64 => "I64",
        DType::F16 => "F16",
        DType::BF16 => "BF16",
        DType::F32 => "F32",
        DType::F64 => "F64",
    }
}

/// The dtype a SafeTensors name stands for.
pub fn dtype_from_code(code: &str) -> Option<DType> {
    DType::ALL.into_iter().find(|&d| dtype_code(d) == code)
}

#[derive(Debug)]
struct Entry {
    name: String,
    dtype: DType,
    shape: Vec<u64>,
    begin: u64,
    end: u64,
}

/// A planned SafeTensors file.
#[derive(Debug)]
pub struct SafeTensorsLayout {
    entries: Vec<Entry>,
    metadata: BTreeMap<String, String>,
    header_len: u64,
    slots: Vec<Slot>,
    file_len: u64,
}

/// Plans a file holding `tensors` (names must be unique) and `metadata`.
pub fn plan(tensors: &[Tensor], metadata: BTreeMap<String, String>) -> Result<SafeTensorsLayout> {
    if metadata.contains_key(CHECKSUM_KEY) {
        return Err(Error::invalid(format!(
            "metadata key {CHECKSUM_KEY:?} is reserved"
        )));
    }
    let mut seen = HashSet::new();
    for t in tensors {
        if t.name == "__metadata__" {
            return Err(Error::invalid("a tensor cannot be named \"__metadata__\""));
        }
        if !seen.insert(t.name.as_str()) {
            return Err(Error::invalid(format!(
                "tensor name {:?} appears twice",
                t.name
            )));
        }
    }
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(tensors[i].dtype.size()));

    let mut entries = Vec::with_capacity(tensors.len());
    let mut rel_slots = Vec::with_capacity(tensors.len());
    let mut at = 0u64;
    for i in order {
        let t = &tensors[i];
        entries.push(Entry {
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
            begin: at,
            end: at + t.nbytes(),
        });
        rel_slots.push((at, i));
        at += t.nbytes();
    }
    let mut layout = SafeTensorsLayout {
        entries,
        metadata,
        header_len: 0,
        slots: Vec::new(),
        file_len: 0,
    };
    // Checksums are fixed-width hex, so the header's length is known before they are.
    let placeholder = vec![0u32; tensors.len()];
    layout.header_len = padded_len(layout.header_json(&placeholder).len());
    let data_start = 8 + layout.header_len;
    layout.slots = rel_slots
        .into_iter()
        .map(|(rel, tensor)| Slot {
            offset: data_start + rel,
            tensor,
        })
        .collect();
    layout.file_len = data_start + at;
    Ok(layout)
}

fn padded_len(n: usize) -> u64 {
    crate::layout::align_up(n as u64, 8)
}

impl SafeTensorsLayout {
    /// `digests[k]` belongs to the k-th entry (payload order, which is also slot order).
    fn header_json(&self, digests: &[u32]) -> String {
        let mut meta: Map<String, Value> = self
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        let sums: Map<String, Value> = self
            .entries
            .iter()
            .zip(digests)
            .map(|(e, d)| (e.name.clone(), Value::String(format!("{d:08x}"))))
            .collect();
        meta.insert(
            CHECKSUM_KEY.into(),
            Value::String(Value::Object(sums).to_string()),
        );
        let mut root = Map::new();
        root.insert("__metadata__".into(), Value::Object(meta));
        for e in &self.entries {
            root.insert(
                e.name.clone(),
                json!({
                    "dtype": dtype_code(e.dtype),
                    "shape": e.shape,
                    "data_offsets": [e.begin, e.end],
                }),
            );
        }
        Value::Object(root).to_string()
    }
}

impl Layout for SafeTensorsLayout {
    fn file_len(&self) -> u64 {
        self.file_len
    }

    fn slots(&self) -> &[Slot] {
        &self.slots
    }

    fn digest(&self) -> Digest {
        Digest::Crc32c
    }

    fn regions(&self, digests: &[u32]) -> Result<Vec<Region>> {
        let mut header = self.header_json(digests).into_bytes();
        if padded_len(header.len()) != self.header_len {
            return Err(Error::invalid(
                "safetensors header changed length while writing",
            ));
        }
        header.resize(self.header_len as usize, b' ');
        let mut bytes = Vec::with_capacity(8 + header.len());
        bytes.extend_from_slice(&self.header_len.to_le_bytes());
        bytes.extend_from_slice(&header);
        Ok(vec![Region { offset: 0, bytes }])
    }
}

/// One tensor as a file describes it, with its payload's absolute offset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
    pub offset: u64,
    pub nbytes: u64,
    /// The CRC-32C recorded by fastckpt, if the file has one for this tensor.
    pub crc32c: Option<u32>,
}

/// What a SafeTensors header says, validated against the file's size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub metadata: BTreeMap<String, String>,
    /// In payload order.
    pub tensors: Vec<TensorInfo>,
}

/// Reads and validates the header of the SafeTensors file at `path`.
pub fn read_header(path: &Path) -> Result<Header> {
    let (head, len) = read_raw_header(path)?;
    parse_header(path, &head, len)
}

/// The first `8 + n` bytes of the SafeTensors file at `path` (its header, `n` checked
/// against the file's size), and the file's size.
pub fn read_raw_header(path: &Path) -> Result<(Vec<u8>, u64)> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| Error::io("open", path, e))?;
    let len = file
        .metadata()
        .map_err(|e| Error::io("stat", path, e))?
        .len();
    let mut head = vec![0u8; 8.min(len) as usize];
    (&file)
        .read_exact(&mut head)
        .map_err(|e| Error::io("read", path, e))?;
    let n = header_len(path, &head, len)?;
    head.resize(8 + n as usize, 0);
    (&file)
        .read_exact(&mut head[8..])
        .map_err(|e| Error::io("read", path, e))?;
    Ok((head, len))
}

/// Parses and validates a header. `head` holds at least the file's first `8 + n` bytes when
/// the header is `n` bytes long (call [`header_len`] first to know how many to read).
/// Every claim is checked: sizes against dtype and shape, offsets against the file, no
/// overlaps or holes, as the format requires.
pub fn parse_header(path: &Path, head: &[u8], file_len: u64) -> Result<Header> {
    let bad = |reason: String| Error::corrupt(path, reason);
    let n = header_len(path, head, file_len)?;
    let json = head
        .get(8..8 + n as usize)
        .ok_or_else(|| bad("truncated header".into()))?;
    let root: Map<String, Value> = serde_json::from_slice(json)
        .map_err(|e| bad(format!("header is not a JSON object: {e}")))?;
    let data_start = 8 + n;
    let data_len = file_len - data_start;
    let mut metadata = BTreeMap::new();
    let mut tensors = Vec::new();
    for (name, value) in root {
        if name == "__metadata__" {
            let obj = value
                .as_object()
                .ok_or_else(|| bad("__metadata__ is not an object".into()))?;
            for (k, v) in obj {
                let v = v
                    .as_str()
                    .ok_or_else(|| bad(format!("__metadata__[{k:?}] is not a string")))?;
                metadata.insert(k.clone(), v.to_owned());
            }
            continue;
        }
        let info = parse_entry(&name, &value, data_len)
            .map_err(|r| bad(format!("tensor {name:?}: {r}")))?;
        tensors.push(TensorInfo {
            offset: data_start + info.0,
            ..info.1
        });
    }
    tensors.sort_by_key(|t| (t.offset, t.nbytes));
    let mut at = data_start;
    for t in &tensors {
        if t.offset != at {
            return Err(bad(format!(
                "tensor {:?} starts at {} but the previous one ends at {at}: overlaps and holes are not allowed",
                t.name, t.offset
            )));
        }
        at += t.nbytes;
    }
    if at != file_len {
        return Err(bad(format!(
            "payloads end at {at} but the file has {file_len} bytes"
        )));
    }
    if let Some(sums) = metadata.get(CHECKSUM_KEY) {
        let sums: BTreeMap<String, String> = serde_json::from_str(sums).map_err(|e| {
            bad(format!(
                "{CHECKSUM_KEY} is not a JSON object of strings: {e}"
            ))
        })?;
        for t in &mut tensors {
            if let Some(hex) = sums.get(&t.name) {
                t.crc32c =
                    Some(u32::from_str_radix(hex, 16).map_err(|_| {
                        bad(format!("checksum of {:?} is not hex: {hex:?}", t.name))
                    })?);
            }
        }
    }
    Ok(Header { metadata, tensors })
}

/// The header length a file declares, checked against the file's size and [`MAX_HEADER`].
pub fn header_len(path: &Path, head: &[u8], file_len: u64) -> Result<u64> {
    let bytes: [u8; 8] = head
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| Error::corrupt(path, "shorter than the 8-byte header length"))?;
    let n = u64::from_le_bytes(bytes);
    if n > MAX_HEADER || n > file_len - 8 {
        return Err(Error::corrupt(
            path,
            format!("header length {n} exceeds the file ({file_len} bytes) or the {MAX_HEADER}-byte limit"),
        ));
    }
    Ok(n)
}

fn parse_entry(
    name: &str,
    value: &Value,
    data_len: u64,
) -> std::result::Result<(u64, TensorInfo), String> {
    let obj = value.as_object().ok_or("entry is not an object")?;
    let code = obj.get("dtype").and_then(Value::as_str).ok_or("no dtype")?;
    let dtype = dtype_from_code(code).ok_or_else(|| format!("unsupported dtype {code:?}"))?;
    let shape = obj
        .get("shape")
        .and_then(Value::as_array)
        .ok_or("no shape")?
        .iter()
        .map(|d| d.as_u64().ok_or("shape holds a non-integer"))
        .collect::<std::result::Result<Vec<u64>, _>>()?;
    let offsets = obj
        .get("data_offsets")
        .and_then(Value::as_array)
        .ok_or("no data_offsets")?;
    let [begin, end] = offsets.as_slice() else {
        return Err("data_offsets is not [begin, end]".into());
    };
    let (begin, end) = (
        begin.as_u64().ok_or("bad begin")?,
        end.as_u64().ok_or("bad end")?,
    );
    if begin > end || end > data_len {
        return Err(format!(
            "data_offsets [{begin}, {end}] fall outside the {data_len} payload bytes"
        ));
    }
    let expected = shape
        .iter()
        .try_fold(dtype.size() as u64, |acc, &d| acc.checked_mul(d))
        .ok_or("shape overflows")?;
    // An array whose nonzero dimensions multiply past isize::MAX bytes cannot exist in
    // memory even when another dimension is zero (numpy refuses it): refuse the shape.
    shape
        .iter()
        .try_fold(dtype.size() as u64, |acc, &d| acc.checked_mul(d.max(1)))
        .filter(|&n| n <= i64::MAX as u64)
        .ok_or("shape overflows")?;
    if expected != end - begin {
        return Err(format!(
            "shape {shape:?} of {code} needs {expected} bytes, data_offsets give {}",
            end - begin
        ));
    }
    Ok((
        begin,
        TensorInfo {
            name: name.to_owned(),
            dtype,
            shape,
            offset: 0,
            nbytes: end - begin,
            crc32c: None,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::{write_file, WriteOptions};

    fn sample() -> Vec<Tensor> {
        vec![
            Tensor::from_vec("a", DType::I8, vec![3], vec![1, 2, 3]).unwrap(),
            Tensor::from_vec("b", DType::F64, vec![], 2.5f64.to_le_bytes().to_vec()).unwrap(),
            Tensor::from_vec("c", DType::F32, vec![0, 4], vec![]).unwrap(),
        ]
    }

    #[test]
    fn round_trips_through_the_parser() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.safetensors");
        let tensors = sample();
        let meta = BTreeMap::from([("format".to_string(), "keras".to_string())]);
        let layout = plan(&tensors, meta).unwrap();
        write_file(&path, &layout, &tensors, &WriteOptions::with_threads(2)).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(
            (8 + header_len(&path, &bytes, bytes.len() as u64).unwrap()) % 8,
            0
        );
        let header = parse_header(&path, &bytes, bytes.len() as u64).unwrap();
        assert_eq!(header.metadata["format"], "keras");
        let names: Vec<_> = header.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["b", "c", "a"], "largest element size first");
        let b = &header.tensors[0];
        assert_eq!(&bytes[b.offset as usize..][..8], &2.5f64.to_le_bytes());
        assert_eq!(b.crc32c, Some(crc32c::crc32c(&2.5f64.to_le_bytes())));
    }

    #[test]
    fn rejects_duplicates_and_reserved_names() {
        let t = sample();
        let dup = vec![t[0].clone(), t[0].clone()];
        assert!(plan(&dup, BTreeMap::new())
            .err()
            .unwrap()
            .to_string()
            .contains("twice"));
        let reserved = BTreeMap::from([(CHECKSUM_KEY.to_string(), String::new())]);
        assert!(plan(&t, reserved).is_err());
    }

    #[test]
    fn hostile_headers_are_refused() {
        let p = Path::new("h");
        let file = |json: &str, payload: usize| {
            let mut b = (json.len() as u64).to_le_bytes().to_vec();
            b.extend_from_slice(json.as_bytes());
            b.resize(b.len() + payload, 0);
            b
        };
        let cases = [
            (
                file(
                    r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
                    4,
                ),
                "outside",
            ),
            (
                file(
                    r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
                    8,
                ),
                "needs 12 bytes",
            ),
            (
                file(
                    r#"{"a":{"dtype":"C64","shape":[1],"data_offsets":[0,8]}}"#,
                    8,
                ),
                "unsupported dtype",
            ),
            (
                file(
                    r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}}"#,
                    6,
                ),
                "overlaps",
            ),
            (
                file(
                    r#"{"a":{"dtype":"U8","shape":[4294967296,4294967296,4294967296],"data_offsets":[0,4]}}"#,
                    4,
                ),
                "overflows",
            ),
            (
                file(
                    r#"{"a":{"dtype":"U8","shape":[0,9223372036854775807,2],"data_offsets":[0,0]}}"#,
                    0,
                ),
                "overflows",
            ),
            (file("[1]", 0), "not a JSON object"),
            (vec![255; 16], "exceeds"),
            (vec![1, 2], "shorter"),
        ];
        for (bytes, want) in cases {
            let err = parse_header(p, &bytes, bytes.len() as u64)
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{err} should mention {want}");
        }
    }
}
