//! The replay simulator: sessions replayed concurrently on one modelled
//! deployment, event-driven on a virtual clock (a binary heap of events),
//! at session granularity (a session's KV = its context tokens × bytes per
//! token; never per block).
//!
//! # Timeline (open loop)
//!
//! Each session keeps its own rhythm from the trace: its first step arrives
//! at the session's start (divided by the time-compression factor, which
//! packs more sessions onto the GPU without changing any session's gaps);
//! a step runs for its generation span; the next step arrives exactly the
//! §6 gap after the previous step ended (the wall gap when §6 has none).
//! Modelled load and prefill times are reported as TTFT but do not shift the
//! timeline, so every policy sees the same arrivals.
//!
//! # Tiers
//!
//! - GPU: vLLM's prefix cache, not controlled by kvpark: an LRU over
//!   session contexts within the GPU KV capacity minus the KV of the steps
//!   running now. A context whose save to host is in flight stays pinned.
//! - Host and NVMe: the [`Planner`] with the chosen policy. Its copies run
//!   on four FIFO links (PCIe d2h, PCIe h2d, NVMe write, NVMe read) with
//!   durations from the deployment (encode/decode pipelined with the NVMe
//!   transfer); the planner hears [`Planner::completed`] when they finish.
//!   Demand loads at a step's arrival go first (they push queued copies back).
//! - NVMe capacity is in stored (compressed) bytes; the planner accounts raw
//!   bytes against `nvme_bytes × codec_ratio`.
//!
//! # Hits (token-weighted, DESIGN §6)
//!
//! A counted step hits its cacheable tokens when its session's KV is on the
//! GPU, in host or on NVMe (or arriving by a prefetch in flight: a *late*
//! prefetch, served from NVMe); a tier holding only part of the KV serves
//! that fraction. Idealised policies (`ttl:<dur>`) get no GPU cache,
//! unlimited capacity and instant copies, so their hit rate and
//! amplification equal the §6 sweep exactly.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::deploy::Deployment;
use super::hist::LogHist;
use super::trace::{self, ReadSummary, Session, ToolNames, Trigger};
use crate::error::Result;
use crate::planner::core::{Action, Awaiting, Capacity, Hint, Planner, SessionId, Tier};
use crate::policy::{by_name, OracleBook, PolicyEnv};

/// One step of a session script, compact (40 bytes).
#[derive(Clone, Copy, Debug)]
pub struct SimStep {
    /// Arrival, ns after the session's start.
    pub arrive: u64,
    /// Generation span (ns).
    pub dur: u64,
    /// L (tokens).
    pub l: u32,
    /// Fresh tokens.
    pub fresh: u32,
    /// Cacheable tokens.
    pub cacheable: u32,
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
        if sess.steps.is_empty() {
            return;
        }
        let first = self.steps.len() as u32;
        let start_abs = sess.steps[0]
            .request_at
            .or(sess.steps[0].first_activity)
            .unwrap_or(i64::MIN);
        let mut prev_end = 0u64;
        let n = sess.steps.len();
        for (k, st) in sess.steps.iter().enumerate() {
            let arrive = if k == 0 {
                0
            } else {
                // u64: two i64 instants can be further apart than i64::MAX
                let wall = match (st.first_activity, sess.steps[k - 1].last_activity) {
                    (Some(a), Some(b)) if a >= b => a.abs_diff(b),
                    _ => 0,
                };
                let gap = st.gap.map_or(wall, |g| g.max(0) as u64);
                prev_end.saturating_add(gap)
            };
            let dur = st.gen_span.unwrap_or(0).max(0) as u64;
            prev_end = arrive.saturating_add(dur);
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
                arrive,
                dur,
                l: sat(st.l),
                fresh: sat(st.fresh),
                cacheable: sat(st.cacheable),
                kv_after: sat(st.l.saturating_add(st.output)),
                tool,
                counted: st.counted,
                user: st.trigger == Trigger::User,
                next_awaits,
            });
            let _ = n;
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
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            time_compression: 1.0,
            progress: None,
            check_invariants: false,
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
}

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
    /// Token-weighted hit rate.
    pub hit: Split,
    /// Hit tokens by source as a fraction of all counted tokens: GPU, host, NVMe.
    pub hit_from: [f64; 3],
    /// (Σ fresh + Σ missed cacheable) / Σ fresh.
    pub amplification: f64,
    /// TTFT of counted user-initiated steps (s): p50, p90, p99, mean.
    pub ttft_user_s: [f64; 4],
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
    /// Occupancy: GPU (active + prefix cache), host, NVMe (stored).
    pub occupancy: [Occ; 3],
    /// Seconds during which the running steps alone needed more KV than the
    /// GPU has (the model lets them run; a real server would queue them).
    pub gpu_oversubscribed_s: f64,
    /// Prefetch timeliness.
    pub prefetch: Prefetch,
    /// Saves/copies refused for lack of room (host, NVMe).
    pub refused: [u64; 2],
    /// Evictions (host, NVMe).
    pub evictions: [u64; 2],
    /// Virtual time replayed (s).
    pub virtual_s: f64,
    /// Wall time of the replay (s).
    pub wall_s: f64,
    /// TTFT histogram (for the CDF plot).
    #[serde(skip)]
    pub ttft_hist: LogHist,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    /// A copy finished (slot).
    Done(u32),
    /// Step `k` of session `i` ended.
    End(u32, u32),
    /// Step `k` of session `i` arrives.
    Arrive(u32, u32),
    /// The planner has timed work.
    Wakeup,
}

struct Gpu {
    cap: u64,
    active: u64,
    lru_bytes: u64,
    lru: BTreeMap<(u64, u64), u64>,
    pos: HashMap<u64, u64>,
    pinned: HashMap<u64, u32>,
    tick: u64,
}

impl Gpu {
    fn take(&mut self, s: u64) -> Option<u64> {
        let at = self.pos.remove(&s)?;
        let b = self.lru.remove(&(at, s))?;
        self.lru_bytes -= b;
        Some(b)
    }
    fn insert(&mut self, s: u64, bytes: u64) {
        self.take(s);
        self.tick += 1;
        self.lru.insert((self.tick, s), bytes);
        self.pos.insert(s, self.tick);
        self.lru_bytes += bytes;
    }
    fn evict(&mut self) {
        if self.active + self.lru_bytes <= self.cap {
            return;
        }
        let mut victims = Vec::new();
        let mut total = self.active + self.lru_bytes;
        for (&(at, s), &b) in &self.lru {
            if total <= self.cap {
                break;
            }
            if self.pinned.contains_key(&s) {
                continue;
            }
            victims.push((at, s));
            total -= b;
        }
        for (at, s) in victims {
            if let Some(b) = self.lru.remove(&(at, s)) {
                self.lru_bytes -= b;
                self.pos.remove(&s);
            }
        }
    }
    fn pin(&mut self, s: u64) {
        *self.pinned.entry(s).or_default() += 1;
    }
    fn unpin(&mut self, s: u64) {
        if let Some(c) = self.pinned.get_mut(&s) {
            *c -= 1;
            if *c == 0 {
                self.pinned.remove(&s);
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Pref {
    None,
    InFlight(u32),
    Ready,
}

struct Flight {
    action: Action,
    done_at: u64,
}

struct Link {
    free_at: u64,
}

impl Link {
    fn run(&mut self, now: u64, dur: u64) -> u64 {
        let start = self.free_at.max(now);
        self.free_at = start.saturating_add(dur);
        self.free_at
    }
    fn demand(&mut self, now: u64, dur: u64) {
        self.free_at = self.free_at.max(now).saturating_add(dur);
    }
}

fn ns(secs: f64) -> u64 {
    (secs * 1e9).round().max(0.0) as u64
}

struct Sim<'a> {
    script: &'a Script,
    dep: &'a Deployment,
    cfg: &'a SimConfig,
    idealised: bool,
    planner: Planner,
    book: Arc<OracleBook>,
    gpu: Gpu,
    heap: BinaryHeap<Reverse<(u64, Ev, u64)>>,
    seq: u64,
    starts: Vec<u64>,
    kv: Vec<u64>,
    pref: Vec<Pref>,
    flights: Vec<Option<Flight>>,
    free_slots: Vec<u32>,
    wake_at: Option<u64>,
    links: [Link; 4],
    // metrics
    sum_l: [u128; 3],
    hit: [[u128; 3]; 3],
    sum_fresh: u128,
    miss_cacheable: u128,
    ttft: LogHist,
    bytes: [u64; 4],
    prefetch: Prefetch,
    occ_int: [f64; 3],
    occ_peak: [u64; 3],
    over_ns: u64,
    last_t: Option<u64>,
    first_t: u64,
    steps: u64,
    counted: u64,
}

const D2H: usize = 0;
const H2D: usize = 1;
const NVW: usize = 2;
const NVR: usize = 3;

impl Sim<'_> {
    fn push(&mut self, t: u64, e: Ev) {
        self.seq += 1;
        self.heap.push(Reverse((t, e, self.seq)));
    }

    fn reschedule(&mut self, now: u64) {
        if let Some(w) = self.planner.next_wakeup() {
            let w = w.max(now);
            if self.wake_at.map_or(true, |x| w < x || x < now) {
                self.wake_at = Some(w);
                self.push(w, Ev::Wakeup);
            }
        }
    }

    fn occupancy(&self) -> [u64; 3] {
        let (h, n) = self.planner.occupancy();
        [self.gpu.active + self.gpu.lru_bytes, h, self.dep.stored(n)]
    }

    fn integrate(&mut self, now: u64) {
        let occ = self.occupancy();
        if let Some(l) = self.last_t {
            if self.gpu.active > self.gpu.cap && !self.idealised {
                self.over_ns += now.saturating_sub(l);
            }
            let dt = now.saturating_sub(l) as f64;
            for (i, o) in occ.iter().enumerate() {
                self.occ_int[i] += *o as f64 * dt;
            }
        } else {
            self.first_t = now;
        }
        for (p, o) in self.occ_peak.iter_mut().zip(occ) {
            *p = (*p).max(o);
        }
        self.last_t = Some(now);
    }

    fn issue(&mut self, now: u64, acts: Vec<Action>) {
        for a in acts {
            match a {
                Action::Drop { session, tier, .. } => {
                    if tier == Tier::Host && self.pref[session as usize] == Pref::Ready {
                        self.prefetch.wasted += 1;
                        self.pref[session as usize] = Pref::None;
                    }
                }
                Action::Copy {
                    session,
                    from,
                    to,
                    bytes,
                } => {
                    let d = self.dep;
                    let stored = d.stored(bytes);
                    let b = bytes as f64;
                    let done_at = match (from, to) {
                        (None, Tier::Host) => {
                            self.bytes[D2H] = self.bytes[D2H].saturating_add(bytes);
                            self.links[D2H].run(now, ns(b / d.d2h_bps))
                        }
                        (None, Tier::Nvme) => {
                            self.bytes[D2H] = self.bytes[D2H].saturating_add(bytes);
                            self.bytes[NVW] = self.bytes[NVW].saturating_add(stored);
                            let dur = ns((b / d.d2h_bps)
                                .max(b / d.encode_bps)
                                .max(stored as f64 / d.nvme_write_bps));
                            let start = self.links[D2H]
                                .free_at
                                .max(self.links[NVW].free_at)
                                .max(now);
                            let end = start.saturating_add(dur);
                            self.links[D2H].free_at = end;
                            self.links[NVW].free_at = end;
                            end
                        }
                        (Some(Tier::Host), Tier::Nvme) => {
                            self.bytes[NVW] = self.bytes[NVW].saturating_add(stored);
                            self.links[NVW].run(
                                now,
                                ns((b / d.encode_bps).max(stored as f64 / d.nvme_write_bps)),
                            )
                        }
                        (Some(Tier::Nvme), Tier::Host) => {
                            self.bytes[NVR] = self.bytes[NVR].saturating_add(stored);
                            self.prefetch.issued += 1;
                            self.links[NVR].run(
                                now,
                                ns((b / d.decode_bps).max(stored as f64 / d.nvme_read_bps)),
                            )
                        }
                        _ => now,
                    };
                    if from.is_none() {
                        self.gpu.pin(session);
                    }
                    if self.idealised {
                        self.planner.completed(now, &a, true);
                        if from.is_none() {
                            self.gpu.unpin(session);
                        }
                        continue;
                    }
                    let slot = match self.free_slots.pop() {
                        Some(s) => s,
                        None => {
                            self.flights.push(None);
                            (self.flights.len() - 1) as u32
                        }
                    };
                    if from == Some(Tier::Nvme) {
                        self.pref[session as usize] = Pref::InFlight(slot);
                    }
                    self.flights[slot as usize] = Some(Flight { action: a, done_at });
                    self.push(done_at, Ev::Done(slot));
                }
            }
        }
    }

    fn arrive(&mut self, now: u64, i: u32, k: u32) {
        let st = self.script.steps_of(i as usize)[k as usize];
        let sid = i as SessionId;
        let d = self.dep;
        let mut src: Option<usize> = None;
        let mut hit_tokens = 0u64;
        let mut load_s = 0.0;
        if k > 0 {
            let kv_prev = self.kv[i as usize].max(1);
            let frac = |held: u64| -> u64 {
                if held >= kv_prev {
                    st.cacheable as u64
                } else {
                    (st.cacheable as u128 * held as u128 / kv_prev as u128) as u64
                }
            };
            let gpu = self.gpu.take(sid);
            let hold = self.planner.holding(sid);
            let tier = self.planner.resume(now, sid);
            let pref = std::mem::replace(&mut self.pref[i as usize], Pref::None);
            if let Some(b) = gpu {
                src = Some(0);
                hit_tokens = frac(b);
                if pref == Pref::Ready {
                    self.prefetch.wasted += 1;
                }
            } else if let (Pref::InFlight(slot), Some(h)) = (pref, hold) {
                // late prefetch: wait for it, then host -> GPU
                let done = self.flights[slot as usize]
                    .as_ref()
                    .map_or(now, |f| f.done_at);
                self.prefetch.late += 1;
                let held = h.held[1].max(h.held[0]);
                src = Some(2);
                hit_tokens = frac(held);
                let b = d.kv_bytes(hit_tokens) as f64;
                load_s = done.saturating_sub(now) as f64 / 1e9 + b / d.h2d_bps;
                self.bytes[H2D] = self.bytes[H2D].saturating_add(d.kv_bytes(hit_tokens));
                self.links[H2D].demand(now, ns(b / d.h2d_bps));
            } else if let (Some(t), Some(h)) = (tier, hold) {
                let b = d.kv_bytes(frac(h.held[if t == Tier::Host { 0 } else { 1 }])) as f64;
                hit_tokens = frac(h.held[if t == Tier::Host { 0 } else { 1 }]);
                match t {
                    Tier::Host => {
                        src = Some(1);
                        if pref == Pref::Ready {
                            self.prefetch.early += 1;
                        }
                        load_s = b / d.h2d_bps;
                        self.links[H2D].demand(now, ns(load_s));
                    }
                    Tier::Nvme => {
                        src = Some(2);
                        if pref == Pref::Ready {
                            self.prefetch.wasted += 1;
                        }
                        let stored = self.dep.stored(b as u64);
                        load_s = (stored as f64 / d.nvme_read_bps)
                            .max(b / d.decode_bps)
                            .max(b / d.h2d_bps);
                        self.bytes[NVR] = self.bytes[NVR].saturating_add(stored);
                        self.links[NVR].demand(now, ns(load_s));
                        self.links[H2D].demand(now, ns(b / d.h2d_bps));
                    }
                }
                self.bytes[H2D] = self.bytes[H2D].saturating_add(b as u64);
            } else if pref == Pref::Ready {
                self.prefetch.wasted += 1;
            }
            if self.idealised {
                load_s = 0.0;
            }
        }
        let ttft = load_s + d.prefill_s((st.l as u64).saturating_sub(hit_tokens), hit_tokens);
        if st.counted {
            self.counted += 1;
            let c = if st.user { 1 } else { 2 };
            self.sum_l[0] += st.l as u128;
            self.sum_l[c] += st.l as u128;
            if let Some(s) = src {
                self.hit[s][0] += hit_tokens as u128;
                self.hit[s][c] += hit_tokens as u128;
            }
            self.sum_fresh += st.fresh as u128;
            self.miss_cacheable += (st.cacheable as u64).saturating_sub(hit_tokens) as u128;
            if st.user {
                self.ttft.add(ttft);
            }
        }
        self.gpu.active = self
            .gpu
            .active
            .saturating_add(d.kv_bytes(st.kv_after as u64));
        self.gpu.evict();
        self.push(now.saturating_add(st.dur), Ev::End(i, k));
        self.steps += 1;
        if let Some(p) = &self.cfg.progress {
            p.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn end(&mut self, now: u64, i: u32, k: u32) {
        let steps = self.script.steps_of(i as usize);
        let st = steps[k as usize];
        let sid = i as SessionId;
        let bytes = self.dep.kv_bytes(st.kv_after as u64);
        self.gpu.active = self.gpu.active.saturating_sub(bytes);
        if bytes < self.kv[i as usize] {
            // compaction: the old KV is invalid
            let acts = self.planner.end(now, sid);
            self.issue(now, acts);
        }
        self.kv[i as usize] = bytes;
        let next = steps
            .get(k as usize + 1)
            .map(|n| self.starts[i as usize].saturating_add(n.arrive));
        self.book.set(sid, next);
        let hint = Hint {
            awaiting: st.next_awaits,
            tool: (st.tool != u32::MAX).then(|| self.script.tools.name(st.tool).to_string()),
        };
        let acts = self.planner.suspend(now, sid, bytes, &hint);
        self.issue(now, acts);
        self.gpu.insert(sid, bytes);
        self.gpu.evict();
        match next {
            Some(t) => self.push(t, Ev::Arrive(i, k + 1)),
            None => {
                let acts = self.planner.end(now, sid);
                self.issue(now, acts);
                if self.pref[i as usize] == Pref::Ready {
                    self.prefetch.wasted += 1;
                }
                self.pref[i as usize] = Pref::None;
            }
        }
    }

    fn done(&mut self, now: u64, slot: u32) {
        let Some(f) = self.flights[slot as usize].take() else {
            return;
        };
        self.free_slots.push(slot);
        self.planner.completed(now, &f.action, true);
        if let Action::Copy { session, from, .. } = f.action {
            if from.is_none() {
                self.gpu.unpin(session);
                self.gpu.evict();
            }
            if from == Some(Tier::Nvme) && self.pref[session as usize] == Pref::InFlight(slot) {
                self.pref[session as usize] = Pref::Ready;
            }
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
    let env = PolicyEnv {
        nvme_read_bps: dep.nvme_read_bps.min(dep.decode_bps),
        h2d_bps: dep.h2d_bps,
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
    let starts: Vec<u64> = script
        .sessions
        .iter()
        .map(|s| (s.start as f64 / tc) as u64)
        .collect();
    let mut sim = Sim {
        script,
        dep,
        cfg,
        idealised,
        planner: Planner::new(cap, pol),
        book,
        gpu: Gpu {
            cap: if idealised { 0 } else { dep.gpu_kv_bytes },
            active: 0,
            lru_bytes: 0,
            lru: BTreeMap::new(),
            pos: HashMap::new(),
            pinned: HashMap::new(),
            tick: 0,
        },
        heap: BinaryHeap::with_capacity(n * 2),
        seq: 0,
        starts: starts.clone(),
        kv: vec![0; n],
        pref: vec![Pref::None; n],
        flights: Vec::new(),
        free_slots: Vec::new(),
        wake_at: None,
        links: [
            Link { free_at: 0 },
            Link { free_at: 0 },
            Link { free_at: 0 },
            Link { free_at: 0 },
        ],
        sum_l: [0; 3],
        hit: [[0; 3]; 3],
        sum_fresh: 0,
        miss_cacheable: 0,
        ttft: LogHist::new(),
        bytes: [0; 4],
        prefetch: Prefetch::default(),
        occ_int: [0.0; 3],
        occ_peak: [0; 3],
        over_ns: 0,
        last_t: None,
        first_t: 0,
        steps: 0,
        counted: 0,
    };
    for (i, s) in script.sessions.iter().enumerate() {
        if s.len > 0 {
            let t = starts[i].saturating_add(script.steps[s.first as usize].arrive);
            sim.push(t, Ev::Arrive(i as u32, 0));
        }
    }
    while let Some(Reverse((t, e, _))) = sim.heap.pop() {
        sim.integrate(t);
        match e {
            Ev::Arrive(i, k) => sim.arrive(t, i, k),
            Ev::End(i, k) => sim.end(t, i, k),
            Ev::Done(slot) => sim.done(t, slot),
            Ev::Wakeup => {
                if sim.wake_at == Some(t) {
                    sim.wake_at = None;
                }
                let acts = sim.planner.tick(t);
                sim.issue(t, acts);
            }
        }
        sim.reschedule(t);
        if cfg.check_invariants {
            if let Err(m) = sim.planner.check() {
                return Err(crate::Error::internal(format!(
                    "planner invariant broken at t={t}: {m}"
                )));
            }
            let (h, nv) = sim.planner.occupancy();
            if h > cap.host_bytes || nv > cap.nvme_bytes {
                return Err(crate::Error::internal("tier over capacity"));
            }
        }
    }
    let span = sim.last_t.unwrap_or(0).saturating_sub(sim.first_t) as f64;
    let div = |a: u128, b: u128| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    let hits: [u128; 3] = [0, 1, 2].map(|c| sim.hit[0][c] + sim.hit[1][c] + sim.hit[2][c]);
    let ps = sim.planner.stats();
    Ok(PolicyResult {
        policy: name,
        idealised,
        steps: sim.steps,
        counted: sim.counted,
        hit: Split {
            all: div(hits[0], sim.sum_l[0]),
            user: div(hits[1], sim.sum_l[1]),
            tool: div(hits[2], sim.sum_l[2]),
        },
        hit_from: [0, 1, 2].map(|s| div(sim.hit[s][0], sim.sum_l[0])),
        amplification: div(sim.sum_fresh + sim.miss_cacheable, sim.sum_fresh),
        ttft_user_s: [
            sim.ttft.quantile(0.5),
            sim.ttft.quantile(0.9),
            sim.ttft.quantile(0.99),
            sim.ttft.mean(),
        ],
        pcie_d2h_bytes: sim.bytes[D2H],
        pcie_h2d_bytes: sim.bytes[H2D],
        nvme_write_bytes: sim.bytes[NVW],
        nvme_read_bytes: sim.bytes[NVR],
        nvme_write_per_day: if span > 0.0 {
            sim.bytes[NVW] as f64 / (span / 86400e9)
        } else {
            0.0
        },
        occupancy: [0, 1, 2].map(|i| Occ {
            peak: sim.occ_peak[i],
            mean: if span > 0.0 {
                sim.occ_int[i] / span
            } else {
                0.0
            },
        }),
        gpu_oversubscribed_s: sim.over_ns as f64 / 1e9,
        prefetch: sim.prefetch,
        refused: ps.refused,
        evictions: ps.evictions,
        virtual_s: span / 1e9,
        wall_s: wall.elapsed().as_secs_f64(),
        ttft_hist: sim.ttft,
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
    let mut out: Vec<Option<Result<PolicyResult>>> = (0..policies.len()).map(|_| None).collect();
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
    for (o, s) in out.iter_mut().zip(slots) {
        *o = s.into_inner();
    }
    out.into_iter()
        .map(|r| r.unwrap_or_else(|| Err(crate::Error::internal("policy run did not finish"))))
        .collect()
}
