//! numpy arrays in, core tensors out: checked once while attached, then owned by the job.

use std::sync::Arc;

use fastckpt_core::{DType, Tensor, TensorBytes};
use numpy::npyffi::{objects::_PyArray_GET_ITEM_DATA, NPY_ARRAY_WRITEABLE};
use numpy::{PyArrayDescrMethods, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

use crate::errors::to_py_err;
use crate::sources::PySourceTensor;

/// A numpy array's bytes, kept alive by a reference to the array.
struct ArrayBytes {
    _owner: Py<PyAny>,
    ptr: *const u8,
    len: usize,
}

// SAFETY: the array object is kept alive by `_owner` (its data never moves while it lives),
// and fastckpt only reads the bytes. Callers hand us arrays they will not mutate until the
// job ends: the engine's snapshot buffers are not reused before then.
unsafe impl Send for ArrayBytes {}
unsafe impl Sync for ArrayBytes {}

impl TensorBytes for ArrayBytes {
    fn bytes(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: see the Send/Sync note: ptr..ptr+len is the live array's buffer.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

fn dtype_of(name: &str, arr: &Bound<'_, PyUntypedArray>) -> PyResult<DType> {
    let descr = arr.dtype();
    // Read straight from the descriptor: no attribute lookups on the common path, which
    // matters for models with thousands of small variables.
    let dtype = match (descr.kind(), descr.itemsize()) {
        (b'b', 1) => Some(DType::Bool),
        (b'u', 1) => Some(DType::U8),
        (b'u', 2) => Some(DType::U16),
        (b'u', 4) => Some(DType::U32),
        (b'u', 8) => Some(DType::U64),
        (b'i', 1) => Some(DType::I8),
        (b'i', 2) => Some(DType::I16),
        (b'i', 4) => Some(DType::I32),
        (b'i', 8) => Some(DType::I64),
        (b'f', 2) => Some(DType::F16),
        (b'f', 4) => Some(DType::F32),
        (b'f', 8) => Some(DType::F64),
        // ml_dtypes' bfloat16 is a user-defined numpy type: recognise it by name.
        (_, 2) if descr.getattr("name")?.extract::<String>()? == "bfloat16" => Some(DType::BF16),
        _ => None,
    };
    let dtype = match dtype {
        Some(d) => d,
        None => {
            let dtype_name: String = descr.getattr("name")?.extract()?;
            let supported: Vec<_> = DType::ALL.iter().map(|d| d.numpy_name()).collect();
            return Err(PyTypeError::new_err(format!(
                "cannot save {name}: dtype {dtype_name} is not supported (supported: {})",
                supported.join(", ")
            )));
        }
    };
    if descr.is_native_byteorder() == Some(false) {
        return Err(PyValueError::new_err(format!(
            "cannot save {name}: the array is big-endian; convert it with arr.astype(arr.dtype.newbyteorder('<'))"
        )));
    }
    Ok(dtype)
}

/// The array's data pointer and flags.
fn array_fields(arr: &Bound<'_, PyUntypedArray>) -> (*mut std::ffi::c_char, i32) {
    // SAFETY: `arr` is a live numpy array, so its object fields are valid to read.
    unsafe {
        let fields = _PyArray_GET_ITEM_DATA(arr.as_array_ptr());
        ((*fields).data, (*fields).flags)
    }
}

/// Converts `(name, array)` pairs. Arrays must be numpy, C-contiguous and of a dtype a
/// checkpoint can hold, or `SourceTensor`s (read from their file as they are written);
/// errors name the tensor.
pub fn tensors_from_py(items: Vec<(String, Bound<'_, PyAny>)>) -> PyResult<Vec<Tensor>> {
    items
        .into_iter()
        .map(|(name, obj)| {
            if let Ok(source) = obj.cast::<PySourceTensor>() {
                let s = source.get();
                return Tensor::from_payload(name, s.dtype, s.shape.clone(), s.payload.clone())
                    .map_err(|e| to_py_err(&e));
            }
            let arr = obj.cast::<PyUntypedArray>().map_err(|_| {
                PyTypeError::new_err(format!(
                    "cannot save {name}: expected a numpy array, got {}",
                    obj.get_type().name().map(|n| n.to_string()).unwrap_or_default()
                ))
            })?;
            let dtype = dtype_of(&name, arr)?;
            if !arr.is_c_contiguous() {
                return Err(PyValueError::new_err(format!(
                    "cannot save {name}: the array is not C-contiguous; pass np.ascontiguousarray(...)"
                )));
            }
            let shape: Vec<u64> = arr.shape().iter().map(|&d| d as u64).collect();
            let len = arr.len() * dtype.size();
            let ptr = array_fields(arr).0 as *const u8;
            let bytes = ArrayBytes {
                _owner: arr.clone().into_any().unbind(),
                ptr,
                len,
            };
            Tensor::new(name, dtype, shape, Arc::new(bytes)).map_err(|e| to_py_err(&e))
        })
        .collect()
}

/// The buffer of an array written into (`what` number `index`, for the error): C-contiguous
/// and writable.
pub fn writable_dest(
    arr: &Bound<'_, PyUntypedArray>,
    what: &str,
    index: usize,
) -> PyResult<(*mut u8, usize)> {
    let (ptr, flags) = array_fields(arr);
    if !arr.is_c_contiguous() || flags & NPY_ARRAY_WRITEABLE == 0 {
        return Err(PyValueError::new_err(format!(
            "{what} {index} must be a writable C-contiguous array"
        )));
    }
    let itemsize: usize = arr.dtype().getattr("itemsize")?.extract()?;
    Ok((ptr as *mut u8, arr.len() * itemsize))
}

/// The buffer of a source array for copying: C-contiguous (it may be read-only).
pub fn readable_source(
    arr: &Bound<'_, PyUntypedArray>,
    index: usize,
) -> PyResult<(*const u8, usize)> {
    if !arr.is_c_contiguous() {
        return Err(PyValueError::new_err(format!(
            "copy source {index} must be a C-contiguous array"
        )));
    }
    let itemsize: usize = arr.dtype().getattr("itemsize")?.extract()?;
    Ok((array_fields(arr).0 as *const u8, arr.len() * itemsize))
}

/// A writable array kept alive for a background job that writes into its buffer.
pub struct HeldArray {
    pub _array: Py<PyAny>,
    pub ptr: *mut u8,
    pub len: usize,
}

// SAFETY: `_array` keeps the buffer alive (it never moves while the array lives); the job
// only does what its contract says with `ptr..ptr+len`, and drops `_array` without
// touching Python (PyO3 defers the decref until the interpreter is held).
unsafe impl Send for HeldArray {}
