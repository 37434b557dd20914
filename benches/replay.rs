//! Replay throughput: a full-size synthetic trace (4,300 sessions,
//! ≈357k steps) through every policy, and the generator's steps/s.
//!
//! Baselines measured in the same run: the generator against writing the
//! same bytes again (memcpy into a buffer), and the replay against reading
//! and deriving the trace (the part every policy shares). The budget of the
//! task (all policies ≤ 60 s on 2 cores) is printed beside the measured wall
//! time.
//!
//! `cargo bench --features cli --bench replay` (set `KVPARK_BENCH_SESSIONS` for a smaller run).

use std::time::Instant;

use kvpark::sim::deploy::Deployment;
use kvpark::sim::engine::{run_all, Script, SimConfig};
use kvpark::sim::synth::{generate, SynthConfig};

fn main() {
    let sessions: u64 = std::env::var("KVPARK_BENCH_SESSIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4300);
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(2);

    let t = Instant::now();
    let (data, sum) = generate(&SynthConfig::new(sessions, 1));
    let gen_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let copy = data.clone();
    let copy_s = t.elapsed().as_secs_f64();
    std::hint::black_box(&copy);
    println!(
        "generator: {} sessions, {} steps, {:.1} MB in {:.2} s = {:.0} steps/s ({:.0} MB/s; memcpy of the same bytes {:.0} MB/s)",
        sum.sessions,
        sum.steps,
        data.len() as f64 / 1e6,
        gen_s,
        sum.steps as f64 / gen_s,
        data.len() as f64 / 1e6 / gen_s,
        data.len() as f64 / 1e6 / copy_s.max(1e-9)
    );

    let t = Instant::now();
    let (script, _) = Script::from_bytes(&data).expect("generated trace parses");
    let read_s = t.elapsed().as_secs_f64();
    drop(data);
    println!(
        "reader:    {} steps in {:.2} s = {:.0} steps/s (parse + derive, shared by all policies)",
        script.steps.len(),
        read_s,
        script.steps.len() as f64 / read_s
    );

    let policies: Vec<String> = [
        "gpu-lru",
        "ttl:5m",
        "vllm-offload",
        "vllm-offload:arc",
        "lmcache-lru",
        "oracle",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let dep = Deployment::default_deployment();
    // at the load the default deployment states (host memory binds)
    let cfg = SimConfig {
        time_compression: dep.time_compression,
        ..SimConfig::default()
    };
    let t = Instant::now();
    let results = run_all(&script, &dep, &policies, &cfg, threads).expect("replay");
    let wall = t.elapsed().as_secs_f64();
    for r in &results {
        println!(
            "  {:<18} {:>7.2} s  {:>9.0} steps/s  hit {:>5.1}%",
            r.policy,
            r.wall_s,
            r.steps as f64 / r.wall_s,
            100.0 * r.hit.all
        );
    }
    let total_steps = script.steps.len() as f64 * policies.len() as f64;
    println!(
        "replay:    {} policies x {} steps on {threads} threads in {:.2} s = {:.0} policy-steps/s; with reading {:.2} s (budget 60 s)",
        policies.len(),
        script.steps.len(),
        wall,
        total_steps / wall,
        wall + read_s
    );
}
