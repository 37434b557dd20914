//! The scheduler-side block planner: what kvpark holds, what each request can
//! load, and what each finished request parks.
//!
//! It lives in vLLM's engine-core process and sees only block hashes and
//! block ids, never KV bytes. **The planner decides, the workers execute and
//! report**: its view of the tiers is, per rank, what that rank's worker has
//! reported (see [`crate::plan::Report`]), and it changes only on reports —
//! never when it plans. Each block keeps one bit per rank for the host tier
//! and one for NVMe; a block counts as present in a tier only when every
//! rank (tensor/pipeline parallel worker, `world` of them) holds it there,
//! and can be loaded only when every rank holds it in some tier. So a hit is
//! never promised for bytes still in flight or missing on one rank.
//!
//! Every planned tier move ends in an outcome each rank reports (done,
//! skipped or failed, with the reason); the core planner learns that a
//! session-level action completed only when every rank reported every block
//! move of it, and whether all were done. A worker also reports the tier
//! changes it had to make itself (an eviction to free a slot for a save, a
//! corrupt record it dropped). A block some rank lost while others still
//! hold it (a failed load, a partial restart) no longer counts as parked;
//! the planner drops it on the ranks that still hold it.
//!
//! At start, [`BlockPlanner::open`] recovers what every rank's files hold
//! (NVMe records, a file-backed host arena's slot table): a block is
//! recovered only if every rank has it.
//!
//! Request lifecycle as vLLM drives it:
//!
//! ```text
//! match (0..n times) ─▶ on_alloc(n_ext > 0) ─▶ [plan: Load] ─▶ worker loads
//!                                                   │ async: finished_recving
//! request_finished ─▶ [plan: Save new blocks] ─▶ worker gathers ─▶ finished_sending
//!                     delay_free = true while the save is in flight
//! ```
//!
//! Where a suspended session's KV lives is decided by the same
//! [`crate::planner::core::Planner`] (and policy) that the replay simulator
//! runs: a finished request *suspends* its session, the next request of the
//! session *resumes* it, and every step *ticks* the planner. Its session-level
//! actions become block moves here: a session's blocks are the chain keys it
//! parked first (a prefix shared with an older session stays that session's).

use crate::block::{BlockKey, KeyDeriver, ModelNs};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::plan::{LoadReq, MoveKind, Outcome, Plan, Report, SaveReq, TierChange};
use crate::planner::chain_index::{ChainIndex, Loc, Pos};
use crate::planner::core::{Action, Awaiting, Capacity, Hint, Planner, SessionId, Tier};
use crate::planner::{KeyMap, KeySet};
use crate::policy::PolicyEnv;
use serde::Serialize;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// Session hint a harness may attach (`kv_transfer_params["kvpark"]`).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestHint {
    /// Stable session id chosen by the harness.
    pub session: Option<String>,
    /// What the session waits on after this step: "tool" or "user".
    pub awaiting: Option<String>,
    /// The pending tool's name.
    pub tool: Option<String>,
}

impl RequestHint {
    /// Parses the hint JSON; unknown fields or bad `awaiting` are InvalidArgument.
    pub fn parse(json: &[u8]) -> Result<Self> {
        let h: RequestHint = serde_json::from_slice(json)
            .map_err(|e| Error::invalid(format!("kvpark hint: {e}")))?;
        if let Some(a) = &h.awaiting {
            if a != "tool" && a != "user" {
                return Err(Error::invalid(format!(
                    "kvpark hint: awaiting must be \"tool\" or \"user\", got {a:?}"
                )));
            }
        }
        Ok(h)
    }
}

/// A request as the scheduler sees it.
#[derive(Clone, Debug)]
pub struct RequestView<'a> {
    /// vLLM request id.
    pub req_id: &'a str,
    /// `request.cache_salt` (empty = none).
    pub salt: &'a [u8],
    /// `request.block_hashes`, each `hash_len` bytes.
    pub hashes: &'a [u8],
    /// Bytes per hash.
    pub hash_len: usize,
    /// Optional harness hint.
    pub hint: Option<RequestHint>,
}

impl RequestView<'_> {
    /// Number of full-block hashes.
    pub fn num_hashes(&self) -> usize {
        self.hashes.len().checked_div(self.hash_len).unwrap_or(0)
    }

    /// Checks the hash bytes against `hash_len` (no state is touched).
    fn check(&self) -> Result<()> {
        if self.hash_len == 0 && !self.hashes.is_empty() {
            return Err(Error::invalid("block hashes given with hash_len 0"));
        }
        if self.hash_len != 0 && self.hashes.len() % self.hash_len != 0 {
            return Err(Error::invalid(format!(
                "block hash bytes ({}) are not a multiple of hash_len {}",
                self.hashes.len(),
                self.hash_len
            )));
        }
        Ok(())
    }

    fn keys(&self, model: &ModelNs) -> Result<Arc<[BlockKey]>> {
        self.keys_after(model, &[])
    }

    /// The keys of the request's blocks, `known` being those of its first
    /// blocks (derived earlier).
    fn keys_after(&self, model: &ModelNs, known: &[BlockKey]) -> Result<Arc<[BlockKey]>> {
        self.check()?;
        let d = KeyDeriver::new(model, self.salt, self.hash_len);
        let h = self.hash_len.max(1);
        Ok(known
            .iter()
            .copied()
            .chain(
                self.hashes[known.len() * h..]
                    .chunks_exact(h)
                    .map(|h| d.key(h)),
            )
            .collect())
    }
}

/// Result of [`BlockPlanner::match_request`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Match {
    /// Block-aligned tokens kvpark can load beyond vLLM's local hit.
    pub external_tokens: u32,
    /// Load asynchronously (request waits in WAITING_FOR_REMOTE_KVS).
    pub load_async: bool,
}

#[derive(Debug)]
struct ReqState {
    /// The request's block keys (shared with its load, if any).
    keys: Arc<[BlockKey]>,
    /// Where the matched blocks were found, as runs of consecutive chain
    /// positions (for on_alloc, which checks them again unless the index's
    /// layout is still `layout`).
    pos: Vec<(Pos, usize)>,
    layout: u64,
    local_blocks: usize,
    ext_blocks: usize,
    load_async: bool,
}

/// A block found at start: `(rank, key, session, raw_len, in the host
/// arena file, on NVMe)`.
pub type Recovered = (u32, BlockKey, u64, u64, bool, bool);

/// The most ranks one planner tracks (one bit each).
pub const MAX_WORLD: u32 = 64;

/// A planned move waiting for every rank's outcome.
#[derive(Clone, Copy, Debug)]
struct Pending {
    /// Ranks that reported an outcome.
    reported: u64,
    /// Every outcome so far was "done".
    ok: bool,
    /// The core planner's action the move belongs to.
    action: Option<u64>,
}

/// A save waiting for every rank's outcome.
#[derive(Debug)]
struct Saving {
    keys: Vec<BlockKey>,
    reported: u64,
    /// Every rank parked at least one block.
    ok: bool,
}

/// A load waiting for every rank's outcome.
#[derive(Debug)]
struct Loading {
    /// The request's keys; the load's are `keys[lo..hi]`.
    keys: Arc<[BlockKey]>,
    lo: usize,
    hi: usize,
    /// The chain ranges (chain, from, to) whose `loading` count this load
    /// raised, valid while the index's layout is still `layout`.
    ranges: Vec<(u32, u32, u32)>,
    layout: u64,
    reported: u64,
    /// Blocks some rank failed to load.
    failed: KeySet<BlockKey>,
}

/// Counters exported as JSON.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PlannerMetrics {
    /// `match` calls.
    pub match_calls: u64,
    /// Requests that got an external hit (counted at allocation).
    pub hit_requests: u64,
    /// Tokens loaded from kvpark (planned).
    pub hit_tokens: u64,
    /// Blocks planned to load that the host held.
    pub hit_blocks_host: u64,
    /// Blocks planned to load that only NVMe held.
    pub hit_blocks_nvme: u64,
    /// Loads planned synchronously / asynchronously.
    pub loads_sync: u64,
    /// Async loads planned.
    pub loads_async: u64,
    /// Blocks whose load some rank reported failed (vLLM recomputes them).
    pub load_failed_blocks: u64,
    /// Blocks every rank reported loaded.
    pub loaded_blocks: u64,
    /// Save requests planned.
    pub saves: u64,
    /// Blocks planned to save.
    pub save_blocks: u64,
    /// Blocks every rank confirmed parked.
    pub saved_blocks: u64,
    /// Blocks whose save failed on some rank.
    pub save_failed_blocks: u64,
    /// Blocks kvpark can load now (every rank holds them).
    pub parked_blocks: u64,
    /// Of which every rank holds in the host tier.
    pub parked_host_blocks: u64,
    /// Of which every rank holds on NVMe.
    pub parked_nvme_blocks: u64,
    /// Blocks some ranks hold and others lost (being dropped).
    pub partial_blocks: u64,
    /// Blocks found in every rank's files at start (warm restart).
    pub recovered_blocks: u64,
    /// Blocks found at start on some ranks only (dropped).
    pub recovered_partial_blocks: u64,
    /// Worker ranks (tensor x pipeline parallel) the planner tracks.
    pub world_size: u64,
    /// Bytes of one block as reported by a worker.
    pub block_bytes: u64,
    /// Sessions seen.
    pub sessions: u64,
    /// Sessions ended after `session_ttl` idle.
    pub sessions_ended: u64,
    /// Block moves planned by the policy (evict, demote, promote, drop).
    pub moves: u64,
    /// Move outcomes reported done (one per rank).
    pub moves_done: u64,
    /// Move outcomes reported skipped (one per rank).
    pub moves_skipped: u64,
    /// Move outcomes reported failed (one per rank).
    pub moves_failed: u64,
    /// Promotions (NVMe → host) the policy issued ahead of a session's
    /// return (prefetches).
    pub prefetches: u64,
    /// Of which were whole on host when the session came back (in time).
    pub prefetch_in_time: u64,
    /// Of which were still in flight when the session came back (late).
    pub prefetch_late: u64,
    /// Of which left host (evicted, failed, or the session ended) before
    /// the session came back (wasted).
    pub prefetch_wasted: u64,
    /// Plans of tier moves run while the engine was idle
    /// ([`BlockPlanner::tick_moves`]).
    pub idle_plans: u64,
    /// Gaps (suspend to the next request) the policy had predicted (the
    /// kvpark policies; 0 for the others).
    pub predicted_gaps: u64,
    /// Of which at most the predicted median (calibrated: half).
    pub gaps_below_p50: u64,
    /// Of which at most the predicted p90 (calibrated: nine in ten).
    pub gaps_below_p90: u64,
    /// 1 when the planner hears vLLM's KV-cache events (the GPU prefix
    /// cache's evictions; [`BlockPlanner::hear_gpu_events`]), else 0.
    pub gpu_events: u64,
    /// Block hashes vLLM reported removed from its GPU prefix cache.
    pub gpu_removed_blocks: u64,
    /// Parked contexts the GPU prefix cache gave up, as the policy heard
    /// them (a session's deepest parked block left the GPU).
    pub gpu_dropped_sessions: u64,
    /// Host bytes the core planner accounts for.
    pub planned_host_bytes: u64,
    /// NVMe bytes the core planner accounts for.
    pub planned_nvme_bytes: u64,
}

/// Scheduler-side state of kvpark.
pub struct BlockPlanner {
    cfg: Config,
    /// The model's key namespace (config `model_identity`).
    model: ModelNs,
    block_size: u32,
    block_bytes: u64,
    /// Every block some rank holds, in the chains of the sessions that
    /// parked them first.
    blocks: ChainIndex,
    reqs: HashMap<String, ReqState>,
    saving: HashMap<String, Saving>,
    /// Keys of saves in flight → their session.
    saving_keys: KeyMap<BlockKey, u64>,
    loads: HashMap<String, Loading>,
    /// Ranks the workers run as: `first_rank..first_rank + world`.
    world: u32,
    first_rank: u32,
    /// Bit mask of every rank.
    all: u64,
    /// Planned moves waiting for outcomes.
    pending: KeyMap<(MoveKind, BlockKey), Pending>,
    /// Later actions waiting for a move already pending for an earlier one.
    waiters: KeyMap<(MoveKind, BlockKey), Vec<u64>>,
    /// Core actions waiting for their moves: (action, moves left, all done).
    actions: KeyMap<u64, (Action, usize, bool)>,
    next_action: u64,
    /// Blocks some ranks hold and others do not.
    partial: KeySet<BlockKey>,
    /// Blocks whose load failed, their drop not planned yet.
    doomed: KeySet<BlockKey>,
    outbox: Plan,
    step: u64,
    sessions: HashMap<String, u64>,
    next_session: u64,
    metrics: PlannerMetrics,
    core: Planner,
    /// Save actions of the core planner waiting for the worker's report.
    save_actions: HashMap<String, Vec<Action>>,
    /// Requests already counted as a resume of their session.
    resumed: HashSet<String>,
    /// Sessions with a prefetch since their suspend: whether it completed.
    prefetched: KeyMap<SessionId, bool>,
    /// A worker reported the block size (until then it is vLLM's config's, if given).
    block_bytes_reported: bool,
    /// Last suspend or resume per session (for `session_ttl`).
    last_seen: KeyMap<SessionId, u64>,
    /// GPU-eviction news is on ([`Self::hear_gpu_events`]).
    gpu_events: bool,
    /// The event id ([`Self::event_id`]) of each suspended session's
    /// deepest parked block (kept only while GPU-eviction news is on): when
    /// vLLM's prefix cache drops that block, it has begun to give the
    /// context up (it evicts a finished request's blocks tail first).
    gpu_marks: KeyMap<u64, SessionId>,
    /// The reverse of `gpu_marks`.
    gpu_mark_of: KeyMap<SessionId, u64>,
}

impl BlockPlanner {
    /// A planner for vLLM's `block_size` (tokens per block) and one worker rank.
    pub fn new(cfg: Config, block_size: u32) -> Result<Self> {
        Self::with_world(cfg, block_size, 1)
    }

    /// A planner for the `world` worker ranks `0..world`; see [`Self::with_ranks`].
    pub fn with_world(cfg: Config, block_size: u32, world: u32) -> Result<Self> {
        Self::with_ranks(cfg, block_size, 0, world)
    }

    /// A planner for `world` worker ranks (vLLM's tensor x pipeline
    /// parallel size; 1 to [`MAX_WORLD`]) numbered from `first_rank` (0, or
    /// with data parallelism the engine's data-parallel rank x `world`, as
    /// vLLM numbers its workers), starting empty.
    pub fn with_ranks(cfg: Config, block_size: u32, first_rank: u32, world: u32) -> Result<Self> {
        if block_size == 0 {
            return Err(Error::invalid("block_size must be > 0"));
        }
        if world == 0 || world > MAX_WORLD {
            return Err(Error::invalid(format!(
                "world size {world}: kvpark plans for 1 to {MAX_WORLD} worker ranks"
            )));
        }
        if first_rank.checked_add(world).is_none() {
            return Err(Error::invalid(format!(
                "ranks {first_rank} + {world} overflow a 32-bit rank"
            )));
        }
        let policy = crate::policy::with_knobs(&cfg.policy, &cfg.kvpark, PolicyEnv::default())
            .map_err(|e| Error::config(format!("policy: {}", e.message())))?;
        let cap = Capacity {
            host_bytes: cfg.host_bytes,
            nvme_bytes: if cfg.nvme_dir.is_some() {
                cfg.nvme_bytes
            } else {
                0
            },
        };
        Ok(Self::build(
            cfg,
            block_size,
            first_rank,
            world,
            Planner::new(cap, policy),
        ))
    }

    /// A one-rank planner whose core planner has capacity `cap` and runs
    /// `policy`, for the replay simulator: it may run policies the
    /// connector cannot (the oracle) and accounts NVMe in raw bytes.
    pub fn for_replay(
        cfg: Config,
        block_size: u32,
        cap: Capacity,
        policy: Box<dyn crate::policy::Policy>,
    ) -> Result<Self> {
        if block_size == 0 {
            return Err(Error::invalid("block_size must be > 0"));
        }
        Ok(Self::build(
            cfg,
            block_size,
            0,
            1,
            Planner::new(cap, policy),
        ))
    }

    fn build(cfg: Config, block_size: u32, first_rank: u32, world: u32, core: Planner) -> Self {
        BlockPlanner {
            core,
            save_actions: HashMap::new(),
            resumed: HashSet::new(),
            prefetched: KeyMap::default(),
            block_bytes_reported: false,
            last_seen: KeyMap::default(),
            gpu_events: false,
            gpu_marks: KeyMap::default(),
            gpu_mark_of: KeyMap::default(),
            model: ModelNs::of(&cfg.model_identity),
            cfg,
            block_size,
            block_bytes: 0,
            blocks: ChainIndex::default(),
            reqs: HashMap::new(),
            saving: HashMap::new(),
            saving_keys: KeyMap::default(),
            loads: HashMap::new(),
            world,
            first_rank,
            all: if world == 64 {
                u64::MAX
            } else {
                (1u64 << world) - 1
            },
            pending: KeyMap::default(),
            waiters: KeyMap::default(),
            actions: KeyMap::default(),
            next_action: 1,
            partial: KeySet::default(),
            doomed: KeySet::default(),
            outbox: Plan::default(),
            step: 0,
            sessions: HashMap::new(),
            next_session: 1,
            metrics: PlannerMetrics {
                world_size: world as u64,
                ..PlannerMetrics::default()
            },
        }
    }

    /// The core planner (read-only: occupancy, statistics, the policy's GPU order).
    pub fn core(&self) -> &Planner {
        &self.core
    }

    /// The counters as they stand, without the per-step refresh of
    /// [`Self::metrics`] (for a caller that reads them every request).
    pub fn counters(&self) -> &PlannerMetrics {
        &self.metrics
    }

    /// The id of the session a harness names `name` in its hints (a new id
    /// when kvpark has not seen it yet; its requests then use it).
    pub fn session_named(&mut self, name: &str) -> SessionId {
        if let Some(&s) = self.sessions.get(name) {
            return s;
        }
        let s = self.new_session();
        self.sessions.insert(name.to_string(), s);
        s
    }

    /// A planner for ranks `first_rank..first_rank + world` (see
    /// [`Self::with_ranks`]) that recovers what every rank's files hold
    /// (warm restart; see [`crate::planner::recovery`]).
    pub fn open(cfg: Config, block_size: u32, first_rank: u32, world: u32) -> Result<Self> {
        let mut p = Self::with_ranks(cfg, block_size, first_rank, world)?;
        let found = crate::planner::recovery::scan(&p.cfg, first_rank..first_rank + world)?;
        if !found.is_empty() {
            p.recover_tiers(found);
        }
        Ok(p)
    }

    /// The number of worker ranks.
    pub fn world(&self) -> u32 {
        self.world
    }

    /// The planner's index of worker rank `rank`, if it plans for it.
    fn local_rank(&self, rank: u32) -> Option<u32> {
        rank.checked_sub(self.first_rank)
            .filter(|&r| r < self.world)
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Registers blocks found at start (warm restart), per rank and tier
    /// (see [`Recovered`]; a key may come once per rank and tier). A block
    /// becomes a hit only if every rank has it; one found on some ranks
    /// only is dropped there (first plan).
    pub fn recover_tiers(&mut self, found: impl IntoIterator<Item = Recovered>) {
        for (rank, key, session, raw_len, host, nvme) in found {
            let Some(rank) = self.local_rank(rank).filter(|_| host || nvme) else {
                continue;
            };
            if self.block_bytes == 0 {
                self.block_bytes = raw_len;
            }
            if !self.blocks.contains(&key) {
                self.blocks.insert(
                    key,
                    Loc {
                        host: 0,
                        nvme: 0,
                        session,
                        loading: 0,
                        doomed: false,
                    },
                );
            }
            self.next_session = self.next_session.max(session.wrapping_add(1));
            self.set_rank(None, &key, rank, host.then_some(true), nvme.then_some(true));
        }
        self.metrics.recovered_blocks = self.metrics.parked_blocks;
        self.metrics.recovered_partial_blocks = self.partial.len() as u64;
        // The core planner learns each recovered session as suspended, with
        // a copy in each tier that holds every block of the session.
        let all = self.all;
        let sessions: Vec<(SessionId, usize, bool, bool)> = self
            .blocks
            .sessions()
            .into_iter()
            .filter(|&s| s != 0)
            .map(|s| {
                let c = self.blocks.chain_of(s);
                (
                    s,
                    c.len(),
                    c.iter().all(|(_, l)| l.host == all),
                    c.iter().all(|(_, l)| l.nvme == all),
                )
            })
            .collect();
        for (s, n, host, nvme) in sessions {
            for a in self
                .core
                .suspend(0, s, n as u64 * self.block_bytes, &Hint::default())
            {
                let ok = match a {
                    Action::Copy { to: Tier::Nvme, .. } => nvme,
                    Action::Copy { to: Tier::Host, .. } => host,
                    _ => false,
                };
                self.core.completed(0, &a, ok);
            }
        }
    }

    /// Every rank holds the block (in some tier): it can be loaded.
    fn loadable(&self, l: &Loc) -> bool {
        !l.doomed && l.host | l.nvme == self.all
    }

    fn session_for(&mut self, req: &RequestView<'_>, keys: &[BlockKey]) -> u64 {
        if let Some(name) = req.hint.as_ref().and_then(|h| h.session.clone()) {
            if let Some(&s) = self.sessions.get(&name) {
                return s;
            }
            let s = self.new_session();
            self.sessions.insert(name, s);
            return s;
        }
        // No hint: the session that parked the deepest block of this chain.
        keys.iter()
            .rev()
            .find_map(|k| self.blocks.get(k).map(|l| l.session))
            .unwrap_or_else(|| self.new_session())
    }

    /// The session a request continues, if kvpark has seen it.
    fn known_session(&self, req: &RequestView<'_>, keys: &[BlockKey]) -> Option<SessionId> {
        if let Some(name) = req.hint.as_ref().and_then(|h| h.session.as_ref()) {
            return self.sessions.get(name).copied();
        }
        keys.iter()
            .rev()
            .find_map(|k| self.blocks.get(k).map(|l| l.session))
    }

    fn new_session(&mut self) -> u64 {
        let s = self.next_session;
        self.next_session += 1;
        self.metrics.sessions += 1;
        s
    }

    /// `get_num_new_matched_tokens`. `num_computed_tokens` is vLLM's
    /// block-aligned local hit; `num_tokens` the request's token count.
    pub fn match_request(
        &mut self,
        req: &RequestView<'_>,
        num_computed_tokens: u32,
        num_tokens: u32,
        now: u64,
    ) -> Result<Match> {
        self.metrics.match_calls += 1;
        if num_computed_tokens % self.block_size != 0 {
            return Err(Error::invalid(format!(
                "num_computed_tokens {num_computed_tokens} is not a multiple of block_size {}",
                self.block_size
            )));
        }
        // Everything the request says is checked before any state changes.
        req.check()?;
        if num_computed_tokens as usize / self.block_size as usize > req.num_hashes() {
            return Err(Error::invalid(format!(
                "num_computed_tokens {num_computed_tokens} covers more than the request's {} hashed blocks of {} tokens",
                req.num_hashes(),
                self.block_size
            )));
        }
        // vLLM may ask again for the same request: reuse its derived keys
        // (one SHA-256 per block) when the hash chain is unchanged.
        let keys = match self.reqs.remove(req.req_id) {
            Some(st) if st.keys.len() == req.num_hashes() => st.keys,
            _ => req.keys(&self.model)?,
        };
        if self.resumed.insert(req.req_id.to_string()) {
            if let Some(s) = self.known_session(req, &keys) {
                match self.prefetched.remove(&s) {
                    Some(true) => self.metrics.prefetch_in_time += 1,
                    Some(false) => self.metrics.prefetch_late += 1,
                    None => {}
                }
                self.core.resume(now, s);
                self.last_seen.insert(s, now);
                self.unmark_gpu(s);
            }
        }
        let bs = self.block_size as usize;
        let local = num_computed_tokens as usize / bs;
        // The loadable prefix beyond vLLM's hit: a table lookup finds a
        // block, then the chain holding it answers for as many of the next
        // blocks as it holds in order (a resumed session's whole context,
        // usually), without the table.
        let mut n = 0;
        let mut all_host = true;
        let mut pos = Vec::new();
        let all = self.all;
        while local + n < keys.len() {
            let Some(at) = self.blocks.locate(&keys[local + n]) else {
                break;
            };
            let (m, refused) = self.blocks.extend(at, &keys[local + n..], |l| {
                let ok = !l.doomed && l.host | l.nvme == all;
                all_host &= !ok || l.host == all;
                ok
            });
            if m > 0 {
                pos.push((at, m));
                n += m;
            }
            if refused || m == 0 {
                break;
            }
        }
        // Leave at least one token for vLLM to compute.
        while n > 0 && (local + n) * bs >= num_tokens as usize {
            n -= 1;
        }
        if n < self.cfg.min_park_blocks as usize {
            n = 0;
        }
        let bytes = n as u64 * self.block_bytes;
        let load_async = n > 0 && (!all_host || bytes > self.cfg.sync_load_budget_bytes);
        self.reqs.insert(
            req.req_id.to_string(),
            ReqState {
                keys,
                pos,
                layout: self.blocks.layout(),
                local_blocks: local,
                ext_blocks: n,
                load_async,
            },
        );
        Ok(Match {
            external_tokens: (n * bs) as u32,
            load_async,
        })
    }

    /// `update_state_after_alloc`: `block_ids` are all of the request's blocks.
    pub fn on_alloc(
        &mut self,
        req_id: &str,
        block_ids: &[u32],
        num_external_tokens: u32,
    ) -> Result<()> {
        if num_external_tokens == 0 {
            return Ok(());
        }
        let st = self.reqs.get(req_id).ok_or_else(|| {
            Error::invalid(format!(
                "on_alloc for request {req_id:?} that was never matched"
            ))
        })?;
        let bs = self.block_size as usize;
        let n = num_external_tokens as usize / bs;
        if num_external_tokens as usize % bs != 0 || n > st.ext_blocks {
            return Err(Error::invalid(format!(
                "on_alloc: {num_external_tokens} external tokens but kvpark matched {} blocks of {bs}",
                st.ext_blocks
            )));
        }
        let (lo, hi) = (st.local_blocks, st.local_blocks + n);
        if block_ids.len() < hi {
            return Err(Error::invalid(format!(
                "on_alloc: request has {} blocks, the load needs {hi}",
                block_ids.len()
            )));
        }
        let blocks: Vec<(BlockKey, u32)> = st.keys[lo..hi]
            .iter()
            .copied()
            .zip(block_ids[lo..hi].iter().copied())
            .collect();
        let sync = !st.load_async;
        let all = self.all;
        // one update per run of consecutive chain positions (a resumed
        // session's blocks are one run of its chain)
        let mut runs: Vec<(u32, u32, u32)> = Vec::new();
        let mut i = 0;
        for &(at, m) in &st.pos {
            let m = m.min(blocks.len() - i);
            if m == 0 {
                break;
            }
            let keys = &st.keys[lo + i..lo + i + m];
            if st.layout == self.blocks.layout() || self.blocks.extend(at, keys, |_| true).0 == m {
                runs.push((at.0, at.1, at.1 + m as u32));
                i += m;
            } else {
                break;
            }
        }
        // (blocks the match did not place, or that moved since: one by one)
        for (k, _) in &blocks[i..] {
            if let Some(at) = self.blocks.locate(k) {
                match runs.last_mut() {
                    Some((c, _, b)) if *c == at.0 && *b == at.1 => *b += 1,
                    _ => runs.push((at.0, at.1, at.1 + 1)),
                }
            }
        }
        let m = &mut self.metrics;
        for &(c, a, b) in &runs {
            self.blocks.update_range(c, a, b, |l, n| {
                l.loading += 1;
                if l.host == all {
                    m.hit_blocks_host += n as u64;
                } else {
                    m.hit_blocks_nvme += n as u64;
                }
            });
        }
        self.metrics.hit_requests += 1;
        self.metrics.hit_tokens += num_external_tokens as u64;
        if sync {
            self.metrics.loads_sync += 1;
        } else {
            self.metrics.loads_async += 1;
        }
        self.loads.insert(
            req_id.to_string(),
            Loading {
                keys: st.keys.clone(),
                lo,
                hi,
                ranges: runs,
                layout: self.blocks.layout(),
                reported: 0,
                failed: KeySet::default(),
            },
        );
        self.outbox.loads.push(LoadReq {
            req_id: req_id.to_string(),
            sync,
            blocks,
        });
        Ok(())
    }

    /// `request_finished`: plans parking of the request's new full blocks.
    /// Returns true when vLLM must keep the blocks until the save is reported.
    pub fn request_finished(
        &mut self,
        req: &RequestView<'_>,
        block_ids: &[u32],
        num_computed_tokens: u32,
        now: u64,
    ) -> Result<bool> {
        // vLLM only appends to a request's block hashes: the keys derived
        // when it was matched are a prefix of its keys now
        let keys = match self.reqs.remove(req.req_id) {
            Some(st) if st.keys.len() == req.num_hashes() => st.keys,
            Some(st) if st.keys.len() < req.num_hashes() => {
                req.keys_after(&self.model, &st.keys)?
            }
            _ => req.keys(&self.model)?,
        };
        let full = keys
            .len()
            .min(num_computed_tokens as usize / self.block_size as usize)
            .min(block_ids.len());
        if full < self.cfg.min_park_blocks as usize || full == 0 {
            return Ok(false);
        }
        let session = self.session_for(req, &keys[..full]);
        self.resumed.remove(req.req_id);
        self.last_seen.insert(session, now);
        if self.gpu_events {
            let h = req.hash_len;
            self.mark_gpu(session, &req.hashes[(full - 1) * h..full * h]);
        }
        let (to_host, to_nvme) = self.suspend_session(req, session, full, now);
        let mut blocks = Vec::new();
        // Blocks on NVMe only (every rank, none loading) are saved to host
        // again when the policy wants host: vLLM holds them now, and the
        // policy counts the host copy as the session's whole context.
        let all = self.all;
        let rehost =
            |l: &Loc| to_host && !l.doomed && l.loading == 0 && l.host == 0 && l.nvme == all;
        let indexed = self.blocks.present_where(&keys[..full], |l| !rehost(l));
        for (i, k) in keys[..full].iter().enumerate() {
            // parked already, held by some ranks only (being dropped, not
            // parked again) or being saved: nothing to save
            if indexed[i] || self.saving_keys.contains_key(k) {
                continue;
            }
            if block_ids[i] == 0 {
                return Err(Error::invalid(format!(
                    "request {:?}: block {i} is vLLM's null block",
                    req.req_id
                )));
            }
            blocks.push((*k, block_ids[i], i as u32));
        }
        if blocks.is_empty() || !to_host {
            if let Some(acts) = self.save_actions.remove(req.req_id) {
                for a in acts {
                    self.core.completed(now, &a, blocks.is_empty());
                }
            }
            return Ok(false);
        }
        self.metrics.saves += 1;
        self.metrics.save_blocks += blocks.len() as u64;
        let keys_saved: Vec<BlockKey> = blocks.iter().map(|b| b.0).collect();
        self.saving_keys
            .extend(keys_saved.iter().map(|&k| (k, session)));
        self.saving.insert(
            req.req_id.to_string(),
            Saving {
                keys: keys_saved,
                reported: 0,
                ok: true,
            },
        );
        if to_nvme {
            self.track_write_behind(req.req_id, &keys_saved_for(&blocks));
        }
        self.outbox.saves.push(SaveReq {
            req_id: req.req_id.to_string(),
            session,
            blocks,
            to_nvme,
        });
        Ok(true)
    }

    /// A save that also writes its blocks to NVMe: each block's write is a
    /// demotion whose outcome every rank reports (the write lands, or is
    /// skipped on a full disk, or the block was never parked), and the core
    /// planner's copy to NVMe completes when all are in, ok only if every
    /// write landed on every rank.
    fn track_write_behind(&mut self, req_id: &str, keys: &[BlockKey]) {
        let Some(acts) = self.save_actions.get_mut(req_id) else {
            return;
        };
        let nvme: Vec<usize> = acts
            .iter()
            .enumerate()
            .filter(|(_, a)| matches!(a, Action::Copy { to: Tier::Nvme, .. }))
            .map(|(i, _)| i)
            .collect();
        // One copy to NVMe per save (the delta of its session); anything
        // else completes with the save as before.
        let [i] = nvme[..] else {
            return;
        };
        let free: Vec<BlockKey> = keys
            .iter()
            .filter(|k| !self.pending.contains_key(&(MoveKind::Demote, **k)))
            .copied()
            .collect();
        if free.is_empty() {
            return;
        }
        let a = acts.remove(i);
        let id = self.next_action;
        self.next_action += 1;
        for k in &free {
            self.pending.insert(
                (MoveKind::Demote, *k),
                Pending {
                    reported: 0,
                    ok: true,
                    action: Some(id),
                },
            );
        }
        self.actions.insert(id, (a, free.len(), true));
    }

    /// Records one rank's outcome of a planned move (or write-behind); when
    /// every rank reported it, the core action it belongs to learns of it
    /// once all of that action's moves are in.
    fn settle(&mut self, kind: MoveKind, key: BlockKey, bit: u64, done: bool, now: u64) {
        let std::collections::hash_map::Entry::Occupied(mut e) = self.pending.entry((kind, key))
        else {
            return;
        };
        let p = e.get_mut();
        if p.reported & bit != 0 {
            return;
        }
        p.reported |= bit;
        p.ok &= done;
        if p.reported != self.all {
            return;
        }
        let p = e.remove();
        let waiting = self.waiters.remove(&(kind, key)).unwrap_or_default();
        for id in p.action.into_iter().chain(waiting) {
            self.action_moved(id, p.ok, now);
        }
    }

    /// One of action `id`'s moves ended (`ok`: done on every rank); the
    /// core planner learns of the action when all of them have.
    fn action_moved(&mut self, id: u64, ok: bool, now: u64) {
        if let Some(e) = self.actions.get_mut(&id) {
            e.1 -= 1;
            e.2 &= ok;
            if e.1 == 0 {
                let (a, _, ok) = self.actions.remove(&id).expect("present");
                self.prefetch_settled(&a, ok);
                self.core.completed(now, &a, ok);
            }
        }
    }

    /// Suspends `session` (now `full` blocks long) in the core planner and
    /// runs the moves it decides; returns which tiers the new blocks go to.
    fn suspend_session(
        &mut self,
        req: &RequestView<'_>,
        session: SessionId,
        full: usize,
        now: u64,
    ) -> (bool, bool) {
        let hint = core_hint(req.hint.as_ref());
        // Without a block size yet (none from vLLM's config, no worker
        // report), the policy still decides the tiers, on a nominal byte a
        // block; its copies are then failed, so no size is accounted until
        // the next suspend.
        let sized = self.block_bytes != 0;
        let bytes = full as u64 * self.block_bytes.max(1);
        let actions = self.core.suspend(now, session, bytes, &hint);
        if !sized {
            let mut to_nvme = false;
            for a in &actions {
                to_nvme |= matches!(
                    a,
                    Action::Copy {
                        from: None,
                        to: Tier::Nvme,
                        ..
                    }
                );
                self.core.completed(now, a, false);
            }
            // the mover parks through the host tier
            return (true, to_nvme);
        }
        let (mut to_host, mut to_nvme) = (false, false);
        let mut saves = Vec::new();
        for a in actions {
            match a {
                Action::Copy { from: None, to, .. } => {
                    to_host |= to == Tier::Host;
                    to_nvme |= to == Tier::Nvme;
                    saves.push(a);
                }
                other => self.apply_action(other, now),
            }
        }
        // The mover parks through the host tier: a save straight to NVMe
        // still passes through a host slot first.
        to_host |= to_nvme;
        self.save_actions
            .entry(req.req_id.to_string())
            .or_default()
            .extend(saves);
        (to_host, to_nvme)
    }

    /// Turns a session-level action of the core planner into block moves
    /// for the blocks the session owns. The core planner learns the action
    /// completed when every rank reported every one of its moves (ok when
    /// all were done), never when it is planned.
    fn apply_action(&mut self, a: Action, now: u64) {
        let (session, kind) = match &a {
            Action::Drop {
                session,
                tier: Tier::Host,
                ..
            } => (*session, MoveKind::EvictHost),
            Action::Drop {
                session,
                tier: Tier::Nvme,
                ..
            } => (*session, MoveKind::Drop),
            Action::Copy {
                session,
                from: Some(Tier::Host),
                to: Tier::Nvme,
                ..
            } => (*session, MoveKind::Demote),
            Action::Copy {
                session,
                from: Some(Tier::Nvme),
                to: Tier::Host,
                ..
            } => (*session, MoveKind::Promote),
            Action::Copy { .. } => {
                self.core.completed(now, &a, false);
                return;
            }
        };
        match kind {
            MoveKind::Promote => {
                self.metrics.prefetches += 1;
                self.prefetched.insert(session, false);
            }
            MoveKind::EvictHost | MoveKind::Drop => {
                if kind == MoveKind::EvictHost && self.prefetched.remove(&session).is_some() {
                    self.metrics.prefetch_wasted += 1;
                }
            }
            MoveKind::Demote => {}
        }
        let id = self.next_action;
        self.next_action += 1;
        let chain = self.blocks.chain_of(session);
        let (mut planned, mut there) = (0, true);
        for (k, l) in chain {
            // Per rank: the move is wanted where that rank's copy needs it.
            let wanted = match kind {
                MoveKind::EvictHost => l.host != 0,
                // only blocks without a host copy: the NVMe copy of a block
                // also in host memory goes when the store collects it
                MoveKind::Drop => l.nvme & !l.host != 0,
                MoveKind::Demote => l.host & !l.nvme != 0,
                MoveKind::Promote => l.nvme & !l.host != 0,
            };
            if !wanted {
                continue;
            }
            if l.loading > 0 {
                there = false;
                continue;
            }
            if self.plan_move(kind, k, Some(id)) {
                planned += 1;
            } else {
                // the same move is in flight for an earlier action: this
                // one ends with it (failing it now made the policy ask
                // again at once, at the same instant, forever)
                self.waiters.entry((kind, k)).or_default().push(id);
                planned += 1;
            }
        }
        if planned == 0 {
            // Nothing to move: done exactly when the blocks are already there.
            self.prefetch_settled(&a, there);
            self.core.completed(now, &a, there);
        } else {
            self.actions.insert(id, (a, planned, there));
        }
    }

    /// A prefetch (NVMe → host copy) of the policy ended: whole on host
    /// (`ok`), or wasted.
    fn prefetch_settled(&mut self, a: &Action, ok: bool) {
        if let Action::Copy {
            session,
            from: Some(Tier::Nvme),
            to: Tier::Host,
            ..
        } = a
        {
            if let Some(done) = self.prefetched.get_mut(session) {
                if ok {
                    *done = true;
                } else {
                    self.prefetched.remove(session);
                    self.metrics.prefetch_wasted += 1;
                }
            }
        }
    }

    /// The runtime will report the GPU prefix cache's evictions (vLLM's
    /// KV-cache events, [`Self::gpu_removed`]): the policy may then count
    /// on them ([`PolicyEnv::gpu_reports`]; the kvpark policies keep host
    /// for the contexts the GPU gave up and prefetch those). Sessions
    /// parked before it (recovered at start) count as given up: the GPU
    /// cache of a starting engine holds nothing of them.
    pub fn hear_gpu_events(&mut self) {
        if self.gpu_events {
            return;
        }
        self.gpu_events = true;
        self.metrics.gpu_events = 1;
        self.core.hear_gpu_reports();
        for s in self.blocks.sessions().into_iter().filter(|&s| s != 0) {
            self.core.gpu_dropped(s);
        }
    }

    fn mark_gpu(&mut self, s: SessionId, hash: &[u8]) {
        self.unmark_gpu(s);
        let h = Self::event_id(hash);
        if let Some(old) = self.gpu_marks.insert(h, s) {
            // another session's deepest block too (a fork): the newer
            // suspend owns it
            self.gpu_mark_of.remove(&old);
        }
        self.gpu_mark_of.insert(s, h);
    }

    fn unmark_gpu(&mut self, s: SessionId) {
        if let Some(h) = self.gpu_mark_of.remove(&s) {
            self.gpu_marks.remove(&h);
        }
    }

    /// The id vLLM's KV-cache events give a block hash (`BlockRemoved`):
    /// its last 8 bytes as a big-endian integer, the whole hash when shorter
    /// (vLLM's `maybe_convert_block_hash`; its events carry these integers
    /// by default).
    pub fn event_id(hash: &[u8]) -> u64 {
        hash[hash.len().saturating_sub(8)..]
            .iter()
            .fold(0, |a, &b| (a << 8) | u64::from(b))
    }

    /// vLLM's GPU prefix cache removed these blocks (their
    /// [`Self::event_id`]s). A suspended session whose deepest parked block
    /// is among them has its context given up: the policy hears it at the
    /// next tick. Returns the number of such sessions.
    pub fn gpu_removed(&mut self, ids: &[u64]) -> u64 {
        let mut n = 0;
        for id in ids {
            self.metrics.gpu_removed_blocks += 1;
            if let Some(s) = self.gpu_marks.remove(id) {
                self.gpu_mark_of.remove(&s);
                self.core.gpu_dropped(s);
                n += 1;
            }
        }
        self.metrics.gpu_dropped_sessions += n;
        n
    }

    /// vLLM cleared its whole GPU prefix cache (`AllBlocksCleared`): every
    /// suspended session's context is gone from the GPU. Returns their number.
    pub fn gpu_cleared(&mut self) -> u64 {
        let n = self.gpu_mark_of.len() as u64;
        for (s, _) in std::mem::take(&mut self.gpu_mark_of) {
            self.core.gpu_dropped(s);
        }
        self.gpu_marks.clear();
        self.metrics.gpu_dropped_sessions += n;
        n
    }

    /// The bytes of one block on one rank, as vLLM's KV cache config gives
    /// them, before any worker reported them: without it the sessions
    /// parked before the first report are not in the policy's accounting.
    /// A worker's report always wins (a mismatch is logged once).
    pub fn expect_block_bytes(&mut self, bytes: u64) {
        if !self.block_bytes_reported && bytes > 0 {
            self.block_bytes = bytes;
            self.metrics.block_bytes = bytes;
        }
    }

    /// When the policy next has time-driven work (a checkpoint, a
    /// demotion), on the clock of `now_ns`; `None`: nothing scheduled.
    pub fn next_wakeup(&self) -> Option<u64> {
        self.core.next_wakeup()
    }

    /// The policy's time-driven work due by `now` as a plan of tier moves
    /// only (empty bytes when there is none), for a caller that runs it
    /// on the workers while the engine is idle: vLLM calls
    /// [`BlockPlanner::build_meta`] only while it has requests, so without
    /// this a prefetch due during an idle gap would wait for the next
    /// request. Saves and loads stay for the next `build_meta`; the moves
    /// are tracked and settle on the workers' reports as any others.
    pub fn tick_moves(&mut self, now: u64) -> Vec<u8> {
        let plan = self.tick_plan(now);
        if plan.moves.is_empty() {
            return Vec::new();
        }
        plan.encode()
    }

    /// [`Self::tick_moves`], not encoded (empty moves when there are none).
    pub fn tick_plan(&mut self, now: u64) -> Plan {
        for a in self.core.tick(now) {
            self.apply_action(a, now);
        }
        if self.outbox.moves.is_empty() {
            return Plan::default();
        }
        self.metrics.idle_plans += 1;
        Plan {
            step: self.step,
            moves: std::mem::take(&mut self.outbox.moves),
            ..Plan::default()
        }
    }

    /// Plans a block move unless the same move is already waiting for its
    /// outcomes; returns whether it was planned.
    fn plan_move(&mut self, kind: MoveKind, k: BlockKey, action: Option<u64>) -> bool {
        if self.pending.contains_key(&(kind, k)) {
            return false;
        }
        self.pending.insert(
            (kind, k),
            Pending {
                reported: 0,
                ok: true,
                action,
            },
        );
        self.outbox.moves.push((kind, k));
        self.metrics.moves += 1;
        true
    }

    /// `build_connector_meta`: this step's plan, encoded.
    pub fn build_meta(&mut self, now: u64) -> Vec<u8> {
        self.take_plan(now).encode()
    }

    /// [`Self::build_meta`], not encoded.
    pub fn take_plan(&mut self, now: u64) -> Plan {
        self.step += 1;
        for a in self.core.tick(now) {
            self.apply_action(a, now);
        }
        // Blocks some rank lost: drop them where they remain (not while a
        // save of them is still being reported, nor while a load reads them).
        let partial: Vec<BlockKey> = self
            .partial
            .iter()
            .filter(|k| !self.saving_keys.contains_key(k))
            .filter(|k| self.blocks.get(k).is_some_and(|l| l.loading == 0))
            .copied()
            .collect();
        for k in partial {
            self.plan_move(MoveKind::Drop, k, None);
        }
        // Blocks whose load failed: dropped on every rank, once.
        let doomed: Vec<BlockKey> = self
            .doomed
            .iter()
            .filter(|k| !self.saving_keys.contains_key(k))
            .filter(|k| self.blocks.get(k).map_or(true, |l| l.loading == 0))
            .copied()
            .collect();
        for k in doomed {
            self.doomed.remove(&k);
            if self.blocks.contains(&k) {
                self.plan_move(MoveKind::Drop, k, None);
            }
        }
        if self.step % 1024 == 0 {
            self.end_idle_sessions(now);
        }
        let mut plan = std::mem::take(&mut self.outbox);
        plan.step = self.step;
        plan
    }

    /// Ends sessions idle longer than `session_ttl`: their blocks are dropped.
    fn end_idle_sessions(&mut self, now: u64) {
        let ttl = self.cfg.session_ttl_ns;
        let idle: Vec<SessionId> = self
            .last_seen
            .iter()
            .filter(|(_, &t)| now.saturating_sub(t) > ttl)
            .map(|(&s, _)| s)
            .collect();
        for s in idle {
            self.last_seen.remove(&s);
            for a in self.core.end(now, s) {
                self.apply_action(a, now);
            }
            for (k, l) in self.blocks.detach(s) {
                if l.loading == 0 {
                    self.plan_move(MoveKind::Drop, k, None);
                }
            }
            if self.prefetched.remove(&s).is_some() {
                self.metrics.prefetch_wasted += 1;
            }
            self.metrics.sessions_ended += 1;
        }
    }

    /// Queues a tier move for the workers (tracked like the policy's).
    pub fn push_move(&mut self, kind: MoveKind, key: BlockKey) {
        self.plan_move(kind, key, None);
    }

    /// `update_connector_output`: one rank's report. Its tier changes are
    /// applied in order to that rank's bits; saves, loads and moves settle
    /// once every rank reported them.
    pub fn on_report(&mut self, bytes: &[u8], now: u64) -> Result<()> {
        self.apply_report(Report::decode(bytes)?, now)
    }

    /// [`Self::on_report`] of a decoded report.
    pub fn apply_report(&mut self, r: Report, now: u64) -> Result<()> {
        let Some(rank) = self.local_rank(r.rank) else {
            return Err(Error::invalid(format!(
                "report from rank {}, but the planner plans for ranks {}..{}",
                r.rank,
                self.first_rank,
                self.first_rank + self.world
            )));
        };
        let bit = 1u64 << rank;
        if r.block_bytes != 0 {
            if self.block_bytes != 0
                && self.block_bytes != r.block_bytes
                && !self.block_bytes_reported
            {
                log::warn!(
                    "kvpark: rank {rank} reports {} bytes per block, vLLM's KV cache config implied {}; using the rank's",
                    r.block_bytes,
                    self.block_bytes
                );
            }
            self.block_bytes_reported = true;
            self.block_bytes = r.block_bytes;
            self.metrics.block_bytes = r.block_bytes;
        }
        // (a report lists a session's blocks in chain order: each is
        // looked for right after the one before it first)
        let mut near = None;
        for (change, k) in &r.tiers {
            let (host, nvme) = match change {
                TierChange::OnHost => (Some(true), None),
                TierChange::LeftHost => (Some(false), None),
                TierChange::OnNvme => (None, Some(true)),
                TierChange::LeftNvme => (None, Some(false)),
                TierChange::Lost => (Some(false), Some(false)),
            };
            near = self.set_rank(near, k, rank, host, nvme);
        }
        for s in r.saved {
            // a block this rank did not park is not written to its NVMe either
            for k in &s.failed {
                self.settle(MoveKind::Demote, *k, bit, false, now);
            }
            let Some(sv) = self.saving.get_mut(&s.req_id) else {
                continue;
            };
            if sv.reported & bit != 0 {
                continue;
            }
            sv.reported |= bit;
            sv.ok &= !s.ok.is_empty();
            if sv.reported != self.all {
                continue;
            }
            let sv = self.saving.remove(&s.req_id).expect("present");
            for k in &sv.keys {
                self.saving_keys.remove(k);
            }
            let parked = sv
                .keys
                .iter()
                .filter(|k| self.blocks.get(k).is_some_and(|l| self.loadable(&l)))
                .count() as u64;
            self.metrics.saved_blocks += parked;
            self.metrics.save_failed_blocks += sv.keys.len() as u64 - parked;
            if let Some(acts) = self.save_actions.remove(&s.req_id) {
                for a in acts {
                    self.core.completed(now, &a, sv.ok);
                }
            }
        }
        for l in r.loaded {
            let Some(ld) = self.loads.get_mut(&l.req_id) else {
                continue;
            };
            if ld.reported & bit != 0 {
                continue;
            }
            ld.reported |= bit;
            // only keys of this load count (a report is outside bytes)
            ld.failed.extend(
                l.failed
                    .into_iter()
                    .filter(|k| ld.keys[ld.lo..ld.hi].contains(k)),
            );
            if ld.reported != self.all {
                continue;
            }
            let ld = self.loads.remove(&l.req_id).expect("present");
            if ld.layout == self.blocks.layout() {
                for &(c, a, b) in &ld.ranges {
                    self.blocks.update_range(c, a, b, |loc, _| {
                        loc.loading = loc.loading.saturating_sub(1)
                    });
                }
            } else {
                for k in &ld.keys[ld.lo..ld.hi] {
                    self.blocks
                        .update(k, |loc| loc.loading = loc.loading.saturating_sub(1));
                }
            }
            for k in &ld.failed {
                let newly = self
                    .blocks
                    .update(k, |loc| !std::mem::replace(&mut loc.doomed, true));
                if newly == Some(true) {
                    self.doomed.insert(*k);
                }
            }
            self.metrics.load_failed_blocks += ld.failed.len() as u64;
            self.metrics.loaded_blocks += (ld.hi - ld.lo - ld.failed.len()) as u64;
        }
        for m in r.moved {
            match &m.outcome {
                Outcome::Done => self.metrics.moves_done += 1,
                Outcome::Skipped(_) => self.metrics.moves_skipped += 1,
                Outcome::Failed(_) => self.metrics.moves_failed += 1,
            }
            self.settle(m.kind, m.key, bit, m.outcome.is_done(), now);
        }
        Ok(())
    }

    /// Sets (local) rank `rank`'s host and/or NVMe bit of `k` (a new block is
    /// recorded under the session of its save in flight). This is the only
    /// place tier bits change, so it keeps the per-tier counts and the set of
    /// partial blocks, and metrics never scan the index (they are read every
    /// step). A block no rank holds is forgotten.
    fn set_rank(
        &mut self,
        near: Option<Pos>,
        k: &BlockKey,
        rank: u32,
        host: Option<bool>,
        nvme: Option<bool>,
    ) -> Option<Pos> {
        let bit = 1u64 << rank;
        let all = self.all;
        let set = |m: &mut u64, v: Option<bool>| match v {
            Some(true) => *m |= bit,
            Some(false) => *m &= !bit,
            None => {}
        };
        let change = |l: &mut Loc| {
            let before = (l.host == all, l.nvme == all, l.host | l.nvme == all);
            set(&mut l.host, host);
            set(&mut l.nvme, nvme);
            let after = (l.host == all, l.nvme == all, l.host | l.nvme == all);
            (before, after, l.host | l.nvme != 0)
        };
        let (changed, at) = match self.blocks.update_near(near, k, change) {
            Some((c, at)) => (c, Some(at)),
            None => {
                if host != Some(true) && nvme != Some(true) {
                    return None;
                }
                // (a block of no save in flight goes to session 0's chain,
                // which no policy action names)
                let session = self.saving_keys.get(k).copied().unwrap_or(0);
                let mut l = Loc {
                    host: 0,
                    nvme: 0,
                    session,
                    loading: 0,
                    doomed: false,
                };
                let c = change(&mut l);
                self.blocks.insert(*k, l);
                (c, None)
            }
        };
        let (before, after, held) = changed;
        let m = &mut self.metrics;
        let step = |c: &mut u64, b: bool, a: bool| {
            if a && !b {
                *c += 1;
            } else if b && !a {
                *c -= 1;
            }
        };
        step(&mut m.parked_host_blocks, before.0, after.0);
        step(&mut m.parked_nvme_blocks, before.1, after.1);
        step(&mut m.parked_blocks, before.2, after.2);
        let mut at = at;
        if !held {
            self.blocks.remove(k);
            self.partial.remove(k);
            self.doomed.remove(k);
            // (a removal may move positions)
            at = None;
        } else if after.2 {
            if !self.partial.is_empty() {
                self.partial.remove(k);
            }
        } else {
            self.partial.insert(*k);
        }
        self.metrics.partial_blocks = self.partial.len() as u64;
        at
    }

    /// Where the planner believes `k` lives: (ranks with a host copy, ranks
    /// with an NVMe copy) as bit masks; `None` when no rank holds it.
    pub fn whereabouts(&self, k: &BlockKey) -> Option<(u64, u64)> {
        self.blocks.get(k).map(|l| (l.host, l.nvme))
    }

    /// [`Self::whereabouts`] of each of `keys` (fastest for keys in chain order).
    pub fn whereabouts_of(&self, keys: &[BlockKey]) -> Vec<Option<(u64, u64)>> {
        let mut near = None;
        keys.iter()
            .map(|k| {
                let found = self.blocks.get_near(near, k);
                near = found.map(|f| f.1);
                found.map(|(l, _)| (l.host, l.nvme))
            })
            .collect()
    }

    /// Every block some rank holds, with [`Self::whereabouts`].
    pub fn all_whereabouts(&self) -> Vec<(BlockKey, u64, u64)> {
        self.blocks
            .iter()
            .map(|(k, l)| (k, l.host, l.nvme))
            .collect()
    }

    /// Planned moves still waiting for some rank's outcome.
    pub fn moves_in_flight(&self) -> usize {
        self.pending.len()
    }

    /// Metrics snapshot.
    pub fn metrics(&mut self) -> PlannerMetrics {
        let all = self.all;
        debug_assert_eq!(
            (
                self.metrics.parked_host_blocks,
                self.metrics.parked_nvme_blocks,
                self.metrics.parked_blocks,
            ),
            self.blocks.iter().fold((0, 0, 0), |(h, n, p), (_, l)| (
                h + (l.host == all) as u64,
                n + (l.nvme == all) as u64,
                p + (l.host | l.nvme == all) as u64
            )),
            "per-tier counts drifted from the index"
        );
        if let Some(c) = self.core.calibration() {
            self.metrics.predicted_gaps = c.gaps;
            self.metrics.gaps_below_p50 = c.below_p50;
            self.metrics.gaps_below_p90 = c.below_p90;
        }
        let (h, n) = self.core.occupancy();
        self.metrics.planned_host_bytes = h;
        self.metrics.planned_nvme_bytes = n;
        self.metrics.clone()
    }

    /// Number of blocks kvpark can load (every rank holds them).
    pub fn parked_blocks(&self) -> usize {
        self.metrics.parked_blocks as usize
    }

    /// Heap bytes of the block index (lookup table, chains' keys and
    /// runs), by capacity: what [`Self::parked_blocks`] costs in memory.
    pub fn index_heap_bytes(&self) -> usize {
        self.blocks.heap_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{LoadDone, SaveDone};

    const BS: u32 = 16;

    fn hashes(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .flat_map(|i| [seed, i as u8, 0, 0, 0, 0, 0, 0])
            .collect()
    }

    fn view<'a>(id: &'a str, salt: &'a [u8], h: &'a [u8]) -> RequestView<'a> {
        RequestView {
            req_id: id,
            salt,
            hashes: h,
            hash_len: 8,
            hint: None,
        }
    }

    /// Parks `n` blocks of `h` under `salt` through the full save round trip.
    fn park(p: &mut BlockPlanner, id: &str, salt: &[u8], h: &[u8], n: usize) -> Vec<BlockKey> {
        let ids: Vec<u32> = (1..=n as u32).collect();
        let delay = p
            .request_finished(&view(id, salt, h), &ids, n as u32 * BS, 10)
            .unwrap();
        assert!(delay);
        let plan = Plan::decode(&p.build_meta(10)).unwrap();
        assert_eq!(plan.saves.len(), 1);
        let keys: Vec<BlockKey> = plan.saves[0].blocks.iter().map(|b| b.0).collect();
        assert_eq!(keys.len(), n);
        let rep = Report {
            block_bytes: 4096,
            saved: vec![SaveDone {
                req_id: id.into(),
                ok: keys.clone(),
                failed: vec![],
            }],
            tiers: keys.iter().map(|&k| (TierChange::OnHost, k)).collect(),
            ..Default::default()
        };
        p.on_report(&rep.encode(), 11).unwrap();
        keys
    }

    /// Session "a" parks the 4 blocks of `h`; request "b" matches them
    /// and its load is planned (the worker has not answered yet).
    fn parked_and_loading(p: &mut BlockPlanner, h: &[u8]) -> Vec<BlockKey> {
        let keys = park(p, "a", b"", h, 4);
        p.match_request(&view("b", b"", h), 0, 5 * BS, 20).unwrap();
        p.on_alloc("b", &[1, 2, 3, 4, 5], 4 * BS).unwrap();
        keys
    }

    #[test]
    fn blocks_on_nvme_only_are_saved_to_host_again_when_the_policy_wants_host() {
        let mut p = BlockPlanner::new(Config::default(), BS).unwrap();
        let h = hashes(5, 6);
        let keys = park(&mut p, "a", b"", &h[..4 * 8], 4);
        // the worker wrote them to NVMe, then evicted the host copies
        let mut r = Report {
            block_bytes: 4096,
            ..Report::default()
        };
        for k in &keys {
            r.tier(TierChange::OnNvme, *k);
        }
        for k in &keys[1..] {
            r.tier(TierChange::LeftHost, *k);
        }
        p.on_report(&r.encode(), 12).unwrap();
        assert_eq!(p.whereabouts(&keys[0]), Some((1, 1)));
        assert_eq!(p.whereabouts(&keys[1]), Some((0, 1)));
        // the session's next turn ends with 5 blocks: the policy saves to
        // host, so the three NVMe-only blocks go with the new one
        let ids: Vec<u32> = (1..=5).collect();
        assert!(p
            .request_finished(&view("b", b"", &h), &ids, 5 * BS, 20)
            .unwrap());
        let plan = p.take_plan(20);
        let saved: Vec<BlockKey> = plan.saves[0].blocks.iter().map(|b| b.0).collect();
        assert_eq!(&saved[..3], &keys[1..]);
        assert_eq!(saved.len(), 4);
        assert!(!saved.contains(&keys[0]));
    }

    #[test]
    fn a_finished_request_parks_the_keys_of_all_its_blocks_matched_or_not() {
        // matched with 3 blocks, finished with 7 (decoding filled 4 more):
        // the keys derived at the match are reused and the rest derived
        let model = ModelNs::of("");
        let h = hashes(7, 4);
        let mut p = BlockPlanner::new(Config::default(), BS).unwrap();
        p.match_request(&view("r", b"salt", &h[..3 * 8]), 0, 3 * BS + 1, 1)
            .unwrap();
        let ids: Vec<u32> = (1..=7).collect();
        assert!(p
            .request_finished(&view("r", b"salt", &h), &ids, 7 * BS, 2)
            .unwrap());
        let plan = p.take_plan(2);
        let got: Vec<BlockKey> = plan.saves[0].blocks.iter().map(|b| b.0).collect();
        let want: Vec<BlockKey> = view("r", b"salt", &h).keys(&model).unwrap().to_vec();
        assert_eq!(got, want);
        // and a fresh planner derives the very same keys from scratch
        let mut q = BlockPlanner::new(Config::default(), BS).unwrap();
        q.request_finished(&view("r", b"salt", &h), &ids, 7 * BS, 2)
            .unwrap();
        let fresh: Vec<BlockKey> = q.take_plan(2).saves[0].blocks.iter().map(|b| b.0).collect();
        assert_eq!(fresh, want);
    }

    #[test]
    fn saved_blocks_become_hits_beyond_the_local_hit() {
        let mut p = BlockPlanner::new(Config::default(), BS).unwrap();
        let h = hashes(8, 1);
        park(&mut p, "a", b"", &h, 8);
        // next turn: 8 full blocks + a partial one; vLLM itself still has 2 blocks
        let m = p
            .match_request(&view("b", b"", &h), 2 * BS, 8 * BS + 5, 20)
            .unwrap();
        assert_eq!(
            m,
            Match {
                external_tokens: 6 * BS,
                load_async: false
            }
        );
        p.on_alloc("b", &(100..109).collect::<Vec<u32>>(), 6 * BS)
            .unwrap();
        let plan = Plan::decode(&p.build_meta(20)).unwrap();
        assert_eq!(plan.loads.len(), 1);
        let l = &plan.loads[0];
        assert!(l.sync);
        assert_eq!(
            l.blocks.iter().map(|b| b.1).collect::<Vec<_>>(),
            (102..108).collect::<Vec<u32>>()
        );
        assert_eq!(p.metrics().hit_tokens, 6 * BS as u64);
    }

    #[test]
    fn leaves_one_token_to_compute() {
        let mut p = BlockPlanner::new(Config::default(), BS).unwrap();
        let h = hashes(4, 2);
        park(&mut p, "a", b"", &h, 4);
        // prompt is exactly 4 full blocks: only 3 may be loaded
        let m = p.match_request(&view("b", b"", &h), 0, 4 * BS, 20).unwrap();
        assert_eq!(m.external_tokens, 3 * BS);
    }

    #[test]
    fn never_a_hit_across_salts() {
        let mut p = BlockPlanner::new(Config::default(), BS).unwrap();
        let h = hashes(4, 3);
        park(&mut p, "a", b"tenant-1", &h, 4);
        let m = p
            .match_request(&view("b", b"tenant-2", &h), 0, 5 * BS, 20)
            .unwrap();
        assert_eq!(m.external_tokens, 0);
        let m = p.match_request(&view("c", b"", &h), 0, 5 * BS, 20).unwrap();
        assert_eq!(m.external_tokens, 0);
        let m = p
            .match_request(&view("d", b"tenant-1", &h), 0, 5 * BS, 20)
            .unwrap();
        assert_eq!(m.external_tokens, 4 * BS);
    }

    #[test]
    fn nvme_only_or_over_budget_loads_async() {
        let cfg = Config {
            sync_load_budget_bytes: 3 * 4096,
            ..Config::default()
        };
        let mut p = BlockPlanner::new(cfg, BS).unwrap();
        let h = hashes(6, 4);
        let keys = park(&mut p, "a", b"", &h, 6);
        let m = p.match_request(&view("b", b"", &h), 0, 7 * BS, 20).unwrap();
        assert!(
            m.load_async,
            "6 blocks of 4 KiB exceed a 12 KiB sync budget"
        );
        let m = p
            .match_request(&view("b", b"", &h), 3 * BS, 7 * BS, 20)
            .unwrap();
        assert!(!m.load_async, "3 blocks fit");
        // block 4 leaves the host but is on NVMe: async again
        let rep = Report {
            tiers: vec![
                (TierChange::OnNvme, keys[4]),
                (TierChange::LeftHost, keys[4]),
            ],
            ..Default::default()
        };
        p.on_report(&rep.encode(), 30).unwrap();
        let m = p
            .match_request(&view("b", b"", &h), 3 * BS, 7 * BS, 31)
            .unwrap();
        assert_eq!(
            m,
            Match {
                external_tokens: 3 * BS,
                load_async: true
            }
        );
        let mt = p.metrics();
        assert_eq!(
            (
                mt.parked_blocks,
                mt.parked_host_blocks,
                mt.parked_nvme_blocks
            ),
            (6, 5, 1)
        );
        // a block that leaves its last tier is forgotten, and counted so
        // (ordered: block 0 leaves the host, block 4 is lost)
        let rep = Report {
            tiers: vec![(TierChange::Lost, keys[4]), (TierChange::LeftHost, keys[0])],
            ..Default::default()
        };
        p.on_report(&rep.encode(), 32).unwrap();
        let mt = p.metrics();
        assert_eq!(
            (
                mt.parked_blocks,
                mt.parked_host_blocks,
                mt.parked_nvme_blocks
            ),
            (4, 4, 0)
        );
    }

    #[test]
    fn a_failed_load_of_a_block_the_worker_still_holds_is_never_offered_again() {
        // A loader that failed (a panic, an I/O error) keeps the bytes and
        // reports no tier change: offering the block again would retry the
        // same failure forever (vLLM reschedules the request each time).
        let mut p = BlockPlanner::new(Config::default(), BS).unwrap();
        let h = hashes(4, 5);
        let keys = parked_and_loading(&mut p, &h);
        let rep = Report {
            loaded: vec![LoadDone {
                req_id: "b".into(),
                failed: vec![keys[1], keys[3]],
            }],
            ..Default::default()
        };
        p.on_report(&rep.encode(), 21).unwrap();
        let m = p.match_request(&view("c", b"", &h), 0, 5 * BS, 22).unwrap();
        assert_eq!(
            m.external_tokens, BS,
            "the chain stops at the first failed block"
        );
        // the next plan drops both failed blocks, once
        let plan = Plan::decode(&p.build_meta(23)).unwrap();
        let mut drops: Vec<BlockKey> = plan
            .moves
            .iter()
            .filter(|m| m.0 == MoveKind::Drop)
            .map(|m| m.1)
            .collect();
        drops.sort();
        let mut want = vec![keys[1], keys[3]];
        want.sort();
        assert_eq!(drops, want);
        let again = Plan::decode(&p.build_meta(24)).unwrap();
        assert!(again.moves.iter().all(|m| m.0 != MoveKind::Drop));
        // the worker dropped them: the planner forgets them
        let rep = Report {
            tiers: vec![(TierChange::Lost, keys[1]), (TierChange::Lost, keys[3])],
            ..Default::default()
        };
        p.on_report(&rep.encode(), 25).unwrap();
        assert_eq!(p.metrics().parked_blocks, 2);
    }

    #[test]
    fn failed_loads_are_forgotten_and_unsaved_blocks_no_hit() {
        let mut p = BlockPlanner::new(Config::default(), BS).unwrap();
        let h = hashes(4, 5);
        let keys = parked_and_loading(&mut p, &h);
        // the worker found block 2's record corrupt: it failed the load and
        // lost the block
        let rep = Report {
            loaded: vec![LoadDone {
                req_id: "b".into(),
                failed: vec![keys[2]],
            }],
            tiers: vec![(TierChange::Lost, keys[2])],
            ..Default::default()
        };
        p.on_report(&rep.encode(), 21).unwrap();
        let m = p.match_request(&view("c", b"", &h), 0, 5 * BS, 22).unwrap();
        assert_eq!(m.external_tokens, 2 * BS, "chain stops at the lost block");
        assert_eq!(p.metrics().load_failed_blocks, 1);

        // a save still in flight is not a hit, and is not planned twice
        let h2 = hashes(3, 6);
        assert!(p
            .request_finished(&view("x", b"", &h2), &[7, 8, 9], 3 * BS, 30)
            .unwrap());
        assert_eq!(
            p.match_request(&view("y", b"", &h2), 0, 4 * BS, 31)
                .unwrap()
                .external_tokens,
            0
        );
        assert!(!p
            .request_finished(&view("z", b"", &h2), &[7, 8, 9], 3 * BS, 32)
            .unwrap());
    }

    #[test]
    fn only_computed_blocks_are_parked() {
        let mut p = BlockPlanner::new(Config::default(), BS).unwrap();
        let h = hashes(4, 7);
        // 4 hashes, but only 3 blocks' KV was computed (the last sampled token has no KV)
        assert!(p
            .request_finished(&view("a", b"", &h), &[1, 2, 3, 4], 4 * BS - 1, 1)
            .unwrap());
        let plan = Plan::decode(&p.build_meta(1)).unwrap();
        assert_eq!(plan.saves[0].blocks.len(), 3);
    }

    #[test]
    fn bad_input_is_an_error() {
        let mut p = BlockPlanner::new(Config::default(), BS).unwrap();
        let h = hashes(2, 8);
        assert!(p.match_request(&view("a", b"", &h), 5, 40, 0).is_err());
        assert!(p.on_alloc("never-matched", &[1], BS).is_err());
        let odd = RequestView {
            hash_len: 7,
            ..view("a", b"", &h)
        };
        assert!(p.match_request(&odd, 0, 40, 0).is_err());
        assert!(RequestHint::parse(br#"{"awaiting":"lunch"}"#).is_err());
        assert!(RequestHint::parse(br#"{"sesion":"x"}"#).is_err());
        assert!(BlockPlanner::new(Config::default(), 0).is_err());
    }

    #[test]
    fn hinted_sessions_are_stable() {
        let mut p = BlockPlanner::new(Config::default(), BS).unwrap();
        let h = hashes(2, 9);
        let mut v = view("a", b"", &h);
        v.hint = Some(RequestHint {
            session: Some("s-1".into()),
            ..Default::default()
        });
        p.request_finished(&v, &[1, 2], 2 * BS, 0).unwrap();
        let plan = Plan::decode(&p.build_meta(0)).unwrap();
        let s1 = plan.saves[0].session;
        let h2 = hashes(2, 10);
        let mut v2 = view("b", b"", &h2);
        v2.hint = Some(RequestHint {
            session: Some("s-1".into()),
            ..Default::default()
        });
        p.request_finished(&v2, &[3, 4], 2 * BS, 0).unwrap();
        let plan = Plan::decode(&p.build_meta(0)).unwrap();
        assert_eq!(plan.saves[0].session, s1);
    }
}

/// The keys of a save's blocks.
fn keys_saved_for(blocks: &[(BlockKey, u32, u32)]) -> Vec<BlockKey> {
    blocks.iter().map(|b| b.0).collect()
}

/// The core planner's hint from the harness's.
fn core_hint(h: Option<&RequestHint>) -> Hint {
    let Some(h) = h else {
        return Hint::default();
    };
    Hint {
        awaiting: match h.awaiting.as_deref() {
            Some("tool") => Awaiting::Tool,
            Some("user") => Awaiting::User,
            _ => Awaiting::Unknown,
        },
        tool: h.tool.clone(),
    }
}

#[cfg(test)]
mod policy_tests {
    use super::*;

    pub(super) const BS: u32 = 16;
    pub(super) const BLOCK: u64 = 4096;

    pub(super) fn hashes(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .flat_map(|i| [seed, i as u8, 9, 9, 9, 9, 9, 9])
            .collect()
    }

    fn finish(p: &mut BlockPlanner, id: &str, h: &[u8], n: usize, now: u64) -> Plan {
        let v = RequestView {
            req_id: id,
            salt: b"",
            hashes: h,
            hash_len: 8,
            hint: None,
        };
        let ids: Vec<u32> = (1..=n as u32).collect();
        p.request_finished(&v, &ids, n as u32 * BS, now).unwrap();
        let plan = Plan::decode(&p.build_meta(now)).unwrap();
        // the worker confirms every save (and its write-through)
        p.on_report(&Report::all_done(&plan, BLOCK).encode(), now)
            .unwrap();
        plan
    }

    #[test]
    fn host_capacity_is_enforced_by_the_policy_through_evictions() {
        // room for 6 blocks on host, host-only policy
        let cfg = Config {
            host_bytes: 6 * BLOCK,
            policy: "vllm-offload".into(),
            ..Config::default()
        };
        let mut p = BlockPlanner::new(cfg, BS).unwrap();
        // teach the planner the block size (first report)
        finish(&mut p, "warm", &hashes(1, 99), 1, 1);
        let a = finish(&mut p, "a", &hashes(4, 1), 4, 10);
        assert_eq!(a.saves[0].blocks.len(), 4);
        assert!(!a.saves[0].to_nvme, "host-only policy never writes NVMe");
        // session b needs 4 more blocks: the oldest session goes (LRU), as block moves
        let b = finish(&mut p, "b", &hashes(4, 2), 4, 20);
        assert_eq!(b.saves[0].blocks.len(), 4);
        let evicted: Vec<_> = b
            .moves
            .iter()
            .filter(|m| m.0 == MoveKind::EvictHost)
            .collect();
        assert!(!evicted.is_empty(), "moves: {:?}", b.moves);
        let m = p.metrics();
        assert!(m.planned_host_bytes <= 6 * BLOCK, "{m:?}");
    }

    #[test]
    fn write_through_policy_saves_to_nvme_when_configured() {
        let dir = std::env::temp_dir();
        let cfg = Config {
            nvme_dir: Some(dir),
            policy: "lmcache-lru".into(),
            ..Config::default()
        };
        let mut p = BlockPlanner::new(cfg, BS).unwrap();
        finish(&mut p, "warm", &hashes(1, 98), 1, 1);
        let a = finish(&mut p, "a", &hashes(3, 3), 3, 10);
        assert!(a.saves[0].to_nvme);
        let cfg = Config {
            policy: "vllm-offload:arc".into(),
            ..Config::default()
        };
        let mut p = BlockPlanner::new(cfg, BS).unwrap();
        finish(&mut p, "warm", &hashes(1, 98), 1, 1);
        let a = finish(&mut p, "a", &hashes(3, 3), 3, 10);
        assert!(!a.saves[0].to_nvme);
        assert!(Config::from_json(br#"{"policy":"oracle"}"#).is_err());
        // kvpark writes every suspend's new blocks through to NVMe, its
        // no-nvme ablation never; knobs come from the "kvpark" object
        for (policy, nvme) in [("kvpark", true), ("kvpark:no-nvme", false)] {
            let cfg = Config::from_json(
                format!(
                    r#"{{"policy":"{policy}","nvme_dir":{:?},"kvpark":{{"prefetch_margin":4,"check_every":"2s"}}}}"#,
                    std::env::temp_dir()
                )
                .as_bytes(),
            )
            .unwrap();
            assert_eq!(cfg.kvpark.prefetch_margin, 4.0);
            let mut p = BlockPlanner::new(cfg, BS).unwrap();
            let w = finish(&mut p, "warm", &hashes(1, 98), 1, 1);
            assert_eq!(w.saves[0].to_nvme, nvme, "{policy} (first save)");
            let a = finish(&mut p, "a", &hashes(3, 3), 3, 10);
            assert_eq!(a.saves[0].to_nvme, nvme, "{policy}");
        }
        let e = Config::from_json(br#"{"policy":"lmcache-lru","kvpark":{"prefetch_margin":4}}"#)
            .unwrap_err();
        assert!(
            e.message().contains("policy is \"lmcache-lru\""),
            "{}",
            e.message()
        );
        let e = Config::from_json(br#"{"policy":"kvpark@margin=4"}"#).unwrap_err();
        assert!(e.message().contains("\"kvpark\" object"), "{}", e.message());
        let e = Config::from_json(br#"{"policy":"kvpark:gpu-events"}"#).unwrap_err();
        assert!(e.message().contains("kv_events_config"), "{}", e.message());
    }
}

#[cfg(test)]
mod idle_tests {
    use super::policy_tests::{hashes, BLOCK, BS};
    use super::*;

    const MS: u64 = 1_000_000;

    /// Finishes a request of session `s` with `n` blocks; the worker parks
    /// them on host and NVMe and reports the host evictions the plan asks.
    fn finish(p: &mut BlockPlanner, s: &str, awaiting: &str, h: &[u8], n: usize, now: u64) {
        let v = RequestView {
            req_id: s,
            salt: b"",
            hashes: h,
            hash_len: 8,
            hint: Some(RequestHint {
                session: Some(s.into()),
                awaiting: Some(awaiting.into()),
                tool: (awaiting == "tool").then(|| "Bash".into()),
            }),
        };
        let ids: Vec<u32> = (1..=n as u32).collect();
        p.request_finished(&v, &ids, n as u32 * BS, now).unwrap();
        let plan = Plan::decode(&p.build_meta(now)).unwrap();
        report(p, &plan, now);
    }

    /// The worker runs `plan` and reports every save and move done.
    fn report(p: &mut BlockPlanner, plan: &Plan, now: u64) {
        let rep = Report::all_done(plan, BLOCK);
        p.on_report(&rep.encode(), now).unwrap();
    }

    #[test]
    fn the_first_session_is_tracked_when_the_block_size_is_expected() {
        for expect in [false, true] {
            let cfg = Config::from_json(br#"{"policy":"kvpark","host_bytes":"1MiB"}"#).unwrap();
            let mut p = BlockPlanner::new(cfg, BS).unwrap();
            if expect {
                p.expect_block_bytes(BLOCK);
            }
            finish(&mut p, "first", "user", &hashes(5, 1), 5, MS);
            let id = p.sessions["first"];
            let held = p.core.holding(id).map_or(0, |h| h.held[0]);
            assert_eq!(held, if expect { 5 * BLOCK } else { 0 }, "expect {expect}");
            assert_eq!(p.metrics().block_bytes, BLOCK);
        }
    }

    #[test]
    fn an_idle_tick_prefetches_the_tool_session_over_the_human_one() {
        let cfg = Config::from_json(
            format!(
                r#"{{"policy":"kvpark","host_bytes":{},"nvme_dir":{:?},"kvpark":{{"check_every":"500ms"}}}}"#,
                20 * BLOCK,
                std::env::temp_dir()
            )
            .as_bytes(),
        )
        .unwrap();
        let mut p = BlockPlanner::new(cfg, BS).unwrap();
        let t0 = 1_000_000 * MS;
        finish(&mut p, "warm", "user", &hashes(1, 99), 1, t0);
        finish(&mut p, "p1", "tool", &hashes(10, 1), 10, t0 + 100 * MS);
        // p2 parks 8 s later: p1 has waited long enough for its tool that
        // the population's distribution alone would not call it imminent
        let p2_at = 8000;
        finish(&mut p, "p2", "user", &hashes(19, 2), 19, t0 + p2_at * MS);
        let m = p.metrics();
        assert_eq!(m.prefetches, 0, "{m:?}");
        // the engine is idle: ticks at the planner's wakeups
        let mut now = t0 + p2_at * MS;
        let mut fetched = None;
        for _ in 0..1000 {
            let Some(w) = p.next_wakeup() else { break };
            now = w.max(now);
            let plan = p.tick_moves(now);
            if plan.is_empty() {
                continue;
            }
            let plan = Plan::decode(&plan).unwrap();
            assert!(plan.saves.is_empty() && plan.loads.is_empty());
            report(&mut p, &plan, now);
            if plan.moves.iter().any(|m| m.0 == MoveKind::Promote) {
                fetched = Some(now);
                break;
            }
        }
        let at = fetched.expect("a prefetch while idle");
        // at the first checkpoint after p2 parked (every 500 ms)
        assert!(
            at <= t0 + (p2_at + 500) * MS,
            "prefetched at {} ms",
            (at - t0) / MS
        );
        let m = p.metrics();
        assert_eq!((m.prefetches, m.idle_plans), (1, 1), "{m:?}");
        // p1's 10 blocks are on host again (and the warm session's one)
        assert_eq!(m.parked_host_blocks, 11, "{m:?}");
    }

    #[test]
    fn event_ids_are_vllms_integer_block_hashes() {
        // int.from_bytes(h, "big") & (2**64 - 1)
        let h: Vec<u8> = (1..=32).collect();
        assert_eq!(BlockPlanner::event_id(&h), 0x191a_1b1c_1d1e_1f20);
        assert_eq!(BlockPlanner::event_id(&[1, 2]), 0x0102);
        assert_eq!(BlockPlanner::event_id(&[]), 0);
    }

    #[test]
    fn gpu_evictions_turn_the_policy_to_the_context_the_gpu_gave_up() {
        let cfg = Config::from_json(
            format!(
                r#"{{"policy":"kvpark","host_bytes":{},"nvme_dir":{:?}}}"#,
                20 * BLOCK,
                std::env::temp_dir()
            )
            .as_bytes(),
        )
        .unwrap();
        let mut p = BlockPlanner::new(cfg, BS).unwrap();
        // without the news nothing is marked: a removal changes nothing
        let h1 = hashes(10, 1);
        let ids: Vec<u64> = h1.chunks(8).map(BlockPlanner::event_id).collect();
        assert_eq!(p.gpu_removed(&ids), 0);
        p.hear_gpu_events();
        let t0 = 1_000_000 * MS;
        finish(&mut p, "warm", "user", &hashes(1, 99), 1, t0);
        finish(&mut p, "p1", "user", &h1, 10, t0 + 100 * MS);
        finish(&mut p, "p2", "user", &hashes(19, 2), 19, t0 + 200 * MS);
        // the GPU still holds p1: its checkpoints fetch nothing back
        let mut now = t0 + 200 * MS;
        while let Some(w) = p.next_wakeup().filter(|&w| w <= t0 + 60_000 * MS) {
            now = w.max(now);
            let plan = p.tick_moves(now);
            if plan.is_empty() {
                continue;
            }
            let plan = Plan::decode(&plan).unwrap();
            assert!(
                plan.moves.iter().all(|m| m.0 != MoveKind::Promote),
                "{:?}",
                plan.moves
            );
            report(&mut p, &plan, now);
        }
        let before = p.metrics();
        assert_eq!(before.prefetches, 0, "{before:?}");
        assert!(before.parked_host_blocks < 30, "{before:?}");
        // vLLM evicts p1's blocks tail first: the deepest one is the news
        assert_eq!(p.gpu_removed(&ids[..9]), 0);
        assert_eq!(p.gpu_removed(&ids[9..]), 1);
        assert_eq!(p.gpu_removed(&ids[9..]), 0, "once");
        let plan = Plan::decode(&p.tick_moves(now)).unwrap();
        let promoted: Vec<BlockKey> = plan
            .moves
            .iter()
            .filter(|m| m.0 == MoveKind::Promote)
            .map(|m| m.1)
            .collect();
        let model = ModelNs::of(&p.cfg.model_identity);
        let p1_keys: HashSet<BlockKey> = h1
            .chunks(8)
            .map(|h| BlockKey::derive_in(&model, b"", h))
            .collect();
        assert!(!promoted.is_empty(), "{:?}", plan.moves);
        assert!(promoted.iter().all(|k| p1_keys.contains(k)), "{promoted:?}");
        report(&mut p, &plan, now);
        let m = p.metrics();
        assert_eq!(
            (
                m.gpu_events,
                m.gpu_removed_blocks,
                m.gpu_dropped_sessions,
                m.prefetches
            ),
            (1, 21, 1, 1),
            "{m:?}"
        );
        // p1 comes back: no longer a parked context, so no news of it
        let v = RequestView {
            req_id: "p1-next",
            salt: b"",
            hashes: &h1,
            hash_len: 8,
            hint: Some(RequestHint {
                session: Some("p1".into()),
                ..Default::default()
            }),
        };
        p.match_request(&v, 0, 11 * BS, now + MS).unwrap();
        // a cleared prefix cache gives up the two still marked (warm, p2)
        assert_eq!(p.gpu_cleared(), 2);
        assert_eq!(p.gpu_cleared(), 0);
        assert_eq!(p.metrics().gpu_dropped_sessions, 3);
    }
}
