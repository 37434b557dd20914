//! Trace reader, synthetic generator, replay simulator and report.
//! Nothing else in the crate depends on this module.
//!
//! - [`trace`]: TraceLab JSONL reader and the derived quantities of DESIGN §6.
//! - [`stats`]: `kvpark trace stats` (distributions, idealised TTL sweep).
//! - [`synth`]: the calibrated synthetic generator (`kvpark trace synth`).
//! - [`deploy`]: the modelled deployment (JSON; the shipped ones in
//!   `deployments/`, embedded; the codec table).
//! - [`engine`]: the event-driven, closed-loop replay on a virtual clock
//!   (GPU admission, compute sharing, bandwidth-conserving links).
//! - [`blocks`]: the replay's side of vLLM's scheduler when it drives the
//!   connector's block planner (`kvpark replay --blocks`).
//! - [`report`], [`plot`]: tables, JSON and hand-written SVG.
//! - [`predict_eval`]: `kvpark trace predict` (the gap predictors replayed
//!   online over a trace: calibration and pinball loss).
//! - [`tune`]: `kvpark tune` (a cluster file and a trace → a sweep, a
//!   Pareto table and the recommended connector config).
//! - [`cli`]: the `replay`, `tune` and `trace` subcommands.
//!
//! ```text
//! kvpark replay                                   # embedded trace + deployment, default policies
//! kvpark replay --trace syfi_coding_trace.jsonl.gz --policies gpu-lru,vllm-offload,oracle \
//!               --deployment my-node.json --time-compression 2 --json out.json --plots plots/
//! kvpark replay --print-deployment                # the documented default deployment JSON
//! kvpark tune --cluster deployments/cluster-1xh100-1tb-2xgen4.json --plot tune.svg
//! kvpark trace synth --sessions 4300 --seed 1 --out synth.jsonl.gz
//! kvpark trace stats synth.jsonl.gz               # distributions + idealised TTL sweep vs the study
//! kvpark trace predict synth.jsonl.gz             # gap predictor vs a global histogram
//! ```
//!
//! Memory: the reader keeps compact rows of the sessions open in the file
//! only; `trace stats` keeps fixed-size histograms and O(sessions) counters;
//! the replay keeps a 36-byte script per step (≈13 MB for the full
//! 357k-step trace), a few words per session, and state proportional to the
//! requests and copies in flight.

pub mod blocks;
pub mod cli;
pub mod deploy;
pub mod engine;
pub mod hist;
pub mod plot;
pub mod predict_eval;
pub mod report;
pub mod rng;
pub mod stats;
pub mod synth;
pub mod trace;
pub mod tune;

/// "1m", "5m", "1h", "30s": a duration in seconds, for tables.
pub fn fmt_dur_s(s: f64) -> String {
    if s >= 86400.0 && (s / 86400.0).fract() == 0.0 {
        format!("{}d", s / 86400.0)
    } else if s >= 3600.0 && (s / 3600.0).fract() == 0.0 {
        format!("{}h", s / 3600.0)
    } else if s >= 60.0 && (s / 60.0).fract() == 0.0 {
        format!("{}m", s / 60.0)
    } else if s >= 1.0 {
        format!("{s:.0}s")
    } else {
        format!("{:.0}ms", s * 1e3)
    }
}

/// Policies compared when `--policies` is not given.
pub const DEFAULT_POLICIES: [&str; 7] = [
    "gpu-lru",
    "vllm-offload",
    "vllm-offload:arc",
    "lmcache-lru",
    "kvpark",
    "kvpark:gpu-events",
    "oracle",
];
/// Sessions of the embedded default trace.
pub const DEFAULT_SESSIONS: u64 = 400;
/// Seed of the embedded default trace.
pub const DEFAULT_SEED: u64 = 1;

fn write_file(path: &std::path::Path, data: &[u8]) -> crate::Result<()> {
    use crate::error::ResultExt;
    std::fs::write(path, data).ctx(format!("write {}", path.display()))
}

fn replay_cli(a: cli::ReplayArgs) -> crate::Result<()> {
    use std::io::IsTerminal;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;

    use crate::error::ResultExt;

    if a.print_deployment {
        println!("{}", deploy::DEFAULT_JSON);
        return Ok(());
    }
    let dep = match &a.deployment {
        Some(p) => deploy::Deployment::from_json(
            &std::fs::read_to_string(p).ctx(format!("read deployment {}", p.display()))?,
        )
        .map_err(|e| e.context(p.display()))?,
        None => deploy::Deployment::default_deployment(),
    };
    let policies = names_or(&a.policies, &DEFAULT_POLICIES);
    let book = Arc::new(crate::policy::OracleBook::default());
    for p in &policies {
        crate::policy::by_name(p, crate::policy::PolicyEnv::default(), Some(book.clone()))?;
    }
    // the deployment states the load; --time-compression overrides it for
    // the embedded trace and for --trace alike
    let tc = a.time_compression.unwrap_or(dep.time_compression);
    if !(tc.is_finite() && tc > 0.0) {
        return Err(crate::Error::invalid(format!(
            "--time-compression {tc}: must be a positive number"
        )));
    }
    let mut st = stats::TraceStats::default();
    let mut script = engine::Script::default();
    let (label, sum) = match &a.trace {
        Some(p) => {
            let sum = trace::read_file(p, |s, tools| {
                st.add(&s, tools);
                script.push(&s);
                Ok(())
            })?;
            if sum.rows == 0 {
                return Err(trace::empty_trace(p, &sum));
            }
            (p.display().to_string(), sum)
        }
        None => {
            let n = a.sessions.unwrap_or(DEFAULT_SESSIONS);
            let seed = a.seed.unwrap_or(DEFAULT_SEED);
            let (data, _) = synth::generate(&synth::SynthConfig::new(n, seed));
            let sum = trace::read_bytes(&data, |s, tools| {
                st.add(&s, tools);
                script.push(&s);
                Ok(())
            })?;
            (
                format!("embedded synthetic trace ({n} sessions, seed {seed})"),
                sum,
            )
        }
    };
    script.tools = sum.tools.clone();
    script.finish();
    if sum.long_lines > 0 {
        log::warn!("{}", trace::long_lines_warning(&label, &sum));
    }
    if sum.bad_lines > 0 {
        log::warn!(
            "{label}: {} malformed lines skipped (first: line {})",
            sum.bad_lines,
            sum.bad.first().map_or(0, |b| b.line)
        );
    }
    let cfg_progress = Arc::new(AtomicU64::new(0));
    let show = a.progress || std::io::stderr().is_terminal();
    let cfg = engine::SimConfig {
        time_compression: tc,
        progress: show.then(|| cfg_progress.clone()),
        check_invariants: false,
        record_links: false,
        blocks: a.blocks,
    };
    let total = script.steps.len() as u64 * policies.len() as u64;
    let done = Arc::new(AtomicBool::new(false));
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let results = std::thread::scope(|sc| {
        if show {
            let done = done.clone();
            let p = cfg_progress.clone();
            sc.spawn(move || {
                let t = std::time::Instant::now();
                while !done.load(Ordering::Relaxed) {
                    let d = p.load(Ordering::Relaxed);
                    let frac = d as f64 / total.max(1) as f64;
                    let bar = (frac * 30.0) as usize;
                    eprint!(
                        "\rreplay [{}{}] {:>5.1}%  {} / {} steps  {:.1} s",
                        "#".repeat(bar.min(30)),
                        " ".repeat(30 - bar.min(30)),
                        100.0 * frac,
                        d,
                        total,
                        t.elapsed().as_secs_f64()
                    );
                    std::thread::sleep(std::time::Duration::from_millis(200));
                }
                eprintln!();
            });
        }
        let r = engine::run_all(&script, &dep, &policies, &cfg, threads);
        done.store(true, Ordering::Relaxed);
        r
    })?;
    let planner = if a.blocks {
        "block planner (--blocks)"
    } else {
        "session planner"
    };
    let header = format!(
        "kvpark replay — {label}: {} sessions, {} steps, time compression {tc}×, {planner}",
        script.sessions.len(),
        script.steps.len()
    );
    print!("{}", report::render(&results, &dep, &header));
    let sweep = st.sweep();
    if let Some(j) = &a.json {
        let mut v = report::to_json(&results, &dep, &label, tc, &sweep);
        v["planner"] = serde_json::json!(if a.blocks { "blocks" } else { "sessions" });
        write_file(
            j,
            &serde_json::to_vec_pretty(&v).map_err(|e| crate::Error::internal(e.to_string()))?,
        )?;
    }
    if let Some(dir) = &a.plots {
        std::fs::create_dir_all(dir).ctx(format!("create {}", dir.display()))?;
        let mut series = vec![
            plot::Series {
                name: "all (§6 sweep)".into(),
                points: sweep.iter().map(|p| (p.tau_s, p.hit)).collect(),
                markers: false,
            },
            plot::Series {
                name: "user".into(),
                points: sweep.iter().map(|p| (p.tau_s, p.hit_user)).collect(),
                markers: false,
            },
            plot::Series {
                name: "tool".into(),
                points: sweep.iter().map(|p| (p.tau_s, p.hit_tool)).collect(),
                markers: false,
            },
        ];
        let ttl_pts: Vec<(f64, f64)> = results
            .iter()
            .filter_map(|r| {
                r.policy
                    .strip_prefix("ttl:")
                    .and_then(|d| crate::units::parse_duration_ns(d).ok())
                    .map(|ns| (ns as f64 / 1e9, r.hit.all))
            })
            .collect();
        if !ttl_pts.is_empty() {
            series.push(plot::Series {
                name: "ttl replays".into(),
                points: ttl_pts,
                markers: true,
            });
        }
        // each policy at the TTL whose idealised hit rate it matches
        for r in results.iter().filter(|r| !r.idealised) {
            let Some(p) = sweep.iter().min_by(|a, b| {
                (a.hit - r.hit.all)
                    .abs()
                    .total_cmp(&(b.hit - r.hit.all).abs())
            }) else {
                continue;
            };
            series.push(plot::Series {
                name: format!("{} (≈ TTL {})", r.policy, fmt_dur_s(p.tau_s)),
                points: vec![(p.tau_s, r.hit.all)],
                markers: true,
            });
        }
        let svg = plot::line_chart(
            "Hit rate vs TTL (idealised), policies at their equivalent TTL",
            "TTL (s)",
            "token-weighted hit rate",
            &series,
            true,
            (0.0, 1.0),
        );
        write_file(&dir.join("hit_vs_ttl.svg"), svg.as_bytes())?;
        let cdf: Vec<plot::Series> = results
            .iter()
            .map(|r| plot::Series {
                name: r.policy.clone(),
                points: r.ttft_hist.cdf(),
                markers: false,
            })
            .collect();
        let svg = plot::line_chart(
            "TTFT of user-initiated steps",
            "TTFT (s)",
            "fraction of steps",
            &cdf,
            true,
            (0.0, 1.0),
        );
        write_file(&dir.join("ttft_cdf.svg"), svg.as_bytes())?;
    }
    Ok(())
}

/// The names given on the command line (trimmed, empty ones left out), or
/// `default` when none were given.
pub(crate) fn names_or(given: &[String], default: &[&str]) -> Vec<String> {
    if given.is_empty() {
        return default.iter().map(|s| s.to_string()).collect();
    }
    // the list is split at every comma, knobs too: `kvpark@margin=4,every=2s`
    // arrives as two items, the second of which continues the first
    let mut out: Vec<String> = Vec::new();
    for s in given.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
        match out.last_mut() {
            Some(prev) if prev.contains('@') && s.contains('=') && !s.contains('@') => {
                prev.push(',');
                prev.push_str(s);
            }
            _ => out.push(s.to_string()),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::names_or;

    #[test]
    fn a_policy_list_keeps_each_policys_knobs() {
        // as clap splits `--policies lmcache-lru,kvpark@margin=4,every=2s,oracle`
        let given: Vec<String> = ["lmcache-lru", "kvpark@margin=4", "every=2s", " oracle", ""]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(
            names_or(&given, &[]),
            ["lmcache-lru", "kvpark@margin=4,every=2s", "oracle"]
        );
        // a knob with no policy before it stays an item (and fails as a name)
        let given = vec!["margin=4".to_string()];
        assert_eq!(names_or(&given, &[]), ["margin=4"]);
        assert_eq!(names_or(&[], &["a", "b"]), ["a", "b"]);
    }
}
