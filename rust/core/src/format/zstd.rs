//! The zstd container (`.zst.safetensors`): a SafeTensors file whose every tensor is one
//! standard zstd frame of a checkpoint tensor.
//!
//! Byte by byte, as SafeTensors: a little-endian `u64` header length `n`, `n` bytes of
//! JSON padded with spaces (to a multiple of 8), then the frames back to back. Each JSON
//! entry describes what the file stores, a `U8` tensor of the frame's length at its
//! `data_offsets`, and under `"decoded"` what the frame holds: `{"dtype": "F32", "shape":
//! [4, 3]}`. `__metadata__` carries the caller's entries, `"fastckpt.codec": "zstd"` and
//! under [`CHECKSUM_KEY`] the CRC-32C of each tensor's decoded bytes. Every frame has the
//! content size and content checksum flags set, so any zstd decoder can decode a frame on
//! its own and checks it as it does; the stock `safetensors` package reads each frame as
//! the `uint8` array it is, never as weights.
//!
//! Compressed sizes are known only once compressed, so the file is not planned ahead: the
//! header's room is reserved at the front for the longest header the tensors can need, the
//! frames are appended in the order they finish (in parallel: small tensors one per thread,
//! large ones one at a time on every thread, zstd's own workers), and the header is written
//! last, padded to the room reserved.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde_json::{json, Map, Value};

use super::safetensors::{self, dtype_code, dtype_from_code, CHECKSUM_KEY};
use crate::error::{Error, Result};
use crate::io::{run_pieces_with, Body, Extent, Piece, WriteOptions, PIECE_BYTES};
use crate::layout::align_up;
use crate::tensor::{DType, Tensor};

/// Metadata key naming the codec of every tensor; its value is [`CODEC`].
pub const CODEC_KEY: &str = "fastckpt.codec";
pub const CODEC: &str = "zstd";
/// zstd's own default level: about 1 GB/s a core on float data.
pub const DEFAULT_LEVEL: i32 = 3;
/// Tensors at least this large are compressed one at a time with every thread (zstd's own
/// workers cut them into jobs, and the result is still one frame), streamed from their
/// source in pieces; smaller ones are compressed whole, one per thread.
const LARGE: u64 = 32 << 20;
/// The most bytes a zstd frame can decode to per byte it stores: a 128 KiB block of one
/// repeated byte takes 4. A header declaring more than this is lying.
const MAX_EXPANSION: u64 = 32 << 10;

/// A zstd container to write: the tensors, the caller's metadata and the level.
pub struct ZstdBody {
    tensors: Vec<Tensor>,
    metadata: BTreeMap<String, String>,
    level: i32,
    /// The room reserved for the header (a multiple of 8).
    header_room: u64,
}

/// Where one frame went: `[begin, end)` of the payload bytes, and the CRC-32C of the
/// tensor's bytes.
#[derive(Clone, Copy, Debug)]
struct Frame {
    begin: u64,
    end: u64,
    crc32c: u32,
}

impl ZstdBody {
    /// Checks the names (unique, none `__metadata__`) and the metadata (no key fastckpt
    /// reserves), and sizes the header's room.
    pub fn new(
        tensors: Vec<Tensor>,
        metadata: BTreeMap<String, String>,
        level: i32,
    ) -> Result<ZstdBody> {
        for key in [CHECKSUM_KEY, CODEC_KEY] {
            if metadata.contains_key(key) {
                return Err(Error::invalid(format!("metadata key {key:?} is reserved")));
            }
        }
        let mut seen = HashSet::new();
        for t in &tensors {
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
        let (lo, hi) = zstd::compression_level_range().into_inner();
        if !(lo..=hi).contains(&level) {
            return Err(Error::invalid(format!(
                "zstd levels run from {lo} to {hi}. Received: level={level}"
            )));
        }
        let mut body = ZstdBody {
            tensors,
            metadata,
            level,
            header_room: 0,
        };
        // The widest every number can be: the real header is never longer.
        let widest = Frame {
            begin: u64::MAX,
            end: u64::MAX,
            crc32c: u32::MAX,
        };
        let longest = body.header_json(&vec![widest; body.tensors.len()]).len();
        body.header_room = align_up(longest as u64, 8);
        Ok(body)
    }

    fn header_json(&self, frames: &[Frame]) -> String {
        let mut meta: Map<String, Value> = self
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        meta.insert(CODEC_KEY.into(), Value::String(CODEC.into()));
        let sums: Map<String, Value> = self
            .tensors
            .iter()
            .zip(frames)
            .map(|(t, f)| (t.name.clone(), Value::String(format!("{:08x}", f.crc32c))))
            .collect();
        meta.insert(
            CHECKSUM_KEY.into(),
            Value::String(Value::Object(sums).to_string()),
        );
        let mut root = Map::new();
        root.insert("__metadata__".into(), Value::Object(meta));
        for (t, f) in self.tensors.iter().zip(frames) {
            // (The widest placeholder has begin = end = u64::MAX and the widest length.)
            let stored = if f.begin == u64::MAX {
                u64::MAX
            } else {
                f.end - f.begin
            };
            root.insert(
                t.name.clone(),
                json!({
                    "dtype": "U8",
                    "shape": [stored],
                    "data_offsets": [f.begin, f.end],
                    "decoded": {"dtype": dtype_code(t.dtype), "shape": t.shape},
                }),
            );
        }
        Value::Object(root).to_string()
    }

    fn compress_large(
        &self,
        file: &File,
        data_start: u64,
        at: u64,
        tensor: &Tensor,
        opts: &WriteOptions,
    ) -> io::Result<Frame> {
        let out = OffsetWriter {
            file,
            at: data_start + at,
            written: 0,
        };
        let mut enc = zstd::stream::write::Encoder::new(out, self.level)?;
        enc.include_checksum(true)?;
        enc.include_contentsize(true)?;
        enc.set_pledged_src_size(Some(tensor.nbytes()))?;
        let threads = opts.width.threads.max(opts.width.hurried_threads);
        if threads > 1 {
            enc.multithread(threads as u32)?;
        }
        let mut crc = 0u32;
        let mut scratch = Vec::new();
        let len = tensor.nbytes() as usize;
        let mut start = 0;
        while start < len {
            let n = (len - start).min(PIECE_BYTES);
            let bytes = tensor.piece(start, n, &mut scratch)?;
            crc = crc32c::crc32c_append(crc, bytes);
            enc.write_all(bytes)?;
            opts.progress.add(n as u64);
            start += n;
        }
        let out = enc.finish()?;
        Ok(Frame {
            begin: at,
            end: at + out.written,
            crc32c: crc,
        })
    }
}

thread_local! {
    /// One compression context per thread (and level), reused across tensors: making one
    /// costs more than compressing a small tensor.
    static COMPRESSOR: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { std::cell::RefCell::new(None) };
}

/// `bytes` as one zstd frame with its content size and checksum.
pub fn compress_frame(bytes: &[u8], level: i32) -> io::Result<Vec<u8>> {
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.as_ref().is_none_or(|(l, _)| *l != level) {
            let mut c = zstd::bulk::Compressor::new(level)?;
            c.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(true))?;
            c.set_parameter(zstd::zstd_safe::CParameter::ContentSizeFlag(true))?;
            *slot = Some((level, c));
        }
        slot.as_mut().expect("set just above").1.compress(bytes)
    })
}

impl Body for ZstdBody {
    fn max_len(&self) -> u64 {
        let frames: u64 = self
            .tensors
            .iter()
            .map(|t| zstd::zstd_safe::compress_bound(t.nbytes() as usize) as u64)
            .sum();
        8 + self.header_room + frames
    }

    fn write(&self, file: &File, target: &Path, opts: &WriteOptions) -> Result<u64> {
        let data_start = 8 + self.header_room;
        let werr = |e: io::Error| Error::io("write", target, e);
        let frames: Mutex<Vec<Option<Frame>>> = Mutex::new(vec![None; self.tensors.len()]);
        let mut order: Vec<usize> = (0..self.tensors.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(self.tensors[i].nbytes()));
        let split = order.partition_point(|&i| self.tensors[i].nbytes() >= LARGE);
        let mut next = 0u64;
        for &i in &order[..split] {
            crate::io::fault::check(crate::io::fault::Stage::Write).map_err(werr)?;
            let frame = self
                .compress_large(file, data_start, next, &self.tensors[i], opts)
                .map_err(werr)?;
            next = frame.end;
            frames.lock().unwrap()[i] = Some(frame);
        }
        let next = AtomicU64::new(next);
        let pieces: Vec<Piece> = order[split..]
            .iter()
            .map(|&i| Piece {
                offset: 0,
                span: self.tensors[i].nbytes(),
                extents: vec![Extent {
                    item: i,
                    offset: 0,
                    start: 0,
                    len: self.tensors[i].nbytes() as usize,
                }],
            })
            .collect();
        run_pieces_with(&pieces, &opts.width, |piece| {
            crate::io::fault::delay();
            crate::io::fault::check(crate::io::fault::Stage::Write)?;
            let e = &piece.extents[0];
            let tensor = &self.tensors[e.item];
            let mut scratch = Vec::new();
            let bytes = tensor.piece(0, e.len, &mut scratch)?;
            let crc = crc32c::crc32c(bytes);
            let frame = compress_frame(bytes, self.level)?;
            drop(scratch);
            let begin = next.fetch_add(frame.len() as u64, Ordering::Relaxed);
            file.write_all_at(&frame, data_start + begin)?;
            opts.progress.add(e.len as u64);
            frames.lock().unwrap()[e.item] = Some(Frame {
                begin,
                end: begin + frame.len() as u64,
                crc32c: crc,
            });
            Ok(())
        })
        .map_err(werr)?;
        let frames: Vec<Frame> = frames
            .into_inner()
            .unwrap()
            .into_iter()
            .map(|f| f.expect("every tensor was compressed"))
            .collect();
        let mut header = self.header_json(&frames).into_bytes();
        if header.len() as u64 > self.header_room {
            return Err(Error::invalid(
                "the zstd container's header outgrew the room reserved for it",
            ));
        }
        header.resize(self.header_room as usize, b' ');
        let mut head = Vec::with_capacity(8 + header.len());
        head.extend_from_slice(&self.header_room.to_le_bytes());
        head.extend_from_slice(&header);
        file.write_all_at(&head, 0).map_err(werr)?;
        Ok(data_start + next.load(Ordering::Relaxed))
    }
}

/// Positioned writes, one after another from `at`.
struct OffsetWriter<'a> {
    file: &'a File,
    at: u64,
    written: u64,
}

impl Write for OffsetWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write_all_at(buf, self.at + self.written)?;
        self.written += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// One tensor of a zstd container, with its frame's absolute offset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrameInfo {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
    /// The frame's absolute offset in the file, and its length.
    pub offset: u64,
    pub stored: u64,
    /// The decoded length.
    pub nbytes: u64,
    /// The CRC-32C of the decoded bytes, as recorded.
    pub crc32c: Option<u32>,
}

/// What a zstd container's header says, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ZstdHeader {
    pub metadata: BTreeMap<String, String>,
    /// In payload order.
    pub tensors: Vec<FrameInfo>,
}

/// Reads and validates the header of the zstd container at `path`: first as SafeTensors
/// (every frame's offsets against the file, no overlaps or holes), then what each frame
/// decodes to.
pub fn read_header(path: &Path) -> Result<ZstdHeader> {
    let (head, len) = safetensors::read_raw_header(path)?;
    let outer = safetensors::parse_header(path, &head, len)?;
    let bad = |reason: String| Error::corrupt(path, reason);
    if outer.metadata.get(CODEC_KEY).map(String::as_str) != Some(CODEC) {
        return Err(bad(format!(
            "not a zstd container: __metadata__ has no \"{CODEC_KEY}\": \"{CODEC}\""
        )));
    }
    let root: Map<String, Value> =
        serde_json::from_slice(&head[8..]).map_err(|e| bad(format!("header: {e}")))?;
    let mut tensors = Vec::with_capacity(outer.tensors.len());
    for t in outer.tensors {
        let name = t.name.clone();
        let why = |r: &str| bad(format!("tensor {name:?}: {r}"));
        if t.dtype != DType::U8 || t.shape != [t.nbytes] {
            return Err(why("a frame is stored as U8 of its own length"));
        }
        let decoded = root
            .get(&t.name)
            .and_then(|e| e.get("decoded"))
            .and_then(Value::as_object)
            .ok_or_else(|| why("no \"decoded\" description"))?;
        let code = decoded
            .get("dtype")
            .and_then(Value::as_str)
            .ok_or_else(|| why("no decoded dtype"))?;
        let dtype =
            dtype_from_code(code).ok_or_else(|| why(&format!("unsupported dtype {code:?}")))?;
        let shape = decoded
            .get("shape")
            .and_then(Value::as_array)
            .ok_or_else(|| why("no decoded shape"))?
            .iter()
            .map(|d| d.as_u64().ok_or_else(|| why("shape holds a non-integer")))
            .collect::<Result<Vec<u64>>>()?;
        let nbytes = shape
            .iter()
            .try_fold(dtype.size() as u64, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| why("shape overflows"))?;
        shape
            .iter()
            .try_fold(dtype.size() as u64, |acc, &d| acc.checked_mul(d.max(1)))
            .filter(|&n| n <= i64::MAX as u64)
            .ok_or_else(|| why("shape overflows"))?;
        if nbytes > t.nbytes.saturating_mul(MAX_EXPANSION) {
            return Err(why(&format!(
                "declares {nbytes} bytes, more than a {}-byte zstd frame can hold",
                t.nbytes
            )));
        }
        tensors.push(FrameInfo {
            name: t.name,
            dtype,
            shape,
            offset: t.offset,
            stored: t.nbytes,
            nbytes,
            crc32c: t.crc32c,
        });
    }
    Ok(ZstdHeader {
        metadata: outer.metadata,
        tensors,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::{write_body, WriteOptions};

    fn tensors() -> Vec<Tensor> {
        let big: Vec<u8> = (0..(LARGE as usize + 12_345))
            .map(|i| (i % 251) as u8)
            .collect();
        vec![
            Tensor::from_vec("a", DType::F32, vec![2, 2], vec![1; 16]).unwrap(),
            Tensor::from_vec("empty", DType::F32, vec![0, 3], vec![]).unwrap(),
            Tensor::from_vec("big", DType::U8, vec![big.len() as u64], big).unwrap(),
        ]
    }

    #[test]
    fn frames_decode_on_their_own_and_the_header_checks_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.zst.safetensors");
        let ts = tensors();
        for threads in [1, 3] {
            let meta = BTreeMap::from([("format".to_string(), "fastckpt".to_string())]);
            let body = ZstdBody::new(ts.clone(), meta, DEFAULT_LEVEL).unwrap();
            let opts = WriteOptions::with_threads(threads);
            let written = write_body(&path, &body, &opts).unwrap();
            let bytes = std::fs::read(&path).unwrap();
            assert_eq!(written.len, bytes.len() as u64);
            assert_eq!(
                opts.progress.get(),
                ts.iter().map(|t| t.nbytes()).sum::<u64>()
            );
            let header = read_header(&path).unwrap();
            assert_eq!(header.metadata["format"], "fastckpt");
            assert_eq!(header.tensors.len(), 3);
            for info in &header.tensors {
                let t = ts.iter().find(|t| t.name == info.name).unwrap();
                assert_eq!((info.dtype, &info.shape), (t.dtype, &t.shape));
                let frame = &bytes[info.offset as usize..][..info.stored as usize];
                // zstd's own streaming decoder, with no size given: the frame says it.
                let decoded = zstd::stream::decode_all(frame).unwrap();
                assert_eq!(decoded, t.bytes(), "{}", info.name);
                assert_eq!(info.crc32c, Some(crc32c::crc32c(t.bytes())));
            }
        }
    }

    #[test]
    fn reserved_metadata_and_bad_levels_are_refused() {
        let meta = BTreeMap::from([(CODEC_KEY.to_string(), "x".to_string())]);
        assert!(ZstdBody::new(tensors(), meta, 3).is_err());
        assert!(ZstdBody::new(tensors(), BTreeMap::new(), 1000).is_err());
    }
}
