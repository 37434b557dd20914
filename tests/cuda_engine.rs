//! One test body for every copy engine: gather and scatter in both physical
//! orders (LBHNC, LBNHC), layers sharing one storage, layer-wise scatter
//! order. It runs on the CPU engine always, and on the CUDA engine — with
//! every strategy, pinned and pageable records — where a device exists. The
//! GPU-only tests also cover the pinning job and the mover's layer-wise
//! load on device caches:
//!
//! ```text
//! cargo test --test cuda_engine                       # CPU body + no-driver check
//! cargo test --test cuda_engine -- --ignored          # on a GPU machine
//! ```
//!
//! The GPU tests are `#[ignore]`d; run without a device they print
//! `SKIPPED: no CUDA device (reason)` and FAIL, so a skip is never a pass.

use kvpark::block::{Dtype, Geometry, KvLayout, LayerView};
use kvpark::copy::cpu::CpuEngine;
use kvpark::copy::cuda::{CudaEngine, HostRecord, Selector, Strategy};
use kvpark::copy::{CopyEngine, GatherOp, KvCaches, ScatterOp};
use kvpark::ErrorKind;
use std::cell::RefCell;

/// Where the KV storage lives, and how the test reads and writes it.
trait Mem {
    fn on_device(&self) -> bool;
    /// Zeroed storage of `bytes`; lives as long as `self`.
    fn alloc(&self, bytes: usize) -> u64;
    fn write(&self, addr: u64, data: &[u8]);
    fn read(&self, addr: u64, out: &mut [u8]);
    /// A host record buffer of `bytes` (pinned where the harness pins).
    #[allow(clippy::mut_from_ref)]
    fn record(&self, bytes: usize) -> &mut [u8];
}

struct HostMem {
    bufs: RefCell<Vec<Box<[u8]>>>,
}

impl Mem for HostMem {
    fn on_device(&self) -> bool {
        false
    }
    fn alloc(&self, bytes: usize) -> u64 {
        let mut b = vec![0u8; bytes].into_boxed_slice();
        let p = b.as_mut_ptr() as u64;
        self.bufs.borrow_mut().push(b);
        p
    }
    fn write(&self, addr: u64, data: &[u8]) {
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), addr as *mut u8, data.len()) }
    }
    fn read(&self, addr: u64, out: &mut [u8]) {
        unsafe { std::ptr::copy_nonoverlapping(addr as *const u8, out.as_mut_ptr(), out.len()) }
    }
    fn record(&self, bytes: usize) -> &mut [u8] {
        let p = self.alloc(bytes);
        unsafe { std::slice::from_raw_parts_mut(p as *mut u8, bytes) }
    }
}

fn geom(dtype: Dtype) -> Geometry {
    Geometry {
        layers: 4,
        kv_heads: 3,
        block_tokens: 5,
        head_size_k: 8,
        head_size_v: 8,
        dtype,
    }
}

const BLOCKS: u64 = 6;

/// All layers in one storage (vLLM's KVCacheTensor), layer l at l * region.
fn views(base: u64, g: &Geometry, layout: KvLayout) -> Vec<LayerView> {
    LayerView::layer_major(g, layout, base, BLOCKS).unwrap()
}

/// Byte at logical [layer, block, head, token, content byte]: distinct
/// enough that any index mix-up changes bytes (never zeros).
fn val(l: u64, b: u64, h: u64, t: u64, cb: u64) -> u8 {
    ((l * 131 + b * 61 + h * 29 + t * 13 + cb * 7) % 251 + 1) as u8
}

/// Host image of the whole storage for `layout`, given a value function.
fn image(g: &Geometry, layout: KvLayout, f: impl Fn(u64, u64, u64, u64, u64) -> u8) -> Vec<u8> {
    let v = views(0, g, layout);
    let es = g.dtype.size() as u64;
    let mut img = vec![0u8; (g.layers as u64 * BLOCKS) as usize * g.layer_page_bytes()];
    for (l, view) in v.iter().enumerate() {
        for b in 0..BLOCKS {
            for h in 0..g.kv_heads as u64 {
                for t in 0..g.block_tokens as u64 {
                    for cb in 0..g.row_bytes() as u64 {
                        let off = view.base
                            + (b * view.stride_block
                                + h * view.stride_head
                                + t * view.stride_token)
                                * es
                            + cb;
                        img[off as usize] = f(l as u64, b, h, t, cb);
                    }
                }
            }
        }
    }
    img
}

/// The canonical record of block `b`.
fn record_of(g: &Geometry, b: u64) -> Vec<u8> {
    let mut r = vec![0u8; g.block_bytes()];
    for l in 0..g.layers as usize {
        for h in 0..g.kv_heads as usize {
            for t in 0..g.block_tokens as usize {
                let o = g.record_offset(l, h, t);
                for cb in 0..g.row_bytes() {
                    r[o + cb] = val(l as u64, b, h as u64, t as u64, cb as u64);
                }
            }
        }
    }
    r
}

/// The shared body. Returns a description of what ran (for the log).
fn body(engine: &dyn CopyEngine, mem: &dyn Mem) {
    for dtype in [Dtype::Bf16, Dtype::F32, Dtype::Fp8] {
        let g = geom(dtype);
        let bytes = (g.layers as u64 * BLOCKS) as usize * g.layer_page_bytes();
        for src_layout in [KvLayout::Lbhnc, KvLayout::Lbnhc] {
            // gather blocks 3 and 1 from a filled cache
            let base = mem.alloc(bytes);
            mem.write(base, &image(&g, src_layout, val));
            let kv =
                unsafe { KvCaches::new(g, views(base, &g, src_layout), mem.on_device()) }.unwrap();
            assert_eq!(kv.layout(), src_layout);
            let r3 = mem.record(g.block_bytes());
            let r1 = mem.record(g.block_bytes());
            r3.fill(0xEE); // poison: every byte must be written
            r1.fill(0xEE);
            engine
                .gather(
                    &kv,
                    &mut [
                        GatherOp { block: 3, dst: r3 },
                        GatherOp { block: 1, dst: r1 },
                    ],
                )
                .unwrap();
            assert!(
                r3[..] == record_of(&g, 3)[..],
                "{dtype:?} {src_layout:?}: record of block 3"
            );
            assert!(
                r1[..] == record_of(&g, 1)[..],
                "{dtype:?} {src_layout:?}: record of block 1"
            );

            for dst_layout in [KvLayout::Lbhnc, KvLayout::Lbnhc] {
                // scatter block 3's record into block 5 and block 1's into
                // block 2 of an empty cache: layers 1.. first, then layer 0
                let dbase = mem.alloc(bytes);
                let dkv =
                    unsafe { KvCaches::new(g, views(dbase, &g, dst_layout), mem.on_device()) }
                        .unwrap();
                let ops = [
                    ScatterOp {
                        src: &*r3,
                        block: 5,
                    },
                    ScatterOp {
                        src: &*r1,
                        block: 2,
                    },
                ];
                let nl = g.layers as usize;
                engine.scatter_layers(&dkv, &ops, 1..nl).unwrap();
                let mut got = vec![0u8; bytes];
                mem.read(dbase, &mut got);
                let want_partial = image(&g, dst_layout, |l, b, h, t, cb| match (l, b) {
                    (0, _) => 0,
                    (_, 5) => val(l, 3, h, t, cb),
                    (_, 2) => val(l, 1, h, t, cb),
                    _ => 0,
                });
                assert!(
                    got == want_partial,
                    "{dtype:?} {src_layout:?}->{dst_layout:?}: layers 1.. only"
                );
                engine.scatter_layers(&dkv, &ops, 0..1).unwrap();
                mem.read(dbase, &mut got);
                let want = image(&g, dst_layout, |l, b, h, t, cb| match b {
                    5 => val(l, 3, h, t, cb),
                    2 => val(l, 1, h, t, cb),
                    _ => 0,
                });
                assert!(
                    got == want,
                    "{dtype:?} {src_layout:?}->{dst_layout:?}: all layers"
                );
            }

            // bad input is an error, not a panic
            let short = mem.record(10);
            assert_eq!(
                engine
                    .gather(
                        &kv,
                        &mut [GatherOp {
                            block: 0,
                            dst: short
                        }]
                    )
                    .unwrap_err()
                    .kind(),
                ErrorKind::InvalidArgument
            );
            let rec = mem.record(g.block_bytes());
            assert_eq!(
                engine
                    .gather(
                        &kv,
                        &mut [GatherOp {
                            block: BLOCKS as u32,
                            dst: rec
                        }]
                    )
                    .unwrap_err()
                    .kind(),
                ErrorKind::InvalidArgument
            );
        }
    }
}

#[test]
fn cpu_engine_runs_the_shared_body() {
    body(
        &CpuEngine,
        &HostMem {
            bufs: RefCell::new(Vec::new()),
        },
    );
}

fn libcuda_present() -> bool {
    let name = std::ffi::CString::new("libcuda.so.1").unwrap();
    let h = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    !h.is_null()
}

#[test]
fn cuda_engine_without_a_driver_is_a_cuda_error_not_a_panic() {
    let r = std::panic::catch_unwind(|| CudaEngine::new(0).map(|_| ()));
    let r = r.expect("CudaEngine::new panicked");
    if !libcuda_present() {
        let e = r.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Cuda);
        assert!(
            e.message()
                .contains("no CUDA driver (libcuda.so.1 not found)"),
            "{e}"
        );
        println!("no driver here: CudaEngine::new(0) -> {e}");
    } else if let Err(e) = r {
        assert_eq!(e.kind(), ErrorKind::Cuda, "{e}");
    }
    for bad in [-1, 4096] {
        assert_eq!(CudaEngine::new(bad).unwrap_err().kind(), ErrorKind::Cuda);
    }
}

// ---------------------------------------------------------------- GPU only

fn engine_or_skip() -> CudaEngine {
    match CudaEngine::new(0) {
        Ok(e) => e,
        Err(e) => {
            println!("SKIPPED: no CUDA device ({e})");
            panic!(
                "SKIPPED: no CUDA device ({e}); this test needs a GPU and does not count as a pass"
            );
        }
    }
}

/// KV storage in device memory, records pinned or pageable.
struct DevMem<'a> {
    engine: &'a CudaEngine,
    pinned: bool,
    dev: RefCell<Vec<kvpark::copy::cuda::engine::DeviceBuffer>>,
    pin: RefCell<Vec<kvpark::copy::cuda::engine::PinnedBuffer>>,
    host: HostMem,
}

impl Mem for DevMem<'_> {
    fn on_device(&self) -> bool {
        true
    }
    fn alloc(&self, bytes: usize) -> u64 {
        let b = self.engine.alloc_device(bytes).unwrap();
        let p = b.ptr();
        self.dev.borrow_mut().push(b);
        p
    }
    fn write(&self, addr: u64, data: &[u8]) {
        let d = self.dev.borrow();
        let b = d.iter().find(|b| b.ptr() == addr).unwrap();
        b.upload(0, data).unwrap();
    }
    fn read(&self, addr: u64, out: &mut [u8]) {
        let d = self.dev.borrow();
        let b = d.iter().find(|b| b.ptr() == addr).unwrap();
        b.download(0, out).unwrap();
    }
    fn record(&self, bytes: usize) -> &mut [u8] {
        if !self.pinned {
            return self.host.record(bytes);
        }
        let mut p = self.engine.alloc_pinned(bytes).unwrap();
        let s = p.as_mut_slice();
        let (ptr, len) = (s.as_mut_ptr(), s.len());
        self.pin.borrow_mut().push(p);
        unsafe { std::slice::from_raw_parts_mut(ptr, len) }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn cuda_engine_runs_the_shared_body_with_every_strategy() {
    let engine = engine_or_skip();
    println!("{engine:?}");
    for strat in Strategy::ALL {
        for pinned in [true, false] {
            engine.set_selector(Selector::forced(strat));
            let mem = DevMem {
                engine: &engine,
                pinned,
                dev: RefCell::new(Vec::new()),
                pin: RefCell::new(Vec::new()),
                host: HostMem {
                    bufs: RefCell::new(Vec::new()),
                },
            };
            println!("strategy {} pinned {pinned}", strat.name());
            body(&engine, &mem);
        }
    }
    engine.set_selector(Selector::default());
    let mem = DevMem {
        engine: &engine,
        pinned: true,
        dev: RefCell::new(Vec::new()),
        pin: RefCell::new(Vec::new()),
        host: HostMem {
            bufs: RefCell::new(Vec::new()),
        },
    };
    body(&engine, &mem);
    let s = engine.stats();
    // [kernel_mapped, kernel_staged, dma_batch, dma_each]; dma_batch needs CUDA >= 12.8
    let want_batch = engine.has_batch_dma();
    for (i, st) in Strategy::ALL.iter().enumerate() {
        if *st != Strategy::DmaBatch || want_batch {
            assert!(s.transfers[i] > 0, "{} never ran: {s:?}", st.name());
        }
    }
}

/// Llama-3-8B's per-layer shape (8 KV heads, head 128, 16 tokens per
/// block, bf16) with `layers` layers.
fn llama_like(layers: u32) -> Geometry {
    Geometry {
        layers,
        kv_heads: 8,
        block_tokens: 16,
        head_size_k: 128,
        head_size_v: 128,
        dtype: Dtype::Bf16,
    }
}

/// Head-major views of a [`llama_like`] cache at `base`: layer after layer,
/// `blocks` blocks each (strides in bf16 elements).
fn lbhnc_views(base: u64, g: &Geometry, blocks: u64) -> Vec<LayerView> {
    LayerView::layer_major(g, KvLayout::Lbhnc, base, blocks).unwrap()
}

#[test]
#[ignore = "needs a CUDA device"]
fn cuda_onload_wait_layer_orders_each_layer() {
    let engine = engine_or_skip();
    let g = llama_like(8);
    let blocks = 64u64;
    let page = g.layer_page_bytes();
    for strat in Strategy::ALL {
        engine.set_selector(Selector::forced(strat));
        let dev = engine
            .alloc_device(g.layers as usize * blocks as usize * page)
            .unwrap();
        let kv = unsafe { KvCaches::new(g, lbhnc_views(dev.ptr(), &g, blocks), true) }.unwrap();
        let mut host = engine
            .alloc_pinned(blocks as usize * g.block_bytes())
            .unwrap();
        for (i, b) in host.as_mut_slice().iter_mut().enumerate() {
            *b = (i % 253 + 1) as u8;
        }
        let ops: Vec<HostRecord> = (0..blocks as u32)
            .map(|b| HostRecord {
                block: b,
                host: unsafe { host.ptr().add(b as usize * g.block_bytes()) },
            })
            .collect();
        let mut h = unsafe { engine.submit_onload(&kv, &ops, 0..g.layers as usize, None) }.unwrap();
        for l in 0..g.layers as usize {
            h.wait_layer(l).unwrap();
            let mut got = vec![0u8; page];
            for b in [0usize, 63] {
                dev.download((l * blocks as usize + b) * page, &mut got)
                    .unwrap();
                let want = &host.as_slice()[b * g.block_bytes() + l * page..][..page];
                assert!(
                    got == want,
                    "{}: layer {l} block {b} in place after wait_layer",
                    strat.name()
                );
            }
        }
        h.wait_all().unwrap();
        assert!(h.is_done().unwrap());
        assert!(h.wait_layer(g.layers as usize).is_err());
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn cuda_pinning_job_registers_an_arena_the_engine_maps() {
    use kvpark::copy::cuda::{CudaPinner, PinHook, PinningJob};
    use std::time::Duration;
    let engine = engine_or_skip();
    let g = geom(Dtype::Bf16);
    let bytes = (g.layers as u64 * BLOCKS) as usize * g.layer_page_bytes();
    let dev = engine.alloc_device(bytes).unwrap();
    dev.upload(0, &image(&g, KvLayout::Lbnhc, val)).unwrap();
    let kv = unsafe { KvCaches::new(g, views(dev.ptr(), &g, KvLayout::Lbnhc), true) }.unwrap();

    let chunk = 2 << 20;
    let mut arena = memmap2::MmapMut::map_anon(3 * chunk).unwrap();
    // the first chunk at once (from this thread's view: on the job's own
    // thread, which has no context of its own), the rest after release
    let mut job =
        unsafe { PinningJob::start_cuda(0, arena.as_mut_ptr(), arena.len(), chunk, 1) }.unwrap();
    assert!(job.wait_settled(0, chunk, Duration::from_secs(60)).unwrap());
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(job.pinned_bytes(), chunk as u64, "held chunks were pinned");
    job.release();
    assert!(job
        .wait_settled(0, arena.len(), Duration::from_secs(60))
        .unwrap());
    assert_eq!(job.failed_chunks(), 0);
    assert_eq!(job.pinned_bytes(), 3 * chunk as u64);

    // records straddling no chunk boundary, in chunks 0 and 2
    for (strat, off) in [
        (Strategy::KernelMapped, 4096usize),
        (Strategy::DmaBatch, 2 * chunk + 8192),
    ] {
        engine.set_selector(Selector::forced(strat));
        let before = engine.stats();
        arena[off..off + g.block_bytes()].fill(0xEE);
        let ops = [HostRecord {
            block: 4,
            host: unsafe { arena.as_mut_ptr().add(off) },
        }];
        unsafe { engine.submit_offload(&kv, &ops, None) }
            .unwrap()
            .wait()
            .unwrap();
        assert!(
            arena[off..off + g.block_bytes()] == record_of(&g, 4)[..],
            "{}",
            strat.name()
        );
        let after = engine.stats();
        // the registered arena is recognised as mapped: the mapped strategy is not degraded
        if strat == Strategy::KernelMapped {
            assert_eq!(
                after.transfers[0],
                before.transfers[0] + 1,
                "kernel_mapped ran: {after:?}"
            );
        }
    }
    engine.set_selector(Selector::default());
    let p = CudaPinner::new(0).unwrap();
    job.unpin_all(&|a, l| p.unpin(a, l)).unwrap();
    assert_eq!(job.pinned_bytes(), 0);
}

/// The mover on device KV caches: a save gathers on the GPU into the host
/// tier, and a sync load goes layer by layer (`layerwise_load: auto` is on
/// for device caches) through `CopyEngine::scatter_layerwise` on the CUDA
/// engine: after `wait_layer(l)` layer `l` of every loaded block holds the
/// saved bytes.
#[test]
#[ignore = "needs a CUDA device"]
fn cuda_mover_loads_layer_by_layer_into_device_caches() {
    use kvpark::block::BlockKey;
    use kvpark::config::Config;
    use kvpark::mover::Mover;
    use kvpark::plan::{LoadReq, Plan, SaveReq};
    let engine = engine_or_skip();
    let g = llama_like(4);
    let blocks = 16u64;
    let page = g.layer_page_bytes();
    let dev = engine
        .alloc_device(g.layers as usize * blocks as usize * page)
        .unwrap();
    let mut img: Vec<u8> = (0..g.layers as usize * blocks as usize * page)
        .map(|i| (i % 251 + 1) as u8)
        .collect();
    let at = |l: usize, b: usize| (l * blocks as usize + b) * page;
    for l in 0..g.layers as usize {
        for b in 9..13 {
            img[at(l, b)..at(l, b) + page].fill(0);
        }
    }
    dev.upload(0, &img).unwrap();
    let v = lbhnc_views(dev.ptr(), &g, blocks);
    let cfg = Config {
        host_bytes: 64 << 20,
        ..Config::default()
    };
    let mut m = Mover::new(cfg, 0).unwrap();
    unsafe { m.register(g, v, Some(0)) }.unwrap();
    let key = |i: u32| BlockKey::derive(b"cuda-mover", &i.to_le_bytes());
    let save = Plan {
        saves: vec![SaveReq {
            req_id: "s".into(),
            session: 1,
            blocks: (1..5u32).map(|b| (key(b), b, b - 1)).collect(),
            to_nvme: false,
        }],
        ..Default::default()
    };
    m.bind(&save.encode()).unwrap();
    m.start_load().unwrap();
    m.wait_for_save().unwrap();
    assert_eq!(
        m.drain(std::time::Duration::from_secs(10)).sending,
        vec!["s".to_string()]
    );
    let load = Plan {
        loads: vec![LoadReq {
            req_id: "l".into(),
            sync: true,
            blocks: (1..5u32).map(|b| (key(b), b + 8)).collect(),
        }],
        ..Default::default()
    };
    m.bind(&load.encode()).unwrap();
    m.start_load().unwrap();
    let mut got = vec![0u8; page];
    for l in 0..g.layers as usize {
        m.wait_layer(l as u32).unwrap();
        for b in 1..5usize {
            dev.download(at(l, b + 8), &mut got).unwrap();
            assert!(
                got[..] == img[at(l, b)..at(l, b) + page],
                "layer {l} of block {} in place after wait_layer({l})",
                b + 8
            );
        }
    }
    m.wait_for_save().unwrap();
    assert!(m.get_finished().failed_blocks.is_empty());
    let c: serde_json::Value = serde_json::from_str(&m.metrics_json()).unwrap();
    assert_eq!(c["engine"], "cuda");
    assert_eq!(c["counters"]["layerwise_loads"], 1, "{c}");
    assert_eq!(c["counters"]["loaded_blocks"], 4, "{c}");
}
