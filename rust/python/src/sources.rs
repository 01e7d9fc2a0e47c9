//! Tensors read from another checkpoint while a file is written (`fastckpt convert`), and
//! the count of bytes done that progress reports read.

use std::path::PathBuf;
use std::sync::Arc;

use fastckpt_core::io::Progress;
use fastckpt_core::source::{FileRange, SourceFile, ZstdFrame};
use fastckpt_core::{DType, Payload};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::errors::to_py_err;

/// A checkpoint file that tensors are copied from, opened once for all of them.
#[pyclass(name = "SourceFile", module = "fastckpt._fastckpt", frozen)]
pub struct PySourceFile {
    inner: Arc<SourceFile>,
}

#[pymethods]
impl PySourceFile {
    #[new]
    fn new(path: PathBuf) -> PyResult<Self> {
        Ok(PySourceFile {
            inner: SourceFile::open(&path).map_err(|e| to_py_err(&e))?,
        })
    }

    #[getter]
    fn path(&self) -> PathBuf {
        self.inner.path().to_path_buf()
    }

    /// The tensor of `dtype` and `shape` stored at `offset`: as it is, or with `stored`
    /// as one zstd frame of that many bytes.
    #[pyo3(signature = (dtype, shape, offset, *, stored=None))]
    fn tensor(
        &self,
        dtype: &str,
        shape: Vec<u64>,
        offset: u64,
        stored: Option<u64>,
    ) -> PyResult<PySourceTensor> {
        let dt = DType::from_numpy_name(dtype).ok_or_else(|| {
            PyValueError::new_err(format!("unsupported dtype. Received: dtype={dtype:?}"))
        })?;
        let nbytes = shape
            .iter()
            .try_fold(dt.size() as u64, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| PyValueError::new_err(format!("shape {shape:?} overflows")))?;
        let file = self.inner.clone();
        let payload: Arc<dyn Payload> = match stored {
            None => Arc::new(FileRange::new(file, offset, nbytes).map_err(|e| to_py_err(&e))?),
            Some(stored) => {
                Arc::new(ZstdFrame::new(file, offset, stored, nbytes).map_err(|e| to_py_err(&e))?)
            }
        };
        Ok(PySourceTensor {
            dtype: dt,
            shape,
            payload,
        })
    }
}

/// One tensor of a source file, read piece by piece when the file it is planned into is
/// written; plan functions take it wherever they take an array.
#[pyclass(name = "SourceTensor", module = "fastckpt._fastckpt", frozen)]
pub struct PySourceTensor {
    pub dtype: DType,
    pub shape: Vec<u64>,
    pub payload: Arc<dyn Payload>,
}

#[pymethods]
impl PySourceTensor {
    /// The numpy name of its dtype.
    #[getter]
    fn dtype(&self) -> &'static str {
        self.dtype.numpy_name()
    }

    #[getter]
    fn shape(&self) -> Vec<u64> {
        self.shape.clone()
    }

    #[getter]
    fn nbytes(&self) -> u64 {
        self.payload.len()
    }
}

/// A count of bytes done, read while a write or a read runs (for progress reports).
#[pyclass(name = "Progress", module = "fastckpt._fastckpt", frozen)]
#[derive(Default)]
pub struct PyProgress {
    pub inner: Progress,
}

#[pymethods]
impl PyProgress {
    #[new]
    fn new() -> Self {
        PyProgress::default()
    }

    /// Bytes done so far.
    #[getter]
    fn bytes(&self) -> u64 {
        self.inner.get()
    }

    /// Counts `n` more bytes done (work done in Python, such as h5py's own reads).
    fn add(&self, n: u64) {
        self.inner.add(n)
    }
}
