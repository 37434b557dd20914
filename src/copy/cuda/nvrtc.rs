//! Run-time compilation of `cuda/*.cu` with NVRTC, loaded by explicit path.
//!
//! kvpark opens `libnvrtc` itself (see [`super::dl`]) instead of going through
//! cudarc's loader, for two reasons: cudarc searches only by soname through
//! `LD_LIBRARY_PATH` and panics when nothing is found, while a process cannot
//! change its own `LD_LIBRARY_PATH` after start; and the NVRTC that ships with
//! PyTorch (the `nvidia-cuda-nvrtc-cu12` wheel) lives in a `site-packages`
//! folder no loader searches. [`Nvrtc::locate`] tries, in order:
//!
//! 1. `KVPARK_NVRTC_LIB` — an explicit path to `libnvrtc.so*`;
//! 2. the sonames `libnvrtc.so.12`, `libnvrtc.so.13`, `libnvrtc.so` (already
//!    loaded libraries, `LD_LIBRARY_PATH`, the ld cache);
//! 3. `nvidia/cuda_nvrtc/lib/libnvrtc.so.12` (and the CUDA 13 wheel's
//!    `nvidia/cu13/lib/libnvrtc.so.13`) under every `site-packages` folder of
//!    a library already mapped into the process — inside vLLM that is where
//!    PyTorch's own NVRTC is.
//!
//! Every failure is an [`ErrorKind::Cuda`](crate::ErrorKind::Cuda) error whose
//! message lists what was tried; nothing here panics.

use super::dl::{mapped_libraries, Library};
use crate::error::{Error, Result};
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::{Path, PathBuf};

type Prog = *mut c_void;
type FnVersion = unsafe extern "C" fn(*mut c_int, *mut c_int) -> c_int;
type FnCreate = unsafe extern "C" fn(
    *mut Prog,
    *const c_char,
    *const c_char,
    c_int,
    *const *const c_char,
    *const *const c_char,
) -> c_int;
type FnCompile = unsafe extern "C" fn(Prog, c_int, *const *const c_char) -> c_int;
type FnSize = unsafe extern "C" fn(Prog, *mut usize) -> c_int;
type FnGet = unsafe extern "C" fn(Prog, *mut c_char) -> c_int;
type FnDestroy = unsafe extern "C" fn(*mut Prog) -> c_int;
type FnErr = unsafe extern "C" fn(c_int) -> *const c_char;

/// An NVRTC library opened from a known path.
pub struct Nvrtc {
    lib: Library,
    version: FnVersion,
    create: FnCreate,
    compile: FnCompile,
    log_size: FnSize,
    log: FnGet,
    ptx_size: FnSize,
    ptx: FnGet,
    cubin_size: Option<FnSize>,
    cubin: Option<FnGet>,
    destroy: FnDestroy,
    err: FnErr,
}

/// What one compilation produced.
#[derive(Clone, Debug)]
pub struct Compiled {
    /// PTX text (NUL-terminated, as `cuModuleLoadData` wants it); empty when
    /// NVRTC produced only a cubin.
    pub ptx: Vec<u8>,
    /// SASS for the exact architecture, when compiled for `sm_XY`.
    pub cubin: Option<Vec<u8>>,
    /// The compiler log (warnings).
    pub log: String,
}

impl Compiled {
    /// PTX as text, without the trailing NUL.
    pub fn ptx_text(&self) -> String {
        String::from_utf8_lossy(self.ptx.strip_suffix(&[0]).unwrap_or(&self.ptx)).into_owned()
    }
}

impl std::fmt::Debug for Nvrtc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Nvrtc({})", self.lib.name())
    }
}

/// Candidate library paths in the order [`Nvrtc::locate`] tries them.
pub fn candidates() -> Vec<String> {
    let mut c = Vec::new();
    if let Ok(p) = std::env::var("KVPARK_NVRTC_LIB") {
        if !p.is_empty() {
            c.push(p);
        }
    }
    for s in ["libnvrtc.so.12", "libnvrtc.so.13", "libnvrtc.so"] {
        c.push(s.to_string());
    }
    let mut roots: Vec<PathBuf> = Vec::new();
    for lib in mapped_libraries() {
        if let Some(i) = lib.find("/site-packages/") {
            let root = PathBuf::from(&lib[..i + "/site-packages".len()]);
            if !roots.contains(&root) {
                roots.push(root);
            }
        }
    }
    for r in roots {
        for rel in [
            "nvidia/cuda_nvrtc/lib/libnvrtc.so.12",
            "nvidia/cu13/lib/libnvrtc.so.13",
        ] {
            let p = r.join(rel);
            if p.exists() {
                c.push(p.to_string_lossy().into_owned());
            }
        }
    }
    c
}

/// Loads (and keeps loaded) `libnvrtc-builtins.so.*` from `lib`'s folder,
/// so NVRTC's own `dlopen` by soname finds it already in the process.
fn preload_builtins(lib: &Path) {
    let Some(dir) = lib.parent().filter(|d| !d.as_os_str().is_empty()) else {
        return;
    };
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    let mut names: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libnvrtc-builtins.so"))
        })
        .collect();
    names.sort();
    for n in names {
        // a Library is never closed: the builtins stay loaded for the process
        let _ = Library::open(&n.to_string_lossy());
    }
}

impl Nvrtc {
    /// Opens NVRTC at `path` (a file path or soname). For a file path the
    /// `libnvrtc-builtins` beside it is loaded first: NVRTC 13 looks it up by
    /// soname only, which fails where its folder is on no search path.
    pub fn open(path: &str) -> Result<Nvrtc> {
        preload_builtins(Path::new(path));
        let lib = Library::open(path)?;
        // SAFETY: each symbol is NVRTC's documented C function with this
        // exact signature (nvrtc.h, CUDA 11.1+).
        unsafe {
            macro_rules! f {
                ($name:literal, $t:ty) => {
                    std::mem::transmute::<*mut c_void, $t>(lib.require($name)?)
                };
            }
            let cubin_size = lib
                .sym("nvrtcGetCUBINSize")
                .map(|p| std::mem::transmute::<*mut c_void, FnSize>(p));
            let cubin = lib
                .sym("nvrtcGetCUBIN")
                .map(|p| std::mem::transmute::<*mut c_void, FnGet>(p));
            Ok(Nvrtc {
                version: f!("nvrtcVersion", FnVersion),
                create: f!("nvrtcCreateProgram", FnCreate),
                compile: f!("nvrtcCompileProgram", FnCompile),
                log_size: f!("nvrtcGetProgramLogSize", FnSize),
                log: f!("nvrtcGetProgramLog", FnGet),
                ptx_size: f!("nvrtcGetPTXSize", FnSize),
                ptx: f!("nvrtcGetPTX", FnGet),
                destroy: f!("nvrtcDestroyProgram", FnDestroy),
                err: f!("nvrtcGetErrorString", FnErr),
                cubin_size,
                cubin,
                lib,
            })
        }
    }

    /// Opens the first NVRTC of [`candidates`] that loads.
    pub fn locate() -> Result<Nvrtc> {
        let mut tried = Vec::new();
        for c in candidates() {
            match Nvrtc::open(&c) {
                Ok(n) => return Ok(n),
                Err(e) => tried.push(e.message().to_string()),
            }
        }
        Err(Error::cuda(format!(
            "no NVRTC library found (set KVPARK_NVRTC_LIB=/path/to/libnvrtc.so.12, or \
             `pip install nvidia-cuda-nvrtc-cu12`); tried: {}",
            tried.join("; ")
        )))
    }

    /// The path or soname it was opened from.
    pub fn path(&self) -> &Path {
        Path::new(self.lib.name())
    }

    /// NVRTC's (major, minor) version.
    pub fn version(&self) -> Result<(i32, i32)> {
        let (mut a, mut b) = (0, 0);
        // SAFETY: valid out-pointers.
        let r = unsafe { (self.version)(&mut a, &mut b) };
        self.check(r, "nvrtcVersion")?;
        Ok((a, b))
    }

    fn check(&self, r: c_int, what: &str) -> Result<()> {
        if r == 0 {
            return Ok(());
        }
        // SAFETY: nvrtcGetErrorString returns a static string for any code.
        let s = unsafe {
            let p = (self.err)(r);
            if p.is_null() {
                "?".into()
            } else {
                CStr::from_ptr(p).to_string_lossy().into_owned()
            }
        };
        Err(Error::cuda(format!("{what}: NVRTC error {r} ({s})")))
    }

    /// Compiles `src` with `options` (e.g. `--gpu-architecture=sm_90`).
    /// A cubin is returned too when the architecture is a real `sm_XY`.
    pub fn compile(&self, src: &str, name: &str, options: &[&str]) -> Result<Compiled> {
        let csrc = CString::new(src).map_err(|_| Error::invalid("kernel source contains NUL"))?;
        let cname = CString::new(name).map_err(|_| Error::invalid("kernel name contains NUL"))?;
        let copts: Vec<CString> = options
            .iter()
            .map(|o| CString::new(*o).map_err(|_| Error::invalid("NVRTC option contains NUL")))
            .collect::<Result<_>>()?;
        let popts: Vec<*const c_char> = copts.iter().map(|c| c.as_ptr()).collect();
        let mut prog: Prog = std::ptr::null_mut();
        // SAFETY: all pointers are valid C strings kept alive for the calls;
        // the program is destroyed on every path below.
        unsafe {
            let r = (self.create)(
                &mut prog,
                csrc.as_ptr(),
                cname.as_ptr(),
                0,
                std::ptr::null(),
                std::ptr::null(),
            );
            self.check(r, "nvrtcCreateProgram")?;
            let out = self.compile_prog(prog, name, &popts);
            (self.destroy)(&mut prog);
            out
        }
    }

    /// # Safety
    /// `prog` must be a live NVRTC program.
    unsafe fn compile_prog(
        &self,
        prog: Prog,
        name: &str,
        opts: &[*const c_char],
    ) -> Result<Compiled> {
        let r = (self.compile)(prog, opts.len() as c_int, opts.as_ptr());
        let mut n = 0usize;
        let log = if (self.log_size)(prog, &mut n) == 0 && n > 1 {
            let mut buf = vec![0u8; n];
            (self.log)(prog, buf.as_mut_ptr() as *mut c_char);
            String::from_utf8_lossy(&buf[..n - 1]).into_owned()
        } else {
            String::new()
        };
        if r != 0 {
            return Err(self
                .check(r, &format!("compiling {name}"))
                .unwrap_err()
                .context(log.trim().to_string()));
        }
        // PTX may be absent when compiling straight to SASS (`sm_XY`).
        let mut n = 0usize;
        let mut ptx = Vec::new();
        if (self.ptx_size)(prog, &mut n) == 0 && n > 0 {
            ptx = vec![0u8; n];
            if (self.ptx)(prog, ptx.as_mut_ptr() as *mut c_char) != 0 {
                ptx.clear();
            }
        }
        let mut cubin = None;
        if let (Some(sz), Some(get)) = (self.cubin_size, self.cubin) {
            let mut n = 0usize;
            if sz(prog, &mut n) == 0 && n > 0 {
                let mut buf = vec![0u8; n];
                if get(prog, buf.as_mut_ptr() as *mut c_char) == 0 {
                    cubin = Some(buf);
                }
            }
        }
        if ptx.is_empty() && cubin.is_none() {
            return Err(Error::cuda(format!(
                "compiling {name}: NVRTC produced neither PTX nor a cubin"
            )));
        }
        Ok(Compiled { ptx, cubin, log })
    }
}
