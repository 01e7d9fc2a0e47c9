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
