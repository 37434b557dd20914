//! A minimal `dlopen`/`dlsym` wrapper: shared libraries are opened by exact
//! path or soname, symbols are looked up fallibly, and a library, once opened,
//! stays loaded for the life of the process (handles are never closed, so
//! function pointers taken from them stay valid).

use crate::error::{Error, Result};
use std::ffi::{c_void, CStr, CString};

/// An opened shared library (never closed).
#[derive(Debug)]
pub struct Library {
    handle: *mut c_void,
    name: String,
}

// SAFETY: a dlopen handle is a process-wide token; dlsym is thread-safe.
unsafe impl Send for Library {}
// SAFETY: as above.
unsafe impl Sync for Library {}

fn last_dl_error() -> String {
    // SAFETY: dlerror returns NULL or a NUL-terminated thread-local string.
    unsafe {
        let e = libc::dlerror();
        if e.is_null() {
            "unknown dlopen error".to_string()
        } else {
            CStr::from_ptr(e).to_string_lossy().into_owned()
        }
    }
}

impl Library {
    /// Opens `name` (an absolute path or a soname searched the usual way:
    /// already-loaded libraries, `LD_LIBRARY_PATH`, the ld cache).
    pub fn open(name: &str) -> Result<Library> {
        let c = CString::new(name)
            .map_err(|_| Error::invalid(format!("library name {name:?} contains NUL")))?;
        // SAFETY: c is a valid C string; flags are standard.
        let handle = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if handle.is_null() {
            return Err(Error::cuda(format!("dlopen({name}): {}", last_dl_error())));
        }
        Ok(Library {
            handle,
            name: name.to_string(),
        })
    }

    /// The name it was opened with.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Address of `symbol`, or `None` when the library does not export it.
    pub fn sym(&self, symbol: &str) -> Option<*mut c_void> {
        let c = CString::new(symbol).ok()?;
        // SAFETY: handle is a live dlopen handle; c is a valid C string.
        let p = unsafe { libc::dlsym(self.handle, c.as_ptr()) };
        (!p.is_null()).then_some(p)
    }

    /// Address of `symbol`, or a Cuda error naming the symbol and library.
    pub fn require(&self, symbol: &str) -> Result<*mut c_void> {
        self.sym(symbol)
            .ok_or_else(|| Error::cuda(format!("{} does not export {symbol}", self.name)))
    }
}

/// Paths of the shared objects mapped into this process (from
/// `/proc/self/maps`), deduplicated, in map order. Empty where unreadable.
pub fn mapped_libraries() -> Vec<String> {
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        return Vec::new();
    };
    let mut out: Vec<String> = Vec::new();
    for line in maps.lines() {
        if let Some(p) = line.split_whitespace().nth(5) {
            if p.starts_with('/') && p.contains(".so") && !out.iter().any(|o| o == p) {
                out.push(p.to_string());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libc_opens_and_missing_symbol_is_none() {
        let l = Library::open("libc.so.6").unwrap();
        assert!(l.sym("malloc").is_some());
        assert!(l.sym("kvpark_no_such_symbol").is_none());
        let e = l.require("kvpark_no_such_symbol").unwrap_err();
        assert!(e.message().contains("kvpark_no_such_symbol"), "{e}");
    }

    #[test]
    fn missing_library_is_a_cuda_error() {
        let e = Library::open("libkvpark-does-not-exist.so.9").unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Cuda);
    }

    #[test]
    fn maps_list_libc() {
        assert!(mapped_libraries().iter().any(|p| p.contains("libc")));
    }
}
