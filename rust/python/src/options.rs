//! `fastckpt._fastckpt.WriteOptions`: how and when one write runs, as one typed value.

use std::path::PathBuf;

use fastckpt_core::io::{self, WriteOptions};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::job::{PyJob, When};
use crate::sources::PyProgress;

/// `threads` as given, or the default; at least 1.
pub fn thread_count(threads: Option<usize>, default: usize) -> PyResult<usize> {
    match threads {
        Some(0) => Err(PyValueError::new_err(
            "threads must be at least 1. Received: threads=0",
        )),
        Some(n) => Ok(n),
        None => Ok(default),
    }
}

#[pyclass(name = "WriteOptions", module = "fastckpt._fastckpt", frozen)]
pub struct PyWriteOptions {
    #[pyo3(get)]
    threads: Option<usize>,
    #[pyo3(get)]
    background: bool,
    #[pyo3(get)]
    queue_after: Vec<Py<PyJob>>,
    #[pyo3(get)]
    reuse: Option<PathBuf>,
    #[pyo3(get)]
    keep_replaced: bool,
    #[pyo3(get)]
    direct_io: bool,
    #[pyo3(get)]
    previous_suffix: Option<String>,
    #[pyo3(get)]
    progress: Option<Py<PyProgress>>,
}

#[pymethods]
impl PyWriteOptions {
    #[new]
    #[pyo3(signature = (*, threads=None, background=false, queue_after=Vec::new(), reuse=None, keep_replaced=false, direct_io=true, previous_suffix=None, progress=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        threads: Option<usize>,
        background: bool,
        queue_after: Vec<Py<PyJob>>,
        reuse: Option<PathBuf>,
        keep_replaced: bool,
        direct_io: bool,
        previous_suffix: Option<String>,
        progress: Option<Py<PyProgress>>,
    ) -> PyResult<Self> {
        thread_count(threads, 1)?;
        if !queue_after.is_empty() && !background {
            return Err(PyValueError::new_err(
                "queue_after needs background=True: a synchronous write runs at once",
            ));
        }
        Ok(PyWriteOptions {
            threads,
            background,
            queue_after,
            reuse,
            keep_replaced,
            direct_io,
            previous_suffix,
            progress,
        })
    }
}

impl PyWriteOptions {
    /// The core's options. A background write starts with `threads` (default: a quarter
    /// of the cores, see `io::default_background_threads`) and grows to every core once it
    /// is waited for; a synchronous one, which its caller is waiting for, uses every core.
    pub fn core(&self) -> WriteOptions {
        let all = io::default_threads();
        let mut opts = WriteOptions::with_threads(self.threads.unwrap_or(all));
        if self.background {
            opts.width.threads = self.threads.unwrap_or_else(io::default_background_threads);
            opts.width.hurried_threads = opts.width.threads.max(all);
        } else {
            opts.width.effort.hurry(); // its caller waits for it from the start
        }
        opts.direct_io = self.direct_io;
        opts.reuse = self.reuse.clone();
        opts.keep_replaced = self.keep_replaced;
        opts.previous_suffix = self.previous_suffix.clone();
        if let Some(p) = &self.progress {
            opts.progress = p.get().inner.clone();
        }
        opts
    }

    pub fn when(&self) -> When<'_> {
        if self.background {
            When::Background {
                after: self.queue_after.iter().map(|j| j.get()).collect(),
            }
        } else {
            When::Here
        }
    }

    /// The options a call gets when it passes none: synchronous, every core.
    pub fn synchronous() -> Self {
        PyWriteOptions {
            threads: None,
            background: false,
            queue_after: Vec::new(),
            reuse: None,
            keep_replaced: false,
            direct_io: true,
            previous_suffix: None,
            progress: None,
        }
    }
}
