//! `fp8-lossy` (tag 4): **lossy** per-group scaled fp8 (e4m3).
//!
//! Each group of 2048 elements (4 KiB of bf16) is scaled by `amax / 448`
//! into e4m3 (round to nearest even, saturating) and stored as one byte per
//! element after its f32 scale: 2× on bf16, 4× on fp32. Decoding gives the
//! nearest bf16 / fp32 of `e4m3 * scale`, not the input: relative error up
//! to 2^-4 for values near their group's maximum and more for values far
//! below it (they fall into e4m3's subnormals or to zero). The bench reports
//! the max/mean relative error on the real KV corpus.
//!
//! 2-byte elements are taken as **bf16** (kvpark's Dtype::F16 KV must not
//! use this codec), 4-byte as fp32; 1- and 8-byte elements are refused.
//!
//! Format: `[version 1][es][log2 group = 11][0][n: u32]`, then per group
//! `[scale: f32][e4m3 bytes]`, then the raw tail (`len % es` bytes).

use super::{Codec, CodecTag};
use crate::error::{Error, Result};

const VERSION: u8 = 1;
const GROUP_LOG2: u8 = 11;
const HEADER: usize = 8;
/// Largest finite e4m3 value.
const E4M3_MAX: f32 = 448.0;

/// Per-group scaled e4m3: lossy.
#[derive(Clone, Copy, Debug, Default)]
pub struct Fp8Lossy;

impl Codec for Fp8Lossy {
    fn tag(&self) -> CodecTag {
        CodecTag::Fp8Lossy
    }

    fn lossless(&self) -> bool {
        false
    }

    fn encode(&self, src: &[u8], es: usize, dst: &mut Vec<u8>) -> Result<()> {
        if es != 2 && es != 4 {
            return Err(Error::invalid(format!(
                "fp8-lossy: element size {es} (bf16 or fp32 KV only)"
            )));
        }
        let n = src.len() / es;
        let n32 = u32::try_from(n).map_err(|_| Error::invalid("fp8-lossy: record too large"))?;
        let g = 1usize << GROUP_LOG2;
        dst.clear();
        dst.reserve(HEADER + n + 4 * n.div_ceil(g) + es);
        dst.extend_from_slice(&[VERSION, es as u8, GROUP_LOG2, 0]);
        dst.extend_from_slice(&n32.to_le_bytes());
        let mut vals = vec![0f32; g];
        for grp in src[..n * es].chunks(g * es) {
            let v = &mut vals[..grp.len() / es];
            for (x, e) in v.iter_mut().zip(grp.chunks_exact(es)) {
                *x = to_f32(e);
            }
            // max |x| over finite x, as integer max on the magnitude bits
            // (monotonic for non-negative floats; vectorises)
            let amax = f32::from_bits(
                v.iter()
                    .map(|x| x.to_bits() & 0x7fff_ffff)
                    .map(|b| if b < 0x7f80_0000 { b } else { 0 })
                    .max()
                    .unwrap_or(0),
            );
            let scale = if amax > 0.0 { amax / E4M3_MAX } else { 1.0 };
            dst.extend_from_slice(&scale.to_le_bytes());
            let inv = 1.0 / scale;
            dst.extend(v.iter().map(|&x| f32_to_e4m3(x * inv)));
        }
        dst.extend_from_slice(&src[n * es..]);
        Ok(())
    }

    fn decode(&self, src: &[u8], es: usize, dst: &mut [u8]) -> Result<()> {
        let bad = |w: &str| Error::corrupt(format!("fp8-lossy: {w}"));
        if src.len() < HEADER || src[0] != VERSION || src[1] as usize != es || src[2] != GROUP_LOG2
        {
            return Err(bad("bad header"));
        }
        if es != 2 && es != 4 {
            return Err(bad("element size"));
        }
        let n = u32::from_le_bytes([src[4], src[5], src[6], src[7]]) as usize;
        if n != dst.len() / es {
            return Err(bad("element count does not match the raw length"));
        }
        let g = 1usize << GROUP_LOG2;
        let want = n
            .checked_add(4 * n.div_ceil(g))
            .and_then(|x| x.checked_add(HEADER + dst.len() - n * es))
            .ok_or_else(|| bad("size overflows"))?;
        if src.len() != want {
            return Err(bad("record length mismatch"));
        }
        let lut = e4m3_table();
        let (body, tail) = dst.split_at_mut(n * es);
        let mut pos = HEADER;
        for out in body.chunks_mut(g * es) {
            let m = out.len() / es;
            let scale = f32::from_le_bytes(src[pos..pos + 4].try_into().expect("4 bytes"));
            let codes = &src[pos + 4..pos + 4 + m];
            for (o, &c) in out.chunks_exact_mut(es).zip(codes) {
                from_f32(lut[c as usize] * scale, o);
            }
            pos += 4 + m;
        }
        tail.copy_from_slice(&src[pos..]);
        Ok(())
    }
}

fn to_f32(e: &[u8]) -> f32 {
    match e.len() {
        2 => f32::from_bits((u16::from_le_bytes([e[0], e[1]]) as u32) << 16),
        _ => f32::from_le_bytes([e[0], e[1], e[2], e[3]]),
    }
}

fn from_f32(x: f32, o: &mut [u8]) {
    if o.len() == 2 {
        o.copy_from_slice(&f32_to_bf16(x).to_le_bytes());
    } else {
        o.copy_from_slice(&x.to_le_bytes());
    }
}

/// Round to nearest even bf16.
pub(crate) fn f32_to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// The 256 e4m3fn values (NaN codes decode as NaN).
pub(crate) fn e4m3_table() -> [f32; 256] {
    let mut t = [0f32; 256];
    for (c, v) in t.iter_mut().enumerate() {
        let (s, e, m) = ((c >> 7) & 1, (c >> 3) & 15, c & 7);
        let mag = if e == 15 && m == 7 {
            f32::NAN
        } else if e == 0 {
            m as f32 / 8.0 * 2f32.powi(-6)
        } else {
            (1.0 + m as f32 / 8.0) * 2f32.powi(e as i32 - 7)
        };
        *v = if s == 1 { -mag } else { mag };
    }
    t
}

/// Nearest e4m3fn (ties to even), saturating at ±448; NaN → NaN code.
pub(crate) fn f32_to_e4m3(x: f32) -> u8 {
    let sign = if x.is_sign_negative() { 0x80u8 } else { 0 };
    if x.is_nan() {
        return 0x7f | sign;
    }
    let a = x.abs();
    if a >= E4M3_MAX {
        return 0x7e | sign;
    }
    if a < 0.015625 {
        // below 2^-6, subnormal: multiples of 2^-9, round half to even
        let r = (a * 512.0).round_ties_even();
        return sign | r as u8; // r == 8 is the smallest normal, code 0x08
    }
    let b = a.to_bits();
    // keep 3 mantissa bits, round to nearest even
    let r = b + 0x7_ffff + ((b >> 20) & 1);
    let e = ((r >> 23) as i32) - 127 + 7;
    let m = (r >> 20) & 7;
    let code = ((e as u32) << 3 | m).min(0x7e) as u8;
    sign | code
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e4m3_conversion_is_nearest() {
        let t = e4m3_table();
        for c in 0..=0x7eu8 {
            assert_eq!(f32_to_e4m3(t[c as usize]), c, "code {c:#x}");
            assert_eq!(f32_to_e4m3(-t[c as usize]), c | 0x80);
        }
        let mut x = 1e-4f32;
        while x < 500.0 {
            let c = f32_to_e4m3(x);
            let err = (t[c as usize] - x).abs();
            let best = t[..0x7f]
                .iter()
                .map(|v| (v - x).abs())
                .fold(f32::MAX, f32::min);
            assert!(err <= best * (1.0 + 1e-6), "{x}: {err} vs {best}");
            x *= 1.013;
        }
    }

    #[test]
    fn round_trip_error_is_bounded() {
        let kv = crate::codec::bench::synthetic_bf16(10_000, 3);
        let mut enc = Vec::new();
        Fp8Lossy.encode(&kv, 2, &mut enc).unwrap();
        assert!(enc.len() < kv.len() / 2 + 64, "{}", enc.len());
        let mut dec = vec![0u8; kv.len()];
        Fp8Lossy.decode(&enc, 2, &mut dec).unwrap();
        let (max, _mean) = crate::codec::bench::rel_error_bf16(&kv, &dec);
        // values near the group max keep 3 mantissa bits; the max error comes
        // from values far below it
        assert!(max.is_finite(), "{max}");
        assert!(!Fp8Lossy.lossless());
        let e = Fp8Lossy
            .decode(&enc[..enc.len() - 1], 2, &mut dec)
            .unwrap_err();
        assert_eq!(e.kind(), crate::error::ErrorKind::Corrupt);
    }
}
