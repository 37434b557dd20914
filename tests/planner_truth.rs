//! One source of truth for where blocks live: the scheduler-side planner's
//! view equals what the workers' movers hold, rank by rank, after every
//! step (once every rank's report is in).
//!
//! A model-based test drives one [`BlockPlanner`] for two ranks and two real
//! [`Mover`]s (CPU copy engine, NVMe in a temporary folder) through random
//! interleavings of turns (matches, loads, saves), policy ticks, moves the
//! planner asks for, corrupt NVMe records, restarts and report orders
//! (either rank first, or rank 1's reports arriving a step late, after the
//! scheduler planned again). The ranks differ in host
//! capacity, so one reclaims slots the other keeps, and their disk is
//! smaller than the planner's budget for it, so demotions and write-behind
//! meet a full disk. After every plan has run and both reports are in:
//!
//! - the planner's per-rank host/NVMe bits equal each mover's index;
//! - every planned move got an outcome from both ranks;
//! - a block counts as parked only when both ranks hold it.
//!
//! Then two fixed scenarios: one rank fails a load (its record is corrupt)
//! and the other rank's success does not make the block count as loaded;
//! a demotion skipped on a full disk is not taken for an NVMe copy.
//!
//! Cases: `KVPARK_TRUTH_CASES` (default 24).

use kvpark::block::{BlockKey, Dtype, Geometry, LayerView};
use kvpark::config::Config;
use kvpark::mover::Mover;
use kvpark::plan::{MoveKind, Plan, Report};
use kvpark::planner::blocks::{BlockPlanner, RequestView};
use proptest::prelude::*;
use proptest::test_runner::{Config as PtConfig, TestCaseError};
use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

const BS: u32 = 16;
const BLOCKS: u64 = 40;
const WORLD: u32 = 2;

/// 32 KiB blocks: 2 layers x K,V x 2 heads x 16 tokens x 64 fp32.
fn geom() -> Geometry {
    Geometry {
        layers: 2,
        kv_heads: 2,
        block_tokens: BS,
        head_size_k: 64,
        head_size_v: 64,
        dtype: Dtype::F32,
    }
}

fn block_bytes() -> u64 {
    geom().block_bytes() as u64
}

/// A token-major fake vLLM KV cache, filled with a pattern.
struct Cache {
    buf: Vec<f32>,
    page: usize,
}

impl Cache {
    fn new(seed: f32) -> Self {
        let page = geom().layer_page_bytes() / 4;
        let buf = (0..geom().layers as usize * BLOCKS as usize * page)
            .map(|i| seed + (i % 977) as f32 * 0.5)
            .collect();
        Cache { buf, page }
    }
    fn views(&mut self) -> Vec<LayerView> {
        let g = geom();
        let row = g.row_elems() as u64;
        (0..g.layers as u64)
            .map(|l| LayerView {
                base: self.buf.as_mut_ptr() as u64 + l * BLOCKS * self.page as u64 * 4,
                num_blocks: BLOCKS,
                stride_block: self.page as u64,
                stride_head: row,
                stride_token: g.kv_heads as u64 * row,
            })
            .collect()
    }
}

/// Two ranks' movers, their caches and the planner, as one engine.
struct Engine {
    dir: tempfile::TempDir,
    planner_cfg: Config,
    mover_cfgs: Vec<Config>,
    caches: Vec<Cache>,
    movers: Vec<Mover>,
    planner: BlockPlanner,
    now: u64,
    next_req: u64,
    /// Rank 1's report, held back until the next plan was built.
    held: Option<Vec<u8>>,
    /// Hold rank 1's reports of the steps that follow.
    lag: bool,
}

impl Engine {
    fn new(policy: &str, host_blocks: [u64; 2], disk_blocks: [u64; 2]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let planner_cfg = Config {
            nvme_dir: Some(dir.path().to_path_buf()),
            host_bytes: 8 * block_bytes(),
            nvme_bytes: 64 << 20,
            nvme_segment_bytes: 1 << 20,
            codec: kvpark::codec::CodecTag::None,
            policy: policy.into(),
            min_park_blocks: 1,
            ..Config::default()
        };
        // The workers' disk is smaller than the planner's budget for it
        // (another tenant filled it): writes meet a full disk.
        let mover_cfgs: Vec<Config> = host_blocks
            .iter()
            .zip(disk_blocks)
            .map(|(&h, d)| Config {
                host_bytes: h * block_bytes(),
                nvme_bytes: d * (block_bytes() + 4096),
                ..planner_cfg.clone()
            })
            .collect();
        let caches = (0..WORLD)
            .map(|r| Cache::new(r as f32 * 10_000.0))
            .collect();
        let planner = BlockPlanner::open(planner_cfg.clone(), BS, 0, WORLD).unwrap();
        let mut e = Engine {
            dir,
            planner_cfg,
            mover_cfgs,
            caches,
            movers: Vec::new(),
            planner,
            now: 1_000_000_000,
            next_req: 0,
            held: None,
            lag: false,
        };
        e.start_movers();
        e
    }

    fn start_movers(&mut self) {
        self.movers = (0..WORLD)
            .map(|r| {
                let mut m = Mover::new(self.mover_cfgs[r as usize].clone(), r).unwrap();
                let views = self.caches[r as usize].views();
                unsafe { m.register(geom(), views, None) }.unwrap();
                m
            })
            .collect();
    }

    /// Stops every process and starts them again on the same files.
    fn restart(&mut self) {
        self.held = None;
        self.movers.clear();
        self.planner = BlockPlanner::open(self.planner_cfg.clone(), BS, 0, WORLD).unwrap();
        self.start_movers();
    }

    /// Runs the next plan on every rank and hands the reports to the
    /// planner, rank 1's first when `rank1_first`. Returns each rank's
    /// vLLM blocks that failed to load.
    fn step(&mut self, rank1_first: bool) -> (Plan, Vec<Vec<u32>>) {
        let meta = self.planner.build_meta(self.now);
        let plan = Plan::decode(&meta).unwrap();
        // a lagging rank's report arrives after the scheduler planned again
        if let Some(r) = self.held.take() {
            self.planner.on_report(&r, self.now).unwrap();
        }
        let mut reports = Vec::new();
        let mut failed = Vec::new();
        for m in &mut self.movers {
            m.bind(&meta).unwrap();
            m.start_load().unwrap();
            m.wait_for_save().unwrap();
            let mut f = m.get_finished();
            let more = m.drain(Duration::from_secs(20));
            f.failed_blocks.extend(more.failed_blocks);
            failed.push(f.failed_blocks);
            reports.push(m.take_report());
        }
        if self.lag {
            self.held = Some(reports.pop().expect("rank 1's report")).filter(|r| !r.is_empty());
        }
        if rank1_first {
            reports.reverse();
        }
        for r in reports {
            if !r.is_empty() {
                self.planner.on_report(&r, self.now).unwrap();
            }
        }
        self.now += 1_000_000;
        (plan, failed)
    }

    /// One turn of session `s`, `len` full blocks long; returns the
    /// external tokens kvpark matched.
    fn turn(&mut self, s: u8, len: usize, rank1_first: bool) -> u32 {
        self.next_req += 1;
        let id = format!("req-{}", self.next_req);
        let hashes: Vec<u8> = (0..len)
            .flat_map(|i| [s, i as u8, 7, 7, 7, 7, 7, 7])
            .collect();
        let v = RequestView {
            req_id: &id,
            salt: b"",
            hashes: &hashes,
            hash_len: 8,
            hint: None,
        };
        let tokens = len as u32 * BS + 1;
        let ids: Vec<u32> = (1..=len as u32 + 1).collect();
        let m = self.planner.match_request(&v, 0, tokens, self.now).unwrap();
        if m.external_tokens > 0 {
            self.planner.on_alloc(&id, &ids, m.external_tokens).unwrap();
            self.step(rank1_first);
        }
        self.planner
            .request_finished(&v, &ids, len as u32 * BS, self.now)
            .unwrap();
        self.step(rank1_first);
        m.external_tokens
    }

    /// Flips one payload byte of the `n`-th NVMe record of `rank`.
    fn corrupt(&self, rank: u32, n: usize) -> bool {
        let d = self.dir.path().join(format!("rank{rank}"));
        let mut records = Vec::new();
        let mut segs: Vec<_> = std::fs::read_dir(&d)
            .map(|r| r.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        segs.sort();
        for p in segs
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "kvp"))
        {
            let b = std::fs::read(p).unwrap();
            let mut off = 0;
            while off + 4096 <= b.len() {
                if &b[off..off + 4] == b"KVPR" {
                    records.push((p.clone(), off));
                }
                off += 4096;
            }
        }
        if records.is_empty() {
            return false;
        }
        let (p, off) = &records[n % records.len()];
        flip(p, (*off + 4096 + 100) as u64);
        true
    }

    /// The movers' truth: key -> (ranks with a host copy, ranks with NVMe).
    fn truth(&self) -> BTreeMap<[u8; 32], (u64, u64)> {
        let mut t: BTreeMap<[u8; 32], (u64, u64)> = BTreeMap::new();
        for (r, m) in self.movers.iter().enumerate() {
            for (k, host, nvme) in m.holdings() {
                let e = t.entry(k.0).or_default();
                e.0 |= (host as u64) << r;
                e.1 |= (nvme as u64) << r;
            }
        }
        t.retain(|_, v| *v != (0, 0));
        t
    }

    fn view(&self) -> BTreeMap<[u8; 32], (u64, u64)> {
        self.planner
            .all_whereabouts()
            .into_iter()
            .map(|(k, h, n)| (k.0, (h, n)))
            .collect()
    }

    /// The planner's view equals the movers' truth; every move settled
    /// (once every report is in: with a report held back, only the
    /// counts' consistency is checked).
    fn check(&mut self, what: &str) -> Result<(), TestCaseError> {
        if self.held.is_some() {
            self.planner.metrics();
            return Ok(());
        }
        let (view, truth) = (self.view(), self.truth());
        if view != truth {
            let keys: std::collections::BTreeSet<_> = truth.keys().chain(view.keys()).collect();
            let diff: Vec<String> = keys
                .into_iter()
                .filter(|k| view.get(*k) != truth.get(*k))
                .map(|k| {
                    format!(
                        "{:?}: planner {:?} movers {:?}",
                        BlockKey(*k),
                        view.get(k),
                        truth.get(k)
                    )
                })
                .collect();
            return Err(TestCaseError::fail(format!(
                "after {what}: planner and movers disagree on {} block(s): {diff:?}",
                diff.len()
            )));
        }
        prop_assert_eq!(self.planner.moves_in_flight(), 0, "after {}", what);
        let m = self.planner.metrics();
        let both = truth.values().filter(|(h, n)| h | n == 3).count() as u64;
        prop_assert_eq!(m.parked_blocks, both, "after {}", what);
        prop_assert_eq!(
            m.parked_host_blocks,
            truth.values().filter(|(h, _)| *h == 3).count() as u64
        );
        Ok(())
    }
}

fn flip(p: &Path, at: u64) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    b[0] ^= 0x40;
    f.write_all_at(&b, at).unwrap();
}

#[derive(Clone, Debug)]
enum Op {
    /// A turn of session `s` growing it by `grow` blocks.
    Turn { s: u8, grow: u8, rank1_first: bool },
    /// Time passes (policy timers fire) and a step runs.
    Tick { ms: u32, rank1_first: bool },
    /// A bit of one rank's `n`-th NVMe record turns.
    Corrupt { rank: u32, n: usize },
    /// The planner asks for a move of block `i` of session `s` (as its
    /// policy would), whatever the ranks hold.
    Move {
        kind: u8,
        s: u8,
        i: u8,
        rank1_first: bool,
    },
    /// Every process restarts on the same files.
    Restart,
    /// From now on rank 1's reports arrive one step late (`on`), or on time
    /// again (then the held one is delivered).
    Lag { on: bool },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u8..4, 0u8..3, any::<bool>()).prop_map(|(s, grow, rank1_first)| Op::Turn { s, grow, rank1_first }),
        2 => (1u32..5000, any::<bool>()).prop_map(|(ms, rank1_first)| Op::Tick { ms, rank1_first }),
        1 => (0u32..WORLD, 0usize..64).prop_map(|(rank, n)| Op::Corrupt { rank, n }),
        3 => (1u8..5, 0u8..4, 0u8..8, any::<bool>())
            .prop_map(|(kind, s, i, rank1_first)| Op::Move { kind, s, i, rank1_first }),
        1 => Just(Op::Restart),
        1 => any::<bool>().prop_map(|on| Op::Lag { on }),
    ]
}

fn cases() -> u32 {
    std::env::var("KVPARK_TRUTH_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(24)
}

proptest! {
    #![proptest_config(PtConfig { cases: cases(), max_shrink_iters: 64, ..PtConfig::default() })]

    #[test]
    fn the_planner_view_equals_the_movers_truth_after_every_step(
        policy in prop_oneof![Just("lmcache-lru"), Just("vllm-offload"), Just("ttl:2s")],
        host in prop_oneof![(2u64..12, 2u64..12), (2u64..12).prop_map(|h| (h, h))],
        disk in (2u64..24, 2u64..24),
        ops in proptest::collection::vec(op(), 1..28),
    ) {
        let mut e = Engine::new(policy, [host.0, host.1], [disk.0, disk.1]);
        let ops: Vec<Op> = ops.into_iter().chain([Op::Lag { on: false }]).collect();
        let mut len = [0usize; 4];
        e.check("start")?;
        for (i, o) in ops.iter().enumerate() {
            match *o {
                Op::Turn { s, grow, rank1_first } => {
                    let l = &mut len[s as usize];
                    *l = (*l + grow as usize).clamp(1, BLOCKS as usize - 2);
                    e.turn(s, *l, rank1_first);
                }
                Op::Tick { ms, rank1_first } => {
                    e.now += ms as u64 * 1_000_000;
                    e.step(rank1_first);
                }
                Op::Corrupt { rank, n } => {
                    e.corrupt(rank, n);
                }
                Op::Move { kind, s, i, rank1_first } => {
                    let kind = [MoveKind::Demote, MoveKind::EvictHost, MoveKind::Promote, MoveKind::Drop]
                        [kind as usize - 1];
                    let k = keys_of(s, i as usize + 1)[i as usize];
                    e.planner.push_move(kind, k);
                    e.step(rank1_first);
                }
                Op::Restart => e.restart(),
                Op::Lag { on } => {
                    e.lag = on;
                    if !on {
                        if let Some(r) = e.held.take() {
                            e.planner.on_report(&r, e.now).unwrap();
                        }
                    }
                }
            }
            e.check(&format!("op {i} {o:?}"))?;
        }
        let m = e.planner.metrics();
        eprintln!("STATS policy={policy} moves={} done={} skipped={} failed={} partial={} recovered={} rpartial={} loadfail={} loaded={} saved={} hit={}", m.moves, m.moves_done, m.moves_skipped, m.moves_failed, m.partial_blocks, m.recovered_blocks, m.recovered_partial_blocks, m.load_failed_blocks, m.loaded_blocks, m.saved_blocks, m.hit_blocks_host + m.hit_blocks_nvme);
    }
}

fn keys_of(s: u8, len: usize) -> Vec<BlockKey> {
    let cfg = Config::default();
    let hashes: Vec<u8> = (0..len)
        .flat_map(|i| [s, i as u8, 7, 7, 7, 7, 7, 7])
        .collect();
    let ns = kvpark::block::ModelNs::of(&cfg.model_identity);
    hashes
        .chunks(8)
        .map(|h| BlockKey::derive_in(&ns, b"", h))
        .collect()
}

#[test]
fn one_rank_failing_a_load_is_a_failed_load_for_the_engine() {
    // host-only on the workers for NVMe blocks: the save writes through,
    // then both ranks lose their host copies (restart without host_file)
    let mut e = Engine::new("lmcache-lru", [8, 8], [64, 64]);
    e.turn(1, 4, false);
    e.check("save").unwrap();
    let keys = keys_of(1, 4);
    assert!(keys
        .iter()
        .all(|k| e.planner.whereabouts(k) == Some((3, 3))));
    e.restart();
    e.check("restart").unwrap();
    assert_eq!(
        e.planner.metrics().recovered_blocks,
        4,
        "found on both ranks"
    );
    // rank 1's record of block 0 turns bad (records land in write order)
    let seg = |r: u32| e.dir.path().join(format!("rank{r}/seg-000001.kvp"));
    let first = std::fs::read(seg(1)).unwrap();
    let at = (0..first.len())
        .step_by(4096)
        .find(|&o| &first[o..o + 4] == b"KVPR")
        .unwrap();
    flip(&seg(1), (at + 4096 + 100) as u64);
    // the next turn of the session loads the 4 blocks from NVMe on both ranks
    let hashes: Vec<u8> = (0..5)
        .flat_map(|i| [1u8, i as u8, 7, 7, 7, 7, 7, 7])
        .collect();
    let v = RequestView {
        req_id: "again",
        salt: b"",
        hashes: &hashes,
        hash_len: 8,
        hint: None,
    };
    let m = e.planner.match_request(&v, 0, 5 * BS + 1, e.now).unwrap();
    assert_eq!(m.external_tokens, 4 * BS);
    assert!(m.load_async, "NVMe only: async");
    let ids: Vec<u32> = (11..=16).collect();
    e.planner
        .on_alloc("again", &ids, m.external_tokens)
        .unwrap();
    let (plan, failed) = e.step(false);
    assert_eq!(plan.loads.len(), 1);
    let corrupt = keys
        .iter()
        .position(|k| e.movers[1].holdings().iter().all(|h| h.0 != *k));
    let c = corrupt.expect("rank 1 dropped the corrupt block");
    assert_eq!(failed[0], Vec::<u32>::new(), "rank 0 loaded every block");
    assert_eq!(
        failed[1],
        vec![ids[c]],
        "rank 1 failed the corrupt one: vLLM recomputes it"
    );
    let pm = e.planner.metrics();
    assert_eq!(pm.load_failed_blocks, 1);
    assert_eq!(
        pm.loaded_blocks, 3,
        "rank 0's success does not make it loaded"
    );
    // the planner no longer offers it, and drops rank 0's copy next step
    assert_eq!(e.planner.whereabouts(&keys[c]), Some((1, 1)));
    assert_eq!(pm.parked_blocks, 3);
    assert_eq!(pm.partial_blocks, 1);
    e.check("failed load").unwrap();
    let (plan, _) = e.step(false);
    assert!(plan.moves.contains(&(MoveKind::Drop, keys[c])));
    e.check("drop").unwrap();
    assert_eq!(e.planner.whereabouts(&keys[c]), None);
    assert!(e.movers[0].holdings().iter().all(|h| h.0 != keys[c]));
    let m = e.planner.match_request(&v, 0, 5 * BS + 1, e.now).unwrap();
    assert_eq!(
        m.external_tokens,
        c as u32 * BS,
        "the chain stops at the block rank 1 lost"
    );
}

#[test]
fn a_move_is_not_done_when_planned_only_when_reported() {
    let mut e = Engine::new("lmcache-lru", [8, 8], [64, 64]);
    e.turn(2, 3, false);
    let keys = keys_of(2, 3);
    // the planner plans a demotion of a block both ranks hold on NVMe
    // already, and an eviction; until the reports come back nothing changes
    e.planner.push_move(MoveKind::EvictHost, keys[0]);
    let before = e.planner.whereabouts(&keys[0]);
    assert_eq!(before, Some((3, 3)));
    let meta = e.planner.build_meta(e.now);
    assert_eq!(
        e.planner.whereabouts(&keys[0]),
        before,
        "planning changed nothing"
    );
    assert_eq!(e.planner.moves_in_flight(), 1);
    // rank 0 runs it and reports: rank 0's host bit goes, the move waits for rank 1
    let mut reps = Vec::new();
    for m in &mut e.movers {
        m.bind(&meta).unwrap();
        m.wait_for_save().unwrap();
        m.drain(Duration::from_secs(5));
        reps.push(m.take_report());
    }
    e.planner.on_report(&reps[0], e.now).unwrap();
    assert_eq!(e.planner.whereabouts(&keys[0]), Some((2, 3)));
    assert_eq!(e.planner.moves_in_flight(), 1);
    assert_eq!(
        e.planner.metrics().parked_host_blocks,
        2,
        "not in host on every rank"
    );
    e.planner.on_report(&reps[1], e.now).unwrap();
    assert_eq!(e.planner.whereabouts(&keys[0]), Some((0, 3)));
    assert_eq!(e.planner.moves_in_flight(), 0);
    e.check("evict").unwrap();
    // a report from a rank the planner does not plan for is refused
    let bad = Report {
        rank: 2,
        ..Default::default()
    };
    let err = e.planner.on_report(&bad.encode(), e.now).unwrap_err();
    assert!(err.message().contains("rank 2"), "{err}");
}

#[test]
fn a_demotion_the_full_disk_skips_is_reported_and_not_counted() {
    // the workers' disk holds 2 records; the policy's host-only budget
    // forces nothing, so the planner asks for demotions itself
    let mut e = Engine::new("vllm-offload", [8, 8], [2, 2]);
    e.turn(3, 6, false);
    let keys = keys_of(3, 6);
    for k in &keys {
        e.planner.push_move(MoveKind::Demote, *k);
    }
    e.step(false);
    e.check("demotions").unwrap();
    let m = e.planner.metrics();
    assert_eq!(m.moves_done + m.moves_skipped + m.moves_failed, 12, "{m:?}");
    assert!(
        m.moves_skipped + m.moves_failed > 0,
        "the disk filled: {m:?}"
    );
    let on_nvme = keys
        .iter()
        .filter(|k| e.planner.whereabouts(k).is_some_and(|w| w.1 == 3))
        .count() as u64;
    assert_eq!(m.parked_nvme_blocks, on_nvme);
    assert!(on_nvme < 6, "not every demotion is counted done");
}

#[test]
fn a_write_behind_the_full_disk_skips_is_not_an_nvme_copy() {
    // write-through policy; the first turn teaches the planner the block size
    let planned_nvme = |disk: u64| {
        let mut e = Engine::new("lmcache-lru", [16, 16], [disk, disk]);
        e.turn(0, 1, false);
        let before = e.planner.metrics().planned_nvme_bytes;
        e.turn(1, 6, false);
        e.check("write-behind").unwrap();
        let m = e.planner.metrics();
        let on_nvme = keys_of(1, 6)
            .iter()
            .filter(|k| e.planner.whereabouts(k).is_some_and(|w| w.1 == 3))
            .count();
        (m.planned_nvme_bytes - before, on_nvme)
    };
    // room for everything: the core planner accounts the 6 blocks on NVMe
    assert_eq!(planned_nvme(64), (6 * block_bytes(), 6));
    // room for 2 records: the writes that did not land are not an NVMe copy
    let (bytes, on_nvme) = planned_nvme(2);
    assert!(on_nvme < 6, "{on_nvme}");
    assert_eq!(bytes, 0, "the session's copy to NVMe failed");
}

#[test]
fn a_data_parallel_engine_plans_for_its_own_ranks() {
    // vLLM numbers the workers of data-parallel rank 1 (TP=2) as ranks 2
    // and 3: each parks in its own folder, and this engine's planner
    // recovers from those two folders only and takes reports from them only
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config {
        nvme_dir: Some(dir.path().to_path_buf()),
        nvme_segment_bytes: 1 << 20,
        codec: kvpark::codec::CodecTag::None,
        ..Config::default()
    };
    let k = keys_of(9, 1)[0];
    let mut caches: Vec<Cache> = (0..2).map(|r| Cache::new(r as f32)).collect();
    for (rank, c) in (2u32..4).zip(caches.iter_mut()) {
        let mut m = Mover::new(cfg.clone(), rank).unwrap();
        unsafe { m.register(geom(), c.views(), None) }.unwrap();
        let plan = Plan {
            saves: vec![kvpark::plan::SaveReq {
                req_id: "s".into(),
                session: 5,
                blocks: vec![(k, 1, 0)],
                to_nvme: true,
            }],
            ..Default::default()
        };
        m.bind(&plan.encode()).unwrap();
        m.wait_for_save().unwrap();
        m.drain(Duration::from_secs(10));
        let r = Report::decode(&m.take_report()).unwrap();
        assert_eq!(r.rank, rank);
    }
    let mut mine = BlockPlanner::open(cfg.clone(), BS, 2, 2).unwrap();
    assert_eq!(mine.metrics().recovered_blocks, 1);
    assert_eq!(
        mine.whereabouts(&k),
        Some((0, 3)),
        "on NVMe on both of its ranks"
    );
    let mut other = BlockPlanner::open(cfg, BS, 0, 2).unwrap();
    assert_eq!(
        other.metrics().recovered_blocks,
        0,
        "ranks 0 and 1 parked nothing"
    );
    for (rank, ok) in [(1u32, false), (2, true), (3, true), (4, false)] {
        let r = Report {
            rank,
            ..Default::default()
        };
        let got = mine.on_report(&r.encode(), 1);
        assert_eq!(got.is_ok(), ok, "rank {rank}: {got:?}");
        if let Err(e) = got {
            assert!(e.message().contains("ranks 2..4"), "{e}");
        }
    }
    assert!(BlockPlanner::with_ranks(Config::default(), BS, u32::MAX, 2).is_err());
}
