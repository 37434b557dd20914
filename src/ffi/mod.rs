//! The C ABI: the only place with `#[no_mangle] extern "C"`.
//!
//! Rules every export follows (after rustls-ffi):
//! - a panic boundary: a panic becomes [`KvparkStatus::Internal`], never an
//!   unwind into vLLM;
//! - every pointer is NULL-checked ([`KvparkStatus::NullPointer`], naming the
//!   argument in the last-error message);
//! - outputs are written only on success; buffers come with lengths;
//! - `_free(NULL)` is a no-op;
//! - the thread-local last error ([`kvpark_last_error`]) carries the context.
//!
//! No business logic lives here: each export converts arguments and calls
//! [`crate::planner`] or [`crate::mover`].

#[cfg(feature = "gpu-bench")]
mod cuda;
mod logging;
mod mover;
mod planner;
mod store;

#[cfg(feature = "gpu-bench")]
pub use cuda::*;
pub use logging::*;
pub use mover::*;
pub use planner::*;
pub use store::*;

use crate::config::Config;
use crate::error::{Error, ErrorKind, Result};
use crate::preflight::Preflight;
use std::cell::RefCell;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// ABI version: bumped on every incompatible change of this header.
pub const KVPARK_ABI_VERSION: u32 = 1;

/// Status of every fallible call. Numbers are fixed and never reused.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvparkStatus {
    /// Success.
    Ok = 0,
    /// A required pointer argument was NULL.
    NullPointer = 1,
    /// A malformed argument (short buffer, bad geometry, unknown request).
    InvalidArgument = 2,
    /// Operating-system I/O error.
    Io = 3,
    /// Stored data or a plan failed validation.
    Corrupt = 4,
    /// A tier is full.
    NoSpace = 5,
    /// Bad configuration (the message names the key).
    Config = 6,
    /// CUDA failure or no CUDA device.
    Cuda = 7,
    /// Not supported in this build or setup.
    Unsupported = 8,
    /// Missing block or record.
    NotFound = 9,
    /// In use.
    Busy = 10,
    /// Shut down.
    Closed = 11,
    /// A bug in kvpark (a caught panic).
    Internal = 12,
    /// An output buffer is too small.
    BufferTooSmall = 13,
}

impl From<ErrorKind> for KvparkStatus {
    fn from(k: ErrorKind) -> Self {
        match k {
            ErrorKind::InvalidArgument => KvparkStatus::InvalidArgument,
            ErrorKind::Io => KvparkStatus::Io,
            ErrorKind::Corrupt => KvparkStatus::Corrupt,
            ErrorKind::NoSpace => KvparkStatus::NoSpace,
            ErrorKind::Config => KvparkStatus::Config,
            ErrorKind::Cuda => KvparkStatus::Cuda,
            ErrorKind::Unsupported => KvparkStatus::Unsupported,
            ErrorKind::NotFound => KvparkStatus::NotFound,
            ErrorKind::Busy => KvparkStatus::Busy,
            ErrorKind::Closed => KvparkStatus::Closed,
            ErrorKind::Internal => KvparkStatus::Internal,
        }
    }
}

thread_local! {
    static LAST_ERROR: RefCell<String> = const { RefCell::new(String::new()) };
}

fn set_last_error(msg: String) {
    LAST_ERROR.with(|e| *e.borrow_mut() = msg);
}

/// Internal error type of an export body: a kvpark error or a NULL argument.
pub(crate) enum Fail {
    Err(Error),
    Null(&'static str),
}

impl From<Error> for Fail {
    fn from(e: Error) -> Self {
        Fail::Err(e)
    }
}

/// Runs an export body behind the panic boundary, mapping failures to status codes.
pub(crate) fn guard(name: &str, f: impl FnOnce() -> std::result::Result<(), Fail>) -> KvparkStatus {
    logging::install();
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => {
            set_last_error(String::new());
            KvparkStatus::Ok
        }
        Ok(Err(Fail::Err(e))) => {
            set_last_error(format!("{name}: {e}"));
            e.kind().into()
        }
        Ok(Err(Fail::Null(arg))) => {
            set_last_error(format!("{name}: argument `{arg}` is NULL"));
            KvparkStatus::NullPointer
        }
        Err(p) => {
            let what = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            set_last_error(format!("{name}: internal error (panic caught): {what}"));
            KvparkStatus::Internal
        }
    }
}

/// Checks a pointer, naming the argument when NULL.
pub(crate) fn nn<T>(p: *const T, arg: &'static str) -> std::result::Result<*const T, Fail> {
    if p.is_null() {
        Err(Fail::Null(arg))
    } else {
        Ok(p)
    }
}

/// A byte slice from (ptr, len); NULL is allowed only with len 0.
///
/// # Safety
/// When non-NULL, `ptr` must be valid for reading `len` bytes for `'a`.
pub(crate) unsafe fn bytes<'a>(
    ptr: *const u8,
    len: usize,
    arg: &'static str,
) -> std::result::Result<&'a [u8], Fail> {
    if len == 0 {
        return Ok(&[]);
    }
    nn(ptr, arg)?;
    Ok(std::slice::from_raw_parts(ptr, len))
}

/// A typed slice from (ptr, n); NULL is allowed only with n 0.
///
/// # Safety
/// When non-NULL, `ptr` must be valid for reading `n` elements for `'a`.
pub(crate) unsafe fn slice<'a, T>(
    ptr: *const T,
    n: usize,
    arg: &'static str,
) -> std::result::Result<&'a [T], Fail> {
    if n == 0 {
        return Ok(&[]);
    }
    nn(ptr, arg)?;
    Ok(std::slice::from_raw_parts(ptr, n))
}

pub(crate) fn utf8<'a>(b: &'a [u8], arg: &str) -> Result<&'a str> {
    std::str::from_utf8(b).map_err(|_| Error::invalid(format!("{arg} is not UTF-8")))
}

/// Bytes owned by kvpark, returned to the caller; release with [`kvpark_buf_free`].
#[repr(C)]
#[derive(Debug)]
pub struct KvparkBuf {
    /// Start of the bytes (NULL when `len` is 0).
    pub ptr: *mut u8,
    /// Number of bytes.
    pub len: usize,
}

impl KvparkBuf {
    pub(crate) fn from_vec(v: Vec<u8>) -> Self {
        if v.is_empty() {
            return KvparkBuf {
                ptr: std::ptr::null_mut(),
                len: 0,
            };
        }
        let b = v.into_boxed_slice();
        let len = b.len();
        KvparkBuf {
            ptr: Box::into_raw(b) as *mut u8,
            len,
        }
    }
}

/// Writes a vector into `*out` (the caller checked `out` for NULL).
///
/// # Safety
/// `out` must be valid for writing one `KvparkBuf`.
pub(crate) unsafe fn put_buf(out: *mut KvparkBuf, v: Vec<u8>) {
    out.write(KvparkBuf::from_vec(v));
}

/// The ABI version of this library ([`KVPARK_ABI_VERSION`]).
#[no_mangle]
pub extern "C" fn kvpark_abi_version() -> u32 {
    KVPARK_ABI_VERSION
}

/// Copies the calling thread's last error message into `buf` (NUL-terminated,
/// truncated to `cap` bytes) and returns the full message length (0 = none).
///
/// # Safety
/// `buf` must be valid for writing `cap` bytes, or NULL with `cap` 0.
#[no_mangle]
pub unsafe extern "C" fn kvpark_last_error(buf: *mut libc::c_char, cap: usize) -> usize {
    catch_unwind(|| {
        LAST_ERROR.with(|e| {
            let e = e.borrow();
            if !buf.is_null() && cap > 0 {
                let n = e.len().min(cap - 1);
                std::ptr::copy_nonoverlapping(e.as_ptr(), buf as *mut u8, n);
                *buf.add(n) = 0;
            }
            e.len()
        })
    })
    .unwrap_or(0)
}

/// Frees bytes returned by kvpark. Freeing `{NULL, 0}` is a no-op.
///
/// # Safety
/// `buf` must come from a kvpark call and be freed once.
#[no_mangle]
pub unsafe extern "C" fn kvpark_buf_free(buf: KvparkBuf) {
    let _ = catch_unwind(|| {
        if !buf.ptr.is_null() && buf.len > 0 {
            drop(Box::from_raw(std::ptr::slice_from_raw_parts_mut(
                buf.ptr, buf.len,
            )));
        }
    });
}

/// Validates `kv_connector_extra_config` (a JSON object) and returns the
/// normalized configuration (every key, sizes in bytes) as JSON.
///
/// # Safety
/// `json` must be valid for `len` bytes; `out` must be valid for writing.
#[no_mangle]
pub unsafe extern "C" fn kvpark_config_validate(
    json: *const u8,
    len: usize,
    out: *mut KvparkBuf,
) -> KvparkStatus {
    guard("kvpark_config_validate", || {
        let j = bytes(json, len, "json")?;
        nn(out, "out")?;
        let c = Config::from_json(j)?;
        put_buf(out, c.to_json().into_bytes());
        Ok(())
    })
}

/// Validates `kv_connector_extra_config` like [`kvpark_config_validate`],
/// then checks it against this machine (directories, host memory, an
/// existing `host_file`: `Config::preflight`) for the context
/// `context_json`, a JSON object `{"rank": N | null, "ranks": N,
/// "reserve_host_bytes": N, "block_bytes": N}` (every field optional; rank
/// null or absent: only the checks that do not depend on a rank, and the
/// host memory of `ranks` arenas when `ranks` is above 0). Returns
/// the normalized configuration as JSON; on failure the last error holds one
/// line per problem, each starting with the config key.
///
/// [`kvpark_planner_new`] and [`kvpark_mover_new`] run the same checks (the
/// mover for its rank, alone on the machine); calling this first lets a
/// caller that knows more (other ranks, memory it still allocates) check
/// that too.
///
/// # Safety
/// `json` valid for `len` bytes and `context_json` for `context_len` bytes
/// (each NULL with 0); `out` valid for writing.
#[no_mangle]
pub unsafe extern "C" fn kvpark_config_preflight(
    json: *const u8,
    len: usize,
    context_json: *const u8,
    context_len: usize,
    out: *mut KvparkBuf,
) -> KvparkStatus {
    guard("kvpark_config_preflight", || {
        let j = bytes(json, len, "json")?;
        let ctx = Preflight::from_json(bytes(context_json, context_len, "context_json")?)?;
        nn(out, "out")?;
        let c = Config::from_json(j)?;
        c.preflight(&ctx)?;
        put_buf(out, c.to_json().into_bytes());
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn last_error() -> String {
        let mut buf = [0 as libc::c_char; 256];
        let n = unsafe { kvpark_last_error(buf.as_mut_ptr(), buf.len()) };
        let s = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
        assert_eq!(n, s.to_bytes().len().max(n.min(255)));
        s.to_string_lossy().into_owned()
    }

    #[test]
    fn panic_becomes_internal_status() {
        let st = guard("probe", || panic!("boom"));
        assert_eq!(st, KvparkStatus::Internal);
        assert!(last_error().contains("boom"));
    }

    #[test]
    fn config_errors_cross_the_abi() {
        let mut out = KvparkBuf {
            ptr: std::ptr::null_mut(),
            len: 0,
        };
        let j = br#"{"host_bytes":"nope"}"#;
        let st = unsafe { kvpark_config_validate(j.as_ptr(), j.len(), &mut out) };
        assert_eq!(st, KvparkStatus::Config);
        assert!(out.ptr.is_null(), "no output on failure");
        assert!(last_error().contains("host_bytes"));
        let j = br#"{"host_bytes":"4MiB"}"#;
        let st = unsafe { kvpark_config_validate(j.as_ptr(), j.len(), &mut out) };
        assert_eq!(st, KvparkStatus::Ok);
        let s = unsafe { std::slice::from_raw_parts(out.ptr, out.len) };
        assert!(std::str::from_utf8(s)
            .unwrap()
            .contains("\"host_bytes\":4194304"));
        unsafe { kvpark_buf_free(out) };
        let st = unsafe { kvpark_config_validate(j.as_ptr(), j.len(), std::ptr::null_mut()) };
        assert_eq!(st, KvparkStatus::NullPointer);
        assert!(last_error().contains("`out`"));
    }
}
