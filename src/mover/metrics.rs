//! Mover counters (atomics, read as a JSON snapshot).

use serde::ser::{Serialize, SerializeMap, Serializer};
use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        /// Counters of one mover. All monotonic.
        #[derive(Debug, Default)]
        pub struct MoverMetrics {
            $($(#[$doc])* pub $name: AtomicU64,)*
        }

        impl Serialize for MoverMetrics {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let mut m = s.serialize_map(None)?;
                $(m.serialize_entry(stringify!($name), &self.$name.load(Ordering::Relaxed))?;)*
                m.end()
            }
        }
    };
}

counters! {
    /// Background jobs (loads, saves, tier moves) that panicked; their
    /// blocks were reported failed.
    job_panics,
    /// Save requests executed.
    saves,
    /// Blocks gathered into the host tier.
    saved_blocks,
    /// Blocks of a save that were on NVMe only, gathered again into the
    /// host tier from vLLM (cheaper than a promotion later; counted in
    /// `saved_blocks` too).
    rehosted_blocks,
    /// Blocks whose save failed.
    save_failed_blocks,
    /// Nanoseconds spent saving.
    save_ns,
    /// Load requests executed.
    loads,
    /// Blocks scattered into vLLM.
    loaded_blocks,
    /// Blocks loaded from a host copy.
    load_blocks_host,
    /// Blocks read from NVMe for a load.
    load_blocks_nvme,
    /// Blocks whose load failed (recomputed by vLLM).
    load_failed_blocks,
    /// NVMe records that failed their checksum on a load.
    load_corrupt,
    /// Nanoseconds spent loading (layer-wise loads: from `start_load` to
    /// the last layer in place).
    load_ns,
    /// Steps whose sync loads went layer by layer.
    layerwise_loads,
    /// `wait_for_layer_load` calls during a layer-wise load.
    layer_waits,
    /// Nanoseconds `wait_for_layer_load` blocked (what layer-wise loading
    /// did not hide behind the forward).
    layer_wait_ns,
    /// Times the host tier could not hold a step's sync loads at once (the
    /// blocks pinned so far were scattered whole first).
    layerwise_fallbacks,
    /// Layer-wise scatters that failed (their blocks reported failed).
    layerwise_errors,
    /// Plans bound while the previous step's plan still had work that had
    /// not run (its saves, loads and moves were kept and run with the new
    /// plan's, never dropped).
    plans_merged,
    /// Batches a save larger than the free host tier was streamed in
    /// (gathered, queued for NVMe, slots reused as the writes landed).
    save_stream_batches,
    /// Host blocks evicted to make room.
    host_evictions,
    /// Host blocks dropped without an NVMe copy.
    dropped_blocks,
    /// Times the host tier was full with nothing evictable.
    host_full,
    /// Blocks written to NVMe.
    demoted_blocks,
    /// NVMe write failures.
    nvme_write_errors,
    /// NVMe writes refused because the disk was full.
    nvme_full,
    /// Demotions that waited for room in the store's queue.
    demotions_deferred,
    /// Demotions skipped while the disk is full.
    demotions_skipped_full,
    /// Blocks indexed from NVMe at start.
    recovered_blocks,
    /// NVMe records of another geometry ignored at start.
    recovered_wrong_geometry,
    /// Stores (NVMe, host arena file) opened at start whose label named
    /// another model: their blocks are never served to this one.
    other_model_stores,
    /// Blocks found again in a reopened file-backed host arena at start.
    host_recovered_blocks,
    /// Slot-table entries dropped at start (bytes not matching their
    /// checksum, or a block already indexed otherwise).
    host_recovered_dropped,
}
