//! Walks one segment file record by record; shared by recovery at open and
//! by [`mod@super::inspect`].
//!
//! Rules (offsets are always multiples of 4 KiB):
//! - a valid header (at the start of its 4 KiB header block) whose payload
//!   (at record offset + 4096) fits in the file is a record; the walk
//!   moves on by its padded length. With `verify`, the payload checksum is
//!   checked too and a mismatch is a *corrupt* record (skipped by its length).
//! - a valid header whose payload runs past end of file, or a header cut short
//!   by end of file, is a *torn* record (a write that did not finish); the
//!   walk ends there — unless a valid header starts at a later 4 KiB
//!   boundary: then the record's length is damaged or forged (a crash only
//!   tears the last record), it is counted *corrupt*, and the walk
//!   resynchronises on the 4 KiB block right after its header, so the
//!   records after it are recovered (the blocks between, its remains, are
//!   not counted again).
//! - a block of zeros is a hole (space reserved by a write that never
//!   happened, or a failed write whose header the store wiped); skipped, not
//!   counted, and the non-magic blocks after it are not counted either.
//! - a block with the magic but a bad header checksum (or an unknown version,
//!   codec, or impossible field) is *corrupt*; the walk resynchronises on the
//!   next 4 KiB block.
//! - a non-zero block without the magic where a record was expected (file
//!   start, or right after a record) is *corrupt*; the blocks that follow it
//!   without the magic are its remains and are not counted again.

use super::aligned::BufPool;
use super::format::{RecordHeader, ALIGN, HEADER_LEN, PAYLOAD_OFF};
use super::fsio::read_full_at;
use crate::error::{Result, ResultExt};
use std::fs::File;

/// How a record was lost.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BadKind {
    /// Cut short by the end of the file: an interrupted write.
    Torn,
    /// Failed a checksum or a field check.
    Corrupt,
}

/// One step of the walk.
pub enum ScanItem {
    /// A valid record (payload checked only when the walk verifies).
    Record {
        /// Offset of the header in the segment.
        off: u64,
        /// The header.
        hdr: RecordHeader,
    },
    /// A dropped record.
    Bad {
        /// Offset of the (would-be) header.
        off: u64,
        /// Torn or corrupt.
        kind: BadKind,
        /// Why, in words.
        reason: String,
    },
}

/// Walks `file` (of `file_len` bytes), calling `f` for each record or loss.
pub fn scan_segment(
    file: &File,
    file_len: u64,
    verify: bool,
    pool: &BufPool,
    mut f: impl FnMut(ScanItem),
) -> Result<()> {
    let mut off = 0u64;
    let mut expect = true;
    let mut hbuf = pool.get(ALIGN)?;
    while off < file_len {
        let n = read_full_at(file, &mut hbuf[..ALIGN], off).ctx(format!("scan offset {off}"))?;
        let blk = &hbuf[..n];
        if n < HEADER_LEN {
            if !blk.iter().all(|&b| b == 0) {
                f(ScanItem::Bad {
                    off,
                    kind: BadKind::Torn,
                    reason: format!("header cut short by end of file ({n} of {HEADER_LEN} bytes)"),
                });
            }
            break;
        }
        match RecordHeader::decode(blk) {
            Ok(hdr) => {
                let payload_at = off.checked_add(PAYLOAD_OFF as u64);
                let end = payload_at.and_then(|p| p.checked_add(hdr.stored_len as u64));
                if end.map_or(true, |e| e > file_len) {
                    let present = payload_at.map_or(0, |p| file_len.saturating_sub(p));
                    let next = off.checked_add(ALIGN as u64);
                    if let Some(next) =
                        next.filter(|&n| valid_header_after(file, n, file_len, pool))
                    {
                        // Something valid follows: this length is damaged
                        // or forged, not a write cut short by a crash.
                        f(ScanItem::Bad {
                            off,
                            kind: BadKind::Corrupt,
                            reason: format!(
                                "stored length {} runs past end of file ({present} bytes present) \
                                 but valid records follow: a damaged length; walk resumes at offset {next}",
                                hdr.stored_len
                            ),
                        });
                        off = next;
                        expect = false;
                        continue;
                    }
                    f(ScanItem::Bad {
                        off,
                        kind: BadKind::Torn,
                        reason: format!(
                            "payload cut short by end of file ({present} of {} bytes present)",
                            hdr.stored_len
                        ),
                    });
                    break;
                }
                if verify {
                    let padded = hdr.padded_len() as usize;
                    let mut rbuf = pool.get(padded)?;
                    let got = read_full_at(file, &mut rbuf[..padded], off)
                        .ctx(format!("scan offset {off}"))?;
                    let payload_end = PAYLOAD_OFF + hdr.stored_len as usize;
                    let crc = if got >= payload_end {
                        Some(crc32c::crc32c(&rbuf[PAYLOAD_OFF..payload_end]))
                    } else {
                        None
                    };
                    match crc {
                        Some(c) if c == hdr.payload_crc => f(ScanItem::Record { off, hdr }),
                        Some(c) => f(ScanItem::Bad {
                            off,
                            kind: BadKind::Corrupt,
                            reason: format!(
                                "payload checksum mismatch (stored {:08x}, computed {c:08x})",
                                hdr.payload_crc
                            ),
                        }),
                        None => {
                            f(ScanItem::Bad {
                                off,
                                kind: BadKind::Torn,
                                reason: "payload cut short while reading".into(),
                            });
                            break;
                        }
                    }
                } else {
                    f(ScanItem::Record { off, hdr });
                }
                off += hdr.padded_len();
                expect = true;
            }
            Err(super::format::HeaderError::BadMagic) => {
                if blk.iter().all(|&b| b == 0) {
                    // A hole; what follows it may be the remains of a
                    // record whose header was wiped, so do not count those.
                    expect = false;
                } else if expect {
                    f(ScanItem::Bad {
                        off,
                        kind: BadKind::Corrupt,
                        reason: "bad magic where a record was expected".into(),
                    });
                    expect = false;
                }
                off += ALIGN as u64;
            }
            Err(e) => {
                f(ScanItem::Bad {
                    off,
                    kind: BadKind::Corrupt,
                    reason: e.to_string(),
                });
                expect = false;
                off += ALIGN as u64;
            }
        }
    }
    Ok(())
}

/// Whether a valid record header starts at some 4 KiB boundary in
/// `from..file_len`. A read error counts as "no" (the walk then reports
/// the record before as torn, as it would have anyway).
fn valid_header_after(file: &File, from: u64, file_len: u64, pool: &BufPool) -> bool {
    let Ok(mut buf) = pool.get(ALIGN) else {
        return false;
    };
    let mut at = from;
    while at < file_len {
        match read_full_at(file, &mut buf[..ALIGN], at) {
            Ok(n) if n >= HEADER_LEN => {
                if RecordHeader::decode(&buf[..n]).is_ok() {
                    return true;
                }
            }
            _ => return false,
        }
        match at.checked_add(ALIGN as u64) {
            Some(a) => at = a,
            None => return false,
        }
    }
    false
}
