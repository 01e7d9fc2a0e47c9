//! What the oracle tests share: the Python interpreter that runs the oracles.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The interpreter with the oracles' libraries (h5py, numpy, Keras): `FASTCKPT_PYTHON`,
/// else the repository's `.venv` (which `make test` creates). Neither is a failure: these
/// tests never skip.
pub fn python() -> PathBuf {
    let py = match std::env::var_os("FASTCKPT_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python"),
    };
    let ok = Command::new(&py)
        .args(["-c", "import h5py, numpy"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "no Python with h5py and numpy at {}: set FASTCKPT_PYTHON, or run `make test` to \
         create the repository's .venv; these tests do not skip",
        py.display()
    );
    py
}
