//! Storage tiers below the GPU: the host arena ([`host`], with the slot
//! table of a file-backed arena in [`slots`]) and the NVMe segment log
//! ([`nvme`]), each labelled with the model whose KV it holds ([`identity`]).

pub mod host;
pub mod identity;
pub mod nvme;
pub mod parked;
pub mod slots;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// Opens `path` with `opts` (plus `flags`) as a regular file without ever
/// blocking or following a symbolic link: the open adds `O_NONBLOCK` (so a
/// FIFO or a device cannot block it), `O_NOFOLLOW` and `O_CLOEXEC`, the
/// descriptor is then checked with fstat, and `O_NONBLOCK` is cleared again.
/// A symlink fails with `ELOOP`; anything but a regular file fails with an
/// [`io::ErrorKind::InvalidInput`] error saying "not a regular file (a FIFO)".
pub(crate) fn open_regular(opts: &mut OpenOptions, flags: i32, path: &Path) -> io::Result<File> {
    let f = opts
        .custom_flags(flags | libc::O_NONBLOCK | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    let ft = f.metadata()?.file_type();
    if !ft.is_file() {
        let what = if ft.is_dir() {
            "a directory"
        } else if ft.is_fifo() {
            "a FIFO"
        } else if ft.is_socket() {
            "a socket"
        } else if ft.is_char_device() || ft.is_block_device() {
            "a device"
        } else {
            "not a file"
        };
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("not a regular file ({what})"),
        ));
    }
    let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
    // SAFETY: fcntl on a descriptor this function owns.
    let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if fl < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, fl & !libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(f)
}
