//! Snapshots of tensors in accelerator memory: DLPack capsules in, bytes copied into the
//! snapshot's host buffers by one batched device-to-host transfer (`fastckpt_core::cuda`),
//! and the buffers pinned once for it.
//!
//! A capsule is read, never consumed: the caller keeps it until the copy returns, and the
//! capsule's own destructor then hands the tensor back to the framework that made it
//! (JAX keeps a buffer with a live capsule from being donated to the next step).

use std::ffi::{c_void, CStr};

use fastckpt_core::cuda::{self, DeviceCopy, Registered};
use fastckpt_core::host::{self, CopyItem};
use fastckpt_core::io;
use numpy::PyUntypedArray;
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyCapsule;

use crate::arrays::writable_dest;
use crate::errors::to_py_err;
use crate::options::thread_count;

// DLPack's C structs (dlpack.h, v0.8 and v1.x), as far as fastckpt reads them; fields it
// does not read are there for the layout.
#[repr(C)]
struct DlDevice {
    device_type: i32,
    device_id: i32,
}

#[repr(C)]
#[allow(dead_code)]
struct DlDataType {
    code: u8,
    bits: u8,
    lanes: u16,
}

#[repr(C)]
#[allow(dead_code)]
struct DlTensor {
    data: *mut c_void,
    device: DlDevice,
    ndim: i32,
    dtype: DlDataType,
    shape: *const i64,
    strides: *const i64,
    byte_offset: u64,
}

/// `DLManagedTensor`, in a capsule named "dltensor".
#[repr(C)]
#[allow(dead_code)]
struct DlManagedTensor {
    dl_tensor: DlTensor,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DlManagedTensor)>,
}

/// `DLManagedTensorVersioned` (DLPack 1.x), in a capsule named "dltensor_versioned".
#[repr(C)]
#[allow(dead_code)]
struct DlManagedTensorVersioned {
    version_major: u32,
    version_minor: u32,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DlManagedTensorVersioned)>,
    flags: u64,
    dl_tensor: DlTensor,
}

const KDL_CPU: i32 = 1;
const KDL_CUDA: i32 = 2;
const KDL_CUDA_HOST: i32 = 3;
const KDL_CUDA_MANAGED: i32 = 13;

/// Where a tensor's bytes are.
enum Source {
    Host(*const u8),
    Cuda { device: i32, ptr: u64 },
}

/// The bytes a DLPack capsule describes: where they are, and how many. Only dense,
/// row-major tensors are accepted (the layout a snapshot buffer has).
fn dlpack_source(capsule: &Bound<'_, PyAny>, index: usize) -> PyResult<(Source, usize)> {
    let capsule = capsule.cast::<PyCapsule>().map_err(|_| {
        PyTypeError::new_err(format!("copy source {index} must be a DLPack capsule"))
    })?;
    let name = capsule.name()?;
    // SAFETY: a capsule's name is a NUL-terminated string that lives as long as it does.
    let name: Option<&CStr> = name.map(|n| unsafe { n.as_cstr() });
    let tensor: *const DlTensor = match name.map(CStr::to_bytes) {
        Some(b"dltensor") => {
            let ptr = capsule.pointer_checked(Some(c"dltensor"))?;
            // SAFETY: a "dltensor" capsule holds a DLManagedTensor (the DLPack protocol).
            unsafe { &(*ptr.as_ptr().cast::<DlManagedTensor>()).dl_tensor }
        }
        Some(b"dltensor_versioned") => {
            let ptr = capsule.pointer_checked(Some(c"dltensor_versioned"))?;
            let managed = ptr.as_ptr().cast::<DlManagedTensorVersioned>();
            // SAFETY: a "dltensor_versioned" capsule holds a DLManagedTensorVersioned.
            let major = unsafe { (*managed).version_major };
            if major != 1 {
                return Err(PyValueError::new_err(format!(
                    "copy source {index}: DLPack version {major} is not supported"
                )));
            }
            // SAFETY: as above; version 1.x has this layout.
            unsafe { &(*managed).dl_tensor }
        }
        _ => {
            return Err(PyValueError::new_err(format!(
                "copy source {index}: not an unconsumed DLPack capsule"
            )))
        }
    };
    // SAFETY: the capsule (alive for this call) owns the tensor and its shape arrays.
    let t = unsafe { &*tensor };
    if t.dtype.lanes != 1 || t.dtype.bits % 8 != 0 || t.ndim < 0 {
        return Err(PyValueError::new_err(format!(
            "copy source {index}: a DLPack tensor of {} lanes of {} bits in {} dimensions",
            t.dtype.lanes, t.dtype.bits, t.ndim
        )));
    }
    let ndim = t.ndim as usize;
    let shape: &[i64] = if ndim == 0 {
        &[]
    } else {
        // SAFETY: DLPack's shape holds `ndim` entries.
        unsafe { std::slice::from_raw_parts(t.shape, ndim) }
    };
    if shape.iter().any(|&d| d < 0) {
        return Err(PyValueError::new_err(format!(
            "copy source {index}: a negative dimension"
        )));
    }
    let elements = shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d as usize))
        .ok_or_else(|| PyValueError::new_err(format!("copy source {index}: too large")))?;
    // An empty tensor has no byte to copy, whatever strides it reports.
    if !t.strides.is_null() && ndim > 0 && elements > 0 {
        // SAFETY: DLPack's strides, when given, hold `ndim` entries (in elements).
        let strides = unsafe { std::slice::from_raw_parts(t.strides, ndim) };
        let mut expected = 1i64;
        for (&dim, &stride) in shape.iter().zip(strides).rev() {
            // A dimension of 1 (or 0) may have any stride: it is never stepped.
            if dim > 1 && stride != expected {
                return Err(PyValueError::new_err(format!(
                    "copy source {index}: the tensor is not dense and row-major"
                )));
            }
            expected = expected.saturating_mul(dim.max(1));
        }
    }
    let len = elements
        .checked_mul(usize::from(t.dtype.bits / 8))
        .ok_or_else(|| PyValueError::new_err(format!("copy source {index}: too large")))?;
    let address = (t.data as u64).wrapping_add(t.byte_offset);
    let source = match t.device.device_type {
        KDL_CPU | KDL_CUDA_HOST => Source::Host(address as usize as *const u8),
        KDL_CUDA | KDL_CUDA_MANAGED => Source::Cuda {
            device: t.device.device_id,
            ptr: address,
        },
        other => {
            return Err(PyValueError::new_err(format!(
                "copy source {index}: DLPack device type {other} is not supported \
                 (CPU and CUDA are)"
            )))
        }
    };
    Ok((source, len))
}

/// Copies `(capsule, destination)` pairs: each DLPack capsule's tensor (on the host, or on
/// a CUDA device) into a writable C-contiguous numpy array of the same number of bytes,
/// detached from the interpreter. Host tensors are copied on every core (at most
/// `threads`); device tensors in one batched transfer (see `fastckpt_core::cuda`). The
/// capsules are not consumed: they must stay alive, and unchanged, for the call.
#[pyfunction]
#[pyo3(signature = (pairs, *, threads=None))]
pub fn copy_from_dlpack(
    py: Python<'_>,
    pairs: Vec<(Bound<'_, PyAny>, Bound<'_, PyUntypedArray>)>,
    threads: Option<usize>,
) -> PyResult<()> {
    let threads = thread_count(threads, io::default_threads())?;
    let mut on_host = Vec::new();
    let mut on_device = Vec::new();
    for (i, (capsule, dst)) in pairs.iter().enumerate() {
        let (source, len) = dlpack_source(capsule, i)?;
        let (dst, dst_len) = writable_dest(dst, "copy destination", i)?;
        if dst_len != len {
            return Err(PyValueError::new_err(format!(
                "copy {i}: the source has {len} bytes, the destination {dst_len}"
            )));
        }
        match source {
            Source::Host(src) => on_host.push(CopyItem { src, dst, len }),
            Source::Cuda { device, ptr } => on_device.push(DeviceCopy {
                device,
                src: ptr,
                dst,
                len,
            }),
        }
    }
    let driver = if on_device.is_empty() {
        None
    } else {
        Some(cuda::driver().ok_or_else(|| {
            PyRuntimeError::new_err(
                "a tensor is on a CUDA device, but the CUDA driver (libcuda.so.1) \
                 cannot be loaded",
            )
        })?)
    };
    // SAFETY: every source is a live tensor its capsule (kept by `pairs`) owns, every
    // destination a live writable array `pairs` keeps, distinct by this function's contract.
    py.detach(|| {
        unsafe { host::copy_parallel(&on_host, threads) };
        match driver {
            Some(d) => unsafe { d.copy_to_host(&on_device) },
            None => Ok(()),
        }
    })
    .map_err(|e| to_py_err(&e))
}

/// Host memory pinned for the CUDA driver: the block (kept alive here) stays pinned until
/// this object is dropped.
#[pyclass(name = "PinnedHost", module = "fastckpt._fastckpt", frozen)]
pub struct PyPinnedHost {
    // Dropped first (fields drop in order): unpinned while the memory is still mapped.
    _registration: Registered,
    _block: Py<PyAny>,
}

/// Whether the CUDA driver is loaded and found a device (`FASTCKPT_CUDA=0` says no).
#[pyfunction]
pub fn cuda_available(py: Python<'_>) -> bool {
    py.detach(|| cuda::driver().is_some())
}

/// Pins `block` (a writable C-contiguous array, best page-aligned) for device-to-host
/// copies from every CUDA device; `None` where there is no CUDA driver. The returned
/// object keeps the block alive and pinned until it is dropped.
#[pyfunction]
pub fn pin_host(
    py: Python<'_>,
    block: Bound<'_, PyUntypedArray>,
) -> PyResult<Option<PyPinnedHost>> {
    let (ptr, len) = writable_dest(&block, "pinned block", 0)?;
    let Some(driver) = py.detach(cuda::driver) else {
        return Ok(None);
    };
    if len == 0 {
        return Ok(None);
    }
    let address = ptr as usize;
    // SAFETY: the block is kept alive (so mapped) by the returned object until the
    // registration, dropped first, has unpinned it.
    let registration = py
        .detach(|| unsafe { driver.register_host(address as *mut u8, len) })
        .map_err(|e| to_py_err(&e))?;
    Ok(Some(PyPinnedHost {
        _registration: registration,
        _block: block.into_any().unbind(),
    }))
}
