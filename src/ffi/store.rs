//! Chunk-store exports: `kvpark_store_*` (the LMCache storage plugin's
//! backing store; see [`crate::store`]). Keys and chunks are the caller's
//! opaque bytes; a miss is [`KvparkStatus::NotFound`], a record that failed a
//! check is [`KvparkStatus::Corrupt`] (dropped: later calls miss).

use super::{bytes, guard, nn, put_buf, KvparkBuf, KvparkStatus};
use crate::config::Config;
use crate::store::ChunkStore;
use std::time::Duration;

/// Opaque chunk-store handle.
pub struct KvparkStore {
    inner: ChunkStore,
}

/// Opens the chunk store of `rank` with the configuration `config_json`
/// (the keys of `kvpark_config_validate`), for chunks of up to `chunk_bytes`
/// data bytes whose elements are `elem_size` bytes (1, 2, 4 or 8). Chunks
/// found on NVMe are indexed.
///
/// # Safety
/// `config_json` valid for `len` bytes (or NULL with 0); `out` valid for writing.
#[no_mangle]
pub unsafe extern "C" fn kvpark_store_open(
    config_json: *const u8,
    len: usize,
    rank: u32,
    chunk_bytes: u64,
    elem_size: u32,
    out: *mut *mut KvparkStore,
) -> KvparkStatus {
    guard("kvpark_store_open", || {
        let cfg = Config::from_json(bytes(config_json, len, "config_json")?)?;
        nn(out, "out")?;
        let s = ChunkStore::open(&cfg, rank, chunk_bytes, elem_size as usize)?;
        out.write(Box::into_raw(Box::new(KvparkStore { inner: s })));
        Ok(())
    })
}

/// Closes and frees a store (finishes queued NVMe writes). NULL is a no-op.
///
/// # Safety
/// `s` must come from [`kvpark_store_open`] and be freed once.
#[no_mangle]
pub unsafe extern "C" fn kvpark_store_free(s: *mut KvparkStore) {
    if !s.is_null() {
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(Box::from_raw(s))));
    }
}

/// Stores a chunk: `meta` (opaque, at most 4080 bytes) and `data` (at most
/// the store's `chunk_bytes`) under `key`. `*stored` (if not NULL) is 1 when
/// written, 0 when the key was already stored.
///
/// # Safety
/// Each pointer valid for its length (NULL only with length 0); `stored` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kvpark_store_put(
    s: *mut KvparkStore,
    key: *const u8,
    key_len: usize,
    meta: *const u8,
    meta_len: usize,
    data: *const u8,
    data_len: usize,
    stored: *mut u8,
) -> KvparkStatus {
    guard("kvpark_store_put", || {
        let s = &*nn(s, "store")?;
        let k = bytes(key, key_len, "key")?;
        let m = bytes(meta, meta_len, "meta")?;
        let d = bytes(data, data_len, "data")?;
        let w = s.inner.put(k, m, d)?;
        if !stored.is_null() {
            stored.write(u8::from(w));
        }
        Ok(())
    })
}

/// Whether `key` is stored (`*found` 1 or 0). With `pin` non-zero, a host
/// copy is pinned (release with [`kvpark_store_unpin`]) and a chunk only on
/// NVMe starts coming back into host memory.
///
/// # Safety
/// `key` valid for `key_len` bytes; `found` valid for writing.
#[no_mangle]
pub unsafe extern "C" fn kvpark_store_contains(
    s: *mut KvparkStore,
    key: *const u8,
    key_len: usize,
    pin: u8,
    found: *mut u8,
) -> KvparkStatus {
    guard("kvpark_store_contains", || {
        let s = &*nn(s, "store")?;
        let k = bytes(key, key_len, "key")?;
        nn(found, "found")?;
        let f = s.inner.contains(k, pin != 0)?;
        found.write(u8::from(f));
        Ok(())
    })
}

/// The metadata (`*meta`, free with `kvpark_buf_free`) and data length
/// (`*data_len`) of `key`, reading it from NVMe when only there.
/// `NotFound` on a miss, `Corrupt` when its record failed a check.
///
/// # Safety
/// `key` valid for `key_len` bytes; `meta` and `data_len` valid for writing.
#[no_mangle]
pub unsafe extern "C" fn kvpark_store_lookup(
    s: *mut KvparkStore,
    key: *const u8,
    key_len: usize,
    meta: *mut KvparkBuf,
    data_len: *mut u64,
) -> KvparkStatus {
    guard("kvpark_store_lookup", || {
        let s = &*nn(s, "store")?;
        let k = bytes(key, key_len, "key")?;
        nn(meta, "meta")?;
        nn(data_len, "data_len")?;
        let info = s.inner.lookup(k)?;
        data_len.write(info.data_len);
        put_buf(meta, info.meta);
        Ok(())
    })
}

/// Copies the data of `key` into `dst` (`cap` bytes, at least the data
/// length) and writes the data length to `*len`. `NotFound` on a miss,
/// `Corrupt` when its record failed a check, `InvalidArgument` when `cap`
/// is short; `dst` is written only on success.
///
/// # Safety
/// `key` valid for `key_len` bytes; `dst` valid for writing `cap` bytes; `len` writable.
#[no_mangle]
pub unsafe extern "C" fn kvpark_store_get(
    s: *mut KvparkStore,
    key: *const u8,
    key_len: usize,
    dst: *mut u8,
    cap: usize,
    len: *mut u64,
) -> KvparkStatus {
    guard("kvpark_store_get", || {
        let s = &*nn(s, "store")?;
        let k = bytes(key, key_len, "key")?;
        nn(len, "len")?;
        let buf: &mut [u8] = if cap == 0 {
            &mut []
        } else {
            nn(dst as *const u8, "dst")?;
            std::slice::from_raw_parts_mut(dst, cap)
        };
        let n = s.inner.get(k, buf)?;
        len.write(n as u64);
        Ok(())
    })
}

/// Pins the host copy of `key`. `InvalidArgument` when it has none (only on NVMe).
///
/// # Safety
/// `key` valid for `key_len` bytes.
#[no_mangle]
pub unsafe extern "C" fn kvpark_store_pin(
    s: *mut KvparkStore,
    key: *const u8,
    key_len: usize,
) -> KvparkStatus {
    guard("kvpark_store_pin", || {
        let s = &*nn(s, "store")?;
        s.inner.pin(bytes(key, key_len, "key")?)?;
        Ok(())
    })
}

/// Releases one pin of `key`. `InvalidArgument` when it is not pinned.
///
/// # Safety
/// `key` valid for `key_len` bytes.
#[no_mangle]
pub unsafe extern "C" fn kvpark_store_unpin(
    s: *mut KvparkStore,
    key: *const u8,
    key_len: usize,
) -> KvparkStatus {
    guard("kvpark_store_unpin", || {
        let s = &*nn(s, "store")?;
        s.inner.unpin(bytes(key, key_len, "key")?)?;
        Ok(())
    })
}

/// Removes `key` from every tier; `*removed` (if not NULL) 1 or 0 (not
/// stored). `Busy` while it is pinned or being copied.
///
/// # Safety
/// `key` valid for `key_len` bytes; `removed` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kvpark_store_remove(
    s: *mut KvparkStore,
    key: *const u8,
    key_len: usize,
    removed: *mut u8,
) -> KvparkStatus {
    guard("kvpark_store_remove", || {
        let s = &*nn(s, "store")?;
        let r = s.inner.remove(bytes(key, key_len, "key")?)?;
        if !removed.is_null() {
            removed.write(u8::from(r));
        }
        Ok(())
    })
}

/// Waits up to `timeout_ms` for the NVMe writes in flight (`Busy` if they
/// are still running then).
///
/// # Safety
/// `s` must be a live store.
#[no_mangle]
pub unsafe extern "C" fn kvpark_store_flush(s: *mut KvparkStore, timeout_ms: u64) -> KvparkStatus {
    guard("kvpark_store_flush", || {
        let s = &*nn(s, "store")?;
        s.inner.flush(Duration::from_millis(timeout_ms))?;
        Ok(())
    })
}

/// Metrics snapshot as JSON (counters, index states, host occupancy, NVMe stats).
///
/// # Safety
/// `out` valid for writing.
#[no_mangle]
pub unsafe extern "C" fn kvpark_store_metrics(
    s: *mut KvparkStore,
    out: *mut KvparkBuf,
) -> KvparkStatus {
    guard("kvpark_store_metrics", || {
        let s = &*nn(s, "store")?;
        nn(out, "out")?;
        put_buf(out, s.inner.metrics_json().into_bytes());
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ptr::{null, null_mut};

    fn open(json: &str) -> *mut KvparkStore {
        let mut s = null_mut();
        let st = unsafe { kvpark_store_open(json.as_ptr(), json.len(), 0, 8192, 2, &mut s) };
        assert_eq!(st, KvparkStatus::Ok);
        s
    }

    #[test]
    fn round_trip_and_misses_across_the_abi() {
        let s = open(r#"{"host_bytes":"1MiB"}"#);
        let (k, m, d) = (b"key", b"meta", vec![7u8; 5000]);
        let mut stored = 9u8;
        let st = unsafe {
            kvpark_store_put(
                s,
                k.as_ptr(),
                3,
                m.as_ptr(),
                4,
                d.as_ptr(),
                d.len(),
                &mut stored,
            )
        };
        assert_eq!((st, stored), (KvparkStatus::Ok, 1));
        let mut found = 9u8;
        assert_eq!(
            unsafe { kvpark_store_contains(s, k.as_ptr(), 3, 0, &mut found) },
            KvparkStatus::Ok
        );
        assert_eq!(found, 1);
        let mut meta = KvparkBuf {
            ptr: null_mut(),
            len: 0,
        };
        let mut n = 0u64;
        assert_eq!(
            unsafe { kvpark_store_lookup(s, k.as_ptr(), 3, &mut meta, &mut n) },
            KvparkStatus::Ok
        );
        assert_eq!(n, 5000);
        assert_eq!(unsafe { std::slice::from_raw_parts(meta.ptr, meta.len) }, m);
        unsafe { crate::ffi::kvpark_buf_free(meta) };
        let mut buf = vec![0u8; 5000];
        let mut len = 0u64;
        let st = unsafe { kvpark_store_get(s, k.as_ptr(), 3, buf.as_mut_ptr(), 4999, &mut len) };
        assert_eq!((st, len), (KvparkStatus::InvalidArgument, 0));
        let st = unsafe { kvpark_store_get(s, k.as_ptr(), 3, buf.as_mut_ptr(), 5000, &mut len) };
        assert_eq!((st, len), (KvparkStatus::Ok, 5000));
        assert_eq!(buf, d);
        // a miss writes nothing
        let mut len = 77u64;
        let st =
            unsafe { kvpark_store_get(s, b"no".as_ptr(), 2, buf.as_mut_ptr(), 5000, &mut len) };
        assert_eq!((st, len), (KvparkStatus::NotFound, 77));
        let st = unsafe { kvpark_store_unpin(s, k.as_ptr(), 3) };
        assert_eq!(st, KvparkStatus::InvalidArgument);
        let mut removed = 0u8;
        assert_eq!(
            unsafe { kvpark_store_remove(s, k.as_ptr(), 3, &mut removed) },
            KvparkStatus::Ok
        );
        assert_eq!(removed, 1);
        unsafe { kvpark_store_free(s) };
        unsafe { kvpark_store_free(null_mut()) };
    }

    #[test]
    fn null_and_config_errors() {
        let mut s = null_mut();
        let j = r#"{"host_bytes":"lots"}"#;
        let st = unsafe { kvpark_store_open(j.as_ptr(), j.len(), 0, 8192, 2, &mut s) };
        assert_eq!(st, KvparkStatus::Config);
        assert!(s.is_null(), "no output on failure");
        let st = unsafe { kvpark_store_open(null(), 0, 0, 0, 2, &mut s) };
        assert_eq!(st, KvparkStatus::Config);
        let mut found = 0u8;
        let st = unsafe { kvpark_store_contains(null_mut(), b"k".as_ptr(), 1, 0, &mut found) };
        assert_eq!(st, KvparkStatus::NullPointer);
        let s = open("{}");
        let st = unsafe { kvpark_store_contains(s, null(), 1, 0, &mut found) };
        assert_eq!(st, KvparkStatus::NullPointer);
        let st = unsafe { kvpark_store_metrics(s, null_mut()) };
        assert_eq!(st, KvparkStatus::NullPointer);
        unsafe { kvpark_store_free(s) };
    }
}
