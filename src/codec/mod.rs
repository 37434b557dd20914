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
//! | 3   | (reserved)      | yes      | entropy-coded exponent plane, raw mantissa (KV codec) |
//! | 4   | (reserved)      | **no**   | per-block scaled fp8 (lossy mode)                     |
//!
//! Codecs are pure functions of their input: no state, no I/O, `Send + Sync`.

mod lz4;
mod planes;

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
}

impl CodecTag {
    /// Decodes a tag byte read from disk.
    pub fn from_u8(b: u8) -> Result<Self> {
        Ok(match b {
            0 => CodecTag::None,
            1 => CodecTag::Lz4,
            2 => CodecTag::Lz4Planes,
            _ => return Err(Error::corrupt(format!("unknown codec tag {b}"))),
        })
    }

    /// The codec's name as used in config and reports.
    pub fn name(self) -> &'static str {
        match self {
            CodecTag::None => "none",
            CodecTag::Lz4 => "lz4",
            CodecTag::Lz4Planes => "lz4-planes",
        }
    }

    /// Parses a config name.
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "none" => CodecTag::None,
            "lz4" => CodecTag::Lz4,
            "lz4-planes" => CodecTag::Lz4Planes,
            _ => {
                return Err(Error::config(format!(
                    "codec: unknown codec {s:?} (expected none, lz4, lz4-planes)"
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
    }
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
            out.push(if i % 2 == 0 { s as u8 } else { 0x3c + (s % 4) as u8 });
        }
        out
    }

    #[test]
    fn every_codec_round_trips() {
        let data = kv_like(64 * 1024 + 3, 9);
        for tag in [CodecTag::None, CodecTag::Lz4, CodecTag::Lz4Planes] {
            let c = by_tag(tag);
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
        for tag in [CodecTag::Lz4, CodecTag::Lz4Planes, CodecTag::None] {
            let mut dst = vec![0u8; 4096];
            let e = by_tag(tag).decode(&garbage, 2, &mut dst).unwrap_err();
            assert_eq!(e.kind(), crate::error::ErrorKind::Corrupt, "{}", tag.name());
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
