//! Background job threads of the mover: the loader (async loads: NVMe
//! reads, decode, scatter) and the saver (the step's saves: gathers from
//! vLLM into the host tier; and its tier moves: promotions read NVMe and
//! decode), so that no vLLM hook waits for them.
//!
//! Every job ends in a result the step can report, whatever happens to it:
//!
//! - A job that panics is caught (`catch_unwind` per job): the thread
//!   reports the job failed (a load: all its blocks failed; a save: every
//!   block failed) and goes on with the next job.
//! - A thread that died (a panic outside a job) drops its end of the done
//!   channel; the mover sees the channel disconnected and fails every job
//!   it handed out and never heard back from; later jobs fail at once
//!   ([`JobThread::submit`] refuses them).
//!
//! So vLLM always gets a request back in `finished_recving` /
//! `finished_sending` (with failed block ids for loads, recomputed), never
//! a request waiting forever.

use super::Registered;
use crate::block::BlockKey;
use crate::error::{Error, ErrorKind, Result};
use crate::index::BlockState;
use crate::plan::{LoadDone, LoadReq, MoveKind, SaveDone, SaveReq};
use crossbeam_channel::{Receiver, Sender, TryRecvError};
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;

/// A fault injected into the mover's threads, for tests only.
///
/// Read once from the environment variable `KVPARK_FAULT` when a mover is
/// created ([`Fault::from_env`]); Rust tests set it on the mover with
/// `Mover::inject_fault` instead (the environment is shared by the
/// tests of one process). The environment is the one way into a worker
/// that vLLM starts in its own process without adding a config key that
/// users would see; read once, it costs nothing on the hot path.
///
/// | `KVPARK_FAULT`  | effect                                                       |
/// |-----------------|--------------------------------------------------------------|
/// | `loader_panic`  | every async load job panics before it touches a block        |
/// | `loader_die`    | the loader thread panics outside its job loop at its first job (the thread dies) |
/// | `saver_panic`   | every save job panics before it touches a block              |
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Fault {
    /// No fault (production).
    #[default]
    None,
    /// Each loader job panics.
    LoaderPanic,
    /// The loader thread dies at its first job.
    LoaderDie,
    /// Each save job panics.
    SaverPanic,
}

impl Fault {
    /// The environment variable read by [`Fault::from_env`].
    pub const ENV: &'static str = "KVPARK_FAULT";

    /// Parses a `KVPARK_FAULT` value (empty: none).
    pub fn parse(v: &str) -> Result<Self> {
        Ok(match v.trim() {
            "" | "none" => Fault::None,
            "loader_panic" => Fault::LoaderPanic,
            "loader_die" => Fault::LoaderDie,
            "saver_panic" => Fault::SaverPanic,
            other => {
                return Err(Error::config(format!(
                    "{}={other:?}: unknown test fault (loader_panic, loader_die, saver_panic)",
                    Self::ENV
                )))
            }
        })
    }

    /// The fault named by `KVPARK_FAULT`, if set.
    pub fn from_env() -> Result<Self> {
        match std::env::var(Self::ENV) {
            Ok(v) => Self::parse(&v),
            Err(std::env::VarError::NotPresent) => Ok(Fault::None),
            Err(e) => Err(Error::config(format!("{}: {e}", Self::ENV))),
        }
    }
}

/// Nice value of the loader and saver threads. Their work is throughput
/// (copies and disk I/O vLLM does not wait for), the engine's threads are
/// latency: when cores are short, the step (and on vLLM's CPU backend the
/// forward's own threads) should run first. On idle cores the nice value
/// changes nothing. The layer thread, whose copies a forward waits for,
/// keeps the default priority.
const BACKGROUND_NICE: libc::c_int = 10;

/// Lowers the calling thread's scheduling priority to [`BACKGROUND_NICE`]
/// (on Linux the nice value is per thread). Best effort: raising one's
/// nice value needs no privilege, and a failure leaves the default.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: plain syscalls on the calling thread's id.
    unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, BACKGROUND_NICE);
    }
}

/// How a job thread treats one job.
pub(super) trait JobKind: Send + 'static {
    /// A job.
    type Job: Clone + Send + 'static;
    /// Its outcome.
    type Done: Send + 'static;
    /// Thread name.
    const NAME: &'static str;
    /// Runs one job.
    fn run(&self, job: &Self::Job) -> Self::Done;
    /// The outcome of a job that panicked (cleaning up what it can).
    fn panicked(&self, job: &Self::Job) -> Self::Done;
    /// The outcome of a job whose thread died before answering (called on
    /// the step's thread; nothing may be cleaned up that the dead thread
    /// might have held).
    fn lost(job: &Self::Job) -> Self::Done;
    /// Panics here to inject a fault in a job (tests).
    fn fault_in_job(&self) -> bool {
        false
    }
    /// Panics here to kill the thread (tests).
    fn fault_kills_thread(&self) -> bool {
        false
    }
    /// Counts a caught panic.
    fn count_panic(&self);
}

/// One background thread running jobs of kind `K` in order.
pub(super) struct JobThread<K: JobKind> {
    jobs: Option<Sender<(u64, K::Job)>>,
    done: Receiver<(u64, K::Done)>,
    /// Jobs handed out and not answered yet (to fail them if the thread dies).
    pending: HashMap<u64, K::Job>,
    next: u64,
    dead: bool,
    thread: Option<JoinHandle<()>>,
}

impl<K: JobKind> JobThread<K> {
    /// Starts the thread.
    pub(super) fn spawn(kind: K) -> Result<Self> {
        let (jtx, jrx) = crossbeam_channel::unbounded::<(u64, K::Job)>();
        let (dtx, drx) = crossbeam_channel::unbounded::<(u64, K::Done)>();
        let thread = std::thread::Builder::new()
            .name(K::NAME.into())
            .spawn(move || {
                lower_priority();
                for (id, job) in jrx {
                    if kind.fault_kills_thread() {
                        panic!("kvpark: {}: injected fault (KVPARK_FAULT)", K::NAME);
                    }
                    let out = catch_unwind(AssertUnwindSafe(|| {
                        if kind.fault_in_job() {
                            panic!("kvpark: {} job: injected fault (KVPARK_FAULT)", K::NAME);
                        }
                        kind.run(&job)
                    }));
                    let out = match out {
                        Ok(d) => d,
                        Err(_) => {
                            kind.count_panic();
                            log::error!(
                                "kvpark: a {} job panicked; its blocks are reported failed",
                                K::NAME
                            );
                            kind.panicked(&job)
                        }
                    };
                    if dtx.send((id, out)).is_err() {
                        break;
                    }
                }
            })
            .map_err(|e| Error::new(ErrorKind::Io, format!("spawn {} thread: {e}", K::NAME)))?;
        Ok(JobThread {
            jobs: Some(jtx),
            done: drx,
            pending: HashMap::new(),
            next: 0,
            dead: false,
            thread: Some(thread),
        })
    }

    /// Hands `job` to the thread; gives it back when the thread is gone.
    pub(super) fn submit(&mut self, job: K::Job) -> std::result::Result<(), K::Job> {
        if self.dead {
            return Err(job);
        }
        let Some(tx) = &self.jobs else {
            return Err(job);
        };
        self.next += 1;
        let id = self.next;
        match tx.send((id, job.clone())) {
            Ok(()) => {
                self.pending.insert(id, job);
                Ok(())
            }
            Err(e) => {
                self.mark_dead();
                Err(e.into_inner().1)
            }
        }
    }

    /// Outcomes of the jobs answered since the last call, in order; when
    /// the thread died, also every job it never answered (failed).
    pub(super) fn poll(&mut self) -> Vec<K::Done> {
        let mut out = Vec::new();
        loop {
            match self.done.try_recv() {
                Ok((id, d)) => {
                    self.pending.remove(&id);
                    out.push(d);
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    self.mark_dead();
                    let mut lost: Vec<(u64, K::Job)> = self.pending.drain().collect();
                    lost.sort_by_key(|l| l.0);
                    out.extend(lost.iter().map(|l| K::lost(&l.1)));
                    break;
                }
            }
        }
        out
    }

    fn mark_dead(&mut self) {
        if !self.dead {
            self.dead = true;
            log::error!(
                "kvpark: the {} thread has stopped; its work fails from now on (vLLM recomputes)",
                K::NAME
            );
        }
    }

    /// Jobs handed out and not answered yet.
    pub(super) fn pending(&self) -> usize {
        self.pending.len()
    }

    /// The jobs handed out and not answered yet.
    pub(super) fn pending_jobs(&self) -> impl Iterator<Item = &K::Job> {
        self.pending.values()
    }

    /// Whether the thread is known to have stopped.
    pub(super) fn is_dead(&self) -> bool {
        self.dead
    }

    /// Lets the thread finish the queued jobs and joins it.
    pub(super) fn shutdown(&mut self) {
        drop(self.jobs.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl<K: JobKind> Drop for JobThread<K> {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The loader: async loads (NVMe reads and decode into the host tier, then
/// the scatter into vLLM's blocks), reported in `finished_recving`.
pub(super) struct LoaderKind {
    pub(super) reg: Arc<Registered>,
    pub(super) fault: Fault,
}

/// A load that did not run: every block failed (vLLM recomputes them).
fn all_failed(l: &LoadReq) -> (LoadDone, Vec<u32>) {
    (
        LoadDone {
            req_id: l.req_id.clone(),
            failed: l.blocks.iter().map(|b| b.0).collect(),
        },
        l.blocks.iter().map(|b| b.1).collect(),
    )
}

impl JobKind for LoaderKind {
    type Job = LoadReq;
    type Done = (LoadDone, Vec<u32>);
    const NAME: &'static str = "kvpark-loader";

    fn run(&self, job: &LoadReq) -> Self::Done {
        self.reg.load(job)
    }

    fn panicked(&self, job: &LoadReq) -> Self::Done {
        // Blocks the job pinned before it panicked stay pinned (kept, never
        // overwritten): a leak of host slots, never wrong KV.
        self.reg
            .metrics
            .load_failed_blocks
            .fetch_add(job.blocks.len() as u64, Ordering::Relaxed);
        all_failed(job)
    }

    fn lost(job: &LoadReq) -> Self::Done {
        all_failed(job)
    }

    fn fault_in_job(&self) -> bool {
        self.fault == Fault::LoaderPanic
    }

    fn fault_kills_thread(&self) -> bool {
        self.fault == Fault::LoaderDie
    }

    fn count_panic(&self) {
        self.reg.metrics.job_panics.fetch_add(1, Ordering::Relaxed);
    }
}

/// A job of the saver thread, run in the order the step's plan gave them.
#[derive(Clone, Debug)]
pub(super) enum SaverJob {
    /// Park a finished request's blocks (gather from vLLM).
    Save(SaveReq),
    /// The step's tier moves (after its saves).
    Moves(Vec<(MoveKind, BlockKey)>),
}

/// The saver: the step's saves (gathers from vLLM into the host tier,
/// write-behind to NVMe) and tier moves (promotions read NVMe and decode),
/// saves reported in `finished_sending`. vLLM keeps a finished request's
/// blocks until then (`delay_free`), so gathering them later is safe.
pub(super) struct SaverKind {
    pub(super) reg: Arc<Registered>,
    pub(super) fault: Fault,
}

/// A save that did not run: every block failed (nothing parked).
fn save_failed(s: &SaveReq) -> SaveDone {
    SaveDone {
        req_id: s.req_id.clone(),
        ok: vec![],
        failed: s.blocks.iter().map(|b| b.0).collect(),
    }
}

impl JobKind for SaverKind {
    type Job = SaverJob;
    type Done = Option<SaveDone>;
    const NAME: &'static str = "kvpark-saver";

    fn run(&self, job: &SaverJob) -> Self::Done {
        match job {
            SaverJob::Save(s) => Some(self.reg.save(s)),
            SaverJob::Moves(moves) => {
                for &(kind, key) in moves {
                    self.reg.apply_move(kind, key);
                }
                None
            }
        }
    }

    fn panicked(&self, job: &SaverJob) -> Self::Done {
        let SaverJob::Save(s) = job else {
            return None;
        };
        // Blocks the save had begun and not finished go back to the free
        // slots (no other thread saves, so a `Saving` block of this request
        // is this job's).
        for &(key, _, _) in &s.blocks {
            let mut idx = self.reg.index.lock();
            if idx.get(&key).map(|e| e.state) == Some(BlockState::Saving) {
                if let Ok(Some(slot)) = idx.finish_save(&key, false) {
                    drop(idx);
                    let _ = self.reg.free_slot(slot);
                }
            }
        }
        self.reg
            .metrics
            .save_failed_blocks
            .fetch_add(s.blocks.len() as u64, Ordering::Relaxed);
        Some(save_failed(s))
    }

    fn lost(job: &SaverJob) -> Self::Done {
        match job {
            SaverJob::Save(s) => Some(save_failed(s)),
            SaverJob::Moves(_) => None,
        }
    }

    fn fault_in_job(&self) -> bool {
        self.fault == Fault::SaverPanic
    }

    fn count_panic(&self) {
        self.reg.metrics.job_panics.fetch_add(1, Ordering::Relaxed);
    }
}
