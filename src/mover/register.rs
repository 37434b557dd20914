//! Registration of the KV caches: the host arena (pinned on a CUDA
//! device), the NVMe store and the slot table of a file-backed arena,
//! the blocks they still hold (recovery) and their model labels.

use super::jobs::{JobThread, LoaderKind, SaverKind};
use super::load::spawn_layer_thread;
use super::lock::{Level, Ordered};
use super::moves::spawn_writer;
use super::{Mover, MoverMetrics, Registered};
use crate::block::{BlockKey, Geometry, LayerView};
use crate::config::Fsync;
use crate::copy::KvCaches;
use crate::error::{Error, Result};
use crate::index::{BlockIndex, BlockState};
use crate::plan::Report;
use crate::tier::host::{HostArena, SlotId};
use crate::tier::nvme::{FsyncPolicy, NvmeConfig, NvmeStore};
use crate::tier::slots::{table_path, SlotTable};
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

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

/// Host arena pinning granularity on CUDA machines.
const PIN_CHUNK_BYTES: usize = 1 << 30;

/// The pinning chunk for slots of `slot_bytes`: about [`PIN_CHUNK_BYTES`],
/// a whole number of slots (at least one), so a record never spans two
/// registrations (a DMA over such a range has no documented behaviour).
fn pin_chunk(slot_bytes: usize) -> usize {
    (PIN_CHUNK_BYTES / slot_bytes).max(1) * slot_bytes
}

impl Mover {
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
            Ordered::new(Level::Slots, t)
        });
        let reg = Arc::new(Registered {
            kv,
            geom,
            arena,
            index: Ordered::new(Level::Index, index),
            nvme,
            nvme_done,
            writes: Ordered::new(Level::Writes, HashMap::new()),
            deferred: Ordered::new(Level::Deferred, std::collections::VecDeque::new()),
            report: Ordered::new(Level::Report, Report::default()),
            metrics,
            engine: self.engine.clone(),
            clock: AtomicU64::new(1),
            nvme_paused_until: Ordered::new(Level::PausedUntil, None),
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

impl Registered {
    pub(super) fn now(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed)
    }

    /// Frees a host slot; with a slot table its entry is cleared first, so
    /// the table never names a slot whose bytes may change.
    pub(super) fn free_slot(&self, slot: SlotId) -> Result<()> {
        if let Some(t) = &self.slots {
            t.lock().clear(slot.0);
        }
        self.arena.free(slot)
    }

    /// Records in the slot table (if any) that `slot` now holds `key`
    /// (its bytes complete).
    pub(super) fn record_slot(&self, slot: SlotId, key: &BlockKey, session: u64, seq: u32) {
        let Some(t) = &self.slots else {
            return;
        };
        if let Ok(g) = self.arena.slot(slot) {
            let crc = crc32c::crc32c(&g[..self.geom.block_bytes()]);
            drop(g);
            t.lock().set(slot.0, key, session, seq, crc);
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
