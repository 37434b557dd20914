//! `kvpark inspect DIR`: a read-only report of what a store directory holds.
//!
//! Walks every `rank<R>/seg-*.kvp` (or the segments directly in `DIR` when it
//! is a rank directory) with the same rules as recovery ([`super::scan`]),
//! without opening a store, taking no lock and writing nothing. An entry
//! that cannot be a segment (a symlink, a directory, a FIFO, unreadable) is
//! skipped and listed, as recovery skips it; opens never block. *Live* means
//! the newest valid record of its key (as recovery would index it; a removed
//! record not yet collected counts as live, see the module docs). With
//! `verify`, every payload checksum is checked as well and every compressed
//! payload decoded (a failure is a corrupt record).

use super::aligned::BufPool;
use super::fsio;
use super::scan::{scan_segment, BadKind, ScanItem};
use super::store::{list_segments, newest_segment, open_segment};
use crate::block::BlockKey;
use crate::codec::CodecTag;
use crate::error::{Error, Result, ResultExt};
use crate::units::fmt_bytes;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs;
use std::path::Path;

/// The report of [`inspect`].
#[derive(Clone, Debug, serde::Serialize)]
pub struct InspectReport {
    /// Directory inspected.
    pub dir: String,
    /// Whether payload checksums were verified.
    pub verified: bool,
    /// One entry per rank directory.
    pub ranks: Vec<RankReport>,
}

/// One rank's segments.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RankReport {
    /// Rank number (None when DIR itself was a rank directory without the `rank<R>` name).
    pub rank: Option<u32>,
    /// Path of the rank directory.
    pub path: String,
    /// Per segment.
    pub segments: Vec<SegmentReport>,
    /// Valid records (live + dead).
    pub records: u64,
    /// Newest valid record of each key.
    pub live_records: u64,
    /// Valid records superseded by a newer record of their key.
    pub dead_records: u64,
    /// Raw bytes of live records.
    pub live_raw_bytes: u64,
    /// Payload bytes of live records.
    pub live_stored_bytes: u64,
    /// Raw bytes of all valid records.
    pub raw_bytes: u64,
    /// Payload bytes of all valid records.
    pub stored_bytes: u64,
    /// Bytes of the segment files.
    pub file_bytes: u64,
    /// Live records per codec tag.
    pub codecs: Vec<CodecReport>,
    /// Records whose payload checksum verified (0 without verify).
    pub checksum_ok: u64,
    /// Records that failed a checksum (header or payload).
    pub checksum_failed: u64,
    /// Torn records.
    pub torn: u64,
    /// Corrupt records.
    pub corrupt: u64,
    /// Every torn or corrupt record.
    pub problems: Vec<Problem>,
    /// `seg-*.kvp` entries that cannot be used as a segment (a symlink, a
    /// directory, a FIFO, unreadable): not read, as recovery skips them.
    pub skipped_segments: u64,
    /// Each skipped entry, with the reason.
    pub skipped: Vec<Skipped>,
}

/// A `seg-*.kvp` entry that is not read.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Skipped {
    /// Entry name.
    pub segment: String,
    /// Why.
    pub reason: String,
}

/// One segment file.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SegmentReport {
    /// File name.
    pub file: String,
    /// File length.
    pub bytes: u64,
    /// Valid records in it.
    pub records: u64,
    /// Of which live.
    pub live_records: u64,
}

/// Live records of one codec.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CodecReport {
    /// Codec name.
    pub codec: &'static str,
    /// Tag byte.
    pub tag: u8,
    /// Live records.
    pub records: u64,
    /// Raw bytes.
    pub raw_bytes: u64,
    /// Stored bytes.
    pub stored_bytes: u64,
    /// raw / stored.
    pub ratio: f64,
}

/// A torn or corrupt record.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Problem {
    /// Segment file name.
    pub segment: String,
    /// Byte offset in it.
    pub offset: u64,
    /// Torn or corrupt.
    pub kind: BadKind,
    /// Why.
    pub reason: String,
}

/// Inspects the store directory `dir` (read-only). `verify` = check every
/// payload checksum too.
pub fn inspect(dir: &Path, verify: bool) -> Result<InspectReport> {
    fsio::ensure_dir(dir, false)?;
    let mut rank_dirs: Vec<(Option<u32>, std::path::PathBuf)> = Vec::new();
    for e in fs::read_dir(dir).ctx(format!("inspect: list {}", dir.display()))? {
        let e = e.ctx(format!("inspect: list {}", dir.display()))?;
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(r) = name
            .strip_prefix("rank")
            .and_then(|r| r.parse::<u32>().ok())
        {
            let ft = e.file_type().ctx(format!("inspect: stat {name}"))?;
            if ft.is_dir() {
                rank_dirs.push((Some(r), e.path()));
            }
        }
    }
    rank_dirs.sort();
    if rank_dirs.is_empty() {
        if list_segments(dir)?.is_empty() {
            return Err(Error::not_found(format!(
                "inspect: {} holds no rank<R> directory and no seg-*.kvp file",
                dir.display()
            )));
        }
        rank_dirs.push((None, dir.to_path_buf()));
    }
    let pool = BufPool::new(4);
    let mut ranks = Vec::new();
    for (rank, path) in rank_dirs {
        ranks.push(inspect_rank(rank, &path, verify, &pool)?);
    }
    Ok(InspectReport {
        dir: dir.display().to_string(),
        verified: verify,
        ranks,
    })
}

fn inspect_rank(rank: Option<u32>, dir: &Path, verify: bool, pool: &BufPool) -> Result<RankReport> {
    fsio::ensure_dir(dir, false)?;
    struct Rec {
        seg: usize,
        lsn: u64,
        raw: u64,
        stored: u64,
        codec: CodecTag,
    }
    let mut all: Vec<Rec> = Vec::new();
    let mut newest: HashMap<BlockKey, usize> = HashMap::new();
    let mut r = RankReport {
        rank,
        path: dir.display().to_string(),
        segments: Vec::new(),
        records: 0,
        live_records: 0,
        dead_records: 0,
        live_raw_bytes: 0,
        live_stored_bytes: 0,
        raw_bytes: 0,
        stored_bytes: 0,
        file_bytes: 0,
        codecs: Vec::new(),
        checksum_ok: 0,
        checksum_failed: 0,
        torn: 0,
        corrupt: 0,
        problems: Vec::new(),
        skipped_segments: 0,
        skipped: Vec::new(),
    };
    let segs = list_segments(dir)?;
    let newest_seg = newest_segment(&segs);
    for (id, path) in segs {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let (file, len) = match open_segment(&path, false) {
            Ok(f) => f,
            Err(reason) => {
                r.skipped_segments += 1;
                r.skipped.push(Skipped {
                    segment: name,
                    reason,
                });
                continue;
            }
        };
        let si = r.segments.len();
        let mut records = 0;
        scan_segment(
            &file,
            len,
            id,
            newest_seg == Some(id),
            verify,
            pool,
            |item| match item {
                ScanItem::Record { hdr, .. } => {
                    records += 1;
                    let i = all.len();
                    all.push(Rec {
                        seg: si,
                        lsn: hdr.lsn,
                        raw: hdr.raw_len as u64,
                        stored: hdr.stored_len as u64,
                        codec: hdr.codec,
                    });
                    match newest.get(&hdr.key) {
                        Some(&j) if all[j].lsn >= hdr.lsn => {}
                        _ => {
                            newest.insert(hdr.key, i);
                        }
                    }
                }
                ScanItem::Bad { off, kind, reason } => {
                    match kind {
                        BadKind::Torn => r.torn += 1,
                        BadKind::Corrupt => r.corrupt += 1,
                    }
                    if reason.contains("checksum") {
                        r.checksum_failed += 1;
                    }
                    r.problems.push(Problem {
                        segment: name.clone(),
                        offset: off,
                        kind,
                        reason,
                    });
                }
            },
        )
        .ctx(format!("inspect {}", path.display()))?;
        r.file_bytes += len;
        r.segments.push(SegmentReport {
            file: name,
            bytes: len,
            records,
            live_records: 0,
        });
    }
    let mut codecs: BTreeMap<u8, (u64, u64, u64)> = BTreeMap::new();
    for &i in newest.values() {
        let rec = &all[i];
        r.live_records += 1;
        r.live_raw_bytes += rec.raw;
        r.live_stored_bytes += rec.stored;
        r.segments[rec.seg].live_records += 1;
        let c = codecs.entry(rec.codec as u8).or_default();
        c.0 += 1;
        c.1 += rec.raw;
        c.2 += rec.stored;
    }
    for rec in &all {
        r.records += 1;
        r.raw_bytes += rec.raw;
        r.stored_bytes += rec.stored;
    }
    r.dead_records = r.records - r.live_records;
    if verify {
        r.checksum_ok = r.records;
    }
    r.codecs = codecs
        .into_iter()
        .map(|(tag, (records, raw, stored))| CodecReport {
            codec: CodecTag::from_u8(tag)
                .map(|t| t.name())
                .unwrap_or("unknown"),
            tag,
            records,
            raw_bytes: raw,
            stored_bytes: stored,
            ratio: if stored == 0 {
                1.0
            } else {
                raw as f64 / stored as f64
            },
        })
        .collect();
    Ok(r)
}

impl fmt::Display for InspectReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "kvpark store {} ({})",
            self.dir,
            if self.verified {
                "payload checksums verified"
            } else {
                "headers only; pass --verify to check payloads"
            }
        )?;
        for r in &self.ranks {
            let name = r
                .rank
                .map(|x| format!("rank {x}"))
                .unwrap_or_else(|| "rank ?".into());
            writeln!(f, "\n{name}: {}", r.path)?;
            writeln!(
                f,
                "  segments {:>6}   files {}",
                r.segments.len(),
                fmt_bytes(r.file_bytes)
            )?;
            writeln!(
                f,
                "  records  {:>6}   live {} ({} raw, {} stored)   dead {}",
                r.records,
                r.live_records,
                fmt_bytes(r.live_raw_bytes),
                fmt_bytes(r.live_stored_bytes),
                r.dead_records
            )?;
            for c in &r.codecs {
                writeln!(
                    f,
                    "  codec {:<11} {:>6} records  {} -> {}  ratio {:.3}x",
                    c.codec,
                    c.records,
                    fmt_bytes(c.raw_bytes),
                    fmt_bytes(c.stored_bytes),
                    c.ratio
                )?;
            }
            if self.verified {
                writeln!(
                    f,
                    "  checksums: {} ok, {} failed",
                    r.checksum_ok, r.checksum_failed
                )?;
            }
            writeln!(f, "  torn {}   corrupt {}", r.torn, r.corrupt)?;
            if r.skipped_segments > 0 {
                writeln!(f, "  skipped entries {}", r.skipped_segments)?;
                for s in &r.skipped {
                    writeln!(f, "    skipped {}: {}", s.segment, s.reason)?;
                }
            }
            for p in &r.problems {
                writeln!(
                    f,
                    "    {:?} {} offset {}: {}",
                    p.kind, p.segment, p.offset, p.reason
                )?;
            }
        }
        Ok(())
    }
}
