//! `fastckpt._fastckpt.Job`: a handle on a write running in the background.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use fastckpt_core::io::Effort;
use fastckpt_core::{Job, Output, Result};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::errors::to_py_err;

/// Where a write runs: here, or on a writer thread (once every job in `after` has ended).
pub enum When<'a> {
    Here,
    Background { after: Vec<&'a PyJob> },
}

/// How often a waiting thread checks for signals (Ctrl-C).
const SIGNAL_SLICE: Duration = Duration::from_millis(50);

/// What a finished write produced.
#[pyclass(name = "WriteReport", module = "fastckpt._fastckpt", frozen, get_all)]
pub struct PyWriteReport {
    /// Every file written, the main one first.
    pub paths: Vec<PathBuf>,
    pub bytes: u64,
    /// From the moment the write began (not counting time queued behind another write).
    pub seconds: f64,
    /// The file the write replaced, kept under a temp name for the next write to reuse.
    pub kept: Option<PathBuf>,
}

#[pyclass(name = "Job", module = "fastckpt._fastckpt", frozen)]
pub struct PyJob {
    inner: Job,
}

impl PyJob {
    /// Runs `work` detached from the interpreter: on a writer thread when in the
    /// background, else right here (the call returns when the file is durable). `effort`
    /// is the one the work's writes consult, so that waiting for the job hurries them.
    pub fn start<F>(py: Python<'_>, work: F, when: When<'_>, effort: Effort) -> PyJob
    where
        F: FnOnce() -> Result<Output> + Send + 'static,
    {
        PyJob::start_named("fastckpt-writer", py, work, when, effort)
    }

    /// [`PyJob::start`] with the background thread named `name`.
    pub fn start_named<F>(
        name: &str,
        py: Python<'_>,
        work: F,
        when: When<'_>,
        effort: Effort,
    ) -> PyJob
    where
        F: FnOnce() -> Result<Output> + Send + 'static,
    {
        let inner = match when {
            When::Background { after } => {
                let after: Vec<Job> = after.iter().map(|j| j.inner.clone()).collect();
                Job::spawn(name, &after, effort, work)
            }
            When::Here => py.detach(|| Job::run_here(work)),
        };
        PyJob { inner }
    }
}

#[pymethods]
impl PyJob {
    /// Waits for the write to end, at most `timeout` seconds; returns whether it ended.
    /// Unless `timeout` is 0 (a poll), the write is hurried: it takes every core from now on.
    #[pyo3(signature = (timeout=None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        let deadline = match timeout {
            Some(t) if !(t >= 0.0 && t.is_finite()) => {
                return Err(PyValueError::new_err(format!(
                    "timeout must be a non-negative number. Received: timeout={t}"
                )))
            }
            Some(t) => Some(Instant::now() + Duration::from_secs_f64(t)),
            None => None,
        };
        if timeout != Some(0.0) {
            self.inner.hurry();
        }
        // Wait in slices and let Python run its signal handlers between them: Ctrl-C
        // interrupts the wait (the write goes on and ends on its own), where one long
        // detached wait would hold the KeyboardInterrupt back until the write ended.
        loop {
            let slice = match deadline {
                Some(d) => d
                    .saturating_duration_since(Instant::now())
                    .min(SIGNAL_SLICE),
                None => SIGNAL_SLICE,
            };
            let inner = self.inner.clone();
            if py.detach(move || inner.wait(Some(slice))) {
                return Ok(true);
            }
            py.check_signals()?;
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(false);
            }
        }
    }

    /// Whether the write has ended (successfully, with an error, or cancelled).
    fn done(&self) -> bool {
        self.inner.is_done()
    }

    /// Whether the write has begun (a job queued behind another has not).
    fn begun(&self) -> bool {
        self.inner.has_begun()
    }

    /// Drops the write if it has not begun; returns whether it was dropped. A dropped write
    /// never touches its files, and `result()` raises `concurrent.futures.CancelledError`.
    fn cancel(&self) -> bool {
        self.inner.cancel()
    }

    /// Lets the write use every core from now on, without waiting for it.
    fn hurry(&self) {
        self.inner.hurry()
    }

    /// Waits for the write, then returns its `WriteReport` or raises its error.
    fn result(&self, py: Python<'_>) -> PyResult<PyWriteReport> {
        self.wait(py, None)?;
        match self.inner.outcome().expect("finished job has an outcome") {
            Ok(r) => Ok(PyWriteReport {
                paths: r.output.paths,
                bytes: r.output.bytes,
                seconds: r.seconds,
                kept: r.output.kept,
            }),
            Err(e) => Err(to_py_err(&e)),
        }
    }

    /// Waits for the write, then returns its error as an exception object, or None.
    fn exception(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        self.wait(py, None)?;
        Ok(
            match self.inner.outcome().expect("finished job has an outcome") {
                Ok(_) => None,
                Err(e) => Some(to_py_err(&e).into_value(py).into_any()),
            },
        )
    }

    fn __repr__(&self) -> String {
        match self.inner.outcome() {
            None => "<fastckpt Job running>".into(),
            Some(Ok(r)) => format!(
                "<fastckpt Job done: {} bytes in {:.3} s>",
                r.output.bytes, r.seconds
            ),
            Some(Err(e)) => format!("<fastckpt Job failed: {e}>"),
        }
    }
}
