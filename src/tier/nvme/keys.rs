//! Read-only listing of the records of a rank's store, for the scheduler's
//! warm restart: it reads record headers only and never opens a file for
//! writing, so it can run beside the worker that owns the store.

use super::aligned::BufPool;
use super::scan::{scan_segment, ScanItem};
use super::store::{parse_seg_name, KeyInfo};
use crate::block::BlockKey;
use crate::error::{Error, Result, ResultExt};
use std::collections::HashMap;
use std::os::unix::fs::OpenOptionsExt;
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
    let mut segs: Vec<(u32, std::path::PathBuf)> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            Some((parse_seg_name(&name)?, e.path()))
        })
        .collect();
    segs.sort();
    let pool = BufPool::new(2);
    let mut newest: HashMap<BlockKey, (u64, KeyInfo)> = HashMap::new();
    for (_, path) in segs {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .ctx(path.display())?;
        let len = f.metadata().ctx(path.display())?.len();
        scan_segment(&f, len, false, &pool, |item| {
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
