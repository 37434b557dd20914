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
//!   return.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::planner::core::{Nanos, SessionId, Tier};

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
}

impl Oracle {
    /// An oracle reading `book`.
    pub fn new(env: PolicyEnv, book: Arc<OracleBook>) -> Self {
        Oracle {
            env,
            book,
            next: HashMap::new(),
        }
    }

    fn lead(&self, bytes: u64) -> Nanos {
        let secs = bytes as f64 / self.env.nvme_read_bps + bytes as f64 / self.env.h2d_bps + 1.0;
        (secs * 1e9) as Nanos
    }
}

impl Policy for Oracle {
    fn name(&self) -> String {
        "oracle".into()
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
    fn gpu_order(&self, s: SessionId, _now: Nanos) -> u64 {
        // Belady: the context that returns last goes first; one that never
        // returns before any
        self.book.get(s).map_or(0, |nr| u64::MAX - nr)
    }
    fn on_end(&mut self, s: SessionId) {
        self.next.remove(&s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::planner::core::{Action, Capacity, Hint, Planner};

    #[test]
    fn saves_only_what_returns_evicts_the_latest_and_prefetches_in_time() {
        let book = Arc::new(OracleBook::default());
        let env = PolicyEnv {
            nvme_read_bps: 1e9,
            h2d_bps: 1e9,
            ..PolicyEnv::default()
        };
        let mut p = Planner::new(
            Capacity {
                host_bytes: 2_000_000_000,
                nvme_bytes: 10_000_000_000,
            },
            Box::new(Oracle::new(env, book.clone())),
        );
        let s = 1_000_000_000u64; // 1 s
                                  // session 9 never returns: nothing is saved
        book.set(9, None);
        assert!(p.suspend(0, 9, 1_000_000_000, &Hint::default()).is_empty());
        // sessions 1 (back at 100 s) and 2 (back at 50 s) fill the host
        for (id, back) in [(1u64, 100 * s), (2, 50 * s)] {
            book.set(id, Some(back));
            for a in p.suspend(0, id, 1_000_000_000, &Hint::default()) {
                p.completed(0, &a, true);
            }
        }
        // session 3 returns at 10 s: the one returning last (1) leaves the host
        book.set(3, Some(10 * s));
        let a = p.suspend(s, 3, 1_000_000_000, &Hint::default());
        assert!(a.contains(&Action::Drop {
            session: 1,
            tier: Tier::Host,
            bytes: 1_000_000_000
        }));
        for x in &a {
            p.completed(s, x, true);
        }
        p.tick(s);
        // session 1 is prefetched just in time: 1 GB at 1 GB/s read + 1 GB/s h2d + 1 s ahead
        let due = 100 * s - 3 * s;
        assert!(p.tick(due - 1).iter().all(|x| !matches!(
            x,
            Action::Copy {
                from: Some(Tier::Nvme),
                ..
            }
        )));
        // make room for it: session 3 came back and ended
        p.resume(10 * s, 3);
        p.end(10 * s, 3);
        let t = p.tick(due);
        assert!(t.contains(&Action::Copy {
            session: 1,
            from: Some(Tier::Nvme),
            to: Tier::Host,
            bytes: 1_000_000_000
        }));
    }
}
