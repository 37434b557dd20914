//! The CUDA copy kernels, run on the CPU.
//!
//! `cuda/kv_copy.cu` is compiled as C++ (`tests/c/kernel_host.cpp` gives the
//! CUDA built-ins their host meaning and runs a grid's threads one after
//! another), and every strategy's command list from `plan_transfer` runs on
//! host memory: kernel launches exactly as the engine issues them
//! (`plan::launches`: vector width, ops per launch, grid), DMA copies as
//! memcpy. Records and caches are compared with the CPU engine byte for byte
//! for both physical orders, every dtype, three storage arrangements,
//! misaligned records and more ops than one launch carries; at each
//! per-layer event of an onload, that layer must already be final.
//!
//! Needs a C++ compiler (`$CXX`, else `c++`; `scripts/setup.sh` installs
//! g++). Without one the test fails and says so.

use kvpark::block::{Dtype, Geometry, KvLayout, LayerView};
use kvpark::copy::cpu::CpuEngine;
use kvpark::copy::cuda::dl::Library;
use kvpark::copy::cuda::kernels::{KvOps, KvShape, KV_COPY};
use kvpark::copy::cuda::plan::{
    self, plan_transfer, resolve, Caps, Cmd, DevShape, Direction, KernelGeometry, Strategy,
    TransferPlan,
};
use kvpark::copy::{CopyEngine, GatherOp, KvCaches, ScatterOp};
use std::ops::Range;
use std::process::Command;
use std::sync::OnceLock;

/// SMs of an H100 SXM: splits small launches over several CTAs per page.
const SMS: u32 = 132;

type EmuFn = unsafe extern "C" fn(*const u32, u32, *const u64, *const KvOps, *const KvShape);

/// The kernels compiled for the host, one function per `KV_COPY.entries`.
fn kernels() -> &'static [EmuFn] {
    static K: OnceLock<Vec<EmuFn>> = OnceLock::new();
    K.get_or_init(|| {
        let root = env!("CARGO_MANIFEST_DIR");
        let so = format!("{}/kernel_host.so", env!("CARGO_TARGET_TMPDIR"));
        let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
        let out = Command::new(&cxx)
            .args([
                "-std=c++17",
                "-O2",
                "-Wall",
                "-Wextra",
                "-Werror",
                "-Wno-unknown-pragmas",
                "-fno-strict-aliasing",
                "-shared",
                "-fPIC",
            ])
            .arg(format!("-I{root}/cuda"))
            .arg(format!("{root}/tests/c/kernel_host.cpp"))
            .arg("-o")
            .arg(&so)
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run the C++ compiler {cxx:?} ({e}); install g++ or set CXX")
            });
        assert!(
            out.status.success(),
            "{cxx} could not compile cuda/kv_copy.cu for the host:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let lib = Library::open(&so).unwrap();
        KV_COPY
            .entries
            .iter()
            .map(|e| {
                let f = lib.require(&format!("emu_{e}")).unwrap();
                // SAFETY: emu_<entry> has exactly the EmuFn signature.
                unsafe { std::mem::transmute::<*mut std::ffi::c_void, EmuFn>(f) }
            })
            .collect()
    })
}

/// How vLLM's layers lie in memory.
#[derive(Clone, Copy, Debug)]
enum Storage {
    /// One allocation per layer, blocks adjacent.
    PerLayer,
    /// One allocation, each layer's blocks followed by one unused page.
    SharedGaps,
    /// Block-outer: a block's layers adjacent, block stride = L pages.
    BlockOuter,
}

/// A KV cache in host memory in one of the [`Storage`] arrangements.
struct Cache {
    g: Geometry,
    layout: KvLayout,
    storage: Storage,
    blocks: u64,
    buf: Vec<u8>,
    /// `buf`'s first byte at a 16-byte boundary (written through by kernels).
    base: u64,
}

impl Cache {
    fn new(g: Geometry, layout: KvLayout, storage: Storage, blocks: u64, seed: u64) -> Cache {
        let page = g.layer_page_bytes();
        let len = match storage {
            Storage::SharedGaps => g.layers as usize * (blocks as usize + 1) * page,
            _ => g.layers as usize * blocks as usize * page,
        };
        // +16: room to place the base at a 16-byte boundary
        let mut buf = vec![0u8; len + 16];
        if seed != 0 {
            let mut x = seed;
            for b in buf.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
        }
        let base = (buf.as_mut_ptr() as u64).next_multiple_of(16);
        Cache {
            g,
            layout,
            storage,
            blocks,
            buf,
            base,
        }
    }

    /// Byte address of layer `l`'s page of block 0, and the block stride.
    fn layer_base(&self, l: u64) -> (u64, u64) {
        let page = self.g.layer_page_bytes() as u64;
        let layers = self.g.layers as u64;
        match self.storage {
            // separate allocations are modelled as far-apart regions
            Storage::PerLayer => (self.base + l * self.blocks * page, page),
            Storage::SharedGaps => (self.base + l * (self.blocks + 1) * page, page),
            Storage::BlockOuter => (self.base + l * page, layers * page),
        }
    }

    fn views(&self) -> Vec<LayerView> {
        let g = self.g;
        let e = g.dtype.size() as u64;
        (0..g.layers as u64)
            .map(|l| {
                let (base, stride) = self.layer_base(l);
                LayerView::packed(&g, self.layout, base, self.blocks, stride / e).unwrap()
            })
            .collect()
    }

    fn kv(&self) -> KvCaches {
        // SAFETY: the views lie inside self.buf, which outlives the use.
        unsafe { KvCaches::new(self.g, self.views(), false) }.unwrap()
    }

    fn dev(&self) -> DevShape {
        let page = self.g.layer_page_bytes() as u64;
        DevShape {
            layer_base: (0..self.g.layers as u64)
                .map(|l| self.layer_base(l).0)
                .collect(),
            stride_block: self.layer_base(0).1,
            page,
        }
    }

    fn kernel_geometry(&self) -> KernelGeometry {
        KernelGeometry {
            heads: self.g.kv_heads,
            tokens: self.g.block_tokens,
            row_bytes: self.g.row_bytes() as u32,
            layout: self.layout,
        }
    }

    /// Layer `l`'s page of block `b`.
    fn page(&self, l: usize, b: u32) -> &[u8] {
        let page = self.g.layer_page_bytes();
        let at = (self.dev().page_addr(l, b) - self.buf.as_ptr() as u64) as usize;
        &self.buf[at..at + page]
    }
}

/// What a command list's kernels looked like.
#[derive(Clone, Copy, Debug, Default)]
struct Ran {
    /// Kernel launches.
    launches: usize,
    /// Most launches one `Cmd::Launch` needed (ops over `MAX_OPS`).
    most_per_cmd: usize,
    /// Widest page split (grid z).
    most_z: u32,
    /// Bit i: `KV_COPY.entries[i]` ran.
    entries: u32,
}

impl Ran {
    fn add(&mut self, o: Ran) {
        self.launches += o.launches;
        self.most_per_cmd = self.most_per_cmd.max(o.most_per_cmd);
        self.most_z = self.most_z.max(o.most_z);
        self.entries |= o.entries;
    }
}

/// Runs a command list on host memory; `on_layer(l)` at each `LayerDone(l)`.
fn execute(cmds: &[Cmd], d: &DevShape, k: KernelGeometry, on_layer: &mut dyn FnMut(usize)) -> Ran {
    let mut ran = Ran::default();
    for c in cmds {
        match c {
            Cmd::Launch {
                dir,
                blocks,
                recs,
                layers,
            } => {
                let launches = plan::launches(*dir, d, k, blocks, recs, layers.clone(), SMS);
                ran.most_per_cmd = ran.most_per_cmd.max(launches.len());
                for l in launches {
                    let vec = [16u64, 4, 1][l.entry % 3];
                    let n = l.shape.n_ops as usize;
                    let mut addrs = d.layer_base.clone();
                    addrs.extend_from_slice(&l.ops.rec[..n]);
                    addrs.extend([l.shape.stride_block_bytes, l.shape.page_bytes]);
                    addrs.push(l.shape.row_bytes as u64);
                    assert!(
                        addrs.iter().all(|a| a % vec == 0),
                        "{}: a {vec}-byte kernel on an address or size it does not divide",
                        KV_COPY.entries[l.entry]
                    );
                    // SAFETY: the table, records and pages are live host
                    // memory covering every address the launch touches.
                    unsafe {
                        kernels()[l.entry](
                            l.grid.as_ptr(),
                            l.threads,
                            d.layer_base.as_ptr(),
                            &*l.ops,
                            &l.shape,
                        )
                    };
                    ran.launches += 1;
                    ran.most_z = ran.most_z.max(l.grid[2]);
                    ran.entries |= 1 << l.entry;
                }
            }
            Cmd::Dma { copies, .. } => {
                for c in copies {
                    // SAFETY: planned copies lie inside live buffers.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            c.src as *const u8,
                            c.dst as *mut u8,
                            c.len as usize,
                        )
                    }
                }
            }
            Cmd::LayerDone(l) => on_layer(*l),
        }
    }
    ran
}

struct Case {
    g: Geometry,
    layout: KvLayout,
    storage: Storage,
    blocks_in_cache: u64,
    /// Blocks moved (in this order).
    moved: Vec<u32>,
    /// Byte offset of every record from a 16-byte boundary.
    rec_offset: usize,
    /// Records the staging buffer holds.
    staging_records: usize,
}

/// Every strategy (and its fallbacks) on one case.
fn check(case: &Case) -> Ran {
    let g = case.g;
    let (page, bb) = (g.layer_page_bytes(), g.block_bytes());
    let n = case.moved.len();
    let layers = g.layers as usize;
    let src = Cache::new(
        g,
        case.layout,
        case.storage,
        case.blocks_in_cache,
        0x9E37_79B9,
    );
    let k = src.kernel_geometry();

    // what the CPU engine makes of it
    let mut want = vec![vec![0u8; bb]; n];
    {
        let mut ops: Vec<GatherOp> = case
            .moved
            .iter()
            .zip(want.iter_mut())
            .map(|(b, w)| GatherOp { block: *b, dst: w })
            .collect();
        CpuEngine.gather(&src.kv(), &mut ops).unwrap();
    }

    let mut ran = Ran::default();
    for strat in Strategy::ALL {
        for mapped in [true, false] {
            let s = resolve(
                strat,
                case.layout,
                Caps {
                    batch_dma: true,
                    host_mapped: mapped,
                },
            );
            let tag = format!(
                "{:?} {:?} {:?} head {}+{} rec+{} ({} -> {}, mapped {mapped})",
                case.layout,
                case.storage,
                g.dtype,
                g.head_size_k,
                g.head_size_v,
                case.rec_offset,
                strat.name(),
                s.name()
            );

            // ---- offload: all layers into poisoned records
            let mut host = vec![0xEEu8; n * bb + 16 + case.rec_offset];
            let first = (host.as_mut_ptr() as u64).next_multiple_of(16) + case.rec_offset as u64;
            let recs: Vec<u64> = (0..n as u64).map(|i| first + i * bb as u64).collect();
            let mut stage = vec![0u8; case.staging_records * bb + 32];
            let stage_at = (stage.as_mut_ptr() as u64).next_multiple_of(16);
            let d = src.dev();
            let p = TransferPlan {
                dev: &d,
                strategy: s,
                blocks: &case.moved,
                hosts: &recs,
                mapped: mapped.then_some(&recs[..]),
                staging: Some((stage_at, case.staging_records * bb)),
                batch_ok: mapped,
                record_bytes: bb as u64,
            };
            let cmds = plan_transfer(&p, Direction::D2H, 0..layers).unwrap();
            ran.add(execute(&cmds, &d, k, &mut |l| {
                panic!("{tag}: an offload has no layer event ({l})")
            }));
            let base = (first - host.as_ptr() as u64) as usize;
            for (i, w) in want.iter().enumerate() {
                let got = &host[base + i * bb..base + (i + 1) * bb];
                assert!(
                    got == &w[..],
                    "{tag}: offload of block {} differs from the CPU engine",
                    case.moved[i]
                );
            }

            // ---- onload of layers 1.. into a zeroed cache
            let onload: Range<usize> = 1.min(layers - 1)..layers;
            let dst = Cache::new(g, case.layout, case.storage, case.blocks_in_cache, 0);
            let expect = Cache::new(g, case.layout, case.storage, case.blocks_in_cache, 0);
            let sops: Vec<ScatterOp> = case
                .moved
                .iter()
                .zip(&want)
                .map(|(b, w)| ScatterOp { src: w, block: *b })
                .collect();
            CpuEngine
                .scatter_layers(&expect.kv(), &sops, onload.clone())
                .unwrap();
            let mut stage = vec![0u8; case.staging_records * page + 32];
            let stage_at = (stage.as_mut_ptr() as u64).next_multiple_of(16);
            let dd = dst.dev();
            let p = TransferPlan {
                dev: &dd,
                staging: Some((stage_at, case.staging_records * page)),
                ..p
            };
            let cmds = plan_transfer(&p, Direction::H2D, onload.clone()).unwrap();
            let mut done = Vec::new();
            ran.add(execute(&cmds, &dd, k, &mut |l| {
                // layer l of every moved block is final at its event
                for b in &case.moved {
                    assert!(
                        dst.page(l, *b) == expect.page(l, *b),
                        "{tag}: layer {l} of block {b} not final at its event"
                    );
                }
                done.push(l);
            }));
            assert_eq!(
                done,
                onload.clone().collect::<Vec<_>>(),
                "{tag}: one event per layer"
            );
            assert!(dst.buf == expect.buf, "{tag}: onload differs");
        }
    }
    ran
}

fn geom(dtype: Dtype, heads: u32, tokens: u32, hk: u32, hv: u32, layers: u32) -> Geometry {
    Geometry {
        layers,
        kv_heads: heads,
        block_tokens: tokens,
        head_size_k: hk,
        head_size_v: hv,
        dtype,
    }
}

#[test]
fn every_dtype_layout_and_storage() {
    // rows of 32 B (16-byte kernels), 24 B (4-byte), 8 B (4-byte, K and V of
    // different sizes), 6 B (1-byte), 1 KiB in fp32
    let geoms = [
        geom(Dtype::Bf16, 2, 4, 8, 8, 3),
        geom(Dtype::F16, 3, 5, 6, 6, 3),
        geom(Dtype::Fp8, 2, 3, 3, 5, 2),
        geom(Dtype::Fp8, 1, 7, 3, 3, 2),
        geom(Dtype::F32, 2, 4, 128, 128, 2),
    ];
    let mut all = Ran::default();
    for g in geoms {
        for layout in [KvLayout::Lbhnc, KvLayout::Lbnhc] {
            for storage in [Storage::PerLayer, Storage::SharedGaps, Storage::BlockOuter] {
                for rec_offset in [0, 4, 1] {
                    let ran = check(&Case {
                        g,
                        layout,
                        storage,
                        blocks_in_cache: 9,
                        moved: vec![6, 1, 3, 8, 2],
                        rec_offset,
                        staging_records: 2,
                    });
                    assert!(ran.launches > 0, "{layout:?} {storage:?}: no kernel ran");
                    all.add(ran);
                }
            }
        }
    }
    // every kernel (both directions, three widths) ran at least once
    assert_eq!(all.entries, (1 << KV_COPY.entries.len()) - 1, "{all:?}");
}

#[test]
fn llama_pages_and_more_ops_than_one_launch() {
    // Llama-3-8B's page (8 KV heads, 16 tokens, head 128, bf16: 64 KiB):
    // 300 blocks in reverse order (more ops than one launch carries), and
    // 3 blocks (each page split over several CTAs).
    let g = geom(Dtype::Bf16, 8, 16, 128, 128, 2);
    for layout in [KvLayout::Lbhnc, KvLayout::Lbnhc] {
        for rec_offset in [0, 4] {
            let many = check(&Case {
                g,
                layout,
                storage: Storage::SharedGaps,
                blocks_in_cache: 304,
                moved: (0..300).rev().collect(),
                rec_offset,
                staging_records: 300,
            });
            assert!(many.most_per_cmd > 1, "{layout:?}: 300 ops fit one launch?");
            let few = check(&Case {
                g,
                layout,
                storage: Storage::BlockOuter,
                blocks_in_cache: 8,
                moved: vec![7, 0, 4],
                rec_offset,
                staging_records: 1,
            });
            assert!(few.most_z > 1, "{layout:?}: 3 pages not split over CTAs");
        }
    }
}
