//! Regression tests for inputs that once got past the C ABI's checks: a
//! geometry whose sizes overflow (an out-of-bounds write in the next save),
//! a match with more computed tokens than hashes (a caught panic after the
//! request's state had changed), hashes with `hash_len` 0 (taken as "no
//! hashes"), and a plan bound twice before it ran (its saves and loads
//! silently dropped: GPU blocks held forever, requests waiting forever).

mod common;

use kvpark::block::{BlockKey, Dtype, LayerView};
use kvpark::ffi::{
    kvpark_buf_free, kvpark_last_error, kvpark_mover_bind, kvpark_mover_free,
    kvpark_mover_get_finished, kvpark_mover_new, kvpark_mover_register, kvpark_mover_start_load,
    kvpark_mover_wait_for_save, kvpark_planner_free, kvpark_planner_match, kvpark_planner_new,
    KvparkBuf, KvparkGeometry, KvparkMatch, KvparkMover, KvparkPlanner, KvparkRequest,
    KvparkStatus,
};
use kvpark::plan::{LoadReq, Plan, SaveReq};
use std::ptr;

fn last_error() -> String {
    let mut buf = vec![0u8; 4096];
    let n = unsafe { kvpark_last_error(buf.as_mut_ptr().cast(), buf.len()) };
    buf.truncate(n.min(4095));
    String::from_utf8_lossy(&buf).into_owned()
}

fn mover(cfg: &str) -> *mut KvparkMover {
    let mut m = ptr::null_mut();
    let st = unsafe { kvpark_mover_new(cfg.as_ptr(), cfg.len(), 0, &mut m) };
    assert_eq!(st, KvparkStatus::Ok, "{}", last_error());
    m
}

#[test]
fn overflowing_geometry_is_refused_at_register() {
    // kv_heads × block_tokens × 2 elements of 1 byte wraps a 64-bit size to
    // 4096: a token-major view of one 4 KiB page used to register, and the
    // next save wrote far outside the host slot.
    let m = mover(r#"{"host_bytes":"1MiB"}"#);
    let mut page = vec![0u8; 4096];
    let g = KvparkGeometry {
        layers: 1,
        kv_heads: 2_470_091_528,
        block_tokens: 3_734_020_352,
        head_size_k: 1,
        head_size_v: 1,
        dtype: Dtype::Fp8 as u8,
    };
    let view = LayerView {
        base: page.as_mut_ptr() as u64,
        num_blocks: 1,
        stride_block: 4096,
        stride_head: 2,
        stride_token: 2 * 2_470_091_528,
    };
    let st = unsafe { kvpark_mover_register(m, &g, &view, 1, 0) };
    assert_eq!(st, KvparkStatus::InvalidArgument);
    assert!(last_error().contains("exceeds 4 GiB"), "{}", last_error());

    // head sizes whose u32 sum wraps to a 1-element row
    let g = KvparkGeometry {
        layers: 1,
        kv_heads: 1,
        block_tokens: 1,
        head_size_k: u32::MAX,
        head_size_v: 2,
        dtype: Dtype::Fp8 as u8,
    };
    let view = LayerView {
        base: page.as_mut_ptr() as u64,
        num_blocks: 1,
        stride_block: 4096,
        stride_head: 1,
        stride_token: 1,
    };
    let st = unsafe { kvpark_mover_register(m, &g, &view, 1, 0) };
    assert_eq!(st, KvparkStatus::InvalidArgument, "{}", last_error());
    unsafe { kvpark_mover_free(m) };
}

fn planner() -> *mut KvparkPlanner {
    let cfg = r#"{"host_bytes":"1MiB"}"#;
    let mut p = ptr::null_mut();
    let st = unsafe { kvpark_planner_new(cfg.as_ptr(), cfg.len(), 16, 0, 1, &mut p) };
    assert_eq!(st, KvparkStatus::Ok, "{}", last_error());
    p
}

fn request<'a>(id: &'a str, hashes: &'a [u8], hash_len: usize, n: usize) -> KvparkRequest {
    KvparkRequest {
        req_id: id.as_ptr(),
        req_id_len: id.len(),
        salt: ptr::null(),
        salt_len: 0,
        hashes: if hashes.is_empty() {
            ptr::null()
        } else {
            hashes.as_ptr()
        },
        hash_len,
        num_hashes: n,
        hint_json: ptr::null(),
        hint_len: 0,
    }
}

#[test]
fn match_with_more_computed_tokens_than_hashes_is_an_error() {
    let p = planner();
    let hashes = [7u8; 3 * 8];
    let req = request("r1", &hashes, 8, 3);
    let mut out = KvparkMatch::default();
    // 4 blocks computed locally, 3 hashed: an impossible request
    let st = unsafe { kvpark_planner_match(p, &req, 64, 80, 1, &mut out) };
    assert_eq!(st, KvparkStatus::InvalidArgument, "{}", last_error());
    assert!(last_error().contains("hashed blocks"), "{}", last_error());
    assert_eq!(out, KvparkMatch::default(), "no output on error");
    // the planner is intact: the same request, told the truth, is answered
    let st = unsafe { kvpark_planner_match(p, &req, 48, 80, 2, &mut out) };
    assert_eq!(st, KvparkStatus::Ok, "{}", last_error());
    assert_eq!(out.external_tokens, 0);
    unsafe { kvpark_planner_free(p) };
}

#[test]
fn hashes_with_hash_len_zero_are_an_error() {
    let p = planner();
    let hashes = [7u8; 16];
    let req = request("r1", &hashes, 0, 2);
    let mut out = KvparkMatch::default();
    let st = unsafe { kvpark_planner_match(p, &req, 0, 40, 1, &mut out) };
    assert_eq!(st, KvparkStatus::InvalidArgument);
    assert!(last_error().contains("hash_len 0"), "{}", last_error());
    unsafe { kvpark_planner_free(p) };
}

fn finished(m: *mut KvparkMover) -> serde_json::Value {
    let mut out = KvparkBuf {
        ptr: ptr::null_mut(),
        len: 0,
    };
    let st = unsafe { kvpark_mover_get_finished(m, &mut out) };
    assert_eq!(st, KvparkStatus::Ok);
    let v =
        serde_json::from_slice(unsafe { std::slice::from_raw_parts(out.ptr, out.len) }).unwrap();
    unsafe { kvpark_buf_free(out) };
    v
}

#[test]
fn a_plan_bound_twice_before_it_ran_is_not_dropped() {
    let geom = common::small_f32(2);
    let mut cache = common::Cache::new(geom, 8);
    cache.fill(1, 1.0);
    cache.fill(2, 2.0);
    let views = cache.views();
    let m = mover(r#"{"host_bytes":"1MiB"}"#);
    let g = KvparkGeometry {
        layers: geom.layers,
        kv_heads: geom.kv_heads,
        block_tokens: geom.block_tokens,
        head_size_k: geom.head_size_k,
        head_size_v: geom.head_size_v,
        dtype: geom.dtype as u8,
    };
    let st = unsafe { kvpark_mover_register(m, &g, views.as_ptr(), views.len(), 0) };
    assert_eq!(st, KvparkStatus::Ok, "{}", last_error());
    let key = |i: u8| BlockKey::derive(b"", &[i]);
    let save = |id: &str, b: u32, k: u8| SaveReq {
        req_id: id.into(),
        session: 1,
        blocks: vec![(key(k), b, 0)],
        to_nvme: false,
    };
    let first = Plan {
        step: 1,
        saves: vec![save("r1", 1, 1)],
        loads: vec![],
        moves: vec![],
    }
    .encode();
    let second = Plan {
        step: 2,
        saves: vec![save("r2", 2, 2)],
        loads: vec![],
        moves: vec![],
    }
    .encode();
    for plan in [&first, &second] {
        let st = unsafe { kvpark_mover_bind(m, plan.as_ptr(), plan.len()) };
        assert_eq!(st, KvparkStatus::Ok, "{}", last_error());
    }
    unsafe {
        assert_eq!(kvpark_mover_start_load(m), KvparkStatus::Ok);
        assert_eq!(kvpark_mover_wait_for_save(m), KvparkStatus::Ok);
    }
    // Saves run on the mover's saver thread: ask again, as vLLM does every
    // step, until both are reported.
    let mut sending: Vec<String> = Vec::new();
    let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while sending.len() < 2 && std::time::Instant::now() < end {
        let f = finished(m);
        sending.extend(
            f["sending"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_string()),
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    sending.sort();
    assert_eq!(sending, ["r1", "r2"]);

    // Both blocks were parked: load them back into empty blocks, bytes equal.
    let load = Plan {
        step: 3,
        saves: vec![],
        loads: vec![
            LoadReq {
                req_id: "l1".into(),
                sync: true,
                blocks: vec![(key(1), 5)],
            },
            LoadReq {
                req_id: "l2".into(),
                sync: true,
                blocks: vec![(key(2), 6)],
            },
        ],
        moves: vec![],
    }
    .encode();
    unsafe {
        assert_eq!(
            kvpark_mover_bind(m, load.as_ptr(), load.len()),
            KvparkStatus::Ok
        );
        assert_eq!(kvpark_mover_start_load(m), KvparkStatus::Ok);
        assert_eq!(kvpark_mover_wait_for_save(m), KvparkStatus::Ok);
    }
    assert_eq!(finished(m)["failed_blocks"], serde_json::json!([]));
    assert_eq!(cache.block(5), cache.block(1));
    assert_eq!(cache.block(6), cache.block(2));
    unsafe { kvpark_mover_free(m) };
}

#[test]
fn a_damaged_slot_table_does_not_stop_the_scheduler() {
    // A slot table whose header claims 2^58 + 1 slots: the worker resets such
    // a table when it opens the arena; the scheduler starts without its
    // blocks instead of refusing to start.
    let t = tempfile::tempdir().unwrap();
    let host_file = t.path().join("kv");
    let arena = t.path().join("kv.rank0");
    let mut b = vec![0u8; 128];
    b[..8].copy_from_slice(b"KVPSLOT1");
    b[8..16].copy_from_slice(&4096u64.to_le_bytes());
    b[16..24].copy_from_slice(&((1u64 << 58) + 1).to_le_bytes());
    b[24..32].copy_from_slice(&4096u64.to_le_bytes());
    std::fs::write(kvpark::tier::slots::table_path(&arena), &b).unwrap();
    let cfg = format!(
        r#"{{"host_bytes":"1MiB","host_file":{:?},"policy":"vllm-offload"}}"#,
        host_file.to_str().unwrap()
    );
    let mut p = ptr::null_mut();
    let st = unsafe { kvpark_planner_new(cfg.as_ptr(), cfg.len(), 16, 0, 1, &mut p) };
    assert_eq!(st, KvparkStatus::Ok, "{}", last_error());
    assert!(!p.is_null());
    unsafe { kvpark_planner_free(p) };
}

#[test]
fn a_world_size_outside_1_to_64_is_refused() {
    let cfg = r#"{"host_bytes":"1MiB"}"#;
    for world in [0u32, 65, u32::MAX] {
        let mut p = ptr::null_mut();
        let st = unsafe { kvpark_planner_new(cfg.as_ptr(), cfg.len(), 16, 0, world, &mut p) };
        assert_eq!(st, KvparkStatus::InvalidArgument, "world {world}");
        assert!(p.is_null());
        let e = last_error();
        assert!(
            e.contains(&format!("world size {world}")) && e.contains("1 to 64"),
            "{e}"
        );
    }
    for world in [1u32, 2, 64] {
        let mut p = ptr::null_mut();
        let st = unsafe { kvpark_planner_new(cfg.as_ptr(), cfg.len(), 16, 0, world, &mut p) };
        assert_eq!(st, KvparkStatus::Ok, "world {world}: {}", last_error());
        unsafe { kvpark_planner_free(p) };
    }
}
