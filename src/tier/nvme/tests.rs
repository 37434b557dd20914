//! Unit tests of the NVMe store (fault tests live in tests/nvme_*.rs).

use super::*;
use crate::block::BlockKey;
use crate::error::ErrorKind;
use std::time::Duration;

fn key(i: u64) -> BlockKey {
    BlockKey::derive(b"t", &i.to_le_bytes())
}

/// bf16-like bytes: random low byte, skewed high byte (compressible by planes).
fn kv_like(n: usize, seed: u64) -> Vec<u8> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|i| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            if i % 2 == 0 {
                s as u8
            } else {
                0x3c + (s % 4) as u8
            }
        })
        .collect()
}

fn cfg(dir: &std::path::Path) -> NvmeConfig {
    let mut c = NvmeConfig::new(dir, 3, 64 << 20);
    c.segment_bytes = 1 << 20;
    c.fsync = FsyncPolicy::Never;
    c
}

fn read(s: &NvmeStore, k: &BlockKey) -> Vec<u8> {
    let mut v = vec![0u8; s.raw_len(k).expect("indexed") as usize];
    s.get(k, &mut v).unwrap();
    v
}

#[test]
fn round_trip_every_codec_and_reopen() {
    for codec in [CodecTag::None, CodecTag::Lz4, CodecTag::Lz4Planes] {
        let t = tempfile::tempdir().unwrap();
        let mut c = cfg(t.path());
        c.codec = codec;
        let blocks: Vec<Vec<u8>> = (0..12)
            .map(|i| kv_like(120_000 + i * 977, i as u64))
            .collect();
        {
            let s = NvmeStore::open(c.clone()).unwrap();
            for (i, b) in blocks.iter().enumerate() {
                s.put(&key(i as u64), 77, i as u32, b).unwrap();
            }
            for (i, b) in blocks.iter().enumerate() {
                let mut dst = vec![0u8; b.len()];
                let info = s.get(&key(i as u64), &mut dst).unwrap();
                assert_eq!(&dst, b);
                assert_eq!(
                    (info.session, info.seq, info.raw_len),
                    (77, i as u32, b.len() as u32)
                );
                if codec == CodecTag::Lz4Planes {
                    assert_eq!(info.codec, CodecTag::Lz4Planes);
                    assert!(info.stored_len < info.raw_len);
                }
            }
            let st = s.stats();
            assert_eq!(st.puts, 12);
            assert_eq!(st.records, 12);
            assert!(st.segments >= 2, "1 MiB segments roll: {}", st.segments);
        }
        let s = NvmeStore::open(c).unwrap();
        assert_eq!(s.len(), 12);
        assert_eq!(s.stats().recovered_records, 12);
        for (i, b) in blocks.iter().enumerate() {
            assert_eq!(&read(&s, &key(i as u64)), b, "{} block {i}", codec.name());
        }
        let keys = s.keys();
        assert_eq!(keys.len(), 12);
        assert_eq!(keys[5].seq, 5);
        assert_eq!(keys[5].raw_len as usize, blocks[5].len());
    }
}

#[test]
fn files_and_dirs_have_private_modes() {
    use std::os::unix::fs::PermissionsExt;
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("store");
    let s = NvmeStore::open(cfg(&root)).unwrap();
    s.put(&key(1), 1, 1, &[7u8; 100]).unwrap();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&root), 0o700);
    assert_eq!(mode(s.rank_dir()), 0o700);
    assert_eq!(s.rank_dir(), root.join("rank3"));
    assert_eq!(mode(&s.rank_dir().join("seg-000001.kvp")), 0o600);
}

#[test]
fn rewritten_key_newest_wins_and_old_bytes_are_dead() {
    let t = tempfile::tempdir().unwrap();
    let c = cfg(t.path());
    {
        let s = NvmeStore::open(c.clone()).unwrap();
        s.put(&key(1), 1, 0, &[1u8; 5000]).unwrap();
        s.put(&key(2), 1, 1, &[2u8; 5000]).unwrap();
        s.put(&key(1), 2, 9, &[3u8; 7000]).unwrap();
        let st = s.stats();
        assert_eq!(st.records, 2);
        // Each record: a 4 KiB header block + the payload padded to 8 KiB.
        assert_eq!(st.live_bytes, 2 * 12288);
        assert_eq!(st.dead_bytes, 12288);
        assert_eq!(read(&s, &key(1)), vec![3u8; 7000]);
    }
    let s = NvmeStore::open(c).unwrap();
    assert_eq!(read(&s, &key(1)), vec![3u8; 7000]);
    let mut d = vec![0u8; 7000];
    assert_eq!(s.get(&key(1), &mut d).unwrap().session, 2);
    let st = s.stats();
    assert_eq!((st.records, st.dead_bytes), (2, 12288));
}

#[test]
fn wrong_dst_len_and_missing_key_are_clear_errors() {
    let t = tempfile::tempdir().unwrap();
    let s = NvmeStore::open(cfg(t.path())).unwrap();
    s.put(&key(1), 1, 0, &[1u8; 10]).unwrap();
    let e = s.get(&key(1), &mut [0u8; 9]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    assert!(e.message().contains("raw length is 10"), "{e}");
    let e = s.get(&key(2), &mut [0u8; 10]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert_eq!(s.stats().get_misses, 1);
    let mut bad = cfg(t.path());
    bad.segment_bytes = 1000;
    let e = NvmeStore::open(bad).err().unwrap();
    assert_eq!(e.kind(), ErrorKind::Config);
    assert!(e.message().contains("segment_bytes"));
}

#[test]
fn capacity_cap_runs_gc_then_refuses_with_no_space() {
    let t = tempfile::tempdir().unwrap();
    let mut c = cfg(t.path());
    c.capacity_bytes = 10 * 36_864; // ten records of 32 KiB + header block
    c.segment_bytes = 4 * 36_864;
    let s = NvmeStore::open(c).unwrap();
    let block = |i: u64| kv_like(32 * 1024, i);
    for i in 0..10 {
        s.put(&key(i), 1, i as u32, &block(i)).unwrap();
    }
    let e = s.put(&key(10), 1, 10, &block(10)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NoSpace);
    assert!(e.message().contains("capacity cap"), "{e}");
    assert_eq!(s.stats().no_space_errors, 1);
    // Everything stored is still there.
    for i in 0..10 {
        assert_eq!(read(&s, &key(i)), block(i));
    }
    // Free two records of the first (sealed) segment: the next puts trigger GC,
    // which copies the segment's two live records forward and deletes it.
    assert!(s.remove(&key(0)));
    assert!(s.remove(&key(1)));
    assert!(!s.remove(&key(1)));
    s.put(&key(10), 1, 10, &block(10)).unwrap();
    s.put(&key(11), 1, 11, &block(11)).unwrap();
    let st = s.stats();
    assert!(st.gc_segments_deleted >= 1, "{st:?}");
    assert!(st.used_bytes <= 10 * 36_864 + 4 * 36_864, "{st:?}");
    for i in 2..12 {
        assert_eq!(read(&s, &key(i)), block(i), "key {i}");
    }
    assert!(!s.contains(&key(0)));
    let e = s.put(&key(99), 1, 0, &vec![0u8; 11 * 36_864]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NoSpace);
    assert!(e.message().contains("exceeds the capacity cap"), "{e}");
}

#[test]
fn explicit_gc_compacts_and_survives_reopen() {
    let t = tempfile::tempdir().unwrap();
    let c = cfg(t.path());
    let block = |i: u64| kv_like(200_000, i);
    {
        let s = NvmeStore::open(c.clone()).unwrap();
        for i in 0..20 {
            s.put(&key(i), 1, i as u32, &block(i)).unwrap();
        }
        let before = s.stats();
        for i in (0..20).filter(|i| i % 3 != 0) {
            s.remove(&key(i));
        }
        let r = s.gc().unwrap();
        assert!(r.segments_deleted >= 3, "{r:?}");
        assert!(r.bytes_freed > 0);
        let after = s.stats();
        assert_eq!(after.records, 7);
        assert!(after.used_bytes < before.used_bytes);
        assert_eq!(after.gc_records_moved, r.records_moved);
        for i in (0..20).filter(|i| i % 3 == 0) {
            assert_eq!(read(&s, &key(i)), block(i));
        }
    }
    let s = NvmeStore::open(c).unwrap();
    for i in (0..20).filter(|i| i % 3 == 0) {
        assert_eq!(read(&s, &key(i)), block(i), "key {i} after reopen");
    }
    // GC copies keep their lsn: no key is duplicated, every moved record is
    // the only live one.
    assert_eq!(s.len(), s.keys().len());
}

#[test]
fn async_requests_complete_with_bytes_and_tickets() {
    let t = tempfile::tempdir().unwrap();
    let mut c = cfg(t.path());
    c.codec = CodecTag::Lz4Planes;
    c.io_threads = 3;
    c.queue_depth = 2;
    let s = NvmeStore::open(c).unwrap();
    let rx = s.completions();
    let mut tickets = std::collections::HashMap::new();
    for i in 0..16u64 {
        let t = s
            .submit_put(key(i), 5, i as u32, kv_like(60_000, i))
            .unwrap();
        tickets.insert(t, i);
    }
    let mut seen = 0;
    while seen < 16 {
        let c = rx.recv_timeout(Duration::from_secs(20)).unwrap();
        assert_eq!(c.op, OpKind::Put);
        let i = tickets.remove(&c.ticket).expect("known ticket");
        assert_eq!(c.key, key(i));
        assert!(c.result.unwrap().is_none());
        assert_eq!(c.data, kv_like(60_000, i), "the put buffer comes back");
        seen += 1;
    }
    assert!(rx.try_recv().is_err(), "nothing extra");
    for i in 0..16u64 {
        let t = s.submit_get(key(i), 60_000).unwrap();
        tickets.insert(t, i);
    }
    let t = s.submit_get(key(99), 10).unwrap();
    let mut misses = 0;
    for _ in 0..17 {
        let c = rx.recv_timeout(Duration::from_secs(20)).unwrap();
        if c.ticket == t {
            assert_eq!(c.result.unwrap_err().kind(), ErrorKind::NotFound);
            misses += 1;
            continue;
        }
        let i = tickets.remove(&c.ticket).unwrap();
        let info = c.result.unwrap().unwrap();
        assert_eq!(info.codec, CodecTag::Lz4Planes);
        assert_eq!(c.data, kv_like(60_000, i));
    }
    assert_eq!(misses, 1);
    assert!(tickets.is_empty());
    s.close().unwrap();
    assert_eq!(
        s.submit_get(key(1), 1).unwrap_err().kind(),
        ErrorKind::Closed
    );
}

#[test]
fn direct_refusal_falls_back_to_buffered_with_reason() {
    let t = tempfile::tempdir().unwrap();
    store::FAKE_DIRECT_REFUSAL.with(|f| f.set(true));
    let s = NvmeStore::open(cfg(t.path()));
    store::FAKE_DIRECT_REFUSAL.with(|f| f.set(false));
    let s = s.unwrap();
    assert!(!s.is_direct());
    let st = s.stats();
    assert!(!st.direct);
    assert!(st
        .direct_fallback
        .as_deref()
        .unwrap()
        .contains("O_DIRECT refused"));
    s.put(&key(1), 1, 1, &[9u8; 3000]).unwrap();
    assert_eq!(read(&s, &key(1)), vec![9u8; 3000]);
    let json = serde_json::to_string(&st).unwrap();
    assert!(json.contains("\"direct_fallback\":\"O_DIRECT refused"));
}

#[test]
fn direct_io_is_used_on_this_fs_when_it_allows() {
    // The probe either succeeds (O_DIRECT on) or records why not; never silent.
    let t = tempfile::tempdir().unwrap();
    let s = NvmeStore::open(cfg(t.path())).unwrap();
    let st = s.stats();
    assert_eq!(st.direct, st.direct_fallback.is_none());
    s.put(&key(1), 1, 1, &kv_like(12_345, 1)).unwrap();
    assert_eq!(read(&s, &key(1)), kv_like(12_345, 1));
}

#[test]
fn inspect_reports_codecs_and_dead_records() {
    let t = tempfile::tempdir().unwrap();
    let mut c = cfg(t.path());
    c.codec = CodecTag::Lz4Planes;
    {
        let s = NvmeStore::open(c.clone()).unwrap();
        for i in 0..4 {
            s.put(&key(i), 1, i as u32, &kv_like(64 * 1024, i)).unwrap();
        }
        s.put(&key(0), 1, 0, &kv_like(64 * 1024, 100)).unwrap();
        let mut noise = vec![0u8; 8192];
        let mut x = 0x1234_5678_9abc_def1u64;
        for b in noise.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = (x >> 24) as u8;
        }
        s.put(&key(9), 1, 9, &noise).unwrap(); // incompressible: stored raw
    }
    let r = inspect(t.path(), true).unwrap();
    assert_eq!(r.ranks.len(), 1);
    let rk = &r.ranks[0];
    assert_eq!(rk.rank, Some(3));
    assert_eq!((rk.records, rk.live_records, rk.dead_records), (6, 5, 1));
    assert_eq!(rk.checksum_ok, 6);
    assert_eq!((rk.torn, rk.corrupt), (0, 0));
    let planes = rk.codecs.iter().find(|c| c.codec == "lz4-planes").unwrap();
    assert_eq!(planes.records, 4);
    assert_eq!(planes.raw_bytes, 4 * 64 * 1024);
    assert!(planes.ratio > 1.05, "{}", planes.ratio);
    let none = rk.codecs.iter().find(|c| c.codec == "none").unwrap();
    assert_eq!(
        (none.records, none.raw_bytes, none.stored_bytes),
        (1, 8192, 8192)
    );
    let text = r.to_string();
    assert!(text.contains("lz4-planes"), "{text}");
    assert!(text.contains("torn 0   corrupt 0"), "{text}");
    // A rank directory can be inspected directly, too.
    let r2 = inspect(&t.path().join("rank3"), false).unwrap();
    assert_eq!(r2.ranks[0].live_records, 5);
    assert!(inspect(&t.path().join("nope"), false).is_err());
}

/// Builds one on-disk record (header + payload + padding).
fn raw_record(k: &BlockKey, lsn: u64, payload: &[u8]) -> Vec<u8> {
    let hdr = format::RecordHeader {
        key: *k,
        session: 1,
        lsn,
        seq: 0,
        codec: CodecTag::None,
        elem_size: 2,
        raw_len: payload.len() as u32,
        stored_len: payload.len() as u32,
        payload_crc: crc32c::crc32c(payload),
        flags: 0,
    };
    let mut v = vec![0u8; hdr.padded_len() as usize];
    hdr.encode(&mut v);
    v[format::PAYLOAD_OFF..format::PAYLOAD_OFF + payload.len()].copy_from_slice(payload);
    v
}

fn scan_file(bytes: &[u8]) -> Vec<String> {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("seg-000001.kvp");
    std::fs::write(&p, bytes).unwrap();
    let f = std::fs::File::open(&p).unwrap();
    let pool = aligned::BufPool::new(2);
    let mut out = Vec::new();
    scan::scan_segment(&f, bytes.len() as u64, 1, true, true, &pool, |it| {
        out.push(match it {
            scan::ScanItem::Record { off, hdr } => format!("rec@{off} lsn{}", hdr.lsn),
            scan::ScanItem::Bad { off, kind, .. } => format!("{kind:?}@{off}"),
        })
    })
    .unwrap();
    out
}

#[test]
fn scan_skips_holes_and_wiped_headers_and_counts_each_loss_once() {
    let a = raw_record(&key(1), 1, &[1u8; 5000]); // 4096 + 8192 bytes
    let b = raw_record(&key(2), 2, &[2u8; 9000]); // 4096 + 12288 bytes
    assert_eq!((a.len(), b.len()), (12288, 16384));
    let wiped = vec![0u8; 16384]; // a failed write the store punched out
    let mut file = a.clone();
    file.extend(vec![0u8; 4096]); // a hole
    file.extend(&wiped);
    file.extend(&b);
    assert_eq!(scan_file(&file), vec!["rec@0 lsn1", "rec@32768 lsn2"]);

    // A zeroed header block with the record's remains after it: one loss,
    // at the first zero block where a record was expected.
    let mut zeroed = raw_record(&key(3), 3, &[3u8; 9000]);
    zeroed[..4096].fill(0);
    let mut file = a.clone();
    file.extend(&zeroed);
    file.extend(&b);
    assert_eq!(
        scan_file(&file),
        vec!["rec@0 lsn1", "Corrupt@12288", "rec@28672 lsn2"]
    );

    // A flipped magic right after a record: one corrupt record, its payload
    // blocks are not counted again, the next record is found.
    let mut bad = raw_record(&key(4), 4, &[4u8; 9000]);
    bad[0] ^= 0xff;
    let mut file = a.clone();
    file.extend(&bad);
    file.extend(&b);
    assert_eq!(
        scan_file(&file),
        vec!["rec@0 lsn1", "Corrupt@12288", "rec@28672 lsn2"]
    );

    // A version 1 record (payload right after the 128-byte header) is
    // refused as corrupt, its remains not counted again.
    let mut old = raw_record(&key(6), 6, &[6u8; 9000]);
    old[4..6].copy_from_slice(&1u16.to_le_bytes());
    let crc = crc32c::crc32c(&old[..124]);
    old[124..128].copy_from_slice(&crc.to_le_bytes());
    let mut file = old;
    file.extend(&b);
    assert_eq!(scan_file(&file), vec!["Corrupt@0", "rec@16384 lsn2"]);

    // A flipped payload byte: corrupt (with verify), skipped by its length.
    let mut c = raw_record(&key(5), 5, &[5u8; 9000]);
    c[format::PAYLOAD_OFF + 5000] ^= 1;
    let mut file = c;
    file.extend(&b);
    assert_eq!(scan_file(&file), vec!["Corrupt@0", "rec@16384 lsn2"]);

    // Truncated anywhere in the last record: torn, the walk ends.
    let mut file = a.clone();
    file.extend(&b[..5000]);
    assert_eq!(scan_file(&file), vec!["rec@0 lsn1", "Torn@12288"]);
    let mut file = a;
    file.extend(&b[..100]);
    assert_eq!(scan_file(&file), vec!["rec@0 lsn1", "Torn@12288"]);
}

/// An aligned copy of `bytes` (as a host-arena slot holds a block).
fn aligned_copy(bytes: &[u8]) -> aligned::AlignedBuf {
    let mut b = aligned::AlignedBuf::new(bytes.len()).unwrap();
    b[..bytes.len()].copy_from_slice(bytes);
    b
}

/// The bytes of the `rec`-th record written (0-based), as found on disk.
fn record_on_disk(s: &NvmeStore, payload_len: usize, rec: usize) -> Vec<u8> {
    // Segments hold whole records (then a seal trailer once sealed): their
    // record areas, concatenated, are the record log.
    let mut names: Vec<_> = std::fs::read_dir(s.rank_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "kvp"))
        .collect();
    names.sort();
    let f: Vec<u8> = names
        .iter()
        .flat_map(|p| {
            let mut b = std::fs::read(p).unwrap();
            if b.len() >= 4096 && format::Trailer::decode(&b[b.len() - 4096..]).is_some() {
                b.truncate(b.len() - 4096);
            }
            b
        })
        .collect();
    let mut off = 0;
    for _ in 0..rec {
        let h = format::RecordHeader::decode(&f[off..]).unwrap();
        off += h.padded_len() as usize;
    }
    let n = format::padded_len(payload_len as u32) as usize;
    f[off..off + n].to_vec()
}

#[test]
fn zero_copy_put_and_get_round_trip_with_partial_last_block() {
    let t = tempfile::tempdir().unwrap();
    let s = NvmeStore::open(cfg(t.path())).unwrap();
    // Below and above the size from which reads are split in two halves
    // (8 MiB).
    let lens = [
        1usize,
        4096,
        5000,
        3 * 4096,
        2 * 4096 + 1,
        70_000,
        8 << 20,
        (17 << 20) / 2 + 4096 * 3 + 100,
    ];
    for (i, &len) in lens.iter().enumerate() {
        let data = kv_like(len, i as u64 + 1);
        let src = aligned_copy(&data);
        s.put(&key(i as u64), 1, i as u32, &src[..len]).unwrap();
        // On disk: header block, payload at +4096, zeros to 4 KiB.
        let rec = record_on_disk(&s, len, i);
        let hdr = format::RecordHeader::decode(&rec).unwrap();
        assert_eq!((hdr.raw_len as usize, hdr.codec), (len, CodecTag::None));
        assert_eq!(hdr.payload_crc, crc32c::crc32c(&data));
        assert!(rec[format::HEADER_LEN..format::PAYLOAD_OFF]
            .iter()
            .all(|&b| b == 0));
        assert_eq!(
            &rec[format::PAYLOAD_OFF..format::PAYLOAD_OFF + len],
            &data[..]
        );
        assert!(rec[format::PAYLOAD_OFF + len..].iter().all(|&b| b == 0));
        // Zero-copy read into an aligned buffer, and the copying read into
        // an unaligned one, give the same bytes.
        let mut dst = aligned::AlignedBuf::new(len).unwrap();
        dst.fill(0xee);
        let info = s.get(&key(i as u64), &mut dst[..len]).unwrap();
        assert_eq!((info.raw_len as usize, info.seq), (len, i as u32));
        assert_eq!(&dst[..len], &data[..], "len {len}");
        let mut un = vec![0u8; len + 1];
        s.get(&key(i as u64), &mut un[1..]).unwrap();
        assert_eq!(&un[1..], &data[..]);
    }
    // A record written by the copying path (unaligned source) reads back
    // through the zero-copy path.
    let data = kv_like(9000, 77);
    let mut un = vec![0u8; 9001];
    un[1..].copy_from_slice(&data);
    s.put(&key(100), 1, 0, &un[1..]).unwrap();
    let mut dst = aligned::AlignedBuf::new(9000).unwrap();
    s.get(&key(100), &mut dst[..9000]).unwrap();
    assert_eq!(&dst[..9000], &data[..]);
    let st = s.stats();
    assert_eq!((st.gets, st.read_corrupt), (2 * lens.len() as u64 + 1, 0));
    // And everything survives a reopen.
    drop(s);
    let s = NvmeStore::open(cfg(t.path())).unwrap();
    for (i, &len) in lens.iter().enumerate() {
        assert_eq!(read(&s, &key(i as u64)), kv_like(len, i as u64 + 1));
    }
}

#[test]
fn submit_put_raw_writes_from_caller_memory() {
    let t = tempfile::tempdir().unwrap();
    let s = NvmeStore::open(cfg(t.path())).unwrap();
    let rx = s.completions();
    let datas: Vec<Vec<u8>> = (0..6).map(|i| kv_like(8192 + 100 * i, i as u64)).collect();
    let srcs: Vec<aligned::AlignedBuf> = datas.iter().map(|d| aligned_copy(d)).collect();
    let mut tickets = Vec::new();
    for (i, (d, b)) in datas.iter().zip(&srcs).enumerate() {
        // SAFETY: `srcs` is neither dropped nor written until every
        // completion has been received below.
        let t = unsafe { s.submit_put_raw(key(i as u64), 7, i as u32, b.as_ptr(), d.len()) };
        tickets.push(t.unwrap());
    }
    let mut seen = Vec::new();
    for _ in 0..tickets.len() {
        let c = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(c.op, OpKind::Put);
        assert!(c.result.unwrap().is_none());
        assert!(c.data.is_empty());
        seen.push(c.ticket);
    }
    seen.sort();
    assert_eq!(seen, tickets);
    drop(srcs);
    for (i, d) in datas.iter().enumerate() {
        assert_eq!(&read(&s, &key(i as u64)), d);
    }
    assert_eq!(s.stats().puts, 6);
}

#[test]
fn zero_copy_get_of_a_corrupt_record_is_dropped_and_zeroed() {
    // One record with a partial last block, one without; a byte flipped in
    // each part (whole blocks / partial block) of the payload.
    let big = (8 << 20) + 4096 + 700; // split read: two halves and a partial block
    for (len, flip_at) in [
        (3 * 4096, 5000),
        (2 * 4096 + 100, 2 * 4096 + 50),
        (big, 10),
        (big, (4 << 20) + 4096),
        (big, big - 1),
    ] {
        let t = tempfile::tempdir().unwrap();
        let s = NvmeStore::open(cfg(t.path())).unwrap();
        let data = kv_like(len, 3);
        s.put(&key(1), 1, 0, &aligned_copy(&data)[..len]).unwrap();
        s.put(&key(2), 1, 1, &aligned_copy(&data)[..len]).unwrap();
        let seg = s.rank_dir().join("seg-000001.kvp");
        let mut f = std::fs::read(&seg).unwrap();
        f[format::PAYLOAD_OFF + flip_at] ^= 0x40;
        std::fs::write(&seg, &f).unwrap();
        let mut dst = aligned::AlignedBuf::new(len).unwrap();
        let e = s.get(&key(1), &mut dst[..len]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        assert!(e.message().contains("payload checksum mismatch"), "{e}");
        assert!(
            dst[..len].iter().all(|&b| b == 0),
            "no record bytes left behind"
        );
        assert!(!s.contains(&key(1)));
        assert_eq!(s.stats().read_corrupt, 1);
        // The key is gone: a second read is a miss, not a second corrupt.
        assert_eq!(
            s.get(&key(1), &mut dst[..len]).unwrap_err().kind(),
            ErrorKind::NotFound
        );
        // The neighbour is untouched.
        s.get(&key(2), &mut dst[..len]).unwrap();
        assert_eq!(&dst[..len], &data[..]);
    }
}

#[test]
fn zero_copy_get_checks_the_header_block() {
    let t = tempfile::tempdir().unwrap();
    let s = NvmeStore::open(cfg(t.path())).unwrap();
    let data = kv_like(8192, 5);
    s.put(&key(1), 1, 0, &aligned_copy(&data)[..8192]).unwrap();
    let seg = s.rank_dir().join("seg-000001.kvp");
    let mut f = std::fs::read(&seg).unwrap();
    f[50] ^= 1; // inside the header (lsn field)
    std::fs::write(&seg, &f).unwrap();
    let mut dst = aligned::AlignedBuf::new(8192).unwrap();
    let e = s.get(&key(1), &mut dst[..8192]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt);
    assert!(e.message().contains("header checksum mismatch"), "{e}");
    assert!(dst[..8192].iter().all(|&b| b == 0));
    assert_eq!(s.stats().read_corrupt, 1);
}
