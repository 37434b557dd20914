//! Saves: a finished request's blocks gathered from vLLM into host slots,
//! streamed through a full host tier to NVMe, written behind.

use super::Registered;
use crate::block::BlockKey;
use crate::copy::GatherOp;
use crate::index::BlockState;
use crate::plan::{SaveDone, SaveReq, TierChange};
use crate::tier::host::SlotId;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// How long one save may wait, in total, for NVMe writes to make room in a
/// full host tier (a turn larger than the tier streams through it to NVMe).
const SAVE_STREAM_WAIT: Duration = Duration::from_secs(60);

impl Registered {
    /// Parks a finished request's blocks in the host tier (and, with
    /// `to_nvme`, writes them behind to NVMe).
    ///
    /// A save larger than the free host tier streams through it: blocks are
    /// gathered in batches, each batch is queued for NVMe, and the next
    /// batch's slots come from blocks whose NVMe copy has landed (waiting
    /// for the disk, at most [`SAVE_STREAM_WAIT`] per save) rather than from
    /// dropping host-only blocks still queued for the disk.
    pub(super) fn save(&self, s: &SaveReq) -> SaveDone {
        let t0 = Instant::now();
        let mut done = SaveDone {
            req_id: s.req_id.clone(),
            ..Default::default()
        };
        let stream = s.to_nvme && self.nvme.is_some();
        let deadline = t0 + SAVE_STREAM_WAIT;
        let mut batch: Vec<(BlockKey, u32, SlotId, u32)> = Vec::with_capacity(s.blocks.len());
        let mut rehost: Vec<(BlockKey, u32, SlotId)> = Vec::new();
        for &(key, block, seq) in &s.blocks {
            let known = self.index.lock().get(&key).map(|e| e.state);
            if known == Some(BlockState::Nvme) {
                // On NVMe only, and vLLM holds it now: gather it into a host
                // slot (the planner asked for it on host; a promotion later
                // would read the disk). Anything in the way leaves it as it
                // was: parked on NVMe.
                if let Some(slot) = self.begin_rehost(&key, block) {
                    rehost.push((key, block, slot));
                    continue;
                }
            }
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
        self.finish_rehost(s, rehost, &mut done);
        self.count_save(done, t0)
    }

    /// Gathers vLLM's blocks into host slots, (vLLM block, slot) pairs, in
    /// one engine call; false when a slot or the gather failed.
    fn gather_into(&self, items: impl ExactSizeIterator<Item = (u32, SlotId)> + Clone) -> bool {
        let n = items.len();
        let mut guards = Vec::with_capacity(n);
        for (_, slot) in items.clone() {
            match self.arena.slot_mut(slot) {
                Ok(g) => guards.push(g),
                Err(_) => return false,
            }
        }
        let mut ops: Vec<GatherOp<'_>> = items
            .zip(guards.iter_mut())
            .map(|((block, _), g)| GatherOp {
                block,
                dst: &mut g[..self.geom.block_bytes()],
            })
            .collect();
        self.engine.gather(&self.kv, &mut ops).is_ok()
    }

    /// Takes a host slot for NVMe-only `key` to be gathered from vLLM's
    /// `block` (the index's promotion states: the slot fills, then the block
    /// is on host and NVMe); `None` when the block or a slot is not there.
    fn begin_rehost(&self, key: &BlockKey, block: u32) -> Option<SlotId> {
        self.kv.check_block(block).ok()?;
        let slot = self.alloc_slot(false).ok()?;
        if self
            .index
            .lock()
            .begin_promote(key, slot, self.now())
            .is_err()
        {
            let _ = self.free_slot(slot);
            return None;
        }
        Some(slot)
    }

    /// Gathers the re-hosted blocks and settles them: on host and NVMe, or
    /// (the gather failed) on NVMe only as before. Either way the block
    /// stays parked, so the save reports it ok.
    fn finish_rehost(&self, s: &SaveReq, todo: Vec<(BlockKey, u32, SlotId)>, done: &mut SaveDone) {
        if todo.is_empty() {
            return;
        }
        let ok = self.gather_into(todo.iter().map(|t| (t.1, t.2)));
        for (key, _, slot) in todo {
            let (settled, session, seq) = {
                let mut idx = self.index.lock();
                let (session, seq) = idx.get(&key).map_or((s.session, 0), |e| (e.session, e.seq));
                (idx.finish_promote(&key, ok), session, seq)
            };
            match settled {
                Ok(None) if ok => {
                    self.record_slot(slot, &key, session, seq);
                    let mut r = self.report.lock();
                    r.tier(TierChange::OnHost, key);
                    r.tier(TierChange::OnNvme, key);
                    drop(r);
                    self.metrics.rehosted_blocks.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Some(freed)) => {
                    let _ = self.free_slot(freed);
                    self.report.lock().tier(TierChange::OnNvme, key);
                }
                _ => {
                    // (free the slot only if no block owns it any more)
                    if self.index.lock().slot_owner(slot).is_none() {
                        let _ = self.free_slot(slot);
                    }
                    self.report.lock().tier(TierChange::OnNvme, key);
                }
            }
            done.ok.push(key);
            if s.to_nvme {
                // already on NVMe: the write-behind's outcome is Done
                self.demote(key, session, seq);
            }
        }
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
        let ok = self.gather_into(todo.iter().map(|t| (t.1, t.2)));
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
}
