//! NVMe tier (G3): a log-structured segment store per rank.
//!
//! ## Files
//!
//! ```text
//! <dir>/                      0700, never a symlink
//!   rank<R>/                  0700, never a symlink
//!     .lock                   0600, flock'ed by the one store that owns the directory
//!     seg-000001.kvp          0600, opened O_NOFOLLOW (O_DIRECT when the fs allows)
//!     seg-000002.kvp
//! ```
//!
//! A store takes an exclusive `flock` on `rank<R>/.lock` (holding its pid)
//! before it touches anything in the directory and keeps it until it is
//! dropped: a second store on the same rank directory, in this process or
//! another, fails with [`ErrorKind::Busy`](crate::ErrorKind::Busy) naming the
//! directory and the holder's pid. (`inspect` and the scheduler's key scan
//! only read, and take no lock.)
//!
//! Files are opened `O_NOFOLLOW | O_NONBLOCK` and checked with fstat before
//! any read, so no entry can block an open. A `seg-*.kvp` entry that cannot
//! be used as a segment (a symlink, a directory, a FIFO or other non-regular
//! file, unreadable, or a read that fails while recovering it) is skipped:
//! counted in [`NvmeStats::skipped_segments`], logged once, left in place,
//! never written or collected, and its number is never reused. It does not
//! keep the store (and the engine) from starting.
//!
//! A segment is a sequence of 4 KiB-aligned records (format version 2), each
//! a 4 KiB header block (a 128-byte header, [`mod@format`] documents every
//! byte, then zeros), the payload (codec output) starting on the next 4 KiB
//! boundary, and zero padding to the 4 KiB boundary after it. Version 1
//! records (payload right after the header) are refused: recovery and
//! `inspect` report them corrupt, naming the version. New records are
//! appended to the one *active* segment; it is sealed and a new one started
//! when the next record would take it past `segment_bytes`. Sealing writes
//! a 4 KiB *seal trailer* right after the record area (its layout is in
//! [`mod@format`]; records written by a build that seals carry a flag), so
//! a segment later cut exactly at a record boundary is detected and
//! counted. The active segment is sealed when the store closes; after a
//! crash, recovery seals the newest segment (the only one that may lack its
//! trailer). Segments are never appended records after a restart: recovery
//! seals them all and the first put starts a new one. A segment file is
//! thus at most `segment_bytes` plus its trailer.
//!
//! ## Invariants
//!
//! - **Never wrong bytes.** A key is served only from a record whose header
//!   checksum, identity (key, lsn, lengths as indexed) and payload checksum
//!   (crc32c) all verify on that very read. A failure drops the key from the
//!   index, counts `read_corrupt` and returns [`ErrorKind::Corrupt`](crate::ErrorKind::Corrupt):
//!   a corrupt record is a miss.
//! - **Newest wins.** Every record carries a store-wide log sequence number
//!   (lsn) assigned when its space is reserved; the index holds, per key, the
//!   valid record with the highest lsn. GC copies keep their lsn, so a crash
//!   during GC leaves two identical records of one lsn, either of which is right.
//! - **Recovery.** `open` walks every segment (see [`scan`] for the exact
//!   rules): valid records are indexed; a record cut short by end of file
//!   with nothing valid after it is *torn* (`dropped_torn`); a record failing
//!   a check, or whose length runs past the end while valid records follow,
//!   is *corrupt* (`dropped_corrupt`) and the walk resynchronises after it. Neither is ever indexed. By default the walk reads
//!   headers only (fast: one 4 KiB read per record) and payload checksums are
//!   checked on every read instead; `verify_on_open` checks them at open too.
//! - **Space.** `used` = bytes of the segments' record areas (their files
//!   less the 4 KiB trailers) = live + dead. A put that
//!   would take `used` past `capacity_bytes` first runs GC (delete segments
//!   with no live record; copy the live records of the segment with the most
//!   dead bytes forward and delete it); if that does not free enough, the put
//!   fails with [`ErrorKind::NoSpace`](crate::ErrorKind::NoSpace). GC copies
//!   may take `used` above the cap by at most the live bytes of one segment
//!   while it runs. A file-system ENOSPC is also `NoSpace`: the partial record
//!   is never indexed, a tail reservation of the active segment is truncated
//!   away (any other failed reservation is punched out: a hole), the store stays
//!   readable, and once space is freed (remove + [`NvmeStore::gc`]) puts work again.
//! - **Removal is in memory.** [`NvmeStore::remove`] drops the key from the
//!   index and makes its bytes dead; no tombstone is written, so a removed
//!   record whose segment was not yet collected is indexed again after a
//!   restart. That is safe because a [`BlockKey`](crate::block::BlockKey)
//!   names its content (the chained block hash under a salt): the record still
//!   holds exactly that block's bytes.
//! - **Several writes in flight.** Space is reserved under the state lock and
//!   written outside it, so the I/O threads write and read in parallel. A
//!   crash can leave a reserved-but-unwritten hole (zeros, skipped at
//!   recovery) or a partially written record behind a complete one (its
//!   payload then fails the checksum: dropped and counted as corrupt, or, with
//!   `verify_on_open` off, on its first read).
//! - **Durability.** [`FsyncPolicy::EveryRecord`]: `put` returns after
//!   fdatasync. [`FsyncPolicy::PerSegment`]: a segment is synced when sealed and
//!   on close. [`FsyncPolicy::Never`]: left to the OS (still consistent after a
//!   process crash; a power loss may lose recent records, which recovery then
//!   drops, never serves).
//!
//! ## Zero copy
//!
//! Raw records (codec `none`) move between the disk and a caller's buffer
//! with no copy when the buffer starts at a 4 KiB-aligned address (as
//! host-arena slots do): a put is one pwritev of the header block, the
//! buffer's whole 4 KiB blocks and a zero-padded copy of its partial last
//! block, with crc32c computed over the caller's bytes; a get is one preadv
//! of the header block (into a pooled buffer) and the payload straight into
//! the destination (from 8 MiB in two halves, one read and checksummed on a
//! helper thread), then the header is checked against the index and the
//! crc32c computed over the destination. A mismatch drops the key, counts
//! `read_corrupt`, zeroes the destination and returns `Corrupt`: the caller
//! must not use the bytes. [`NvmeStore::submit_put_raw`] queues such a put
//! from caller memory that must stay valid and unmodified until its
//! completion arrives (the mover keeps the block `Demoting` meanwhile).
//! Unaligned buffers and compressed records go through a pooled aligned
//! buffer (a copy fused with crc32c, or the codec).
//!
//! ## Threads
//!
//! `put`/`get` run on the caller's thread. `submit_put`/`submit_get` queue a
//! request (at most `queue_depth` waiting) for `io_threads` I/O threads, which
//! also run the codec; results arrive on [`NvmeStore::completions`], a
//! crossbeam receiver the worker-side mover polls with `try_recv`. A panic on
//! an I/O thread becomes an `Internal` error in the completion; the thread
//! keeps serving.

mod aligned;
#[cfg(feature = "cli")]
pub mod bench;
pub mod format;
mod fsio;
pub mod inspect;
mod keys;
pub mod scan;
mod store;

pub use inspect::{inspect, InspectReport};
pub use keys::scan_keys;
pub use scan::BadKind;
pub use store::{Completion, GcReport, GetInfo, KeyInfo, NvmeStats, NvmeStore, OpKind, Ticket};

use crate::codec::CodecTag;
use crate::error::{Error, Result};
use std::path::PathBuf;

/// When written records are made durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum FsyncPolicy {
    /// Never explicitly (the OS writes back; O_DIRECT writes reach the device anyway).
    Never,
    /// When a segment is sealed, and on close.
    PerSegment,
    /// After every record, before `put` returns.
    EveryRecord,
}

/// Configuration of one rank's store.
#[derive(Clone, Debug)]
pub struct NvmeConfig {
    /// Root directory; the store lives in `<dir>/rank<rank>`.
    pub dir: PathBuf,
    /// Engine rank.
    pub rank: u32,
    /// Cap on the bytes of this rank's segment files.
    pub capacity_bytes: u64,
    /// Segment size at which the active segment is sealed (default 256 MiB).
    pub segment_bytes: u64,
    /// I/O threads serving `submit_*` (default 2).
    pub io_threads: usize,
    /// Submitted requests that may wait for an I/O thread (default 8).
    pub queue_depth: usize,
    /// Try O_DIRECT (default true); falls back to buffered I/O, with the
    /// reason in [`NvmeStats::direct_fallback`], where the file system refuses it.
    pub direct: bool,
    /// Durability policy (default `PerSegment`).
    pub fsync: FsyncPolicy,
    /// Codec for new records (default `none`); `encode_best` stores raw bytes
    /// when the codec does not shrink a block.
    pub codec: CodecTag,
    /// Element size of the KV dtype (`Dtype::size()`), used by plane codecs.
    pub elem_size: usize,
    /// Verify payload checksums while recovering at open (default false:
    /// headers only; every read verifies anyway).
    pub verify_on_open: bool,
}

impl NvmeConfig {
    /// A config with the defaults above.
    pub fn new(dir: impl Into<PathBuf>, rank: u32, capacity_bytes: u64) -> Self {
        NvmeConfig {
            dir: dir.into(),
            rank,
            capacity_bytes,
            segment_bytes: 256 << 20,
            io_threads: 2,
            queue_depth: 8,
            direct: true,
            fsync: FsyncPolicy::PerSegment,
            codec: CodecTag::None,
            elem_size: 2,
            verify_on_open: false,
        }
    }

    /// Checks every field, naming the bad one.
    pub fn validate(&self) -> Result<()> {
        if self.dir.as_os_str().is_empty() {
            return Err(Error::config("nvme.dir: must not be empty"));
        }
        if self.segment_bytes < format::ALIGN as u64
            || self.segment_bytes % format::ALIGN as u64 != 0
        {
            return Err(Error::config(format!(
                "nvme.segment_bytes: {} must be a positive multiple of 4096",
                self.segment_bytes
            )));
        }
        if self.capacity_bytes < format::ALIGN as u64 {
            return Err(Error::config(format!(
                "nvme.capacity_bytes: {} is below one 4 KiB record",
                self.capacity_bytes
            )));
        }
        if self.io_threads == 0 || self.io_threads > 64 {
            return Err(Error::config(format!(
                "nvme.io_threads: {} must be in 1..=64",
                self.io_threads
            )));
        }
        if self.queue_depth == 0 || self.queue_depth > 4096 {
            return Err(Error::config(format!(
                "nvme.queue_depth: {} must be in 1..=4096",
                self.queue_depth
            )));
        }
        if !matches!(self.elem_size, 1 | 2 | 4 | 8) {
            return Err(Error::config(format!(
                "nvme.elem_size: {} must be 1, 2, 4 or 8",
                self.elem_size
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
