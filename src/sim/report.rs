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
        "deployment: {} — GPU KV {}, host {}, NVMe {}, {} KiB/token",
        dep.name,
        fmt_bytes(dep.gpu_kv_bytes),
        fmt_bytes(dep.host_bytes),
        fmt_bytes(dep.nvme_bytes),
        dep.kv_bytes_per_token / 1024
    );
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "{:<18} {:>7} {:>7} {:>7} | {:>6} {:>6} {:>6} | {:>6} | {:>8} {:>8} {:>8}",
        "policy", "hit", "user", "tool", "GPU", "host", "NVMe", "amp", "TTFT p50", "p90", "p99"
    );
    for r in results {
        let _ = writeln!(
            o,
            "{:<18} {:>6.1}% {:>6.1}% {:>6.1}% | {:>5.1}% {:>5.1}% {:>5.1}% | {:>5.2}× | {:>7}s {:>7}s {:>7}s",
            format!("{}{}", r.policy, if r.idealised { "*" } else { "" }),
            100.0 * r.hit.all,
            100.0 * r.hit.user,
            100.0 * r.hit.tool,
            100.0 * r.hit_from[0],
            100.0 * r.hit_from[1],
            100.0 * r.hit_from[2],
            r.amplification,
            secs(r.ttft_user_s[0]),
            secs(r.ttft_user_s[1]),
            secs(r.ttft_user_s[2]),
        );
    }
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "{:<18} {:>8} {:>8} {:>8} {:>8} {:>9} | {:>8} {:>8} {:>8} | {:>8} {:>8} | {:>15}",
        "policy",
        "PCIe d2h",
        "h2d",
        "NVMe wr",
        "rd",
        "NVMe wr/d",
        "peak GPU",
        "host",
        "NVMe",
        "mean hst",
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
                "{:<18} (idealised: no links, no capacity limit; mean kept {})",
                format!("{}*", r.policy),
                gb(r.occupancy[1].mean)
            );
            continue;
        }
        let _ = writeln!(
            o,
            "{:<18} {:>8} {:>8} {:>8} {:>8} {:>9} | {:>8} {:>8} {:>8} | {:>8} {:>8} | {:>15}",
            r.policy.clone(),
            gb(r.pcie_d2h_bytes as f64),
            gb(r.pcie_h2d_bytes as f64),
            gb(r.nvme_write_bytes as f64),
            gb(r.nvme_read_bytes as f64),
            gb(r.nvme_write_per_day),
            gb(r.occupancy[0].peak as f64),
            gb(r.occupancy[1].peak as f64),
            gb(r.occupancy[2].peak as f64),
            gb(r.occupancy[1].mean),
            gb(r.occupancy[2].mean),
            pf
        );
    }
    if let Some(r) = results
        .iter()
        .find(|r| !r.idealised && r.gpu_oversubscribed_s > 0.0)
    {
        let _ = writeln!(
            o,
            "\nnote: the running steps alone exceeded the GPU KV capacity {:.2}% of the time (peak GPU above); \
             a real server would queue them — lower --time-compression or raise gpu_kv_bytes.",
            100.0 * r.gpu_oversubscribed_s / r.virtual_s.max(1e-9)
        );
    }
    if results.iter().any(|r| r.idealised) {
        let _ = writeln!(
            o,
            "\n* idealised (DESIGN §6): no GPU cache, unlimited capacity, instant copies — for calibration, not a deployment."
        );
    }
    let _ = writeln!(
        o,
        "hit = token-weighted over counted steps; GPU/host/NVMe = share of all counted tokens served from each; \
         TTFT = modelled load + prefill of user-initiated steps; bytes in GB (10^9), NVMe bytes stored (compressed)."
    );
    o
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
