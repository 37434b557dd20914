//! Layer-wise sync loads: `wait_layer(i)` returns exactly when layer `i` of
//! every loaded block is in place — not before (a gated copy engine holds
//! each layer until the test releases it, and the bytes are checked at each
//! step), and without waiting for later layers. Also: a failing layer fails
//! the step's blocks (never half-written KV served as loaded), the host tier
//! too small for the step's blocks falls back to whole-block scatter for
//! part of them, and `layerwise_load: false` (and `auto` on CPU caches)
//! loads everything up front.

mod common;

use common::Cache;
use crossbeam_channel::{Receiver, Sender};
use kvpark::block::{BlockKey, Geometry};
use kvpark::config::{Config, Layerwise};
use kvpark::copy::{cpu::CpuEngine, CopyEngine, GatherOp, KvCaches, ScatterOp};
use kvpark::mover::Mover;
use kvpark::plan::{LoadReq, Plan, SaveReq};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const LAYERS: usize = 4;
const BLOCKS: u64 = 16;

fn geom() -> Geometry {
    common::small_f32(LAYERS as u32)
}

/// The CPU engine, with each single-layer scatter held until a permit
/// arrives (when gating is on) and an optional failing layer.
struct GateEngine {
    gate: AtomicBool,
    permits: Receiver<()>,
    fail_layer: AtomicUsize,
    scattered_layers: AtomicUsize,
}

impl CopyEngine for GateEngine {
    fn name(&self) -> &'static str {
        "gated-cpu"
    }
    fn gather(&self, kv: &KvCaches, ops: &mut [GatherOp<'_>]) -> kvpark::Result<()> {
        CpuEngine.gather(kv, ops)
    }
    fn scatter_layers(
        &self,
        kv: &KvCaches,
        ops: &[ScatterOp<'_>],
        layers: Range<usize>,
    ) -> kvpark::Result<()> {
        if self.gate.load(Ordering::SeqCst) {
            self.permits
                .recv_timeout(Duration::from_secs(20))
                .map_err(|_| kvpark::Error::internal("test gate: no permit in 20 s"))?;
        }
        if layers.contains(&self.fail_layer.load(Ordering::SeqCst)) {
            return Err(kvpark::Error::internal("test engine: layer copy failed"));
        }
        self.scattered_layers
            .fetch_add(layers.len(), Ordering::SeqCst);
        CpuEngine.scatter_layers(kv, ops, layers)
    }
}

fn key(i: u32) -> BlockKey {
    BlockKey::derive(b"layerwise", &i.to_le_bytes())
}

/// Layer-wise on (the default, `auto`, is off for caches in host memory).
fn on() -> Config {
    Config {
        layerwise_load: Layerwise::On,
        ..Config::default()
    }
}

fn gated_mover(cfg: &Config, cache: &mut Cache) -> (Mover, Arc<GateEngine>, Sender<()>) {
    let (tx, rx) = crossbeam_channel::unbounded();
    let e = Arc::new(GateEngine {
        gate: AtomicBool::new(false),
        permits: rx,
        fail_layer: AtomicUsize::new(usize::MAX),
        scattered_layers: AtomicUsize::new(0),
    });
    let mut m = Mover::new(cfg.clone(), 0).unwrap();
    m.set_engine(e.clone());
    unsafe { m.register(geom(), cache.views(), None) }.unwrap();
    (m, e, tx)
}

fn save(m: &mut Mover, items: &[(u32, u32)]) {
    let plan = Plan {
        saves: vec![SaveReq {
            req_id: "save".into(),
            session: 1,
            blocks: items.iter().map(|&(k, b)| (key(k), b, k)).collect(),
            to_nvme: true,
        }],
        ..Default::default()
    };
    m.bind(&plan.encode()).unwrap();
    m.start_load().unwrap();
    m.wait_for_save().unwrap();
    assert_eq!(
        m.drain(Duration::from_secs(10)).sending,
        vec!["save".to_string()]
    );
    m.drain(Duration::from_secs(10));
}

fn start_sync_load(m: &mut Mover, items: &[(u32, u32)]) {
    let plan = Plan {
        loads: vec![LoadReq {
            req_id: "load".into(),
            sync: true,
            blocks: items.iter().map(|&(k, b)| (key(k), b)).collect(),
        }],
        ..Default::default()
    };
    m.bind(&plan.encode()).unwrap();
    m.start_load().unwrap();
}

fn counters(m: &Mover) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_str(&m.metrics_json()).unwrap();
    v["counters"].clone()
}

fn zero(c: &Cache, l: usize, b: u32) -> bool {
    c.layer(l, b).iter().all(|v| *v == 0.0)
}

#[test]
fn wait_layer_returns_exactly_when_its_layer_is_in_place() {
    let mut c = Cache::new(geom(), BLOCKS);
    let (mut m, e, permits) = gated_mover(&on(), &mut c);
    let blocks: Vec<u32> = (1..=5).collect();
    for &b in &blocks {
        c.fill(b, b as f32);
    }
    let want: Vec<Vec<Vec<f32>>> = (0..LAYERS)
        .map(|l| blocks.iter().map(|&b| c.layer(l, b)).collect())
        .collect();
    save(&mut m, &blocks.iter().map(|&b| (b, b)).collect::<Vec<_>>());
    for &b in &blocks {
        c.clear(b);
    }
    e.gate.store(true, Ordering::SeqCst);
    // Load into other vLLM blocks (8..=12) than the ones saved from.
    let dst: Vec<u32> = blocks.iter().map(|b| b + 7).collect();
    start_sync_load(
        &mut m,
        &blocks
            .iter()
            .zip(&dst)
            .map(|(&k, &d)| (k, d))
            .collect::<Vec<_>>(),
    );
    // start_load returned with no layer released: nothing is in place yet.
    for l in 0..LAYERS {
        assert!(
            dst.iter().all(|&d| zero(&c, l, d)),
            "layer {l} written early"
        );
    }
    for (l, want_l) in want.iter().enumerate() {
        // Release layer l from another thread after 60 ms: wait_layer(l)
        // must block until then, and return with layer l in place while
        // layer l+1 is still untouched.
        let p = permits.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(60));
            p.send(()).unwrap();
        });
        let t0 = Instant::now();
        m.wait_layer(l as u32).unwrap();
        let waited = t0.elapsed();
        t.join().unwrap();
        assert!(
            waited >= Duration::from_millis(50),
            "wait_layer({l}) returned after {waited:?}, before its layer was released"
        );
        for (i, &d) in dst.iter().enumerate() {
            assert_eq!(c.layer(l, d), want_l[i], "layer {l} block {d}");
            if l + 1 < LAYERS {
                assert!(
                    zero(&c, l + 1, d),
                    "layer {} of block {d} ahead of time",
                    l + 1
                );
            }
        }
        // Waiting again for an earlier layer does not block.
        let t1 = Instant::now();
        m.wait_layer(0).unwrap();
        assert!(t1.elapsed() < Duration::from_millis(50));
    }
    m.wait_for_save().unwrap();
    let f = m.get_finished();
    assert!(f.failed_blocks.is_empty(), "{:?}", f.failed_blocks);
    let k = counters(&m);
    assert_eq!(k["layerwise_loads"], 1, "{k}");
    assert_eq!(k["loaded_blocks"], 5, "{k}");
    assert_eq!(k["layerwise_errors"], 0, "{k}");
    assert!(
        k["layer_wait_ns"].as_u64().unwrap() >= 4 * 50_000_000,
        "{k}"
    );
    assert_eq!(e.scattered_layers.load(Ordering::SeqCst), LAYERS);
    // The blocks stay parked and unpinned: a second load works too.
    e.gate.store(false, Ordering::SeqCst);
    for &d in &dst {
        c.clear(d);
    }
    start_sync_load(&mut m, &[(1, 3)]);
    m.wait_for_save().unwrap();
    assert!(m.get_finished().failed_blocks.is_empty());
    for (l, w) in want.iter().enumerate() {
        assert_eq!(c.layer(l, 3), w[0], "layer {l}");
    }
}

#[test]
fn a_failing_layer_fails_the_blocks_and_is_reported() {
    let mut c = Cache::new(geom(), BLOCKS);
    let (mut m, e, _permits) = gated_mover(&on(), &mut c);
    for b in 1..=3 {
        c.fill(b, b as f32);
    }
    save(&mut m, &[(1, 1), (2, 2), (3, 3)]);
    e.fail_layer.store(2, Ordering::SeqCst);
    start_sync_load(&mut m, &[(1, 9), (2, 10), (3, 11)]);
    m.wait_layer(0).unwrap();
    m.wait_layer(1).unwrap();
    let err = m.wait_layer(2).unwrap_err();
    assert!(
        err.to_string()
            .contains("layer-wise load stopped before layer 2")
            && err.to_string().contains("layer copy failed"),
        "{err}"
    );
    assert!(m.wait_layer(3).is_err());
    m.wait_for_save().unwrap();
    let mut failed = m.get_finished().failed_blocks;
    failed.sort();
    assert_eq!(failed, vec![9, 10, 11]);
    let k = counters(&m);
    assert_eq!(k["layerwise_errors"], 1, "{k}");
    assert_eq!(k["load_failed_blocks"], 3, "{k}");
    assert_eq!(k["loaded_blocks"], 0, "{k}");
    // Nothing was lost: with the engine fixed the same blocks load.
    e.fail_layer.store(usize::MAX, Ordering::SeqCst);
    start_sync_load(&mut m, &[(1, 9), (2, 10), (3, 11)]);
    m.wait_for_save().unwrap();
    assert!(m.get_finished().failed_blocks.is_empty());
    for l in 0..LAYERS {
        for (b, d) in [(1u32, 9u32), (2, 10), (3, 11)] {
            assert_eq!(c.layer(l, d), c.layer(l, b), "layer {l} block {d}");
        }
    }
}

#[test]
fn a_host_tier_smaller_than_the_step_scatters_part_whole_first() {
    let dir = tempfile::tempdir().unwrap();
    let g = geom();
    let cfg = Config {
        host_bytes: 3 * g.block_bytes() as u64,
        nvme_dir: Some(dir.path().to_path_buf()),
        nvme_segment_bytes: 1 << 20,
        ..on()
    };
    let mut c = Cache::new(geom(), BLOCKS);
    let (mut m, _e, _permits) = gated_mover(&cfg, &mut c);
    for b in 1..=7 {
        c.fill(b, b as f32 + 0.25);
        save(&mut m, &[(b, b)]);
    }
    let want: Vec<Vec<Vec<f32>>> = (0..LAYERS)
        .map(|l| (1..=7).map(|b| c.layer(l, b)).collect())
        .collect();
    // Seven blocks through a three-slot host tier, most from NVMe.
    start_sync_load(&mut m, &(1..=7).map(|b| (b, b + 8)).collect::<Vec<_>>());
    for l in 0..LAYERS {
        m.wait_layer(l as u32).unwrap();
    }
    m.wait_for_save().unwrap();
    assert!(m.get_finished().failed_blocks.is_empty());
    for (l, w) in want.iter().enumerate() {
        for b in 1..=7u32 {
            assert_eq!(c.layer(l, b + 8), w[b as usize - 1], "layer {l} block {b}");
        }
    }
    let k = counters(&m);
    assert!(k["layerwise_fallbacks"].as_u64().unwrap() >= 1, "{k}");
    assert!(k["load_blocks_nvme"].as_u64().unwrap() >= 4, "{k}");
    assert_eq!(k["loaded_blocks"], 7, "{k}");
}

#[test]
fn layerwise_off_and_auto_on_host_caches_load_every_layer_before_start_load_returns() {
    for mode in [Layerwise::Off, Layerwise::Auto] {
        let cfg = Config {
            layerwise_load: mode,
            ..Config::default()
        };
        let mut c = Cache::new(geom(), BLOCKS);
        let (mut m, _e, _permits) = gated_mover(&cfg, &mut c);
        for b in 1..=2 {
            c.fill(b, b as f32);
        }
        save(&mut m, &[(1, 1), (2, 2)]);
        start_sync_load(&mut m, &[(1, 5), (2, 6)]);
        // No wait_layer: everything is already there.
        for l in 0..LAYERS {
            assert_eq!(c.layer(l, 5), c.layer(l, 1), "{mode:?}");
            assert_eq!(c.layer(l, 6), c.layer(l, 2), "{mode:?}");
        }
        m.wait_for_save().unwrap();
        assert!(m.get_finished().failed_blocks.is_empty());
        let k = counters(&m);
        assert_eq!(k["layerwise_loads"], 0, "{mode:?} {k}");
        assert_eq!(k["loaded_blocks"], 2, "{mode:?} {k}");
    }
    assert!(Layerwise::Auto.enabled(true) && !Layerwise::Auto.enabled(false));
}
