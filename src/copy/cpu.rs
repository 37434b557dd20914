//! The CPU copy engine: gathers and scatters over host memory on the calling
//! thread.
//!
//! Head-major (`LBHNC`) pages are contiguous and move as one copy per layer;
//! token-major (`LBNHC`) pages are transposed row by row (one row = one
//! token of one head, K then V) into the canonical head-major record.
//!
//! A call that moves at least [`STREAM_MIN_BYTES`] writes its destination
//! with non-temporal stores (x86-64), as `memcpy` itself does for large
//! copies: the bytes go straight to DRAM without first reading every
//! destination line into the cache, and a big batch does not evict the
//! working set. Smaller calls use ordinary stores, so a record that is
//! compressed right after its gather is still in cache. Either way the call
//! ends with a store fence, so the bytes are visible to whichever thread
//! receives the buffer next.

use super::{check_len, CopyEngine, GatherOp, KvCaches, ScatterOp};
use crate::block::KvLayout;
use crate::error::{Error, Result};
use std::ops::Range;

/// Calls moving at least this many bytes use non-temporal stores.
pub const STREAM_MIN_BYTES: usize = 16 << 20;

/// Bytes of the next source page hinted into the cache before the current
/// page is copied (the hardware prefetcher cannot guess a jump).
const PREFETCH_BYTES: usize = 1024;

/// Copies between host-memory views and records on the calling thread.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuEngine;

impl CpuEngine {
    fn check_host(kv: &KvCaches) -> Result<()> {
        if kv.on_device() {
            return Err(Error::unsupported(
                "the CPU copy engine cannot touch device memory; use the CUDA engine",
            ));
        }
        Ok(())
    }
}

/// Raw byte copies, optionally with non-temporal stores.
mod raw {
    /// Copies `len` bytes from `src` to `dst`.
    ///
    /// # Safety
    /// `src` readable and `dst` writable for `len` bytes, not overlapping.
    #[inline(always)]
    pub(super) unsafe fn copy(dst: *mut u8, src: *const u8, len: usize, stream: bool) {
        #[cfg(target_arch = "x86_64")]
        if stream && len >= 128 {
            return stream_copy(dst, src, len);
        }
        let _ = stream;
        std::ptr::copy_nonoverlapping(src, dst, len)
    }

    /// Unaligned loads, 16-byte aligned non-temporal stores, one cache
    /// line per iteration; head and tail with ordinary copies.
    ///
    /// # Safety
    /// As [`copy`].
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn stream_copy(mut dst: *mut u8, mut src: *const u8, mut len: usize) {
        use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_stream_si128};
        let head = dst.align_offset(16).min(len);
        if head > 0 {
            std::ptr::copy_nonoverlapping(src, dst, head);
            src = src.add(head);
            dst = dst.add(head);
            len -= head;
        }
        while len >= 64 {
            let s = src as *const __m128i;
            let d = dst as *mut __m128i;
            let (a, b, c, e) = (
                _mm_loadu_si128(s),
                _mm_loadu_si128(s.add(1)),
                _mm_loadu_si128(s.add(2)),
                _mm_loadu_si128(s.add(3)),
            );
            _mm_stream_si128(d, a);
            _mm_stream_si128(d.add(1), b);
            _mm_stream_si128(d.add(2), c);
            _mm_stream_si128(d.add(3), e);
            src = src.add(64);
            dst = dst.add(64);
            len -= 64;
        }
        while len >= 16 {
            _mm_stream_si128(dst as *mut __m128i, _mm_loadu_si128(src as *const __m128i));
            src = src.add(16);
            dst = dst.add(16);
            len -= 16;
        }
        std::ptr::copy_nonoverlapping(src, dst, len);
    }

    /// Hints the first `len` bytes at `addr` into the cache. Never faults.
    #[inline(always)]
    pub(super) fn prefetch(addr: *const u8, len: usize) {
        #[cfg(target_arch = "x86_64")]
        for off in (0..len).step_by(64) {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            // SAFETY: prefetch is a hint; it never faults, whatever the address.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(addr.wrapping_add(off) as *const i8) }
        }
        let _ = (addr, len);
    }

    /// Orders the non-temporal stores before whatever the caller does next.
    #[inline]
    pub(super) fn fence(stream: bool) {
        #[cfg(target_arch = "x86_64")]
        if stream {
            // SAFETY: sfence has no preconditions (SSE is part of x86-64).
            unsafe { std::arch::x86_64::_mm_sfence() }
        }
        let _ = stream;
    }
}

/// Which way a page moves.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Dir {
    /// vLLM page → record.
    Gather,
    /// record → vLLM page.
    Scatter,
}

/// Moves one layer page between vLLM's order at `page` and the canonical
/// head-major order at `rec`.
///
/// # Safety
/// Both ranges hold `h * n * row` bytes, valid for the direction's reads
/// and writes, not overlapping.
#[inline(always)]
unsafe fn move_page(
    layout: KvLayout,
    dir: Dir,
    page: *mut u8,
    rec: *mut u8,
    (h, n, row): (usize, usize, usize),
    stream: bool,
) {
    match (layout, dir) {
        (KvLayout::Lbhnc, Dir::Gather) => raw::copy(rec, page, h * n * row, stream),
        (KvLayout::Lbhnc, Dir::Scatter) => raw::copy(page, rec, h * n * row, stream),
        // Token-major page: row (t, hd) at (t * h + hd) * row; record row at
        // (hd * n + t) * row. Read the source sequentially (the hardware
        // prefetcher follows it); the strided side is the store side, where
        // full-line (streaming) stores do not care about order.
        (KvLayout::Lbnhc, Dir::Gather) => {
            for t in 0..n {
                for hd in 0..h {
                    raw::copy(
                        rec.add((hd * n + t) * row),
                        page.add((t * h + hd) * row),
                        row,
                        stream,
                    )
                }
            }
        }
        (KvLayout::Lbnhc, Dir::Scatter) => {
            for hd in 0..h {
                for t in 0..n {
                    raw::copy(
                        page.add((t * h + hd) * row),
                        rec.add((hd * n + t) * row),
                        row,
                        stream,
                    )
                }
            }
        }
    }
}

impl CopyEngine for CpuEngine {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn gather(&self, kv: &KvCaches, ops: &mut [GatherOp<'_>]) -> Result<()> {
        gather_impl(kv, ops, None)
    }

    fn scatter_layers(
        &self,
        kv: &KvCaches,
        ops: &[ScatterOp<'_>],
        layers: Range<usize>,
    ) -> Result<()> {
        scatter_impl(kv, ops, layers, None)
    }
}

/// `stream`: force (`Some`) or pick by size (`None`) non-temporal stores.
fn gather_impl(kv: &KvCaches, ops: &mut [GatherOp<'_>], stream: Option<bool>) -> Result<()> {
    CpuEngine::check_host(kv)?;
    for op in ops.iter() {
        check_len(kv, op.block, op.dst.len())?;
    }
    let g = *kv.geometry();
    let page = g.layer_page_bytes();
    let dims = (g.kv_heads as usize, g.block_tokens as usize, g.row_bytes());
    let stream = stream.unwrap_or(ops.len().saturating_mul(g.block_bytes()) >= STREAM_MIN_BYTES);
    let nl = kv.layers().len();
    for i in 0..ops.len() {
        let block = ops[i].block as u64;
        let dst = ops[i].dst.as_mut_ptr();
        for (l, view) in kv.layers().iter().enumerate() {
            let src = view.page_addr(&g, block) as *mut u8;
            // The next page starts somewhere else: start its stream early.
            let next = match (l + 1 < nl, ops.get(i + 1)) {
                (true, _) => Some(kv.layers()[l + 1].page_addr(&g, block)),
                (false, Some(o)) => Some(kv.layers()[0].page_addr(&g, o.block as u64)),
                (false, None) => None,
            };
            if let Some(a) = next {
                raw::prefetch(a as *const u8, PREFETCH_BYTES);
            }
            // SAFETY: KvCaches::new's contract: the page lies inside the
            // view; check_len: the record holds every layer's page.
            unsafe {
                move_page(
                    kv.layout(),
                    Dir::Gather,
                    src,
                    dst.add(l * page),
                    dims,
                    stream,
                )
            }
        }
    }
    raw::fence(stream);
    Ok(())
}

fn scatter_impl(
    kv: &KvCaches,
    ops: &[ScatterOp<'_>],
    layers: Range<usize>,
    stream: Option<bool>,
) -> Result<()> {
    CpuEngine::check_host(kv)?;
    if layers.end > kv.layers().len() || layers.start > layers.end {
        return Err(Error::invalid(format!(
            "layer range {layers:?} outside 0..{}",
            kv.layers().len()
        )));
    }
    for op in ops {
        check_len(kv, op.block, op.src.len())?;
    }
    let g = *kv.geometry();
    let page = g.layer_page_bytes();
    let dims = (g.kv_heads as usize, g.block_tokens as usize, g.row_bytes());
    let stream =
        stream.unwrap_or(ops.len().saturating_mul(layers.len() * page) >= STREAM_MIN_BYTES);
    for (i, op) in ops.iter().enumerate() {
        // Only read through this pointer: Dir::Scatter never writes the record.
        let src = op.src.as_ptr() as *mut u8;
        if let Some(next) = ops.get(i + 1) {
            raw::prefetch(next.src[layers.start * page..].as_ptr(), PREFETCH_BYTES);
        }
        for l in layers.clone() {
            let dst = kv.layers()[l].page_addr(&g, op.block as u64) as *mut u8;
            // SAFETY: as in gather; the record is only read.
            unsafe {
                move_page(
                    kv.layout(),
                    Dir::Scatter,
                    dst,
                    src.add(l * page),
                    dims,
                    stream,
                )
            }
        }
    }
    raw::fence(stream);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::{Dtype, Geometry, LayerView};

    fn geom() -> Geometry {
        Geometry {
            layers: 3,
            kv_heads: 2,
            block_tokens: 4,
            head_size_k: 4,
            head_size_v: 4,
            dtype: Dtype::F32,
        }
    }

    /// One storage shared by all layers, like vLLM's KVCacheTensor.
    fn views(buf: &mut [f32], g: &Geometry, blocks: u64, layout: KvLayout) -> Vec<LayerView> {
        assert_eq!(g.dtype, Dtype::F32);
        LayerView::layer_major(g, layout, buf.as_mut_ptr() as u64, blocks).unwrap()
    }

    /// Value stored at logical [layer, block, head, token, c].
    fn val(l: u64, b: u64, h: u64, t: u64, c: u64) -> f32 {
        (l * 100_000 + b * 1000 + h * 100 + t * 10 + c) as f32
    }

    fn fill(buf: &mut [f32], v: &[LayerView], g: &Geometry) {
        for (l, view) in v.iter().enumerate() {
            let base = (view.base - buf.as_ptr() as u64) / 4;
            for b in 0..view.num_blocks {
                for h in 0..g.kv_heads as u64 {
                    for t in 0..g.block_tokens as u64 {
                        for c in 0..g.row_elems() as u64 {
                            let i = base
                                + b * view.stride_block
                                + h * view.stride_head
                                + t * view.stride_token
                                + c;
                            buf[i as usize] = val(l as u64, b, h, t, c);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn both_layouts_produce_the_same_canonical_record_and_cross_load() {
        let g = geom();
        let blocks = 5u64;
        let total = (g.layers as u64 * blocks) as usize * g.layer_page_bytes() / 4;
        let mut records = Vec::new();
        for layout in [KvLayout::Lbhnc, KvLayout::Lbnhc] {
            let mut buf = vec![0f32; total];
            let v = views(&mut buf, &g, blocks, layout);
            fill(&mut buf, &v, &g);
            let kv = unsafe { KvCaches::new(g, v, false) }.unwrap();
            assert_eq!(kv.layout(), layout);
            let mut rec = vec![0u8; g.block_bytes()];
            CpuEngine
                .gather(
                    &kv,
                    &mut [GatherOp {
                        block: 3,
                        dst: &mut rec,
                    }],
                )
                .unwrap();
            let f: &[f32] = bytemuck::cast_slice(&rec);
            for l in 0..3 {
                for h in 0..2 {
                    for t in 0..4 {
                        for c in 0..8 {
                            let off = g.record_offset(l, h, t) / 4 + c;
                            assert_eq!(f[off], val(l as u64, 3, h as u64, t as u64, c as u64));
                        }
                    }
                }
            }
            records.push(rec);
        }
        assert_eq!(records[0], records[1]);

        // scatter the record into block 1 of a token-major cache, only layers 1..3
        let mut buf = vec![0f32; total];
        let v = views(&mut buf, &g, blocks, KvLayout::Lbnhc);
        let kv = unsafe { KvCaches::new(g, v, false) }.unwrap();
        CpuEngine
            .scatter_layers(
                &kv,
                &[ScatterOp {
                    src: &records[0],
                    block: 1,
                }],
                1..3,
            )
            .unwrap();
        let mut back = vec![0u8; g.block_bytes()];
        CpuEngine
            .gather(
                &kv,
                &mut [GatherOp {
                    block: 1,
                    dst: &mut back,
                }],
            )
            .unwrap();
        let page = g.layer_page_bytes();
        assert!(back[..page].iter().all(|&b| b == 0), "layer 0 untouched");
        assert_eq!(back[page..], records[0][page..]);
    }

    #[test]
    fn bad_ops_are_errors() {
        let g = geom();
        let mut buf = vec![0f32; 3 * 2 * g.layer_page_bytes() / 4];
        let v = views(&mut buf, &g, 2, KvLayout::Lbhnc);
        let kv = unsafe { KvCaches::new(g, v.clone(), false) }.unwrap();
        let mut short = vec![0u8; 10];
        assert!(CpuEngine
            .gather(
                &kv,
                &mut [GatherOp {
                    block: 0,
                    dst: &mut short
                }]
            )
            .is_err());
        let mut rec = vec![0u8; g.block_bytes()];
        assert!(CpuEngine
            .gather(
                &kv,
                &mut [GatherOp {
                    block: 2,
                    dst: &mut rec
                }]
            )
            .is_err());
        assert!(unsafe { KvCaches::new(g, v[..2].to_vec(), false) }.is_err());
    }

    /// Streaming and ordinary stores give the same bytes, for rows that are
    /// not a multiple of 16 bytes and records that start off alignment.
    #[test]
    fn streaming_and_plain_stores_move_the_same_bytes() {
        for (hk, hv) in [(3u32, 2u32), (16, 16), (7, 9)] {
            let g = Geometry {
                layers: 2,
                kv_heads: 3,
                block_tokens: 5,
                head_size_k: hk,
                head_size_v: hv,
                dtype: Dtype::F32,
            };
            let blocks = 4u64;
            for layout in [KvLayout::Lbhnc, KvLayout::Lbnhc] {
                let total = (g.layers as u64 * blocks) as usize * g.layer_page_bytes() / 4;
                let mut buf = vec![0f32; total];
                let v = views(&mut buf, &g, blocks, layout);
                fill(&mut buf, &v, &g);
                let kv = unsafe { KvCaches::new(g, v, false) }.unwrap();
                let bb = g.block_bytes();
                // records at offsets 0 and 4 of one buffer: aligned and not
                let mut plain = vec![0u8; bb + 4];
                let mut streamed = vec![0u8; bb + 8];
                gather_impl(
                    &kv,
                    &mut [GatherOp {
                        block: 2,
                        dst: &mut plain[..bb],
                    }],
                    Some(false),
                )
                .unwrap();
                gather_impl(
                    &kv,
                    &mut [GatherOp {
                        block: 2,
                        dst: &mut streamed[4..bb + 4],
                    }],
                    Some(true),
                )
                .unwrap();
                assert_eq!(plain[..bb], streamed[4..bb + 4], "{layout:?} k{hk} v{hv}");
                // scatter the streamed record into block 0 and read it back plainly
                scatter_impl(
                    &kv,
                    &[ScatterOp {
                        src: &streamed[4..bb + 4],
                        block: 0,
                    }],
                    0..2,
                    Some(true),
                )
                .unwrap();
                let mut back = vec![0u8; bb];
                gather_impl(
                    &kv,
                    &mut [GatherOp {
                        block: 0,
                        dst: &mut back,
                    }],
                    Some(false),
                )
                .unwrap();
                assert_eq!(back, plain[..bb], "{layout:?} k{hk} v{hv} scatter");
            }
        }
    }
}
