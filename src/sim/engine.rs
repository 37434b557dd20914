//! The replay simulator: sessions replayed concurrently on one modelled
//! deployment, event-driven on a virtual clock (a binary heap of events).
//!
//! # Timeline (closed loop)
//!
//! A session's first step arrives at the session's start (divided by the
//! time compression, the load: more sessions at once on the node without
//! changing any session's gaps). Every later step arrives at the previous
//! step's modelled finish plus the trace's gap before it (the §6 gap, or
//! the wall gap where §6 has none). A slow step therefore delays the rest
//! of its session, as it does for a real agent.
//!
//! # The GPU
//!
//! - **Admission** (as vLLM's scheduler does): arrivals wait in one FIFO
//!   queue; the head is admitted when the KV of its whole step (context +
//!   output, in whole blocks of `block_size` tokens) fits beside the blocks
//!   of the running requests and of contexts still pinned by a save in
//!   flight (`delay_free`). Contexts parked in the prefix cache are evicted
//!   to make room, in the policy's GPU order ([`crate::policy::Policy::gpu_order`]:
//!   least recently used unless the policy knows better). The wait is the
//!   queueing delay.
//! - **Matching** happens at admission: a context in the prefix cache (or
//!   pinned by its save) is a GPU hit; otherwise the planner's
//!   [`Planner::resume`] says which of kvpark's tiers holds it, and the
//!   request loads it first (holding its blocks meanwhile, as an async load
//!   in WAITING_FOR_REMOTE_KVS does).
//! - **Compute**: prefills share the GPU's compute equally (processor
//!   sharing; exclusive time from [`Deployment::prefill_s`], slower with
//!   context); decodes run batched, one token per iteration of
//!   [`Deployment::decode_iter_s`] for the KV of the whole batch. TTFT =
//!   arrival → end of prefill; the step finishes when its output is decoded.
//! - Steps whose context + output exceed the model's window are not
//!   replayed: they are counted and reported (`over_context`), and the
//!   session's parked KV is dropped (a real server would have refused the
//!   step); the session goes on after the step's gap.
//!
//! # Links
//!
//! PCIe host → GPU, PCIe GPU → host, NVMe read and NVMe write are each one
//! server moving one chunk at a time (a transfer is cut into up to 16
//! chunks of at least 256 MiB, so two-stage transfers pipeline), the
//! waiting chunk of the highest class first: a waiting request's load (0) >
//! a prefetch or save (1) > a demotion or write-through (2). A chunk takes
//! its bytes over the link's bandwidth (NVMe: stored bytes, and no less
//! than the codec's time for the raw bytes), so no link is ever
//! double-booked. A save that goes to host and NVMe gathers once (PCIe)
//! and writes the same chunks on to NVMe. A prefetch still in flight when
//! its request is admitted (late) moves up to class 0.
//!
//! The planner hears each copy's outcome ([`Planner::completed`]) when its
//! last chunk lands; the GPU context a save reads stays pinned until the
//! PCIe part is done.
//!
//! # Block mode ([`SimConfig::blocks`], `kvpark replay --blocks`)
//!
//! By default the simulator drives the session-level core planner
//! ([`Planner`]) that the connector's block planner wraps, and tells it
//! when a session ends. In block mode it drives the connector's
//! scheduler-side [`crate::planner::blocks::BlockPlanner`] itself, as vLLM
//! does ([`super::blocks`]): at admission `match_request` with the step's
//! block hashes and vLLM's local hit (the GPU model's, whole blocks) and
//! `on_alloc`; at the step's end `request_finished`; every plan
//! (`take_plan`, `tick_plan` on the planner's own clock) runs on a modelled
//! worker over the same links, which reports each save, load and block
//! move when its last byte lands (done, or skipped where the block is no
//! longer where the move needs it); drops and host evictions free their
//! slots at once. The planner learns everything from those reports, as in
//! the connector. What differs from the default, by design:
//! - hits are whole blocks (vLLM hashes full blocks only);
//! - the planner is never told that a session ended, or that vLLM refused
//!   a step over the context: their blocks stay parked until the policy
//!   evicts them or the planner's session TTL ends them (the oracle, which
//!   knows the future, is told that such a session does not return);
//! - `kvpark` runs as in a connector without vLLM's KV-cache events, and
//!   every other policy hears the GPU's evictions as those events;
//! - prefetches are counted by the planner (`prefetches`, in time, late,
//!   wasted) and, as in the default mode, a prefetched session that comes
//!   back as a GPU hit wasted its prefetch.
//!
//! It is slower (every block of every move goes through the planner's
//! index and the worker's report): see BENCHMARKS.md, "Replay".
//!
//! # Hits (token-weighted, DESIGN §6)
//!
//! A counted step hits its cacheable tokens when its session's KV is on the
//! GPU, in host or on NVMe (or arriving by a prefetch in flight: a *late*
//! prefetch, served from NVMe); a tier holding only part of the KV serves
//! that fraction. Idealised policies (`ttl:<dur>`) get no GPU prefix cache,
//! no context window, unlimited capacity and instant copies, so their hit
//! rate and amplification equal the §6 sweep exactly.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::blocks::BlockSim;
use super::deploy::Deployment;
use super::hist::LogHist;
use super::trace::{self, ReadSummary, Session, ToolNames, Trigger};
use crate::error::Result;
use crate::plan::{MoveKind, Outcome, Plan, Report, SaveDone, TierChange};
use crate::planner::core::{Action, Awaiting, Capacity, Hint, Planner, SessionId, Tier};
use crate::policy::{by_name, OracleBook, PolicyEnv};

/// One step of a session script, compact.
#[derive(Clone, Copy, Debug)]
pub struct SimStep {
    /// Gap before the step (ns after the previous step's finish; 0 for the first).
    pub gap: u64,
    /// L (tokens).
    pub l: u32,
    /// Fresh tokens.
    pub fresh: u32,
    /// Cacheable tokens.
    pub cacheable: u32,
    /// Output tokens.
    pub output: u32,
    /// KV tokens after the step (L + output).
    pub kv_after: u32,
    /// Interned name of the tool the session waits for after this step (u32::MAX: none).
    pub tool: u32,
    /// Enters the §6 metrics.
    pub counted: bool,
    /// User-initiated.
    pub user: bool,
    /// What the next step waits for (the harness hint).
    pub next_awaits: Awaiting,
}

/// A session of the script.
#[derive(Clone, Copy, Debug)]
pub struct SessScript {
    /// Start, ns after the trace's first session start.
    pub start: u64,
    /// Index of the first step in [`Script::steps`].
    pub first: u32,
    /// Number of steps.
    pub len: u32,
}

/// A whole trace, compact, ready to replay.
#[derive(Clone, Debug, Default)]
pub struct Script {
    /// Sessions, in reading order.
    pub sessions: Vec<SessScript>,
    /// All steps, session after session.
    pub steps: Vec<SimStep>,
    /// Tool names.
    pub tools: ToolNames,
    starts_abs: Vec<i64>,
}

impl Script {
    /// Reads a TraceLab file.
    pub fn from_file(path: &std::path::Path) -> Result<(Script, ReadSummary)> {
        let mut s = Script::default();
        let sum = trace::read_file(path, |sess, _| {
            s.push(&sess);
            Ok(())
        })?;
        if sum.rows == 0 {
            return Err(trace::empty_trace(path, &sum));
        }
        s.tools = sum.tools.clone();
        s.finish();
        Ok((s, sum))
    }

    /// Reads TraceLab JSONL from memory.
    pub fn from_bytes(data: &[u8]) -> Result<(Script, ReadSummary)> {
        let mut s = Script::default();
        let sum = trace::read_bytes(data, |sess, _| {
            s.push(&sess);
            Ok(())
        })?;
        s.tools = sum.tools.clone();
        s.finish();
        Ok((s, sum))
    }

    /// Adds a session (its timeline as the module docs describe).
    pub fn push(&mut self, sess: &Session) {
        if sess.steps.is_empty() || sess.loose {
            return;
        }
        let first = self.steps.len() as u32;
        let start_abs = sess.steps[0]
            .request_at
            .or(sess.steps[0].first_activity)
            .unwrap_or(i64::MIN);
        for (k, st) in sess.steps.iter().enumerate() {
            let gap = if k == 0 {
                0
            } else {
                // u64: two i64 instants can be further apart than i64::MAX
                let wall = match (st.first_activity, sess.steps[k - 1].last_activity) {
                    (Some(a), Some(b)) if a >= b => a.abs_diff(b),
                    _ => 0,
                };
                st.gap.map_or(wall, |g| g.max(0) as u64)
            };
            let next = sess.steps.get(k + 1);
            let next_awaits = match next.map(|x| x.trigger) {
                Some(Trigger::Tool) => Awaiting::Tool,
                Some(Trigger::User) => Awaiting::User,
                _ => Awaiting::Unknown,
            };
            let tool = if next_awaits == Awaiting::Tool {
                st.calls
                    .iter()
                    .max_by_key(|c| c.dur.unwrap_or(0))
                    .map(|c| c.tool)
                    .unwrap_or(u32::MAX)
            } else {
                u32::MAX
            };
            let sat = |v: u64| v.min(u32::MAX as u64) as u32;
            self.steps.push(SimStep {
                gap,
                l: sat(st.l),
                fresh: sat(st.fresh),
                cacheable: sat(st.cacheable),
                output: sat(st.output),
                kv_after: sat(st.l.saturating_add(st.output)),
                tool,
                counted: st.counted,
                user: st.trigger == Trigger::User,
                next_awaits,
            });
        }
        self.sessions.push(SessScript {
            start: 0,
            first,
            len: sess.steps.len() as u32,
        });
        self.starts_abs.push(start_abs);
    }

    /// Makes session starts relative to the earliest one.
    pub fn finish(&mut self) {
        let t0 = self
            .starts_abs
            .iter()
            .copied()
            .filter(|&t| t != i64::MIN)
            .min()
            .unwrap_or(0);
        for (s, &a) in self.sessions.iter_mut().zip(&self.starts_abs) {
            // a ≥ t0, so the difference fits in u64 even when not in i64
            s.start = if a == i64::MIN { 0 } else { a.abs_diff(t0) };
        }
    }

    /// The steps of session `i`.
    pub fn steps_of(&self, i: usize) -> &[SimStep] {
        let s = &self.sessions[i];
        &self.steps[s.first as usize..(s.first + s.len) as usize]
    }
}

/// Replay settings.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Session starts are divided by this (≥ 1 packs more sessions at once).
    pub time_compression: f64,
    /// Steps replayed so far (for a progress bar), if wanted.
    pub progress: Option<Arc<AtomicU64>>,
    /// Check the planner's accounting after every event (tests; slow).
    pub check_invariants: bool,
    /// Keep every chunk each link moved ([`PolicyResult::link_log`]; tests).
    pub record_links: bool,
    /// Drive the connector's scheduler-side [`crate::planner::blocks::BlockPlanner`]
    /// at block granularity, its plans run by a modelled worker
    /// ([`super::blocks`]), instead of the session-level core planner alone.
    /// Idealised policies always run at session level.
    pub blocks: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            time_compression: 1.0,
            progress: None,
            check_invariants: false,
            record_links: false,
            blocks: false,
        }
    }
}

/// Hit rates, one per class.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Split {
    /// All counted steps.
    pub all: f64,
    /// User-initiated.
    pub user: f64,
    /// Tool-initiated.
    pub tool: f64,
}

/// Peak and time-weighted mean bytes.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Occ {
    /// Peak bytes.
    pub peak: u64,
    /// Mean bytes over the replay.
    pub mean: f64,
}

/// Prefetch outcomes.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Prefetch {
    /// Prefetches issued.
    pub issued: u64,
    /// Landed before the step arrived and were used.
    pub early: u64,
    /// The step arrived while the prefetch was in flight.
    pub late: u64,
    /// Landed but never used (dropped, GPU hit, or session ended).
    pub wasted: u64,
    /// Steps whose KV was loaded from NVMe, no prefetch of it in host or
    /// in flight (an NVMe-resident session not promoted in time: none was
    /// issued, or its copy was evicted again).
    pub missed: u64,
}

impl Prefetch {
    /// Share of the returns of NVMe-resident sessions (served from NVMe or
    /// by a prefetch) whose prefetch had landed before the step arrived.
    pub fn coverage(&self) -> f64 {
        let n = self.early + self.late + self.missed;
        if n == 0 {
            0.0
        } else {
            self.early as f64 / n as f64
        }
    }
    /// Share of the prefetches issued that were never used.
    pub fn waste(&self) -> f64 {
        if self.issued == 0 {
            0.0
        } else {
            self.wasted as f64 / self.issued as f64
        }
    }
}

/// p50, p90, p99 and mean of a distribution (s).
pub type Pcts = [f64; 4];

/// One chunk a link moved: (link, start ns, end ns, bytes on the link).
/// Links: 0 PCIe GPU → host, 1 PCIe host → GPU, 2 NVMe write, 3 NVMe read.
pub type LinkChunk = (u8, u64, u64, u64);

/// One policy's results.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PolicyResult {
    /// Policy name.
    pub policy: String,
    /// Idealised (calibration) policy.
    pub idealised: bool,
    /// Steps replayed.
    pub steps: u64,
    /// Steps in the metrics.
    pub counted: u64,
    /// Steps not replayed: context + output beyond the model's window.
    pub over_context: u64,
    /// Token-weighted hit rate.
    pub hit: Split,
    /// Hit tokens by source as a fraction of all counted tokens: GPU, host, NVMe.
    pub hit_from: [f64; 3],
    /// (Σ fresh + Σ missed cacheable) / Σ fresh.
    pub amplification: f64,
    /// Tokens prefilled (computed rather than found) over every replayed step.
    pub recompute_tokens: u64,
    /// TTFT of counted user-initiated steps (s): p50, p90, p99, mean.
    pub ttft_user_s: Pcts,
    /// TTFT of counted tool-initiated steps (s).
    pub ttft_tool_s: Pcts,
    /// Queueing delay (arrival → admission) of every replayed step (s).
    pub queue_s: Pcts,
    /// Share of the replay during which the GPU computed (any prefill or decode).
    pub gpu_busy: f64,
    /// Share of the replay during which a prefill ran.
    pub gpu_prefill_busy: f64,
    /// Bytes over PCIe GPU → host.
    pub pcie_d2h_bytes: u64,
    /// Bytes over PCIe host → GPU.
    pub pcie_h2d_bytes: u64,
    /// Bytes written to NVMe (stored).
    pub nvme_write_bytes: u64,
    /// Bytes read from NVMe (stored).
    pub nvme_read_bytes: u64,
    /// NVMe bytes written per day of (virtual) replay.
    pub nvme_write_per_day: f64,
    /// Occupancy: GPU (running + pinned + prefix cache), host, NVMe (stored).
    pub occupancy: [Occ; 3],
    /// KV of the suspended sessions that will return (what keeping
    /// everything would hold).
    pub parked: Occ,
    /// Prefetch timeliness.
    pub prefetch: Prefetch,
    /// Saves/copies refused for lack of room (host, NVMe).
    pub refused: [u64; 2],
    /// Evictions (host, NVMe).
    pub evictions: [u64; 2],
    /// Contexts evicted from the GPU prefix cache.
    pub gpu_evictions: u64,
    /// Virtual time replayed (s).
    pub virtual_s: f64,
    /// Wall time of the replay (s).
    pub wall_s: f64,
    /// TTFT histogram of user steps (for the CDF plot).
    #[serde(skip)]
    pub ttft_hist: LogHist,
    /// Every chunk moved, when [`SimConfig::record_links`].
    #[serde(skip)]
    pub link_log: Vec<LinkChunk>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    /// A link finished its chunk.
    Link(u8),
    /// The GPU's next prefill or decode finish (generation).
    Gpu(u64),
    /// Step `k` of session `i` arrives.
    Arrive(u32, u32),
    /// The planner has timed work.
    Wakeup,
}

const D2H: usize = 0;
const H2D: usize = 1;
const NVW: usize = 2;
const NVR: usize = 3;
const NO_LINK: u8 = u8::MAX;
const CHUNK_MIN: u64 = 256 << 20;
const CHUNKS_MAX: u64 = 16;

fn ns(secs: f64) -> u64 {
    if secs.is_finite() {
        (secs * 1e9).round().max(0.0) as u64
    } else {
        u64::MAX / 4
    }
}

/// Whole nanoseconds at or above `secs`, so that rounding never lends a link
/// bandwidth it does not have.
fn ns_up(secs: f64) -> u64 {
    if secs.is_finite() {
        (secs * 1e9).ceil().max(0.0) as u64
    } else {
        u64::MAX / 4
    }
}

/// What a transfer does when a stage's last chunk lands.
#[derive(Clone, Debug)]
enum Then {
    /// A planner copy is done.
    Copy(Action),
    /// The GPU context of the session may be unpinned (its save gathered).
    Unpin(u32),
    /// Request `r`'s load is done.
    Loaded(u32),
    /// The NVMe write of a save reads the session's host copy from now on.
    PinHost(u32),
    /// That write is done.
    UnpinHost(u32),
    /// The modelled worker reports to the block planner.
    Report(Box<Report>),
    /// Tier moves of the block planner landed: the worker reports them.
    Moved(MoveKind, Vec<crate::block::BlockKey>),
}

struct Transfer {
    stages: [u8; 2],
    bytes: [u64; 2],
    chunks: u32,
    done: [u32; 2],
    started: [u32; 2],
    class: u8,
    then: [Vec<Then>; 2],
    /// A prefetch of this session (for late promotion and the Ready state).
    prefetch_of: Option<u32>,
}

#[derive(Default)]
struct Link {
    busy: Option<(u32, u8, u64, u64)>,
    queue: [VecDeque<(u32, u8)>; 3],
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Pref {
    None,
    InFlight(u32),
    Ready,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Phase {
    Loading,
    Prefill,
    Decode,
}

struct Req {
    sess: u32,
    k: u32,
    arrive: u64,
    gpu_bytes: u64,
    hit: u64,
    /// Tier pinned by the load.
    pinned: Option<Tier>,
    phase: Phase,
    /// Request waiting for the prefetch of its session to land.
    waits_prefetch: Option<u32>,
}

/// Processor sharing: every member progresses at the same rate; a member
/// finishes when the shared virtual clock reaches its mark.
#[derive(Default)]
struct Shared {
    clock: f64,
    n: u32,
    heap: BinaryHeap<Reverse<(u64, u32)>>,
}

impl Shared {
    fn add(&mut self, r: u32, work: f64) {
        let mark = self.clock + work.max(0.0);
        self.heap.push(Reverse((mark.to_bits(), r)));
        self.n += 1;
    }
    fn next_mark(&self) -> Option<f64> {
        self.heap.peek().map(|r| f64::from_bits(r.0 .0))
    }
}

struct Gpu {
    cap: u64,
    running: u64,
    pinned_bytes: u64,
    /// Contexts pinned by saves in flight: (bytes, saves in flight).
    pinned: HashMap<u32, (u64, u32)>,
    cache_bytes: u64,
    cache: BTreeMap<(u64, u32), u64>,
    pos: HashMap<u32, u64>,
    evictions: u64,
    enabled: bool,
    /// Sessions whose context `shrink` evicted, for the planner.
    gone: Vec<u32>,
}

impl Gpu {
    fn take_cached(&mut self, s: u32) -> u64 {
        let Some(at) = self.pos.remove(&s) else {
            return 0;
        };
        let b = self.cache.remove(&(at, s)).unwrap_or(0);
        self.cache_bytes -= b;
        b
    }
    fn take_pinned(&mut self, s: u32) -> u64 {
        match self.pinned.get_mut(&s) {
            Some((b, _)) => {
                let x = std::mem::take(b);
                self.pinned_bytes -= x;
                x
            }
            None => 0,
        }
    }
    fn insert(&mut self, s: u32, order: u64, bytes: u64) {
        self.take_cached(s);
        if !self.enabled || bytes == 0 {
            return;
        }
        self.cache.insert((order, s), bytes);
        self.pos.insert(s, order);
        self.cache_bytes += bytes;
    }
    fn shrink(&mut self) {
        while self.running + self.pinned_bytes + self.cache_bytes > self.cap {
            let Some((&(at, s), _)) = self.cache.iter().next() else {
                break;
            };
            let b = self.cache.remove(&(at, s)).unwrap_or(0);
            self.pos.remove(&s);
            self.cache_bytes -= b;
            self.evictions += 1;
            self.gone.push(s);
        }
    }
    fn used(&self) -> u64 {
        self.running + self.pinned_bytes + self.cache_bytes
    }
}

struct Hist3 {
    user: LogHist,
    tool: LogHist,
    queue: LogHist,
}

fn pcts(h: &LogHist) -> Pcts {
    [h.quantile(0.5), h.quantile(0.9), h.quantile(0.99), h.mean()]
}

struct Sim<'a> {
    script: &'a Script,
    dep: &'a Deployment,
    cfg: &'a SimConfig,
    idealised: bool,
    /// The session-level planner (unused when `blocks` drives the block planner).
    planner: Planner,
    blocks: Option<BlockSim>,
    /// The first error the block planner returned (ends the replay).
    err: Option<crate::Error>,
    book: Arc<OracleBook>,
    gpu: Gpu,
    heap: BinaryHeap<Reverse<(u64, Ev, u64)>>,
    seq: u64,
    /// KV bytes of each session's context (after its last step).
    kv: Vec<u64>,
    pref: Vec<Pref>,
    /// Parked bytes counted for the session (suspended, will return).
    parked_of: Vec<u64>,
    wake_at: Option<u64>,
    links: [Link; 4],
    transfers: Vec<Option<Transfer>>,
    free_tids: Vec<u32>,
    reqs: Vec<Option<Req>>,
    free_rids: Vec<u32>,
    queue: VecDeque<(u32, u32, u64)>,
    prefill: Shared,
    decode: Shared,
    decode_kv: u64,
    gpu_gen: u64,
    gpu_last: u64,
    // metrics
    sum_l: [u128; 3],
    hit: [[u128; 3]; 3],
    sum_fresh: u128,
    miss_cacheable: u128,
    recompute: u64,
    hists: Hist3,
    bytes: [u64; 4],
    prefetch: Prefetch,
    occ_int: [f64; 4],
    occ_peak: [u64; 4],
    parked_now: u64,
    busy_ns: [u64; 2],
    last_t: Option<u64>,
    first_t: u64,
    steps: u64,
    counted: u64,
    over_context: u64,
    link_log: Vec<LinkChunk>,
}

impl Sim<'_> {
    fn push(&mut self, t: u64, e: Ev) {
        self.seq += 1;
        self.heap.push(Reverse((t, e, self.seq)));
    }

    /// The core planner that decides: the block planner's, or the session-level one.
    fn core(&self) -> &Planner {
        match &self.blocks {
            Some(b) => b.planner().core(),
            None => &self.planner,
        }
    }

    fn reschedule(&mut self, now: u64) {
        if let Some(w) = self.core().next_wakeup() {
            let w = w.max(now);
            if self.wake_at.map_or(true, |x| w < x || x < now) {
                self.wake_at = Some(w);
                self.push(w, Ev::Wakeup);
            }
        }
    }

    fn occupancy(&self) -> [u64; 4] {
        let (h, n) = self.core().occupancy();
        [self.gpu.used(), h, self.dep.stored(n), self.parked_now]
    }

    fn integrate(&mut self, now: u64) {
        let occ = self.occupancy();
        if let Some(l) = self.last_t {
            let dt = now.saturating_sub(l);
            for (i, o) in occ.iter().enumerate() {
                self.occ_int[i] += *o as f64 * dt as f64;
            }
            if self.prefill.n > 0 || self.decode.n > 0 {
                self.busy_ns[0] += dt;
            }
            if self.prefill.n > 0 {
                self.busy_ns[1] += dt;
            }
        } else {
            self.first_t = now;
        }
        for (p, o) in self.occ_peak.iter_mut().zip(occ) {
            *p = (*p).max(o);
        }
        self.last_t = Some(now);
    }

    // ---- links ----

    fn new_transfer(&mut self, t: Transfer) -> u32 {
        match self.free_tids.pop() {
            Some(i) => {
                self.transfers[i as usize] = Some(t);
                i
            }
            None => {
                self.transfers.push(Some(t));
                (self.transfers.len() - 1) as u32
            }
        }
    }

    /// Starts a transfer over `stages` (1 or 2 links) of `bytes` per stage.
    fn transfer(
        &mut self,
        now: u64,
        stages: [u8; 2],
        bytes: [u64; 2],
        class: u8,
        then: [Vec<Then>; 2],
        prefetch_of: Option<u32>,
    ) -> u32 {
        let top = bytes[0].max(bytes[1]);
        let chunks = top.div_ceil(CHUNK_MIN).clamp(1, CHUNKS_MAX) as u32;
        let tid = self.new_transfer(Transfer {
            stages,
            bytes,
            chunks,
            done: [0; 2],
            started: [0; 2],
            class,
            then,
            prefetch_of,
        });
        let l = stages[0] as usize;
        for _ in 0..chunks {
            self.links[l].queue[class as usize].push_back((tid, 0));
        }
        self.kick(now, l);
        tid
    }

    fn chunk_bytes(t: &Transfer, stage: u8, idx: u32) -> u64 {
        let b = t.bytes[stage as usize];
        let n = t.chunks as u64;
        // the last chunk takes the remainder
        let base = b / n;
        if idx as u64 + 1 == n {
            b - base * (n - 1)
        } else {
            base
        }
    }

    /// Seconds a chunk of `on_link` bytes holds `link` (NVMe: stored bytes,
    /// and no less than the codec's time for the raw bytes).
    fn service_s(&self, link: usize, on_link: u64) -> f64 {
        let d = self.dep;
        let raw = on_link as f64 * d.codec_ratio;
        match link {
            D2H => on_link as f64 / d.d2h_bps,
            H2D => on_link as f64 / d.h2d_bps,
            NVW => (on_link as f64 / d.nvme_write_bps).max(raw / d.encode_bps),
            _ => (on_link as f64 / d.nvme_read_bps).max(raw / d.decode_bps),
        }
    }

    fn kick(&mut self, now: u64, l: usize) {
        if self.links[l].busy.is_some() {
            return;
        }
        let next = self.links[l].queue.iter_mut().find_map(|q| q.pop_front());
        let Some((tid, stage)) = next else {
            return;
        };
        let t = self.transfers[tid as usize]
            .as_mut()
            .expect("live transfer");
        let idx = t.started[stage as usize];
        t.started[stage as usize] += 1;
        let on_link = Self::chunk_bytes(t, stage, idx);
        // rounded up: a chunk never moves faster than its link
        let dur = ns_up(self.service_s(l, on_link)).max(1);
        let end = now.saturating_add(dur);
        self.links[l].busy = Some((tid, stage, now, on_link));
        self.bytes[l] = self.bytes[l].saturating_add(on_link);
        if self.cfg.record_links {
            self.link_log.push((l as u8, now, end, on_link));
        }
        self.push(end, Ev::Link(l as u8));
    }

    fn link_done(&mut self, now: u64, l: usize) {
        let Some((tid, stage, _, _)) = self.links[l].busy.take() else {
            return;
        };
        let (next_link, class, last, chunks) = {
            let t = self.transfers[tid as usize]
                .as_mut()
                .expect("live transfer");
            t.done[stage as usize] += 1;
            let next = if stage == 0 { t.stages[1] } else { NO_LINK };
            (next, t.class, t.done[stage as usize] == t.chunks, t.chunks)
        };
        if next_link != NO_LINK {
            self.links[next_link as usize].queue[class as usize].push_back((tid, 1));
            self.kick(now, next_link as usize);
        }
        if last {
            let then = std::mem::take(
                &mut self.transfers[tid as usize].as_mut().expect("t").then[stage as usize],
            );
            for th in then {
                self.then(now, tid, th);
            }
            let finished = next_link == NO_LINK;
            if finished {
                let t = self.transfers[tid as usize].take().expect("t");
                debug_assert_eq!(t.done[stage as usize], chunks);
                self.free_tids.push(tid);
                if let Some(s) = t.prefetch_of {
                    self.prefetch_landed(now, s, tid);
                }
            }
        }
        self.kick(now, l);
    }

    fn then(&mut self, now: u64, _tid: u32, th: Then) {
        match th {
            Then::Copy(a) => {
                self.planner.completed(now, &a, true);
            }
            Then::Unpin(s) => self.unpin_gpu(s),
            Then::Loaded(r) => self.loaded(now, r),
            Then::PinHost(s) => self.planner.pin_load(s as SessionId, Tier::Host),
            Then::UnpinHost(s) => self.planner.unpin_load(s as SessionId, Tier::Host),
            Then::Report(r) => self.report(now, *r),
            Then::Moved(kind, keys) => {
                let r = self.worker_report(kind, &keys);
                self.report(now, r);
            }
        }
    }

    // ---- the block planner's plans, on a modelled worker ----

    fn report(&mut self, now: u64, r: Report) {
        if let Some(b) = self.blocks.as_mut() {
            if let Err(e) = b.planner_mut().apply_report(r, now) {
                self.err.get_or_insert(e);
            }
        }
    }

    /// Runs a plan of the block planner as one worker rank would, over the
    /// links: `load` is the request the plan's load is for. Each save,
    /// load and tier move is reported when its last byte lands; drops and
    /// host evictions free their slots at once. A move of a block the
    /// planner no longer holds where the move needs it is reported
    /// skipped, as the worker skips it.
    fn run_plan(&mut self, now: u64, plan: Plan, load: Option<(u32, u64, u64)>) {
        let bb = self.dep.kv_bytes(self.dep.block_size as u64);
        for l in plan.loads {
            let Some((rid, host, nvme)) = load else {
                continue;
            };
            let mut r = Report::default();
            r.loaded.push(crate::plan::LoadDone {
                req_id: l.req_id,
                failed: vec![],
            });
            let then = vec![Then::Report(Box::new(r)), Then::Loaded(rid)];
            let raw = self.dep.kv_bytes(host + nvme);
            if nvme > 0 {
                let stored = self.dep.stored(self.dep.kv_bytes(nvme));
                self.transfer(
                    now,
                    [NVR as u8, H2D as u8],
                    [stored, raw],
                    0,
                    [vec![], then],
                    None,
                );
            } else {
                self.transfer(now, [H2D as u8, NO_LINK], [raw, 0], 0, [then, vec![]], None);
            }
        }
        for sv in plan.saves {
            let s = BlockSim::session_of(&sv.req_id);
            let raw = bb * sv.blocks.len() as u64;
            let mut host = Report::default();
            for b in &sv.blocks {
                host.tier(TierChange::OnHost, b.0);
            }
            host.saved.push(SaveDone {
                req_id: sv.req_id,
                ok: sv.blocks.iter().map(|b| b.0).collect(),
                failed: vec![],
            });
            let mut first = vec![Then::Report(Box::new(host))];
            if let Some(s) = s {
                self.pin_gpu(s);
                first.insert(0, Then::Unpin(s));
            }
            if sv.to_nvme {
                let mut nv = Report::default();
                for b in &sv.blocks {
                    nv.tier(TierChange::OnNvme, b.0);
                    nv.moved(MoveKind::Demote, b.0, Outcome::Done);
                }
                // (a block already on NVMe, saved again to host, is not
                // written again: its write-behind is done at once)
                let keys: Vec<_> = sv.blocks.iter().map(|b| b.0).collect();
                let on_nvme = match &self.blocks {
                    Some(b) => b
                        .planner()
                        .whereabouts_of(&keys)
                        .iter()
                        .filter(|w| w.is_some_and(|w| w.1 != 0))
                        .count() as u64,
                    None => 0,
                };
                let write = bb * (sv.blocks.len() as u64 - on_nvme);
                self.transfer(
                    now,
                    [D2H as u8, NVW as u8],
                    [raw, self.dep.stored(write).max(1)],
                    2,
                    [first, vec![Then::Report(Box::new(nv))]],
                    None,
                );
            } else {
                self.transfer(
                    now,
                    [D2H as u8, NO_LINK],
                    [raw, 0],
                    1,
                    [first, vec![]],
                    None,
                );
            }
        }
        // consecutive moves of one kind are one session's (the planner
        // plans a session's moves together): one transfer each
        let mut i = 0;
        let moves = plan.moves;
        while i < moves.len() {
            let kind = moves[i].0;
            let mut j = i;
            while j < moves.len() && moves[j].0 == kind {
                j += 1;
            }
            let keys: Vec<_> = moves[i..j].iter().map(|m| m.1).collect();
            i = j;
            let stored = self.dep.stored(bb * keys.len() as u64);
            match kind {
                MoveKind::EvictHost | MoveKind::Drop => {
                    let r = self.worker_report(kind, &keys);
                    self.report(now, r);
                }
                // demotions write NVMe (class 2), prefetches read it (class 1)
                MoveKind::Demote | MoveKind::Promote => {
                    let (link, class) = if kind == MoveKind::Demote {
                        (NVW, 2)
                    } else {
                        (NVR, 1)
                    };
                    let then = vec![Then::Moved(kind, keys)];
                    self.transfer(
                        now,
                        [link as u8, NO_LINK],
                        [stored, 0],
                        class,
                        [then, vec![]],
                        None,
                    );
                }
            }
        }
    }

    /// What the worker reports of `kind` moves of `keys` run now: done
    /// where the block is where the move needs it, skipped otherwise.
    fn worker_report(&self, kind: MoveKind, keys: &[crate::block::BlockKey]) -> Report {
        let mut r = Report::default();
        let Some(b) = &self.blocks else { return r };
        for (k, w) in keys.iter().zip(b.planner().whereabouts_of(keys)) {
            let (host, nvme) = w.unwrap_or((0, 0));
            let change = match kind {
                MoveKind::EvictHost if host != 0 => Some(if nvme != 0 {
                    TierChange::LeftHost
                } else {
                    TierChange::Lost
                }),
                MoveKind::Drop if host | nvme != 0 => Some(TierChange::Lost),
                MoveKind::Demote if host != 0 => Some(TierChange::OnNvme),
                MoveKind::Promote if nvme != 0 => Some(TierChange::OnHost),
                _ => None,
            };
            match change {
                Some(c) => {
                    r.tier(c, *k);
                    r.moved(kind, *k, Outcome::Done);
                }
                None => r.moved(kind, *k, Outcome::Skipped("not parked here".into())),
            }
        }
        r
    }

    /// Raises every queued chunk of `tid` to class 0.
    fn promote(&mut self, tid: u32) {
        let Some(t) = self.transfers[tid as usize].as_mut() else {
            return;
        };
        let old = t.class as usize;
        if old == 0 {
            return;
        }
        t.class = 0;
        for link in &mut self.links {
            let q = std::mem::take(&mut link.queue[old]);
            let (mine, rest): (VecDeque<_>, VecDeque<_>) = q.into_iter().partition(|x| x.0 == tid);
            link.queue[old] = rest;
            link.queue[0].extend(mine);
        }
    }

    // ---- planner actions ----

    fn issue(&mut self, now: u64, acts: Vec<Action>) {
        // a save to host and one to NVMe of the same session gather once
        let mut host_save: HashMap<u64, Action> = HashMap::new();
        let mut rest = Vec::new();
        for a in acts {
            match a {
                Action::Copy {
                    session,
                    from: None,
                    to: Tier::Host,
                    ..
                } => {
                    host_save.insert(session, a);
                }
                _ => rest.push(a),
            }
        }
        for a in rest {
            let Action::Copy {
                session,
                from,
                to,
                bytes,
            } = a
            else {
                continue; // drops take effect in the accounting at once
            };
            if self.idealised {
                self.planner.completed(now, &a, true);
                continue;
            }
            let stored = self.dep.stored(bytes);
            let s = session as u32;
            match (from, to) {
                (None, Tier::Nvme) => {
                    let host = host_save.remove(&session);
                    let hb = match &host {
                        Some(Action::Copy { bytes, .. }) => *bytes,
                        _ => 0,
                    };
                    self.pin_gpu(s);
                    let mut first = vec![Then::Unpin(s)];
                    let mut second = vec![Then::Copy(a)];
                    if let Some(h) = host {
                        // the mover writes NVMe from the host copy: it
                        // stays until the write is done
                        first.push(Then::Copy(h));
                        first.push(Then::PinHost(s));
                        second.push(Then::UnpinHost(s));
                    }
                    self.transfer(
                        now,
                        [D2H as u8, NVW as u8],
                        [hb.max(bytes), stored],
                        2,
                        [first, second],
                        None,
                    );
                }
                (Some(Tier::Host), Tier::Nvme) => {
                    self.transfer(
                        now,
                        [NVW as u8, NO_LINK],
                        [stored, 0],
                        2,
                        [vec![Then::Copy(a)], vec![]],
                        None,
                    );
                }
                (Some(Tier::Nvme), Tier::Host) => {
                    self.prefetch.issued += 1;
                    let tid = self.transfer(
                        now,
                        [NVR as u8, NO_LINK],
                        [stored, 0],
                        1,
                        [vec![Then::Copy(a)], vec![]],
                        Some(s),
                    );
                    self.pref[s as usize] = Pref::InFlight(tid);
                }
                _ => {
                    self.planner.completed(now, &a, false);
                }
            }
        }
        let mut saves: Vec<(u64, Action)> = host_save.into_iter().collect();
        saves.sort_by_key(|x| x.0);
        for (session, a) in saves {
            if self.idealised {
                self.planner.completed(now, &a, true);
                continue;
            }
            let Action::Copy { bytes, .. } = a else {
                continue;
            };
            let s = session as u32;
            self.pin_gpu(s);
            self.transfer(
                now,
                [D2H as u8, NO_LINK],
                [bytes, 0],
                1,
                [vec![Then::Unpin(s), Then::Copy(a)], vec![]],
                None,
            );
        }
    }

    fn pin_gpu(&mut self, s: u32) {
        if !self.gpu.enabled {
            return;
        }
        let b = self.gpu.take_cached(s);
        let e = self.gpu.pinned.entry(s).or_insert((0, 0));
        e.0 += b;
        e.1 += 1;
        self.gpu.pinned_bytes += b;
    }

    /// Tells the planner which parked contexts the GPU gave up.
    fn gpu_gone(&mut self) {
        for s in std::mem::take(&mut self.gpu.gone) {
            match self.blocks.as_mut() {
                Some(b) => b.gpu_evicted(s),
                None => self.planner.gpu_dropped(s as SessionId),
            }
        }
    }

    /// The policy's GPU eviction order for session `i`'s context.
    fn gpu_order(&mut self, i: u32, now: u64) -> u64 {
        match self.blocks.as_mut() {
            Some(b) => {
                let sid = b.session(i);
                b.planner().core().gpu_order(sid, now)
            }
            None => self.planner.gpu_order(i as SessionId, now),
        }
    }

    fn unpin_gpu(&mut self, s: u32) {
        let Some(e) = self.gpu.pinned.get_mut(&s) else {
            return;
        };
        e.1 -= 1;
        if e.1 == 0 {
            let (b, _) = self.gpu.pinned.remove(&s).expect("pinned");
            self.gpu.pinned_bytes -= b;
            if b > 0 {
                let order = self.gpu_order(s, self.last_t.unwrap_or(0));
                self.gpu.insert(s, order, b);
                self.gpu.shrink();
                self.gpu_gone();
            }
        }
    }

    fn prefetch_landed(&mut self, now: u64, s: u32, tid: u32) {
        if self.pref[s as usize] != Pref::InFlight(tid) {
            return;
        }
        self.pref[s as usize] = Pref::Ready;
        // a request admitted while it was in flight now loads host → GPU
        let waiting: Vec<u32> = self
            .reqs
            .iter()
            .enumerate()
            .filter_map(|(i, r)| {
                r.as_ref()
                    .filter(|r| r.waits_prefetch == Some(tid))
                    .map(|_| i as u32)
            })
            .collect();
        for r in waiting {
            self.pref[s as usize] = Pref::None;
            let req = self.reqs[r as usize].as_mut().expect("req");
            req.waits_prefetch = None;
            req.pinned = Some(Tier::Host);
            let b = self.dep.kv_bytes(req.hit);
            self.planner.pin_load(s as SessionId, Tier::Host);
            self.transfer(
                now,
                [H2D as u8, NO_LINK],
                [b, 0],
                0,
                [vec![Then::Loaded(r)], vec![]],
                None,
            );
        }
    }

    // ---- the GPU ----

    fn advance_gpu(&mut self, now: u64) {
        let dt = now.saturating_sub(self.gpu_last) as f64 / 1e9;
        self.gpu_last = now;
        if self.prefill.n > 0 {
            self.prefill.clock += dt / self.prefill.n as f64;
        }
        if self.decode.n > 0 {
            self.decode.clock += dt / self.dep.decode_iter_s(self.decode_kv);
        }
    }

    fn schedule_gpu(&mut self, now: u64) {
        self.gpu_gen += 1;
        let mut next: Option<f64> = None;
        if let Some(m) = self.prefill.next_mark() {
            next = Some((m - self.prefill.clock).max(0.0) * self.prefill.n as f64);
        }
        if let Some(m) = self.decode.next_mark() {
            let d = (m - self.decode.clock).max(0.0) * self.dep.decode_iter_s(self.decode_kv);
            next = Some(next.map_or(d, |x| x.min(d)));
        }
        if let Some(dt) = next {
            let t = now.saturating_add(ns(dt));
            self.push(t, Ev::Gpu(self.gpu_gen));
        }
    }

    fn gpu_event(&mut self, now: u64, gen: u64) {
        if gen != self.gpu_gen {
            return;
        }
        self.advance_gpu(now);
        const EPS: f64 = 1e-9;
        let mut done_prefill = Vec::new();
        while let Some(m) = self.prefill.next_mark() {
            if m > self.prefill.clock + EPS * self.prefill.n.max(1) as f64 {
                break;
            }
            done_prefill.push(self.pop_prefill());
        }
        let mut done_decode = Vec::new();
        while let Some(m) = self.decode.next_mark() {
            if m > self.decode.clock + 1e-6 {
                break;
            }
            done_decode.push(self.pop_decode());
        }
        if done_prefill.is_empty() && done_decode.is_empty() {
            // this event was scheduled for the earliest finish: float error
            // must not hold it back (and so never spin at one instant)
            let p = self
                .prefill
                .next_mark()
                .map(|m| (m - self.prefill.clock) * self.prefill.n as f64);
            let d = self
                .decode
                .next_mark()
                .map(|m| (m - self.decode.clock) * self.dep.decode_iter_s(self.decode_kv));
            match (p, d) {
                (Some(p), Some(d)) if d < p => done_decode.push(self.pop_decode()),
                (Some(_), _) => done_prefill.push(self.pop_prefill()),
                (None, Some(_)) => done_decode.push(self.pop_decode()),
                (None, None) => {}
            }
        }
        for r in done_decode {
            let b = self.reqs[r as usize].as_ref().expect("req").gpu_bytes;
            self.decode_kv -= b;
            self.finish(now, r);
        }
        for r in done_prefill {
            self.prefilled(now, r);
        }
        self.schedule_gpu(now);
        self.try_admit(now);
    }

    fn pop_prefill(&mut self) -> u32 {
        let Reverse((_, r)) = self.prefill.heap.pop().expect("mark");
        self.prefill.n -= 1;
        r
    }

    fn pop_decode(&mut self) -> u32 {
        let Reverse((_, r)) = self.decode.heap.pop().expect("mark");
        self.decode.n -= 1;
        r
    }

    fn start_prefill(&mut self, now: u64, r: u32) {
        self.advance_gpu(now);
        let req = self.reqs[r as usize].as_mut().expect("req");
        req.phase = Phase::Prefill;
        let st = self.script.steps_of(req.sess as usize)[req.k as usize];
        let n = (st.l as u64).saturating_sub(req.hit);
        let work = self.dep.prefill_s(n, req.hit);
        self.prefill.add(r, work);
        self.schedule_gpu(now);
    }

    fn prefilled(&mut self, now: u64, r: u32) {
        let req = self.reqs[r as usize].as_mut().expect("req");
        req.phase = Phase::Decode;
        let st = self.script.steps_of(req.sess as usize)[req.k as usize];
        let ttft = now.saturating_sub(req.arrive) as f64 / 1e9;
        if st.counted {
            if st.user {
                self.hists.user.add(ttft);
            } else {
                self.hists.tool.add(ttft);
            }
        }
        let b = req.gpu_bytes;
        self.decode_kv += b;
        self.decode.add(r, st.output.saturating_sub(1) as f64);
    }

    fn loaded(&mut self, now: u64, r: u32) {
        let req = self.reqs[r as usize].as_mut().expect("req");
        if let Some(t) = req.pinned.take() {
            self.planner.unpin_load(req.sess as SessionId, t);
        }
        self.start_prefill(now, r);
    }

    // ---- steps ----

    fn arrive(&mut self, now: u64, i: u32, k: u32) {
        let st = self.script.steps_of(i as usize)[k as usize];
        if !self.idealised && st.kv_after as u64 > self.dep.max_context_tokens {
            self.over_context += 1;
            self.unpark(i);
            match self.blocks.as_mut() {
                // the connector never sees a step vLLM refuses; the oracle
                // learns that the session does not come back as it was
                Some(b) => {
                    let sid = b.session(i);
                    self.book.set(sid, None);
                }
                None => {
                    let acts = self.planner.end(now, i as SessionId);
                    self.issue(now, acts);
                }
            }
            self.gpu.take_cached(i);
            self.gpu.take_pinned(i);
            self.kv[i as usize] = 0;
            self.pref[i as usize] = Pref::None;
            self.next_step(now, i, k);
            return;
        }
        self.queue.push_back((i, k, now));
        self.try_admit(now);
    }

    fn unpark(&mut self, i: u32) {
        let b = std::mem::take(&mut self.parked_of[i as usize]);
        self.parked_now -= b;
    }

    fn try_admit(&mut self, now: u64) {
        while let Some(&(i, k, arrive)) = self.queue.front() {
            let st = self.script.steps_of(i as usize)[k as usize];
            let need = if self.idealised {
                0
            } else {
                self.dep.gpu_bytes(st.kv_after as u64)
            };
            let own_pinned = self.gpu.pinned.get(&i).map_or(0, |p| p.0);
            let others = self.gpu.running + self.gpu.pinned_bytes - own_pinned;
            if others.saturating_add(need) > self.gpu.cap {
                if need > self.gpu.cap {
                    // cannot ever fit (a window larger than the GPU): skip
                    self.queue.pop_front();
                    self.over_context += 1;
                    self.next_step(now, i, k);
                    continue;
                }
                return;
            }
            self.queue.pop_front();
            self.admit(now, i, k, arrive, need);
        }
    }

    fn admit(&mut self, now: u64, i: u32, k: u32, arrive: u64, need: u64) {
        let st = self.script.steps_of(i as usize)[k as usize];
        let sid = i as SessionId;
        let d = self.dep;
        self.hists
            .queue
            .add(now.saturating_sub(arrive) as f64 / 1e9);
        self.unpark(i);
        let gpu_held = self.gpu.take_cached(i) + self.gpu.take_pinned(i);
        self.gpu.running += need;
        self.gpu.shrink();
        self.gpu_gone();
        let rid = match self.free_rids.pop() {
            Some(r) => r,
            None => {
                self.reqs.push(None);
                (self.reqs.len() - 1) as u32
            }
        };
        let mut req = Req {
            sess: i,
            k,
            arrive,
            gpu_bytes: need,
            hit: 0,
            pinned: None,
            phase: Phase::Loading,
            waits_prefetch: None,
        };
        let mut src: Option<usize> = None;
        let mut load: Option<(Tier, u64)> = None;
        // block planner: hit tokens by source, and the plan to run
        let mut by_src = [0u64; 3];
        let mut block_plan: Option<(Plan, u64, u64)> = None;
        if let Some(b) = self.blocks.as_mut() {
            let gpu_tokens = gpu_held / d.kv_bytes_per_token.max(1);
            match b.admit(now, i, k, st.l as u64, st.cacheable as u64, gpu_tokens) {
                Ok(a) => {
                    by_src = [a.local_tokens, a.host_tokens, a.nvme_tokens];
                    req.hit = by_src.iter().sum();
                    let p = &mut self.prefetch;
                    if a.prefetch_in_time {
                        if a.host_tokens > 0 {
                            p.early += 1;
                        } else {
                            p.wasted += 1;
                        }
                    }
                    if a.prefetch_late {
                        p.late += 1;
                    } else if a.nvme_tokens > 0 && !a.prefetch_in_time {
                        p.missed += 1;
                    }
                    block_plan = Some((a.plan, a.host_tokens, a.nvme_tokens));
                }
                Err(e) => {
                    self.err.get_or_insert(e);
                }
            }
        } else if k > 0 {
            let kv_prev = self.kv[i as usize].max(1);
            let frac = |held: u64| -> u64 {
                if held >= kv_prev {
                    st.cacheable as u64
                } else {
                    (st.cacheable as u128 * held as u128 / kv_prev as u128) as u64
                }
            };
            let hold = self.planner.holding(sid);
            let tier = self.planner.resume(now, sid);
            let pref = std::mem::replace(&mut self.pref[i as usize], Pref::None);
            if gpu_held > 0 {
                src = Some(0);
                req.hit = frac(gpu_held);
                if pref == Pref::Ready {
                    self.prefetch.wasted += 1;
                }
                if let Pref::InFlight(t) = pref {
                    self.pref[i as usize] = Pref::InFlight(t);
                }
            } else if let (Pref::InFlight(tid), Some(h)) = (pref, hold) {
                // late prefetch: it moves up; host → GPU once it lands
                self.prefetch.late += 1;
                src = Some(2);
                req.hit = frac(h.held[1].max(h.held[0]));
                self.pref[i as usize] = Pref::InFlight(tid);
                req.waits_prefetch = Some(tid);
                self.promote(tid);
            } else if let (Some(t), Some(h)) = (tier, hold) {
                let held = h.held[if t == Tier::Host { 0 } else { 1 }];
                req.hit = frac(held);
                match t {
                    Tier::Host => {
                        src = Some(1);
                        if pref == Pref::Ready {
                            self.prefetch.early += 1;
                        }
                    }
                    Tier::Nvme => {
                        src = Some(2);
                        if pref == Pref::Ready {
                            self.prefetch.wasted += 1;
                        }
                        if held > 0 {
                            self.prefetch.missed += 1;
                        }
                    }
                }
                if req.hit > 0 {
                    load = Some((t, d.kv_bytes(req.hit)));
                }
            } else if pref == Pref::Ready {
                self.prefetch.wasted += 1;
            }
        }
        let hit = req.hit;
        if st.counted {
            self.counted += 1;
            let c = if st.user { 1 } else { 2 };
            self.sum_l[0] += st.l as u128;
            self.sum_l[c] += st.l as u128;
            if let Some(s) = src {
                by_src[s] = hit;
            }
            for (s, h) in by_src.iter().enumerate() {
                self.hit[s][0] += *h as u128;
                self.hit[s][c] += *h as u128;
            }
            self.sum_fresh += st.fresh as u128;
            self.miss_cacheable += (st.cacheable as u64).saturating_sub(hit) as u128;
        }
        self.recompute += (st.l as u64).saturating_sub(hit);
        self.steps += 1;
        if let Some(p) = &self.cfg.progress {
            p.fetch_add(1, Ordering::Relaxed);
        }
        let waits = req.waits_prefetch.is_some();
        self.reqs[rid as usize] = Some(req);
        if waits {
            return;
        }
        if let Some((plan, host, nvme)) = block_plan {
            let loads = !plan.loads.is_empty();
            self.run_plan(now, plan, Some((rid, host, nvme)));
            if !loads {
                self.start_prefill(now, rid);
            }
            return;
        }
        match load {
            Some((t, raw)) if !self.idealised => {
                self.planner.pin_load(sid, t);
                self.reqs[rid as usize].as_mut().expect("req").pinned = Some(t);
                let (stages, bytes) = match t {
                    Tier::Host => ([H2D as u8, NO_LINK], [raw, 0]),
                    Tier::Nvme => ([NVR as u8, H2D as u8], [d.stored(raw), raw]),
                };
                let last = if t == Tier::Host { 0 } else { 1 };
                let mut then = [vec![], vec![]];
                then[last].push(Then::Loaded(rid));
                self.transfer(now, stages, bytes, 0, then, None);
            }
            _ => self.start_prefill(now, rid),
        }
    }

    /// The step of request `r` finished: its session suspends.
    fn finish(&mut self, now: u64, r: u32) {
        let req = self.reqs[r as usize].take().expect("req");
        self.free_rids.push(r);
        let (i, k) = (req.sess, req.k);
        let steps = self.script.steps_of(i as usize);
        let st = steps[k as usize];
        let sid = i as SessionId;
        self.gpu.running -= req.gpu_bytes;
        let bytes = self.dep.kv_bytes(st.kv_after as u64);
        if self.blocks.is_some() {
            self.finish_blocks(now, i, k, req.gpu_bytes, bytes);
            return;
        }
        if bytes < self.kv[i as usize] {
            // compaction: the old KV is invalid
            let acts = self.planner.end(now, sid);
            self.issue(now, acts);
        }
        self.kv[i as usize] = bytes;
        let next = steps.get(k as usize + 1).map(|n| now.saturating_add(n.gap));
        self.book.set(sid, next);
        let hint = Hint {
            awaiting: st.next_awaits,
            tool: (st.tool != u32::MAX).then(|| self.script.tools.name(st.tool).to_string()),
        };
        // the context stays on the GPU (prefix cache) before any save pins it
        let order = self.planner.gpu_order(sid, now);
        self.gpu.insert(i, order, req.gpu_bytes);
        let acts = self.planner.suspend(now, sid, bytes, &hint);
        self.issue(now, acts);
        self.gpu.shrink();
        self.gpu_gone();
        if next.is_some() {
            self.parked_of[i as usize] = bytes;
            self.parked_now += bytes;
            self.next_step(now, i, k);
        } else {
            let acts = self.planner.end(now, sid);
            self.issue(now, acts);
            if self.pref[i as usize] == Pref::Ready {
                self.prefetch.wasted += 1;
            }
            self.pref[i as usize] = Pref::None;
        }
    }

    /// [`Self::finish`] with the block planner: vLLM's `request_finished`
    /// (the planner is told nothing of a session's end, as the connector
    /// is not).
    fn finish_blocks(&mut self, now: u64, i: u32, k: u32, gpu_bytes: u64, bytes: u64) {
        let steps = self.script.steps_of(i as usize);
        let st = steps[k as usize];
        self.kv[i as usize] = bytes;
        let next = steps.get(k as usize + 1).map(|n| now.saturating_add(n.gap));
        let Some(b) = self.blocks.as_mut() else {
            return;
        };
        let sid = b.session(i);
        self.book.set(sid, next);
        let order = self.gpu_order(i, now);
        self.gpu.insert(i, order, gpu_bytes);
        let tool = (st.tool != u32::MAX).then(|| self.script.tools.name(st.tool));
        let awaits = (st.next_awaits != Awaiting::Unknown).then_some((st.next_awaits, tool));
        let Some(b) = self.blocks.as_mut() else {
            return;
        };
        match b.finish(now, i, k, st.kv_after as u64, awaits) {
            Ok((_, plan)) => self.run_plan(now, plan, None),
            Err(e) => {
                self.err.get_or_insert(e);
            }
        }
        self.gpu.shrink();
        self.gpu_gone();
        if next.is_some() {
            self.parked_of[i as usize] = bytes;
            self.parked_now += bytes;
            self.next_step(now, i, k);
        } else if let Some(b) = self.blocks.as_mut() {
            b.ended(i);
        }
    }

    fn next_step(&mut self, now: u64, i: u32, k: u32) {
        let steps = self.script.steps_of(i as usize);
        if let Some(n) = steps.get(k as usize + 1) {
            self.push(now.saturating_add(n.gap), Ev::Arrive(i, k + 1));
        }
    }
}

/// Replays `script` on `dep` under the named policy.
pub fn run_policy(
    script: &Script,
    dep: &Deployment,
    policy: &str,
    cfg: &SimConfig,
) -> Result<PolicyResult> {
    let wall = std::time::Instant::now();
    // With the block planner, `kvpark` runs as in a connector without
    // vLLM's KV-cache events; `kvpark:gpu-events` (and every other policy)
    // hears the modelled GPU's evictions as those events.
    let plain_kvpark = policy.starts_with("kvpark") && !policy.starts_with("kvpark:gpu-events");
    let env = PolicyEnv {
        nvme_read_bps: dep.nvme_read_bps.min(dep.decode_bps / dep.codec_ratio) * dep.codec_ratio,
        h2d_bps: dep.h2d_bps,
        kv_bytes_per_token: dep.kv_bytes_per_token,
        prefill_tps: dep.prefill_tps,
        prefill_halving: dep.prefill_halving,
        gpu_reports: !(cfg.blocks && plain_kvpark),
    };
    let book = Arc::new(OracleBook::default());
    let pol = by_name(policy, env, Some(book.clone()))?;
    let name = pol.name();
    let idealised = pol.idealised();
    let cap = if idealised {
        Capacity {
            host_bytes: u64::MAX / 4,
            nvme_bytes: u64::MAX / 4,
        }
    } else {
        Capacity {
            host_bytes: dep.host_bytes,
            nvme_bytes: (dep.nvme_bytes as f64 * dep.codec_ratio) as u64,
        }
    };
    let tc = if cfg.time_compression.is_finite() && cfg.time_compression > 0.0 {
        cfg.time_compression
    } else {
        1.0
    };
    let n = script.sessions.len();
    let (planner, blocks) = if cfg.blocks && !idealised {
        let bs = dep.block_size;
        let b = BlockSim::new(n, bs, dep.kv_bytes(bs as u64), cap, pol, !plain_kvpark)?;
        // (never called: the block planner's core decides)
        let idle = by_name("lmcache-lru", env, None)?;
        (
            Planner::new(
                Capacity {
                    host_bytes: 0,
                    nvme_bytes: 0,
                },
                idle,
            ),
            Some(b),
        )
    } else {
        (Planner::new(cap, pol), None)
    };
    let mut sim = Sim {
        script,
        dep,
        cfg,
        idealised,
        planner,
        blocks,
        err: None,
        book,
        gpu: Gpu {
            cap: if idealised {
                u64::MAX / 4
            } else {
                dep.gpu_kv_bytes
            },
            running: 0,
            pinned_bytes: 0,
            pinned: HashMap::new(),
            cache_bytes: 0,
            cache: BTreeMap::new(),
            pos: HashMap::new(),
            evictions: 0,
            enabled: !idealised,
            gone: Vec::new(),
        },
        heap: BinaryHeap::with_capacity(n * 2),
        seq: 0,
        kv: vec![0; n],
        pref: vec![Pref::None; n],
        parked_of: vec![0; n],
        wake_at: None,
        links: Default::default(),
        transfers: Vec::new(),
        free_tids: Vec::new(),
        reqs: Vec::new(),
        free_rids: Vec::new(),
        queue: VecDeque::new(),
        prefill: Shared::default(),
        decode: Shared::default(),
        decode_kv: 0,
        gpu_gen: 0,
        gpu_last: 0,
        sum_l: [0; 3],
        hit: [[0; 3]; 3],
        sum_fresh: 0,
        miss_cacheable: 0,
        recompute: 0,
        hists: Hist3 {
            user: LogHist::new(),
            tool: LogHist::new(),
            queue: LogHist::new(),
        },
        bytes: [0; 4],
        prefetch: Prefetch::default(),
        occ_int: [0.0; 4],
        occ_peak: [0; 4],
        parked_now: 0,
        busy_ns: [0; 2],
        last_t: None,
        first_t: 0,
        steps: 0,
        counted: 0,
        over_context: 0,
        link_log: Vec::new(),
    };
    for (i, s) in script.sessions.iter().enumerate() {
        if s.len > 0 {
            let t = (s.start as f64 / tc) as u64;
            sim.push(t, Ev::Arrive(i as u32, 0));
        }
    }
    while let Some(Reverse((t, e, _))) = sim.heap.pop() {
        sim.integrate(t);
        match e {
            Ev::Arrive(i, k) => sim.arrive(t, i, k),
            Ev::Link(l) => sim.link_done(t, l as usize),
            Ev::Gpu(g) => sim.gpu_event(t, g),
            Ev::Wakeup => {
                if sim.wake_at == Some(t) {
                    sim.wake_at = None;
                }
                if let Some(b) = sim.blocks.as_mut() {
                    let plan = b.planner_mut().tick_plan(t);
                    sim.run_plan(t, plan, None);
                } else {
                    let acts = sim.planner.tick(t);
                    sim.issue(t, acts);
                }
            }
        }
        sim.try_admit(t);
        sim.reschedule(t);
        if cfg.check_invariants {
            if let Err(m) = sim.core().check() {
                return Err(crate::Error::internal(format!(
                    "planner invariant broken at t={t}: {m}"
                )));
            }
            let (h, nv) = sim.core().occupancy();
            if h > cap.host_bytes || nv > cap.nvme_bytes {
                return Err(crate::Error::internal("tier over capacity"));
            }
            if sim.gpu.used() > sim.gpu.cap {
                return Err(crate::Error::internal(format!(
                    "GPU KV over capacity at t={t}: {} > {}",
                    sim.gpu.used(),
                    sim.gpu.cap
                )));
            }
        }
    }
    if !sim.queue.is_empty() || sim.reqs.iter().any(|r| r.is_some()) {
        return Err(crate::Error::internal(
            "replay ended with requests still queued or running",
        ));
    }
    let span = sim.last_t.unwrap_or(0).saturating_sub(sim.first_t) as f64;
    let div = |a: u128, b: u128| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    let hits: [u128; 3] = [0, 1, 2].map(|c| sim.hit[0][c] + sim.hit[1][c] + sim.hit[2][c]);
    if let Some(e) = sim.err.take() {
        return Err(e);
    }
    let ps = sim.core().stats();
    if let Some(b) = &sim.blocks {
        let c = b.planner().counters();
        sim.prefetch.issued = c.prefetches;
        sim.prefetch.wasted += c.prefetch_wasted;
    }
    let occ = |i: usize| Occ {
        peak: sim.occ_peak[i],
        mean: if span > 0.0 {
            sim.occ_int[i] / span
        } else {
            0.0
        },
    };
    let share = |x: u64| if span > 0.0 { x as f64 / span } else { 0.0 };
    Ok(PolicyResult {
        policy: name,
        idealised,
        steps: sim.steps,
        counted: sim.counted,
        over_context: sim.over_context,
        hit: Split {
            all: div(hits[0], sim.sum_l[0]),
            user: div(hits[1], sim.sum_l[1]),
            tool: div(hits[2], sim.sum_l[2]),
        },
        hit_from: [0, 1, 2].map(|s| div(sim.hit[s][0], sim.sum_l[0])),
        amplification: div(sim.sum_fresh + sim.miss_cacheable, sim.sum_fresh),
        recompute_tokens: sim.recompute,
        ttft_user_s: pcts(&sim.hists.user),
        ttft_tool_s: pcts(&sim.hists.tool),
        queue_s: pcts(&sim.hists.queue),
        gpu_busy: share(sim.busy_ns[0]),
        gpu_prefill_busy: share(sim.busy_ns[1]),
        pcie_d2h_bytes: sim.bytes[D2H],
        pcie_h2d_bytes: sim.bytes[H2D],
        nvme_write_bytes: sim.bytes[NVW],
        nvme_read_bytes: sim.bytes[NVR],
        nvme_write_per_day: if span > 0.0 {
            sim.bytes[NVW] as f64 / (span / 86400e9)
        } else {
            0.0
        },
        occupancy: [occ(0), occ(1), occ(2)],
        parked: occ(3),
        prefetch: sim.prefetch,
        refused: ps.refused,
        evictions: ps.evictions,
        gpu_evictions: sim.gpu.evictions,
        virtual_s: span / 1e9,
        wall_s: wall.elapsed().as_secs_f64(),
        ttft_hist: sim.hists.user,
        link_log: sim.link_log,
    })
}

/// Replays every policy, in parallel on up to `threads` threads; results in
/// the order of `policies`.
pub fn run_all(
    script: &Script,
    dep: &Deployment,
    policies: &[String],
    cfg: &SimConfig,
    threads: usize,
) -> Result<Vec<PolicyResult>> {
    let next = AtomicU64::new(0);
    let slots: Vec<parking_lot::Mutex<Option<Result<PolicyResult>>>> = (0..policies.len())
        .map(|_| parking_lot::Mutex::new(None))
        .collect();
    std::thread::scope(|sc| {
        for _ in 0..threads.clamp(1, policies.len().max(1)) {
            sc.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                if i >= policies.len() {
                    break;
                }
                *slots[i].lock() = Some(run_policy(script, dep, &policies[i], cfg));
            });
        }
    });
    slots
        .into_iter()
        .map(|s| {
            s.into_inner()
                .unwrap_or_else(|| Err(crate::Error::internal("policy run did not finish")))
        })
        .collect()
}
