//! CUDA self-test and benchmark exports, for driving the CUDA engine from
//! PyTorch on a GPU machine (which has no Rust toolchain): `kvpark_cuda_*`.
//! Each writes NUL-terminated UTF-8 (a report or JSON) into `out`.

use super::{bytes, guard, nn, utf8, KvparkStatus};
use crate::copy::cuda::bench;
use crate::error::{Error, ErrorKind};

/// Copies `s` into `out` (NUL-terminated), or fails with NoSpace when it does not fit.
///
/// # Safety
/// `out` valid for `out_len` bytes.
unsafe fn write_out(s: &str, out: *mut libc::c_char, out_len: usize) -> crate::Result<()> {
    if s.len() + 1 > out_len {
        return Err(Error::new(
            ErrorKind::NoSpace,
            format!("output needs {} bytes, buffer has {out_len}", s.len() + 1),
        ));
    }
    std::ptr::copy_nonoverlapping(s.as_ptr(), out as *mut u8, s.len());
    *out.add(s.len()) = 0;
    Ok(())
}

/// Runs the CUDA engine's self-test on `device`; writes a text report.
///
/// # Safety
/// `out` valid for `out_len` bytes.
#[no_mangle]
pub unsafe extern "C" fn kvpark_cuda_selftest(
    device: i32,
    out: *mut libc::c_char,
    out_len: usize,
) -> KvparkStatus {
    guard("kvpark_cuda_selftest", || {
        nn(out, "out")?;
        let r = bench::cuda_selftest(device)?;
        write_out(&r, out, out_len)?;
        Ok(())
    })
}

/// Runs the CUDA transfer benchmark described by `json_in` (NUL-terminated);
/// writes JSON results.
///
/// # Safety
/// `json_in` a NUL-terminated string; `out` valid for `out_len` bytes.
#[no_mangle]
pub unsafe extern "C" fn kvpark_cuda_bench(
    json_in: *const libc::c_char,
    out: *mut libc::c_char,
    out_len: usize,
) -> KvparkStatus {
    guard("kvpark_cuda_bench", || {
        nn(json_in, "json_in")?;
        nn(out, "out")?;
        let j = std::ffi::CStr::from_ptr(json_in).to_bytes();
        let r = bench::cuda_bench_json(utf8(bytes(j.as_ptr(), j.len(), "json_in")?, "json_in")?)?;
        write_out(&r, out, out_len)?;
        Ok(())
    })
}

/// One transfer between caller-owned device tensors and host records
/// (raw addresses in `json_in`); test and benchmark use only.
///
/// # Safety
/// `json_in` a NUL-terminated string whose addresses describe live memory of
/// the sizes it states; `out` valid for `out_len` bytes.
#[no_mangle]
pub unsafe extern "C" fn kvpark_cuda_transfer(
    json_in: *const libc::c_char,
    out: *mut libc::c_char,
    out_len: usize,
) -> KvparkStatus {
    guard("kvpark_cuda_transfer", || {
        nn(json_in, "json_in")?;
        nn(out, "out")?;
        let j = std::ffi::CStr::from_ptr(json_in).to_bytes();
        let r =
            bench::cuda_transfer_json(utf8(bytes(j.as_ptr(), j.len(), "json_in")?, "json_in")?)?;
        write_out(&r, out, out_len)?;
        Ok(())
    })
}
