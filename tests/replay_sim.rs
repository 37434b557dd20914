//! Simulator invariants on a small generated trace under pressure.

use kvpark::sim::deploy::{Deployment, DEFAULT_JSON};
use kvpark::sim::engine::{run_all, run_policy, PolicyResult, Script, SimConfig};
use kvpark::sim::stats::TraceStats;
use kvpark::sim::synth::{generate, SynthConfig};
use kvpark::sim::trace::read_bytes;

fn tight_deployment() -> Deployment {
    // small tiers so that every tier evicts
    let j = DEFAULT_JSON
        .replace("\"56GiB\"", "\"24GiB\"")
        .replace("\"256GiB\"", "\"48GiB\"")
        .replace("\"4TiB\"", "\"96GiB\"");
    Deployment::from_json(&j).unwrap()
}

fn trace(sessions: u64, seed: u64) -> (Script, TraceStats) {
    let (data, _) = generate(&SynthConfig::new(sessions, seed));
    let mut script = Script::default();
    let mut st = TraceStats::default();
    let sum = read_bytes(&data, |s, tools| {
        st.add(&s, tools);
        script.push(&s);
        Ok(())
    })
    .unwrap();
    script.tools = sum.tools.clone();
    script.finish();
    (script, st)
}

fn cfg(tc: f64, check: bool) -> SimConfig {
    SimConfig {
        time_compression: tc,
        progress: None,
        check_invariants: check,
    }
}

const POLICIES: [&str; 9] = [
    "gpu-lru",
    "vllm-offload",
    "vllm-offload:arc",
    "lmcache-lru",
    "oracle",
    "ttl:10s",
    "ttl:1m",
    "ttl:5m",
    "ttl:1h",
];

fn get<'a>(r: &'a [PolicyResult], name: &str) -> &'a PolicyResult {
    r.iter().find(|x| x.policy == name).unwrap()
}

#[test]
fn invariants_hold_under_pressure() {
    let (script, st) = trace(120, 5);
    let dep = tight_deployment();
    let names: Vec<String> = POLICIES.iter().map(|s| s.to_string()).collect();
    let r = run_all(&script, &dep, &names, &cfg(6.0, true), 2).unwrap();
    for x in &r {
        assert_eq!(
            x.steps as usize,
            script.steps.len(),
            "{}: every step replayed",
            x.policy
        );
        if !x.idealised {
            assert!(
                x.occupancy[1].peak <= dep.host_bytes,
                "{}: host over capacity",
                x.policy
            );
            assert!(
                x.occupancy[2].peak <= dep.nvme_bytes + 1,
                "{}: NVMe over capacity",
                x.policy
            );
        }
    }
    // the tiers really were under pressure
    assert!(get(&r, "vllm-offload").evictions[0] > 0);
    assert!(get(&r, "lmcache-lru").evictions[1] > 0);

    // gpu-lru: no kvpark tier at all
    let g = get(&r, "gpu-lru");
    assert_eq!(g.hit_from[1], 0.0);
    assert_eq!(g.hit_from[2], 0.0);
    assert_eq!(g.pcie_d2h_bytes + g.nvme_write_bytes + g.nvme_read_bytes, 0);
    assert_eq!(g.occupancy[1].peak + g.occupancy[2].peak, 0);

    // the oracle is an upper bound for every policy on the same deployment
    // (the idealised TTLs have unlimited capacity and are not comparable)
    let o = get(&r, "oracle");
    for x in r.iter().filter(|x| !x.idealised) {
        assert!(
            o.hit.all >= x.hit.all,
            "oracle {} < {} {}",
            o.hit.all,
            x.policy,
            x.hit.all
        );
    }
    assert!(
        o.hit.all > g.hit.all,
        "offloading must beat the GPU cache alone here"
    );
    assert!(o.prefetch.issued > 0);

    // TTL sweep: monotonic in τ, and equal to the §6 sweep of the same trace
    let ttl = ["ttl:10s", "ttl:1m", "ttl:5m", "ttl:1h"];
    for w in ttl.windows(2) {
        let (a, b) = (get(&r, w[0]), get(&r, w[1]));
        assert!(a.hit.all <= b.hit.all, "{} > {}", w[0], w[1]);
        assert!(a.amplification >= b.amplification);
    }
    for (name, ns) in [("ttl:1m", 60_000_000_000i64), ("ttl:1h", 3_600_000_000_000)] {
        let p = st.at(ns).unwrap();
        let x = get(&r, name);
        assert!(
            (x.hit.all - p.hit).abs() < 1e-12,
            "{name}: replay {} vs sweep {}",
            x.hit.all,
            p.hit
        );
        assert!((x.hit.user - p.hit_user).abs() < 1e-12);
        assert!((x.amplification - p.amplification).abs() < 1e-9);
    }
}

#[test]
fn replay_is_deterministic_and_compression_raises_load() {
    let (script, _) = trace(60, 9);
    let dep = tight_deployment();
    let strip = |mut x: PolicyResult| {
        x.wall_s = 0.0;
        serde_json::to_string(&x).unwrap()
    };
    let a = run_policy(&script, &dep, "oracle", &cfg(4.0, false)).unwrap();
    let b = run_policy(&script, &dep, "oracle", &cfg(4.0, false)).unwrap();
    assert_eq!(strip(a), strip(b));
    let slow = run_policy(&script, &dep, "gpu-lru", &cfg(1.0, false)).unwrap();
    let fast = run_policy(&script, &dep, "gpu-lru", &cfg(16.0, false)).unwrap();
    assert!(fast.virtual_s < slow.virtual_s);
    assert!(
        fast.occupancy[0].peak > slow.occupancy[0].peak,
        "more sessions at once on the GPU"
    );
    assert!(
        fast.hit.all < slow.hit.all,
        "a shared GPU cache hits less under more load"
    );
}

#[test]
fn unknown_policy_names_the_valid_ones() {
    let (script, _) = trace(2, 1);
    let e = run_policy(
        &script,
        &Deployment::default_deployment(),
        "kvpark",
        &cfg(1.0, false),
    )
    .unwrap_err();
    assert!(e.message().contains("lmcache-lru"), "{}", e.message());
}
