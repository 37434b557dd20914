//! The kernel sources of `cuda/`, embedded at build time, and the entry
//! points each one must define. The PTX test (`tests/cuda_ptx.rs`) compiles
//! every source with NVRTC and checks each `.entry`; the engine compiles the
//! same text at run time for the device it runs on.

/// One `.cu` file: its name, its text and the `extern "C"` entries it defines.
#[derive(Clone, Copy, Debug)]
pub struct KernelSource {
    /// File name under `cuda/`.
    pub file: &'static str,
    /// The source text.
    pub text: &'static str,
    /// Entry points (`extern "C" __global__`) the file must define.
    pub entries: &'static [&'static str],
}

/// Gather/scatter of KV blocks: `cuda/kv_copy.cu`.
pub const KV_COPY: KernelSource = KernelSource {
    file: "kv_copy.cu",
    text: include_str!("../../../cuda/kv_copy.cu"),
    entries: &[
        "kvpark_gather_u128",
        "kvpark_gather_u32",
        "kvpark_gather_u8",
        "kvpark_scatter_u128",
        "kvpark_scatter_u32",
        "kvpark_scatter_u8",
    ],
};

/// Every kernel source kvpark ships.
pub const ALL: &[KernelSource] = &[KV_COPY];

/// Ops per launch: must equal `KVPARK_MAX_OPS` in `cuda/kv_copy.cu`.
pub const MAX_OPS: usize = 256;

/// Mirror of `struct KvOps` in `cuda/kv_copy.cu` (passed by value).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct KvOps {
    /// Device-usable address of each op's record.
    pub rec: [u64; MAX_OPS],
    /// vLLM block id of each op.
    pub block: [u32; MAX_OPS],
}

/// Mirror of `struct KvShape` in `cuda/kv_copy.cu` (passed by value).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KvShape {
    /// Bytes between blocks of one layer.
    pub stride_block_bytes: u64,
    /// Bytes of one (layer, block) page.
    pub page_bytes: u64,
    /// KV heads.
    pub heads: u32,
    /// Tokens per block.
    pub tokens: u32,
    /// Bytes of one (head, token) row.
    pub row_bytes: u32,
    /// 1 = LBHNC, 0 = LBNHC.
    pub head_major: u32,
    /// First layer of the launch.
    pub layer0: u32,
    /// Valid entries in [`KvOps`].
    pub n_ops: u32,
}

/// Mirror of `kv_page_index` in `cuda/kv_copy.cu`: the index (in `vec`-byte
/// units) inside the vLLM page of element `d` of the record's layer slice.
pub fn page_index(s: &KvShape, vec: u64, d: u64) -> u64 {
    if s.head_major != 0 {
        return d;
    }
    let rv = s.row_bytes as u64 / vec;
    let c = d % rv;
    let row = d / rv;
    let t = row % s.tokens as u64;
    let h = row / s.tokens as u64;
    (t * s.heads as u64 + h) * rv + c
}

/// Mirror of the loop structure of `kv_move` for one CTA (grid z index `z`
/// of `zdim`, `threads` threads): the record-slice indices it visits.
pub fn cta_indices(total: u64, z: u64, zdim: u64, threads: u64) -> Vec<u64> {
    let per = total.div_ceil(zdim);
    let begin = per * z;
    let end = (begin + per).min(total);
    let mut out = Vec::new();
    for t in 0..threads {
        let mut i = begin + t;
        while i + 3 * threads < end {
            for k in 0..4 {
                out.push(i + k * threads);
            }
            i += 4 * threads;
        }
        while i < end {
            out.push(i);
            i += threads;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::{Dtype, Geometry, KvLayout, LayerView};
    use crate::copy::{cpu::CpuEngine, CopyEngine, GatherOp, KvCaches};

    /// Runs the kernel's index math on the CPU (gather, every layer, every
    /// z-slice and thread) and compares with the CPU engine's record.
    #[test]
    fn kernel_index_math_matches_the_cpu_engine() {
        for (layout, vec) in [
            (KvLayout::Lbhnc, 16u64),
            (KvLayout::Lbnhc, 16),
            (KvLayout::Lbnhc, 4),
            (KvLayout::Lbnhc, 1),
        ] {
            let g = Geometry {
                layers: 3,
                kv_heads: 3,
                block_tokens: 5,
                head_size_k: 8,
                head_size_v: 8,
                dtype: Dtype::Bf16,
            };
            let page = g.layer_page_bytes();
            let blocks = 4u64;
            let mut buf: Vec<u8> = (0..g.layers as usize * blocks as usize * page)
                .map(|i| (i * 7 + i / 251) as u8)
                .collect();
            let (h, n, c) = (
                g.kv_heads as u64,
                g.block_tokens as u64,
                g.row_elems() as u64,
            );
            let (sh, sn) = match layout {
                KvLayout::Lbhnc => (n * c, c),
                KvLayout::Lbnhc => (c, h * c),
            };
            let views: Vec<LayerView> = (0..g.layers as u64)
                .map(|l| LayerView {
                    base: buf.as_mut_ptr() as u64 + l * blocks * page as u64,
                    num_blocks: blocks,
                    stride_block: h * n * c,
                    stride_head: sh,
                    stride_token: sn,
                })
                .collect();
            let kv = unsafe { KvCaches::new(g, views.clone(), false) }.unwrap();
            let mut want = vec![0u8; g.block_bytes()];
            CpuEngine
                .gather(
                    &kv,
                    &mut [GatherOp {
                        block: 2,
                        dst: &mut want,
                    }],
                )
                .unwrap();

            let s = KvShape {
                stride_block_bytes: page as u64,
                page_bytes: page as u64,
                heads: g.kv_heads,
                tokens: g.block_tokens,
                row_bytes: g.row_bytes() as u32,
                head_major: (layout == KvLayout::Lbhnc) as u32,
                layer0: 0,
                n_ops: 1,
            };
            let total = page as u64 / vec;
            let mut got = vec![0u8; g.block_bytes()];
            let mut hits = vec![0u32; g.block_bytes()];
            let zdim = 3;
            for (l, v) in views.iter().enumerate() {
                let src = (v.base - buf.as_ptr() as u64) as usize + 2 * page;
                for z in 0..zdim {
                    for d in cta_indices(total, z, zdim, 8) {
                        let pi = page_index(&s, vec, d) as usize * vec as usize;
                        let ri = l * page + d as usize * vec as usize;
                        for k in 0..vec as usize {
                            got[ri + k] = buf[src + pi + k];
                            hits[ri + k] += 1;
                        }
                    }
                }
            }
            assert!(
                hits.iter().all(|&h| h == 1),
                "{layout:?} v{vec}: every byte written once"
            );
            assert_eq!(got, want, "{layout:?} v{vec}");
        }
    }

    #[test]
    fn rust_mirrors_match_the_kernel_source() {
        assert!(KV_COPY
            .text
            .contains(&format!("#define KVPARK_MAX_OPS {MAX_OPS}")));
        // C layout: 256 * 8 + 256 * 4 bytes, no padding at the end (8-aligned).
        assert_eq!(std::mem::size_of::<KvOps>(), MAX_OPS * 12);
        assert_eq!(std::mem::size_of::<KvShape>(), 16 + 6 * 4);
        // the whole parameter list stays under CUDA's 4 KiB launch limit
        assert!(8 + std::mem::size_of::<KvOps>() + std::mem::size_of::<KvShape>() <= 4096);
        for e in KV_COPY.entries {
            assert!(
                KV_COPY.text.contains(&format!("void {e}(")),
                "{e} not in source"
            );
        }
    }
}
