//! Decoding the frames of a zstd container (see [`super::zstd`]): each frame streamed from
//! the file through zstd's decoder, so that a frame is never held whole in memory, and
//! checked as it goes: exactly one frame, with its content size and checksum flags set,
//! declaring and holding the size the header gives, ending where the header says (zstd's
//! decoder checks the content checksum at the frame's end).

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Mutex;

use crate::error::{Error, Result};
use crate::io::{run_pieces_with, Extent, Piece, Progress, Width};

/// Decoded bytes are handed on in runs of this many.
const CHUNK: usize = 1 << 20;
/// The longest frame header (RFC 8878, 3.1.1.1): magic, descriptor, window, dictionary id
/// and content size.
const MAX_FRAME_HEADER: usize = 18;

/// `[pos, end)` of a file, read with positioned reads (threads share the file).
struct RangeReader<'a> {
    file: &'a File,
    pos: u64,
    end: u64,
}

impl Read for RangeReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min((self.end - self.pos) as usize);
        if n == 0 {
            return Ok(0);
        }
        let got = self.file.read_at(&mut buf[..n], self.pos)?;
        if got == 0 {
            return Err(invalid("the file ended inside the frame"));
        }
        self.pos += got as u64;
        Ok(got)
    }
}

fn invalid(why: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.into())
}

/// Streams the frame of `stored` bytes at `offset` through zstd's decoder, handing the
/// decoded bytes to `sink` in order. A damaged frame is an `InvalidData` error saying why.
pub fn stream_frame(
    file: &File,
    offset: u64,
    stored: u64,
    len: u64,
    mut sink: impl FnMut(&[u8]) -> io::Result<()>,
) -> io::Result<()> {
    let mut head = [0u8; MAX_FRAME_HEADER];
    let head_len = (stored as usize).min(MAX_FRAME_HEADER);
    file.read_exact_at(&mut head[..head_len], offset)?;
    let head = &head[..head_len];
    if head.len() < 5 || head[..4] != [0x28, 0xB5, 0x2F, 0xFD] {
        return Err(invalid("not a zstd frame"));
    }
    if head[4] & 0x04 == 0 {
        return Err(invalid("the frame carries no content checksum"));
    }
    match zstd::zstd_safe::get_frame_content_size(head) {
        Ok(Some(n)) if n == len => {}
        Ok(Some(n)) => {
            return Err(invalid(format!(
                "the frame holds {n} bytes but the header declares {len}"
            )))
        }
        _ => return Err(invalid("the frame does not declare its content size")),
    }
    let range = RangeReader {
        file,
        pos: offset,
        end: offset + stored,
    };
    let buffered = BufReader::with_capacity(CHUNK.min(stored as usize).max(1), range);
    let mut decoder = zstd::stream::read::Decoder::with_buffer(buffered)?.single_frame();
    let mut buf = vec![0u8; CHUNK.min(len as usize).max(1)];
    let mut done = 0u64;
    loop {
        let n = match decoder.read(&mut buf) {
            Ok(n) => n,
            // The decoder's own findings (a bad block, a wrong checksum, a frame cut
            // short) carry no OS error; a failed read of the file does.
            Err(e) if e.raw_os_error().is_none() => return Err(invalid(e.to_string())),
            Err(e) => return Err(e),
        };
        if n == 0 {
            break;
        }
        done += n as u64;
        if done > len {
            return Err(invalid(format!(
                "the frame decodes to more than {len} bytes"
            )));
        }
        sink(&buf[..n])?;
    }
    if done != len {
        return Err(invalid(format!(
            "the frame decoded to {done} bytes, not {len}"
        )));
    }
    let rest = decoder.finish();
    let left = rest.buffer().len() as u64 + (rest.get_ref().end - rest.get_ref().pos);
    if left != 0 {
        return Err(invalid(format!(
            "{left} bytes follow the frame inside the {stored} bytes the header gives it"
        )));
    }
    Ok(())
}

/// One frame to decode: `stored` bytes at file offset `offset` into `len` bytes at `dest`.
#[derive(Clone, Copy, Debug)]
pub struct FrameRead {
    pub offset: u64,
    pub stored: u64,
    pub dest: *mut u8,
    pub len: usize,
}

// SAFETY: as `io::ReadItem`: distinct destinations the caller keeps alive while reading.
unsafe impl Send for FrameRead {}
unsafe impl Sync for FrameRead {}

/// Runs `decode(item)` for every `(offset, stored, len)` frame on up to `threads` threads,
/// the largest first (a frame is decoded by one thread); a damaged frame is a corrupt-file
/// error naming its offset, other failures I/O errors.
fn each_frame(
    path: &Path,
    frames: &[(u64, u64, u64)],
    threads: usize,
    decode: impl Fn(&File, usize) -> io::Result<()> + Sync,
) -> Result<()> {
    let file = File::open(path).map_err(|e| Error::io("open", path, e))?;
    let size = file
        .metadata()
        .map_err(|e| Error::io("stat", path, e))?
        .len();
    for &(offset, stored, _) in frames {
        if offset.checked_add(stored).is_none_or(|end| end > size) {
            return Err(Error::corrupt(
                path,
                format!("the zstd frame at offset {offset} lies past the end of the file ({size} bytes)"),
            ));
        }
    }
    let mut order: Vec<usize> = (0..frames.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(frames[i].2));
    let pieces: Vec<Piece> = order
        .iter()
        .map(|&i| Piece {
            offset: frames[i].0,
            span: frames[i].1,
            extents: vec![Extent {
                item: i,
                offset: frames[i].0,
                start: 0,
                len: frames[i].2 as usize,
            }],
        })
        .collect();
    let failure: Mutex<Option<Error>> = Mutex::new(None);
    let result = run_pieces_with(&pieces, &Width::fixed(threads), |piece| {
        let i = piece.extents[0].item;
        decode(&file, i).inspect_err(|e| {
            if e.kind() == io::ErrorKind::InvalidData {
                failure.lock().unwrap().get_or_insert(Error::corrupt(
                    path,
                    format!("the zstd frame at offset {}: {e}", frames[i].0),
                ));
            }
        })
    });
    if let Some(e) = failure.into_inner().unwrap() {
        return Err(e);
    }
    result.map_err(|e| Error::io("read", path, e))
}

/// Decodes every frame into its destination, in parallel; returns the CRC-32C of each
/// decoded payload. `progress` counts the decoded bytes.
///
/// # Safety
/// Each `dest` must be valid for writes of `len` bytes, not aliased by another item or by
/// anything else while this runs.
pub unsafe fn read_frames_into(
    path: &Path,
    items: &[FrameRead],
    threads: usize,
    progress: &Progress,
) -> Result<Vec<u32>> {
    let frames: Vec<(u64, u64, u64)> = items
        .iter()
        .map(|it| (it.offset, it.stored, it.len as u64))
        .collect();
    let sums: Mutex<Vec<u32>> = Mutex::new(vec![0; items.len()]);
    each_frame(path, &frames, threads, |file, i| {
        let it = &items[i];
        // SAFETY: guaranteed by the caller.
        let dest = unsafe { std::slice::from_raw_parts_mut(it.dest, it.len) };
        let mut at = 0;
        let mut crc = 0u32;
        stream_frame(file, it.offset, it.stored, it.len as u64, |bytes| {
            dest[at..at + bytes.len()].copy_from_slice(bytes);
            at += bytes.len();
            crc = crc32c::crc32c_append(crc, bytes);
            progress.add(bytes.len() as u64);
            Ok(())
        })?;
        sums.lock().unwrap()[i] = crc;
        Ok(())
    })?;
    Ok(sums.into_inner().unwrap())
}

/// The CRC-32C of what each `(offset, stored, len)` frame decodes to, in parallel, holding
/// no decoded frame whole: checks a container in bounded memory.
pub fn frame_digests(
    path: &Path,
    frames: &[(u64, u64, u64)],
    threads: usize,
    progress: &Progress,
) -> Result<Vec<u32>> {
    let sums: Mutex<Vec<u32>> = Mutex::new(vec![0; frames.len()]);
    each_frame(path, frames, threads, |file, i| {
        let (offset, stored, len) = frames[i];
        let mut crc = 0u32;
        stream_frame(file, offset, stored, len, |bytes| {
            crc = crc32c::crc32c_append(crc, bytes);
            progress.add(bytes.len() as u64);
            Ok(())
        })?;
        sums.lock().unwrap()[i] = crc;
        Ok(())
    })?;
    Ok(sums.into_inner().unwrap())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::zstd::compress_frame;

    /// A file holding `frame` at offset 3, and the frame's bounds.
    fn file_with(frame: &[u8]) -> (tempfile::TempDir, std::path::PathBuf, u64, u64) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut bytes = vec![9u8; 3];
        bytes.extend_from_slice(frame);
        bytes.extend_from_slice(&[9u8; 5]);
        std::fs::write(&path, bytes).unwrap();
        (dir, path, 3, frame.len() as u64)
    }

    fn decoded(path: &Path, offset: u64, stored: u64, len: u64) -> io::Result<Vec<u8>> {
        let file = File::open(path).unwrap();
        let mut out = Vec::new();
        stream_frame(&file, offset, stored, len, |b| {
            out.extend_from_slice(b);
            Ok(())
        })?;
        Ok(out)
    }

    #[test]
    fn a_frame_streams_back_whole() {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 7) as u8).collect();
        let frame = compress_frame(&data, 3).unwrap();
        let (_dir, path, offset, stored) = file_with(&frame);
        assert_eq!(
            decoded(&path, offset, stored, data.len() as u64).unwrap(),
            data
        );
        let sums = frame_digests(
            &path,
            &[(offset, stored, data.len() as u64)],
            2,
            &Progress::default(),
        )
        .unwrap();
        assert_eq!(sums, vec![crc32c::crc32c(&data)]);
    }

    #[test]
    fn a_damaged_or_misdescribed_frame_is_invalid_data() {
        let data = vec![7u8; 100_000];
        let frame = compress_frame(&data, 3).unwrap();
        let (_dir, path, offset, stored) = file_with(&frame);
        let kind = |r: io::Result<Vec<u8>>| r.unwrap_err().kind();
        let len = data.len() as u64;
        // A size the frame does not declare, a frame cut short, bytes after it.
        assert_eq!(
            kind(decoded(&path, offset, stored, len - 1)),
            io::ErrorKind::InvalidData
        );
        assert_eq!(
            kind(decoded(&path, offset, stored - 1, len)),
            io::ErrorKind::InvalidData
        );
        assert_eq!(
            kind(decoded(&path, offset, stored + 1, len)),
            io::ErrorKind::InvalidData
        );
        assert_eq!(
            kind(decoded(&path, offset + 1, stored, len)),
            io::ErrorKind::InvalidData
        );
        // The checksum, the frame's last 4 bytes.
        let mut bad = frame.clone();
        let last = bad.len() - 1;
        bad[last] ^= 0xFF;
        let (_d, bad_path, offset, stored) = file_with(&bad);
        assert_eq!(
            kind(decoded(&bad_path, offset, stored, len)),
            io::ErrorKind::InvalidData
        );
        let err = frame_digests(&bad_path, &[(offset, stored, len)], 1, &Progress::default())
            .unwrap_err();
        assert!(err.to_string().contains("zstd frame at offset 3"), "{err}");
    }
}
