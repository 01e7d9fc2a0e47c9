//! `fastckpt._fastckpt.Job`: a handle on a write running in the background.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use fastckpt_core::{Job, Result};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::errors::to_py_err;

/// How often a waiting thread checks for signals (Ctrl-C).
const SIGNAL_SLICE: Duration = Duration::from_millis(50);

#[pyclass(name = "Job", module = "fastckpt._fastckpt", frozen)]
pub struct PyJob {
    inner: Job,
}

impl PyJob {
    /// Runs `work` detached from the interpreter: on a writer thread when `background`,
    /// else right here (the call returns when the file is durable).
    pub fn start<F>(py: Python<'_>, work: F, background: bool) -> PyJob
    where
        F: FnOnce() -> Result<(Vec<PathBuf>, u64)> + Send + 'static,
    {
        let inner = if background {
            Job::spawn(work)
        } else {
            py.detach(|| Job::run_here(work))
        };
        PyJob { inner }
    }
}

#[pymethods]
impl PyJob {
    /// Waits for the write to end, at most `timeout` seconds; returns whether it ended.
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

    /// Whether the write has ended (successfully or not).
    fn done(&self) -> bool {
        self.inner.is_done()
    }

    /// Waits for the write, then returns `(paths, bytes, seconds)` or raises its error.
    fn result(&self, py: Python<'_>) -> PyResult<(Vec<String>, u64, f64)> {
        self.wait(py, None)?;
        match self.inner.outcome().expect("finished job has an outcome") {
            Ok(r) => {
                let paths = r
                    .paths
                    .iter()
                    .map(|p| p.to_string_lossy().into_owned())
                    .collect();
                Ok((paths, r.bytes, r.seconds))
            }
            Err(e) => Err(to_py_err(py, &e)),
        }
    }

    /// Waits for the write, then returns its error as an exception object, or None.
    fn exception(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        self.wait(py, None)?;
        Ok(
            match self.inner.outcome().expect("finished job has an outcome") {
                Ok(_) => None,
                Err(e) => Some(to_py_err(py, &e).into_value(py).into_any()),
            },
        )
    }

    fn __repr__(&self) -> String {
        match self.inner.outcome() {
            None => "<fastckpt Job running>".into(),
            Some(Ok(r)) => format!(
                "<fastckpt Job done: {} bytes in {:.3} s>",
                r.bytes, r.seconds
            ),
            Some(Err(e)) => format!("<fastckpt Job failed: {e}>"),
        }
    }
}
