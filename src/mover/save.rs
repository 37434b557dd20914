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
}
