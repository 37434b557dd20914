//! The modelled deployment: one serving node's GPU KV capacity and compute,
//! kvpark's host and NVMe tiers, link bandwidths, codec, the model's context
//! window, and the load to replay at. Read from JSON (`--deployment FILE`);
//! the shipped deployments live in `deployments/` (documented in
//! `deployments/README.md`) and are embedded ([`SHIPPED`]); the first,
//! [`DEFAULT_JSON`], is what `kvpark replay` uses without `--deployment`.
//!
//! Sizes accept units ("56GiB") or plain byte counts; bandwidths are in
//! GB/s (10^9 bytes per second). A node with several GPUs (tensor
//! parallel) is modelled as one GPU with the sums of their KV capacity, HBM
//! and PCIe bandwidth (each rank holds its share of every block).
//!
//! The codec is named (`"codec": "exp-huff"`) and its ratio and per-core
//! speeds come from [`crate::codec::measured`] (real KV, `kvpark bench`),
//! times `codec_threads` (default: as many as keep up with the disk).
//!
//! Unknown keys are an error naming the key, and so is a value out of
//! range: `kv_bytes_per_token` in 1..=1 GiB ([`MAX_KV_BYTES_PER_TOKEN`]),
//! `gpu_kv_bytes` at least one full context's KV, bandwidths and speeds
//! positive and finite, `block_size` in 1..=4096, an unknown codec.

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::units::parse_size;

/// The shipped deployments: (file name, JSON), the default first.
pub const SHIPPED: [(&str, &str); 3] = [
    (
        "h100-llama-3.1-8b.json",
        include_str!("../../deployments/h100-llama-3.1-8b.json"),
    ),
    (
        "8xh200-llama-3.3-70b-tp8.json",
        include_str!("../../deployments/8xh200-llama-3.3-70b-tp8.json"),
    ),
    (
        "h200-qwen2.5-7b-1m.json",
        include_str!("../../deployments/h200-qwen2.5-7b-1m.json"),
    ),
];

/// The default deployment (`deployments/h100-llama-3.1-8b.json`): Llama-3.1-8B
/// (bf16, 128 KiB of KV per token, 128k context) on one 80 GB H100 — 56 GiB
/// left for KV after weights and activations — with 64 GiB of pinned host
/// memory and 2 TiB of NVMe, the default codec, at a load where host memory
/// binds.
pub const DEFAULT_JSON: &str = SHIPPED[0].1;

/// Largest `kv_bytes_per_token` accepted (1 GiB). With a step's context
/// capped at `u32::MAX` tokens, a session's KV then stays below 2^62 bytes,
/// so sizes derived from it ([`Deployment::kv_bytes`]) never overflow.
pub const MAX_KV_BYTES_PER_TOKEN: u64 = 1 << 30;

#[derive(Deserialize)]
#[serde(untagged)]
enum Size {
    N(u64),
    S(String),
}

impl Size {
    fn bytes(&self, key: &str) -> Result<u64> {
        match self {
            Size::N(n) => Ok(*n),
            Size::S(s) => parse_size(s)
                .map_err(|e| Error::config(format!("deployment {key}: {}", e.message()))),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    gpu_kind: Option<String>,
    #[serde(default)]
    gpu_count: Option<u32>,
    kv_bytes_per_token: u64,
    max_context_tokens: u64,
    #[serde(default = "default_block_size")]
    block_size: u32,
    gpu_kv_bytes: Size,
    #[serde(default)]
    host_bytes: Option<Size>,
    #[serde(default)]
    pinnable_host_bytes: Option<Size>,
    #[serde(default)]
    nvme_bytes: Option<Size>,
    #[serde(default)]
    drives: Option<Vec<RawDrive>>,
    pcie_h2d_gbps: f64,
    pcie_d2h_gbps: f64,
    #[serde(default)]
    nvme_read_gbps: Option<f64>,
    #[serde(default)]
    nvme_write_gbps: Option<f64>,
    #[serde(default)]
    codec: Option<String>,
    #[serde(default)]
    codec_threads: Option<u32>,
    #[serde(default)]
    codec_ratio: Option<f64>,
    #[serde(default)]
    codec_encode_gbps: Option<f64>,
    #[serde(default)]
    codec_decode_gbps: Option<f64>,
    #[serde(default)]
    prefill_tokens_per_s: Option<f64>,
    #[serde(default)]
    prefill_halving_context_tokens: Option<f64>,
    #[serde(default)]
    prefill_tokens_per_s_by_context: Option<Vec<[f64; 2]>>,
    decode_step_ms: f64,
    hbm_gbps: f64,
    #[serde(default = "default_tc")]
    time_compression: f64,
    #[serde(default)]
    prices: Option<RawPrices>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDrive {
    #[serde(default)]
    name: Option<String>,
    capacity: Size,
    read_gbps: f64,
    write_gbps: f64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrices {
    #[serde(default)]
    dram_usd_per_gb: Option<f64>,
    #[serde(default)]
    nvme_usd_per_gb: Option<f64>,
    #[serde(default)]
    gpu_usd_per_hour: Option<f64>,
    #[serde(default)]
    amortize_years: Option<f64>,
}

/// One NVMe drive of the node.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Drive {
    /// Free-form label.
    pub name: String,
    /// Capacity in bytes.
    pub capacity: u64,
    /// Read bytes/s.
    pub read_bps: f64,
    /// Write bytes/s.
    pub write_bps: f64,
}

/// Prices of the cost model (`kvpark tune`): DRAM and NVMe are bought
/// ($ per GB, 10^9 bytes) and amortised over `amortize_years`; GPUs are
/// rented ($ per GPU-hour). A node's cost per hour is
/// `gpu_count × gpu_usd_per_hour + (host GB × dram_usd_per_gb + NVMe GB ×
/// nvme_usd_per_gb) / (amortize_years × 8766 h)`.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Prices {
    /// $ per GB of DRAM (purchase).
    pub dram_usd_per_gb: f64,
    /// $ per GB of NVMe (purchase).
    pub nvme_usd_per_gb: f64,
    /// $ per GPU-hour.
    pub gpu_usd_per_hour: f64,
    /// Years over which DRAM and NVMe are amortised.
    pub amortize_years: f64,
    /// Whether the file gave any price (else these are the defaults).
    pub given: bool,
}

/// Hours in a year (365.25 days).
pub const HOURS_PER_YEAR: f64 = 8766.0;

impl Default for Prices {
    /// The defaults when a file gives no prices: DRAM 3 $/GB (server DDR5),
    /// NVMe 0.10 $/GB (enterprise TLC), GPU 0 $/h (constant across a sweep
    /// anyway), over 3 years.
    fn default() -> Self {
        Prices {
            dram_usd_per_gb: 3.0,
            nvme_usd_per_gb: 0.10,
            gpu_usd_per_hour: 0.0,
            amortize_years: 3.0,
            given: false,
        }
    }
}

impl Prices {
    /// $ per hour of a node with `gpus` GPUs, `host` bytes of DRAM and `nvme`
    /// bytes of NVMe given to kvpark.
    pub fn usd_per_hour(&self, gpus: u32, host: u64, nvme: u64) -> f64 {
        let hours = self.amortize_years * HOURS_PER_YEAR;
        gpus as f64 * self.gpu_usd_per_hour
            + (host as f64 / 1e9 * self.dram_usd_per_gb + nvme as f64 / 1e9 * self.nvme_usd_per_gb)
                / hours
    }
}

/// Largest price accepted ($ per GB, $ per GPU-hour): costs stay finite.
pub const MAX_PRICE: f64 = 1e6;

/// Largest `gpu_count` accepted.
pub const MAX_GPU_COUNT: u32 = 1024;

fn positive(key: &str, v: f64) -> Result<f64> {
    if v.is_finite() && v > 0.0 {
        Ok(v)
    } else {
        Err(Error::config(format!(
            "deployment {key}: must be a positive number, got {v}"
        )))
    }
}

/// Fits `tps(c) = tps0 / (1 + c / halving)` to measured (context, tokens/s)
/// points: 1/tps is linear in c (least squares).
fn fit_prefill(points: &[[f64; 2]]) -> Result<(f64, f64)> {
    const K: &str = "deployment prefill_tokens_per_s_by_context";
    if points.len() < 2 {
        return Err(Error::config(format!(
            "{K}: give at least two [context_tokens, tokens_per_s] points"
        )));
    }
    for [c, t] in points {
        if !(c.is_finite() && *c >= 0.0 && t.is_finite() && *t > 0.0) {
            return Err(Error::config(format!(
                "{K}: [{c}, {t}] is not a [context ≥ 0, tokens/s > 0] pair"
            )));
        }
    }
    let n = points.len() as f64;
    let mx = points.iter().map(|p| p[0]).sum::<f64>() / n;
    let my = points.iter().map(|p| 1.0 / p[1]).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p[0] - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p[0] - mx) * (1.0 / p[1] - my)).sum();
    if sxx <= 0.0 {
        return Err(Error::config(format!(
            "{K}: the points need at least two different contexts"
        )));
    }
    let b = sxy / sxx;
    let a = my - b * mx;
    if !(a > 0.0 && b > 0.0 && (a / b).is_finite()) {
        return Err(Error::config(format!(
            "{K}: prefill speed must fall as the context grows (fit: 1/tps = {a:e} + {b:e} × c)"
        )));
    }
    Ok((1.0 / a, a / b))
}

fn default_block_size() -> u32 {
    16
}
fn default_tc() -> f64 {
    1.0
}

/// A validated deployment (bandwidths in bytes per second).
#[derive(Clone, Debug, serde::Serialize)]
pub struct Deployment {
    /// Free-form name.
    pub name: String,
    /// The model (free-form).
    pub model: String,
    /// The GPU kind (free-form, e.g. "H100-80GB"; "cpu" for vLLM's CPU backend).
    pub gpu_kind: String,
    /// GPUs of the node (tensor-parallel ranks): the connector's sizes are
    /// per rank, the deployment's per node.
    pub gpu_count: u32,
    /// Model KV bytes per token.
    pub kv_bytes_per_token: u64,
    /// The model's context window (tokens): longer steps are not replayed.
    pub max_context_tokens: u64,
    /// vLLM block size (tokens): GPU KV is allocated in whole blocks.
    pub block_size: u32,
    /// GPU KV capacity (vLLM's paged cache).
    pub gpu_kv_bytes: u64,
    /// kvpark host tier capacity.
    pub host_bytes: u64,
    /// kvpark NVMe tier capacity (stored, i.e. compressed, bytes).
    pub nvme_bytes: u64,
    /// Host memory kvpark may pin (the tuner's upper bound; ≥ `host_bytes`).
    pub pinnable_host_bytes: u64,
    /// The node's NVMe drives (empty when the file gives the aggregate keys only).
    pub drives: Vec<Drive>,
    /// NVMe capacity kvpark may use (the drives' sum, else `nvme_bytes`).
    pub nvme_capacity_bytes: u64,
    /// Host → GPU bytes/s.
    pub h2d_bps: f64,
    /// GPU → host bytes/s.
    pub d2h_bps: f64,
    /// NVMe read bytes/s.
    pub nvme_read_bps: f64,
    /// NVMe write bytes/s.
    pub nvme_write_bps: f64,
    /// The codec's name.
    pub codec: String,
    /// Raw / stored.
    pub codec_ratio: f64,
    /// Encode raw bytes/s (all codec threads; infinite for `none`).
    pub encode_bps: f64,
    /// Decode raw bytes/s (all codec threads; infinite for `none`).
    pub decode_bps: f64,
    /// Prefill tokens/s at an empty context.
    pub prefill_tps: f64,
    /// Context length (tokens) at which prefill speed halves.
    pub prefill_halving: f64,
    /// Seconds of one decode iteration with an empty batch (weights read).
    pub decode_step_s: f64,
    /// HBM bytes/s (a decode iteration also reads every running context's KV).
    pub hbm_bps: f64,
    /// The load: session starts are divided by this.
    pub time_compression: f64,
    /// The cost model's prices.
    pub prices: Prices,
}

impl Deployment {
    /// Parses and validates deployment JSON (a cluster file is the same schema).
    pub fn from_json(text: &str) -> Result<Self> {
        let r: Raw =
            serde_json::from_str(text).map_err(|e| Error::config(format!("deployment: {e}")))?;
        let gpu_count = r.gpu_count.unwrap_or(1);
        if !(1..=MAX_GPU_COUNT).contains(&gpu_count) {
            return Err(Error::config(format!(
                "deployment gpu_count: {gpu_count} is out of range (1..={MAX_GPU_COUNT})"
            )));
        }
        let mut drives = Vec::new();
        let (mut cap, mut rd, mut wr) = (0u64, 0.0, 0.0);
        if let Some(ds) = &r.drives {
            if ds.is_empty() {
                return Err(Error::config(
                    "deployment drives: empty list (leave the key out, or list the drives)",
                ));
            }
            for (i, x) in ds.iter().enumerate() {
                let key = format!("drives[{i}]");
                let capacity = x.capacity.bytes(&format!("{key}.capacity"))?;
                if capacity == 0 {
                    return Err(Error::config(format!(
                        "deployment {key}.capacity: must be > 0"
                    )));
                }
                let read_bps = positive(&format!("{key}.read_gbps"), x.read_gbps)? * 1e9;
                let write_bps = positive(&format!("{key}.write_gbps"), x.write_gbps)? * 1e9;
                cap = cap.checked_add(capacity).ok_or_else(|| {
                    Error::config("deployment drives: total capacity overflows 2^64 bytes")
                })?;
                rd += read_bps;
                wr += write_bps;
                drives.push(Drive {
                    name: x.name.clone().unwrap_or_else(|| format!("nvme{i}")),
                    capacity,
                    read_bps,
                    write_bps,
                });
            }
        }
        // aggregate NVMe bandwidths: given, else the drives' sums; never
        // more than the drives can do
        let mut agg = [0.0f64; 2];
        for (slot, (key, given, sum)) in agg.iter_mut().zip([
            ("nvme_read_gbps", r.nvme_read_gbps, rd),
            ("nvme_write_gbps", r.nvme_write_gbps, wr),
        ]) {
            *slot = match given {
                Some(g) => {
                    let g = positive(key, g)?;
                    if !drives.is_empty() && g * 1e9 > sum * (1.0 + 1e-9) {
                        return Err(Error::config(format!(
                            "deployment {key}: {g} GB/s is more than the drives' sum ({} GB/s)",
                            sum / 1e9
                        )));
                    }
                    g
                }
                None if !drives.is_empty() => sum / 1e9,
                None => {
                    return Err(Error::config(format!(
                        "deployment {key}: missing (give it, or list the NVMe `drives`)"
                    )))
                }
            };
        }
        let [nvme_read_gbps, nvme_write_gbps] = agg;
        let nvme_bytes = match &r.nvme_bytes {
            Some(s) => s.bytes("nvme_bytes")?,
            None if !drives.is_empty() => cap,
            None => {
                return Err(Error::config(
                    "deployment nvme_bytes: missing (give it, or list the NVMe `drives`)",
                ))
            }
        };
        if !drives.is_empty() && nvme_bytes > cap {
            return Err(Error::config(format!(
                "deployment nvme_bytes: {nvme_bytes} is more than the drives hold ({cap})"
            )));
        }
        let pinnable = r
            .pinnable_host_bytes
            .as_ref()
            .map(|s| s.bytes("pinnable_host_bytes"))
            .transpose()?;
        let host_bytes = match (&r.host_bytes, pinnable) {
            (Some(s), _) => s.bytes("host_bytes")?,
            (None, Some(p)) => p,
            (None, None) => {
                return Err(Error::config(
                    "deployment host_bytes: missing (give it, or pinnable_host_bytes)",
                ))
            }
        };
        if pinnable.is_some_and(|p| host_bytes > p) {
            return Err(Error::config(format!(
                "deployment host_bytes: {host_bytes} is more than pinnable_host_bytes ({})",
                pinnable.unwrap_or(0)
            )));
        }
        let (prefill_tps, prefill_halving) = match (
            r.prefill_tokens_per_s,
            r.prefill_halving_context_tokens,
            &r.prefill_tokens_per_s_by_context,
        ) {
            (Some(t), Some(h), None) => (t, h),
            (None, None, Some(pts)) => fit_prefill(pts)?,
            (_, _, Some(_)) => {
                return Err(Error::config(
                    "deployment prefill_tokens_per_s_by_context: give either it or \
                     prefill_tokens_per_s and prefill_halving_context_tokens, not both",
                ))
            }
            (None, _, None) => {
                return Err(Error::config(
                    "deployment prefill_tokens_per_s: missing (or give prefill_tokens_per_s_by_context)",
                ))
            }
            (Some(_), None, None) => {
                return Err(Error::config(
                    "deployment prefill_halving_context_tokens: missing (or give prefill_tokens_per_s_by_context)",
                ))
            }
        };
        let mut prices = Prices::default();
        if let Some(p) = &r.prices {
            prices.given = true;
            for (key, v, slot) in [
                (
                    "dram_usd_per_gb",
                    p.dram_usd_per_gb,
                    &mut prices.dram_usd_per_gb,
                ),
                (
                    "nvme_usd_per_gb",
                    p.nvme_usd_per_gb,
                    &mut prices.nvme_usd_per_gb,
                ),
                (
                    "gpu_usd_per_hour",
                    p.gpu_usd_per_hour,
                    &mut prices.gpu_usd_per_hour,
                ),
            ] {
                if let Some(v) = v {
                    if !(v.is_finite() && (0.0..=MAX_PRICE).contains(&v)) {
                        return Err(Error::config(format!(
                            "deployment prices.{key}: must be a number in 0..={MAX_PRICE}, got {v}"
                        )));
                    }
                    *slot = v;
                }
            }
            if let Some(y) = p.amortize_years {
                if !(y.is_finite() && y > 0.0 && y <= 100.0) {
                    return Err(Error::config(format!(
                        "deployment prices.amortize_years: must be in (0, 100], got {y}"
                    )));
                }
                prices.amortize_years = y;
            }
        }
        let c = crate::codec::deployment_codec(
            r.codec.as_deref(),
            r.codec_threads,
            [r.codec_ratio, r.codec_encode_gbps, r.codec_decode_gbps],
            [nvme_write_gbps, nvme_read_gbps],
        )?;
        let d = Deployment {
            name: r.name.unwrap_or_else(|| "deployment".into()),
            model: r.model.unwrap_or_default(),
            gpu_kind: r.gpu_kind.unwrap_or_else(|| "gpu".into()),
            gpu_count,
            kv_bytes_per_token: r.kv_bytes_per_token,
            max_context_tokens: r.max_context_tokens,
            block_size: r.block_size,
            gpu_kv_bytes: r.gpu_kv_bytes.bytes("gpu_kv_bytes")?,
            host_bytes,
            nvme_bytes,
            pinnable_host_bytes: pinnable.unwrap_or(host_bytes),
            nvme_capacity_bytes: if drives.is_empty() { nvme_bytes } else { cap },
            drives,
            h2d_bps: r.pcie_h2d_gbps * 1e9,
            d2h_bps: r.pcie_d2h_gbps * 1e9,
            nvme_read_bps: nvme_read_gbps * 1e9,
            nvme_write_bps: nvme_write_gbps * 1e9,
            codec: r.codec.clone().unwrap_or_else(|| "custom".into()),
            codec_ratio: c.ratio,
            encode_bps: c.encode_gbps * 1e9,
            decode_bps: c.decode_gbps * 1e9,
            prefill_tps,
            prefill_halving,
            decode_step_s: r.decode_step_ms / 1e3,
            hbm_bps: r.hbm_gbps * 1e9,
            time_compression: r.time_compression,
            prices,
        };
        if !(1..=MAX_KV_BYTES_PER_TOKEN).contains(&d.kv_bytes_per_token) {
            return Err(Error::config(format!(
                "deployment kv_bytes_per_token: {} is out of range (1..={MAX_KV_BYTES_PER_TOKEN} \
                 bytes; a 405B-parameter model in bf16 needs about 0.5 MiB)",
                d.kv_bytes_per_token
            )));
        }
        if !(1..=u32::MAX as u64).contains(&d.max_context_tokens) {
            return Err(Error::config(format!(
                "deployment max_context_tokens: {} is out of range (1..={})",
                d.max_context_tokens,
                u32::MAX
            )));
        }
        if !(1..=4096).contains(&d.block_size) {
            return Err(Error::config(format!(
                "deployment block_size: {} is out of range (1..=4096 tokens)",
                d.block_size
            )));
        }
        let full = d.kv_bytes(d.max_context_tokens);
        if d.gpu_kv_bytes < full {
            return Err(Error::config(format!(
                "deployment gpu_kv_bytes: {} does not hold one full context's KV \
                 ({} tokens × {} bytes = {full}; vLLM would not start)",
                d.gpu_kv_bytes, d.max_context_tokens, d.kv_bytes_per_token
            )));
        }
        for (k, v) in [
            ("pcie_h2d_gbps", d.h2d_bps),
            ("pcie_d2h_gbps", d.d2h_bps),
            ("nvme_read_gbps", d.nvme_read_bps),
            ("nvme_write_gbps", d.nvme_write_bps),
            ("prefill_tokens_per_s", d.prefill_tps),
            ("prefill_halving_context_tokens", d.prefill_halving),
            ("decode_step_ms", d.decode_step_s),
            ("hbm_gbps", d.hbm_bps),
            ("time_compression", d.time_compression),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(Error::config(format!(
                    "deployment {k}: must be a positive number"
                )));
            }
        }
        Ok(d)
    }

    /// The embedded default.
    pub fn default_deployment() -> Self {
        Self::from_json(DEFAULT_JSON).expect("embedded default deployment is valid")
    }

    /// Every shipped deployment, parsed: (file name, deployment).
    pub fn shipped() -> Vec<(&'static str, Deployment)> {
        SHIPPED
            .iter()
            .map(|(n, j)| (*n, Self::from_json(j).expect("shipped deployment is valid")))
            .collect()
    }

    /// Seconds of exclusive GPU time to prefill `n` new tokens on top of
    /// `ctx` cached ones: the rate falls as 1 / (1 + c / halving) with the
    /// mean context c over the prefilled span.
    pub fn prefill_s(&self, n: u64, ctx: u64) -> f64 {
        if n == 0 {
            return 0.0;
        }
        let mean_ctx = ctx as f64 + n as f64 / 2.0;
        n as f64 / self.prefill_tps * (1.0 + mean_ctx / self.prefill_halving)
    }

    /// Seconds of one decode iteration of a batch whose contexts hold
    /// `batch_kv` bytes.
    pub fn decode_iter_s(&self, batch_kv: u64) -> f64 {
        self.decode_step_s + batch_kv as f64 / self.hbm_bps
    }

    /// KV bytes of `tokens` tokens, saturating (exact for any context of up to
    /// `u32::MAX` tokens: see [`MAX_KV_BYTES_PER_TOKEN`]).
    pub fn kv_bytes(&self, tokens: u64) -> u64 {
        tokens.saturating_mul(self.kv_bytes_per_token)
    }

    /// GPU KV bytes of `tokens` tokens allocated in whole blocks.
    pub fn gpu_bytes(&self, tokens: u64) -> u64 {
        let bs = self.block_size as u64;
        self.kv_bytes(tokens.div_ceil(bs).saturating_mul(bs))
    }

    /// Stored (compressed) bytes of `raw` KV bytes.
    pub fn stored(&self, raw: u64) -> u64 {
        (raw as f64 / self.codec_ratio).ceil() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_parses_and_bad_keys_are_named() {
        let d = Deployment::default_deployment();
        assert_eq!(d.gpu_kv_bytes, 56 << 30);
        assert_eq!(d.kv_bytes_per_token, 131072);
        let bad = DEFAULT_JSON.replace("\"codec\"", "\"codec_name\"");
        let e = Deployment::from_json(&bad).unwrap_err();
        assert!(e.message().contains("codec_name"), "{}", e.message());
        let bad = DEFAULT_JSON.replace("\"56GiB\"", "\"56 gigs\"");
        assert!(Deployment::from_json(&bad)
            .unwrap_err()
            .message()
            .contains("gpu_kv_bytes"));
        let bad = DEFAULT_JSON.replace("\"nvme_read_gbps\": 6.5", "\"nvme_read_gbps\": 0");
        assert!(Deployment::from_json(&bad)
            .unwrap_err()
            .message()
            .contains("nvme_read_gbps"));
        let bad = DEFAULT_JSON.replace("\"codec\": \"exp-huff\"", "\"codec\": \"zip\"");
        let e = Deployment::from_json(&bad).unwrap_err();
        assert!(
            e.message().contains("zip") && e.message().contains("lz4-planes"),
            "{}",
            e.message()
        );
        // 16k tokens at an empty context: 1 s × (1 + 8k/halving)
        let want = 1.0 + 8000.0 / d.prefill_halving;
        assert!((d.prefill_s(16_000, 0) - want).abs() < 1e-12);
    }

    #[test]
    fn every_shipped_deployment_parses_and_names_a_known_codec() {
        for (n, d) in Deployment::shipped() {
            assert!(crate::codec::measured(&d.codec).is_some(), "{n}");
            assert!(d.gpu_kv_bytes >= d.kv_bytes(d.max_context_tokens), "{n}");
        }
        // the default names the codec the connector ships as its default
        assert_eq!(
            Deployment::default_deployment().codec,
            crate::config::Config::default().codec.name()
        );
        assert!(Deployment::shipped()
            .iter()
            .any(|(_, d)| d.max_context_tokens >= 1_000_000));
    }

    fn with(from: &str, to: &str) -> String {
        let j = DEFAULT_JSON.replace(from, to);
        assert_ne!(j, DEFAULT_JSON, "{from}");
        j
    }

    #[test]
    fn kv_bytes_per_token_must_be_in_range() {
        let from = "\"kv_bytes_per_token\": 131072";
        for bad in ["0", "1073741825", "18446744073709551615"] {
            let e = Deployment::from_json(&with(from, &format!("\"kv_bytes_per_token\": {bad}")))
                .unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::Config, "{bad}");
            assert!(
                e.message().contains("kv_bytes_per_token") && e.message().contains(bad),
                "{bad}: {}",
                e.message()
            );
        }
        let j = with(from, "\"kv_bytes_per_token\": 1073741824").replace(
            "\"max_context_tokens\": 131072",
            "\"max_context_tokens\": 16",
        );
        let d = Deployment::from_json(&j).unwrap();
        // every size derived from it fits: the longest context a step can hold
        assert_eq!(d.kv_bytes(u32::MAX as u64), (u32::MAX as u64) << 30);
        assert_eq!(d.kv_bytes(u64::MAX), u64::MAX, "saturates, never wraps");
    }

    #[test]
    fn gpu_kv_bytes_must_hold_a_full_context() {
        let from = "\"gpu_kv_bytes\": \"56GiB\"";
        for bad in ["0", "131071", "17179869183"] {
            let e = Deployment::from_json(&with(from, &format!("\"gpu_kv_bytes\": {bad}")))
                .unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::Config, "{bad}");
            assert!(
                e.message().contains("gpu_kv_bytes") && e.message().contains(bad),
                "{bad}: {}",
                e.message()
            );
        }
        let d = Deployment::from_json(&with(from, "\"gpu_kv_bytes\": 17179869184")).unwrap();
        assert_eq!(d.gpu_kv_bytes, 16 << 30);
    }
}
