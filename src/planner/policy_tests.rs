//! The baseline and oracle policies driven through the [`Planner`]: what each
//! one makes the planner do. They live here, not in `policy`, whose arrows
//! point only to the shared vocabulary in [`crate::session`].

use std::sync::Arc;

use super::core::{Action, Capacity, Hint, Planner, Tier};
use crate::policy::{GpuOnly, LmcacheLru, Oracle, OracleBook, Policy, PolicyEnv, Ttl};

const GB: u64 = 1 << 30;

fn planner(p: Box<dyn Policy>) -> Planner {
    Planner::new(
        Capacity {
            host_bytes: 100 * GB,
            nvme_bytes: 100 * GB,
        },
        p,
    )
}

#[test]
fn ttl_keeps_for_exactly_tau() {
    let tau = 60_000_000_000;
    let mut p = planner(Box::new(Ttl::new(tau)));
    assert_eq!(Ttl::new(tau).name(), "ttl:1m");
    let a = p.suspend(1000, 7, GB, &Hint::default());
    p.completed(1000, &a[0], true);
    assert_eq!(p.next_wakeup(), Some(1000));
    assert!(p.tick(1000).is_empty());
    // a return exactly τ after the suspend still finds it
    assert_eq!(p.next_wakeup(), Some(1000 + tau + 1));
    assert!(p.tick(1000 + tau).is_empty());
    assert_eq!(
        p.tick(1000 + tau + 1),
        vec![Action::Drop {
            session: 7,
            tier: Tier::Host,
            bytes: GB
        }]
    );
    assert_eq!(p.resume(1000 + tau + 2, 7), None);
}

#[test]
fn gpu_only_saves_nothing_and_lmcache_writes_through() {
    let mut p = planner(Box::new(GpuOnly));
    assert!(p.suspend(0, 1, GB, &Hint::default()).is_empty());
    let mut p = planner(Box::new(LmcacheLru));
    let a = p.suspend(0, 1, GB, &Hint::default());
    let tiers: Vec<Tier> = a
        .iter()
        .filter_map(|x| match x {
            Action::Copy { from: None, to, .. } => Some(*to),
            _ => None,
        })
        .collect();
    assert_eq!(tiers, vec![Tier::Host, Tier::Nvme]);
}

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
    let fetch = Action::Copy {
        session: 1,
        from: Some(Tier::Nvme),
        to: Tier::Host,
        bytes: 1_000_000_000,
    };
    assert!(t.contains(&fetch));
    // the prefetch fails: the oracle is not asked again at the same instant
    // (it would ask for the same prefetch, which could fail again forever)
    p.completed(due, &fetch, false);
    assert!(
        p.next_wakeup().map_or(true, |w| w > due),
        "{:?}",
        p.next_wakeup()
    );
    assert!(p.tick(due).is_empty());
}
