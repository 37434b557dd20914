//! Read-only listing of the records of a rank's store, for the scheduler's
//! warm restart: it reads record headers only and never opens a file for
//! writing, so it can run beside the worker that owns the store.

use super::aligned::BufPool;
use super::scan::{scan_segment, ScanItem};
use super::store::{list_segments, newest_segment, open_segment, KeyInfo};
use crate::block::BlockKey;
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::path::Path;

/// Every valid record under `<dir>/rank<rank>`, newest per key. A missing
/// directory is an empty store; torn or corrupt headers are skipped (the
/// owning store counts them when it opens).
pub fn scan_keys(dir: &Path, rank: u32) -> Result<Vec<KeyInfo>> {
    let rank_dir = dir.join(format!("rank{rank}"));
    let rd = match std::fs::read_dir(&rank_dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(Error::from(e).context(rank_dir.display())),
    };
    drop(rd);
    let segs = list_segments(&rank_dir)?;
    let pool = BufPool::new(2);
    let mut newest: HashMap<BlockKey, (u64, KeyInfo)> = HashMap::new();
    let newest_seg = newest_segment(&segs);
    for (id, path) in segs {
        // An entry that is not a usable segment (symlink, directory, FIFO,
        // unreadable) is skipped, as recovery skips it; opens never block.
        let Ok((f, len)) = open_segment(&path, false) else {
            continue;
        };
        scan_segment(&f, len, id, newest_seg == Some(id), false, &pool, |item| {
            if let ScanItem::Record { hdr, .. } = item {
                let info = KeyInfo {
                    key: hdr.key,
                    session: hdr.session,
                    seq: hdr.seq,
                    raw_len: hdr.raw_len,
                    stored_len: hdr.stored_len,
                    codec: hdr.codec,
                };
                match newest.get(&hdr.key) {
                    Some((lsn, _)) if *lsn >= hdr.lsn => {}
                    _ => {
                        newest.insert(hdr.key, (hdr.lsn, info));
                    }
                }
            }
        })?;
    }
    let mut out: Vec<KeyInfo> = newest.into_values().map(|v| v.1).collect();
    out.sort_by_key(|k| (k.session, k.seq));
    Ok(out)
}
