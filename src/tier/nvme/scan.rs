//! Walks one segment file record by record; shared by recovery at open and
//! by [`mod@super::inspect`].
//!
//! First the last 4 KiB block of the file is checked for the segment's
//! seal trailer ([`mod@super::format`]); with one, the walk covers the
//! record area it gives. Then, with offsets always multiples of 4 KiB:
//! - a valid header (at the start of its 4 KiB header block) whose payload
//!   (at record offset + 4096) fits in the file is a record; the walk
//!   moves on by its padded length. With `verify`, the payload checksum is
//!   checked too, and a compressed payload is decoded (its raw length must be
//!   one the codec can reach from the stored bytes, at most 255 per byte for
//!   the lz4 codecs); a mismatch or a decode failure is a *corrupt* record
//!   (skipped by its length). Verifying never allocates more than the
//!   record's bytes that really are in the file (a raw payload is
//!   checksummed in 1 MiB chunks) plus, for a compressed record, that raw
//!   length.
//! - a valid header whose payload runs past end of file, or a header cut short
//!   by end of file, is a *torn* record (a write that did not finish); the
//!   walk ends there — unless a valid header starts at a later 4 KiB
//!   boundary: then the record's length is damaged or forged (a crash only
//!   tears the last record), it is counted *corrupt*, and the walk
//!   resynchronises on the 4 KiB block right after its header, so the
//!   records after it are recovered (the blocks between, its remains, are
//!   not counted again).
//! - a block of zeros where a record was expected (file start, or right
//!   after a record) starts a hole: space reserved by a write that never
//!   happened, or a failed write the store wiped (it punches out the whole
//!   record). Zero blocks are skipped and not counted. But if a non-zero
//!   block without the magic follows the zeros, those blocks are the remains
//!   of a record whose header block was zeroed: *corrupt*, counted once, at
//!   the offset of the first zero block. (A record whose header and whole
//!   payload are zeros cannot be told from a hole and is not counted.)
//! - a block with the magic but a bad header checksum (or an unknown version,
//!   codec, or impossible field) is *corrupt*; the walk resynchronises on the
//!   next 4 KiB block.
//! - a non-zero block without the magic where a record was expected (file
//!   start, or right after a record) is *corrupt*; the blocks that follow it
//!   without the magic are its remains and are not counted again.
//!
//! Truncation exactly at a record boundary leaves no torn record, so the
//! trailer is the evidence: a segment with no valid trailer, at least one
//! record carrying `FLAG_SEALED_SEGMENT` (written by a build that seals
//! segments) and no loss reported after its last record is *torn* at its end
//! ("without its seal trailer") — unless it is the newest non-empty segment
//! of its directory, which legitimately lacks the trailer after a crash (the
//! store seals it when it next opens; a cut there cannot be told from the
//! crash). How many records the cut took is unknown: it counts one. A
//! damaged trailer is one *corrupt* block. An empty segment that is not the
//! newest was cut to zero length: *torn*, counted once. Segments written
//! before trailers (no flagged record) are never expected to have one.

use super::aligned::BufPool;
use super::format::{
    align_up, RecordHeader, Trailer, ALIGN, FLAG_SEALED_SEGMENT, HEADER_LEN, PAYLOAD_OFF,
};
use super::fsio::read_full_at;
use crate::codec::{self, CodecTag};
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

/// What [`scan_segment`] found besides the records.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SegmentScan {
    /// The segment's valid seal trailer, if it has one.
    pub trailer: Option<Trailer>,
    /// End of the record area walked: the trailer's `end`, else the file length
    /// (less a damaged trailer block).
    pub end: u64,
}

/// Walks segment `seg` (`file`, of `file_len` bytes), calling `f` for each
/// record or loss. `newest` = this is the highest-numbered non-empty segment
/// of its directory (the one that may lack its trailer after a crash).
pub fn scan_segment(
    file: &File,
    file_len: u64,
    seg: u32,
    newest: bool,
    verify: bool,
    pool: &BufPool,
    mut f: impl FnMut(ScanItem),
) -> Result<SegmentScan> {
    if file_len == 0 {
        if !newest {
            f(ScanItem::Bad {
                off: 0,
                kind: BadKind::Torn,
                reason: "empty segment that is not the newest one: cut to zero length".into(),
            });
        }
        return Ok(SegmentScan::default());
    }
    let mut out = SegmentScan {
        trailer: None,
        end: file_len,
    };
    let mut bad_trailer = None;
    if file_len >= ALIGN as u64 && file_len % ALIGN as u64 == 0 {
        let at = file_len - ALIGN as u64;
        let mut b = pool.get(ALIGN)?;
        let n = read_full_at(file, &mut b[..ALIGN], at).ctx(format!("scan offset {at}"))?;
        match Trailer::decode(&b[..n]) {
            None => {}
            Some(Ok(t)) if t.seg == seg && t.end <= at && align_up(t.end) == at => {
                out.trailer = Some(t);
                out.end = t.end;
            }
            Some(Ok(t)) => {
                bad_trailer = Some((
                    at,
                    format!(
                        "seal trailer names segment {} ending at {}, not this segment ending at {at}",
                        t.seg, t.end
                    ),
                ));
                out.end = at;
            }
            Some(Err(why)) => {
                bad_trailer = Some((at, why));
                out.end = at;
            }
        }
    }
    // Whether a record carries FLAG_SEALED_SEGMENT (a trailer is then due
    // once the segment is sealed), and whether a loss was reported after the
    // last valid record (the end of the file is then accounted for).
    let mut flagged = false;
    let mut tail_bad = false;
    walk(file, out.end, verify, pool, |item| {
        match &item {
            ScanItem::Record { hdr, .. } => {
                flagged |= hdr.flags & FLAG_SEALED_SEGMENT != 0;
                tail_bad = false;
            }
            ScanItem::Bad { .. } => tail_bad = true,
        }
        f(item)
    })?;
    if let Some((off, reason)) = bad_trailer {
        f(ScanItem::Bad {
            off,
            kind: BadKind::Corrupt,
            reason,
        });
    } else if out.trailer.is_none() && !newest && flagged && !tail_bad {
        f(ScanItem::Bad {
            off: out.end,
            kind: BadKind::Torn,
            reason: format!(
                "segment ends at a record boundary (offset {}) without its seal trailer \
                 although a newer segment exists: cut short, the records after it are lost",
                out.end
            ),
        });
    }
    Ok(out)
}

/// Walks the record area `0..file_len` of a segment (see the module docs).
fn walk(
    file: &File,
    file_len: u64,
    verify: bool,
    pool: &BufPool,
    mut f: impl FnMut(ScanItem),
) -> Result<()> {
    let mut off = 0u64;
    let mut expect = true;
    // The first block of zeros found where a record was expected, while
    // only zeros followed it.
    let mut zeroed: Option<u64> = None;
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
                        zeroed = None;
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
                    match verify_payload(file, off, &hdr, pool).ctx(format!("scan offset {off}"))? {
                        Payload::Ok => f(ScanItem::Record { off, hdr }),
                        Payload::Corrupt(reason) => f(ScanItem::Bad {
                            off,
                            kind: BadKind::Corrupt,
                            reason,
                        }),
                        Payload::Short => {
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
                off = match off.checked_add(hdr.padded_len()) {
                    Some(o) => o,
                    None => break,
                };
                expect = true;
                zeroed = None;
            }
            Err(super::format::HeaderError::BadMagic) => {
                if blk.iter().all(|&b| b == 0) {
                    // A hole where a record was expected: reserved space
                    // never written (not counted), unless non-zero blocks
                    // follow it (then below: a record whose header was zeroed).
                    if expect {
                        zeroed = Some(off);
                    }
                    expect = false;
                } else if expect {
                    f(ScanItem::Bad {
                        off,
                        kind: BadKind::Corrupt,
                        reason: "bad magic where a record was expected".into(),
                    });
                    expect = false;
                } else if let Some(z) = zeroed.take() {
                    f(ScanItem::Bad {
                        off: z,
                        kind: BadKind::Corrupt,
                        reason: format!(
                            "header block zeroed: zeros where a record was expected, then \
                             non-zero blocks without the magic at offset {off} (the record's remains)"
                        ),
                    });
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
                zeroed = None;
                off += ALIGN as u64;
            }
        }
    }
    Ok(())
}

/// What a payload check found.
enum Payload {
    /// Checksum (and decode) fine.
    Ok,
    /// Checksum mismatch, or it does not decode.
    Corrupt(String),
    /// End of file before the payload's end.
    Short,
}

/// Bytes read at once while checksumming a raw payload.
const VERIFY_CHUNK: usize = 1 << 20;

/// The most raw bytes an lz4 block (and so an lz4-planes record, plane by
/// plane) can decode to per stored byte: a match costs at least one byte per
/// 255 bytes it copies.
const MAX_EXPANSION: u64 = 255;

/// Checks the payload of the record at `off` (whose payload the caller has
/// found to lie inside the file): its crc32c and, for a compressed record,
/// that it decodes to exactly `raw len` bytes. Memory is bounded by the
/// file's real bytes: a raw payload is checksummed in chunks of
/// [`VERIFY_CHUNK`]; a compressed one is read whole (it lies in the file)
/// and decoded only when its raw length is one the codec can reach from it.
fn verify_payload(file: &File, off: u64, hdr: &RecordHeader, pool: &BufPool) -> Result<Payload> {
    let at = off + PAYLOAD_OFF as u64; // no overflow: the caller checked the payload's end
    let len = hdr.stored_len as usize;
    if hdr.codec == CodecTag::None {
        let mut buf = pool.get(VERIFY_CHUNK.min(align_up(len as u64) as usize).max(ALIGN))?;
        let mut crc = 0u32;
        let mut done = 0usize;
        while done < len {
            let want = (len - done).min(VERIFY_CHUNK);
            // Whole 4 KiB blocks (O_DIRECT); the padding after the payload is in the file.
            let req = align_up(want as u64) as usize;
            let n = read_full_at(file, &mut buf[..req], at + done as u64)?;
            if n < want {
                return Ok(Payload::Short);
            }
            crc = crc32c::crc32c_append(crc, &buf[..want]);
            done += want;
        }
        if crc != hdr.payload_crc {
            return Ok(Payload::Corrupt(format!(
                "payload checksum mismatch (stored {:08x}, computed {crc:08x})",
                hdr.payload_crc
            )));
        }
        return Ok(Payload::Ok);
    }
    let max_raw = (len as u64)
        .checked_mul(MAX_EXPANSION)
        .and_then(|m| m.checked_add(64))
        .unwrap_or(u64::MAX);
    if hdr.raw_len as u64 > max_raw {
        return Ok(Payload::Corrupt(format!(
            "raw len {} is more than a {} payload of {len} bytes can decode to",
            hdr.raw_len,
            hdr.codec.name()
        )));
    }
    let padded = align_up(len as u64) as usize;
    let mut buf = pool.get(padded.max(ALIGN))?;
    let n = read_full_at(file, &mut buf[..padded], at)?;
    if n < len {
        return Ok(Payload::Short);
    }
    let payload = &buf[..len];
    let crc = crc32c::crc32c(payload);
    if crc != hdr.payload_crc {
        return Ok(Payload::Corrupt(format!(
            "payload checksum mismatch (stored {:08x}, computed {crc:08x})",
            hdr.payload_crc
        )));
    }
    let mut raw = vec![0u8; hdr.raw_len as usize];
    if let Err(e) = codec::by_tag(hdr.codec).decode(payload, hdr.elem_size as usize, &mut raw) {
        return Ok(Payload::Corrupt(format!(
            "payload does not decode as {}: {}",
            hdr.codec.name(),
            e.message()
        )));
    }
    Ok(Payload::Ok)
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
