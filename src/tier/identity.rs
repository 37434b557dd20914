//! Which model a store holds KV of: a small text file beside each store.
//!
//! - NVMe: `<nvme_dir>/rank<R>/model`
//! - file-backed host arena: `<host_file>.rank<R>.model`
//!
//! The file holds the config's `model_identity` (what the connector derives
//! from vLLM's config). It is a label, not the protection: every block key
//! already covers the model ([`crate::block::ModelNs`]), so a block parked by
//! one model can never be found by another. The label lets kvpark *say* so,
//! once, when an engine opens a store another model wrote ("its blocks are
//! never served to this model").
//!
//! Only the worker reads and writes labels (the scheduler may start after
//! the workers have opened their stores). It rewrites the label with its
//! own model when it opens the store
//! (the blocks it parks from then on are this model's; the other model's
//! records stay unreachable and age out as the store fills). Files are
//! mode 0600, opened without following symlinks and refused unless regular
//! (a FIFO in its place cannot block the engine), and at most
//! [`MAX_LABEL_BYTES`] long.

use crate::error::{Error, Result, ResultExt};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Longest label read back; a longer file is not kvpark's.
pub const MAX_LABEL_BYTES: u64 = 64 * 1024;

/// What a store's label said when it was opened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Owner {
    /// No label yet (a new store, or one written before labels existed).
    Unlabelled,
    /// This model.
    Same,
    /// Another model: its identity as written.
    Other(String),
}

/// The label file of the NVMe store of `rank` under `nvme_dir`.
pub fn nvme_label(nvme_dir: &Path, rank: u32) -> PathBuf {
    nvme_dir.join(format!("rank{rank}")).join("model")
}

/// The label file of a file-backed host arena (`<host_file>.rank<R>`).
pub fn host_label(arena_file: &Path) -> PathBuf {
    let mut s = arena_file.as_os_str().to_owned();
    s.push(".model");
    PathBuf::from(s)
}

/// Reads a label: `None` when there is none.
pub fn read(path: &Path) -> Result<Option<String>> {
    let f = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(Error::from(e).context(format!("model label {}", path.display())));
        }
    };
    let m = f
        .metadata()
        .ctx(format!("model label {}", path.display()))?;
    if !m.file_type().is_file() {
        let what = if m.file_type().is_fifo() {
            "a FIFO"
        } else if m.is_dir() {
            "a directory"
        } else {
            "not a regular file"
        };
        return Err(Error::invalid(format!(
            "model label {} is {what}; remove it",
            path.display()
        )));
    }
    if m.len() > MAX_LABEL_BYTES {
        return Err(Error::corrupt(format!(
            "model label {} is {} bytes (at most {MAX_LABEL_BYTES}); not written by kvpark",
            path.display(),
            m.len()
        )));
    }
    let mut buf = Vec::with_capacity(m.len() as usize);
    (&f).take(MAX_LABEL_BYTES)
        .read_to_end(&mut buf)
        .ctx(format!("model label {}", path.display()))?;
    String::from_utf8(buf)
        .map(Some)
        .map_err(|_| Error::corrupt(format!("model label {} is not UTF-8", path.display())))
}

/// Compares the label at `path` with `identity`.
pub fn check(path: &Path, identity: &str) -> Result<Owner> {
    Ok(match read(path)? {
        None => Owner::Unlabelled,
        Some(s) if s == identity => Owner::Same,
        Some(s) => Owner::Other(s),
    })
}

/// Compares the label with `identity`, then (re)writes it with `identity`
/// (atomically: a temporary file renamed over it).
pub fn claim(path: &Path, identity: &str) -> Result<Owner> {
    let owner = check(path, identity)?;
    if owner != Owner::Same {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let _ = std::fs::remove_file(&tmp);
        let mut f: File = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
            .ctx(format!("model label {}", tmp.display()))?;
        f.write_all(identity.as_bytes())
            .and_then(|_| f.sync_all())
            .ctx(format!("model label {}", tmp.display()))?;
        std::fs::rename(&tmp, path).ctx(format!("model label {}", path.display()))?;
    }
    Ok(owner)
}

/// One line for the log when a store of another model is opened.
pub fn other_model_message(store: &Path, other: &str, this: &str) -> String {
    format!(
        "kvpark: {} holds KV parked by another model ({other}); none of it is served to this model ({this}): those blocks are unreachable and age out as the store fills",
        store.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claim_reports_the_previous_owner() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("model");
        assert_eq!(claim(&p, "a").unwrap(), Owner::Unlabelled);
        assert_eq!(claim(&p, "a").unwrap(), Owner::Same);
        assert_eq!(claim(&p, "b").unwrap(), Owner::Other("a".into()));
        assert_eq!(read(&p).unwrap().as_deref(), Some("b"));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn a_fifo_label_is_an_error_not_a_hang() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("model");
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let (tx, rx) = std::sync::mpsc::channel();
        let p2 = p.clone();
        std::thread::spawn(move || tx.send(read(&p2).map_err(|e| e.to_string())));
        let got = rx
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("reading a FIFO label returned");
        assert!(got.unwrap_err().contains("FIFO"));
    }

    #[test]
    fn an_oversized_label_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("model");
        std::fs::write(&p, vec![b'x'; MAX_LABEL_BYTES as usize + 1]).unwrap();
        assert_eq!(read(&p).unwrap_err().kind(), crate::ErrorKind::Corrupt);
    }
}
