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

mod jobs;
mod metrics;

pub use jobs::Fault;
pub use metrics::MoverMetrics;

use crate::block::{BlockKey, Geometry, LayerView};
use crate::config::{Config, Fsync};
use crate::copy::{cpu::CpuEngine, CopyEngine, GatherOp, KvCaches, ScatterOp};
use crate::error::{Error, ErrorKind, Result};
use crate::index::{BlockIndex, BlockState};
use crate::plan::{
    LoadDone, LoadReq, MoveKind, Outcome, Plan, Report, SaveDone, SaveReq, TierChange,
};
use crate::tier::host::{HostArena, SlotId};
use crate::tier::nvme::{Completion, FsyncPolicy, NvmeConfig, NvmeStore, OpKind};
use crate::tier::slots::{table_path, SlotTable};
use crossbeam_channel::{Receiver, Sender};
use jobs::{JobThread, LoaderKind, SaverJob, SaverKind};
use parking_lot::Mutex;
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Labels a store with this model's identity (none: nothing to label),
/// saying once when the label named another model.
fn label_store(label: &Path, identity: &str, metrics: &mut MoverMetrics) -> Result<()> {
    if identity.is_empty() {
        return Ok(());
    }
    if let crate::tier::identity::Owner::Other(other) =
        crate::tier::identity::claim(label, identity)?
    {
        *metrics.other_model_stores.get_mut() += 1;
        log::warn!(
            "{}",
            crate::tier::identity::other_model_message(label, &other, identity)
        );
    }
    Ok(())
}

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
    index: Mutex<BlockIndex>,
    nvme: Option<NvmeStore>,
    nvme_done: Option<Receiver<Completion>>,
    /// NVMe writes in flight: ticket → key.
    writes: Mutex<HashMap<u64, BlockKey>>,
    /// Demotions waiting for room in the store's queue: (key, session, seq).
    deferred: Mutex<std::collections::VecDeque<(BlockKey, u64, u32)>>,
    report: Mutex<Report>,
    metrics: MoverMetrics,
    engine: Arc<dyn CopyEngine>,
    clock: AtomicU64,
    /// Demotion paused until this instant after the disk filled up.
    nvme_paused_until: Mutex<Option<Instant>>,
    /// Slot table of a file-backed arena (config `host_file`).
    slots: Option<Mutex<SlotTable>>,
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

/// The thread that keeps write-behind and demotions going while vLLM does
/// not step (an idle engine calls no hook): it applies NVMe completions and
/// submits deferred demotions, so a block sent to NVMe is durable there
/// within the disk's write time whether or not the engine steps.
struct Writer {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// How long the writer waits for an NVMe completion before it looks again.
const WRITER_POLL: Duration = Duration::from_millis(20);

/// How long one save may wait, in total, for NVMe writes to make room in a
/// full host tier (a turn larger than the tier streams through it to NVMe).
const SAVE_STREAM_WAIT: Duration = Duration::from_secs(60);

/// Progress of one layer-wise scatter, shared with the layer thread.
#[derive(Default)]
struct LayerProgress {
    st: Mutex<LayerState>,
    cv: parking_lot::Condvar,
}

#[derive(Default)]
struct LayerState {
    /// Layers 0..done are in place.
    done: usize,
    /// The scatter ended (all layers, or an error).
    ended: bool,
    error: Option<String>,
}

impl LayerProgress {
    fn layer_done(&self, l: usize) {
        self.st.lock().done = l + 1;
        self.cv.notify_all();
    }

    fn end(&self, error: Option<String>) {
        let mut st = self.st.lock();
        st.ended = true;
        st.error = error;
        self.cv.notify_all();
    }

    /// Blocks until layer `l` is in place; the scatter's error if it ended first.
    fn wait_layer(&self, l: usize) -> Result<()> {
        let mut st = self.st.lock();
        loop {
            if st.done > l {
                return Ok(());
            }
            if st.ended {
                return Err(Error::internal(format!(
                    "layer-wise load stopped before layer {l}: {}",
                    st.error.as_deref().unwrap_or("it ended early")
                )));
            }
            self.cv.wait(&mut st);
        }
    }

    /// Blocks until the scatter ended; its error, if any.
    fn wait_end(&self) -> Option<String> {
        let mut st = self.st.lock();
        while !st.ended {
            self.cv.wait(&mut st);
        }
        st.error.clone()
    }
}

/// A job for the layer thread: scatter these pinned slots into these blocks.
struct LayerJob {
    reg: Arc<Registered>,
    blocks: Vec<(u32, SlotId)>,
    progress: Arc<LayerProgress>,
}

impl Drop for LayerJob {
    /// A job dropped unrun (the layer thread has stopped) ends its scatter
    /// with an error, so nobody waits for its layers.
    fn drop(&mut self) {
        let ended = self.progress.st.lock().ended;
        if !ended {
            self.progress
                .end(Some("the layer thread stopped before this load".into()));
        }
    }
}

struct LayerThread {
    jobs: Option<Sender<LayerJob>>,
    thread: Option<JoinHandle<()>>,
}

/// The step's sync loads while their layers are being scattered.
struct Layered {
    progress: Arc<LayerProgress>,
    /// Per load: its outcome so far and the vLLM block ids that failed.
    loads: Vec<(LoadDone, Vec<u32>)>,
    /// Pinned blocks being scattered: (key, vLLM block, index into `loads`).
    pinned: Vec<(BlockKey, u32, usize)>,
    /// Blocks asked for by the loads.
    blocks: usize,
    t0: Instant,
}

/// NVMe writes the mover keeps in flight; must not exceed the store's
/// `queue_depth` (8) so that a submission never blocks.
const MAX_WRITES_IN_FLIGHT: usize = 8;

/// Eviction candidates looked at per eviction (LRU order).
const EVICT_SCAN: usize = 32;

/// Host arena pinning granularity on CUDA machines.
const PIN_CHUNK_BYTES: usize = 1 << 30;

/// The pinning chunk for slots of `slot_bytes`: about [`PIN_CHUNK_BYTES`],
/// a whole number of slots (at least one), so a record never spans two
/// registrations (a DMA over such a range has no documented behaviour).
fn pin_chunk(slot_bytes: usize) -> usize {
    (PIN_CHUNK_BYTES / slot_bytes).max(1) * slot_bytes
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

    /// `register_kv_caches`: sizes the host arena to whole blocks and opens
    /// the NVMe store (indexing the blocks it already holds).
    ///
    /// `device`: `None` for KV caches in host memory (vLLM's CPU backend),
    /// `Some(ordinal)` for a CUDA device; the CUDA copy engine is then opened
    /// on the device's primary context (a typed Cuda error without a driver).
    ///
    /// # Safety
    /// The views must stay valid for the life of this mover (see [`KvCaches::new`]).
    pub unsafe fn register(
        &mut self,
        geom: Geometry,
        layers: Vec<LayerView>,
        device: Option<i32>,
    ) -> Result<()> {
        if self.reg.is_some() {
            return Err(Error::invalid("KV caches are already registered"));
        }
        let kv = KvCaches::new(geom, layers, device.is_some())?;
        if let Some(ordinal) = device {
            if self.engine.name() == "cpu" {
                let e = crate::copy::cuda::CudaEngine::new(ordinal)
                    .map_err(|e| e.context("KV caches are on a CUDA device"))?;
                if let Some(rules) = &self.cfg.copy_strategy {
                    e.set_selector(crate::copy::cuda::Selector::with_rules(rules.clone()));
                }
                self.engine = Arc::new(e);
            }
        }
        let block = geom.block_bytes();
        let host_file = self.cfg.host_file_for(self.rank);
        let arena = match &host_file {
            None => HostArena::from_bytes(self.cfg.host_bytes, block),
            Some(f) => HostArena::open_shared_bytes(f, self.cfg.host_bytes, block),
        }
        .map_err(|e| {
            e.context(format!(
                "host tier of {} for blocks of {}",
                crate::units::fmt_bytes(self.cfg.host_bytes),
                crate::units::fmt_bytes(block as u64)
            ))
        })?;
        let table = match &host_file {
            None => None,
            Some(f) => {
                let (t, kept) =
                    SlotTable::open(&table_path(f), arena.slot_bytes(), arena.capacity(), block)?;
                Some((t, kept && arena.reopened()))
            }
        };
        if let Some(ordinal) = device {
            // Page-lock the arena: the first chunk now, the rest on a
            // background thread from the first step with work (vLLM captures
            // its CUDA graphs after this call returns, and a registration from
            // another thread during a capture breaks the capture). Offloads
            // run meanwhile on pageable memory; a chunk that fails to pin
            // stays pageable. Chunks hold whole slots, so no record straddles
            // two registrations.
            let chunk = pin_chunk(arena.slot_bytes());
            let job = crate::copy::cuda::PinningJob::start_cuda(
                ordinal,
                arena.base_ptr(),
                arena.len(),
                chunk,
                1,
            )?;
            job.wait_settled(0, chunk.min(arena.len()), Duration::from_secs(120))?;
            self.pinning = Some(job);
        }
        let mut index = BlockIndex::new();
        let mut metrics = MoverMetrics::default();
        let (nvme, nvme_done) = match &self.cfg.nvme_dir {
            None => (None, None),
            Some(dir) => {
                let mut nc = NvmeConfig::new(dir.clone(), self.rank, self.cfg.nvme_bytes);
                nc.segment_bytes = self.cfg.nvme_segment_bytes;
                nc.io_threads = self.cfg.io_threads as usize;
                nc.codec = self.cfg.codec;
                nc.elem_size = geom.dtype.size();
                if nc.codec == crate::codec::CodecTag::Fp8Lossy
                    && !matches!(
                        geom.dtype,
                        crate::block::Dtype::Bf16 | crate::block::Dtype::F32
                    )
                {
                    return Err(crate::error::Error::config(
                        "codec fp8-lossy: bf16 or fp32 KV only (its 2-byte input is bf16)",
                    ));
                }
                nc.fsync = match self.cfg.fsync {
                    Fsync::Never => FsyncPolicy::Never,
                    Fsync::Segment => FsyncPolicy::PerSegment,
                    Fsync::Record => FsyncPolicy::EveryRecord,
                };
                let store = NvmeStore::open(nc).map_err(|e| e.context("nvme store"))?;
                label_store(
                    &crate::tier::identity::nvme_label(dir, self.rank),
                    &self.cfg.model_identity,
                    &mut metrics,
                )?;
                for k in store.keys() {
                    if k.raw_len as usize != block {
                        *metrics.recovered_wrong_geometry.get_mut() += 1;
                        continue;
                    }
                    if index.insert_nvme(k.key, k.session, k.seq, 0).is_ok() {
                        *metrics.recovered_blocks.get_mut() += 1;
                    }
                }
                let done = store.completions();
                (Some(store), Some(done))
            }
        };
        if let Some(f) = &host_file {
            label_store(
                &crate::tier::identity::host_label(f),
                &self.cfg.model_identity,
                &mut metrics,
            )?;
        }
        let slots = table.map(|(mut t, kept)| {
            if kept {
                recover_host(&mut t, &arena, &mut index, block, &mut metrics);
            } else {
                for e in t.entries() {
                    t.clear(e.slot);
                }
            }
            Mutex::new(t)
        });
        let reg = Arc::new(Registered {
            kv,
            geom,
            arena,
            index: Mutex::new(index),
            nvme,
            nvme_done,
            writes: Mutex::new(HashMap::new()),
            deferred: Mutex::new(std::collections::VecDeque::new()),
            report: Mutex::new(Report::default()),
            metrics,
            engine: self.engine.clone(),
            clock: AtomicU64::new(1),
            nvme_paused_until: Mutex::new(None),
            slots,
        });
        self.loader = Some(JobThread::spawn(LoaderKind {
            reg: reg.clone(),
            fault: self.fault,
        })?);
        self.saver = Some(JobThread::spawn(SaverKind {
            reg: reg.clone(),
            fault: self.fault,
        })?);
        self.layer_thread = Some(spawn_layer_thread()?);
        if reg.nvme.is_some() {
            self.writer = Some(spawn_writer(reg.clone())?);
        }
        self.reg = Some(reg);
        Ok(())
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

/// Re-indexes the blocks a reopened file-backed arena still holds: every
/// valid slot-table entry whose bytes match its checksum becomes a `Host`
/// block (`HostAndNvme` when NVMe recovery found it too); the rest are
/// cleared and counted.
fn recover_host(
    t: &mut SlotTable,
    arena: &HostArena,
    index: &mut BlockIndex,
    block: usize,
    metrics: &mut MoverMetrics,
) {
    for e in t.entries() {
        let slot = SlotId(e.slot);
        let good = arena.claim(slot).is_ok()
            && arena
                .slot(slot)
                .map(|g| crc32c::crc32c(&g[..block]) == e.data_crc)
                .unwrap_or(false);
        let indexed = good
            && match index.get(&e.key).map(|x| x.state) {
                None => index.insert_host(e.key, e.session, e.seq, slot, 0).is_ok(),
                Some(BlockState::Nvme) => {
                    index.begin_promote(&e.key, slot, 0).is_ok()
                        && index.finish_promote(&e.key, true).is_ok()
                }
                Some(_) => false,
            };
        if indexed {
            *metrics.host_recovered_blocks.get_mut() += 1;
        } else {
            t.clear(e.slot);
            if arena.is_allocated(slot) {
                let _ = arena.free(slot);
            }
            *metrics.host_recovered_dropped.get_mut() += 1;
        }
    }
}

/// The thread that scatters sync loads layer by layer (one per mover).
fn spawn_layer_thread() -> Result<LayerThread> {
    let (tx, rx) = crossbeam_channel::unbounded::<LayerJob>();
    let thread = std::thread::Builder::new()
        .name("kvpark-layers".into())
        .spawn(move || {
            for job in rx {
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    job.reg.scatter_layerwise(&job.blocks, &job.progress)
                }));
                let err = match r {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some(e.to_string()),
                    Err(_) => Some("the layer thread panicked".to_string()),
                };
                job.progress.end(err);
            }
        })
        .map_err(|e| Error::new(ErrorKind::Io, format!("spawn layer thread: {e}")))?;
    Ok(LayerThread {
        jobs: Some(tx),
        thread: Some(thread),
    })
}

fn spawn_writer(reg: Arc<Registered>) -> Result<Writer> {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    let thread = std::thread::Builder::new()
        .name("kvpark-writer".into())
        .spawn(move || {
            while !flag.load(Ordering::Acquire) {
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    reg.poll_nvme(WRITER_POLL);
                }));
                if r.is_err() {
                    // Completions are applied by the next poll (and the
                    // mover's drop); never a silent dead writer.
                    reg.metrics.job_panics.fetch_add(1, Ordering::Relaxed);
                    log::error!("kvpark: the NVMe writer panicked; it goes on polling");
                    std::thread::sleep(WRITER_POLL);
                }
            }
        })
        .map_err(|e| Error::new(ErrorKind::Io, format!("spawn writer thread: {e}")))?;
    Ok(Writer {
        stop,
        thread: Some(thread),
    })
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

impl Registered {
    fn now(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed)
    }

    /// Frees a host slot; with a slot table its entry is cleared first, so
    /// the table never names a slot whose bytes may change.
    fn free_slot(&self, slot: SlotId) -> Result<()> {
        if let Some(t) = &self.slots {
            t.lock().clear(slot.0);
        }
        self.arena.free(slot)
    }

    /// Records in the slot table (if any) that `slot` now holds `key`
    /// (its bytes complete).
    fn record_slot(&self, slot: SlotId, key: &BlockKey, session: u64, seq: u32) {
        let Some(t) = &self.slots else {
            return;
        };
        if let Ok(g) = self.arena.slot(slot) {
            let crc = crc32c::crc32c(&g[..self.geom.block_bytes()]);
            drop(g);
            t.lock().set(slot.0, key, session, seq, crc);
        }
    }

    /// Frees host slots until one can be allocated. Never waits on the
    /// disk: it evicts a block that has an NVMe copy if it can, else drops
    /// the least recently used host-only block; with everything pinned or in
    /// flight it fails with NoSpace (the caller reports the block unsaved).
    ///
    /// With `keep_queued`, host-only blocks are not dropped while NVMe
    /// writes are in flight or queued (they may be the very blocks on their
    /// way to the disk): the caller waits for the disk instead.
    fn alloc_slot(&self, keep_queued: bool) -> Result<SlotId> {
        loop {
            match self.arena.alloc() {
                Ok(s) => return Ok(s),
                Err(e) if e.kind() == ErrorKind::NoSpace => {
                    self.poll_nvme(Duration::ZERO);
                    if self.evict_one(false)? {
                        continue;
                    }
                    if keep_queued && self.nvme_busy() {
                        return Err(e.context("host tier full until NVMe writes land"));
                    }
                    if self.evict_one(true)? {
                        continue;
                    }
                    self.metrics.host_full.fetch_add(1, Ordering::Relaxed);
                    return Err(e.context(format!(
                        "host tier full: {} slots, all pinned or in flight",
                        self.arena.capacity()
                    )));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Evicts one host block in LRU order among unpinned, settled blocks:
    /// only blocks with an NVMe copy, or (with `drop_host_only`) also blocks
    /// that exist only here, which are then lost. Returns false when none.
    fn evict_one(&self, drop_host_only: bool) -> Result<bool> {
        let now = self.now();
        let mut idx = self.index.lock();
        for key in idx.evictable_host_victims(EVICT_SCAN, now) {
            let Some(e) = idx.get(&key) else { continue };
            let slot = match e.state {
                BlockState::HostAndNvme => idx.release_host(&key).ok(),
                BlockState::Host if drop_host_only => match idx.remove(&key) {
                    Ok(s) => {
                        self.report.lock().tier(TierChange::Lost, key);
                        self.metrics.dropped_blocks.fetch_add(1, Ordering::Relaxed);
                        s
                    }
                    Err(_) => None,
                },
                _ => None,
            };
            if let Some(s) = slot {
                self.free_slot(s)?;
                if e.state == BlockState::HostAndNvme {
                    self.report.lock().tier(TierChange::LeftHost, key);
                }
                self.metrics.host_evictions.fetch_add(1, Ordering::Relaxed);
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Parks a finished request's blocks in the host tier (and, with
    /// `to_nvme`, writes them behind to NVMe).
    ///
    /// A save larger than the free host tier streams through it: blocks are
    /// gathered in batches, each batch is queued for NVMe, and the next
    /// batch's slots come from blocks whose NVMe copy has landed (waiting
    /// for the disk, at most [`SAVE_STREAM_WAIT`] per save) rather than from
    /// dropping host-only blocks still queued for the disk.
    fn save(&self, s: &SaveReq) -> SaveDone {
        let t0 = Instant::now();
        let mut done = SaveDone {
            req_id: s.req_id.clone(),
            ..Default::default()
        };
        let stream = s.to_nvme && self.nvme.is_some();
        let deadline = t0 + SAVE_STREAM_WAIT;
        let mut batch: Vec<(BlockKey, u32, SlotId, u32)> = Vec::with_capacity(s.blocks.len());
        for &(key, block, seq) in &s.blocks {
            let known = self.index.lock().get(&key).map(|e| e.state);
            if let Some(state) = known {
                // Parked already: tell where (the planner may not know it
                // on this rank, e.g. after a restart).
                let mut r = self.report.lock();
                if state.host_readable() {
                    r.tier(TierChange::OnHost, key);
                }
                if matches!(state, BlockState::HostAndNvme | BlockState::Nvme) {
                    r.tier(TierChange::OnNvme, key);
                }
                drop(r);
                done.ok.push(key);
                if s.to_nvme {
                    // the write-behind's outcome is reported like a demotion's
                    self.demote(key, s.session, seq);
                }
                continue;
            }
            if self.kv.check_block(block).is_err() {
                done.failed.push(key);
                continue;
            }
            let slot = loop {
                match self.alloc_slot(stream) {
                    Ok(slot) => break Some(slot),
                    Err(_) if stream && !batch.is_empty() => {
                        // Park what is gathered so far; it goes to the disk
                        // and its slots come free as the writes land.
                        self.gather_batch(s, &mut batch, &mut done);
                        self.metrics
                            .save_stream_batches
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) if stream && self.nvme_busy() && Instant::now() < deadline => {
                        self.poll_nvme(Duration::from_millis(5));
                    }
                    Err(_) => break None,
                }
            };
            let Some(slot) = slot else {
                done.failed.push(key);
                continue;
            };
            let now = self.now();
            if self
                .index
                .lock()
                .begin_save(key, s.session, seq, slot, now)
                .is_err()
            {
                let _ = self.free_slot(slot);
                done.failed.push(key);
                continue;
            }
            batch.push((key, block, slot, seq));
        }
        self.gather_batch(s, &mut batch, &mut done);
        self.count_save(done, t0)
    }

    /// True while NVMe writes are in flight or queued.
    fn nvme_busy(&self) -> bool {
        !self.writes.lock().is_empty() || !self.deferred.lock().is_empty()
    }

    /// Gathers the batch's blocks from vLLM into their host slots, records
    /// the outcome in `done` and (with `to_nvme`) queues the NVMe writes.
    fn gather_batch(
        &self,
        s: &SaveReq,
        batch: &mut Vec<(BlockKey, u32, SlotId, u32)>,
        done: &mut SaveDone,
    ) {
        if batch.is_empty() {
            return;
        }
        let todo = std::mem::take(batch);
        let mut guards = Vec::with_capacity(todo.len());
        for t in &todo {
            match self.arena.slot_mut(t.2) {
                Ok(g) => guards.push(g),
                Err(_) => break,
            }
        }
        let ok = guards.len() == todo.len() && {
            let mut ops: Vec<GatherOp<'_>> = todo
                .iter()
                .zip(guards.iter_mut())
                .map(|(t, g)| GatherOp {
                    block: t.1,
                    dst: &mut g[..self.geom.block_bytes()],
                })
                .collect();
            self.engine.gather(&self.kv, &mut ops).is_ok()
        };
        drop(guards);
        for &(key, _, slot, seq) in &todo {
            let freed = self.index.lock().finish_save(&key, ok);
            match freed {
                Ok(Some(slot)) => {
                    let _ = self.free_slot(slot);
                    done.failed.push(key);
                }
                Ok(None) if ok => {
                    self.record_slot(slot, &key, s.session, seq);
                    self.report.lock().tier(TierChange::OnHost, key);
                    done.ok.push(key);
                    if s.to_nvme {
                        // the write-behind is reported like a demotion: the
                        // planner counts the NVMe copy when the write lands
                        self.demote(key, s.session, seq);
                    }
                }
                _ => done.failed.push(key),
            }
        }
    }

    fn count_save(&self, done: SaveDone, t0: Instant) -> SaveDone {
        let m = &self.metrics;
        m.saves.fetch_add(1, Ordering::Relaxed);
        m.saved_blocks
            .fetch_add(done.ok.len() as u64, Ordering::Relaxed);
        m.save_failed_blocks
            .fetch_add(done.failed.len() as u64, Ordering::Relaxed);
        m.save_ns
            .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        done
    }

    /// Starts an NVMe write of a host block: a demotion or a save's
    /// write-behind, both asked for by the planner. Its outcome is reported
    /// as a [`MoveKind::Demote`]: done when the write lands (with the tier
    /// change), skipped or failed with the reason.
    fn demote(&self, key: BlockKey, session: u64, seq: u32) {
        let outcome = |why: String| {
            self.report
                .lock()
                .moved(MoveKind::Demote, key, Outcome::Skipped(why));
        };
        let Some(store) = &self.nvme else {
            return outcome("no NVMe tier on this rank".into());
        };
        // Never block the caller (vLLM's step) on the disk: with the store's
        // queue full, the demotion waits here and poll_nvme submits it later.
        if self.writes.lock().len() >= MAX_WRITES_IN_FLIGHT {
            self.deferred.lock().push_back((key, session, seq));
            self.metrics
                .demotions_deferred
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        if let Some(until) = *self.nvme_paused_until.lock() {
            if Instant::now() < until {
                self.metrics
                    .demotions_skipped_full
                    .fetch_add(1, Ordering::Relaxed);
                return outcome("the NVMe tier is full".into());
            }
        }
        let slot = {
            let mut idx = self.index.lock();
            let Some(e) = idx.get(&key) else {
                drop(idx);
                let mut r = self.report.lock();
                r.moved(
                    MoveKind::Demote,
                    key,
                    Outcome::Skipped("not parked on this rank".into()),
                );
                r.tier(TierChange::Lost, key);
                return;
            };
            if e.state == BlockState::HostAndNvme || e.state == BlockState::Nvme {
                drop(idx);
                let mut r = self.report.lock();
                r.moved(MoveKind::Demote, key, Outcome::Done);
                r.tier(TierChange::OnNvme, key);
                return;
            }
            if e.state != BlockState::Host {
                drop(idx);
                return outcome(format!("block in state {:?}", e.state));
            }
            if let Err(err) = idx.begin_demote(&key) {
                drop(idx);
                return outcome(err.message().to_string());
            }
            e.host.expect("Host state has a slot")
        };
        let len = self.geom.block_bytes();
        let (ptr, data) = match self.arena.slot(slot) {
            // Raw records: no copy; the store writes straight from the slot.
            Ok(g)
                if store.codec() == crate::codec::CodecTag::None
                    && g.as_ptr() as usize % 4096 == 0 =>
            {
                (g.as_ptr(), None)
            }
            Ok(g) => (std::ptr::null(), Some(g[..len].to_vec())),
            Err(e) => {
                let _ = self.index.lock().finish_demote(&key, false);
                self.report.lock().moved(
                    MoveKind::Demote,
                    key,
                    Outcome::Failed(format!("host slot: {}", e.message())),
                );
                return;
            }
        };
        // The ticket goes into `writes` under the same lock as the
        // submission: the writer thread may apply the completion the moment
        // the store has it, and a completion whose ticket is not in `writes`
        // yet would be ignored, leaving the block `Demoting` (never
        // evictable) and `writes` never empty. The store's queue has room
        // (checked above), so the submission does not wait on the disk.
        let mut writes = self.writes.lock();
        let submitted = match data {
            Some(data) => store.submit_put(key, session, seq, data),
            // SAFETY: the block stays in `Demoting` until poll_nvme applies
            // this ticket's completion, so its slot is neither freed nor
            // written meanwhile (src/index/mod.rs), and `Registered::drop`
            // closes the store (finishing queued writes) before the arena
            // is unmapped.
            None => unsafe { store.submit_put_raw(key, session, seq, ptr, len) },
        };
        match submitted {
            Ok(t) => {
                writes.insert(t.0, key);
            }
            Err(e) => {
                drop(writes);
                let _ = self.index.lock().finish_demote(&key, false);
                self.metrics
                    .nvme_write_errors
                    .fetch_add(1, Ordering::Relaxed);
                self.report.lock().moved(
                    MoveKind::Demote,
                    key,
                    Outcome::Failed(format!("NVMe write: {}", e.message())),
                );
            }
        }
    }

    /// Applies NVMe completions; waits up to `wait` for the first one.
    /// Returns true when at least one completion was processed.
    ///
    /// A write leaves `writes` only after its outcome is in the report, so
    /// whoever sees no write in flight also sees every outcome reported.
    fn poll_nvme(&self, wait: Duration) -> bool {
        let Some(rx) = &self.nvme_done else {
            return false;
        };
        let mut any = false;
        let mut first = if wait.is_zero() {
            rx.try_recv().ok()
        } else {
            rx.recv_timeout(wait).ok()
        };
        while let Some(c) = first.take().or_else(|| rx.try_recv().ok()) {
            any = true;
            if c.op != OpKind::Put {
                continue;
            }
            let Some(key) = self.writes.lock().get(&c.ticket.0).copied() else {
                continue;
            };
            let _ = self.index.lock().finish_demote(&key, c.result.is_ok());
            match &c.result {
                Ok(_) => {
                    self.metrics.demoted_blocks.fetch_add(1, Ordering::Relaxed);
                    let mut r = self.report.lock();
                    r.tier(TierChange::OnNvme, key);
                    r.moved(MoveKind::Demote, key, Outcome::Done);
                }
                Err(e) => {
                    self.metrics
                        .nvme_write_errors
                        .fetch_add(1, Ordering::Relaxed);
                    let why = format!("NVMe write: {}", e.message());
                    // a full disk skips demotion for a while (never serving)
                    let outcome = if e.kind() == ErrorKind::NoSpace {
                        self.metrics.nvme_full.fetch_add(1, Ordering::Relaxed);
                        *self.nvme_paused_until.lock() =
                            Some(Instant::now() + Duration::from_secs(30));
                        Outcome::Skipped(why)
                    } else {
                        Outcome::Failed(why)
                    };
                    self.report.lock().moved(MoveKind::Demote, key, outcome);
                }
            }
            self.writes.lock().remove(&c.ticket.0);
        }
        self.submit_deferred();
        any
    }

    /// Submits deferred demotions while the store's queue has room.
    fn submit_deferred(&self) {
        loop {
            if self.writes.lock().len() >= MAX_WRITES_IN_FLIGHT {
                return;
            }
            let Some((key, session, seq)) = self.deferred.lock().pop_front() else {
                return;
            };
            // The block may have been evicted or removed meanwhile: demote()
            // only writes a block still in Host state (and reports the rest).
            self.demote(key, session, seq);
        }
    }

    /// Makes `key` readable in the host tier and pins it; returns its slot.
    fn pin_for_load(&self, key: &BlockKey) -> Result<SlotId> {
        let now = self.now();
        {
            let mut idx = self.index.lock();
            let Some(e) = idx.get(key) else {
                drop(idx);
                // The planner believed it here: tell it the truth.
                self.report.lock().tier(TierChange::Lost, *key);
                return Err(Error::not_found("block not parked"));
            };
            if e.state.host_readable() {
                idx.pin(key, now)?;
                self.metrics
                    .load_blocks_host
                    .fetch_add(1, Ordering::Relaxed);
                return Ok(e.host.expect("host-readable block has a slot"));
            }
            if e.state != BlockState::Nvme {
                return Err(Error::new(
                    ErrorKind::Busy,
                    format!("block in state {:?}", e.state),
                ));
            }
        }
        let store = self
            .nvme
            .as_ref()
            .ok_or_else(|| Error::not_found("block on NVMe but no NVMe tier is open"))?;
        let slot = self.alloc_slot(false)?;
        if let Err(e) = self.index.lock().begin_promote(key, slot, now) {
            let _ = self.free_slot(slot);
            return Err(e);
        }
        let read = match self.arena.slot_mut(slot) {
            Ok(mut g) => store.get(key, &mut g[..self.geom.block_bytes()]),
            Err(e) => Err(e),
        };
        let mut idx = self.index.lock();
        match read {
            Ok(_) => {
                idx.finish_promote(key, true)?;
                idx.pin(key, now)?;
                let e = idx.get(key).expect("just promoted");
                drop(idx);
                self.record_slot(slot, key, e.session, e.seq);
                self.report.lock().tier(TierChange::OnHost, *key);
                self.metrics
                    .load_blocks_nvme
                    .fetch_add(1, Ordering::Relaxed);
                Ok(slot)
            }
            Err(e) => {
                if let Ok(Some(s)) = idx.finish_promote(key, false) {
                    let _ = self.free_slot(s);
                }
                // The store dropped a corrupt record itself; forget the block.
                let _ = idx.remove(key);
                self.report.lock().tier(TierChange::Lost, *key);
                if e.kind() == ErrorKind::Corrupt {
                    self.metrics.load_corrupt.fetch_add(1, Ordering::Relaxed);
                }
                Err(e)
            }
        }
    }

    /// Pins every block of `loads`: per load its outcome so far (blocks that
    /// cannot be loaded are already failed) and the pinned blocks as (key,
    /// vLLM block, slot, load index). When the host tier fills up (a prefix
    /// larger than the tier, read from NVMe), the blocks pinned so far are
    /// scattered whole and unpinned first, making their slots evictable (for
    /// a layer-wise load counted in `layerwise_fallbacks`).
    #[allow(clippy::type_complexity)]
    fn pin_loads(
        &self,
        loads: &[LoadReq],
        layerwise: bool,
    ) -> (
        Vec<(LoadDone, Vec<u32>)>,
        Vec<(BlockKey, u32, SlotId, usize)>,
    ) {
        let mut outs: Vec<(LoadDone, Vec<u32>)> = loads
            .iter()
            .map(|l| {
                (
                    LoadDone {
                        req_id: l.req_id.clone(),
                        failed: vec![],
                    },
                    vec![],
                )
            })
            .collect();
        let mut pinned: Vec<(BlockKey, u32, SlotId, usize)> = Vec::new();
        for (i, l) in loads.iter().enumerate() {
            for &(key, block) in &l.blocks {
                if self.kv.check_block(block).is_err() {
                    outs[i].0.failed.push(key);
                    outs[i].1.push(block);
                    continue;
                }
                loop {
                    match self.pin_for_load(&key) {
                        Ok(slot) => pinned.push((key, block, slot, i)),
                        Err(e) if e.kind() == ErrorKind::NoSpace && !pinned.is_empty() => {
                            if layerwise {
                                self.metrics
                                    .layerwise_fallbacks
                                    .fetch_add(1, Ordering::Relaxed);
                            }
                            self.scatter_whole(&mut pinned, &mut outs);
                            continue;
                        }
                        Err(_) => {
                            outs[i].0.failed.push(key);
                            outs[i].1.push(block);
                        }
                    }
                    break;
                }
            }
        }
        (outs, pinned)
    }

    /// Scatters pinned blocks whole (all layers) and unpins them, recording
    /// failures per load (empties `pinned`).
    fn scatter_whole(
        &self,
        pinned: &mut Vec<(BlockKey, u32, SlotId, usize)>,
        outs: &mut [(LoadDone, Vec<u32>)],
    ) {
        let guards: Vec<_> = pinned.iter().map(|p| self.arena.slot(p.2)).collect();
        let ok = guards.iter().all(|g| g.is_ok()) && {
            let ops: Vec<ScatterOp<'_>> = pinned
                .iter()
                .zip(guards.iter())
                .map(|(p, g)| ScatterOp {
                    src: &g.as_ref().expect("checked")[..self.geom.block_bytes()],
                    block: p.1,
                })
                .collect();
            self.engine.scatter(&self.kv, &ops).is_ok()
        };
        drop(guards);
        let mut idx = self.index.lock();
        for (key, block, _, i) in pinned.drain(..) {
            let _ = idx.unpin(&key);
            if !ok {
                outs[i].0.failed.push(key);
                outs[i].1.push(block);
            }
        }
    }

    /// The layer thread's work: scatter pinned slots into vLLM blocks layer
    /// by layer, publishing each finished layer.
    fn scatter_layerwise(&self, blocks: &[(u32, SlotId)], progress: &LayerProgress) -> Result<()> {
        let guards = blocks
            .iter()
            .map(|b| self.arena.slot(b.1))
            .collect::<Result<Vec<_>>>()?;
        let ops: Vec<ScatterOp<'_>> = blocks
            .iter()
            .zip(guards.iter())
            .map(|(b, g)| ScatterOp {
                src: &g[..self.geom.block_bytes()],
                block: b.0,
            })
            .collect();
        self.engine
            .scatter_layerwise(&self.kv, &ops, &mut |l| progress.layer_done(l))
    }

    /// Loads one request whole (all layers at once); returns the report
    /// entry and the failed vLLM block ids. Through a full host tier the
    /// blocks go in batches (see [`Registered::pin_loads`]).
    fn load(&self, l: &LoadReq) -> (LoadDone, Vec<u32>) {
        let t0 = Instant::now();
        let (mut outs, mut pinned) = self.pin_loads(std::slice::from_ref(l), false);
        self.scatter_whole(&mut pinned, &mut outs);
        let (done, failed_blocks) = outs.pop().expect("one load, one outcome");
        let m = &self.metrics;
        m.loads.fetch_add(1, Ordering::Relaxed);
        m.loaded_blocks.fetch_add(
            (l.blocks.len() - done.failed.len()) as u64,
            Ordering::Relaxed,
        );
        m.load_failed_blocks
            .fetch_add(done.failed.len() as u64, Ordering::Relaxed);
        m.load_ns
            .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        (done, failed_blocks)
    }

    /// Runs one planned tier move and reports its outcome (and the tier
    /// changes it made). A demotion's outcome comes when its write lands
    /// (see [`Registered::poll_nvme`]).
    fn apply_move(&self, kind: MoveKind, key: BlockKey) {
        let skipped = |why: String| self.report.lock().moved(kind, key, Outcome::Skipped(why));
        match kind {
            MoveKind::Demote => {
                let e = self.index.lock().get(&key);
                match e {
                    Some(e) => self.demote(key, e.session, e.seq),
                    None => {
                        let mut r = self.report.lock();
                        r.moved(
                            kind,
                            key,
                            Outcome::Skipped("not parked on this rank".into()),
                        );
                        r.tier(TierChange::Lost, key);
                    }
                }
            }
            MoveKind::EvictHost => {
                let mut idx = self.index.lock();
                let e = idx.get(&key);
                let (slot, change) = match e.map(|e| (e.state, e.pins)) {
                    Some((BlockState::HostAndNvme, _)) => match idx.release_host(&key) {
                        Ok(s) => (s, TierChange::LeftHost),
                        Err(err) => return skipped(err.message().to_string()),
                    },
                    Some((BlockState::Host, _)) => match idx.remove(&key) {
                        Ok(Some(s)) => (s, TierChange::Lost),
                        Ok(None) => unreachable!("a Host block holds a slot"),
                        Err(err) => return skipped(err.message().to_string()),
                    },
                    Some((BlockState::Nvme, _)) => {
                        drop(idx);
                        let mut r = self.report.lock();
                        r.moved(kind, key, Outcome::Done);
                        r.tier(TierChange::LeftHost, key);
                        return;
                    }
                    Some((state, _)) => return skipped(format!("block in state {state:?}")),
                    None => {
                        drop(idx);
                        let mut r = self.report.lock();
                        r.moved(kind, key, Outcome::Done);
                        r.tier(TierChange::Lost, key);
                        return;
                    }
                };
                drop(idx);
                let freed = self.free_slot(slot);
                let mut r = self.report.lock();
                r.tier(change, key);
                r.moved(
                    kind,
                    key,
                    match freed {
                        Ok(()) => Outcome::Done,
                        Err(e) => Outcome::Failed(format!("free host slot: {}", e.message())),
                    },
                );
            }
            MoveKind::Promote => match self.pin_for_load(&key) {
                Ok(_slot) => {
                    let _ = self.index.lock().unpin(&key);
                    let mut r = self.report.lock();
                    // already host-readable: say so (pin_for_load reports
                    // only a read from NVMe)
                    r.tier(TierChange::OnHost, key);
                    r.moved(kind, key, Outcome::Done);
                }
                Err(e) => {
                    let outcome = match e.kind() {
                        ErrorKind::NoSpace | ErrorKind::Busy | ErrorKind::NotFound => {
                            Outcome::Skipped(e.message().to_string())
                        }
                        _ => Outcome::Failed(e.message().to_string()),
                    };
                    self.report.lock().moved(kind, key, outcome);
                }
            },
            MoveKind::Drop => {
                let removed = self.index.lock().remove(&key);
                match removed {
                    Ok(slot) => {
                        if let Some(s) = slot {
                            let _ = self.free_slot(s);
                        }
                        if let Some(n) = &self.nvme {
                            n.remove(&key);
                        }
                        let mut r = self.report.lock();
                        r.tier(TierChange::Lost, key);
                        r.moved(kind, key, Outcome::Done);
                    }
                    Err(e) if e.kind() == ErrorKind::NotFound => {
                        let mut r = self.report.lock();
                        r.tier(TierChange::Lost, key);
                        r.moved(kind, key, Outcome::Done);
                    }
                    Err(e) => skipped(e.message().to_string()),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_chunks_hold_whole_slots() {
        for slot in [4096usize, 640 << 10, 2 << 20, 3 << 20, 4 << 20, 2 << 30] {
            let c = pin_chunk(slot);
            assert_eq!(c % slot, 0, "slot {slot}");
            assert!(c >= slot);
            assert!(c <= PIN_CHUNK_BYTES.max(slot), "slot {slot}: chunk {c}");
            assert!(
                c + slot > PIN_CHUNK_BYTES || c == slot,
                "slot {slot}: chunk {c} too small"
            );
        }
    }
}
