//! Loads: blocks pinned in the host tier (read from NVMe if needed) and
//! scattered into vLLM, whole or layer by layer on the layer thread.

use super::Registered;
use crate::block::BlockKey;
use crate::copy::ScatterOp;
use crate::error::{Error, ErrorKind, Result};
use crate::index::BlockState;
use crate::plan::{LoadDone, LoadReq, TierChange};
use crate::tier::host::SlotId;
use crossbeam_channel::Sender;
use parking_lot::Mutex;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

/// Progress of one layer-wise scatter, shared with the layer thread.
#[derive(Default)]
pub(super) struct LayerProgress {
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

    pub(super) fn end(&self, error: Option<String>) {
        let mut st = self.st.lock();
        st.ended = true;
        st.error = error;
        self.cv.notify_all();
    }

    /// Blocks until layer `l` is in place; the scatter's error if it ended first.
    pub(super) fn wait_layer(&self, l: usize) -> Result<()> {
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
    pub(super) fn wait_end(&self) -> Option<String> {
        let mut st = self.st.lock();
        while !st.ended {
            self.cv.wait(&mut st);
        }
        st.error.clone()
    }
}

/// A job for the layer thread: scatter these pinned slots into these blocks.
pub(super) struct LayerJob {
    pub(super) reg: Arc<Registered>,
    pub(super) blocks: Vec<(u32, SlotId)>,
    pub(super) progress: Arc<LayerProgress>,
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

pub(super) struct LayerThread {
    pub(super) jobs: Option<Sender<LayerJob>>,
    pub(super) thread: Option<JoinHandle<()>>,
}

/// The step's sync loads while their layers are being scattered.
pub(super) struct Layered {
    pub(super) progress: Arc<LayerProgress>,
    /// Per load: its outcome so far and the vLLM block ids that failed.
    pub(super) loads: Vec<(LoadDone, Vec<u32>)>,
    /// Pinned blocks being scattered: (key, vLLM block, index into `loads`).
    pub(super) pinned: Vec<(BlockKey, u32, usize)>,
    /// Blocks asked for by the loads.
    pub(super) blocks: usize,
    pub(super) t0: Instant,
}

/// The thread that scatters sync loads layer by layer (one per mover).
pub(super) fn spawn_layer_thread() -> Result<LayerThread> {
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

impl Registered {
    /// Makes `key` readable in the host tier and pins it; returns its slot.
    pub(super) fn pin_for_load(&self, key: &BlockKey) -> Result<SlotId> {
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
    pub(super) fn pin_loads(
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
    pub(super) fn load(&self, l: &LoadReq) -> (LoadDone, Vec<u32>) {
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
}
