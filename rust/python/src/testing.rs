//! `fastckpt._fastckpt.testing`: hooks for the test suite, present only in builds with the
//! `fault-injection` feature (`make dev`); a wheel has none.

use fastckpt_core::io::fault;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

/// Makes every later save fail at `stage` ("write", "fsync", "rename", "dir_fsync"), or
/// clears it with None.
#[pyfunction]
#[pyo3(signature = (stage))]
fn inject_fault(stage: Option<&str>) -> PyResult<()> {
    let stage = stage
        .map(|s| {
            fault::Stage::parse(s)
                .ok_or_else(|| PyValueError::new_err(format!("unknown stage {s:?}")))
        })
        .transpose()?;
    fault::arm(stage);
    Ok(())
}

/// Sleeps `ms` milliseconds before every payload write of later saves (0 turns it off), so
/// a test can act while a save is surely in progress.
#[pyfunction]
fn inject_delay(ms: u64) {
    fault::set_delay(ms);
}

/// Adds the `testing` submodule to `parent`, where the build has the hooks.
pub fn register(parent: &Bound<'_, PyModule>) -> PyResult<()> {
    if !fault::ENABLED {
        return Ok(());
    }
    let m = PyModule::new(parent.py(), "testing")?;
    m.add_function(wrap_pyfunction!(inject_fault, &m)?)?;
    m.add_function(wrap_pyfunction!(inject_delay, &m)?)?;
    parent.add_submodule(&m)
}
