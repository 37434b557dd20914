//! A key-value chunk store over the host arena and the NVMe segment store,
//! for callers that hand kvpark opaque chunks under their own keys instead of
//! vLLM's paged KV (the LMCache storage plugin, `python_shim/kvpark/lmcache.py`).
//!
//! ## Keys
//!
//! A caller key (LMCache: the `CacheEngineKey` string, which names the model,
//! world size, worker, chunk hash and dtype) becomes a [`BlockKey`] by
//! SHA-256 over the domain `kvpark-chunk-v1`, the [`ModelNs`] of the config's
//! `model_identity` and the length-prefixed key bytes. The domain keeps chunk
//! keys apart from the vLLM connector's block keys (`kvpark-block-v3`) even in
//! a shared NVMe directory; the model namespace keeps one model's chunks from
//! another's.
//!
//! ## Chunks and slots
//!
//! Every host slot holds one chunk. Slots are `chunk_bytes` (the largest
//! chunk the caller will store, e.g. LMCache's full chunk) plus one 4 KiB page
//! for the header and the caller's metadata, rounded up to 4 KiB. A shorter
//! chunk (LMCache's last chunk of a prompt) takes a whole slot and is stored
//! with its length; a longer one is refused ([`ErrorKind::InvalidArgument`]).
//! The stored record (in the slot and, byte for byte, on NVMe) is:
//!
//! | offset | bytes | field |
//! |---|---|---|
//! | 0 | 4 | magic `KVPC` |
//! | 4 | 4 | metadata length `m` (u32 LE, at most [`MAX_META`]) |
//! | 8 | 8 | data length `d` (u64 LE) |
//! | 16 | m | metadata (opaque: LMCache's shape, dtype and format) |
//! | [`data_offset`]`(m)` | d | data |
//!
//! The record length is `data_offset(m) + d`; a record whose header disagrees
//! with its length is corrupt.
//!
//! ## Placement
//!
//! A put copies the chunk into a host slot. With policy `lmcache-lru` and an
//! NVMe directory, the slot is then written through to NVMe on the I/O threads
//! (zero copy from the slot); `vllm-offload` and `vllm-offload:arc` keep
//! chunks in host memory only. When the arena is full, the least recently
//! used unpinned chunks give up their host copy: a chunk also on NVMe stays
//! there, one only in host memory is dropped. A lookup that pins (`contains`
//! with `pin`, LMCache's lookup before a retrieve) of a chunk only on NVMe
//! starts reading it back into host memory at once (prefetch), so the
//! retrieve that follows finds it there; a get of a chunk only on NVMe reads
//! it on the caller's thread. When an NVMe write finds the store full, the
//! least recently used chunks that are only on NVMe are dropped, garbage is
//! collected, and the write is tried once more.
//!
//! ## Never wrong bytes
//!
//! Chunks are served only from a host slot filled by a put or by an NVMe read
//! whose checksums verified ([`NvmeStore::get`]). A corrupt record is a miss:
//! the chunk leaves the index (so `contains` says no afterwards), the miss is
//! counted (`corrupt`), and the caller's buffer is never written.
//!
//! ## Restart
//!
//! At open, every record of this rank's NVMe store is indexed as a chunk
//! only on NVMe (a record of another model's namespace is indexed too but can
//! never be named by a key of this model, and ages out).

use crate::block::{BlockKey, ModelNs};
use crate::config::{Config, Fsync};
use crate::error::{Error, ErrorKind, Result};
use crate::index::{BlockIndex, BlockState, SlotId};
use crate::tier::host::HostArena;
use crate::tier::nvme::{Completion, FsyncPolicy, NvmeConfig, NvmeStore, OpKind, Ticket};
use parking_lot::{Condvar, Mutex, MutexGuard};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Record header bytes before the metadata.
const HEADER: usize = 16;
/// Record magic.
const MAGIC: &[u8; 4] = b"KVPC";
/// Largest caller metadata per chunk.
pub const MAX_META: usize = 4096 - HEADER;
/// Chunks belong to no session: their records carry session 0, seq 0.
const NO_SESSION: u64 = 0;
/// How long a get waits for a transfer of its chunk already in flight.
const SETTLE_WAIT: Duration = Duration::from_secs(30);

/// Where the data starts in a record with `meta_len` bytes of metadata (a
/// multiple of 64, so the data keeps its element alignment for the codecs).
pub fn data_offset(meta_len: usize) -> usize {
    (HEADER + meta_len).div_ceil(64) * 64
}

/// The [`BlockKey`] of a caller key under a model namespace (module docs).
pub fn chunk_key(model: &ModelNs, key: &[u8]) -> BlockKey {
    let mut h = Sha256::new();
    h.update(b"kvpark-chunk-v1");
    h.update(model.0);
    h.update((key.len() as u64).to_le_bytes());
    h.update(key);
    BlockKey(h.finalize().into())
}

/// Counters of one store (a JSON-able snapshot with [`ChunkStore::metrics_json`]).
#[derive(Clone, Debug, Default, Serialize)]
pub struct StoreCounters {
    /// Chunks stored by a put.
    pub puts: u64,
    /// Data bytes stored by puts.
    pub put_bytes: u64,
    /// Puts of a chunk already stored (nothing written).
    pub put_duplicates: u64,
    /// Puts refused: the chunk or its metadata is larger than a slot takes.
    pub put_too_large: u64,
    /// Puts refused: every host slot pinned or in flight.
    pub put_no_space: u64,
    /// Gets served (always from a host copy).
    pub gets: u64,
    /// Chunks read back from NVMe on the caller's thread (a lookup or get of a
    /// chunk only on NVMe; a prefetch reads on the I/O threads instead).
    pub nvme_reads: u64,
    /// Lookups and gets of keys not stored (or dropped meanwhile).
    pub misses: u64,
    /// Records found corrupt on read: dropped, served as misses.
    pub corrupt: u64,
    /// NVMe reads started ahead of a get by a pinning lookup.
    pub prefetches: u64,
    /// NVMe reads that failed for a reason other than a check (the chunk is dropped).
    pub nvme_read_errors: u64,
    /// NVMe writes (write-through) completed.
    pub nvme_writes: u64,
    /// NVMe writes that failed (the chunk stays in host memory only).
    pub nvme_write_errors: u64,
    /// Chunks only on NVMe dropped to make room for new writes.
    pub nvme_evictions: u64,
    /// Host copies given up to make room (the chunk stays on NVMe).
    pub host_evictions_to_nvme: u64,
    /// Chunks only in host memory dropped to make room.
    pub host_drops: u64,
    /// Chunks removed by the caller.
    pub removes: u64,
    /// Chunks indexed from NVMe at open.
    pub recovered: u64,
}

/// A lookup's answer: the chunk's metadata and data length.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkInfo {
    /// The caller's metadata, as stored.
    pub meta: Vec<u8>,
    /// Data bytes.
    pub data_len: u64,
}

struct State {
    index: BlockIndex,
    /// Record length of every indexed chunk.
    lens: HashMap<BlockKey, u32>,
    /// Submitted NVMe requests: key, and whether a failed write was retried.
    tickets: HashMap<Ticket, (BlockKey, bool)>,
    /// Logical clock for LRU (one tick per access).
    clock: u64,
    c: StoreCounters,
    closed: bool,
}

impl State {
    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }
}

struct Inner {
    model: ModelNs,
    arena: HostArena,
    nvme: Option<NvmeStore>,
    write_through: bool,
    chunk_bytes: usize,
    rank: u32,
    st: Mutex<State>,
    /// Signalled whenever a transfer settles.
    settled: Condvar,
}

/// The chunk store of one rank. See the module docs.
pub struct ChunkStore {
    inner: Arc<Inner>,
    done: Mutex<Option<JoinHandle<()>>>,
}

impl ChunkStore {
    /// Opens the store of `rank`: a host arena of `cfg.host_bytes` in slots
    /// for chunks of up to `chunk_bytes`, and the NVMe store under
    /// `cfg.nvme_dir` (if set), whose records are indexed. `elem_size` is the
    /// element size of the chunks' dtype (for the plane codecs).
    pub fn open(cfg: &Config, rank: u32, chunk_bytes: u64, elem_size: usize) -> Result<Self> {
        if chunk_bytes == 0 {
            return Err(Error::config("chunk_bytes: must be > 0"));
        }
        if !matches!(elem_size, 1 | 2 | 4 | 8) {
            return Err(Error::config(format!(
                "elem_size: {elem_size} must be 1, 2, 4 or 8"
            )));
        }
        if cfg.predicts_gaps() {
            return Err(Error::config(format!(
                "policy: {:?} predicts the gaps of sessions, which the chunk store does not see; \
                 it runs lmcache-lru (host + NVMe write-through) or vllm-offload (host only)",
                cfg.policy
            )));
        }
        if cfg.host_file.is_some() {
            return Err(Error::config(
                "host_file: not supported by the chunk store (chunks outlive a restart on NVMe: set nvme_dir)",
            ));
        }
        let chunk = usize::try_from(chunk_bytes)
            .ok()
            .filter(|c| *c <= u32::MAX as usize - 2 * 4096)
            .ok_or_else(|| Error::config(format!("chunk_bytes: {chunk_bytes} is too large")))?;
        let slot_bytes = (4096 + chunk).div_ceil(4096) * 4096;
        let arena = HostArena::from_bytes(cfg.host_bytes, slot_bytes)
            .map_err(|e| e.context(format!("host_bytes (slots of {slot_bytes} bytes)")))?;
        let model = ModelNs::of(&cfg.model_identity);
        let mut st = State {
            index: BlockIndex::new(),
            lens: HashMap::new(),
            tickets: HashMap::new(),
            clock: 0,
            c: StoreCounters::default(),
            closed: false,
        };
        let nvme = match &cfg.nvme_dir {
            None => None,
            Some(dir) => {
                let mut nc = NvmeConfig::new(dir.clone(), rank, cfg.nvme_bytes);
                nc.segment_bytes = cfg.nvme_segment_bytes;
                nc.io_threads = cfg.io_threads as usize;
                nc.codec = cfg.codec;
                nc.elem_size = elem_size;
                nc.fsync = match cfg.fsync {
                    Fsync::Never => FsyncPolicy::Never,
                    Fsync::Segment => FsyncPolicy::PerSegment,
                    Fsync::Record => FsyncPolicy::EveryRecord,
                };
                let store = NvmeStore::open(nc).map_err(|e| e.context("nvme store"))?;
                if !cfg.model_identity.is_empty() {
                    let label = crate::tier::identity::nvme_label(dir, rank);
                    if let crate::tier::identity::Owner::Other(other) =
                        crate::tier::identity::claim(&label, &cfg.model_identity)?
                    {
                        log::warn!(
                            "{}",
                            crate::tier::identity::other_model_message(
                                &label,
                                &other,
                                &cfg.model_identity
                            )
                        );
                    }
                }
                for k in store.keys() {
                    if k.raw_len as usize > slot_bytes {
                        continue; // not a chunk record of this geometry
                    }
                    if st.index.insert_nvme(k.key, k.session, k.seq, 0).is_ok() {
                        st.lens.insert(k.key, k.raw_len);
                        st.c.recovered += 1;
                    }
                }
                Some(store)
            }
        };
        let write_through = nvme.is_some() && cfg.policy == "lmcache-lru";
        let inner = Arc::new(Inner {
            model,
            arena,
            nvme,
            write_through,
            chunk_bytes: chunk,
            rank,
            st: Mutex::new(st),
            settled: Condvar::new(),
        });
        let done = match &inner.nvme {
            None => None,
            Some(n) => {
                let rx = n.completions();
                let inner2 = inner.clone();
                Some(
                    std::thread::Builder::new()
                        .name(format!("kvpark-store{rank}-done"))
                        .spawn(move || {
                            while let Ok(c) = rx.recv() {
                                inner2.on_completion(c);
                            }
                        })
                        .map_err(|e| Error::from(e).context("store: spawn completion thread"))?,
                )
            }
        };
        Ok(ChunkStore {
            inner,
            done: Mutex::new(done),
        })
    }

    /// The block key of a caller key in this store's model namespace.
    pub fn key_of(&self, key: &[u8]) -> BlockKey {
        chunk_key(&self.inner.model, key)
    }

    /// Largest data bytes per chunk.
    pub fn chunk_bytes(&self) -> usize {
        self.inner.chunk_bytes
    }

    /// Stores a chunk (metadata and data) under `key`. Returns `false` when
    /// the key was already stored (nothing written).
    pub fn put(&self, key: &[u8], meta: &[u8], data: &[u8]) -> Result<bool> {
        self.inner.put(self.key_of(key), meta, data)
    }

    /// Whether `key` is stored. With `pin`, a host copy is pinned (kept until
    /// [`ChunkStore::unpin`]) and a chunk only on NVMe starts coming back
    /// into host memory.
    pub fn contains(&self, key: &[u8], pin: bool) -> Result<bool> {
        self.inner.contains(self.key_of(key), pin)
    }

    /// The metadata and data length of `key`; [`ErrorKind::NotFound`] on a
    /// miss, [`ErrorKind::Corrupt`] when its NVMe record failed a check
    /// (dropped: later calls miss).
    pub fn lookup(&self, key: &[u8]) -> Result<ChunkInfo> {
        let k = self.key_of(key);
        self.inner.with_host_copy(k, false, |rec| {
            let (meta, data) = split_record(rec)?;
            Ok(ChunkInfo {
                meta: meta.to_vec(),
                data_len: data.len() as u64,
            })
        })
    }

    /// Copies the data of `key` into `dst` (at least the data length) and
    /// returns the data length. Misses and corrupt records as
    /// [`ChunkStore::lookup`]; `dst` is written only on success.
    pub fn get(&self, key: &[u8], dst: &mut [u8]) -> Result<usize> {
        let k = self.key_of(key);
        self.inner.with_host_copy(k, true, |rec| {
            let (_, data) = split_record(rec)?;
            if dst.len() < data.len() {
                return Err(Error::new(
                    ErrorKind::InvalidArgument,
                    format!(
                        "buffer of {} bytes is too small for the chunk's {} bytes",
                        dst.len(),
                        data.len()
                    ),
                ));
            }
            dst[..data.len()].copy_from_slice(data);
            Ok(data.len())
        })
    }

    /// Pins the host copy of `key` (see [`ChunkStore::contains`]).
    pub fn pin(&self, key: &[u8]) -> Result<()> {
        let k = self.key_of(key);
        let mut st = self.inner.st.lock();
        let now = st.tick();
        st.index.pin(&k, now)
    }

    /// Releases one pin of `key`.
    pub fn unpin(&self, key: &[u8]) -> Result<()> {
        let k = self.key_of(key);
        self.inner.st.lock().index.unpin(&k)
    }

    /// Removes `key` from every tier. `false`: it was not stored.
    /// [`ErrorKind::Busy`] while it is pinned or being copied.
    pub fn remove(&self, key: &[u8]) -> Result<bool> {
        let k = self.key_of(key);
        let mut st = self.inner.st.lock();
        let Some(e) = st.index.get(&k) else {
            return Ok(false);
        };
        let slot = st.index.remove(&k)?;
        st.lens.remove(&k);
        if let Some(s) = slot {
            self.inner.free_slot(s);
        }
        if e.on_nvme {
            if let Some(n) = &self.inner.nvme {
                n.remove(&k);
            }
        }
        st.c.removes += 1;
        Ok(true)
    }

    /// Waits until no NVMe transfer is in flight (or `timeout` passes:
    /// [`ErrorKind::Busy`]).
    pub fn flush(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut st = self.inner.st.lock();
        while !st.tickets.is_empty() {
            if self.inner.settled.wait_until(&mut st, deadline).timed_out() {
                return Err(Error::new(
                    ErrorKind::Busy,
                    format!("{} NVMe transfers still in flight", st.tickets.len()),
                ));
            }
        }
        Ok(())
    }

    /// Counters, index state counts, host occupancy and the NVMe store's stats as JSON.
    pub fn metrics_json(&self) -> String {
        let st = self.inner.st.lock();
        let v = serde_json::json!({
            "rank": self.inner.rank,
            "store": st.c,
            "chunks": st.index.len(),
            "states": st.index.counts(),
            "host_slots": self.inner.arena.capacity(),
            "host_slots_used": self.inner.arena.used(),
            "slot_bytes": self.inner.arena.slot_bytes(),
            "write_through": self.inner.write_through,
            "nvme": self.inner.nvme.as_ref().map(|n| n.stats()),
        });
        v.to_string()
    }

    /// Finishes queued NVMe writes, stops the I/O threads and syncs per the
    /// fsync policy. Later calls fail with [`ErrorKind::Closed`]. Called by drop.
    pub fn close(&self) -> Result<()> {
        self.inner.st.lock().closed = true;
        let r = match &self.inner.nvme {
            Some(n) => n.close(),
            None => Ok(()),
        };
        if let Some(h) = self.done.lock().take() {
            // The I/O threads are gone, so the completion queue ends.
            let _ = h.join();
        }
        r
    }
}

impl Drop for ChunkStore {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            log::error!("kvpark store rank {}: close: {e}", self.inner.rank);
        }
    }
}

/// Builds a record into `slot`; returns its length.
fn write_record(slot: &mut [u8], meta: &[u8], data: &[u8]) -> usize {
    let off = data_offset(meta.len());
    slot[..4].copy_from_slice(MAGIC);
    slot[4..8].copy_from_slice(&(meta.len() as u32).to_le_bytes());
    slot[8..16].copy_from_slice(&(data.len() as u64).to_le_bytes());
    slot[HEADER..HEADER + meta.len()].copy_from_slice(meta);
    slot[HEADER + meta.len()..off].fill(0);
    slot[off..off + data.len()].copy_from_slice(data);
    off + data.len()
}

/// Splits a record into (metadata, data), checking its header.
fn split_record(rec: &[u8]) -> Result<(&[u8], &[u8])> {
    let bad = |why: &str| Err(Error::corrupt(format!("chunk record: {why}")));
    if rec.len() < HEADER || &rec[..4] != MAGIC {
        return bad("bad magic");
    }
    let m = u32::from_le_bytes(rec[4..8].try_into().unwrap()) as usize;
    let d = u64::from_le_bytes(rec[8..16].try_into().unwrap());
    if m > MAX_META {
        return bad("metadata length out of range");
    }
    let off = data_offset(m);
    if Some(rec.len() as u64) != (off as u64).checked_add(d) {
        return bad("lengths disagree with the record length");
    }
    Ok((&rec[HEADER..HEADER + m], &rec[off..]))
}

impl Inner {
    fn free_slot(&self, s: SlotId) {
        if let Err(e) = self.arena.free(s) {
            log::error!("kvpark store rank {}: free slot {}: {e}", self.rank, s.0);
        }
    }

    fn check_open(st: &State) -> Result<()> {
        if st.closed {
            Err(Error::new(ErrorKind::Closed, "chunk store is closed"))
        } else {
            Ok(())
        }
    }

    /// A free slot, giving up the host copies of least recently used chunks
    /// when the arena is full.
    fn alloc_slot(&self, st: &mut MutexGuard<'_, State>) -> Result<SlotId> {
        loop {
            match self.arena.alloc() {
                Ok(s) => return Ok(s),
                Err(e) if e.kind() == ErrorKind::NoSpace => {}
                Err(e) => return Err(e),
            }
            let now = st.clock;
            let victims = st.index.evictable_host_victims(1, now);
            if victims.is_empty() {
                return Err(Error::no_space(format!(
                    "host arena full: all {} slots are pinned or being copied",
                    self.arena.capacity()
                )));
            }
            for v in victims {
                let e = st.index.get(&v).expect("victim indexed");
                if e.state == BlockState::HostAndNvme {
                    let s = st.index.release_host(&v)?;
                    self.free_slot(s);
                    st.c.host_evictions_to_nvme += 1;
                } else {
                    if let Some(s) = st.index.remove(&v)? {
                        self.free_slot(s);
                    }
                    st.lens.remove(&v);
                    st.c.host_drops += 1;
                }
            }
        }
    }

    fn put(&self, k: BlockKey, meta: &[u8], data: &[u8]) -> Result<bool> {
        if meta.len() > MAX_META || data.len() > self.chunk_bytes {
            self.st.lock().c.put_too_large += 1;
            return Err(Error::invalid(format!(
                "chunk of {} data bytes and {} metadata bytes exceeds the store's {} and {}",
                data.len(),
                meta.len(),
                self.chunk_bytes,
                MAX_META
            )));
        }
        let mut st = self.st.lock();
        Self::check_open(&st)?;
        if st.index.get(&k).is_some() {
            st.c.put_duplicates += 1;
            let now = st.tick();
            st.index.touch(&k, now)?;
            return Ok(false);
        }
        let slot = match self.alloc_slot(&mut st) {
            Ok(s) => s,
            Err(e) => {
                if e.kind() == ErrorKind::NoSpace {
                    st.c.put_no_space += 1;
                }
                return Err(e);
            }
        };
        let now = st.tick();
        if let Err(e) = st.index.begin_save(k, NO_SESSION, 0, slot, now) {
            self.free_slot(slot);
            return Err(e);
        }
        drop(st);
        // SAFETY: the slot is allocated to this chunk, which is `Saving`: no
        // one else reads, writes or frees it until finish_save.
        let len = write_record(unsafe { self.arena.slot_mut_unchecked(slot) }, meta, data);
        let mut st = self.st.lock();
        st.index.finish_save(&k, true)?;
        st.lens.insert(k, len as u32);
        st.c.puts += 1;
        st.c.put_bytes += data.len() as u64;
        if self.write_through {
            self.demote(&mut st, k, slot, len, false);
        }
        Ok(true)
    }

    /// Starts writing the host copy of `k` (in `slot`, `len` bytes) to NVMe.
    fn demote(
        &self,
        st: &mut MutexGuard<'_, State>,
        k: BlockKey,
        slot: SlotId,
        len: usize,
        retry: bool,
    ) {
        let Some(n) = &self.nvme else { return };
        if st.index.begin_demote(&k).is_err() {
            return;
        }
        let ptr = match self.arena.slot_ptr(slot) {
            Ok(p) => p as *const u8,
            Err(_) => {
                let _ = st.index.finish_demote(&k, false);
                return;
            }
        };
        // SAFETY: the chunk stays `Demoting` until the completion arrives
        // (on_completion), so its slot is neither freed nor written meanwhile;
        // close() waits for the I/O threads before the arena goes away.
        match unsafe { n.submit_put_raw(k, NO_SESSION, 0, ptr, len) } {
            Ok(t) => {
                st.tickets.insert(t, (k, retry));
            }
            Err(_) => {
                let _ = st.index.finish_demote(&k, false);
                st.c.nvme_write_errors += 1;
            }
        }
    }

    fn on_completion(&self, c: Completion) {
        let mut st = self.st.lock();
        let Some((k, retried)) = st.tickets.remove(&c.ticket) else {
            return;
        };
        match c.op {
            OpKind::Put => match c.result {
                Ok(_) => {
                    let _ = st.index.finish_demote(&k, true);
                    st.c.nvme_writes += 1;
                }
                Err(e) => {
                    let _ = st.index.finish_demote(&k, false);
                    let slot = st.index.get(&k).and_then(|e| e.host);
                    let len = st.lens.get(&k).copied();
                    if e.kind() == ErrorKind::NoSpace && !retried && !st.closed {
                        if let (Some(slot), Some(len)) = (slot, len) {
                            self.make_nvme_room(&mut st, len as u64);
                            self.demote(&mut st, k, slot, len as usize, true);
                            self.settled.notify_all();
                            return;
                        }
                    }
                    st.c.nvme_write_errors += 1;
                }
            },
            OpKind::Get => {
                let mut corrupt = matches!(&c.result, Err(e) if e.kind() == ErrorKind::Corrupt);
                let ok = match c.result {
                    Ok(_) => {
                        let slot = st.index.get(&k).and_then(|e| e.host);
                        match slot {
                            Some(s) if c.data.len() <= self.arena.slot_bytes() => {
                                // SAFETY: the chunk is `Promoting` into this
                                // slot: no one else touches it until
                                // finish_promote below, under this lock.
                                let dst = unsafe { self.arena.slot_mut_unchecked(s) };
                                dst[..c.data.len()].copy_from_slice(&c.data);
                                let ok = split_record(&dst[..c.data.len()]).is_ok();
                                corrupt |= !ok;
                                ok
                            }
                            _ => false,
                        }
                    }
                    Err(_) => false,
                };
                if let Ok(Some(s)) = st.index.finish_promote(&k, ok) {
                    self.free_slot(s);
                }
                if !ok {
                    self.drop_nvme_only(&mut st, k, corrupt);
                }
            }
        }
        self.settled.notify_all();
    }

    /// Drops a chunk whose NVMe record failed (it is only on NVMe): a miss
    /// from now on. `corrupt`: the record failed a check (counted).
    fn drop_nvme_only(&self, st: &mut MutexGuard<'_, State>, k: BlockKey, corrupt: bool) {
        if st
            .index
            .get(&k)
            .is_some_and(|e| e.state == BlockState::Nvme)
            && st.index.remove(&k).is_ok()
        {
            st.lens.remove(&k);
            if let Some(n) = &self.nvme {
                n.remove(&k);
            }
            if corrupt {
                st.c.corrupt += 1;
            } else {
                st.c.nvme_read_errors += 1;
            }
        }
    }

    /// Drops least recently used chunks that are only on NVMe, about
    /// `2 * need` bytes of them, and collects garbage.
    fn make_nvme_room(&self, st: &mut MutexGuard<'_, State>, need: u64) {
        let Some(n) = &self.nvme else { return };
        let mut cands: Vec<(u64, BlockKey)> = st
            .index
            .iter()
            .filter(|(_, e)| e.state == BlockState::Nvme)
            .map(|(k, e)| (e.last_access, *k))
            .collect();
        cands.sort_unstable();
        let mut freed = 0u64;
        for (_, k) in cands {
            if freed >= 2 * need {
                break;
            }
            if st.index.remove(&k).is_ok() {
                let len = st.lens.remove(&k).unwrap_or(0) as u64;
                n.remove(&k);
                freed += len.div_ceil(4096) * 4096 + 4096;
                st.c.nvme_evictions += 1;
            }
        }
        if let Err(e) = n.gc() {
            log::error!("kvpark store rank {}: nvme gc: {e}", self.rank);
        }
    }

    fn contains(&self, k: BlockKey, pin: bool) -> Result<bool> {
        let mut st = self.st.lock();
        Self::check_open(&st)?;
        let Some(e) = st.index.get(&k) else {
            st.c.misses += 1;
            return Ok(false);
        };
        let now = st.tick();
        st.index.touch(&k, now)?;
        if pin {
            if e.state.host_readable() {
                st.index.pin(&k, now)?;
            } else if e.state == BlockState::Nvme {
                self.prefetch(&mut st, k);
            }
        }
        Ok(true)
    }

    /// Starts reading a chunk only on NVMe back into a host slot.
    fn prefetch(&self, st: &mut MutexGuard<'_, State>, k: BlockKey) {
        let Some(n) = &self.nvme else { return };
        let Some(&len) = st.lens.get(&k) else { return };
        let Ok(slot) = self.alloc_slot(st) else {
            return;
        };
        let now = st.tick();
        if st.index.begin_promote(&k, slot, now).is_err() {
            self.free_slot(slot);
            return;
        }
        match n.submit_get(k, len as usize) {
            Ok(t) => {
                st.tickets.insert(t, (k, false));
                st.c.prefetches += 1;
            }
            Err(_) => {
                if let Ok(Some(s)) = st.index.finish_promote(&k, false) {
                    self.free_slot(s);
                }
            }
        }
    }

    /// Runs `f` over the record of `k` in its host slot (pinned meanwhile),
    /// reading it from NVMe first when it is only there. `hit`: count a
    /// success as a get.
    fn with_host_copy<T>(
        &self,
        k: BlockKey,
        hit: bool,
        f: impl FnOnce(&[u8]) -> Result<T>,
    ) -> Result<T> {
        let deadline = Instant::now() + SETTLE_WAIT;
        let mut st = self.st.lock();
        Self::check_open(&st)?;
        loop {
            let Some(e) = st.index.get(&k) else {
                st.c.misses += 1;
                return Err(Error::not_found("chunk not stored"));
            };
            match e.state {
                s if s.host_readable() => break,
                BlockState::Nvme => {
                    self.promote_sync(&mut st, k)?;
                }
                _ => {
                    if self.settled.wait_until(&mut st, deadline).timed_out() {
                        return Err(Error::new(ErrorKind::Busy, "chunk still being copied"));
                    }
                }
            }
        }
        let now = st.tick();
        st.index.pin(&k, now)?;
        let slot = st
            .index
            .get(&k)
            .and_then(|e| e.host)
            .expect("pinned: host copy");
        let len = st.lens[&k] as usize;
        drop(st);
        // SAFETY: pinned: the slot is neither freed nor written until unpin.
        let rec = unsafe { &self.arena.slot_unchecked(slot)[..len] };
        let r = f(rec);
        let mut st = self.st.lock();
        let _ = st.index.unpin(&k);
        if hit && r.is_ok() {
            st.c.gets += 1;
        }
        r
    }

    /// Reads a chunk only on NVMe into a host slot on this thread.
    fn promote_sync(&self, st: &mut MutexGuard<'_, State>, k: BlockKey) -> Result<()> {
        let n = self
            .nvme
            .as_ref()
            .ok_or_else(|| Error::internal("chunk on NVMe without an NVMe store"))?;
        let len = st.lens[&k] as usize;
        let slot = self.alloc_slot(st)?;
        let now = st.tick();
        if let Err(e) = st.index.begin_promote(&k, slot, now) {
            self.free_slot(slot);
            return Err(e);
        }
        let r = MutexGuard::unlocked(st, || {
            // SAFETY: the chunk is `Promoting` into this slot: no one else
            // touches the slot until finish_promote.
            let dst = unsafe { &mut self.arena.slot_mut_unchecked(slot)[..len] };
            n.get(&k, dst).and_then(|_| split_record(dst).map(|_| ()))
        });
        if let Some(s) = st.index.finish_promote(&k, r.is_ok())? {
            self.free_slot(s);
        }
        self.settled.notify_all();
        if r.is_ok() {
            st.c.nvme_reads += 1;
        }
        if let Err(e) = r {
            let corrupt = e.kind() == ErrorKind::Corrupt;
            self.drop_nvme_only(st, k, corrupt);
            return Err(if corrupt {
                e
            } else {
                e.context("reading chunk from NVMe")
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
