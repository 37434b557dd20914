//! NVMe store faults that really happen: flipped bytes on disk, a full file
//! system (a real 8 MiB tmpfs), the capacity cap, symlinks, file modes.
//!
//! The disk-full test mounts a tmpfs and therefore needs CAP_SYS_ADMIN (root
//! outside an unprivileged container). Where mounting is refused it FAILS
//! with a message saying the fault was not exercised; it never passes
//! without filling a disk.

use kvpark::block::BlockKey;
use kvpark::codec::CodecTag;
use kvpark::tier::nvme::{inspect, BadKind, FsyncPolicy, NvmeConfig, NvmeStore};
use kvpark::ErrorKind;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};

fn key(i: u64) -> BlockKey {
    BlockKey::derive(b"faults", &i.to_le_bytes())
}

fn block(i: u64, len: usize) -> Vec<u8> {
    let mut s = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 24) as u8
        })
        .collect()
}

fn cfg(dir: &Path) -> NvmeConfig {
    let mut c = NvmeConfig::new(dir, 0, 1 << 30);
    c.fsync = FsyncPolicy::Never;
    c.codec = CodecTag::None;
    c
}

fn read(s: &NvmeStore, k: &BlockKey) -> Vec<u8> {
    let mut v = vec![0u8; s.raw_len(k).expect("indexed") as usize];
    s.get(k, &mut v).unwrap();
    v
}

fn flip(path: &Path, at: u64) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    b[0] ^= 0x40;
    f.write_all_at(&b, at).unwrap();
    f.sync_all().unwrap();
}

const LEN: usize = 10_000; // 4 KiB header block + 10000 -> 12288 bytes = 16384 on disk
const REC: u64 = 16384;
/// Offset of the payload in its record (the header has its own 4 KiB block).
const PAYLOAD: u64 = 4096;

#[test]
fn flipped_payload_byte_is_corrupt_and_never_served() {
    let t = tempfile::tempdir().unwrap();
    let seg = t.path().join("rank0/seg-000001.kvp");
    {
        let s = NvmeStore::open(cfg(t.path())).unwrap();
        for i in 0..4 {
            s.put(&key(i), 1, i as u32, &block(i, LEN)).unwrap();
        }
        // A flip under a live store (its next read goes to the disk).
        flip(&seg, 3 * REC + PAYLOAD + 9_999);
        let mut dst = vec![0u8; LEN];
        let e = s.get(&key(3), &mut dst).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        assert!(e.message().contains("payload checksum mismatch"), "{e}");
        assert!(e.message().contains("never served"), "{e}");
        assert_eq!(s.stats().read_corrupt, 1);
        assert!(!s.contains(&key(3)));
        assert_eq!(
            s.get(&key(3), &mut dst).unwrap_err().kind(),
            ErrorKind::NotFound,
            "a corrupt record is a miss from then on"
        );
    }
    // A flip in a closed store, found by the first read after reopen.
    flip(&seg, REC + PAYLOAD + 500);
    let s = NvmeStore::open(cfg(t.path())).unwrap();
    assert_eq!(s.stats().dropped_corrupt, 0, "headers only at open");
    let mut dst = vec![0u8; LEN];
    let e = s.get(&key(1), &mut dst).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt);
    let st = s.stats();
    assert_eq!((st.read_corrupt, st.gets), (1, 0));
    assert!(!s.contains(&key(1)));
    assert_eq!(read(&s, &key(0)), block(0, LEN));
    assert_eq!(read(&s, &key(2)), block(2, LEN));
    drop(s);

    // inspect --verify lists both, at their offsets.
    let r = inspect(t.path(), true).unwrap();
    let rk = &r.ranks[0];
    let mut p: Vec<(u64, BadKind)> = rk.problems.iter().map(|p| (p.offset, p.kind)).collect();
    p.sort_by_key(|x| x.0);
    assert_eq!(
        p,
        vec![(REC, BadKind::Corrupt), (3 * REC, BadKind::Corrupt)]
    );
    assert!(rk
        .problems
        .iter()
        .all(|p| p.reason.contains("payload checksum mismatch")));
    assert_eq!((rk.checksum_ok, rk.checksum_failed), (2, 2));
    assert!(
        r.to_string()
            .contains("offset 16384: payload checksum mismatch"),
        "{r}"
    );

    // With verify_on_open the scan drops them at open, counted.
    let mut c = cfg(t.path());
    c.verify_on_open = true;
    let s = NvmeStore::open(c).unwrap();
    let st = s.stats();
    assert_eq!(
        (st.dropped_corrupt, st.dropped_torn, st.recovered_records),
        (2, 0, 2)
    );
    assert_eq!(s.len(), 2);
}

#[test]
fn flipped_header_bytes_are_dropped_at_reopen_and_counted() {
    let t = tempfile::tempdir().unwrap();
    {
        let s = NvmeStore::open(cfg(t.path())).unwrap();
        for i in 0..5 {
            s.put(&key(i), 1, i as u32, &block(i, LEN)).unwrap();
        }
    }
    let seg = t.path().join("rank0/seg-000001.kvp");
    flip(&seg, REC + 44); // record 1: a session byte
    flip(&seg, 3 * REC + 1); // record 3: the magic
    let s = NvmeStore::open(cfg(t.path())).unwrap();
    let st = s.stats();
    assert_eq!((st.dropped_corrupt, st.dropped_torn), (2, 0), "{st:?}");
    assert_eq!(st.recovered_records, 3);
    for i in [0, 2, 4] {
        assert_eq!(read(&s, &key(i)), block(i, LEN));
    }
    assert!(!s.contains(&key(1)) && !s.contains(&key(3)));
    drop(s);
    let r = inspect(t.path(), false).unwrap();
    let rk = &r.ranks[0];
    assert_eq!((rk.corrupt, rk.live_records), (2, 3));
    assert_eq!(rk.problems[0].offset, REC);
    assert!(rk.problems[0].reason.contains("header checksum mismatch"));
    assert_eq!(rk.problems[1].offset, 3 * REC);
    assert!(rk.problems[1].reason.contains("bad magic"));
}

/// A tmpfs mounted for one test; unmounted (lazily, so it cannot fail on a
/// busy file) when dropped, also on panic.
struct TmpfsMount {
    path: PathBuf,
}

impl TmpfsMount {
    fn mount(path: &Path, size: &str) -> Result<Self, String> {
        let target = CString::new(path.as_os_str().as_bytes()).unwrap();
        let opts = CString::new(format!("size={size},mode=0700")).unwrap();
        // SAFETY: every pointer is a valid NUL-terminated string for the call.
        let rc = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                opts.as_ptr() as *const libc::c_void,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error().to_string());
        }
        Ok(TmpfsMount {
            path: path.to_path_buf(),
        })
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let target = CString::new(self.path.as_os_str().as_bytes()).unwrap();
        // SAFETY: valid NUL-terminated path.
        let rc = unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        if rc != 0 {
            eprintln!(
                "umount {}: {}",
                self.path.display(),
                std::io::Error::last_os_error()
            );
        }
    }
}

#[test]
fn full_file_system_is_no_space_and_the_store_stays_usable() {
    let t = tempfile::tempdir().unwrap();
    let mnt = t.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let _guard = match TmpfsMount::mount(&mnt, "8m") {
        Ok(g) => g,
        Err(e) => panic!(
            "DISK-FULL FAULT NOT EXERCISED: mounting an 8 MiB tmpfs at {} was refused ({e}). \
             This test needs CAP_SYS_ADMIN (root, not in an unprivileged container); a loop-mounted \
             image would need the same privilege, so there is no fallback. Run it where mounting works.",
            mnt.display()
        ),
    };
    let statfs_total = {
        let p = CString::new(mnt.as_os_str().as_bytes()).unwrap();
        let mut sf: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: valid path and out pointer.
        assert_eq!(unsafe { libc::statvfs(p.as_ptr(), &mut sf) }, 0);
        sf.f_blocks * sf.f_frsize
    };
    assert_eq!(statfs_total, 8 << 20, "the mount is the small tmpfs");

    let rec = 1 << 20; // 1 MiB + 4 KiB on disk
    let mut c = NvmeConfig::new(&mnt, 0, 1 << 30); // the cap is far: the fs is the limit
    c.segment_bytes = 4 << 20; // three records per segment
    c.fsync = FsyncPolicy::PerSegment;
    c.codec = CodecTag::None;
    let s = NvmeStore::open(c.clone()).unwrap();
    let mut stored = Vec::new();
    let err = loop {
        let i = stored.len() as u64;
        assert!(i < 16, "8 MiB cannot hold 16 records of 1 MiB");
        match s.put(&key(i), 1, i as u32, &block(i, rec)) {
            Ok(()) => stored.push(i),
            Err(e) => break e,
        }
    };
    assert_eq!(err.kind(), ErrorKind::NoSpace, "{err}");
    assert!(err.message().contains("No space left on device"), "{err}");
    assert!(err.message().contains("nvme write rank 0"), "{err}");
    assert!(stored.len() >= 5, "{} records fit", stored.len());
    let st = s.stats();
    assert_eq!(st.no_space_errors, 1);
    assert_eq!(st.records as usize, stored.len());
    // Everything acknowledged reads back byte-exact; the store keeps serving.
    for &i in &stored {
        assert_eq!(read(&s, &key(i)), block(i, rec), "record {i} after ENOSPC");
    }
    let again = s.put(&key(99), 1, 99, &block(99, rec)).unwrap_err();
    assert_eq!(again.kind(), ErrorKind::NoSpace);
    assert!(!s.contains(&key(99)));
    assert_eq!(read(&s, &key(stored[0])), block(stored[0], rec));

    // Free the first segment (records 0..3) and collect it: puts work again.
    for i in 0..3 {
        assert!(s.remove(&key(i)));
    }
    let r = s.gc().unwrap();
    assert!(r.segments_deleted >= 1, "{r:?}");
    for i in 100..102u64 {
        s.put(&key(i), 2, i as u32, &block(i, rec)).unwrap();
    }
    for &i in stored.iter().filter(|&&i| i >= 3).chain(&[100, 101]) {
        assert_eq!(read(&s, &key(i)), block(i, rec));
    }
    drop(s);

    // Reopen: the failed writes left no record (tail cut back), nothing torn.
    let s = NvmeStore::open(c).unwrap();
    let st = s.stats();
    assert_eq!((st.dropped_torn, st.dropped_corrupt), (0, 0), "{st:?}");
    assert_eq!(s.len(), stored.len() - 3 + 2);
    for &i in stored.iter().filter(|&&i| i >= 3).chain(&[100, 101]) {
        assert_eq!(read(&s, &key(i)), block(i, rec), "record {i} after reopen");
    }
}

#[test]
fn capacity_cap_is_no_space_until_gc_frees_room() {
    let t = tempfile::tempdir().unwrap();
    let mut c = cfg(t.path());
    c.capacity_bytes = 6 * REC;
    c.segment_bytes = 2 * REC;
    let s = NvmeStore::open(c).unwrap();
    for i in 0..6 {
        s.put(&key(i), 1, i as u32, &block(i, LEN)).unwrap();
    }
    let e = s.put(&key(6), 1, 6, &block(6, LEN)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NoSpace);
    assert!(
        e.message().contains("capacity cap of 98304 bytes reached"),
        "{e}"
    );
    assert!(e.message().contains("remove records first"), "{e}");
    assert_eq!(s.stats().used_bytes, 6 * REC);
    for i in 0..6 {
        assert_eq!(read(&s, &key(i)), block(i, LEN));
    }
    // Remove one record of each of two segments: the put's GC compacts one.
    s.remove(&key(0));
    s.remove(&key(2));
    s.put(&key(6), 1, 6, &block(6, LEN)).unwrap();
    let st = s.stats();
    assert!(st.gc_runs >= 1 && st.gc_segments_deleted >= 1, "{st:?}");
    assert!(st.used_bytes <= 6 * REC, "{st:?}");
    for i in [1, 3, 4, 5, 6] {
        assert_eq!(read(&s, &key(i)), block(i, LEN), "record {i}");
    }
}

#[test]
fn symlinks_are_refused_and_modes_are_private() {
    let t = tempfile::tempdir().unwrap();
    let real = t.path().join("real");
    std::fs::create_dir(&real).unwrap();
    let link = t.path().join("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let e = NvmeStore::open(cfg(&link))
        .err()
        .expect("symlinked dir refused");
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    assert!(e.message().contains("symlink"), "{e}");

    // A rank directory that is a symlink is refused too.
    let root = t.path().join("root");
    std::fs::create_dir(&root).unwrap();
    std::os::unix::fs::symlink(&real, root.join("rank0")).unwrap();
    let e = NvmeStore::open(cfg(&root))
        .err()
        .expect("symlinked rank dir refused");
    assert!(e.message().contains("symlink"), "{e}");

    // A segment file that is a symlink is not followed: it is skipped and counted.
    let root2 = t.path().join("root2");
    {
        let s = NvmeStore::open(cfg(&root2)).unwrap();
        s.put(&key(1), 1, 1, &block(1, LEN)).unwrap();
        let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&root2), 0o700);
        assert_eq!(mode(&root2.join("rank0")), 0o700);
        assert_eq!(mode(&root2.join("rank0/seg-000001.kvp")), 0o600);
    }
    std::fs::rename(
        root2.join("rank0/seg-000001.kvp"),
        real.join("elsewhere.kvp"),
    )
    .unwrap();
    std::os::unix::fs::symlink(
        real.join("elsewhere.kvp"),
        root2.join("rank0/seg-000001.kvp"),
    )
    .unwrap();
    let s = NvmeStore::open(cfg(&root2)).expect("a symlinked segment is skipped");
    assert_eq!((s.len(), s.stats().skipped_segments), (0, 1));
}

// ---------------------------------------------------------------------
// Hostile directory entries and forged records.
// ---------------------------------------------------------------------

/// Runs `f` on a thread and fails the test if it has not returned within
/// `secs` seconds (a blocking open would otherwise hang the test forever).
fn within<T: Send + 'static>(secs: u64, what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(std::time::Duration::from_secs(secs)) {
        Ok(v) => v,
        Err(_) => panic!("{what}: still blocked after {secs} s"),
    }
}

fn mkfifo(path: &Path) {
    let p = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: valid NUL-terminated path.
    assert_eq!(
        unsafe { libc::mkfifo(p.as_ptr(), 0o600) },
        0,
        "mkfifo {}",
        path.display()
    );
}

/// Rewrites the header of the record at `off` through `edit` and fixes its
/// header checksum, as a forger who knows the format would.
fn forge_header(path: &Path, off: u64, edit: impl FnOnce(&mut [u8])) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut h = [0u8; 128];
    f.read_exact_at(&mut h, off).unwrap();
    edit(&mut h);
    let crc = crc32c::crc32c(&h[..124]);
    h[124..].copy_from_slice(&crc.to_le_bytes());
    f.write_all_at(&h, off).unwrap();
    f.sync_all().unwrap();
}

fn five_records(dir: &Path) {
    let s = NvmeStore::open(cfg(dir)).unwrap();
    for i in 0..5 {
        s.put(&key(i), 1, i as u32, &block(i, LEN)).unwrap();
    }
}

#[test]
fn fifos_never_block_open_inspect_or_the_slot_table() {
    let t = tempfile::tempdir().unwrap();
    five_records(t.path());
    mkfifo(&t.path().join("rank0/seg-000007.kvp"));
    let dir = t.path().to_path_buf();
    let d = dir.clone();
    let s = within(5, "store open", move || NvmeStore::open(cfg(&d)))
        .expect("a FIFO segment entry is skipped, the store opens");
    assert_eq!(s.len(), 5);
    for i in 0..5 {
        assert_eq!(read(&s, &key(i)), block(i, LEN));
    }
    drop(s);
    let d = dir.clone();
    let r = within(5, "inspect", move || inspect(&d, true)).unwrap();
    assert_eq!(r.ranks[0].live_records, 5);
    let d = dir.clone();
    let keys = within(5, "scan_keys", move || kvpark::tier::nvme::scan_keys(&d, 0)).unwrap();
    assert_eq!(keys.len(), 5);

    // A FIFO where the host arena's slot table lives: a clear error, at once.
    let arena = dir.join("host.rank0");
    let table = kvpark::tier::slots::table_path(&arena);
    mkfifo(&table);
    let a = arena.clone();
    let e = within(5, "read_entries", move || {
        kvpark::tier::slots::read_entries(&a)
    })
    .expect_err("a FIFO slot table is refused");
    assert!(e.message().contains("not a regular file"), "{e}");
    assert!(e.message().contains("host.rank0.slots"), "{e}");
    let tb = table.clone();
    let e = within(5, "SlotTable::open", move || {
        kvpark::tier::slots::SlotTable::open(&tb, 4096, 4, 4096).map(|_| ())
    })
    .expect_err("a FIFO slot table is refused");
    assert!(e.message().contains("not a regular file"), "{e}");
}

#[test]
fn slot_table_with_a_huge_slot_count_is_a_corrupt_error() {
    let t = tempfile::tempdir().unwrap();
    let arena = t.path().join("host.rank0");
    let mut b = vec![0u8; 64 + 64];
    b[..8].copy_from_slice(b"KVPSLOT1");
    b[8..16].copy_from_slice(&4096u64.to_le_bytes());
    // 2^58 + 1 slots: 64 * slots wraps to 64 in 64-bit arithmetic.
    b[16..24].copy_from_slice(&((1u64 << 58) + 1).to_le_bytes());
    b[24..32].copy_from_slice(&4096u64.to_le_bytes());
    std::fs::write(kvpark::tier::slots::table_path(&arena), &b).unwrap();
    let e = kvpark::tier::slots::read_entries(&arena).expect_err("refused");
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert!(e.message().contains("288230376151711745 slots"), "{e}");
}

#[test]
fn unusable_segment_entries_are_skipped_and_counted() {
    let t = tempfile::tempdir().unwrap();
    five_records(t.path());
    let rank = t.path().join("rank0");
    // A directory, and a symlink to a copy of a valid segment: neither is
    // used, neither stops the store.
    std::fs::create_dir(rank.join("seg-000005.kvp")).unwrap();
    let elsewhere = t.path().join("elsewhere.kvp");
    std::fs::copy(rank.join("seg-000001.kvp"), &elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, rank.join("seg-000006.kvp")).unwrap();
    {
        let s = NvmeStore::open(cfg(t.path())).expect("bad entries are skipped");
        assert_eq!(s.len(), 5);
        assert_eq!(s.stats().skipped_segments, 2);
        // New records go to a new segment past the skipped names.
        s.put(&key(9), 1, 9, &block(9, LEN)).unwrap();
    }
    assert!(rank.join("seg-000007.kvp").exists());
    let s = NvmeStore::open(cfg(t.path())).unwrap();
    assert_eq!((s.len(), s.stats().skipped_segments), (6, 2));
    assert_eq!(read(&s, &key(9)), block(9, LEN));
    drop(s);
    let r = inspect(t.path(), false).unwrap();
    assert_eq!(
        (r.ranks[0].live_records, r.ranks[0].skipped_segments),
        (6, 2)
    );
    assert!(r.to_string().contains("seg-000006.kvp"), "{r}");
    assert_eq!(kvpark::tier::nvme::scan_keys(t.path(), 0).unwrap().len(), 6);
    // The skipped entries are left alone.
    assert!(std::fs::symlink_metadata(rank.join("seg-000006.kvp"))
        .unwrap()
        .file_type()
        .is_symlink());
}

#[test]
fn a_second_store_on_the_same_rank_directory_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let s1 = NvmeStore::open(cfg(t.path())).unwrap();
    s1.put(&key(1), 1, 1, &block(1, LEN)).unwrap();
    let e = NvmeStore::open(cfg(t.path()))
        .err()
        .expect("a second store on rank0 is refused");
    assert_eq!(e.kind(), ErrorKind::Busy, "{e}");
    let rank_dir = t.path().join("rank0");
    assert!(e.message().contains(&rank_dir.display().to_string()), "{e}");
    assert!(
        e.message().contains(&format!("pid {}", std::process::id())),
        "{e}"
    );
    // Another rank of the same root is independent.
    let mut c1 = cfg(t.path());
    c1.rank = 1;
    let other = NvmeStore::open(c1).unwrap();
    drop(other);
    // The first store is untouched and, once closed, the directory is free.
    assert_eq!(read(&s1, &key(1)), block(1, LEN));
    drop(s1);
    let s2 = NvmeStore::open(cfg(t.path())).unwrap();
    assert_eq!(read(&s2, &key(1)), block(1, LEN));
}

#[test]
fn a_forged_record_length_does_not_hide_the_records_after_it() {
    let t = tempfile::tempdir().unwrap();
    five_records(t.path());
    let seg = t.path().join("rank0/seg-000001.kvp");
    // Record 1 claims 2 GiB with a valid header checksum.
    forge_header(&seg, REC, |h| {
        h[60..64].copy_from_slice(&0x7fff_0000u32.to_le_bytes());
        h[64..68].copy_from_slice(&0x7fff_0000u32.to_le_bytes());
    });
    for verify_on_open in [false, true] {
        let mut c = cfg(t.path());
        c.verify_on_open = verify_on_open;
        let s = NvmeStore::open(c).unwrap();
        let st = s.stats();
        assert_eq!(
            (st.dropped_corrupt, st.dropped_torn, st.recovered_records),
            (1, 0, 4),
            "verify_on_open {verify_on_open}: {st:?}"
        );
        for i in [0, 2, 3, 4] {
            assert_eq!(read(&s, &key(i)), block(i, LEN));
        }
        assert!(!s.contains(&key(1)));
    }
    let r = inspect(t.path(), true).unwrap();
    let rk = &r.ranks[0];
    assert_eq!((rk.live_records, rk.corrupt, rk.torn), (4, 1, 0), "{r}");
    assert_eq!(rk.problems[0].offset, REC);
    assert!(rk.problems[0].reason.contains("past end of file"), "{r}");
}

#[test]
fn zeroed_headers_and_truncation_at_a_record_boundary_are_counted() {
    // A record whose header block was zeroed: its remains follow.
    let t = tempfile::tempdir().unwrap();
    five_records(t.path());
    let seg = t.path().join("rank0/seg-000001.kvp");
    {
        let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
        f.write_all_at(&[0u8; 4096], 2 * REC).unwrap();
    }
    let s = NvmeStore::open(cfg(t.path())).unwrap();
    let st = s.stats();
    assert_eq!(
        (st.dropped_corrupt, st.dropped_torn, st.recovered_records),
        (1, 0, 4),
        "{st:?}"
    );
    drop(s);
    let r = inspect(t.path(), false).unwrap();
    let rk = &r.ranks[0];
    assert_eq!((rk.corrupt, rk.problems[0].offset), (1, 2 * REC), "{r}");
    assert!(rk.problems[0].reason.contains("zeroed"), "{r}");

    // A sealed segment cut exactly at a record boundary.
    let t = tempfile::tempdir().unwrap();
    let mut c = cfg(t.path());
    c.segment_bytes = 3 * REC;
    {
        let s = NvmeStore::open(c.clone()).unwrap();
        for i in 0..6 {
            s.put(&key(i), 1, i as u32, &block(i, LEN)).unwrap();
        }
        assert_eq!(s.stats().segments, 2);
    }
    let seg = t.path().join("rank0/seg-000001.kvp");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(2 * REC)
        .unwrap();
    let s = NvmeStore::open(c.clone()).unwrap();
    let st = s.stats();
    assert_eq!(
        (st.dropped_torn, st.dropped_corrupt, st.recovered_records),
        (1, 0, 5),
        "{st:?}"
    );
    assert!(!s.contains(&key(2)));
    drop(s);
    let r = inspect(t.path(), false).unwrap();
    let rk = &r.ranks[0];
    assert_eq!((rk.torn, rk.corrupt), (1, 0), "{r}");
    assert_eq!(
        (rk.problems[0].segment.as_str(), rk.problems[0].offset),
        ("seg-000001.kvp", 2 * REC)
    );
    assert!(rk.problems[0].reason.contains("trailer"), "{r}");
}

#[test]
fn inspect_verify_decodes_and_refuses_impossible_lengths() {
    let t = tempfile::tempdir().unwrap();
    five_records(t.path());
    let seg = t.path().join("rank0/seg-000001.kvp");
    // Record 1: the codec byte forged to lz4 (its payload is raw bytes).
    forge_header(&seg, REC, |h| h[6] = 1);
    // Record 3: lz4 claiming 4 GiB of raw bytes from a 10000-byte payload.
    forge_header(&seg, 3 * REC, |h| {
        h[6] = 1;
        h[60..64].copy_from_slice(&u32::MAX.to_le_bytes());
    });
    let r = inspect(t.path(), true).unwrap();
    let rk = &r.ranks[0];
    let p: Vec<(u64, BadKind)> = rk.problems.iter().map(|p| (p.offset, p.kind)).collect();
    assert_eq!(
        p,
        vec![(REC, BadKind::Corrupt), (3 * REC, BadKind::Corrupt)],
        "{r}"
    );
    assert!(rk.problems[0].reason.contains("decode"), "{r}");
    assert!(rk.problems[1].reason.contains("raw len 4294967295"), "{r}");
    assert_eq!((rk.checksum_ok, rk.live_records), (3, 3), "{r}");
}
