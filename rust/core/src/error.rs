//! One error type for the core; the binding maps it to Python exceptions in one place.

use std::io;
use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system error, with what we were doing and to which path.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The caller asked for something that cannot be written exactly.
    #[error("{0}")]
    InvalidInput(String),
    /// A file's content is not what its format promises (truncated, corrupt, hostile).
    #[error("{path}: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    /// A queued write was dropped before it began (a newer save replaced it).
    #[error("the write was cancelled before it began")]
    Cancelled,
    /// A CUDA driver call failed (a device-to-host snapshot copy, pinning host memory).
    #[error("the CUDA driver's {call} failed: {name} ({code})")]
    Device {
        call: &'static str,
        code: i32,
        name: String,
    },
}

impl Error {
    pub fn invalid(msg: impl Into<String>) -> Error {
        Error::InvalidInput(msg.into())
    }

    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Error {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }

    pub fn corrupt(path: impl Into<PathBuf>, reason: impl Into<String>) -> Error {
        Error::Corrupt {
            path: path.into(),
            reason: reason.into(),
        }
    }
}
