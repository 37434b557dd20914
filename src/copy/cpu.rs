//! The CPU copy engine: gathers and scatters with `memcpy` over host memory.
//!
//! Head-major (`LBHNC`) pages are contiguous and move as one copy per layer;
//! token-major (`LBNHC`) pages are transposed row by row (one row = one
//! token of one head, K then V) into the canonical head-major record.

use super::{check_len, CopyEngine, GatherOp, KvCaches, ScatterOp};
use crate::block::KvLayout;
use crate::error::{Error, Result};
use std::ops::Range;

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

impl CopyEngine for CpuEngine {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn gather(&self, kv: &KvCaches, ops: &mut [GatherOp<'_>]) -> Result<()> {
        Self::check_host(kv)?;
        for op in ops.iter() {
            check_len(kv, op.block, op.dst.len())?;
        }
        let g = *kv.geometry();
        let page = g.layer_page_bytes();
        let row = g.row_bytes();
        let (h, n) = (g.kv_heads as usize, g.block_tokens as usize);
        for op in ops.iter_mut() {
            for (l, view) in kv.layers().iter().enumerate() {
                let src = view.page_addr(&g, op.block as u64) as *const u8;
                let dst = &mut op.dst[l * page..(l + 1) * page];
                match kv.layout() {
                    // SAFETY: KvCaches::new's contract: the page lies inside the view.
                    KvLayout::Lbhnc => unsafe {
                        std::ptr::copy_nonoverlapping(src, dst.as_mut_ptr(), page)
                    },
                    KvLayout::Lbnhc => {
                        for t in 0..n {
                            for hd in 0..h {
                                let s = (t * h + hd) * row;
                                let d = (hd * n + t) * row;
                                // SAFETY: as above; `s + row <= page`.
                                unsafe {
                                    std::ptr::copy_nonoverlapping(
                                        src.add(s),
                                        dst.as_mut_ptr().add(d),
                                        row,
                                    )
                                }
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn scatter_layers(
        &self,
        kv: &KvCaches,
        ops: &[ScatterOp<'_>],
        layers: Range<usize>,
    ) -> Result<()> {
        Self::check_host(kv)?;
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
        let row = g.row_bytes();
        let (h, n) = (g.kv_heads as usize, g.block_tokens as usize);
        for op in ops {
            for l in layers.clone() {
                let view = &kv.layers()[l];
                let dst = view.page_addr(&g, op.block as u64) as *mut u8;
                let src = &op.src[l * page..(l + 1) * page];
                match kv.layout() {
                    // SAFETY: KvCaches::new's contract: the page lies inside the view.
                    KvLayout::Lbhnc => unsafe {
                        std::ptr::copy_nonoverlapping(src.as_ptr(), dst, page)
                    },
                    KvLayout::Lbnhc => {
                        for t in 0..n {
                            for hd in 0..h {
                                let d = (t * h + hd) * row;
                                let s = (hd * n + t) * row;
                                // SAFETY: as above; `d + row <= page`.
                                unsafe {
                                    std::ptr::copy_nonoverlapping(
                                        src.as_ptr().add(s),
                                        dst.add(d),
                                        row,
                                    )
                                }
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }
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
        let (h, n, c) = (g.kv_heads as u64, g.block_tokens as u64, g.row_elems() as u64);
        let page = h * n * c;
        let (sh, sn) = match layout {
            KvLayout::Lbhnc => (n * c, c),
            KvLayout::Lbnhc => (c, h * c),
        };
        (0..g.layers as u64)
            .map(|l| LayerView {
                base: buf.as_mut_ptr() as u64 + l * blocks * page * 4,
                num_blocks: blocks,
                stride_block: page,
                stride_head: sh,
                stride_token: sn,
            })
            .collect()
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
                .gather(&kv, &mut [GatherOp { block: 3, dst: &mut rec }])
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
            .scatter_layers(&kv, &[ScatterOp { src: &records[0], block: 1 }], 1..3)
            .unwrap();
        let mut back = vec![0u8; g.block_bytes()];
        CpuEngine
            .gather(&kv, &mut [GatherOp { block: 1, dst: &mut back }])
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
            .gather(&kv, &mut [GatherOp { block: 0, dst: &mut short }])
            .is_err());
        let mut rec = vec![0u8; g.block_bytes()];
        assert!(CpuEngine
            .gather(&kv, &mut [GatherOp { block: 2, dst: &mut rec }])
            .is_err());
        assert!(unsafe { KvCaches::new(g, v[..2].to_vec(), false) }.is_err());
    }
}
