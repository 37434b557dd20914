//! [`CudaEngine`]: gathers and scatters blocks of vLLM's device KV cache to
//! and from host records, on the device's primary context.
//!
//! Invariants:
//! - The engine retains the device's **primary** context (the one PyTorch
//!   uses), pushes it around every driver call and releases it on drop.
//! - vLLM's memory is only ever a raw device address taken from
//!   [`KvCaches`]; it is never wrapped into an owning type, never freed.
//! - Offloads run on the offload stream, onloads on the onload stream (both
//!   non-blocking with respect to the legacy default stream). Work on one
//!   stream runs in submission order; the two directions overlap.
//! - An onload records one event per layer, so
//!   [`OnloadHandle::wait_layer`] waits for that layer only.
//! - A handle that is dropped waits for its transfer first: the host
//!   records a transfer reads or writes stay in use until then.
//! - The staging buffer of a direction is only touched by work on that
//!   direction's stream, so reuse is ordered by the stream; submissions of
//!   one direction are serialised (the staging lock is held while a transfer
//!   is queued) so two transfers never interleave over it; growing it first
//!   synchronises that stream.

use super::driver::{
    self as drv, check, CUcontext, CUdevice, CUevent, CUfunction, CUmodule, CUstream, CtxGuard,
    DevBuf,
};
use super::kernels::{self, KvOps, KvShape};
use super::nvrtc::Nvrtc;
use super::plan::{self, Caps, Cmd, Copy, DevShape, Direction, Selector, Shape, Strategy};
use crate::copy::{check_len, CopyEngine, GatherOp, KvCaches, ScatterOp};
use crate::error::{Error, Result};
use cudarc::driver::sys as cu;
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::ffi::c_void;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// One block of a device transfer: vLLM block id and its host record
/// (`geometry.block_bytes()` bytes, ideally in pinned memory).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct HostRecord {
    /// vLLM block id.
    pub block: u32,
    /// Address of the record in host memory.
    pub host: *mut u8,
}

/// Counters of one engine (monotonic).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct CudaStats {
    /// Bytes moved per strategy, in [`Strategy::ALL`] order.
    pub bytes: [u64; 4],
    /// Transfers per strategy, in [`Strategy::ALL`] order.
    pub transfers: [u64; 4],
}

/// Default size of each direction's device staging buffer.
pub const DEFAULT_STAGING_BYTES: usize = 64 << 20;

struct Staging {
    buf: Option<DevBuf>,
    cap: usize,
}

struct Inner {
    ordinal: i32,
    dev: CUdevice,
    ctx: CUcontext,
    streams: [CUstream; 2],
    module: CUmodule,
    /// One function per `kernels::KV_COPY.entries` ([`plan::kernel_entry`]).
    funcs: [CUfunction; 6],
    sm_count: u32,
    arch: (i32, i32),
    batch: Option<drv::MemcpyBatchFn>,
    selector: RwLock<Selector>,
    staging: [Mutex<Staging>; 2],
    tables: Mutex<HashMap<Vec<u64>, DevBuf>>,
    events: Mutex<Vec<CUevent>>,
    bytes: [AtomicU64; 4],
    transfers: [AtomicU64; 4],
    /// `CopyEngine::set_compute_stream` (0: none).
    compute_stream: AtomicU64,
    // keep in drop order: tables/staging freed before the context is released
}

// SAFETY: every CUDA handle here is used only with the primary context
// pushed on the calling thread (CtxGuard); the driver API is thread-safe;
// mutable state is behind locks.
unsafe impl Send for Inner {}
// SAFETY: as above.
unsafe impl Sync for Inner {}

/// The CUDA copy engine (see the module docs).
#[derive(Clone)]
pub struct CudaEngine {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for CudaEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CudaEngine(device {}, sm_{}{}, {} SMs, batch dma {})",
            self.inner.ordinal,
            self.inner.arch.0,
            self.inner.arch.1,
            self.inner.sm_count,
            self.inner.batch.is_some()
        )
    }
}

fn strat_idx(s: Strategy) -> usize {
    Strategy::ALL.iter().position(|x| *x == s).unwrap_or(0)
}

impl CudaEngine {
    /// Opens device `device_ordinal` on its primary context and compiles the
    /// kernels for it. Errors (never panics) with [`ErrorKind::Cuda`](crate::ErrorKind)
    /// when there is no driver, no such device, or no NVRTC.
    pub fn new(device_ordinal: i32) -> Result<CudaEngine> {
        let driver = drv::init()?;
        let n = drv::device_count()?;
        if device_ordinal < 0 || device_ordinal >= n {
            return Err(Error::cuda(format!(
                "no CUDA device {device_ordinal} (the driver sees {n})"
            )));
        }
        let nvrtc = Nvrtc::locate()?;
        // SAFETY: the driver is initialised; every handle created below is
        // owned by `Inner` and destroyed in its Drop (also on early return
        // through the partially built value's guards).
        unsafe {
            let mut dev: CUdevice = 0;
            check(cu::cuDeviceGet(&mut dev, device_ordinal), "cuDeviceGet")?;
            let attr = |a: cu::CUdevice_attribute| -> Result<i32> {
                let mut v = 0;
                check(
                    cu::cuDeviceGetAttribute(&mut v, a, dev),
                    "cuDeviceGetAttribute",
                )?;
                Ok(v)
            };
            use cu::CUdevice_attribute::*;
            let sm_count = attr(CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32;
            let arch = (
                attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
                attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
            );
            let mut ctx: CUcontext = std::ptr::null_mut();
            check(
                cu::cuDevicePrimaryCtxRetain(&mut ctx, dev),
                "cuDevicePrimaryCtxRetain",
            )?;
            let mut partial = Partial {
                dev,
                ctx,
                streams: vec![],
                module: None,
            };
            let _g = CtxGuard::push(ctx)?;
            for _ in 0..2 {
                let mut s: CUstream = std::ptr::null_mut();
                check(
                    cu::cuStreamCreate(&mut s, 1 /* NON_BLOCKING */),
                    "cuStreamCreate",
                )?;
                partial.streams.push(s);
            }
            let image = compile_for(&nvrtc, arch)?;
            let mut module: CUmodule = std::ptr::null_mut();
            check(
                cu::cuModuleLoadData(&mut module, image.as_ptr() as *const c_void),
                "cuModuleLoadData",
            )?;
            partial.module = Some(module);
            let func = |name: &str| -> Result<CUfunction> {
                let c = std::ffi::CString::new(name).unwrap_or_default();
                let mut f: CUfunction = std::ptr::null_mut();
                check(
                    cu::cuModuleGetFunction(&mut f, module, c.as_ptr()),
                    "cuModuleGetFunction",
                )
                .map_err(|e| e.context(name.to_string()))?;
                Ok(f)
            };
            let mut funcs: [CUfunction; 6] = [std::ptr::null_mut(); 6];
            for (f, name) in funcs.iter_mut().zip(kernels::KV_COPY.entries) {
                *f = func(name)?;
            }
            let streams = [partial.streams[0], partial.streams[1]];
            std::mem::forget(partial);
            let inner = Inner {
                ordinal: device_ordinal,
                dev,
                ctx,
                streams,
                module,
                funcs,
                sm_count: sm_count.max(1),
                arch,
                batch: driver.memcpy_batch,
                selector: RwLock::new(Selector::default()),
                staging: [
                    Mutex::new(Staging {
                        buf: None,
                        cap: DEFAULT_STAGING_BYTES,
                    }),
                    Mutex::new(Staging {
                        buf: None,
                        cap: DEFAULT_STAGING_BYTES,
                    }),
                ],
                tables: Mutex::new(HashMap::new()),
                events: Mutex::new(Vec::new()),
                bytes: Default::default(),
                transfers: Default::default(),
                compute_stream: AtomicU64::new(0),
            };
            Ok(CudaEngine {
                inner: Arc::new(inner),
            })
        }
    }

    /// The stream set by `CopyEngine::set_compute_stream`, if any.
    fn compute_stream(&self) -> Option<u64> {
        Some(self.inner.compute_stream.load(Ordering::Relaxed)).filter(|s| *s != 0)
    }

    /// Replaces the strategy selector (config rules or a forced strategy).
    pub fn set_selector(&self, s: Selector) {
        *self.inner.selector.write() = s;
    }

    /// Sets the staging buffer size per direction (allocated lazily).
    pub fn set_staging_bytes(&self, bytes: usize) {
        for s in &self.inner.staging {
            s.lock().cap = bytes.max(1 << 20);
        }
    }

    /// Whether the driver has `cuMemcpyBatchAsync`.
    pub fn has_batch_dma(&self) -> bool {
        self.inner.batch.is_some()
    }

    /// Compute capability (major, minor).
    pub fn arch(&self) -> (i32, i32) {
        self.inner.arch
    }

    /// Bytes and transfers per strategy so far.
    pub fn stats(&self) -> CudaStats {
        let mut s = CudaStats::default();
        for i in 0..4 {
            s.bytes[i] = self.inner.bytes[i].load(Ordering::Relaxed);
            s.transfers[i] = self.inner.transfers[i].load(Ordering::Relaxed);
        }
        s
    }

    /// The strategy the engine would use for a transfer of `ops` in `dir`.
    pub fn strategy_for(
        &self,
        kv: &KvCaches,
        dir: Direction,
        blocks: usize,
        layers: usize,
        host_mapped: bool,
    ) -> Strategy {
        let g = kv.geometry();
        let shape = Shape {
            dir,
            layout: kv.layout(),
            page_bytes: g.layer_page_bytes(),
            pages: blocks * layers,
        };
        self.inner.selector.read().pick(
            &shape,
            Caps {
                batch_dma: self.inner.batch.is_some(),
                host_mapped,
            },
        )
    }

    /// Starts gathering `ops` (whole blocks) into their host records on the
    /// offload stream. With `after_stream` (a raw `CUstream`, e.g. PyTorch's
    /// current stream) the copy first waits for the work queued there, so
    /// blocks the model is still writing are read only once written.
    ///
    /// # Safety
    /// Every `host` must point to `block_bytes` writable bytes that stay valid
    /// and untouched until the handle reports completion (or is dropped);
    /// `after_stream` must be a live stream of this device's primary context.
    pub unsafe fn submit_offload(
        &self,
        kv: &KvCaches,
        ops: &[HostRecord],
        after_stream: Option<u64>,
    ) -> Result<OffloadHandle> {
        let layers = 0..kv.geometry().layers as usize;
        let mut ev = self
            .inner
            .transfer(Direction::D2H, kv, ops, layers, after_stream)?;
        let event = ev
            .pop()
            .ok_or_else(|| Error::internal("offload recorded no event"))?;
        Ok(OffloadHandle {
            inner: self.inner.clone(),
            event,
            waited: false,
        })
    }

    /// Starts scattering the records of `ops` into their blocks, layers
    /// `layers` only, layer by layer on the onload stream.
    ///
    /// # Safety
    /// Every `host` must point to `block_bytes` readable bytes that stay valid
    /// and unchanged until the handle reports completion (or is dropped); the
    /// target blocks must not be read by the model before the matching
    /// [`OnloadHandle::wait_layer`] / [`OnloadHandle::stream_wait_layer`].
    pub unsafe fn submit_onload(
        &self,
        kv: &KvCaches,
        ops: &[HostRecord],
        layers: Range<usize>,
        after_stream: Option<u64>,
    ) -> Result<OnloadHandle> {
        let events = self
            .inner
            .transfer(Direction::H2D, kv, ops, layers.clone(), after_stream)?;
        Ok(OnloadHandle {
            inner: self.inner.clone(),
            layers,
            events,
            waited: false,
        })
    }
}

struct Partial {
    dev: CUdevice,
    ctx: CUcontext,
    streams: Vec<CUstream>,
    module: Option<CUmodule>,
}

impl Drop for Partial {
    fn drop(&mut self) {
        // SAFETY: only handles created in CudaEngine::new before the failure.
        unsafe {
            cu::cuCtxPushCurrent_v2(self.ctx);
            for s in &self.streams {
                cu::cuStreamDestroy_v2(*s);
            }
            if let Some(m) = self.module {
                cu::cuModuleUnload(m);
            }
            let mut old = std::ptr::null_mut();
            cu::cuCtxPopCurrent_v2(&mut old);
            cu::cuDevicePrimaryCtxRelease_v2(self.dev);
        }
    }
}

/// Compiles `cuda/kv_copy.cu` to SASS for `sm_XY` (loads on any driver of
/// the same major version); where this NVRTC does not know the architecture,
/// to PTX for the newest virtual architecture it knows that the device can
/// run (the driver JITs it).
fn compile_for(nv: &Nvrtc, arch: (i32, i32)) -> Result<Vec<u8>> {
    let src = &kernels::KV_COPY;
    let sm = format!("--gpu-architecture=sm_{}{}", arch.0, arch.1);
    // the first error is the telling one (later fallbacks may fail only
    // because an older NVRTC or a newer one lacks that architecture)
    let mut first = None;
    match nv.compile(src.text, src.file, &[&sm]) {
        Ok(c) => {
            if let Some(cubin) = c.cubin {
                return Ok(cubin);
            }
        }
        Err(e) => first = Some(e),
    }
    let dev = arch.0 * 10 + arch.1;
    let mut virt: Vec<i32> = vec![dev, 90, 89, 86, 80, 75, 70];
    virt.retain(|v| *v <= dev);
    virt.dedup();
    for v in virt {
        match nv.compile(
            src.text,
            src.file,
            &[&format!("--gpu-architecture=compute_{v}")],
        ) {
            Ok(c) if !c.ptx.is_empty() => return Ok(c.ptx),
            Ok(_) => {}
            Err(e) => {
                first.get_or_insert(e);
            }
        }
    }
    Err(first
        .unwrap_or_else(|| Error::cuda("NVRTC produced no image"))
        .context(format!("compiling kernels for sm_{}{}", arch.0, arch.1)))
}

impl Drop for Inner {
    fn drop(&mut self) {
        // SAFETY: handles owned by this engine; the context is pushed while
        // they are destroyed, then the primary context reference is released.
        unsafe {
            cu::cuCtxPushCurrent_v2(self.ctx);
            for s in self.streams {
                cu::cuStreamSynchronize(s);
            }
            for s in &self.staging {
                s.lock().buf = None;
            }
            self.tables.lock().clear();
            for e in self.events.lock().drain(..) {
                cu::cuEventDestroy_v2(e);
            }
            for s in self.streams {
                cu::cuStreamDestroy_v2(s);
            }
            cu::cuModuleUnload(self.module);
            let mut old = std::ptr::null_mut();
            cu::cuCtxPopCurrent_v2(&mut old);
            cu::cuDevicePrimaryCtxRelease_v2(self.dev);
        }
    }
}

/// Checks of a transfer shared by both directions.
fn check_kv(kv: &KvCaches, ops: &[HostRecord]) -> Result<()> {
    if !kv.on_device() {
        return Err(Error::unsupported(
            "the CUDA engine moves device KV caches; these views are host memory (use the CPU engine)",
        ));
    }
    let s0 = kv.layers()[0].stride_block;
    if let Some(i) = kv.layers().iter().position(|l| l.stride_block != s0) {
        return Err(Error::unsupported(format!(
            "layer {i} has block stride {} but layer 0 has {s0}: the CUDA engine needs one block stride",
            kv.layers()[i].stride_block
        )));
    }
    let bb = kv.geometry().block_bytes();
    for op in ops {
        check_len(kv, op.block, bb)?;
        if op.host.is_null() {
            return Err(Error::invalid(format!(
                "host record of block {} is NULL",
                op.block
            )));
        }
    }
    Ok(())
}

impl Inner {
    fn event(&self) -> Result<CUevent> {
        if let Some(e) = self.events.lock().pop() {
            return Ok(e);
        }
        let mut e: CUevent = std::ptr::null_mut();
        // SAFETY: context pushed by the caller.
        check(
            unsafe {
                cu::cuEventCreate(&mut e, 2 /* DISABLE_TIMING */)
            },
            "cuEventCreate",
        )?;
        Ok(e)
    }

    fn recycle(&self, evs: &[CUevent]) {
        self.events.lock().extend_from_slice(evs);
    }

    /// Device table of layer base addresses (uploaded once per registration).
    /// The upload is queued on `stream` and waited for: a synchronous copy
    /// from pageable memory may return before the data has landed, and the
    /// kernels that read the table run on streams that do not wait for the
    /// legacy stream.
    fn layer_table(&self, bases: &[u64], stream: CUstream) -> Result<u64> {
        let mut t = self.tables.lock();
        if let Some(b) = t.get(bases) {
            return Ok(b.ptr);
        }
        let buf = DevBuf::alloc(bases.len() * 8)?;
        // SAFETY: buf holds bases.len() u64; the source slice lives until the
        // stream synchronisation below returns.
        unsafe {
            check(
                cu::cuMemcpyHtoDAsync_v2(
                    buf.ptr,
                    bases.as_ptr() as *const c_void,
                    bases.len() * 8,
                    stream,
                ),
                "cuMemcpyHtoDAsync (layer table)",
            )?;
            check(
                cu::cuStreamSynchronize(stream),
                "cuStreamSynchronize (layer table)",
            )?;
        }
        let p = buf.ptr;
        t.insert(bases.to_vec(), buf);
        Ok(p)
    }

    /// The staging buffer of `dir`, grown to `need`; `s` is that
    /// direction's lock, held by the caller for the whole submission.
    fn staging(&self, s: &mut Staging, dir: Direction, need: usize) -> Result<(u64, usize)> {
        let want = s.cap.max(need);
        if s.buf.as_ref().map_or(true, |b| b.len < need) {
            // SAFETY: the old buffer may still be in use by queued work.
            check(
                unsafe { cu::cuStreamSynchronize(self.streams[dir.index()]) },
                "cuStreamSynchronize",
            )?;
            s.buf = None;
            s.buf = Some(DevBuf::alloc(want)?);
        }
        let b = s
            .buf
            .as_ref()
            .ok_or_else(|| Error::internal("staging buffer missing"))?;
        Ok((b.ptr, b.len))
    }

    fn dev_shape(kv: &KvCaches) -> DevShape {
        let g = kv.geometry();
        DevShape {
            layer_base: kv.layers().iter().map(|l| l.base).collect(),
            stride_block: kv.layers()[0].stride_block * g.dtype.size() as u64,
            page: g.layer_page_bytes() as u64,
        }
    }

    /// Device-usable addresses of the records, when all are mapped.
    fn mapped(&self, ops: &[HostRecord], len: u64) -> Option<Vec<u64>> {
        ops.iter()
            .map(|o| drv::mapped_device_ptr(o.host as u64, len))
            .collect()
    }

    fn wait_stream(&self, stream: CUstream, after: Option<u64>) -> Result<()> {
        if let Some(s) = after {
            let e = self.event()?;
            // SAFETY: caller guarantees `s` is a live stream of this context.
            unsafe {
                check(
                    cu::cuEventRecord(e, s as CUstream),
                    "cuEventRecord (after_stream)",
                )?;
                check(cu::cuStreamWaitEvent(stream, e, 0), "cuStreamWaitEvent")?;
            }
            self.recycle(&[e]);
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn launch(
        &self,
        dir: Direction,
        stream: CUstream,
        table: u64,
        d: &DevShape,
        kv: &KvCaches,
        blocks: &[u32],
        recs: &[u64],
        layers: Range<usize>,
    ) -> Result<()> {
        let g = kv.geometry();
        let k = plan::KernelGeometry {
            heads: g.kv_heads,
            tokens: g.block_tokens,
            row_bytes: g.row_bytes() as u32,
            layout: kv.layout(),
        };
        for mut l in plan::launches(dir, d, k, blocks, recs, layers, self.sm_count) {
            let mut tbl = table;
            let mut params: [*mut c_void; 3] = [
                &mut tbl as *mut u64 as *mut c_void,
                &mut *l.ops as *mut KvOps as *mut c_void,
                &mut l.shape as *mut KvShape as *mut c_void,
            ];
            // SAFETY: the kernel takes (const u64*, KvOps, KvShape) by value;
            // params point to live values of exactly those types during the call.
            check(
                unsafe {
                    cu::cuLaunchKernel(
                        self.funcs[l.entry],
                        l.grid[0],
                        l.grid[1],
                        l.grid[2],
                        l.threads,
                        1,
                        1,
                        0,
                        stream,
                        params.as_mut_ptr(),
                        std::ptr::null_mut(),
                    )
                },
                "cuLaunchKernel",
            )?;
        }
        Ok(())
    }

    /// Issues DMA copies on `stream`, batched when allowed.
    fn dma(&self, dir: Direction, stream: CUstream, copies: &[Copy], batch: bool) -> Result<()> {
        if let (true, Some(f)) = (batch, self.batch) {
            let (dev, host) = (
                drv::MemLocation {
                    kind: 1,
                    id: self.ordinal,
                },
                drv::MemLocation { kind: 2, id: 0 },
            );
            let (src_loc, dst_loc) = match dir {
                Direction::D2H => (dev, host),
                Direction::H2D => (host, dev),
            };
            let mut attrs = drv::MemcpyAttributes {
                src_access_order: 1,
                src_loc_hint: src_loc,
                dst_loc_hint: dst_loc,
                flags: 1,
            };
            for part in copies.chunks(4096) {
                let mut dsts: Vec<u64> = part.iter().map(|c| c.dst).collect();
                let mut srcs: Vec<u64> = part.iter().map(|c| c.src).collect();
                let mut sizes: Vec<usize> = part.iter().map(|c| c.len as usize).collect();
                let mut idx = [0usize];
                let mut fail = usize::MAX;
                // SAFETY: arrays of `part.len()` entries, one attribute applying
                // from index 0; the driver reads them during the call.
                let r = unsafe {
                    f(
                        dsts.as_mut_ptr(),
                        srcs.as_mut_ptr(),
                        sizes.as_mut_ptr(),
                        part.len(),
                        &mut attrs,
                        idx.as_mut_ptr(),
                        1,
                        &mut fail,
                        stream,
                    )
                };
                check(r, "cuMemcpyBatchAsync")
                    .map_err(|e| e.context(format!("copy {fail} of {}", part.len())))?;
            }
            return Ok(());
        }
        for c in copies {
            // SAFETY: unified addressing; ranges valid per the submit contract.
            check(
                unsafe { cu::cuMemcpyAsync(c.dst, c.src, c.len as usize, stream) },
                "cuMemcpyAsync",
            )?;
        }
        Ok(())
    }

    fn count(&self, s: Strategy, bytes: u64) {
        self.bytes[strat_idx(s)].fetch_add(bytes, Ordering::Relaxed);
        self.transfers[strat_idx(s)].fetch_add(1, Ordering::Relaxed);
    }

    /// Plans and queues a transfer on its direction's stream; returns the
    /// events recorded (one at the end for an offload, one per layer for an
    /// onload).
    fn transfer(
        &self,
        dir: Direction,
        kv: &KvCaches,
        ops: &[HostRecord],
        layers: Range<usize>,
        after: Option<u64>,
    ) -> Result<Vec<CUevent>> {
        check_kv(kv, ops)?;
        let g = kv.geometry();
        if layers.start >= layers.end || layers.end > g.layers as usize {
            return Err(Error::invalid(format!(
                "layer range {layers:?} outside 0..{}",
                g.layers
            )));
        }
        let _g = unsafe { CtxGuard::push(self.ctx) }?;
        // One submission per direction at a time: commands of two transfers
        // must not interleave on the stream while they share the staging buffer.
        let mut st = self.staging[dir.index()].lock();
        let bb = g.block_bytes() as u64;
        let stream = self.streams[dir.index()];
        let d = Self::dev_shape(kv);
        let mapped = self.mapped(ops, bb);
        let caps = Caps {
            batch_dma: self.batch.is_some(),
            host_mapped: mapped.is_some(),
        };
        let shape = Shape {
            dir,
            layout: kv.layout(),
            page_bytes: d.page as usize,
            pages: ops.len() * layers.len(),
        };
        let strat = self.selector.read().pick(&shape, caps);
        let blocks: Vec<u32> = ops.iter().map(|o| o.block).collect();
        let hosts: Vec<u64> = ops.iter().map(|o| o.host as u64).collect();
        let staging = match strat {
            Strategy::KernelStaged => {
                Some(self.staging(&mut st, dir, plan::staging_need(dir, d.page, bb))?)
            }
            _ => None,
        };
        let table = match strat {
            Strategy::KernelMapped | Strategy::KernelStaged => {
                self.layer_table(&d.layer_base, stream)?
            }
            _ => 0,
        };
        let cmds = plan::plan_transfer(
            &plan::TransferPlan {
                dev: &d,
                strategy: strat,
                blocks: &blocks,
                hosts: &hosts,
                mapped: mapped.as_deref(),
                staging,
                batch_ok: caps.batch_dma && caps.host_mapped,
                record_bytes: bb,
            },
            dir,
            layers.clone(),
        )?;
        self.wait_stream(stream, after)?;
        let mut events = Vec::new();
        let run = (|| -> Result<()> {
            for c in &cmds {
                match c {
                    Cmd::Launch {
                        dir,
                        blocks,
                        recs,
                        layers,
                    } => self.launch(*dir, stream, table, &d, kv, blocks, recs, layers.clone())?,
                    Cmd::Dma { copies, batch } => self.dma(dir, stream, copies, *batch)?,
                    Cmd::LayerDone(_) => {
                        let e = self.event()?;
                        events.push(e);
                        // SAFETY: context pushed; e and stream live.
                        check(unsafe { cu::cuEventRecord(e, stream) }, "cuEventRecord")?;
                    }
                }
            }
            if dir == Direction::D2H {
                let e = self.event()?;
                events.push(e);
                // SAFETY: as above.
                check(unsafe { cu::cuEventRecord(e, stream) }, "cuEventRecord")?;
            }
            Ok(())
        })();
        if let Err(e) = run {
            // queued work must finish before its events are reused
            // SAFETY: live stream.
            unsafe { cu::cuStreamSynchronize(stream) };
            self.recycle(&events);
            return Err(e);
        }
        self.count(strat, d.page * (ops.len() * layers.len()) as u64);
        Ok(events)
    }
}

/// A running offload ([`CudaEngine::submit_offload`]).
pub struct OffloadHandle {
    inner: Arc<Inner>,
    event: CUevent,
    waited: bool,
}

// SAFETY: the event is only used with the context pushed; driver calls are thread-safe.
unsafe impl Send for OffloadHandle {}

impl OffloadHandle {
    /// Whether every record has been written.
    pub fn is_done(&self) -> Result<bool> {
        if self.waited {
            return Ok(true);
        }
        let _g = unsafe { CtxGuard::push(self.inner.ctx) }?;
        // SAFETY: live event.
        let r = unsafe { cu::cuEventQuery(self.event) };
        if r == cu::CUresult::CUDA_ERROR_NOT_READY {
            return Ok(false);
        }
        check(r, "cuEventQuery").map(|_| true)
    }

    /// Blocks until every record has been written.
    pub fn wait(&mut self) -> Result<()> {
        if self.waited {
            return Ok(());
        }
        let _g = unsafe { CtxGuard::push(self.inner.ctx) }?;
        // SAFETY: live event.
        check(
            unsafe { cu::cuEventSynchronize(self.event) },
            "cuEventSynchronize (offload)",
        )?;
        self.waited = true;
        Ok(())
    }
}

impl Drop for OffloadHandle {
    fn drop(&mut self) {
        let _ = self.wait();
        self.inner.recycle(&[self.event]);
    }
}

/// A running onload ([`CudaEngine::submit_onload`]) with one event per layer.
pub struct OnloadHandle {
    inner: Arc<Inner>,
    layers: Range<usize>,
    events: Vec<CUevent>,
    waited: bool,
}

// SAFETY: as OffloadHandle.
unsafe impl Send for OnloadHandle {}

impl OnloadHandle {
    fn event_of(&self, layer: usize) -> Result<CUevent> {
        if !self.layers.contains(&layer) {
            return Err(Error::invalid(format!(
                "layer {layer} is not part of this onload (layers {:?})",
                self.layers
            )));
        }
        Ok(self.events[layer - self.layers.start])
    }

    /// Blocks until layer `layer` of every block is in place (only that
    /// layer and, by stream order, the layers before it).
    pub fn wait_layer(&self, layer: usize) -> Result<()> {
        let e = self.event_of(layer)?;
        let _g = unsafe { CtxGuard::push(self.inner.ctx) }?;
        // SAFETY: live event.
        check(
            unsafe { cu::cuEventSynchronize(e) },
            "cuEventSynchronize (layer)",
        )
        .map_err(|e| e.context(format!("onload layer {layer}")))
    }

    /// Makes `stream` (a raw `CUstream` of this device, e.g. PyTorch's
    /// current stream) wait for layer `layer` without blocking the host.
    ///
    /// # Safety
    /// `stream` must be a live stream of this device's primary context.
    pub unsafe fn stream_wait_layer(&self, layer: usize, stream: u64) -> Result<()> {
        let e = self.event_of(layer)?;
        let _g = unsafe { CtxGuard::push(self.inner.ctx) }?;
        check(
            cu::cuStreamWaitEvent(stream as CUstream, e, 0),
            "cuStreamWaitEvent (layer)",
        )
    }

    /// Whether every layer is in place.
    pub fn is_done(&self) -> Result<bool> {
        let Some(&e) = self.events.last() else {
            return Ok(true);
        };
        let _g = unsafe { CtxGuard::push(self.inner.ctx) }?;
        // SAFETY: live event.
        let r = unsafe { cu::cuEventQuery(e) };
        if r == cu::CUresult::CUDA_ERROR_NOT_READY {
            return Ok(false);
        }
        check(r, "cuEventQuery").map(|_| true)
    }

    /// Blocks until every layer is in place.
    pub fn wait_all(&mut self) -> Result<()> {
        if self.waited {
            return Ok(());
        }
        if let Some(&last) = self.events.last() {
            let _g = unsafe { CtxGuard::push(self.inner.ctx) }?;
            // SAFETY: live event; the stream runs layers in order.
            check(
                unsafe { cu::cuEventSynchronize(last) },
                "cuEventSynchronize (onload)",
            )?;
        }
        self.waited = true;
        Ok(())
    }
}

impl Drop for OnloadHandle {
    fn drop(&mut self) {
        let _ = self.wait_all();
        self.inner.recycle(&self.events);
    }
}

/// The host records of scatter ops (checked against the geometry).
fn scatter_records(kv: &KvCaches, ops: &[ScatterOp<'_>]) -> Result<Vec<HostRecord>> {
    for op in ops {
        check_len(kv, op.block, op.src.len())?;
    }
    Ok(ops
        .iter()
        .map(|o| HostRecord {
            block: o.block,
            host: o.src.as_ptr() as *mut u8,
        })
        .collect())
}

impl CopyEngine for CudaEngine {
    fn name(&self) -> &'static str {
        "cuda"
    }

    fn set_compute_stream(&self, stream: Option<u64>) {
        self.inner
            .compute_stream
            .store(stream.unwrap_or(0), Ordering::Relaxed);
    }

    fn gather(&self, kv: &KvCaches, ops: &mut [GatherOp<'_>]) -> Result<()> {
        for op in ops.iter() {
            check_len(kv, op.block, op.dst.len())?;
        }
        let recs: Vec<HostRecord> = ops
            .iter_mut()
            .map(|o| HostRecord {
                block: o.block,
                host: o.dst.as_mut_ptr(),
            })
            .collect();
        // SAFETY: the records are the caller's &mut buffers, alive across the wait.
        let mut h = unsafe { self.submit_offload(kv, &recs, self.compute_stream())? };
        h.wait()
    }

    fn scatter_layers(
        &self,
        kv: &KvCaches,
        ops: &[ScatterOp<'_>],
        layers: Range<usize>,
    ) -> Result<()> {
        let recs = scatter_records(kv, ops)?;
        if layers.is_empty() && layers.end <= kv.layers().len() {
            return Ok(());
        }
        // SAFETY: the records are the caller's buffers, alive across the
        // wait; scatter only reads them.
        let mut h = unsafe { self.submit_onload(kv, &recs, layers, self.compute_stream())? };
        h.wait_all()
    }

    /// One submission for every layer on the onload stream; layer `l` is
    /// reported when its event completes (the host waits on that event
    /// only), so `wait_for_layer_load(l)` does not wait for later layers.
    fn scatter_layerwise(
        &self,
        kv: &KvCaches,
        ops: &[ScatterOp<'_>],
        layer_done: &mut dyn FnMut(usize),
    ) -> Result<()> {
        let recs = scatter_records(kv, ops)?;
        let n = kv.geometry().layers as usize;
        // SAFETY: as in `scatter_layers`: the caller's buffers outlive the
        // handle, which is waited on (or dropped, which waits) before return.
        let mut h = unsafe { self.submit_onload(kv, &recs, 0..n, self.compute_stream())? };
        for l in 0..n {
            h.wait_layer(l)?;
            layer_done(l);
        }
        h.wait_all()
    }
}

/// Device memory allocated through an engine (tests, benchmarks): freed on
/// drop, keeps the engine's context alive. Never used for vLLM's memory.
pub struct DeviceBuffer {
    inner: Arc<Inner>,
    buf: Option<DevBuf>,
}

// SAFETY: device memory is addressed by value; calls push the context.
unsafe impl Send for DeviceBuffer {}

impl DeviceBuffer {
    /// Device address.
    pub fn ptr(&self) -> u64 {
        self.buf.as_ref().map_or(0, |b| b.ptr)
    }
    /// Bytes.
    pub fn len(&self) -> usize {
        self.buf.as_ref().map_or(0, |b| b.len)
    }
    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Copies `data` to `offset` (synchronous: waits for the whole device
    /// before and after, so the bytes have landed when it returns).
    pub fn upload(&self, offset: usize, data: &[u8]) -> Result<()> {
        if offset + data.len() > self.len() {
            return Err(Error::invalid("upload past the end of the device buffer"));
        }
        let _g = unsafe { CtxGuard::push(self.inner.ctx) }?;
        // SAFETY: range checked; copy from a live slice, waited for.
        unsafe {
            check(cu::cuCtxSynchronize(), "cuCtxSynchronize")?;
            check(
                cu::cuMemcpyHtoD_v2(
                    self.ptr() + offset as u64,
                    data.as_ptr() as *const c_void,
                    data.len(),
                ),
                "cuMemcpyHtoD",
            )?;
            // a pageable-source copy may return before the DMA has landed
            check(cu::cuCtxSynchronize(), "cuCtxSynchronize")
        }
    }
    /// Copies `out.len()` bytes from `offset` (synchronous, does not wait for
    /// other streams: reading what an onload is still writing is a race the
    /// caller rules out, e.g. with `wait_layer`).
    pub fn download(&self, offset: usize, out: &mut [u8]) -> Result<()> {
        if offset + out.len() > self.len() {
            return Err(Error::invalid("download past the end of the device buffer"));
        }
        let _g = unsafe { CtxGuard::push(self.inner.ctx) }?;
        let mut s: CUstream = std::ptr::null_mut();
        // SAFETY: range checked; a private non-blocking stream so the copy
        // does not wait for the engine's streams.
        unsafe {
            check(cu::cuStreamCreate(&mut s, 1), "cuStreamCreate")?;
            let r = cu::cuMemcpyAsync(
                out.as_mut_ptr() as u64,
                self.ptr() + offset as u64,
                out.len(),
                s,
            );
            let r2 = cu::cuStreamSynchronize(s);
            cu::cuStreamDestroy_v2(s);
            check(r, "cuMemcpyAsync (download)")?;
            check(r2, "cuStreamSynchronize (download)")
        }
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        if let Ok(_g) = unsafe { CtxGuard::push(self.inner.ctx) } {
            // SAFETY: wait for queued work that may still use it, then free.
            unsafe { cu::cuCtxSynchronize() };
            self.buf = None;
        }
    }
}

/// Pinned, device-mapped host memory (`cuMemHostAlloc`, portable + mapped,
/// not write-combined) for tests and benchmarks.
pub struct PinnedBuffer {
    inner: Arc<Inner>,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: plain host memory.
unsafe impl Send for PinnedBuffer {}

impl PinnedBuffer {
    /// The bytes.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr/len from cuMemHostAlloc, owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: as above.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
    /// Host address.
    pub fn ptr(&self) -> *mut u8 {
        self.ptr
    }
}

impl Drop for PinnedBuffer {
    fn drop(&mut self) {
        if let Ok(_g) = unsafe { CtxGuard::push(self.inner.ctx) } {
            // SAFETY: wait for transfers that may still use it, then free.
            unsafe {
                cu::cuCtxSynchronize();
                cu::cuMemFreeHost(self.ptr as *mut c_void);
            }
        }
    }
}

impl CudaEngine {
    /// Allocates zeroed device memory on this engine's device.
    pub fn alloc_device(&self, bytes: usize) -> Result<DeviceBuffer> {
        let _g = unsafe { CtxGuard::push(self.inner.ctx) }?;
        let buf = DevBuf::alloc(bytes)?;
        // SAFETY: fresh allocation of `bytes`; the memset is asynchronous to
        // the host, so wait for it before work on other streams uses the buffer.
        unsafe {
            check(cu::cuMemsetD8_v2(buf.ptr, 0, bytes), "cuMemsetD8")?;
            check(cu::cuCtxSynchronize(), "cuCtxSynchronize")?;
        }
        Ok(DeviceBuffer {
            inner: self.inner.clone(),
            buf: Some(buf),
        })
    }

    /// Allocates zeroed pinned, device-mapped host memory.
    pub fn alloc_pinned(&self, bytes: usize) -> Result<PinnedBuffer> {
        let _g = unsafe { CtxGuard::push(self.inner.ctx) }?;
        let mut p: *mut c_void = std::ptr::null_mut();
        // SAFETY: out-pointer valid; flags PORTABLE | DEVICEMAP.
        check(
            unsafe { cu::cuMemHostAlloc(&mut p, bytes.max(1), 0x01 | 0x02) },
            "cuMemHostAlloc",
        )
        .map_err(|e| e.context(format!("{bytes} bytes")))?;
        // SAFETY: fresh allocation.
        unsafe { std::ptr::write_bytes(p as *mut u8, 0, bytes) };
        Ok(PinnedBuffer {
            inner: self.inner.clone(),
            ptr: p as *mut u8,
            len: bytes,
        })
    }

    /// Copies `len` bytes from any device address to host memory on a
    /// private stream, synchronously, without waiting for the engine's
    /// streams (used to check what an onload has written so far).
    ///
    /// # Safety
    /// `src` must be `len` readable device bytes, `dst` `len` writable bytes.
    pub unsafe fn peek(&self, src: u64, dst: *mut u8, len: usize) -> Result<()> {
        let _g = unsafe { CtxGuard::push(self.inner.ctx) }?;
        let mut s: CUstream = std::ptr::null_mut();
        check(cu::cuStreamCreate(&mut s, 1), "cuStreamCreate")?;
        let r = cu::cuMemcpyAsync(dst as u64, src, len, s);
        let r2 = cu::cuStreamSynchronize(s);
        cu::cuStreamDestroy_v2(s);
        check(r, "cuMemcpyAsync (peek)")?;
        check(r2, "cuStreamSynchronize (peek)")
    }

    /// One plain `cuMemcpyAsync` of `len` bytes on the offload stream,
    /// synchronised: the benchmarks' same-run baseline.
    ///
    /// # Safety
    /// Both ranges must be valid (device or pinned host) for `len` bytes.
    pub unsafe fn copy_raw(&self, dst: u64, src: u64, len: usize) -> Result<()> {
        let _g = unsafe { CtxGuard::push(self.inner.ctx) }?;
        let s = self.inner.streams[0];
        check(
            cu::cuMemcpyAsync(dst, src, len, s),
            "cuMemcpyAsync (baseline)",
        )?;
        check(cu::cuStreamSynchronize(s), "cuStreamSynchronize")
    }

    /// Waits for both engine streams.
    pub fn synchronize(&self) -> Result<()> {
        let _g = unsafe { CtxGuard::push(self.inner.ctx) }?;
        for s in self.inner.streams {
            // SAFETY: live streams.
            check(unsafe { cu::cuStreamSynchronize(s) }, "cuStreamSynchronize")?;
        }
        Ok(())
    }
}
