//! The replay report: a comparison table (one row per policy), JSON.

use std::fmt::Write;

use super::deploy::Deployment;
use super::engine::PolicyResult;
use super::stats::TtlPoint;
use crate::units::fmt_bytes;

fn gb(b: f64) -> String {
    if b >= 1e12 {
        format!("{:.2}T", b / 1e12)
    } else {
        format!("{:.1}G", b / 1e9)
    }
}

fn secs(s: f64) -> String {
    if s >= 100.0 {
        format!("{s:.0}")
    } else if s >= 10.0 {
        format!("{s:.1}")
    } else {
        format!("{s:.2}")
    }
}

/// Renders the comparison tables.
pub fn render(results: &[PolicyResult], dep: &Deployment, header: &str) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "{header}");
    let _ = writeln!(
        o,
        "deployment: {} — GPU KV {}, host {}, NVMe {}, {} KiB/token, context {} tokens, codec {}",
        dep.name,
        fmt_bytes(dep.gpu_kv_bytes),
        fmt_bytes(dep.host_bytes),
        fmt_bytes(dep.nvme_bytes),
        dep.kv_bytes_per_token / 1024,
        dep.max_context_tokens,
        dep.codec
    );
    if let Some(r) = results.iter().find(|r| !r.idealised) {
        let _ = writeln!(
            o,
            "load: parked KV (suspended sessions that return) peaks at {} = {:.1}× host, mean {}; \
             {} steps over the {}-token context not replayed",
            gb(r.parked.peak as f64),
            r.parked.peak as f64 / dep.host_bytes.max(1) as f64,
            gb(r.parked.mean),
            r.over_context,
            dep.max_context_tokens
        );
    }
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "{:<18} {:>6} {:>6} {:>6} | {:>5} {:>5} {:>5} | {:>6} | {:>22} | {:>22}",
        "policy",
        "hit",
        "user",
        "tool",
        "GPU",
        "host",
        "NVMe",
        "amp",
        "TTFT user p50/p90/p99",
        "TTFT tool p50/p90/p99"
    );
    for r in results {
        let _ = writeln!(
            o,
            "{:<18} {:>5.1}% {:>5.1}% {:>5.1}% | {:>4.1}% {:>4.1}% {:>4.1}% | {:>5.2}× | {:>22} | {:>22}",
            format!("{}{}", r.policy, if r.idealised { "*" } else { "" }),
            100.0 * r.hit.all,
            100.0 * r.hit.user,
            100.0 * r.hit.tool,
            100.0 * r.hit_from[0],
            100.0 * r.hit_from[1],
            100.0 * r.hit_from[2],
            r.amplification,
            three(&r.ttft_user_s),
            three(&r.ttft_tool_s),
        );
    }
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "{:<18} {:>20} {:>9} | {:>7} {:>7} {:>7} {:>7} {:>8} | {:>7} {:>7} {:>7} | {:>14}",
        "policy",
        "queue p50/p90/p99",
        "GPU busy",
        "PCIe→h",
        "→GPU",
        "NVMe wr",
        "rd",
        "wr/day",
        "pk GPU",
        "host",
        "NVMe",
        "prefetch e/l/w"
    );
    for r in results {
        let pf = if r.prefetch.issued > 0 {
            format!(
                "{}/{}/{}",
                r.prefetch.early, r.prefetch.late, r.prefetch.wasted
            )
        } else {
            "-".into()
        };
        if r.idealised {
            let _ = writeln!(
                o,
                "{:<18} (idealised: no GPU cache, no links, no capacity limit; mean kept {})",
                format!("{}*", r.policy),
                gb(r.occupancy[1].mean)
            );
            continue;
        }
        let _ = writeln!(
            o,
            "{:<18} {:>20} {:>4.0}%/{:>2.0}% | {:>7} {:>7} {:>7} {:>7} {:>8} | {:>7} {:>7} {:>7} | {:>14}",
            r.policy.clone(),
            three(&r.queue_s),
            100.0 * r.gpu_busy,
            100.0 * r.gpu_prefill_busy,
            gb(r.pcie_d2h_bytes as f64),
            gb(r.pcie_h2d_bytes as f64),
            gb(r.nvme_write_bytes as f64),
            gb(r.nvme_read_bytes as f64),
            gb(r.nvme_write_per_day),
            gb(r.occupancy[0].peak as f64),
            gb(r.occupancy[1].peak as f64),
            gb(r.occupancy[2].peak as f64),
            pf
        );
    }
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "{:<18} {:>16} | {:>24} {:>18}",
        "policy", "recompute tokens", "NVMe returns promoted", "promotions wasted"
    );
    for r in results {
        let (cov, waste) = if r.prefetch.issued > 0 || r.prefetch.missed > 0 {
            (
                format!(
                    "{:.1}% of {}",
                    100.0 * r.prefetch.coverage(),
                    r.prefetch.early + r.prefetch.late + r.prefetch.missed
                ),
                if r.prefetch.issued > 0 {
                    format!("{:.1}%", 100.0 * r.prefetch.waste())
                } else {
                    "-".into()
                },
            )
        } else {
            ("-".into(), "-".into())
        };
        let _ = writeln!(
            o,
            "{:<18} {:>16} | {:>24} {:>18}",
            format!("{}{}", r.policy, if r.idealised { "*" } else { "" }),
            r.recompute_tokens,
            cov,
            waste
        );
    }
    if results.iter().any(|r| r.idealised) {
        let _ = writeln!(
            o,
            "\n* idealised (DESIGN §6): no GPU cache, no context window, unlimited capacity, instant copies — for calibration, not a deployment."
        );
    }
    let _ = writeln!(
        o,
        "hit = token-weighted over counted steps; GPU/host/NVMe = share of all counted tokens served from each; \
         TTFT = arrival → end of prefill (queueing + load + shared prefill), seconds; queue = arrival → admission (GPU KV full); \
         GPU busy = any compute / prefill; bytes in GB (10^9), NVMe bytes stored (compressed); prefetch early/late/wasted; \
         recompute = tokens prefilled over every replayed step; NVMe returns promoted = prefetches landed before the step / \
         (those + late + loads from NVMe without one)."
    );
    o
}

fn three(p: &[f64; 4]) -> String {
    format!("{}/{}/{}", secs(p[0]), secs(p[1]), secs(p[2]))
}

/// The JSON document of a replay.
pub fn to_json(
    results: &[PolicyResult],
    dep: &Deployment,
    trace: &str,
    time_compression: f64,
    sweep: &[TtlPoint],
) -> serde_json::Value {
    serde_json::json!({
        "trace": trace,
        "time_compression": time_compression,
        "deployment": dep,
        "policies": results,
        "ttl_sweep": sweep,
    })
}
