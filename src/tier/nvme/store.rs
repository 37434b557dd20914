//! [`NvmeStore`]: the segment log of one rank, its in-memory index, the
//! I/O threads and garbage collection. See the module docs of
//! [`super`] for the invariants.

use super::aligned::BufPool;
use super::format::{
    align_up, padded_len, RecordHeader, Trailer, ALIGN, FLAG_SEALED_SEGMENT, HEADER_LEN,
    PAYLOAD_OFF,
};
use super::fsio;
use super::scan::{scan_segment, BadKind, ScanItem};
use super::{FsyncPolicy, NvmeConfig};
use crate::block::BlockKey;
use crate::codec::{self, CodecTag};
use crate::error::{Error, ErrorKind, Result, ResultExt};
use crossbeam_channel::{Receiver, Sender};
use parking_lot::Mutex;
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;

/// What a successful [`NvmeStore::get`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GetInfo {
    /// Session the record was written for.
    pub session: u64,
    /// Caller's sequence number.
    pub seq: u32,
    /// Decoded length.
    pub raw_len: u32,
    /// Bytes stored on disk (payload, before padding).
    pub stored_len: u32,
    /// Codec of the stored payload.
    pub codec: CodecTag,
}

/// One indexed key, for a warm restart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyInfo {
    /// Block key.
    pub key: BlockKey,
    /// Session the record was written for.
    pub session: u64,
    /// Caller's sequence number.
    pub seq: u32,
    /// Decoded length (size of the buffer a get needs).
    pub raw_len: u32,
    /// Payload bytes on disk.
    pub stored_len: u32,
    /// Codec of the payload.
    pub codec: CodecTag,
}

/// Counters and gauges of one store (a JSON-able snapshot).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct NvmeStats {
    /// Rank this store serves.
    pub rank: u32,
    /// Segment directory.
    pub dir: String,
    /// Whether O_DIRECT is in use.
    pub direct: bool,
    /// Why O_DIRECT is not in use, when it was asked for and refused.
    pub direct_fallback: Option<String>,
    /// Codec new records are written with.
    pub codec: &'static str,
    /// Keys in the index.
    pub records: u64,
    /// Bytes (padded) of live records.
    pub live_bytes: u64,
    /// Bytes of superseded, removed or lost records not yet collected.
    pub dead_bytes: u64,
    /// live + dead: what the segments' record areas occupy (their files also
    /// hold one 4 KiB seal trailer each once sealed).
    pub used_bytes: u64,
    /// The capacity cap.
    pub capacity_bytes: u64,
    /// Segment files.
    pub segments: u64,
    /// Records indexed by the scan at open (newest per key).
    pub recovered_records: u64,
    /// Records dropped at open because a write did not finish.
    pub dropped_torn: u64,
    /// Records dropped at open because they failed a check.
    pub dropped_corrupt: u64,
    /// Records dropped because a read found them corrupt (never served).
    pub read_corrupt: u64,
    /// `seg-*.kvp` entries skipped at open because they cannot be used as a
    /// segment (a symlink, a directory, a FIFO or other non-regular file,
    /// unreadable); left in place, never written, never collected.
    pub skipped_segments: u64,
    /// Completed puts.
    pub puts: u64,
    /// Raw bytes of completed puts.
    pub put_raw_bytes: u64,
    /// Stored (payload) bytes of completed puts.
    pub put_stored_bytes: u64,
    /// Completed gets that returned data.
    pub gets: u64,
    /// Gets of keys not in the index.
    pub get_misses: u64,
    /// Puts refused for lack of space (cap or file system).
    pub no_space_errors: u64,
    /// Other I/O failures.
    pub io_errors: u64,
    /// Garbage collection passes.
    pub gc_runs: u64,
    /// Segment files deleted by GC.
    pub gc_segments_deleted: u64,
    /// Live records GC copied forward.
    pub gc_records_moved: u64,
    /// Bytes GC gave back.
    pub gc_bytes_freed: u64,
}

/// What one GC pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct GcReport {
    /// Segment files deleted.
    pub segments_deleted: u64,
    /// Live records copied forward.
    pub records_moved: u64,
    /// Records found corrupt while copying (dropped, counted in `read_corrupt`).
    pub records_dropped_corrupt: u64,
    /// Bytes given back (deleted segment bytes minus bytes copied forward).
    pub bytes_freed: u64,
}

/// Identifies a submitted request in its [`Completion`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ticket(pub u64);

/// Kind of an asynchronous request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpKind {
    /// `submit_put`.
    Put,
    /// `submit_get`.
    Get,
}

/// The outcome of a submitted request, delivered on [`NvmeStore::completions`].
#[derive(Debug)]
pub struct Completion {
    /// The ticket `submit_*` returned.
    pub ticket: Ticket,
    /// The request's key.
    pub key: BlockKey,
    /// Put or get.
    pub op: OpKind,
    /// Put: the caller's buffer handed back for reuse. Get: the block's raw
    /// bytes — meaningful only when `result` is `Ok`.
    pub data: Vec<u8>,
    /// `Ok(None)` for a put, `Ok(Some(info))` for a get.
    pub result: Result<Option<GetInfo>>,
}

enum Job {
    Put {
        ticket: Ticket,
        key: BlockKey,
        session: u64,
        seq: u32,
        data: Vec<u8>,
    },
    PutRaw {
        ticket: Ticket,
        key: BlockKey,
        session: u64,
        seq: u32,
        src: RawSrc,
    },
    Get {
        ticket: Ticket,
        key: BlockKey,
        data: Vec<u8>,
    },
}

/// Caller memory a [`Job::PutRaw`] reads; see [`NvmeStore::submit_put_raw`].
struct RawSrc {
    ptr: *const u8,
    len: usize,
}

// SAFETY: the caller of `submit_put_raw` guarantees the memory stays valid
// and unmodified until the completion arrives; the I/O thread only reads it.
unsafe impl Send for RawSrc {}

/// Zero-copy reads of raw records from this size on are split in two
/// halves, the second read and checksummed on a helper thread (see
/// `Inner::get_zero_copy`). Below it one thread reads, then checksums.
const SPLIT_READ_MIN: usize = 8 << 20;

/// Whether `p` is [`ALIGN`]-aligned (the zero-copy paths need it).
fn is_aligned(p: *const u8) -> bool {
    (p as usize) % ALIGN == 0
}

/// Where a key's newest record lives.
#[derive(Clone, Copy, Debug)]
struct Loc {
    seg: u32,
    off: u64,
    len: u64,
    lsn: u64,
    session: u64,
    seq: u32,
    raw: u32,
    stored: u32,
    codec: CodecTag,
}

impl Loc {
    fn same_place(&self, o: &Loc) -> bool {
        self.seg == o.seg && self.off == o.off && self.lsn == o.lsn
    }
}

struct Seg {
    file: Arc<File>,
    /// Bytes reserved (appended or being written), a multiple of 4 KiB
    /// except for a torn tail found at open.
    len: u64,
    /// Padded bytes of records the index points to.
    live: u64,
    /// Writes reserved but not completed.
    pending: u32,
    sealed: bool,
}

struct State {
    index: HashMap<BlockKey, Loc>,
    segs: BTreeMap<u32, Seg>,
    active: Option<u32>,
    next_seg: u32,
    next_lsn: u64,
    used: u64,
    closed: bool,
}

struct Reservation {
    seg: u32,
    off: u64,
    len: u64,
    lsn: u64,
    file: Arc<File>,
}

#[derive(Default)]
struct Counters {
    recovered: AtomicU64,
    dropped_torn: AtomicU64,
    dropped_corrupt: AtomicU64,
    read_corrupt: AtomicU64,
    skipped_segments: AtomicU64,
    puts: AtomicU64,
    put_raw: AtomicU64,
    put_stored: AtomicU64,
    gets: AtomicU64,
    get_misses: AtomicU64,
    no_space: AtomicU64,
    io_errors: AtomicU64,
    gc_runs: AtomicU64,
    gc_deleted: AtomicU64,
    gc_moved: AtomicU64,
    gc_freed: AtomicU64,
}

struct Inner {
    /// The rank directory's lock file, `flock`ed for the store's lifetime.
    _lock: File,
    cfg: NvmeConfig,
    rank_dir: PathBuf,
    direct: bool,
    direct_fallback: Option<String>,
    state: Mutex<State>,
    gc_lock: Mutex<()>,
    pool: BufPool,
    c: Counters,
}

/// The NVMe segment store of one rank. `Send + Sync`; share it with `Arc`.
pub struct NvmeStore {
    inner: Arc<Inner>,
    jobs: Mutex<Option<Sender<Job>>>,
    done_rx: Receiver<Completion>,
    workers: Mutex<Vec<JoinHandle<()>>>,
    next_ticket: AtomicU64,
}

thread_local! {
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

fn seg_name(id: u32) -> String {
    format!("seg-{id:06}.kvp")
}

/// Parses `seg-NNNNNN.kvp`.
pub(crate) fn parse_seg_name(name: &str) -> Option<u32> {
    let digits = name.strip_prefix("seg-")?.strip_suffix(".kvp")?;
    if digits.len() < 6 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Segment files of a rank directory, sorted by id.
pub(crate) fn list_segments(dir: &Path) -> Result<Vec<(u32, PathBuf)>> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).ctx(format!("nvme: list {}", dir.display()))? {
        let e = e.ctx(format!("nvme: list {}", dir.display()))?;
        if let Some(id) = e.file_name().to_str().and_then(parse_seg_name) {
            out.push((id, e.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Opens the segment file `path` read-only for a scan: without blocking
/// and without following a symlink. `Err` says, in words, why the entry
/// cannot be used as a segment (a symlink, a directory, a FIFO, unreadable):
/// callers skip it and count it, they never fail on it.
pub(crate) fn open_segment(path: &Path, direct: bool) -> std::result::Result<(File, u64), String> {
    let file = fsio::open_read(path, direct).map_err(|e| e.message().to_string())?;
    let len = file
        .metadata()
        .map_err(|e| format!("nvme: stat {}: {e}", path.display()))?
        .len();
    Ok((file, len))
}

/// The highest id among `segs` that is a non-empty regular file (by lstat,
/// which never blocks): the segment that may lack its seal trailer after a
/// crash.
pub(crate) fn newest_segment(segs: &[(u32, PathBuf)]) -> Option<u32> {
    segs.iter()
        .rev()
        .find(|(_, p)| fs::symlink_metadata(p).is_ok_and(|m| m.is_file() && m.len() > 0))
        .map(|(id, _)| *id)
}

impl NvmeStore {
    /// Opens (or creates) the store of `cfg.rank` under `cfg.dir`, recovering
    /// the index from the segment headers, and starts the I/O threads.
    pub fn open(cfg: NvmeConfig) -> Result<NvmeStore> {
        cfg.validate()?;
        fsio::ensure_dir(&cfg.dir, true)?;
        let rank_dir = cfg.dir.join(format!("rank{}", cfg.rank));
        fsio::ensure_dir(&rank_dir, true)?;
        fs::set_permissions(
            &rank_dir,
            std::os::unix::fs::PermissionsExt::from_mode(fsio::DIR_MODE),
        )
        .ctx(format!("nvme: chmod 0700 {}", rank_dir.display()))?;
        // One owner per rank directory, before anything in it is touched.
        let lock = fsio::lock_dir(&rank_dir)?;

        let (direct, direct_fallback) = if cfg.direct {
            match probe_direct_for(&rank_dir)? {
                None => (true, None),
                Some(reason) => {
                    log::warn!("kvpark nvme rank {}: {reason}", cfg.rank);
                    (false, Some(reason))
                }
            }
        } else {
            (false, None)
        };

        let inner = Inner {
            _lock: lock,
            rank_dir,
            direct,
            direct_fallback,
            state: Mutex::new(State {
                index: HashMap::new(),
                segs: BTreeMap::new(),
                active: None,
                next_seg: 1,
                next_lsn: 1,
                used: 0,
                closed: false,
            }),
            gc_lock: Mutex::new(()),
            pool: BufPool::new(cfg.io_threads + 4),
            c: Counters::default(),
            cfg,
        };
        inner.recover()?;
        let inner = Arc::new(inner);

        let (job_tx, job_rx) = crossbeam_channel::bounded::<Job>(inner.cfg.queue_depth);
        let (done_tx, done_rx) = crossbeam_channel::unbounded::<Completion>();
        let mut workers = Vec::new();
        for i in 0..inner.cfg.io_threads {
            let inner = inner.clone();
            let rx = job_rx.clone();
            let tx = done_tx.clone();
            let h = std::thread::Builder::new()
                .name(format!("kvpark-nvme{}-io{i}", inner.cfg.rank))
                .spawn(move || io_thread(&inner, rx, tx))
                .ctx("nvme: spawn I/O thread")?;
            workers.push(h);
        }
        Ok(NvmeStore {
            inner,
            jobs: Mutex::new(Some(job_tx)),
            done_rx,
            workers: Mutex::new(workers),
            next_ticket: AtomicU64::new(1),
        })
    }

    /// The directory holding this rank's segments (`<dir>/rank<R>`).
    pub fn rank_dir(&self) -> &Path {
        &self.inner.rank_dir
    }

    /// Whether O_DIRECT is in use (false after a fallback).
    pub fn is_direct(&self) -> bool {
        self.inner.direct
    }

    /// Stores `raw` under `key`, replacing any older record of the key.
    /// Returns once the record is written (and synced, per the fsync policy).
    ///
    /// Zero copy: with codec `none` and `raw` starting at a 4 KiB-aligned
    /// address, the payload is written straight from `raw` (one pwritev of
    /// the header block, the whole 4 KiB blocks of `raw`, and a padded copy
    /// of a partial last block if any); the checksum is computed over `raw`
    /// itself. Otherwise the payload is copied (or encoded) into an aligned
    /// buffer first.
    pub fn put(&self, key: &BlockKey, session: u64, seq: u32, raw: &[u8]) -> Result<()> {
        self.inner.put(key, session, seq, raw)
    }

    /// Reads `key` into `dst` (whose length must be the record's raw
    /// length). The payload checksum is verified on every read; a corrupt
    /// record is dropped from the index and reported as
    /// [`ErrorKind::Corrupt`] — never served.
    ///
    /// Zero copy: for a raw (codec `none`) record and a `dst` starting at a
    /// 4 KiB-aligned address, one preadv reads the header block into a
    /// pooled buffer and the payload straight into `dst` (a partial last
    /// block goes through the pooled buffer); the header is checked against
    /// the index and the checksum computed over `dst`. After any error,
    /// `dst` holds zeros, never part of the record.
    pub fn get(&self, key: &BlockKey, dst: &mut [u8]) -> Result<GetInfo> {
        self.inner.get(key, dst)
    }

    /// Whether `key` is indexed.
    pub fn contains(&self, key: &BlockKey) -> bool {
        self.inner.state.lock().index.contains_key(key)
    }

    /// Raw length of `key`'s record, if indexed.
    pub fn raw_len(&self, key: &BlockKey) -> Option<u32> {
        self.inner.state.lock().index.get(key).map(|l| l.raw)
    }

    /// Drops `key` from the index; its bytes become dead and GC reclaims
    /// them. Returns whether the key was present.
    pub fn remove(&self, key: &BlockKey) -> bool {
        let mut st = self.inner.state.lock();
        match st.index.remove(key) {
            Some(loc) => {
                if let Some(s) = st.segs.get_mut(&loc.seg) {
                    s.live -= loc.len;
                }
                true
            }
            None => false,
        }
    }

    /// Keys in the index.
    pub fn len(&self) -> usize {
        self.inner.state.lock().index.len()
    }

    /// Whether the index is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A snapshot of every indexed key (for a warm restart), sorted by
    /// (session, seq, key).
    pub fn keys(&self) -> Vec<KeyInfo> {
        let st = self.inner.state.lock();
        let mut v: Vec<KeyInfo> = st
            .index
            .iter()
            .map(|(k, l)| KeyInfo {
                key: *k,
                session: l.session,
                seq: l.seq,
                raw_len: l.raw,
                stored_len: l.stored,
                codec: l.codec,
            })
            .collect();
        v.sort_by_key(|k| (k.session, k.seq, k.key));
        v
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> NvmeStats {
        self.inner.stats()
    }

    /// Collects garbage: deletes segments holding only dead records and
    /// compacts sealed segments that are at least a quarter dead.
    pub fn gc(&self) -> Result<GcReport> {
        self.inner.gc(None)
    }

    /// Makes every completed write durable (fdatasync of all segments with
    /// data written since open).
    pub fn sync(&self) -> Result<()> {
        let files: Vec<(u32, Arc<File>)> = {
            let st = self.inner.state.lock();
            st.segs.iter().map(|(i, s)| (*i, s.file.clone())).collect()
        };
        for (id, f) in files {
            fsio::sync_data(&f).ctx(format!("nvme: fdatasync {}", seg_name(id)))?;
        }
        Ok(())
    }

    /// Codec new records are written with.
    pub fn codec(&self) -> CodecTag {
        self.inner.cfg.codec
    }

    /// The receiver of completions of `submit_put` / `submit_get`. Every
    /// clone sees the same queue; poll it with `try_recv` to never block.
    pub fn completions(&self) -> Receiver<Completion> {
        self.done_rx.clone()
    }

    /// Queues a put on the I/O threads (compression runs there). Blocks only
    /// while `queue_depth` requests are already queued.
    pub fn submit_put(
        &self,
        key: BlockKey,
        session: u64,
        seq: u32,
        data: Vec<u8>,
    ) -> Result<Ticket> {
        let ticket = Ticket(self.next_ticket.fetch_add(1, Relaxed));
        self.send(Job::Put {
            ticket,
            key,
            session,
            seq,
            data,
        })?;
        Ok(ticket)
    }

    /// Queues a put of the `len` bytes at `ptr` without copying them: with
    /// codec `none` and `ptr` 4 KiB-aligned, the I/O thread writes them
    /// straight to the segment (see [`NvmeStore::put`]); with another codec
    /// it encodes from them. The completion's `data` is empty. Blocks only
    /// while `queue_depth` requests are already queued.
    ///
    /// # Safety
    ///
    /// `ptr` must be valid for reads of `len` bytes (any value when `len` is
    /// 0), and those bytes must stay valid and unmodified from this call
    /// until the [`Completion`] of the returned ticket has been received
    /// from [`NvmeStore::completions`] — or, if the completion is never
    /// received, until [`NvmeStore::close`] has returned. If this returns an
    /// error, nothing was queued and the memory is free at once.
    pub unsafe fn submit_put_raw(
        &self,
        key: BlockKey,
        session: u64,
        seq: u32,
        ptr: *const u8,
        len: usize,
    ) -> Result<Ticket> {
        let ticket = Ticket(self.next_ticket.fetch_add(1, Relaxed));
        self.send(Job::PutRaw {
            ticket,
            key,
            session,
            seq,
            src: RawSrc { ptr, len },
        })?;
        Ok(ticket)
    }

    /// Queues a get of a record of `raw_len` bytes; the completion carries
    /// the bytes.
    pub fn submit_get(&self, key: BlockKey, raw_len: usize) -> Result<Ticket> {
        self.submit_get_into(key, vec![0u8; raw_len])
    }

    /// Like [`NvmeStore::submit_get`], reading into `buf` (its length is the
    /// raw length), so callers can recycle buffers.
    pub fn submit_get_into(&self, key: BlockKey, buf: Vec<u8>) -> Result<Ticket> {
        let ticket = Ticket(self.next_ticket.fetch_add(1, Relaxed));
        self.send(Job::Get {
            ticket,
            key,
            data: buf,
        })?;
        Ok(ticket)
    }

    fn send(&self, job: Job) -> Result<()> {
        let tx = self
            .jobs
            .lock()
            .clone()
            .ok_or_else(|| Error::new(ErrorKind::Closed, "nvme store is closed"))?;
        tx.send(job)
            .map_err(|_| Error::new(ErrorKind::Closed, "nvme I/O threads have stopped"))
    }

    /// Stops the I/O threads after the queued requests, then syncs per the
    /// fsync policy. Called by drop; calling it twice is harmless.
    pub fn close(&self) -> Result<()> {
        self.jobs.lock().take();
        let workers: Vec<JoinHandle<()>> = std::mem::take(&mut *self.workers.lock());
        for w in workers {
            let _ = w.join();
        }
        let was_closed = {
            let mut st = self.inner.state.lock();
            let was = std::mem::replace(&mut st.closed, true);
            if !was {
                // Seal the active segment (an empty one is removed at the next open).
                if let Some(a) = st.active {
                    let s = st.segs.get_mut(&a).expect("active segment");
                    if s.len > 0 && !s.sealed {
                        s.sealed = true;
                        self.inner.write_trailer(a, &s.file, s.len);
                    }
                }
            }
            was
        };
        if !was_closed && self.inner.cfg.fsync != FsyncPolicy::Never {
            self.sync()?;
        }
        Ok(())
    }
}

impl Drop for NvmeStore {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            log::error!("kvpark nvme rank {}: close: {e}", self.inner.cfg.rank);
        }
    }
}

#[cfg(test)]
thread_local! {
    /// Test hook: makes the O_DIRECT probe report a refusal.
    pub(crate) static FAKE_DIRECT_REFUSAL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn probe_direct_for(dir: &Path) -> Result<Option<String>> {
    #[cfg(test)]
    if FAKE_DIRECT_REFUSAL.with(|c| c.get()) {
        return Ok(Some(
            "O_DIRECT refused by the file system at open (Invalid argument (os error 22)); using buffered I/O".into(),
        ));
    }
    fsio::probe_direct(dir)
}

fn io_thread(inner: &Inner, rx: Receiver<Job>, tx: Sender<Completion>) {
    while let Ok(job) = rx.recv() {
        let done = match job {
            Job::Put {
                ticket,
                key,
                session,
                seq,
                data,
            } => {
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    inner.put(&key, session, seq, &data)
                }));
                Completion {
                    ticket,
                    key,
                    op: OpKind::Put,
                    data,
                    result: flatten(r).map(|_| None),
                }
            }
            Job::PutRaw {
                ticket,
                key,
                session,
                seq,
                src,
            } => {
                let raw: &[u8] = if src.len == 0 {
                    &[]
                } else {
                    // SAFETY: the contract of `submit_put_raw`: valid and
                    // unmodified until this job's completion is received.
                    unsafe { std::slice::from_raw_parts(src.ptr, src.len) }
                };
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    inner.put(&key, session, seq, raw)
                }));
                Completion {
                    ticket,
                    key,
                    op: OpKind::Put,
                    data: Vec::new(),
                    result: flatten(r).map(|_| None),
                }
            }
            Job::Get {
                ticket,
                key,
                mut data,
            } => {
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    inner.get(&key, &mut data)
                }));
                Completion {
                    ticket,
                    key,
                    op: OpKind::Get,
                    data,
                    result: flatten(r).map(Some),
                }
            }
        };
        // The receiver lives in the store; if every clone is gone, nobody waits.
        let _ = tx.send(done);
    }
}

fn flatten<T>(r: std::thread::Result<Result<T>>) -> Result<T> {
    match r {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(Error::internal(format!("nvme I/O thread panicked: {msg}")))
        }
    }
}

impl Inner {
    fn rank(&self) -> u32 {
        self.cfg.rank
    }

    /// Rebuilds the index from the segment files.
    fn recover(&self) -> Result<()> {
        let mut st = self.state.lock();
        // A probe file left by a crash is garbage.
        let _ = fs::remove_file(self.rank_dir.join(".direct-probe"));
        let mut max_lsn = 0u64;
        let segs = list_segments(&self.rank_dir)?;
        let newest = newest_segment(&segs);
        for (id, path) in segs {
            // Even a skipped name is never reused for a new segment.
            st.next_seg = st.next_seg.max(id.saturating_add(1));
            let (file, file_len) = match open_segment(&path, self.direct) {
                Ok(f) => f,
                Err(reason) => {
                    self.skip_segment(id, &reason);
                    continue;
                }
            };
            let mut found: Vec<(u64, RecordHeader)> = Vec::new();
            let mut bad: Vec<(BadKind, u64, String)> = Vec::new();
            let scanned = scan_segment(
                &file,
                file_len,
                id,
                newest == Some(id),
                self.cfg.verify_on_open,
                &self.pool,
                |item| match item {
                    ScanItem::Record { off, hdr } => found.push((off, hdr)),
                    ScanItem::Bad { off, kind, reason } => bad.push((kind, off, reason)),
                },
            );
            let scanned = match scanned {
                Ok(sc) => sc,
                Err(e) => {
                    self.skip_segment(id, &format!("read failed: {e}"));
                    continue;
                }
            };
            // Counted only for a segment that is used (a skipped one's
            // records are neither indexed nor counted).
            for (kind, off, reason) in bad {
                let c = match kind {
                    BadKind::Torn => &self.c.dropped_torn,
                    BadKind::Corrupt => &self.c.dropped_corrupt,
                };
                c.fetch_add(1, Relaxed);
                log::warn!(
                    "kvpark nvme rank {}: {} offset {off}: dropped {:?} record: {reason}",
                    self.rank(),
                    seg_name(id),
                    kind
                );
            }
            if file_len == 0 {
                // Nothing in it (a loss, if any, was counted just above).
                fs::remove_file(&path).ctx(format!("nvme: remove empty {}", path.display()))?;
                continue;
            }
            if scanned.trailer.is_none() && newest == Some(id) {
                // The newest segment after a crash (or an older build's):
                // seal it now, so that a later cut at a record boundary is
                // seen. An older segment without its trailer is left as
                // found (counted above, at every open, like any loss).
                self.seal_recovered(id, &path, scanned.end);
            }
            let len = super::format::align_up(scanned.end);
            st.segs.insert(
                id,
                Seg {
                    file: Arc::new(file),
                    len,
                    live: 0,
                    pending: 0,
                    sealed: true,
                },
            );
            st.used += len;
            for (off, hdr) in found {
                max_lsn = max_lsn.max(hdr.lsn);
                let loc = Loc {
                    seg: id,
                    off,
                    len: hdr.padded_len(),
                    lsn: hdr.lsn,
                    session: hdr.session,
                    seq: hdr.seq,
                    raw: hdr.raw_len,
                    stored: hdr.stored_len,
                    codec: hdr.codec,
                };
                install(&mut st, hdr.key, loc);
            }
        }
        st.next_lsn = max_lsn + 1;
        self.c.recovered.store(st.index.len() as u64, Relaxed);
        Ok(())
    }

    /// A `seg-*.kvp` entry recovery cannot use: counted
    /// (`skipped_segments`), logged once, left where it is.
    fn skip_segment(&self, id: u32, reason: &str) {
        self.c.skipped_segments.fetch_add(1, Relaxed);
        log::warn!(
            "kvpark nvme rank {}: skipping {} in {}: {reason}",
            self.rank(),
            seg_name(id),
            self.rank_dir.display()
        );
    }

    /// Writes the seal trailer of segment `id` for a record area of `end`
    /// bytes (at `align_up(end)`). Best effort: a failure is counted and
    /// logged, and the next open reports the segment without its trailer.
    fn write_trailer(&self, id: u32, file: &File, end: u64) {
        let r = self.pool.get(ALIGN).and_then(|mut b| {
            Trailer { seg: id, end }.encode(&mut b[..ALIGN]);
            file.write_all_at(&b[..ALIGN], align_up(end))
                .ctx(format!("nvme: write seal trailer of {}", seg_name(id)))
        });
        if let Err(e) = r {
            self.count_err(&e);
            log::error!("kvpark nvme rank {}: {e}", self.rank());
        }
    }

    /// Seals a segment recovery found without a trailer.
    fn seal_recovered(&self, id: u32, path: &Path, end: u64) {
        match crate::tier::open_regular(fs::OpenOptions::new().write(true), 0, path) {
            Ok(f) => {
                self.write_trailer(id, &f, end);
                if self.cfg.fsync != FsyncPolicy::Never {
                    let _ = fsio::sync_data(&f);
                }
            }
            Err(e) => {
                self.c.io_errors.fetch_add(1, Relaxed);
                log::error!(
                    "kvpark nvme rank {}: open {} to seal it: {e}",
                    self.rank(),
                    path.display()
                );
            }
        }
    }

    fn put(&self, key: &BlockKey, session: u64, seq: u32, raw: &[u8]) -> Result<()> {
        let raw_len = u32::try_from(raw.len()).map_err(|_| {
            Error::invalid(format!(
                "nvme put: a record of {} bytes exceeds the 4 GiB record limit",
                raw.len()
            ))
        })?;
        let codec_tag = self.cfg.codec;
        if codec_tag == CodecTag::None && !raw.is_empty() && is_aligned(raw.as_ptr()) {
            return self.put_zero_copy(key, session, seq, raw, raw_len);
        }
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let (tag, payload): (CodecTag, &[u8]) = if codec_tag == CodecTag::None {
                (CodecTag::None, raw)
            } else {
                let t = codec::encode_best(
                    codec::by_tag(codec_tag),
                    raw,
                    self.cfg.elem_size,
                    &mut scratch,
                )
                .ctx("nvme put: encode")?;
                (t, &scratch[..])
            };
            let stored_len = payload.len() as u32;
            let padded = padded_len(stored_len);
            let mut buf = self.pool.get(padded as usize)?;
            let end = PAYLOAD_OFF + payload.len();
            let payload_crc = copy_with_crc(payload, &mut buf[PAYLOAD_OFF..end]);
            buf[HEADER_LEN..PAYLOAD_OFF].fill(0);
            buf[end..padded as usize].fill(0);
            let hdr = self.header(key, session, seq, tag, raw_len, stored_len, payload_crc);
            self.append_record(hdr, padded, |h, res| {
                h.encode(&mut buf[..HEADER_LEN]);
                self.write_record(res, &[&buf[..padded as usize]])
            })
        })
    }

    /// The header of a new record (its lsn is stamped at reservation).
    #[allow(clippy::too_many_arguments)]
    fn header(
        &self,
        key: &BlockKey,
        session: u64,
        seq: u32,
        codec: CodecTag,
        raw_len: u32,
        stored_len: u32,
        payload_crc: u32,
    ) -> RecordHeader {
        RecordHeader {
            key: *key,
            session,
            lsn: 0,
            seq,
            codec,
            elem_size: self.cfg.elem_size as u8,
            raw_len,
            stored_len,
            payload_crc,
            flags: FLAG_SEALED_SEGMENT,
        }
    }

    /// Reserves `padded` bytes, stamps the lsn into `hdr`, lets `write`
    /// encode the header into its buffer and write the record, then indexes
    /// it (or unwinds the reservation) and counts it.
    fn append_record(
        &self,
        mut hdr: RecordHeader,
        padded: u64,
        write: impl FnOnce(&RecordHeader, &Reservation) -> Result<()>,
    ) -> Result<()> {
        let res = self.reserve_for_put(padded)?;
        hdr.lsn = res.lsn;
        let loc = Loc {
            seg: res.seg,
            off: res.off,
            len: padded,
            lsn: res.lsn,
            session: hdr.session,
            seq: hdr.seq,
            raw: hdr.raw_len,
            stored: hdr.stored_len,
            codec: hdr.codec,
        };
        let r = write(&hdr, &res);
        self.complete_write(res, hdr.key, loc, r, None)?;
        self.c.puts.fetch_add(1, Relaxed);
        self.c.put_raw.fetch_add(hdr.raw_len as u64, Relaxed);
        self.c.put_stored.fetch_add(hdr.stored_len as u64, Relaxed);
        Ok(())
    }

    /// A raw record written straight from `raw` (non-empty, 4 KiB-aligned
    /// address): header block, the whole blocks of `raw`, a zero-padded copy
    /// of its partial last block — crc32c over `raw`, then one pwritev.
    fn put_zero_copy(
        &self,
        key: &BlockKey,
        session: u64,
        seq: u32,
        raw: &[u8],
        raw_len: u32,
    ) -> Result<()> {
        let payload_crc = crc32c::crc32c(raw);
        let whole = raw.len() / ALIGN * ALIGN;
        let tail = raw.len() - whole;
        let padded = padded_len(raw_len);
        let mut blk = self.pool.get(2 * ALIGN)?;
        let (hblk, tblk) = blk[..2 * ALIGN].split_at_mut(ALIGN);
        hblk[HEADER_LEN..].fill(0);
        tblk[..tail].copy_from_slice(&raw[whole..]);
        tblk[tail..].fill(0);
        let hdr = self.header(
            key,
            session,
            seq,
            CodecTag::None,
            raw_len,
            raw_len,
            payload_crc,
        );
        let tail_blk: &[u8] = if tail > 0 { tblk } else { &[] };
        self.append_record(hdr, padded, |h, res| {
            h.encode(&mut hblk[..HEADER_LEN]);
            self.write_record(res, &[hblk, &raw[..whole], tail_blk])
        })
    }

    /// Writes the concatenation of `parts` at the reservation (one pwrite
    /// or pwritev) and syncs per the policy.
    fn write_record(&self, res: &Reservation, parts: &[&[u8]]) -> Result<()> {
        let ctx = || {
            format!(
                "nvme write rank {} {} offset {}",
                self.rank(),
                seg_name(res.seg),
                res.off
            )
        };
        match parts {
            [one] => res.file.write_all_at(one, res.off),
            _ => fsio::write_vectored_all_at(&res.file, parts, res.off),
        }
        .ctx(ctx())?;
        if self.cfg.fsync == FsyncPolicy::EveryRecord {
            fsio::sync_data(&res.file).ctx(ctx())?;
        }
        Ok(())
    }

    /// Reserves `len` bytes for a new record, collecting garbage when the
    /// capacity cap would be exceeded.
    fn reserve_for_put(&self, len: u64) -> Result<Reservation> {
        let cap = self.cfg.capacity_bytes;
        if len > cap {
            self.c.no_space.fetch_add(1, Relaxed);
            return Err(Error::no_space(format!(
                "nvme rank {}: a record of {len} bytes on disk exceeds the capacity cap of {cap} bytes",
                self.rank()
            )));
        }
        for attempt in 0..2 {
            {
                let mut st = self.state.lock();
                if st.closed {
                    return Err(Error::new(ErrorKind::Closed, "nvme store is closed"));
                }
                if st.used + len <= cap {
                    return self.reserve(&mut st, len, None);
                }
                if attempt == 1 {
                    let live: u64 = st.segs.values().map(|s| s.live).sum();
                    self.c.no_space.fetch_add(1, Relaxed);
                    return Err(Error::no_space(format!(
                        "nvme rank {}: capacity cap of {cap} bytes reached ({} used: {live} live, {} dead; \
                         the record needs {len}) and garbage collection freed too little; remove records first",
                        self.rank(),
                        st.used,
                        st.used - live
                    )));
                }
            }
            self.gc(Some(len))?;
        }
        unreachable!("the second attempt returns")
    }

    /// Reserves `len` bytes at the end of the active segment (rolling to a
    /// new one when it would overflow). `lsn` = keep this lsn (GC copies).
    fn reserve(&self, st: &mut State, len: u64, lsn: Option<u64>) -> Result<Reservation> {
        let roll = match st.active {
            None => true,
            Some(a) => {
                let s = &st.segs[&a];
                s.len > 0 && s.len + len > self.cfg.segment_bytes
            }
        };
        if roll {
            self.roll(st)?;
        }
        let id = st.active.expect("active after roll");
        let lsn = lsn.unwrap_or_else(|| {
            let l = st.next_lsn;
            st.next_lsn += 1;
            l
        });
        let s = st.segs.get_mut(&id).expect("active segment");
        let off = s.len;
        s.len += len;
        s.pending += 1;
        let file = s.file.clone();
        st.used += len;
        Ok(Reservation {
            seg: id,
            off,
            len,
            lsn,
            file,
        })
    }

    /// Seals the active segment and opens a new one.
    fn roll(&self, st: &mut State) -> Result<()> {
        let id = st.next_seg;
        let path = self.rank_dir.join(seg_name(id));
        let file = fsio::create_file(&path, self.direct).inspect_err(|e| self.count_err(e))?;
        if self.cfg.fsync != FsyncPolicy::Never {
            fsio::sync_dir(&self.rank_dir)?;
        }
        st.next_seg += 1;
        if let Some(old) = st.active.take() {
            let s = st.segs.get_mut(&old).expect("active segment");
            s.sealed = true;
            // After the new file exists: a crash in between leaves this one
            // the newest non-empty segment, allowed to lack its trailer.
            self.write_trailer(old, &s.file, s.len);
            if s.pending == 0 && self.cfg.fsync == FsyncPolicy::PerSegment {
                fsio::sync_data(&s.file).ctx(format!("nvme: fdatasync {}", seg_name(old)))?;
            }
        }
        st.segs.insert(
            id,
            Seg {
                file: Arc::new(file),
                len: 0,
                live: 0,
                pending: 0,
                sealed: false,
            },
        );
        st.active = Some(id);
        Ok(())
    }

    /// A failed record read: counted, with the record's place as context.
    fn read_error(&self, e: std::io::Error, loc: &Loc) -> Error {
        let e = Error::from(e);
        self.count_err(&e);
        e.context(format!(
            "nvme read rank {} {} offset {}",
            self.rank(),
            seg_name(loc.seg),
            loc.off
        ))
    }

    fn count_err(&self, e: &Error) {
        match e.kind() {
            ErrorKind::NoSpace => self.c.no_space.fetch_add(1, Relaxed),
            _ => self.c.io_errors.fetch_add(1, Relaxed),
        };
    }

    /// Finishes a reserved write: indexes the record on success (unless a
    /// newer record of the key won meanwhile, or — for a GC copy — the key
    /// moved on: `gc_from`), gives the space back on failure.
    fn complete_write(
        &self,
        res: Reservation,
        key: BlockKey,
        loc: Loc,
        r: Result<()>,
        gc_from: Option<Loc>,
    ) -> Result<()> {
        let mut sync_sealed = None;
        let out = {
            let mut st = self.state.lock();
            let s = st.segs.get_mut(&res.seg).expect("reserved segment exists");
            s.pending -= 1;
            if s.sealed && s.pending == 0 && self.cfg.fsync == FsyncPolicy::PerSegment {
                sync_sealed = Some(s.file.clone());
            }
            match r {
                Ok(()) => {
                    match gc_from {
                        None => install(&mut st, key, loc),
                        Some(from) => {
                            let still = st.index.get(&key).is_some_and(|l| l.same_place(&from));
                            if still {
                                st.index.insert(key, loc);
                                if let Some(fs) = st.segs.get_mut(&from.seg) {
                                    fs.live -= from.len;
                                }
                                st.segs.get_mut(&res.seg).expect("segment").live += loc.len;
                            }
                        }
                    }
                    Ok(())
                }
                Err(e) => {
                    self.count_err(&e);
                    if !s.sealed && s.len == res.off + res.len {
                        // The tail reservation: cut the partial record off so
                        // the space (and the file) are as before.
                        s.len = res.off;
                        st.used -= res.len;
                        let _ = res.file.set_len(res.off);
                    } else if !punch_hole(&res.file, res.off, res.len) {
                        // A later record (or the seal trailer) follows: the
                        // record becomes a hole (punched out above), so
                        // recovery never indexes the partial record over an
                        // older good one. Where punching is refused, zero its
                        // header (best effort; the block is already allocated
                        // when the header got written): recovery then counts
                        // the remains as one lost record.
                        if let Ok(mut zero) = self.pool.get(ALIGN) {
                            zero[..ALIGN].fill(0);
                            let _ = res.file.write_all_at(&zero[..ALIGN], res.off);
                        }
                    }
                    Err(e)
                }
            }
        };
        if let Some(f) = sync_sealed {
            fsio::sync_data(&f).ctx(format!("nvme: fdatasync {}", seg_name(res.seg)))?;
        }
        out
    }

    fn get(&self, key: &BlockKey, dst: &mut [u8]) -> Result<GetInfo> {
        let (loc, file) = {
            let st = self.state.lock();
            match st.index.get(key) {
                Some(l) => (*l, st.segs[&l.seg].file.clone()),
                None => {
                    self.c.get_misses.fetch_add(1, Relaxed);
                    return Err(Error::not_found(format!(
                        "nvme rank {}: no record for key {}",
                        self.rank(),
                        key.to_hex()
                    )));
                }
            }
        };
        if dst.len() != loc.raw as usize {
            return Err(Error::invalid(format!(
                "nvme get: destination holds {} bytes but the record's raw length is {}",
                dst.len(),
                loc.raw
            )));
        }
        if loc.codec == CodecTag::None && !dst.is_empty() && is_aligned(dst.as_ptr()) {
            return match self.get_zero_copy(key, &loc, &file, dst) {
                Ok(hdr) => {
                    self.c.gets.fetch_add(1, Relaxed);
                    Ok(GetInfo {
                        session: hdr.session,
                        seq: hdr.seq,
                        raw_len: hdr.raw_len,
                        stored_len: hdr.stored_len,
                        codec: hdr.codec,
                    })
                }
                Err(e) => {
                    // Whatever the read put there is not the block: never leave it.
                    dst.fill(0);
                    Err(e)
                }
            };
        }
        let mut buf = self.pool.get(loc.len as usize)?;
        let (hdr, copied) = match self.read_verified(key, &loc, &file, &mut buf, Some(&mut *dst)) {
            Ok(x) => x,
            Err(e) => {
                // Whatever a fused copy put there is not the block: never leave it.
                dst.fill(0);
                return Err(e);
            }
        };
        if !copied {
            let payload = &buf[PAYLOAD_OFF..PAYLOAD_OFF + hdr.stored_len as usize];
            if let Err(e) = codec::by_tag(hdr.codec).decode(payload, hdr.elem_size as usize, dst) {
                dst.fill(0);
                return Err(self.drop_corrupt(key, &loc, &format!("decode failed: {e}")));
            }
        }
        self.c.gets.fetch_add(1, Relaxed);
        Ok(GetInfo {
            session: hdr.session,
            seq: hdr.seq,
            raw_len: hdr.raw_len,
            stored_len: hdr.stored_len,
            codec: hdr.codec,
        })
    }

    /// Reads a raw record's payload straight into `dst` (4 KiB-aligned, the
    /// record's raw length): one preadv of header block + whole payload
    /// blocks (+ the partial last block into a pooled buffer) — from
    /// [`SPLIT_READ_MIN`] bytes two preadvs of half the payload each, one on
    /// a helper thread — then the header, identity and checksum (over `dst`)
    /// checks of [`Inner::read_verified`]. On an error `dst` holds no
    /// meaningful bytes.
    fn get_zero_copy(
        &self,
        key: &BlockKey,
        loc: &Loc,
        file: &File,
        dst: &mut [u8],
    ) -> Result<RecordHeader> {
        let whole = dst.len() / ALIGN * ALIGN;
        let tail = dst.len() - whole;
        let mut blk = self.pool.get(2 * ALIGN)?;
        let (hblk, tblk) = blk[..2 * ALIGN].split_at_mut(ALIGN);
        let tlen = if tail > 0 { ALIGN } else { 0 };
        // From SPLIT_READ_MIN on, a helper thread reads and checksums the
        // second half while this thread does the first: the checksum pass
        // on the critical path is halved.
        let mid = if dst.len() >= SPLIT_READ_MIN {
            whole / 2 / ALIGN * ALIGN
        } else {
            whole
        };
        let mut crc_first = 0;
        let mut crc_second = None;
        let got = {
            let (body, _) = dst.split_at_mut(whole);
            let (first, second) = body.split_at_mut(mid);
            let tblk = &mut tblk[..tlen];
            if mid < whole {
                std::thread::scope(|s| {
                    let second_off = loc.off + (PAYLOAD_OFF + mid) as u64;
                    let read_second = move |second: &mut [u8], tblk: &mut [u8]| {
                        let n = fsio::read_vectored_full_at(
                            file,
                            &mut [&mut *second, &mut *tblk],
                            second_off,
                        )?;
                        let crc = crc32c::crc32c(second);
                        Ok::<_, std::io::Error>((n, crc32c::crc32c_append(crc, &tblk[..tail])))
                    };
                    let helper = std::thread::Builder::new()
                        .name("kvpark-nvme-crc".into())
                        .spawn_scoped(s, move || read_second(second, tblk));
                    let n1 =
                        fsio::read_vectored_full_at(file, &mut [&mut *hblk, &mut *first], loc.off);
                    crc_first = crc32c::crc32c(first);
                    let second = match helper {
                        Ok(h) => h.join().unwrap_or_else(|_| {
                            Err(std::io::Error::other("nvme read helper thread panicked"))
                        }),
                        Err(e) => Err(std::io::Error::new(
                            e.kind(),
                            format!("cannot start the read helper thread: {e}"),
                        )),
                    };
                    let n1 = n1?;
                    let (n2, crc2) = second?;
                    crc_second = Some(crc2);
                    // Bytes of the record read contiguously from its start.
                    Ok(if n1 < ALIGN + mid { n1 } else { n1 + n2 })
                })
            } else {
                let mut parts: [&mut [u8]; 3] = [hblk, first, tblk];
                fsio::read_vectored_full_at(file, &mut parts, loc.off)
            }
        }
        .map_err(|e| self.read_error(e, loc))?;
        let hdr = self.check_header(key, loc, &blk[..ALIGN], got)?;
        if hdr.codec != CodecTag::None {
            return Err(self.drop_corrupt(key, loc, "header codec does not match the index"));
        }
        let crc = match crc_second {
            Some(c2) => crc32c::crc32c_combine(crc_first, c2, dst.len() - mid),
            None => {
                let crc = crc32c::crc32c(&dst[..whole]);
                crc32c::crc32c_append(crc, &blk[ALIGN..ALIGN + tail])
            }
        };
        if crc != hdr.payload_crc {
            return Err(self.payload_mismatch(key, loc, hdr.payload_crc, crc));
        }
        dst[whole..].copy_from_slice(&blk[ALIGN..ALIGN + tail]);
        Ok(hdr)
    }

    /// Checks a record's header block (`got` = bytes the read returned for
    /// the whole record) against the index entry `loc`; drops the key
    /// (Corrupt) on any mismatch.
    fn check_header(
        &self,
        key: &BlockKey,
        loc: &Loc,
        hblk: &[u8],
        got: usize,
    ) -> Result<RecordHeader> {
        let need = PAYLOAD_OFF + loc.stored as usize;
        if got < need {
            return Err(self.drop_corrupt(
                key,
                loc,
                &format!("record cut short ({got} of {need} bytes)"),
            ));
        }
        let hdr = match RecordHeader::decode(&hblk[..HEADER_LEN]) {
            Ok(h) => h,
            Err(e) => return Err(self.drop_corrupt(key, loc, &e.to_string())),
        };
        if hdr.key != *key
            || hdr.lsn != loc.lsn
            || hdr.stored_len != loc.stored
            || hdr.raw_len != loc.raw
        {
            return Err(self.drop_corrupt(key, loc, "header does not match the index"));
        }
        Ok(hdr)
    }

    fn payload_mismatch(&self, key: &BlockKey, loc: &Loc, stored: u32, computed: u32) -> Error {
        self.drop_corrupt(
            key,
            loc,
            &format!("payload checksum mismatch (stored {stored:08x}, computed {computed:08x})"),
        )
    }

    /// Reads the record at `loc` into `buf` and checks header, identity and
    /// payload checksum. On a mismatch the key is dropped (Corrupt). With
    /// `copy_to` and a raw record, the payload is copied there while its
    /// checksum is computed (one pass over memory); the bool says whether
    /// that happened. After an error `copy_to` holds no meaningful bytes.
    fn read_verified(
        &self,
        key: &BlockKey,
        loc: &Loc,
        file: &File,
        buf: &mut [u8],
        copy_to: Option<&mut [u8]>,
    ) -> Result<(RecordHeader, bool)> {
        let n = loc.len as usize;
        let got = fsio::read_full_at(file, &mut buf[..n], loc.off)
            .map_err(|e| self.read_error(e, loc))?;
        let hdr = self.check_header(key, loc, &buf[..ALIGN.min(n)], got)?;
        let payload = &buf[PAYLOAD_OFF..PAYLOAD_OFF + loc.stored as usize];
        let (crc, copied) = match copy_to {
            Some(dst) if hdr.codec == CodecTag::None && dst.len() == payload.len() => {
                (copy_with_crc(payload, dst), true)
            }
            _ => (crc32c::crc32c(payload), false),
        };
        if crc != hdr.payload_crc {
            return Err(self.payload_mismatch(key, loc, hdr.payload_crc, crc));
        }
        Ok((hdr, copied))
    }

    fn drop_corrupt(&self, key: &BlockKey, loc: &Loc, why: &str) -> Error {
        {
            let mut st = self.state.lock();
            if st.index.get(key).is_some_and(|l| l.same_place(loc)) {
                st.index.remove(key);
                if let Some(s) = st.segs.get_mut(&loc.seg) {
                    s.live -= loc.len;
                }
            }
        }
        self.c.read_corrupt.fetch_add(1, Relaxed);
        Error::corrupt(format!(
            "nvme rank {} {} offset {} key {}: {why}; record dropped, never served",
            self.rank(),
            seg_name(loc.seg),
            loc.off,
            key.to_hex()
        ))
    }

    /// One GC pass. `need = Some(n)`: free space until `n` more bytes fit
    /// under the cap (any dead bytes qualify). `None`: explicit pass.
    fn gc(&self, need: Option<u64>) -> Result<GcReport> {
        let _g = self.gc_lock.lock();
        self.c.gc_runs.fetch_add(1, Relaxed);
        let mut report = GcReport::default();
        let mut tried = HashSet::new();
        loop {
            let (victim, vfile, moves) = {
                let mut st = self.state.lock();
                if let Some(n) = need {
                    if st.used + n <= self.cfg.capacity_bytes {
                        break;
                    }
                }
                let pick = st
                    .segs
                    .iter()
                    .filter(|(id, s)| s.pending == 0 && s.len > s.live && !tried.contains(*id))
                    .filter(|(_, s)| need.is_some() || s.live == 0 || (s.len - s.live) * 4 >= s.len)
                    .max_by_key(|(_, s)| s.len - s.live)
                    .map(|(id, _)| *id);
                let Some(victim) = pick else { break };
                tried.insert(victim);
                if st.active == Some(victim) {
                    self.roll(&mut st)?;
                    // The new, empty active segment is never a victim.
                    let a = st.active.expect("active");
                    tried.insert(a);
                }
                let s = &st.segs[&victim];
                if s.live == 0 {
                    let len = s.len;
                    st.segs.remove(&victim);
                    st.used -= len;
                    drop(st);
                    self.delete_segment(victim)?;
                    report.segments_deleted += 1;
                    report.bytes_freed += len;
                    continue;
                }
                let file = s.file.clone();
                let moves: Vec<(BlockKey, Loc)> = st
                    .index
                    .iter()
                    .filter(|(_, l)| l.seg == victim)
                    .map(|(k, l)| (*k, *l))
                    .collect();
                (victim, file, moves)
            };
            let mut moved_bytes = 0;
            for (key, loc) in moves {
                match self.copy_forward(&key, &loc, &vfile)? {
                    true => {
                        report.records_moved += 1;
                        moved_bytes += loc.len;
                    }
                    false => report.records_dropped_corrupt += 1,
                }
            }
            let mut st = self.state.lock();
            let s = &st.segs[&victim];
            if s.live != 0 {
                // Only a concurrent bug could leave live data here.
                return Err(Error::internal(format!(
                    "nvme gc: {} still holds {} live bytes after compaction",
                    seg_name(victim),
                    s.live
                )));
            }
            let len = s.len;
            st.segs.remove(&victim);
            st.used -= len;
            drop(st);
            self.delete_segment(victim)?;
            report.segments_deleted += 1;
            report.bytes_freed += len.saturating_sub(moved_bytes);
        }
        self.c
            .gc_deleted
            .fetch_add(report.segments_deleted, Relaxed);
        self.c.gc_moved.fetch_add(report.records_moved, Relaxed);
        self.c.gc_freed.fetch_add(report.bytes_freed, Relaxed);
        Ok(report)
    }

    fn delete_segment(&self, id: u32) -> Result<()> {
        let path = self.rank_dir.join(seg_name(id));
        fs::remove_file(&path).ctx(format!("nvme gc: remove {}", path.display()))
    }

    /// Copies one live record to the active segment byte for byte (its lsn
    /// kept). Returns false when the record turned out corrupt (dropped).
    fn copy_forward(&self, key: &BlockKey, loc: &Loc, file: &File) -> Result<bool> {
        let mut buf = self.pool.get(loc.len as usize)?;
        match self.read_verified(key, loc, file, &mut buf, None) {
            Ok((mut hdr, _)) => {
                // The copy lands in a segment that will be sealed.
                if hdr.flags & FLAG_SEALED_SEGMENT == 0 {
                    hdr.flags |= FLAG_SEALED_SEGMENT;
                    hdr.encode(&mut buf[..HEADER_LEN]);
                }
            }
            Err(e) if e.kind() == ErrorKind::Corrupt => return Ok(false),
            Err(e) => return Err(e),
        }
        let res = {
            let mut st = self.state.lock();
            self.reserve(&mut st, loc.len, Some(loc.lsn))?
        };
        let new = Loc {
            seg: res.seg,
            off: res.off,
            ..*loc
        };
        let r = self.write_record(&res, &[&buf[..loc.len as usize]]);
        self.complete_write(res, *key, new, r, Some(*loc))?;
        Ok(true)
    }

    fn stats(&self) -> NvmeStats {
        let st = self.state.lock();
        let live: u64 = st.segs.values().map(|s| s.live).sum();
        let c = &self.c;
        NvmeStats {
            rank: self.cfg.rank,
            dir: self.rank_dir.display().to_string(),
            direct: self.direct,
            direct_fallback: self.direct_fallback.clone(),
            codec: self.cfg.codec.name(),
            records: st.index.len() as u64,
            live_bytes: live,
            dead_bytes: st.used - live,
            used_bytes: st.used,
            capacity_bytes: self.cfg.capacity_bytes,
            segments: st.segs.len() as u64,
            recovered_records: c.recovered.load(Relaxed),
            dropped_torn: c.dropped_torn.load(Relaxed),
            dropped_corrupt: c.dropped_corrupt.load(Relaxed),
            read_corrupt: c.read_corrupt.load(Relaxed),
            skipped_segments: c.skipped_segments.load(Relaxed),
            puts: c.puts.load(Relaxed),
            put_raw_bytes: c.put_raw.load(Relaxed),
            put_stored_bytes: c.put_stored.load(Relaxed),
            gets: c.gets.load(Relaxed),
            get_misses: c.get_misses.load(Relaxed),
            no_space_errors: c.no_space.load(Relaxed),
            io_errors: c.io_errors.load(Relaxed),
            gc_runs: c.gc_runs.load(Relaxed),
            gc_segments_deleted: c.gc_deleted.load(Relaxed),
            gc_records_moved: c.gc_moved.load(Relaxed),
            gc_bytes_freed: c.gc_freed.load(Relaxed),
        }
    }
}

/// Copies `src` into `dst` (same length) and returns the crc32c of the
/// bytes, streaming memory once. On x86-64 with SSE 4.2 the copy and three
/// interleaved crc32 streams share one loop (the crc32 instruction has a
/// latency of 3 and a throughput of 1), so the checksum costs little more
/// than the copy; elsewhere, cache-sized chunks are copied then checksummed.
pub(crate) fn copy_with_crc(src: &[u8], dst: &mut [u8]) -> u32 {
    assert_eq!(src.len(), dst.len(), "copy_with_crc: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("sse4.2") {
        // SAFETY: the CPU supports SSE 4.2 (checked just above).
        return unsafe { copy_with_crc_sse42(src, dst) };
    }
    copy_with_crc_chunked(src, dst)
}

fn copy_with_crc_chunked(src: &[u8], dst: &mut [u8]) -> u32 {
    const CHUNK: usize = 64 << 10;
    let mut crc = 0;
    for (s, d) in src.chunks(CHUNK).zip(dst.chunks_mut(CHUNK)) {
        d.copy_from_slice(s);
        crc = crc32c::crc32c_append(crc, d);
    }
    crc
}

/// # Safety
///
/// The CPU must support SSE 4.2; `src` and `dst` must have the same length.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse4.2")]
unsafe fn copy_with_crc_sse42(src: &[u8], dst: &mut [u8]) -> u32 {
    use std::arch::x86_64::_mm_crc32_u64;
    let words = src.len() / 24; // u64 words per stream
    let part = words * 8;
    let sp = src.as_ptr() as *const u64;
    let dp = dst.as_mut_ptr() as *mut u64;
    let (mut s0, mut s1, mut s2) = (!0u64, !0u64, !0u64);
    for i in 0..words {
        // SAFETY: i, words + i and 2 * words + i are below 3 * words, and
        // 3 * words * 8 <= len; unaligned reads and writes are allowed.
        unsafe {
            let a = sp.add(i).read_unaligned();
            let b = sp.add(words + i).read_unaligned();
            let c = sp.add(2 * words + i).read_unaligned();
            dp.add(i).write_unaligned(a);
            dp.add(words + i).write_unaligned(b);
            dp.add(2 * words + i).write_unaligned(c);
            s0 = _mm_crc32_u64(s0, a);
            s1 = _mm_crc32_u64(s1, b);
            s2 = _mm_crc32_u64(s2, c);
        }
    }
    let mut crc = !(s0 as u32);
    if part > 0 {
        crc = crc32c::crc32c_combine(crc, !(s1 as u32), part);
        crc = crc32c::crc32c_combine(crc, !(s2 as u32), part);
    }
    let tail = 3 * part;
    dst[tail..].copy_from_slice(&src[tail..]);
    crc32c::crc32c_append(crc, &src[tail..])
}

/// Indexes `loc` for `key` if it is newer than what the index holds; the
/// loser's bytes are dead.
fn install(st: &mut State, key: BlockKey, loc: Loc) {
    match st.index.get(&key) {
        Some(old) if old.lsn >= loc.lsn => {
            // An older write finishing after a newer one: it is dead on arrival.
        }
        Some(old) => {
            let old = *old;
            if let Some(s) = st.segs.get_mut(&old.seg) {
                s.live -= old.len;
            }
            st.index.insert(key, loc);
            st.segs.get_mut(&loc.seg).expect("segment").live += loc.len;
        }
        None => {
            st.index.insert(key, loc);
            st.segs.get_mut(&loc.seg).expect("segment").live += loc.len;
        }
    }
}

/// Deallocates `off..off + len` of `f` (the bytes then read as zeros, the
/// file keeps its size). False where the file system refuses.
fn punch_hole(f: &File, off: u64, len: u64) -> bool {
    let (Ok(o), Ok(l)) = (libc::off_t::try_from(off), libc::off_t::try_from(len)) else {
        return false;
    };
    // SAFETY: fallocate on a descriptor we own.
    unsafe {
        libc::fallocate(
            std::os::fd::AsRawFd::as_raw_fd(f),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            o,
            l,
        ) == 0
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn fused_copy_crc_equals_plain_crc() {
        let all: Vec<u8> = (0..300_001u32).map(|i| (i * 7 + i / 13) as u8).collect();
        for len in [0, 1, 7, 23, 24, 25, 47, 48, 1000, 4096, 65_537, 300_001] {
            for start in [0, 1, 5] {
                let src = &all[start..start + len.min(all.len() - start)];
                let mut dst = vec![0u8; src.len() + 1];
                let crc = super::copy_with_crc(src, &mut dst[1..]);
                assert_eq!(crc, crc32c::crc32c(src), "len {len} start {start}");
                assert_eq!(&dst[1..], src);
                let mut d2 = vec![0u8; src.len()];
                assert_eq!(super::copy_with_crc_chunked(src, &mut d2), crc);
            }
        }
    }

    #[test]
    fn segment_names_parse() {
        assert_eq!(super::parse_seg_name("seg-000012.kvp"), Some(12));
        assert_eq!(super::parse_seg_name("seg-1234567.kvp"), Some(1_234_567));
        assert_eq!(super::parse_seg_name("seg-12.kvp"), None);
        assert_eq!(super::parse_seg_name("seg-00001x.kvp"), None);
        assert_eq!(super::seg_name(3), "seg-000003.kvp");
    }
}
