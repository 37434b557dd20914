//! Transfer planning, pure and host-only: which mechanism moves a transfer
//! (the [`Selector`]), the stream-ordered command list of a transfer
//! ([`plan_transfer`]: kernel launches, DMA lists, per-layer event points),
//! the vector width and the launch shape of the kernels. Nothing here touches
//! CUDA, so all of it is tested on machines without a GPU:
//! `tests/cuda_kernels_host.rs` compiles `cuda/kv_copy.cu` itself for the CPU
//! and executes every strategy's command list — the [`launches`] the engine
//! would issue, the DMA as memcpy — comparing with the CPU engine byte for
//! byte and checking each layer at its event.
//!
//! ## Mechanisms
//!
//! | [`Strategy`]     | what runs                                                       | needs            |
//! |------------------|-----------------------------------------------------------------|------------------|
//! | `kernel_mapped`  | one kernel reads/writes the pinned, device-mapped host record   | pinned host      |
//! | `kernel_staged`  | kernel ↔ device staging buffer at HBM speed, then DMA ↔ host    | —                |
//! | `dma_batch`      | one `cuMemcpyBatchAsync` of (src, dst, len) triples per step    | LBHNC, CUDA 12.8 |
//! | `dma_each`       | one `cuMemcpyAsync` per triple                                  | LBHNC            |
//!
//! Where a picked mechanism is not possible it degrades, never fails:
//! `dma_*` on token-major pages → `kernel_staged` (a token-major page is
//! `H*N` scattered rows, far too many DMAs); `kernel_mapped` with pageable host
//! memory → `kernel_staged`; `dma_batch` without the driver entry point or
//! with pageable host memory → `dma_each`.
//!
//! ## Default table (before measurement)
//!
//! The first matching rule wins; rules from config key `copy_strategy`
//! ([`Selector::rules_from_config`]) are tried before these. The defaults
//! follow what vLLM measured for its own offloading worker on H100 (DMA for
//! device→host and for large pages; a copy kernel only for host→device
//! batches of ≥ 16 pages under 28 KiB), plus the token-major case vLLM does
//! not have. They are to be replaced by measured rules: the CUDA benchmark
//! (`kvpark bench --only cuda`, or `scripts/gpu/check_and_bench.py` on a
//! machine without Rust) times every mechanism per shape and [`derive_rules`]
//! turns the winners into rules of the same form.
//!
//! | # | dir | layout | condition                         | strategy        |
//! |---|-----|--------|-----------------------------------|-----------------|
//! | 1 | any | LBNHC  | total < 4 MiB                     | `kernel_mapped` |
//! | 2 | any | LBNHC  | otherwise                         | `kernel_staged` |
//! | 3 | h2d | LBHNC  | page < 28 KiB and ≥ 16 pages      | `kernel_mapped` |
//! | 4 | any | LBHNC  | otherwise                         | `dma_batch`     |

use super::kernels::{KvOps, KvShape, MAX_OPS};
use crate::block::KvLayout;
use crate::error::{Error, Result};
use std::ops::Range;

pub use crate::copy::select::{
    derive_rules, resolve, Caps, Direction, Measured, Rule, Selector, Shape, Strategy,
};

/// One DMA copy: `len` bytes from `src` to `dst` (device or host addresses).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Copy {
    /// Source address.
    pub src: u64,
    /// Destination address.
    pub dst: u64,
    /// Bytes.
    pub len: u64,
}

/// Appends `c`, merging it into the previous copy when both sides continue it.
pub fn push_merged(v: &mut Vec<Copy>, c: Copy) {
    if let Some(last) = v.last_mut() {
        if last.src + last.len == c.src && last.dst + last.len == c.dst {
            last.len += c.len;
            return;
        }
    }
    v.push(c);
}

/// Geometry of the device side as the planner sees it (byte units).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DevShape {
    /// Device base address of each layer.
    pub layer_base: Vec<u64>,
    /// Bytes between blocks of a layer.
    pub stride_block: u64,
    /// Bytes of one (layer, block) page.
    pub page: u64,
}

impl DevShape {
    /// Device address of block `b` of layer `l`.
    pub fn page_addr(&self, l: usize, b: u32) -> u64 {
        self.layer_base[l] + b as u64 * self.stride_block
    }
}

/// DMA copies for head-major pages, op-major (all layers of a block, then
/// the next block), so layers that are adjacent in device memory (block-outer
/// storage) merge into one copy. `recs[i]` is op i's record address.
pub fn dma_copies_d2h(
    d: &DevShape,
    blocks: &[u32],
    recs: &[u64],
    layers: Range<usize>,
) -> Vec<Copy> {
    let mut v = Vec::with_capacity(blocks.len() * layers.len());
    for (b, r) in blocks.iter().zip(recs) {
        for l in layers.clone() {
            push_merged(
                &mut v,
                Copy {
                    src: d.page_addr(l, *b),
                    dst: r + l as u64 * d.page,
                    len: d.page,
                },
            );
        }
    }
    v
}

/// DMA copies for head-major pages of one layer (onload goes layer by layer
/// so a per-layer event can follow each layer's copies).
pub fn dma_copies_h2d_layer(d: &DevShape, blocks: &[u32], recs: &[u64], l: usize) -> Vec<Copy> {
    let mut v = Vec::with_capacity(blocks.len());
    for (b, r) in blocks.iter().zip(recs) {
        push_merged(
            &mut v,
            Copy {
                src: r + l as u64 * d.page,
                dst: d.page_addr(l, *b),
                len: d.page,
            },
        );
    }
    v
}

/// Widest element (16, 4 or 1 bytes) dividing every address and size the
/// kernel touches: layer bases, block stride, page and row bytes, records.
pub fn vector_width(d: &DevShape, row_bytes: u64, recs: &[u64]) -> u32 {
    let mut acc = d.stride_block | d.page | row_bytes;
    for b in &d.layer_base {
        acc |= b;
    }
    for r in recs {
        acc |= r;
    }
    if acc % 16 == 0 {
        16
    } else if acc % 4 == 0 {
        4
    } else {
        1
    }
}

/// Threads per CTA of the copy kernels.
pub const THREADS: u32 = 256;

/// How many CTAs split one page (grid z) so a launch of `pages` pages puts
/// about `target_ctas` CTAs in flight, without giving a CTA less than one
/// element per thread.
pub fn page_split(pages: usize, page_bytes: u64, vec: u32, target_ctas: u32) -> u32 {
    let pages = pages.max(1) as u64;
    let want = (target_ctas as u64).div_ceil(pages);
    let max = (page_bytes / vec as u64 / THREADS as u64).max(1);
    want.clamp(1, max).min(65_535) as u32
}

/// Splits `n` ops into chunks of at most `max` (launch parameter limit or
/// staging capacity).
pub fn chunks(n: usize, max: usize) -> impl Iterator<Item = Range<usize>> {
    let max = max.max(1);
    (0..n.div_ceil(max)).map(move |i| i * max..((i + 1) * max).min(n))
}

/// Index into [`KV_COPY`](super::kernels::KV_COPY)`.entries` of the kernel for a direction and a
/// vector width (16, 4 or 1 bytes).
pub fn kernel_entry(dir: Direction, vec: u32) -> usize {
    let v = match vec {
        16 => 0,
        4 => 1,
        _ => 2,
    };
    dir.index() * 3 + v
}

/// What a kernel needs to know of the KV cache beside [`DevShape`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelGeometry {
    /// KV heads.
    pub heads: u32,
    /// Tokens per block.
    pub tokens: u32,
    /// Bytes of one (head, token) row, K then V.
    pub row_bytes: u32,
    /// vLLM's physical order.
    pub layout: KvLayout,
}

/// One kernel launch exactly as the engine issues it: `cuLaunchKernel(entry,
/// grid, (threads, 1, 1), params = (layer table, ops, shape))`.
#[derive(Clone)]
pub struct Launch {
    /// Index into [`KV_COPY`](super::kernels::KV_COPY)`.entries` ([`kernel_entry`]).
    pub entry: usize,
    /// Grid: (ops, layers, slices of a page).
    pub grid: [u32; 3],
    /// Threads per CTA.
    pub threads: u32,
    /// The ops parameter (boxed: 3 KiB).
    pub ops: Box<KvOps>,
    /// The shape parameter.
    pub shape: KvShape,
}

/// The launches of one [`Cmd::Launch`]: the widest vector the addresses
/// allow, at most [`MAX_OPS`] ops per launch, pages split over about
/// `4 * sm_count` CTAs.
pub fn launches(
    dir: Direction,
    d: &DevShape,
    k: KernelGeometry,
    blocks: &[u32],
    recs: &[u64],
    layers: Range<usize>,
    sm_count: u32,
) -> Vec<Launch> {
    let vec = vector_width(d, k.row_bytes as u64, recs);
    chunks(blocks.len(), MAX_OPS)
        .map(|c| {
            let mut ops = Box::new(KvOps {
                rec: [0; MAX_OPS],
                block: [0; MAX_OPS],
            });
            for (i, j) in c.clone().enumerate() {
                ops.rec[i] = recs[j];
                ops.block[i] = blocks[j];
            }
            Launch {
                entry: kernel_entry(dir, vec),
                grid: [
                    c.len() as u32,
                    layers.len() as u32,
                    page_split(c.len() * layers.len(), d.page, vec, 4 * sm_count.max(1)),
                ],
                threads: THREADS,
                ops,
                shape: KvShape {
                    stride_block_bytes: d.stride_block,
                    page_bytes: d.page,
                    heads: k.heads,
                    tokens: k.tokens,
                    row_bytes: k.row_bytes,
                    head_major: (k.layout == KvLayout::Lbhnc) as u32,
                    layer0: layers.start as u32,
                    n_ops: c.len() as u32,
                },
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::copy::select::geo_mid;
    use KvLayout::*;
    use Strategy::*;

    fn shape(dir: Direction, layout: KvLayout, page: usize, pages: usize) -> Shape {
        Shape {
            dir,
            layout,
            page_bytes: page,
            pages,
        }
    }
    const ALL_CAPS: Caps = Caps {
        batch_dma: true,
        host_mapped: true,
    };

    #[test]
    fn default_table_rows() {
        let s = Selector::default();
        // llama-8b page: 8 heads * 16 tokens * 512 B = 64 KiB
        let p = 64 << 10;
        assert_eq!(
            s.pick(&shape(Direction::D2H, Lbhnc, p, 32), ALL_CAPS),
            DmaBatch
        );
        assert_eq!(
            s.pick(&shape(Direction::H2D, Lbhnc, p, 32 * 64), ALL_CAPS),
            DmaBatch
        );
        assert_eq!(
            s.pick(&shape(Direction::H2D, Lbhnc, 16 << 10, 16), ALL_CAPS),
            KernelMapped
        );
        assert_eq!(
            s.pick(&shape(Direction::H2D, Lbhnc, 16 << 10, 15), ALL_CAPS),
            DmaBatch
        );
        assert_eq!(
            s.pick(&shape(Direction::D2H, Lbnhc, p, 32), ALL_CAPS),
            KernelMapped
        );
        assert_eq!(
            s.pick(&shape(Direction::D2H, Lbnhc, p, 64), ALL_CAPS),
            KernelStaged
        );
    }

    #[test]
    fn infeasible_picks_degrade() {
        let none = Caps {
            batch_dma: false,
            host_mapped: false,
        };
        assert_eq!(resolve(DmaBatch, Lbnhc, ALL_CAPS), KernelStaged);
        assert_eq!(resolve(DmaEach, Lbnhc, ALL_CAPS), KernelStaged);
        assert_eq!(resolve(KernelMapped, Lbhnc, none), KernelStaged);
        assert_eq!(resolve(DmaBatch, Lbhnc, none), DmaEach);
        let pinned_old_driver = Caps {
            batch_dma: false,
            host_mapped: true,
        };
        assert_eq!(resolve(DmaBatch, Lbhnc, pinned_old_driver), DmaEach);
        assert_eq!(
            resolve(KernelMapped, Lbnhc, pinned_old_driver),
            KernelMapped
        );
    }

    #[test]
    fn config_rules_come_first_and_bad_config_names_the_problem() {
        let s = Selector::from_json(
            r#"[{"dir":"d2h","layout":"lbhnc","pages":[0,100],"strategy":"dma_each"}]"#,
        )
        .unwrap();
        let p = 64 << 10;
        assert_eq!(
            s.pick(&shape(Direction::D2H, Lbhnc, p, 99), ALL_CAPS),
            DmaEach
        );
        assert_eq!(
            s.pick(&shape(Direction::D2H, Lbhnc, p, 100), ALL_CAPS),
            DmaBatch
        );
        assert_eq!(
            s.pick(&shape(Direction::H2D, Lbhnc, p, 99), ALL_CAPS),
            DmaBatch
        );
        let forced = Selector::from_json(r#"[{"strategy":"kernel_staged"}]"#).unwrap();
        assert_eq!(
            forced.pick(&shape(Direction::H2D, Lbhnc, p, 1), ALL_CAPS),
            KernelStaged
        );
        for bad in [
            r#"[{"strategy":"warp_drive"}]"#,
            r#"[{"layout":"bhlnc","strategy":"dma_each"}]"#,
            r#"[{"strategy":"dma_each","colour":"red"}]"#,
            r#"{"strategy":"dma_each"}"#,
        ] {
            let e = Selector::from_json(bad).unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::Config, "{bad}");
        }
        assert!(
            Selector::from_json(r#"[{"layout":"bhlnc","strategy":"dma_each"}]"#)
                .unwrap_err()
                .message()
                .contains("bhlnc")
        );
        assert_eq!(Strategy::parse("dma_batch").unwrap(), DmaBatch);
        assert!(Strategy::parse("x").is_err());
    }

    fn dev(layers: usize, page: u64, stride: u64, layer_gap: u64) -> DevShape {
        DevShape {
            layer_base: (0..layers as u64)
                .map(|l| 0x1000_0000 + l * layer_gap)
                .collect(),
            stride_block: stride,
            page,
        }
    }

    #[test]
    fn per_layer_storage_gives_one_copy_per_page() {
        // LBHNC, 3 layers each in its own region: no merging across layers
        let d = dev(3, 4096, 4096, 1 << 20);
        let recs = [0x9000_0000u64, 0xA000_0000];
        let v = dma_copies_d2h(&d, &[5, 7], &recs, 0..3);
        assert_eq!(v.len(), 6);
        assert_eq!(
            v[0],
            Copy {
                src: 0x1000_0000 + 5 * 4096,
                dst: 0x9000_0000,
                len: 4096
            }
        );
        assert_eq!(
            v[4],
            Copy {
                src: 0x1010_0000 + 7 * 4096,
                dst: 0xA000_0000 + 4096,
                len: 4096
            }
        );
        assert_eq!(v.iter().map(|c| c.len).sum::<u64>(), 6 * 4096);
    }

    #[test]
    fn block_outer_storage_merges_a_blocks_layers() {
        // BLHNC seen as per-layer views: layer l base = base + l*page,
        // block stride = L*page. A block's layers are adjacent in memory.
        let d = dev(4, 4096, 4 * 4096, 4096);
        let v = dma_copies_d2h(&d, &[2, 3], &[0x9000_0000, 0x9000_0000 + 4 * 4096], 0..4);
        // blocks 2 and 3 are adjacent and so are their records: one copy
        assert_eq!(
            v,
            vec![Copy {
                src: 0x1000_0000 + 2 * 4 * 4096,
                dst: 0x9000_0000,
                len: 8 * 4096
            }]
        );
        let h = dma_copies_h2d_layer(&d, &[2, 3], &[0x9000_0000, 0x9000_0000 + 4 * 4096], 1);
        assert_eq!(h.len(), 2);
        assert_eq!(
            h[1],
            Copy {
                src: 0x9000_0000 + 4 * 4096 + 4096,
                dst: 0x1000_0000 + 4096 + 3 * 4 * 4096,
                len: 4096
            }
        );
    }

    #[test]
    fn vector_width_falls_back_on_misalignment() {
        let d = dev(2, 4096, 4096, 1 << 20);
        assert_eq!(vector_width(&d, 512, &[0x9000_0000]), 16);
        assert_eq!(vector_width(&d, 512, &[0x9000_0008]), 4);
        assert_eq!(vector_width(&d, 6, &[0x9000_0000]), 1);
        let mut odd = d.clone();
        odd.layer_base[1] += 4;
        assert_eq!(vector_width(&odd, 512, &[0x9000_0000]), 4);
    }

    #[test]
    fn measured_rules_pick_each_measured_winner_and_merge_runs() {
        // D2H LBHNC at two page sizes, three transfer sizes each; H2D LBNHC
        // at one page size where kernel_mapped always wins.
        let m = |dir, layout, page: usize, pages: usize, strategy, gbps: f64| Measured {
            shape: shape(dir, layout, page, pages),
            strategy,
            bytes_per_s: gbps * 1e9,
        };
        use Direction::*;
        let measured = vec![
            // 64 KiB pages: small transfers by kernel, large by batched DMA
            m(D2H, Lbhnc, 64 << 10, 32, KernelMapped, 30.0),
            m(D2H, Lbhnc, 64 << 10, 32, DmaBatch, 20.0),
            m(D2H, Lbhnc, 64 << 10, 2048, KernelMapped, 40.0),
            m(D2H, Lbhnc, 64 << 10, 2048, DmaBatch, 50.0),
            m(D2H, Lbhnc, 64 << 10, 32768, DmaBatch, 52.0),
            m(D2H, Lbhnc, 64 << 10, 32768, DmaEach, 51.0),
            // 8 KiB pages: kernel up to the middle size
            m(D2H, Lbhnc, 8 << 10, 80, KernelMapped, 10.0),
            m(D2H, Lbhnc, 8 << 10, 5120, KernelMapped, 40.0),
            m(D2H, Lbhnc, 8 << 10, 5120, DmaBatch, 30.0),
            m(D2H, Lbhnc, 8 << 10, 81920, KernelStaged, 45.0),
            m(D2H, Lbhnc, 8 << 10, 81920, DmaBatch, 50.0),
            m(H2D, Lbnhc, 64 << 10, 32, KernelMapped, 30.0),
            m(H2D, Lbnhc, 64 << 10, 2048, KernelMapped, 45.0),
            m(H2D, Lbnhc, 64 << 10, 2048, KernelStaged, 44.0),
        ];
        let rules = derive_rules(&measured);
        // 64K: kernel | dma; 8K: kernel (two points merged) | dma; H2D: one rule
        assert_eq!(rules.len(), 5, "{rules:#?}");
        let sel = Selector::with_rules(rules.clone());
        for x in &measured {
            let best = measured
                .iter()
                .filter(|y| y.shape == x.shape)
                .max_by(|a, b| a.bytes_per_s.total_cmp(&b.bytes_per_s))
                .unwrap();
            assert_eq!(sel.wanted(&x.shape), best.strategy, "{:?}", x.shape);
        }
        // between the measured sizes the boundary is the geometric middle
        let mid = geo_mid(32 * (64 << 10), 2048 * (64 << 10)) as usize / (64 << 10);
        assert_eq!(
            sel.wanted(&shape(D2H, Lbhnc, 64 << 10, mid - 1)),
            KernelMapped
        );
        assert_eq!(sel.wanted(&shape(D2H, Lbhnc, 64 << 10, mid + 1)), DmaBatch);
        // page sizes between and beyond the measured ones belong to the nearest
        assert_eq!(sel.wanted(&shape(D2H, Lbhnc, 16 << 10, 80)), KernelMapped);
        assert_eq!(sel.wanted(&shape(D2H, Lbhnc, 1 << 20, 1 << 20)), DmaBatch);
        // what was not measured keeps the default table
        assert_eq!(
            sel.wanted(&shape(H2D, Lbhnc, 64 << 10, 10)),
            Selector::default().wanted(&shape(H2D, Lbhnc, 64 << 10, 10))
        );
        // the rules survive the config round trip
        let json = serde_json::to_value(&rules).unwrap();
        assert_eq!(Selector::rules_from_config(&json).unwrap(), rules);
        assert!(!json.to_string().contains("null"), "{json}");
    }

    #[test]
    fn config_form_is_a_name_or_rules() {
        let v = serde_json::json!("dma_each");
        let r = Selector::rules_from_config(&v).unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!(
            Selector::with_rules(r).wanted(&shape(Direction::H2D, Lbnhc, 4096, 1)),
            DmaEach
        );
        let e = Selector::rules_from_config(&serde_json::json!("dma_fast")).unwrap_err();
        assert!(e.message().contains("dma_fast"), "{e}");
        let e = Selector::rules_from_config(
            &serde_json::json!([{"strategy": "dma_batch", "pages": 4}]),
        )
        .unwrap_err();
        assert!(e.message().contains("copy_strategy"), "{e}");
    }

    #[test]
    fn split_and_chunks() {
        // one 64 KiB page, 528 CTAs wanted: limited to 64KiB/16/256 = 16
        assert_eq!(page_split(1, 64 << 10, 16, 528), 16);
        assert_eq!(page_split(32, 64 << 10, 16, 528), 16);
        assert_eq!(page_split(1024, 64 << 10, 16, 528), 1);
        assert_eq!(page_split(1, 100, 1, 528), 1);
        let c: Vec<_> = chunks(600, 256).collect();
        assert_eq!(c, vec![0..256, 256..512, 512..600]);
        assert_eq!(chunks(0, 256).count(), 0);
    }
}

/// One step of a transfer, in stream order. The engine executes these on
/// one stream; `tests/cuda_kernels_host.rs` executes them on host memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cmd {
    /// A gather (`D2H`) or scatter (`H2D`) kernel over `blocks` × `layers`;
    /// `recs[i]` is the device-usable record address of op i (the kernel
    /// adds `layer * page` to it). More than [`MAX_OPS`] ops
    /// are split into several launches by the executor.
    Launch {
        /// Kernel direction.
        dir: Direction,
        /// vLLM block ids.
        blocks: Vec<u32>,
        /// Record addresses.
        recs: Vec<u64>,
        /// Layers.
        layers: Range<usize>,
    },
    /// DMA copies, batched when `batch`.
    Dma {
        /// Copies.
        copies: Vec<Copy>,
        /// Use `cuMemcpyBatchAsync`.
        batch: bool,
    },
    /// Every write to layer `l` of an onload is queued before this point:
    /// the engine records layer `l`'s event here.
    LayerDone(usize),
}

/// Inputs of [`plan_transfer`].
#[derive(Clone, Debug)]
pub struct TransferPlan<'a> {
    /// Device side.
    pub dev: &'a DevShape,
    /// Resolved strategy ([`resolve`]).
    pub strategy: Strategy,
    /// vLLM block ids, one per op.
    pub blocks: &'a [u32],
    /// Host record addresses, one per op.
    pub hosts: &'a [u64],
    /// Device-usable addresses of the host records (mapped memory), when
    /// every record is mapped.
    pub mapped: Option<&'a [u64]>,
    /// Staging buffer (device address, bytes) for `KernelStaged`.
    pub staging: Option<(u64, usize)>,
    /// Whether DMA may be batched (driver has it, host memory pinned).
    pub batch_ok: bool,
    /// Bytes of a whole record (all layers).
    pub record_bytes: u64,
}

/// Staging bytes a transfer needs at least: one record for an offload, one
/// page for an onload.
pub fn staging_need(dir: Direction, page: u64, record_bytes: u64) -> usize {
    match dir {
        Direction::D2H => record_bytes as usize,
        Direction::H2D => page as usize,
    }
}

/// The commands of a transfer in stream order. Offloads cover all layers
/// (`layers` = `0..L`); onloads go layer by layer with a
/// [`Cmd::LayerDone`] after each layer of `layers`.
pub fn plan_transfer(
    p: &TransferPlan<'_>,
    dir: Direction,
    layers: Range<usize>,
) -> Result<Vec<Cmd>> {
    let d = p.dev;
    let n = p.blocks.len();
    if p.hosts.len() != n {
        return Err(Error::internal("plan: hosts and blocks differ in length"));
    }
    let mut cmds = Vec::new();
    let staging = |need: usize| -> Result<(u64, usize)> {
        match p.staging {
            Some((a, cap)) if cap >= need => Ok((a, cap)),
            _ => Err(Error::internal(
                "plan: staged strategy without a large enough staging buffer",
            )),
        }
    };
    match dir {
        Direction::D2H => {
            if n == 0 {
                return Ok(cmds);
            }
            match p.strategy {
                Strategy::KernelMapped => {
                    let recs = p.mapped.ok_or_else(|| {
                        Error::internal("plan: mapped strategy without mapped records")
                    })?;
                    cmds.push(Cmd::Launch {
                        dir,
                        blocks: p.blocks.to_vec(),
                        recs: recs.to_vec(),
                        layers,
                    });
                }
                Strategy::KernelStaged => {
                    let bb = p.record_bytes;
                    let (stage, cap) = staging(bb as usize)?;
                    let per = ((cap as u64 / bb) as usize).clamp(1, MAX_OPS);
                    for c in chunks(n, per) {
                        let recs: Vec<u64> = (0..c.len() as u64).map(|i| stage + i * bb).collect();
                        let mut copies = Vec::with_capacity(c.len());
                        for (i, j) in c.clone().enumerate() {
                            push_merged(
                                &mut copies,
                                Copy {
                                    src: recs[i],
                                    dst: p.hosts[j],
                                    len: bb,
                                },
                            );
                        }
                        cmds.push(Cmd::Launch {
                            dir,
                            blocks: p.blocks[c].to_vec(),
                            recs,
                            layers: layers.clone(),
                        });
                        cmds.push(Cmd::Dma {
                            copies,
                            batch: p.batch_ok,
                        });
                    }
                }
                Strategy::DmaBatch | Strategy::DmaEach => {
                    cmds.push(Cmd::Dma {
                        copies: dma_copies_d2h(d, p.blocks, p.hosts, layers),
                        batch: p.strategy == Strategy::DmaBatch,
                    });
                }
            }
        }
        Direction::H2D => {
            for l in layers {
                if n > 0 {
                    match p.strategy {
                        Strategy::KernelMapped => {
                            let recs = p.mapped.ok_or_else(|| {
                                Error::internal("plan: mapped strategy without mapped records")
                            })?;
                            cmds.push(Cmd::Launch {
                                dir,
                                blocks: p.blocks.to_vec(),
                                recs: recs.to_vec(),
                                layers: l..l + 1,
                            });
                        }
                        Strategy::KernelStaged => {
                            let (base, cap) = staging(d.page as usize)?;
                            let per = ((cap as u64 / d.page) as usize).clamp(1, MAX_OPS);
                            for c in chunks(n, per) {
                                let mut copies = Vec::with_capacity(c.len());
                                let mut recs = Vec::with_capacity(c.len());
                                for (i, j) in c.clone().enumerate() {
                                    let slot = base + i as u64 * d.page;
                                    push_merged(
                                        &mut copies,
                                        Copy {
                                            src: p.hosts[j] + l as u64 * d.page,
                                            dst: slot,
                                            len: d.page,
                                        },
                                    );
                                    // the kernel adds layer * page to the record address
                                    recs.push(slot.wrapping_sub(l as u64 * d.page));
                                }
                                cmds.push(Cmd::Dma {
                                    copies,
                                    batch: p.batch_ok,
                                });
                                cmds.push(Cmd::Launch {
                                    dir,
                                    blocks: p.blocks[c].to_vec(),
                                    recs,
                                    layers: l..l + 1,
                                });
                            }
                        }
                        Strategy::DmaBatch | Strategy::DmaEach => {
                            cmds.push(Cmd::Dma {
                                copies: dma_copies_h2d_layer(d, p.blocks, p.hosts, l),
                                batch: p.strategy == Strategy::DmaBatch,
                            });
                        }
                    }
                }
                cmds.push(Cmd::LayerDone(l));
            }
        }
    }
    Ok(cmds)
}
