//! Codec throughput and ratio on bf16 KV-like data, against zstd level 1 on
//! the same bytes in the same run.

use super::{by_tag, CodecTag};
use crate::benchkit::{paired, Figure};
use std::time::Duration;

/// bf16 samples of N(0, sigma): the shape of post-RoPE keys/values (not real KV).
pub fn synthetic_bf16(n_elems: usize, seed: u64) -> Vec<u8> {
    let mut s = seed | 1;
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut out = Vec::with_capacity(n_elems * 2);
    while out.len() < n_elems * 2 {
        let (u1, u2) = (next().max(1e-300), next());
        let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
        let bits = ((z * 0.8) as f32).to_bits();
        out.extend_from_slice(&((bits >> 16) as u16).to_le_bytes());
    }
    out
}

/// Encode and decode figures per codec, each next to zstd-1 on the same block.
/// Returns (figures, lines describing compression ratios).
pub fn bench_codecs(quick: bool) -> (Vec<Figure>, Vec<String>) {
    let block = synthetic_bf16(1 << 20, 7); // 2 MiB: one Llama-3-8B block
    let per = Duration::from_millis(if quick { 60 } else { 300 });
    let rounds = if quick { 2 } else { 4 };
    let bytes = block.len() as u64;
    let mut zbuf = zstd::bulk::compress(&block, 1).expect("zstd compresses");
    let zstd_ratio = block.len() as f64 / zbuf.len() as f64;
    let mut figs = Vec::new();
    let mut ratios = vec![format!("zstd-1 ratio {zstd_ratio:.3}x (baseline)")];
    for tag in [CodecTag::Lz4, CodecTag::Lz4Planes] {
        let c = by_tag(tag);
        let mut enc = Vec::new();
        c.encode(&block, 2, &mut enc).expect("encode");
        ratios.push(format!(
            "{} ratio {:.3}x",
            tag.name(),
            block.len() as f64 / enc.len() as f64
        ));
        let (m, b) = paired(
            bytes,
            rounds,
            per,
            || c.encode(&block, 2, &mut enc).expect("encode"),
            || zbuf = zstd::bulk::compress(&block, 1).expect("zstd"),
        );
        figs.push(Figure {
            name: format!("encode {} 2MiB bf16", tag.name()),
            bytes_per_s: m,
            baseline: "zstd-1 compress".into(),
            baseline_bytes_per_s: b,
        });
        c.encode(&block, 2, &mut enc).expect("encode");
        let zc = zstd::bulk::compress(&block, 1).expect("zstd");
        let mut out = vec![0u8; block.len()];
        let mut zout = vec![0u8; block.len()];
        let (m, b) = paired(
            bytes,
            rounds,
            per,
            || c.decode(&enc, 2, &mut out).expect("decode"),
            || {
                zstd::bulk::decompress_to_buffer(&zc, &mut zout).expect("zstd");
            },
        );
        assert_eq!(zout, block, "zstd round trip");
        assert_eq!(out, block, "round trip");
        figs.push(Figure {
            name: format!("decode {} 2MiB bf16", tag.name()),
            bytes_per_s: m,
            baseline: "zstd-1 decompress".into(),
            baseline_bytes_per_s: b,
        });
    }
    (figs, ratios)
}
