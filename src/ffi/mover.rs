//! Worker-role exports: `kvpark_mover_*`.

use super::{bytes, guard, nn, put_buf, slice, KvparkBuf, KvparkStatus};
use crate::block::{Dtype, Geometry, LayerView};
use crate::config::Config;
use crate::mover::Mover;
use parking_lot::Mutex;

/// Opaque worker-side handle.
pub struct KvparkMover {
    inner: Mutex<Mover>,
}

/// KV geometry of one rank.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct KvparkGeometry {
    /// KV layers.
    pub layers: u32,
    /// KV heads on this rank.
    pub kv_heads: u32,
    /// Tokens per block.
    pub block_tokens: u32,
    /// K head size (elements).
    pub head_size_k: u32,
    /// V head size (elements).
    pub head_size_v: u32,
    /// 1 f16, 2 bf16, 3 f32, 4 fp8.
    pub dtype: u8,
}

/// Creates a worker-side mover for `rank`, after checking the config
/// against this machine for that rank ([`kvpark_config_preflight`](super::kvpark_config_preflight)).
///
/// # Safety
/// `config_json` valid for `len` bytes (or NULL with 0); `out` valid for writing.
#[no_mangle]
pub unsafe extern "C" fn kvpark_mover_new(
    config_json: *const u8,
    len: usize,
    rank: u32,
    out: *mut *mut KvparkMover,
) -> KvparkStatus {
    guard("kvpark_mover_new", || {
        let cfg = Config::from_json(bytes(config_json, len, "config_json")?)?;
        nn(out, "out")?;
        cfg.preflight(&crate::preflight::Preflight::rank(rank))?;
        let m = Mover::new(cfg, rank)?;
        out.write(Box::into_raw(Box::new(KvparkMover {
            inner: Mutex::new(m),
        })));
        Ok(())
    })
}

/// Frees a mover (waits for in-flight NVMe writes). NULL is a no-op.
///
/// # Safety
/// `m` must come from [`kvpark_mover_new`] and be freed once.
#[no_mangle]
pub unsafe extern "C" fn kvpark_mover_free(m: *mut KvparkMover) {
    if !m.is_null() {
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(Box::from_raw(m))));
    }
}

/// `register_kv_caches`: the geometry and one view per layer, in model order.
/// `on_device`: 0 = host memory (CPU backend); `n > 0` = CUDA device `n - 1`.
///
/// # Safety
/// `g` valid; `layers` valid for `num_layers` views describing memory that
/// outlives the mover.
#[no_mangle]
pub unsafe extern "C" fn kvpark_mover_register(
    m: *mut KvparkMover,
    g: *const KvparkGeometry,
    layers: *const LayerView,
    num_layers: usize,
    on_device: u8,
) -> KvparkStatus {
    guard("kvpark_mover_register", || {
        let m = &*nn(m, "mover")?;
        let g = *nn(g, "geometry")?;
        nn(layers, "layers")?;
        let views = slice(layers, num_layers, "layers")?.to_vec();
        let geom = Geometry {
            layers: g.layers,
            kv_heads: g.kv_heads,
            block_tokens: g.block_tokens,
            head_size_k: g.head_size_k,
            head_size_v: g.head_size_v,
            dtype: Dtype::from_code(g.dtype)?,
        };
        let device = match on_device {
            0 => None,
            d => Some(i32::from(d) - 1),
        };
        m.inner.lock().register(geom, views, device)?;
        Ok(())
    })
}

/// `bind_connector_metadata`: the step's plan bytes from the scheduler.
///
/// # Safety
/// `meta` valid for `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn kvpark_mover_bind(
    m: *mut KvparkMover,
    meta: *const u8,
    len: usize,
) -> KvparkStatus {
    guard("kvpark_mover_bind", || {
        let m = &*nn(m, "mover")?;
        m.inner.lock().bind(bytes(meta, len, "meta")?)?;
        Ok(())
    })
}

/// Runs a plan of tier moves only (from `kvpark_planner_tick_moves`)
/// outside the engine's step; their outcomes come in the next worker
/// report. A plan with saves or loads is `KVPARK_INVALID_ARGUMENT`.
///
/// # Safety
/// `meta` valid for `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn kvpark_mover_run_moves(
    m: *mut KvparkMover,
    meta: *const u8,
    len: usize,
) -> KvparkStatus {
    guard("kvpark_mover_run_moves", || {
        let m = &*nn(m, "mover")?;
        m.inner.lock().run_moves(bytes(meta, len, "meta")?)?;
        Ok(())
    })
}

/// `start_load_kv`: sync loads start (layer by layer beside the forward
/// when `layerwise_load` is on, else complete before return); async ones start.
///
/// # Safety
/// `m` must be a live mover.
#[no_mangle]
pub unsafe extern "C" fn kvpark_mover_start_load(m: *mut KvparkMover) -> KvparkStatus {
    guard("kvpark_mover_start_load", || {
        let m = &*nn(m, "mover")?;
        m.inner.lock().start_load()?;
        Ok(())
    })
}

/// `wait_for_save`: parks the step's finished requests, runs tier moves.
///
/// # Safety
/// `m` must be a live mover.
#[no_mangle]
pub unsafe extern "C" fn kvpark_mover_wait_for_save(m: *mut KvparkMover) -> KvparkStatus {
    guard("kvpark_mover_wait_for_save", || {
        let m = &*nn(m, "mover")?;
        m.inner.lock().wait_for_save()?;
        Ok(())
    })
}

/// `wait_for_layer_load(layer)`: returns once layer `layer` of the step's
/// sync loads is in place (later layers may still be moving). A non-OK
/// status means the layer is not in place.
///
/// # Safety
/// `m` must be a live mover.
#[no_mangle]
pub unsafe extern "C" fn kvpark_mover_wait_layer(m: *mut KvparkMover, layer: u32) -> KvparkStatus {
    guard("kvpark_mover_wait_layer", || {
        let m = &*nn(m, "mover")?;
        m.inner.lock().wait_layer(layer)?;
        Ok(())
    })
}

/// The stream the model runs on (a `CUstream`, e.g. PyTorch's
/// `torch.cuda.current_stream().cuda_stream`; 0 = none): transfers submitted
/// afterwards wait on the device for the work queued on it, so a save never
/// reads KV the forward is still writing and a load never overwrites blocks
/// queued kernels still read. Call it each step before the step's loads and
/// saves when the KV caches are on a GPU; ignored for host-memory caches.
///
/// # Safety
/// `m` must be a live mover; `stream` a live stream of the device's primary
/// context (or 0) while transfers are submitted.
#[no_mangle]
pub unsafe extern "C" fn kvpark_mover_set_stream(m: *mut KvparkMover, stream: u64) -> KvparkStatus {
    guard("kvpark_mover_set_stream", || {
        let m = &*nn(m, "mover")?;
        m.inner
            .lock()
            .set_compute_stream(Some(stream).filter(|s| *s != 0));
        Ok(())
    })
}

/// `get_finished`: JSON `{"sending":[..],"recving":[..],"failed_blocks":[..]}`.
///
/// # Safety
/// `out` valid for writing.
#[no_mangle]
pub unsafe extern "C" fn kvpark_mover_get_finished(
    m: *mut KvparkMover,
    out: *mut KvparkBuf,
) -> KvparkStatus {
    guard("kvpark_mover_get_finished", || {
        let m = &*nn(m, "mover")?;
        nn(out, "out")?;
        let f = m.inner.lock().get_finished();
        put_buf(out, serde_json::to_vec(&f).expect("finished serializes"));
        Ok(())
    })
}

/// The worker report for the scheduler (opaque bytes; empty = nothing new).
///
/// # Safety
/// `out` valid for writing.
#[no_mangle]
pub unsafe extern "C" fn kvpark_mover_take_worker_meta(
    m: *mut KvparkMover,
    out: *mut KvparkBuf,
) -> KvparkStatus {
    guard("kvpark_mover_take_worker_meta", || {
        let m = &*nn(m, "mover")?;
        nn(out, "out")?;
        let r = m.inner.lock().take_report();
        put_buf(out, r);
        Ok(())
    })
}

/// Metrics snapshot as JSON.
///
/// # Safety
/// `out` valid for writing.
#[no_mangle]
pub unsafe extern "C" fn kvpark_mover_metrics(
    m: *mut KvparkMover,
    out: *mut KvparkBuf,
) -> KvparkStatus {
    guard("kvpark_mover_metrics", || {
        let m = &*nn(m, "mover")?;
        nn(out, "out")?;
        let j = m.inner.lock().metrics_json();
        put_buf(out, j.into_bytes());
        Ok(())
    })
}
