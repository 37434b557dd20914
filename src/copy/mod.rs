//! Copy engines: move blocks between vLLM's paged KV views and host records.
//!
//! A copy engine **gathers** a block (every layer's page, in vLLM's physical
//! order) into one canonical record (see [`crate::block`]) and **scatters** a
//! record back into a block of the registered views. It never allocates or
//! frees vLLM's memory; it is handed the views once ([`KvCaches`]) and block
//! ids per call.
//!
//! Engines: [`cpu::CpuEngine`] (always; the CPU backend and tests) and the
//! CUDA engine in `cuda/` (kernels and batched DMA, when a device exists).

#[cfg(feature = "cli")]
pub mod bench;
pub mod cpu;
pub mod cuda;
pub mod select;

use crate::block::{Geometry, KvLayout, LayerView};
use crate::error::{Error, Result};
use std::ops::Range;

/// The registered KV cache of one rank: geometry plus one view per layer.
#[derive(Clone, Debug)]
pub struct KvCaches {
    geom: Geometry,
    layers: Vec<LayerView>,
    layout: KvLayout,
    on_device: bool,
}

impl KvCaches {
    /// Registers vLLM's per-layer views.
    ///
    /// # Safety
    /// Every view must describe memory that stays valid (and is not moved) for
    /// as long as the returned value or any engine using it lives, readable and
    /// writable for `num_blocks * stride_block` elements from `base`. With
    /// `on_device` the addresses are device addresses, only usable by a device
    /// engine.
    pub unsafe fn new(geom: Geometry, layers: Vec<LayerView>, on_device: bool) -> Result<Self> {
        geom.validate()?;
        if layers.len() != geom.layers as usize {
            return Err(Error::invalid(format!(
                "geometry says {} layers but {} views were registered",
                geom.layers,
                layers.len()
            )));
        }
        let layout = layers[0].validate(&geom)?;
        for (i, l) in layers.iter().enumerate() {
            let li = l
                .validate(&geom)
                .map_err(|e| e.context(format!("layer {i}")))?;
            if li != layout {
                return Err(Error::invalid(format!(
                    "layer {i} is {li:?} but layer 0 is {layout:?}: mixed layouts"
                )));
            }
            if l.num_blocks != layers[0].num_blocks {
                return Err(Error::invalid(format!(
                    "layer {i} has {} blocks, layer 0 has {}",
                    l.num_blocks, layers[0].num_blocks
                )));
            }
        }
        Ok(KvCaches {
            geom,
            layers,
            layout,
            on_device,
        })
    }

    /// The geometry.
    pub fn geometry(&self) -> &Geometry {
        &self.geom
    }
    /// The per-layer views.
    pub fn layers(&self) -> &[LayerView] {
        &self.layers
    }
    /// The physical order shared by every layer.
    pub fn layout(&self) -> KvLayout {
        self.layout
    }
    /// Whether the views are device memory.
    pub fn on_device(&self) -> bool {
        self.on_device
    }
    /// Number of blocks in each view.
    pub fn num_blocks(&self) -> u64 {
        self.layers[0].num_blocks
    }

    /// Checks a block id against the views.
    pub fn check_block(&self, block: u32) -> Result<()> {
        if block as u64 >= self.num_blocks() {
            return Err(Error::invalid(format!(
                "block id {block} out of range (cache has {} blocks)",
                self.num_blocks()
            )));
        }
        Ok(())
    }
}

/// One block to gather: vLLM block id → record buffer.
pub struct GatherOp<'a> {
    /// vLLM block id.
    pub block: u32,
    /// Record buffer, exactly `geometry.block_bytes()` long.
    pub dst: &'a mut [u8],
}

/// One block to scatter: record buffer → vLLM block id.
pub struct ScatterOp<'a> {
    /// Record buffer, exactly `geometry.block_bytes()` long.
    pub src: &'a [u8],
    /// vLLM block id.
    pub block: u32,
}

/// Moves blocks between registered views and host records.
pub trait CopyEngine: Send + Sync {
    /// Engine name for logs and metrics.
    fn name(&self) -> &'static str;

    /// Gathers whole blocks into records.
    fn gather(&self, kv: &KvCaches, ops: &mut [GatherOp<'_>]) -> Result<()>;

    /// Scatters records into blocks, layers `layers` only (for layer-wise
    /// pipelining; [`CopyEngine::scatter`] does all layers).
    fn scatter_layers(
        &self,
        kv: &KvCaches,
        ops: &[ScatterOp<'_>],
        layers: Range<usize>,
    ) -> Result<()>;

    /// The stream the model runs on (a `CUstream`: PyTorch's
    /// `torch.cuda.current_stream().cuda_stream`), `None` to forget it.
    /// Transfers submitted afterwards wait, on the device, for the work
    /// queued on it when they are submitted: a save does not read KV the
    /// forward is still writing, a load does not overwrite blocks that queued
    /// kernels still read. Engines without streams ignore it.
    fn set_compute_stream(&self, _stream: Option<u64>) {}

    /// Scatters whole records into blocks.
    fn scatter(&self, kv: &KvCaches, ops: &[ScatterOp<'_>]) -> Result<()> {
        self.scatter_layers(kv, ops, 0..kv.geometry().layers as usize)
    }

    /// Scatters whole records layer by layer, calling `layer_done(l)` (in
    /// order) as soon as layer `l` of every block is in place, so a forward
    /// pass can start on layer 0 while later layers are still moving. The
    /// default runs [`CopyEngine::scatter_layers`] one layer at a time; the
    /// CUDA engine submits every layer at once on its onload stream and
    /// reports each layer when that layer's event completes. On an error no
    /// later layer is reported.
    fn scatter_layerwise(
        &self,
        kv: &KvCaches,
        ops: &[ScatterOp<'_>],
        layer_done: &mut dyn FnMut(usize),
    ) -> Result<()> {
        for l in 0..kv.geometry().layers as usize {
            self.scatter_layers(kv, ops, l..l + 1)?;
            layer_done(l);
        }
        Ok(())
    }
}

pub(crate) fn check_len(kv: &KvCaches, block: u32, len: usize) -> Result<()> {
    kv.check_block(block)?;
    let want = kv.geometry().block_bytes();
    if len != want {
        return Err(Error::invalid(format!(
            "record buffer for block {block} is {len} bytes, a block is {want}"
        )));
    }
    Ok(())
}
