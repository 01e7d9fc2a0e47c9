//! File formats. Each one plans a whole file as a [`crate::Layout`] and, where fastckpt reads
//! it natively, parses and validates what a file claims before anything trusts it.

pub mod hdf5;
pub mod safetensors;
pub mod zip;
pub mod zstd;
pub mod zstd_decode;
