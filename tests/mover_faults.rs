//! Nothing slow on the step, and failures end as recompute, never a hang:
//! a save is gathered on the saver thread (its hook returns while the
//! gather is held) and reported when done; a loader job that panics, a
//! loader thread that died and a save that panics all end in
//! `finished_recving` / `finished_sending` with the blocks reported failed,
//! and later work fails at once instead of waiting. Faults are injected
//! with [`Mover::inject_fault`], the in-process form of `KVPARK_FAULT`.

mod common;

use common::Cache;
use crossbeam_channel::{Receiver, Sender};
use kvpark::block::{BlockKey, Geometry};
use kvpark::config::Config;
use kvpark::copy::{cpu::CpuEngine, CopyEngine, GatherOp, KvCaches, ScatterOp};
use kvpark::mover::{Fault, Mover};
use kvpark::plan::{LoadReq, Plan, Report, SaveReq, TierChange};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const BLOCKS: u64 = 16;

fn geom() -> Geometry {
    common::small_f32(2)
}

fn key(i: u32) -> BlockKey {
    BlockKey::derive(b"faults", &i.to_le_bytes())
}

/// The CPU engine, each gather held until a permit arrives (when gating).
struct GatedGather {
    gate: AtomicBool,
    permits: Receiver<()>,
    gathers: AtomicUsize,
}

impl CopyEngine for GatedGather {
    fn name(&self) -> &'static str {
        "gated-gather"
    }
    fn gather(&self, kv: &KvCaches, ops: &mut [GatherOp<'_>]) -> kvpark::Result<()> {
        if self.gate.load(Ordering::SeqCst) {
            self.permits
                .recv_timeout(Duration::from_secs(20))
                .map_err(|_| kvpark::Error::internal("test gate: no permit in 20 s"))?;
        }
        self.gathers.fetch_add(1, Ordering::SeqCst);
        CpuEngine.gather(kv, ops)
    }
    fn scatter_layers(
        &self,
        kv: &KvCaches,
        ops: &[ScatterOp<'_>],
        layers: Range<usize>,
    ) -> kvpark::Result<()> {
        CpuEngine.scatter_layers(kv, ops, layers)
    }
}

fn mover(cfg: &Config, cache: &mut Cache, fault: Fault) -> Mover {
    let mut m = Mover::new(cfg.clone(), 0).unwrap();
    m.inject_fault(fault);
    unsafe { m.register(geom(), cache.views(), None) }.unwrap();
    m
}

fn gated(cfg: &Config, cache: &mut Cache) -> (Mover, Arc<GatedGather>, Sender<()>) {
    let (tx, rx) = crossbeam_channel::unbounded();
    let e = Arc::new(GatedGather {
        gate: AtomicBool::new(true),
        permits: rx,
        gathers: AtomicUsize::new(0),
    });
    let mut m = Mover::new(cfg.clone(), 0).unwrap();
    m.set_engine(e.clone());
    unsafe { m.register(geom(), cache.views(), None) }.unwrap();
    (m, e, tx)
}

/// One engine step with `plan`: the hooks in vLLM's order.
fn step(m: &mut Mover, plan: Plan) {
    m.bind(&plan.encode()).unwrap();
    m.start_load().unwrap();
    m.wait_for_save().unwrap();
}

fn save_plan(req: &str, items: &[(u32, u32)], to_nvme: bool) -> Plan {
    Plan {
        saves: vec![SaveReq {
            req_id: req.into(),
            session: 7,
            blocks: items.iter().map(|&(k, b)| (key(k), b, k)).collect(),
            to_nvme,
        }],
        ..Default::default()
    }
}

fn load_plan(req: &str, sync: bool, items: &[(u32, u32)]) -> Plan {
    Plan {
        loads: vec![LoadReq {
            req_id: req.into(),
            sync,
            blocks: items.iter().map(|&(k, b)| (key(k), b)).collect(),
        }],
        ..Default::default()
    }
}

fn counters(m: &Mover) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_str(&m.metrics_json()).unwrap();
    v["counters"].clone()
}

fn sorted(mut v: Vec<u32>) -> Vec<u32> {
    v.sort_unstable();
    v
}

/// Parks blocks 1..=3 (keys 1..=3) and waits for the save to be reported.
fn park_three(m: &mut Mover, c: &mut Cache) -> Vec<Vec<f32>> {
    for b in 1..=3 {
        c.fill(b, b as f32);
    }
    step(m, save_plan("s", &[(1, 1), (2, 2), (3, 3)], false));
    let f = m.drain(Duration::from_secs(10));
    assert_eq!(f.sending, vec!["s".to_string()]);
    assert_eq!(counters(m)["saved_blocks"], 3);
    (1..=3).map(|b| c.block(b)).collect()
}

#[test]
fn a_save_is_gathered_off_the_step_and_reported_when_done() {
    let mut c = Cache::new(geom(), BLOCKS);
    for b in 1..=3 {
        c.fill(b, b as f32 + 0.5);
    }
    let want: Vec<Vec<f32>> = (1..=3).map(|b| c.block(b)).collect();
    let (mut m, e, permits) = gated(&Config::default(), &mut c);
    // The hooks return while the gather is held on the saver thread.
    step(&mut m, save_plan("s", &[(1, 1), (2, 2), (3, 3)], false));
    let f = m.get_finished();
    assert!(
        f.sending.is_empty(),
        "not reported before it is done: {f:?}"
    );
    assert_eq!(e.gathers.load(Ordering::SeqCst), 0);
    assert_eq!(counters(&m)["saved_blocks"], 0);
    // Done once the gather ran: reported in finished_sending and in the
    // worker report, all blocks saved.
    permits.send(()).unwrap();
    let f = m.drain(Duration::from_secs(10));
    assert_eq!(f.sending, vec!["s".to_string()]);
    let r = Report::decode(&m.take_report()).unwrap();
    assert_eq!(r.saved.len(), 1);
    assert_eq!(r.saved[0].ok.len(), 3);
    assert!(r.saved[0].failed.is_empty());
    // The parked bytes are the ones vLLM had.
    e.gate.store(false, Ordering::SeqCst);
    step(&mut m, load_plan("l", true, &[(1, 9), (2, 10), (3, 11)]));
    assert!(m.get_finished().failed_blocks.is_empty());
    for b in 0..3u32 {
        assert_eq!(c.block(9 + b), want[b as usize], "block {b}");
    }
}

#[test]
fn news_of_a_block_never_reaches_the_planner_before_its_save() {
    // A save four times the host tier streams through it: its first batch
    // lands on NVMe (and leaves the host) while later batches still wait.
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config {
        host_bytes: 2 * geom().block_bytes() as u64,
        nvme_dir: Some(dir.path().to_path_buf()),
        nvme_segment_bytes: 1 << 20,
        ..Config::default()
    };
    let mut c = Cache::new(geom(), BLOCKS);
    for b in 1..=8 {
        c.fill(b, b as f32);
    }
    let (mut m, e, permits) = gated(&cfg, &mut c);
    let items: Vec<(u32, u32)> = (1..=8).map(|b| (b, b)).collect();
    step(&mut m, save_plan("big", &items, true));
    permits.send(()).unwrap(); // the first batch only
    let end = Instant::now() + Duration::from_secs(20);
    while counters(&m)["demoted_blocks"].as_u64().unwrap() < 2 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(counters(&m)["demoted_blocks"], 2, "first batch on NVMe");
    assert_eq!(e.gathers.load(Ordering::SeqCst), 1);
    // The save is still running: its blocks' tier news is held back.
    assert!(m.get_finished().sending.is_empty());
    let early = m.take_report();
    if !early.is_empty() {
        let r = Report::decode(&early).unwrap();
        assert!(r.saved.is_empty());
        assert!(r.tiers.is_empty(), "{:?}", r.tiers);
        assert!(r.moved.is_empty(), "{:?}", r.moved);
    }
    for _ in 0..8 {
        let _ = permits.send(());
    }
    let f = m.drain(Duration::from_secs(20));
    assert_eq!(f.sending, vec!["big".to_string()]);
    let r = Report::decode(&m.take_report()).unwrap();
    assert_eq!(r.saved.len(), 1);
    assert_eq!(r.saved[0].ok.len(), 8, "{:?}", r.saved[0]);
    // The held-back news comes with (or after) the save.
    let first: Vec<BlockKey> = r.saved[0].ok[..2].to_vec();
    for k in &first {
        assert!(
            r.tiers.contains(&(TierChange::OnNvme, *k)),
            "OnNvme of {k:?} arrives with its save: {:?}",
            r.tiers
        );
    }
}

#[test]
fn a_panicking_loader_job_ends_as_failed_blocks_and_the_loader_goes_on() {
    let mut c = Cache::new(geom(), BLOCKS);
    let mut m = mover(&Config::default(), &mut c, Fault::LoaderPanic);
    let want = park_three(&mut m, &mut c);
    // Async loads: each job panics; each request still comes back, every
    // block failed (vLLM recomputes), nothing written into its blocks.
    for (req, base) in [("a1", 9u32), ("a2", 12)] {
        step(
            &mut m,
            load_plan(req, false, &[(1, base), (2, base + 1), (3, base + 2)]),
        );
        let f = m.drain(Duration::from_secs(10));
        assert_eq!(f.recving, vec![req.to_string()]);
        assert_eq!(sorted(f.failed_blocks), vec![base, base + 1, base + 2]);
        for b in base..base + 3 {
            assert!(c.block(b).iter().all(|v| *v == 0.0), "block {b} untouched");
        }
    }
    let k = counters(&m);
    assert_eq!(k["job_panics"], 2, "{k}");
    assert_eq!(k["load_failed_blocks"], 6, "{k}");
    let r = Report::decode(&m.take_report()).unwrap();
    assert_eq!(r.loaded.len(), 2);
    assert!(r.loaded.iter().all(|l| l.failed.len() == 3));
    // The loader thread lives on; sync loads (step thread) still serve.
    let v: serde_json::Value = serde_json::from_str(&m.metrics_json()).unwrap();
    assert_eq!(v["threads_stopped"], serde_json::json!([]));
    step(&mut m, load_plan("s1", true, &[(1, 5), (2, 6), (3, 7)]));
    assert!(m.get_finished().failed_blocks.is_empty());
    for b in 0..3u32 {
        assert_eq!(c.block(5 + b), want[b as usize]);
    }
}

#[test]
fn a_dead_loader_fails_the_loads_it_held_and_later_ones_at_once() {
    let mut c = Cache::new(geom(), BLOCKS);
    let mut m = mover(&Config::default(), &mut c, Fault::LoaderDie);
    park_three(&mut m, &mut c);
    // The loader thread dies on this load: the mover notices (its done
    // channel is disconnected) and fails the load.
    step(&mut m, load_plan("a1", false, &[(1, 9), (2, 10)]));
    let f = m.drain(Duration::from_secs(10));
    assert_eq!(f.recving, vec!["a1".to_string()]);
    assert_eq!(sorted(f.failed_blocks), vec![9, 10]);
    let v: serde_json::Value = serde_json::from_str(&m.metrics_json()).unwrap();
    assert_eq!(v["threads_stopped"], serde_json::json!(["loader"]));
    // A later async load fails in the same step, without waiting.
    step(&mut m, load_plan("a2", false, &[(3, 11)]));
    let f = m.get_finished();
    assert_eq!(f.recving, vec!["a2".to_string()]);
    assert_eq!(f.failed_blocks, vec![11]);
    assert!(c.block(11).iter().all(|v| *v == 0.0));
}

#[test]
fn a_panicking_save_is_reported_sent_with_every_block_failed() {
    let mut c = Cache::new(geom(), BLOCKS);
    for b in 1..=3 {
        c.fill(b, b as f32);
    }
    let mut m = mover(&Config::default(), &mut c, Fault::SaverPanic);
    step(&mut m, save_plan("s", &[(1, 1), (2, 2), (3, 3)], false));
    let f = m.drain(Duration::from_secs(10));
    assert_eq!(f.sending, vec!["s".to_string()], "vLLM may free the blocks");
    let r = Report::decode(&m.take_report()).unwrap();
    assert_eq!(r.saved.len(), 1);
    assert!(r.saved[0].ok.is_empty());
    let mut failed = r.saved[0].failed.clone();
    failed.sort();
    let mut want = vec![key(1), key(2), key(3)];
    want.sort();
    assert_eq!(failed, want);
    let v: serde_json::Value = serde_json::from_str(&m.metrics_json()).unwrap();
    assert_eq!(v["host_slots_used"], 0, "no slot kept by the failed save");
    assert_eq!(v["counters"]["job_panics"], 1);
    assert_eq!(v["counters"]["save_failed_blocks"], 3);
    // Nothing was parked: a load of those blocks fails (recompute).
    step(&mut m, load_plan("l", true, &[(1, 9), (2, 10), (3, 11)]));
    assert_eq!(sorted(m.get_finished().failed_blocks), vec![9, 10, 11]);
}

#[test]
fn an_unknown_fault_name_is_refused() {
    let e = Fault::parse("loader_explode").unwrap_err();
    assert!(e.to_string().contains("KVPARK_FAULT"), "{e}");
    assert!(e.to_string().contains("loader_explode"), "{e}");
    assert_eq!(Fault::parse("loader_panic").unwrap(), Fault::LoaderPanic);
    assert_eq!(Fault::parse("").unwrap(), Fault::None);
}
