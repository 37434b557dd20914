//! The on-disk record header (format version 2).
//!
//! Every record starts at a 4 KiB-aligned offset of its segment file with a
//! 4 KiB *header block*: the 128-byte header below, then zeros. The payload
//! follows at offset [`PAYLOAD_OFF`] (4096) from the record start, so it is
//! itself 4 KiB-aligned in the file, then zero padding up to the next 4 KiB
//! boundary. A record therefore occupies `4096 + align_up(stored len)` bytes.
//! The aligned payload is what lets raw (codec `none`) records be written
//! from and read into a caller's 4 KiB-aligned buffer with O_DIRECT, with no
//! copy. All integers are little-endian.
//!
//! Version 1 (payload right after the 128-byte header) is not read by this
//! build: such a header decodes as [`HeaderError::UnknownVersion`], so the
//! record is reported corrupt ("format version 1 ... written before payload
//! alignment") by recovery and `inspect`, never indexed and never served.
//!
//! ```text
//! offset size field
//!      0    4 magic           b"KVPR"
//!      4    2 format version  2
//!      6    1 codec tag       crate::codec::CodecTag (0 none, 1 lz4, 2 lz4-planes)
//!      7    1 elem size       bytes per element the codec was run with (1, 2, 4, 8)
//!      8   32 key             BlockKey
//!     40    8 session         caller's session id
//!     48    8 lsn             store-wide log sequence number: the newest record of a key wins
//!     56    4 seq             caller's sequence number (block index in its chain)
//!     60    4 raw len         bytes after decoding
//!     64    4 stored len      payload bytes (codec output)
//!     68    4 payload crc     crc32c of the stored payload
//!     72    1 flags           bit 0 (FLAG_SEALED_SEGMENT): written by a build that
//!                             seals segments with a trailer (0 in older records)
//!     73   51 reserved        zero
//!    124    4 header crc      crc32c of bytes 0..124
//!    128 3968 zero            rest of the header block
//!   4096    … payload         stored len bytes, then zeros to a 4 KiB boundary
//! ```
//!
//! The header holds no location: a record can be copied to another segment
//! (garbage collection does, setting the flag) and stays valid, keeping its lsn.
//!
//! ## Seal trailer
//!
//! A segment that is sealed (rolled over, the store closed, or recovered
//! after a crash) ends with one 4 KiB *trailer* block right after its record
//! area. It says where the records end, so a file cut exactly at a record
//! boundary is told from a complete one:
//!
//! ```text
//! offset size field
//!      0    4 magic           b"KVPT"
//!      4    2 trailer version 1
//!      6    2 zero
//!      8    4 segment id      the NNNNNN of seg-NNNNNN.kvp
//!     12    4 zero
//!     16    8 end             bytes of the record area (the trailer sits at align_up(end))
//!     24   36 zero
//!     60    4 crc             crc32c of bytes 0..60
//!     64 4032 zero
//! ```
//!
//! Stores written before the trailer (records without the flag) open as
//! before: no trailer is expected of a segment none of whose records carries
//! the flag. An older build reading a sealed segment sees the trailer as one
//! corrupt block after the last record and never serves it.

use crate::block::BlockKey;
use crate::codec::CodecTag;
use std::fmt;

/// Record magic.
pub const MAGIC: [u8; 4] = *b"KVPR";
/// Format version written by this build.
pub const FORMAT_VERSION: u16 = 2;
/// Bytes of the fixed header.
pub const HEADER_LEN: usize = 128;
/// Record alignment (and O_DIRECT alignment) in bytes.
pub const ALIGN: usize = 4096;
/// Offset of the payload from the start of its record: the header has a
/// 4 KiB block of its own.
pub const PAYLOAD_OFF: usize = ALIGN;

const HEADER_CRC_AT: usize = 124;

/// Header flag: the record was written by a build that seals every segment
/// with a [`Trailer`].
pub const FLAG_SEALED_SEGMENT: u8 = 1;

/// Seal trailer magic.
pub const TRAILER_MAGIC: [u8; 4] = *b"KVPT";
/// Trailer version written and read by this build.
pub const TRAILER_VERSION: u16 = 1;
const TRAILER_CRC_AT: usize = 60;

/// The seal trailer of a segment (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Trailer {
    /// Segment id.
    pub seg: u32,
    /// Bytes of the record area.
    pub end: u64,
}

impl Trailer {
    /// Writes the trailer block into `out[..ALIGN]` (zeros included).
    pub fn encode(&self, out: &mut [u8]) {
        let b = &mut out[..ALIGN];
        b.fill(0);
        b[0..4].copy_from_slice(&TRAILER_MAGIC);
        b[4..6].copy_from_slice(&TRAILER_VERSION.to_le_bytes());
        b[8..12].copy_from_slice(&self.seg.to_le_bytes());
        b[16..24].copy_from_slice(&self.end.to_le_bytes());
        let crc = crc32c::crc32c(&b[..TRAILER_CRC_AT]);
        b[TRAILER_CRC_AT..TRAILER_CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
    }

    /// `None`: `b` (at least 64 bytes) does not start with the trailer
    /// magic. `Some(Err(why))`: it does, but is not a valid trailer.
    pub fn decode(b: &[u8]) -> Option<Result<Trailer, String>> {
        if b.len() < 64 || b[0..4] != TRAILER_MAGIC {
            return None;
        }
        let stored = u32_at(b, TRAILER_CRC_AT);
        let computed = crc32c::crc32c(&b[..TRAILER_CRC_AT]);
        if stored != computed {
            return Some(Err(format!(
                "seal trailer checksum mismatch (stored {stored:08x}, computed {computed:08x})"
            )));
        }
        let version = u16::from_le_bytes([b[4], b[5]]);
        if version != TRAILER_VERSION {
            return Some(Err(format!(
                "seal trailer version {version} (this build reads version {TRAILER_VERSION})"
            )));
        }
        Some(Ok(Trailer {
            seg: u32_at(b, 8),
            end: u64_at(b, 16),
        }))
    }
}

/// Rounds `n` up to a multiple of [`ALIGN`].
pub fn align_up(n: u64) -> u64 {
    n.div_ceil(ALIGN as u64) * ALIGN as u64
}

/// Bytes a record with `stored_len` payload bytes occupies on disk: the
/// header block plus the payload rounded up to 4 KiB.
pub fn padded_len(stored_len: u32) -> u64 {
    PAYLOAD_OFF as u64 + align_up(stored_len as u64)
}

/// A decoded record header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    /// Block key.
    pub key: BlockKey,
    /// Caller's session id.
    pub session: u64,
    /// Store-wide log sequence number (higher is newer).
    pub lsn: u64,
    /// Caller's sequence number.
    pub seq: u32,
    /// Codec of the payload.
    pub codec: CodecTag,
    /// Element size the codec ran with.
    pub elem_size: u8,
    /// Decoded length.
    pub raw_len: u32,
    /// Payload length.
    pub stored_len: u32,
    /// crc32c of the payload.
    pub payload_crc: u32,
    /// Flags ([`FLAG_SEALED_SEGMENT`]).
    pub flags: u8,
}

/// Why a header block was rejected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HeaderError {
    /// The first four bytes are not [`MAGIC`].
    BadMagic,
    /// The header checksum does not match.
    BadChecksum {
        /// Stored checksum.
        stored: u32,
        /// Computed checksum.
        computed: u32,
    },
    /// A checksummed header with a version this build cannot read.
    UnknownVersion(u16),
    /// A checksummed header with an unknown codec tag.
    UnknownCodec(u8),
    /// A checksummed header whose lengths or element size are impossible.
    BadField(String),
}

impl fmt::Display for HeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeaderError::BadMagic => write!(f, "bad magic"),
            HeaderError::BadChecksum { stored, computed } => write!(
                f,
                "header checksum mismatch (stored {stored:08x}, computed {computed:08x})"
            ),
            HeaderError::UnknownVersion(1) => write!(
                f,
                "format version 1 record (written before payload alignment); \
                 this build reads version {FORMAT_VERSION} only"
            ),
            HeaderError::UnknownVersion(v) => write!(
                f,
                "unknown format version {v} (this build reads version {FORMAT_VERSION})"
            ),
            HeaderError::UnknownCodec(c) => write!(f, "unknown codec tag {c}"),
            HeaderError::BadField(s) => write!(f, "bad header field: {s}"),
        }
    }
}

impl RecordHeader {
    /// Bytes the record occupies on disk, padding included.
    pub fn padded_len(&self) -> u64 {
        padded_len(self.stored_len)
    }

    /// Writes the header into `out[..HEADER_LEN]` (reserved bytes zeroed,
    /// header checksum computed).
    pub fn encode(&self, out: &mut [u8]) {
        let h = &mut out[..HEADER_LEN];
        h.fill(0);
        h[0..4].copy_from_slice(&MAGIC);
        h[4..6].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        h[6] = self.codec as u8;
        h[7] = self.elem_size;
        h[8..40].copy_from_slice(&self.key.0);
        h[40..48].copy_from_slice(&self.session.to_le_bytes());
        h[48..56].copy_from_slice(&self.lsn.to_le_bytes());
        h[56..60].copy_from_slice(&self.seq.to_le_bytes());
        h[60..64].copy_from_slice(&self.raw_len.to_le_bytes());
        h[64..68].copy_from_slice(&self.stored_len.to_le_bytes());
        h[68..72].copy_from_slice(&self.payload_crc.to_le_bytes());
        h[72] = self.flags;
        let crc = crc32c::crc32c(&h[..HEADER_CRC_AT]);
        h[HEADER_CRC_AT..HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
    }

    /// Parses and validates `b[..HEADER_LEN]`. `b` must hold at least
    /// [`HEADER_LEN`] bytes.
    pub fn decode(b: &[u8]) -> Result<Self, HeaderError> {
        let h = &b[..HEADER_LEN];
        if h[0..4] != MAGIC {
            return Err(HeaderError::BadMagic);
        }
        let stored = u32_at(h, HEADER_CRC_AT);
        let computed = crc32c::crc32c(&h[..HEADER_CRC_AT]);
        if stored != computed {
            return Err(HeaderError::BadChecksum { stored, computed });
        }
        let version = u16::from_le_bytes([h[4], h[5]]);
        if version != FORMAT_VERSION {
            return Err(HeaderError::UnknownVersion(version));
        }
        let codec = CodecTag::from_u8(h[6]).map_err(|_| HeaderError::UnknownCodec(h[6]))?;
        let elem_size = h[7];
        if !matches!(elem_size, 1 | 2 | 4 | 8) {
            return Err(HeaderError::BadField(format!("element size {elem_size}")));
        }
        let raw_len = u32_at(h, 60);
        let stored_len = u32_at(h, 64);
        if codec == CodecTag::None && raw_len != stored_len {
            return Err(HeaderError::BadField(format!(
                "raw record with raw len {raw_len} != stored len {stored_len}"
            )));
        }
        let mut key = [0u8; 32];
        key.copy_from_slice(&h[8..40]);
        Ok(RecordHeader {
            key: BlockKey(key),
            session: u64_at(h, 40),
            lsn: u64_at(h, 48),
            seq: u32_at(h, 56),
            codec,
            elem_size,
            raw_len,
            stored_len,
            payload_crc: u32_at(h, 68),
            flags: h[72],
        })
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> RecordHeader {
        RecordHeader {
            key: BlockKey::derive(b"salt", b"hash"),
            session: 0x1122_3344_5566_7788,
            lsn: 42,
            seq: 7,
            codec: CodecTag::Lz4Planes,
            elem_size: 2,
            raw_len: 10_000,
            stored_len: 8_000,
            payload_crc: 0xdead_beef,
            flags: FLAG_SEALED_SEGMENT,
        }
    }

    #[test]
    fn header_round_trips_at_documented_offsets() {
        let h = sample();
        let mut b = [0xffu8; HEADER_LEN];
        h.encode(&mut b);
        assert_eq!(&b[0..4], b"KVPR");
        assert_eq!(u16::from_le_bytes([b[4], b[5]]), 2);
        assert_eq!(b[6], 2);
        assert_eq!(b[7], 2);
        assert_eq!(&b[8..40], &h.key.0);
        assert_eq!(u64_at(&b, 40), 0x1122_3344_5566_7788);
        assert_eq!(u64_at(&b, 48), 42);
        assert_eq!(u32_at(&b, 56), 7);
        assert_eq!(u32_at(&b, 60), 10_000);
        assert_eq!(u32_at(&b, 64), 8_000);
        assert_eq!(u32_at(&b, 68), 0xdead_beef);
        assert_eq!(b[72], FLAG_SEALED_SEGMENT);
        assert!(b[73..124].iter().all(|&x| x == 0));
        assert_eq!(u32_at(&b, 124), crc32c::crc32c(&b[..124]));
        assert_eq!(RecordHeader::decode(&b).unwrap(), h);
        assert_eq!(h.padded_len(), 4096 + 8192);
    }

    #[test]
    fn version_1_is_refused_with_a_reason() {
        let mut b = [0u8; HEADER_LEN];
        sample().encode(&mut b);
        b[4..6].copy_from_slice(&1u16.to_le_bytes());
        let crc = crc32c::crc32c(&b[..HEADER_CRC_AT]);
        b[HEADER_CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        let e = RecordHeader::decode(&b).unwrap_err();
        assert_eq!(e, HeaderError::UnknownVersion(1));
        assert!(e.to_string().contains("format version 1"), "{e}");
    }

    #[test]
    fn every_flipped_header_byte_is_rejected() {
        let mut b = [0u8; HEADER_LEN];
        sample().encode(&mut b);
        for i in 0..HEADER_LEN {
            let mut c = b;
            c[i] ^= 0x10;
            assert!(RecordHeader::decode(&c).is_err(), "byte {i}");
        }
    }

    #[test]
    fn trailer_round_trips_and_damage_is_named() {
        let t = Trailer {
            seg: 7,
            end: 3 * 4096 + 100,
        };
        let mut b = vec![0xffu8; ALIGN];
        t.encode(&mut b);
        assert_eq!(&b[0..4], b"KVPT");
        assert!(b[64..].iter().all(|&x| x == 0));
        assert_eq!(Trailer::decode(&b), Some(Ok(t)));
        b[17] ^= 1;
        assert!(Trailer::decode(&b)
            .unwrap()
            .unwrap_err()
            .contains("checksum"));
        assert_eq!(Trailer::decode(&[0u8; ALIGN]), None);
    }

    #[test]
    fn padded_len_is_aligned() {
        assert_eq!(padded_len(0), 4096);
        assert_eq!(padded_len(1), 8192);
        assert_eq!(padded_len(4096), 8192);
        assert_eq!(padded_len(4097), 12288);
        assert_eq!(padded_len(2 << 20), (2 << 20) + 4096);
    }
}
