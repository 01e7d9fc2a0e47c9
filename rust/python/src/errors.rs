//! One mapping from the core's error to Python: OS errors become the builtin `OSError`
//! subclasses (Python picks FileNotFoundError, PermissionError, ... from the errno), the
//! rest become `fastckpt.CheckpointError` subclasses (imported once, then cached), and a
//! write dropped before it began `concurrent.futures.CancelledError`.

use fastckpt_core::Error;
use pyo3::exceptions::PyOSError;
use pyo3::prelude::*;

mod classes {
    pyo3::import_exception!(fastckpt._errors, CheckpointError);
    pyo3::import_exception!(fastckpt._errors, CheckpointContentError);
    pyo3::import_exception!(concurrent.futures, CancelledError);
}

pub fn to_py_err(err: &Error) -> PyErr {
    match err {
        Error::Io { op, path, source } => match source.raw_os_error() {
            // OSError(errno, strerror, filename) is turned into the matching subclass.
            Some(errno) => PyOSError::new_err((
                errno,
                format!("{} (while trying to {op})", strip_os_suffix(source)),
                path.to_string_lossy().into_owned(),
            )),
            // A damaged source found while a file was written from it (a conversion).
            None if source.kind() == std::io::ErrorKind::InvalidData => {
                classes::CheckpointContentError::new_err(err.to_string())
            }
            None => classes::CheckpointError::new_err(err.to_string()),
        },
        Error::InvalidInput(_) | Error::Corrupt { .. } => {
            classes::CheckpointContentError::new_err(err.to_string())
        }
        Error::Cancelled => classes::CancelledError::new_err(err.to_string()),
        Error::Device { .. } => classes::CheckpointError::new_err(err.to_string()),
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
