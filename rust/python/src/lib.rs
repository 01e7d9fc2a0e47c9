//! `fastckpt._fastckpt`: the whole Python boundary. Arrays are borrowed while attached,
//! owned by the write job (so nothing relies on the caller keeping them alive), and every
//! byte of I/O runs detached from the interpreter. Data crosses as small typed classes
//! (`PlannedFile`, `Node`, `Attr`, `WriteOptions`, `WriteReport`, `HeaderTensor`), errors
//! through one mapping (`errors.rs`).

mod arrays;
mod device;
mod errors;
mod job;
mod memory;
mod nodes;
mod options;
mod planned;
mod reading;
mod sources;
mod testing;

use fastckpt_core::io;
use pyo3::prelude::*;
use pyo3::types::PyDict;

/// The module's public names (the stub's `__all__`).
const PUBLIC: [&str; 37] = [
    "DEFAULT_BACKGROUND_THREADS",
    "DEFAULT_THREADS",
    "DTYPES",
    "ZSTD_DEFAULT_LEVEL",
    "Attr",
    "HeaderTensor",
    "Job",
    "Node",
    "PinnedHost",
    "PlannedFile",
    "Progress",
    "SourceFile",
    "SourceTensor",
    "WriteOptions",
    "WriteReport",
    "copy_from_dlpack",
    "copy_into",
    "crc32_of_range",
    "crc32c",
    "crc32c_of_frames",
    "crc32c_of_ranges",
    "cuda_available",
    "is_temp_name",
    "pin_host",
    "plan_bytes",
    "plan_hdf5",
    "plan_keras",
    "plan_safetensors",
    "plan_zstd",
    "prefault",
    "read_into",
    "read_zstd_into",
    "reserve_spare",
    "safetensors_header",
    "sweep_stale_temps",
    "write",
    "zstd_header",
];

#[pymodule]
fn _fastckpt(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<job::PyJob>()?;
    m.add_class::<job::PyWriteReport>()?;
    m.add_class::<options::PyWriteOptions>()?;
    m.add_class::<planned::PyPlannedFile>()?;
    m.add_class::<nodes::PyNode>()?;
    m.add_class::<nodes::PyAttr>()?;
    m.add_class::<reading::PyHeaderTensor>()?;
    m.add_class::<sources::PySourceFile>()?;
    m.add_class::<sources::PySourceTensor>()?;
    m.add_class::<sources::PyProgress>()?;
    m.add_function(wrap_pyfunction!(planned::plan_zstd, m)?)?;
    m.add_function(wrap_pyfunction!(reading::read_zstd_into, m)?)?;
    m.add_function(wrap_pyfunction!(reading::crc32c_of_ranges, m)?)?;
    m.add_function(wrap_pyfunction!(reading::crc32c_of_frames, m)?)?;
    m.add_function(wrap_pyfunction!(reading::crc32c, m)?)?;
    m.add_function(wrap_pyfunction!(reading::zstd_header, m)?)?;
    m.add_class::<device::PyPinnedHost>()?;
    m.add_function(wrap_pyfunction!(planned::plan_safetensors, m)?)?;
    m.add_function(wrap_pyfunction!(planned::plan_hdf5, m)?)?;
    m.add_function(wrap_pyfunction!(planned::plan_keras, m)?)?;
    m.add_function(wrap_pyfunction!(planned::plan_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(planned::write, m)?)?;
    m.add_function(wrap_pyfunction!(reading::read_into, m)?)?;
    m.add_function(wrap_pyfunction!(reading::crc32_of_range, m)?)?;
    m.add_function(wrap_pyfunction!(reading::safetensors_header, m)?)?;
    m.add_function(wrap_pyfunction!(reading::sweep_stale_temps, m)?)?;
    m.add_function(wrap_pyfunction!(reading::is_temp_name, m)?)?;
    m.add_function(wrap_pyfunction!(memory::copy_into, m)?)?;
    m.add_function(wrap_pyfunction!(memory::prefault, m)?)?;
    m.add_function(wrap_pyfunction!(memory::reserve_spare, m)?)?;
    m.add_function(wrap_pyfunction!(memory::release_mappings, m)?)?;
    m.add_function(wrap_pyfunction!(memory::map_kept, m)?)?;
    m.add_function(wrap_pyfunction!(memory::kept_mappings, m)?)?;
    m.add_function(wrap_pyfunction!(memory::kept_region, m)?)?;
    m.add_class::<memory::PyKeptRegion>()?;
    m.add_function(wrap_pyfunction!(device::copy_from_dlpack, m)?)?;
    m.add_function(wrap_pyfunction!(device::cuda_available, m)?)?;
    m.add_function(wrap_pyfunction!(device::pin_host, m)?)?;
    m.add("DEFAULT_THREADS", io::default_threads())?;
    m.add(
        "DEFAULT_BACKGROUND_THREADS",
        io::default_background_threads(),
    )?;
    let dtypes = PyDict::new(m.py());
    for d in fastckpt_core::DType::ALL {
        dtypes.set_item(d.numpy_name(), d.size())?;
    }
    m.add("DTYPES", dtypes)?;
    m.add(
        "ZSTD_DEFAULT_LEVEL",
        fastckpt_core::format::zstd::DEFAULT_LEVEL,
    )?;
    m.add("__all__", PUBLIC.to_vec())?;
    testing::register(m)
}
