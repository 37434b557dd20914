//! NVMe store recovery: a writer process killed with SIGKILL mid-stream, a
//! record torn on purpose, clean reopen, newest-record-wins.
//!
//! The writer is this very test binary re-executed with
//! `KVPARK_NVME_WRITER_DIR` set: the killed test function then acts as the
//! writer, printing `ACK <i>` after each `put` returns.

use kvpark::block::BlockKey;
use kvpark::codec::CodecTag;
use kvpark::tier::nvme::{FsyncPolicy, NvmeConfig, NvmeStore};
use kvpark::ErrorKind;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};

const WRITER_ENV: &str = "KVPARK_NVME_WRITER_DIR";
const WRITER_FIRST_ENV: &str = "KVPARK_NVME_WRITER_FIRST";

fn key(i: u64) -> BlockKey {
    BlockKey::derive(b"recovery", &i.to_le_bytes())
}

/// 8 MiB of bf16-like bytes, generated once.
fn base() -> &'static [u8] {
    static BASE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    BASE.get_or_init(|| {
        let mut s = 0x9E37_79B9_7F4A_7C15u64;
        (0..(8 << 20) + 4096)
            .map(|j| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                if j % 2 == 0 {
                    s as u8
                } else {
                    0x3c + (s % 3) as u8
                }
            })
            .collect()
    })
}

/// Block `i`: its size cycles through small and large records; its bytes
/// depend on `i` only (a window of [`base`] starting at `i * 13`), so any
/// record found after a crash can be checked.
fn block(i: u64) -> Vec<u8> {
    let len = [64 << 10, 1 << 20, 3 << 20, (256 << 10) + 123][(i % 4) as usize];
    let start = (i as usize * 13) % 4096;
    base()[start..start + len].to_vec()
}

/// Large blocks for the buffered writer round (a kill most likely lands in a write).
fn big_block(i: u64) -> Vec<u8> {
    let start = (i as usize * 13) % 4096;
    base()[start..start + (8 << 20)].to_vec()
}

fn expected(i: u64) -> Vec<u8> {
    if i >= BIG_FROM {
        big_block(i)
    } else {
        block(i)
    }
}

const BIG_FROM: u64 = 2000;

fn cfg(dir: &Path) -> NvmeConfig {
    let mut c = NvmeConfig::new(dir, 0, 1 << 30);
    c.segment_bytes = 8 << 20;
    c.fsync = FsyncPolicy::EveryRecord;
    c.codec = CodecTag::None;
    c
}

fn read(s: &NvmeStore, k: &BlockKey) -> Vec<u8> {
    let mut v = vec![0u8; s.raw_len(k).expect("indexed") as usize];
    s.get(k, &mut v).unwrap();
    v
}

/// The writer child: puts blocks first.. until killed, acknowledging each.
fn run_writer(dir: &str) -> ! {
    let first: u64 = std::env::var(WRITER_FIRST_ENV).unwrap().parse().unwrap();
    let mut c = cfg(Path::new(dir));
    if first >= BIG_FROM {
        // Buffered, unsynced, 8 MiB records: the kill most likely lands
        // inside a write(2), which a fatal signal cuts short (a torn record).
        c.direct = false;
        c.fsync = FsyncPolicy::Never;
        c.segment_bytes = 64 << 20;
    }
    let store = NvmeStore::open(c).expect("writer: open");
    let mut out = std::io::stdout().lock();
    for i in first.. {
        store
            .put(&key(i), 1, i as u32, &expected(i))
            .expect("writer: put");
        writeln!(out, "ACK {i}").unwrap();
        out.flush().unwrap();
    }
    unreachable!()
}

/// The record number of an `ACK <i>` line. libtest may print its own
/// "test ... " prefix on the same line as the first acknowledgement.
fn ack(line: &str) -> Option<u64> {
    let at = line.find("ACK ")?;
    Some(line[at + 4..].trim().parse().expect("ACK <number>"))
}

#[test]
fn sigkill_mid_stream_keeps_every_acknowledged_record() {
    if let Ok(dir) = std::env::var(WRITER_ENV) {
        run_writer(&dir);
    }
    let t = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut acked: Vec<u64> = Vec::new();
    let mut torn_seen = 0;
    let mut unacked_before = 0u64;
    // Five writer lives on one store, each recovering what the last one
    // left: O_DIRECT + fdatasync per record twice, then buffered with 8 MiB
    // records three times, killed a little after an acknowledgement so that
    // the kill tends to land inside the next record's write(2).
    for (round, kill_after, delay_ms) in [
        (0u64, 9usize, 0u64),
        (1, 14, 0),
        (2, 3, 20),
        (3, 3, 40),
        (4, 3, 30),
    ] {
        let first = round * 1000;
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "sigkill_mid_stream_keeps_every_acknowledged_record",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(WRITER_ENV, t.path())
            .env(WRITER_FIRST_ENV, first.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut n = 0;
        while n < kill_after {
            let line = lines
                .next()
                .expect("writer ended before being killed")
                .unwrap();
            if let Some(i) = ack(&line) {
                acked.push(i);
                n += 1;
            }
        }
        // The writer is inside its next put (copy, checksum, write or
        // fdatasync); a short pause moves the kill towards the write.
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        child.kill().unwrap(); // SIGKILL
        let status = child.wait().unwrap();
        assert_eq!(
            status.signal(),
            Some(libc::SIGKILL),
            "writer killed, not exited"
        );
        // Acknowledgements already in the pipe count too.
        for line in lines {
            if let Some(i) = ack(&line.unwrap()) {
                acked.push(i);
            }
        }

        let s = NvmeStore::open(cfg(t.path())).unwrap();
        let st = s.stats();
        assert_eq!(st.dropped_corrupt, 0, "{st:?}");
        for &i in &acked {
            assert_eq!(
                read(&s, &key(i)),
                expected(i),
                "acknowledged record {i} byte-exact"
            );
        }
        // Whatever else is indexed (a record written but not yet
        // acknowledged when the kill came) is complete and byte-exact too.
        for k in s.keys() {
            let i = k.seq as u64;
            assert_eq!(k.key, key(i));
            assert_eq!(read(&s, &k.key), expected(i), "indexed record {i}");
        }
        // This kill interrupted at most one put: either its record is torn
        // (dropped, counted) or it is complete (indexed, unacknowledged).
        let new_torn = st.dropped_torn - torn_seen;
        let unacked = (s.len() - acked.len()) as u64;
        assert!(unacked >= unacked_before, "{st:?}");
        assert!(new_torn + (unacked - unacked_before) <= 1, "{st:?}");
        torn_seen = st.dropped_torn;
        unacked_before = unacked;
        eprintln!(
            "round {round}: {} acknowledged, {} indexed, dropped_torn {} (kill after {delay_ms} ms)",
            acked.len(),
            s.len(),
            st.dropped_torn
        );
    }
}

#[test]
fn truncated_last_record_is_torn_dropped_and_counted() {
    let t = tempfile::tempdir().unwrap();
    let mut c = cfg(t.path());
    c.codec = CodecTag::None;
    c.fsync = FsyncPolicy::PerSegment;
    let raw = |i: u64| block(i)[..10_000].to_vec(); // 4096 + 12288 = 16384 on disk
    const REC: u64 = 16384;
    {
        let s = NvmeStore::open(c.clone()).unwrap();
        for i in 0..5 {
            s.put(&key(i), 1, i as u32, &raw(i)).unwrap();
        }
    }
    let seg = t.path().join("rank0/seg-000001.kvp");
    // Five records and the 4 KiB seal trailer written at close.
    assert_eq!(std::fs::metadata(&seg).unwrap().len(), 5 * REC + 4096);
    // Cut the last record in the middle of its payload.
    let last = 4 * REC;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(last + 4096 + 5000)
        .unwrap();
    {
        let s = NvmeStore::open(c.clone()).unwrap();
        let st = s.stats();
        assert_eq!((st.dropped_torn, st.dropped_corrupt), (1, 0), "{st:?}");
        assert_eq!(st.recovered_records, 4);
        assert_eq!(s.len(), 4);
        for i in 0..4 {
            assert_eq!(read(&s, &key(i)), raw(i));
        }
        assert!(!s.contains(&key(4)));
        let e = s.get(&key(4), &mut vec![0u8; 10_000]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound);
        // The store keeps working: the key is written again (to a new segment).
        s.put(&key(4), 1, 4, &raw(4)).unwrap();
    }
    let r = kvpark::tier::nvme::inspect(t.path(), true).unwrap();
    let p = &r.ranks[0].problems;
    assert_eq!(p.len(), 1, "{r}");
    assert_eq!(
        (p[0].segment.as_str(), p[0].offset),
        ("seg-000001.kvp", last)
    );
    assert_eq!(p[0].kind, kvpark::tier::nvme::BadKind::Torn);
    assert!(
        p[0].reason.contains("5000 of 10000 bytes present"),
        "{}",
        p[0].reason
    );

    // Cut the header itself short: also torn.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(3 * REC + 60)
        .unwrap();
    let s = NvmeStore::open(c).unwrap();
    let st = s.stats();
    assert_eq!((st.dropped_torn, st.dropped_corrupt), (1, 0), "{st:?}");
    assert_eq!(s.len(), 4, "keys 0..3 from seg 1, key 4 from seg 2");
    assert!(!s.contains(&key(3)));
    assert_eq!(read(&s, &key(4)), raw(4));
}

#[test]
fn clean_reopen_recovers_every_record() {
    for verify_on_open in [false, true] {
        let t = tempfile::tempdir().unwrap();
        let mut c = cfg(t.path());
        c.fsync = FsyncPolicy::Never;
        c.verify_on_open = verify_on_open;
        let n = 24u64;
        {
            let s = NvmeStore::open(c.clone()).unwrap();
            let rx = s.completions();
            for i in 0..n {
                s.submit_put(key(i), 7, i as u32, block(i)).unwrap();
            }
            for _ in 0..n {
                let done = rx.recv().unwrap();
                done.result.unwrap();
            }
            assert!(s.stats().segments >= 3);
        }
        let s = NvmeStore::open(c).unwrap();
        let st = s.stats();
        assert_eq!(
            (st.recovered_records, st.dropped_torn, st.dropped_corrupt),
            (n, 0, 0)
        );
        assert_eq!(s.len() as u64, n);
        for i in 0..n {
            let mut v = vec![0u8; block(i).len()];
            let info = s.get(&key(i), &mut v).unwrap();
            assert_eq!(v, block(i));
            assert_eq!((info.session, info.seq), (7, i as u32));
        }
        let keys = s.keys();
        assert_eq!(
            keys.iter().map(|k| k.seq as u64).collect::<Vec<_>>(),
            (0..n).collect::<Vec<_>>()
        );
    }
}

#[test]
fn newest_record_of_a_rewritten_key_wins_across_segments_and_gc() {
    let t = tempfile::tempdir().unwrap();
    let mut c = cfg(t.path());
    c.fsync = FsyncPolicy::Never;
    c.segment_bytes = 2 << 20;
    let k = key(42);
    {
        let s = NvmeStore::open(c.clone()).unwrap();
        // Version v lives in a different segment each time.
        for v in 0..4u64 {
            s.put(&k, v, v as u32, &block(100 + v)).unwrap();
            s.put(&key(1000 + v), 0, 0, &block(2)).unwrap(); // 3 MiB filler: forces a roll
        }
        assert_eq!(read(&s, &k), block(103));
    }
    {
        let s = NvmeStore::open(c.clone()).unwrap();
        assert_eq!(read(&s, &k), block(103));
        let mut v = vec![0u8; block(103).len()];
        assert_eq!(s.get(&k, &mut v).unwrap().session, 3);
        // Compaction copies the live version forward with its lsn; the dead
        // versions go away with their segments.
        for v in 0..4 {
            s.remove(&key(1000 + v));
        }
        let r = s.gc().unwrap();
        assert!(r.segments_deleted >= 3, "{r:?}");
        s.put(&key(7), 0, 0, &block(7)).unwrap();
    }
    let s = NvmeStore::open(c).unwrap();
    assert_eq!(read(&s, &k), block(103));
    assert_eq!(read(&s, &key(7)), block(7));
}
