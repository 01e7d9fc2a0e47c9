//! Writing a file that lives in memory (tmpfs, ramfs) through a shared mapping of it, when
//! somebody waits for the write.
//!
//! There the page cache is the storage, and a `pwrite` is a copy into it that pays the
//! page cache's bookkeeping for every 4 KiB page it crosses. Copying into a shared mapping
//! whose pages are faulted in a piece at a time (`MADV_POPULATE_WRITE`) skips most of it:
//! 576 MiB took 141-162 ms with 8 MiB `pwrite`s on one core here, 73 ms mapped and
//! populated; a whole `.safetensors` save on two cores (checksums included) went from
//! 146-158 ms to 106-131 ms.
//!
//! Only when the write is waited for (hurried, or synchronous): populating holds the
//! process's memory-map lock while it works, and a background writer runs at the lowest
//! priority; preempted with the lock held, it would stall every `mmap` and `munmap` of the
//! training step until it got a core again. Without populating, a mapping faults page by
//! page, which was slower than `pwrite` (161-182 ms for that save), so a background write
//! keeps writing with `pwrite`, and once it is hurried the rest of it goes through the
//! mapping (the page cache keeps the two coherent).
//!
//! A mapping turns an I/O error into a signal: a store to a page that has no room behind
//! it (a full tmpfs) or that lies past the end of the file (truncated by someone else)
//! raises SIGBUS instead of returning an error. So a file is mapped only when every one
//! of its pages already exists (the writer fallocated the whole length first, which is
//! where a full tmpfs fails, with ENOSPC), and only for the writer's own temp files, which
//! nothing else has a name for.

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;

const PAGE: usize = 4096;
/// From linux/mman.h (Linux 5.14).
const MADV_POPULATE_WRITE: libc::c_int = 23;

/// A shared, writable mapping of `[0, len)` of a file whose pages all exist.
pub(crate) struct MappedFile {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; `write_all_at` writes through raw pointers
// into ranges that the callers (the writer's pieces) never share between threads.
unsafe impl Send for MappedFile {}
unsafe impl Sync for MappedFile {}

impl MappedFile {
    /// Maps `file` (open for reading and writing, as a shared mapping needs) for writing
    /// if it lives in memory, is at least `len` bytes long and has every page of them
    /// allocated; None otherwise (the caller writes with `pwrite`).
    pub fn open(file: &File, len: u64) -> Option<MappedFile> {
        if len == 0 || !super::commit::in_memory(file) {
            return None;
        }
        let meta = file.metadata().ok()?;
        use std::os::unix::fs::MetadataExt;
        // Every page allocated (no hole a store could need room for), and none past the end.
        if meta.len() < len || meta.blocks().saturating_mul(512) < len.next_multiple_of(4096) {
            return None;
        }
        let len = usize::try_from(len).ok()?;
        // SAFETY: a new shared mapping of an open descriptor; checked below, unmapped on drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return None;
        }
        Some(MappedFile {
            ptr: ptr.cast(),
            len,
        })
    }

    /// Copies `bytes` to `offset` of the file, faulting its pages in first.
    pub fn write_all_at(&self, bytes: &[u8], offset: u64) -> io::Result<()> {
        let end = self.range_end(offset, bytes.len())?;
        // Best effort: where the kernel has no MADV_POPULATE_WRITE (before 5.14) the copy
        // faults the pages itself.
        let _ = self.populate(offset, bytes.len());
        // SAFETY: `[end - len, end)` lies inside the mapping (checked above), which lives as
        // long as `self`; `bytes` cannot overlap it (a caller's buffer, not this mapping).
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.ptr.add(end - bytes.len()),
                bytes.len(),
            );
        }
        Ok(())
    }

    /// Faults in the pages of `[offset, offset + len)` for writing (allocating and zeroing
    /// those that have no content yet), without changing a byte.
    fn populate(&self, offset: u64, len: usize) -> io::Result<()> {
        let end = self.range_end(offset, len)?;
        let start = (end - len) & !(PAGE - 1);
        // SAFETY: a range of this mapping, which lives as long as `self`.
        let rc =
            unsafe { libc::madvise(self.ptr.add(start).cast(), end - start, MADV_POPULATE_WRITE) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The end of `[offset, offset + len)`, checked to lie inside the mapping.
    fn range_end(&self, offset: u64, len: usize) -> io::Result<usize> {
        usize::try_from(offset)
            .ok()
            .and_then(|at| at.checked_add(len))
            .filter(|&end| end <= self.len)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{len} bytes at {offset} lie past the mapped {}", self.len),
                )
            })
    }
}

impl Drop for MappedFile {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `open`, no longer referenced.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    /// A folder on tmpfs, where files are memory.
    fn memory_folder() -> tempfile::TempDir {
        tempfile::Builder::new()
            .prefix("fastckpt-mapped-")
            .tempdir_in("/dev/shm")
            .expect("a folder on /dev/shm")
    }

    fn allocated(file: &File, len: u64) {
        // SAFETY: plain syscall on an open descriptor.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len as libc::off_t) };
        assert_eq!(rc, 0, "{}", io::Error::last_os_error());
    }

    #[test]
    fn writes_land_in_the_file() {
        let dir = memory_folder();
        let path = dir.path().join("f");
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        let len = 3 * 4096 + 100;
        allocated(&file, len);
        let map = MappedFile::open(&file, len).expect("a tmpfs file with every page allocated");
        map.write_all_at(b"hello", 4094).unwrap();
        map.write_all_at(&[7u8; 100], len - 100).unwrap();
        assert!(map.write_all_at(b"x", len).is_err(), "past the end");
        drop(map);
        let mut back = vec![0u8; len as usize];
        file.read_exact_at(&mut back, 0).unwrap();
        assert_eq!(&back[4094..4099], b"hello");
        assert_eq!(&back[len as usize - 100..], &[7u8; 100][..]);
        assert!(back[..4094].iter().all(|&b| b == 0));
    }

    #[test]
    fn only_files_in_memory_with_every_page_allocated_are_mapped() {
        let dir = memory_folder();
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(dir.path().join("holes"))
            .unwrap();
        file.set_len(1 << 20).unwrap(); // a hole: a store there could find no room
        assert!(MappedFile::open(&file, 1 << 20).is_none());
        allocated(&file, 1 << 20);
        assert!(MappedFile::open(&file, 1 << 20).is_some());
        assert!(MappedFile::open(&file, 2 << 20).is_none(), "past the end");

        let on_disk = tempfile::tempfile().unwrap(); // tmp_dir: a disk here, or not
        allocated(&on_disk, 1 << 20);
        if !crate::io::commit::in_memory(&on_disk) {
            assert!(MappedFile::open(&on_disk, 1 << 20).is_none());
        }
    }
}
