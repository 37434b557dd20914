//! Test support shared by integration tests: a head-major (LBHNC) vLLM KV
//! cache in host memory, one storage per layer, whose pages can be filled
//! with a known pattern and read back.

#![allow(dead_code)]

use kvpark::block::{Dtype, Geometry, KvLayout, LayerView};

/// A small fp32 geometry (2 KV heads, 16 tokens per block, head 16) with
/// `layers` layers.
pub fn small_f32(layers: u32) -> Geometry {
    Geometry {
        layers,
        kv_heads: 2,
        block_tokens: 16,
        head_size_k: 16,
        head_size_v: 16,
        dtype: Dtype::F32,
    }
}

/// A head-major cache of `blocks` blocks per layer for `geom`.
pub struct Cache {
    pub geom: Geometry,
    pub blocks: u64,
    layers: Vec<Vec<f32>>,
    page: usize,
}

impl Cache {
    /// Zeroed cache (fp32 geometries).
    pub fn new(geom: Geometry, blocks: u64) -> Self {
        let page = geom.layer_page_bytes() / 4;
        Cache {
            geom,
            blocks,
            layers: (0..geom.layers)
                .map(|_| vec![0.0; blocks as usize * page])
                .collect(),
            page,
        }
    }

    /// The views vLLM would register (valid while `self` lives, unmoved).
    pub fn views(&mut self) -> Vec<LayerView> {
        let g = self.geom;
        let (blocks, page) = (self.blocks, self.page as u64);
        self.layers
            .iter_mut()
            .map(|l| {
                LayerView::packed(&g, KvLayout::Lbhnc, l.as_mut_ptr() as u64, blocks, page).unwrap()
            })
            .collect()
    }

    /// Layer `l` of block `b`. Volatile reads: another thread (the layer
    /// thread) may be writing these pages, ordered by a kvpark call the
    /// compiler must not read around.
    pub fn layer(&self, l: usize, b: u32) -> Vec<f32> {
        let o = b as usize * self.page;
        (0..self.page)
            // SAFETY: in bounds of layer l's live buffer.
            .map(|i| unsafe { std::ptr::read_volatile(self.layers[l].as_ptr().add(o + i)) })
            .collect()
    }

    /// Every layer of block `b`, concatenated.
    pub fn block(&self, b: u32) -> Vec<f32> {
        (0..self.layers.len())
            .flat_map(|l| self.layer(l, b))
            .collect()
    }

    /// Fills block `b` (all layers) with a pattern derived from `seed`.
    pub fn fill(&mut self, b: u32, seed: f32) {
        let o = b as usize * self.page;
        for (l, layer) in self.layers.iter_mut().enumerate() {
            for (i, v) in layer[o..o + self.page].iter_mut().enumerate() {
                *v = seed * 1000.0 + l as f32 * 100.0 + i as f32 * 0.5 + 1.0;
            }
        }
    }

    /// Zeroes block `b` (all layers).
    pub fn clear(&mut self, b: u32) {
        let o = b as usize * self.page;
        for layer in &mut self.layers {
            layer[o..o + self.page].fill(0.0);
        }
    }
}
