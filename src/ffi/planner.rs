//! Scheduler-role exports: `kvpark_planner_*`.

use super::{bytes, guard, nn, put_buf, slice, utf8, Fail, KvparkBuf, KvparkStatus};
use crate::config::Config;
use crate::planner::{BlockPlanner, RequestHint, RequestView};
use parking_lot::Mutex;

/// Opaque scheduler-side handle.
pub struct KvparkPlanner {
    inner: Mutex<BlockPlanner>,
}

/// A request as passed by the scheduler role.
#[repr(C)]
pub struct KvparkRequest {
    /// `request.request_id`, UTF-8.
    pub req_id: *const u8,
    /// Length of `req_id`.
    pub req_id_len: usize,
    /// `request.cache_salt` as UTF-8, or NULL.
    pub salt: *const u8,
    /// Length of `salt`.
    pub salt_len: usize,
    /// `request.block_hashes` concatenated, each `hash_len` bytes.
    pub hashes: *const u8,
    /// Bytes per hash.
    pub hash_len: usize,
    /// Number of hashes.
    pub num_hashes: usize,
    /// `kv_transfer_params["kvpark"]` as JSON, or NULL.
    pub hint_json: *const u8,
    /// Length of `hint_json`.
    pub hint_len: usize,
}

/// Answer to `get_num_new_matched_tokens`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KvparkMatch {
    /// Block-aligned tokens kvpark loads beyond vLLM's local hit.
    pub external_tokens: u32,
    /// 1 = asynchronous load.
    pub load_async: u8,
}

/// Converts the C request.
///
/// # Safety
/// `r` must point to a valid request whose pointers are valid for their lengths.
unsafe fn view<'a>(r: *const KvparkRequest) -> Result<RequestView<'a>, Fail> {
    let r = &*nn(r, "req")?;
    let id = utf8(bytes(r.req_id, r.req_id_len, "req.req_id")?, "req.req_id")?;
    let salt = bytes(r.salt, r.salt_len, "req.salt")?;
    if r.hash_len == 0 && r.num_hashes != 0 {
        return Err(crate::Error::invalid(format!(
            "req: {} block hashes with hash_len 0",
            r.num_hashes
        ))
        .into());
    }
    let total = r
        .hash_len
        .checked_mul(r.num_hashes)
        .ok_or_else(|| crate::Error::invalid("req: hash_len * num_hashes overflows"))?;
    let hashes = bytes(r.hashes, total, "req.hashes")?;
    let hint_bytes = bytes(r.hint_json, r.hint_len, "req.hint_json")?;
    let hint = if hint_bytes.is_empty() {
        None
    } else {
        Some(RequestHint::parse(hint_bytes)?)
    };
    Ok(RequestView {
        req_id: id,
        salt,
        hashes,
        hash_len: r.hash_len,
        hint,
    })
}

/// Creates the scheduler-side planner from the extra config (JSON),
/// vLLM's block size in tokens and the worker ranks it plans for:
/// `first_rank..first_rank + world_size` (`world_size`: vLLM's tensor x
/// pipeline parallel size, 1 to 64; `first_rank`: 0, or with data
/// parallelism the engine's data-parallel rank x `world_size`, as vLLM
/// numbers its workers), after
/// the rank-independent checks of the config against this machine
/// ([`kvpark_config_preflight`](super::kvpark_config_preflight)). It
/// recovers what every rank's files hold (warm restart): a block is a hit
/// only if every rank has it.
///
/// # Safety
/// `config_json` valid for `len` bytes (or NULL with 0); `out` valid for writing.
#[no_mangle]
pub unsafe extern "C" fn kvpark_planner_new(
    config_json: *const u8,
    len: usize,
    block_size: u32,
    first_rank: u32,
    world_size: u32,
    out: *mut *mut KvparkPlanner,
) -> KvparkStatus {
    guard("kvpark_planner_new", || {
        let cfg = Config::from_json(bytes(config_json, len, "config_json")?)?;
        nn(out, "out")?;
        cfg.preflight(&crate::preflight::Preflight::scheduler())?;
        let p = BlockPlanner::open(cfg, block_size, first_rank, world_size)?;
        let h = Box::new(KvparkPlanner {
            inner: Mutex::new(p),
        });
        out.write(Box::into_raw(h));
        Ok(())
    })
}

/// Frees a planner. NULL is a no-op.
///
/// # Safety
/// `p` must come from [`kvpark_planner_new`] and be freed once.
#[no_mangle]
pub unsafe extern "C" fn kvpark_planner_free(p: *mut KvparkPlanner) {
    if !p.is_null() {
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(Box::from_raw(p))));
    }
}

/// `get_num_new_matched_tokens`.
///
/// # Safety
/// All pointers valid as documented in the header.
#[no_mangle]
pub unsafe extern "C" fn kvpark_planner_match(
    p: *mut KvparkPlanner,
    req: *const KvparkRequest,
    num_computed_tokens: u32,
    num_tokens: u32,
    now_ns: u64,
    out: *mut KvparkMatch,
) -> KvparkStatus {
    guard("kvpark_planner_match", || {
        let p = &*nn(p, "planner")?;
        let v = view(req)?;
        nn(out, "out")?;
        let m = p
            .inner
            .lock()
            .match_request(&v, num_computed_tokens, num_tokens, now_ns)?;
        out.write(KvparkMatch {
            external_tokens: m.external_tokens,
            load_async: m.load_async as u8,
        });
        Ok(())
    })
}

/// `update_state_after_alloc`.
///
/// # Safety
/// All pointers valid for their lengths.
#[no_mangle]
pub unsafe extern "C" fn kvpark_planner_on_alloc(
    p: *mut KvparkPlanner,
    req_id: *const u8,
    req_id_len: usize,
    block_ids: *const u32,
    num_blocks: usize,
    num_external_tokens: u32,
) -> KvparkStatus {
    guard("kvpark_planner_on_alloc", || {
        let p = &*nn(p, "planner")?;
        let id = utf8(bytes(req_id, req_id_len, "req_id")?, "req_id")?;
        let ids = slice(block_ids, num_blocks, "block_ids")?;
        p.inner.lock().on_alloc(id, ids, num_external_tokens)?;
        Ok(())
    })
}

/// `request_finished`: `*out_delay_free` = 1 while a save of this request is in flight.
///
/// # Safety
/// All pointers valid for their lengths.
#[no_mangle]
pub unsafe extern "C" fn kvpark_planner_request_finished(
    p: *mut KvparkPlanner,
    req: *const KvparkRequest,
    block_ids: *const u32,
    num_blocks: usize,
    num_computed_tokens: u32,
    now_ns: u64,
    out_delay_free: *mut u8,
) -> KvparkStatus {
    guard("kvpark_planner_request_finished", || {
        let p = &*nn(p, "planner")?;
        let v = view(req)?;
        let ids = slice(block_ids, num_blocks, "block_ids")?;
        nn(out_delay_free, "out_delay_free")?;
        let d = p
            .inner
            .lock()
            .request_finished(&v, ids, num_computed_tokens, now_ns)?;
        out_delay_free.write(d as u8);
        Ok(())
    })
}

/// `build_connector_meta`: this step's plan as opaque bytes.
///
/// # Safety
/// `out` valid for writing.
#[no_mangle]
pub unsafe extern "C" fn kvpark_planner_build_meta(
    p: *mut KvparkPlanner,
    now_ns: u64,
    out: *mut KvparkBuf,
) -> KvparkStatus {
    guard("kvpark_planner_build_meta", || {
        let p = &*nn(p, "planner")?;
        nn(out, "out")?;
        let v = p.inner.lock().build_meta(now_ns);
        put_buf(out, v);
        Ok(())
    })
}

/// The bytes of one KV block on one worker rank as vLLM's KV cache config
/// gives them, so that sessions parked before the first worker report are
/// accounted; a worker's report overrides it.
///
/// # Safety
/// `p` must be a live planner.
#[no_mangle]
pub unsafe extern "C" fn kvpark_planner_expect_block_bytes(
    p: *mut KvparkPlanner,
    bytes: u64,
) -> KvparkStatus {
    guard("kvpark_planner_expect_block_bytes", || {
        let p = &*nn(p, "planner")?;
        p.inner.lock().expect_block_bytes(bytes);
        Ok(())
    })
}

/// The caller will pass vLLM's KV-cache events (the GPU prefix cache's
/// evictions) with `kvpark_planner_gpu_removed` and
/// `kvpark_planner_gpu_cleared`; the kvpark policies then keep host for the
/// contexts the GPU gave up.
///
/// # Safety
/// `p` must be a live planner.
#[no_mangle]
pub unsafe extern "C" fn kvpark_planner_hear_gpu_events(p: *mut KvparkPlanner) -> KvparkStatus {
    guard("kvpark_planner_hear_gpu_events", || {
        let p = &*nn(p, "planner")?;
        p.inner.lock().hear_gpu_events();
        Ok(())
    })
}

/// vLLM's GPU prefix cache removed `n` blocks (`BlockRemoved` events):
/// `ids` holds their block hashes as vLLM's events give them, the last 8
/// bytes of the hash as a big-endian integer (with
/// `VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0` the caller converts the hash
/// bytes the same way). `*out_sessions` (optional) receives the number of
/// parked contexts this gave up.
///
/// # Safety
/// `ids` valid for `n` values; `out_sessions` NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn kvpark_planner_gpu_removed(
    p: *mut KvparkPlanner,
    ids: *const u64,
    n: usize,
    out_sessions: *mut u64,
) -> KvparkStatus {
    guard("kvpark_planner_gpu_removed", || {
        let p = &*nn(p, "planner")?;
        let ids = slice(ids, n, "ids")?;
        let gone = p.inner.lock().gpu_removed(ids);
        if !out_sessions.is_null() {
            out_sessions.write(gone);
        }
        Ok(())
    })
}

/// vLLM cleared its GPU prefix cache (`AllBlocksCleared`). `*out_sessions`
/// (optional) receives the number of parked contexts this gave up.
///
/// # Safety
/// `out_sessions` NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn kvpark_planner_gpu_cleared(
    p: *mut KvparkPlanner,
    out_sessions: *mut u64,
) -> KvparkStatus {
    guard("kvpark_planner_gpu_cleared", || {
        let p = &*nn(p, "planner")?;
        let n = p.inner.lock().gpu_cleared();
        if !out_sessions.is_null() {
            out_sessions.write(n);
        }
        Ok(())
    })
}

/// The policy's time-driven work due by `now_ns` as a plan of tier moves
/// only, for the workers to run while the engine is idle
/// (`kvpark_mover_run_moves`); empty when there is none.
///
/// # Safety
/// `out` valid for writing.
#[no_mangle]
pub unsafe extern "C" fn kvpark_planner_tick_moves(
    p: *mut KvparkPlanner,
    now_ns: u64,
    out: *mut KvparkBuf,
) -> KvparkStatus {
    guard("kvpark_planner_tick_moves", || {
        let p = &*nn(p, "planner")?;
        nn(out, "out")?;
        let v = p.inner.lock().tick_moves(now_ns);
        put_buf(out, v);
        Ok(())
    })
}

/// When the policy next has time-driven work, on the clock of the
/// `now_ns` the planner is given; `UINT64_MAX` when nothing is scheduled.
///
/// # Safety
/// `out` valid for writing.
#[no_mangle]
pub unsafe extern "C" fn kvpark_planner_next_wakeup(
    p: *mut KvparkPlanner,
    out: *mut u64,
) -> KvparkStatus {
    guard("kvpark_planner_next_wakeup", || {
        let p = &*nn(p, "planner")?;
        nn(out, "out")?;
        *out = p.inner.lock().next_wakeup().unwrap_or(u64::MAX);
        Ok(())
    })
}

/// `update_connector_output`: one worker report (opaque bytes).
///
/// # Safety
/// `meta` valid for `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn kvpark_planner_on_worker_meta(
    p: *mut KvparkPlanner,
    meta: *const u8,
    len: usize,
    now_ns: u64,
) -> KvparkStatus {
    guard("kvpark_planner_on_worker_meta", || {
        let p = &*nn(p, "planner")?;
        let m = bytes(meta, len, "meta")?;
        if m.is_empty() {
            return Ok(());
        }
        p.inner.lock().on_report(m, now_ns)?;
        Ok(())
    })
}

/// Metrics snapshot as a JSON object.
///
/// # Safety
/// `out` valid for writing.
#[no_mangle]
pub unsafe extern "C" fn kvpark_planner_metrics(
    p: *mut KvparkPlanner,
    out: *mut KvparkBuf,
) -> KvparkStatus {
    guard("kvpark_planner_metrics", || {
        let p = &*nn(p, "planner")?;
        nn(out, "out")?;
        let m = p.inner.lock().metrics();
        put_buf(out, serde_json::to_vec(&m).expect("metrics serialize"));
        Ok(())
    })
}
