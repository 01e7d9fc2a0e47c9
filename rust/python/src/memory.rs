//! Host memory for snapshots: the parallel copy into the snapshot buffers, faulting them
//! in ahead of time, and reserving room for a first write.

use std::path::PathBuf;

use fastckpt_core::io::{self, Effort, Width};
use fastckpt_core::{host, Output};
use numpy::PyUntypedArray;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::arrays::{readable_source, writable_dest, HeldArray};
use crate::job::{PyJob, When};
use crate::options::thread_count;

/// Copies `(source, destination)` array pairs on every core (at most `threads`), detached
/// from the interpreter: the snapshot's copy into its reused host buffers. Each pair must
/// have the same number of bytes; destinations must be writable and C-contiguous, and
/// distinct from every other array in the call.
#[pyfunction]
#[pyo3(signature = (pairs, *, threads=None))]
pub fn copy_into(
    py: Python<'_>,
    pairs: Vec<(Bound<'_, PyUntypedArray>, Bound<'_, PyUntypedArray>)>,
    threads: Option<usize>,
) -> PyResult<()> {
    let threads = thread_count(threads, io::default_threads())?;
    let mut items = Vec::with_capacity(pairs.len());
    for (i, (src, dst)) in pairs.iter().enumerate() {
        let (src, len) = readable_source(src, i)?;
        let (dst, dst_len) = writable_dest(dst, "copy destination", i)?;
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
pub fn prefault(py: Python<'_>, buffer: Bound<'_, PyUntypedArray>) -> PyResult<PyJob> {
    let (ptr, len) = writable_dest(&buffer, "prefault buffer", 0)?;
    let owner = HeldArray {
        _array: buffer.into_any().unbind(),
        ptr,
        len,
    };
    let width = Width::fixed(1);
    let effort = width.effort.clone();
    let work = move || {
        let held = owner;
        // SAFETY: `held` keeps the array, and so its buffer, alive; prefaulting never
        // changes a byte, so it may race with writers of the same memory.
        unsafe { host::prefault_with(held.ptr, held.len, &width) };
        Ok(Output::new(Vec::new(), held.len as u64))
    };
    Ok(PyJob::start_named(
        "fastckpt-prefault",
        py,
        work,
        When::Background { after: Vec::new() },
        effort,
    ))
}

/// Makes a temp file beside `target` with `length` bytes reserved, on a low-priority
/// thread (every core once it is waited for) once every job in `after` has ended; returns
/// its path (chosen at once, so that a write can be queued behind the job to reuse it:
/// `WriteOptions(reuse=path, queue_after=[job])`) and the job.
#[pyfunction]
#[pyo3(signature = (target, length, *, after=Vec::new()))]
pub fn reserve_spare(
    py: Python<'_>,
    target: PathBuf,
    length: u64,
    after: Vec<PyRef<'_, PyJob>>,
) -> (PathBuf, PyJob) {
    let temp = io::temp_path_for(&target);
    let spare = temp.clone();
    let job = start_touching(py, after, move |width| {
        io::reserve_spare_at(&spare, &target, length, width)?;
        Ok(Output::new(vec![spare], length))
    });
    (temp, job)
}

/// For `path`, a file a write kept for the next one (`keep_replaced`), which will write
/// about `length` bytes into it: when it lives in memory and its mapping is not kept (it
/// was there before training began), sizes it, maps it and touches its pages on a
/// low-priority thread (every core once a write queued behind it is waited for), for the
/// next write into it to copy into; returns the job (which never fails: without a mapping
/// the write goes as before), or None when there is nothing to do.
#[pyfunction]
pub fn map_kept(py: Python<'_>, path: PathBuf, length: u64) -> Option<PyJob> {
    if !io::needs_mapping(&path) {
        return None;
    }
    Some(start_touching(py, Vec::new(), move |width| {
        // A mapping only spares the next write some work: without one it writes as
        // before, so a failure here is no failure of the file.
        let _ = io::map_kept(&path, length, width);
        Ok(Output::new(Vec::new(), 0))
    }))
}

/// Starts `work` (touching a file's memory) as a job once every job in `after` has ended:
/// on one low-priority thread, and every core once a write queued behind it is waited for.
fn start_touching<F>(py: Python<'_>, after: Vec<PyRef<'_, PyJob>>, work: F) -> PyJob
where
    F: FnOnce(&Width) -> fastckpt_core::Result<Output> + Send + 'static,
{
    let width = Width {
        threads: 1,
        hurried_threads: io::default_threads(),
        effort: Effort::default(),
    };
    let effort = width.effort.clone();
    let after = after.iter().map(|j| &**j).collect();
    PyJob::start_named(
        "fastckpt-prefault",
        py,
        move || work(&width),
        When::Background { after },
        effort,
    )
}

/// Lets go of the mappings this process keeps of files written again and again (a
/// callback's checkpoint and its spare, on tmpfs: `keep_replaced`), which hold the files'
/// memory until then even once the files are removed: those of the files `files` names,
/// as `(st_dev, st_ino)` pairs taken when the caller decided (a name may be another file's
/// by the time this runs; every one when None), and those of removed files; returns how
/// many.
#[pyfunction]
#[pyo3(signature = (files=None))]
pub fn release_mappings(py: Python<'_>, files: Option<Vec<(u64, u64)>>) -> usize {
    py.detach(|| io::release_mappings(files.as_deref()))
}

/// How many mappings of files written again and again this process keeps.
#[pyfunction]
pub fn kept_mappings() -> usize {
    io::kept_mappings()
}

/// The memory of a file in memory, lent from the mapping this process keeps of it, for a
/// snapshot to copy each payload straight to its place in the file (see `kept_region`).
/// numpy arrays over it (`numpy.asarray(region)`) keep it, and so the mapping, alive.
#[pyclass(name = "KeptRegion", module = "fastckpt._fastckpt", frozen)]
pub struct PyKeptRegion {
    region: io::LentRegion,
}

#[pymethods]
impl PyKeptRegion {
    /// numpy's array interface: the region as writable bytes, from the file's start.
    #[getter]
    fn __array_interface__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let interface = PyDict::new(py);
        interface.set_item("shape", (self.region.len(),))?;
        interface.set_item("typestr", "|u1")?;
        let address = self.region.as_mut_ptr() as usize;
        interface.set_item("data", (address, false))?;
        interface.set_item("version", 3)?;
        Ok(interface)
    }

    fn __repr__(&self) -> String {
        format!("<KeptRegion of {} bytes>", self.region.len())
    }
}

/// The memory of `path`, a kept file in memory that this process writes through a kept
/// mapping (a callback's spare, on tmpfs), lent for a snapshot to copy into: the next
/// write into that file (`WriteOptions(reuse=path)`) then copies nothing of the payloads
/// found at their places in it. At least `length` bytes (a shorter file is lengthened,
/// with zeros, as far as its mapping spans). None where no mapping of it is kept (not in
/// memory, not ready yet, or let go), or it cannot be that long.
///
/// Stores into it must go to the next write of that file and nowhere else: until that
/// write, the file's old content is overwritten in place.
#[pyfunction]
#[pyo3(signature = (path, length=0))]
pub fn kept_region(path: PathBuf, length: u64) -> Option<PyKeptRegion> {
    io::lend(&path, length).map(|region| PyKeptRegion { region })
}
