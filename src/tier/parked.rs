//! What a restarting scheduler finds parked: the keys of the blocks on
//! NVMe and in a file-backed host arena, read from record headers and slot
//! tables only (no KV bytes). The scheduler-side planner recovers its index
//! from these lists (`planner::recovery`); the worker checks every block's
//! bytes when it reopens the stores, and a block it cannot confirm is a
//! failed load, recomputed.

use std::path::Path;

use crate::block::BlockKey;
use crate::error::{Error, Result};

/// Lists the blocks parked on NVMe under `dir` for `rank`: `(key, session, raw_len)`.
/// Used by the scheduler at start (warm restart); reads record headers only.
///
/// The directory and its rank folder are refused when they are symlinks, by
/// the same rule the worker's store applies when it opens them, so the
/// scheduler never indexes what the workers will not serve.
pub fn scan_parked(dir: &Path, rank: u32) -> Result<Vec<(BlockKey, u64, u64)>> {
    for d in [dir.to_path_buf(), dir.join(format!("rank{rank}"))] {
        if let Ok(m) = std::fs::symlink_metadata(&d) {
            if m.file_type().is_symlink() {
                return Err(Error::config(format!(
                    "nvme_dir: {} is a symlink; refusing to follow it (give the real path)",
                    d.display()
                )));
            }
        }
    }
    crate::tier::nvme::scan_keys(dir, rank).map(|v| {
        v.into_iter()
            .map(|k| (k.key, k.session, k.raw_len as u64))
            .collect()
    })
}

/// Lists the blocks the slot table of the host arena file `arena` names:
/// `(key, session, raw_len)`, as [`scan_parked`] does for NVMe. Used by the
/// scheduler at start; reads the table only (the worker checks each
/// block's bytes when it reopens the arena, and a block it cannot confirm
/// is a failed load, recomputed).
pub fn scan_host_file(arena: &Path) -> Result<Vec<(BlockKey, u64, u64)>> {
    let Some((bb, entries)) = crate::tier::slots::read_entries(arena)? else {
        return Ok(Vec::new());
    };
    Ok(entries
        .into_iter()
        .map(|e| (e.key, e.session, bb))
        .collect())
}
