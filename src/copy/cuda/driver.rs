//! The CUDA driver, reached through cudarc's raw bindings (`cudarc::driver::sys`)
//! after a fallible check.
//!
//! cudarc's dynamic loader panics when `libcuda` is missing, and with a
//! `cuda-XXXXX` feature newer than the installed driver it panics on the
//! first missing symbol. So kvpark (1) `dlopen`s `libcuda.so.1` itself first
//! and returns `Error::cuda("no CUDA driver ...")` when that fails, (2) builds
//! cudarc with `cuda-12000`, whose symbols every CUDA 12+ driver exports, and
//! forces cudarc's loader inside `catch_unwind`, and (3) looks up entry points
//! newer than 12.0 (`cuMemcpyBatchAsync`, CUDA 12.8) with `dlsym` at run
//! time, so an older driver simply lacks the batch path.
//!
//! Invariants: no function here is called before [`init`] succeeded; every
//! `CUresult` is checked and turned into an [`ErrorKind::Cuda`](crate::ErrorKind)
//! error naming the call; no device memory kvpark does not own is ever freed.

use super::dl::Library;
use crate::error::{Error, Result};
use cudarc::driver::sys as cu;
use std::ffi::{c_void, CStr};
use std::sync::OnceLock;

pub use cu::{CUcontext, CUdevice, CUdeviceptr, CUevent, CUfunction, CUmodule, CUstream};

/// `CUmemLocation` (CUDA 12.8 `cuda.h`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct MemLocation {
    /// `CUmemLocationType`: 1 device, 2 host.
    pub kind: i32,
    /// Device ordinal (for a device location).
    pub id: i32,
}

/// `CUmemcpyAttributes_v1` (CUDA 12.8 `cuda.h`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct MemcpyAttributes {
    /// `CUmemcpySrcAccessOrder`: 1 = stream order.
    pub src_access_order: i32,
    /// Where the sources live.
    pub src_loc_hint: MemLocation,
    /// Where the destinations live.
    pub dst_loc_hint: MemLocation,
    /// `CUmemcpyFlags`: 1 = prefer overlap with compute.
    pub flags: u32,
}

/// `cuMemcpyBatchAsync` with its CUDA 12.8 signature (CUDA 13's `_v2` drops
/// `fail_idx`; [`init`] asks the driver for the 12.8 variant explicitly).
pub type MemcpyBatchFn = unsafe extern "C" fn(
    dsts: *mut CUdeviceptr,
    srcs: *mut CUdeviceptr,
    sizes: *mut usize,
    count: usize,
    attrs: *mut MemcpyAttributes,
    attrs_idxs: *mut usize,
    num_attrs: usize,
    fail_idx: *mut usize,
    stream: CUstream,
) -> cu::CUresult;

/// What [`init`] found.
#[derive(Debug)]
pub struct Driver {
    /// `cuDriverGetVersion` (e.g. 12080).
    pub version: i32,
    /// `cuMemcpyBatchAsync`, when the driver has it.
    pub memcpy_batch: Option<MemcpyBatchFn>,
    _lib: Library,
}

static DRIVER: OnceLock<std::result::Result<Driver, Error>> = OnceLock::new();

/// Loads and initialises the driver once; later calls return the same result.
pub fn init() -> Result<&'static Driver> {
    DRIVER.get_or_init(load).as_ref().map_err(Clone::clone)
}

fn load() -> Result<Driver> {
    let lib = Library::open("libcuda.so.1").map_err(|e| {
        Error::cuda(format!(
            "no CUDA driver (libcuda.so.1 not found): {}",
            e.message()
        ))
    })?;
    // cudarc's loader panics instead of returning errors; contain it.
    let bound = std::panic::catch_unwind(|| {
        // SAFETY: culib only loads the library and resolves symbols.
        unsafe {
            let _ = cu::culib();
        }
    });
    if bound.is_err() {
        return Err(Error::cuda(
            "libcuda.so.1 is present but does not export the CUDA 12.0 driver API (driver too old?)",
        ));
    }
    // SAFETY: the library is bound; cuInit has no preconditions.
    unsafe {
        check(cu::cuInit(0), "cuInit")?;
        let mut version = 0;
        check(cu::cuDriverGetVersion(&mut version), "cuDriverGetVersion")?;
        let memcpy_batch = if version >= 12080 {
            batch_entry(&lib)
        } else {
            None
        };
        Ok(Driver {
            version,
            memcpy_batch,
            _lib: lib,
        })
    }
}

/// `cuMemcpyBatchAsync` with the CUDA 12.8 signature: asked of the driver
/// by ABI version (`cuGetProcAddress(..., 12080)`, which CUDA 13 drivers
/// answer with the 12.8 variant, not `_v2`), else by plain symbol name.
///
/// # Safety
/// The driver must be initialised.
unsafe fn batch_entry(lib: &Library) -> Option<MemcpyBatchFn> {
    let name = c"cuMemcpyBatchAsync";
    let mut pfn: *mut c_void = std::ptr::null_mut();
    let mut status = cu::CUdriverProcAddressQueryResult::CU_GET_PROC_ADDRESS_SUCCESS;
    let r = cu::cuGetProcAddress_v2(name.as_ptr(), &mut pfn, 12080, 0, &mut status);
    let p = if r == cu::CUresult::CUDA_SUCCESS
        && status == cu::CUdriverProcAddressQueryResult::CU_GET_PROC_ADDRESS_SUCCESS
        && !pfn.is_null()
    {
        Some(pfn)
    } else {
        lib.sym("cuMemcpyBatchAsync")
    };
    p.map(|p| std::mem::transmute::<*mut c_void, MemcpyBatchFn>(p))
}

/// Turns a `CUresult` into a kvpark error naming `what`.
pub fn check(r: cu::CUresult, what: &str) -> Result<()> {
    if r == cu::CUresult::CUDA_SUCCESS {
        return Ok(());
    }
    let mut s: *const std::ffi::c_char = std::ptr::null();
    // SAFETY: cuGetErrorString writes a static string pointer or fails.
    let name = unsafe {
        if cu::cuGetErrorString(r, &mut s) == cu::CUresult::CUDA_SUCCESS && !s.is_null() {
            CStr::from_ptr(s).to_string_lossy().into_owned()
        } else {
            format!("{r:?}")
        }
    };
    Err(Error::cuda(format!("{what}: {name} ({r:?})")))
}

/// Number of CUDA devices (0 when the driver loads but sees none).
pub fn device_count() -> Result<i32> {
    init()?;
    let mut n = 0;
    // SAFETY: driver initialised.
    check(unsafe { cu::cuDeviceGetCount(&mut n) }, "cuDeviceGetCount")?;
    Ok(n)
}

/// A retained reference to a device's primary context (the one PyTorch
/// uses), released on drop. Driver calls that need a context (such as
/// `cuMemHostRegister`) push it around the call from whatever thread runs them.
pub struct PrimaryContext {
    dev: CUdevice,
    ctx: CUcontext,
}

// SAFETY: a context handle may be pushed on any thread; retain/release are
// thread-safe driver calls.
unsafe impl Send for PrimaryContext {}
unsafe impl Sync for PrimaryContext {}

impl PrimaryContext {
    /// Retains device `ordinal`'s primary context.
    pub fn retain(ordinal: i32) -> Result<PrimaryContext> {
        init()?;
        let mut dev: CUdevice = 0;
        let mut ctx: CUcontext = std::ptr::null_mut();
        // SAFETY: driver initialised; outputs are written on success only.
        unsafe {
            check(cu::cuDeviceGet(&mut dev, ordinal), "cuDeviceGet")
                .map_err(|e| e.context(format!("device {ordinal}")))?;
            check(
                cu::cuDevicePrimaryCtxRetain(&mut ctx, dev),
                "cuDevicePrimaryCtxRetain",
            )?;
        }
        Ok(PrimaryContext { dev, ctx })
    }

    /// Makes the context current on this thread until the guard drops.
    pub fn push(&self) -> Result<CtxGuard> {
        // SAFETY: retained by self, which outlives the guard's use here.
        unsafe { CtxGuard::push(self.ctx) }
    }
}

impl Drop for PrimaryContext {
    fn drop(&mut self) {
        // SAFETY: releases the reference retain took.
        unsafe {
            cu::cuDevicePrimaryCtxRelease_v2(self.dev);
        }
    }
}

/// Makes a context current on this thread for the guard's lifetime
/// (push/pop, so a caller's own current context is restored).
pub struct CtxGuard(());

impl CtxGuard {
    /// Pushes `ctx`.
    ///
    /// # Safety
    /// `ctx` must be a live context (retained by the caller) and the guard
    /// must be dropped on the thread that created it.
    pub unsafe fn push(ctx: CUcontext) -> Result<CtxGuard> {
        check(cu::cuCtxPushCurrent_v2(ctx), "cuCtxPushCurrent")?;
        Ok(CtxGuard(()))
    }
}

impl Drop for CtxGuard {
    fn drop(&mut self) {
        let mut old: CUcontext = std::ptr::null_mut();
        // SAFETY: pops what push pushed on this thread.
        unsafe {
            cu::cuCtxPopCurrent_v2(&mut old);
        }
    }
}

/// Device memory kvpark allocated itself (staging, layer tables, benches).
/// Freed on drop; never used for vLLM's memory.
#[derive(Debug)]
pub struct DevBuf {
    /// Device address.
    pub ptr: CUdeviceptr,
    /// Bytes.
    pub len: usize,
}

impl DevBuf {
    /// Allocates `len` bytes (the right context must be current).
    pub fn alloc(len: usize) -> Result<DevBuf> {
        let mut ptr = 0;
        // SAFETY: out-pointer valid; context current per contract.
        check(
            unsafe { cu::cuMemAlloc_v2(&mut ptr, len.max(1)) },
            "cuMemAlloc",
        )
        .map_err(|e| e.context(format!("{len} bytes")))?;
        Ok(DevBuf { ptr, len })
    }
}

impl Drop for DevBuf {
    fn drop(&mut self) {
        // SAFETY: ptr came from cuMemAlloc and is freed once.
        unsafe {
            cu::cuMemFree_v2(self.ptr);
        }
    }
}

/// Device pointer of a host address when it lies in pinned, device-mapped
/// memory (registered with `DEVICEMAP` or allocated with `cuMemHostAlloc`),
/// checked at both ends of `[p, p+len)`; `None` for pageable memory.
pub fn mapped_device_ptr(p: u64, len: u64) -> Option<u64> {
    let get = |a: u64| -> Option<u64> {
        let mut d: CUdeviceptr = 0;
        // SAFETY: the attribute query writes one CUdeviceptr into `d`.
        let r = unsafe {
            cu::cuPointerGetAttribute(
                &mut d as *mut CUdeviceptr as *mut c_void,
                cu::CUpointer_attribute::CU_POINTER_ATTRIBUTE_DEVICE_POINTER,
                a,
            )
        };
        (r == cu::CUresult::CUDA_SUCCESS).then_some(d)
    };
    let d0 = get(p)?;
    if len > 1 {
        let d1 = get(p + len - 1)?;
        if d1 != d0 + len - 1 {
            return None;
        }
    }
    Some(d0)
}

/// `CU_MEMHOSTREGISTER_PORTABLE | CU_MEMHOSTREGISTER_DEVICEMAP` — never
/// write-combined: the CPU reads the arena to compress it.
pub const HOST_REGISTER_FLAGS: u32 = 0x01 | 0x02;

/// Pins and maps `[addr, addr+len)` for every context (`cuMemHostRegister`),
/// with `ctx` current on the calling thread for the call (the driver needs a
/// current context; a background thread has none of its own).
///
/// # Safety
/// The range must be valid mapped host memory that stays mapped until
/// [`host_unregister`] is called on the same address.
pub unsafe fn host_register(ctx: &PrimaryContext, addr: *mut u8, len: usize) -> Result<()> {
    let _g = ctx.push()?;
    check(
        cu::cuMemHostRegister_v2(addr as *mut c_void, len, HOST_REGISTER_FLAGS),
        "cuMemHostRegister",
    )
    .map_err(|e| e.context(format!("{len} bytes at {addr:p}")))
}

/// Unpins a range registered with [`host_register`] (same start address).
///
/// # Safety
/// No transfer may still use the range.
pub unsafe fn host_unregister(ctx: &PrimaryContext, addr: *mut u8) -> Result<()> {
    let _g = ctx.push()?;
    check(
        cu::cuMemHostUnregister(addr as *mut c_void),
        "cuMemHostUnregister",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_driver_is_a_typed_error_not_a_panic() {
        // On a machine with a driver this initialises it; without one it must
        // be ErrorKind::Cuda with the documented message.
        match init() {
            Ok(d) => assert!(d.version >= 12000),
            Err(e) => {
                assert_eq!(e.kind(), crate::ErrorKind::Cuda);
                assert!(e.message().contains("libcuda.so.1"), "{e}");
                assert!(device_count().is_err());
            }
        }
    }

    #[test]
    fn attribute_structs_match_cuda_h() {
        assert_eq!(std::mem::size_of::<MemLocation>(), 8);
        assert_eq!(std::mem::size_of::<MemcpyAttributes>(), 24);
    }
}
