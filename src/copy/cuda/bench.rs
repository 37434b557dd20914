//! Self-test, raw-pointer transfers and GB/s benchmarks of the CUDA engine,
//! as plain Rust functions that the C ABI wraps (JSON in, JSON out) so a GPU
//! machine without a Rust toolchain can drive them from Python
//! (`scripts/gpu/check_and_bench.py`).
//!
//! | function               | C export (in `src/ffi`)                                      |
//! |------------------------|--------------------------------------------------------------|
//! | [`cuda_selftest`]      | `kvpark_cuda_selftest(device, out, out_len) -> status`       |
//! | [`cuda_bench_json`]    | `kvpark_cuda_bench(json_in, out, out_len) -> status`          |
//! | [`cuda_transfer_json`] | `kvpark_cuda_transfer(json_in, out, out_len) -> status`       |
//!
//! Benchmarks time on the host clock after synchronising the stream, take
//! the median of repetitions, and measure in the same run a baseline: one
//! `cuMemcpyAsync` of the same number of bytes between one device buffer and
//! one pinned host buffer, same direction.

use super::engine::{CudaEngine, HostRecord};
use super::plan::{derive_rules, Direction, Measured, Rule, Selector, Shape, Strategy};
use crate::benchkit::Figure;
use crate::block::{Dtype, Geometry, KvLayout, LayerView};
use crate::copy::{cpu::CpuEngine, CopyEngine, GatherOp, KvCaches};
use crate::error::{Error, Result};
use parking_lot::Mutex;
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// One engine per device for the whole process (kernels compile once).
pub fn shared_engine(device: i32) -> Result<CudaEngine> {
    static ENGINES: OnceLock<Mutex<HashMap<i32, CudaEngine>>> = OnceLock::new();
    let m = ENGINES.get_or_init(|| Mutex::new(HashMap::new()));
    let mut m = m.lock();
    if let Some(e) = m.get(&device) {
        return Ok(e.clone());
    }
    let e = CudaEngine::new(device)?;
    m.insert(device, e.clone());
    Ok(e)
}

/// Named geometries: `llama-3-8b` (32 layers), `qwen3-32b` (64 layers), both
/// 8 KV heads of 128 (64 KiB pages); `llama-3-70b-tp8` (80 layers, one KV
/// head per rank at tensor parallelism 8: 8 KiB pages); all 16 tokens per
/// block, bf16. Or a JSON [`Geometry`].
pub fn geometry_by_name(s: &str) -> Result<Geometry> {
    let g = |layers, kv_heads| Geometry {
        layers,
        kv_heads,
        block_tokens: 16,
        head_size_k: 128,
        head_size_v: 128,
        dtype: Dtype::Bf16,
    };
    match s.to_ascii_lowercase().as_str() {
        "llama-3-8b" | "llama-3.1-8b" | "llama3-8b" => Ok(g(32, 8)),
        "qwen3-32b" => Ok(g(64, 8)),
        "llama-3-70b-tp8" | "llama-3.1-70b-tp8" => Ok(g(80, 1)),
        j if j.trim_start().starts_with('{') => {
            let g: Geometry = serde_json::from_str(s)
                .map_err(|e| Error::invalid(format!("geometry JSON: {e}")))?;
            g.validate()?;
            Ok(g)
        }
        _ => Err(Error::invalid(format!(
            "unknown geometry {s:?} (llama-3-8b, qwen3-32b, llama-3-70b-tp8, or a JSON Geometry)"
        ))),
    }
}

fn views(base: u64, g: &Geometry, blocks: u64, layout: KvLayout) -> Result<Vec<LayerView>> {
    LayerView::layer_major(g, layout, base, blocks)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Times `f` (which synchronises before returning): warm-up once, then at
/// least 3 runs and ~`budget`; returns the median seconds.
fn time_it(budget: Duration, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let start = Instant::now();
    let mut v = Vec::new();
    while v.len() < 3 || (start.elapsed() < budget && v.len() < 200) {
        let t = Instant::now();
        f()?;
        v.push(t.elapsed().as_secs_f64());
    }
    Ok(median(v))
}

/// Geometries the benchmark runs by default: 64 KiB pages at 32 and 64
/// layers, 8 KiB pages at 80 layers.
pub const BENCH_GEOMETRIES: [&str; 3] = ["llama-3-8b", "qwen3-32b", "llama-3-70b-tp8"];

/// D2H and H2D GB/s of every strategy in `strategies` (as they resolve on
/// this device) and both layouts, for each of `geometries` at each count in
/// `blocks`, each beside its same-run baseline; and the selector rules the
/// measurements give ([`derive_rules`]).
pub fn cuda_bench(
    device: i32,
    geometries: &[String],
    blocks: &[usize],
    strategies: &[Strategy],
    budget: Duration,
) -> Result<(Vec<Figure>, Vec<Rule>)> {
    if geometries.is_empty() {
        return Err(Error::invalid(
            "no geometries to measure (bench JSON: \"geometry\" or \"geometries\")",
        ));
    }
    for g in geometries {
        geometry_by_name(g)?;
    }
    let mut figures = Vec::new();
    let mut measured = Vec::new();
    for g in geometries {
        figures.extend(cuda_bench_with(
            device,
            g,
            blocks,
            strategies,
            budget,
            &mut measured,
        )?);
    }
    Ok((figures, derive_rules(&measured)))
}

fn cuda_bench_with(
    device: i32,
    geometry: &str,
    blocks: &[usize],
    strategies: &[Strategy],
    budget: Duration,
    measured: &mut Vec<Measured>,
) -> Result<Vec<Figure>> {
    let g = geometry_by_name(geometry)?;
    let maxb = *blocks
        .iter()
        .max()
        .ok_or_else(|| Error::invalid("no block counts"))?;
    if maxb == 0 {
        return Err(Error::invalid("block counts must be > 0"));
    }
    let e = shared_engine(device)?;
    // block ids 1, 3, 5, ...: never adjacent, so DMA copies cannot merge
    let nblocks = (2 * maxb + 1) as u64;
    let bb = g.block_bytes();
    let page = g.layer_page_bytes();
    let dev = e.alloc_device(g.layers as usize * nblocks as usize * page)?;
    let mut host = e.alloc_pinned(maxb * bb)?;
    for (i, b) in host.as_mut_slice().iter_mut().enumerate() {
        *b = (i.wrapping_mul(2654435761) >> 13) as u8;
    }
    let base_dev = e.alloc_device(maxb * bb)?;
    let mut out = Vec::new();
    for &n in blocks {
        let bytes = (n * bb) as u64;
        // records in reverse slot order: adjacent ops are not adjacent in the arena
        let ops: Vec<HostRecord> = (0..n)
            .map(|i| HostRecord {
                block: 1 + 2 * i as u32,
                // SAFETY: slot n-1-i < maxb lies inside `host`.
                host: unsafe { host.ptr().add((n - 1 - i) * bb) },
            })
            .collect();
        for dir in [Direction::D2H, Direction::H2D] {
            let base = time_it(budget, || unsafe {
                let (src, dst) = match dir {
                    Direction::D2H => (base_dev.ptr(), host.ptr() as u64),
                    Direction::H2D => (host.ptr() as u64, base_dev.ptr()),
                };
                e.copy_raw(dst, src, bytes as usize)
            })?;
            for layout in [KvLayout::Lbhnc, KvLayout::Lbnhc] {
                // SAFETY: views lie inside `dev`.
                let kv = unsafe { KvCaches::new(g, views(dev.ptr(), &g, nblocks, layout)?, true)? };
                let mut seen = Vec::new();
                for &s in strategies {
                    let used = super::plan::resolve(
                        s,
                        layout,
                        super::plan::Caps {
                            batch_dma: e.has_batch_dma(),
                            host_mapped: true,
                        },
                    );
                    if seen.contains(&used) {
                        continue;
                    }
                    seen.push(used);
                    e.set_selector(Selector::forced(s));
                    let t = time_it(budget, || unsafe {
                        match dir {
                            Direction::D2H => e.submit_offload(&kv, &ops, None)?.wait(),
                            Direction::H2D => e
                                .submit_onload(&kv, &ops, 0..g.layers as usize, None)?
                                .wait_all(),
                        }
                    })?;
                    measured.push(Measured {
                        shape: Shape {
                            dir,
                            layout,
                            page_bytes: page,
                            pages: n * g.layers as usize,
                        },
                        strategy: used,
                        bytes_per_s: bytes as f64 / t,
                    });
                    out.push(Figure {
                        name: format!(
                            "{} {:?} {} {n} blk {geometry}",
                            dir_name(dir),
                            layout,
                            used.name()
                        )
                        .to_lowercase(),
                        bytes_per_s: bytes as f64 / t,
                        baseline: "one pinned cuMemcpyAsync".into(),
                        baseline_bytes_per_s: bytes as f64 / base,
                    });
                }
            }
        }
    }
    e.set_selector(Selector::default());
    Ok(out)
}

fn dir_name(d: Direction) -> &'static str {
    match d {
        Direction::D2H => "d2h",
        Direction::H2D => "h2d",
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BenchIn {
    #[serde(default)]
    device: i32,
    #[serde(default)]
    geometry: Option<String>,
    #[serde(default)]
    geometries: Vec<String>,
    blocks: Vec<usize>,
    #[serde(default)]
    strategies: Option<Vec<String>>,
    #[serde(default)]
    budget_ms: Option<u64>,
}

/// JSON form of [`cuda_bench`]: `{"device":0,"geometry":"qwen3-32b"` or
/// `"geometries":["llama-3-8b",...], "blocks":[1,64,1024],
/// "strategies":["dma_batch",...]?,"budget_ms":300?}` →
/// `{"figures":[{"name","bytes_per_s","baseline","baseline_bytes_per_s"}],
/// "rules":[...]}`, where `rules` ([`derive_rules`]) is the fastest strategy
/// per direction, layout, page size and transfer size, in the form config key
/// `copy_strategy` takes.
pub fn cuda_bench_json(json: &str) -> Result<String> {
    let a: BenchIn =
        serde_json::from_str(json).map_err(|e| Error::invalid(format!("bench JSON: {e}")))?;
    let strategies = match a.strategies {
        Some(v) => v
            .iter()
            .map(|s| Strategy::parse(s))
            .collect::<Result<Vec<_>>>()?,
        None => Strategy::ALL.to_vec(),
    };
    let geometries: Vec<String> = a.geometry.into_iter().chain(a.geometries).collect();
    let budget = Duration::from_millis(a.budget_ms.unwrap_or(300));
    let (figures, rules) = cuda_bench(a.device, &geometries, &a.blocks, &strategies, budget)?;
    Ok(serde_json::json!({ "figures": figures, "rules": rules }).to_string())
}

/// Gathers and scatters with every strategy, both layouts and three dtypes on
/// the device, compares each record and page with the CPU engine's result on
/// the same bytes, and returns a one-line-per-case report. Any mismatch is an
/// [`ErrorKind::Corrupt`](crate::ErrorKind::Corrupt) error naming the case.
pub fn cuda_selftest(device: i32) -> Result<String> {
    let e = shared_engine(device)?;
    let mut report = format!("{e:?}\n");
    for dtype in [Dtype::Bf16, Dtype::F32, Dtype::Fp8] {
        let g = Geometry {
            layers: 5,
            kv_heads: 4,
            block_tokens: 16,
            head_size_k: 64,
            head_size_v: 64,
            dtype,
        };
        let nb = 9u64;
        let page = g.layer_page_bytes();
        let bytes = g.layers as usize * nb as usize * page;
        let img: Vec<u8> = (0..bytes)
            .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8 | 1)
            .collect();
        for layout in [KvLayout::Lbhnc, KvLayout::Lbnhc] {
            // reference on the CPU over the same bytes
            let mut himg = img.clone();
            let hkv = unsafe {
                KvCaches::new(g, views(himg.as_mut_ptr() as u64, &g, nb, layout)?, false)?
            };
            let blocks = [7u32, 2, 4];
            let mut want: Vec<Vec<u8>> =
                blocks.iter().map(|_| vec![0u8; g.block_bytes()]).collect();
            {
                let mut ops: Vec<GatherOp> = blocks
                    .iter()
                    .zip(want.iter_mut())
                    .map(|(b, d)| GatherOp { block: *b, dst: d })
                    .collect();
                CpuEngine.gather(&hkv, &mut ops)?;
            }
            for s in Strategy::ALL {
                e.set_selector(Selector::forced(s));
                let dev = e.alloc_device(bytes)?;
                dev.upload(0, &img)?;
                let kv = unsafe { KvCaches::new(g, views(dev.ptr(), &g, nb, layout)?, true)? };
                let mut rec = e.alloc_pinned(blocks.len() * g.block_bytes())?;
                rec.as_mut_slice().fill(0xEE);
                let ops: Vec<HostRecord> = blocks
                    .iter()
                    .enumerate()
                    .map(|(i, b)| HostRecord {
                        block: *b,
                        host: unsafe { rec.ptr().add(i * g.block_bytes()) },
                    })
                    .collect();
                unsafe { e.submit_offload(&kv, &ops, None)?.wait()? };
                for (i, w) in want.iter().enumerate() {
                    if &rec.as_slice()[i * g.block_bytes()..][..g.block_bytes()] != w.as_slice() {
                        return Err(Error::corrupt(format!(
                            "gather {dtype:?} {layout:?} {}: block {} differs from the CPU engine",
                            s.name(),
                            blocks[i]
                        )));
                    }
                }
                // scatter back into a zeroed cache, layer by layer, and compare pages
                let dev2 = e.alloc_device(bytes)?;
                let kv2 = unsafe { KvCaches::new(g, views(dev2.ptr(), &g, nb, layout)?, true)? };
                let mut h = unsafe { e.submit_onload(&kv2, &ops, 0..g.layers as usize, None)? };
                h.wait_all()?;
                drop(h);
                let mut got = vec![0u8; bytes];
                dev2.download(0, &mut got)?;
                let mut expect = vec![0u8; bytes];
                for b in blocks {
                    for l in 0..g.layers as usize {
                        let o = (l * nb as usize + b as usize) * page;
                        expect[o..o + page].copy_from_slice(&img[o..o + page]);
                    }
                }
                if got != expect {
                    return Err(Error::corrupt(format!(
                        "scatter {dtype:?} {layout:?} {}: pages differ",
                        s.name()
                    )));
                }
                report.push_str(&format!("ok {dtype:?} {layout:?} {}\n", s.name()));
            }
        }
    }
    e.set_selector(Selector::default());
    Ok(report)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ViewIn {
    base: u64,
    num_blocks: u64,
    stride_block: u64,
    stride_head: u64,
    stride_token: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProbeIn {
    blocks: Vec<u32>,
    out: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TransferIn {
    #[serde(default)]
    device: i32,
    geometry: Geometry,
    layers: Vec<ViewIn>,
    direction: Direction,
    #[serde(default)]
    strategy: Option<String>,
    ops: Vec<(u32, u64)>,
    #[serde(default)]
    layer_range: Option<[usize; 2]>,
    #[serde(default)]
    probe: Option<ProbeIn>,
}

/// One transfer on raw pointers that a caller allocated (PyTorch tensors):
///
/// ```json
/// {"device":0,
///  "geometry":{"layers":2,"kv_heads":8,"block_tokens":16,"head_size_k":128,"head_size_v":128,"dtype":"bf16"},
///  "layers":[{"base":140234..., "num_blocks":100, "stride_block":32768, "stride_head":4096, "stride_token":256}],
///  "direction":"d2h" | "h2d", "strategy":"dma_batch" (optional: default selector),
///  "ops":[[block_id, host_record_address], ...],
///  "layer_range":[0, 2] (h2d, optional),
///  "probe":{"blocks":[...], "out": host_address} (h2d, optional)}
/// ```
///
/// With `probe`, after `wait_layer(l)` for each layer `l` in order, the
/// device pages of layer `l` of the probe blocks are copied at once (on a
/// private stream) to `out + (l * len(blocks) + j) * page_bytes`: the caller
/// checks that each layer's data was really in place when `wait_layer`
/// returned. Returns `{"strategy": <used>, "bytes": n}`.
///
/// # Safety
/// Every address must be valid for the transfer as [`CudaEngine::submit_offload`] /
/// [`CudaEngine::submit_onload`] require, and `probe.out` must hold
/// `layers * len(blocks) * page_bytes` writable bytes.
pub unsafe fn cuda_transfer_json(json: &str) -> Result<String> {
    let a: TransferIn =
        serde_json::from_str(json).map_err(|e| Error::invalid(format!("transfer JSON: {e}")))?;
    let e = shared_engine(a.device)?;
    let views: Vec<LayerView> = a
        .layers
        .iter()
        .map(|v| LayerView {
            base: v.base,
            num_blocks: v.num_blocks,
            stride_block: v.stride_block,
            stride_head: v.stride_head,
            stride_token: v.stride_token,
        })
        .collect();
    let kv = KvCaches::new(a.geometry, views, true)?;
    let g = a.geometry;
    let ops: Vec<HostRecord> = a
        .ops
        .iter()
        .map(|(b, h)| HostRecord {
            block: *b,
            host: *h as *mut u8,
        })
        .collect();
    let before = e.stats();
    match &a.strategy {
        Some(s) => e.set_selector(Selector::forced(Strategy::parse(s)?)),
        None => e.set_selector(Selector::default()),
    }
    let res = (|| -> Result<()> {
        match a.direction {
            Direction::D2H => e.submit_offload(&kv, &ops, None)?.wait(),
            Direction::H2D => {
                let r = a.layer_range.unwrap_or([0, g.layers as usize]);
                let mut h = e.submit_onload(&kv, &ops, r[0]..r[1], None)?;
                if let Some(p) = &a.probe {
                    let page = g.layer_page_bytes();
                    for l in r[0]..r[1] {
                        h.wait_layer(l)?;
                        for (j, b) in p.blocks.iter().enumerate() {
                            kv.check_block(*b)?;
                            let src = kv.layers()[l].page_addr(&g, *b as u64);
                            let dst = (p.out as usize + (l * p.blocks.len() + j) * page) as *mut u8;
                            e.peek(src, dst, page)?;
                        }
                    }
                }
                h.wait_all()
            }
        }
    })();
    e.set_selector(Selector::default());
    res?;
    let after = e.stats();
    let used = (0..4)
        .find(|&i| after.transfers[i] > before.transfers[i])
        .map(|i| Strategy::ALL[i].name())
        .unwrap_or("none");
    let bytes: u64 = (0..4).map(|i| after.bytes[i] - before.bytes[i]).sum();
    Ok(serde_json::json!({ "strategy": used, "bytes": bytes }).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometries_by_name() {
        assert_eq!(
            geometry_by_name("llama-3-8b").unwrap().block_bytes(),
            2 << 20
        );
        assert_eq!(
            geometry_by_name("Qwen3-32B").unwrap().bytes_per_token(),
            256 << 10
        );
        let j = r#"{"layers":2,"kv_heads":1,"block_tokens":16,"head_size_k":64,"head_size_v":64,"dtype":"f16"}"#;
        assert_eq!(geometry_by_name(j).unwrap().layers, 2);
        assert_eq!(
            geometry_by_name("llama-3-70b-tp8")
                .unwrap()
                .layer_page_bytes(),
            8 << 10
        );
        assert!(geometry_by_name("gpt-5").is_err());
    }

    #[test]
    fn entry_points_without_a_device_are_typed_errors() {
        if super::super::driver::init().is_ok() {
            return; // a driver exists: the GPU session covers these
        }
        assert_eq!(cuda_selftest(0).unwrap_err().kind(), crate::ErrorKind::Cuda);
        let e = cuda_bench_json(r#"{"geometry":"llama-3-8b","blocks":[1]}"#).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Cuda);
        // malformed input is reported before any device is needed
        let e = cuda_bench_json(r#"{"geometry":"llama-3-8b","blokcs":[1]}"#).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::InvalidArgument);
        let e = unsafe { cuda_transfer_json("{}") }.unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::InvalidArgument);
        // the requests scripts/gpu/check_and_bench.py sends parse: they get
        // as far as needing the device
        let e = cuda_bench_json(
            r#"{"geometries":["llama-3-8b","qwen3-32b","llama-3-70b-tp8"],"blocks":[1,64,1024],"budget_ms":300}"#,
        )
        .unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Cuda, "{e}");
        let e =
            cuda_bench_json(r#"{"geometries":["llama-3-8b","gpt-9"],"blocks":[1]}"#).unwrap_err();
        assert!(e.message().contains("gpt-9"), "{e}");
        let e = cuda_bench_json(r#"{"blocks":[1]}"#).unwrap_err();
        assert!(e.message().contains("geometries"), "{e}");
        for dtype in ["bf16", "f16", "f32", "fp8"] {
            let req = format!(
                r#"{{"geometry":{{"layers":6,"kv_heads":4,"block_tokens":16,"head_size_k":64,"head_size_v":64,"dtype":"{dtype}"}},
                    "layers":[{{"base":4096,"num_blocks":40,"stride_block":8192,"stride_head":2048,"stride_token":128}}],
                    "direction":"h2d","strategy":"kernel_mapped","ops":[[3,65536],[5,131072]],
                    "probe":{{"blocks":[3],"out":262144}}}}"#
            );
            let e = unsafe { cuda_transfer_json(&req) }.unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::Cuda, "{dtype}: {e}");
        }
    }
}
