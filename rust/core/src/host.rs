//! Host memory for snapshots: copying the variables into the snapshot buffers on every core,
//! and faulting the buffers in ahead of the first snapshot.
//!
//! The snapshot is the one stage that blocks training, and training is blocked anyway while
//! it runs, so the copy uses every core. Fresh memory costs far more to write than memory
//! already touched (every page is faulted and zeroed by the kernel first, and on a VM often
//! backed by the host first), so the buffers are faulted in once, on a background thread,
//! before the first snapshot needs them.

use std::io;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

/// One copy of `len` bytes from `src` to `dst`.
#[derive(Clone, Copy, Debug)]
pub struct CopyItem {
    pub src: *const u8,
    pub dst: *mut u8,
    pub len: usize,
}

// SAFETY: the caller of `copy_parallel` guarantees the ranges are valid and disjoint for the
// duration of the call; threads copy disjoint parts of them.
unsafe impl Send for CopyItem {}
unsafe impl Sync for CopyItem {}

/// Copies are cut into chunks of about this size so that a few large variables still spread
/// over every thread, and many small ones are not one thread's work each.
const CHUNK: usize = 4 << 20;

/// Copies every item with up to `threads` threads (the caller's among them, all at the
/// caller's priority).
///
/// # Safety
/// Each `src` must be valid for reads and each `dst` for writes of `len` bytes for the
/// whole call; no destination may overlap another item's source or destination.
pub unsafe fn copy_parallel(items: &[CopyItem], threads: usize) {
    let mut chunks: Vec<CopyItem> = Vec::new();
    for it in items {
        let mut at = 0;
        while at < it.len {
            let len = (it.len - at).min(CHUNK);
            chunks.push(CopyItem {
                src: it.src.add(at),
                dst: it.dst.add(at),
                len,
            });
            at += len;
        }
    }
    let next = AtomicUsize::new(0);
    let worker = || {
        while let Some(c) = chunks.get(next.fetch_add(1, Ordering::Relaxed)) {
            // SAFETY: guaranteed by the caller; chunks of one item are disjoint.
            unsafe { std::ptr::copy_nonoverlapping(c.src, c.dst, c.len) };
        }
    };
    let threads = threads.clamp(1, chunks.len().max(1));
    if threads == 1 {
        worker();
        return;
    }
    std::thread::scope(|s| {
        for _ in 1..threads {
            s.spawn(worker);
        }
        worker();
    });
}

const PAGE: usize = 4096;
/// Memory is faulted in this much at a time: `MADV_POPULATE_WRITE` holds the process's
/// memory-map lock while it works, and anything that maps or unmaps memory meanwhile (the
/// training thread's allocator) waits for it; small steps keep that wait short.
const PREFAULT_STEP: usize = 2 << 20;

/// Faults in every whole page of `[ptr, ptr + len)` for writing, without changing a byte:
/// `MADV_POPULATE_WRITE` (Linux 5.14), else an atomic no-op write to each page. Safe to run
/// while another thread writes the same memory (a snapshot that did not wait for it).
///
/// # Safety
/// The range must be mapped, writable memory that stays mapped for the whole call.
pub unsafe fn prefault(ptr: *mut u8, len: usize) -> io::Result<()> {
    let start = (ptr as usize).next_multiple_of(PAGE);
    let end = (ptr as usize + len) / PAGE * PAGE;
    let mut at = start;
    while at < end {
        let step = PREFAULT_STEP.min(end - at);
        let rc = libc::madvise(at as *mut libc::c_void, step, libc::MADV_POPULATE_WRITE);
        if rc != 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EINVAL) {
                return Err(err);
            }
            // An older kernel: touch each page. `fetch_or(0)` is a write to the page (so
            // the kernel maps it writable) that cannot lose a concurrent write of the byte.
            for page in (at..at + step).step_by(PAGE) {
                // SAFETY: the page lies inside the caller's mapped, writable range.
                unsafe { (*(page as *const AtomicU8)).fetch_or(0, Ordering::Relaxed) };
            }
        }
        at += step;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_every_byte_of_every_item() {
        let sizes = [0usize, 1, 4095, CHUNK, CHUNK * 2 + 17, 100];
        let sources: Vec<Vec<u8>> = sizes
            .iter()
            .enumerate()
            .map(|(k, &n)| (0..n).map(|i| (i * 7 + k) as u8).collect())
            .collect();
        for threads in [1, 3] {
            let mut dests: Vec<Vec<u8>> = sizes.iter().map(|&n| vec![0u8; n]).collect();
            let items: Vec<CopyItem> = sources
                .iter()
                .zip(dests.iter_mut())
                .map(|(s, d)| CopyItem {
                    src: s.as_ptr(),
                    dst: d.as_mut_ptr(),
                    len: s.len(),
                })
                .collect();
            // SAFETY: each item is a distinct pair of live vectors of `len` bytes.
            unsafe { copy_parallel(&items, threads) };
            assert_eq!(dests, sources, "threads={threads}");
        }
    }

    #[test]
    fn prefault_keeps_the_content() {
        let mut buf: Vec<u8> = (0..(3 * PAGE + 123)).map(|i| (i % 251) as u8).collect();
        let before = buf.clone();
        // SAFETY: the vector's buffer is mapped and writable.
        unsafe { prefault(buf.as_mut_ptr().add(5), buf.len() - 5).unwrap() };
        assert_eq!(buf, before);
        // An empty or sub-page range is a no-op.
        unsafe { prefault(buf.as_mut_ptr().add(1), 10).unwrap() };
    }
}
