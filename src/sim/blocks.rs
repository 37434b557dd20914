//! The replay's side of the connector's scheduler: the simulator asks the
//! production [`BlockPlanner`] what vLLM's scheduler would ask it, at block
//! granularity, with the request's block hashes, and runs the plans it
//! returns on a modelled worker ([`super::engine`] moves their bytes over
//! the links and reports each outcome when it lands).
//!
//! # Block hashes
//!
//! vLLM hashes every full block of a request's tokens, each hash chained to
//! the one before, so two requests share exactly the blocks of their common
//! token prefix. A session here keeps the hashes of its current context:
//! a step keeps the blocks its cacheable tokens cover (the tokens of the
//! previous context it reuses) and gets fresh hashes for the rest; a
//! finished step adds the blocks its output filled. A compaction (a short
//! cacheable prefix) therefore starts a new chain, as in vLLM.
//!
//! Hashes are 8 bytes, big-endian, unique across the replay: the form vLLM's
//! KV-cache events use, so a GPU eviction is reported with the id of the
//! session's deepest block as vLLM would report it.
//!
//! Memory: one 8-byte hash per block of the contexts of sessions that have
//! not ended, plus the planner's index (about 52 B per parked block).

use crate::config::Config;
use crate::error::Result;
use crate::plan::Plan;
use crate::planner::blocks::{BlockPlanner, PlannerMetrics, RequestHint, RequestView};
use crate::planner::core::{Awaiting, Capacity, SessionId};
use crate::policy::Policy;

/// What a request's match and allocation gave, for the simulator's metrics.
#[derive(Clone, Debug, Default)]
pub struct Admitted {
    /// Tokens vLLM's GPU prefix cache holds (block-aligned).
    pub local_tokens: u64,
    /// Tokens loaded from kvpark's host tier.
    pub host_tokens: u64,
    /// Tokens loaded from kvpark's NVMe tier.
    pub nvme_tokens: u64,
    /// A prefetch of the session had landed when the request came.
    pub prefetch_in_time: bool,
    /// A prefetch of the session was still in flight.
    pub prefetch_late: bool,
    /// The plan to run now (the load, and whatever the policy decided).
    pub plan: Plan,
}

/// The block planner and the hash chains of the replayed sessions.
pub struct BlockSim {
    bp: BlockPlanner,
    bs: u64,
    hashes: Vec<Vec<u64>>,
    /// The hash of each session's deepest parked block (its GPU mark).
    deepest: Vec<Option<u64>>,
    sid: Vec<SessionId>,
    next_hash: u64,
    ids: Vec<u32>,
    buf: Vec<u8>,
    events: bool,
    req_id: String,
    name: String,
}

impl BlockSim {
    /// A planner for `sessions` sessions with `block_size`-token blocks of
    /// `block_bytes` bytes, capacity `cap`, running `policy`. With
    /// `gpu_events` the planner hears the modelled GPU's evictions, as the
    /// connector does from vLLM's KV-cache events.
    pub fn new(
        sessions: usize,
        block_size: u32,
        block_bytes: u64,
        cap: Capacity,
        policy: Box<dyn Policy>,
        gpu_events: bool,
    ) -> Result<Self> {
        let cfg = Config {
            host_bytes: cap.host_bytes,
            nvme_bytes: cap.nvme_bytes,
            // a session idle for a day is ended by the planner, as in the connector
            ..Config::default()
        };
        let mut bp = BlockPlanner::for_replay(cfg, block_size, cap, policy)?;
        bp.expect_block_bytes(block_bytes);
        if gpu_events {
            bp.hear_gpu_events();
        }
        Ok(BlockSim {
            bp,
            bs: block_size as u64,
            hashes: vec![Vec::new(); sessions],
            deepest: vec![None; sessions],
            sid: vec![0; sessions],
            next_hash: 0,
            ids: Vec::new(),
            buf: Vec::new(),
            events: gpu_events,
            req_id: String::new(),
            name: String::new(),
        })
    }

    /// The planner.
    pub fn planner(&self) -> &BlockPlanner {
        &self.bp
    }

    /// The planner, to run its time-driven work or hand it reports.
    pub fn planner_mut(&mut self) -> &mut BlockPlanner {
        &mut self.bp
    }

    /// The planner's id of session `i`.
    pub fn session(&mut self, i: u32) -> SessionId {
        let s = &mut self.sid[i as usize];
        if *s == 0 {
            self.name.clear();
            self.name.push_str(&i.to_string());
            *s = self.bp.session_named(&self.name);
        }
        *s
    }

    fn fresh(&mut self) -> u64 {
        self.next_hash += 1;
        // (a bijection: distinct counters give distinct hashes)
        crate::planner::mix64(self.next_hash)
    }

    /// Session `i`'s context as `tokens` tokens, of which the first `keep`
    /// are the previous context's: its full blocks' hashes, in `self.buf`.
    fn chain(&mut self, i: u32, keep: u64, tokens: u64) -> usize {
        let n = (tokens / self.bs) as usize;
        let mut h = std::mem::take(&mut self.hashes[i as usize]);
        h.truncate(((keep / self.bs) as usize).min(n));
        while h.len() < n {
            let x = self.fresh();
            h.push(x);
        }
        self.buf.clear();
        self.buf.reserve(n * 8);
        for x in &h {
            self.buf.extend_from_slice(&x.to_be_bytes());
        }
        self.hashes[i as usize] = h;
        n
    }

    fn block_ids(&mut self, n: usize) {
        while self.ids.len() < n {
            self.ids.push(self.ids.len() as u32 + 1);
        }
    }

    fn hint(i: u32, awaits: Option<(Awaiting, Option<&str>)>) -> RequestHint {
        let (awaiting, tool) = match awaits {
            Some((Awaiting::Tool, t)) => (Some("tool".to_string()), t.map(str::to_string)),
            Some((Awaiting::User, _)) => (Some("user".to_string()), None),
            _ => (None, None),
        };
        RequestHint {
            session: Some(i.to_string()),
            awaiting,
            tool,
        }
    }

    /// Step `k` of session `i` is admitted at `now`: `tokens` of context, of
    /// which `cacheable` continue the previous context and `gpu` (a prefix)
    /// are in vLLM's GPU prefix cache. vLLM asks kvpark for the rest and
    /// allocates the blocks of a hit.
    pub fn admit(
        &mut self,
        now: u64,
        i: u32,
        k: u32,
        tokens: u64,
        cacheable: u64,
        gpu: u64,
    ) -> Result<Admitted> {
        self.session(i);
        let n = self.chain(i, cacheable, tokens);
        let bs = self.bs;
        // vLLM's local hit: whole blocks, at least one token left to compute
        let mut local = (gpu.min(cacheable) / bs).min(n as u64);
        if local > 0 && local * bs >= tokens {
            local -= 1;
        }
        self.req_id.clear();
        self.req_id.push_str(&format!("{i}.{k}"));
        let before = counts(self.bp.counters());
        let hint = Self::hint(i, None);
        let view = RequestView {
            req_id: &self.req_id,
            salt: b"",
            hashes: &self.buf,
            hash_len: 8,
            hint: Some(hint),
        };
        let m = self.bp.match_request(
            &view,
            (local * bs) as u32,
            tokens.min(u32::MAX as u64) as u32,
            now,
        )?;
        if m.external_tokens > 0 {
            self.block_ids(n);
            self.bp
                .on_alloc(&self.req_id, &self.ids[..n], m.external_tokens)?;
        }
        let after = counts(self.bp.counters());
        let plan = self.bp.take_plan(now);
        Ok(Admitted {
            local_tokens: local * bs,
            host_tokens: (after.2 - before.2) * bs,
            nvme_tokens: (after.3 - before.3) * bs,
            prefetch_in_time: after.0 > before.0,
            prefetch_late: after.1 > before.1,
            plan,
        })
    }

    /// Step `k` of session `i` finished at `now` with `kv_tokens` of KV; the
    /// session then waits for what `awaits` says (`None`: no hint). Returns
    /// whether vLLM keeps the request's blocks until the save is reported
    /// (`delay_free`), and the plan to run now.
    pub fn finish(
        &mut self,
        now: u64,
        i: u32,
        k: u32,
        kv_tokens: u64,
        awaits: Option<(Awaiting, Option<&str>)>,
    ) -> Result<(bool, Plan)> {
        self.session(i);
        let kept = self.hashes[i as usize].len() as u64 * self.bs;
        let n = self.chain(i, kept, kv_tokens);
        self.block_ids(n);
        self.req_id.clear();
        self.req_id.push_str(&format!("{i}.{k}"));
        let hint = Self::hint(i, awaits);
        let view = RequestView {
            req_id: &self.req_id,
            salt: b"",
            hashes: &self.buf,
            hash_len: 8,
            hint: Some(hint),
        };
        let delay = self
            .bp
            .request_finished(&view, &self.ids[..n], kv_tokens as u32, now)?;
        self.deepest[i as usize] = self.hashes[i as usize].last().copied();
        Ok((delay, self.bp.take_plan(now)))
    }

    /// The GPU gave session `i`'s context up: with KV-cache events the
    /// planner hears that its deepest block was removed.
    pub fn gpu_evicted(&mut self, i: u32) {
        if self.events {
            if let Some(h) = self.deepest[i as usize] {
                self.bp.gpu_removed(&[h]);
            }
        }
    }

    /// Session `i` has no more steps: its hashes are freed (the planner is
    /// not told, as the connector is not: its blocks age out of the tiers).
    pub fn ended(&mut self, i: u32) {
        self.hashes[i as usize] = Vec::new();
    }

    /// The replayed session a request id of [`Self::admit`] or
    /// [`Self::finish`] belongs to.
    pub fn session_of(req_id: &str) -> Option<u32> {
        req_id.split('.').next()?.parse().ok()
    }
}

/// (prefetch in time, prefetch late, host hit blocks, NVMe hit blocks).
fn counts(m: &PlannerMetrics) -> (u64, u64, u64, u64) {
    (
        m.prefetch_in_time,
        m.prefetch_late,
        m.hit_blocks_host,
        m.hit_blocks_nvme,
    )
}
