//! One mapping from the core's error to Python: OS errors become the builtin `OSError`
//! subclasses (Python picks FileNotFoundError, PermissionError, ... from the errno), the
//! rest become `fastckpt.CheckpointError` subclasses.

use fastckpt_core::Error;
use pyo3::exceptions::{PyOSError, PyRuntimeError};
use pyo3::prelude::*;

fn fastckpt_exception(py: Python<'_>, name: &str, msg: String) -> PyErr {
    match py.import("fastckpt._errors").and_then(|m| m.getattr(name)) {
        Ok(cls) => match cls.call1((msg.clone(),)) {
            Ok(exc) => PyErr::from_value(exc),
            Err(e) => e,
        },
        Err(_) => PyRuntimeError::new_err(msg),
    }
}

fn cancelled_error(py: Python<'_>, msg: String) -> PyErr {
    match py
        .import("concurrent.futures")
        .and_then(|m| m.getattr("CancelledError"))
        .and_then(|cls| cls.call1((msg.clone(),)))
    {
        Ok(exc) => PyErr::from_value(exc),
        Err(_) => PyRuntimeError::new_err(msg),
    }
}

pub fn to_py_err(py: Python<'_>, err: &Error) -> PyErr {
    match err {
        Error::Io { op, path, source } => match source.raw_os_error() {
            // OSError(errno, strerror, filename) is turned into the matching subclass.
            Some(errno) => PyOSError::new_err((
                errno,
                format!("{} (while trying to {op})", strip_os_suffix(source)),
                path.to_string_lossy().into_owned(),
            )),
            None => fastckpt_exception(py, "CheckpointError", err.to_string()),
        },
        Error::InvalidInput(msg) => fastckpt_exception(py, "CheckpointContentError", msg.clone()),
        Error::Corrupt { .. } => fastckpt_exception(py, "CheckpointContentError", err.to_string()),
        Error::Cancelled => cancelled_error(py, err.to_string()),
    }
}

/// `io::Error`'s Display adds " (os error N)"; Python prints the errno itself.
fn strip_os_suffix(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.rfind(" (os error ") {
        Some(i) => s[..i].to_owned(),
        None => s,
    }
}
