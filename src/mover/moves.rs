//! Tier moves: demotion (and write-behind) to NVMe, eviction from the
//! host tier, promotion, drops; NVMe completions, deferred demotions and
//! the writer thread that applies them while vLLM does not step.

use super::Registered;
use crate::block::BlockKey;
use crate::error::{Error, ErrorKind, Result};
use crate::index::BlockState;
use crate::plan::{MoveKind, Outcome, TierChange};
use crate::tier::host::SlotId;
use crate::tier::nvme::OpKind;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The thread that keeps write-behind and demotions going while vLLM does
/// not step (an idle engine calls no hook): it applies NVMe completions and
/// submits deferred demotions, so a block sent to NVMe is durable there
/// within the disk's write time whether or not the engine steps.
pub(super) struct Writer {
    pub(super) stop: Arc<std::sync::atomic::AtomicBool>,
    pub(super) thread: Option<JoinHandle<()>>,
}

/// How long the writer waits for an NVMe completion before it looks again.
const WRITER_POLL: Duration = Duration::from_millis(20);

/// NVMe writes the mover keeps in flight; must not exceed the store's
/// `queue_depth` (8) so that a submission never blocks.
const MAX_WRITES_IN_FLIGHT: usize = 8;

/// Eviction candidates looked at per eviction (LRU order).
const EVICT_SCAN: usize = 32;

pub(super) fn spawn_writer(reg: Arc<Registered>) -> Result<Writer> {
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

impl Registered {
    /// Frees host slots until one can be allocated. Never waits on the
    /// disk: it evicts a block that has an NVMe copy if it can, else drops
    /// the least recently used host-only block; with everything pinned or in
    /// flight it fails with NoSpace (the caller reports the block unsaved).
    ///
    /// With `keep_queued`, host-only blocks are not dropped while NVMe
    /// writes are in flight or queued (they may be the very blocks on their
    /// way to the disk): the caller waits for the disk instead.
    pub(super) fn alloc_slot(&self, keep_queued: bool) -> Result<SlotId> {
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

    /// True while NVMe writes are in flight or queued.
    pub(super) fn nvme_busy(&self) -> bool {
        !self.writes.lock().is_empty() || !self.deferred.lock().is_empty()
    }

    /// Starts an NVMe write of a host block: a demotion or a save's
    /// write-behind, both asked for by the planner. Its outcome is reported
    /// as a [`MoveKind::Demote`]: done when the write lands (with the tier
    /// change), skipped or failed with the reason.
    pub(super) fn demote(&self, key: BlockKey, session: u64, seq: u32) {
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
        // Read the deadline out first: a guard in an `if let` scrutinee
        // lives through the body, which takes `report`.
        let paused_until = *self.nvme_paused_until.lock();
        if let Some(until) = paused_until {
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
    pub(super) fn poll_nvme(&self, wait: Duration) -> bool {
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

    /// Runs one planned tier move and reports its outcome (and the tier
    /// changes it made). A demotion's outcome comes when its write lands
    /// (see [`Registered::poll_nvme`]).
    pub(super) fn apply_move(&self, kind: MoveKind, key: BlockKey) {
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
