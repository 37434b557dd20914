//! `kvpark`: placement, eviction and prefetch by expected cost, driven by
//! the learned gap predictor ([`crate::predict::Learned`]).
//!
//! At every suspend the predictor gives the distribution of the coming gap
//! ([`GapDist`]) from the hint (tool result or human, the tool's name), the
//! session's own past gaps and the population's; the policy keeps it, with
//! the suspend time, in constant state per session, and derives:
//!
//! - **Expected return.** At elapsed time `e` the policy uses the
//!   conditional median of the gap given that it exceeds `e`: the gap at
//!   probability `F(e) + (1 − F(e)) / 2`, or `2e` once `e` is past the
//!   distribution's last quantile (a session silent that long is not coming
//!   back soon). It is re-evaluated at checkpoints `e = 0.5 s, 1 s, 2 s, …`
//!   (doubling, at most [`CHECK_EVERY`] apart in the first hour, up to a
//!   day), so a session whose predicted return has passed moves down the
//!   eviction order instead of staying "about to return".
//! - **Host holds what the GPU does not** (variant `kvpark:gpu-events`
//!   only). Where the runtime reports when vLLM's GPU prefix cache gives
//!   up a parked context ([`PolicyEnv::gpu_reports`]; the replay simulator
//!   does, and the vLLM connector does when vLLM publishes its KV-cache
//!   events over ZMQ: the connector's `kvpark` then becomes this variant;
//!   plain `kvpark` is the policy without them), a host copy of
//!   a context the GPU still holds is redundant: such copies go first when
//!   host needs room (once their NVMe copy is whole), and a suspend whose
//!   session has no host copy writes to NVMe only when NVMe already holds
//!   more than half of the context (a session that still has a host copy
//!   saves its new bytes there, a cheap delta; a long NVMe write is
//!   covered by a host copy, so that a return after the GPU's eviction and
//!   before the write lands is not recomputed). Host is then filled by
//!   prefetches of the sessions the GPU gave up. Without the reports (or
//!   without prefetch), each suspend saves to host and NVMe, as a
//!   write-through cache does.
//! - **NVMe** gets every suspend's new bytes (write-through: a delta on the
//!   NVMe write link, the lowest class; dropping instead costs a prefill at
//!   the session's context, always dearer than an NVMe read). Nothing is
//!   dropped by choice: the tiers give way by eviction order.
//! - **Eviction order** (host, NVMe): the session expected back last goes
//!   first — Belady's rule on the predicted return. A reload from the next
//!   tier costs time proportional to the bytes (link and decode), so the
//!   benefit *per byte* of keeping a session is its chance of returning
//!   soon, and the expected return orders the sessions; on NVMe the
//!   alternative is a recompute whose cost per byte grows with the context
//!   (prefill slows with context), so there the expected return is advanced
//!   by the session's recompute time (a larger context stays longer). The
//!   copy of a session whose step runs is kept like one about to return (it
//!   spares a full save at the next suspend). vLLM's GPU prefix cache keeps
//!   its least-recently-used order: ordering it by the predicted return was
//!   measured to lose GPU hits (see BENCHMARKS.md).
//! - **Prefetch** NVMe → host, ranked: at every checkpoint, and when the
//!   GPU gives the context up, a session that NVMe holds and host does not
//!   (and the GPU no longer does, where reported) asks for a prefetch that
//!   may only evict host copies expected back later than
//!   [`RANK_MARGIN`] × its own remaining wait ([`Op::PrefetchOver`]). Host
//!   thus converges on the sessions expected back soonest, whatever their
//!   absolute chance of returning, and the margin keeps two sessions of
//!   about the same rank from displacing each other at every checkpoint.
//!   The simulator loads a request that arrives first (class 0), so a
//!   prefetch never delays a waiting step. With [`Knobs::prefetch_until`]
//!   below 1, a session whose wait has passed that quantile of its
//!   predicted gap is not prefetched any more: nothing tells the connector
//!   that a session ended, and replayed through the block planner
//!   (`kvpark replay --blocks`, which is not told either) the policy spent
//!   91% of its prefetches and 5× the NVMe reads of lmcache-lru on
//!   sessions that never came back.
//!
//! Variants (ablations), by name:
//! - `kvpark:recency`: host and NVMe evict by recency (last touch); a
//!   prefetch may evict only copies touched before the session's own;
//! - `kvpark:no-prefetch`: never prefetches;
//! - `kvpark:no-nvme`: host only (no NVMe copy, so nothing to prefetch);
//! - `kvpark:no-hints`: the policy ignores the hint (what the session
//!   waits on, the tool's name); the predictor then has only the
//!   population's and the session's own gaps;
//! - `kvpark:gpu-events`: uses the runtime's news of GPU evictions (above):
//!   what the connector's `kvpark` runs in a vLLM that publishes KV-cache
//!   events (`kv_events_config` with the `zmq` publisher); in the replay a
//!   name of its own, beside the `kvpark` of a vLLM without them.
//!
//! Cost per event: one prediction (a fixed number of histogram bins) at a
//! suspend, one update at a resume, O(1) per checkpoint; state per
//! suspended session is constant.

use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::predict::{GapContext, GapDist, GapPredictor, Learned};
use crate::session::{Hint, Nanos, SessionId, Tier};

use super::{Calibration, EvictKey, Op, Policy, PolicyEnv, SessionView, SuspendPlan, TimerPlan};

/// Default [`Knobs::check_every`]: checkpoints are at most this far apart
/// in the first hour after a suspend (each may prefetch).
pub const CHECK_EVERY: Nanos = 10_000_000_000;

/// Default [`Knobs::prefetch_margin`]: a ranked prefetch evicts only host
/// copies expected back later than this many times the prefetched
/// session's own remaining wait.
pub const RANK_MARGIN: f64 = 2.0;

/// Default [`Knobs::first_check`]: the first checkpoint after a suspend.
pub const FIRST_CHECK: Nanos = 500_000_000;
/// Checkpoints at most [`CHECK_EVERY`] apart until this long after a
/// suspend.
const DENSE_UNTIL: Nanos = 3_600_000_000_000;
/// No checkpoint later than this after a suspend.
const LAST_CHECK: Nanos = 86_400_000_000_000;

/// Which parts of the policy are on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Variant {
    /// Eviction orders by recency instead of the predicted return.
    pub recency: bool,
    /// Prefetch NVMe → host ahead of the predicted return.
    pub prefetch: bool,
    /// Use the NVMe tier.
    pub nvme: bool,
    /// Read the hint.
    pub hints: bool,
    /// Use the runtime's news of the GPU prefix cache giving a parked
    /// context up ([`PolicyEnv::gpu_reports`]), where it gives them: the
    /// replay does; the vLLM connector does when vLLM publishes KV-cache
    /// events (it then switches its `kvpark` to this, see
    /// [`Policy::hear_gpu_reports`]).
    pub gpu_events: bool,
}

impl Variant {
    /// The full policy.
    pub const FULL: Variant = Variant {
        recency: false,
        prefetch: true,
        nvme: true,
        hints: true,
        gpu_events: false,
    };

    /// The variant of a registered name (`kvpark`, `kvpark:recency`, …).
    pub fn from_name(name: &str) -> Option<Variant> {
        let f = Variant::FULL;
        Some(match name {
            "kvpark" => f,
            "kvpark:recency" => Variant { recency: true, ..f },
            "kvpark:no-prefetch" => Variant {
                prefetch: false,
                ..f
            },
            "kvpark:no-nvme" => Variant {
                nvme: false,
                prefetch: false,
                ..f
            },
            "kvpark:no-hints" => Variant { hints: false, ..f },
            "kvpark:gpu-events" => Variant {
                gpu_events: true,
                ..f
            },
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Variant { recency: true, .. } => "kvpark:recency",
            Variant { nvme: false, .. } => "kvpark:no-nvme",
            Variant {
                prefetch: false, ..
            } => "kvpark:no-prefetch",
            Variant { hints: false, .. } => "kvpark:no-hints",
            Variant {
                gpu_events: true, ..
            } => "kvpark:gpu-events",
            _ => "kvpark",
        }
    }
}

/// The policy's tunable numbers (`kvpark tune` sweeps them; the connector
/// takes them from the `kvpark` object of its config, the replay from a
/// policy name such as `kvpark@margin=4,every=2s`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Knobs {
    /// A ranked prefetch evicts only host copies expected back later than
    /// this many times the prefetched session's remaining wait (1..=100):
    /// lower prefetches more eagerly and displaces more.
    pub prefetch_margin: f64,
    /// Checkpoints (each may prefetch) at most this far apart during the
    /// first hour after a suspend (100 ms..=1 h).
    pub check_every: Nanos,
    /// The first checkpoint after a suspend (10 ms..=10 min).
    pub first_check: Nanos,
    /// A session is prefetched only while its wait is below this quantile
    /// of its predicted gap (0.5..=1; 1, the default: always). Past it, the
    /// session is treated as gone: neither vLLM nor the connector learns
    /// that a session ended, and one that never returns looks like a long
    /// human wait, which the policy otherwise keeps prefetching. Replayed
    /// through the block planner (which is not told of ends either), 0.9
    /// cut the wasted prefetches of `kvpark:gpu-events` from 91% to 53%
    /// and its NVMe reads 3.2×, at a better user TTFT p90; the
    /// session-level replay, which ends sessions, loses a little by it
    /// (BENCHMARKS.md, "Replay").
    pub prefetch_until: f64,
}

impl Default for Knobs {
    fn default() -> Self {
        Knobs {
            prefetch_margin: RANK_MARGIN,
            check_every: CHECK_EVERY,
            first_check: FIRST_CHECK,
            prefetch_until: PREFETCH_UNTIL,
        }
    }
}

/// Keys of [`Knobs`] in a config object and (short form) in a policy name.
const KNOB_KEYS: [(&str, &str); 4] = [
    ("prefetch_margin", "margin"),
    ("check_every", "every"),
    ("first_check", "first"),
    ("prefetch_until", "until"),
];

/// Default [`Knobs::prefetch_until`]: always (see the knob for why a
/// connector may want 0.9).
pub const PREFETCH_UNTIL: f64 = 1.0;

impl Knobs {
    /// Sets one knob from its (long or short) key and a text value
    /// ("4", "2s", "500ms"); checks the range.
    pub fn set(&mut self, key: &str, value: &str) -> Result<()> {
        let long = KNOB_KEYS
            .iter()
            .find(|(l, s)| *l == key || *s == key)
            .map(|(l, _)| *l)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "kvpark: unknown knob {key:?} (knobs: prefetch_margin (margin), \
                     check_every (every), first_check (first), prefetch_until (until))"
                ))
            })?;
        let dur = |lo: Nanos, hi: Nanos| -> Result<Nanos> {
            let d = crate::units::parse_duration_ns(value)
                .map_err(|e| Error::invalid(format!("kvpark {long}: {}", e.message())))?;
            if !(lo..=hi).contains(&d) {
                return Err(Error::invalid(format!(
                    "kvpark {long}: {value} is outside {}..={}",
                    fmt_dur(lo),
                    fmt_dur(hi)
                )));
            }
            Ok(d)
        };
        let num = |lo: f64, hi: f64| -> Result<f64> {
            let x: f64 = value.trim().parse().map_err(|_| {
                Error::invalid(format!("kvpark {long}: expected a number, got {value:?}"))
            })?;
            if !(lo..=hi).contains(&x) {
                return Err(Error::invalid(format!(
                    "kvpark {long}: {value} is outside {lo}..={hi}"
                )));
            }
            Ok(x)
        };
        match long {
            "prefetch_margin" => self.prefetch_margin = num(1.0, 100.0)?,
            "prefetch_until" => self.prefetch_until = num(0.5, 1.0)?,
            "check_every" => self.check_every = dur(100_000_000, 3_600_000_000_000)?,
            _ => self.first_check = dur(10_000_000, 600_000_000_000)?,
        }
        Ok(())
    }

    /// Knobs from the connector config's `kvpark` object (keys as
    /// [`Knobs`] names them; numbers or duration strings).
    pub fn from_json(v: &serde_json::Value) -> Result<Knobs> {
        let numeric = |k: &str| k == "prefetch_margin" || k == "prefetch_until";
        let serde_json::Value::Object(m) = v else {
            return Err(Error::config(format!(
                "kvpark: expected an object of knobs such as {{\"prefetch_margin\": 2, \"check_every\": \"10s\"}}, got {v}"
            )));
        };
        let mut k = Knobs::default();
        for (key, val) in m {
            if !KNOB_KEYS.iter().any(|(l, _)| l == key) {
                return Err(Error::config(format!(
                    "kvpark: unknown knob {key:?} (knobs: prefetch_margin, check_every, first_check, prefetch_until)"
                )));
            }
            let text = match val {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Number(n) if numeric(key) => n.to_string(),
                _ => {
                    return Err(Error::config(format!(
                        "kvpark {key}: expected {}, got {val}",
                        if numeric(key) {
                            "a number"
                        } else {
                            "a duration such as \"10s\""
                        }
                    )))
                }
            };
            k.set(key, &text).map_err(|e| Error::config(e.message()))?;
        }
        Ok(k)
    }

    /// The knobs that differ from the default, as a config object.
    pub fn to_json(&self) -> serde_json::Value {
        let d = Knobs::default();
        let mut m = serde_json::Map::new();
        if self.prefetch_margin != d.prefetch_margin {
            m.insert(
                "prefetch_margin".into(),
                serde_json::json!(self.prefetch_margin),
            );
        }
        if self.check_every != d.check_every {
            m.insert(
                "check_every".into(),
                serde_json::json!(fmt_dur(self.check_every)),
            );
        }
        if self.first_check != d.first_check {
            m.insert(
                "first_check".into(),
                serde_json::json!(fmt_dur(self.first_check)),
            );
        }
        if self.prefetch_until != d.prefetch_until {
            m.insert(
                "prefetch_until".into(),
                serde_json::json!(self.prefetch_until),
            );
        }
        serde_json::Value::Object(m)
    }

    /// Every knob, as a config object.
    pub fn to_json_full(&self) -> serde_json::Value {
        serde_json::json!({
            "prefetch_margin": self.prefetch_margin,
            "check_every": fmt_dur(self.check_every),
            "first_check": fmt_dur(self.first_check),
            "prefetch_until": self.prefetch_until,
        })
    }

    /// The knobs that differ from the default in a policy name's short
    /// form (`margin=4,every=2s`; empty for the default).
    pub fn suffix(&self) -> String {
        let d = Knobs::default();
        let mut v = Vec::new();
        if self.prefetch_margin != d.prefetch_margin {
            v.push(format!("margin={}", self.prefetch_margin));
        }
        if self.check_every != d.check_every {
            v.push(format!("every={}", fmt_dur(self.check_every)));
        }
        if self.first_check != d.first_check {
            v.push(format!("first={}", fmt_dur(self.first_check)));
        }
        if self.prefetch_until != d.prefetch_until {
            v.push(format!("until={}", self.prefetch_until));
        }
        v.join(",")
    }
}

/// A duration as [`crate::units::parse_duration_ns`] reads it back
/// (whole seconds as "Ns", else milliseconds, else nanoseconds).
fn fmt_dur(ns: Nanos) -> String {
    if ns % 1_000_000_000 == 0 {
        format!("{}s", ns / 1_000_000_000)
    } else if ns % 1_000_000 == 0 {
        format!("{}ms", ns / 1_000_000)
    } else {
        format!("{ns}ns")
    }
}

/// Splits a policy name `kvpark[:variant][@knob=value,...]` into the
/// variant and its knobs; `None` when it is not a kvpark name.
pub fn parse_name(name: &str) -> Option<Result<(Variant, Knobs)>> {
    let (base, knobs) = match name.split_once('@') {
        Some((b, k)) => (b, Some(k)),
        None => (name, None),
    };
    let v = Variant::from_name(base)?;
    let mut k = Knobs::default();
    if let Some(list) = knobs {
        for item in list.split(',') {
            let Some((key, val)) = item.split_once('=') else {
                return Some(Err(Error::invalid(format!(
                    "policy {name:?}: expected knob=value after @, got {item:?}"
                ))));
            };
            if let Err(e) = k.set(key.trim(), val.trim()) {
                return Some(Err(Error::invalid(format!(
                    "policy {name:?}: {}",
                    e.message()
                ))));
            }
        }
    }
    Some(Ok((v, k)))
}

/// What the policy keeps per suspended session.
#[derive(Clone, Debug)]
struct St {
    /// Suspend time.
    at: Nanos,
    /// Predicted gap (`None`: the predictor knows nothing yet).
    dist: Option<GapDist>,
    /// Expected return instant as of the last checkpoint.
    ret: Nanos,
}

/// The `kvpark` policy. See the module docs.
pub struct Kvpark {
    v: Variant,
    k: Knobs,
    env: PolicyEnv,
    pred: Learned,
    sess: HashMap<SessionId, St>,
    no_hint: Hint,
    cal: Calibration,
}

impl Kvpark {
    /// The expected return of a suspended session it tracks (tests of the
    /// policy driven through the planner).
    #[cfg(test)]
    pub(crate) fn expected_return(&self, s: SessionId) -> Option<Nanos> {
        self.sess.get(&s).map(|st| st.ret)
    }
}

/// The gap at probability `p` of `d` (linear between its quantiles, from
/// (0, 0)); `None` past its last quantile.
fn inv(d: &GapDist, p: f64) -> Option<Nanos> {
    let mut prev = (0.0, 0u64);
    for &(q, g) in &d.quantiles {
        if p <= q {
            let span = q - prev.0;
            let f = if span > 0.0 { (p - prev.0) / span } else { 1.0 };
            return Some(prev.1 + ((g - prev.1) as f64 * f.clamp(0.0, 1.0)) as Nanos);
        }
        prev = (q, g);
    }
    None
}

/// The conditional median of the gap given that it exceeds `e` (time
/// from the suspend).
fn remaining_median(d: Option<&GapDist>, e: Nanos, first: Nanos) -> Nanos {
    let g = d.and_then(|d| {
        let pe = d.cdf(e);
        (pe < 0.99).then(|| inv(d, pe + (1.0 - pe) / 2.0)).flatten()
    });
    match g {
        Some(g) => g.max(e + 1),
        None => e.max(first).saturating_mul(2),
    }
}

/// The next checkpoint (elapsed time) after `e`: doubling from
/// `k.first_check`, at most `k.check_every` apart during the first hour
/// (where returns are dense enough to prefetch for), doubling again after.
fn next_check(e: Nanos, k: &Knobs) -> Option<Nanos> {
    let n = if e < k.first_check {
        k.first_check
    } else if e < DENSE_UNTIL {
        e.saturating_mul(2).min(e + k.check_every)
    } else {
        e.saturating_mul(2)
    };
    (n <= LAST_CHECK).then_some(n)
}

impl Kvpark {
    /// The policy (or one of its ablations) over deployment `env`.
    pub fn new(v: Variant, env: PolicyEnv) -> Self {
        Kvpark::with_knobs(v, Knobs::default(), env)
    }

    /// The policy with its knobs set.
    pub fn with_knobs(v: Variant, k: Knobs, env: PolicyEnv) -> Self {
        Kvpark {
            v,
            k,
            env,
            pred: Learned::default(),
            sess: HashMap::new(),
            no_hint: Hint::default(),
            cal: Calibration::default(),
        }
    }

    fn hint<'a>(&'a self, s: &'a SessionView) -> &'a Hint {
        if self.v.hints {
            s.hint
        } else {
            &self.no_hint
        }
    }

    fn ctx<'a>(&'a self, s: &'a SessionView, now: Nanos) -> GapContext<'a> {
        let hint = self.hint(s);
        GapContext {
            session: s.id,
            hint,
            tools: &[],
            ended_with_tool_calls: None,
            now,
            wall_ns: None,
        }
    }

    /// Whether the GPU prefix cache is known to still hold the context.
    fn on_gpu(&self, s: &SessionView) -> bool {
        self.v.gpu_events && self.env.gpu_reports && !s.gpu_gone
    }

    /// Seconds to recompute a context of `bytes` (prefill at that context).
    fn recompute_ns(&self, bytes: u64) -> Nanos {
        let tokens = bytes as f64 / self.env.kv_bytes_per_token.max(1) as f64;
        let s = tokens / self.env.prefill_tps * (1.0 + tokens / 2.0 / self.env.prefill_halving);
        if s.is_finite() {
            (s * 1e9) as Nanos
        } else {
            0
        }
    }

    /// Updates the expected return of `s` at `now`; returns the next
    /// checkpoint (absolute) and, when `s` should be prefetched, the host
    /// key below which the prefetch may evict.
    fn checkpoint(&mut self, now: Nanos, s: &SessionView) -> (Option<Nanos>, Option<EvictKey>) {
        let on_gpu = self.on_gpu(s);
        let Some(st) = self.sess.get_mut(&s.id) else {
            return (None, None);
        };
        let e = now.saturating_sub(st.at);
        st.ret = st.at + remaining_median(st.dist.as_ref(), e, self.k.first_check);
        let next = next_check(e, &self.k).map(|n| st.at + n);
        // past the chosen quantile of its predicted gap: treated as gone
        let gone = self.k.prefetch_until < 1.0
            && st
                .dist
                .as_ref()
                .is_some_and(|d| d.cdf(e) >= self.k.prefetch_until);
        let fetch = self.v.prefetch
            && !on_gpu
            && !gone
            && s.pending[0] == 0
            && s.held_in(Tier::Nvme) > s.held_in(Tier::Host);
        let over = fetch.then(|| {
            let order = if self.v.recency {
                // the recency order: only copies touched before this one
                s.last_touch.max(2)
            } else {
                let wait = st.ret.saturating_sub(now) as f64 * self.k.prefetch_margin;
                (u64::MAX - now.saturating_add(wait as Nanos)).max(2)
            };
            EvictKey { class: 1, order }
        });
        (next, over)
    }
}

impl Policy for Kvpark {
    /// The connector heard that vLLM publishes KV-cache events: the policy
    /// becomes `kvpark:gpu-events` (host for what the GPU gave up).
    fn hear_gpu_reports(&mut self) {
        self.env.gpu_reports = true;
        self.v.gpu_events = true;
    }

    fn name(&self) -> String {
        let sfx = self.k.suffix();
        if sfx.is_empty() {
            self.v.name().into()
        } else {
            format!("{}@{sfx}", self.v.name())
        }
    }

    fn on_suspend(&mut self, now: Nanos, s: &SessionView) -> SuspendPlan {
        let dist = {
            let ctx = self.ctx(s, now);
            self.pred.predict(&ctx)
        };
        self.sess.insert(
            s.id,
            St {
                at: now,
                dist,
                ret: now,
            },
        );
        let (timer, _) = self.checkpoint(now, s);
        let mut save = Vec::with_capacity(2);
        // the GPU holds the context now: host gets it as a delta on a copy
        // it still has, or by a prefetch once the GPU gives it up; but while
        // NVMe lacks more than half of it (a long write), host takes it too,
        // so that a return between the GPU's eviction and the end of that
        // write still finds it
        let nvme_only = self.v.prefetch
            && self.v.gpu_events
            && self.env.gpu_reports
            && s.held_in(Tier::Host) == 0
            && s.held_in(Tier::Nvme) > s.bytes / 2;
        if !nvme_only {
            save.push(Tier::Host);
        }
        if self.v.nvme {
            save.push(Tier::Nvme);
        }
        SuspendPlan { save, timer }
    }

    fn on_timer(&mut self, now: Nanos, s: &SessionView) -> TimerPlan {
        if s.suspended_at.is_none() {
            return TimerPlan::default();
        }
        let (timer, over) = self.checkpoint(now, s);
        TimerPlan {
            ops: over.map(Op::PrefetchOver).into_iter().collect(),
            timer,
        }
    }

    fn evict_key(&self, s: &SessionView, tier: Tier) -> EvictKey {
        if s.suspended_at.is_none() {
            // a step runs: its copy is as good as one about to return (it
            // spares a full save at the next suspend)
            return EvictKey {
                class: 1,
                order: if self.v.recency {
                    s.last_touch
                } else {
                    u64::MAX - s.last_touch
                },
            };
        }
        if tier == Tier::Host && self.on_gpu(s) && s.full_in(Tier::Nvme) {
            // redundant while the GPU holds the context: first out
            let ret = self.sess.get(&s.id).map_or(s.last_touch, |st| st.ret);
            return EvictKey {
                class: 0,
                order: u64::MAX - ret,
            };
        }
        if self.v.recency {
            return EvictKey {
                class: 1,
                order: s.last_touch.max(2),
            };
        }
        let ret = self.sess.get(&s.id).map_or(s.last_touch, |st| st.ret);
        let ret = match tier {
            Tier::Host => ret,
            Tier::Nvme => ret.saturating_sub(self.recompute_ns(s.bytes)),
        };
        EvictKey {
            class: 1,
            order: (u64::MAX - ret).max(2),
        }
    }

    fn on_resume(&mut self, now: Nanos, s: &SessionView, gap: Nanos, _ghost: Option<(Tier, u8)>) {
        if let Some(st) = self.sess.remove(&s.id) {
            if let Some(d) = &st.dist {
                self.cal.gaps += 1;
                let below = |p: f64| inv(d, p).is_some_and(|q| gap <= q);
                self.cal.below_p50 += below(0.5) as u64;
                self.cal.below_p90 += below(0.9) as u64;
            }
            let hint = self.hint(s).clone();
            let ctx = GapContext {
                session: s.id,
                hint: &hint,
                tools: &[],
                ended_with_tool_calls: None,
                now,
                wall_ns: None,
            };
            self.pred.observe(&ctx, gap);
        }
    }

    fn on_end(&mut self, s: SessionId) {
        self.sess.remove(&s);
        self.pred.end(s);
    }

    fn calibration(&self) -> Option<Calibration> {
        Some(self.cal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Nanos = 1_000_000_000;

    fn dist(pairs: &[(f64, u64)]) -> GapDist {
        GapDist {
            quantiles: pairs.iter().map(|&(p, s)| (p, s * S)).collect(),
        }
    }

    #[test]
    fn expected_return_moves_out_as_the_wait_goes_on() {
        let d = dist(&[(0.5, 10), (0.9, 100), (0.99, 1000)]);
        assert_eq!(inv(&d, 0.5), Some(10 * S));
        assert!(inv(&d, 0.7).unwrap().abs_diff(55 * S) < 1000);
        assert_eq!(inv(&d, 0.995), None);
        // fresh: the median; after 10 s: the gap at F = 0.75
        let f = FIRST_CHECK;
        assert_eq!(remaining_median(Some(&d), 0, f), 10 * S);
        let at10 = remaining_median(Some(&d), 10 * S, f);
        assert!(at10 > 10 * S && at10 < 100 * S, "{at10}");
        assert!(remaining_median(Some(&d), 200 * S, f) > at10);
        // past the last quantile: twice the elapsed time
        assert_eq!(remaining_median(Some(&d), 2000 * S, f), 4000 * S);
        assert_eq!(remaining_median(None, 0, f), 2 * FIRST_CHECK);
        let k = Knobs::default();
        assert_eq!(next_check(0, &k), Some(FIRST_CHECK));
        assert_eq!(next_check(4 * S, &k), Some(8 * S));
        assert_eq!(next_check(100 * S, &k), Some(110 * S));
        assert_eq!(next_check(2 * DENSE_UNTIL, &k), Some(4 * DENSE_UNTIL));
        assert_eq!(next_check(LAST_CHECK, &k), None);
        let k = Knobs {
            check_every: 2 * S,
            first_check: S,
            ..k
        };
        assert_eq!(next_check(0, &k), Some(S));
        assert_eq!(next_check(100 * S, &k), Some(102 * S));
    }

    #[test]
    fn knobs_parse_from_names_and_config_and_round_trip() {
        let (v, k) = parse_name("kvpark:no-hints@margin=4,every=2s,first=250ms,until=0.75")
            .unwrap()
            .unwrap();
        assert_eq!(v, Variant::from_name("kvpark:no-hints").unwrap());
        assert_eq!(k.prefetch_margin, 4.0);
        assert_eq!(k.check_every, 2 * S);
        assert_eq!(k.first_check, 250_000_000);
        assert_eq!(k.prefetch_until, 0.75);
        assert_eq!(k.suffix(), "margin=4,every=2s,first=250ms,until=0.75");
        assert_eq!(Knobs::from_json(&k.to_json()).unwrap(), k);
        assert_eq!(Knobs::from_json(&k.to_json_full()).unwrap(), k);
        let (_, k2) = parse_name(&format!("kvpark@{}", k.suffix()))
            .unwrap()
            .unwrap();
        assert_eq!(k2, k);
        assert_eq!(parse_name("kvpark").unwrap().unwrap().1, Knobs::default());
        assert!(Knobs::default().to_json().as_object().unwrap().is_empty());
        assert!(parse_name("lmcache-lru").is_none());
        for bad in [
            "kvpark@margin=0.5",
            "kvpark@margin=x",
            "kvpark@every=1ms",
            "kvpark@first=2h",
            "kvpark@speed=3",
            "kvpark@margin",
            "kvpark@until=0.2",
            "kvpark@until=1.5",
        ] {
            let e = parse_name(bad).unwrap().unwrap_err();
            assert!(
                e.message().contains("kvpark") || e.message().contains(bad),
                "{bad}: {}",
                e.message()
            );
        }
        for bad in [
            serde_json::json!({"margin": 2}),
            serde_json::json!({"check_every": 10}),
            serde_json::json!({"prefetch_margin": "x"}),
            serde_json::json!({"prefetch_until": 2}),
            serde_json::json!([1]),
        ] {
            assert!(Knobs::from_json(&bad).is_err(), "{bad}");
        }
    }
}
