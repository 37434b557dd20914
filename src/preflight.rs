//! Checks of a [`Config`] against the machine, run when a connector half is
//! constructed — before vLLM allocates its KV cache and registers it — so a
//! deployment that cannot work stops with every problem named at once
//! instead of one at a time, later.
//!
//! What is checked (all read-only except creating `nvme_dir` when missing,
//! which the NVMe store would do anyway):
//! - `nvme_dir`: a directory (not a file, not a symlink), created when
//!   missing, writable; its `rank<N>` folder, when present, the same;
//! - `host_file`: its directory exists and is writable; the rank's arena
//!   file, when present, is a regular file of this user, not held by another
//!   live engine, and of the size this `host_bytes` gives (an arena file is
//!   reused only at its own size: [`crate::tier::host::HostArena::open_shared`]);
//! - memory: every rank's host arena (plus what the caller still allocates
//!   in host memory, such as vLLM's KV cache on its CPU backend) fits in the
//!   memory this machine can give now (`MemAvailable`, the cgroup's limit,
//!   the commit limit under strict overcommit), and a new arena file fits in
//!   its filesystem.
//!
//! Every problem is one line that starts with the key, names the value and
//! says what would work (such as the largest `host_bytes` that fits).

use crate::config::Config;
use crate::error::{Error, Result};
use serde::Deserialize;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// What the checks need to know beyond the config.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Preflight {
    /// The worker rank whose tiers are checked; `None`: only the checks
    /// that do not depend on a rank (the scheduler side).
    pub rank: Option<u32>,
    /// Ranks of this engine on this machine, each mapping its own host
    /// arena. The memory check runs when `rank` is set (0 then counts as
    /// 1) or when this is above 0 (a check made before any worker exists).
    pub ranks: u32,
    /// Host memory the caller still allocates after this check on this
    /// machine (vLLM's KV cache when it lives in host memory), bytes.
    pub reserve_host_bytes: u64,
    /// Bytes of one KV block (all layers of one rank), when known; sizes an
    /// existing arena file that has no slot table.
    pub block_bytes: u64,
}

impl Preflight {
    /// The checks of one worker rank, that rank alone on the machine.
    pub fn rank(rank: u32) -> Self {
        Preflight {
            rank: Some(rank),
            ranks: 1,
            ..Preflight::default()
        }
    }

    /// The scheduler side's checks (no host arena).
    pub fn scheduler() -> Self {
        Preflight::default()
    }

    /// Parses the context JSON (`{}` or empty: [`Preflight::scheduler`]).
    pub fn from_json(bytes: &[u8]) -> Result<Self> {
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Preflight::default());
        }
        serde_json::from_slice(bytes)
            .map_err(|e| Error::invalid(format!("preflight context is not valid: {e}")))
    }
}

/// Memory this machine can give now, and where the limit comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemLimit {
    /// Bytes.
    pub bytes: u64,
    /// The source named in messages ("MemAvailable in /proc/meminfo").
    pub source: String,
}

/// The tightest of `MemAvailable`, the cgroup's remaining limit and (under
/// `vm.overcommit_memory = 2`) the remaining commit limit; `None` when none
/// can be read (not Linux).
pub fn host_memory_limit() -> Option<MemLimit> {
    let info = fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| -> Option<u64> {
        info.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
            .map(|kib| kib * 1024)
    };
    let mut best = MemLimit {
        bytes: field("MemAvailable")?,
        source: "MemAvailable in /proc/meminfo".into(),
    };
    let mut consider = |bytes: u64, source: &str| {
        if bytes < best.bytes {
            best = MemLimit {
                bytes,
                source: source.into(),
            };
        }
    };
    let read_u64 = |p: &str| -> Option<u64> { fs::read_to_string(p).ok()?.trim().parse().ok() };
    // cgroup v2, then v1 (an unlimited v1 limit is a huge number).
    if let (Some(max), Some(cur)) = (
        read_u64("/sys/fs/cgroup/memory.max"),
        read_u64("/sys/fs/cgroup/memory.current"),
    ) {
        consider(max.saturating_sub(cur), "the cgroup's memory.max");
    } else if let (Some(max), Some(cur)) = (
        read_u64("/sys/fs/cgroup/memory/memory.limit_in_bytes"),
        read_u64("/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ) {
        consider(
            max.saturating_sub(cur),
            "the cgroup's memory.limit_in_bytes",
        );
    }
    if read_u64("/proc/sys/vm/overcommit_memory") == Some(2) {
        if let (Some(limit), Some(used)) = (field("CommitLimit"), field("Committed_AS")) {
            consider(
                limit.saturating_sub(used),
                "CommitLimit - Committed_AS (vm.overcommit_memory = 2)",
            );
        }
    }
    Some(best)
}

/// A size as a config value, rounded down to whole GiB or MiB.
pub fn floor_size(b: u64) -> String {
    if b >= 1 << 30 {
        format!("{}GiB", b >> 30)
    } else if b >= 1 << 20 {
        format!("{}MiB", b >> 20)
    } else {
        format!("{b}")
    }
}

fn show(b: u64) -> String {
    crate::units::fmt_bytes(b).replace(' ', "")
}

/// Whether `dir` takes a new file: creates and removes a probe file.
fn probe_writable(dir: &Path) -> std::io::Result<()> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let probe = dir.join(format!(".kvpark-probe-{}-{nanos}", std::process::id()));
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&probe)?;
    fs::remove_file(&probe)
}

/// Free bytes (for this user) and filesystem type of the filesystem holding `p`.
fn statfs(p: &Path) -> Option<(u64, i64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).ok()?;
    let mut s: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a statfs buffer we own.
    if unsafe { libc::statfs(c.as_ptr(), &mut s) } != 0 {
        return None;
    }
    Some((
        (s.f_bavail as u64).saturating_mul(s.f_bsize as u64),
        s.f_type as i64,
    ))
}

const TMPFS_MAGIC: i64 = 0x0102_1994;

/// The header of an arena file's slot table: (slot bytes, slots, block bytes).
fn slot_table_header(arena: &Path) -> Option<(u64, u64, u64)> {
    let path = crate::tier::slots::table_path(arena);
    let mut f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .ok()?;
    let mut h = [0u8; 32];
    f.read_exact(&mut h).ok()?;
    if &h[..8] != b"KVPSLOT1" {
        return None;
    }
    let u = |i: usize| u64::from_le_bytes(h[i..i + 8].try_into().expect("8 bytes"));
    Some((u(8), u(16), u(24)))
}

/// Bytes an arena of `host_bytes` with slots of `slot_bytes` maps (whole
/// slots of the block size rounded up to 4 KiB, as the host tier sizes it).
fn arena_len(host_bytes: u64, slot_bytes: u64) -> u64 {
    let sb = slot_bytes.div_ceil(4096) * 4096;
    if sb == 0 {
        return 0;
    }
    host_bytes / sb * sb
}

fn parent_dir(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

impl Config {
    /// Checks this config against the machine for `ctx` (see the module
    /// docs); one [`crate::ErrorKind::Config`] error listing every problem,
    /// one line each.
    pub fn preflight(&self, ctx: &Preflight) -> Result<()> {
        let mut problems: Vec<String> = Vec::new();
        if let Some(dir) = &self.nvme_dir {
            self.check_nvme_dir(dir, ctx.rank, &mut problems);
        }
        // Host memory the arena files of this config still need per rank
        // (0 for a file already holding its arena).
        let mut arena_needs_memory = true;
        if let Some(prefix) = &self.host_file {
            arena_needs_memory = self.check_host_file(prefix, ctx, &mut problems);
        }
        if (ctx.rank.is_some() || ctx.ranks > 0) && arena_needs_memory {
            if let Some(limit) = host_memory_limit() {
                if let Some(p) = host_memory_problem(self.host_bytes, ctx, &limit) {
                    problems.push(p);
                }
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Error::config(problems.join("\n")))
        }
    }

    fn check_nvme_dir(&self, dir: &Path, rank: Option<u32>, problems: &mut Vec<String>) {
        let d = dir.display();
        match fs::symlink_metadata(dir) {
            Ok(m) if m.file_type().is_symlink() => {
                problems.push(format!(
                    "nvme_dir: {d} is a symlink; kvpark does not follow it: give the real path"
                ));
                return;
            }
            Ok(m) if !m.is_dir() => {
                problems.push(format!(
                    "nvme_dir: {d} is a file, not a directory: give a directory (kvpark creates it when missing, with a rank<N> folder per worker), or null for no NVMe tier"
                ));
                return;
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if let Err(e) = fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                {
                    problems.push(format!(
                        "nvme_dir: {d} does not exist and cannot be created ({e}): create it, or give a directory this user can write"
                    ));
                    return;
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {
                problems.push(format!(
                    "nvme_dir: {d} cannot be created: a part of that path is a file, not a directory; give a directory path"
                ));
                return;
            }
            Err(e) => {
                problems.push(format!("nvme_dir: cannot stat {d}: {e}"));
                return;
            }
        }
        if let Err(e) = probe_writable(dir) {
            problems.push(format!(
                "nvme_dir: {d} is not writable by this user ({e}): give a directory this user can write"
            ));
            return;
        }
        if let Some(r) = rank {
            let rd = dir.join(format!("rank{r}"));
            match fs::symlink_metadata(&rd) {
                Ok(m) if m.file_type().is_symlink() || !m.is_dir() => problems.push(format!(
                    "nvme_dir: {} is not a directory (a symlink or a file where kvpark keeps rank {r}'s segments): remove it",
                    rd.display()
                )),
                Ok(_) => {
                    if let Err(e) = probe_writable(&rd) {
                        problems.push(format!(
                            "nvme_dir: {} is not writable by this user ({e})",
                            rd.display()
                        ));
                    }
                }
                Err(_) => {}
            }
        }
    }

    /// Checks `host_file`; returns whether the rank's arena still needs
    /// fresh host memory (false: its file already holds it, or the file
    /// lives on a disk, not in memory).
    fn check_host_file(&self, prefix: &Path, ctx: &Preflight, problems: &mut Vec<String>) -> bool {
        let dir = parent_dir(prefix);
        match fs::metadata(&dir) {
            Ok(m) if m.is_dir() => {
                if let Err(e) = probe_writable(&dir) {
                    problems.push(format!(
                        "host_file: {} is in {}, which this user cannot write ({e}): give a path in a writable directory such as /dev/shm",
                        prefix.display(),
                        dir.display()
                    ));
                    return true;
                }
            }
            _ => {
                problems.push(format!(
                    "host_file: the directory of {} ({}) does not exist: host_file names a file prefix in an existing directory, such as \"/dev/shm/kvpark\"",
                    prefix.display(),
                    dir.display()
                ));
                return true;
            }
        }
        let Some(rank) = ctx.rank else {
            // Before any worker: an existing arena file already holds its memory.
            return self.host_file_for(0).is_some_and(|f| !f.exists());
        };
        let arena = self.host_file_for(rank).expect("host_file is set");
        let a = arena.display();
        let (free, fstype) = statfs(&dir).unwrap_or((u64::MAX, 0));
        let in_memory = fstype == TMPFS_MAGIC;
        let meta = match fs::symlink_metadata(&arena) {
            Err(_) => {
                // A new arena file: its filesystem must hold it.
                let want = self.host_bytes;
                if want > free {
                    problems.push(format!(
                        "host_file: {} has {} free but host_bytes {} needs that much for {a}: the largest host_bytes this filesystem holds is {}; lower host_bytes or free space there",
                        dir.display(),
                        show(free),
                        show(want),
                        floor_size(free)
                    ));
                }
                return in_memory;
            }
            Ok(m) => m,
        };
        if meta.file_type().is_symlink() || !meta.is_file() {
            problems.push(format!(
                "host_file: {a} is a symlink or not a regular file: remove it, or give another host_file"
            ));
            return false;
        }
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        if meta.uid() != me {
            problems.push(format!(
                "host_file: {a} belongs to uid {}, not to this user (uid {me}): remove it, or give another host_file",
                meta.uid()
            ));
            return false;
        }
        if let Ok(f) = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&arena)
        {
            use std::os::unix::io::AsRawFd;
            // SAFETY: flock on a descriptor we own; released when `f` closes.
            if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                problems.push(format!(
                    "host_file: {a} is in use by another live kvpark worker (an engine still running with the same host_file): stop it, or give another host_file"
                ));
                return false;
            }
        }
        let have = meta.len();
        if have == 0 {
            return in_memory;
        }
        let slot = slot_table_header(&arena)
            .map(|(sb, _, _)| sb)
            .or((ctx.block_bytes > 0).then_some(ctx.block_bytes));
        let fits = match slot {
            Some(sb) => arena_len(self.host_bytes, sb) == have,
            None => have <= self.host_bytes,
        };
        if !fits {
            let want = match slot {
                Some(sb) => format!(
                    "host_bytes {} maps {}",
                    show(self.host_bytes),
                    show(arena_len(self.host_bytes, sb))
                ),
                None => format!("host_bytes is {}", show(self.host_bytes)),
            };
            problems.push(format!(
                "host_file: {a} holds an arena of {} but {want}; an arena file is reused only at its own size: set host_bytes to {have} to keep the blocks it holds, or remove {a} and {a}.slots to start empty",
                show(have)
            ));
        }
        false
    }
}

/// The memory problem of an arena of `host_bytes` per rank, if any.
fn host_memory_problem(host_bytes: u64, ctx: &Preflight, limit: &MemLimit) -> Option<String> {
    let ranks = u64::from(ctx.ranks.max(1));
    let need = host_bytes
        .saturating_mul(ranks)
        .saturating_add(ctx.reserve_host_bytes);
    if need <= limit.bytes {
        return None;
    }
    let per_rank = limit.bytes.saturating_sub(ctx.reserve_host_bytes) / ranks;
    let mut what = format!("host_bytes: {} per rank", show(host_bytes));
    if ranks > 1 {
        what += &format!(" x {ranks} ranks");
    }
    if ctx.reserve_host_bytes > 0 {
        what += &format!(
            " (+ {} of KV cache vLLM allocates in host memory)",
            show(ctx.reserve_host_bytes)
        );
    }
    let fix = if per_rank >= 1 << 20 {
        format!(
            "the largest host_bytes that fits is {} per rank (leave room for the model, vLLM and the OS: README, Sizing)",
            floor_size(per_rank)
        )
    } else {
        "there is no room for a host tier: free memory first".to_string()
    };
    Some(format!(
        "{what} does not fit in the {} this machine can give now ({}): {fix}",
        show(limit.bytes),
        limit.source
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(json: &str) -> Config {
        Config::from_json(json.as_bytes()).unwrap()
    }

    fn problems(c: &Config, ctx: &Preflight) -> Vec<String> {
        match c.preflight(ctx) {
            Ok(()) => Vec::new(),
            Err(e) => {
                assert_eq!(e.kind(), crate::ErrorKind::Config);
                e.message().lines().map(str::to_owned).collect()
            }
        }
    }

    #[test]
    fn a_small_anonymous_host_tier_passes() {
        assert_eq!(
            problems(&cfg(r#"{"host_bytes":"4MiB"}"#), &Preflight::rank(0)),
            Vec::<String>::new()
        );
    }

    #[test]
    fn memory_message_names_the_largest_host_bytes_that_fits() {
        let limit = MemLimit {
            bytes: 21 << 30,
            source: "MemAvailable in /proc/meminfo".into(),
        };
        let ctx = Preflight {
            rank: Some(0),
            ranks: 2,
            reserve_host_bytes: 1 << 30,
            block_bytes: 0,
        };
        let p = host_memory_problem(64 << 30, &ctx, &limit).unwrap();
        assert!(
            p.starts_with("host_bytes: 64.00GiB per rank x 2 ranks"),
            "{p}"
        );
        assert!(
            p.contains("the largest host_bytes that fits is 10GiB per rank"),
            "{p}"
        );
        assert!(p.contains("MemAvailable"), "{p}");
        assert_eq!(host_memory_problem(10 << 30, &ctx, &limit), None);
        // A pebibyte never fits this machine.
        let e = cfg(r#"{"host_bytes":"1024TiB"}"#)
            .preflight(&Preflight::rank(0))
            .unwrap_err();
        assert!(e.message().starts_with("host_bytes: "), "{e}");
        assert!(
            e.message().contains("the largest host_bytes that fits is"),
            "{e}"
        );
        // The scheduler side maps no arena; a check before any worker counts `ranks`.
        assert!(cfg(r#"{"host_bytes":"1024TiB"}"#)
            .preflight(&Preflight::scheduler())
            .is_ok());
        let early = Preflight {
            ranks: 1,
            ..Preflight::scheduler()
        };
        assert!(cfg(r#"{"host_bytes":"1024TiB"}"#)
            .preflight(&early)
            .is_err());
    }

    #[test]
    fn nvme_dir_must_be_a_writable_directory() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("f");
        fs::write(&file, b"x").unwrap();
        let c = cfg(&format!(r#"{{"nvme_dir":"{}"}}"#, file.display()));
        let p = problems(&c, &Preflight::scheduler());
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].starts_with("nvme_dir: ") && p[0].contains("is a file"),
            "{p:?}"
        );
        // Missing: created.
        let missing = d.path().join("a/b");
        let c = cfg(&format!(r#"{{"nvme_dir":"{}"}}"#, missing.display()));
        assert!(problems(&c, &Preflight::rank(3)).is_empty());
        assert!(missing.is_dir());
        // Not creatable: below a file.
        let c = cfg(&format!(r#"{{"nvme_dir":"{}/sub"}}"#, file.display()));
        let p = problems(&c, &Preflight::scheduler());
        assert!(p[0].contains("cannot be created"), "{p:?}");
        // A rank folder that is a file.
        fs::write(missing.join("rank3"), b"x").unwrap();
        let c = cfg(&format!(r#"{{"nvme_dir":"{}"}}"#, missing.display()));
        let p = problems(&c, &Preflight::rank(3));
        assert!(p[0].contains("rank3"), "{p:?}");
    }

    #[test]
    fn every_problem_is_one_line_starting_with_its_key() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("f");
        fs::write(&file, b"x").unwrap();
        let c = cfg(&format!(
            r#"{{"nvme_dir":"{}","host_file":"{}/nodir/kv","host_bytes":"1024TiB"}}"#,
            file.display(),
            d.path().display()
        ));
        let p = problems(&c, &Preflight::rank(0));
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(p[0].starts_with("nvme_dir: "), "{p:?}");
        assert!(
            p[1].starts_with("host_file: ") && p[1].contains("does not exist"),
            "{p:?}"
        );
        assert!(p[2].starts_with("host_bytes: "), "{p:?}");
    }

    #[test]
    fn a_reused_host_file_must_match_host_bytes() {
        let d = tempfile::tempdir().unwrap();
        let prefix = d.path().join("kv");
        let c = cfg(&format!(
            r#"{{"host_file":"{}","host_bytes":"1MiB"}}"#,
            prefix.display()
        ));
        let arena = c.host_file_for(0).unwrap();
        let block = 12_000usize; // slots of 12 KiB
        {
            let a =
                crate::tier::host::HostArena::open_shared_bytes(&arena, 1 << 20, block).unwrap();
            crate::tier::slots::SlotTable::open(
                &crate::tier::slots::table_path(&arena),
                a.slot_bytes(),
                a.capacity(),
                block,
            )
            .unwrap();
            // Held by a live arena: refused.
            let p = problems(&c, &Preflight::rank(0));
            assert!(
                p[0].contains("in use by another live kvpark worker"),
                "{p:?}"
            );
        }
        assert!(problems(&c, &Preflight::rank(0)).is_empty());
        // 1MiB and 1MiB + 4KiB map the same 85 slots of 12 KiB.
        let same = cfg(&format!(
            r#"{{"host_file":"{}","host_bytes":1052672}}"#,
            prefix.display()
        ));
        assert!(problems(&same, &Preflight::rank(0)).is_empty());
        let bigger = cfg(&format!(
            r#"{{"host_file":"{}","host_bytes":"2MiB"}}"#,
            prefix.display()
        ));
        let p = problems(&bigger, &Preflight::rank(0));
        assert_eq!(p.len(), 1, "{p:?}");
        let have = 85 * 12288;
        assert!(
            p[0].starts_with("host_file: ")
                && p[0].contains(&format!("set host_bytes to {have}"))
                && p[0].contains("remove"),
            "{p:?}"
        );
        // ...and the suggested size is accepted.
        let fixed = cfg(&format!(
            r#"{{"host_file":"{}","host_bytes":{have}}}"#,
            prefix.display()
        ));
        assert!(problems(&fixed, &Preflight::rank(0)).is_empty());
        // Without a slot table, the block size from the context decides.
        fs::remove_file(crate::tier::slots::table_path(&arena)).unwrap();
        let ctx = Preflight {
            block_bytes: block as u64,
            ..Preflight::rank(0)
        };
        assert!(!problems(&bigger, &ctx).is_empty());
        assert!(problems(&fixed, &ctx).is_empty());
        // Another rank has no file yet: fine.
        assert!(problems(&bigger, &Preflight::rank(1)).is_empty());
    }

    #[test]
    fn context_json() {
        assert_eq!(Preflight::from_json(b"").unwrap(), Preflight::scheduler());
        let p = Preflight::from_json(br#"{"rank":2,"ranks":4,"reserve_host_bytes":5}"#).unwrap();
        assert_eq!(p.rank, Some(2));
        assert_eq!(p.ranks, 4);
        assert!(Preflight::from_json(br#"{"rnak":2}"#).is_err());
    }
}
