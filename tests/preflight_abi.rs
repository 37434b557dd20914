//! Config checks against the machine cross the C ABI once, before any tier
//! is built: `kvpark_mover_new` / `kvpark_planner_new` refuse a config whose
//! directories or memory cannot work, `kvpark_config_preflight` checks it for
//! a caller that knows more (other ranks, memory it still allocates), and
//! every message carries its prefix once.

use kvpark::ffi::{
    kvpark_buf_free, kvpark_config_preflight, kvpark_config_validate, kvpark_last_error,
    kvpark_mover_free, kvpark_mover_new, kvpark_planner_new, KvparkBuf, KvparkStatus,
};
use std::ptr;

fn last_error() -> String {
    let mut buf = vec![0u8; 8192];
    let n = unsafe { kvpark_last_error(buf.as_mut_ptr().cast(), buf.len()) };
    buf.truncate(n.min(8191));
    String::from_utf8_lossy(&buf).into_owned()
}

fn empty() -> KvparkBuf {
    KvparkBuf {
        ptr: ptr::null_mut(),
        len: 0,
    }
}

#[test]
fn mover_new_refuses_an_nvme_dir_that_is_a_file() {
    let d = tempfile::tempdir().unwrap();
    let file = d.path().join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let cfg = format!(r#"{{"host_bytes":"1MiB","nvme_dir":"{}"}}"#, file.display());
    let mut m = ptr::null_mut();
    let st = unsafe { kvpark_mover_new(cfg.as_ptr(), cfg.len(), 0, &mut m) };
    assert_eq!(st, KvparkStatus::Config);
    assert!(m.is_null());
    let e = last_error();
    assert!(
        e.starts_with("kvpark_mover_new: config error: nvme_dir: ") && e.contains("is a file"),
        "{e}"
    );
    assert_eq!(e.matches("kvpark_mover_new").count(), 1, "{e}");
    let mut p = ptr::null_mut();
    let st = unsafe { kvpark_planner_new(cfg.as_ptr(), cfg.len(), 16, 0, 1, &mut p) };
    assert_eq!(st, KvparkStatus::Config);
    assert!(last_error().starts_with("kvpark_planner_new: config error: nvme_dir: "));
}

#[test]
fn mover_new_refuses_a_host_tier_larger_than_the_machine() {
    let cfg = r#"{"host_bytes":"1024TiB"}"#;
    let mut m = ptr::null_mut();
    let st = unsafe { kvpark_mover_new(cfg.as_ptr(), cfg.len(), 0, &mut m) };
    assert_eq!(st, KvparkStatus::Config);
    let e = last_error();
    assert!(
        e.starts_with("kvpark_mover_new: config error: host_bytes: 1024.00TiB per rank")
            && e.contains("the largest host_bytes that fits is"),
        "{e}"
    );
    // The scheduler side maps no arena.
    let mut p = ptr::null_mut();
    let st = unsafe { kvpark_planner_new(cfg.as_ptr(), cfg.len(), 16, 0, 1, &mut p) };
    assert_eq!(st, KvparkStatus::Ok, "{}", last_error());
    unsafe { kvpark::ffi::kvpark_planner_free(p) };
    let small = r#"{"host_bytes":"1MiB"}"#;
    let st = unsafe { kvpark_mover_new(small.as_ptr(), small.len(), 0, &mut m) };
    assert_eq!(st, KvparkStatus::Ok, "{}", last_error());
    unsafe { kvpark_mover_free(m) };
}

#[test]
fn preflight_counts_every_rank_and_reserved_memory() {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let avail_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap();
    // A quarter of the available memory per rank: one rank fits, eight do not.
    let per_rank = avail_kib * 1024 / 4;
    let cfg = format!(r#"{{"host_bytes":{per_rank}}}"#);
    let run = |ctx: &str| {
        let mut out = empty();
        let st = unsafe {
            kvpark_config_preflight(cfg.as_ptr(), cfg.len(), ctx.as_ptr(), ctx.len(), &mut out)
        };
        if st == KvparkStatus::Ok {
            let s = unsafe { std::slice::from_raw_parts(out.ptr, out.len) }.to_vec();
            unsafe { kvpark_buf_free(out) };
            Ok(String::from_utf8(s).unwrap())
        } else {
            Err((st, last_error()))
        }
    };
    let ok = run(r#"{"rank":0,"ranks":1}"#).unwrap();
    assert!(ok.contains(&format!("\"host_bytes\":{per_rank}")), "{ok}");
    let (st, e) = run(r#"{"rank":0,"ranks":8}"#).unwrap_err();
    assert_eq!(st, KvparkStatus::Config);
    assert!(
        e.contains("x 8 ranks") && e.contains("largest host_bytes"),
        "{e}"
    );
    let reserve = format!(
        r#"{{"rank":0,"ranks":1,"reserve_host_bytes":{}}}"#,
        per_rank * 4
    );
    let (_, e) = run(&reserve).unwrap_err();
    assert!(e.contains("KV cache vLLM allocates in host memory"), "{e}");
    // Rank-independent checks only: no memory check, unless ranks are named
    // (a check made before any worker exists).
    assert!(run(r#"{"rank":null}"#).is_ok());
    assert!(run(r#"{"rank":null,"ranks":8}"#).is_err());
    let (st, e) = run(r#"{"rnak":0}"#).unwrap_err();
    assert_eq!(st, KvparkStatus::InvalidArgument, "{e}");
}

#[test]
fn config_messages_carry_each_prefix_once() {
    for (json, key) in [
        (r#"{"codec":"zip"}"#, "codec: "),
        (r#"{"host_bytes":"lots"}"#, "host_bytes"),
    ] {
        let mut out = empty();
        let st = unsafe { kvpark_config_validate(json.as_ptr(), json.len(), &mut out) };
        assert_eq!(st, KvparkStatus::Config);
        let e = last_error();
        assert!(
            e.starts_with(&format!("kvpark_config_validate: config error: {key}")),
            "{e}"
        );
        assert_eq!(e.matches(key).count(), 1, "{e}");
        assert_eq!(e.matches("kvpark_config_validate").count(), 1, "{e}");
    }
}
