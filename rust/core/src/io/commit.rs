//! One durable file: plan checks, temp file, parallel payloads, metadata, fdatasync, rename,
//! folder fsync. A failure at any step removes the temp file and leaves the target as it was.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use super::direct::{self, DirectFile};
use super::fault::{self, Stage};
use super::parallel::{plan_pieces, run_pieces, Digests};
use super::temp::{sweep_stale_temps, temp_path_for};
use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::tensor::Tensor;

#[derive(Clone, Debug)]
pub struct WriteOptions {
    /// Writer threads for the payloads (at least 1).
    pub threads: usize,
    /// Write the page-aligned middle of large payloads with `O_DIRECT` where the
    /// filesystem supports it (see `direct.rs`). Default: on, unless `FASTCKPT_DIRECT_IO=0`.
    pub direct_io: bool,
}

impl WriteOptions {
    /// The defaults, with `threads` writer threads.
    pub fn with_threads(threads: usize) -> Self {
        WriteOptions {
            threads,
            ..Self::default()
        }
    }
}

impl Default for WriteOptions {
    fn default() -> Self {
        WriteOptions {
            threads: super::default_threads(),
            direct_io: direct::enabled_by_env(),
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
    check_layout(layout, tensors)?;
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
    sweep_stale_temps(&dir);
    let temp = temp_path_for(target);
    let result = write_temp(&temp, target, layout, tensors, opts).and_then(|len| {
        commit(&temp, target, &dir)?;
        Ok(len)
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result
}

fn check_layout(layout: &dyn Layout, tensors: &[Tensor]) -> Result<()> {
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
fn write_temp(
    temp: &Path,
    target: &Path,
    layout: &dyn Layout,
    tensors: &[Tensor],
    opts: &WriteOptions,
) -> Result<u64> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o666)
        .custom_flags(libc::O_CLOEXEC)
        .open(temp)
        .map_err(|e| Error::io("create a temp file beside", target, e))?;
    let len = layout.file_len();
    reserve(&file, len).map_err(|e| Error::io("reserve space for", target, e))?;

    let slots = layout.slots();
    let items: Vec<(u64, usize)> = slots
        .iter()
        .map(|s| (s.offset, tensors[s.tensor].bytes().len()))
        .collect();
    let pieces = plan_pieces(&items, true);
    let digests = Digests::new(layout.digest(), slots.len());
    let direct = if opts.direct_io {
        DirectFile::open(temp)
    } else {
        None
    };
    run_pieces(&pieces, opts.threads, |piece| {
        fault::delay();
        fault::check(Stage::Write)?;
        let bytes_of = |e: &super::parallel::Extent| {
            &tensors[slots[e.item].tensor].bytes()[e.start..e.start + e.len]
        };
        if let [e] = piece.extents.as_slice() {
            let bytes = bytes_of(e);
            match &direct {
                Some(d) => d.write_all_at(&file, bytes, e.offset)?,
                None => file.write_all_at(bytes, e.offset)?,
            }
            digests.record(e.item, e.start, bytes);
            return Ok(());
        }
        // A batch of small payloads: gather them (gaps stay zero) and write once.
        let mut buf = vec![0u8; piece.span as usize];
        for e in &piece.extents {
            let at = (e.offset - piece.offset) as usize;
            let bytes = bytes_of(e);
            buf[at..at + e.len].copy_from_slice(bytes);
            digests.record(e.item, e.start, bytes);
        }
        file.write_all_at(&buf, piece.offset)
    })
    .map_err(|e| Error::io("write", target, e))?;

    for region in layout.regions(&digests.finish())? {
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
    fault::check(Stage::Fsync)
        .and_then(|_| file.sync_data())
        .map_err(|e| Error::io("fdatasync the temp file of", target, e))?;
    Ok(len)
}

/// Sizes the file up front: a full disk or a file-size limit fails here, before any payload
/// is written, and the end-of-file that formats record is the real one.
fn reserve(file: &File, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    // SAFETY: plain syscall on an open descriptor.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len as libc::off_t) };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) => file.set_len(len),
        _ => Err(err),
    }
}

fn commit(temp: &Path, target: &Path, dir: &Path) -> Result<()> {
    fault::check(Stage::Rename)
        .and_then(|_| std::fs::rename(temp, target))
        .map_err(|e| Error::io("rename temp file onto", target, e))?;
    // The rename is durable only once the folder's entry is on disk.
    fault::check(Stage::DirFsync)
        .and_then(|_| File::open(dir)?.sync_all())
        .map_err(|e| Error::io("fsync folder", dir, e))
}
