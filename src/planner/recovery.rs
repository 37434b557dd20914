//! Warm restart, scheduler side: what every worker rank's files still hold.
//!
//! Each rank has its own NVMe folder (`nvme_dir/rank<r>`) and its own host
//! arena file (`host_file.rank<r>`); the scheduler reads their record headers
//! and slot tables (never the KV bytes) before any worker starts. The
//! [`super::BlockPlanner`] then counts a block as recovered only if every
//! rank has it, and drops it on the ranks that hold it otherwise.

use crate::config::Config;
use crate::error::Result;
use crate::planner::blocks::{Recovered, MAX_WORLD};

/// Lists the blocks of worker ranks `ranks` found on NVMe and in the host
/// arena files (see [`Recovered`]).
///
/// A damaged slot table is skipped (the worker resets it when it opens the
/// arena, so that rank starts without its host blocks); any other error,
/// e.g. an `nvme_dir` that is a symlink, is returned.
pub fn scan(cfg: &Config, ranks: std::ops::Range<u32>) -> Result<Vec<Recovered>> {
    let world = ranks.len();
    if world == 0 || world > MAX_WORLD as usize {
        return Err(crate::Error::invalid(format!(
            "world size {world}: kvpark plans for 1 to {MAX_WORLD} worker ranks"
        )));
    }
    let mut found: Vec<Recovered> = Vec::new();
    for rank in ranks {
        // Blocks of another model's store are indexed like any others but
        // can never match this model's keys (the key covers the model); the
        // worker, which opens and labels the stores, says so once.
        if let Some(dir) = &cfg.nvme_dir {
            found.extend(
                crate::tier::parked::scan_parked(dir, rank)?
                    .into_iter()
                    .map(|(k, s, l)| (rank, k, s, l, false, true)),
            );
        }
        if let Some(f) = cfg.host_file_for(rank) {
            match crate::tier::parked::scan_host_file(&f) {
                Ok(v) => found.extend(v.into_iter().map(|(k, s, l)| (rank, k, s, l, true, false))),
                Err(e) if e.kind() == crate::ErrorKind::Corrupt => {
                    log::warn!("kvpark: {e}; rank {rank} starts without the host blocks it listed")
                }
                Err(e) => return Err(e),
            }
        }
    }
    Ok(found)
}
