//! Pinning kvpark's host arena for the device: `cuMemHostRegister` with
//! `PORTABLE | DEVICEMAP` (never write-combined: the CPU reads the arena to
//! compress it), done in chunks on a background thread so the engine starts at
//! once and offloads are admitted as chunks come online. Registration runs
//! with the device's primary context pushed (a background thread has none);
//! a job may hold all but its first chunks until released (vLLM captures CUDA
//! graphs after registering its caches, and a registration from another
//! thread during a capture breaks it); a job started for CUDA unregisters
//! its chunks when dropped.
//!
//! - [`PinHook`]: the host tier's hook (re-exported from `crate::tier::host`),
//!   so [`crate::tier::host::HostArena::pin_with`] takes a [`CudaPinner`].
//! - [`CudaPinner`]: the hook on the real driver.
//! - [`PinningJob`]: chunked background registration with progress
//!   (`pinned_bytes`, `failed_chunks`). Its register function is injectable,
//!   so the chunking, ordering, failure fallback and progress logic is tested
//!   without a GPU.
//!
//! Invariants: chunks are registered front to back, each exactly once; a
//! chunk whose registration fails stays **pageable** (transfers still work,
//! slower: the engine then uses staged copies) and is counted in
//! `failed_chunks` with a warning on stderr, never retried silently, never an
//! abort; a chunk is *settled* once registered or failed, and a range may be
//! used for offloads once every chunk under it is settled.

use super::driver;
use crate::error::{Error, Result};
use parking_lot::{Condvar, Mutex};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use crate::tier::host::PinHook;

/// [`PinHook`] on the CUDA driver (`cuMemHostRegister`, portable + mapped),
/// calling it with the device's primary context current (from any thread).
#[derive(Clone)]
pub struct CudaPinner(Arc<driver::PrimaryContext>);

impl std::fmt::Debug for CudaPinner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CudaPinner")
    }
}

impl CudaPinner {
    /// Retains device `ordinal`'s primary context (typed error without a
    /// driver or device).
    pub fn new(ordinal: i32) -> Result<CudaPinner> {
        Ok(CudaPinner(Arc::new(driver::PrimaryContext::retain(
            ordinal,
        )?)))
    }
}

// The hook's shape (safe fns taking raw pointers) is the host tier's trait;
// its contract — the arena owns and keeps mapped every range it passes — is
// what makes the driver calls sound.
#[allow(clippy::not_unsafe_ptr_arg_deref)]
impl PinHook for CudaPinner {
    fn pin(&self, addr: *mut u8, len: usize) -> Result<()> {
        // SAFETY: the hook's contract: the arena owns [addr, addr+len) and
        // keeps it mapped until unpin.
        unsafe { driver::host_register(&self.0, addr, len) }
    }
    fn unpin(&self, addr: *mut u8, _len: usize) -> Result<()> {
        // SAFETY: as above; no transfer uses the range any more.
        unsafe { driver::host_unregister(&self.0, addr) }
    }
}

/// Default registration chunk (1 GiB: registering takes ~0.1–0.3 s per GiB,
/// so the first chunk is online quickly).
pub const DEFAULT_CHUNK: usize = 1 << 30;

/// State of one chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChunkState {
    /// Not registered yet.
    Pending,
    /// Pinned and device-mapped.
    Pinned,
    /// Registration failed; the chunk is used as pageable memory.
    Pageable(String),
}

/// A snapshot of a job's progress (for metrics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct PinProgress {
    /// Bytes pinned so far.
    pub pinned_bytes: u64,
    /// Chunks whose registration failed (left pageable).
    pub failed_chunks: u64,
    /// Chunks settled (pinned or failed).
    pub settled_chunks: u64,
    /// All chunks.
    pub total_chunks: u64,
}

/// The function that registers one chunk (`CudaPinner::pin` in production).
pub type RegisterFn = Arc<dyn Fn(*mut u8, usize) -> Result<()> + Send + Sync>;

struct Shared {
    base: usize,
    len: usize,
    chunk: usize,
    states: Mutex<Vec<ChunkState>>,
    cond: Condvar,
    pinned_bytes: AtomicU64,
    failed_chunks: AtomicU64,
    cancel: AtomicBool,
    /// Chunks the thread may register before [`PinningJob::release`].
    allowed: AtomicUsize,
}

/// Registers an arena chunk by chunk on a background thread.
pub struct PinningJob {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    /// Unregisters the pinned chunks when the job is dropped.
    unpin_on_drop: Option<RegisterFn>,
}

impl PinningJob {
    /// Starts registering `[base, base+len)` in `chunk`-byte pieces (the last
    /// one shorter) with `register`.
    ///
    /// # Safety
    /// The range must stay mapped until the job has finished (or was
    /// dropped) and, for chunks it pinned, until they are unpinned
    /// ([`PinningJob::unpin_all`]).
    pub unsafe fn start(
        base: *mut u8,
        len: usize,
        chunk: usize,
        register: RegisterFn,
    ) -> Result<PinningJob> {
        Self::start_held(base, len, chunk, register, usize::MAX)
    }

    /// [`PinningJob::start`], registering only the first `first` chunks
    /// until [`PinningJob::release`] is called. (vLLM captures CUDA graphs
    /// right after registering its KV caches; a registration from another
    /// thread during a capture makes the capture fail, so the rest waits.)
    ///
    /// # Safety
    /// As [`PinningJob::start`].
    pub unsafe fn start_held(
        base: *mut u8,
        len: usize,
        chunk: usize,
        register: RegisterFn,
        first: usize,
    ) -> Result<PinningJob> {
        if base.is_null() || len == 0 {
            return Err(Error::invalid("pinning job: empty or NULL range"));
        }
        if chunk == 0 || chunk % 4096 != 0 {
            return Err(Error::invalid(format!(
                "pinning job: chunk of {chunk} bytes is not a positive multiple of 4 KiB"
            )));
        }
        let n = len.div_ceil(chunk);
        let shared = Arc::new(Shared {
            base: base as usize,
            len,
            chunk,
            states: Mutex::new(vec![ChunkState::Pending; n]),
            cond: Condvar::new(),
            pinned_bytes: AtomicU64::new(0),
            failed_chunks: AtomicU64::new(0),
            cancel: AtomicBool::new(false),
            allowed: AtomicUsize::new(first),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("kvpark-pin".into())
            .spawn(move || run(&s, &*register))
            .map_err(|e| Error::internal(format!("pinning job: cannot spawn thread: {e}")))?;
        Ok(PinningJob {
            shared,
            thread: Some(thread),
            unpin_on_drop: None,
        })
    }

    /// Lets the thread register the chunks held back by
    /// [`PinningJob::start_held`].
    pub fn release(&self) {
        let _st = self.shared.states.lock();
        self.shared.allowed.store(usize::MAX, Ordering::SeqCst);
        self.shared.cond.notify_all();
    }

    /// Whether chunks are still held back ([`PinningJob::release`] not called).
    pub fn is_held(&self) -> bool {
        self.shared.allowed.load(Ordering::SeqCst) != usize::MAX
    }

    /// Unregisters every pinned chunk with `unregister` when the job is
    /// dropped (after stopping and joining the thread), so the memory is not
    /// left registered when the arena is unmapped.
    pub fn unpin_on_drop(mut self, unregister: RegisterFn) -> PinningJob {
        self.unpin_on_drop = Some(unregister);
        self
    }

    /// [`PinningJob::start_held`] with a [`CudaPinner`] of device `ordinal`;
    /// the chunks are unregistered when the job is dropped.
    ///
    /// # Safety
    /// As [`PinningJob::start`]; the range stays mapped until the job is dropped.
    pub unsafe fn start_cuda(
        ordinal: i32,
        base: *mut u8,
        len: usize,
        chunk: usize,
        first: usize,
    ) -> Result<PinningJob> {
        let p = CudaPinner::new(ordinal)?;
        let u = p.clone();
        Ok(
            Self::start_held(base, len, chunk, Arc::new(move |a, l| p.pin(a, l)), first)?
                .unpin_on_drop(Arc::new(move |a, l| u.unpin(a, l))),
        )
    }

    fn chunk_range(&self, i: usize) -> (usize, usize) {
        let s = &self.shared;
        let off = i * s.chunk;
        (off, s.chunk.min(s.len - off))
    }

    /// Progress snapshot.
    pub fn progress(&self) -> PinProgress {
        let st = self.shared.states.lock();
        PinProgress {
            pinned_bytes: self.shared.pinned_bytes.load(Ordering::Relaxed),
            failed_chunks: self.shared.failed_chunks.load(Ordering::Relaxed),
            settled_chunks: st.iter().filter(|c| **c != ChunkState::Pending).count() as u64,
            total_chunks: st.len() as u64,
        }
    }

    /// Bytes pinned so far.
    pub fn pinned_bytes(&self) -> u64 {
        self.shared.pinned_bytes.load(Ordering::Relaxed)
    }

    /// Chunks left pageable after a failed registration.
    pub fn failed_chunks(&self) -> u64 {
        self.shared.failed_chunks.load(Ordering::Relaxed)
    }

    /// State of every chunk.
    pub fn states(&self) -> Vec<ChunkState> {
        self.shared.states.lock().clone()
    }

    fn chunks_of(&self, offset: usize, len: usize) -> Result<std::ops::Range<usize>> {
        let s = &self.shared;
        if len == 0 || offset.checked_add(len).map_or(true, |e| e > s.len) {
            return Err(Error::invalid(format!(
                "range {offset}+{len} outside the pinned arena of {} bytes",
                s.len
            )));
        }
        Ok(offset / s.chunk..(offset + len - 1) / s.chunk + 1)
    }

    /// Whether every chunk under `[offset, offset+len)` is pinned.
    pub fn is_pinned(&self, offset: usize, len: usize) -> Result<bool> {
        let r = self.chunks_of(offset, len)?;
        Ok(self.shared.states.lock()[r]
            .iter()
            .all(|c| *c == ChunkState::Pinned))
    }

    /// Whether every chunk under the range is settled (pinned or failed):
    /// the range may then take offloads.
    pub fn is_settled(&self, offset: usize, len: usize) -> Result<bool> {
        let r = self.chunks_of(offset, len)?;
        Ok(self.shared.states.lock()[r]
            .iter()
            .all(|c| *c != ChunkState::Pending))
    }

    /// Waits up to `timeout` for the range to settle; returns whether it did.
    pub fn wait_settled(&self, offset: usize, len: usize, timeout: Duration) -> Result<bool> {
        let r = self.chunks_of(offset, len)?;
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.states.lock();
        loop {
            if st[r.clone()].iter().all(|c| *c != ChunkState::Pending) {
                return Ok(true);
            }
            if self.shared.cond.wait_until(&mut st, deadline).timed_out() {
                return Ok(st[r.clone()].iter().all(|c| *c != ChunkState::Pending));
            }
        }
    }

    /// Whether the background thread has settled every chunk.
    pub fn is_finished(&self) -> bool {
        self.shared
            .states
            .lock()
            .iter()
            .all(|c| *c != ChunkState::Pending)
    }

    /// Tells the thread to stop before its next chunk (waking it if held).
    fn stop(&self) {
        let _st = self.shared.states.lock();
        self.shared.cancel.store(true, Ordering::SeqCst);
        self.shared.cond.notify_all();
    }

    /// Waits for the background thread to finish.
    pub fn join(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Stops registering (chunks not started stay pending), waits for the
    /// thread, then calls `unregister` on every pinned chunk and marks it
    /// pending again. Returns the first unregister error, after trying all.
    pub fn unpin_all(&mut self, unregister: &dyn Fn(*mut u8, usize) -> Result<()>) -> Result<()> {
        self.stop();
        self.join();
        let mut first = None;
        let n = self.shared.states.lock().len();
        for i in 0..n {
            if self.shared.states.lock()[i] != ChunkState::Pinned {
                continue;
            }
            let (off, len) = self.chunk_range(i);
            let addr = (self.shared.base + off) as *mut u8;
            match unregister(addr, len) {
                Ok(()) => {
                    self.shared.states.lock()[i] = ChunkState::Pending;
                    self.shared
                        .pinned_bytes
                        .fetch_sub(len as u64, Ordering::Relaxed);
                }
                Err(e) => {
                    first.get_or_insert(e);
                }
            }
        }
        first.map_or(Ok(()), Err)
    }
}

impl Drop for PinningJob {
    fn drop(&mut self) {
        self.stop();
        self.join();
        if let Some(f) = self.unpin_on_drop.take() {
            if let Err(e) = self.unpin_all(&*f) {
                log::error!("kvpark: unpinning the host arena: {e}");
            }
        }
    }
}

fn run(s: &Shared, register: &(dyn Fn(*mut u8, usize) -> Result<()> + Send + Sync)) {
    let n = s.len.div_ceil(s.chunk);
    for i in 0..n {
        {
            let mut st = s.states.lock();
            while i >= s.allowed.load(Ordering::SeqCst) && !s.cancel.load(Ordering::SeqCst) {
                s.cond.wait(&mut st);
            }
        }
        if s.cancel.load(Ordering::SeqCst) {
            break;
        }
        let off = i * s.chunk;
        let len = s.chunk.min(s.len - off);
        // A panic in the registration leaves the chunk pageable, like an
        // error: offloads go on, and waiters see the chunk settled.
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            register((s.base + off) as *mut u8, len)
        }))
        .unwrap_or_else(|_| Err(Error::internal("the registration panicked")));
        let state = match res {
            Ok(()) => {
                s.pinned_bytes.fetch_add(len as u64, Ordering::Relaxed);
                ChunkState::Pinned
            }
            Err(e) => {
                s.failed_chunks.fetch_add(1, Ordering::Relaxed);
                log::warn!(
                    "kvpark: pinning host arena chunk {i} ({len} bytes at offset {off}) failed, \
                     using it as pageable memory (slower transfers): {e}"
                );
                ChunkState::Pageable(e.to_string())
            }
        };
        s.states.lock()[i] = state;
        s.cond.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex as StdMutex;

    #[test]
    fn chunks_register_front_to_back_with_progress() {
        let mut arena = vec![0u8; 10 * 4096 + 100];
        let base = arena.as_mut_ptr();
        let seen = Arc::new(StdMutex::new(Vec::new()));
        let s2 = seen.clone();
        let b = base as usize;
        let reg: RegisterFn = Arc::new(move |a, l| {
            s2.lock().unwrap().push((a as usize - b, l));
            Ok(())
        });
        let mut job = unsafe { PinningJob::start(base, arena.len(), 4 * 4096, reg) }.unwrap();
        job.join();
        assert_eq!(
            *seen.lock().unwrap(),
            vec![(0, 16384), (16384, 16384), (32768, 2 * 4096 + 100)]
        );
        let p = job.progress();
        assert_eq!(p.pinned_bytes, arena.len() as u64);
        assert_eq!(
            (p.failed_chunks, p.settled_chunks, p.total_chunks),
            (0, 3, 3)
        );
        assert!(job.is_pinned(0, arena.len()).unwrap());
        assert!(job.is_pinned(arena.len(), 1).is_err());
        // unpin gives back every pinned chunk exactly once
        let un = StdMutex::new(Vec::new());
        job.unpin_all(&|a, l| {
            un.lock().unwrap().push((a as usize - b, l));
            Ok(())
        })
        .unwrap();
        assert_eq!(*un.lock().unwrap(), *seen.lock().unwrap());
        assert_eq!(job.pinned_bytes(), 0);
    }

    #[test]
    fn a_registration_that_panics_leaves_its_chunk_pageable_and_the_rest_pinned() {
        let mut arena = vec![0u8; 3 * 8192];
        let base = arena.as_mut_ptr();
        let b = base as usize;
        let reg: RegisterFn = Arc::new(move |a, _| {
            if a as usize - b == 0 {
                panic!("injected: registration panics");
            }
            Ok(())
        });
        let mut job = unsafe { PinningJob::start(base, arena.len(), 8192, reg) }.unwrap();
        // nobody waits forever for the chunk whose registration panicked
        assert!(job
            .wait_settled(0, arena.len(), Duration::from_secs(10))
            .unwrap());
        job.join();
        assert_eq!(job.failed_chunks(), 1);
        assert_eq!(job.pinned_bytes(), 2 * 8192);
        assert!(matches!(&job.states()[0], ChunkState::Pageable(m) if m.contains("panicked")));
        job.unpin_all(&|_, _| Ok(())).unwrap();
    }

    #[test]
    fn a_failed_chunk_stays_pageable_and_is_counted() {
        let mut arena = vec![0u8; 4 * 8192];
        let base = arena.as_mut_ptr();
        let b = base as usize;
        let reg: RegisterFn = Arc::new(move |a, _| {
            if a as usize - b == 8192 {
                Err(Error::cuda("cuMemHostRegister: out of memory"))
            } else {
                Ok(())
            }
        });
        let mut job = unsafe { PinningJob::start(base, arena.len(), 8192, reg) }.unwrap();
        job.join();
        assert_eq!(job.failed_chunks(), 1);
        assert_eq!(job.pinned_bytes(), 3 * 8192);
        let st = job.states();
        assert_eq!(st[0], ChunkState::Pinned);
        assert!(matches!(&st[1], ChunkState::Pageable(m) if m.contains("out of memory")));
        // settled (usable, pageable) but not pinned
        assert!(job.is_settled(8192, 8192).unwrap());
        assert!(!job.is_pinned(0, 2 * 8192).unwrap());
        assert!(job.is_pinned(2 * 8192, 2 * 8192).unwrap());
        // unpin skips the failed chunk
        let calls = StdMutex::new(0);
        job.unpin_all(&|_, _| {
            *calls.lock().unwrap() += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(*calls.lock().unwrap(), 3);
    }

    #[test]
    fn offloads_are_admitted_as_chunks_come_online() {
        let mut arena = vec![0u8; 3 * 4096];
        let base = arena.as_mut_ptr();
        let gate = Arc::new((StdMutex::new(0usize), std::sync::Condvar::new()));
        let g2 = gate.clone();
        // chunk i registers only once the test has released i+1 chunks
        let reg: RegisterFn = Arc::new(move |_, _| {
            let (m, c) = &*g2;
            let mut released = m.lock().unwrap();
            while *released == 0 {
                released = c.wait(released).unwrap();
            }
            *released -= 1;
            Ok(())
        });
        let job = unsafe { PinningJob::start(base, arena.len(), 4096, reg) }.unwrap();
        assert!(!job.is_settled(0, 4096).unwrap());
        assert!(!job
            .wait_settled(0, 4096, Duration::from_millis(20))
            .unwrap());
        let release = |n| {
            let (m, c) = &*gate;
            *m.lock().unwrap() += n;
            c.notify_all();
        };
        release(1);
        assert!(job.wait_settled(0, 4096, Duration::from_secs(10)).unwrap());
        assert!(job.is_pinned(0, 4096).unwrap());
        assert!(
            !job.is_settled(0, 2 * 4096).unwrap(),
            "chunk 1 still pending"
        );
        assert_eq!(job.pinned_bytes(), 4096);
        release(2);
        assert!(job
            .wait_settled(0, 3 * 4096, Duration::from_secs(10))
            .unwrap());
        assert!(job.is_finished());
    }

    #[test]
    fn bad_arguments_are_errors() {
        let mut a = vec![0u8; 4096];
        let reg: RegisterFn = Arc::new(|_, _| Ok(()));
        assert!(unsafe { PinningJob::start(a.as_mut_ptr(), 4096, 1000, reg.clone()) }.is_err());
        assert!(
            unsafe { PinningJob::start(std::ptr::null_mut(), 4096, 4096, reg.clone()) }.is_err()
        );
        assert!(unsafe { PinningJob::start(a.as_mut_ptr(), 0, 4096, reg) }.is_err());
    }

    #[test]
    fn held_chunks_wait_for_release() {
        let mut arena = vec![0u8; 4 * 4096];
        let base = arena.as_mut_ptr();
        let b0 = base as usize;
        let calls = Arc::new(Mutex::new(Vec::new()));
        let c = calls.clone();
        let reg: RegisterFn = Arc::new(move |a, _| {
            c.lock().push(a as usize - b0);
            Ok(())
        });
        let job = unsafe { PinningJob::start_held(base, arena.len(), 4096, reg, 1) }.unwrap();
        assert!(job.wait_settled(0, 4096, Duration::from_secs(10)).unwrap());
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            *calls.lock(),
            vec![0],
            "only the first chunk before release"
        );
        assert!(job.is_held() && !job.is_finished());
        job.release();
        assert!(job
            .wait_settled(0, 4 * 4096, Duration::from_secs(10))
            .unwrap());
        assert_eq!(*calls.lock(), vec![0, 4096, 2 * 4096, 3 * 4096]);
        assert!(!job.is_held());
        // a job dropped while held stops without registering the rest
        let calls2 = Arc::new(Mutex::new(0usize));
        let c2 = calls2.clone();
        let reg: RegisterFn = Arc::new(move |_, _| {
            *c2.lock() += 1;
            Ok(())
        });
        let job = unsafe { PinningJob::start_held(base, arena.len(), 4096, reg, 2) }.unwrap();
        assert!(job
            .wait_settled(0, 2 * 4096, Duration::from_secs(10))
            .unwrap());
        drop(job);
        assert_eq!(*calls2.lock(), 2);
    }

    #[test]
    fn dropping_the_job_unpins_what_it_pinned() {
        let mut arena = vec![0u8; 5 * 4096];
        let base = arena.as_mut_ptr();
        let b0 = base as usize;
        // chunk 1 fails to pin; 0, 2 (and the short 3rd... here 4) pin
        let reg: RegisterFn = Arc::new(move |a, _| {
            if a as usize == b0 + 2 * 4096 {
                Err(Error::cuda("refused"))
            } else {
                Ok(())
            }
        });
        let unpinned = Arc::new(Mutex::new(Vec::new()));
        let u = unpinned.clone();
        let mut job = unsafe { PinningJob::start(base, arena.len(), 2 * 4096, reg) }
            .unwrap()
            .unpin_on_drop(Arc::new(move |a, l| {
                u.lock().push((a as usize - b0, l));
                Ok(())
            }));
        job.join();
        assert_eq!(job.pinned_bytes(), 3 * 4096);
        drop(job);
        // every pinned chunk once, the failed one not at all
        assert_eq!(*unpinned.lock(), vec![(0, 2 * 4096), (4 * 4096, 4096)]);
    }

    #[test]
    fn cuda_pinner_without_driver_is_a_typed_error() {
        match CudaPinner::new(0) {
            Ok(_) => {} // a machine with a driver: covered by the GPU tests
            Err(e) => assert_eq!(e.kind(), crate::ErrorKind::Cuda),
        }
    }
}
