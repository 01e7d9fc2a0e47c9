//! One durable file: plan checks, temp file, parallel payloads, metadata, fdatasync, rename,
//! folder fsync. A failure at any step removes the temp file and leaves the target as it was.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use super::direct::DirectFile;
use super::fault::{self, Stage};
use super::mapped::{self, MappedFile};
use super::parallel::{plan_pieces, run_pieces_with, Digests, Width};
use super::temp::{sweep_stale_temps, temp_path_for};
use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::tensor::Tensor;

#[derive(Clone, Debug)]
pub struct WriteOptions {
    /// Writer threads for the payloads (at least 1), and how many once the write is
    /// hurried (see [`Effort`]).
    pub width: Width,
    /// Write the page-aligned middle of large payloads with `O_DIRECT` where the
    /// filesystem supports it (see `direct.rs`). Default: on.
    pub direct_io: bool,
    /// A file to write the new checkpoint into instead of a new temp file: the one an
    /// earlier write to this target kept (see `keep_replaced`). Memory or blocks that a
    /// file already holds cost nothing to allocate again, and allocating them is most of
    /// what a write to tmpfs costs. Used only if it is one of this process's temp files
    /// beside the target with no other link; otherwise a new temp file is made.
    pub reuse: Option<PathBuf>,
    /// Keep the file this write replaces, under a new temp name, for the next write to
    /// the target to reuse (reported in [`Written::kept`]).
    pub keep_replaced: bool,
    /// Keep the file this write replaces as `<target><suffix>` (a second name of it, made
    /// just before the rename, replacing an older one): the previous version, for readers
    /// that fall back to it (Keras's `BackupAndRestore(double_checkpoint=True)` `.bkp`).
    pub previous_suffix: Option<String>,
    /// Counts the payload bytes written so far, for a progress report.
    pub progress: Progress,
}

/// A count of bytes done that another thread may read while a write or a read runs.
/// Clones share one count.
#[derive(Clone, Debug, Default)]
pub struct Progress(Arc<AtomicU64>);

impl Progress {
    pub fn add(&self, bytes: u64) {
        self.0.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// What [`write_file_keeping`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Written {
    /// The new file's length.
    pub len: u64,
    /// The file the write replaced, kept under a temp name (see `keep_replaced`).
    pub kept: Option<PathBuf>,
}

impl WriteOptions {
    /// The defaults, with exactly `threads` writer threads.
    pub fn with_threads(threads: usize) -> Self {
        WriteOptions {
            width: Width::fixed(threads),
            ..Self::default()
        }
    }
}

impl Default for WriteOptions {
    fn default() -> Self {
        WriteOptions {
            width: Width::fixed(super::default_threads()),
            direct_io: true,
            reuse: None,
            keep_replaced: false,
            previous_suffix: None,
            progress: Progress::default(),
        }
    }
}

/// Writes `layout` with `tensors` to `target` durably and atomically; returns the file size.
pub fn write_file(
    target: &Path,
    layout: &dyn Layout,
    tensors: &[Tensor],
    opts: &WriteOptions,
) -> Result<u64> {
    write_file_keeping(target, layout, tensors, opts).map(|w| w.len)
}

/// [`write_file`], reusing and keeping files as `opts` says.
pub fn write_file_keeping(
    target: &Path,
    layout: &dyn Layout,
    tensors: &[Tensor],
    opts: &WriteOptions,
) -> Result<Written> {
    check_layout(layout, tensors)?;
    write_via(target, opts, |temp, reused| {
        write_temp(temp, target, layout, tensors, opts, reused)
    })
}

/// A file whose layout is known only as it is written (a compressed container: where each
/// payload goes depends on how small the ones before it compressed).
pub trait Body: Send + Sync {
    /// At least the file's final length: reserved before anything is written, so that a
    /// full disk fails early; the file is cut to its real length at the end.
    fn max_len(&self) -> u64;
    /// Writes the whole file into `file` with positioned writes; returns its length.
    /// Errors name `target`.
    fn write(&self, file: &File, target: &Path, opts: &WriteOptions) -> Result<u64>;
}

/// Writes `body` to `target` durably and atomically, as [`write_file_keeping`] writes a
/// planned file.
pub fn write_body(target: &Path, body: &dyn Body, opts: &WriteOptions) -> Result<Written> {
    write_via(target, opts, |temp, reused| {
        let file = open_temp(temp, target, reused)?;
        reserve(&file, body.max_len(), &opts.width)
            .map_err(|e| Error::io("reserve space for", target, e))?;
        let len = body.write(&file, target, opts)?;
        file.set_len(len)
            .map_err(|e| Error::io("truncate the temp file of", target, e))?;
        fault::check(Stage::Fsync)
            .and_then(|_| file.sync_data())
            .map_err(|e| Error::io("fdatasync the temp file of", target, e))?;
        Ok(len)
    })
}

/// The steps around writing a temp file: the folder checked and swept, the temp file chosen
/// (a kept one when `opts.reuse` allows), `fill` writing it, the commit; on failure the
/// temp file is removed.
fn write_via(
    target: &Path,
    opts: &WriteOptions,
    fill: impl FnOnce(&Path, bool) -> Result<u64>,
) -> Result<Written> {
    let dir = folder_of(target)?;
    sweep_stale_temps(&dir);
    let reused = opts.reuse.as_deref().filter(|p| reusable(p, &dir));
    let temp = reused.map_or_else(|| temp_path_for(target), Path::to_path_buf);
    let result = fill(&temp, reused.is_some()).and_then(|len| {
        let kept = commit(
            &temp,
            target,
            &dir,
            opts.keep_replaced,
            opts.previous_suffix.as_deref(),
        )?;
        Ok(Written { len, kept })
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result
}

/// The folder `target` is written into, checked: `target` is no folder, and the folder is
/// one.
pub(crate) fn folder_of(target: &Path) -> Result<PathBuf> {
    let dir = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if target.is_dir() {
        return Err(Error::io(
            "cannot write checkpoint over folder",
            target,
            io::Error::from_raw_os_error(libc::EISDIR),
        ));
    }
    if !dir.is_dir() {
        let source = if dir.exists() {
            libc::ENOTDIR
        } else {
            libc::ENOENT
        };
        return Err(Error::io(
            "no folder to write into",
            &dir,
            io::Error::from_raw_os_error(source),
        ));
    }
    Ok(dir)
}

/// Whether `path` may be written over: one of this process's temp files in `dir`, with no
/// other name (so no checkpoint can be changed through it).
pub(crate) fn reusable(path: &Path, dir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let ours = path.parent() == Some(dir)
        && path
            .file_name()
            .and_then(super::temp::writer)
            .is_some_and(|w| w.is_us());
    ours && std::fs::symlink_metadata(path).is_ok_and(|m| m.is_file() && m.nlink() == 1)
}

pub(crate) fn check_layout(layout: &dyn Layout, tensors: &[Tensor]) -> Result<()> {
    let len = layout.file_len();
    for slot in layout.slots() {
        let t = tensors.get(slot.tensor).ok_or_else(|| {
            Error::invalid(format!(
                "layout names tensor {} of {}",
                slot.tensor,
                tensors.len()
            ))
        })?;
        if slot
            .offset
            .checked_add(t.nbytes())
            .is_none_or(|end| end > len)
        {
            return Err(Error::invalid(format!(
                "{}: payload at {} + {} lies past the planned end {len}",
                t.name,
                slot.offset,
                t.nbytes()
            )));
        }
    }
    Ok(())
}

/// Errors name `target`, the file the caller asked for: the temp file is an implementation
/// detail and is gone by the time the error is seen.
pub(crate) fn write_temp(
    temp: &Path,
    target: &Path,
    layout: &dyn Layout,
    tensors: &[Tensor],
    opts: &WriteOptions,
    reused: bool,
) -> Result<u64> {
    let file = open_temp(temp, target, reused)?;
    let len = layout.file_len();
    reserve(&file, len, &opts.width).map_err(|e| Error::io("reserve space for", target, e))?;

    let slots = layout.slots();
    let items: Vec<(u64, usize)> = slots
        .iter()
        .map(|s| (s.offset, tensors[s.tensor].nbytes() as usize))
        .collect();
    let pieces = plan_pieces(&items, true);
    let digests = Digests::new(layout.digest(), slots.len());
    // A file a snapshot was taken into (a lent region of its mapping) is written through
    // that mapping, where the payloads are already.
    let lent = reused && mapped::is_lent(&file);
    let direct = if opts.direct_io && !lent {
        DirectFile::open(temp)
    } else {
        None
    };
    // A file in memory is written through a mapping of it: the one kept from its last
    // write or its reservation, populated, from the start; otherwise one made once the
    // write is waited for (see `mapped.rs`), the space allocated by now (a full tmpfs has
    // already failed above).
    let kept = direct.is_none().then(|| mapped::take(&file)).flatten();
    if lent {
        let map = kept.as_ref().ok_or_else(|| {
            Error::invalid(format!(
                "{}: the kept file a snapshot was taken into can no longer be mapped",
                target.display()
            ))
        })?;
        let payloads = slots.iter().map(|s| {
            let t = &tensors[s.tensor];
            (t.name.as_str(), t.in_memory(), s.offset)
        });
        map.check_sources(payloads)
            .map_err(|e| Error::invalid(format!("{}: {e}", target.display())))?;
    }
    let mapping: OnceLock<Option<MappedFile>> = OnceLock::new();
    let whole = kept.is_some();
    if let Some(map) = kept {
        let _ = mapping.set(Some(map));
    }
    let unmapped = AtomicBool::new(false); // a payload written with `pwrite`
    let hurried = || opts.width.effort.is_hurried();
    let mapped = || {
        let waited = direct.is_none() && hurried();
        let mapping = if whole {
            mapping.get()
        } else {
            waited.then(|| mapping.get_or_init(|| MappedFile::open(&file, len)))
        };
        mapping.and_then(Option::as_ref)
    };
    // Writes `bytes` at `offset` through the mapping where it covers them.
    let put = |map: Option<&MappedFile>, bytes: &[u8], offset: u64| match map {
        Some(m) if m.covers(offset, bytes.len()) => m.write_all_at(bytes, offset, hurried()),
        _ => {
            unmapped.store(true, Ordering::Relaxed);
            file.write_all_at(bytes, offset)
        }
    };
    run_pieces_with(&pieces, &opts.width, |piece| {
        fault::delay();
        fault::check(Stage::Write)?;
        // Payloads that are not in memory (a conversion's source) are read into here.
        let mut scratch = Vec::new();
        if let [e] = piece.extents.as_slice() {
            let bytes = tensors[slots[e.item].tensor].piece(e.start, e.len, &mut scratch)?;
            match &direct {
                Some(d) => d.write_all_at(&file, bytes, e.offset)?,
                None => put(mapped(), bytes, e.offset)?,
            }
            digests.record(e.item, e.start, bytes);
            opts.progress.add(e.len as u64);
            return Ok(());
        }
        // A batch of small payloads: gather them (gaps stay zero) and write once.
        let mut buf = vec![0u8; piece.span as usize];
        for e in &piece.extents {
            let at = (e.offset - piece.offset) as usize;
            let bytes = tensors[slots[e.item].tensor].piece(e.start, e.len, &mut scratch)?;
            buf[at..at + e.len].copy_from_slice(bytes);
            digests.record(e.item, e.start, bytes);
        }
        put(mapped(), &buf, piece.offset)?;
        opts.progress
            .add(piece.extents.iter().map(|e| e.len as u64).sum());
        Ok(())
    })
    .map_err(|e| Error::io("write", target, e))?;
    // A file written again and again keeps the mapping of this write for the next one, if
    // every payload went through it (so its pages are faulted in).
    let keeping = opts.keep_replaced && !unmapped.load(Ordering::Relaxed);
    let mapping = mapping.into_inner().flatten().filter(|_| keeping);

    let regions = layout.regions(&digests.finish())?;
    for region in &regions {
        if region.offset + region.bytes.len() as u64 > len {
            return Err(Error::invalid(format!(
                "metadata at {} + {} lies past the planned end {len}",
                region.offset,
                region.bytes.len()
            )));
        }
        file.write_all_at(&region.bytes, region.offset)
            .map_err(|e| Error::io("write", target, e))?;
    }
    if reused {
        // A new file reads as zeros wherever nothing was written; a reused one still holds
        // the old checkpoint there. Make it the same file a fresh write gives.
        let written = slots
            .iter()
            .map(|s| (s.offset, tensors[s.tensor].nbytes()))
            .chain(regions.iter().map(|r| (r.offset, r.bytes.len() as u64)));
        zero_gaps(&file, written, len).map_err(|e| Error::io("write", target, e))?;
        file.set_len(len)
            .map_err(|e| Error::io("truncate the kept file beside", target, e))?;
    }
    if let Some(map) = mapping {
        mapped::keep(&file, map);
    }
    fault::check(Stage::Fsync)
        .and_then(|_| file.sync_data())
        .map_err(|e| Error::io("fdatasync the temp file of", target, e))?;
    Ok(len)
}

/// Opens the temp file a write fills: a new one, or the kept file it reuses.
fn open_temp(temp: &Path, target: &Path, reused: bool) -> Result<File> {
    // Read as well as write: a file in memory is written through a shared mapping of it,
    // which needs a descriptor open for reading.
    if reused {
        OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(temp)
            .map_err(|e| Error::io("open the kept file beside", target, e))
    } else {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o666)
            .custom_flags(libc::O_CLOEXEC)
            .open(temp)
            .map_err(|e| Error::io("create a temp file beside", target, e))
    }
}

/// Makes a temp file beside `target` holding `len` bytes of reserved space (zeros), for a
/// first write to reuse (`WriteOptions::reuse`): the space a write would otherwise have to
/// allocate as it goes, reserved ahead, while the CPU is idle. On a filesystem in memory
/// (tmpfs) the memory is touched too, through a mapping of the file kept for the writes
/// into it (`mapped.rs`): a page that is only reserved still costs its first touch (on a
/// VM, the host backing it) in the write.
/// Returns its path; on failure nothing is left behind.
///
/// A reservation is a run's first touch of the folder, so it first sweeps what a crashed
/// run left there (its temp files are worth their size in space, and a resumed run may
/// never write that name again to sweep them).
pub fn reserve_spare(target: &Path, len: u64) -> Result<PathBuf> {
    let temp = temp_path_for(target);
    reserve_spare_at(&temp, target, len, &Width::fixed(1))?;
    Ok(temp)
}

/// [`reserve_spare`] into `temp`, a name from [`temp_path_for`] chosen by the caller (a
/// write can then be queued to reuse it before the reservation has ended; a write whose
/// kept file is missing, after a reservation that failed, makes a new temp file instead),
/// touching the memory of a file in memory on `width`'s threads: one, and every core once
/// somebody waits for it (a write queued behind it that is waited for).
pub fn reserve_spare_at(temp: &Path, target: &Path, len: u64, width: &Width) -> Result<()> {
    if let Ok(dir) = folder_of(target) {
        sweep_stale_temps(&dir);
    }
    // Read as well as write: a file in memory is touched through a shared mapping of it.
    let made = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o666)
        .custom_flags(libc::O_CLOEXEC)
        .open(temp)
        .and_then(|file| {
            reserve(&file, len, width)?;
            if in_memory(&file) {
                // Through a mapping, kept for the write into this file; with `pwrite`
                // where the file cannot be mapped.
                match MappedFile::touched(&file, len, width) {
                    Some(touched) => mapped::keep(&file, touched?),
                    None => touch(&file, len, width)?,
                }
            }
            Ok(())
        });
    made.map_err(|e| {
        let _ = std::fs::remove_file(temp);
        Error::io("reserve space beside", target, e)
    })
}

/// Whether the file lives on a filesystem in memory (tmpfs, ramfs).
pub(crate) fn in_memory(file: &File) -> bool {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    // SAFETY: `fstatfs` fills the zeroed struct we own, from an open descriptor.
    let kind = unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        if libc::fstatfs(file.as_raw_fd(), &mut st) != 0 {
            return false;
        }
        st.f_type as i64
    };
    kind == TMPFS_MAGIC || kind == RAMFS_MAGIC
}

/// Writes zeros over `[0, len)`, a piece at a time on `width`'s threads.
fn touch(file: &File, len: u64, width: &Width) -> io::Result<()> {
    let pieces = plan_pieces(&[(0, len as usize)], false);
    let zeros = vec![0u8; pieces.first().map_or(0, |p| p.span as usize)];
    run_pieces_with(&pieces, width, |piece| {
        fault::delay();
        file.write_all_at(&zeros[..piece.span as usize], piece.offset)
    })
}

/// Sizes the file up front: a full disk or a file-size limit fails here, before any payload
/// is written, and the end-of-file that formats record is the real one. A file in memory
/// gets its pages here (each one cleared by the kernel: CPU work in proportion to the
/// size), so it is allocated a piece at a time on `width`'s threads: at nice 19 in the
/// background, and at the caller's priority once somebody waits for the write (see
/// `parallel::coordinate`); elsewhere allocating is bookkeeping, in one call.
pub(crate) fn reserve(file: &File, len: u64, width: &Width) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    let allocate = |offset: u64, len: u64| {
        // SAFETY: plain syscall on an open descriptor.
        let rc = unsafe {
            libc::fallocate(
                file.as_raw_fd(),
                0,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if rc == 0 {
            Ok(true)
        } else {
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) => Ok(false),
                _ => Err(err),
            }
        }
    };
    let Ok(whole) = usize::try_from(len) else {
        return Err(io::Error::from(io::ErrorKind::FileTooLarge));
    };
    let supported = if in_memory(file) {
        let pieces = plan_pieces(&[(0, whole)], false);
        let unsupported = AtomicBool::new(false);
        run_pieces_with(&pieces, width, |piece| {
            if !unsupported.load(Ordering::Relaxed) && !allocate(piece.offset, piece.span)? {
                unsupported.store(true, Ordering::Relaxed);
            }
            Ok(())
        })?;
        !unsupported.into_inner()
    } else {
        allocate(0, len)?
    };
    if !supported {
        file.set_len(len)?;
    }
    Ok(())
}

/// Writes zeros over every byte of `[0, len)` outside the `(offset, length)` extents.
fn zero_gaps(file: &File, extents: impl Iterator<Item = (u64, u64)>, len: u64) -> io::Result<()> {
    static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
    let mut extents: Vec<(u64, u64)> = extents.filter(|e| e.1 > 0).collect();
    extents.sort_unstable();
    let mut at = 0;
    for (offset, length) in extents.into_iter().chain([(len, 0)]) {
        while at < offset.min(len) {
            let n = (offset.min(len) - at).min(ZEROS.len() as u64) as usize;
            file.write_all_at(&ZEROS[..n], at)?;
            at += n as u64;
        }
        at = at.max(offset + length);
    }
    Ok(())
}

/// Renames the temp file over the target and fsyncs the folder; see [`replace`] for `keep`
/// and `previous_suffix`.
pub(crate) fn commit(
    temp: &Path,
    target: &Path,
    dir: &Path,
    keep: bool,
    previous_suffix: Option<&str>,
) -> Result<Option<PathBuf>> {
    let kept = replace(temp, target, keep, previous_suffix)?;
    // The rename (and the names kept) are durable only once the folder's entry is on disk.
    if let Err(e) = fsync_folder(dir) {
        if let Some(name) = &kept {
            let _ = std::fs::remove_file(name);
        }
        return Err(e);
    }
    Ok(kept)
}

/// Renames the temp file over the target. With `keep`, the file it replaces is first given
/// a temp name of its own, and returned; with `previous_suffix`, also the name
/// `<target><suffix>` (replacing the one there). No name is kept if the target is new.
pub(crate) fn replace(
    temp: &Path,
    target: &Path,
    keep: bool,
    previous_suffix: Option<&str>,
) -> Result<Option<PathBuf>> {
    if let Some(suffix) = previous_suffix {
        keep_previous(target, suffix)?;
    }
    let kept = keep
        .then(|| {
            let name = temp_path_for(target);
            std::fs::hard_link(target, &name).ok().map(|_| name)
        })
        .flatten();
    if let Err(e) = rename(temp, target) {
        // Still a second name of the live checkpoint: it must never be written over.
        if let Some(name) = &kept {
            let _ = std::fs::remove_file(name);
        }
        return Err(e);
    }
    Ok(kept)
}

/// Gives the current `target` (if any) the name `<target><suffix>` too, atomically: a link
/// under a temp name, renamed over the old `<target><suffix>`.
fn keep_previous(target: &Path, suffix: &str) -> Result<()> {
    let mut name = target.as_os_str().to_owned();
    name.push(suffix);
    let previous = PathBuf::from(name);
    let link = temp_path_for(&previous);
    match std::fs::hard_link(target, &link) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io("keep the previous version of", target, e)),
    }
    let renamed = std::fs::rename(&link, &previous);
    // A rename between two names of one file does nothing and succeeds (POSIX): when
    // `<target><suffix>` already is the current target, the link name stays behind.
    let _ = std::fs::remove_file(&link);
    renamed.map_err(|e| Error::io("keep the previous version of", target, e))
}

/// Renames a written temp file over its target.
pub(crate) fn rename(temp: &Path, target: &Path) -> Result<()> {
    fault::check(Stage::Rename)
        .and_then(|_| std::fs::rename(temp, target))
        .map_err(|e| Error::io("rename temp file onto", target, e))
}

/// Makes the renames in `dir` durable.
pub(crate) fn fsync_folder(dir: &Path) -> Result<()> {
    fault::check(Stage::DirFsync)
        .and_then(|_| File::open(dir)?.sync_all())
        .map_err(|e| Error::io("fsync folder", dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{PlannedFile, Region, Slot};
    use crate::tensor::{DType, Tensor};
    use std::os::unix::fs::MetadataExt;
    use std::sync::Arc;

    /// A file of `len` bytes: a 4-byte header region at 0 and one payload at `at`, with
    /// gaps around both.
    fn layout(len: u64, at: u64, payload: &[u8]) -> (PlannedFile, Vec<Tensor>) {
        let tensor = Tensor::new(
            "t",
            DType::U8,
            vec![payload.len() as u64],
            Arc::new(payload.to_vec()),
        )
        .unwrap();
        let file = PlannedFile {
            len,
            regions: vec![Region {
                offset: 0,
                bytes: b"HEAD".to_vec(),
            }],
            slots: vec![Slot {
                offset: at,
                tensor: 0,
            }],
        };
        (file, vec![tensor])
    }

    fn keeping() -> WriteOptions {
        WriteOptions {
            keep_replaced: true,
            ..WriteOptions::with_threads(2)
        }
    }

    #[test]
    fn a_kept_file_holds_the_replaced_checkpoint_under_a_name_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("c.bin");
        let (first, t1) = layout(64, 16, &[1; 8]);
        let w = write_file_keeping(&target, &first, &t1, &keeping()).unwrap();
        assert_eq!(w.kept, None, "nothing was replaced");
        let before = std::fs::read(&target).unwrap();
        let (second, t2) = layout(64, 16, &[2; 8]);
        let w = write_file_keeping(&target, &second, &t2, &keeping()).unwrap();
        let kept = w.kept.expect("the first file is kept");
        assert!(super::super::is_temp_name(kept.file_name().unwrap()));
        assert_eq!(std::fs::read(&kept).unwrap(), before);
        assert_eq!(std::fs::metadata(&kept).unwrap().nlink(), 1);
        assert_eq!(std::fs::read(&target).unwrap()[16..24], [2; 8]);
    }

    #[test]
    fn a_reservation_sweeps_what_a_dead_writer_left_beside_it() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("c.bin");
        // pid 0x7ffffff0 is far above pid_max, so no such process exists.
        let dead = dir.path().join(".c.bin.fastckpt-2147483632-0.tmp");
        std::fs::write(&dead, b"left by a crash").unwrap();
        let spare = reserve_spare(&target, 4096).unwrap();
        assert!(!dead.exists());
        assert_eq!(std::fs::metadata(&spare).unwrap().len(), 4096);
    }

    #[test]
    fn a_reused_file_ends_up_byte_for_byte_a_fresh_write() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("c.bin");
        // A long, busy old checkpoint, then a shorter new one laid out differently.
        let (big, t_big) = layout(9000, 100, &[0xAB; 8000]);
        write_file(&target, &big, &t_big, &keeping()).unwrap();
        let (again, t_again) = layout(9000, 100, &[0xCD; 8000]);
        let kept = write_file_keeping(&target, &again, &t_again, &keeping())
            .unwrap()
            .kept
            .unwrap();
        let (small, t_small) = layout(300, 200, &[7; 50]);
        let opts = WriteOptions {
            reuse: Some(kept.clone()),
            ..keeping()
        };
        let w = write_file_keeping(&target, &small, &t_small, &opts).unwrap();
        assert!(!kept.exists(), "the kept file became the target");
        let fresh_path = dir.path().join("fresh.bin");
        write_file(
            &fresh_path,
            &small,
            &t_small,
            &WriteOptions::with_threads(1),
        )
        .unwrap();
        assert_eq!(
            std::fs::read(&target).unwrap(),
            std::fs::read(&fresh_path).unwrap()
        );
        assert_eq!(w.len, 300);
        assert!(w.kept.is_some(), "and the replaced one is kept in turn");
    }

    #[test]
    fn only_a_lone_temp_file_of_this_process_is_written_over() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("c.bin");
        let (file, tensors) = layout(64, 16, &[5; 8]);
        let other_pid = dir.path().join(".c.bin.fastckpt-1-0.tmp");
        let not_temp = dir.path().join("precious.bin");
        let linked = temp_path_for(&target);
        std::fs::write(&linked, b"x").unwrap();
        std::fs::hard_link(&linked, dir.path().join("second-name")).unwrap();
        for candidate in [&other_pid, &not_temp, &linked] {
            if !candidate.exists() {
                std::fs::write(candidate, b"keep me").unwrap();
            }
            let before = std::fs::read(candidate).unwrap();
            let opts = WriteOptions {
                reuse: Some(candidate.clone()),
                ..WriteOptions::with_threads(1)
            };
            write_file(&target, &file, &tensors, &opts).unwrap();
            if candidate != &other_pid {
                // (pid 1's temp file is left to its owner, or swept: it is not ours.)
                assert_eq!(std::fs::read(candidate).unwrap(), before, "{candidate:?}");
            }
            assert_eq!(std::fs::read(&target).unwrap()[16..24], [5; 8]);
        }
    }
}
