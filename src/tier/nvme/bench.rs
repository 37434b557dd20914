//! NVMe store throughput against raw O_DIRECT I/O on the same file system,
//! measured in the same run (`cargo bench --bench nvme`, `kvpark bench`).
//!
//! For each record size (2, 4, 8, 16 MiB; codec `none`, so the disk is what
//! is measured) the store writes then reads `total` bytes on the paths the
//! mover uses, from and into 4 KiB-aligned buffers (as host-arena slots
//! are): writes through `submit_put_raw` (zero copy, 2 I/O threads, up to 4
//! requests submitted), reads through `get` from 2 threads (zero copy, as the
//! loader's `pin_for_load`). The baseline writes and reads the same byte
//! count in the same record sizes to one plain file with O_DIRECT from 2
//! threads (so both sides have 2 requests at the device at a time). Both
//! count payload bytes only: the store's 4 KiB header block per record and
//! its checksum count against it. Each write run starts from a fresh
//! file; buffers are prepared before the clock starts and opening, closing
//! and deleting files are outside the timed region, for both sides. Measured
//! and baseline runs alternate (and swap which goes first every round) so
//! both see the same machine load, and the best run of each is kept (as
//! `benchkit::paired` does). Files are deleted afterwards.
//!
//! On a virtual disk the host may cache what the guest wrote, so O_DIRECT
//! reads can run at memory speed; the figures then measure the CPU cost of
//! the store (its crc32c pass, reported as its own figure) more than the disk.

use super::aligned::AlignedBuf;
use super::{FsyncPolicy, NvmeConfig, NvmeStore};
use crate::benchkit::Figure;
use crate::block::BlockKey;
use crate::codec::CodecTag;
use crate::error::{Error, Result, ResultExt};
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

const THREADS: usize = 2;
const QUEUE: usize = 4;

struct Cleanup(PathBuf);
impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn key(i: u64) -> BlockKey {
    BlockKey::derive(b"bench", &i.to_le_bytes())
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut s = seed | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 32) as u8
        })
        .collect()
}

fn open_store(dir: &Path) -> Result<NvmeStore> {
    let mut cfg = NvmeConfig::new(dir, 0, u64::MAX / 2);
    cfg.io_threads = THREADS;
    cfg.queue_depth = QUEUE;
    cfg.fsync = FsyncPolicy::Never;
    cfg.codec = CodecTag::None;
    NvmeStore::open(cfg)
}

/// Writes `n` records through `submit_put_raw` (zero copy, as the mover
/// demotes a host slot) from the aligned `src` buffers, at most one request
/// per buffer in flight.
fn store_write(store: &NvmeStore, n: u64, len: usize, src: &[AlignedBuf]) -> Result<()> {
    let rx = store.completions();
    let (mut sent, mut done) = (0u64, 0u64);
    // Which buffer each ticket reads; a buffer is reused only after its
    // completion arrived.
    let mut free: Vec<usize> = (0..src.len()).collect();
    let mut busy = std::collections::HashMap::new();
    let mut first_err = None;
    while done < sent || (sent < n && first_err.is_none()) {
        while sent < n && first_err.is_none() {
            let Some(b) = free.pop() else { break };
            // SAFETY: `src[b]` outlives this function and is not written
            // while the request is in flight: it is back in `free` only
            // after its completion, and every submitted request's completion
            // is received before returning (the loop runs while done < sent).
            let t =
                unsafe { store.submit_put_raw(key(sent), 1, sent as u32, src[b].as_ptr(), len) };
            match t {
                Ok(t) => {
                    busy.insert(t, b);
                    sent += 1;
                }
                Err(e) => {
                    free.push(b);
                    first_err = Some(e);
                }
            }
        }
        if done == sent {
            break;
        }
        let c = rx
            .recv()
            .map_err(|_| Error::internal("bench: completion channel closed"))?;
        if let Some(b) = busy.remove(&c.ticket) {
            free.push(b);
        }
        done += 1;
        if let Err(e) = c.result {
            first_err.get_or_insert(e);
        }
    }
    first_err.map_or(Ok(()), Err)
}

/// Reads back `n` records with `get` from one thread per aligned buffer
/// (zero copy, as the loader reads into a host slot), checking the first bytes.
fn store_read(
    store: &NvmeStore,
    n: u64,
    len: usize,
    bufs: &mut [AlignedBuf],
    data: &[u8],
) -> Result<()> {
    let next = AtomicU64::new(0);
    std::thread::scope(|s| {
        let hs: Vec<_> = bufs
            .iter_mut()
            .map(|buf| {
                let next = &next;
                s.spawn(move || -> Result<()> {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= n {
                            return Ok(());
                        }
                        store.get(&key(i), &mut buf[..len])?;
                        if buf[..64] != data[..64] {
                            return Err(Error::internal("bench: store read back different bytes"));
                        }
                    }
                })
            })
            .collect();
        hs.into_iter().try_for_each(|h| {
            h.join()
                .map_err(|_| Error::internal("bench: store read thread panicked"))?
        })
    })
}

fn open_raw(path: &Path) -> Result<(File, bool)> {
    let mut o = OpenOptions::new();
    o.read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600);
    match o
        .clone()
        .custom_flags(libc::O_DIRECT | libc::O_NOFOLLOW)
        .open(path)
    {
        Ok(f) => Ok((f, true)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok((
            o.custom_flags(libc::O_NOFOLLOW)
                .open(path)
                .ctx(format!("bench: open {}", path.display()))?,
            false,
        )),
        Err(e) => Err(Error::from(e).context(format!("bench: open {}", path.display()))),
    }
}

/// Raw positional I/O on one file, `n` records of `len` bytes, one thread per
/// buffer in `bufs`.
fn raw_io(file: &File, n: u64, len: usize, write: bool, bufs: &mut [AlignedBuf]) -> Result<()> {
    let next = AtomicU64::new(0);
    std::thread::scope(|s| {
        let hs: Vec<_> = bufs
            .iter_mut()
            .map(|buf| {
                let next = &next;
                s.spawn(move || -> Result<()> {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= n {
                            return Ok(());
                        }
                        let off = i * len as u64;
                        if write {
                            file.write_all_at(&buf[..len], off)
                                .ctx("bench: raw write")?;
                        } else {
                            file.read_exact_at(&mut buf[..len], off)
                                .ctx("bench: raw read")?;
                        }
                    }
                })
            })
            .collect();
        hs.into_iter().try_for_each(|h| {
            h.join()
                .map_err(|_| Error::internal("bench: raw I/O thread panicked"))?
        })
    })
}

fn timed(bytes: u64, f: impl FnOnce() -> Result<()>) -> Result<f64> {
    let t = Instant::now();
    f()?;
    Ok(bytes as f64 / t.elapsed().as_secs_f64().max(1e-9))
}

/// Runs the NVMe figures in a scratch directory under `dir` (deleted after).
/// `quick` = 128 MiB per figure and two rounds instead of 512 MiB and three.
pub fn bench_nvme(dir: &Path, quick: bool) -> Result<Vec<Figure>> {
    let root = dir.join(format!("kvpark-nvme-bench-{}", std::process::id()));
    fs::create_dir_all(&root).ctx(format!("bench: create {}", root.display()))?;
    let _cleanup = Cleanup(root.clone());
    let total: u64 = if quick { 128 << 20 } else { 512 << 20 };
    let rounds = if quick { 2 } else { 3 };
    let mut figures = Vec::new();
    let mut run = 0u32;
    for mib in [2usize, 4, 8, 16] {
        let len = mib << 20;
        let n = total / len as u64;
        let bytes = n * len as u64;
        let data = pattern(len, mib as u64);
        // Buffers are prepared once, outside the timed regions, for both sides.
        let aligned = |k: usize| {
            (0..k)
                .map(|_| {
                    let mut b = AlignedBuf::new(len)?;
                    b[..len].copy_from_slice(&data);
                    Ok(b)
                })
                .collect::<Result<Vec<_>>>()
        };
        let put_bufs = aligned(QUEUE)?;
        let mut get_bufs = aligned(THREADS)?;
        let mut raw_bufs = (0..THREADS)
            .map(|_| {
                let mut b = AlignedBuf::new(len)?;
                b[..len].copy_from_slice(&data);
                Ok(b)
            })
            .collect::<Result<Vec<_>>>()?;
        let (mut direct_store, mut direct_raw) = (true, true);
        let (mut w_store, mut w_raw) = (0f64, 0f64);
        // Writes: every run on a fresh store / fresh file; open, close and
        // delete are outside the timed region. Runs alternate.
        for round in 0..rounds {
            run += 1;
            // Alternate which side goes first, so neither always runs on
            // the disk state (and host cache) the other one left.
            for side in [round % 2, 1 - round % 2] {
                if side == 0 {
                    let d = root.join(format!("w{run}"));
                    let store = open_store(&d)?;
                    direct_store &= store.is_direct();
                    w_store = w_store.max(timed(bytes, || store_write(&store, n, len, &put_bufs))?);
                    store.close()?;
                    drop(store);
                    fs::remove_dir_all(&d).ctx("bench: remove store")?;
                } else {
                    let p = root.join("raw-w");
                    let (f, direct) = open_raw(&p)?;
                    direct_raw &= direct;
                    w_raw = w_raw.max(timed(bytes, || raw_io(&f, n, len, true, &mut raw_bufs))?);
                    drop(f);
                    fs::remove_file(&p).ctx("bench: remove raw file")?;
                }
            }
        }

        // Reads: one written store and one written file (written in turn),
        // read alternately.
        let rp = root.join("raw-r");
        let (rf, d2) = open_raw(&rp)?;
        direct_raw &= d2;
        raw_io(&rf, n, len, true, &mut raw_bufs)?;
        let rd = root.join("r");
        let store = open_store(&rd)?;
        store_write(&store, n, len, &put_bufs)?;
        let (mut r_store, mut r_raw) = (0f64, 0f64);
        for round in 0..rounds + 2 {
            for side in [round % 2, 1 - round % 2] {
                if side == 0 {
                    r_store = r_store.max(timed(bytes, || {
                        store_read(&store, n, len, &mut get_bufs, &data)
                    })?);
                } else {
                    r_raw = r_raw.max(timed(bytes, || raw_io(&rf, n, len, false, &mut raw_bufs))?);
                }
            }
        }
        drop(store);
        drop(rf);
        let _ = fs::remove_dir_all(&rd);
        let _ = fs::remove_file(&rp);

        let note = |direct: bool| {
            if direct {
                "O_DIRECT".to_string()
            } else {
                "buffered: O_DIRECT refused".to_string()
            }
        };
        figures.push(Figure {
            name: format!(
                "nvme store write {mib} MiB recs (submit_put_raw, aligned zero-copy; {})",
                note(direct_store)
            ),
            bytes_per_s: w_store,
            baseline: format!("raw write 2 thr ({})", note(direct_raw)),
            baseline_bytes_per_s: w_raw,
        });
        figures.push(Figure {
            name: format!(
                "nvme store read {mib} MiB recs (get into aligned buf, zero-copy; {})",
                note(direct_store)
            ),
            bytes_per_s: r_store,
            baseline: format!("raw read 2 thr ({})", note(direct_raw)),
            baseline_bytes_per_s: r_raw,
        });
    }
    // What the store adds per byte on the CPU on its zero-copy paths: one
    // crc32c pass over the payload, against a plain memcpy of the same bytes.
    let len = 16 << 20;
    let src = pattern(len, 99);
    let mut dst2 = vec![0u8; len];
    let mut sink = 0u32;
    let (fused, copy) = crate::benchkit::paired(
        len as u64,
        if quick { 2 } else { 5 },
        std::time::Duration::from_millis(if quick { 50 } else { 200 }),
        || sink ^= crc32c::crc32c(std::hint::black_box(&src)),
        || dst2.copy_from_slice(std::hint::black_box(&src)),
    );
    std::hint::black_box(sink);
    figures.push(Figure {
        name: "crc32c 16 MiB (store CPU cost, zero-copy paths)".into(),
        bytes_per_s: fused,
        baseline: "memcpy 16 MiB".into(),
        baseline_bytes_per_s: copy,
    });
    Ok(figures)
}
