//! `oracle`: knows when every suspended session returns (the upper bound).
//!
//! The simulator writes each session's next arrival into the shared
//! [`OracleBook`] just before it suspends the session; the oracle reads it
//! (and nothing else about the future). It
//! - saves nothing for a session that never returns;
//! - saves to host at every suspend and writes through to NVMe (so it never
//!   loses a session that a write-through LRU would keep);
//! - evicts in both tiers the session that returns last (Belady's rule at
//!   session granularity);
//! - prefetches NVMe → host just in time: the expected read time of the
//!   missing bytes (NVMe read, then host → GPU) plus one second ahead of the
//!   return;
//! - orders vLLM's GPU prefix cache by the return too (Belady), except as
//!   `oracle:gpu-lru`, which keeps vLLM's least-recently-used order (what
//!   the tiers alone are worth).

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::session::{Nanos, SessionId, Tier};

use super::{EvictKey, Op, Policy, PolicyEnv, SessionView, SuspendPlan, TimerPlan};

/// Next arrival per session, written by the simulator.
#[derive(Debug, Default)]
pub struct OracleBook {
    next: Mutex<HashMap<SessionId, Nanos>>,
}

impl OracleBook {
    /// Records that `s` next arrives at `at` (`None`: never again).
    pub fn set(&self, s: SessionId, at: Option<Nanos>) {
        let mut m = self.next.lock();
        match at {
            Some(t) => {
                m.insert(s, t);
            }
            None => {
                m.remove(&s);
            }
        }
    }
    /// When `s` next arrives, if it does.
    pub fn get(&self, s: SessionId) -> Option<Nanos> {
        self.next.lock().get(&s).copied()
    }
}

/// The oracle policy. See the module docs.
pub struct Oracle {
    env: PolicyEnv,
    book: Arc<OracleBook>,
    next: HashMap<SessionId, Nanos>,
    lru_gpu: bool,
}

impl Oracle {
    /// An oracle reading `book`.
    pub fn new(env: PolicyEnv, book: Arc<OracleBook>) -> Self {
        Oracle {
            env,
            book,
            next: HashMap::new(),
            lru_gpu: false,
        }
    }

    /// With vLLM's own (least recently used) GPU prefix-cache order.
    pub fn lru_gpu(mut self, on: bool) -> Self {
        self.lru_gpu = on;
        self
    }

    fn lead(&self, bytes: u64) -> Nanos {
        let secs = bytes as f64 / self.env.nvme_read_bps + bytes as f64 / self.env.h2d_bps + 1.0;
        (secs * 1e9) as Nanos
    }
}

impl Policy for Oracle {
    fn name(&self) -> String {
        if self.lru_gpu {
            "oracle:gpu-lru"
        } else {
            "oracle"
        }
        .into()
    }
    fn on_suspend(&mut self, now: Nanos, s: &SessionView) -> SuspendPlan {
        let Some(nr) = self.book.get(s.id) else {
            self.next.remove(&s.id);
            return SuspendPlan::default();
        };
        self.next.insert(s.id, nr);
        SuspendPlan {
            save: vec![Tier::Host, Tier::Nvme],
            timer: Some(nr.saturating_sub(self.lead(s.bytes)).max(now)),
        }
    }
    fn on_timer(&mut self, now: Nanos, s: &SessionView) -> TimerPlan {
        if s.suspended_at.is_none() {
            return TimerPlan::default();
        }
        let Some(&nr) = self.next.get(&s.id) else {
            return TimerPlan::default();
        };
        let at = nr.saturating_sub(self.lead(s.bytes));
        if now >= at {
            if s.held_in(Tier::Host) + s.pending[0] < s.held_in(Tier::Nvme) {
                return TimerPlan {
                    ops: vec![Op::Prefetch],
                    timer: None,
                };
            }
            TimerPlan::default()
        } else {
            TimerPlan {
                ops: vec![],
                timer: Some(at),
            }
        }
    }
    fn evict_key(&self, s: &SessionView, _tier: Tier) -> EvictKey {
        let order = match (s.suspended_at, self.next.get(&s.id)) {
            // suspended: the later the return, the earlier the eviction
            (Some(_), Some(&nr)) => u64::MAX - nr,
            // never returns
            (Some(_), None) => 0,
            // running: its copy is refreshed at the next suspend
            (None, _) => 1,
        };
        EvictKey { class: 0, order }
    }
    fn gpu_order(&self, s: SessionId, now: Nanos) -> u64 {
        if self.lru_gpu {
            return now;
        }
        // Belady: the context that returns last goes first; one that never
        // returns before any
        self.book.get(s).map_or(0, |nr| u64::MAX - nr)
    }
    fn on_end(&mut self, s: SessionId) {
        self.next.remove(&s);
    }
}
