//! Plans (scheduler → workers) and reports (workers → scheduler).
//!
//! Both travel through vLLM as opaque bytes: Python never parses them. The
//! encoding is little-endian binary with a magic and a version byte, so a
//! worker of another kvpark version refuses a plan instead of misreading it:
//!
//! ```text
//! plan   = "KVPP" version:u8 step:u64 saves loads ops
//! report = "KVPR" version:u8 rank:u32 block_bytes:u64 saved loaded moved tiers
//! saved  = list of (req_id:string ok:keys failed:keys)
//! loaded = list of (req_id:string failed:keys)
//! moved  = list of (kind:u8 key outcome:u8 reason:string)   outcome: 0 done, 1 skipped, 2 failed
//! tiers  = list of (change:u8 key)   change: 1 on host, 2 left host, 3 on NVMe, 4 left NVMe, 5 lost
//! list   = count:u32 item*        string = len:u32 utf8        key = 32 bytes
//! flag   = u8, 0 or 1
//! ```
//!
//! Decoding is strict: a message decodes only if it is exactly the encoding
//! of what it decodes to (no trailing bytes, flags 0 or 1, known enum bytes,
//! a reason exactly on the moves that were not done), so anything else is a
//! Corrupt error rather than a silently different plan.
//!
//! A report is one rank's truth: the planner (scheduler side) changes where
//! it believes a block lives only from reports, and a block counts as present
//! in a tier only when every rank reported it there (see
//! [`crate::planner::blocks`]).

use crate::block::BlockKey;
use crate::error::{Error, Result};

const PLAN_MAGIC: &[u8; 4] = b"KVPP";
const REPORT_MAGIC: &[u8; 4] = b"KVPR";
/// Version 2: reports carry the rank, every planned move's outcome and the
/// rank's tier changes in the order they happened.
const VERSION: u8 = 2;

/// Park (gather) a finished request's new blocks into the host tier.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SaveReq {
    /// vLLM request id; reported back in `finished_sending`.
    pub req_id: String,
    /// Session the blocks belong to.
    pub session: u64,
    /// (key, vLLM block id, position in the session's chain).
    pub blocks: Vec<(BlockKey, u32, u32)>,
    /// Also write the blocks to NVMe behind the host copy (the policy's call).
    pub to_nvme: bool,
}

/// Load parked blocks into vLLM blocks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadReq {
    /// vLLM request id; async loads are reported in `finished_recving`.
    pub req_id: String,
    /// Synchronous: must be complete before the forward of this step.
    pub sync: bool,
    /// (key, destination vLLM block id), in chain order.
    pub blocks: Vec<(BlockKey, u32)>,
}

/// Tier moves decided by the planner's policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MoveKind {
    /// Write the block to NVMe (keep the host copy).
    Demote = 1,
    /// Release the host copy (the block stays on NVMe if it is there).
    EvictHost = 2,
    /// Read the block from NVMe into the host tier ahead of its use.
    Promote = 3,
    /// Forget the block in every tier.
    Drop = 4,
}

impl MoveKind {
    fn from_u8(b: u8) -> Result<Self> {
        Ok(match b {
            1 => MoveKind::Demote,
            2 => MoveKind::EvictHost,
            3 => MoveKind::Promote,
            4 => MoveKind::Drop,
            _ => return Err(Error::corrupt(format!("plan: unknown move kind {b}"))),
        })
    }
}

/// One step's plan for every worker.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Scheduler step counter (diagnostics).
    pub step: u64,
    /// Saves to run in this step's `wait_for_save`.
    pub saves: Vec<SaveReq>,
    /// Loads to start in this step's `start_load_kv`.
    pub loads: Vec<LoadReq>,
    /// Tier moves (background).
    pub moves: Vec<(MoveKind, BlockKey)>,
}

impl Plan {
    /// True when the plan asks nothing of the workers.
    pub fn is_empty(&self) -> bool {
        self.saves.is_empty() && self.loads.is_empty() && self.moves.is_empty()
    }
}

/// Outcome of one save request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SaveDone {
    /// The request id of the save.
    pub req_id: String,
    /// Blocks now in the host tier.
    pub ok: Vec<BlockKey>,
    /// Blocks that could not be parked (tier full, I/O error).
    pub failed: Vec<BlockKey>,
}

/// Outcome of one load request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadDone {
    /// The request id of the load.
    pub req_id: String,
    /// Keys that could not be loaded (missing, corrupt); their vLLM blocks are recomputed.
    pub failed: Vec<BlockKey>,
}

/// How a planned move ended on one rank.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The move took effect (the block is where the move put it).
    Done,
    /// Not attempted; the reason (e.g. the NVMe tier is full, the block is
    /// pinned by a load, the block is not parked on this rank).
    Skipped(String),
    /// Attempted and failed; the reason (e.g. an I/O error).
    Failed(String),
}

impl Outcome {
    /// True for [`Outcome::Done`].
    pub fn is_done(&self) -> bool {
        matches!(self, Outcome::Done)
    }
}

/// The outcome of one planned tier move on the reporting rank.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MoveDone {
    /// The move as planned.
    pub kind: MoveKind,
    /// The block.
    pub key: BlockKey,
    /// How it ended.
    pub outcome: Outcome,
}

/// A change of where a block lives on the reporting rank.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum TierChange {
    /// The block is now in the host tier (saved, promoted, read back for a load).
    OnHost = 1,
    /// The block left the host tier (evicted; it may remain on NVMe).
    LeftHost = 2,
    /// The block is now on NVMe (write-behind or demotion landed).
    OnNvme = 3,
    /// The block's NVMe record is gone (its host copy, if any, remains).
    LeftNvme = 4,
    /// The block is gone from every tier of the rank (dropped, corrupt,
    /// evicted without an NVMe copy, not found).
    Lost = 5,
}

impl TierChange {
    fn from_u8(b: u8) -> Result<Self> {
        Ok(match b {
            1 => TierChange::OnHost,
            2 => TierChange::LeftHost,
            3 => TierChange::OnNvme,
            4 => TierChange::LeftNvme,
            5 => TierChange::Lost,
            _ => return Err(Error::corrupt(format!("report: unknown tier change {b}"))),
        })
    }
}

/// One rank's news since its last report: finished saves and loads, the
/// outcome of every planned move, and every change of where a block lives
/// (including the ones the rank had to make itself, such as an eviction to
/// free a slot for a save), in the order they happened.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// The reporting worker's rank (0-based, below the planner's world size).
    pub rank: u32,
    /// Bytes of one parked block on this rank (0 until KV caches are registered).
    pub block_bytes: u64,
    /// Finished saves.
    pub saved: Vec<SaveDone>,
    /// Finished loads.
    pub loaded: Vec<LoadDone>,
    /// Outcomes of planned moves.
    pub moved: Vec<MoveDone>,
    /// Tier changes, oldest first.
    pub tiers: Vec<(TierChange, BlockKey)>,
}

impl Report {
    /// True when there is nothing to tell the scheduler.
    pub fn is_empty(&self) -> bool {
        self.saved.is_empty()
            && self.loaded.is_empty()
            && self.moved.is_empty()
            && self.tiers.is_empty()
    }

    /// The report of rank 0 of a worker that ran all of `plan` and
    /// succeeded everywhere: every save parked on host (and written to
    /// NVMe, one Demote outcome per block, when it asked for it), every load
    /// done, every move done with its tier change. For tests, benchmarks
    /// and models of the worker; a real worker reports what happened.
    pub fn all_done(plan: &Plan, block_bytes: u64) -> Report {
        let mut r = Report {
            block_bytes,
            ..Report::default()
        };
        for (kind, k) in &plan.moves {
            r.tier(
                match kind {
                    MoveKind::EvictHost => TierChange::LeftHost,
                    MoveKind::Promote => TierChange::OnHost,
                    MoveKind::Demote => TierChange::OnNvme,
                    MoveKind::Drop => TierChange::Lost,
                },
                *k,
            );
            r.moved(*kind, *k, Outcome::Done);
        }
        for s in &plan.saves {
            for b in &s.blocks {
                r.tier(TierChange::OnHost, b.0);
                if s.to_nvme {
                    r.tier(TierChange::OnNvme, b.0);
                    r.moved(MoveKind::Demote, b.0, Outcome::Done);
                }
            }
            r.saved.push(SaveDone {
                req_id: s.req_id.clone(),
                ok: s.blocks.iter().map(|b| b.0).collect(),
                failed: vec![],
            });
        }
        r.loaded = plan
            .loads
            .iter()
            .map(|l| LoadDone {
                req_id: l.req_id.clone(),
                failed: vec![],
            })
            .collect();
        r
    }

    /// Records a tier change.
    pub fn tier(&mut self, change: TierChange, key: BlockKey) {
        self.tiers.push((change, key));
    }

    /// Records a planned move's outcome.
    pub fn moved(&mut self, kind: MoveKind, key: BlockKey, outcome: Outcome) {
        self.moved.push(MoveDone { kind, key, outcome });
    }
}

struct W(Vec<u8>);

impl W {
    fn u8(&mut self, v: u8) {
        self.0.push(v)
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes())
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes())
    }
    fn len(&mut self, n: usize) {
        self.u32(u32::try_from(n).expect("list shorter than 4G"))
    }
    fn str(&mut self, s: &str) {
        self.len(s.len());
        self.0.extend_from_slice(s.as_bytes())
    }
    fn key(&mut self, k: &BlockKey) {
        self.0.extend_from_slice(&k.0)
    }
    fn keys(&mut self, ks: &[BlockKey]) {
        self.len(ks.len());
        ks.iter().for_each(|k| self.key(k));
    }
}

struct R<'a>(&'a [u8]);

impl R<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        if self.0.len() < n {
            return Err(Error::corrupt("plan/report: truncated"));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    /// A flag: 0 or 1, anything else is corrupt (so a decoded message
    /// re-encodes to the bytes it came from).
    fn flag(&mut self) -> Result<bool> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(Error::corrupt(format!(
                "plan/report: flag byte {b}, not 0 or 1"
            ))),
        }
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    /// A list length, bounded by what the remaining bytes could hold.
    fn len(&mut self, min_item: usize) -> Result<usize> {
        let n = self.u32()? as usize;
        if n.saturating_mul(min_item) > self.0.len() {
            return Err(Error::corrupt("plan/report: list longer than the buffer"));
        }
        Ok(n)
    }
    fn str(&mut self) -> Result<String> {
        let n = self.len(1)?;
        String::from_utf8(self.take(n)?.to_vec())
            .map_err(|_| Error::corrupt("plan/report: request id is not UTF-8"))
    }
    fn key(&mut self) -> Result<BlockKey> {
        Ok(BlockKey(self.take(32)?.try_into().unwrap()))
    }
    fn keys(&mut self) -> Result<Vec<BlockKey>> {
        let n = self.len(32)?;
        (0..n).map(|_| self.key()).collect()
    }
    fn header(&mut self, magic: &[u8; 4]) -> Result<()> {
        if self.take(4)? != magic {
            return Err(Error::corrupt(
                "plan/report: bad magic (not a kvpark message)",
            ));
        }
        let v = self.u8()?;
        if v != VERSION {
            return Err(Error::corrupt(format!(
                "plan/report: version {v}, this kvpark speaks {VERSION}"
            )));
        }
        Ok(())
    }
    fn end(&self) -> Result<()> {
        if !self.0.is_empty() {
            return Err(Error::corrupt("plan/report: trailing bytes"));
        }
        Ok(())
    }
}

impl Plan {
    /// Encodes the plan.
    pub fn encode(&self) -> Vec<u8> {
        // the size up front: a resumed session's load is tens of KiB
        let cap = 64
            + self
                .saves
                .iter()
                .map(|s| 32 + s.req_id.len() + s.blocks.len() * 40)
                .sum::<usize>()
            + self
                .loads
                .iter()
                .map(|l| 32 + l.req_id.len() + l.blocks.len() * 36)
                .sum::<usize>()
            + self.moves.len() * 33;
        let mut w = W(Vec::with_capacity(cap));
        w.0.extend_from_slice(PLAN_MAGIC);
        w.u8(VERSION);
        w.u64(self.step);
        w.len(self.saves.len());
        for s in &self.saves {
            w.str(&s.req_id);
            w.u64(s.session);
            w.u8(s.to_nvme as u8);
            w.len(s.blocks.len());
            for (k, b, seq) in &s.blocks {
                w.key(k);
                w.u32(*b);
                w.u32(*seq);
            }
        }
        w.len(self.loads.len());
        for l in &self.loads {
            w.str(&l.req_id);
            w.u8(l.sync as u8);
            w.len(l.blocks.len());
            for (k, b) in &l.blocks {
                w.key(k);
                w.u32(*b);
            }
        }
        w.len(self.moves.len());
        for (m, k) in &self.moves {
            w.u8(*m as u8);
            w.key(k);
        }
        w.0
    }

    /// Decodes a plan; anything malformed is a Corrupt error.
    pub fn decode(buf: &[u8]) -> Result<Self> {
        let mut r = R(buf);
        r.header(PLAN_MAGIC)?;
        let step = r.u64()?;
        let n = r.len(17)?;
        let mut saves = Vec::with_capacity(n);
        for _ in 0..n {
            let req_id = r.str()?;
            let session = r.u64()?;
            let to_nvme = r.flag()?;
            let m = r.len(40)?;
            let mut blocks = Vec::with_capacity(m);
            for _ in 0..m {
                blocks.push((r.key()?, r.u32()?, r.u32()?));
            }
            saves.push(SaveReq {
                req_id,
                session,
                blocks,
                to_nvme,
            });
        }
        let n = r.len(9)?;
        let mut loads = Vec::with_capacity(n);
        for _ in 0..n {
            let req_id = r.str()?;
            let sync = r.flag()?;
            let m = r.len(36)?;
            let mut blocks = Vec::with_capacity(m);
            for _ in 0..m {
                blocks.push((r.key()?, r.u32()?));
            }
            loads.push(LoadReq {
                req_id,
                sync,
                blocks,
            });
        }
        let n = r.len(33)?;
        let mut moves = Vec::with_capacity(n);
        for _ in 0..n {
            moves.push((MoveKind::from_u8(r.u8()?)?, r.key()?));
        }
        r.end()?;
        Ok(Plan {
            step,
            saves,
            loads,
            moves,
        })
    }
}

impl Report {
    /// Encodes the report.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = W(Vec::with_capacity(64));
        w.0.extend_from_slice(REPORT_MAGIC);
        w.u8(VERSION);
        w.u32(self.rank);
        w.u64(self.block_bytes);
        w.len(self.saved.len());
        for s in &self.saved {
            w.str(&s.req_id);
            w.keys(&s.ok);
            w.keys(&s.failed);
        }
        w.len(self.loaded.len());
        for l in &self.loaded {
            w.str(&l.req_id);
            w.keys(&l.failed);
        }
        w.len(self.moved.len());
        for m in &self.moved {
            w.u8(m.kind as u8);
            w.key(&m.key);
            match &m.outcome {
                Outcome::Done => {
                    w.u8(0);
                    w.str("");
                }
                Outcome::Skipped(r) => {
                    w.u8(1);
                    w.str(r);
                }
                Outcome::Failed(r) => {
                    w.u8(2);
                    w.str(r);
                }
            }
        }
        w.len(self.tiers.len());
        for (c, k) in &self.tiers {
            w.u8(*c as u8);
            w.key(k);
        }
        w.0
    }

    /// Decodes a report; anything malformed is a Corrupt error.
    pub fn decode(buf: &[u8]) -> Result<Self> {
        let mut r = R(buf);
        r.header(REPORT_MAGIC)?;
        let rank = r.u32()?;
        let block_bytes = r.u64()?;
        let n = r.len(12)?;
        let mut saved = Vec::with_capacity(n);
        for _ in 0..n {
            saved.push(SaveDone {
                req_id: r.str()?,
                ok: r.keys()?,
                failed: r.keys()?,
            });
        }
        let n = r.len(8)?;
        let mut loaded = Vec::with_capacity(n);
        for _ in 0..n {
            loaded.push(LoadDone {
                req_id: r.str()?,
                failed: r.keys()?,
            });
        }
        let n = r.len(38)?;
        let mut moved = Vec::with_capacity(n);
        for _ in 0..n {
            let kind = MoveKind::from_u8(r.u8()?)?;
            let key = r.key()?;
            let code = r.u8()?;
            let reason = r.str()?;
            let outcome = match (code, reason.is_empty()) {
                (0, true) => Outcome::Done,
                (1, false) => Outcome::Skipped(reason),
                (2, false) => Outcome::Failed(reason),
                (0, false) => return Err(Error::corrupt("report: a done move carries a reason")),
                (1 | 2, true) => {
                    return Err(Error::corrupt("report: a move not done carries no reason"))
                }
                (c, _) => return Err(Error::corrupt(format!("report: unknown move outcome {c}"))),
            };
            moved.push(MoveDone { kind, key, outcome });
        }
        let n = r.len(33)?;
        let mut tiers = Vec::with_capacity(n);
        for _ in 0..n {
            tiers.push((TierChange::from_u8(r.u8()?)?, r.key()?));
        }
        r.end()?;
        Ok(Report {
            rank,
            block_bytes,
            saved,
            loaded,
            moved,
            tiers,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(i: u8) -> BlockKey {
        BlockKey([i; 32])
    }

    #[test]
    fn plan_round_trips() {
        let p = Plan {
            step: 7,
            saves: vec![SaveReq {
                req_id: "req-1".into(),
                session: 42,
                blocks: vec![(k(1), 5, 0), (k(2), 9, 1)],
                to_nvme: true,
            }],
            loads: vec![LoadReq {
                req_id: "r2".into(),
                sync: true,
                blocks: vec![(k(3), 11)],
            }],
            moves: vec![(MoveKind::Demote, k(4)), (MoveKind::Drop, k(5))],
        };
        let bytes = p.encode();
        assert_eq!(Plan::decode(&bytes).unwrap(), p);
        // every truncation is an error, never a panic
        for n in 0..bytes.len() {
            assert!(Plan::decode(&bytes[..n]).is_err(), "prefix {n}");
        }
        let mut bad = bytes.clone();
        bad[4] = 9;
        assert!(Plan::decode(&bad)
            .unwrap_err()
            .message()
            .contains("version 9"));
    }

    #[test]
    fn report_round_trips() {
        let r = Report {
            rank: 3,
            block_bytes: 16384,
            saved: vec![SaveDone {
                req_id: "a".into(),
                ok: vec![k(1)],
                failed: vec![k(2)],
            }],
            loaded: vec![LoadDone {
                req_id: "b".into(),
                failed: vec![],
            }],
            moved: vec![
                MoveDone {
                    kind: MoveKind::Demote,
                    key: k(1),
                    outcome: Outcome::Skipped("NVMe tier full".into()),
                },
                MoveDone {
                    kind: MoveKind::Drop,
                    key: k(9),
                    outcome: Outcome::Done,
                },
                MoveDone {
                    kind: MoveKind::Promote,
                    key: k(6),
                    outcome: Outcome::Failed("corrupt".into()),
                },
            ],
            tiers: vec![
                (TierChange::OnHost, k(1)),
                (TierChange::OnNvme, k(1)),
                (TierChange::LeftHost, k(7)),
                (TierChange::LeftNvme, k(6)),
                (TierChange::Lost, k(8)),
            ],
        };
        let bytes = r.encode();
        assert_eq!(Report::decode(&bytes).unwrap(), r);
        for n in 0..bytes.len() {
            assert!(Report::decode(&bytes[..n]).is_err());
        }
        assert!(Plan::decode(&bytes).is_err(), "a report is not a plan");
        // rank 3 travels right after the version byte
        assert_eq!(&bytes[5..9], &3u32.to_le_bytes());
    }

    #[test]
    fn a_move_outcome_must_match_its_reason() {
        let mut r = Report::default();
        r.moved(MoveKind::Drop, k(1), Outcome::Done);
        let bytes = r.encode();
        // header 5 + rank 4 + block_bytes 8 + saved 4 + loaded 4 + count 4 + kind 1 + key 32
        let code = 5 + 4 + 8 + 4 + 4 + 4 + 1 + 32;
        assert_eq!(bytes[code], 0);
        for (v, what) in [
            (1u8, "no reason"),
            (2, "no reason"),
            (7, "unknown move outcome"),
        ] {
            let mut bad = bytes.clone();
            bad[code] = v;
            let e = Report::decode(&bad).unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::Corrupt);
            assert!(e.message().contains(what), "{v}: {e}");
        }
        let mut r = Report::default();
        r.tier(TierChange::Lost, k(2));
        let mut bad = r.encode();
        let at = bad.len() - 33;
        bad[at] = 6;
        assert!(Report::decode(&bad)
            .unwrap_err()
            .message()
            .contains("unknown tier change 6"));
    }

    #[test]
    fn huge_declared_list_is_corrupt_not_oom() {
        let mut b = Vec::from(&PLAN_MAGIC[..]);
        b.push(VERSION);
        b.extend_from_slice(&0u64.to_le_bytes());
        b.extend_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            Plan::decode(&b).unwrap_err().kind(),
            crate::ErrorKind::Corrupt
        );
    }

    #[test]
    fn a_flag_byte_other_than_0_or_1_is_corrupt() {
        // A flag read as `!= 0` would take 2 for true and re-encode it as 1:
        // the plan would not be the bytes that were sent.
        let p = Plan {
            step: 1,
            saves: vec![SaveReq {
                req_id: "a".into(),
                session: 1,
                blocks: vec![(k(1), 1, 0)],
                to_nvme: true,
            }],
            loads: vec![LoadReq {
                req_id: "b".into(),
                sync: false,
                blocks: vec![(k(2), 2)],
            }],
            moves: vec![],
        };
        let bytes = p.encode();
        let to_nvme = 4 + 1 + 8 + 4 + 4 + 1 + 8;
        let sync = to_nvme + 1 + 4 + 40 + 4 + 4 + 1;
        assert_eq!((bytes[to_nvme], bytes[sync]), (1, 0));
        for (at, v) in [(to_nvme, 2), (to_nvme, 0xff), (sync, 3)] {
            let mut bad = bytes.clone();
            bad[at] = v;
            let e = Plan::decode(&bad).unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::Corrupt, "byte {at} = {v}");
            assert!(e.message().contains("flag"), "{e}");
        }
    }
}
