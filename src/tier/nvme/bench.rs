//! NVMe store throughput against raw O_DIRECT I/O on the same file system,
//! measured in the same run (`cargo bench --bench nvme`, `kvpark bench`).
//!
//! For each record size (2, 4, 8, 16 MiB; codec `none`, so the disk is what
//! is measured) the store writes then reads `total` bytes through
//! `submit_put` / `submit_get_into` with 2 I/O threads and up to 4 requests
//! submitted. The baseline writes and reads the same byte count in the same
//! record sizes to one plain file with O_DIRECT from 2 threads (so both sides
//! have 2 requests at the device at a time). Both count payload bytes only:
//! the store's 4 KiB header block per record, its checksum and its copy into
//! an aligned buffer count against it. Each write run starts from a fresh
//! file; measured and baseline runs alternate (`benchkit::paired`) and the
//! best run of each is kept. Files are deleted afterwards.

use super::aligned::AlignedBuf;
use super::{FsyncPolicy, NvmeConfig, NvmeStore};
use crate::benchkit::{paired, Figure};
use crate::block::BlockKey;
use crate::codec::CodecTag;
use crate::error::{Error, Result, ResultExt};
use std::cell::RefCell;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

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

/// Writes `n` records of `data.len()` bytes through the async API.
fn store_write(store: &NvmeStore, n: u64, data: &[u8]) -> Result<()> {
    let rx = store.completions();
    let mut spare: Vec<Vec<u8>> = (0..QUEUE).map(|_| data.to_vec()).collect();
    let (mut sent, mut done) = (0u64, 0u64);
    while done < n {
        while sent < n && !spare.is_empty() {
            let buf = spare.pop().expect("non-empty");
            store.submit_put(key(sent), 1, sent as u32, buf)?;
            sent += 1;
        }
        let c = rx
            .recv()
            .map_err(|_| Error::internal("bench: completion channel closed"))?;
        c.result?;
        spare.push(c.data);
        done += 1;
    }
    Ok(())
}

/// Reads back `n` records, checking the first bytes of each.
fn store_read(store: &NvmeStore, n: u64, len: usize, data: &[u8]) -> Result<()> {
    let rx = store.completions();
    let mut spare: Vec<Vec<u8>> = (0..QUEUE).map(|_| vec![0u8; len]).collect();
    let (mut sent, mut done) = (0u64, 0u64);
    while done < n {
        while sent < n && !spare.is_empty() {
            store.submit_get_into(key(sent), spare.pop().expect("non-empty"))?;
            sent += 1;
        }
        let c = rx
            .recv()
            .map_err(|_| Error::internal("bench: completion channel closed"))?;
        c.result?;
        if c.data[..64] != data[..64] {
            return Err(Error::internal("bench: store read back different bytes"));
        }
        spare.push(c.data);
        done += 1;
    }
    Ok(())
}

fn open_raw(path: &Path, create: bool) -> Result<(File, bool)> {
    let mut o = OpenOptions::new();
    o.read(true).write(true).mode(0o600);
    if create {
        o.create(true).truncate(true);
    }
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

/// Raw positional I/O on one file from THREADS threads, `n` records of `len`.
fn raw_io(file: &File, n: u64, len: usize, write: bool, src: &[u8]) -> Result<()> {
    let next = AtomicU64::new(0);
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..THREADS)
            .map(|_| {
                s.spawn(|| -> Result<()> {
                    let mut buf = AlignedBuf::new(len)?;
                    buf[..len].copy_from_slice(src);
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

/// Runs the NVMe figures in a scratch directory under `dir` (deleted after).
/// `quick` = 128 MiB per figure and one round instead of 512 MiB and three.
pub fn bench_nvme(dir: &Path, quick: bool) -> Result<Vec<Figure>> {
    let root = dir.join(format!("kvpark-nvme-bench-{}", std::process::id()));
    fs::create_dir_all(&root).ctx(format!("bench: create {}", root.display()))?;
    let _cleanup = Cleanup(root.clone());
    let total: u64 = if quick { 128 << 20 } else { 512 << 20 };
    let rounds = if quick { 1 } else { 3 };
    let mut figures = Vec::new();
    let mut run = 0u32;
    for mib in [2usize, 4, 8, 16] {
        let len = mib << 20;
        let n = total / len as u64;
        let bytes = n * len as u64;
        let data = pattern(len, mib as u64);
        let err: RefCell<Option<Error>> = RefCell::new(None);
        let mut direct_store = true;
        let mut direct_raw = true;

        // Writes: every run on a fresh store / fresh file.
        let (w_store, w_raw) = paired(
            bytes,
            rounds,
            Duration::ZERO,
            || {
                run += 1;
                let d = root.join(format!("w{run}"));
                let r = open_store(&d).and_then(|s| {
                    direct_store &= s.is_direct();
                    store_write(&s, n, &data)?;
                    s.close()
                });
                let _ = fs::remove_dir_all(&d);
                if let Err(e) = r {
                    err.borrow_mut().get_or_insert(e);
                }
            },
            || {
                let p = root.join("raw-w");
                let r = open_raw(&p, true).and_then(|(f, direct)| {
                    direct_raw &= direct;
                    raw_io(&f, n, len, true, &data)
                });
                let _ = fs::remove_file(&p);
                if let Err(e) = r {
                    err.borrow_mut().get_or_insert(e);
                }
            },
        );
        if let Some(e) = err.borrow_mut().take() {
            return Err(e);
        }

        // Reads: one written store and one written file, read repeatedly.
        let rd = root.join("r");
        let store = open_store(&rd)?;
        store_write(&store, n, &data)?;
        let rp = root.join("raw-r");
        let (rf, d2) = open_raw(&rp, true)?;
        direct_raw &= d2;
        raw_io(&rf, n, len, true, &data)?;
        let (r_store, r_raw) = paired(
            bytes,
            rounds,
            Duration::ZERO,
            || {
                if let Err(e) = store_read(&store, n, len, &data) {
                    err.borrow_mut().get_or_insert(e);
                }
            },
            || {
                if let Err(e) = raw_io(&rf, n, len, false, &data) {
                    err.borrow_mut().get_or_insert(e);
                }
            },
        );
        drop(store);
        drop(rf);
        let _ = fs::remove_dir_all(&rd);
        let _ = fs::remove_file(&rp);
        if let Some(e) = err.borrow_mut().take() {
            return Err(e);
        }

        let note = |direct: bool| {
            if direct {
                "O_DIRECT".to_string()
            } else {
                "buffered: O_DIRECT refused".to_string()
            }
        };
        figures.push(Figure {
            name: format!("nvme store write {mib} MiB recs ({})", note(direct_store)),
            bytes_per_s: w_store,
            baseline: format!("raw write 2 thr ({})", note(direct_raw)),
            baseline_bytes_per_s: w_raw,
        });
        figures.push(Figure {
            name: format!("nvme store read {mib} MiB recs ({})", note(direct_store)),
            bytes_per_s: r_store,
            baseline: format!("raw read 2 thr ({})", note(direct_raw)),
            baseline_bytes_per_s: r_raw,
        });
    }
    Ok(figures)
}
