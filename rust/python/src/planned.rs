//! Files planned to the byte (stage 4) and their write (stages 5-6): `plan_*` turns arrays
//! and a format's description into a `PlannedFile`; `write` writes one, or a set that
//! commits together (the last file last), as one job.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;

use fastckpt_core::format::zip::{self, Member, ZipOptions};
use fastckpt_core::format::{hdf5, safetensors, zstd};
use fastckpt_core::io::{self, Body, SetFile};
use fastckpt_core::{Layout, Output, PlannedFile, Region, Tensor};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::arrays::tensors_from_py;
use crate::errors::to_py_err;
use crate::job::PyJob;
use crate::nodes::{nodes_to_core, PyNode};
use crate::options::PyWriteOptions;

/// What a `PlannedFile` holds until it is written.
struct Planned {
    target: PathBuf,
    content: Content,
}

enum Content {
    /// Every offset decided: the payloads go out in parallel, the metadata last.
    Laid {
        layout: Box<dyn Layout>,
        tensors: Vec<Tensor>,
    },
    /// Laid out as it is written (a compressed container); it owns its tensors.
    Streamed(Box<dyn Body>),
}

/// A file planned to the byte, waiting for `write`: it owns the arrays it will write.
#[pyclass(name = "PlannedFile", module = "fastckpt._fastckpt", frozen)]
pub struct PyPlannedFile {
    #[pyo3(get)]
    path: PathBuf,
    /// The file's length in bytes (for a compressed container, the most it can take).
    #[pyo3(get)]
    length: u64,
    planned: Mutex<Option<Planned>>,
}

#[pymethods]
impl PyPlannedFile {
    /// Where each payload held in memory goes: `(offset in the file, address of its bytes,
    /// length)`, in file order; empty for a compressed container (laid out as it is
    /// written) and once handed to `write()`.
    fn slots(&self) -> Vec<(u64, usize, u64)> {
        let planned = self.planned.lock().unwrap();
        let Some(Planned {
            content: Content::Laid { layout, tensors },
            ..
        }) = planned.as_ref()
        else {
            return Vec::new();
        };
        layout
            .slots()
            .iter()
            .filter_map(|s| {
                let t = &tensors[s.tensor];
                t.in_memory()
                    .map(|bytes| (s.offset, bytes.as_ptr() as usize, t.nbytes()))
            })
            .collect()
    }

    fn __repr__(&self) -> String {
        format!("<PlannedFile {:?}, {} bytes>", self.path, self.length)
    }
}

impl PyPlannedFile {
    fn new(target: PathBuf, layout: impl Layout + 'static, tensors: Vec<Tensor>) -> Self {
        PyPlannedFile {
            path: target.clone(),
            length: layout.file_len(),
            planned: Mutex::new(Some(Planned {
                target,
                content: Content::Laid {
                    layout: Box::new(layout),
                    tensors,
                },
            })),
        }
    }

    fn streamed(target: PathBuf, body: impl Body + 'static) -> Self {
        PyPlannedFile {
            path: target.clone(),
            length: body.max_len(),
            planned: Mutex::new(Some(Planned {
                target,
                content: Content::Streamed(Box::new(body)),
            })),
        }
    }

    fn take(&self) -> PyResult<Planned> {
        self.planned.lock().unwrap().take().ok_or_else(|| {
            PyValueError::new_err(format!(
                "{} was handed to write() already: plan it again",
                self.path.display()
            ))
        })
    }
}

/// Plans a SafeTensors file.
#[pyfunction]
pub fn plan_safetensors(
    path: PathBuf,
    tensors: Vec<(String, Bound<'_, PyAny>)>,
    metadata: BTreeMap<String, String>,
) -> PyResult<PyPlannedFile> {
    let tensors = tensors_from_py(tensors)?;
    let layout = safetensors::plan(&tensors, metadata).map_err(|e| to_py_err(&e))?;
    Ok(PyPlannedFile::new(path, layout, tensors))
}

/// Plans a zstd container (`.zst.safetensors`): each tensor one zstd frame, compressed in
/// parallel as the file is written.
#[pyfunction]
#[pyo3(signature = (path, tensors, metadata, *, level=zstd::DEFAULT_LEVEL))]
pub fn plan_zstd(
    path: PathBuf,
    tensors: Vec<(String, Bound<'_, PyAny>)>,
    metadata: BTreeMap<String, String>,
    level: i32,
) -> PyResult<PyPlannedFile> {
    let tensors = tensors_from_py(tensors)?;
    let body = zstd::ZstdBody::new(tensors, metadata, level).map_err(|e| to_py_err(&e))?;
    Ok(PyPlannedFile::streamed(path, body))
}

fn hdf5_layout(
    tensors: Vec<(String, Bound<'_, PyAny>)>,
    nodes: Vec<PyRef<'_, PyNode>>,
) -> PyResult<(Vec<Tensor>, PlannedFile)> {
    let tensors = tensors_from_py(tensors)?;
    let planned = hdf5::plan(&nodes_to_core(&nodes), &tensors).map_err(|e| to_py_err(&e))?;
    Ok((tensors, planned))
}

/// Plans an HDF5 file (`.weights.h5`, legacy `.h5`) from a tree of groups and datasets.
#[pyfunction]
pub fn plan_hdf5(
    path: PathBuf,
    tensors: Vec<(String, Bound<'_, PyAny>)>,
    nodes: Vec<PyRef<'_, PyNode>>,
) -> PyResult<PyPlannedFile> {
    let (tensors, layout) = hdf5_layout(tensors, nodes)?;
    Ok(PyPlannedFile::new(path, layout, tensors))
}

/// Plans a Keras `.keras` zip, written in one pass: the `before` members, then
/// `weights_name` holding the HDF5 tree (planned in place, no in-memory copy), then the
/// `after` members.
#[pyfunction]
#[pyo3(signature = (path, tensors, nodes, before, after, *, weights_name="model.weights.h5"))]
pub fn plan_keras(
    path: PathBuf,
    tensors: Vec<(String, Bound<'_, PyAny>)>,
    nodes: Vec<PyRef<'_, PyNode>>,
    before: Vec<(String, Vec<u8>)>,
    after: Vec<(String, Vec<u8>)>,
    weights_name: &str,
) -> PyResult<PyPlannedFile> {
    let (tensors, weights) = hdf5_layout(tensors, nodes)?;
    let bytes_member = |(name, data): (String, Vec<u8>)| Member::Bytes { name, data };
    let members: Vec<Member> = before
        .into_iter()
        .map(bytes_member)
        .chain([Member::Planned {
            name: weights_name.to_owned(),
            file: weights,
        }])
        .chain(after.into_iter().map(bytes_member))
        .collect();
    let layout = zip::plan(members, &tensors, &ZipOptions::default()).map_err(|e| to_py_err(&e))?;
    Ok(PyPlannedFile::new(path, layout, tensors))
}

/// Plans a file holding `data`: a small companion file, such as a sharded checkpoint's
/// index.
#[pyfunction]
pub fn plan_bytes(path: PathBuf, data: Vec<u8>) -> PyPlannedFile {
    let layout = PlannedFile {
        len: data.len() as u64,
        regions: vec![Region {
            offset: 0,
            bytes: data,
        }],
        slots: Vec::new(),
    };
    PyPlannedFile::new(path, layout, Vec::new())
}

/// Writes `files` durably and atomically as `options` say: on a writer thread in the
/// background (once `queue_after` has ended, if given), else here, detached from the
/// interpreter either way; returns the job (already finished unless in the background).
/// One file is written and committed alone; several commit together, the last one last
/// (`io::write_set`). The job owns the tensors (and so the arrays).
#[pyfunction]
#[pyo3(signature = (files, *, options=None))]
pub fn write(
    py: Python<'_>,
    files: Vec<PyRef<'_, PyPlannedFile>>,
    options: Option<PyRef<'_, PyWriteOptions>>,
) -> PyResult<PyJob> {
    let sync = PyWriteOptions::synchronous();
    let options = options.as_deref().unwrap_or(&sync);
    if files.is_empty() {
        return Err(PyValueError::new_err(
            "write() needs at least one PlannedFile",
        ));
    }
    let planned = files
        .iter()
        .map(|f| f.take())
        .collect::<PyResult<Vec<Planned>>>()?;
    let opts = options.core();
    let effort = opts.width.effort.clone();
    let work = move || {
        if let [one] = planned.as_slice() {
            let written = match &one.content {
                Content::Laid { layout, tensors } => {
                    io::write_file_keeping(&one.target, layout.as_ref(), tensors, &opts)?
                }
                Content::Streamed(body) => io::write_body(&one.target, body.as_ref(), &opts)?,
            };
            return Ok(Output {
                paths: vec![one.target.clone()],
                bytes: written.len,
                kept: written.kept,
            });
        }
        let set = planned
            .iter()
            .map(|p| match &p.content {
                Content::Laid { layout, tensors } => Ok(SetFile {
                    target: &p.target,
                    layout: layout.as_ref(),
                    tensors,
                }),
                Content::Streamed(_) => Err(fastckpt_core::Error::invalid(format!(
                    "{}: a compressed container is written alone, not in a set",
                    p.target.display()
                ))),
            })
            .collect::<fastckpt_core::Result<Vec<SetFile>>>()?;
        let written = io::write_set(&set, &opts)?;
        // The record (the last file) is the main one: first.
        let mut paths: Vec<PathBuf> = planned.iter().map(|p| p.target.clone()).collect();
        paths.rotate_right(1);
        Ok(Output {
            paths,
            bytes: written.lens.iter().sum(),
            kept: written.kept,
        })
    };
    Ok(PyJob::start(py, work, options.when(), effort))
}
