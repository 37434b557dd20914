//! The pure planner: the session table, capacity accounting of kvpark's two
//! tiers (host, NVMe), and the calls into a [`Policy`]. The connector and the
//! replay simulator run this same code; time is always an argument.
//!
//! # Accounting model
//!
//! A session's KV is `bytes` long (as of its last suspend; it only grows
//! until the session ends or is invalidated). Each tier holds a *prefix* of
//! it: `held[t]` committed bytes, plus `pending[t]` bytes of copies in flight
//! into `t`. Copies are deltas: a save GPU → host of a session whose host
//! copy is `h` bytes long copies `bytes − h` bytes; a demotion copies
//! `held[host] − held[nvme]`; a prefetch the reverse.
//!
//! Invariants (checked by the unit tests and by [`Planner::check`]):
//! - `used[t] = Σ held[t] + Σ pending[t] + stale[t] ≤ capacity[t]` at every
//!   moment: room is made (evicting per the policy) *before* a copy is
//!   planned, or the copy is refused (counted in [`PlannerStats`]).
//! - A drop takes effect in the accounting when it is planned (the mover
//!   drops before it copies new data in).
//! - A copy's bytes are reserved when planned and committed by
//!   [`Planner::completed`] with `ok`; a failed copy releases the reservation
//!   and leaves `held` unchanged (the bytes are not where the action put them).
//! - A session with a copy in flight into or out of a tier is not an eviction
//!   victim in that tier.
//! - [`Planner::end`] drops everything at once; copies still in flight then
//!   belong to a dead incarnation: when one lands, the planner plans a drop
//!   of exactly its bytes at the next [`Planner::tick`].

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap};

use crate::policy::{tier_index, Calibration, EvictKey, Op, Policy, SessionView};

pub use crate::session::{Action, Awaiting, Capacity, Hint, Nanos, SessionId, Tier};

const TIERS: [Tier; 2] = [Tier::Host, Tier::Nvme];

/// What a tier holds of a session, for metrics and the simulator.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Holding {
    /// Current KV length.
    pub bytes: u64,
    /// Committed bytes per tier (host, nvme).
    pub held: [u64; 2],
    /// In-flight bytes into each tier.
    pub pending: [u64; 2],
}

/// Counters kept by the planner.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct PlannerStats {
    /// Saves or copies refused for lack of room, per tier.
    pub refused: [u64; 2],
    /// Evictions per tier.
    pub evictions: [u64; 2],
    /// Bytes evicted per tier.
    pub evicted_bytes: [u64; 2],
    /// Copies that failed.
    pub failed: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Inflight {
    from: Option<Tier>,
    to: Tier,
    bytes: u64,
    inc: u32,
}

#[derive(Debug, Default)]
struct Sess {
    live: bool,
    inc: u32,
    bytes: u64,
    held: [u64; 2],
    pending: [u64; 2],
    reading: [u32; 2],
    stale: [u64; 2],
    inflight: Vec<Inflight>,
    suspended_at: Option<Nanos>,
    last_touch: Nanos,
    resumes: u32,
    served: [u32; 2],
    hint: Hint,
    gaps: Vec<Nanos>,
    timer_gen: u64,
    key: [Option<(EvictKey, u64)>; 2],
    ghost: Option<(Tier, u8)>,
    gpu_gone: bool,
}

/// Gaps kept per session for the policy / predictor.
const GAP_HISTORY: usize = 32;

/// The planner. See the module docs.
pub struct Planner {
    cap: [u64; 2],
    policy: Box<dyn Policy>,
    sessions: HashMap<SessionId, Sess>,
    index: [BTreeSet<(EvictKey, SessionId)>; 2],
    class_bytes: [[u64; 2]; 2],
    used: [u64; 2],
    timers: BinaryHeap<Reverse<(Nanos, SessionId, u64)>>,
    deferred: Vec<Action>,
    last_now: Nanos,
    stats: PlannerStats,
}

fn view<'a>(id: SessionId, s: &'a Sess) -> SessionView<'a> {
    SessionView {
        id,
        bytes: s.bytes,
        held: s.held,
        pending: s.pending,
        suspended_at: s.suspended_at,
        last_touch: s.last_touch,
        resumes: s.resumes,
        served: s.served,
        hint: &s.hint,
        gaps: &s.gaps,
        gpu_gone: s.gpu_gone,
    }
}

impl Planner {
    /// A planner over `cap` driven by `policy`.
    pub fn new(cap: Capacity, policy: Box<dyn Policy>) -> Self {
        Planner {
            cap: [cap.host_bytes, cap.nvme_bytes],
            policy,
            sessions: HashMap::new(),
            index: [BTreeSet::new(), BTreeSet::new()],
            class_bytes: [[0; 2]; 2],
            used: [0; 2],
            timers: BinaryHeap::new(),
            deferred: Vec::new(),
            last_now: 0,
            stats: PlannerStats::default(),
        }
    }

    /// The policy's name.
    pub fn policy_name(&self) -> String {
        self.policy.name()
    }

    /// The policy's gap-prediction calibration, if it predicts gaps.
    pub fn calibration(&self) -> Option<Calibration> {
        self.policy.calibration()
    }

    /// Counters.
    pub fn stats(&self) -> PlannerStats {
        self.stats
    }

    /// What kvpark's tiers hold of `s`.
    pub fn holding(&self, s: SessionId) -> Option<Holding> {
        self.sessions.get(&s).filter(|x| x.live).map(|x| Holding {
            bytes: x.bytes,
            held: x.held,
            pending: x.pending,
        })
    }

    /// Number of sessions in the table (live or with copies in flight).
    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    fn reindex(&mut self, id: SessionId) {
        let Some(s) = self.sessions.get_mut(&id) else {
            return;
        };
        for t in TIERS {
            let ti = tier_index(t);
            if let Some((k, b)) = s.key[ti].take() {
                self.index[ti].remove(&(k, id));
                self.class_bytes[ti][(k.class & 1) as usize] -= b;
            }
            if s.live && s.held[ti] > 0 {
                let k = self.policy.evict_key(&view(id, s), t);
                self.index[ti].insert((k, id));
                self.class_bytes[ti][(k.class & 1) as usize] += s.held[ti];
                s.key[ti] = Some((k, s.held[ti]));
            }
        }
    }

    fn set_timer(&mut self, id: SessionId, at: Option<Nanos>) {
        if let Some(s) = self.sessions.get_mut(&id) {
            s.timer_gen += 1;
            if let Some(at) = at {
                self.timers.push(Reverse((at, id, s.timer_gen)));
            }
        }
    }

    /// Makes `need` bytes free in `t`, evicting per the policy (never `who`,
    /// never a session with a copy in flight in `t`). Returns the drops, or
    /// `None` (and evicts nothing) when that is impossible.
    fn make_room(
        &mut self,
        t: Tier,
        need: u64,
        who: SessionId,
        below: Option<EvictKey>,
    ) -> Option<Vec<Action>> {
        let ti = tier_index(t);
        let free = self.cap[ti] - self.used[ti];
        if free >= need {
            return Some(Vec::new());
        }
        if need > self.cap[ti] {
            return None;
        }
        let first = self.policy.victim_class(t, self.class_bytes[ti]) & 1;
        let mut victims: Vec<(SessionId, u64, u8)> = Vec::new();
        let mut got = free;
        'outer: for class in [first, 1 - first] {
            let lo = (EvictKey { class, order: 0 }, 0);
            let hi = (
                EvictKey {
                    class,
                    order: u64::MAX,
                },
                u64::MAX,
            );
            for &(k, id) in self.index[ti].range(lo..=hi) {
                if id == who {
                    continue;
                }
                if below.is_some_and(|b| k >= b) {
                    // the rest of this class ranks above the bound
                    break;
                }
                let s = &self.sessions[&id];
                if s.pending[ti] > 0 || s.reading[ti] > 0 {
                    continue;
                }
                victims.push((id, s.held[ti], k.class));
                got += s.held[ti];
                if got >= need {
                    break 'outer;
                }
            }
        }
        if got < need {
            return None;
        }
        let mut acts = Vec::with_capacity(victims.len());
        for (id, b, class) in victims {
            let s = self.sessions.get_mut(&id).expect("victim in table");
            s.held[ti] = 0;
            s.served[ti] = 0;
            s.ghost = Some((t, class));
            self.used[ti] -= b;
            self.stats.evictions[ti] += 1;
            self.stats.evicted_bytes[ti] += b;
            acts.push(Action::Drop {
                session: id,
                tier: t,
                bytes: b,
            });
            self.reindex(id);
        }
        Some(acts)
    }

    /// Plans a copy of the missing bytes of `id` into `to` from `from`.
    fn plan_copy(&mut self, id: SessionId, from: Option<Tier>, to: Tier, out: &mut Vec<Action>) {
        self.plan_copy_below(id, from, to, None, out)
    }

    /// [`Planner::plan_copy`], making room only by evicting copies whose key
    /// is below `below` (when given).
    fn plan_copy_below(
        &mut self,
        id: SessionId,
        from: Option<Tier>,
        to: Tier,
        below: Option<EvictKey>,
        out: &mut Vec<Action>,
    ) {
        let ti = tier_index(to);
        let Some(s) = self.sessions.get(&id) else {
            return;
        };
        let target = match from {
            None => s.bytes,
            Some(f) => s.held[tier_index(f)],
        };
        let have = s.held[ti] + s.pending[ti];
        if target <= have {
            return;
        }
        if let Some(f) = from {
            if s.held[tier_index(f)] == 0 {
                return;
            }
        }
        let delta = target - have;
        match self.make_room(to, delta, id, below) {
            None if below.is_some() => {}
            None => self.stats.refused[ti] += 1,
            Some(drops) => {
                out.extend(drops);
                let s = self.sessions.get_mut(&id).expect("session");
                s.pending[ti] += delta;
                if let Some(f) = from {
                    s.reading[tier_index(f)] += 1;
                }
                s.inflight.push(Inflight {
                    from,
                    to,
                    bytes: delta,
                    inc: s.inc,
                });
                self.used[ti] += delta;
                out.push(Action::Copy {
                    session: id,
                    from,
                    to,
                    bytes: delta,
                });
            }
        }
    }

    fn drop_tier(&mut self, id: SessionId, t: Tier, force: bool, out: &mut Vec<Action>) {
        let ti = tier_index(t);
        let Some(s) = self.sessions.get_mut(&id) else {
            return;
        };
        if s.held[ti] == 0 || (!force && (s.pending[ti] > 0 || s.reading[ti] > 0)) {
            return;
        }
        let b = s.held[ti];
        s.held[ti] = 0;
        self.used[ti] -= b;
        out.push(Action::Drop {
            session: id,
            tier: t,
            bytes: b,
        });
    }

    /// Starts a new incarnation: drops every copy; copies in flight become stale.
    fn invalidate(&mut self, id: SessionId, out: &mut Vec<Action>) {
        for t in TIERS {
            self.drop_tier(id, t, true, out);
        }
        if let Some(s) = self.sessions.get_mut(&id) {
            for t in 0..2 {
                s.stale[t] += s.pending[t];
                s.pending[t] = 0;
                s.reading[t] = 0;
            }
            s.inc = s.inc.wrapping_add(1);
            s.bytes = 0;
            s.ghost = None;
        }
        self.reindex(id);
    }

    /// A step of session `s` ended at `now`; the session's KV is now `bytes` long (it grew). Returns the actions to run now (typically a save of the new bytes to host, maybe evictions to make room).
    pub fn suspend(&mut self, now: Nanos, s: SessionId, bytes: u64, hint: &Hint) -> Vec<Action> {
        self.last_now = self.last_now.max(now);
        let mut out = Vec::new();
        let sess = self.sessions.entry(s).or_default();
        if !sess.live {
            sess.live = true;
            sess.inc = sess.inc.wrapping_add(1);
            sess.bytes = 0;
            sess.held = [0; 2];
            sess.pending = [0; 2];
            sess.reading = [0; 2];
            sess.gaps.clear();
            sess.resumes = 0;
            sess.served = [0; 2];
        }
        if bytes < sess.bytes {
            self.invalidate(s, &mut out);
        }
        let sess = self.sessions.get_mut(&s).expect("session");
        sess.bytes = bytes;
        sess.suspended_at = Some(now);
        sess.last_touch = now;
        sess.gpu_gone = false;
        sess.hint = hint.clone();
        let plan = self.policy.on_suspend(now, &view(s, sess));
        self.reindex(s);
        for t in plan.save {
            self.plan_copy(s, None, t, &mut out);
        }
        self.set_timer(s, plan.timer);
        self.reindex(s);
        out
    }

    /// The next step of `s` arrived at `now`: which kvpark tier holds (a copy of) its KV, if any. Feeds the observed gap to the predictor.
    pub fn resume(&mut self, now: Nanos, s: SessionId) -> Option<Tier> {
        self.last_now = self.last_now.max(now);
        let sess = self.sessions.get_mut(&s).filter(|x| x.live)?;
        let gap = sess
            .suspended_at
            .map(|t| now.saturating_sub(t))
            .unwrap_or(0);
        if sess.gaps.len() == GAP_HISTORY {
            sess.gaps.remove(0);
        }
        sess.gaps.push(gap);
        sess.resumes += 1;
        let ghost = sess.ghost.take();
        self.policy.on_resume(now, &view(s, sess), gap, ghost);
        sess.suspended_at = None;
        sess.last_touch = now;
        let (h, n) = (sess.held[0], sess.held[1]);
        let tier = if h > 0 && h >= n {
            Some(Tier::Host)
        } else if n > 0 {
            Some(Tier::Nvme)
        } else {
            None
        };
        if let Some(t) = tier {
            sess.served[tier_index(t)] += 1;
        }
        self.set_timer(s, None);
        self.reindex(s);
        tier
    }

    /// A load is about to read `s`'s copy in `t`: until [`Planner::unpin_load`]
    /// the copy is neither evicted nor dropped by a policy (as for a copy in
    /// flight out of `t`).
    pub fn pin_load(&mut self, s: SessionId, t: Tier) {
        if let Some(x) = self.sessions.get_mut(&s).filter(|x| x.live) {
            x.reading[tier_index(t)] += 1;
        }
    }

    /// The load of [`Planner::pin_load`] finished.
    pub fn unpin_load(&mut self, s: SessionId, t: Tier) {
        if let Some(x) = self.sessions.get_mut(&s).filter(|x| x.live) {
            let r = &mut x.reading[tier_index(t)];
            *r = r.saturating_sub(1);
        }
    }

    /// From now on the runtime reports when the GPU prefix cache gives up a
    /// context ([`Planner::gpu_dropped`]); the policy may count on it.
    pub fn hear_gpu_reports(&mut self) {
        self.policy.hear_gpu_reports();
    }

    /// The GPU prefix cache gave up `s`'s context: the policy hears it at
    /// the next [`Planner::tick`] (as if its timer fired).
    pub fn gpu_dropped(&mut self, s: SessionId) {
        if let Some(x) = self.sessions.get_mut(&s).filter(|x| x.live) {
            if x.suspended_at.is_some() && !x.gpu_gone {
                x.gpu_gone = true;
                self.timers.push(Reverse((self.last_now, s, x.timer_gen)));
            }
        }
    }

    /// The policy's place for `s`'s context in the GPU prefix cache (lowest
    /// goes first), as of `now` (vLLM's own order is least recently used).
    pub fn gpu_order(&self, s: SessionId, now: Nanos) -> u64 {
        self.policy.gpu_order(s, now)
    }

    /// Time-driven work due by `now`: demotions, prefetches, drops.
    pub fn tick(&mut self, now: Nanos) -> Vec<Action> {
        self.last_now = self.last_now.max(now);
        let mut out = std::mem::take(&mut self.deferred);
        for a in &out {
            if let Action::Drop { tier, bytes, .. } = a {
                self.used[tier_index(*tier)] -= bytes;
            }
        }
        while let Some(&Reverse((at, id, gen))) = self.timers.peek() {
            if at > now {
                break;
            }
            self.timers.pop();
            let Some(sess) = self.sessions.get(&id) else {
                continue;
            };
            if !sess.live || sess.timer_gen != gen {
                continue;
            }
            let plan = self.policy.on_timer(now, &view(id, sess));
            for op in plan.ops {
                match op {
                    Op::Demote => self.plan_copy(id, Some(Tier::Host), Tier::Nvme, &mut out),
                    Op::Prefetch => self.plan_copy(id, Some(Tier::Nvme), Tier::Host, &mut out),
                    Op::PrefetchOver(k) => {
                        self.plan_copy_below(id, Some(Tier::Nvme), Tier::Host, Some(k), &mut out)
                    }
                    Op::Drop(t) => self.drop_tier(id, t, false, &mut out),
                }
            }
            self.set_timer(id, plan.timer);
            self.reindex(id);
        }
        out
    }

    /// When `tick` next has something to do (so callers can sleep / the sim can schedule).
    pub fn next_wakeup(&self) -> Option<Nanos> {
        if !self.deferred.is_empty() {
            return Some(self.last_now);
        }
        self.timers.peek().map(|r| r.0 .0)
    }

    /// An action finished (ok) or failed (the bytes are not where the action put them).
    pub fn completed(&mut self, now: Nanos, action: &Action, ok: bool) {
        self.last_now = self.last_now.max(now);
        let Action::Copy {
            session,
            from,
            to,
            bytes,
        } = *action
        else {
            return;
        };
        let ti = tier_index(to);
        let Some(sess) = self.sessions.get_mut(&session) else {
            return;
        };
        let Some(pos) = sess
            .inflight
            .iter()
            .position(|f| f.from == from && f.to == to && f.bytes == bytes)
        else {
            return;
        };
        let f = sess.inflight.remove(pos);
        if !ok {
            self.stats.failed += 1;
        }
        if sess.live && f.inc == sess.inc {
            sess.pending[ti] -= bytes;
            if let Some(fr) = from {
                let fi = tier_index(fr);
                sess.reading[fi] = sess.reading[fi].saturating_sub(1);
            }
            if ok {
                sess.held[ti] += bytes;
            } else {
                self.used[ti] -= bytes;
            }
            self.reindex(session);
            // let the policy follow up (drop after demotion, chained
            // copies); after a failure it keeps its own schedule (asking
            // again at the same instant could fail again forever)
            if ok {
                self.set_timer(session, Some(now));
            }
        } else {
            sess.stale[ti] -= bytes;
            if ok {
                self.deferred.push(Action::Drop {
                    session,
                    tier: to,
                    bytes,
                });
            } else {
                self.used[ti] -= bytes;
            }
            if !sess.live && sess.inflight.is_empty() {
                self.sessions.remove(&session);
            }
        }
    }

    /// The session is gone (or its KV was invalidated, e.g. compaction): drop everything.
    pub fn end(&mut self, now: Nanos, s: SessionId) -> Vec<Action> {
        self.last_now = self.last_now.max(now);
        let mut out = Vec::new();
        if !self.sessions.get(&s).is_some_and(|x| x.live) {
            return out;
        }
        self.invalidate(s, &mut out);
        self.set_timer(s, None);
        self.policy.on_end(s);
        let sess = self.sessions.get_mut(&s).expect("session");
        sess.live = false;
        if sess.inflight.is_empty() {
            self.sessions.remove(&s);
        }
        out
    }

    /// Occupancy per tier (bytes), for metrics.
    pub fn occupancy(&self) -> (u64, u64) {
        (self.used[0], self.used[1])
    }

    /// Recomputes the accounting from the session table and compares: an
    /// error names the first broken invariant (tests, debug checks).
    pub fn check(&self) -> Result<(), String> {
        let mut sum = [0u64; 2];
        for (id, s) in &self.sessions {
            for (t, total) in sum.iter_mut().enumerate() {
                *total += s.held[t] + s.pending[t] + s.stale[t];
                let infl: u64 = s
                    .inflight
                    .iter()
                    .filter(|f| tier_index(f.to) == t)
                    .map(|f| f.bytes)
                    .sum();
                if infl != s.pending[t] + s.stale[t] {
                    return Err(format!(
                        "session {id} tier {t}: in-flight {infl} != pending+stale"
                    ));
                }
                if s.live && s.held[t] > 0 && s.key[t].is_none() {
                    return Err(format!("session {id} tier {t}: held but not indexed"));
                }
            }
        }
        let deferred: [u64; 2] = self.deferred.iter().fold([0, 0], |mut a, d| {
            if let Action::Drop { tier, bytes, .. } = d {
                a[tier_index(*tier)] += bytes;
            }
            a
        });
        for t in 0..2 {
            if sum[t] + deferred[t] != self.used[t] {
                return Err(format!(
                    "tier {t}: used {} != recomputed {}",
                    self.used[t],
                    sum[t] + deferred[t]
                ));
            }
            if self.used[t] > self.cap[t] {
                return Err(format!(
                    "tier {t}: used {} over capacity {}",
                    self.used[t], self.cap[t]
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{LmcacheLru, SuspendPlan, TimerPlan, VllmOffload};

    /// splitmix64: random choices for the model test (the planner uses
    /// nothing of `sim`, not even in tests).
    struct Rng(u64);

    impl Rng {
        fn new(seed: u64) -> Self {
            Rng(seed)
        }
        fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
        /// Uniform in `[0, n)`.
        fn below(&mut self, n: u64) -> u64 {
            ((self.next_u64() as u128 * n as u128) >> 64) as u64
        }
        /// True with probability `p`.
        fn chance(&mut self, p: f64) -> bool {
            ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < p
        }
    }

    const GB: u64 = 1 << 30;

    fn cap(h: u64, n: u64) -> Capacity {
        Capacity {
            host_bytes: h,
            nvme_bytes: n,
        }
    }

    fn copies(a: &[Action]) -> Vec<&Action> {
        a.iter()
            .filter(|x| matches!(x, Action::Copy { .. }))
            .collect()
    }

    #[test]
    fn save_is_a_delta_and_completion_commits() {
        let mut p = Planner::new(cap(100 * GB, 0), Box::new(VllmOffload::lru()));
        let a = p.suspend(0, 1, 10 * GB, &Hint::default());
        assert_eq!(
            a,
            vec![Action::Copy {
                session: 1,
                from: None,
                to: Tier::Host,
                bytes: 10 * GB
            }]
        );
        assert_eq!(p.occupancy(), (10 * GB, 0));
        p.completed(5, &a[0], true);
        assert_eq!(p.holding(1).unwrap().held, [10 * GB, 0]);
        assert_eq!(p.resume(100, 1), Some(Tier::Host));
        // the KV grew by 1 GiB: only the new bytes are saved
        let b = p.suspend(200, 1, 11 * GB, &Hint::default());
        assert_eq!(
            b,
            vec![Action::Copy {
                session: 1,
                from: None,
                to: Tier::Host,
                bytes: GB
            }]
        );
        p.check().unwrap();
    }

    #[test]
    fn failed_copy_releases_the_reservation() {
        let mut p = Planner::new(cap(100 * GB, 0), Box::new(VllmOffload::lru()));
        let a = p.suspend(0, 1, 10 * GB, &Hint::default());
        p.completed(1, &a[0], false);
        assert_eq!(p.occupancy(), (0, 0));
        assert_eq!(p.holding(1).unwrap().held, [0, 0]);
        assert_eq!(p.resume(2, 1), None);
        assert_eq!(p.stats().failed, 1);
        p.check().unwrap();
    }

    #[test]
    fn lru_evicts_the_oldest_and_refuses_what_cannot_fit() {
        let mut p = Planner::new(cap(30 * GB, 0), Box::new(VllmOffload::lru()));
        for s in 1..=3 {
            let a = p.suspend(s * 10, s, 10 * GB, &Hint::default());
            p.completed(s * 10 + 1, &a[0], true);
        }
        assert_eq!(p.occupancy().0, 30 * GB);
        let a = p.suspend(100, 4, 10 * GB, &Hint::default());
        assert_eq!(
            a[0],
            Action::Drop {
                session: 1,
                tier: Tier::Host,
                bytes: 10 * GB
            }
        );
        assert_eq!(copies(&a).len(), 1);
        assert_eq!(p.occupancy().0, 30 * GB);
        // bigger than the tier: refused, nothing evicted
        let a = p.suspend(200, 5, 31 * GB, &Hint::default());
        assert!(a.is_empty());
        assert_eq!(p.stats().refused[0], 1);
        assert_eq!(p.occupancy().0, 30 * GB);
        p.check().unwrap();
    }

    #[test]
    fn in_flight_sessions_are_not_victims() {
        let mut p = Planner::new(cap(20 * GB, 0), Box::new(VllmOffload::lru()));
        let _a = p.suspend(0, 1, 10 * GB, &Hint::default()); // in flight
        let b = p.suspend(1, 2, 10 * GB, &Hint::default());
        p.completed(2, &b[0], true);
        // session 3 needs room: only session 2 (committed) may go, though 1 is older
        let c = p.suspend(3, 3, 10 * GB, &Hint::default());
        assert_eq!(
            c[0],
            Action::Drop {
                session: 2,
                tier: Tier::Host,
                bytes: 10 * GB
            }
        );
        p.check().unwrap();
    }

    #[test]
    fn end_with_copy_in_flight_drops_the_late_bytes() {
        let mut p = Planner::new(cap(20 * GB, 20 * GB), Box::new(LmcacheLru));
        let a = p.suspend(0, 1, 10 * GB, &Hint::default());
        assert_eq!(copies(&a).len(), 2);
        p.completed(1, &a[0], true); // host landed
        let e = p.end(2, 1);
        assert_eq!(
            e,
            vec![Action::Drop {
                session: 1,
                tier: Tier::Host,
                bytes: 10 * GB
            }]
        );
        assert_eq!(p.occupancy(), (0, 10 * GB)); // NVMe copy still in flight
        p.completed(3, &a[1], true);
        assert_eq!(p.next_wakeup(), Some(3));
        let t = p.tick(3);
        assert_eq!(
            t,
            vec![Action::Drop {
                session: 1,
                tier: Tier::Nvme,
                bytes: 10 * GB
            }]
        );
        assert_eq!(p.occupancy(), (0, 0));
        assert_eq!(p.sessions(), 0);
        p.check().unwrap();
    }

    /// A policy making random (but legal-to-ask) choices.
    struct Chaos(Rng);

    impl Policy for Chaos {
        fn name(&self) -> String {
            "chaos".into()
        }
        fn on_suspend(&mut self, now: Nanos, _s: &crate::policy::SessionView) -> SuspendPlan {
            let mut save = Vec::new();
            if self.0.chance(0.8) {
                save.push(Tier::Host);
            }
            if self.0.chance(0.4) {
                save.push(Tier::Nvme);
            }
            SuspendPlan {
                save,
                timer: Some(now + self.0.below(50)),
            }
        }
        fn on_timer(&mut self, now: Nanos, _s: &crate::policy::SessionView) -> TimerPlan {
            let ops = [
                Op::Demote,
                Op::Prefetch,
                Op::Drop(Tier::Host),
                Op::Drop(Tier::Nvme),
            ];
            let n = self.0.below(3) as usize;
            TimerPlan {
                ops: (0..n).map(|_| ops[self.0.below(4) as usize]).collect(),
                timer: self.0.chance(0.5).then(|| now + self.0.below(50)),
            }
        }
        fn evict_key(&self, s: &crate::policy::SessionView, _t: Tier) -> crate::policy::EvictKey {
            crate::policy::EvictKey {
                class: (s.id % 2) as u8,
                order: s.last_touch,
            }
        }
        fn victim_class(&mut self, _t: Tier, _b: [u64; 2]) -> u8 {
            self.0.below(2) as u8
        }
    }

    /// Random operations against a naive model built only from the actions:
    /// the bytes the actions put in each tier (committed copies − drops +
    /// copies in flight) always equal the planner's occupancy, which never
    /// exceeds capacity.
    #[test]
    fn random_operations_keep_accounting_consistent() {
        for seed in 0..20u64 {
            let mut r = Rng::new(seed);
            let caps = [40 + r.below(60), 40 + r.below(100)];
            let mut p = Planner::new(
                cap(caps[0], caps[1]),
                Box::new(Chaos(Rng::new(seed + 1000))),
            );
            let mut now: Nanos = 0;
            let mut flying: Vec<Action> = Vec::new();
            let mut model = [0i64; 2]; // committed bytes per tier, from actions
            let mut kv = [0u64; 8];
            let mut active = [true; 8];
            let apply = |acts: Vec<Action>, flying: &mut Vec<Action>, model: &mut [i64; 2]| {
                for a in acts {
                    match a {
                        Action::Drop { tier, bytes, .. } => model[tier as usize] -= bytes as i64,
                        Action::Copy {
                            from, to, bytes, ..
                        } => {
                            assert!(bytes > 0);
                            assert_ne!(from, Some(to));
                            flying.push(a);
                        }
                    }
                }
            };
            for _ in 0..3000 {
                now += r.below(10);
                let s = r.below(8);
                match r.below(6) {
                    0 | 1 => {
                        if active[s as usize] {
                            kv[s as usize] += 1 + r.below(15);
                            let acts = p.suspend(now, s, kv[s as usize], &Hint::default());
                            apply(acts, &mut flying, &mut model);
                            active[s as usize] = false;
                        } else {
                            p.resume(now, s);
                            active[s as usize] = true;
                        }
                    }
                    2 => {
                        let acts = p.tick(now);
                        apply(acts, &mut flying, &mut model);
                    }
                    3 | 4 => {
                        if !flying.is_empty() {
                            let i = r.below(flying.len() as u64) as usize;
                            let a = flying.swap_remove(i);
                            let ok = r.chance(0.85);
                            if let (Action::Copy { to, bytes, .. }, true) = (&a, ok) {
                                model[*to as usize] += *bytes as i64;
                            }
                            p.completed(now, &a, ok);
                        }
                    }
                    _ => {
                        if r.chance(0.2) {
                            let acts = p.end(now, s);
                            apply(acts, &mut flying, &mut model);
                            kv[s as usize] = 0;
                            active[s as usize] = true;
                        }
                    }
                }
                p.check().unwrap_or_else(|e| panic!("seed {seed}: {e}"));
                let (h, n) = p.occupancy();
                assert!(h <= caps[0] && n <= caps[1], "seed {seed}: over capacity");
                let mut want = model;
                for f in &flying {
                    if let Action::Copy { to, bytes, .. } = f {
                        want[*to as usize] += *bytes as i64;
                    }
                }
                // drops planned by tick for stale copies are counted once emitted
                assert_eq!(
                    (h as i64, n as i64),
                    (want[0], want[1]),
                    "seed {seed}: actions disagree with accounting"
                );
            }
        }
    }
}
