//! The modelled deployment: one GPU's KV capacity, kvpark's host and NVMe
//! tiers, link bandwidths, codec, prefill speed. Read from JSON
//! (`--deployment FILE`); [`DEFAULT_JSON`] is embedded and documented.
//!
//! Sizes accept units ("56GiB") or plain byte counts; bandwidths are in
//! GB/s (10^9 bytes per second). Unknown keys are an error naming the key, and
//! so is a value out of range: `kv_bytes_per_token` in 1..=1 GiB
//! ([`MAX_KV_BYTES_PER_TOKEN`]), `gpu_kv_bytes` at least one token's KV,
//! bandwidths and speeds positive and finite, `codec_ratio` ≥ 1.

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::units::parse_size;

/// The embedded default: Llama-3.1-8B (bf16, 128 KiB of KV per token) on one
/// 80 GB H100 — 56 GiB left for KV after weights and activations — with
/// 256 GiB of pinned host memory and one 4 TiB NVMe drive (PCIe 4.0 x4 class:
/// 6.5 GB/s read, 3.5 GB/s write), PCIe 5.0 x16 to the GPU (~25 GB/s each
/// way in practice), the `exp-huff` codec with its measured ratio and
/// per-core speeds on real KV (`codec::measured`: 1.45×, 1.47 / 2.91 GB/s
/// per core) on as many threads as keep up with the drive (3; override with
/// `codec_threads`, or give `codec_ratio`, `codec_encode_gbps` and
/// `codec_decode_gbps` instead of `codec`), and prefill at 16k tokens/s on
/// a short context, halving every 64k tokens of context.
pub const DEFAULT_JSON: &str = r#"{
  "name": "llama-3.1-8b on 1x H100-80GB, 256 GiB pinned host, 4 TiB NVMe",
  "kv_bytes_per_token": 131072,
  "gpu_kv_bytes": "56GiB",
  "host_bytes": "256GiB",
  "nvme_bytes": "4TiB",
  "pcie_h2d_gbps": 25.0,
  "pcie_d2h_gbps": 25.0,
  "nvme_read_gbps": 6.5,
  "nvme_write_gbps": 3.5,
  "codec": "exp-huff",
  "prefill_tokens_per_s": 16000,
  "prefill_halving_context_tokens": 64000
}"#;

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
    kv_bytes_per_token: u64,
    gpu_kv_bytes: Size,
    host_bytes: Size,
    nvme_bytes: Size,
    pcie_h2d_gbps: f64,
    pcie_d2h_gbps: f64,
    nvme_read_gbps: f64,
    nvme_write_gbps: f64,
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
    prefill_tokens_per_s: f64,
    prefill_halving_context_tokens: f64,
}

/// A validated deployment (bandwidths in bytes per second).
#[derive(Clone, Debug, serde::Serialize)]
pub struct Deployment {
    /// Free-form name.
    pub name: String,
    /// Model KV bytes per token.
    pub kv_bytes_per_token: u64,
    /// GPU KV capacity (vLLM's paged cache).
    pub gpu_kv_bytes: u64,
    /// kvpark host tier capacity.
    pub host_bytes: u64,
    /// kvpark NVMe tier capacity (stored, i.e. compressed, bytes).
    pub nvme_bytes: u64,
    /// Host → GPU bytes/s.
    pub h2d_bps: f64,
    /// GPU → host bytes/s.
    pub d2h_bps: f64,
    /// NVMe read bytes/s.
    pub nvme_read_bps: f64,
    /// NVMe write bytes/s.
    pub nvme_write_bps: f64,
    /// Raw / stored.
    pub codec_ratio: f64,
    /// Encode raw bytes/s.
    pub encode_bps: f64,
    /// Decode raw bytes/s.
    pub decode_bps: f64,
    /// Prefill tokens/s at an empty context.
    pub prefill_tps: f64,
    /// Context length (tokens) at which prefill speed halves.
    pub prefill_halving: f64,
}

impl Deployment {
    /// Parses and validates deployment JSON.
    pub fn from_json(text: &str) -> Result<Self> {
        let r: Raw =
            serde_json::from_str(text).map_err(|e| Error::config(format!("deployment: {e}")))?;
        let c = crate::codec::deployment_codec(
            r.codec.as_deref(),
            r.codec_threads,
            [r.codec_ratio, r.codec_encode_gbps, r.codec_decode_gbps],
            [r.nvme_write_gbps, r.nvme_read_gbps],
        )?;
        let d = Deployment {
            name: r.name.unwrap_or_else(|| "deployment".into()),
            kv_bytes_per_token: r.kv_bytes_per_token,
            gpu_kv_bytes: r.gpu_kv_bytes.bytes("gpu_kv_bytes")?,
            host_bytes: r.host_bytes.bytes("host_bytes")?,
            nvme_bytes: r.nvme_bytes.bytes("nvme_bytes")?,
            h2d_bps: r.pcie_h2d_gbps * 1e9,
            d2h_bps: r.pcie_d2h_gbps * 1e9,
            nvme_read_bps: r.nvme_read_gbps * 1e9,
            nvme_write_bps: r.nvme_write_gbps * 1e9,
            codec_ratio: c.ratio,
            encode_bps: c.encode_gbps * 1e9,
            decode_bps: c.decode_gbps * 1e9,
            prefill_tps: r.prefill_tokens_per_s,
            prefill_halving: r.prefill_halving_context_tokens,
        };
        if !(1..=MAX_KV_BYTES_PER_TOKEN).contains(&d.kv_bytes_per_token) {
            return Err(Error::config(format!(
                "deployment kv_bytes_per_token: {} is out of range (1..={MAX_KV_BYTES_PER_TOKEN} \
                 bytes; a 405B-parameter model in bf16 needs about 0.5 MiB)",
                d.kv_bytes_per_token
            )));
        }
        if d.gpu_kv_bytes < d.kv_bytes_per_token {
            return Err(Error::config(format!(
                "deployment gpu_kv_bytes: {} does not hold one token's KV \
                 (kv_bytes_per_token is {})",
                d.gpu_kv_bytes, d.kv_bytes_per_token
            )));
        }
        for (k, v) in [
            ("pcie_h2d_gbps", d.h2d_bps),
            ("pcie_d2h_gbps", d.d2h_bps),
            ("nvme_read_gbps", d.nvme_read_bps),
            ("nvme_write_gbps", d.nvme_write_bps),
            ("codec_encode_gbps", d.encode_bps),
            ("codec_decode_gbps", d.decode_bps),
            ("prefill_tokens_per_s", d.prefill_tps),
            ("prefill_halving_context_tokens", d.prefill_halving),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(Error::config(format!(
                    "deployment {k}: must be a positive number"
                )));
            }
        }
        if !(d.codec_ratio.is_finite() && d.codec_ratio >= 1.0) {
            return Err(Error::config(
                "deployment codec_ratio: must be ≥ 1 (lossless codecs never grow data here)",
            ));
        }
        Ok(d)
    }

    /// The embedded default.
    pub fn default_deployment() -> Self {
        Self::from_json(DEFAULT_JSON).expect("embedded default deployment is valid")
    }

    /// Seconds to prefill `n` new tokens on top of `ctx` cached ones: the
    /// rate falls as 1 / (1 + c / halving) with the mean context c over the
    /// prefilled span.
    pub fn prefill_s(&self, n: u64, ctx: u64) -> f64 {
        if n == 0 {
            return 0.0;
        }
        let mean_ctx = ctx as f64 + n as f64 / 2.0;
        n as f64 / self.prefill_tps * (1.0 + mean_ctx / self.prefill_halving)
    }

    /// KV bytes of `tokens` tokens, saturating (exact for any context of up to
    /// `u32::MAX` tokens: see [`MAX_KV_BYTES_PER_TOKEN`]).
    pub fn kv_bytes(&self, tokens: u64) -> u64 {
        tokens.saturating_mul(self.kv_bytes_per_token)
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
        // 16k tokens at an empty context: 1 s × (1 + 8k/64k)
        assert!((d.prefill_s(16_000, 0) - 1.125).abs() < 1e-12);
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
        let d = Deployment::from_json(&with(from, "\"kv_bytes_per_token\": 1073741824")).unwrap();
        // every size derived from it fits: the longest context a step can hold
        assert_eq!(d.kv_bytes(u32::MAX as u64), (u32::MAX as u64) << 30);
        assert_eq!(d.kv_bytes(u64::MAX), u64::MAX, "saturates, never wraps");
    }

    #[test]
    fn gpu_kv_bytes_must_hold_a_token() {
        let from = "\"gpu_kv_bytes\": \"56GiB\"";
        for bad in ["0", "131071"] {
            let e = Deployment::from_json(&with(from, &format!("\"gpu_kv_bytes\": {bad}")))
                .unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::Config, "{bad}");
            assert!(
                e.message().contains("gpu_kv_bytes") && e.message().contains(bad),
                "{bad}: {}",
                e.message()
            );
        }
        let d = Deployment::from_json(&with(from, "\"gpu_kv_bytes\": 131072")).unwrap();
        assert_eq!(d.gpu_kv_bytes, 131072);
    }
}
