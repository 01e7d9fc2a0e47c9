//! Parallel positioned reads straight into caller-owned buffers.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::parallel::{plan_pieces, run_pieces, Digests};
use crate::error::{Error, Result};
use crate::layout::Digest;

/// One payload to read: `len` bytes at file offset `offset` into the buffer at `dest`.
#[derive(Clone, Copy, Debug)]
pub struct ReadItem {
    pub offset: u64,
    pub dest: *mut u8,
    pub len: usize,
}

// SAFETY: each item's destination is a distinct buffer that the caller keeps alive and does
// not touch until `read_into` returns; threads write disjoint byte ranges of it.
unsafe impl Send for ReadItem {}
unsafe impl Sync for ReadItem {}

/// Reads every item with up to `threads` threads; returns one digest per item when asked.
/// Every range is checked against the file's real size first: a damaged or hostile file
/// gets a clear error, never a short read into uninitialised memory.
///
/// # Safety
/// Each `dest` must be valid for writes of `len` bytes, not aliased by another item or by
/// anything else while this runs.
pub unsafe fn read_into(
    path: &Path,
    items: &[ReadItem],
    threads: usize,
    digest: Digest,
    progress: Option<&super::Progress>,
) -> Result<Vec<u32>> {
    let file = File::open(path).map_err(|e| Error::io("open", path, e))?;
    let size = file
        .metadata()
        .map_err(|e| Error::io("stat", path, e))?
        .len();
    for (i, it) in items.iter().enumerate() {
        if it
            .offset
            .checked_add(it.len as u64)
            .is_none_or(|end| end > size)
        {
            return Err(Error::corrupt(
                path,
                format!(
                    "item {i}: {} bytes at offset {} lie past the end of the file ({size} bytes)",
                    it.len, it.offset
                ),
            ));
        }
    }
    let spans: Vec<(u64, usize)> = items.iter().map(|it| (it.offset, it.len)).collect();
    let pieces = plan_pieces(&spans, false);
    let digests = Digests::new(digest, items.len());
    run_pieces(&pieces, threads, |piece| {
        for e in &piece.extents {
            let it = &items[e.item];
            // SAFETY: guaranteed by the caller; extents of one item never overlap.
            let dest = unsafe { std::slice::from_raw_parts_mut(it.dest.add(e.start), e.len) };
            file.read_exact_at(dest, e.offset)?;
            if digests.wanted() {
                digests.record(e.item, e.start, dest);
            }
            if let Some(p) = progress {
                p.add(e.len as u64);
            }
        }
        Ok(())
    })
    .map_err(|e| Error::io("read", path, e))?;
    Ok(if digests.wanted() {
        digests.finish()
    } else {
        Vec::new()
    })
}

/// The CRC-32 (zip's) of `len` bytes at `offset`, read in parallel pieces whose CRCs are
/// combined in order: a stored zip member can be checked without streaming it through one
/// thread.
pub fn crc32_of_range(path: &Path, offset: u64, len: u64, threads: usize) -> Result<u32> {
    let sums = digests_of_ranges(path, &[(offset, len)], threads, Digest::Crc32, None)?;
    Ok(sums[0])
}

/// The digest of each `(offset, len)` range of the file, read in parallel 1 MiB at a time:
/// checksums of a checkpoint's payloads in bounded memory. `progress` counts the bytes.
pub fn digests_of_ranges(
    path: &Path,
    ranges: &[(u64, u64)],
    threads: usize,
    digest: Digest,
    progress: Option<&super::Progress>,
) -> Result<Vec<u32>> {
    const CHUNK: usize = 1 << 20;
    let file = File::open(path).map_err(|e| Error::io("open", path, e))?;
    let size = file
        .metadata()
        .map_err(|e| Error::io("stat", path, e))?
        .len();
    let mut spans = Vec::with_capacity(ranges.len());
    for &(offset, len) in ranges {
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(Error::corrupt(
                path,
                format!(
                    "{len} bytes at offset {offset} lie past the end of the file ({size} bytes)"
                ),
            ));
        }
        let len = usize::try_from(len).map_err(|_| Error::corrupt(path, "range too large"))?;
        spans.push((offset, len));
    }
    let pieces = plan_pieces(&spans, false);
    let digests = Digests::new(digest, ranges.len());
    run_pieces(&pieces, threads, |piece| {
        let mut buf = vec![0u8; CHUNK.min(piece.span as usize)];
        for e in &piece.extents {
            let mut done = 0;
            while done < e.len {
                let n = buf.len().min(e.len - done);
                file.read_exact_at(&mut buf[..n], e.offset + done as u64)?;
                digests.record(e.item, e.start + done, &buf[..n]);
                done += n;
            }
            if let Some(p) = progress {
                p.add(e.len as u64);
            }
        }
        Ok(())
    })
    .map_err(|e| Error::io("read", path, e))?;
    Ok(digests.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_of_a_range_matches_one_pass() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.bin");
        let data: Vec<u8> = (0..(20 << 20) + 12_345u32)
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        std::fs::write(&path, &data).unwrap();
        for (offset, len) in [(0usize, data.len()), (7, (17 << 20) + 3), (100, 0)] {
            for threads in [1, 3] {
                let got = crc32_of_range(&path, offset as u64, len as u64, threads).unwrap();
                assert_eq!(got, crc32fast::hash(&data[offset..offset + len]));
            }
        }
        let past = crc32_of_range(&path, 10, data.len() as u64, 2).unwrap_err();
        assert!(past.to_string().contains("past the end"), "{past}");
    }
}
