//! Fuzz targets for every parser of bytes that come from outside kvpark,
//! on stable Rust with proptest: one `#[test]` per target.
//!
//! | target | parser | what a case asserts |
//! |---|---|---|
//! | `fuzz_plan` | `plan::Plan::decode` (scheduler → worker bytes) | no panic; an error is `Corrupt`; a decoded plan re-encodes to exactly the input, and the input less its last byte or plus a byte is an error |
//! | `fuzz_report` | `plan::Report::decode` (worker → scheduler bytes) | the same, for reports |
//! | `fuzz_record_header` | `tier::nvme::format::RecordHeader::decode` | no panic; a decoded header has a known codec, a valid element size, raw len = stored len for raw records, re-encodes to the input (when its reserved bytes are zero) and every single-bit flip of it is an error |
//! | `fuzz_record_payload` | a segment file through `NvmeStore` recovery and `get` (header, payload crc32c, codec decode), and every codec's `decode` on the payload | never wrong bytes: a `get` that succeeds returns exactly the codec decode of a record in the file with that key whose payload checksum matches, so a record whose payload checksum does not match is an error (`Corrupt`); codecs never panic and fail only with `Corrupt`; every lossless codec round-trips the input |
//! | `fuzz_slots` | `tier::slots::read_entries` (the host arena `.slots` table; `parse_entry`) | no panic; `None` exactly when the file is not a table of its own declared size; otherwise exactly the entries whose state is valid and whose entry crc32c matches |
//! | `fuzz_trace` | `sim::trace::read_bytes` (plain and gzip) and `parse_row`, then `derive_steps`, `stats::TraceStats` (JSON and report) and `engine::Script` | no panic; corrupt gzip is an error; every row is delivered once, loose rows are not replayed; each step has fresh + cacheable = L, fresh ≤ append, a gap ≥ 0, a span > 0 |
//! | `fuzz_config` | `config::Config::from_json` (`kv_connector_extra_config`) | no panic; an error is a `Config` error; a config that parses re-serialises to JSON that parses to the same value |
//! | `fuzz_deployment` | `sim::deploy::Deployment::from_json` (`replay --deployment`) | no panic; an error is a `Config` error naming the deployment; an accepted deployment satisfies every documented bound and replays the example trace |
//! | `fuzz_knobs` | the kvpark policy's knobs as text: `sim::tune::knob_grid` (`tune --knobs`) and `policy::by_name` on `kvpark@…` names (`replay --policies`) | no panic; an error is `InvalidArgument`; every accepted setting is within the documented ranges and its name form parses back to the same knobs, which the connector's config (`"kvpark"` object) accepts and reads back equal |
//! | `fuzz_cluster` | the same parser on cluster files (`tune --cluster`: drives, pinnable host RAM, prices, prefill by context), then `sim::tune::grid` and `config_json` | no panic; an error is a `Config` error naming the deployment; an accepted file keeps host ≤ pinnable and NVMe ≤ the drives' sum (checked sums), its grid stays within them, and the config of every grid point passes `Config::from_json` as printed |
//!
//! Inputs: the real inputs under `tests/fuzz_corpus/<target>/` (plans and
//! reports built by the scheduler-side planner, records and a `.slots` table
//! written by the NVMe store and the host arena, the TraceLab example rows,
//! config and deployment JSON), mutated — bit flips, byte sets, truncation,
//! removals, random insertions, splices of other corpus entries, duplicated
//! ranges, 4- and 8-byte big integers, and for JSON values replaced by
//! extreme numbers, strings, timestamps and types — and purely random bytes.
//! Regenerate the corpus after a format change with
//! `KVPARK_FUZZ_REGEN=1 cargo test --test fuzz corpus`; `corpus_holds_real_inputs`
//! checks that every entry is still accepted as it was written.
//!
//! Cases per target: `KVPARK_FUZZ_CASES` (default 1000: the whole file runs in
//! about 3 s in debug on two idle cores, `fuzz_record_payload` being the
//! slowest, since it opens a store per case); the seed: `KVPARK_FUZZ_SEED`
//! (default fixed, so CI is reproducible). Run longer, e.g.:
//!
//! ```text
//! KVPARK_FUZZ_CASES=100000 KVPARK_FUZZ_SEED=$RANDOM cargo test --release --test fuzz
//! ```
//!
//! A failure prints the corpus entry, the mutations and the input bytes
//! (shrunk). `scripts/test.sh` runs every target once more under valgrind
//! with `KVPARK_FUZZ_CASES=100` (about 15 s).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use kvpark::block::BlockKey;
use kvpark::codec::{self, CodecTag};
use kvpark::config::Config;
use kvpark::plan::{LoadDone, MoveDone, MoveKind, Outcome, Plan, Report, SaveDone, TierChange};
use kvpark::sim::deploy::{Deployment, MAX_KV_BYTES_PER_TOKEN};
use kvpark::sim::engine::{run_policy, Script, SimConfig};
use kvpark::sim::stats::TraceStats;
use kvpark::sim::trace::{parse_row, read_bytes, ToolNames};
use kvpark::tier::nvme::format::{RecordHeader, ALIGN, HEADER_LEN, PAYLOAD_OFF};
use kvpark::tier::nvme::{NvmeConfig, NvmeStore};
use kvpark::ErrorKind;
use proptest::prelude::*;
use proptest::test_runner::{Config as PtConfig, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use serde_json::Value;

// ------------------------------------------------------------- harness

fn cases() -> u32 {
    std::env::var("KVPARK_FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000)
}

fn runner() -> TestRunner {
    let seed: u64 = std::env::var("KVPARK_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x6b76_7061_726b);
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    let cfg = PtConfig {
        cases: cases(),
        failure_persistence: None,
        max_shrink_iters: 2000,
        ..PtConfig::default()
    };
    TestRunner::new_with_rng(cfg, TestRng::from_seed(RngAlgorithm::ChaCha, &key))
}

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz_corpus")
        .join(target)
}

/// The corpus of `target`: (file name, bytes), sorted by name.
fn corpus(target: &str) -> Arc<Vec<(String, Vec<u8>)>> {
    let dir = corpus_dir(target);
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
        .map(|e| {
            let p = e.unwrap().path();
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    v.sort();
    assert!(!v.is_empty(), "empty corpus {}", dir.display());
    Arc::new(v)
}

/// A byte-level mutation; positions are taken modulo the current length.
#[derive(Clone, Debug)]
enum Mutation {
    Flip {
        at: usize,
        bit: u8,
    },
    Set {
        at: usize,
        byte: u8,
    },
    Truncate {
        at: usize,
    },
    Remove {
        at: usize,
        len: u16,
    },
    Insert {
        at: usize,
        bytes: Vec<u8>,
    },
    /// Insert `len` bytes of corpus entry `from` starting at `start`.
    Splice {
        at: usize,
        from: usize,
        start: usize,
        len: u16,
    },
    /// Overwrite with an extreme little-endian integer.
    BigInt {
        at: usize,
        which: u8,
    },
    Duplicate {
        at: usize,
        len: u16,
    },
    /// JSON only: replace the value at the `path`-th path by an extreme one.
    JsonSet {
        path: usize,
        value: u8,
    },
    /// JSON only: remove the `path`-th key or element.
    JsonRemove {
        path: usize,
    },
    /// JSON only: add key `key` (from the known keys) with an extreme value.
    JsonAdd {
        key: u8,
        value: u8,
    },
}

const BIG: [u64; 10] = [
    0,
    u64::MAX,
    u32::MAX as u64,
    0x8000_0000,
    0x8000_0000_0000_0000,
    0x7fff_ffff_ffff_ffff,
    1 << 32,
    1 << 40,
    0x0400_0000_0000_0000,
    4097,
];

const JSON_VALUES: &[&str] = &[
    "0",
    "-1",
    "1",
    "1.5",
    "1e308",
    "-1e308",
    "1e-300",
    "18446744073709551615",
    "18446744073709551616",
    "9223372036854775807",
    "-9223372036854775808",
    "4294967295",
    "4294967296",
    "1073741825",
    "null",
    "true",
    "false",
    "[]",
    "{}",
    "[1,2]",
    "{\"a\":1}",
    "\"\"",
    "\"0\"",
    "\"18446744073709551615\"",
    "\"18446744073709551616\"",
    "\"1e30GiB\"",
    "\"99999999999999999999TiB\"",
    "\"16777216TiB\"",
    "\"0.5\"",
    "\".\"",
    "\"9999-12-31T23:59:59Z\"",
    "\"2300-01-01T00:00:00Z\"",
    "\"2262-04-11T23:47:16.854775807Z\"",
    "\"1677-09-21T00:12:43.145224192Z\"",
    "\"2026-01-01T00:00:00.999999999999+23:59\"",
    "\"1970-01-01T00:00:00-99:99\"",
    "\"0000-01-01T00:00:00Z\"",
    "\"user_message\"",
    "\"tool_result\"",
    "\"text\"",
    "\"\\u0000\"",
    "\"ä€😀\"",
    "\"none\"",
    "\"lz4-planes\"",
    "\"auto\"",
    "\"0ns\"",
    "\"18446744073709551615ns\"",
    "\"100000000000000000000d\"",
    "\"dma_batch\"",
    "[{\"strategy\":\"dma_batch\",\"total_bytes\":[18446744073709551615,0]}]",
    "[{\"dir\":\"d2h\",\"layout\":\"lbhnc\",\"total_bytes\":[0,1e308],\"strategy\":\"kernel_mapped\"}]",
];

const JSON_KEYS: &[&str] = &[
    "host_bytes",
    "kvpark",
    "prefetch_margin",
    "check_every",
    "first_check",
    "prefetch_until",
    "nvme_dir",
    "nvme_bytes",
    "nvme_segment_bytes",
    "codec",
    "session_ttl",
    "copy_strategy",
    "io_threads",
    "min_park_blocks",
    "kv_bytes_per_token",
    "gpu_kv_bytes",
    "max_context_tokens",
    "block_size",
    "decode_step_ms",
    "hbm_gbps",
    "time_compression",
    "pcie_h2d_gbps",
    "prefill_tokens_per_s",
    "prefill_halving_context_tokens",
    "round_index",
    "prefix_tokens",
    "newly_append_tokens",
    "output_tokens",
    "timing_events",
    "tools",
    "provider",
    "session_id",
];

fn mutation(json: bool) -> BoxedStrategy<Mutation> {
    let bytes = prop_oneof![
        4 => (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Mutation::Flip { at, bit }),
        2 => (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Mutation::Set { at, byte }),
        2 => any::<usize>().prop_map(|at| Mutation::Truncate { at }),
        1 => (any::<usize>(), 1u16..64).prop_map(|(at, len)| Mutation::Remove { at, len }),
        1 => (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..32))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        1 => (any::<usize>(), any::<usize>(), any::<usize>(), 1u16..512)
            .prop_map(|(at, from, start, len)| Mutation::Splice { at, from, start, len }),
        2 => (any::<usize>(), any::<u8>()).prop_map(|(at, which)| Mutation::BigInt { at, which }),
        1 => (any::<usize>(), 1u16..256).prop_map(|(at, len)| Mutation::Duplicate { at, len }),
    ];
    if !json {
        return bytes.boxed();
    }
    prop_oneof![
        2 => bytes,
        4 => (any::<usize>(), any::<u8>()).prop_map(|(path, value)| Mutation::JsonSet { path, value }),
        1 => any::<usize>().prop_map(|path| Mutation::JsonRemove { path }),
        2 => (any::<u8>(), any::<u8>()).prop_map(|(key, value)| Mutation::JsonAdd { key, value }),
    ]
    .boxed()
}

/// Every path (as a list of keys / indices) in `v`, parents before children.
fn json_paths(v: &Value, at: &mut Vec<Value>, out: &mut Vec<Vec<Value>>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                at.push(Value::String(k.clone()));
                out.push(at.clone());
                json_paths(x, at, out);
                at.pop();
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                at.push(Value::from(i));
                out.push(at.clone());
                json_paths(x, at, out);
                at.pop();
            }
        }
        _ => {}
    }
}

fn json_at<'a>(v: &'a mut Value, path: &[Value]) -> Option<&'a mut Value> {
    let mut cur = v;
    for p in path {
        cur = match (cur, p) {
            (Value::Object(m), Value::String(k)) => m.get_mut(k)?,
            (Value::Array(a), Value::Number(i)) => a.get_mut(i.as_u64()? as usize)?,
            _ => return None,
        };
    }
    Some(cur)
}

/// An extreme value: mostly of the type of `old` (a number for a number, a
/// string for a string), else of any type.
fn json_value(i: u8, old: Option<&Value>) -> Value {
    let all = JSON_VALUES
        .iter()
        .map(|j| serde_json::from_str::<Value>(j).unwrap());
    let same: Vec<Value> = match old {
        Some(o) if i & 0xc0 != 0xc0 => all
            .filter(|v| std::mem::discriminant(v) == std::mem::discriminant(o))
            .collect(),
        _ => all.collect(),
    };
    if same.is_empty() {
        return serde_json::from_str(JSON_VALUES[i as usize % JSON_VALUES.len()]).unwrap();
    }
    same[(i & 0x3f) as usize % same.len()].clone()
}

/// Applies a JSON mutation to every JSON line of `b` that parses (a single
/// object for config/deployment files, one row per line for traces).
fn json_mutate(b: &[u8], m: &Mutation) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(b).ok()?;
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    if lines.len() > 1
        && !lines
            .iter()
            .all(|l| serde_json::from_str::<Value>(l).is_ok())
    {
        // a multi-line JSON document (pretty-printed)
        lines = vec![text.to_string()];
    }
    let pick = match *m {
        Mutation::JsonSet { path, .. } | Mutation::JsonRemove { path } => path / 7,
        Mutation::JsonAdd { key, value } => key as usize * 31 + value as usize,
        _ => 0,
    } % lines.len().max(1);
    if let Some(line) = lines.get_mut(pick) {
        let mut v = serde_json::from_str::<Value>(line).ok()?;
        let mut paths = Vec::new();
        json_paths(&v, &mut Vec::new(), &mut paths);
        match *m {
            Mutation::JsonSet { path, value } if !paths.is_empty() => {
                let p = &paths[path % paths.len()];
                if let Some(x) = json_at(&mut v, p) {
                    *x = json_value(value, Some(x));
                }
            }
            Mutation::JsonRemove { path } if !paths.is_empty() => {
                let p = &paths[path % paths.len()];
                let (last, parent) = p.split_last().unwrap();
                match (json_at(&mut v, parent), last) {
                    (Some(Value::Object(o)), Value::String(k)) => {
                        o.remove(k);
                    }
                    (Some(Value::Array(a)), Value::Number(i)) => {
                        a.remove(i.as_u64().unwrap() as usize);
                    }
                    _ => {}
                }
            }
            Mutation::JsonAdd { key, value } => {
                if let Value::Object(o) = &mut v {
                    o.insert(
                        JSON_KEYS[key as usize % JSON_KEYS.len()].to_string(),
                        json_value(value, None),
                    );
                }
            }
            _ => {}
        }
        *line = v.to_string();
    }
    Some(lines.join("\n").into_bytes())
}

fn apply(mut b: Vec<u8>, m: &Mutation, corpus: &[(String, Vec<u8>)]) -> Vec<u8> {
    let pos = |at: usize, n: usize| at % (n + 1);
    match *m {
        Mutation::Flip { at, bit } if !b.is_empty() => {
            let i = at % b.len();
            b[i] ^= 1 << bit;
        }
        Mutation::Set { at, byte } if !b.is_empty() => {
            let i = at % b.len();
            b[i] = byte;
        }
        Mutation::Truncate { at } => b.truncate(pos(at, b.len())),
        Mutation::Remove { at, len } => {
            let i = pos(at, b.len());
            let j = (i + len as usize).min(b.len());
            b.drain(i..j);
        }
        Mutation::Insert { at, ref bytes } => {
            let i = pos(at, b.len());
            b.splice(i..i, bytes.iter().copied());
        }
        Mutation::Splice {
            at,
            from,
            start,
            len,
        } => {
            let src = &corpus[from % corpus.len()].1;
            let s = pos(start, src.len());
            let e = (s + len as usize).min(src.len());
            let i = pos(at, b.len());
            b.splice(i..i, src[s..e].iter().copied());
        }
        Mutation::BigInt { at, which } => {
            let v = BIG[which as usize % BIG.len()];
            let wide = which & 0x80 != 0;
            let bytes: Vec<u8> = if wide {
                v.to_le_bytes().to_vec()
            } else {
                (v as u32).to_le_bytes().to_vec()
            };
            if b.len() >= bytes.len() {
                let i = at % (b.len() - bytes.len() + 1);
                b[i..i + bytes.len()].copy_from_slice(&bytes);
            }
        }
        Mutation::Duplicate { at, len } if !b.is_empty() => {
            let i = at % b.len();
            let j = (i + len as usize).min(b.len());
            let d = b[i..j].to_vec();
            b.splice(j..j, d);
        }
        Mutation::JsonSet { .. } | Mutation::JsonRemove { .. } | Mutation::JsonAdd { .. } => {
            if let Some(x) = json_mutate(&b, m) {
                b = x;
            }
        }
        _ => {}
    }
    b
}

/// One generated input, printed so that a failure can be replayed by hand.
#[derive(Clone)]
struct Case {
    seed: String,
    muts: Vec<Mutation>,
    bytes: Vec<u8>,
}

impl fmt::Debug for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "corpus entry {:?}, mutations {:?}", self.seed, self.muts)?;
        write!(f, "{} bytes: ", self.bytes.len())?;
        let shown = &self.bytes[..self.bytes.len().min(4096)];
        match std::str::from_utf8(shown) {
            Ok(s) => write!(f, "{s:?}")?,
            Err(_) => {
                for c in shown.chunks(32) {
                    writeln!(f)?;
                    for x in c {
                        write!(f, "{x:02x}")?;
                    }
                }
            }
        }
        if shown.len() < self.bytes.len() {
            write!(f, " ...")?;
        }
        Ok(())
    }
}

/// Corpus entries mutated (mostly), or random bytes.
fn inputs(corpus: Arc<Vec<(String, Vec<u8>)>>, json: bool) -> BoxedStrategy<Case> {
    let c = corpus.clone();
    let mutated = (
        any::<usize>(),
        proptest::collection::vec(mutation(json), 0..6),
    )
        .prop_map(move |(i, muts)| {
            let (name, seed) = &c[i % c.len()];
            let bytes = muts.iter().fold(seed.clone(), |b, m| apply(b, m, &c));
            Case {
                seed: name.clone(),
                muts,
                bytes,
            }
        });
    let random = proptest::collection::vec(any::<u8>(), 0..600).prop_map(|bytes| Case {
        seed: "(random)".into(),
        muts: vec![],
        bytes,
    });
    prop_oneof![6 => mutated, 1 => random].boxed()
}

thread_local! {
    /// Inputs the current target's parser accepted (the rest were errors).
    static ACCEPTED: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

fn accepted() {
    ACCEPTED.with(|a| a.set(a.get() + 1));
}

fn fuzz(
    target: &str,
    json: bool,
    check: impl Fn(&[u8]) -> Result<(), TestCaseError>,
) -> Result<(), TestCaseError> {
    let c = corpus(target);
    let t = std::time::Instant::now();
    ACCEPTED.with(|a| a.set(0));
    let r = runner().run(&inputs(c, json), |case| check(&case.bytes));
    eprintln!(
        "fuzz {target}: {} cases ({} accepted) in {:.2} s",
        cases(),
        ACCEPTED.with(|a| a.get()),
        t.elapsed().as_secs_f64()
    );
    r.map_err(|e| TestCaseError::fail(format!("{target}: {e}")))
}

fn run_target(target: &str, json: bool, check: impl Fn(&[u8]) -> Result<(), TestCaseError>) {
    if let Err(e) = fuzz(target, json, check) {
        panic!("{e}");
    }
}

// ------------------------------------------------------------- plan, report

fn check_plan(b: &[u8]) -> Result<(), TestCaseError> {
    match Plan::decode(b) {
        Ok(p) => {
            accepted();
            prop_assert_eq!(p.encode(), b, "a decoded plan re-encodes to its bytes");
            prop_assert!(Plan::decode(&b[..b.len() - 1]).is_err(), "truncated");
            let mut longer = b.to_vec();
            longer.push(0);
            prop_assert!(Plan::decode(&longer).is_err(), "trailing byte");
        }
        Err(e) => prop_assert_eq!(e.kind(), ErrorKind::Corrupt, "{}", e),
    }
    Ok(())
}

fn check_report(b: &[u8]) -> Result<(), TestCaseError> {
    match Report::decode(b) {
        Ok(r) => {
            accepted();
            prop_assert_eq!(r.encode(), b, "a decoded report re-encodes to its bytes");
            prop_assert!(Report::decode(&b[..b.len() - 1]).is_err(), "truncated");
            let mut longer = b.to_vec();
            longer.push(0);
            prop_assert!(Report::decode(&longer).is_err(), "trailing byte");
        }
        Err(e) => prop_assert_eq!(e.kind(), ErrorKind::Corrupt, "{}", e),
    }
    Ok(())
}

#[test]
fn fuzz_plan() {
    run_target("plan", false, |b| {
        check_plan(b)?;
        // a plan is never taken for a report
        prop_assert!(Report::decode(b).is_err() || Plan::decode(b).is_err());
        Ok(())
    });
}

#[test]
fn fuzz_report() {
    run_target("report", false, check_report);
}

// ------------------------------------------------------------- NVMe records

fn check_header(b: &[u8]) -> Result<(), TestCaseError> {
    let mut h = [0u8; HEADER_LEN];
    let n = b.len().min(HEADER_LEN);
    h[..n].copy_from_slice(&b[..n]);
    match RecordHeader::decode(&h) {
        Ok(hdr) => {
            accepted();
            prop_assert!(matches!(hdr.elem_size, 1 | 2 | 4 | 8));
            prop_assert!(hdr.codec != CodecTag::None || hdr.raw_len == hdr.stored_len);
            let mut again = [0u8; HEADER_LEN];
            hdr.encode(&mut again);
            prop_assert_eq!(RecordHeader::decode(&again).ok(), Some(hdr));
            if h[72..124].iter().all(|&x| x == 0) {
                prop_assert_eq!(&again[..], &h[..], "re-encodes to its bytes");
            }
            for bit in 0..HEADER_LEN * 8 {
                let mut c = h;
                c[bit / 8] ^= 1 << (bit % 8);
                prop_assert!(RecordHeader::decode(&c).is_err(), "bit {} flipped", bit);
            }
        }
        Err(kvpark::tier::nvme::format::HeaderError::BadMagic) => {
            prop_assert_ne!(&h[..4], b"KVPR");
        }
        Err(kvpark::tier::nvme::format::HeaderError::BadChecksum { stored, computed }) => {
            prop_assert_ne!(stored, computed);
            prop_assert_eq!(computed, crc32c::crc32c(&h[..124]));
        }
        Err(_) => {}
    }
    Ok(())
}

#[test]
fn fuzz_record_header() {
    run_target("record_header", false, check_header);
}

/// Raw lengths the harness allocates for (a header may claim 4 GiB).
const MAX_RAW: u32 = 16 << 20;

/// Every record-looking header in `file` at a 4 KiB boundary whose payload is
/// in the file: (key, payload checksum matches, codec decode of the payload).
fn records_in(file: &[u8]) -> Vec<(BlockKey, bool, Option<Vec<u8>>)> {
    let mut out = Vec::new();
    let mut off = 0;
    while off + HEADER_LEN <= file.len() {
        if let Ok(h) = RecordHeader::decode(&file[off..off + HEADER_LEN]) {
            let s = off + PAYLOAD_OFF;
            let e = s + h.stored_len as usize;
            if e <= file.len() {
                let payload = &file[s..e];
                let crc_ok = crc32c::crc32c(payload) == h.payload_crc;
                let raw = (h.raw_len <= MAX_RAW).then(|| {
                    let mut dst = vec![0u8; h.raw_len as usize];
                    codec::by_tag(h.codec)
                        .decode(payload, h.elem_size as usize, &mut dst)
                        .ok()
                        .map(|_| dst)
                });
                out.push((h.key, crc_ok, raw.flatten()));
            }
        }
        off += ALIGN;
    }
    out
}

fn check_codecs(payload: &[u8], raw_len: usize) -> Result<(), TestCaseError> {
    for tag in codec::ALL {
        let c = codec::by_tag(tag);
        for es in [1usize, 2, 4, 8] {
            let mut dst = vec![0u8; raw_len];
            if let Err(e) = c.decode(payload, es, &mut dst) {
                prop_assert_eq!(e.kind(), ErrorKind::Corrupt, "{} {}", tag.name(), e);
            }
        }
        // and back: encode the bytes, decode them exactly
        let src = &payload[..payload.len().min(8192)];
        let mut enc = Vec::new();
        c.encode(src, 2, &mut enc).unwrap();
        let mut dec = vec![0u8; src.len()];
        c.decode(&enc, 2, &mut dec).unwrap();
        if c.lossless() {
            prop_assert_eq!(&dec[..], src, "{} round trip", tag.name());
        }
    }
    Ok(())
}

fn nvme_config(dir: &Path, verify: bool) -> NvmeConfig {
    let mut c = NvmeConfig::new(dir, 0, 1 << 30);
    c.io_threads = 1;
    c.direct = false;
    c.verify_on_open = verify;
    c
}

fn check_segment(b: &[u8]) -> Result<(), TestCaseError> {
    let d = tempfile::tempdir().unwrap();
    let rank = d.path().join("rank0");
    std::fs::create_dir(&rank).unwrap();
    std::fs::write(rank.join("seg-000001.kvp"), b).unwrap();
    let found = records_in(b);
    // the payload codecs, straight
    for off in (0..b.len()).step_by(ALIGN) {
        let mut h = [0u8; HEADER_LEN];
        let n = (b.len() - off).min(HEADER_LEN);
        h[..n].copy_from_slice(&b[off..off + n]);
        if let Ok(h) = RecordHeader::decode(&h) {
            let s = (off + PAYLOAD_OFF).min(b.len());
            let e = (s + h.stored_len as usize).min(b.len());
            check_codecs(&b[s..e], h.raw_len.min(MAX_RAW) as usize)?;
        }
    }
    let verify = b.len() % 2 == 0;
    let store = match NvmeStore::open(nvme_config(d.path(), verify)) {
        Ok(s) => s,
        Err(e) => return Err(TestCaseError::fail(format!("open failed: {e}"))),
    };
    for k in store.keys() {
        if k.raw_len > MAX_RAW {
            continue;
        }
        let mut dst = vec![0u8; k.raw_len as usize];
        match store.get(&k.key, &mut dst) {
            Ok(_) => {
                accepted();
                let ok = found.iter().any(|(key, crc_ok, raw)| {
                    *key == k.key && *crc_ok && raw.as_deref() == Some(&dst[..])
                });
                prop_assert!(
                    ok,
                    "served bytes no valid record of key {} holds",
                    k.key.to_hex()
                );
            }
            Err(e) => prop_assert!(
                matches!(e.kind(), ErrorKind::Corrupt | ErrorKind::NotFound),
                "{}",
                e
            ),
        }
    }
    store.close().ok();
    Ok(())
}

#[test]
fn fuzz_record_payload() {
    run_target("record_payload", false, check_segment);
}

// ------------------------------------------------------------- slots table

fn check_slots(b: &[u8]) -> Result<(), TestCaseError> {
    let d = tempfile::tempdir().unwrap();
    let arena = d.path().join("arena");
    std::fs::write(kvpark::tier::slots::table_path(&arena), b).unwrap();
    let got = kvpark::tier::slots::read_entries(&arena);
    let overflows = b.len() >= 24 && &b[..8] == b"KVPSLOT1" && {
        let slots = u64::from_le_bytes(b[16..24].try_into().unwrap());
        slots
            .checked_mul(64)
            .and_then(|x| x.checked_add(64))
            .is_none()
    };
    let got = match got {
        Ok(g) => g,
        // a slot count whose table size overflows 64 bits is corrupt
        Err(e) if overflows && e.kind() == ErrorKind::Corrupt => return Ok(()),
        Err(e) => return Err(TestCaseError::fail(format!("read_entries failed: {e}"))),
    };
    let is_table = b.len() >= 64 && &b[..8] == b"KVPSLOT1" && {
        let slots = u64::from_le_bytes(b[16..24].try_into().unwrap());
        slots.checked_mul(64).and_then(|x| x.checked_add(64)) == Some(b.len() as u64)
    };
    match got {
        None => prop_assert!(!is_table, "a table of its own size was refused"),
        Some((block_bytes, entries)) => {
            accepted();
            prop_assert!(is_table, "not a table, but read as one");
            prop_assert_eq!(
                block_bytes,
                u64::from_le_bytes(b[24..32].try_into().unwrap())
            );
            let want: Vec<u32> = (0..(b.len() - 64) / 64)
                .filter(|&s| {
                    let mut e: [u8; 64] = b[64 + 64 * s..128 + 64 * s].try_into().unwrap();
                    let crc = u32::from_le_bytes(e[52..56].try_into().unwrap());
                    e[52..56].fill(0);
                    u32::from_le_bytes(e[..4].try_into().unwrap()) == 1
                        && crc32c::crc32c(&e[4..56]) == crc
                })
                .map(|s| s as u32)
                .collect();
            let slots: Vec<u32> = entries.iter().map(|e| e.slot).collect();
            prop_assert_eq!(slots, want);
            for e in &entries {
                let at = 64 + 64 * e.slot as usize;
                prop_assert_eq!(&e.key.0[..], &b[at + 16..at + 48]);
            }
        }
    }
    Ok(())
}

#[test]
fn fuzz_slots() {
    run_target("slots", false, check_slots);
}

// ------------------------------------------------------------- trace

fn check_trace(b: &[u8]) -> Result<(), TestCaseError> {
    let gzip = b.starts_with(&[0x1f, 0x8b]);
    let mut steps = 0u64;
    let mut st = TraceStats::default();
    let r = read_bytes(b, |s, tools| {
        for x in &s.steps {
            assert_eq!(x.fresh + x.cacheable, x.l, "fresh + cacheable = L");
            assert!(x.fresh <= x.append, "fresh ≤ append");
            assert!(x.gap.map_or(true, |g| g >= 0), "gap ≥ 0");
            assert!(x.gen_span.map_or(true, |g| g > 0), "span > 0");
        }
        steps += s.steps.len() as u64;
        st.add(&s, tools);
        Ok(())
    });
    match r {
        Ok(sum) => {
            if sum.rows > 0 {
                accepted();
            }
            prop_assert_eq!(steps, sum.rows, "every row delivered once");
            let _ = st.sweep();
            if !gzip {
                let lines = b.split(|&c| c == b'\n').count() as u64;
                prop_assert!(sum.rows + sum.bad_lines <= lines);
                // the rows are exactly the lines parse_row takes
                let mut tools = ToolNames::default();
                let ok = b
                    .split(|&c| c == b'\n')
                    .filter_map(|l| std::str::from_utf8(l).ok())
                    .filter(|l| !l.trim().is_empty())
                    .filter(|l| parse_row(l.trim_end_matches('\r'), 0, &mut tools).is_ok())
                    .count() as u64;
                prop_assert_eq!(ok, sum.rows);
            }
            prop_assert!(sum.loose_rows <= sum.rows);
            let _ = st.to_json();
            let _ = st.render();
            // rows outside the session walk (DESIGN §6) are not replayed
            let (script, _) = Script::from_bytes(b).unwrap();
            prop_assert_eq!(script.steps.len() as u64, sum.rows - sum.loose_rows);
        }
        Err(e) => prop_assert!(gzip, "only a gzip read can fail: {}", e),
    }
    Ok(())
}

#[test]
fn fuzz_trace() {
    // rows of the example, one to a few lines at a time, and gzip of them
    run_target("trace", true, check_trace);
}

// ------------------------------------------------------------- config

fn check_config(b: &[u8]) -> Result<(), TestCaseError> {
    match Config::from_json(b) {
        Ok(c) => {
            accepted();
            let j = c.to_json();
            let again = Config::from_json(j.as_bytes());
            prop_assert!(
                again.is_ok(),
                "normalized {} does not parse: {:?}",
                j,
                again
            );
            let again = again.unwrap();
            prop_assert_eq!(&again, &c, "normalized {}", j);
            prop_assert_eq!(again.to_json(), j);
        }
        Err(e) => prop_assert_eq!(e.kind(), ErrorKind::Config, "{}", e),
    }
    Ok(())
}

#[test]
fn fuzz_config() {
    run_target("config", true, check_config);
}

// ------------------------------------------------------------- knobs

fn check_knob(k: &kvpark::policy::Knobs) -> Result<(), TestCaseError> {
    prop_assert!((1.0..=100.0).contains(&k.prefetch_margin), "{k:?}");
    prop_assert!((100_000_000..=3_600_000_000_000).contains(&k.check_every));
    prop_assert!((10_000_000..=600_000_000_000).contains(&k.first_check));
    prop_assert!((0.5..=1.0).contains(&k.prefetch_until), "{k:?}");
    let name = format!("kvpark@{}", k.suffix());
    let back = kvpark::policy::kvpark::parse_name(name.trim_end_matches('@'));
    prop_assert!(matches!(back, Some(Ok((_, b))) if b == *k), "{name}");
    let cfg = format!(r#"{{"policy":"kvpark","kvpark":{}}}"#, k.to_json());
    let c = Config::from_json(cfg.as_bytes());
    prop_assert!(
        c.as_ref().is_ok_and(|c| c.kvpark == *k),
        "{cfg}: {:?}",
        c.err()
    );
    Ok(())
}

fn check_knobs(b: &[u8]) -> Result<(), TestCaseError> {
    let Ok(text) = std::str::from_utf8(b) else {
        return Ok(()); // command-line arguments are UTF-8
    };
    match kvpark::sim::tune::knob_grid(text) {
        Ok(ks) => {
            accepted();
            prop_assert!(!ks.is_empty());
            for k in &ks {
                check_knob(k)?;
            }
        }
        Err(e) => prop_assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{}", e),
    }
    let name = format!("kvpark@{text}");
    match kvpark::policy::kvpark::parse_name(&name) {
        Some(Ok((_, k))) => {
            accepted();
            check_knob(&k)?;
            let p = kvpark::policy::by_name(&name, Default::default(), None);
            prop_assert!(p.is_ok(), "{name}");
        }
        Some(Err(e)) => prop_assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{}", e),
        None => {
            prop_assert!(kvpark::policy::by_name(&name, Default::default(), None).is_err());
        }
    }
    Ok(())
}

#[test]
fn fuzz_knobs() {
    run_target("knobs", false, check_knobs);
}

// ------------------------------------------------------------- deployment

fn example_script() -> &'static Script {
    static S: OnceLock<Script> = OnceLock::new();
    S.get_or_init(|| {
        let data = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/tracelab-example.jsonl"
        ))
        .unwrap();
        Script::from_bytes(&data).unwrap().0
    })
}

fn check_deployment(b: &[u8]) -> Result<(), TestCaseError> {
    let Ok(text) = std::str::from_utf8(b) else {
        return Ok(()); // `replay --deployment` reads UTF-8 text only
    };
    match Deployment::from_json(text) {
        Ok(d) => {
            accepted();
            prop_assert!((1..=MAX_KV_BYTES_PER_TOKEN).contains(&d.kv_bytes_per_token));
            prop_assert!(d.gpu_kv_bytes >= d.kv_bytes_per_token);
            prop_assert!(d.codec_ratio.is_finite() && d.codec_ratio >= 1.0);
            prop_assert!(d.gpu_kv_bytes >= d.kv_bytes(d.max_context_tokens));
            prop_assert!((1..=4096).contains(&d.block_size));
            // codec speeds come from the table: `none` has no cost (infinite)
            prop_assert!(d.encode_bps > 0.0 && d.decode_bps > 0.0);
            for v in [
                d.h2d_bps,
                d.d2h_bps,
                d.nvme_read_bps,
                d.nvme_write_bps,
                d.prefill_tps,
                d.prefill_halving,
                d.decode_step_s,
                d.hbm_bps,
                d.time_compression,
            ] {
                prop_assert!(v.is_finite() && v > 0.0);
            }
            prop_assert_eq!(
                d.kv_bytes(u32::MAX as u64) as u128,
                u32::MAX as u128 * d.kv_bytes_per_token as u128
            );
            let policy = ["lmcache-lru", "vllm-offload", "gpu-lru", "oracle"][b.len() % 4];
            let r = run_policy(example_script(), &d, policy, &SimConfig::default());
            prop_assert!(r.is_ok(), "{:?}", r.err());
            let r = r.unwrap();
            prop_assert_eq!(
                r.steps + r.over_context,
                example_script().steps.len() as u64
            );
            prop_assert!((0.0..=1.0).contains(&r.hit.all), "hit {}", r.hit.all);
        }
        Err(e) => {
            prop_assert_eq!(e.kind(), ErrorKind::Config, "{}", e);
            prop_assert!(e.message().starts_with("deployment"), "{}", e);
        }
    }
    Ok(())
}

#[test]
fn fuzz_deployment() {
    run_target("deployment", true, check_deployment);
}

// ------------------------------------------------------------- cluster

fn check_cluster(b: &[u8]) -> Result<(), TestCaseError> {
    use kvpark::sim::tune::{config_json, grid, Outcome, DEFAULT_POLICIES};
    let Ok(text) = std::str::from_utf8(b) else {
        return Ok(()); // `tune --cluster` reads UTF-8 text only
    };
    match Deployment::from_json(text) {
        Ok(d) => {
            accepted();
            prop_assert!(d.host_bytes <= d.pinnable_host_bytes);
            prop_assert!(d.nvme_bytes <= d.nvme_capacity_bytes);
            prop_assert!((1..=kvpark::sim::deploy::MAX_GPU_COUNT).contains(&d.gpu_count));
            if !d.drives.is_empty() {
                let sum = d
                    .drives
                    .iter()
                    .try_fold(0u64, |a, x| a.checked_add(x.capacity));
                prop_assert_eq!(sum, Some(d.nvme_capacity_bytes));
                let rd: f64 = d.drives.iter().map(|x| x.read_bps).sum();
                prop_assert!(d.nvme_read_bps <= rd * (1.0 + 1e-6));
            }
            for v in [
                d.prices.dram_usd_per_gb,
                d.prices.nvme_usd_per_gb,
                d.prices.gpu_usd_per_hour,
            ] {
                prop_assert!(v.is_finite() && v >= 0.0);
            }
            prop_assert!(d.prefill_tps.is_finite() && d.prefill_tps > 0.0);
            prop_assert!(d.prefill_halving.is_finite() && d.prefill_halving > 0.0);
            let policies: Vec<String> = DEFAULT_POLICIES.iter().map(|s| s.to_string()).collect();
            let knobs = kvpark::sim::tune::knob_grid(kvpark::sim::tune::DEFAULT_KNOBS).unwrap();
            match grid(&d, &policies, &[], &knobs, 3, 3) {
                Ok(pts) => {
                    for p in pts {
                        prop_assert!(p.host_bytes > 0 && p.host_bytes <= d.pinnable_host_bytes);
                        prop_assert!(p.nvme_bytes <= d.nvme_capacity_bytes);
                        let cost = d
                            .prices
                            .usd_per_hour(d.gpu_count, p.host_bytes, p.nvme_bytes);
                        prop_assert!(cost.is_finite() && cost >= 0.0);
                        let o = Outcome {
                            point: p,
                            usd_per_hour: cost,
                            ttft_user_p90: 1.0,
                            amplification: 1.0,
                            hit: 1.0,
                            nvme_used: true,
                            nvme_read_bytes: 0,
                        };
                        let j = config_json(&d, &o, None).to_string();
                        let c = Config::from_json(j.as_bytes());
                        prop_assert!(c.is_ok(), "{j}: {:?}", c.err());
                    }
                }
                // only a host RAM too small to give each rank a MiB
                Err(e) => prop_assert!(
                    (d.pinnable_host_bytes / d.gpu_count as u64) < (1u64 << 20),
                    "{e}"
                ),
            }
        }
        Err(e) => {
            prop_assert_eq!(e.kind(), ErrorKind::Config, "{}", e);
            prop_assert!(e.message().starts_with("deployment"), "{}", e);
        }
    }
    Ok(())
}

#[test]
fn fuzz_cluster() {
    run_target("cluster", true, check_cluster);
}

// ------------------------------------------------------------- corpus

fn key(i: u32) -> BlockKey {
    BlockKey::derive(b"fuzz", &i.to_le_bytes())
}

/// bf16-like bytes: random low byte, skewed high byte (compresses with planes).
fn kv_like(n: usize, seed: u64) -> Vec<u8> {
    let mut s = seed | 1;
    (0..n)
        .map(|i| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            if i % 2 == 0 {
                s as u8
            } else {
                0x3c + (s % 4) as u8
            }
        })
        .collect()
}

fn write_corpus() {
    use kvpark::planner::blocks::{BlockPlanner, RequestView};
    let put = |target: &str, name: &str, b: &[u8]| {
        let d = corpus_dir(target);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(name), b).unwrap();
    };
    // plans, as the scheduler-side planner builds them
    let cfg = Config::from_json(br#"{"nvme_dir":"/nonexistent/kvpark"}"#).unwrap();
    let mut p = BlockPlanner::new(cfg, 16).unwrap();
    let hashes: Vec<u8> = (0..6u8).flat_map(|i| [7, i, 1, 2, 3, 4, 5, 6]).collect();
    let view = |id: &'static str, h: &'static [u8]| RequestView {
        req_id: id,
        salt: b"",
        hashes: h,
        hash_len: 8,
        hint: None,
    };
    let hashes: &'static [u8] = Box::leak(hashes.into_boxed_slice());
    put("plan", "empty.bin", &p.build_meta(1));
    p.request_finished(
        &view("chatcmpl-7f3a", hashes),
        &[3, 9, 4, 12, 5, 6],
        6 * 16,
        10,
    )
    .unwrap();
    let save = p.build_meta(10);
    put("plan", "save.bin", &save);
    let plan = Plan::decode(&save).unwrap();
    let keys: Vec<BlockKey> = plan.saves[0].blocks.iter().map(|b| b.0).collect();
    let rep = Report {
        block_bytes: 65536,
        saved: vec![SaveDone {
            req_id: "chatcmpl-7f3a".into(),
            ok: keys.clone(),
            failed: vec![],
        }],
        tiers: keys.iter().map(|&k| (TierChange::OnHost, k)).collect(),
        ..Default::default()
    };
    put("report", "saved.bin", &rep.encode());
    p.on_report(&rep.encode(), 11).unwrap();
    let m = p
        .match_request(&view("chatcmpl-8b21", hashes), 16, 6 * 16 + 3, 20)
        .unwrap();
    assert!(m.external_tokens > 0);
    p.on_alloc(
        "chatcmpl-8b21",
        &(40..47).collect::<Vec<u32>>(),
        m.external_tokens,
    )
    .unwrap();
    p.push_move(MoveKind::Demote, keys[0]);
    p.push_move(MoveKind::EvictHost, keys[1]);
    let load = p.build_meta(20);
    assert!(!Plan::decode(&load).unwrap().loads.is_empty());
    put("plan", "load_and_moves.bin", &load);
    // reports, as a worker sends them
    put("report", "empty.bin", &Report::default().encode());
    let rep = Report {
        block_bytes: 65536,
        saved: vec![SaveDone {
            req_id: "chatcmpl-91c0".into(),
            ok: keys[..3].to_vec(),
            failed: keys[3..].to_vec(),
        }],
        loaded: vec![LoadDone {
            req_id: "chatcmpl-8b21".into(),
            failed: vec![keys[2]],
        }],
        moved: vec![
            MoveDone {
                kind: MoveKind::Demote,
                key: keys[0],
                outcome: Outcome::Done,
            },
            MoveDone {
                kind: MoveKind::EvictHost,
                key: keys[1],
                outcome: Outcome::Skipped("block in state Demoting".into()),
            },
            MoveDone {
                kind: MoveKind::Promote,
                key: keys[4],
                outcome: Outcome::Failed("NVMe read: corrupt record".into()),
            },
        ],
        tiers: vec![
            (TierChange::OnHost, keys[0]),
            (TierChange::OnNvme, keys[0]),
            (TierChange::OnNvme, keys[1]),
            (TierChange::LeftHost, keys[1]),
            (TierChange::LeftNvme, keys[3]),
            (TierChange::Lost, keys[5]),
        ],
        rank: 1,
    };
    put("report", "mixed.bin", &rep.encode());
    // NVMe records, as the store writes them: one segment per codec
    for (tag, name) in [
        (CodecTag::None, "none"),
        (CodecTag::Lz4, "lz4"),
        (CodecTag::Lz4Planes, "lz4-planes"),
    ] {
        let d = tempfile::tempdir().unwrap();
        let mut c = nvme_config(d.path(), false);
        c.codec = tag;
        let s = NvmeStore::open(c).unwrap();
        let mut zeros = kv_like(6000, 3);
        zeros[3000..].fill(0);
        s.put(&key(1), 42, 0, &kv_like(10000, 1)).unwrap();
        s.put(&key(2), 42, 1, &zeros).unwrap();
        s.close().unwrap();
        let seg = std::fs::read(d.path().join("rank0/seg-000001.kvp")).unwrap();
        let mut off = 0;
        let mut i = 0;
        while off < seg.len() {
            // the segment's store label is not a KV record: step over it
            let Ok(h) = RecordHeader::decode(&seg[off..off + HEADER_LEN]) else {
                off += 4096;
                continue;
            };
            let len = h.padded_len() as usize;
            put(
                "record_payload",
                &format!("{name}-{i}.kvp"),
                &seg[off..off + len],
            );
            put(
                "record_header",
                &format!("{name}-{i}.bin"),
                &seg[off..off + HEADER_LEN],
            );
            off += len;
            i += 1;
        }
    }
    // a host arena slot table
    let d = tempfile::tempdir().unwrap();
    let arena = d.path().join("arena");
    let path = kvpark::tier::slots::table_path(&arena);
    let (mut t, _) = kvpark::tier::slots::SlotTable::open(&path, 8192, 6, 8000).unwrap();
    t.set(0, &key(1), 42, 0, crc32c::crc32c(&kv_like(8000, 1)));
    t.set(3, &key(2), 42, 1, 0xdead_beef);
    t.set(5, &key(3), 7, 0, 1);
    t.set(4, &key(4), 7, 1, 2);
    t.clear(4);
    drop(t);
    put("slots", "arena.slots", &std::fs::read(&path).unwrap());
    // trace rows: the TraceLab example, one file per row, plus a gzip
    let ex = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/tracelab-example.jsonl"
    ))
    .unwrap();
    for (i, l) in ex.lines().enumerate() {
        put(
            "trace",
            &format!("row-{i:02}.jsonl"),
            format!("{l}\n").as_bytes(),
        );
    }
    let two: String = ex
        .lines()
        .skip(9)
        .take(3)
        .map(|l| format!("{l}\n"))
        .collect();
    put("trace", "rows-09-11.jsonl", two.as_bytes());
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, two.as_bytes()).unwrap();
    put("trace", "rows-09-11.jsonl.gz", &gz.finish().unwrap());
    // config JSON: the README's, the vLLM tests', every key, the normalized default
    put(
        "config",
        "readme.json",
        br#"{"host_bytes":"64GiB","nvme_dir":"/nvme/kvpark","nvme_bytes":"2TiB"}"#,
    );
    put(
        "config",
        "e2e.json",
        br#"{"host_bytes": "640KiB", "nvme_dir": "/tmp/kvpark-nvme", "sync_load_budget_bytes": "512KiB"}"#,
    );
    put(
        "config",
        "every_key.json",
        br#"{"host_bytes":"8GiB","host_file":"/dev/shm/kvpark","nvme_dir":"/nvme/kvpark","nvme_bytes":"1TiB","nvme_segment_bytes":"256MiB","codec":"lz4-planes","sync_load_budget_bytes":"128MiB","layerwise_load":"auto","copy_strategy":[{"dir":"d2h","layout":"lbhnc","total_bytes":[0,4194304],"strategy":"kernel_mapped"},{"dir":"d2h","layout":"lbhnc","strategy":"dma_batch"}],"policy":"vllm-offload:arc","io_threads":4,"fsync":"record","min_park_blocks":2,"session_ttl":"90m"}"#,
    );
    put(
        "config",
        "normalized_default.json",
        Config::default().to_json().as_bytes(),
    );
    put(
        "config",
        "kvpark_knobs.json",
        br#"{"policy":"kvpark","nvme_dir":"/nvme/kvpark","kvpark":{"prefetch_margin":1.25,"check_every":"2s","first_check":"250ms"}}"#,
    );
    // knob specs and names
    put(
        "knobs",
        "default_grid.txt",
        kvpark::sim::tune::DEFAULT_KNOBS.as_bytes(),
    );
    put(
        "knobs",
        "name.txt",
        b"kvpark:no-hints@margin=4,every=2s,first=1s",
    );
    // deployment JSON: the embedded default and a small node
    put(
        "deployment",
        "default.json",
        kvpark::sim::deploy::DEFAULT_JSON.as_bytes(),
    );
    put(
        "deployment",
        "small.json",
        br#"{"name":"small","kv_bytes_per_token":32768,"max_context_tokens":32768,"gpu_kv_bytes":"4GiB","host_bytes":"16GiB","nvme_bytes":"512GiB","pcie_h2d_gbps":12,"pcie_d2h_gbps":12,"nvme_read_gbps":3,"nvme_write_gbps":1.5,"codec":"lz4-planes","prefill_tokens_per_s":4000,"prefill_halving_context_tokens":32000,"decode_step_ms":10,"hbm_gbps":900}"#,
    );
    // cluster files: the shipped examples
    for (name, j) in kvpark::sim::tune::CLUSTERS {
        put("cluster", name, j.as_bytes());
    }
}

#[test]
fn corpus_holds_real_inputs() {
    if std::env::var_os("KVPARK_FUZZ_REGEN").is_some() {
        write_corpus();
    }
    let hint = "(regenerate: KVPARK_FUZZ_REGEN=1 cargo test --test fuzz corpus)";
    for (n, b) in corpus("plan").iter() {
        let p = Plan::decode(b).unwrap_or_else(|e| panic!("plan/{n}: {e} {hint}"));
        assert_eq!(&p.encode(), b, "plan/{n}");
    }
    for (n, b) in corpus("report").iter() {
        let r = Report::decode(b).unwrap_or_else(|e| panic!("report/{n}: {e} {hint}"));
        assert_eq!(&r.encode(), b, "report/{n}");
    }
    for (n, b) in corpus("record_header").iter() {
        RecordHeader::decode(b).unwrap_or_else(|e| panic!("record_header/{n}: {e} {hint}"));
    }
    for (n, b) in corpus("record_payload").iter() {
        // the store serves every record as written
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("rank0")).unwrap();
        std::fs::write(d.path().join("rank0/seg-000001.kvp"), b).unwrap();
        let s = NvmeStore::open(nvme_config(d.path(), true)).unwrap();
        let k = s.keys();
        assert_eq!(k.len(), 1, "record_payload/{n} {hint}");
        let mut dst = vec![0u8; k[0].raw_len as usize];
        s.get(&k[0].key, &mut dst)
            .unwrap_or_else(|e| panic!("record_payload/{n}: {e} {hint}"));
        assert_eq!(records_in(b)[0].2.as_deref(), Some(&dst[..]));
        s.close().unwrap();
    }
    for (n, b) in corpus("slots").iter() {
        let d = tempfile::tempdir().unwrap();
        let arena = d.path().join("arena");
        std::fs::write(kvpark::tier::slots::table_path(&arena), b).unwrap();
        let (_, e) = kvpark::tier::slots::read_entries(&arena)
            .unwrap()
            .unwrap_or_else(|| panic!("slots/{n}: not a table {hint}"));
        assert_eq!(e.len(), 3, "slots/{n}");
    }
    for (n, b) in corpus("trace").iter() {
        let sum = read_bytes(b, |_, _| Ok(())).unwrap();
        assert!(sum.rows > 0 && sum.bad_lines == 0, "trace/{n}");
    }
    for (n, b) in corpus("config").iter() {
        Config::from_json(b).unwrap_or_else(|e| panic!("config/{n}: {e}"));
    }
    for (n, b) in corpus("knobs").iter() {
        let t = std::str::from_utf8(b).unwrap();
        if t.starts_with("kvpark") {
            kvpark::policy::by_name(t, Default::default(), None)
                .unwrap_or_else(|e| panic!("knobs/{n}: {e}"));
        } else {
            kvpark::sim::tune::knob_grid(t).unwrap_or_else(|e| panic!("knobs/{n}: {e}"));
        }
    }
    for (n, b) in corpus("deployment").iter() {
        Deployment::from_json(std::str::from_utf8(b).unwrap())
            .unwrap_or_else(|e| panic!("deployment/{n}: {e}"));
    }
    for (n, b) in corpus("cluster").iter() {
        let d = Deployment::from_json(std::str::from_utf8(b).unwrap())
            .unwrap_or_else(|e| panic!("cluster/{n}: {e}"));
        assert!(!d.drives.is_empty(), "cluster/{n}");
    }
}
