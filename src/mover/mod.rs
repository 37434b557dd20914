//! Worker-side facade: executes the planner's plans on the tiers.
//!
//! One `Mover` per worker process (per GPU / TP rank). It owns the host arena,
//! the block index and the NVMe store of its rank, borrows vLLM's KV views
//! (never allocating or freeing them) and moves blocks with a
//! [`CopyEngine`].
//!
//! Per vLLM step:
//!
//! | vLLM hook            | mover                                                        |
//! |----------------------|--------------------------------------------------------------|
//! | `bind_connector_metadata` | [`Mover::set_compute_stream`] (KV caches on a GPU: the model's stream, which the step's transfers then wait for on the device), [`Mover::bind`]: decode the step's [`Plan`]; the first plan with work lets the arena's pinning go past its first chunk |
//! | `start_load_kv`      | [`Mover::start_load`]: sync loads start (layer by layer on the layer thread, or whole now: `layerwise_load`), async ones go to the loader thread |
//! | `wait_for_layer_load`| [`Mover::wait_layer`]: waits until layer *i* of the step's sync loads is in place (that layer only; at once when they loaded whole) |
//! | `wait_for_save`      | [`Mover::wait_for_save`]: hands the step's saves and tier moves to the saver thread |
//! | `get_finished`       | [`Mover::get_finished`]: saves done, async loads done, failed block ids |
//! | worker meta          | [`Mover::take_report`]: where blocks went, for the planner   |
//!
//! Nothing slow runs inside a hook: saves (gathers from vLLM), tier moves
//! (promotions read NVMe and decode) and async loads run on background
//! threads (`src/mover/jobs.rs`), their outcomes reach vLLM through `get_finished`
//! and the worker report. The one wait inside a hook is the step's sync
//! loads (bounded by the planner's `sync_load_budget_bytes`), which must be
//! in place before the forward reads them.
//!
//! Invariants:
//! - A block being scattered into vLLM is pinned in the index: its host slot
//!   is never freed or overwritten meanwhile.
//! - A load never serves bytes that failed a checksum: a corrupt NVMe record
//!   is reported as a failed block (vLLM recomputes it) and forgotten.
//! - Every save request is reported in `finished_sending`, also when it
//!   failed, so vLLM never keeps a request's blocks forever; every async
//!   load in `finished_recving`, failed blocks listed. A background job
//!   that panics, or a thread that died, ends its requests that way too
//!   (see `src/mover/jobs.rs`): a failure is a recompute, never a hang.
//! - The report never tells the planner about a block of a save before
//!   the save itself (entries for blocks of a save still running are held
//!   back to a later report).
//! - A full NVMe disk stops demotion (and is counted), never serving.
//! - The planner decides, the mover executes and reports: every planned move
//!   ends in an outcome in the report (done, or skipped / failed with the
//!   reason; a demotion's when its write lands), and every change of where a
//!   block lives on this rank is reported in order — also the ones the mover
//!   must make itself (a save into a full host tier evicts older blocks, a
//!   load drops a corrupt record) — tagged with the rank.
//! - Layer-wise sync loads (config `layerwise_load`; by default on for KV
//!   caches on a GPU, off on vLLM's CPU backend): the blocks
//!   are pinned (read from NVMe if needed) in `start_load`, then the layer
//!   thread scatters layer 0, 1, … and publishes each finished layer;
//!   `wait_layer(i)` returns once layer *i* is in place. The step's next hook
//!   (`wait_for_save`, `get_finished`, the next `bind`) waits for the rest and
//!   unpins. When the host tier cannot hold every block of the step at once,
//!   the blocks pinned so far are scattered whole first (as without
//!   layer-wise loading) and the rest go layer by layer.
//!
//! Files, by concern:
//!
//! | file          | holds                                                              |
//! |---------------|--------------------------------------------------------------------|
//! | `mod.rs`      | [`Mover`] and its vLLM hooks, `Registered`, the report hold-back   |
//! | `register.rs` | [`Mover::register`]: host arena and its pinning, NVMe store, slot table, recovery of a reopened host file, store labels |
//! | `save.rs`     | saves: gather into host slots, streaming through a full host tier |
//! | `load.rs`     | loads: pinning (reading NVMe), whole and layer-wise scatter, the layer thread |
//! | `moves.rs`    | tier moves, demotion and write-behind, eviction, NVMe completions, deferred demotions, the writer thread |
//! | `jobs.rs`     | the loader and saver threads                                       |
//! | `lock.rs`     | the lock order's debug check                                       |
//! | `metrics.rs`  | counters                                                           |
//!
//! # Lock order
//!
//! The state shared by the hooks (vLLM's thread) and the loader, saver,
//! layer and writer threads sits behind these locks of `Registered`,
//! listed in the order they may nest: a thread holding one takes only
//! locks further down the list, never one above it, and never the same
//! one twice.
//!
//! 1. `index` — the block index (where each block lives, pins, states).
//! 2. `slots` — the slot table of a file-backed arena.
//! 3. `report` — the worker report being built.
//! 4. `writes` — NVMe writes in flight (ticket → key).
//! 5. `deferred` — demotions waiting for room in the store's queue.
//! 6. `nvme_paused_until` — when demotion may resume after a full disk.
//!
//! The nestings the code has:
//!
//! - `index` → `report`: a block the mover drops or finds lost while it
//!   holds the index is reported under it (`evict_one`, `apply_move`'s
//!   `EvictHost`, a failed NVMe read in `pin_for_load`).
//! - `index` → `slots`: a host slot freed under the index (`free_slot`
//!   clears its table entry; `evict_one`, `pin_for_load`, a panicked save's
//!   cleanup in `jobs.rs`).
//! - `writes` → the NVMe store: a write is submitted under `writes`, so
//!   the writer thread never sees its completion before its ticket. The
//!   submission waits only while the store's queue is full: the mover
//!   keeps `MAX_WRITES_IN_FLIGHT` writes at most, counted before `writes`
//!   is taken, so two threads demoting at once may both pass the count and
//!   one then waits for an I/O thread to take a write off the queue (I/O
//!   threads take no mover lock).
//!
//! Every other lock is taken alone and released before the next (each
//! operand of `&&` / `||` drops its guard before the next runs; a guard in
//! an `if let` scrutinee would live through the body, so values are read
//! out first). Below all of these come the locks inside the components
//! (the arena's free list and pinning state, the NVMe store, the copy
//! engine), which never call back into the mover. The arena's slot guards
//! are no locks: they fail with `Busy` instead of waiting. No lock above
//! is held across a copy, a gather or scatter, an NVMe read or a wait on
//! another thread (bar that submission). `LayerProgress::st` (with its
//! condvar) belongs to the layer thread and its waiter and is never held
//! with another lock.
//!
//! In debug builds the order is checked: each lock is an `Ordered` mutex
//! with its level (`lock.rs`), and taking one out of order panics.

mod jobs;
mod load;
mod lock;
mod metrics;
mod moves;
mod register;
mod save;

pub use jobs::Fault;
pub use metrics::MoverMetrics;

use crate::block::{BlockKey, Geometry};
use crate::config::Config;
use crate::copy::{cpu::CpuEngine, CopyEngine, KvCaches};
use crate::error::{Error, Result};
use crate::index::BlockIndex;
use crate::plan::{LoadDone, LoadReq, Plan, Report, SaveDone};
use crate::tier::host::HostArena;
use crate::tier::nvme::{Completion, NvmeStore};
use crate::tier::slots::SlotTable;
use crossbeam_channel::Receiver;
use jobs::{JobThread, LoaderKind, SaverJob, SaverKind};
use load::{LayerJob, LayerProgress, LayerThread, Layered};
use lock::Ordered;
use moves::Writer;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use crate::tier::parked::{scan_host_file, scan_parked};

/// What `get_finished` hands to vLLM.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Finished {
    /// Requests whose save finished (ok or not): their blocks may be freed.
    pub sending: Vec<String>,
    /// Requests whose async load finished (ok or not).
    pub recving: Vec<String>,
    /// vLLM block ids whose load failed: recompute them.
    pub failed_blocks: Vec<u32>,
}

struct Registered {
    kv: KvCaches,
    geom: Geometry,
    arena: HostArena,
    index: Ordered<BlockIndex>,
    nvme: Option<NvmeStore>,
    nvme_done: Option<Receiver<Completion>>,
    /// NVMe writes in flight: ticket → key.
    writes: Ordered<HashMap<u64, BlockKey>>,
    /// Demotions waiting for room in the store's queue: (key, session, seq).
    deferred: Ordered<std::collections::VecDeque<(BlockKey, u64, u32)>>,
    report: Ordered<Report>,
    metrics: MoverMetrics,
    engine: Arc<dyn CopyEngine>,
    clock: AtomicU64,
    /// Demotion paused until this instant after the disk filled up.
    nvme_paused_until: Ordered<Option<Instant>>,
    /// Slot table of a file-backed arena (config `host_file`).
    slots: Option<Ordered<SlotTable>>,
}

/// The worker-side executor of plans.
pub struct Mover {
    cfg: Config,
    rank: u32,
    engine: Arc<dyn CopyEngine>,
    reg: Option<Arc<Registered>>,
    plan: Option<Plan>,
    finished: Finished,
    loader: Option<JobThread<LoaderKind>>,
    saver: Option<JobThread<SaverKind>>,
    /// Test fault for the background threads ([`Fault`]).
    fault: Fault,
    pinning: Option<crate::copy::cuda::PinningJob>,
    layer_thread: Option<LayerThread>,
    layered: Option<Layered>,
    writer: Option<Writer>,
}

impl Mover {
    /// A mover for `rank` with the CPU copy engine. Reads the test hook
    /// `KVPARK_FAULT` once ([`Fault::from_env`]; unset in production).
    pub fn new(cfg: Config, rank: u32) -> Result<Self> {
        let fault = Fault::from_env()?;
        if fault != Fault::None {
            log::warn!("kvpark: test fault {fault:?} injected ({})", Fault::ENV);
        }
        Ok(Mover {
            cfg,
            rank,
            engine: Arc::new(CpuEngine),
            reg: None,
            plan: None,
            finished: Finished::default(),
            loader: None,
            saver: None,
            fault,
            pinning: None,
            layer_thread: None,
            layered: None,
            writer: None,
        })
    }

    /// Injects a test fault into the background threads (before
    /// [`Mover::register`], which starts them); tests only, as
    /// `KVPARK_FAULT` is for a worker in another process.
    #[doc(hidden)]
    pub fn inject_fault(&mut self, fault: Fault) {
        self.fault = fault;
    }

    /// Replaces the copy engine (before [`Mover::register`]).
    pub fn set_engine(&mut self, engine: Arc<dyn CopyEngine>) {
        self.engine = engine;
    }

    /// The stream the model runs on (`CopyEngine::set_compute_stream`):
    /// later transfers wait on the device for the work queued on it.
    pub fn set_compute_stream(&mut self, stream: Option<u64>) {
        self.engine.set_compute_stream(stream);
    }

    /// `bind_connector_metadata`: the step's plan bytes. The first plan with
    /// work lets the arena's pinning go on past its first chunk (the engine
    /// is serving by then, its CUDA graphs captured).
    pub fn bind(&mut self, meta: &[u8]) -> Result<()> {
        self.finish_layered();
        let plan = if meta.is_empty() {
            Plan::default()
        } else {
            Plan::decode(meta)?
        };
        if let Some(job) = &self.pinning {
            if !plan.is_empty() && job.is_held() {
                job.release();
            }
        }
        // A plan bound twice before its step ran (no start_load_kv /
        // wait_for_save in between) must not drop the first one: its saves
        // would never reach finished_sending (vLLM would hold their GPU
        // blocks forever) and its async loads never finished_recving.
        let plan = match self.plan.take() {
            Some(mut old) if !old.is_empty() => {
                if let Some(reg) = &self.reg {
                    reg.metrics.plans_merged.fetch_add(1, Ordering::Relaxed);
                }
                log::warn!(
                    "kvpark: plan of step {} bound before plan of step {} ran; running both",
                    plan.step,
                    old.step
                );
                old.step = plan.step;
                old.saves.extend(plan.saves);
                old.loads.extend(plan.loads);
                old.moves.extend(plan.moves);
                old
            }
            _ => plan,
        };
        self.plan = Some(plan);
        Ok(())
    }

    /// Runs a plan of tier moves only ([`crate::planner::blocks::BlockPlanner::tick_moves`])
    /// outside the engine's step, on the saver thread, behind the jobs
    /// already queued there; their outcomes come in the next report. A
    /// plan that carries saves or loads is refused (those belong to a
    /// step: vLLM holds their blocks for it).
    pub fn run_moves(&mut self, meta: &[u8]) -> Result<()> {
        if meta.is_empty() {
            return Ok(());
        }
        let plan = Plan::decode(meta)?;
        if !plan.saves.is_empty() || !plan.loads.is_empty() {
            return Err(Error::invalid(format!(
                "run_moves: the plan of step {} carries {} saves and {} loads; only a step runs those",
                plan.step,
                plan.saves.len(),
                plan.loads.len()
            )));
        }
        if plan.moves.is_empty() {
            return Ok(());
        }
        if let Some(saver) = self.saver.as_mut() {
            // as in a step: with the saver gone, moves are dropped
            let _ = saver.submit(SaverJob::Moves(plan.moves));
        }
        Ok(())
    }

    /// `start_load_kv`: starts the step's sync loads (layer by layer on the
    /// layer thread, or whole before returning when `layerwise_load` is off)
    /// and hands async loads to the loader thread.
    pub fn start_load(&mut self) -> Result<()> {
        self.finish_layered();
        let Some(plan) = self.plan.as_mut() else {
            return Ok(());
        };
        let loads = std::mem::take(&mut plan.loads);
        if loads.is_empty() {
            return Ok(());
        }
        let Some(reg) = self.reg.clone() else {
            // Nothing registered: every load fails, vLLM recomputes.
            for l in loads {
                self.fail_load(&l);
            }
            return Ok(());
        };
        let (sync, async_loads): (Vec<LoadReq>, Vec<LoadReq>) =
            loads.into_iter().partition(|l| l.sync);
        for l in async_loads {
            let loader = self.loader.as_mut().expect("loader exists after register");
            if let Err(l) = loader.submit(l) {
                // The loader thread has stopped: fail fast, vLLM recomputes.
                self.fail_load(&l);
            }
        }
        if sync.is_empty() {
            return Ok(());
        }
        let jobs = self.layer_thread.as_ref().and_then(|t| t.jobs.clone());
        match jobs {
            Some(jobs) if self.cfg.layerwise_load.enabled(reg.kv.on_device()) => {
                let t0 = Instant::now();
                let (loads, pinned) = reg.pin_loads(&sync, true);
                let progress = Arc::new(LayerProgress::default());
                let job = LayerJob {
                    reg: reg.clone(),
                    blocks: pinned.iter().map(|p| (p.1, p.2)).collect(),
                    progress: progress.clone(),
                };
                let pinned: Vec<(BlockKey, u32, usize)> =
                    pinned.into_iter().map(|p| (p.0, p.1, p.3)).collect();
                if jobs.send(job).is_err() {
                    progress.end(Some("the layer thread has stopped".into()));
                }
                reg.metrics.layerwise_loads.fetch_add(1, Ordering::Relaxed);
                self.layered = Some(Layered {
                    progress,
                    loads,
                    pinned,
                    blocks: sync.iter().map(|l| l.blocks.len()).sum(),
                    t0,
                });
            }
            _ => {
                for l in &sync {
                    let (done, failed) = reg.load(l);
                    reg.report.lock().loaded.push(done);
                    self.finished.failed_blocks.extend(failed);
                }
            }
        }
        Ok(())
    }

    /// Waits for the step's layer-wise loads to end, unpins their blocks and
    /// reports them (a block whose scatter failed is a failed block).
    fn finish_layered(&mut self) {
        let Some(ld) = self.layered.take() else {
            return;
        };
        let err = ld.progress.wait_end();
        let Some(reg) = self.reg.clone() else {
            return;
        };
        let mut loads = ld.loads;
        {
            let mut idx = reg.index.lock();
            for (key, block, i) in ld.pinned {
                let _ = idx.unpin(&key);
                if err.is_some() {
                    loads[i].0.failed.push(key);
                    loads[i].1.push(block);
                }
            }
        }
        let m = &reg.metrics;
        if err.is_some() {
            m.layerwise_errors.fetch_add(1, Ordering::Relaxed);
        }
        m.load_ns
            .fetch_add(ld.t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        let failed_total: usize = loads.iter().map(|l| l.0.failed.len()).sum();
        m.loaded_blocks
            .fetch_add((ld.blocks - failed_total) as u64, Ordering::Relaxed);
        for (done, failed) in loads {
            m.loads.fetch_add(1, Ordering::Relaxed);
            m.load_failed_blocks
                .fetch_add(done.failed.len() as u64, Ordering::Relaxed);
            self.finished.failed_blocks.extend(failed);
            reg.report.lock().loaded.push(done);
        }
    }

    fn fail_load(&mut self, l: &LoadReq) {
        if !l.sync {
            self.finished.recving.push(l.req_id.clone());
        }
        self.finished
            .failed_blocks
            .extend(l.blocks.iter().map(|b| b.1));
        if let Some(reg) = &self.reg {
            reg.metrics
                .load_failed_blocks
                .fetch_add(l.blocks.len() as u64, Ordering::Relaxed);
        }
        let done = LoadDone {
            req_id: l.req_id.clone(),
            failed: l.blocks.iter().map(|b| b.0).collect(),
        };
        if let Some(reg) = &self.reg {
            reg.report.lock().loaded.push(done);
        }
    }

    /// `wait_for_layer_load`: returns once layer `layer` of the step's sync
    /// loads is in place (only that layer and the ones before it; later
    /// layers may still be moving). An error means the layer is not in
    /// place: the forward must not read it.
    pub fn wait_layer(&mut self, layer: u32) -> Result<()> {
        if let Some(reg) = &self.reg {
            if layer >= reg.geom.layers {
                return Err(Error::invalid(format!(
                    "layer {layer} out of range (model has {} KV layers)",
                    reg.geom.layers
                )));
            }
            if let Some(ld) = &self.layered {
                let t = Instant::now();
                let r = ld.progress.wait_layer(layer as usize);
                reg.metrics.layer_waits.fetch_add(1, Ordering::Relaxed);
                reg.metrics
                    .layer_wait_ns
                    .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
                return r;
            }
        }
        Ok(())
    }

    /// `wait_for_save`: hands the step's saves (parking its finished
    /// requests) and tier moves to the saver thread, in that order; they
    /// are reported through [`Mover::get_finished`] and the worker report
    /// when done. Waits for nothing but the step's layer-wise sync loads.
    pub fn wait_for_save(&mut self) -> Result<()> {
        self.finish_layered();
        let Some(plan) = self.plan.as_mut() else {
            return Ok(());
        };
        let saves = std::mem::take(&mut plan.saves);
        let moves = std::mem::take(&mut plan.moves);
        for s in saves {
            let refused = match self.saver.as_mut() {
                Some(saver) => saver.submit(SaverJob::Save(s)).err(),
                None => Some(SaverJob::Save(s)),
            };
            // Not registered, or the saver thread has stopped: the save
            // fails now (nothing parked; vLLM frees the blocks).
            if let Some(SaverJob::Save(s)) = refused {
                let done = SaveDone {
                    req_id: s.req_id.clone(),
                    ok: vec![],
                    failed: s.blocks.iter().map(|b| b.0).collect(),
                };
                if let Some(reg) = &self.reg {
                    reg.metrics
                        .save_failed_blocks
                        .fetch_add(s.blocks.len() as u64, Ordering::Relaxed);
                    reg.report.lock().saved.push(done);
                }
                self.finished.sending.push(s.req_id);
            }
        }
        if !moves.is_empty() {
            if let Some(saver) = self.saver.as_mut() {
                // Moves are the policy's advice: with the saver gone they
                // are dropped (blocks stay where they are).
                let _ = saver.submit(SaverJob::Moves(moves));
            }
        }
        Ok(())
    }

    /// Collects the answered jobs of the loader and saver threads into
    /// `finished` and the report.
    fn poll_jobs(&mut self) {
        if let Some(loader) = &mut self.loader {
            for (done, failed) in loader.poll() {
                self.finished.recving.push(done.req_id.clone());
                self.finished.failed_blocks.extend(failed);
                if let Some(reg) = &self.reg {
                    reg.report.lock().loaded.push(done);
                }
            }
        }
        if let Some(saver) = &mut self.saver {
            for done in saver.poll().into_iter().flatten() {
                self.finished.sending.push(done.req_id.clone());
                if let Some(reg) = &self.reg {
                    reg.report.lock().saved.push(done);
                }
            }
        }
    }

    /// `get_finished`: collects finished saves and async loads since the last call.
    /// NVMe completions are applied by the writer thread, not here.
    pub fn get_finished(&mut self) -> Finished {
        self.finish_layered();
        self.poll_jobs();
        std::mem::take(&mut self.finished)
    }

    /// Jobs handed to the loader and saver threads and not collected yet.
    fn pending_jobs(&self) -> usize {
        self.loader.as_ref().map_or(0, |l| l.pending())
            + self.saver.as_ref().map_or(0, |s| s.pending())
    }

    /// Blocks until every async load, save and tier move handed out so far
    /// has finished and NVMe writes have landed (tests, shutdown).
    pub fn drain(&mut self, timeout: Duration) -> Finished {
        let end = Instant::now() + timeout;
        let mut acc = Finished::default();
        loop {
            let f = self.get_finished();
            acc.sending.extend(f.sending);
            acc.recving.extend(f.recving);
            acc.failed_blocks.extend(f.failed_blocks);
            let writes = self.reg.as_ref().map(|r| r.nvme_busy()).unwrap_or(false);
            if (self.pending_jobs() == 0 && !writes) || Instant::now() >= end {
                return acc;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The worker report for the planner (encoded; empty = nothing to report).
    pub fn take_report(&mut self) -> Vec<u8> {
        self.finish_layered();
        let Some(reg) = &self.reg else {
            return Vec::new();
        };
        let mut r = std::mem::take(&mut *reg.report.lock());
        if let Some(saver) = &self.saver {
            hold_back_unsaved(&mut r, saver, reg);
        }
        if r.is_empty() {
            return Vec::new();
        }
        r.rank = self.rank;
        r.block_bytes = reg.geom.block_bytes() as u64;
        r.encode()
    }

    /// Metrics snapshot as JSON.
    pub fn metrics_json(&self) -> String {
        let mut v = serde_json::json!({
            "rank": self.rank,
            "engine": self.engine.name(),
            "registered": self.reg.is_some(),
            "host_bytes_config": self.cfg.host_bytes,
        });
        // Background threads known to have stopped (their work fails fast).
        let mut stopped: Vec<&str> = Vec::new();
        if self.loader.as_ref().is_some_and(|l| l.is_dead()) {
            stopped.push("loader");
        }
        if self.saver.as_ref().is_some_and(|s| s.is_dead()) {
            stopped.push("saver");
        }
        v["threads_stopped"] = stopped.into();
        if let Some(reg) = &self.reg {
            let idx = reg.index.lock();
            v["host_slots"] = reg.arena.capacity().into();
            v["host_slots_used"] = reg.arena.used().into();
            v["host_slot_bytes"] = reg.arena.slot_bytes().into();
            v["pinned_bytes"] = reg.arena.pinned_bytes().into();
            v["blocks"] = serde_json::to_value(idx.counts()).unwrap_or_default();
            v["counters"] = serde_json::to_value(&reg.metrics).unwrap_or_default();
            if let Some(n) = &reg.nvme {
                v["nvme"] = serde_json::to_value(n.stats()).unwrap_or_default();
            }
        }
        v.to_string()
    }

    /// Where this rank holds each parked block: `(key, a complete host copy,
    /// an NVMe copy)`, from the mover's own index (the truth the planner's
    /// view is checked against; settled after [`Mover::drain`]).
    pub fn holdings(&self) -> Vec<(BlockKey, bool, bool)> {
        let Some(reg) = &self.reg else {
            return Vec::new();
        };
        let idx = reg.index.lock();
        idx.iter()
            .map(|(k, e)| (*k, e.state.host_readable(), e.on_nvme))
            .collect()
    }

    /// The registered geometry, if any.
    pub fn geometry(&self) -> Option<Geometry> {
        self.reg.as_ref().map(|r| r.geom)
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        // Zero-copy NVMe writes read arena slots: finish them before the
        // arena (an earlier field) is unmapped.
        if let Some(n) = &self.nvme {
            let _ = n.close();
        }
    }
}

impl Drop for Mover {
    fn drop(&mut self) {
        self.finish_layered();
        if let Some(mut t) = self.layer_thread.take() {
            drop(t.jobs.take());
            if let Some(h) = t.thread.take() {
                let _ = h.join();
            }
        }
        // Saves in flight finish (and their write-behind below).
        if let Some(mut s) = self.saver.take() {
            s.shutdown();
        }
        if let Some(mut l) = self.loader.take() {
            l.shutdown();
        }
        if let Some(mut w) = self.writer.take() {
            w.stop.store(true, Ordering::Release);
            if let Some(t) = w.thread.take() {
                let _ = t.join();
            }
        }
        if let Some(reg) = &self.reg {
            // Let write-behind finish so what was acknowledged is on disk.
            let end = Instant::now() + Duration::from_secs(10);
            while !(reg.writes.lock().is_empty() && reg.deferred.lock().is_empty())
                && Instant::now() < end
            {
                reg.poll_nvme(Duration::from_millis(10));
            }
            if let Some(n) = &reg.nvme {
                let _ = n.sync();
            }
        }
        // Unregister the arena before it is unmapped (fields drop after this).
        drop(self.pinning.take());
    }
}

/// Moves the report's tier changes and move outcomes of blocks whose save
/// is still on the saver thread back into the mover's report, ahead of
/// anything recorded since (so each block's news keeps its order): the
/// planner hears of a block's tiers in the report that carries its save.
fn hold_back_unsaved(r: &mut Report, saver: &JobThread<SaverKind>, reg: &Registered) {
    if saver.pending() == 0 || (r.tiers.is_empty() && r.moved.is_empty()) {
        return;
    }
    let saving: HashSet<BlockKey> = saver
        .pending_jobs()
        .filter_map(|j| match j {
            SaverJob::Save(s) => Some(s.blocks.iter().map(|b| b.0)),
            SaverJob::Moves(_) => None,
        })
        .flatten()
        .collect();
    if saving.is_empty() {
        return;
    }
    let (held_tiers, tiers): (Vec<_>, Vec<_>) = std::mem::take(&mut r.tiers)
        .into_iter()
        .partition(|(_, k)| saving.contains(k));
    let (held_moved, moved): (Vec<_>, Vec<_>) = std::mem::take(&mut r.moved)
        .into_iter()
        .partition(|m| saving.contains(&m.key));
    r.tiers = tiers;
    r.moved = moved;
    let mut rep = reg.report.lock();
    rep.tiers.splice(0..0, held_tiers);
    rep.moved.splice(0..0, held_moved);
}
