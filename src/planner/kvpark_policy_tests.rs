//! The `kvpark` policy driven through the [`Planner`] and on its own: its
//! expected-return eviction, prefetch and variants. They live here, not in
//! `policy`, whose arrows point only to the shared vocabulary in
//! [`crate::session`].

use super::core::{Action, Awaiting, Capacity, Hint, Nanos, Planner, SessionId, Tier};
use crate::policy::kvpark::{Knobs, Kvpark, Variant};
use crate::policy::{Policy, PolicyEnv, SessionView};

const S: Nanos = 1_000_000_000;
const GB: u64 = 1 << 30;

fn hint(a: Awaiting) -> Hint {
    Hint {
        awaiting: a,
        tool: (a == Awaiting::Tool).then(|| "Bash".to_string()),
    }
}

/// Trains the predictor through the planner: sessions 100.. wait on a
/// tool for 1 s, sessions 200.. on a human for 300 s.
fn trained(v: Variant, cap: Capacity) -> Planner {
    trained_env(v, cap, PolicyEnv::default())
}

fn trained_env(v: Variant, cap: Capacity, env: PolicyEnv) -> Planner {
    trained_knobs(v, Knobs::default(), cap, env)
}

fn trained_knobs(v: Variant, k: Knobs, cap: Capacity, env: PolicyEnv) -> Planner {
    let mut p = Planner::new(cap, Box::new(Kvpark::with_knobs(v, k, env)));
    let mut now = 0;
    for round in 0..60u64 {
        for (id, a, gap) in [(100, Awaiting::Tool, S), (200, Awaiting::User, 300 * S)] {
            let id = id + round;
            for a in p.suspend(now, id, 1, &hint(a)) {
                p.completed(now, &a, true);
            }
            now += gap;
            p.resume(now, id);
            p.end(now, id);
        }
    }
    p
}

fn drops(a: &[Action], tier: Tier) -> Vec<SessionId> {
    a.iter()
        .filter_map(|x| match x {
            Action::Drop {
                session, tier: t, ..
            } if *t == tier => Some(*session),
            _ => None,
        })
        .collect()
}

#[test]
fn host_evicts_the_session_expected_back_last_not_the_oldest() {
    let cap = Capacity {
        host_bytes: 2 * GB,
        nvme_bytes: 100 * GB,
    };
    for v in [Variant::FULL, Variant::from_name("kvpark:recency").unwrap()] {
        let mut p = trained(v, cap);
        let t = 1_000_000 * S;
        // 1 parks first, waiting on a tool; 2 parks later, waiting on a human
        for (id, at, a) in [(1, t, Awaiting::Tool), (2, t + S / 10, Awaiting::User)] {
            for x in p.suspend(at, id, GB, &hint(a)) {
                p.completed(at, &x, true);
            }
        }
        let a = p.suspend(t + S / 5, 3, GB, &hint(Awaiting::Tool));
        let want = if v.recency { 1 } else { 2 };
        assert_eq!(drops(&a, Tier::Host), vec![want], "{v:?}");
        p.check().unwrap();
    }
}

#[test]
fn prefetches_an_evicted_session_before_its_expected_return() {
    let cap = Capacity {
        host_bytes: GB,
        nvme_bytes: 100 * GB,
    };
    let mut p = trained(Variant::FULL, cap);
    let t = 1_000_000 * S;
    let a = p.suspend(t, 1, GB, &hint(Awaiting::User));
    assert_eq!(a.len(), 2, "host and NVMe: {a:?}");
    for x in &a {
        p.completed(t, x, true);
    }
    // another session takes the host: 1 is on NVMe only
    let b = p.suspend(t + S, 2, GB, &hint(Awaiting::Tool));
    assert_eq!(drops(&b, Tier::Host), vec![1]);
    for x in &b {
        p.completed(t + S, x, true);
    }
    p.resume(t + 2 * S, 2);
    p.end(t + 2 * S, 2);
    // walk the checkpoints: once host has room again (2 has ended), a
    // ranked prefetch of 1 comes at the next checkpoint, long before its
    // median (300 s)
    let mut now = t + 2 * S;
    let mut fetched = None;
    while let Some(w) = p.next_wakeup() {
        if w > t + 300 * S {
            break;
        }
        now = w.max(now);
        if p.tick(now).iter().any(|x| {
            matches!(
                x,
                Action::Copy {
                    session: 1,
                    from: Some(Tier::Nvme),
                    to: Tier::Host,
                    ..
                }
            )
        }) {
            fetched = Some(now);
            break;
        }
    }
    let at = fetched.expect("a prefetch before the predicted return");
    assert!(at >= t + 2 * S && at < t + 300 * S, "{}", (at - t) / S);

    // without prefetch: never
    let mut q = trained(Variant::from_name("kvpark:no-prefetch").unwrap(), cap);
    for x in q.suspend(t, 1, GB, &hint(Awaiting::User)) {
        q.completed(t, &x, true);
    }
    for x in q.suspend(t + S, 2, GB, &hint(Awaiting::Tool)) {
        q.completed(t + S, &x, true);
    }
    let mut n = 0;
    while let Some(w) = q.next_wakeup() {
        if w > t + 3000 * S || n > 100 {
            break;
        }
        n += 1;
        assert!(q
            .tick(w)
            .iter()
            .all(|x| !matches!(x, Action::Copy { from: Some(_), .. })));
    }
}

#[test]
fn a_session_silent_past_its_predicted_gap_is_not_prefetched() {
    // humans here answer in 300 s; session 1 loses its host copy, and host
    // has room again only at 1,000 s: by then 1 counts as gone (its wait
    // is past the 0.9 quantile), unless the knob says to prefetch always
    let cap = Capacity {
        host_bytes: GB,
        nvme_bytes: 100 * GB,
    };
    let t = 1_000_000 * S;
    let prefetched = |until: f64| {
        let k = Knobs {
            prefetch_until: until,
            ..Knobs::default()
        };
        let mut p = trained_knobs(Variant::FULL, k, cap, PolicyEnv::default());
        for x in p.suspend(t, 1, GB, &hint(Awaiting::User)) {
            p.completed(t, &x, true);
        }
        // (another human session: the margin keeps them from displacing
        // each other)
        for x in p.suspend(t + S, 2, GB, &hint(Awaiting::User)) {
            p.completed(t + S, &x, true);
        }
        let mut now = t + S;
        let mut n = 0;
        while let Some(w) = p.next_wakeup() {
            if w > t + 4 * 3600 * S || n > 10_000 {
                break;
            }
            n += 1;
            now = w.max(now);
            if now >= t + 1000 * S && p.holding(2).is_some() {
                p.resume(now, 2);
                p.end(now, 2);
            }
            for x in p.tick(now) {
                if matches!(
                    x,
                    Action::Copy {
                        session: 1,
                        from: Some(Tier::Nvme),
                        to: Tier::Host,
                        ..
                    }
                ) {
                    return Some((now - t) / S);
                }
                p.completed(now, &x, true);
            }
        }
        None
    };
    assert_eq!(prefetched(0.9), None);
    let at = prefetched(1.0).expect("prefetched when the knob says always");
    assert!(at >= 1000, "{at}");
}

#[test]
fn with_gpu_reports_host_gets_what_the_gpu_gave_up() {
    let cap = Capacity {
        host_bytes: GB + GB / 2,
        nvme_bytes: 100 * GB,
    };
    let env = PolicyEnv {
        gpu_reports: true,
        ..PolicyEnv::default()
    };
    // plain kvpark ignores the reports (the connector has none): the same
    // sequence as below writes the third suspend through to host and NVMe
    let mut plain = trained_env(Variant::FULL, cap, env);
    let t0 = 1_000_000 * S;
    for (at, id, bytes) in [(t0, 1, GB), (t0 + S, 2, GB)] {
        for x in plain.suspend(at, id, bytes, &hint(Awaiting::User)) {
            plain.completed(at, &x, true);
        }
    }
    plain.resume(t0 + 2 * S, 1);
    let c = plain.suspend(t0 + 3 * S, 1, GB + GB / 8, &hint(Awaiting::User));
    assert!(
        c.iter().any(|x| matches!(
            x,
            Action::Copy {
                from: None,
                to: Tier::Host,
                ..
            }
        )),
        "plain kvpark saves to host: {c:?}"
    );
    let v = Variant::from_name("kvpark:gpu-events").unwrap();
    let mut p = trained_env(v, cap, env);
    let t = 1_000_000 * S;
    // nothing on NVMe yet: host and NVMe
    let a = p.suspend(t, 1, GB, &hint(Awaiting::User));
    assert_eq!(a.len(), 2, "{a:?}");
    for x in &a {
        p.completed(t, x, true);
    }
    // 1's host copy is redundant (the GPU holds it, NVMe too): first out
    let b = p.suspend(t + S, 2, GB, &hint(Awaiting::User));
    assert_eq!(drops(&b, Tier::Host), vec![1]);
    for x in &b {
        p.completed(t + S, x, true);
    }
    // 1 comes back (a GPU hit) and parks again: NVMe holds most of it and
    // host has no copy, so NVMe only
    p.resume(t + 2 * S, 1);
    let c = p.suspend(t + 3 * S, 1, GB + GB / 8, &hint(Awaiting::User));
    assert!(
        c.len() == 1 && matches!(c[0], Action::Copy { to: Tier::Nvme, .. }),
        "{c:?}"
    );
    for x in &c {
        p.completed(t + 3 * S, x, true);
    }
    // checkpoints while the GPU holds it: no prefetch
    let mut now = t + 3 * S;
    while let Some(w) = p.next_wakeup() {
        if w > t + 30 * S {
            break;
        }
        now = w;
        let acts = p.tick(now);
        assert!(
            acts.iter().all(|x| !matches!(x, Action::Copy { .. })),
            "at {}: {acts:?}",
            (now - t) / S
        );
    }
    // the GPU gives 1 up: prefetched over 2's redundant copy at once
    p.gpu_dropped(1);
    let d = p.tick(now);
    assert!(
        d.iter().any(|x| matches!(
            x,
            Action::Copy {
                session: 1,
                from: Some(Tier::Nvme),
                to: Tier::Host,
                ..
            }
        )),
        "{d:?}"
    );
    assert_eq!(drops(&d, Tier::Host), vec![2]);
    p.check().unwrap();
}

#[test]
fn variants_save_where_they_say_and_hints_are_ignored_without_them() {
    let cap = Capacity {
        host_bytes: 10 * GB,
        nvme_bytes: 10 * GB,
    };
    let mut p = trained(Variant::from_name("kvpark:no-nvme").unwrap(), cap);
    let a = p.suspend(1_000_000 * S, 1, GB, &hint(Awaiting::User));
    assert!(a
        .iter()
        .all(|x| matches!(x, Action::Copy { to: Tier::Host, .. })));
    assert_eq!(a.len(), 1);

    // with hints the tool and human predictions differ; without, not
    let view = |h: &'static Hint| SessionView {
        id: 7,
        bytes: GB,
        held: [0, 0],
        pending: [0, 0],
        suspended_at: Some(0),
        last_touch: 0,
        resumes: 0,
        served: [0, 0],
        hint: h,
        gaps: &[],
        gpu_gone: false,
    };
    static TOOL: std::sync::OnceLock<Hint> = std::sync::OnceLock::new();
    static USER: std::sync::OnceLock<Hint> = std::sync::OnceLock::new();
    let tool = TOOL.get_or_init(|| hint(Awaiting::Tool));
    let user = USER.get_or_init(|| hint(Awaiting::User));
    for (name, differ) in [("kvpark", true), ("kvpark:no-hints", false)] {
        let mut k = Kvpark::new(Variant::from_name(name).unwrap(), PolicyEnv::default());
        k.on_suspend(0, &view(tool));
        let r_tool = k.expected_return(7).unwrap();
        k.on_suspend(0, &view(user));
        let r_user = k.expected_return(7).unwrap();
        assert_eq!(r_tool != r_user, differ, "{name}: {r_tool} {r_user}");
        assert_eq!(k.name(), name);
    }
}

#[test]
fn calibration_counts_every_predicted_gap() {
    let cap = Capacity {
        host_bytes: GB,
        nvme_bytes: 100 * GB,
    };
    let p = trained(Variant::FULL, cap);
    // 60 rounds of one tool wait (1 s) and one human wait (300 s), each
    // suspend predicted (the study's prior before any gap is seen)
    let c = p.calibration().expect("kvpark predicts gaps");
    assert_eq!(c.gaps, 120, "{c:?}");
    assert!(c.below_p50 <= c.below_p90 && c.below_p90 <= c.gaps, "{c:?}");
    // the waits repeat exactly: once learned, each is within its p90
    assert!(c.below_p90 >= 100, "{c:?}");
    let lru = Planner::new(
        cap,
        crate::policy::by_name("lmcache-lru", PolicyEnv::default(), None).unwrap(),
    );
    assert_eq!(lru.calibration(), None);
}
