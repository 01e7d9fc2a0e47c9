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
//!
//! Making a mapping (populating it, unmapping it) costs more than the copy into it
//! (README, "Training while a checkpoint is written"). So a file written again and again
//! (a callback's checkpoint, which a later save writes into once it has been replaced:
//! `keep_replaced`) keeps its mapping between writes ([`keep`], [`take`]), from the
//! reservation that touched its pages, the write that populated them all, or [`map_kept`]
//! (a checkpoint there before training, once the first save has replaced and kept it).
//! A kept mapping is written through in the background too: a copy that faults nothing
//! takes no lock of the process's memory map, and costs a third of a `pwrite`'s CPU. A
//! kept mapping holds its file's memory even once the file is removed, so the kept
//! mappings of removed files are let go at the next [`take`] or [`keep`], others by
//! [`release_mappings`] (a callback, when training ends or a save's error ends it), and
//! only the newest few are kept. They are not inherited by a forked child
//! (`MADV_DONTFORK`).
//!
//! A kept mapping's memory can be lent out ([`lend`]): a snapshot then copies each payload
//! straight to its place in the file, and the next write of that file copies nothing of
//! what it finds in place ([`MappedFile::write_all_at`]). The mapping is shared between
//! the writer, the kept list and the regions lent out, and unmapped once the last of them
//! lets go, so the write finds the mapping the snapshot used even once it is no longer
//! kept. A payload that lies in the mapping at another place than its own is refused
//! ([`MappedFile::check_sources`]): another payload's copy could overwrite it first.

use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::{Arc, Mutex, Weak};

use super::parallel::{plan_pieces, run_pieces_with, Width};

const PAGE: usize = 4096;
/// From linux/mman.h (Linux 5.14).
const MADV_POPULATE_WRITE: libc::c_int = 23;

/// A shared, writable mapping of a file, unmapped once its last holder lets go: the
/// write using it, the list of kept mappings, and a region of it lent out ([`lend`]).
pub(crate) struct Mapping {
    ptr: *mut u8,
    /// Bytes mapped, from the file's start.
    span: usize,
}

// SAFETY: the mapping is plain shared memory; who stores into which range is the holders'
// business (a write's pieces never share a range; a lent region is stored to only by the
// snapshot, before the write that uses it begins).
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `MappedFile::open`, which nobody
        // holds any more.
        unsafe { libc::munmap(self.ptr.cast(), self.span) };
    }
}

/// A shared, writable mapping of a file whose pages all exist in `[0, len)`.
pub(crate) struct MappedFile {
    /// The mapping: `len` bytes and room beyond them, so that a kept mapping still covers
    /// its file when a later write makes the file a little longer (a reserved file holds
    /// the payloads' bytes, the file written into it the metadata too). Past the file's
    /// end a store raises SIGBUS: only `[0, len)` is ever stored to.
    map: Arc<Mapping>,
    /// Bytes that may be stored to: the file holds allocated pages for all of them.
    len: usize,
    /// `[0, populated)` is faulted in already (a kept mapping): a write there only copies.
    populated: usize,
}

/// Whether `file` has allocated pages for all of `[0, len)`: no hole a store could need
/// room for, and nothing past the end.
fn allocated(file: &File, len: u64) -> bool {
    file.metadata().is_ok_and(|meta| {
        meta.len() >= len && meta.blocks().saturating_mul(512) >= len.next_multiple_of(4096)
    })
}

impl MappedFile {
    /// Maps `file` (open for reading and writing, as a shared mapping needs) for writing
    /// if it lives in memory, is at least `len` bytes long and has every page of them
    /// allocated; None otherwise (the caller writes with `pwrite`).
    pub fn open(file: &File, len: u64) -> Option<MappedFile> {
        if len == 0 || !super::commit::in_memory(file) || !allocated(file, len) {
            return None;
        }
        let len = usize::try_from(len).ok()?;
        let span = len
            .checked_add((len / 8).max(1 << 20))?
            .next_multiple_of(PAGE);
        // SAFETY: a new shared mapping of an open descriptor; checked below, unmapped on drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                span,
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
            map: Arc::new(Mapping {
                ptr: ptr.cast(),
                span,
            }),
            len,
            populated: 0,
        })
    }

    /// Maps `file` as [`MappedFile::open`] does and faults every page in by touching it
    /// (changing nothing), a piece at a time on `width`'s threads: a fault takes only the
    /// lock of this mapping, never the process's memory map, so this may run while
    /// training does. None where `open` gives none.
    pub fn touched(file: &File, len: u64, width: &Width) -> Option<io::Result<MappedFile>> {
        let mut map = MappedFile::open(file, len)?;
        let pieces = plan_pieces(&[(0, map.len)], false);
        let shared = &map;
        let touched = run_pieces_with(&pieces, width, |piece| {
            super::fault::delay();
            let end = shared.range_end(piece.offset, piece.span as usize)?;
            // SAFETY: `[end - span, end)` lies inside `[0, len)` (checked), stored to only
            // while the mapping lives.
            unsafe {
                crate::host::prefault(
                    shared.ptr().add(end - piece.span as usize),
                    piece.span as usize,
                )
            };
            Ok(())
        });
        map.populated = map.len;
        Some(touched.map(|()| map))
    }

    /// Whether `[offset, offset + len)` may be stored to.
    pub fn covers(&self, offset: u64, len: usize) -> bool {
        self.range_end(offset, len).is_ok()
    }

    /// Copies `bytes` to `offset` of the file, unless they are there already (a snapshot
    /// taken into a lent region of this mapping, [`lend`]). With `populate`, the pages not
    /// yet faulted in are populated first (holding the process's memory-map lock: only for
    /// a write somebody waits for); without, the copy faults them in itself.
    pub fn write_all_at(&self, bytes: &[u8], offset: u64, populate: bool) -> io::Result<()> {
        let end = self.range_end(offset, bytes.len())?;
        // SAFETY: `end - len` lies inside the mapping (checked above).
        let dest = unsafe { self.ptr().add(end - bytes.len()) };
        if std::ptr::eq(dest.cast_const(), bytes.as_ptr()) {
            return Ok(());
        }
        // Best effort: where the kernel has no MADV_POPULATE_WRITE (before 5.14) the copy
        // faults the pages itself.
        if populate && end > self.populated {
            let from = (end - bytes.len()).max(self.populated);
            let _ = self.populate(from as u64, end - from);
        }
        // SAFETY: `[end - len, end)` lies inside `[0, len)` (checked above), stored to only
        // while the mapping lives; `bytes` cannot overlap it: a caller's buffer, or a range
        // of this mapping that `check_sources` found at exactly this place (returned above).
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), dest, bytes.len()) };
        Ok(())
    }

    fn ptr(&self) -> *mut u8 {
        self.map.ptr
    }

    /// Checks that no payload about to be written into this file is read from this
    /// mapping anywhere but at its own place in the file (a snapshot into a lent region
    /// puts each there): one read from elsewhere could be overwritten by another's write
    /// before it is read.
    pub fn check_sources<'a>(
        &self,
        payloads: impl IntoIterator<Item = (&'a str, Option<&'a [u8]>, u64)>,
    ) -> std::result::Result<(), String> {
        let (start, end) = (self.ptr() as usize, self.ptr() as usize + self.map.span);
        for (name, bytes, offset) in payloads {
            let Some(bytes) = bytes else { continue };
            let at = bytes.as_ptr() as usize;
            let inside = at < end && at + bytes.len() > start;
            if inside && at.checked_sub(start) != usize::try_from(offset).ok() {
                return Err(format!(
                    "{name}: its bytes lie in the file being written, at {} instead of {offset}",
                    at.wrapping_sub(start)
                ));
            }
        }
        Ok(())
    }

    /// Faults in the pages of `[offset, offset + len)` for writing (allocating and zeroing
    /// those that have no content yet), without changing a byte.
    fn populate(&self, offset: u64, len: usize) -> io::Result<()> {
        let end = self.range_end(offset, len)?;
        let start = (end - len) & !(PAGE - 1);
        // SAFETY: a range of this mapping, which lives as long as `self`.
        let rc = unsafe {
            libc::madvise(
                self.ptr().add(start).cast(),
                end - start,
                MADV_POPULATE_WRITE,
            )
        };
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

/// A mapping kept between writes of its file (see the module's notes).
struct Kept {
    /// The process that made it: a forked child has the entry but not the mapping.
    pid: u32,
    /// The file (its device and inode), open: its link count says when it is removed.
    id: (u64, u64),
    file: File,
    map: MappedFile,
}

static KEPT: Mutex<Vec<Kept>> = Mutex::new(Vec::new());

fn identity(file: &File) -> Option<(u64, u64)> {
    file.metadata().ok().map(|m| (m.dev(), m.ino()))
}

/// Lets go of kept mappings of files that no longer have a name, and forgets (without
/// unmapping: they are not mapped here) those a parent process made.
fn sweep(kept: &mut Vec<Kept>) {
    let pid = std::process::id();
    let mut i = 0;
    while i < kept.len() {
        if kept[i].pid != pid {
            std::mem::forget(kept.swap_remove(i));
        } else if kept[i].file.metadata().map_or(true, |m| m.nlink() == 0) {
            drop(kept.swap_remove(i));
        } else {
            i += 1;
        }
    }
}

/// Keeps `map`, a mapping of `file` with every page it may store to faulted in (a write
/// through it of every payload, or [`MappedFile::touched`]), for the next write of the
/// same file ([`take`]).
pub(crate) fn keep(file: &File, mut map: MappedFile) {
    let (Some(id), Ok(meta), Ok(file)) = (identity(file), file.metadata(), file.try_clone()) else {
        return;
    };
    // What may be stored to: no more than the file now holds (a reused file is cut to the
    // length of its new content).
    map.len = map
        .len
        .min(usize::try_from(meta.len()).unwrap_or(usize::MAX));
    if map.len == 0 || !allocated(&file, map.len as u64) {
        return;
    }
    map.populated = map.len;
    // SAFETY: advice on exactly this mapping. Best effort: a child that inherits it holds
    // the file's memory until it exits or execs, nothing worse.
    unsafe { libc::madvise(map.ptr().cast(), map.map.span, libc::MADV_DONTFORK) };
    let mut kept = KEPT.lock().unwrap_or_else(|e| e.into_inner());
    sweep(&mut kept);
    kept.retain(|k| k.id != id); // (an older mapping of the same file: let go)
    kept.push(Kept {
        pid: std::process::id(),
        id,
        file,
        map,
    });
    // A file written once under a new name (`{epoch}` names) is never written again: of
    // the mappings kept, only the newest few can serve (a callback's checkpoint and its
    // spare, a few callbacks at once).
    let extra = kept.len().saturating_sub(MOST_KEPT);
    kept.drain(..extra);
}

/// How many mappings are kept at most (the oldest let go first).
const MOST_KEPT: usize = 8;

/// The kept mapping of `file`, if there is one, able to store to as much of the file as it
/// spans and the file holds pages for (call once the file is sized for the write). A
/// mapping lent out ([`lend`]) serves even once it is no longer kept: the snapshot has put
/// the payloads in it.
pub(crate) fn take(file: &File) -> Option<MappedFile> {
    let id = identity(file)?;
    let mut kept = KEPT.lock().unwrap_or_else(|e| e.into_inner());
    sweep(&mut kept);
    let mut map = match kept.iter().position(|k| k.id == id) {
        Some(at) => kept.swap_remove(at).map,
        // (Every page of a lent mapping was faulted in: it was kept when lent.)
        None => MappedFile {
            map: lent(id)?,
            len: 0,
            populated: usize::MAX,
        },
    };
    drop(kept);
    let held = usize::try_from(file.metadata().ok()?.len()).ok()?;
    map.len = held.min(map.map.span);
    map.populated = map.populated.min(map.len);
    // Cut or punched since (by someone else: our own files keep their pages): let it go.
    allocated(file, map.len as u64).then_some(map)
}

/// The memory of a kept mapping, lent out so that a snapshot copies each payload straight
/// to its place in the file that the next write into it ([`take`]) fills: that write then
/// copies nothing. Only the bytes the file held pages for when it was lent are in it.
pub struct LentRegion {
    map: Arc<Mapping>,
    len: usize,
}

impl LentRegion {
    /// The first byte of the file in memory.
    pub fn as_mut_ptr(&self) -> *mut u8 {
        self.map.ptr
    }

    /// Bytes that may be stored to, from the file's start.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing may be stored to.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Regions lent out, by file, while anybody holds them (and the process that lent them: a
/// forked child has the entries, not the mappings).
type Lent = (u32, (u64, u64), Weak<Mapping>);
static LENT: Mutex<Vec<Lent>> = Mutex::new(Vec::new());

/// Lends the memory of the kept mapping of `path` (a file in memory, written through it and
/// kept for its next write, every page faulted in), at least `len` bytes of it: a file a
/// little shorter (a reserved file holds the payloads' bytes, not the metadata's) is
/// lengthened, where the mapping spans that far. None where there is no such mapping. The
/// mapping stays mapped while the region lives, kept or not.
///
/// Whoever stores into the region must hand its stores to the next write of that file and
/// to nothing else: a region is not locked against other holders.
pub fn lend(path: &Path, len: u64) -> Option<LentRegion> {
    let file = File::options().read(true).write(true).open(path).ok()?;
    let id = identity(&file)?;
    let len = usize::try_from(len).ok()?;
    let region = {
        let mut kept = KEPT.lock().unwrap_or_else(|e| e.into_inner());
        sweep(&mut kept);
        let k = kept.iter_mut().find(|k| k.id == id)?;
        let map = &mut k.map;
        if len > map.len {
            // New pages past the end: allocated (so a store finds room), and zeros.
            if len > map.map.span {
                return None;
            }
            let more = (len - map.len) as libc::off_t;
            // SAFETY: plain syscall on an open descriptor.
            let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, map.len as libc::off_t, more) };
            if rc != 0 {
                return None;
            }
            map.len = len;
        }
        LentRegion {
            map: Arc::clone(&map.map),
            len: map.len,
        }
    };
    let pid = std::process::id();
    let mut lent = LENT.lock().unwrap_or_else(|e| e.into_inner());
    lent.retain(|(by, _, map)| *by == pid && map.strong_count() > 0);
    lent.push((pid, id, Arc::downgrade(&region.map)));
    Some(region)
}

/// The mapping of the file `id` that a region lent out still holds.
fn lent(id: (u64, u64)) -> Option<Arc<Mapping>> {
    let pid = std::process::id();
    let lent = LENT.lock().unwrap_or_else(|e| e.into_inner());
    lent.iter()
        .filter(|(by, of, _)| *by == pid && *of == id)
        .find_map(|(_, _, map)| map.upgrade())
}

/// Whether a region of a mapping of `file` is lent out: its next write goes through that
/// mapping (not with direct I/O), where the snapshot put the payloads.
pub(crate) fn is_lent(file: &File) -> bool {
    identity(file).is_some_and(|id| lent(id).is_some())
}

/// Whether `path` is a file in memory whose mapping is not kept: a file a write keeps
/// for the next one (`keep_replaced`) that was never written through a kept mapping (a
/// checkpoint there before training began), which [`map_kept`] maps.
pub fn needs_mapping(path: &Path) -> bool {
    let Ok(file) = File::open(path) else {
        return false;
    };
    let Some(id) = identity(&file) else {
        return false;
    };
    if !super::commit::in_memory(&file) {
        return false;
    }
    let mut kept = KEPT.lock().unwrap_or_else(|e| e.into_inner());
    sweep(&mut kept);
    !kept.iter().any(|k| k.id == id)
}

/// Maps `path`, a file in memory that the next write will fill with about `len` bytes,
/// first allocating room for them (an older checkpoint may be shorter: one written
/// before the optimizer was built), touches its pages (changing nothing) on `width`'s
/// threads and keeps the mapping for that write; does nothing where the file cannot be
/// mapped.
pub fn map_kept(path: &Path, len: u64, width: &Width) -> io::Result<()> {
    let file = File::options().read(true).write(true).open(path)?;
    let len = len.max(file.metadata()?.len());
    super::commit::reserve(&file, len, width)?;
    if let Some(touched) = MappedFile::touched(&file, len, width) {
        keep(&file, touched?);
    }
    Ok(())
}

/// Lets go of the kept mappings of the files `ids` names (device and inode numbers; every
/// kept mapping of this process when None), and of removed files; returns how many.
pub fn release_mappings(ids: Option<&[(u64, u64)]>) -> usize {
    let mut kept = KEPT.lock().unwrap_or_else(|e| e.into_inner());
    let before = kept.len();
    sweep(&mut kept);
    kept.retain(|k| ids.is_some_and(|ids| !ids.contains(&k.id)));
    before - kept.len()
}

/// How many mappings this process keeps (for tests).
pub fn kept_mappings() -> usize {
    let mut kept = KEPT.lock().unwrap_or_else(|e| e.into_inner());
    sweep(&mut kept);
    kept.len()
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
        map.write_all_at(b"hello", 4094, true).unwrap();
        map.write_all_at(&[7u8; 100], len - 100, false).unwrap();
        assert!(map.write_all_at(b"x", len, true).is_err(), "past the end");
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

    fn in_memory_file(dir: &tempfile::TempDir, name: &str, len: u64) -> File {
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(dir.path().join(name))
            .unwrap();
        allocated(&file, len);
        file
    }

    fn is_kept(file: &File) -> bool {
        let id = identity(file).unwrap();
        let mut kept = KEPT.lock().unwrap();
        sweep(&mut kept);
        kept.iter().any(|k| k.id == id)
    }

    #[test]
    fn a_kept_mapping_is_taken_once_by_the_next_write_of_its_file() {
        let dir = memory_folder();
        let len = 64 * 4096;
        let file = in_memory_file(&dir, "kept", len);
        let map = MappedFile::touched(&file, len, &Width::fixed(2))
            .expect("a tmpfs file with every page allocated")
            .unwrap();
        assert_eq!(map.populated, len as usize, "every page touched");
        keep(&file, map);
        assert!(is_kept(&file));
        let map = take(&file).expect("the kept mapping");
        assert!(!is_kept(&file), "taken, not shared");
        assert!(take(&file).is_none());
        map.write_all_at(&[9u8; 10], 4090, false).unwrap();
        drop(map);
        let mut back = [0u8; 10];
        file.read_exact_at(&mut back, 4090).unwrap();
        assert_eq!(back, [9u8; 10]);
        // The touch changed nothing: the rest still reads as zeros.
        let mut rest = vec![1u8; len as usize];
        file.read_exact_at(&mut rest, 0).unwrap();
        assert!(rest[..4090].iter().chain(&rest[4100..]).all(|&b| b == 0));
    }

    #[test]
    fn a_kept_mapping_stores_only_to_what_its_file_holds() {
        let dir = memory_folder();
        let len = 16 * 4096;
        let file = in_memory_file(&dir, "cut", len);
        keep(&file, MappedFile::open(&file, len).unwrap());
        // Cut by someone else: a store past the new end would raise SIGBUS.
        file.set_len(4 * 4096).unwrap();
        let map = take(&file).expect("still a mapping of the file");
        assert!(map.covers(0, 4 * 4096));
        assert!(!map.covers(4 * 4096, 1), "past the file's end");
        drop(map);
        // Longer again (a later write sized the file): the room mapped beyond serves.
        allocated(&file, len + 4096);
        keep(&file, MappedFile::open(&file, len).unwrap());
        let map = take(&file).unwrap();
        assert!(
            map.covers(0, len as usize + 4096),
            "the span covers the longer file"
        );
    }

    #[test]
    fn the_kept_mapping_of_a_removed_file_is_let_go() {
        let dir = memory_folder();
        let file = in_memory_file(&dir, "gone", 4 * 4096);
        keep(&file, MappedFile::open(&file, 4 * 4096).unwrap());
        let id = identity(&file).unwrap();
        std::fs::remove_file(dir.path().join("gone")).unwrap();
        let _ = kept_mappings(); // sweeps
        assert!(!KEPT.lock().unwrap().iter().any(|k| k.id == id));
    }

    #[test]
    fn release_lets_go_of_the_files_named() {
        let dir = memory_folder();
        let a = in_memory_file(&dir, "a", 4096);
        let b = in_memory_file(&dir, "b", 4096);
        keep(&a, MappedFile::open(&a, 4096).unwrap());
        keep(&b, MappedFile::open(&b, 4096).unwrap());
        assert!(release_mappings(Some(&[identity(&a).unwrap()])) >= 1);
        assert!(!is_kept(&a));
        assert!(is_kept(&b), "a file not named keeps its mapping");
        release_mappings(Some(&[identity(&b).unwrap()]));
        assert!(!is_kept(&b));
    }

    #[test]
    fn a_lent_region_is_the_mapping_the_next_write_takes() {
        let dir = memory_folder();
        let len = 8 * 4096;
        let file = in_memory_file(&dir, "lent", len);
        keep(&file, MappedFile::open(&file, len).unwrap());
        let first = lend(&dir.path().join("lent"), 0).expect("a kept mapping to lend");
        assert_eq!(first.len(), len as usize);
        drop(first);
        // Longer, for a file a little longer than the one kept: room allocated.
        let region = lend(&dir.path().join("lent"), len + 100).expect("room in the span");
        assert_eq!(region.len(), len as usize + 100);
        assert!(file.metadata().unwrap().len() >= len + 100);
        assert!(
            lend(&dir.path().join("lent"), 1 << 30).is_none(),
            "past the span"
        );
        // A snapshot's store, straight to its place in the file.
        // SAFETY: inside the region, which lives until the end of the test.
        let stored = unsafe {
            std::ptr::write_bytes(region.as_mut_ptr().add(4096), 5, 4096);
            std::slice::from_raw_parts(region.as_mut_ptr().add(4096), 4096)
        };
        // No longer kept (released, or pushed out by newer ones), the mapping still serves
        // the next write of the file: the payload is in it.
        release_mappings(Some(&[identity(&file).unwrap()]));
        let map = take(&file).expect("the lent mapping");
        assert_eq!(map.ptr(), region.as_mut_ptr());
        assert!(map.check_sources([("w", Some(stored), 4096)]).is_ok());
        let misplaced = map.check_sources([("w", Some(stored), 8192)]).unwrap_err();
        assert!(
            misplaced.starts_with("w: ") && misplaced.contains("4096"),
            "{misplaced}"
        );
        let elsewhere = [1u8; 16];
        assert!(map.check_sources([("x", Some(&elsewhere[..]), 0)]).is_ok());
        map.write_all_at(stored, 4096, false).unwrap(); // in place: nothing to copy
        map.write_all_at(&[7u8; 8], 0, false).unwrap();
        drop(map);
        let mut back = vec![0u8; 2 * 4096];
        file.read_exact_at(&mut back, 0).unwrap();
        assert_eq!(&back[..8], &[7u8; 8]);
        assert!(back[4096..].iter().all(|&b| b == 5));
        drop(region);
        assert!(take(&file).is_none(), "let go with the region");
    }

    #[test]
    fn only_the_newest_mappings_are_kept() {
        let dir = memory_folder();
        let files: Vec<File> = (0..MOST_KEPT + 2)
            .map(|k| in_memory_file(&dir, &format!("f{k}"), 4096))
            .collect();
        for file in &files {
            keep(file, MappedFile::open(file, 4096).unwrap());
        }
        assert!(
            !is_kept(&files[0]) && !is_kept(&files[1]),
            "the oldest let go"
        );
        assert!(files.iter().filter(|f| is_kept(f)).count() <= MOST_KEPT);
        let ids: Vec<(u64, u64)> = files.iter().filter_map(identity).collect();
        release_mappings(Some(&ids));
    }
}
