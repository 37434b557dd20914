//! `exp-huff` (tag 3): Huffman-coded exponent plane, raw mantissa planes.
//!
//! The high byte of each element (bf16: sign + 7 exponent bits; fp16: sign +
//! exponent + 2 mantissa bits; fp32: sign + 7 exponent bits; 1-byte fp8: the
//! whole byte) carries ~3 bits of entropy on real KV; the lower bytes are
//! close to 8 bits and are stored as they are. On real bf16 KV this reaches
//! 1.450× against an order-0 bound of 1.457× (BENCHMARKS.md).
//!
//! # Record format (version 1, all integers little-endian)
//!
//! ```text
//!  off  size
//!    0    1  version (1)
//!    1    1  element size es (1..=8)
//!    2    1  coded planes k (1: byte es-1 of every element)
//!    3    1  log2 of chunk elements (10..=16)
//!    4    4  n: elements (raw length / es, rounded down)
//!    8  128  code lengths of the 256 byte values, 4 bits each (low nibble
//!            first; 0 = absent; 1..=11), a complete prefix code
//!  136  4*C  chunk directory, C = ceil(n / chunk): coded bytes of chunk c,
//!            bit 31 set when the chunk's plane is stored raw
//!    …  n*(es-k)  raw planes 0..es-k, plane-major (plane p = byte p of
//!            every element)
//!    …   …   chunk payloads in order
//!    …   …   tail: raw length % es bytes, raw
//! ```
//!
//! A coded chunk of m symbols holds 4 interleaved streams: stream j codes
//! symbols `[j*s, min((j+1)*s, m))`, s = ceil(m/4); a 6-byte prefix gives
//! the byte lengths of streams 0..2 (u16 each), stream 3 takes the rest.
//! Streams are LSB-first bit packings of canonical codes (bit-reversed so
//! that the next 11 bits index the decode table directly). Chunks are
//! independent given the record's table: the CPU decoder fans them out
//! across threads ([`decode_parallel`]); a GPU kernel decodes one chunk per
//! thread block with the 2048-entry table in shared memory (chunk offsets
//! are a prefix sum of the directory).

use super::{Codec, CodecTag};
use crate::error::{Error, Result};

/// Longest code, and the decode table's index width.
const MAX_LEN: u32 = 11;
const LUT_SIZE: usize = 1 << MAX_LEN;
const LUT_MASK: u64 = LUT_SIZE as u64 - 1;
const VERSION: u8 = 1;
const HEADER: usize = 8 + 128;
/// Default chunk: 32 Ki elements (64 KiB of bf16).
const CHUNK_LOG2: u8 = 15;
const RAW_FLAG: u32 = 1 << 31;
const STREAMS: usize = 4;
const STREAM_HDR: usize = 6;
/// Symbols decoded per 64-bit load: 5 * 11 bits ≤ 57 valid bits.
const PER_LOAD: usize = 5;

/// Huffman-coded exponent plane + raw mantissa planes.
#[derive(Clone, Copy, Debug, Default)]
pub struct ExpHuff;

impl Codec for ExpHuff {
    fn tag(&self) -> CodecTag {
        CodecTag::ExpHuff
    }

    fn encode(&self, src: &[u8], elem_size: usize, dst: &mut Vec<u8>) -> Result<()> {
        encode(src, elem_size, CHUNK_LOG2, dst)
    }

    fn decode(&self, src: &[u8], elem_size: usize, dst: &mut [u8]) -> Result<()> {
        decode_parallel(src, elem_size, dst, 1)
    }
}

fn corrupt(what: &str) -> Error {
    Error::corrupt(format!("exp-huff: {what}"))
}

// ------------------------------------------------------------------ tables

/// Code lengths (≤ MAX_LEN) of a complete prefix code for `freq`; symbols
/// with zero frequency get 0, except that at least two symbols are coded.
fn code_lengths(freq: &[u64; 256]) -> [u8; 256] {
    let mut syms: Vec<(u64, usize)> = (0..256)
        .filter(|&s| freq[s] > 0)
        .map(|s| (freq[s], s))
        .collect();
    // at least two symbols, so every symbol has a code of ≥ 1 bit
    let mut filler = 0;
    while syms.len() < 2 {
        if !syms.iter().any(|&(_, s)| s == filler) {
            syms.push((0, filler));
        }
        filler += 1;
    }
    syms.sort_unstable();
    // Huffman by two queues over (weight, node); nodes < n are leaves.
    let n = syms.len();
    let mut parent = vec![0usize; 2 * n - 1];
    let mut weight: Vec<u64> = syms.iter().map(|&(f, _)| f).collect();
    weight.resize(2 * n - 1, 0);
    let (mut leaf, mut inner, mut next) = (0usize, n, n);
    let pick = |leaf: &mut usize, inner: &mut usize, next: usize, w: &[u64]| {
        if *leaf < n && (*inner >= next || w[*leaf] <= w[*inner]) {
            *leaf += 1;
            *leaf - 1
        } else {
            *inner += 1;
            *inner - 1
        }
    };
    while next < 2 * n - 1 {
        let a = pick(&mut leaf, &mut inner, next, &weight);
        let b = pick(&mut leaf, &mut inner, next, &weight);
        weight[next] = weight[a] + weight[b];
        parent[a] = next;
        parent[b] = next;
        next += 1;
    }
    let mut depth = vec![0u32; 2 * n - 1];
    for i in (0..2 * n - 2).rev() {
        depth[i] = depth[parent[i]] + 1;
    }
    let mut lens = [0u8; 256];
    for (i, &(_, s)) in syms.iter().enumerate() {
        lens[s] = depth[i].min(MAX_LEN) as u8;
    }
    // Limit to MAX_LEN, then make the code complete again (Kraft sum exactly
    // 2^MAX_LEN), favouring frequent symbols for the shorter codes.
    let unit = |l: u8| 1u64 << (MAX_LEN - l as u32);
    let mut kraft: u64 = syms.iter().map(|&(_, s)| unit(lens[s])).sum();
    let full = 1u64 << MAX_LEN;
    // over-full: lengthen the least frequent codes that are still short
    while kraft > full {
        let &(_, s) = syms
            .iter()
            .filter(|&&(_, s)| lens[s] < MAX_LEN as u8)
            .max_by_key(|&&(f, s)| (lens[s], std::cmp::Reverse(f)))
            .expect("a code shorter than MAX_LEN exists while over-full");
        kraft -= unit(lens[s]) / 2;
        lens[s] += 1;
    }
    // under-full: shorten the longest (most frequent first) codes that fit
    while kraft < full {
        let gap = full - kraft;
        let &(_, s) = syms
            .iter()
            .filter(|&&(_, s)| lens[s] > 1 && unit(lens[s]) <= gap)
            .max_by_key(|&&(f, s)| (lens[s], f))
            .expect("the longest code's unit divides the gap");
        kraft += unit(lens[s]);
        lens[s] -= 1;
    }
    lens
}

/// Canonical codes, bit-reversed for LSB-first packing: `(code, len)`.
fn canonical(lens: &[u8; 256]) -> [(u16, u8); 256] {
    let mut count = [0u16; MAX_LEN as usize + 1];
    for &l in lens {
        count[l as usize] += 1;
    }
    count[0] = 0;
    let mut next = [0u16; MAX_LEN as usize + 2];
    let mut code = 0u16;
    for l in 1..=MAX_LEN as usize {
        code = (code + count[l - 1]) << 1;
        next[l] = code;
    }
    let mut out = [(0u16, 0u8); 256];
    for s in 0..256 {
        let l = lens[s];
        if l > 0 {
            let c = next[l as usize];
            next[l as usize] += 1;
            out[s] = (c.reverse_bits() >> (16 - l as u32), l);
        }
    }
    out
}

/// Decode tables for one record's code.
struct Tables {
    /// Per 11-bit window: `symbol | len << 8` of its first code.
    single: [u16; LUT_SIZE],
    /// Per 11-bit window: up to three whole codes it holds:
    /// `sym0 | sym1 << 8 | sym2 << 16 | bits << 24 | count << 28`.
    multi: [u32; LUT_SIZE],
}

/// Parses and checks the 128-byte length table; builds the decode tables.
fn decode_tables(packed: &[u8]) -> Result<Box<Tables>> {
    let mut lens = [0u8; 256];
    for (i, &b) in packed.iter().take(128).enumerate() {
        lens[2 * i] = b & 15;
        lens[2 * i + 1] = b >> 4;
    }
    let mut kraft = 0u64;
    for &l in &lens {
        if l as u32 > MAX_LEN {
            return Err(corrupt("code length over 11"));
        }
        if l > 0 {
            kraft += 1 << (MAX_LEN - l as u32);
        }
    }
    if kraft != 1 << MAX_LEN {
        return Err(corrupt("code lengths do not form a complete code"));
    }
    let mut t = Box::new(Tables {
        single: [0; LUT_SIZE],
        multi: [0; LUT_SIZE],
    });
    for (s, &(c, l)) in canonical(&lens).iter().enumerate() {
        if l == 0 {
            continue;
        }
        let mut i = c as usize;
        while i < LUT_SIZE {
            t.single[i] = s as u16 | (l as u16) << 8;
            i += 1 << l;
        }
    }
    // A complete code fills every window, so every entry has a first code.
    for w in 0..LUT_SIZE {
        let mut e = 0u32;
        let (mut used, mut count) = (0u32, 0u32);
        while count < 3 {
            let x = t.single[(w >> used) & (LUT_SIZE - 1)];
            let l = (x >> 8) as u32;
            if used + l > MAX_LEN {
                break; // the code runs past the window's bits
            }
            e |= ((x & 0xff) as u32) << (8 * count);
            used += l;
            count += 1;
        }
        t.multi[w] = e | used << 24 | count << 28;
    }
    Ok(t)
}

// ------------------------------------------------------------------ encode

fn encode(src: &[u8], es: usize, chunk_log2: u8, dst: &mut Vec<u8>) -> Result<()> {
    if !(1..=8).contains(&es) {
        return Err(Error::invalid(format!("exp-huff: element size {es}")));
    }
    let n = src.len() / es;
    let n32 = u32::try_from(n)
        .map_err(|_| Error::invalid("exp-huff: more than 2^32 elements in one record"))?;
    let chunk = 1usize << chunk_log2;
    let n_chunks = n.div_ceil(chunk);
    let body = &src[..n * es];
    let top = es - 1;

    // pass 1: the coded plane and its histograms, per chunk and in total
    let dir_off = HEADER;
    let raw_off = dir_off + 4 * n_chunks;
    let coded_off = raw_off + n * top;
    dst.clear();
    dst.reserve(coded_off + n + n_chunks * (STREAM_HDR + 32) + es);
    dst.resize(coded_off, 0);
    let mut plane = vec![0u8; n];
    let raw = &mut dst[raw_off..coded_off];
    match es {
        1 => plane.copy_from_slice(body),
        2 => split::<2>(body, &mut plane, raw),
        4 => split::<4>(body, &mut plane, raw),
        8 => split::<8>(body, &mut plane, raw),
        _ => split_any(body, es, &mut plane, raw),
    }
    let mut chunk_hist = vec![[0u32; 256]; n_chunks];
    let mut freq = [0u64; 256];
    for (c, h) in plane.chunks(chunk).zip(chunk_hist.iter_mut()) {
        histogram(c, h);
        for s in 0..256 {
            freq[s] += h[s] as u64;
        }
    }
    let lens = code_lengths(&freq);
    let codes = canonical(&lens).map(|(c, l)| c as u32 | (l as u32) << 16);

    dst[0] = VERSION;
    dst[1] = es as u8;
    dst[2] = 1;
    dst[3] = chunk_log2;
    dst[4..8].copy_from_slice(&n32.to_le_bytes());
    for i in 0..128 {
        dst[8 + i] = lens[2 * i] | lens[2 * i + 1] << 4;
    }
    // chunks
    for (c, (syms, h)) in plane.chunks(chunk).zip(&chunk_hist).enumerate() {
        let bits: u64 = (0..256).map(|s| h[s] as u64 * lens[s] as u64).sum();
        let coded_est = bits.div_ceil(8) as usize + STREAM_HDR + STREAMS;
        let start = dst.len();
        let entry = if coded_est >= syms.len() {
            dst.extend_from_slice(syms);
            syms.len() as u32 | RAW_FLAG
        } else {
            encode_chunk(syms, &codes, bits, dst);
            (dst.len() - start) as u32
        };
        dst[dir_off + 4 * c..dir_off + 4 * c + 4].copy_from_slice(&entry.to_le_bytes());
    }
    dst.extend_from_slice(&src[n * es..]);
    Ok(())
}

fn histogram(syms: &[u8], h: &mut [u32; 256]) {
    // four tables break the store-to-load dependency on repeated symbols
    let mut t = [[0u32; 256]; 4];
    let mut it = syms.chunks_exact(4);
    for q in &mut it {
        t[0][q[0] as usize] += 1;
        t[1][q[1] as usize] += 1;
        t[2][q[2] as usize] += 1;
        t[3][q[3] as usize] += 1;
    }
    for &s in it.remainder() {
        t[0][s as usize] += 1;
    }
    for s in 0..256 {
        h[s] = t[0][s] + t[1][s] + t[2][s] + t[3][s];
    }
}

/// Appends one coded chunk (stream-length prefix + 4 streams) to `dst`;
/// `bits` is the chunk's exact coded size in bits.
fn encode_chunk(syms: &[u8], codes: &[u32; 256], bits: u64, dst: &mut Vec<u8>) {
    let seg = syms.len().div_ceil(STREAMS).max(1);
    let hdr = dst.len();
    // each stream rounds up to a byte; 8 bytes of slack for the word stores
    dst.resize(
        hdr + STREAM_HDR + bits.div_ceil(8) as usize + STREAMS + 8,
        0,
    );
    let out = &mut dst[hdr..];
    let mut pos = STREAM_HDR;
    for (j, part) in syms.chunks(seg).enumerate() {
        let len = encode_stream(part, codes, &mut out[pos..]);
        if j < STREAMS - 1 {
            out[2 * j..2 * j + 2].copy_from_slice(&(len as u16).to_le_bytes());
        }
        pos += len;
    }
    dst.truncate(hdr + pos);
}

/// LSB-first bit packing of `syms`' codes (`code | len << 16`) into `out`,
/// which has room for them plus 8 bytes; returns the bytes used.
fn encode_stream(syms: &[u8], codes: &[u32; 256], out: &mut [u8]) -> usize {
    let (mut acc, mut nbits, mut pos) = (0u64, 0u32, 0usize);
    let mut it = syms.chunks_exact(4);
    for q in &mut it {
        for &s in q {
            let e = codes[s as usize];
            acc |= ((e & 0xffff) as u64) << nbits;
            nbits += e >> 16;
        }
        // ≤ 7 + 44 bits pending: flush whole bytes
        out[pos..pos + 8].copy_from_slice(&acc.to_le_bytes());
        let bytes = nbits >> 3;
        pos += bytes as usize;
        acc >>= bytes * 8;
        nbits &= 7;
    }
    for &s in it.remainder() {
        let e = codes[s as usize];
        acc |= ((e & 0xffff) as u64) << nbits;
        nbits += e >> 16;
    }
    out[pos..pos + 8].copy_from_slice(&acc.to_le_bytes());
    pos + nbits.div_ceil(8) as usize
}

// ------------------------------------------------------------------ decode

/// A parsed, checked record: where everything is.
struct Layout<'a> {
    es: usize,
    n: usize,
    chunk: usize,
    tables: Box<Tables>,
    raw: &'a [u8],
    /// (flag-stripped payload, raw?) per chunk.
    chunks: Vec<(&'a [u8], bool)>,
    tail: &'a [u8],
}

fn parse<'a>(src: &'a [u8], elem_size: usize, raw_len: usize) -> Result<Layout<'a>> {
    if src.len() < HEADER {
        return Err(corrupt("record shorter than its header"));
    }
    let (ver, es, k, log2) = (src[0], src[1] as usize, src[2], src[3]);
    if ver != VERSION {
        return Err(corrupt(&format!("unknown version {ver}")));
    }
    if es != elem_size || !(1..=8).contains(&es) {
        return Err(corrupt(&format!(
            "element size {es}, the store says {elem_size}"
        )));
    }
    if k != 1 || !(10..=16).contains(&log2) {
        return Err(corrupt("bad plane count or chunk size"));
    }
    let n = u32::from_le_bytes([src[4], src[5], src[6], src[7]]) as usize;
    if n != raw_len / es {
        return Err(corrupt("element count does not match the raw length"));
    }
    let tables = decode_tables(&src[8..HEADER])?;
    let chunk = 1usize << log2;
    let n_chunks = n.div_ceil(chunk);
    let raw_off = n_chunks
        .checked_mul(4)
        .and_then(|d| d.checked_add(HEADER))
        .ok_or_else(|| corrupt("directory size overflows"))?;
    let coded_off = n
        .checked_mul(es - 1)
        .and_then(|r| r.checked_add(raw_off))
        .filter(|&o| o <= src.len())
        .ok_or_else(|| corrupt("record shorter than its raw planes"))?;
    let mut chunks = Vec::with_capacity(n_chunks);
    let mut pos = coded_off;
    for c in 0..n_chunks {
        let d = &src[HEADER + 4 * c..HEADER + 4 * c + 4];
        let e = u32::from_le_bytes([d[0], d[1], d[2], d[3]]);
        let len = (e & !RAW_FLAG) as usize;
        let end = pos
            .checked_add(len)
            .filter(|&x| x <= src.len())
            .ok_or_else(|| corrupt("chunk runs past the record"))?;
        chunks.push((&src[pos..end], e & RAW_FLAG != 0));
        pos = end;
    }
    let tail = &src[pos..];
    if tail.len() != raw_len - n * es {
        return Err(corrupt("tail length mismatch"));
    }
    Ok(Layout {
        es,
        n,
        chunk,
        tables,
        raw: &src[raw_off..coded_off],
        chunks,
        tail,
    })
}

/// Decodes `src` into `dst` using up to `threads` threads (chunks are
/// independent). `threads <= 1` decodes on the calling thread.
pub fn decode_parallel(src: &[u8], elem_size: usize, dst: &mut [u8], threads: usize) -> Result<()> {
    let l = parse(src, elem_size, dst.len())?;
    let (es, n) = (l.es, l.n);
    let (body, tail) = dst.split_at_mut(n * es);
    tail.copy_from_slice(l.tail);
    let work = |first: usize, out: &mut [u8]| -> Result<()> {
        let mut syms = vec![0u8; l.chunk];
        for (i, o) in out.chunks_mut(l.chunk * es).enumerate() {
            let c = first + i;
            let m = o.len() / es;
            let (payload, raw) = l.chunks[c];
            let s = &mut syms[..m];
            if raw {
                if payload.len() != m {
                    return Err(corrupt("raw chunk length mismatch"));
                }
                s.copy_from_slice(payload);
            } else {
                decode_chunk(payload, &l.tables, s)?;
            }
            merge(s, l.raw, n, c * l.chunk, es, o);
        }
        Ok(())
    };
    let n_chunks = l.chunks.len();
    let threads = threads.clamp(1, n_chunks.max(1));
    if threads == 1 {
        return work(0, body);
    }
    let per = n_chunks.div_ceil(threads);
    std::thread::scope(|sc| {
        let hs: Vec<_> = body
            .chunks_mut(per * l.chunk * es)
            .enumerate()
            .map(|(t, o)| {
                let w = &work;
                sc.spawn(move || w(t * per, o))
            })
            .collect();
        hs.into_iter()
            .try_for_each(|h| h.join().expect("exp-huff decode thread panicked"))
    })
}

/// Writes elements `[first, first + syms.len())`: the top byte from `syms`,
/// the others from the raw planes (plane p at `raw[p * n..]`).
fn merge(syms: &[u8], raw: &[u8], n: usize, first: usize, es: usize, out: &mut [u8]) {
    let m = syms.len();
    match es {
        1 => out.copy_from_slice(syms),
        2 => {
            let lo = &raw[first..first + m];
            for ((o, &h), &l) in out.chunks_exact_mut(2).zip(syms).zip(lo) {
                o.copy_from_slice(&[l, h]);
            }
        }
        4 => {
            let p0 = &raw[first..first + m];
            let p1 = &raw[n + first..n + first + m];
            let p2 = &raw[2 * n + first..2 * n + first + m];
            for ((((o, &h), &a), &b), &c) in
                out.chunks_exact_mut(4).zip(syms).zip(p0).zip(p1).zip(p2)
            {
                o.copy_from_slice(&[a, b, c, h]);
            }
        }
        _ => {
            for (i, (o, &h)) in out.chunks_exact_mut(es).zip(syms).enumerate() {
                for (p, b) in o[..es - 1].iter_mut().enumerate() {
                    *b = raw[p * n + first + i];
                }
                o[es - 1] = h;
            }
        }
    }
}

/// Up to 8 bytes of `s` from `pos` as a little-endian word; zero beyond the
/// end (never read past the slice).
#[inline(always)]
fn load(s: &[u8], pos: usize) -> u64 {
    match s.get(pos..pos + 8) {
        Some(b) => u64::from_le_bytes(b.try_into().expect("8 bytes")),
        None => {
            let mut w = [0u8; 8];
            if pos < s.len() {
                let b = &s[pos..];
                w[..b.len()].copy_from_slice(b);
            }
            u64::from_le_bytes(w)
        }
    }
}

/// Up to 15 symbols of one stream: one load, 5 multi-symbol lookups. The
/// caller guarantees `out[*o..*o + 16]` belongs to the stream.
#[inline(always)]
fn step(payload: &[u8], t: &Tables, out: &mut [u8], o: &mut usize, bp: &mut usize) {
    let mut v = load(payload, *bp >> 3) >> (*bp & 7);
    let (mut p, mut used) = (*o, 0u32);
    for _ in 0..PER_LOAD {
        let e = t.multi[(v & LUT_MASK) as usize];
        out[p..p + 4].copy_from_slice(&e.to_le_bytes());
        let bits = (e >> 24) & 15;
        p += (e >> 28) as usize;
        v >>= bits;
        used += bits;
    }
    *o = p;
    *bp += used as usize;
}

/// Decodes one coded chunk into `out` (its symbol count).
fn decode_chunk(payload: &[u8], t: &Tables, out: &mut [u8]) -> Result<()> {
    let m = out.len();
    if payload.len() < STREAM_HDR {
        return Err(corrupt("coded chunk shorter than its stream table"));
    }
    let mut ends = [0usize; STREAMS];
    let mut pos = STREAM_HDR;
    for (j, e) in ends.iter_mut().enumerate().take(STREAMS - 1) {
        pos += u16::from_le_bytes([payload[2 * j], payload[2 * j + 1]]) as usize;
        *e = pos;
    }
    ends[STREAMS - 1] = payload.len();
    if ends[STREAMS - 2] > payload.len() {
        return Err(corrupt("stream lengths run past the chunk"));
    }
    let starts = [STREAM_HDR, ends[0], ends[1], ends[2]];
    let seg = m.div_ceil(STREAMS).max(1);
    // bit positions (absolute in `payload`) and output positions of the streams
    let mut bp = starts.map(|s| s * 8);
    let lim = [seg.min(m), (2 * seg).min(m), (3 * seg).min(m), m];
    let mut op = [0, lim[0], lim[1], lim[2]];

    // Fast path: the four streams in lockstep (independent dependency
    // chains for the CPU to overlap); per stream one 64-bit load (≥ 57
    // valid bits), then 5 lookups of 11 bits, each yielding 1-3 whole
    // symbols stored as one 4-byte write. A stream takes a step only with
    // ≥ 16 symbols left, so no store reaches the next stream's output.
    while (0..STREAMS).all(|j| lim[j] - op[j] >= 16) {
        step(payload, t, out, &mut op[0], &mut bp[0]);
        step(payload, t, out, &mut op[1], &mut bp[1]);
        step(payload, t, out, &mut op[2], &mut bp[2]);
        step(payload, t, out, &mut op[3], &mut bp[3]);
    }
    // Streams run at different symbols per bit: finish each one's fast part.
    for j in 0..STREAMS {
        while lim[j] - op[j] >= 16 {
            step(payload, t, out, &mut op[j], &mut bp[j]);
        }
    }
    // Tails, one symbol at a time.
    for j in 0..STREAMS {
        for x in out[op[j]..lim[j]].iter_mut() {
            let v = load(payload, bp[j] >> 3) >> (bp[j] & 7);
            let e = t.single[(v & LUT_MASK) as usize];
            *x = e as u8;
            bp[j] += (e >> 8) as usize;
        }
        // each stream ends in its last byte, exactly
        if bp[j].div_ceil(8) != ends[j] {
            return Err(corrupt("stream length does not match its symbols"));
        }
    }
    Ok(())
}

/// Splits elements of `ES` bytes: the top byte into `top`, bytes
/// `0..ES-1` into the planes of `raw` (plane p at `raw[p * n..]`).
fn split<const ES: usize>(src: &[u8], top: &mut [u8], raw: &mut [u8]) {
    let n = top.len();
    if ES == 2 {
        // fixed-size blocks so the compiler emits byte shuffles
        let mut s = src.chunks_exact(64);
        let mut t = top.chunks_exact_mut(32);
        let mut r = raw.chunks_exact_mut(32);
        for ((s, t), r) in (&mut s).zip(&mut t).zip(&mut r) {
            let s: &[u8; 64] = s.try_into().expect("64");
            let t: &mut [u8; 32] = t.try_into().expect("32");
            let r: &mut [u8; 32] = r.try_into().expect("32");
            let mut w = [0u16; 32];
            for (i, x) in w.iter_mut().enumerate() {
                *x = u16::from_le_bytes([s[2 * i], s[2 * i + 1]]);
            }
            for i in 0..32 {
                t[i] = (w[i] >> 8) as u8;
                r[i] = (w[i] & 0xff) as u8;
            }
        }
        let s = s.remainder();
        for ((c, t), r) in s
            .chunks_exact(2)
            .zip(t.into_remainder())
            .zip(r.into_remainder())
        {
            *t = c[1];
            *r = c[0];
        }
        return;
    }
    for (c, t) in src.chunks_exact(ES).zip(top.iter_mut()) {
        *t = c[ES - 1];
    }
    for (p, plane) in raw.chunks_exact_mut(n.max(1)).enumerate().take(ES - 1) {
        for (c, r) in src.chunks_exact(ES).zip(plane.iter_mut()) {
            *r = c[p];
        }
    }
}

fn split_any(src: &[u8], es: usize, top: &mut [u8], raw: &mut [u8]) {
    let n = top.len();
    for (i, (c, t)) in src.chunks_exact(es).zip(top.iter_mut()).enumerate() {
        *t = c[es - 1];
        for (p, &b) in c[..es - 1].iter().enumerate() {
            raw[p * n + i] = b;
        }
    }
}

/// Encodes with an explicit chunk size (tests, benchmarks).
#[doc(hidden)]
pub fn encode_with_chunk(src: &[u8], es: usize, chunk_log2: u8, dst: &mut Vec<u8>) -> Result<()> {
    if !(10..=16).contains(&chunk_log2) {
        return Err(Error::invalid("exp-huff: chunk log2 must be 10..=16"));
    }
    encode(src, es, chunk_log2, dst)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rt(data: &[u8], es: usize, log2: u8) -> Vec<u8> {
        let mut enc = Vec::new();
        encode_with_chunk(data, es, log2, &mut enc).unwrap();
        for threads in [1, 3] {
            let mut dec = vec![0u8; data.len()];
            decode_parallel(&enc, es, &mut dec, threads).unwrap();
            assert_eq!(dec, data, "es {es} log2 {log2} threads {threads}");
        }
        enc
    }

    #[test]
    fn lengths_are_complete_and_limited() {
        // Fibonacci frequencies force long codes
        let mut f = [0u64; 256];
        let (mut a, mut b) = (1u64, 1u64);
        for x in f.iter_mut().take(40) {
            *x = a;
            (a, b) = (b, a + b);
        }
        let l = code_lengths(&f);
        assert!(l.iter().all(|&x| x as u32 <= MAX_LEN));
        let k: u64 = l
            .iter()
            .filter(|&&x| x > 0)
            .map(|&x| 1u64 << (MAX_LEN - x as u32))
            .sum();
        assert_eq!(k, 1 << MAX_LEN);
        // one symbol: still a complete code of two 1-bit codes
        let mut one = [0u64; 256];
        one[7] = 100;
        let l = code_lengths(&one);
        assert_eq!((l[7], l.iter().filter(|&&x| x > 0).count()), (1, 2));
        // flat 256: all 8 bits
        assert!(code_lengths(&[5u64; 256]).iter().all(|&x| x == 8));
    }

    #[test]
    fn round_trips_shapes_and_sizes() {
        let kv = crate::codec::tests::kv_like(100_003, 4);
        for es in [1, 2, 3, 4, 8] {
            for log2 in [10, 15] {
                rt(&kv, es, log2);
                rt(&kv[..es * 5 + 1], es, log2);
                rt(&[], es, log2);
            }
        }
        rt(&vec![0u8; 70_000], 2, 10);
        rt(&[1, 2, 3], 2, 10);
    }

    #[test]
    fn skewed_planes_compress_and_noise_chunks_store_raw() {
        let kv = crate::codec::tests::kv_like(1 << 18, 8);
        let enc = rt(&kv, 2, 15);
        // high plane ~2 bits of 8: ~(8 + 2)/16 of the input
        assert!(
            enc.len() < kv.len() * 7 / 10,
            "{} of {}",
            enc.len(),
            kv.len()
        );
        let mut x = 1u64;
        let noise: Vec<u8> = (0..1 << 16)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (x >> 56) as u8
            })
            .collect();
        let enc = rt(&noise, 1, 12);
        assert!(
            enc.len() <= noise.len() + HEADER + 4 * 16 + 1,
            "{}",
            enc.len()
        );
    }
}
