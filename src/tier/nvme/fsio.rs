//! File-system helpers: directories that are never symlinks, files opened
//! with `O_NOFOLLOW`, the O_DIRECT probe, positional reads and writes.

use super::aligned::AlignedBuf;
use super::format::ALIGN;
use crate::error::{Error, Result, ResultExt};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Mode of every directory the store creates.
pub const DIR_MODE: u32 = 0o700;
/// Mode of every file the store creates.
pub const FILE_MODE: u32 = 0o600;

/// Makes sure `dir` is a real directory (not a symlink), creating it (and
/// missing parents) with mode 0700 when `create` is set. A directory the
/// store creates gets exactly 0700 whatever the umask.
pub fn ensure_dir(dir: &Path, create: bool) -> Result<()> {
    match fs::symlink_metadata(dir) {
        Ok(m) if m.file_type().is_symlink() => Err(Error::invalid(format!(
            "nvme: {} is a symlink; refusing to follow it (give the real path)",
            dir.display()
        ))),
        Ok(m) if !m.is_dir() => Err(Error::invalid(format!(
            "nvme: {} exists and is not a directory",
            dir.display()
        ))),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(DIR_MODE)
                .create(dir)
                .ctx(format!("nvme: create directory {}", dir.display()))?;
            fs::set_permissions(dir, fs::Permissions::from_mode(DIR_MODE))
                .ctx(format!("nvme: chmod 0700 {}", dir.display()))?;
            // Re-check: something may have raced a symlink in.
            ensure_dir(dir, false)
        }
        Err(e) => Err(Error::from(e).context(format!("nvme: stat {}", dir.display()))),
    }
}

fn flags(direct: bool) -> i32 {
    libc::O_NOFOLLOW | libc::O_CLOEXEC | if direct { libc::O_DIRECT } else { 0 }
}

/// Creates a new segment file (fails if it exists), mode 0600, read-write.
pub fn create_file(path: &Path, direct: bool) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .custom_flags(flags(direct))
        .open(path)
        .map_err(|e| map_open_err(e, path, "create"))
}

/// Opens an existing file read-only without following a symlink and
/// without blocking (a FIFO never blocks the open), checking it is a
/// regular file (see [`crate::tier::open_regular`]).
pub fn open_read(path: &Path, direct: bool) -> Result<File> {
    crate::tier::open_regular(OpenOptions::new().read(true), flags(direct), path)
        .map_err(|e| map_open_err(e, path, "open"))
}

fn map_open_err(e: io::Error, path: &Path, what: &str) -> Error {
    if e.raw_os_error() == Some(libc::ELOOP) {
        return Error::invalid(format!(
            "nvme: {what} {}: is a symlink; refusing to follow it",
            path.display()
        ));
    }
    if e.kind() == io::ErrorKind::InvalidInput && e.raw_os_error().is_none() {
        return Error::invalid(format!("nvme: {what} {}: {e}", path.display()));
    }
    Error::from(e).context(format!("nvme: {what} {}", path.display()))
}

/// Name of the lock file of a rank directory.
pub const LOCK_NAME: &str = ".lock";

/// Takes the exclusive lock of the rank directory `dir`: an `flock` on
/// `dir/.lock` (created 0600, never a symlink or FIFO), held as long as the
/// returned file is open, with this process's pid written in it. A
/// directory locked by another live store is a [`crate::ErrorKind::Busy`]
/// error naming the directory and, when the file gives it, the holder's pid.
pub fn lock_dir(dir: &Path) -> Result<File> {
    let path = dir.join(LOCK_NAME);
    let f = crate::tier::open_regular(
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(FILE_MODE),
        0,
        &path,
    )
    .map_err(|e| map_open_err(e, &path, "lock"))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe {
        libc::flock(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            libc::LOCK_EX | libc::LOCK_NB,
        )
    } != 0
    {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(Error::from(e).context(format!("nvme: lock {}", path.display())));
        }
        let mut buf = [0u8; 32];
        let n = read_full_at(&f, &mut buf, 0).unwrap_or(0);
        let holder = std::str::from_utf8(&buf[..n])
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .map(|p| format!(" (pid {p})"))
            .unwrap_or_default();
        return Err(Error::new(
            crate::ErrorKind::Busy,
            format!(
                "nvme: rank directory {} is in use by another store{holder}: it holds the lock {}; \
                 a rank directory has one owner at a time",
                dir.display(),
                path.display()
            ),
        ));
    }
    let pid = format!("{}\n", std::process::id());
    f.set_len(0)
        .and_then(|_| f.write_all_at(pid.as_bytes(), 0))
        .ctx(format!("nvme: write {}", path.display()))?;
    Ok(f)
}

/// Whether O_DIRECT works in `dir`: opens, writes and reads back one aligned
/// block in a probe file. `Ok(None)` = works; `Ok(Some(reason))` = refused
/// (EINVAL / EOPNOTSUPP), so the caller falls back to buffered I/O.
pub fn probe_direct(dir: &Path) -> Result<Option<String>> {
    let path = dir.join(".direct-probe");
    let _ = fs::remove_file(&path);
    let refused = |e: &io::Error| {
        matches!(
            e.raw_os_error(),
            Some(libc::EINVAL) | Some(libc::EOPNOTSUPP)
        )
    };
    let f = match OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .custom_flags(flags(true))
        .open(&path)
    {
        Ok(f) => f,
        Err(e) if refused(&e) => {
            return Ok(Some(format!(
                "O_DIRECT refused by the file system at open ({e}); using buffered I/O"
            )))
        }
        Err(e) => return Err(map_open_err(e, &path, "probe O_DIRECT")),
    };
    let mut buf = AlignedBuf::new(ALIGN)?;
    buf[..8].copy_from_slice(b"kvpark!!");
    let res = f.write_all_at(&buf, 0).and_then(|_| {
        buf.fill(0);
        f.read_exact_at(&mut buf, 0)
    });
    drop(f);
    let _ = fs::remove_file(&path);
    match res {
        Ok(()) if &buf[..8] == b"kvpark!!" => Ok(None),
        Ok(()) => Ok(Some(
            "O_DIRECT read back different bytes; using buffered I/O".into(),
        )),
        Err(e) if refused(&e) => Ok(Some(format!(
            "O_DIRECT refused by the file system at write/read ({e}); using buffered I/O"
        ))),
        // ENOSPC and friends: O_DIRECT itself was accepted.
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)) => Ok(None),
        Err(e) => Err(Error::from(e).context(format!("nvme: probe O_DIRECT in {}", dir.display()))),
    }
}

/// Reads up to `buf.len()` bytes at `off`, stopping early only at end of
/// file. Returns the bytes read.
pub fn read_full_at(f: &File, buf: &mut [u8], off: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// fdatasync.
pub fn sync_data(f: &File) -> io::Result<()> {
    f.sync_data()
}

/// fsync of a directory (makes a new file name durable).
pub fn sync_dir(dir: &Path) -> Result<()> {
    let d = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(dir)
        .ctx(format!("nvme: open directory {}", dir.display()))?;
    d.sync_all()
        .ctx(format!("nvme: fsync directory {}", dir.display()))
}

/// Writes every byte of `bufs`, in order, at `off` (pwritev, retried after
/// a short write or EINTR). With O_DIRECT each buffer's address and length
/// must be 4 KiB-aligned.
pub fn write_vectored_all_at(f: &File, bufs: &[&[u8]], off: u64) -> io::Result<()> {
    let mut iov: Vec<libc::iovec> = bufs
        .iter()
        .filter(|b| !b.is_empty())
        .map(|b| libc::iovec {
            iov_base: b.as_ptr() as *mut libc::c_void,
            iov_len: b.len(),
        })
        .collect();
    let mut at = off;
    let mut first = 0;
    while first < iov.len() {
        let cnt = (iov.len() - first).min(libc::UIO_MAXIOV as usize) as libc::c_int;
        // SAFETY: every iovec describes (what is left of) a live `&[u8]` of
        // `bufs`, which the kernel only reads.
        let n = unsafe {
            libc::pwritev(
                std::os::fd::AsRawFd::as_raw_fd(f),
                iov[first..].as_ptr(),
                cnt,
                at as libc::off_t,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "pwritev wrote no bytes",
            ));
        }
        at += n as u64;
        advance(&mut iov, &mut first, n as usize);
    }
    Ok(())
}

/// Reads into `bufs`, in order, from `off` (preadv), stopping early only at
/// end of file. Returns the bytes read. With O_DIRECT each buffer's address
/// and length must be 4 KiB-aligned.
pub fn read_vectored_full_at(f: &File, bufs: &mut [&mut [u8]], off: u64) -> io::Result<usize> {
    let mut iov: Vec<libc::iovec> = bufs
        .iter_mut()
        .filter(|b| !b.is_empty())
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr() as *mut libc::c_void,
            iov_len: b.len(),
        })
        .collect();
    let mut done = 0usize;
    let mut first = 0;
    while first < iov.len() {
        let cnt = (iov.len() - first).min(libc::UIO_MAXIOV as usize) as libc::c_int;
        // SAFETY: every iovec describes (what is left of) a live, exclusively
        // borrowed `&mut [u8]` of `bufs`.
        let n = unsafe {
            libc::preadv(
                std::os::fd::AsRawFd::as_raw_fd(f),
                iov[first..].as_ptr(),
                cnt,
                (off + done as u64) as libc::off_t,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            break;
        }
        done += n as usize;
        advance(&mut iov, &mut first, n as usize);
    }
    Ok(done)
}

/// Drops `n` transferred bytes from the front of `iov[*first..]`.
fn advance(iov: &mut [libc::iovec], first: &mut usize, mut n: usize) {
    while n > 0 && *first < iov.len() {
        let v = &mut iov[*first];
        if n >= v.iov_len {
            n -= v.iov_len;
            *first += 1;
        } else {
            // SAFETY: n < iov_len, so the new base stays inside the buffer.
            v.iov_base = unsafe { (v.iov_base as *mut u8).add(n) } as *mut libc::c_void;
            v.iov_len -= n;
            n = 0;
        }
    }
    while *first < iov.len() && iov[*first].iov_len == 0 {
        *first += 1;
    }
}
