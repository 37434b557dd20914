//! Byte-plane split, then lz4 per plane.
//!
//! Format: `[elem_size: u8][plane_len: u32 le] * elem_size` followed by the
//! planes' lz4 blocks in order; any tail bytes that do not fill an element
//! are stored raw after the planes. Plane `i` holds byte `i` of every element:
//! the exponent-carrying high byte of bf16 compresses, the low mantissa byte
//! does not.

use super::lz4::{append_compressed, decompress_exact};
use super::{Codec, CodecTag};
use crate::error::{Error, Result};

/// Byte-plane split + lz4: 1.16–1.19× on real bf16 KV.
#[derive(Clone, Copy, Debug, Default)]
pub struct Lz4Planes;

const MAX_ELEM: usize = 8;

impl Codec for Lz4Planes {
    fn tag(&self) -> CodecTag {
        CodecTag::Lz4Planes
    }

    fn encode(&self, src: &[u8], elem_size: usize, dst: &mut Vec<u8>) -> Result<()> {
        if elem_size == 0 || elem_size > MAX_ELEM {
            return Err(Error::invalid(format!(
                "lz4-planes: element size {elem_size}"
            )));
        }
        let n = src.len() / elem_size;
        let header = 1 + 4 * elem_size;
        dst.clear();
        dst.resize(header, 0);
        dst[0] = elem_size as u8;
        let mut plane = vec![0u8; n];
        for p in 0..elem_size {
            split_plane(&src[..n * elem_size], elem_size, p, &mut plane);
            let before = dst.len();
            append_compressed(&plane, dst);
            let len = (dst.len() - before) as u32;
            dst[1 + 4 * p..5 + 4 * p].copy_from_slice(&len.to_le_bytes());
        }
        dst.extend_from_slice(&src[n * elem_size..]);
        Ok(())
    }

    fn decode(&self, src: &[u8], _elem_size: usize, dst: &mut [u8]) -> Result<()> {
        let es = *src
            .first()
            .ok_or_else(|| Error::corrupt("lz4-planes: empty record"))? as usize;
        if es == 0 || es > MAX_ELEM || src.len() < 1 + 4 * es {
            return Err(Error::corrupt(format!(
                "lz4-planes: bad header (element size {es})"
            )));
        }
        let n = dst.len() / es;
        let mut pos = 1 + 4 * es;
        let mut plane = vec![0u8; n];
        for p in 0..es {
            let len = u32::from_le_bytes(src[1 + 4 * p..5 + 4 * p].try_into().unwrap()) as usize;
            let end = pos
                .checked_add(len)
                .filter(|&e| e <= src.len())
                .ok_or_else(|| Error::corrupt("lz4-planes: plane runs past the record"))?;
            decompress_exact(&src[pos..end], &mut plane)?;
            merge_plane(&plane, es, p, &mut dst[..n * es]);
            pos = end;
        }
        let tail = &src[pos..];
        if tail.len() != dst.len() - n * es {
            return Err(Error::corrupt("lz4-planes: tail length mismatch"));
        }
        dst[n * es..].copy_from_slice(tail);
        Ok(())
    }
}

/// `plane[i] = src[i * es + p]`, with the common element sizes unrolled so
/// the loop vectorises (no bounds checks inside `chunks_exact`).
fn split_plane(src: &[u8], es: usize, p: usize, plane: &mut [u8]) {
    match es {
        2 => src
            .chunks_exact(2)
            .zip(plane.iter_mut())
            .for_each(|(c, o)| *o = c[p]),
        4 => src
            .chunks_exact(4)
            .zip(plane.iter_mut())
            .for_each(|(c, o)| *o = c[p]),
        _ => src
            .chunks_exact(es)
            .zip(plane.iter_mut())
            .for_each(|(c, o)| *o = c[p]),
    }
}

/// `dst[i * es + p] = plane[i]`.
fn merge_plane(plane: &[u8], es: usize, p: usize, dst: &mut [u8]) {
    match es {
        2 => dst
            .chunks_exact_mut(2)
            .zip(plane)
            .for_each(|(c, &b)| c[p] = b),
        4 => dst
            .chunks_exact_mut(4)
            .zip(plane)
            .for_each(|(c, &b)| c[p] = b),
        _ => dst
            .chunks_exact_mut(es)
            .zip(plane)
            .for_each(|(c, &b)| c[p] = b),
    }
}
