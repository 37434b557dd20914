//! Placement, eviction and prefetch policies (pure: no threads, no I/O, no
//! clock reads; time is an argument).
//!
//! A [`Policy`] answers the [`crate::planner::core::Planner`]'s questions about
//! one session at a time, from a read-only [`SessionView`]:
//! - [`Policy::on_suspend`]: a step ended — save the KV to which tiers now,
//!   and when to look at the session again;
//! - [`Policy::on_timer`]: a timer it asked for fired (or a copy of the session
//!   finished) — demote, prefetch or drop, and the next timer;
//! - [`Policy::evict_key`]: the session's place in a tier's eviction order
//!   (lowest first), recomputed by the planner whenever the session changes;
//! - [`Policy::on_resume`]: the session came back after `gap` (learning).
//!
//! The planner owns capacity and accounting; a policy never sees or changes
//! byte counts other than through the view, so a policy bug can make bad
//! choices but never overbook a tier.
//!
//! The predictive policy fits the same shape: a predictor
//! ([`crate::predict::GapPredictor`]) gives a gap distribution at suspend;
//! the policy compares expected costs to choose keep / host / NVMe / drop,
//! returns a timer for the demotion and for a prefetch ahead of the predicted
//! return, and an eviction key from the expected time to return and the size.
//!
//! Registered names (see [`by_name`]): `kvpark` and its ablations
//! `kvpark:recency`, `kvpark:no-prefetch`, `kvpark:no-nvme`,
//! `kvpark:no-hints` and `kvpark:gpu-events` (what the connector's `kvpark` becomes with vLLM's KV-cache events; [`kvpark`]), `gpu-lru`, `ttl:<dur>`, `lmcache-lru`,
//! `vllm-offload`, `vllm-offload:arc`, `oracle`, `oracle:gpu-lru`.

pub mod baselines;
pub mod kvpark;
pub mod oracle;

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::session::{Hint, Nanos, SessionId, Tier};

pub use baselines::{GpuOnly, LmcacheLru, Ttl, VllmOffload};
pub use kvpark::{Knobs, Kvpark, Variant};
pub use oracle::{Oracle, OracleBook};

/// What a policy sees of a session (a snapshot; all bytes are the planner's accounting).
#[derive(Clone, Debug)]
pub struct SessionView<'a> {
    /// The session.
    pub id: SessionId,
    /// Current KV length in bytes (as of the last suspend).
    pub bytes: u64,
    /// Committed bytes per tier (index [`tier_index`]): a valid prefix of the KV.
    pub held: [u64; 2],
    /// Bytes being copied into each tier.
    pub pending: [u64; 2],
    /// When the session was suspended; `None` while a step runs.
    pub suspended_at: Option<Nanos>,
    /// Last suspend or resume.
    pub last_touch: Nanos,
    /// Number of resumes so far.
    pub resumes: u32,
    /// Resumes served from each tier's copy since that copy was last evicted.
    pub served: [u32; 2],
    /// The hint given at the last suspend.
    pub hint: &'a Hint,
    /// Recent observed gaps (oldest first).
    pub gaps: &'a [Nanos],
    /// The runtime reported that the GPU prefix cache gave up the
    /// session's context since its suspend (always `false` where the
    /// runtime does not report it; see [`PolicyEnv::gpu_reports`]).
    pub gpu_gone: bool,
}

impl SessionView<'_> {
    /// Committed bytes in `t`.
    pub fn held_in(&self, t: Tier) -> u64 {
        self.held[tier_index(t)]
    }
    /// Whether `t` holds the whole current KV.
    pub fn full_in(&self, t: Tier) -> bool {
        self.bytes > 0 && self.held_in(t) >= self.bytes
    }
}

/// 0 for host, 1 for NVMe.
pub fn tier_index(t: Tier) -> usize {
    match t {
        Tier::Host => 0,
        Tier::Nvme => 1,
    }
}

/// Decision at suspend.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SuspendPlan {
    /// Tiers to save the (new bytes of the) KV into now, straight from the GPU.
    pub save: Vec<Tier>,
    /// When to call [`Policy::on_timer`] for this session.
    pub timer: Option<Nanos>,
}

/// An operation a policy asks for on a timer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Copy host → NVMe (the missing bytes).
    Demote,
    /// Copy NVMe → host (the missing bytes), making room in host.
    Prefetch,
    /// [`Op::Prefetch`], but only when host has the room free or can make it
    /// by evicting copies whose host eviction key is below the given one;
    /// nothing otherwise.
    PrefetchOver(EvictKey),
    /// Drop the copy in this tier.
    Drop(Tier),
}

/// Decision on a timer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TimerPlan {
    /// Operations, in order.
    pub ops: Vec<Op>,
    /// The next timer, if any.
    pub timer: Option<Nanos>,
}

/// A place in a tier's eviction order: lowest `(class, order)` goes first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct EvictKey {
    /// Coarse class (ARC's T1 = 0 / T2 = 1); see [`Policy::victim_class`].
    pub class: u8,
    /// Order within the class.
    pub order: u64,
}

/// Deployment facts a policy may use (link speeds for prefetch lead times,
/// the prefill cost of a context for the cost of dropping it).
#[derive(Clone, Copy, Debug)]
pub struct PolicyEnv {
    /// NVMe read bandwidth (bytes/s of raw KV, after decode).
    pub nvme_read_bps: f64,
    /// Host → GPU bandwidth (bytes/s).
    pub h2d_bps: f64,
    /// KV bytes per token.
    pub kv_bytes_per_token: u64,
    /// Prefill tokens/s at an empty context.
    pub prefill_tps: f64,
    /// Context length (tokens) at which prefill speed halves.
    pub prefill_halving: f64,
    /// The runtime tells the planner when the GPU prefix cache gives up a
    /// suspended session's context ([`SessionView::gpu_gone`]).
    pub gpu_reports: bool,
}

impl Default for PolicyEnv {
    fn default() -> Self {
        PolicyEnv {
            nvme_read_bps: 6e9,
            h2d_bps: 25e9,
            kv_bytes_per_token: 131_072,
            prefill_tps: 16_000.0,
            prefill_halving: 30_000.0,
            gpu_reports: false,
        }
    }
}

/// How the gaps a policy predicted came out: of the observed gaps whose
/// prediction it had, how many were at most the predicted median and at
/// most the predicted p90 (ideal: half and nine in ten).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Calibration {
    /// Gaps observed with a prediction.
    pub gaps: u64,
    /// Of which at most the predicted p50.
    pub below_p50: u64,
    /// Of which at most the predicted p90.
    pub below_p90: u64,
}

/// A placement / eviction / prefetch policy. See the module docs.
pub trait Policy: Send {
    /// The registered name ("vllm-offload:arc").
    fn name(&self) -> String;
    /// Calibration policies (`ttl:<dur>`) are idealised: the simulator gives
    /// them unlimited capacity, instant copies and no GPU prefix cache.
    fn idealised(&self) -> bool {
        false
    }
    /// A step ended; the session is suspended.
    fn on_suspend(&mut self, now: Nanos, s: &SessionView) -> SuspendPlan;
    /// A timer fired or a copy of the session finished.
    fn on_timer(&mut self, now: Nanos, s: &SessionView) -> TimerPlan {
        let _ = (now, s);
        TimerPlan::default()
    }
    /// The runtime now reports the GPU prefix cache's evictions (it did
    /// not when the policy was made): see [`PolicyEnv::gpu_reports`].
    fn hear_gpu_reports(&mut self) {}
    /// The session's eviction key in `tier`.
    fn evict_key(&self, s: &SessionView, tier: Tier) -> EvictKey {
        let _ = tier;
        EvictKey {
            class: 0,
            order: s.last_touch,
        }
    }
    /// Which class to take the next victim from, given the bytes per class
    /// (the other class is used when the chosen one has no candidate).
    fn victim_class(&mut self, tier: Tier, class_bytes: [u64; 2]) -> u8 {
        let _ = (tier, class_bytes);
        0
    }
    /// The session came back after `gap`; `ghost` is the tier and class it was
    /// last evicted from, if its copy was evicted since the last resume.
    fn on_resume(&mut self, now: Nanos, s: &SessionView, gap: Nanos, ghost: Option<(Tier, u8)>) {
        let _ = (now, s, gap, ghost);
    }
    /// The order in which the GPU prefix cache gives up a parked context
    /// (lowest first), for a context parked at `now`: least recently used
    /// unless the policy knows better.
    fn gpu_order(&self, s: SessionId, now: Nanos) -> u64 {
        let _ = s;
        now
    }
    /// A session ended.
    fn on_end(&mut self, s: SessionId) {
        let _ = s;
    }
    /// The calibration of its gap predictions (`None`: it predicts none).
    fn calibration(&self) -> Option<Calibration> {
        None
    }
}

/// Valid policy names, for errors and help.
pub const NAMES: &str = "kvpark, kvpark:recency, kvpark:no-prefetch, kvpark:no-nvme, \
     kvpark:no-hints, kvpark:gpu-events (each with optional knobs: kvpark@margin=4,every=2s,first=1s), gpu-lru, ttl:<dur> (e.g. ttl:5m), lmcache-lru, vllm-offload, \
     vllm-offload:arc, oracle, oracle:gpu-lru";

/// Builds a policy by name. `oracle` (and `oracle:gpu-lru`, the oracle
/// with vLLM's own least-recently-used GPU prefix-cache order) needs the
/// simulator's book of future returns (`book`); it is an error without one.
pub fn by_name(
    name: &str,
    env: PolicyEnv,
    book: Option<Arc<OracleBook>>,
) -> Result<Box<dyn Policy>> {
    let n = name.trim();
    match n {
        "gpu-lru" => Ok(Box::new(GpuOnly)),
        "lmcache-lru" => Ok(Box::new(LmcacheLru)),
        "vllm-offload" | "vllm-offload:lru" => Ok(Box::new(VllmOffload::lru())),
        "vllm-offload:arc" => Ok(Box::new(VllmOffload::arc())),
        "oracle" | "oracle:gpu-lru" => match book {
            Some(b) => Ok(Box::new(Oracle::new(env, b).lru_gpu(n == "oracle:gpu-lru"))),
            None => Err(Error::invalid(
                "policy oracle needs the future of the trace: only the replay simulator can run it",
            )),
        },
        _ => {
            if let Some(r) = kvpark::parse_name(n) {
                let (v, k) = r?;
                return Ok(Box::new(Kvpark::with_knobs(v, k, env)));
            }
            if let Some(d) = n.strip_prefix("ttl:") {
                let tau = crate::units::parse_duration_ns(d)
                    .map_err(|e| Error::invalid(format!("policy {n:?}: {}", e.message())))?;
                return Ok(Box::new(Ttl::new(tau)));
            }
            Err(Error::invalid(format!(
                "unknown policy {n:?}; valid names: {NAMES}"
            )))
        }
    }
}

/// The policy a connector config names, with the config's knobs (they
/// apply to the `kvpark` policies; the others have none).
pub fn with_knobs(name: &str, knobs: &Knobs, env: PolicyEnv) -> Result<Box<dyn Policy>> {
    match Variant::from_name(name.trim()) {
        Some(v) => Ok(Box::new(Kvpark::with_knobs(v, *knobs, env))),
        None => by_name(name, env, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_resolve() {
        for n in [
            "kvpark",
            "kvpark:recency",
            "kvpark:no-prefetch",
            "kvpark:no-nvme",
            "kvpark:no-hints",
            "kvpark:gpu-events",
            "gpu-lru",
            "lmcache-lru",
            "vllm-offload",
            "vllm-offload:arc",
            "ttl:5m",
        ] {
            assert_eq!(by_name(n, PolicyEnv::default(), None).unwrap().name(), n);
        }
        let e = by_name("kvpark:fast", PolicyEnv::default(), None)
            .err()
            .unwrap();
        assert!(e.message().contains("valid names"), "{}", e.message());
        assert!(by_name("ttl:5 fortnights", PolicyEnv::default(), None).is_err());
        assert!(by_name("oracle", PolicyEnv::default(), None).is_err());
        let book = Arc::new(OracleBook::default());
        for n in ["oracle", "oracle:gpu-lru"] {
            assert_eq!(
                by_name(n, PolicyEnv::default(), Some(book.clone()))
                    .unwrap()
                    .name(),
                n
            );
        }
    }
}
