//! `kvpark tune`: from a cluster file (the deployment schema of
//! [`super::deploy`], `deployments/README.md`) and a trace to a ready
//! `kv_connector_extra_config`.
//!
//! The sweep is a grid: host bytes (halving from the cluster's
//! `pinnable_host_bytes`), NVMe bytes (none, then quartering up from the
//! drives' capacity), codecs, policy names (default [`DEFAULT_POLICIES`],
//! the connector's policies; any name `policy::by_name` knows may be given,
//! and a name the connector cannot run is replayed once at the file's own
//! tiers as a baseline) and, for the `kvpark` policies at points with an
//! NVMe tier (where they prefetch), the policy's knobs ([`knob_grid`],
//! default [`DEFAULT_KNOBS`]: how eagerly a prefetch displaces host copies
//! and how often a suspended session is looked at). Every point is one closed-loop replay
//! ([`super::engine::run_policy`]); points run in parallel on std threads.
//!
//! Each point gets a cost per hour of the node ([`super::deploy::Prices`]:
//! GPU-hours plus DRAM and NVMe given to kvpark, bought and amortised), the
//! p90 TTFT of user-initiated steps and the prefill amplification. The
//! [`pareto`] set minimises all three; [`recommend`] picks the cheapest
//! Pareto point that meets a TTFT target (default: within
//! [`DEFAULT_TTFT_SLACK`] of the best p90 any point reached), and
//! [`config_json`] turns it into the connector's config (per-rank sizes:
//! the cluster's are per node, divided by `gpu_count`), which
//! [`crate::config::Config::from_json`] accepts as printed.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{json, Value};

use super::deploy::Deployment;
use super::engine::{run_policy, Script, SimConfig};
use crate::config::CONNECTOR_POLICIES;
use crate::error::{Error, Result};
use crate::policy::{Knobs, Variant};
use crate::units::fmt_bytes;

/// Policies swept when `--policies` is not given (one line to extend).
pub const DEFAULT_POLICIES: &[&str] =
    &["lmcache-lru", "vllm-offload", "vllm-offload:arc", "kvpark"];
/// The kvpark policy as the connector runs it in a vLLM that publishes its
/// KV-cache events (`tune --kv-events`): recommended as `"policy": "kvpark"`
/// with a `vllm serve` line that turns the events on.
pub const KVPARK_WITH_EVENTS: &str = "kvpark:gpu-events";
/// What `vllm serve` needs for [`KVPARK_WITH_EVENTS`].
pub const KV_EVENTS_FLAG: &str = r#"--kv-events-config '{"enable_kv_cache_events": true, "publisher": "zmq", "endpoint": "tcp://*:5557"}'"#;

/// Whether the connector runs `policy` (a name without knobs): its config
/// policies, and [`KVPARK_WITH_EVENTS`] (its `kvpark` given vLLM's events).
pub fn connector_runs(policy: &str) -> bool {
    CONNECTOR_POLICIES.contains(&policy) || policy == KVPARK_WITH_EVENTS
}

/// Knob grid of the `kvpark` policies when `--knobs` is not given.
pub const DEFAULT_KNOBS: &str = "margin=1.25,2,4;every=2s,10s,60s";
/// Host sizes of the default grid (halving from `pinnable_host_bytes`).
pub const DEFAULT_HOST_STEPS: u32 = 5;
/// NVMe sizes of the default grid (none, then quartering up to the drives' capacity).
pub const DEFAULT_NVME_STEPS: u32 = 4;
/// Default target: the cheapest point within 5% of the best TTFT p90.
pub const DEFAULT_TTFT_SLACK: f64 = 0.05;
/// `nvme_dir` printed when `--nvme-dir` is not given: a path to replace.
pub const NVME_DIR_PLACEHOLDER: &str = "/CHANGE-ME/nvme/kvpark";
/// Most points one sweep may have.
pub const MAX_POINTS: usize = 10_000;

/// The example cluster files in `deployments/` (file name, JSON): one H100
/// with 1 TB of DRAM and two Gen4 drives, eight H200 with 2 TB and four Gen5
/// drives, and a CPU-only box (vLLM's CPU backend, where the e2e tests run).
pub const CLUSTERS: [(&str, &str); 3] = [
    (
        "cluster-1xh100-1tb-2xgen4.json",
        include_str!("../../deployments/cluster-1xh100-1tb-2xgen4.json"),
    ),
    (
        "cluster-8xh200-2tb-4xgen5.json",
        include_str!("../../deployments/cluster-8xh200-2tb-4xgen5.json"),
    ),
    (
        "cluster-cpu-2core.json",
        include_str!("../../deployments/cluster-cpu-2core.json"),
    ),
];

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

/// One configuration to replay.
#[derive(Clone, Debug, PartialEq)]
pub struct Point {
    /// Policy name.
    pub policy: String,
    /// Codec name.
    pub codec: String,
    /// Host tier of the node, bytes.
    pub host_bytes: u64,
    /// NVMe tier of the node (stored bytes; 0: no NVMe tier).
    pub nvme_bytes: u64,
    /// A baseline the connector cannot run (shown, never recommended).
    pub baseline: bool,
}

/// A replayed point.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// What was replayed.
    pub point: Point,
    /// $ per hour of the node.
    pub usd_per_hour: f64,
    /// TTFT of user-initiated steps, p90 (s).
    pub ttft_user_p90: f64,
    /// Prefill amplification (recomputed + fresh over fresh tokens).
    pub amplification: f64,
    /// Token-weighted hit rate.
    pub hit: f64,
    /// Whether anything was written to NVMe.
    pub nvme_used: bool,
    /// Bytes read from NVMe (loads and prefetches, as stored): the
    /// tie-breaker between points equal on the three objectives.
    pub nvme_read_bytes: u64,
}

/// Rounds `b` down to a multiple of `g` (g > 0).
fn round_down(b: u64, g: u64) -> u64 {
    b / g * g
}

/// Per-node sizes from `max` down: `max / ratio^k` for k in 0..steps, rounded
/// down so that each rank's share is whole GiB (whole MiB below one GiB per
/// rank); zeros and repeats dropped, ascending.
fn levels(max: u64, steps: u32, ratio: u64, ranks: u32) -> Vec<u64> {
    let ranks = ranks.max(1) as u64;
    let mut v = Vec::new();
    let mut x = max;
    for _ in 0..steps {
        let per_rank = x / ranks;
        let g = if per_rank >= GIB { GIB } else { MIB };
        let y = round_down(per_rank, g).saturating_mul(ranks);
        if y > 0 && !v.contains(&y) {
            v.push(y);
        }
        x /= ratio;
    }
    v.sort_unstable();
    v
}

/// The knob settings of a `--knobs` spec (`margin=1.25,2,4;every=2s,10s`):
/// every combination, each checked; an empty spec is the default knobs.
pub fn knob_grid(spec: &str) -> Result<Vec<Knobs>> {
    let mut out = vec![Knobs::default()];
    let mut seen = Vec::new();
    for part in spec.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, vals) = part.split_once('=').ok_or_else(|| {
            Error::invalid(format!(
                "tune --knobs: expected knob=v1,v2,… in {part:?} (e.g. {DEFAULT_KNOBS})"
            ))
        })?;
        let key = key.trim();
        if seen.contains(&key) {
            return Err(Error::invalid(format!("tune --knobs: {key} given twice")));
        }
        seen.push(key);
        let mut next = Vec::new();
        for k in &out {
            for v in vals.split(',').map(str::trim).filter(|v| !v.is_empty()) {
                let mut k = *k;
                k.set(key, v)
                    .map_err(|e| Error::invalid(format!("tune --knobs: {}", e.message())))?;
                if !next.contains(&k) {
                    next.push(k);
                }
            }
        }
        if next.is_empty() {
            return Err(Error::invalid(format!("tune --knobs: no values for {key}")));
        }
        out = next;
    }
    Ok(out)
}

/// `policy` with `knobs` (the name the replay and the table use).
fn with_knobs(policy: &str, knobs: &Knobs) -> String {
    let sfx = knobs.suffix();
    if sfx.is_empty() {
        policy.to_string()
    } else {
        format!("{policy}@{sfx}")
    }
}

/// The sweep's grid on `dep`. Policy names are checked against
/// `policy::by_name`, codecs against the measured table; `knobs` is swept
/// for the `kvpark` policies at points with an NVMe tier.
pub fn grid(
    dep: &Deployment,
    policies: &[String],
    codecs: &[String],
    knobs: &[Knobs],
    host_steps: u32,
    nvme_steps: u32,
) -> Result<Vec<Point>> {
    if policies.is_empty() {
        return Err(Error::invalid("tune: no policies to sweep"));
    }
    if host_steps == 0 {
        return Err(Error::invalid("tune --host-steps: must be ≥ 1"));
    }
    let book = std::sync::Arc::new(crate::policy::OracleBook::default());
    for p in policies {
        crate::policy::by_name(p, crate::policy::PolicyEnv::default(), Some(book.clone()))?;
    }
    let names = || crate::codec::ALL.map(|t| t.name()).join(", ");
    for c in codecs {
        if crate::codec::measured(c).is_none() {
            return Err(Error::invalid(format!(
                "tune --codecs: unknown codec {c:?} ({})",
                names()
            )));
        }
    }
    let codecs: Vec<String> = if codecs.is_empty() {
        // the connector's config names its codec: a file that gives a
        // ratio and speeds instead has none to recommend
        if crate::codec::measured(&dep.codec).is_none() {
            return Err(Error::invalid(format!(
                "tune: the cluster file gives codec_ratio and speeds, not a codec the \
                 connector can run; name the codecs to sweep with --codecs ({})",
                names()
            )));
        }
        vec![dep.codec.clone()]
    } else {
        codecs.to_vec()
    };
    let host = levels(dep.pinnable_host_bytes, host_steps, 2, dep.gpu_count);
    if host.is_empty() {
        return Err(Error::invalid(format!(
            "tune: pinnable_host_bytes {} leaves less than 1 MiB per rank",
            dep.pinnable_host_bytes
        )));
    }
    let mut nvme = vec![0];
    if nvme_steps > 1 {
        nvme.extend(levels(
            dep.nvme_capacity_bytes,
            nvme_steps - 1,
            4,
            dep.gpu_count,
        ));
    }
    let default_knobs = [Knobs::default()];
    let mut pts = Vec::new();
    for p in policies {
        if p.starts_with("kvpark") && p.contains('@') {
            return Err(Error::invalid(format!(
                "tune --policies: {p:?}: give the kvpark knobs to sweep with --knobs"
            )));
        }
        if !connector_runs(p) {
            pts.push(Point {
                policy: p.clone(),
                codec: dep.codec.clone(),
                host_bytes: dep.host_bytes,
                nvme_bytes: dep.nvme_bytes,
                baseline: true,
            });
            continue;
        }
        for c in &codecs {
            for &h in &host {
                for &n in &nvme {
                    // knobs matter where the policy prefetches: from NVMe
                    let ks = if Variant::from_name(p).is_some() && n > 0 && !knobs.is_empty() {
                        knobs
                    } else {
                        &default_knobs[..]
                    };
                    for k in ks {
                        pts.push(Point {
                            policy: with_knobs(p, k),
                            codec: c.clone(),
                            host_bytes: h,
                            nvme_bytes: n,
                            baseline: false,
                        });
                    }
                }
            }
        }
    }
    if pts.len() > MAX_POINTS {
        return Err(Error::invalid(format!(
            "tune: {} points is more than {MAX_POINTS}; fewer steps, codecs or policies",
            pts.len()
        )));
    }
    Ok(pts)
}

/// `dep` with the point's tiers and codec.
pub fn deployment_at(dep: &Deployment, p: &Point) -> Result<Deployment> {
    let mut d = dep.clone();
    d.host_bytes = p.host_bytes;
    d.nvme_bytes = p.nvme_bytes;
    if p.codec != dep.codec {
        let c = crate::codec::deployment_codec(
            Some(&p.codec),
            None,
            [None; 3],
            [dep.nvme_write_bps / 1e9, dep.nvme_read_bps / 1e9],
        )?;
        d.codec = p.codec.clone();
        d.codec_ratio = c.ratio;
        d.encode_bps = c.encode_gbps * 1e9;
        d.decode_bps = c.decode_gbps * 1e9;
    }
    Ok(d)
}

/// Replays every point on up to `threads` threads, adding replayed steps to
/// `cfg.progress` and finished points to `done`; outcomes in point order.
pub fn sweep(
    script: &Script,
    dep: &Deployment,
    points: &[Point],
    cfg: &SimConfig,
    threads: usize,
    done: &AtomicU64,
) -> Result<Vec<Outcome>> {
    let next = AtomicU64::new(0);
    let slots: Vec<parking_lot::Mutex<Option<Result<Outcome>>>> = (0..points.len())
        .map(|_| parking_lot::Mutex::new(None))
        .collect();
    std::thread::scope(|sc| {
        for _ in 0..threads.clamp(1, points.len().max(1)) {
            sc.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                let Some(p) = points.get(i) else { break };
                let r = deployment_at(dep, p).and_then(|d| {
                    let r = run_policy(script, &d, &p.policy, cfg)?;
                    Ok(Outcome {
                        point: p.clone(),
                        usd_per_hour: d.prices.usd_per_hour(
                            d.gpu_count,
                            p.host_bytes,
                            p.nvme_bytes,
                        ),
                        ttft_user_p90: r.ttft_user_s[1],
                        amplification: r.amplification,
                        hit: r.hit.all,
                        nvme_used: r.nvme_write_bytes > 0,
                        nvme_read_bytes: r.nvme_read_bytes,
                    })
                });
                *slots[i].lock() = Some(r);
                done.fetch_add(1, Ordering::Relaxed);
            });
        }
    });
    slots
        .into_iter()
        .map(|s| {
            s.into_inner()
                .unwrap_or_else(|| Err(Error::internal("tune point did not finish")))
        })
        .collect()
}

fn objectives(o: &Outcome) -> [f64; 3] {
    [o.usd_per_hour, o.ttft_user_p90, o.amplification]
}

/// Whether `a` dominates `b`: no worse in cost, TTFT p90 and amplification,
/// better in one.
pub fn dominates(a: &Outcome, b: &Outcome) -> bool {
    let (x, y) = (objectives(a), objectives(b));
    x.iter().zip(&y).all(|(p, q)| p <= q) && x.iter().zip(&y).any(|(p, q)| p < q)
}

/// Indices of the non-dominated outcomes among those the connector can run
/// (baselines excluded), by ascending cost; of several with equal
/// objectives, the one that read the fewest NVMe bytes, then the one with
/// the fewest knobs set.
pub fn pareto(out: &[Outcome]) -> Vec<usize> {
    let cand: Vec<usize> = (0..out.len())
        .filter(|&i| !out[i].point.baseline && objectives(&out[i]).iter().all(|v| v.is_finite()))
        .collect();
    // Of points with equal objectives (knob settings or policies that made
    // no difference) the front keeps one: the fewest NVMe bytes read (a
    // prefetch that bought nothing is wear and bandwidth), then the fewest
    // knobs set, then a policy without gap prediction (the same result with
    // less machinery), then the name.
    let rank = |i: usize| {
        let p = &out[i].point.policy;
        (
            out[i].nvme_read_bytes,
            p.matches(['@', ',']).count(),
            Variant::from_name(p.split('@').next().unwrap_or("")).is_some(),
            p.clone(),
            i,
        )
    };
    let mut front: Vec<usize> = cand
        .iter()
        .copied()
        .filter(|&i| !cand.iter().any(|&j| dominates(&out[j], &out[i])))
        .filter(|&i| {
            !cand.iter().any(|&j| {
                j != i
                    && objectives(&out[j]) == objectives(&out[i])
                    && out[j].point.codec == out[i].point.codec
                    && rank(j) < rank(i)
            })
        })
        .collect();
    front.sort_by(|&a, &b| {
        objectives(&out[a])
            .partial_cmp(&objectives(&out[b]))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    front
}

/// The recommendation: an outcome index and why.
#[derive(Clone, Debug)]
pub struct Recommendation {
    /// Index into the outcomes.
    pub index: usize,
    /// Which rule chose it.
    pub why: String,
}

/// The cheapest Pareto point whose TTFT p90 is at most `target_s`; without a
/// target, at most (1 + `slack`) × the best p90 on the front. When no point
/// meets the target, the point with the best p90 (and says so).
pub fn recommend(
    out: &[Outcome],
    front: &[usize],
    target_s: Option<f64>,
    slack: f64,
) -> Option<Recommendation> {
    let best = front.iter().copied().min_by(|&a, &b| {
        (out[a].ttft_user_p90, out[a].usd_per_hour)
            .partial_cmp(&(out[b].ttft_user_p90, out[b].usd_per_hour))
            .unwrap_or(std::cmp::Ordering::Equal)
    })?;
    let best_p90 = out[best].ttft_user_p90;
    let (limit, rule) = match target_s {
        Some(t) => (t, format!("cheapest point with TTFT p90 ≤ {t} s")),
        None => (
            best_p90 * (1.0 + slack),
            format!(
                "cheapest point with TTFT p90 within {:.0}% of the best ({best_p90:.2} s)",
                slack * 100.0
            ),
        ),
    };
    let pick = front
        .iter()
        .copied()
        .filter(|&i| out[i].ttft_user_p90 <= limit)
        .min_by(|&a, &b| {
            (
                out[a].usd_per_hour,
                out[a].ttft_user_p90,
                out[a].amplification,
                out[a].nvme_read_bytes,
            )
                .partial_cmp(&(
                    out[b].usd_per_hour,
                    out[b].ttft_user_p90,
                    out[b].amplification,
                    out[b].nvme_read_bytes,
                ))
                .unwrap_or(std::cmp::Ordering::Equal)
        });
    Some(match pick {
        Some(i) => Recommendation {
            index: i,
            why: rule,
        },
        None => Recommendation {
            index: best,
            why: format!(
                "no point meets TTFT p90 ≤ {limit} s; the best reached is {best_p90:.2} s"
            ),
        },
    })
}

/// A size as the config takes it: "NGiB" / "NMiB" when whole, else bytes.
pub fn size_string(b: u64) -> Value {
    if b > 0 && b % GIB == 0 {
        json!(format!("{}GiB", b / GIB))
    } else if b > 0 && b % MIB == 0 {
        json!(format!("{}MiB", b / MIB))
    } else {
        json!(b)
    }
}

/// The connector config of an outcome: per-rank `host_bytes` and
/// `nvme_bytes`, `nvme_dir` (`nvme_dir` given, else
/// [`NVME_DIR_PLACEHOLDER`]; null when the point has no NVMe tier or never
/// wrote to it), `policy`, `codec`, and the `kvpark` knobs that differ
/// from the default.
pub fn config_json(dep: &Deployment, o: &Outcome, nvme_dir: Option<&str>) -> Value {
    let ranks = dep.gpu_count.max(1) as u64;
    let mut m = serde_json::Map::new();
    m.insert("host_bytes".into(), size_string(o.point.host_bytes / ranks));
    if o.point.nvme_bytes > 0 && o.nvme_used {
        m.insert(
            "nvme_dir".into(),
            json!(nvme_dir.unwrap_or(NVME_DIR_PLACEHOLDER)),
        );
        m.insert("nvme_bytes".into(), size_string(o.point.nvme_bytes / ranks));
    } else {
        m.insert("nvme_dir".into(), Value::Null);
    }
    let (policy, knobs) = match o.point.policy.split_once('@') {
        Some((base, _)) => {
            let k = crate::policy::kvpark::parse_name(&o.point.policy)
                .and_then(|r| r.ok())
                .map(|(_, k)| k.to_json());
            (base, k)
        }
        None => (o.point.policy.as_str(), None),
    };
    // the connector's kvpark becomes gpu-events by itself with vLLM's events
    let policy = if policy == KVPARK_WITH_EVENTS {
        "kvpark"
    } else {
        policy
    };
    m.insert("policy".into(), json!(policy));
    if let Some(k) = knobs.filter(|k| k.as_object().is_some_and(|m| !m.is_empty())) {
        m.insert("kvpark".into(), k);
    }
    m.insert("codec".into(), json!(o.point.codec));
    Value::Object(m)
}

/// The `vllm serve` line around a connector config (with `kv_events`, the
/// flag that publishes vLLM's KV-cache events, which the recommended policy
/// counts on).
pub fn serve_line(model: &str, extra: &Value, kv_events: bool) -> String {
    let t = json!({
        "kv_connector": "KVParkConnector",
        "kv_connector_module_path": "kvpark.vllm",
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": extra,
    });
    let model = if model.is_empty() { "MODEL" } else { model };
    let events = if kv_events {
        format!(" {KV_EVENTS_FLAG}")
    } else {
        String::new()
    };
    format!("vllm serve {model} --kv-transfer-config '{t}'{events}")
}

fn row(o: &mut String, x: &Outcome, mark: &str) {
    let nvme = if x.point.nvme_bytes == 0 {
        "-".to_string()
    } else {
        fmt_bytes(x.point.nvme_bytes)
    };
    let _ = writeln!(
        o,
        "{mark:1} {:<34} {:<10} {:>11} {:>11} {:>9.4} {:>8.2} {:>6.2}× {:>6.1}% {:>10}",
        x.point.policy,
        x.point.codec,
        fmt_bytes(x.point.host_bytes),
        nvme,
        x.usd_per_hour,
        x.ttft_user_p90,
        x.amplification,
        x.hit * 100.0,
        fmt_bytes(x.nvme_read_bytes)
    );
}

/// The Pareto table (and the baselines), the recommendation marked `>`.
pub fn render(
    dep: &Deployment,
    out: &[Outcome],
    front: &[usize],
    rec: Option<&Recommendation>,
) -> String {
    let mut o = String::new();
    let pr = &dep.prices;
    let _ = writeln!(
        o,
        "cost per hour: {} × {} at {} $/h + DRAM at {} $/GB and NVMe at {} $/GB amortised over {} years{}",
        dep.gpu_count,
        dep.gpu_kind,
        pr.gpu_usd_per_hour,
        pr.dram_usd_per_gb,
        pr.nvme_usd_per_gb,
        pr.amortize_years,
        if pr.given {
            ""
        } else {
            " (default prices: the cluster file gives none)"
        }
    );
    let _ = writeln!(
        o,
        "{} points, {} on the Pareto front (cost, TTFT p90, amplification); sizes per node",
        out.len(),
        front.len()
    );
    let _ = writeln!(
        o,
        "  {:<34} {:<10} {:>11} {:>11} {:>9} {:>8} {:>7} {:>7} {:>10}",
        "policy", "codec", "host", "NVMe", "$/h", "p90 s", "amp", "hit", "NVMe read"
    );
    for &i in front {
        let m = if rec.is_some_and(|r| r.index == i) {
            ">"
        } else {
            ""
        };
        row(&mut o, &out[i], m);
    }
    let base: Vec<&Outcome> = out.iter().filter(|x| x.point.baseline).collect();
    if !base.is_empty() {
        let _ = writeln!(o, "baselines (the connector cannot run them):");
        for x in base {
            row(&mut o, x, "");
        }
    }
    if let Some(r) = rec {
        let _ = writeln!(o, "> recommended: {}", r.why);
    }
    o
}

/// SVG: TTFT p90 against cost, one marker series per policy, the
/// cost–TTFT front as a line, the recommendation marked.
pub fn plot_svg(out: &[Outcome], front: &[usize], rec: Option<&Recommendation>) -> String {
    use super::plot::{line_chart, Series};
    let mut names: Vec<&str> = out.iter().map(|x| x.point.policy.as_str()).collect();
    names.dedup();
    let mut uniq: Vec<&str> = Vec::new();
    for n in names {
        if !uniq.contains(&n) {
            uniq.push(n);
        }
    }
    let sorted = |mut v: Vec<(f64, f64)>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
        v
    };
    let mut series: Vec<Series> = uniq
        .iter()
        .map(|n| Series {
            name: n.to_string(),
            points: sorted(
                out.iter()
                    .filter(|x| x.point.policy == *n)
                    .map(|x| (x.usd_per_hour, x.ttft_user_p90))
                    .collect(),
            ),
            markers: true,
        })
        .collect();
    // the 2-D (cost, p90) staircase of the front
    let mut line: Vec<(f64, f64)> = Vec::new();
    for (c, t) in sorted(
        front
            .iter()
            .map(|&i| (out[i].usd_per_hour, out[i].ttft_user_p90))
            .collect(),
    ) {
        if line.last().map_or(true, |l| t < l.1) {
            line.push((c, t));
        }
    }
    series.push(Series {
        name: "Pareto (cost, p90)".into(),
        points: line,
        markers: false,
    });
    if let Some(r) = rec {
        series.push(Series {
            name: "recommended".into(),
            points: vec![(out[r.index].usd_per_hour, out[r.index].ttft_user_p90)],
            markers: true,
        });
    }
    let ymax = out
        .iter()
        .map(|x| x.ttft_user_p90)
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max);
    line_chart(
        "kvpark tune: TTFT p90 (user-initiated) vs cost",
        "cost of the node ($/h)",
        "TTFT p90 (s)",
        &series,
        false,
        (0.0, (ymax * 1.1).max(1e-3)),
    )
}

fn load(path: &std::path::Path) -> Result<Deployment> {
    use crate::error::ResultExt;
    let text = std::fs::read_to_string(path).ctx(format!("read cluster {}", path.display()))?;
    Deployment::from_json(&text).map_err(|e| e.context(path.display()))
}

/// Runs `kvpark tune`: prints the table, the recommended config and the
/// `vllm serve` line; writes `--json`, `--plot` and `--config-out`.
pub fn run_cli(a: super::cli::TuneArgs) -> Result<()> {
    use crate::error::ResultExt;
    use std::io::IsTerminal;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    let dep = load(&a.cluster)?;
    let mut policies = super::names_or(&a.policies, DEFAULT_POLICIES);
    if a.kv_events {
        // the vLLM to tune for publishes its KV-cache events: its kvpark
        // is the one that hears the GPU's evictions
        for p in &mut policies {
            if p == "kvpark" {
                *p = KVPARK_WITH_EVENTS.into();
            }
        }
    }
    let codecs: Vec<String> = a
        .codecs
        .iter()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    if let Some(t) = a.target_ttft_p90 {
        if !(t.is_finite() && t > 0.0) {
            return Err(Error::invalid(format!(
                "--target-ttft-p90 {t}: must be a positive number of seconds"
            )));
        }
    }
    if !(a.ttft_slack.is_finite() && a.ttft_slack >= 0.0) {
        return Err(Error::invalid(format!(
            "--ttft-slack {}: must be a number ≥ 0",
            a.ttft_slack
        )));
    }
    let tc = a.time_compression.unwrap_or(dep.time_compression);
    if !(tc.is_finite() && tc > 0.0) {
        return Err(Error::invalid(format!(
            "--time-compression {tc}: must be a positive number"
        )));
    }
    let knobs = knob_grid(&a.knobs)?;
    let points = grid(&dep, &policies, &codecs, &knobs, a.host_steps, a.nvme_steps)?;
    let (script, label) = match &a.trace {
        Some(p) => {
            let (s, sum) = Script::from_file(p)?;
            let label = p.display().to_string();
            if sum.long_lines > 0 {
                log::warn!("{}", super::trace::long_lines_warning(&label, &sum));
            }
            if sum.bad_lines > 0 {
                log::warn!(
                    "{label}: {} malformed lines skipped (first: line {})",
                    sum.bad_lines,
                    sum.bad.first().map_or(0, |b| b.line)
                );
            }
            (s, label)
        }
        None => {
            let n = a.sessions.unwrap_or(super::DEFAULT_SESSIONS);
            let seed = a.seed.unwrap_or(super::DEFAULT_SEED);
            let (data, _) = super::synth::generate(&super::synth::SynthConfig::new(n, seed));
            (
                Script::from_bytes(&data)?.0,
                format!("embedded synthetic trace ({n} sessions, seed {seed})"),
            )
        }
    };
    let threads = a
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if threads == 0 {
        return Err(Error::invalid("--threads: must be ≥ 1"));
    }
    let steps = Arc::new(AtomicU64::new(0));
    let show = a.progress || std::io::stderr().is_terminal();
    let cfg = SimConfig {
        time_compression: tc,
        progress: show.then(|| steps.clone()),
        check_invariants: false,
        record_links: false,
        blocks: false,
    };
    let n_points = points.len();
    let finished = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let t0 = std::time::Instant::now();
    let out = std::thread::scope(|sc| {
        if show {
            let (steps, finished, stop) = (&steps, &finished, &stop);
            sc.spawn(move || loop {
                let end = stop.load(Ordering::Relaxed);
                // points finished; steps replayed (steps over the context
                // are not replayed, so the step count ends below the total)
                let f = finished.load(Ordering::Relaxed);
                let frac = (f as f64 / n_points.max(1) as f64).min(1.0);
                let bar = ((frac * 30.0) as usize).min(30);
                eprint!(
                    "\rtune [{}{}] {f} / {n_points} points  {} steps replayed  {:.1} s",
                    "#".repeat(bar),
                    " ".repeat(30 - bar),
                    steps.load(Ordering::Relaxed),
                    t0.elapsed().as_secs_f64()
                );
                if end {
                    eprintln!();
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(200));
            });
        }
        let r = sweep(&script, &dep, &points, &cfg, threads, &finished);
        stop.store(true, Ordering::Relaxed);
        r
    })?;
    let front = pareto(&out);
    let rec = recommend(&out, &front, a.target_ttft_p90, a.ttft_slack);
    println!(
        "kvpark tune — {}: {label}, {} sessions, {} steps, time compression {tc}×, {n_points} points in {:.1} s on {threads} threads",
        dep.name,
        script.sessions.len(),
        script.steps.len(),
        t0.elapsed().as_secs_f64()
    );
    print!("{}", render(&dep, &out, &front, rec.as_ref()));
    let cfg_json = match &rec {
        Some(r) => {
            let j = config_json(&dep, &out[r.index], a.nvme_dir.as_deref());
            // what is printed is what the connector accepts
            crate::config::Config::from_json(j.to_string().as_bytes())
                .map_err(|e| e.context("recommended kv_connector_extra_config"))?;
            println!("\nkv_connector_extra_config:\n{j}");
            if a.nvme_dir.is_none() && j["nvme_dir"].is_string() {
                println!("(set nvme_dir to a directory on the NVMe drives, or pass --nvme-dir)");
            }
            let events = out[r.index].point.policy.starts_with(KVPARK_WITH_EVENTS);
            println!(
                "\n{}",
                serve_line(
                    dep.model.split_whitespace().next().unwrap_or(""),
                    &j,
                    events
                )
            );
            Some(j)
        }
        None => {
            println!("\nno point the connector can run: nothing to recommend");
            None
        }
    };
    if let (Some(p), Some(j)) = (&a.config_out, &cfg_json) {
        std::fs::write(p, format!("{j}\n")).ctx(format!("write {}", p.display()))?;
    }
    if let Some(p) = &a.plot {
        std::fs::write(p, plot_svg(&out, &front, rec.as_ref()))
            .ctx(format!("write {}", p.display()))?;
    }
    if let Some(p) = &a.json {
        let pts: Vec<Value> = out
            .iter()
            .enumerate()
            .map(|(i, x)| {
                json!({
                    "policy": x.point.policy,
                    "codec": x.point.codec,
                    "host_bytes": x.point.host_bytes,
                    "nvme_bytes": x.point.nvme_bytes,
                    "baseline": x.point.baseline,
                    "usd_per_hour": x.usd_per_hour,
                    "ttft_user_p90_s": x.ttft_user_p90,
                    "amplification": x.amplification,
                    "hit": x.hit,
                    "nvme_used": x.nvme_used,
                    "nvme_read_bytes": x.nvme_read_bytes,
                    "pareto": front.contains(&i),
                })
            })
            .collect();
        let v = json!({
            "cluster": dep.name,
            "trace": label,
            "time_compression": tc,
            "prices": dep.prices,
            "points": pts,
            "recommended": rec.as_ref().map(|r| r.index),
            "why": rec.as_ref().map(|r| r.why.clone()),
            "kv_connector_extra_config": cfg_json,
        });
        std::fs::write(
            p,
            serde_json::to_vec_pretty(&v).map_err(|e| Error::internal(e.to_string()))?,
        )
        .ctx(format!("write {}", p.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(policy: &str, cost: f64, p90: f64, amp: f64) -> Outcome {
        Outcome {
            point: Point {
                policy: policy.into(),
                codec: "exp-huff".into(),
                host_bytes: 1 << 30,
                nvme_bytes: 0,
                baseline: !connector_runs(policy),
            },
            usd_per_hour: cost,
            ttft_user_p90: p90,
            amplification: amp,
            hit: 0.5,
            nvme_used: false,
            nvme_read_bytes: 0,
        }
    }

    #[test]
    fn levels_are_whole_per_rank_and_ascending() {
        let v = levels(768 * GIB, 5, 2, 1);
        assert_eq!(v, vec![48 * GIB, 96 * GIB, 192 * GIB, 384 * GIB, 768 * GIB]);
        // 8 ranks: each level divides into whole GiB per rank
        for x in levels(1536 * GIB + 5, 6, 2, 8) {
            assert_eq!(x % (8 * GIB), 0, "{x}");
        }
        // below a GiB per rank: whole MiB, never zero, no repeats
        let v = levels(3 * GIB, 8, 4, 1);
        assert!(v.iter().all(|x| *x > 0 && x % MIB == 0));
        assert!(v.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn pareto_front_is_exactly_the_non_dominated_set() {
        let xs = vec![
            out("lmcache-lru", 1.0, 2.0, 1.5),
            out("lmcache-lru", 2.0, 1.0, 1.5),
            out("lmcache-lru", 2.0, 2.0, 1.5), // dominated by both above
            out("vllm-offload", 0.5, 3.0, 1.2),
            out("vllm-offload", 3.0, 1.0, 1.5), // dominated by #1
            out("gpu-lru", 0.1, 0.1, 1.0),      // baseline: never on the front
            out("kvpark@margin=4", 0.5, 1.0, 1.0),
            out("kvpark", 0.5, 1.0, 1.0), // the same: kept instead of the line above
            {
                // the same again, but it read more NVMe: left out
                let mut o = out("lmcache-lru", 0.5, 1.0, 1.0);
                o.nvme_read_bytes = 1;
                o
            },
        ];
        let f = pareto(&xs);
        for &i in &f {
            assert!(!xs[i].point.baseline);
            for (j, y) in xs.iter().enumerate() {
                assert!(
                    y.point.baseline || !dominates(y, &xs[i]),
                    "{j} dominates {i}"
                );
            }
        }
        for (j, y) in xs.iter().enumerate() {
            if !f.contains(&j) && !y.point.baseline && j != 6 && j != 8 {
                assert!(f.iter().any(|&i| dominates(&xs[i], y)), "{j} left out");
            }
        }
        assert!(
            f.contains(&7) && !f.contains(&6) && !f.contains(&8),
            "{f:?}"
        );
        assert!(f
            .windows(2)
            .all(|w| xs[w[0]].usd_per_hour <= xs[w[1]].usd_per_hour));
    }

    #[test]
    fn recommendation_is_the_cheapest_point_meeting_the_target() {
        let xs = vec![
            out("lmcache-lru", 1.0, 2.0, 1.5),
            out("lmcache-lru", 2.0, 1.02, 1.4),
            out("lmcache-lru", 4.0, 1.0, 1.3),
        ];
        let f = pareto(&xs);
        let r = recommend(&xs, &f, Some(1.5), 0.05).unwrap();
        assert_eq!(r.index, 1);
        let r = recommend(&xs, &f, Some(5.0), 0.05).unwrap();
        assert_eq!(r.index, 0);
        // default: within 5% of the best p90 (1.0) → 1.02 at 2 $/h
        let r = recommend(&xs, &f, None, 0.05).unwrap();
        assert_eq!(r.index, 1);
        // unreachable target: the best p90, and it says so
        let r = recommend(&xs, &f, Some(0.5), 0.05).unwrap();
        assert_eq!(r.index, 2);
        assert!(r.why.contains("no point"), "{}", r.why);
    }

    #[test]
    fn config_of_a_point_is_per_rank_and_validates() {
        let dep = Deployment::from_json(
            &crate::sim::deploy::DEFAULT_JSON.replace("\"gpu_count\": 1,", "\"gpu_count\": 4,"),
        )
        .unwrap();
        let mut o = out("lmcache-lru", 1.0, 1.0, 1.0);
        o.point.host_bytes = 64 * GIB;
        o.point.nvme_bytes = 512 * GIB;
        o.nvme_used = true;
        let j = config_json(&dep, &o, None);
        let c = crate::config::Config::from_json(j.to_string().as_bytes()).unwrap();
        assert_eq!(c.host_bytes, 16 * GIB);
        assert_eq!(c.nvme_bytes, 128 * GIB);
        assert_eq!(c.policy, "lmcache-lru");
        assert_eq!(
            c.nvme_dir.as_deref(),
            Some(std::path::Path::new(NVME_DIR_PLACEHOLDER))
        );
        // no NVMe written: no NVMe tier
        o.nvme_used = false;
        let c =
            crate::config::Config::from_json(config_json(&dep, &o, None).to_string().as_bytes())
                .unwrap();
        assert_eq!(c.nvme_dir, None);
    }

    #[test]
    fn a_point_sets_the_tiers_and_the_codec_of_the_replay() {
        let dep = Deployment::from_json(CLUSTERS[0].1).unwrap();
        let pts = grid(
            &dep,
            &["lmcache-lru".into()],
            &["none".into(), "lz4".into()],
            &knob_grid(DEFAULT_KNOBS).unwrap(),
            2,
            2,
        )
        .unwrap();
        // 2 codecs × 2 host sizes × (no NVMe, the drives' capacity)
        assert_eq!(pts.len(), 8);
        for p in &pts {
            let d = deployment_at(&dep, p).unwrap();
            assert_eq!((d.host_bytes, d.nvme_bytes), (p.host_bytes, p.nvme_bytes));
            let m = crate::codec::measured(&p.codec).unwrap();
            assert_eq!(d.codec, p.codec);
            assert_eq!(d.codec_ratio, m.ratio);
            assert!(p.host_bytes <= dep.pinnable_host_bytes);
            assert!(p.nvme_bytes <= dep.nvme_capacity_bytes);
        }
        assert!(pts
            .iter()
            .any(|p| p.nvme_bytes == dep.nvme_capacity_bytes / GIB * GIB));
        assert!(pts.iter().any(|p| p.host_bytes == dep.pinnable_host_bytes));
    }

    #[test]
    fn a_file_without_a_codec_name_needs_codecs() {
        let j = crate::sim::deploy::DEFAULT_JSON.replace(
            "\"codec\": \"exp-huff\",",
            "\"codec_ratio\": 1.3, \"codec_encode_gbps\": 4, \"codec_decode_gbps\": 8,",
        );
        let dep = Deployment::from_json(&j).unwrap();
        let pol = ["lmcache-lru".to_string()];
        let e = grid(&dep, &pol, &[], &[], 2, 2).unwrap_err();
        assert!(e.message().contains("--codecs"), "{}", e.message());
        // every codec the sweep accepts is one the connector's config accepts
        for t in crate::codec::ALL {
            let pts = grid(&dep, &pol, &[t.name().to_string()], &[], 1, 1).unwrap();
            let o = Outcome {
                point: pts[0].clone(),
                usd_per_hour: 0.0,
                ttft_user_p90: 1.0,
                amplification: 1.0,
                hit: 1.0,
                nvme_used: false,
                nvme_read_bytes: 0,
            };
            let c = crate::config::Config::from_json(
                config_json(&dep, &o, None).to_string().as_bytes(),
            )
            .unwrap();
            assert_eq!(c.codec, t);
        }
    }

    #[test]
    fn kvpark_knobs_are_swept_where_it_prefetches_and_land_in_the_config() {
        let ks = knob_grid(DEFAULT_KNOBS).unwrap();
        assert_eq!(ks.len(), 9);
        assert!(ks.contains(&Knobs::default()));
        let dep = Deployment::from_json(CLUSTERS[0].1).unwrap();
        let pts = grid(&dep, &["kvpark".into()], &[], &ks, 2, 2).unwrap();
        // 2 host sizes × (no NVMe: the default knobs; NVMe: 9 settings)
        assert_eq!(pts.len(), 2 * (1 + 9));
        for p in &pts {
            assert!(p.nvme_bytes > 0 || p.policy == "kvpark", "{p:?}");
            crate::policy::by_name(&p.policy, crate::policy::PolicyEnv::default(), None).unwrap();
            let mut o = out(&p.policy, 1.0, 1.0, 1.0);
            o.point = p.clone();
            o.nvme_used = p.nvme_bytes > 0;
            let j = config_json(&dep, &o, Some("/nvme"));
            let c = crate::config::Config::from_json(j.to_string().as_bytes()).unwrap();
            assert_eq!(c.policy, "kvpark");
            // the config's knobs name the point's policy back
            assert_eq!(with_knobs("kvpark", &c.kvpark), p.policy);
        }
        for bad in [
            "margin",
            "margin=0.1",
            "speed=1",
            "margin=2;margin=3",
            "every=",
        ] {
            assert!(knob_grid(bad).is_err(), "{bad}");
        }
        assert_eq!(knob_grid("").unwrap(), vec![Knobs::default()]);
        let e = grid(&dep, &["kvpark@margin=3".into()], &[], &ks, 1, 1).unwrap_err();
        assert!(e.message().contains("--knobs"), "{}", e.message());
    }

    #[test]
    fn kvpark_with_kv_events_is_swept_and_recommended_as_kvpark_with_the_events_on() {
        let ks = knob_grid(DEFAULT_KNOBS).unwrap();
        let dep = Deployment::from_json(CLUSTERS[0].1).unwrap();
        let pts = grid(&dep, &[KVPARK_WITH_EVENTS.into()], &[], &ks, 2, 2).unwrap();
        assert_eq!(pts.len(), 2 * (1 + 9));
        for p in &pts {
            assert!(!p.baseline, "{p:?}");
            assert!(p.policy.starts_with(KVPARK_WITH_EVENTS), "{p:?}");
            let mut o = out(&p.policy, 1.0, 1.0, 1.0);
            o.point = p.clone();
            o.nvme_used = p.nvme_bytes > 0;
            let j = config_json(&dep, &o, Some("/nvme"));
            let c = crate::config::Config::from_json(j.to_string().as_bytes()).unwrap();
            // the connector's kvpark, which turns into gpu-events with the events
            assert_eq!(c.policy, "kvpark");
            assert_eq!(with_knobs(KVPARK_WITH_EVENTS, &c.kvpark), p.policy);
        }
        let j = json!({"policy": "kvpark"});
        assert!(serve_line("m", &j, true).ends_with(KV_EVENTS_FLAG));
        assert!(!serve_line("m", &j, false).contains("kv-events"));
        // the flag parses as vLLM's KVEventsConfig JSON
        let flag = KV_EVENTS_FLAG.split('\'').nth(1).unwrap();
        let v: Value = serde_json::from_str(flag).unwrap();
        assert_eq!(v["publisher"], "zmq");
        assert_eq!(v["enable_kv_cache_events"], true);
    }

    #[test]
    fn default_policies_are_connector_policies() {
        for p in DEFAULT_POLICIES {
            assert!(CONNECTOR_POLICIES.contains(p), "{p}");
        }
    }
}
