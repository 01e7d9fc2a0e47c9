//! Reading for loads: parallel positioned reads into numpy arrays, a range's CRC-32, and a
//! validated SafeTensors header.

use std::collections::BTreeMap;
use std::path::PathBuf;

use fastckpt_core::format::{safetensors, zstd, zstd_decode};
use fastckpt_core::io::{self, ReadItem};
use fastckpt_core::Digest;
use numpy::PyUntypedArray;
use pyo3::prelude::*;

use crate::arrays::writable_dest;
use crate::errors::to_py_err;
use crate::options::thread_count;
use crate::sources::PyProgress;

/// Reads `(offset, array)` items in parallel into the arrays (C-contiguous, writable);
/// returns their CRC-32C values when `crc32c` is true.
#[pyfunction]
#[pyo3(signature = (path, items, *, threads=None, crc32c=false, progress=None))]
pub fn read_into(
    py: Python<'_>,
    path: PathBuf,
    items: Vec<(u64, Bound<'_, PyUntypedArray>)>,
    threads: Option<usize>,
    crc32c: bool,
    progress: Option<PyRef<'_, PyProgress>>,
) -> PyResult<Option<Vec<u32>>> {
    let threads = thread_count(threads, io::default_threads())?;
    let mut reads = Vec::with_capacity(items.len());
    for (i, (offset, arr)) in items.iter().enumerate() {
        let (dest, len) = writable_dest(arr, "read destination", i)?;
        reads.push(ReadItem {
            offset: *offset,
            dest,
            len,
        });
    }
    let digest = if crc32c { Digest::Crc32c } else { Digest::None };
    // SAFETY: each destination is a distinct, writable, C-contiguous array that `items`
    // keeps alive until we return; overlapping destinations are refused by `writable_dest`'s
    // caller contract (the Python loader allocates one fresh array per item).
    let progress = progress.map(|p| p.inner.clone());
    let sums = py
        .detach(|| unsafe { io::read_into(&path, &reads, threads, digest, progress.as_ref()) })
        .map_err(|e| to_py_err(&e))?;
    Ok(crc32c.then_some(sums))
}

/// Decodes zstd frames, `(offset, stored, array)` items, in parallel into the arrays
/// (C-contiguous, writable, of exactly the decoded size); returns the CRC-32C of each.
#[pyfunction]
#[pyo3(signature = (path, items, *, threads=None, progress=None))]
pub fn read_zstd_into(
    py: Python<'_>,
    path: PathBuf,
    items: Vec<(u64, u64, Bound<'_, PyUntypedArray>)>,
    threads: Option<usize>,
    progress: Option<PyRef<'_, PyProgress>>,
) -> PyResult<Vec<u32>> {
    let threads = thread_count(threads, io::default_threads())?;
    let mut reads = Vec::with_capacity(items.len());
    for (i, (offset, stored, arr)) in items.iter().enumerate() {
        let (dest, len) = writable_dest(arr, "read destination", i)?;
        reads.push(zstd_decode::FrameRead {
            offset: *offset,
            stored: *stored,
            dest,
            len,
        });
    }
    let progress = progress.map(|p| p.inner.clone()).unwrap_or_default();
    // SAFETY: as in `read_into`: distinct, writable arrays kept alive by `items`.
    py.detach(|| unsafe { zstd_decode::read_frames_into(&path, &reads, threads, &progress) })
        .map_err(|e| to_py_err(&e))
}

/// The CRC-32C of what each `(offset, stored, length)` zstd frame of `path` decodes to,
/// each frame streamed through the decoder and checked (bounded memory).
#[pyfunction]
#[pyo3(signature = (path, frames, *, threads=None, progress=None))]
pub fn crc32c_of_frames(
    py: Python<'_>,
    path: PathBuf,
    frames: Vec<(u64, u64, u64)>,
    threads: Option<usize>,
    progress: Option<PyRef<'_, PyProgress>>,
) -> PyResult<Vec<u32>> {
    let threads = thread_count(threads, io::default_threads())?;
    let progress = progress.map(|p| p.inner.clone()).unwrap_or_default();
    py.detach(|| zstd_decode::frame_digests(&path, &frames, threads, &progress))
        .map_err(|e| to_py_err(&e))
}

/// The CRC-32C of an array's bytes (C-contiguous).
#[pyfunction]
pub fn crc32c(py: Python<'_>, array: Bound<'_, PyUntypedArray>) -> PyResult<u32> {
    let (ptr, len) = crate::arrays::readable_source(&array, 0)?;
    let addr = ptr as usize;
    // SAFETY: `array` stays alive (and borrowed) until we return; the bytes are only read.
    Ok(py.detach(move || {
        let bytes = unsafe { std::slice::from_raw_parts(addr as *const u8, len) };
        ::crc32c::crc32c(bytes)
    }))
}

/// The CRC-32C of each `(offset, length)` range of `path`, read in parallel in bounded
/// memory.
#[pyfunction]
#[pyo3(signature = (path, ranges, *, threads=None, progress=None))]
pub fn crc32c_of_ranges(
    py: Python<'_>,
    path: PathBuf,
    ranges: Vec<(u64, u64)>,
    threads: Option<usize>,
    progress: Option<PyRef<'_, PyProgress>>,
) -> PyResult<Vec<u32>> {
    let threads = thread_count(threads, io::default_threads())?;
    let progress = progress.map(|p| p.inner.clone());
    py.detach(|| io::digests_of_ranges(&path, &ranges, threads, Digest::Crc32c, progress.as_ref()))
        .map_err(|e| to_py_err(&e))
}

/// The CRC-32 (zip's) of `length` bytes of `path` at `offset`, read in parallel: checks a
/// stored zip member in place.
#[pyfunction]
#[pyo3(signature = (path, offset, length, *, threads=None))]
pub fn crc32_of_range(
    py: Python<'_>,
    path: PathBuf,
    offset: u64,
    length: u64,
    threads: Option<usize>,
) -> PyResult<u32> {
    let threads = thread_count(threads, io::default_threads())?;
    py.detach(|| io::crc32_of_range(&path, offset, length, threads))
        .map_err(|e| to_py_err(&e))
}

/// One tensor as a SafeTensors header describes it, checked against the file.
#[pyclass(name = "HeaderTensor", module = "fastckpt._fastckpt", frozen, get_all)]
pub struct PyHeaderTensor {
    pub name: String,
    /// The numpy name of the dtype (`float32`, `bfloat16`, ...).
    pub dtype: &'static str,
    pub shape: Vec<u64>,
    /// The payload's absolute offset in the file.
    pub offset: u64,
    pub nbytes: u64,
    /// The CRC-32C fastckpt recorded for it, if the file has one (in a zstd container,
    /// of the decoded bytes).
    pub crc32c: Option<u32>,
    /// In a zstd container: the length of its frame, at `offset` (`nbytes` is decoded).
    pub stored: Option<u64>,
}

/// Reads and validates a SafeTensors header: its metadata and its tensors, in payload
/// order.
#[pyfunction]
pub fn safetensors_header(
    py: Python<'_>,
    path: PathBuf,
) -> PyResult<(BTreeMap<String, String>, Vec<PyHeaderTensor>)> {
    let header = py
        .detach(|| safetensors::read_header(&path))
        .map_err(|e| to_py_err(&e))?;
    let tensors = header
        .tensors
        .into_iter()
        .map(|t| PyHeaderTensor {
            name: t.name,
            dtype: t.dtype.numpy_name(),
            shape: t.shape,
            offset: t.offset,
            nbytes: t.nbytes,
            crc32c: t.crc32c,
            stored: None,
        })
        .collect();
    Ok((header.metadata, tensors))
}

/// Reads and validates a zstd container's header: its metadata and its tensors (each with
/// its frame's offset and length, and its decoded dtype, shape and size), in payload order.
#[pyfunction]
pub fn zstd_header(
    py: Python<'_>,
    path: PathBuf,
) -> PyResult<(BTreeMap<String, String>, Vec<PyHeaderTensor>)> {
    let header = py
        .detach(|| zstd::read_header(&path))
        .map_err(|e| to_py_err(&e))?;
    let tensors = header
        .tensors
        .into_iter()
        .map(|t| PyHeaderTensor {
            name: t.name,
            dtype: t.dtype.numpy_name(),
            shape: t.shape,
            offset: t.offset,
            nbytes: t.nbytes,
            crc32c: t.crc32c,
            stored: Some(t.stored),
        })
        .collect();
    Ok((header.metadata, tensors))
}

/// Removes temp files that dead fastckpt writers left in `folder`; returns how many.
#[pyfunction]
pub fn sweep_stale_temps(py: Python<'_>, folder: PathBuf) -> usize {
    py.detach(|| io::sweep_stale_temps(&folder))
}

/// Whether a file name is a fastckpt temp file.
#[pyfunction]
pub fn is_temp_name(name: PathBuf) -> bool {
    io::is_temp_name(name.as_os_str())
}
