//! Gather / scatter throughput of the CPU engine against one contiguous
//! `memcpy` of the same bytes, measured in the same run.
//!
//! The setup is what a worker sees: a Llama-3.1-8B-shaped cache (32 layers,
//! 8 KV heads, head size 128 for K and V, 16 tokens per block, bf16: 2 MiB
//! per block) whose layers all live in ONE storage, as vLLM's
//! `KVCacheTensor` does, with 50% more blocks than are moved. `n` block ids
//! are drawn at random (shuffled, so consecutive ops never touch adjacent
//! pages), gathered into host-arena slots and scattered back. The baseline
//! copies `n * 2 MiB` contiguous bytes between the same two memories.
//!
//! This module is a benchmark: it is the one place under `copy` that uses
//! [`crate::tier::host::HostArena`] (the real destination of a gather).

use super::cpu::CpuEngine;
use super::{CopyEngine, GatherOp, KvCaches, ScatterOp};
use crate::benchkit::{paired, Figure};
use crate::block::{Dtype, Geometry, KvLayout, LayerView};
use crate::error::{Error, Result};
use crate::tier::host::{HostArena, SlotId};
use std::time::Duration;

/// The benchmark geometry: Llama-3.1-8B on one rank, bf16.
pub fn llama8b() -> Geometry {
    Geometry {
        layers: 32,
        kv_heads: 8,
        block_tokens: 16,
        head_size_k: 128,
        head_size_v: 128,
        dtype: Dtype::Bf16,
    }
}

/// Per-layer views over one storage of `blocks` blocks per layer, layer-major.
fn views(base: u64, g: &Geometry, blocks: u64, layout: KvLayout) -> Vec<LayerView> {
    LayerView::layer_major(g, layout, base, blocks).expect("benchmark geometry fits")
}

/// Deterministic xorshift64*.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// `n` distinct block ids out of `1..num_blocks` (0 is vLLM's null block),
/// in shuffled order.
fn scattered_ids(n: usize, num_blocks: u32, seed: u64) -> Vec<u32> {
    let mut rng = Rng(seed | 1);
    let mut all: Vec<u32> = (1..num_blocks).collect();
    for i in (1..all.len()).rev() {
        let j = (rng.next() % (i as u64 + 1)) as usize;
        all.swap(i, j);
    }
    all.truncate(n);
    all
}

/// Runs the benchmark for `blocks` blocks (both layouts, gather and
/// scatter) and returns four figures, each beside a contiguous `memcpy` of
/// the same byte count measured in the same run.
///
/// # Panics
/// If memory for the cache and the arena cannot be mapped or a copy fails;
/// [`try_bench_copy`] returns those as errors.
pub fn bench_copy(blocks: usize, quick: bool) -> Vec<Figure> {
    try_bench_copy(blocks, quick).unwrap_or_else(|e| panic!("copy benchmark: {e}"))
}

/// [`bench_copy`], with errors returned.
pub fn try_bench_copy(blocks: usize, quick: bool) -> Result<Vec<Figure>> {
    if blocks == 0 {
        return Err(Error::invalid("copy benchmark needs at least one block"));
    }
    let g = llama8b();
    let bb = g.block_bytes();
    let num_blocks = (blocks + blocks / 2 + 1) as u64;
    let storage_bytes = num_blocks as usize * bb;
    let mut storage = memmap2::MmapMut::map_anon(storage_bytes)
        .map_err(|e| Error::from(e).context("mapping the benchmark KV cache"))?;
    let _ = storage.advise(memmap2::Advice::HugePage);
    // Incompressible-looking contents, written once (also faults every page in).
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for w in storage.chunks_exact_mut(8) {
        w.copy_from_slice(&rng.next().to_le_bytes());
    }
    let arena = HostArena::new(bb, blocks)?;
    let slots: Vec<SlotId> = (0..blocks).map(|_| arena.alloc()).collect::<Result<_>>()?;
    for &s in &slots {
        arena.slot_mut(s)?.fill(0);
    }
    let ids = scattered_ids(blocks, num_blocks as u32, 42);
    let total = (blocks * bb) as u64;
    let (rounds, per_round) = if quick {
        (2, Duration::from_millis(150))
    } else {
        (5, Duration::from_millis(600))
    };
    let src = storage.as_mut_ptr();
    let dst = arena.base_ptr();
    // SAFETY (both baselines): the arena holds `blocks * bb` contiguous bytes
    // (slot size == block size, a multiple of 4 KiB) and the storage more;
    // they are distinct mappings and this function is their only user.
    let memcpy_in = || unsafe { std::ptr::copy_nonoverlapping(src, dst, total as usize) };
    let memcpy_out = || unsafe { std::ptr::copy_nonoverlapping(dst, src, total as usize) };

    let mut figs = Vec::new();
    for layout in [KvLayout::Lbhnc, KvLayout::Lbnhc] {
        // SAFETY: the views lie inside `storage`, which outlives `kv`.
        let kv = unsafe { KvCaches::new(g, views(src as u64, &g, num_blocks, layout), false)? };
        let gather = || {
            let mut ops: Vec<GatherOp<'_>> = slots
                .iter()
                .zip(&ids)
                .map(|(&s, &b)| GatherOp {
                    block: b,
                    // SAFETY: every slot is allocated to this function and
                    // nothing else borrows it while the ops live.
                    dst: unsafe { &mut arena.slot_mut_unchecked(s)[..bb] },
                })
                .collect();
            CpuEngine.gather(&kv, &mut ops).expect("gather");
        };
        let scatter = || {
            let ops: Vec<ScatterOp<'_>> = slots
                .iter()
                .zip(&ids)
                .map(|(&s, &b)| ScatterOp {
                    // SAFETY: as above, read-only.
                    src: unsafe { &arena.slot_unchecked(s)[..bb] },
                    block: b,
                })
                .collect();
            CpuEngine.scatter(&kv, &ops).expect("scatter");
        };
        gather();
        verify(&kv, &arena, &slots, &ids)?;
        let lname = match layout {
            KvLayout::Lbhnc => "LBHNC",
            KvLayout::Lbnhc => "LBNHC",
        };
        let name = |what: &str| format!("{what} {blocks} blk llama-8b {lname}");
        let (m, b) = paired(total, rounds, per_round, gather, memcpy_in);
        figs.push(Figure {
            name: name("gather"),
            bytes_per_s: m,
            baseline: "memcpy contiguous".into(),
            baseline_bytes_per_s: b,
        });
        let (m, b) = paired(total, rounds, per_round, scatter, memcpy_out);
        figs.push(Figure {
            name: name("scatter"),
            bytes_per_s: m,
            baseline: "memcpy contiguous".into(),
            baseline_bytes_per_s: b,
        });
    }
    for s in slots {
        arena.free(s)?;
    }
    Ok(figs)
}

/// Checks sampled rows of every gathered record against the cache, so the
/// benchmark never times a copy that moves the wrong bytes.
fn verify(kv: &KvCaches, arena: &HostArena, slots: &[SlotId], ids: &[u32]) -> Result<()> {
    let g = kv.geometry();
    let row = g.row_bytes();
    let es = g.dtype.size() as u64;
    for (i, (&s, &b)) in slots.iter().zip(ids).enumerate().step_by(7) {
        let rec = arena.slot(s)?;
        for (l, h, t) in [(0, 0, 0), (g.layers as usize - 1, 3, 5), (7, 7, 15)] {
            let v = &kv.layers()[l];
            let addr = v.page_addr(g, b as u64)
                + (h as u64 * v.stride_head + t as u64 * v.stride_token) * es;
            // SAFETY: inside the registered view.
            let want = unsafe { std::slice::from_raw_parts(addr as *const u8, row) };
            let off = g.record_offset(l, h, t);
            if &rec[off..off + row] != want {
                return Err(Error::internal(format!(
                    "gathered record {i} (block {b}) differs at layer {l} head {h} token {t}"
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_distinct_shuffled_and_skip_the_null_block() {
        let ids = scattered_ids(64, 97, 42);
        let mut s = ids.clone();
        s.sort();
        s.dedup();
        assert_eq!(s.len(), 64);
        assert!(s[0] >= 1 && *s.last().unwrap() < 97);
        let adjacent = ids.windows(2).filter(|w| w[1] == w[0] + 1).count();
        assert!(adjacent < 8, "{adjacent} adjacent pairs: not scattered");
    }

    #[test]
    fn tiny_run_produces_four_figures() {
        let figs = try_bench_copy(2, true).unwrap();
        assert_eq!(figs.len(), 4);
        assert!(figs
            .iter()
            .all(|f| f.bytes_per_s > 0.0 && f.baseline_bytes_per_s > 0.0));
        assert!(figs[1].name.starts_with("scatter 2 "), "{}", figs[1].name);
    }
}
