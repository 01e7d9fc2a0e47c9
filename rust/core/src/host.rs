//! Host memory for snapshots: copying the variables into the snapshot buffers on every core,
//! and faulting the buffers in ahead of the first snapshot.
//!
//! The snapshot is the one stage that blocks training, and training is blocked anyway while
//! it runs, so the copy uses every core. Fresh memory costs far more to write than memory
//! already touched (every page is faulted and zeroed by the kernel first, and on a VM often
//! backed by the host first), so the buffers are faulted in once, on a background thread,
//! before the first snapshot needs them.

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

/// Faults in every whole page of `[ptr, ptr + len)` for writing, without changing a byte:
/// an atomic compare-and-swap of each page's first byte with itself, a write to the page
/// that cannot lose a concurrent write of the byte (a snapshot that did not wait for this
/// may be writing the same memory).
///
/// Page by page, not `MADV_POPULATE_WRITE`: that holds the process's memory-map lock while
/// it works, and this runs at the lowest priority while training runs; preempted with the
/// lock held, it made every `mmap` and `munmap` of the training step wait for it to get a
/// core again (TensorFlow's first step took 2.4x as long). A page fault takes only the lock
/// of the mapping it falls in, this buffer's own. Not `fetch_or(0)` either: a read-modify-
/// write that changes nothing may be compiled into a plain load, which maps the shared
/// zero page and allocates nothing.
///
/// # Safety
/// The range must be mapped, writable memory that stays mapped for the whole call.
pub unsafe fn prefault(ptr: *mut u8, len: usize) {
    let start = (ptr as usize).next_multiple_of(PAGE);
    let end = (ptr as usize + len) / PAGE * PAGE;
    for page in (start..end).step_by(PAGE) {
        // SAFETY: the page lies inside the caller's mapped, writable range.
        let byte = unsafe { &*(page as *const AtomicU8) };
        let seen = byte.load(Ordering::Relaxed);
        let _ = byte.compare_exchange(seen, seen, Ordering::Relaxed, Ordering::Relaxed);
    }
}

/// [`prefault`], a piece at a time on `width`'s threads: in a background job, at the
/// lowest priority until somebody waits for it (see `io::coordinate`).
///
/// # Safety
/// As for [`prefault`].
pub unsafe fn prefault_with(ptr: *mut u8, len: usize, width: &crate::io::Width) {
    // Pieces of whole pages (their length is a multiple of a page), so that no page
    // straddles two pieces and goes untouched by both.
    let start = (ptr as usize).next_multiple_of(PAGE);
    let end = (ptr as usize + len) / PAGE * PAGE;
    let pieces = crate::io::plan_pieces(&[(0, end.saturating_sub(start))], false);
    let _ = crate::io::run_pieces_with(&pieces, width, |piece| {
        // SAFETY: the piece lies inside the caller's range (see above).
        unsafe {
            prefault(
                (start + piece.offset as usize) as *mut u8,
                piece.span as usize,
            )
        };
        Ok(())
    });
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
        unsafe { prefault(buf.as_mut_ptr().add(5), buf.len() - 5) };
        assert_eq!(buf, before);
        // An empty or sub-page range is a no-op.
        unsafe { prefault(buf.as_mut_ptr().add(1), 10) };
    }

    /// The resident bytes of the mapping that starts at `addr`, from /proc/self/smaps.
    fn resident(addr: usize) -> usize {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut lines = smaps.lines();
        while let Some(line) = lines.next() {
            let range = line.split_whitespace().next().unwrap_or("");
            let Some((from, _)) = range.split_once('-') else {
                continue;
            };
            if usize::from_str_radix(from, 16) != Ok(addr) {
                continue;
            }
            for field in lines.by_ref() {
                if let Some(kib) = field.strip_prefix("Rss:") {
                    let kib = kib.trim().trim_end_matches("kB").trim();
                    return kib.parse::<usize>().unwrap() * 1024;
                }
            }
        }
        panic!("no mapping at {addr:#x} in /proc/self/smaps");
    }

    #[test]
    fn prefault_allocates_every_page() {
        // A mapping of our own (fenced by inaccessible pages, so that the kernel cannot
        // merge it with a neighbour), whose resident size is ours alone to read.
        let len = 64 * PAGE;
        // SAFETY: a new private anonymous mapping, unmapped below.
        let fenced = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len + 2 * PAGE,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(fenced, libc::MAP_FAILED);
        // SAFETY: the middle of the mapping made above.
        let ptr = unsafe { fenced.cast::<u8>().add(PAGE) };
        // SAFETY: changes the protection of pages of that mapping only.
        let rc = unsafe { libc::mprotect(ptr.cast(), len, libc::PROT_READ | libc::PROT_WRITE) };
        assert_eq!(rc, 0);
        assert_eq!(resident(ptr as usize), 0);
        // SAFETY: the range is `len` bytes, writable, and stays mapped for the call.
        unsafe { prefault(ptr, len) };
        // Pages only read would map the shared zero page and not count as resident.
        assert_eq!(resident(ptr as usize), len);
        // SAFETY: unmaps the mapping made above, no longer used.
        unsafe { libc::munmap(fenced, len + 2 * PAGE) };
    }
}
