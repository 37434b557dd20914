//! The replay driving the connector's block planner (`SimConfig::blocks`):
//! vLLM's calls with block hashes, plans run by a modelled worker whose
//! reports are the planner's only news.

use kvpark::sim::deploy::{Deployment, DEFAULT_JSON};
use kvpark::sim::engine::{run_all, run_policy, PolicyResult, Script, SimConfig};
use kvpark::sim::synth::{generate, SynthConfig};
use kvpark::sim::trace::read_bytes;
use proptest::prelude::*;

fn trace(sessions: u64, seed: u64) -> Script {
    let (data, _) = generate(&SynthConfig::new(sessions, seed));
    let mut script = Script::default();
    let sum = read_bytes(&data, |s, _| {
        script.push(&s);
        Ok(())
    })
    .unwrap();
    script.tools = sum.tools.clone();
    script.finish();
    script
}

fn dep(gpu_gib: u64, host: &str, nvme: &str) -> Deployment {
    let j = DEFAULT_JSON
        .replace("\"56GiB\"", &format!("\"{gpu_gib}GiB\""))
        .replace("\"64GiB\"", &format!("\"{host}\""))
        .replace("\"2TiB\"", &format!("\"{nvme}\""))
        .replace("\"codec\": \"exp-huff\"", "\"codec\": \"none\"");
    Deployment::from_json(&j).unwrap()
}

fn cfg(tc: f64, blocks: bool) -> SimConfig {
    SimConfig {
        time_compression: tc,
        progress: None,
        check_invariants: true,
        record_links: true,
        blocks,
    }
}

fn get<'a>(r: &'a [PolicyResult], name: &str) -> &'a PolicyResult {
    r.iter().find(|x| x.policy == name).unwrap()
}

fn names(p: &[&str]) -> Vec<String> {
    p.iter().map(|s| s.to_string()).collect()
}

/// Hit tokens of counted steps (the token-weighted rate times the tokens).
fn hit_share(x: &PolicyResult) -> [f64; 3] {
    x.hit_from
}

#[test]
fn with_room_for_everything_the_block_planner_serves_what_the_session_planner_does() {
    // a small GPU (its prefix cache evicts), host memory for every context:
    // each return the GPU lost is a host hit of the whole reused prefix in
    // both modes; the block planner's hits are whole blocks (vLLM hashes
    // only full blocks), so they differ by less than a block per step
    let script = trace(24, 3);
    let d = dep(20, "1TiB", "64TiB");
    let p = ["lmcache-lru"];
    let s = &run_all(&script, &d, &names(&p), &cfg(8.0, false), 1).unwrap()[0];
    let b = &run_all(&script, &d, &names(&p), &cfg(8.0, true), 1).unwrap()[0];
    assert_eq!(s.steps, b.steps);
    assert!(b.gpu_evictions > 0, "the GPU must give contexts up here");
    let (hs, hb) = (hit_share(s), hit_share(b));
    assert!(hb[1] > 0.0, "host hits in block mode: {hb:?}");
    assert_eq!(b.hit_from[2], 0.0, "nothing needed NVMe");
    assert_eq!(b.refused, [0, 0]);
    // (over the counted steps of the script: at least the replayed ones,
    // so the bound below is if anything too tight)
    let tokens: u64 = script
        .steps
        .iter()
        .filter(|x| x.counted)
        .map(|x| x.l as u64)
        .sum();
    let counted = script.steps.iter().filter(|x| x.counted).count() as f64;
    let block = d.block_size as f64 / tokens as f64;
    let (all_s, all_b) = (s.hit.all, b.hit.all);
    assert!(
        all_b <= all_s + 1e-12,
        "block hits {all_b} above session hits {all_s}"
    );
    assert!(
        all_s - all_b < counted * block,
        "block hits {all_b} more than a block per step below session hits {all_s}"
    );
    // the loads went over PCIe to the GPU
    assert!(b.pcie_h2d_bytes > 0);
    assert!(hs[1] > 0.0);
}

#[test]
fn under_pressure_the_block_planner_keeps_capacity_and_counts() {
    let script = trace(60, 5);
    let d = dep(24, "24GiB", "96GiB");
    let p = [
        "gpu-lru",
        "lmcache-lru",
        "kvpark",
        "kvpark:gpu-events",
        "oracle",
    ];
    let r = run_all(&script, &d, &names(&p), &cfg(24.0, true), 2).unwrap();
    for x in &r {
        assert_eq!(
            (x.steps + x.over_context) as usize,
            script.steps.len(),
            "{}",
            x.policy
        );
        assert!(x.occupancy[0].peak <= d.gpu_kv_bytes, "{}", x.policy);
        assert!(x.occupancy[1].peak <= d.host_bytes, "{}", x.policy);
        assert!(x.occupancy[2].peak <= d.nvme_bytes + 1, "{}", x.policy);
    }
    let g = get(&r, "gpu-lru");
    assert_eq!(g.hit_from[1] + g.hit_from[2], 0.0);
    assert_eq!(g.pcie_d2h_bytes + g.nvme_write_bytes + g.nvme_read_bytes, 0);
    let l = get(&r, "lmcache-lru");
    assert!(l.evictions[0] > 0, "host evicted");
    assert!(
        l.hit_from[1] > 0.0 && l.hit_from[2] > 0.0,
        "{:?}",
        l.hit_from
    );
    assert!(l.nvme_write_bytes > 0 && l.nvme_read_bytes > 0);
    // the oracle and the gpu-events variant promote NVMe contexts ahead
    for name in ["oracle", "kvpark:gpu-events"] {
        let x = get(&r, name);
        assert!(x.prefetch.issued > 0, "{name}: {:?}", x.prefetch);
        assert!(x.prefetch.early > 0, "{name}: {:?}", x.prefetch);
    }
    assert_eq!(l.prefetch.issued, 0, "lmcache-lru never promotes");
    // deterministic
    let again = run_policy(&script, &d, "kvpark", &cfg(24.0, true)).unwrap();
    let k = get(&r, "kvpark");
    assert_eq!(
        (
            again.recompute_tokens,
            again.nvme_read_bytes,
            again.prefetch.issued
        ),
        (k.recompute_tokens, k.nvme_read_bytes, k.prefetch.issued)
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(6))]

    /// The modelled worker's transfers never book a link twice: bytes moved
    /// over a link in any chunk sequence never overlap in time.
    #[test]
    fn block_plans_never_double_book_a_link(
        seed in 0u64..10_000,
        sessions in 4u64..12,
        tc in 1.0f64..40.0,
        host in 8u64..48,
    ) {
        let script = trace(sessions, seed);
        let d = dep(24, &format!("{host}GiB"), "64TiB");
        for p in ["lmcache-lru", "kvpark:gpu-events", "oracle"] {
            let r = run_policy(&script, &d, p, &cfg(tc, true)).unwrap();
            for l in 0..4u8 {
                let mut log: Vec<_> = r.link_log.iter().filter(|x| x.0 == l).copied().collect();
                log.sort_by_key(|x| x.1);
                for w in log.windows(2) {
                    prop_assert!(w[1].1 >= w[0].2, "{p} link {l}: chunks overlap {:?}", w);
                }
            }
            prop_assert!(r.occupancy[0].peak <= d.gpu_kv_bytes, "{p}: GPU KV over capacity");
            prop_assert_eq!(r.steps + r.over_context, script.steps.len() as u64);
        }
    }
}
