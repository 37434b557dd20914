//! Baseline policies kept for comparison (DESIGN §5).
//!
//! - [`GpuOnly`] (`gpu-lru`): vLLM's prefix cache alone; kvpark saves nothing.
//! - [`Ttl`] (`ttl:<dur>`): the idealised fixed TTL of DESIGN §6: every
//!   suspended session is kept for τ after its suspend and dropped after.
//!   Idealised: the simulator gives it unlimited capacity and instant copies,
//!   so its hit rate equals the §6 sweep's `hit(τ)` exactly.
//! - [`LmcacheLru`] (`lmcache-lru`): LMCache-style write-through to CPU and
//!   local disk at the end of each step, each tier evicting LRU.
//! - [`VllmOffload`] (`vllm-offload`, `vllm-offload:arc`): vLLM
//!   OffloadingConnector-style host cache only, LRU or ARC eviction.

use crate::session::{Nanos, Tier};

use super::{tier_index, EvictKey, Op, Policy, SessionView, SuspendPlan, TimerPlan};

/// `gpu-lru`: kvpark stores nothing; only vLLM's GPU prefix cache.
#[derive(Clone, Copy, Debug, Default)]
pub struct GpuOnly;

impl Policy for GpuOnly {
    fn name(&self) -> String {
        "gpu-lru".into()
    }
    fn on_suspend(&mut self, _now: Nanos, _s: &SessionView) -> SuspendPlan {
        SuspendPlan::default()
    }
}

/// `ttl:<dur>`: keep every suspended session for τ, then drop it.
#[derive(Clone, Copy, Debug)]
pub struct Ttl {
    tau: Nanos,
}

impl Ttl {
    /// A TTL of `tau` nanoseconds.
    pub fn new(tau: Nanos) -> Self {
        Ttl { tau }
    }
}

/// "5m", "1h", "90s", "250ms": the shortest exact spelling of a duration.
pub fn fmt_dur(ns: Nanos) -> String {
    for (unit, d) in [
        ("d", 86_400_000_000_000u64),
        ("h", 3_600_000_000_000),
        ("m", 60_000_000_000),
        ("s", 1_000_000_000),
        ("ms", 1_000_000),
        ("us", 1000),
    ] {
        if ns >= d && ns % d == 0 {
            return format!("{}{unit}", ns / d);
        }
    }
    format!("{ns}ns")
}

impl Policy for Ttl {
    fn name(&self) -> String {
        format!("ttl:{}", fmt_dur(self.tau))
    }
    fn idealised(&self) -> bool {
        true
    }
    fn on_suspend(&mut self, now: Nanos, _s: &SessionView) -> SuspendPlan {
        SuspendPlan {
            save: vec![Tier::Host],
            // a return exactly τ after the suspend still hits (gap ≤ τ)
            timer: Some(now.saturating_add(self.tau).saturating_add(1)),
        }
    }
    fn on_timer(&mut self, now: Nanos, s: &SessionView) -> TimerPlan {
        match s.suspended_at {
            Some(t) if now > t.saturating_add(self.tau) => TimerPlan {
                ops: vec![Op::Drop(Tier::Host), Op::Drop(Tier::Nvme)],
                timer: None,
            },
            Some(t) => TimerPlan {
                ops: vec![],
                timer: Some(t.saturating_add(self.tau).saturating_add(1)),
            },
            None => TimerPlan::default(),
        }
    }
}

/// `lmcache-lru`: write-through to host and NVMe at every suspend, LRU per tier.
#[derive(Clone, Copy, Debug, Default)]
pub struct LmcacheLru;

impl Policy for LmcacheLru {
    fn name(&self) -> String {
        "lmcache-lru".into()
    }
    fn on_suspend(&mut self, _now: Nanos, _s: &SessionView) -> SuspendPlan {
        SuspendPlan {
            save: vec![Tier::Host, Tier::Nvme],
            timer: None,
        }
    }
}

/// `vllm-offload[:arc]`: host cache only, LRU or ARC (adaptive replacement).
///
/// ARC at session granularity: class T1 (0) = sessions whose host copy has
/// not served a resume yet, T2 (1) = served at least once (seen twice). The target size `p` of
/// T1 grows when a session evicted from T1 comes back (a B1 ghost hit) and
/// shrinks on a B2 ghost hit, by the returning session's size; the victim is
/// taken from T1 while T1 holds more than `p`.
#[derive(Clone, Copy, Debug)]
pub struct VllmOffload {
    arc: bool,
    p: u64,
}

impl VllmOffload {
    /// LRU eviction.
    pub fn lru() -> Self {
        VllmOffload { arc: false, p: 0 }
    }
    /// ARC eviction.
    pub fn arc() -> Self {
        VllmOffload { arc: true, p: 0 }
    }
}

impl Policy for VllmOffload {
    fn name(&self) -> String {
        if self.arc {
            "vllm-offload:arc"
        } else {
            "vllm-offload"
        }
        .into()
    }
    fn on_suspend(&mut self, _now: Nanos, _s: &SessionView) -> SuspendPlan {
        SuspendPlan {
            save: vec![Tier::Host],
            timer: None,
        }
    }
    fn evict_key(&self, s: &SessionView, tier: Tier) -> EvictKey {
        EvictKey {
            class: if self.arc && s.served[tier_index(tier)] > 0 {
                1
            } else {
                0
            },
            order: s.last_touch,
        }
    }
    fn victim_class(&mut self, _tier: Tier, class_bytes: [u64; 2]) -> u8 {
        if !self.arc {
            return 0;
        }
        let total = class_bytes[0] + class_bytes[1];
        self.p = self.p.min(total);
        if class_bytes[0] > 0 && class_bytes[0] >= self.p {
            0
        } else {
            1
        }
    }
    fn on_resume(&mut self, _now: Nanos, s: &SessionView, _gap: Nanos, ghost: Option<(Tier, u8)>) {
        if !self.arc {
            return;
        }
        match ghost {
            Some((Tier::Host, 0)) => self.p = self.p.saturating_add(s.bytes),
            Some((Tier::Host, _)) => self.p = self.p.saturating_sub(s.bytes),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::Hint;

    #[test]
    fn arc_moves_a_session_to_t2_after_a_host_hit_and_adapts() {
        let mut arc = VllmOffload::arc();
        let view = |served: [u32; 2]| {
            static HINT: std::sync::OnceLock<Hint> = std::sync::OnceLock::new();
            SessionView {
                id: 1,
                bytes: 10,
                held: [10, 0],
                pending: [0, 0],
                suspended_at: Some(5),
                last_touch: 5,
                resumes: 1,
                served,
                hint: HINT.get_or_init(Hint::default),
                gaps: &[],
                gpu_gone: false,
            }
        };
        assert_eq!(arc.evict_key(&view([0, 0]), Tier::Host).class, 0);
        assert_eq!(arc.evict_key(&view([1, 0]), Tier::Host).class, 1);
        // p starts at 0: evict from T1 while it has bytes
        assert_eq!(arc.victim_class(Tier::Host, [5, 5]), 0);
        // a B1 ghost returning grows p past T1's size: now T2 gives way
        arc.on_resume(10, &view([0, 0]), 5, Some((Tier::Host, 0)));
        assert_eq!(arc.victim_class(Tier::Host, [5, 5]), 1);
        // a B2 ghost shrinks it again
        arc.on_resume(11, &view([0, 0]), 5, Some((Tier::Host, 1)));
        assert_eq!(arc.victim_class(Tier::Host, [5, 5]), 0);
    }
}
