//! Block codecs with stable one-byte tags.
//!
//! A codec turns a parked block's raw bytes into what the NVMe tier stores and
//! back. Tags are written into every NVMe record header and are **never
//! reused**: a record written today must decode in every later version.
//!
//! | tag | name            | lossless | what it is for                                        |
//! |-----|-----------------|----------|-------------------------------------------------------|
//! | 0   | `none`          | yes      | raw bytes                                             |
//! | 1   | `lz4`           | yes      | zero/padding-heavy blocks, metadata                   |
//! | 2   | `lz4-planes`    | yes      | byte-plane split by element size, then lz4 per plane  |
//! | 3   | `exp-huff`      | yes      | Huffman-coded exponent plane, raw mantissa (default)  |
//! | 4   | `fp8-lossy`     | **no**   | per-group scaled e4m3 (lossy mode, opt-in)            |
//!
//! Codecs are pure functions of their input: no state, no I/O, `Send + Sync`.

#[cfg(any(test, feature = "cli"))]
pub mod bench;
mod fp8;
pub mod huff;
mod lz4;
mod planes;

pub use fp8::Fp8Lossy;
pub use huff::ExpHuff;
pub use lz4::Lz4;
pub use planes::Lz4Planes;

use crate::error::{Error, Result};

/// Stable on-disk codec tag.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum CodecTag {
    /// Raw bytes.
    None = 0,
    /// lz4 block format over the raw bytes.
    Lz4 = 1,
    /// Byte-plane split, then lz4 per plane.
    Lz4Planes = 2,
    /// Huffman-coded exponent plane, raw mantissa planes.
    ExpHuff = 3,
    /// **Lossy**: per-group scaled e4m3.
    Fp8Lossy = 4,
}

impl CodecTag {
    /// Decodes a tag byte read from disk.
    pub fn from_u8(b: u8) -> Result<Self> {
        Ok(match b {
            0 => CodecTag::None,
            1 => CodecTag::Lz4,
            2 => CodecTag::Lz4Planes,
            3 => CodecTag::ExpHuff,
            4 => CodecTag::Fp8Lossy,
            _ => return Err(Error::corrupt(format!("unknown codec tag {b}"))),
        })
    }

    /// The codec's name as used in config and reports.
    pub fn name(self) -> &'static str {
        match self {
            CodecTag::None => "none",
            CodecTag::Lz4 => "lz4",
            CodecTag::Lz4Planes => "lz4-planes",
            CodecTag::ExpHuff => "exp-huff",
            CodecTag::Fp8Lossy => "fp8-lossy",
        }
    }

    /// Parses a config name.
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "none" => CodecTag::None,
            "lz4" => CodecTag::Lz4,
            "lz4-planes" => CodecTag::Lz4Planes,
            "exp-huff" => CodecTag::ExpHuff,
            "fp8-lossy" => CodecTag::Fp8Lossy,
            _ => {
                return Err(Error::config(format!(
                "codec: unknown codec {s:?} (expected none, lz4, lz4-planes, exp-huff, fp8-lossy)"
            )))
            }
        })
    }
}

/// A block codec.
pub trait Codec: Send + Sync {
    /// The tag written into records.
    fn tag(&self) -> CodecTag;

    /// Whether decode(encode(x)) == x for every x.
    fn lossless(&self) -> bool {
        true
    }

    /// Encodes `src` (elements of `elem_size` bytes) into `dst`, which is
    /// cleared first. The output may be larger than the input; callers store
    /// raw bytes with [`CodecTag::None`] when it does not pay.
    fn encode(&self, src: &[u8], elem_size: usize, dst: &mut Vec<u8>) -> Result<()>;

    /// Decodes `src` into `dst`, whose length is the raw length. A malformed
    /// input is a [`crate::error::ErrorKind::Corrupt`] error, never a panic.
    fn decode(&self, src: &[u8], elem_size: usize, dst: &mut [u8]) -> Result<()>;
}

/// The identity codec.
#[derive(Clone, Copy, Debug, Default)]
pub struct Raw;

impl Codec for Raw {
    fn tag(&self) -> CodecTag {
        CodecTag::None
    }
    fn encode(&self, src: &[u8], _elem_size: usize, dst: &mut Vec<u8>) -> Result<()> {
        dst.clear();
        dst.extend_from_slice(src);
        Ok(())
    }
    fn decode(&self, src: &[u8], _elem_size: usize, dst: &mut [u8]) -> Result<()> {
        if src.len() != dst.len() {
            return Err(Error::corrupt(format!(
                "raw record holds {} bytes, expected {}",
                src.len(),
                dst.len()
            )));
        }
        dst.copy_from_slice(src);
        Ok(())
    }
}

/// The codec for a tag.
pub fn by_tag(tag: CodecTag) -> &'static dyn Codec {
    match tag {
        CodecTag::None => &Raw,
        CodecTag::Lz4 => &Lz4,
        CodecTag::Lz4Planes => &Lz4Planes,
        CodecTag::ExpHuff => &ExpHuff,
        CodecTag::Fp8Lossy => &Fp8Lossy,
    }
}

/// Every tag, in tag order.
pub const ALL: [CodecTag; 5] = [
    CodecTag::None,
    CodecTag::Lz4,
    CodecTag::Lz4Planes,
    CodecTag::ExpHuff,
    CodecTag::Fp8Lossy,
];

/// A codec's measured ratio and single-thread speeds on real bf16 KV
/// (SmolLM2-135M post-RoPE K/V, `scripts/kv_corpus.py`), as recorded in
/// BENCHMARKS.md: what the replay's deployments use for a codec named there.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Measured {
    /// Raw bytes / stored bytes.
    pub ratio: f64,
    /// Raw GB/s encoded by one core.
    pub encode_gbps: f64,
    /// Raw GB/s decoded by one core.
    pub decode_gbps: f64,
}

/// The measured figures for a codec name (see [`Measured`]); `None` for an
/// unknown name.
pub fn measured(name: &str) -> Option<Measured> {
    let (ratio, encode_gbps, decode_gbps) = match CodecTag::parse(name).ok()? {
        // no codec: memcpy of the same bytes in the same run
        CodecTag::None => (1.0, 15.6, 15.6),
        // 0.999x: encode_best stores such records raw, so 1.0 on disk
        CodecTag::Lz4 => (1.0, 11.48, 14.93),
        CodecTag::Lz4Planes => (1.158, 0.59, 2.60),
        CodecTag::ExpHuff => (1.450, 1.47, 2.91),
        CodecTag::Fp8Lossy => (1.996, FP8_ENC, FP8_DEC),
    };
    Some(Measured {
        ratio,
        encode_gbps,
        decode_gbps,
    })
}

const FP8_ENC: f64 = 0.87;
const FP8_DEC: f64 = 2.25;

/// A deployment's codec figures for the replay: aggregate GB/s of the
/// threads that run the codec.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DeploymentCodec {
    /// Raw / stored.
    pub ratio: f64,
    /// Raw GB/s encoded by all codec threads together.
    pub encode_gbps: f64,
    /// Raw GB/s decoded by all codec threads together.
    pub decode_gbps: f64,
    /// Threads the figures assume.
    pub threads: u32,
}

/// Resolves a deployment's codec: either a codec `name` (figures from
/// [`measured`], times `threads`; without `threads`, as many as keep encode
/// at the NVMe write rate and decode at its read rate, `nvme = [write,
/// read]` GB/s), or explicit `[ratio, encode_gbps, decode_gbps]` (all
/// three), not both.
pub fn deployment_codec(
    name: Option<&str>,
    threads: Option<u32>,
    explicit: [Option<f64>; 3],
    nvme: [f64; 2],
) -> Result<DeploymentCodec> {
    match (name, explicit) {
        (Some(n), [None, None, None]) => {
            let m = measured(n).ok_or_else(|| {
                Error::config(format!(
                    "deployment codec: unknown codec {n:?} (expected one of {})",
                    ALL.map(|t| t.name()).join(", ")
                ))
            })?;
            let threads = match threads {
                Some(0) => return Err(Error::config("deployment codec_threads: must be > 0")),
                Some(t) => t,
                None => threads_for(m, nvme),
            };
            Ok(DeploymentCodec {
                ratio: m.ratio,
                encode_gbps: m.encode_gbps * threads as f64,
                decode_gbps: m.decode_gbps * threads as f64,
                threads,
            })
        }
        (None, [Some(ratio), Some(encode_gbps), Some(decode_gbps)]) if threads.is_none() => {
            Ok(DeploymentCodec {
                ratio,
                encode_gbps,
                decode_gbps,
                threads: 0,
            })
        }
        _ => Err(Error::config(
            "deployment codec: give either \"codec\" (a codec name, optional \"codec_threads\") \
             or all of codec_ratio, codec_encode_gbps, codec_decode_gbps",
        )),
    }
}

/// Threads that keep a codec at the disk's rates: encode ≥ NVMe write,
/// decode ≥ NVMe read (`nvme = [write, read]` GB/s), at least one.
pub fn threads_for(m: Measured, nvme: [f64; 2]) -> u32 {
    let need = |disk: f64, per: f64| {
        if per > 0.0 && disk.is_finite() && disk > 0.0 {
            (disk / per).ceil().min(64.0) as u32
        } else {
            1
        }
    };
    need(nvme[0], m.encode_gbps)
        .max(need(nvme[1], m.decode_gbps))
        .max(1)
}

/// Encodes with `codec`, falling back to raw bytes when the codec does not
/// shrink the block. Returns the tag actually used.
pub fn encode_best(
    codec: &dyn Codec,
    src: &[u8],
    elem_size: usize,
    dst: &mut Vec<u8>,
) -> Result<CodecTag> {
    if codec.tag() != CodecTag::None {
        codec.encode(src, elem_size, dst)?;
        if dst.len() < src.len() {
            return Ok(codec.tag());
        }
    }
    Raw.encode(src, elem_size, dst)?;
    Ok(CodecTag::None)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// bf16-like data: random low byte, skewed high byte.
    pub(crate) fn kv_like(n: usize, seed: u64) -> Vec<u8> {
        let mut s = seed | 1;
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            out.push(if i % 2 == 0 {
                s as u8
            } else {
                0x3c + (s % 4) as u8
            });
        }
        out
    }

    #[test]
    fn every_codec_round_trips() {
        let data = kv_like(64 * 1024 + 3, 9);
        for tag in ALL {
            let c = by_tag(tag);
            if !c.lossless() {
                continue;
            }
            let mut enc = Vec::new();
            c.encode(&data, 2, &mut enc).unwrap();
            let mut dec = vec![0u8; data.len()];
            c.decode(&enc, 2, &mut dec).unwrap();
            assert_eq!(dec, data, "{}", tag.name());
            assert_eq!(CodecTag::from_u8(tag as u8).unwrap(), tag);
            assert_eq!(CodecTag::parse(tag.name()).unwrap(), tag);
        }
    }

    #[test]
    fn planes_beat_plain_lz4_on_kv_like_data() {
        let data = kv_like(256 * 1024, 3);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        Lz4.encode(&data, 2, &mut a).unwrap();
        Lz4Planes.encode(&data, 2, &mut b).unwrap();
        assert!(b.len() < a.len(), "planes {} vs lz4 {}", b.len(), a.len());
        assert!(b.len() < data.len());
    }

    #[test]
    fn garbage_input_is_corrupt_not_panic() {
        let garbage = kv_like(1000, 5);
        for tag in ALL {
            let mut dst = vec![0u8; 4096];
            let e = by_tag(tag).decode(&garbage, 2, &mut dst).unwrap_err();
            assert_eq!(e.kind(), crate::error::ErrorKind::Corrupt, "{}", tag.name());
        }
    }

    #[test]
    fn deployments_take_measured_figures_by_name() {
        let m = measured("exp-huff").unwrap();
        assert!(m.ratio >= 1.40 && m.encode_gbps >= 1.0 && m.decode_gbps >= 2.0);
        // 3.5 GB/s write, 6.5 GB/s read: threads until encode and decode keep up
        let d = deployment_codec(Some("exp-huff"), None, [None; 3], [3.5, 6.5]).unwrap();
        assert!(d.encode_gbps >= 3.5 && d.decode_gbps >= 6.5, "{d:?}");
        assert_eq!(d.threads, threads_for(m, [3.5, 6.5]));
        let d = deployment_codec(Some("exp-huff"), Some(1), [None; 3], [3.5, 6.5]).unwrap();
        assert_eq!((d.threads, d.encode_gbps), (1, m.encode_gbps));
        let d = deployment_codec(None, None, [Some(1.2), Some(2.0), Some(3.0)], [1.0; 2]).unwrap();
        assert_eq!((d.ratio, d.encode_gbps, d.decode_gbps), (1.2, 2.0, 3.0));
        for bad in [
            deployment_codec(Some("zip"), None, [None; 3], [1.0; 2]),
            deployment_codec(Some("lz4"), None, [Some(1.2), None, None], [1.0; 2]),
            deployment_codec(None, None, [Some(1.2), None, None], [1.0; 2]),
            deployment_codec(Some("lz4"), Some(0), [None; 3], [1.0; 2]),
        ] {
            assert_eq!(bad.unwrap_err().kind(), crate::error::ErrorKind::Config);
        }
        for t in ALL {
            assert!(measured(t.name()).is_some());
        }
    }

    #[test]
    fn encode_best_falls_back_to_raw_on_noise() {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        let mut out = Vec::new();
        let tag = encode_best(&Lz4, &noise, 1, &mut out).unwrap();
        assert_eq!(tag, CodecTag::None);
        assert_eq!(out, noise);
    }
}
