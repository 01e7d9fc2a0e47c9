//! Reading for loads: parallel positioned reads into numpy arrays, a range's CRC-32, and a
//! validated SafeTensors header.

use std::collections::BTreeMap;
use std::path::PathBuf;

use fastckpt_core::format::safetensors;
use fastckpt_core::io::{self, ReadItem};
use fastckpt_core::Digest;
use numpy::PyUntypedArray;
use pyo3::prelude::*;

use crate::arrays::writable_dest;
use crate::errors::to_py_err;
use crate::options::thread_count;

/// Reads `(offset, array)` items in parallel into the arrays (C-contiguous, writable);
/// returns their CRC-32C values when `crc32c` is true.
#[pyfunction]
#[pyo3(signature = (path, items, *, threads=None, crc32c=false))]
pub fn read_into(
    py: Python<'_>,
    path: PathBuf,
    items: Vec<(u64, Bound<'_, PyUntypedArray>)>,
    threads: Option<usize>,
    crc32c: bool,
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
    let sums = py
        .detach(|| unsafe { io::read_into(&path, &reads, threads, digest) })
        .map_err(|e| to_py_err(&e))?;
    Ok(crc32c.then_some(sums))
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
    /// The CRC-32C fastckpt recorded for it, if the file has one.
    pub crc32c: Option<u32>,
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
