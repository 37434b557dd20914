//! The block index and the state machine of a parked block.
//!
//! [`BlockIndex`] maps a [`BlockKey`] to a [`BlockEntry`]: which session the
//! block belongs to and where in its chain, which tiers hold it, what is in
//! flight, and how many loads are reading it. Every change is a named
//! transition that checks the current state and returns an error naming the
//! illegal transition instead of panicking; a refused transition changes
//! nothing.
//!
//! The index is plain data (`&mut self` methods, no locks, no clock reads;
//! time is an argument): its owner wraps it in a lock. It never frees a slot
//! itself — whenever a transition releases a host slot it returns the
//! [`SlotId`] and the caller frees it in the [`crate::tier::host::HostArena`],
//! exactly once.
//!
//! # States
//!
//! | state          | host slot | on NVMe | in flight                       | may be pinned |
//! |----------------|-----------|---------|---------------------------------|---------------|
//! | `Saving`       | yes       | no      | gather GPU → host slot          | no            |
//! | `Host`         | yes       | no      | —                               | yes           |
//! | `Demoting`     | yes       | no      | write host slot → NVMe          | yes           |
//! | `HostAndNvme`  | yes       | yes     | —                               | yes           |
//! | `Nvme`         | no        | yes     | —                               | no            |
//! | `Promoting`    | yes       | yes     | read NVMe → host slot           | no            |
//!
//! ```text
//!  (absent)
//!     │ begin_save
//!     ▼
//!   Saving ───── finish_save(!ok): slot returned ─────▶ (absent)
//!     │ finish_save(ok)
//!     ▼
//!    Host ◀─────────────────── forget_nvme ──────────────────┐
//!     │  ▲                                                   │
//!     │  └── finish_demote(!ok) ──┐                          │
//!     │ begin_demote              │                          │
//!     ▼                           │                          │
//!  Demoting ──────────────────────┘                          │
//!     │ finish_demote(ok)                                    │
//!     ▼                                                      │
//!  HostAndNvme ──────────────────────────────────────────────┘
//!     │  ▲
//!     │  └───────── finish_promote(ok) ─────────┐
//!     │ release_host: slot returned             │
//!     ▼                                         │
//!    Nvme ───────── begin_promote ─────────▶ Promoting
//!     ▲  ▲                                      │
//!     │  └─ finish_promote(!ok): slot returned ─┘
//!     │
//!     │ insert_nvme
//!  (absent)
//!
//!  remove: Host | HostAndNvme | Nvme ──▶ (absent), its host slot (if any)
//!          returned; refused while pinned or in flight
//!  insert_host(slot): (absent) ──▶ Host (recovery from a reopened host
//!          arena; a block also found on NVMe goes Nvme → Promoting →
//!          HostAndNvme with begin_promote + finish_promote(ok) instead)
//! ```
//!
//! # Transitions
//!
//! | operation                | from                           | to            | host slot                 |
//! |--------------------------|--------------------------------|---------------|---------------------------|
//! | `begin_save(slot)`       | absent                         | `Saving`      | takes `slot`              |
//! | `finish_save(true)`      | `Saving`                       | `Host`        | kept                      |
//! | `finish_save(false)`     | `Saving`                       | absent        | returned to the caller    |
//! | `begin_demote`           | `Host`                         | `Demoting`    | kept (read by the write)  |
//! | `finish_demote(true)`    | `Demoting`                     | `HostAndNvme` | kept                      |
//! | `finish_demote(false)`   | `Demoting`                     | `Host`        | kept                      |
//! | `release_host`           | `HostAndNvme`, unpinned        | `Nvme`        | returned to the caller    |
//! | `begin_promote(slot)`    | `Nvme`                         | `Promoting`   | takes `slot`              |
//! | `finish_promote(true)`   | `Promoting`                    | `HostAndNvme` | kept                      |
//! | `finish_promote(false)`  | `Promoting`                    | `Nvme`        | returned to the caller    |
//! | `forget_nvme`            | `HostAndNvme`                  | `Host`        | kept                      |
//! | `insert_nvme`            | absent                         | `Nvme`        | —                         |
//! | `insert_host(slot)`      | absent                         | `Host`        | takes `slot`              |
//! | `remove`                 | `Host`, `HostAndNvme`, `Nvme`; unpinned | absent | returned to the caller |
//! | `pin` / `unpin`          | `Host`, `Demoting`, `HostAndNvme` | same       | kept                      |
//!
//! # Pins
//!
//! A block being loaded host → GPU is **pinned** (a count: several loads may
//! read one block). While pinned its host slot is never released, freed or
//! overwritten and the block is never removed; `begin_demote` and
//! `forget_nvme` stay legal because they do not touch the host copy. Only
//! states with a complete host copy can be pinned.
//!
//! # Errors
//!
//! A refused transition changes nothing and says which transition from which
//! state was refused:
//!
//! - [`ErrorKind::Busy`]: the operation could become legal later — the block
//!   has a transfer in flight, or is pinned. Retry after it completes.
//! - [`ErrorKind::InvalidArgument`]: never legal from this state (a
//!   `finish_*` without its `begin_*`, demoting a block already on NVMe,
//!   pinning a block without a host copy, a slot already held by another
//!   block, unpinning an unpinned block).
//! - [`ErrorKind::NotFound`]: the key is not in the index.
//!
//! # Invariants
//!
//! - `entry.host.is_some()` exactly in `Saving`, `Host`, `Demoting`,
//!   `HostAndNvme`, `Promoting`; `entry.on_nvme` exactly in `HostAndNvme`,
//!   `Nvme`, `Promoting`.
//! - No two entries hold the same host slot.
//! - `entry.pins > 0` only in `Host`, `Demoting`, `HostAndNvme`.
//! - The per-state counts equal the number of entries in each state.

use crate::block::BlockKey;
use crate::error::{Error, ErrorKind, Result};
pub use crate::tier::host::SlotId;
use std::collections::HashMap;
use std::fmt;

/// Where a block is and what is in flight for it. See the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BlockState {
    /// Gather GPU → host slot in flight.
    Saving,
    /// Complete in a host slot only.
    Host,
    /// Host copy complete; NVMe write in flight.
    Demoting,
    /// Complete in a host slot and on NVMe.
    HostAndNvme,
    /// On NVMe only.
    Nvme,
    /// NVMe read into a host slot in flight.
    Promoting,
}

impl BlockState {
    /// Every state, in declaration order (the order of [`StateCounts`]).
    pub const ALL: [BlockState; 6] = [
        BlockState::Saving,
        BlockState::Host,
        BlockState::Demoting,
        BlockState::HostAndNvme,
        BlockState::Nvme,
        BlockState::Promoting,
    ];

    /// A transfer is in flight.
    pub fn in_flight(self) -> bool {
        matches!(
            self,
            BlockState::Saving | BlockState::Demoting | BlockState::Promoting
        )
    }

    /// The host slot holds a complete copy (a load may read it).
    pub fn host_readable(self) -> bool {
        matches!(
            self,
            BlockState::Host | BlockState::Demoting | BlockState::HostAndNvme
        )
    }

    fn idx(self) -> usize {
        self as usize
    }
}

impl fmt::Display for BlockState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// One indexed block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockEntry {
    /// Session the block belongs to.
    pub session: u64,
    /// Position in the session's chain of blocks (0 = first).
    pub seq: u32,
    /// Host slot holding (or receiving) the block.
    pub host: Option<SlotId>,
    /// A complete copy is on NVMe.
    pub on_nvme: bool,
    /// State machine position.
    pub state: BlockState,
    /// Loads currently reading the host copy.
    pub pins: u32,
    /// Time of the last access, in the caller's clock.
    pub last_access: u64,
}

/// Number of entries per state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct StateCounts {
    /// Entries in `Saving`.
    pub saving: usize,
    /// Entries in `Host`.
    pub host: usize,
    /// Entries in `Demoting`.
    pub demoting: usize,
    /// Entries in `HostAndNvme`.
    pub host_and_nvme: usize,
    /// Entries in `Nvme`.
    pub nvme: usize,
    /// Entries in `Promoting`.
    pub promoting: usize,
}

impl StateCounts {
    /// Entries holding a host slot (every state but `Nvme`).
    pub fn host_slots(&self) -> usize {
        self.saving + self.host + self.demoting + self.host_and_nvme + self.promoting
    }
}

/// Block key → entry, with the state machine of the module docs.
#[derive(Debug, Default)]
pub struct BlockIndex {
    map: HashMap<BlockKey, BlockEntry>,
    slot_owner: HashMap<SlotId, BlockKey>,
    counts: [usize; 6],
}

fn refused(op: &str, key: &BlockKey, e: &BlockEntry, kind: ErrorKind, why: &str) -> Error {
    Error::new(
        kind,
        format!(
            "{op} of block {key:?}: illegal from {}{}{}{why}",
            e.state,
            if e.pins > 0 {
                format!(" (pinned {}×)", e.pins)
            } else {
                String::new()
            },
            if why.is_empty() { "" } else { ": " }
        ),
    )
}

fn absent(op: &str, key: &BlockKey) -> Error {
    Error::not_found(format!("{op} of block {key:?}: not in the index"))
}

/// Busy while in flight (it may finish), InvalidArgument otherwise.
fn settle_kind(e: &BlockEntry) -> ErrorKind {
    if e.state.in_flight() {
        ErrorKind::Busy
    } else {
        ErrorKind::InvalidArgument
    }
}

impl BlockIndex {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of indexed blocks.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the index is empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The entry of `key`.
    pub fn get(&self, key: &BlockKey) -> Option<BlockEntry> {
        self.map.get(key).copied()
    }

    /// Which block holds host slot `slot`, if any.
    pub fn slot_owner(&self, slot: SlotId) -> Option<BlockKey> {
        self.slot_owner.get(&slot).copied()
    }

    /// Every entry, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&BlockKey, &BlockEntry)> + '_ {
        self.map.iter()
    }

    /// Entries in `state`.
    pub fn count(&self, state: BlockState) -> usize {
        self.counts[state.idx()]
    }

    /// Entries per state.
    pub fn counts(&self) -> StateCounts {
        let c = &self.counts;
        StateCounts {
            saving: c[0],
            host: c[1],
            demoting: c[2],
            host_and_nvme: c[3],
            nvme: c[4],
            promoting: c[5],
        }
    }

    fn set_state(counts: &mut [usize; 6], e: &mut BlockEntry, to: BlockState) {
        counts[e.state.idx()] -= 1;
        counts[to.idx()] += 1;
        e.state = to;
    }

    fn check_new(&self, op: &str, key: &BlockKey, slot: Option<SlotId>) -> Result<()> {
        if let Some(e) = self.map.get(key) {
            return Err(refused(op, key, e, settle_kind(e), "already indexed"));
        }
        self.check_slot_free(op, key, slot)
    }

    fn check_slot_free(&self, op: &str, key: &BlockKey, slot: Option<SlotId>) -> Result<()> {
        if let Some(s) = slot {
            if let Some(owner) = self.slot_owner.get(&s) {
                return Err(Error::invalid(format!(
                    "{op} of block {key:?}: host slot {} already holds block {owner:?}",
                    s.0
                )));
            }
        }
        Ok(())
    }

    fn insert(&mut self, key: BlockKey, e: BlockEntry) {
        self.counts[e.state.idx()] += 1;
        if let Some(s) = e.host {
            self.slot_owner.insert(s, key);
        }
        self.map.insert(key, e);
    }

    /// Starts saving `key` (absent) into host `slot`: → `Saving`.
    pub fn begin_save(
        &mut self,
        key: BlockKey,
        session: u64,
        seq: u32,
        slot: SlotId,
        now: u64,
    ) -> Result<()> {
        self.insert_in_slot(
            "begin_save",
            BlockState::Saving,
            key,
            session,
            seq,
            slot,
            now,
        )
    }

    /// Adds an absent `key` holding host `slot` in `state`.
    #[allow(clippy::too_many_arguments)]
    fn insert_in_slot(
        &mut self,
        op: &str,
        state: BlockState,
        key: BlockKey,
        session: u64,
        seq: u32,
        slot: SlotId,
        now: u64,
    ) -> Result<()> {
        self.check_new(op, &key, Some(slot))?;
        self.insert(
            key,
            BlockEntry {
                session,
                seq,
                host: Some(slot),
                on_nvme: false,
                state,
                pins: 0,
                last_access: now,
            },
        );
        Ok(())
    }

    /// Indexes a block found on NVMe (recovery after a restart): → `Nvme`.
    pub fn insert_nvme(&mut self, key: BlockKey, session: u64, seq: u32, now: u64) -> Result<()> {
        self.check_new("insert_nvme", &key, None)?;
        self.insert(
            key,
            BlockEntry {
                session,
                seq,
                host: None,
                on_nvme: true,
                state: BlockState::Nvme,
                pins: 0,
                last_access: now,
            },
        );
        Ok(())
    }

    /// Indexes a block found in a reopened host arena's `slot` (recovery
    /// after a restart): → `Host`.
    pub fn insert_host(
        &mut self,
        key: BlockKey,
        session: u64,
        seq: u32,
        slot: SlotId,
        now: u64,
    ) -> Result<()> {
        self.insert_in_slot(
            "insert_host",
            BlockState::Host,
            key,
            session,
            seq,
            slot,
            now,
        )
    }

    /// Ends a save. `ok`: `Saving` → `Host`, returns `None`. Failed: the
    /// entry is removed and its slot returned for the caller to free.
    pub fn finish_save(&mut self, key: &BlockKey, ok: bool) -> Result<Option<SlotId>> {
        let e = self
            .map
            .get_mut(key)
            .ok_or_else(|| absent("finish_save", key))?;
        if e.state != BlockState::Saving {
            return Err(refused(
                "finish_save",
                key,
                e,
                ErrorKind::InvalidArgument,
                "no save in flight",
            ));
        }
        if ok {
            Self::set_state(&mut self.counts, e, BlockState::Host);
            return Ok(None);
        }
        let e = self.map.remove(key).expect("entry present");
        self.counts[e.state.idx()] -= 1;
        let slot = e.host.expect("Saving holds a slot");
        self.slot_owner.remove(&slot);
        Ok(Some(slot))
    }

    /// Starts writing the host copy to NVMe: `Host` → `Demoting` (pinned
    /// blocks too: the write only reads the slot).
    pub fn begin_demote(&mut self, key: &BlockKey) -> Result<()> {
        let e = self
            .map
            .get_mut(key)
            .ok_or_else(|| absent("begin_demote", key))?;
        match e.state {
            BlockState::Host => {
                Self::set_state(&mut self.counts, e, BlockState::Demoting);
                Ok(())
            }
            BlockState::HostAndNvme | BlockState::Nvme => Err(refused(
                "begin_demote",
                key,
                e,
                ErrorKind::InvalidArgument,
                "already on NVMe",
            )),
            _ => Err(refused(
                "begin_demote",
                key,
                e,
                ErrorKind::Busy,
                "transfer in flight",
            )),
        }
    }

    /// Ends an NVMe write: `Demoting` → `HostAndNvme` (ok) or back to `Host`.
    pub fn finish_demote(&mut self, key: &BlockKey, ok: bool) -> Result<()> {
        let e = self
            .map
            .get_mut(key)
            .ok_or_else(|| absent("finish_demote", key))?;
        if e.state != BlockState::Demoting {
            return Err(refused(
                "finish_demote",
                key,
                e,
                ErrorKind::InvalidArgument,
                "no NVMe write in flight",
            ));
        }
        if ok {
            e.on_nvme = true;
            Self::set_state(&mut self.counts, e, BlockState::HostAndNvme);
        } else {
            Self::set_state(&mut self.counts, e, BlockState::Host);
        }
        Ok(())
    }

    /// Drops the host copy of a block that is also on NVMe:
    /// `HostAndNvme` (unpinned) → `Nvme`; returns the slot to free.
    pub fn release_host(&mut self, key: &BlockKey) -> Result<SlotId> {
        let e = self
            .map
            .get_mut(key)
            .ok_or_else(|| absent("release_host", key))?;
        match e.state {
            BlockState::HostAndNvme if e.pins == 0 => {}
            BlockState::HostAndNvme => {
                return Err(refused(
                    "release_host",
                    key,
                    e,
                    ErrorKind::Busy,
                    "being loaded",
                ))
            }
            BlockState::Host => {
                return Err(refused(
                    "release_host",
                    key,
                    e,
                    ErrorKind::InvalidArgument,
                    "not on NVMe: demote it first",
                ))
            }
            BlockState::Nvme => {
                return Err(refused(
                    "release_host",
                    key,
                    e,
                    ErrorKind::InvalidArgument,
                    "no host copy",
                ))
            }
            _ => {
                return Err(refused(
                    "release_host",
                    key,
                    e,
                    ErrorKind::Busy,
                    "transfer in flight",
                ))
            }
        }
        let slot = e.host.take().expect("HostAndNvme holds a slot");
        Self::set_state(&mut self.counts, e, BlockState::Nvme);
        self.slot_owner.remove(&slot);
        Ok(slot)
    }

    /// Starts reading a block from NVMe into host `slot`: `Nvme` → `Promoting`.
    pub fn begin_promote(&mut self, key: &BlockKey, slot: SlotId, now: u64) -> Result<()> {
        let e = self
            .map
            .get(key)
            .ok_or_else(|| absent("begin_promote", key))?;
        match e.state {
            BlockState::Nvme => {}
            BlockState::Host | BlockState::HostAndNvme => {
                return Err(refused(
                    "begin_promote",
                    key,
                    e,
                    ErrorKind::InvalidArgument,
                    "already has a host copy",
                ))
            }
            _ => {
                return Err(refused(
                    "begin_promote",
                    key,
                    e,
                    ErrorKind::Busy,
                    "transfer in flight",
                ))
            }
        }
        self.check_slot_free("begin_promote", key, Some(slot))?;
        let e = self.map.get_mut(key).expect("entry present");
        e.host = Some(slot);
        e.last_access = e.last_access.max(now);
        Self::set_state(&mut self.counts, e, BlockState::Promoting);
        self.slot_owner.insert(slot, *key);
        Ok(())
    }

    /// Ends an NVMe read: `Promoting` → `HostAndNvme` (ok, returns `None`) or
    /// back to `Nvme`, returning the slot to free.
    pub fn finish_promote(&mut self, key: &BlockKey, ok: bool) -> Result<Option<SlotId>> {
        let e = self
            .map
            .get_mut(key)
            .ok_or_else(|| absent("finish_promote", key))?;
        if e.state != BlockState::Promoting {
            return Err(refused(
                "finish_promote",
                key,
                e,
                ErrorKind::InvalidArgument,
                "no NVMe read in flight",
            ));
        }
        if ok {
            Self::set_state(&mut self.counts, e, BlockState::HostAndNvme);
            return Ok(None);
        }
        let slot = e.host.take().expect("Promoting holds a slot");
        Self::set_state(&mut self.counts, e, BlockState::Nvme);
        self.slot_owner.remove(&slot);
        Ok(Some(slot))
    }

    /// The NVMe copy is gone (garbage-collected, found corrupt):
    /// `HostAndNvme` → `Host`. A block only on NVMe is [`BlockIndex::remove`]d.
    pub fn forget_nvme(&mut self, key: &BlockKey) -> Result<()> {
        let e = self
            .map
            .get_mut(key)
            .ok_or_else(|| absent("forget_nvme", key))?;
        if e.state != BlockState::HostAndNvme {
            return Err(refused(
                "forget_nvme",
                key,
                e,
                settle_kind(e),
                "only a block in host memory and on NVMe",
            ));
        }
        e.on_nvme = false;
        Self::set_state(&mut self.counts, e, BlockState::Host);
        Ok(())
    }

    /// Starts a load host → GPU: one more pin. Legal with a complete host
    /// copy (`Host`, `Demoting`, `HostAndNvme`); stamps `now` as the last access.
    pub fn pin(&mut self, key: &BlockKey, now: u64) -> Result<()> {
        let e = self.map.get_mut(key).ok_or_else(|| absent("pin", key))?;
        if !e.state.host_readable() {
            let (kind, why) = if e.state.in_flight() {
                (ErrorKind::Busy, "host copy not complete yet")
            } else {
                (ErrorKind::InvalidArgument, "no host copy: promote it first")
            };
            return Err(refused("pin", key, e, kind, why));
        }
        e.pins = e
            .pins
            .checked_add(1)
            .ok_or_else(|| refused("pin", key, e, ErrorKind::Busy, "pin count overflow"))?;
        e.last_access = e.last_access.max(now);
        Ok(())
    }

    /// Ends a load: one pin less.
    pub fn unpin(&mut self, key: &BlockKey) -> Result<()> {
        let e = self.map.get_mut(key).ok_or_else(|| absent("unpin", key))?;
        if e.pins == 0 {
            return Err(refused(
                "unpin",
                key,
                e,
                ErrorKind::InvalidArgument,
                "not pinned",
            ));
        }
        e.pins -= 1;
        Ok(())
    }

    /// Records an access at `now` (time never goes backwards per block).
    pub fn touch(&mut self, key: &BlockKey, now: u64) -> Result<()> {
        let e = self.map.get_mut(key).ok_or_else(|| absent("touch", key))?;
        e.last_access = e.last_access.max(now);
        Ok(())
    }

    /// Removes a settled, unpinned block (`Host`, `HostAndNvme`, `Nvme`),
    /// returning its host slot, if any, to free. The caller also drops the
    /// NVMe record when the entry was on NVMe (see [`BlockIndex::get`]).
    pub fn remove(&mut self, key: &BlockKey) -> Result<Option<SlotId>> {
        let e = self.map.get(key).ok_or_else(|| absent("remove", key))?;
        if e.state.in_flight() {
            return Err(refused(
                "remove",
                key,
                e,
                ErrorKind::Busy,
                "transfer in flight",
            ));
        }
        if e.pins > 0 {
            return Err(refused("remove", key, e, ErrorKind::Busy, "being loaded"));
        }
        let e = self.map.remove(key).expect("entry present");
        self.counts[e.state.idx()] -= 1;
        if let Some(s) = e.host {
            self.slot_owner.remove(&s);
        }
        Ok(e.host)
    }

    /// Up to `n` blocks whose host copy may be given up, least recently
    /// used first: unpinned entries in `Host` (needs a demote or a drop) or
    /// `HostAndNvme` (just [`BlockIndex::release_host`]). Age is
    /// `now - last_access` (accesses stamped after `now` count as age 0);
    /// among equal ages `HostAndNvme` comes first (cheaper to release), then
    /// later blocks of a chain, then by key, so the order is deterministic.
    pub fn evictable_host_victims(&self, n: usize, now: u64) -> Vec<BlockKey> {
        if n == 0 {
            return Vec::new();
        }
        type Rank = (
            std::cmp::Reverse<u64>,
            bool,
            std::cmp::Reverse<u32>,
            BlockKey,
        );
        let rank = |k: &BlockKey, e: &BlockEntry| -> Rank {
            (
                std::cmp::Reverse(now.saturating_sub(e.last_access)),
                e.state != BlockState::HostAndNvme,
                std::cmp::Reverse(e.seq),
                *k,
            )
        };
        let mut c: Vec<Rank> = self
            .map
            .iter()
            .filter(|(_, e)| {
                e.pins == 0 && matches!(e.state, BlockState::Host | BlockState::HostAndNvme)
            })
            .map(|(k, e)| rank(k, e))
            .collect();
        if c.len() > n {
            c.select_nth_unstable(n - 1);
            c.truncate(n);
        }
        c.sort_unstable();
        c.into_iter().map(|r| r.3).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(i: u8) -> BlockKey {
        BlockKey([i; 32])
    }

    #[test]
    fn full_round_trip_host_nvme_host() {
        let mut ix = BlockIndex::new();
        ix.begin_save(k(1), 7, 0, SlotId(3), 10).unwrap();
        assert_eq!(ix.slot_owner(SlotId(3)), Some(k(1)));
        assert_eq!(ix.finish_save(&k(1), true).unwrap(), None);
        ix.begin_demote(&k(1)).unwrap();
        ix.finish_demote(&k(1), true).unwrap();
        assert_eq!(ix.release_host(&k(1)).unwrap(), SlotId(3));
        let e = ix.get(&k(1)).unwrap();
        assert_eq!((e.state, e.host, e.on_nvme), (BlockState::Nvme, None, true));
        assert_eq!(ix.slot_owner(SlotId(3)), None);
        ix.begin_promote(&k(1), SlotId(5), 20).unwrap();
        assert_eq!(ix.finish_promote(&k(1), true).unwrap(), None);
        let e = ix.get(&k(1)).unwrap();
        assert_eq!(
            (e.state, e.host, e.last_access),
            (BlockState::HostAndNvme, Some(SlotId(5)), 20)
        );
        assert_eq!(ix.remove(&k(1)).unwrap(), Some(SlotId(5)));
        assert!(ix.is_empty());
        assert_eq!(ix.counts(), StateCounts::default());
    }

    #[test]
    fn failed_transfers_return_slots_once() {
        let mut ix = BlockIndex::new();
        ix.begin_save(k(1), 1, 0, SlotId(0), 0).unwrap();
        assert_eq!(ix.finish_save(&k(1), false).unwrap(), Some(SlotId(0)));
        assert!(ix.get(&k(1)).is_none());
        assert_eq!(
            ix.finish_save(&k(1), false).unwrap_err().kind(),
            ErrorKind::NotFound
        );
        ix.insert_nvme(k(2), 1, 1, 0).unwrap();
        ix.begin_promote(&k(2), SlotId(0), 1).unwrap();
        assert_eq!(ix.finish_promote(&k(2), false).unwrap(), Some(SlotId(0)));
        let e = ix.finish_promote(&k(2), false).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        assert!(
            e.message().contains("finish_promote") && e.message().contains("Nvme"),
            "{e}"
        );
        assert_eq!(ix.get(&k(2)).unwrap().host, None);
    }

    #[test]
    fn pins_hold_the_slot() {
        let mut ix = BlockIndex::new();
        ix.begin_save(k(1), 1, 0, SlotId(0), 0).unwrap();
        assert_eq!(ix.pin(&k(1), 1).unwrap_err().kind(), ErrorKind::Busy);
        ix.finish_save(&k(1), true).unwrap();
        ix.pin(&k(1), 1).unwrap();
        ix.pin(&k(1), 2).unwrap();
        ix.begin_demote(&k(1)).unwrap();
        ix.finish_demote(&k(1), true).unwrap();
        let e = ix.release_host(&k(1)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Busy);
        assert!(e.message().contains("pinned 2×"), "{e}");
        assert_eq!(ix.remove(&k(1)).unwrap_err().kind(), ErrorKind::Busy);
        assert!(ix.evictable_host_victims(5, 10).is_empty());
        ix.unpin(&k(1)).unwrap();
        ix.unpin(&k(1)).unwrap();
        assert_eq!(
            ix.unpin(&k(1)).unwrap_err().kind(),
            ErrorKind::InvalidArgument
        );
        assert_eq!(ix.release_host(&k(1)).unwrap(), SlotId(0));
        assert_eq!(
            ix.pin(&k(1), 3).unwrap_err().kind(),
            ErrorKind::InvalidArgument
        );
    }

    #[test]
    fn a_slot_cannot_back_two_blocks() {
        let mut ix = BlockIndex::new();
        ix.begin_save(k(1), 1, 0, SlotId(4), 0).unwrap();
        let e = ix.begin_save(k(2), 1, 1, SlotId(4), 0).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        assert!(ix.get(&k(2)).is_none());
        ix.insert_nvme(k(3), 1, 2, 0).unwrap();
        assert!(ix.begin_promote(&k(3), SlotId(4), 0).is_err());
        assert_eq!(ix.get(&k(3)).unwrap().state, BlockState::Nvme);
        assert_eq!(
            ix.begin_save(k(1), 1, 0, SlotId(5), 0).unwrap_err().kind(),
            ErrorKind::Busy
        );
    }

    #[test]
    fn victims_are_lru_then_cheapest() {
        let mut ix = BlockIndex::new();
        for (i, t) in [(1u8, 50u64), (2, 10), (3, 30), (4, 10)] {
            ix.begin_save(k(i), 1, i as u32, SlotId(i as u32), t)
                .unwrap();
            ix.finish_save(&k(i), true).unwrap();
        }
        ix.begin_demote(&k(4)).unwrap();
        ix.finish_demote(&k(4), true).unwrap();
        ix.pin(&k(3), 5).unwrap(); // pinned: never a victim, and the stamp only moves forward
        assert_eq!(ix.get(&k(3)).unwrap().last_access, 30);
        assert_eq!(ix.evictable_host_victims(2, 100), vec![k(4), k(2)]);
        assert_eq!(ix.evictable_host_victims(10, 100), vec![k(4), k(2), k(1)]);
        assert_eq!(ix.evictable_host_victims(0, 100), vec![]);
        let c = ix.counts();
        assert_eq!((c.host, c.host_and_nvme, c.host_slots()), (3, 1, 4));
    }
}
