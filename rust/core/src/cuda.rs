//! Device-to-host copies through the CUDA driver, for snapshots of variables that live on an
//! NVIDIA GPU (JAX and TensorFlow; torch has its own API for the same, used from Python).
//!
//! A snapshot on a GPU is one batched transfer: every device's pending work is waited for
//! once (the training step that produced the values), every copy is queued on one stream
//! per device, into host buffers pinned once when they were made, and the streams are
//! waited for once. Copies into pinned memory run at the link's speed; into pageable memory
//! the driver stages them through its own pinned buffers, several times slower.
//!
//! The driver is loaded at run time (`libcuda.so.1`, installed with every NVIDIA driver):
//! fastckpt links against no CUDA library, builds and runs where there is none, and works
//! in each device's primary context, the one the frameworks use, so their device pointers
//! are valid here. Where there is no driver (or no device), [`driver`] is `None` and the
//! callers keep their host path.

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};
use std::sync::{Mutex, OnceLock};

use crate::error::{Error, Result};

type CuResult = c_int;
type CuDevice = c_int;
type CuContext = *mut c_void;
type CuStream = *mut c_void;
type CuDevicePtr = u64;

const CUDA_SUCCESS: CuResult = 0;
/// Pinned for every context, not only the one current when it was registered.
const CU_MEMHOSTREGISTER_PORTABLE: c_uint = 0x01;
/// No implicit ordering with the legacy default stream: the order is made explicit by
/// waiting for the whole device before the copies are queued.
const CU_STREAM_NON_BLOCKING: c_uint = 0x01;

/// The driver entry points fastckpt uses (the `_v2` names are the ABI the headers map the
/// plain names to since CUDA 4.0).
struct Api {
    init: unsafe extern "C" fn(c_uint) -> CuResult,
    device_get: unsafe extern "C" fn(*mut CuDevice, c_int) -> CuResult,
    primary_ctx_retain: unsafe extern "C" fn(*mut CuContext, CuDevice) -> CuResult,
    ctx_push: unsafe extern "C" fn(CuContext) -> CuResult,
    ctx_pop: unsafe extern "C" fn(*mut CuContext) -> CuResult,
    ctx_synchronize: unsafe extern "C" fn() -> CuResult,
    stream_create: unsafe extern "C" fn(*mut CuStream, c_uint) -> CuResult,
    stream_synchronize: unsafe extern "C" fn(CuStream) -> CuResult,
    memcpy_dtoh_async: unsafe extern "C" fn(*mut c_void, CuDevicePtr, usize, CuStream) -> CuResult,
    host_register: unsafe extern "C" fn(*mut c_void, usize, c_uint) -> CuResult,
    host_unregister: unsafe extern "C" fn(*mut c_void) -> CuResult,
    error_name: unsafe extern "C" fn(CuResult, *mut *const c_char) -> CuResult,
}

/// A device's primary context and the stream fastckpt copies on, made once and kept for
/// the life of the process (a handful of bytes of driver state per device).
#[derive(Clone, Copy)]
struct Device {
    ctx: CuContext,
    stream: CuStream,
}

/// The loaded CUDA driver.
pub struct Driver {
    api: Api,
    devices: Mutex<HashMap<i32, Device>>,
}

// SAFETY: the driver's handles (contexts, streams) may be used from any thread; the map of
// them is behind a mutex, and the function pointers are immutable.
unsafe impl Send for Driver {}
unsafe impl Sync for Driver {}

/// One copy of `len` bytes from device memory `src` on device `device` to host memory `dst`.
#[derive(Clone, Copy, Debug)]
pub struct DeviceCopy {
    pub device: i32,
    pub src: u64,
    pub dst: *mut u8,
    pub len: usize,
}

// SAFETY: the caller of `copy_to_host` guarantees the ranges stay valid for the call.
unsafe impl Send for DeviceCopy {}
unsafe impl Sync for DeviceCopy {}

/// The process's CUDA driver, loaded on first use; `None` where there is none, where it
/// finds no device, or where `FASTCKPT_CUDA=0` turns it off.
pub fn driver() -> Option<&'static Driver> {
    static DRIVER: OnceLock<Option<Driver>> = OnceLock::new();
    DRIVER
        .get_or_init(|| {
            let off = std::env::var("FASTCKPT_CUDA")
                .map(|v| {
                    matches!(
                        v.trim().to_ascii_lowercase().as_str(),
                        "0" | "false" | "off" | "no"
                    )
                })
                .unwrap_or(false);
            if off {
                return None;
            }
            // SAFETY: loading the system's driver library; its initialiser is the driver's.
            unsafe { Driver::load("libcuda.so.1") }
        })
        .as_ref()
}

/// The address of `name` (NUL-terminated) in the library `handle`, as a function pointer of
/// type `F`.
///
/// # Safety
/// `F` must be the C signature the library exports under that name.
unsafe fn symbol<F: Copy>(handle: *mut c_void, name: &str) -> Option<F> {
    let ptr = libc::dlsym(handle, name.as_ptr().cast());
    if ptr.is_null() {
        return None;
    }
    assert_eq!(std::mem::size_of::<F>(), std::mem::size_of::<*mut c_void>());
    // SAFETY: a function pointer of the caller's type, the size of a data pointer.
    Some(std::mem::transmute_copy::<*mut c_void, F>(&ptr))
}

impl Driver {
    /// Loads the driver from `library` and initialises it; `None` if the library is not
    /// there, lacks an entry point, or `cuInit` fails (no device, a driver too old).
    ///
    /// # Safety
    /// `library` is loaded into the process and its initialisers run.
    pub unsafe fn load(library: &str) -> Option<Driver> {
        let name = CString::new(library).ok()?;
        let handle = libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
        if handle.is_null() {
            return None;
        }
        // The library stays loaded for the life of the process: the frameworks hold it
        // too, and function pointers into it are kept.
        macro_rules! symbol {
            ($name:literal) => {
                match symbol(handle, concat!($name, "\0")) {
                    Some(f) => f,
                    None => return None,
                }
            };
        }
        let api = Api {
            init: symbol!("cuInit"),
            device_get: symbol!("cuDeviceGet"),
            primary_ctx_retain: symbol!("cuDevicePrimaryCtxRetain"),
            ctx_push: symbol!("cuCtxPushCurrent_v2"),
            ctx_pop: symbol!("cuCtxPopCurrent_v2"),
            ctx_synchronize: symbol!("cuCtxSynchronize"),
            stream_create: symbol!("cuStreamCreate"),
            stream_synchronize: symbol!("cuStreamSynchronize"),
            memcpy_dtoh_async: symbol!("cuMemcpyDtoHAsync_v2"),
            host_register: symbol!("cuMemHostRegister_v2"),
            host_unregister: symbol!("cuMemHostUnregister"),
            error_name: symbol!("cuGetErrorName"),
        };
        if (api.init)(0) != CUDA_SUCCESS {
            return None;
        }
        Some(Driver {
            api,
            devices: Mutex::new(HashMap::new()),
        })
    }

    fn check(&self, call: &'static str, code: CuResult) -> Result<()> {
        if code == CUDA_SUCCESS {
            return Ok(());
        }
        let mut name: *const c_char = std::ptr::null();
        // SAFETY: cuGetErrorName writes a pointer to a static string, or fails.
        let known = unsafe { (self.api.error_name)(code, &mut name) } == CUDA_SUCCESS;
        let name = if known && !name.is_null() {
            // SAFETY: a NUL-terminated static string from the driver.
            unsafe { CStr::from_ptr(name) }
                .to_string_lossy()
                .into_owned()
        } else {
            "an unknown error".to_owned()
        };
        Err(Error::Device { call, code, name })
    }

    /// The device's primary context and fastckpt's stream on it, made on first use.
    fn device(&self, ordinal: i32) -> Result<Device> {
        let mut devices = self.devices.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(device) = devices.get(&ordinal) {
            return Ok(*device);
        }
        let mut dev: CuDevice = 0;
        let mut ctx: CuContext = std::ptr::null_mut();
        let mut stream: CuStream = std::ptr::null_mut();
        // SAFETY: plain driver calls with out-pointers to locals.
        unsafe {
            self.check("cuDeviceGet", (self.api.device_get)(&mut dev, ordinal))?;
            self.check(
                "cuDevicePrimaryCtxRetain",
                (self.api.primary_ctx_retain)(&mut ctx, dev),
            )?;
            self.within(ctx, || {
                self.check(
                    "cuStreamCreate",
                    (self.api.stream_create)(&mut stream, CU_STREAM_NON_BLOCKING),
                )
            })?;
        }
        let device = Device { ctx, stream };
        devices.insert(ordinal, device);
        Ok(device)
    }

    /// Runs `f` with `ctx` current on this thread, then restores the thread's previous one.
    fn within<T>(&self, ctx: CuContext, f: impl FnOnce() -> Result<T>) -> Result<T> {
        // SAFETY: `ctx` is a retained primary context.
        self.check("cuCtxPushCurrent", unsafe { (self.api.ctx_push)(ctx) })?;
        let out = f();
        let mut popped: CuContext = std::ptr::null_mut();
        // SAFETY: pops the context pushed above.
        let pop = self.check("cuCtxPopCurrent", unsafe {
            (self.api.ctx_pop)(&mut popped)
        });
        let out = out?;
        pop?;
        Ok(out)
    }

    /// Copies every item to the host: waits once for all pending work of each device
    /// involved (the values are then those of one training step), queues every copy on
    /// that device's stream, and waits once per device. Whatever fails, no copy is still
    /// running when this returns.
    ///
    /// # Safety
    /// Each `src` must be device memory of `len` bytes that stays allocated for the call,
    /// each `dst` host memory writable for `len` bytes, not overlapping another item's.
    pub unsafe fn copy_to_host(&self, items: &[DeviceCopy]) -> Result<()> {
        let mut ordinals: Vec<i32> = items.iter().map(|c| c.device).collect();
        ordinals.sort_unstable();
        ordinals.dedup();
        let mut queued: Vec<Device> = Vec::with_capacity(ordinals.len());
        let mut result = Ok(());
        for &ordinal in &ordinals {
            let device = match self.device(ordinal) {
                Ok(d) => d,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            };
            queued.push(device);
            let enqueue = self.within(device.ctx, || {
                self.check("cuCtxSynchronize", (self.api.ctx_synchronize)())?;
                for c in items.iter().filter(|c| c.device == ordinal && c.len > 0) {
                    self.check(
                        "cuMemcpyDtoHAsync",
                        (self.api.memcpy_dtoh_async)(c.dst.cast(), c.src, c.len, device.stream),
                    )?;
                }
                Ok(())
            });
            if let Err(e) = enqueue {
                result = Err(e);
                break;
            }
        }
        // Every stream that got copies is waited for, even after an error: the caller
        // frees or reuses the host memory once this returns.
        for device in queued {
            let wait = self.within(device.ctx, || {
                self.check(
                    "cuStreamSynchronize",
                    (self.api.stream_synchronize)(device.stream),
                )
            });
            if result.is_ok() {
                result = wait;
            }
        }
        result
    }

    /// Pins `[ptr, ptr + len)` for fast transfers from every device (page-locked, and
    /// known to the driver as host memory it may copy into directly) until the returned
    /// registration is dropped.
    ///
    /// # Safety
    /// The range must be mapped host memory that stays mapped until the registration is
    /// dropped.
    pub unsafe fn register_host(&'static self, ptr: *mut u8, len: usize) -> Result<Registered> {
        let device = self.device(0)?;
        self.within(device.ctx, || {
            self.check(
                "cuMemHostRegister",
                (self.api.host_register)(ptr.cast(), len, CU_MEMHOSTREGISTER_PORTABLE),
            )
        })?;
        Ok(Registered {
            driver: self,
            ctx: device.ctx,
            ptr,
        })
    }
}

/// Host memory pinned by [`Driver::register_host`]; unpinned when dropped.
pub struct Registered {
    driver: &'static Driver,
    ctx: CuContext,
    ptr: *mut u8,
}

// SAFETY: unregistering may happen on any thread, in the context it was registered in.
unsafe impl Send for Registered {}
unsafe impl Sync for Registered {}

impl Drop for Registered {
    fn drop(&mut self) {
        let (api, ptr) = (&self.driver.api, self.ptr);
        // Nothing to do about a failure here: the memory stays pinned until the process
        // ends, which is only a missed release.
        // SAFETY: `ptr` was registered in `ctx` and is still mapped (the caller's contract).
        let _ = self.driver.within(self.ctx, || {
            self.driver.check("cuMemHostUnregister", unsafe {
                (api.host_unregister)(ptr.cast())
            })
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_library_is_no_driver() {
        // SAFETY: dlopen of a name that does not exist loads nothing.
        assert!(unsafe { Driver::load("libfastckpt-no-such-driver.so.1") }.is_none());
    }

    #[test]
    fn a_library_without_the_entry_points_is_no_driver() {
        // The C library loads, but exports no `cuInit`.
        // SAFETY: the C library is already loaded into every process.
        assert!(unsafe { Driver::load("libc.so.6") }.is_none());
    }

    #[test]
    fn turned_off_by_the_environment_or_absent_here_never_panics() {
        // On a machine with a GPU this finds it; on one without (CI), it is None. Either
        // way the lookup is cached and cheap the second time.
        let first = driver().is_some();
        assert_eq!(driver().is_some(), first);
    }
}
