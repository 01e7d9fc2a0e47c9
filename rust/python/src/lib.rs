//! `fastckpt._fastckpt`: the whole Python boundary. Arrays are borrowed while attached,
//! owned by the write job (so nothing relies on the caller keeping them alive), and every
//! byte of I/O runs detached from the interpreter.

mod arrays;
mod errors;
mod job;
mod nodes;
mod options;

use std::collections::BTreeMap;
use std::path::PathBuf;

use fastckpt_core::format::zip::{self, Member, ZipOptions};
use fastckpt_core::format::{hdf5, safetensors};
use fastckpt_core::host;
use fastckpt_core::io::{self, ReadItem};
use fastckpt_core::PlannedFile;
use fastckpt_core::{Digest, Layout, Output, Tensor};
use numpy::PyUntypedArray;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::arrays::{readable_source, tensors_from_py, writable_dest, HeldArray};
use crate::errors::to_py_err;
use crate::job::{PyJob, When};
use crate::nodes::{nodes_from_py, PyNode};
use crate::options::{thread_count, PyWriteOptions};

/// Runs stages 5-6 for a planned file as `options` say: on a writer thread in the
/// background (once `queue_after` has ended, if given), else here, detached from the
/// interpreter either way. The job owns the tensors (and so the arrays).
fn start_write<L: Layout + 'static>(
    py: Python<'_>,
    path: PathBuf,
    layout: L,
    tensors: Vec<Tensor>,
    options: Option<&PyWriteOptions>,
) -> PyJob {
    let sync = PyWriteOptions::synchronous();
    let options = options.unwrap_or(&sync);
    let opts = options.core();
    let effort = opts.width.effort.clone();
    let work = move || {
        let written = io::write_file_keeping(&path, &layout, &tensors, &opts)?;
        Ok(Output {
            paths: vec![path],
            bytes: written.len,
            kept: written.kept,
        })
    };
    PyJob::start(py, work, options.when(), effort)
}

/// Writes a SafeTensors file; returns a job (already finished unless in the background).
#[pyfunction]
#[pyo3(signature = (path, tensors, metadata, *, options=None))]
fn write_safetensors(
    py: Python<'_>,
    path: PathBuf,
    tensors: Vec<(String, Bound<'_, PyAny>)>,
    metadata: BTreeMap<String, String>,
    options: Option<PyRef<'_, PyWriteOptions>>,
) -> PyResult<PyJob> {
    let tensors = tensors_from_py(tensors)?;
    let layout = safetensors::plan(&tensors, metadata).map_err(|e| to_py_err(py, &e))?;
    Ok(start_write(py, path, layout, tensors, options.as_deref()))
}

/// Converts the arrays and the tree, and plans the HDF5 file (a whole file, or the weights
/// member of a `.keras` zip).
fn plan_hdf5(
    py: Python<'_>,
    tensors: Vec<(String, Bound<'_, PyAny>)>,
    nodes: Vec<PyNode<'_>>,
) -> PyResult<(Vec<Tensor>, PlannedFile)> {
    let tensors = tensors_from_py(tensors)?;
    let nodes = nodes_from_py(nodes)?;
    let planned = hdf5::plan(&nodes, &tensors).map_err(|e| to_py_err(py, &e))?;
    Ok((tensors, planned))
}

/// Writes an HDF5 file (`.weights.h5`, legacy `.h5`) from a tree of groups and datasets.
#[pyfunction]
#[pyo3(signature = (path, tensors, nodes, *, options=None))]
fn write_hdf5(
    py: Python<'_>,
    path: PathBuf,
    tensors: Vec<(String, Bound<'_, PyAny>)>,
    nodes: Vec<PyNode<'_>>,
    options: Option<PyRef<'_, PyWriteOptions>>,
) -> PyResult<PyJob> {
    let (tensors, layout) = plan_hdf5(py, tensors, nodes)?;
    Ok(start_write(py, path, layout, tensors, options.as_deref()))
}

/// Writes a Keras `.keras` zip in one pass: the `before` members, then `weights_name`
/// holding the HDF5 tree (planned in place, no in-memory copy), then the `after` members.
#[pyfunction]
#[pyo3(signature = (path, tensors, nodes, before, after, *, weights_name="model.weights.h5", options=None))]
#[allow(clippy::too_many_arguments)]
fn write_keras(
    py: Python<'_>,
    path: PathBuf,
    tensors: Vec<(String, Bound<'_, PyAny>)>,
    nodes: Vec<PyNode<'_>>,
    before: Vec<(String, Vec<u8>)>,
    after: Vec<(String, Vec<u8>)>,
    weights_name: &str,
    options: Option<PyRef<'_, PyWriteOptions>>,
) -> PyResult<PyJob> {
    let (tensors, weights) = plan_hdf5(py, tensors, nodes)?;
    let bytes_member = |(name, data): (String, Vec<u8>)| Member::Bytes { name, data };
    let members: Vec<Member> = before
        .into_iter()
        .map(bytes_member)
        .chain([Member::Planned {
            name: weights_name.to_owned(),
            file: weights,
        }])
        .chain(after.into_iter().map(bytes_member))
        .collect();
    let layout =
        zip::plan(members, &tensors, &ZipOptions::default()).map_err(|e| to_py_err(py, &e))?;
    Ok(start_write(py, path, layout, tensors, options.as_deref()))
}

/// Writes `data` to `path` durably and atomically (temp file, fdatasync, rename, folder
/// fsync): for small companion files such as a sharded checkpoint's index.
#[pyfunction]
#[pyo3(signature = (path, data, *, options=None))]
fn write_bytes(
    py: Python<'_>,
    path: PathBuf,
    data: Vec<u8>,
    options: Option<PyRef<'_, PyWriteOptions>>,
) -> PyResult<PyJob> {
    let layout = PlannedFile {
        len: data.len() as u64,
        regions: vec![fastckpt_core::Region {
            offset: 0,
            bytes: data,
        }],
        slots: Vec::new(),
    };
    Ok(start_write(
        py,
        path,
        layout,
        Vec::new(),
        options.as_deref(),
    ))
}

/// Reads `(offset, array)` items in parallel into the arrays (C-contiguous, writable);
/// returns their CRC-32C values when `crc32c` is true.
#[pyfunction]
#[pyo3(signature = (path, items, *, threads=None, crc32c=false))]
fn read_into(
    py: Python<'_>,
    path: PathBuf,
    items: Vec<(u64, Bound<'_, PyUntypedArray>)>,
    threads: Option<usize>,
    crc32c: bool,
) -> PyResult<Option<Vec<u32>>> {
    let threads = thread_count(threads, io::default_threads())?;
    let mut reads = Vec::with_capacity(items.len());
    for (i, (offset, arr)) in items.iter().enumerate() {
        let (dest, len) = writable_dest(arr, i)?;
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
        .map_err(|e| to_py_err(py, &e))?;
    Ok(crc32c.then_some(sums))
}

/// Copies `(source, destination)` array pairs on every core (at most `threads`), detached
/// from the interpreter: the snapshot's copy into its reused host buffers. Each pair must
/// have the same number of bytes; destinations must be writable and C-contiguous, and
/// distinct from every other array in the call.
#[pyfunction]
#[pyo3(signature = (pairs, *, threads=None))]
fn copy_into(
    py: Python<'_>,
    pairs: Vec<(Bound<'_, PyUntypedArray>, Bound<'_, PyUntypedArray>)>,
    threads: Option<usize>,
) -> PyResult<()> {
    let threads = thread_count(threads, io::default_threads())?;
    let mut items = Vec::with_capacity(pairs.len());
    for (i, (src, dst)) in pairs.iter().enumerate() {
        let (src, len) = readable_source(src, i)?;
        let (dst, dst_len) = writable_dest(dst, i)?;
        if dst_len != len {
            return Err(PyValueError::new_err(format!(
                "copy {i}: the source has {len} bytes, the destination {dst_len}"
            )));
        }
        items.push(host::CopyItem { src, dst, len });
    }
    // SAFETY: every range is a live array that `pairs` keeps alive until we return; the
    // destinations are writable and, by this function's contract, distinct.
    py.detach(|| unsafe { host::copy_parallel(&items, threads) });
    Ok(())
}

/// Faults in the pages of `buffer` (a writable C-contiguous array) on a low-priority
/// thread, without changing its content; returns the job. The job keeps the array alive.
#[pyfunction]
fn prefault(py: Python<'_>, buffer: Bound<'_, PyUntypedArray>) -> PyResult<PyJob> {
    let (ptr, len) = writable_dest(&buffer, 0)?;
    let owner = HeldArray {
        _array: buffer.into_any().unbind(),
        ptr,
        len,
    };
    let work = move || {
        let held = owner;
        // SAFETY: `held` keeps the array, and so its buffer, alive; prefaulting never
        // changes a byte, so it may race with writers of the same memory.
        unsafe { host::prefault(held.ptr, held.len) }
            .map_err(|e| fastckpt_core::Error::io("prefault snapshot memory", PathBuf::new(), e))?;
        Ok(Output::new(Vec::new(), held.len as u64))
    };
    Ok(PyJob::start_named(
        "fastckpt-prefault",
        py,
        work,
        When::Background { after: None },
        io::Effort::default(),
    ))
}

/// Makes a temp file beside `target` with `length` bytes reserved, on a low-priority
/// thread; the job's `result().paths[0]` is the file, for a first write to reuse
/// (`WriteOptions(reuse=...)`).
#[pyfunction]
fn reserve_spare(py: Python<'_>, target: PathBuf, length: u64) -> PyJob {
    let work = move || {
        let spare = io::reserve_spare(&target, length)?;
        Ok(Output::new(vec![spare], length))
    };
    PyJob::start_named(
        "fastckpt-prefault",
        py,
        work,
        When::Background { after: None },
        io::Effort::default(),
    )
}

/// The CRC-32 (zip's) of `length` bytes of `path` at `offset`, read in parallel: checks a
/// stored zip member in place.
#[pyfunction]
#[pyo3(signature = (path, offset, length, *, threads=None))]
fn crc32_of_range(
    py: Python<'_>,
    path: PathBuf,
    offset: u64,
    length: u64,
    threads: Option<usize>,
) -> PyResult<u32> {
    let threads = thread_count(threads, io::default_threads())?;
    py.detach(|| io::crc32_of_range(&path, offset, length, threads))
        .map_err(|e| to_py_err(py, &e))
}

/// Parses and validates a SafeTensors header: `(metadata, [(name, dtype, shape, offset,
/// nbytes, crc32c or None), ...])` in payload order.
#[pyfunction]
#[allow(clippy::type_complexity)]
fn safetensors_header(
    py: Python<'_>,
    path: PathBuf,
) -> PyResult<(
    BTreeMap<String, String>,
    Vec<(String, &'static str, Vec<u64>, u64, u64, Option<u32>)>,
)> {
    let header = py
        .detach(|| -> fastckpt_core::Result<_> {
            use std::io::Read;
            let file = std::fs::File::open(&path)
                .map_err(|e| fastckpt_core::Error::io("open", &path, e))?;
            let len = file
                .metadata()
                .map_err(|e| fastckpt_core::Error::io("stat", &path, e))?
                .len();
            let mut head = vec![0u8; 8.min(len) as usize];
            (&file)
                .read_exact(&mut head)
                .map_err(|e| fastckpt_core::Error::io("read", &path, e))?;
            let n = safetensors::header_len(&path, &head, len)?;
            head.resize(8 + n as usize, 0);
            (&file)
                .read_exact(&mut head[8..])
                .map_err(|e| fastckpt_core::Error::io("read", &path, e))?;
            safetensors::parse_header(&path, &head, len)
        })
        .map_err(|e| to_py_err(py, &e))?;
    let tensors = header
        .tensors
        .into_iter()
        .map(|t| {
            (
                t.name,
                t.dtype.numpy_name(),
                t.shape,
                t.offset,
                t.nbytes,
                t.crc32c,
            )
        })
        .collect();
    Ok((header.metadata, tensors))
}

/// Removes temp files that dead fastckpt writers left in `folder`; returns how many.
#[pyfunction]
fn sweep_stale_temps(py: Python<'_>, folder: PathBuf) -> usize {
    py.detach(|| io::sweep_stale_temps(&folder))
}

/// Whether a file name is a fastckpt temp file.
#[pyfunction]
fn is_temp_name(name: PathBuf) -> bool {
    io::is_temp_name(name.as_os_str())
}

/// Test hook: make every later save fail at `stage` ("write", "fsync", "rename",
/// "dir_fsync"), or clear with None. Only in builds with the `fault-injection` feature.
#[pyfunction]
#[pyo3(signature = (stage))]
fn _inject_fault(stage: Option<&str>) -> PyResult<()> {
    if !io::fault::ENABLED {
        return Err(PyValueError::new_err(
            "this build of fastckpt has no fault injection",
        ));
    }
    let stage = stage
        .map(|s| {
            io::fault::Stage::parse(s)
                .ok_or_else(|| PyValueError::new_err(format!("unknown stage {s:?}")))
        })
        .transpose()?;
    io::fault::arm(stage);
    Ok(())
}

/// Test hook: sleep `ms` milliseconds before every payload write of later saves (0 turns
/// it off), so a test can act while a save is surely in progress.
#[pyfunction]
fn _inject_delay(ms: u64) -> PyResult<()> {
    if !io::fault::ENABLED {
        return Err(PyValueError::new_err(
            "this build of fastckpt has no fault injection",
        ));
    }
    io::fault::set_delay(ms);
    Ok(())
}

#[pymodule]
fn _fastckpt(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyJob>()?;
    m.add_class::<PyWriteOptions>()?;
    m.add_class::<job::PyWriteReport>()?;
    m.add_function(wrap_pyfunction!(write_safetensors, m)?)?;
    m.add_function(wrap_pyfunction!(write_hdf5, m)?)?;
    m.add_function(wrap_pyfunction!(write_keras, m)?)?;
    m.add_function(wrap_pyfunction!(write_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(read_into, m)?)?;
    m.add_function(wrap_pyfunction!(copy_into, m)?)?;
    m.add_function(wrap_pyfunction!(prefault, m)?)?;
    m.add_function(wrap_pyfunction!(reserve_spare, m)?)?;
    m.add_function(wrap_pyfunction!(crc32_of_range, m)?)?;
    m.add_function(wrap_pyfunction!(safetensors_header, m)?)?;
    m.add_function(wrap_pyfunction!(sweep_stale_temps, m)?)?;
    m.add_function(wrap_pyfunction!(is_temp_name, m)?)?;
    m.add_function(wrap_pyfunction!(_inject_fault, m)?)?;
    m.add_function(wrap_pyfunction!(_inject_delay, m)?)?;
    m.add("DEFAULT_THREADS", io::default_threads())?;
    m.add(
        "DEFAULT_BACKGROUND_THREADS",
        io::default_background_threads(),
    )?;
    m.add("FAULT_INJECTION", io::fault::ENABLED)?;
    let dtypes = PyDict::new(m.py());
    for d in fastckpt_core::DType::ALL {
        dtypes.set_item(d.numpy_name(), d.size())?;
    }
    m.add("DTYPES", dtypes)?;
    Ok(())
}
