//! `cargo bench --bench planner [-- --sessions N --blocks N --policy P
//! --new-blocks N --requests N]`: the scheduler-side planner's cost with a
//! full index (issue #14: ≤ 20 µs of scheduler work per scheduled request
//! with 10,000 parked sessions and 10 M indexed blocks; ≤ 64 bytes of index
//! memory per parked block).
//!
//! Fill: `--sessions` sessions of `--blocks` blocks each (block_size 16,
//! 8-byte vLLM hashes, distinct per session) finish one request each; the
//! planner plans the save, and a fake worker reports every block parked
//! (on host, and written through to NVMe: a `Demote` outcome per block), so
//! every block ends up indexed. The host and NVMe tiers are large enough
//! that nothing is evicted. A counting global allocator measures the live
//! heap bytes the fill added, per parked block.
//!
//! Time: with the planner full, engine steps run the way vLLM calls the
//! connector's scheduler side: a step schedules R requests, of which
//! `new` arrive this step (a parked session's next turn: its chain plus
//! `--new-blocks` new blocks; `match_request` + `on_alloc`, which hit the
//! whole chain) and the rest are running (vLLM makes no connector call for
//! them), then one `build_meta`. Reported per row: the step's time, per
//! scheduled request, and per new request's match + on_alloc (and per
//! block). Outside the timed step, the load is reported done and the
//! request finishes (`request_finished` + `build_meta` + the save's report;
//! reported on their own line), so the index stays full.
//!
//! Baselines, timed in the same process around every new request (the
//! machine is shared and noisy: compare ratios): one SHA-256 per block hash
//! (`BlockKey::derive_in` called per block, as the planner derived keys
//! before it derived them per request), a `HashMap<BlockKey, u64>` lookup of
//! the same keys in a map as large as the planner's index, and the floor of
//! any match: the request's keys derived as the planner derives them
//! (`KeyDeriver`) and its load list (key, block id) built.

use kvpark::block::{BlockKey, KeyDeriver, ModelNs};
use kvpark::config::Config;
use kvpark::plan::{Plan, Report};
use kvpark::planner::{BlockPlanner, RequestView};
use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Instant;

#[path = "common/clock.rs"]
mod clock;
use clock::thread_cpu_ns;

/// Live heap bytes and their peak, counted by the global allocator.
struct Counting;

static LIVE: AtomicI64 = AtomicI64::new(0);
static PEAK: AtomicI64 = AtomicI64::new(0);

fn add(n: i64) {
    let v = LIVE.fetch_add(n, Ordering::Relaxed) + n;
    if n > 0 && v > PEAK.load(Ordering::Relaxed) {
        PEAK.fetch_max(v, Ordering::Relaxed);
    }
}

// SAFETY: every call forwards to the system allocator with the same
// arguments; the counters only observe sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = System.alloc(l);
        if !p.is_null() {
            add(l.size() as i64);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(l);
        if !p.is_null() {
            add(l.size() as i64);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l);
        add(-(l.size() as i64));
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = System.realloc(p, l, new);
        if !q.is_null() {
            add(new as i64 - l.size() as i64);
        }
        q
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const BS: u32 = 16;
const HASH_LEN: usize = 8;
const MS: u64 = 1_000_000;

struct Args {
    sessions: usize,
    blocks: usize,
    new_blocks: usize,
    policy: String,
    block_bytes: u64,
    requests: usize,
}

fn args() -> Args {
    let mut a = Args {
        sessions: 10_000,
        blocks: 1_000,
        new_blocks: 4,
        policy: "lmcache-lru".into(),
        block_bytes: 64 << 10,
        requests: 1_000,
    };
    let v: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < v.len() {
        let next = v.get(i + 1).cloned().unwrap_or_default();
        match v[i].as_str() {
            "--sessions" => a.sessions = next.parse().expect("--sessions N"),
            "--blocks" => a.blocks = next.parse().expect("--blocks N"),
            "--new-blocks" => a.new_blocks = next.parse().expect("--new-blocks N"),
            "--policy" => a.policy = next,
            "--block-bytes" => a.block_bytes = next.parse().expect("--block-bytes N"),
            "--requests" => a.requests = next.parse().expect("--requests N"),
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    a
}

/// Session `s`'s first `n` vLLM block hashes (8 bytes each, a chain
/// distinct per session).
fn hashes(s: u64, n: usize) -> Vec<u8> {
    (0..n as u64)
        .flat_map(|j| ((s << 32) | j).to_le_bytes())
        .collect()
}

fn view<'a>(id: &'a str, h: &'a [u8]) -> RequestView<'a> {
    RequestView {
        req_id: id,
        salt: b"",
        hashes: h,
        hash_len: HASH_LEN,
        hint: None,
    }
}

/// The worker runs `plan` and reports every save, load and move done
/// (saves written through to NVMe report one `Demote` outcome per block).
fn report(p: &mut BlockPlanner, plan: &Plan, block_bytes: u64, now: u64) {
    let rep = Report::all_done(plan, block_bytes);
    p.on_report(&rep.encode(), now).expect("on_report");
}

fn vm(key: &str) -> String {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .map(|l| l[key.len()..].trim().to_string())
        .unwrap_or_default()
}

/// p-quantile of `v` in µs (ns in).
fn pct(v: &mut [u64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_unstable();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i] as f64 / 1e3
}

/// A tiny xorshift, so the bench needs no dependency.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

fn main() {
    let a = args();
    let cfg = Config::from_json(
        format!(
            r#"{{"policy":{:?},"host_bytes":"4TiB","nvme_dir":"/nonexistent","nvme_bytes":"100TiB"}}"#,
            a.policy
        )
        .as_bytes(),
    )
    .expect("config");
    let mut p = BlockPlanner::new(cfg, BS).expect("planner");
    let mut now = 1_000_000 * MS;
    // Warm-up: the first report teaches the planner the block size.
    {
        let h = hashes(u32::MAX as u64, 1);
        p.request_finished(&view("warm", &h), &[1], BS, now)
            .expect("request_finished");
        let plan = Plan::decode(&p.build_meta(now)).expect("plan");
        report(&mut p, &plan, a.block_bytes, now);
    }
    let parked0 = p.metrics().parked_blocks;
    let live0 = LIVE.load(Ordering::Relaxed);
    PEAK.store(live0, Ordering::Relaxed);

    // Fill.
    let ids: Vec<u32> = (1..=(a.blocks + a.new_blocks * (6 * a.requests + 2)) as u32).collect();
    let t_fill = Instant::now();
    for s in 0..a.sessions {
        now += MS;
        let h = hashes(s as u64, a.blocks);
        let id = format!("fill-{s}");
        p.request_finished(&view(&id, &h), &ids[..a.blocks], a.blocks as u32 * BS, now)
            .expect("request_finished");
        let plan = Plan::decode(&p.build_meta(now)).expect("plan");
        report(&mut p, &plan, a.block_bytes, now);
        if (s + 1) % 1000 == 0 || s + 1 == a.sessions {
            eprintln!(
                "filled {} sessions ({} blocks) in {:.1} s, live heap {:.0} MiB",
                s + 1,
                (s + 1) * a.blocks,
                t_fill.elapsed().as_secs_f64(),
                (LIVE.load(Ordering::Relaxed) - live0) as f64 / (1 << 20) as f64
            );
        }
    }
    let fill_s = t_fill.elapsed().as_secs_f64();
    let m = p.metrics();
    let parked = m.parked_blocks - parked0;
    let live = LIVE.load(Ordering::Relaxed) - live0;
    let peak = PEAK.load(Ordering::Relaxed) - live0;
    assert_eq!(
        parked as usize,
        a.sessions * a.blocks,
        "every block parked ({m:?})"
    );
    println!(
        "planner bench: policy {}, {} sessions x {} blocks = {} parked blocks (host {}, NVMe {}), block_size {BS}, {HASH_LEN}-byte hashes; filled in {:.1} s ({:.2} µs per block)",
        a.policy,
        a.sessions,
        a.blocks,
        parked,
        m.parked_host_blocks,
        m.parked_nvme_blocks,
        fill_s,
        fill_s * 1e6 / parked as f64
    );
    println!(
        "index memory: {:.1} bytes per parked block (live heap {:.1} MiB after the fill; peak during it {:.1} MiB = {:.1} bytes per block); VmHWM {}, VmRSS {}; moves planned {}, sessions {}",
        live as f64 / parked as f64,
        live as f64 / (1 << 20) as f64,
        peak as f64 / (1 << 20) as f64,
        peak as f64 / parked as f64,
        vm("VmHWM:"),
        vm("VmRSS:"),
        m.moves,
        m.sessions
    );
    // What the index is made of, by capacity: the lookup table (8-byte
    // entries and a control byte per bucket), the chains' keys and runs.
    let ix = p.index_heap_bytes();
    println!(
        "  the block index itself: {:.1} MiB = {:.1} B/block (the rest is per-session and per-request state)",
        ix as f64 / (1 << 20) as f64,
        ix as f64 / parked as f64
    );

    // Baseline map: the same keys in a plain HashMap of the same size.
    let model = ModelNs::of("");
    let t_map = Instant::now();
    let mut base: HashMap<BlockKey, u64> = HashMap::with_capacity(parked as usize);
    for s in 0..a.sessions {
        for c in hashes(s as u64, a.blocks).chunks(HASH_LEN) {
            base.insert(BlockKey::derive_in(&model, b"", c), s as u64);
        }
    }
    eprintln!(
        "baseline map of {} keys built in {:.1} s",
        base.len(),
        t_map.elapsed().as_secs_f64()
    );

    // Time.
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut len: Vec<usize> = vec![a.blocks; a.sessions];
    let mut next_id = 0u64;
    let rows: [(usize, usize); 6] = [(1, 0), (1, 1), (16, 1), (16, 16), (64, 1), (64, 64)];
    let (mut all_match, mut all_sha, mut all_map) = (Vec::new(), Vec::new(), Vec::new());
    let mut all_floor = Vec::new();
    let (mut fin_ns, mut fin_meta_ns, mut n_blocks) = (Vec::new(), Vec::new(), 0usize);
    let mut ext_blocks = 0u64;
    println!(
        "per step (R scheduled, of which `new` resumed sessions: match_request + on_alloc each; then build_meta), µs:"
    );
    for (r, new) in rows {
        let steps = if new == 0 {
            a.requests
        } else {
            a.requests.div_ceil(new)
        };
        let (mut step_ns, mut match_ns, mut meta_ns) = (Vec::new(), Vec::new(), Vec::new());
        let (mut sha_ns, mut map_ns, mut floor_ns) = (Vec::new(), Vec::new(), Vec::new());
        let (mut step_cpu, mut match_cpu) = (Vec::new(), Vec::new());
        for _ in 0..steps {
            now += 10 * MS;
            let mut reqs = Vec::with_capacity(new);
            for _ in 0..new {
                let s = rng.below(a.sessions);
                next_id += 1;
                let nb = len[s] + a.new_blocks;
                reqs.push((s, format!("s{s}-r{next_id}"), hashes(s as u64, nb), nb));
            }
            // Baselines for this step's new requests.
            for (_, _, h, _) in &reqs {
                let t0 = Instant::now();
                let keys: Vec<BlockKey> = h
                    .chunks(HASH_LEN)
                    .map(|c| BlockKey::derive_in(&model, b"", c))
                    .collect();
                let t1 = Instant::now();
                let found = keys.iter().take_while(|k| base.contains_key(k)).count();
                let t2 = Instant::now();
                std::hint::black_box(found);
                // the floor: the request's keys derived as the planner
                // derives them, and the load list (key, block id) built
                let d = KeyDeriver::new(&model, b"", HASH_LEN);
                let keys: Vec<BlockKey> = h.chunks_exact(HASH_LEN).map(|c| d.key(c)).collect();
                let list: Vec<(BlockKey, u32)> =
                    keys.iter().copied().zip(ids.iter().copied()).collect();
                std::hint::black_box(list);
                let t3 = Instant::now();
                sha_ns.push((t1 - t0).as_nanos() as u64);
                map_ns.push((t2 - t1).as_nanos() as u64);
                floor_ns.push((t3 - t2).as_nanos() as u64);
            }
            // The step.
            let (c0, t0) = (thread_cpu_ns(), Instant::now());
            for (_, id, h, nb) in &reqs {
                let (c, t) = (thread_cpu_ns(), Instant::now());
                let tokens = *nb as u32 * BS + 1;
                let mt = p
                    .match_request(&view(id, h), 0, tokens, now)
                    .expect("match");
                p.on_alloc(id, &ids[..nb + 1], mt.external_tokens)
                    .expect("on_alloc");
                match_ns.push(t.elapsed().as_nanos() as u64);
                match_cpu.push(thread_cpu_ns() - c);
                ext_blocks += (mt.external_tokens / BS) as u64;
                n_blocks += nb;
            }
            let t1 = Instant::now();
            let meta = p.build_meta(now);
            let t2 = Instant::now();
            step_cpu.push(thread_cpu_ns() - c0);
            step_ns.push((t2 - t0).as_nanos() as u64);
            meta_ns.push((t2 - t1).as_nanos() as u64);
            // Outside the step: the worker loads, the turn ends, its new
            // blocks are saved.
            let plan = Plan::decode(&meta).expect("plan");
            report(&mut p, &plan, a.block_bytes, now);
            now += 10 * MS;
            let t3 = Instant::now();
            for (s, id, h, nb) in &reqs {
                p.request_finished(&view(id, h), &ids[..nb + 1], *nb as u32 * BS + 1, now)
                    .expect("request_finished");
                len[*s] = *nb;
            }
            let t4 = Instant::now();
            let meta = p.build_meta(now);
            let t5 = Instant::now();
            if new > 0 {
                fin_ns.push((t4 - t3).as_nanos() as u64 / new as u64);
                fin_meta_ns.push((t5 - t4).as_nanos() as u64);
            }
            let plan = Plan::decode(&meta).expect("plan");
            report(&mut p, &plan, a.block_bytes, now);
        }
        let per_req: Vec<u64> = step_ns.iter().map(|&x| x / r as u64).collect();
        let mut per_req = per_req;
        let blocks_per = (a.blocks + a.new_blocks) as f64;
        println!(
            "  R {r:>2}, new {new:>2} ({steps} steps): step p50 {:.1} p99 {:.1}; per scheduled request p50 {:.2} p99 {:.2}; build_meta p50 {:.1} p99 {:.1}",
            pct(&mut step_ns, 0.5),
            pct(&mut step_ns, 0.99),
            pct(&mut per_req, 0.5),
            pct(&mut per_req, 0.99),
            pct(&mut meta_ns, 0.5),
            pct(&mut meta_ns, 0.99),
        );
        let mut cpu_req: Vec<u64> = step_cpu.iter().map(|&x| x / r as u64).collect();
        println!(
            "          on the CPU (thread CPU time, without preemption): step p50 {:.1} p99 {:.1}; per scheduled request p50 {:.2} p99 {:.2}",
            pct(&mut step_cpu, 0.5),
            pct(&mut step_cpu, 0.99),
            pct(&mut cpu_req, 0.5),
            pct(&mut cpu_req, 0.99),
        );
        if new > 0 {
            let m50 = pct(&mut match_ns, 0.5);
            let s50 = pct(&mut sha_ns, 0.5);
            let h50 = pct(&mut map_ns, 0.5);
            let f50 = pct(&mut floor_ns, 0.5);
            println!(
                "          per new request ({} blocks): match+on_alloc p50 {:.1} p99 {:.1} ({:.3} µs per block); baseline SHA-256 keys p50 {:.1} (ratio {:.2}), HashMap lookups p50 {:.1}, SHA+lookups (ratio {:.2}); floor (keys derived, load list built) p50 {:.1} (ratio {:.2})",
                a.blocks + a.new_blocks,
                m50,
                pct(&mut match_ns, 0.99),
                m50 / blocks_per,
                s50,
                m50 / s50,
                h50,
                m50 / (s50 + h50),
                f50,
                m50 / f50
            );
            println!(
                "          per new request on the CPU: match+on_alloc p50 {:.1} p99 {:.1}; baseline p99: SHA-256 {:.1}, lookups {:.1}",
                pct(&mut match_cpu, 0.5),
                pct(&mut match_cpu, 0.99),
                pct(&mut sha_ns, 0.99),
                pct(&mut map_ns, 0.99),
            );
            all_match.extend(match_ns);
            all_sha.extend(sha_ns);
            all_map.extend(map_ns);
            all_floor.extend(floor_ns);
        }
    }
    let m = pct(&mut all_match, 0.5);
    let s = pct(&mut all_sha, 0.5);
    let h = pct(&mut all_map, 0.5);
    let f = pct(&mut all_floor, 0.5);
    println!(
        "all new requests ({}, {} blocks matched of {} hashed): match+on_alloc p50 {:.1} µs p99 {:.1} µs; SHA-256 baseline p50 {:.1} µs, HashMap lookups p50 {:.1} µs; ratio to SHA-256 {:.2}, to SHA+lookups {:.2}; floor p50 {:.1} µs, ratio {:.2}",
        all_match.len(),
        ext_blocks,
        n_blocks,
        m,
        pct(&mut all_match, 0.99),
        s,
        h,
        m / s,
        m / (s + h),
        f,
        m / f
    );
    println!(
        "turn end (outside the step): request_finished p50 {:.1} µs p99 {:.1} µs per request; its build_meta (the save) p50 {:.1} µs p99 {:.1} µs",
        pct(&mut fin_ns, 0.5),
        pct(&mut fin_ns, 0.99),
        pct(&mut fin_meta_ns, 0.5),
        pct(&mut fin_meta_ns, 0.99)
    );
    let m = p.metrics();
    println!(
        "after: {} parked blocks, {} hit requests, {} loaded blocks, {} moves planned, VmHWM {}",
        m.parked_blocks,
        m.hit_requests,
        m.loaded_blocks,
        m.moves,
        vm("VmHWM:")
    );
}
