//! CPU-only CI check: every kernel in `cuda/` compiles to PTX with NVRTC and
//! defines each expected `.entry`, so a syntax error in a kernel cannot land
//! even where no GPU exists.
//!
//! NVRTC comes from the PyPI wheel `nvidia-cuda-nvrtc-cu12` (no GPU needed).
//! The test finds it through, in order:
//! 1. `KVPARK_NVRTC_LIB=/path/to/libnvrtc.so.12`;
//! 2. NVRTC's wheel (`nvidia/cuda_nvrtc/lib` for CUDA 12, `nvidia/cu13/lib` for
//!    CUDA 13) in the site-packages of the Python named by `KVPARK_PYTHON`,
//!    else `$VIRTUAL_ENV/bin/python`, else `python3`;
//! 3. kvpark's own search (`libnvrtc.so.12` by soname, `LD_LIBRARY_PATH`).
//!
//! If none works the test FAILS with install instructions; set
//! `KVPARK_SKIP_PTX=1` to skip it explicitly (it then prints SKIPPED).
//! `scripts/nvrtc_env.sh` prints the export line for CI.
//!
//! `KVPARK_NVRTC_LIBS` (paths separated by `:`) runs the checks with each of
//! several NVRTCs instead; the test script sets it to every NVRTC wheel it
//! installed — CUDA 12's and CUDA 13's, the one PyTorch's cu13 builds bring.

use kvpark::copy::cuda::kernels::ALL;
use kvpark::copy::cuda::nvrtc::Nvrtc;
use std::process::Command;

const HOWTO: &str = "NVRTC not found. Install it (no GPU needed): \
    `python3 -m venv .nvrtc && .nvrtc/bin/pip install nvidia-cuda-nvrtc-cu12`, then \
    `eval \"$(scripts/nvrtc_env.sh .nvrtc/bin/python)\"` (sets KVPARK_NVRTC_LIB), \
    or set KVPARK_SKIP_PTX=1 to skip this check explicitly";

fn python_nvrtc() -> Option<String> {
    let py = std::env::var("KVPARK_PYTHON")
        .ok()
        .or_else(|| {
            std::env::var("VIRTUAL_ENV")
                .ok()
                .map(|v| format!("{v}/bin/python"))
        })
        .unwrap_or_else(|| "python3".into());
    let out = Command::new(&py)
        .args([
            "-c",
            "import nvidia, os, glob; \
             c = [p for d in nvidia.__path__ \
                  for p in glob.glob(os.path.join(d, '*', 'lib', 'libnvrtc.so*')) \
                  if 'builtins' not in p and '.alt.' not in p]; \
             print(sorted(c)[-1])",
        ])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let p = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (!p.is_empty()).then_some(p)
}

/// The NVRTCs to test with, none when skipping explicitly.
fn nvrtcs() -> Vec<Nvrtc> {
    if std::env::var("KVPARK_SKIP_PTX").as_deref() == Ok("1") {
        println!("SKIPPED: KVPARK_SKIP_PTX=1 (kernels were NOT compiled)");
        return Vec::new();
    }
    if let Ok(list) = std::env::var("KVPARK_NVRTC_LIBS") {
        let v: Vec<Nvrtc> = list
            .split(':')
            .filter(|p| !p.is_empty())
            .map(|p| Nvrtc::open(p).unwrap_or_else(|e| panic!("KVPARK_NVRTC_LIBS: {p}: {e}")))
            .collect();
        assert!(
            !v.is_empty(),
            "KVPARK_NVRTC_LIBS is set but names no library"
        );
        return v;
    }
    vec![nvrtc()]
}

/// One NVRTC, found as the module docs say (fails with instructions).
fn nvrtc() -> Nvrtc {
    if let Ok(p) = std::env::var("KVPARK_NVRTC_LIB") {
        return Nvrtc::open(&p).unwrap_or_else(|e| panic!("KVPARK_NVRTC_LIB={p}: {e}"));
    }
    if let Some(p) = python_nvrtc() {
        if let Ok(n) = Nvrtc::open(&p) {
            return n;
        }
    }
    Nvrtc::locate().unwrap_or_else(|e| panic!("{HOWTO}\n({e})"))
}

fn entries(ptx: &str) -> Vec<String> {
    ptx.lines()
        .filter_map(|l| l.split(".entry ").nth(1))
        .map(|r| r.split(['(', ' ']).next().unwrap_or("").trim().to_string())
        .collect()
}

#[test]
fn every_kernel_compiles_to_ptx_with_its_entries() {
    for nv in nvrtcs() {
        compiles_with_its_entries(&nv);
    }
}

fn compiles_with_its_entries(nv: &Nvrtc) {
    let (maj, min) = nv.version().unwrap();
    println!("NVRTC {maj}.{min} from {}", nv.path().display());
    for src in ALL {
        for arch in ["compute_80", "compute_90"] {
            let opt = format!("--gpu-architecture={arch}");
            let c = nv
                .compile(src.text, src.file, &[&opt, "--std=c++17"])
                .unwrap_or_else(|e| panic!("{} for {arch}: {e}", src.file));
            let ptx = c.ptx_text();
            let found = entries(&ptx);
            for e in src.entries {
                assert!(
                    found.iter().any(|f| f == e),
                    "{} ({arch}): .entry {e} missing; PTX has {found:?}",
                    src.file
                );
            }
            assert_eq!(
                found.len(),
                src.entries.len(),
                "{} defines entries the Rust side does not list: {found:?}",
                src.file
            );
            assert!(!c.log.contains("warning"), "{}: {}", src.file, c.log);
        }
    }
}

#[test]
fn wide_kernels_use_16_byte_accesses_and_compile_to_sass() {
    for nv in nvrtcs() {
        wide_and_sass(&nv);
    }
}

fn wide_and_sass(nv: &Nvrtc) {
    let src = &kvpark::copy::cuda::kernels::KV_COPY;
    let c = nv
        .compile(src.text, src.file, &["--gpu-architecture=compute_90"])
        .unwrap();
    let ptx = c.ptx_text();
    // body of the u128 gather entry: from its .entry to the next .entry
    let start = ptx.find(".entry kvpark_gather_u128").unwrap();
    let body = &ptx[start..];
    let body = &body[..body[1..]
        .find(".entry")
        .map(|i| i + 1)
        .unwrap_or(body.len())];
    assert!(
        body.contains("ld.v4.u32") || body.contains("ld.global.v4.u32"),
        "u128 gather has no 16-byte load"
    );
    assert!(
        body.contains("st.v4.u32") || body.contains("st.global.v4.u32"),
        "u128 gather has no 16-byte store"
    );
    // a real-architecture compile must give SASS (what the engine loads)
    let c = nv
        .compile(src.text, src.file, &["--gpu-architecture=sm_90"])
        .unwrap();
    let cubin = c.cubin.expect("sm_90 compile returned no cubin");
    assert_eq!(&cubin[..4], b"\x7fELF", "cubin is not an ELF image");
}
