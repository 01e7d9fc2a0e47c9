//! fastckpt-core: turn an ordered list of host tensors into a durable checkpoint file.
//!
//! The pipeline is: a format *plans* the whole file (every offset decided before a byte is
//! written, see [`layout`]), then [`io::write_file`] writes the payloads with N threads by
//! positioned writes into a temp file beside the target, writes the metadata, fdatasyncs,
//! renames over the target and fsyncs the folder. [`job::Job`] runs that in the background.
//!
//! Nothing here knows about Python: the binding crate hands in [`Tensor`]s whose bytes are
//! kept alive by whatever owner it chooses.

pub mod cuda;
pub mod error;
pub mod format;
pub mod host;
pub mod io;
pub mod job;
pub mod layout;
pub mod source;
pub mod tensor;

pub use error::{Error, Result};
pub use job::{Job, Output, WriteReport};
pub use layout::{Digest, Layout, PlannedFile, Region, Slot};
pub use tensor::{DType, Payload, Tensor, TensorBytes};
