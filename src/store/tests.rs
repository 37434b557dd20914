use super::*;
use std::path::Path;

fn cfg(json: &str) -> Config {
    Config::from_json(json.as_bytes()).unwrap()
}

fn nvme_cfg(dir: &Path, host: &str) -> Config {
    cfg(&format!(
        r#"{{"host_bytes":"{host}","nvme_dir":{:?},"nvme_bytes":"64MiB","nvme_segment_bytes":"1MiB","model_identity":"m"}}"#,
        dir.to_str().unwrap()
    ))
}

fn chunk(seed: u8, n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn get(s: &ChunkStore, key: &[u8]) -> Result<Vec<u8>> {
    let info = s.lookup(key)?;
    let mut buf = vec![0u8; info.data_len as usize];
    let n = s.get(key, &mut buf)?;
    buf.truncate(n);
    Ok(buf)
}

fn counters(s: &ChunkStore) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_str(&s.metrics_json()).unwrap();
    v["store"].clone()
}

#[test]
fn round_trip_short_chunks_and_limits() {
    let s = ChunkStore::open(&cfg(r#"{"host_bytes":"1MiB"}"#), 0, 8192, 2).unwrap();
    assert_eq!(s.inner.arena.slot_bytes(), 12288);
    let full = chunk(1, 8192);
    let short = chunk(2, 1000);
    assert!(s.put(b"a", b"meta-a", &full).unwrap());
    assert!(s.put(b"b", b"", &short).unwrap());
    assert!(!s.put(b"a", b"meta-a", &full).unwrap(), "duplicate put");
    assert_eq!(get(&s, b"a").unwrap(), full);
    assert_eq!(get(&s, b"b").unwrap(), short);
    assert_eq!(s.lookup(b"a").unwrap().meta, b"meta-a");
    assert_eq!(s.lookup(b"c").unwrap_err().kind(), ErrorKind::NotFound);
    assert!(s.contains(b"a", false).unwrap() && !s.contains(b"c", false).unwrap());
    let mut small = vec![0u8; 10];
    assert_eq!(
        s.get(b"a", &mut small).unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    assert!(small.iter().all(|b| *b == 0), "no partial output");
    let e = s.put(b"big", b"", &chunk(3, 8193)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    let e = s.put(b"m", &vec![0; MAX_META + 1], b"x").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    let c = counters(&s);
    assert_eq!(
        (
            c["puts"].as_u64(),
            c["put_duplicates"].as_u64(),
            c["put_too_large"].as_u64()
        ),
        (Some(2), Some(1), Some(2))
    );
    assert_eq!(c["gets"], 2);
    assert!(s.remove(b"a").unwrap() && !s.remove(b"a").unwrap());
    assert!(!s.contains(b"a", false).unwrap());
}

#[test]
fn keys_are_namespaced_by_model_and_domain() {
    let a = chunk_key(&ModelNs::of("m1"), b"k");
    assert_ne!(a, chunk_key(&ModelNs::of("m2"), b"k"));
    assert_ne!(a, chunk_key(&ModelNs::of("m1"), b"k2"));
    assert_ne!(a, BlockKey::derive_in(&ModelNs::of("m1"), b"", b"k"));
}

#[test]
fn host_only_store_drops_least_recently_used_chunks() {
    // 1 MiB of 8 KiB + 4 KiB slots: 85 slots.
    let s = ChunkStore::open(&cfg(r#"{"host_bytes":"1MiB"}"#), 0, 8192, 2).unwrap();
    let cap = s.inner.arena.capacity();
    for i in 0..cap + 5 {
        s.put(format!("k{i}").as_bytes(), b"", &chunk(i as u8, 8192))
            .unwrap();
    }
    assert!(!s.contains(b"k0", false).unwrap(), "oldest dropped");
    assert!(s
        .contains(format!("k{}", cap + 4).as_bytes(), false)
        .unwrap());
    assert_eq!(counters(&s)["host_drops"], 5);
    // a pinned chunk is never dropped
    assert!(s.contains(b"k5", true).unwrap());
    for i in 0..cap {
        s.put(format!("n{i}").as_bytes(), b"", &chunk(7, 100))
            .unwrap();
    }
    assert_eq!(get(&s, b"k5").unwrap(), chunk(5, 8192));
    s.unpin(b"k5").unwrap();
    assert_eq!(
        s.unpin(b"k5").unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
}

#[test]
fn write_through_evicts_to_nvme_and_reads_back() {
    let d = tempfile::tempdir().unwrap();
    let s = ChunkStore::open(&nvme_cfg(d.path(), "256KiB"), 0, 8192, 2).unwrap();
    let cap = s.inner.arena.capacity();
    let n = cap * 3;
    for i in 0..n {
        s.put(
            format!("k{i}").as_bytes(),
            b"meta",
            &chunk(i as u8, 8192 - i),
        )
        .unwrap();
        s.flush(Duration::from_secs(30)).unwrap();
    }
    let c = counters(&s);
    assert_eq!(c["nvme_writes"], n as u64);
    assert!(c["host_evictions_to_nvme"].as_u64().unwrap() >= (n - cap) as u64);
    for i in 0..n {
        assert_eq!(
            get(&s, format!("k{i}").as_bytes()).unwrap(),
            chunk(i as u8, 8192 - i),
            "chunk {i}"
        );
        s.flush(Duration::from_secs(30)).unwrap();
    }
    let c = counters(&s);
    assert!(c["nvme_reads"].as_u64().unwrap() >= (n - cap) as u64, "{c}");
    assert_eq!(c["gets"], n as u64);
}

#[test]
fn restart_finds_chunks_on_nvme_and_prefetch_brings_them_back() {
    let d = tempfile::tempdir().unwrap();
    {
        let s = ChunkStore::open(&nvme_cfg(d.path(), "1MiB"), 0, 8192, 2).unwrap();
        for i in 0..10u8 {
            s.put(&[i], b"meta", &chunk(i, 4096 + i as usize)).unwrap();
        }
        s.close().unwrap();
    }
    let s = ChunkStore::open(&nvme_cfg(d.path(), "1MiB"), 0, 8192, 2).unwrap();
    assert_eq!(counters(&s)["recovered"], 10);
    // pinning lookup: prefetch from NVMe
    assert!(s.contains(&[3], true).unwrap());
    s.flush(Duration::from_secs(30)).unwrap();
    assert_eq!(counters(&s)["prefetches"], 1);
    assert_eq!(get(&s, &[3]).unwrap(), chunk(3, 4099));
    assert_eq!(
        counters(&s)["nvme_reads"],
        0,
        "served from the prefetched copy"
    );
    for i in 0..10u8 {
        assert_eq!(get(&s, &[i]).unwrap(), chunk(i, 4096 + i as usize));
    }
    // another model's store: nothing of it is found
    drop(s);
    let mut other = nvme_cfg(d.path(), "1MiB");
    other.model_identity = "m2".into();
    let s = ChunkStore::open(&other, 0, 8192, 2).unwrap();
    assert!(!s.contains(&[3], false).unwrap());
}

/// Flips a byte in the payload of every record of the rank's segments.
fn corrupt_payloads(dir: &Path) {
    use std::os::unix::fs::FileExt;
    for e in std::fs::read_dir(dir.join("rank0")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "kvp") {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&p)
                .unwrap();
            let mut b = [0u8; 1];
            f.read_exact_at(&mut b, 4096 + 40).unwrap();
            b[0] ^= 0x5a;
            f.write_all_at(&b, 4096 + 40).unwrap();
        }
    }
}

#[test]
fn a_corrupt_record_is_a_counted_miss_never_wrong_bytes() {
    let d = tempfile::tempdir().unwrap();
    {
        let s = ChunkStore::open(&nvme_cfg(d.path(), "1MiB"), 0, 8192, 2).unwrap();
        s.put(b"x", b"meta", &chunk(9, 8192)).unwrap();
        s.close().unwrap();
    }
    corrupt_payloads(d.path());
    let s = ChunkStore::open(&nvme_cfg(d.path(), "1MiB"), 0, 8192, 2).unwrap();
    assert!(s.contains(b"x", false).unwrap(), "indexed from headers");
    let mut buf = vec![0u8; 8192];
    assert_eq!(
        s.get(b"x", &mut buf).unwrap_err().kind(),
        ErrorKind::Corrupt
    );
    assert!(buf.iter().all(|b| *b == 0), "no bytes of the bad record");
    assert!(!s.contains(b"x", false).unwrap(), "dropped after the check");
    assert_eq!(s.lookup(b"x").unwrap_err().kind(), ErrorKind::NotFound);
    let c = counters(&s);
    assert_eq!(
        (c["corrupt"].as_u64(), c["gets"].as_u64()),
        (Some(1), Some(0))
    );

    // the same through a prefetch
    drop(s);
    let s = ChunkStore::open(&nvme_cfg(d.path(), "1MiB"), 0, 8192, 2).unwrap();
    s.put(b"y", b"", &chunk(1, 100)).unwrap();
    s.close().unwrap();
    drop(s);
    corrupt_payloads(d.path());
    let s = ChunkStore::open(&nvme_cfg(d.path(), "1MiB"), 0, 8192, 2).unwrap();
    assert!(s.contains(b"y", true).unwrap());
    s.flush(Duration::from_secs(30)).unwrap();
    assert!(!s.contains(b"y", false).unwrap());
    assert_eq!(
        s.get(b"y", &mut buf).unwrap_err().kind(),
        ErrorKind::NotFound
    );
    assert_eq!(counters(&s)["corrupt"], 1);
}

#[test]
fn bad_options_are_config_errors_naming_the_key() {
    for (c, chunk_bytes, elem, key) in [
        (r#"{}"#, 0u64, 2usize, "chunk_bytes"),
        (r#"{}"#, 4096, 3, "elem_size"),
        (r#"{"host_file":"/dev/shm/x"}"#, 4096, 2, "host_file"),
        (r#"{"host_bytes":"4KiB"}"#, 8192, 2, "host_bytes"),
    ] {
        let e = ChunkStore::open(&cfg(c), 0, chunk_bytes, elem)
            .err()
            .expect("refused");
        assert!(e.message().contains(key), "{c}: {e}");
    }
}

#[test]
fn records_with_bad_headers_are_corrupt() {
    let mut slot = vec![0u8; 8192];
    let n = write_record(&mut slot, b"abc", b"hello");
    let (m, d) = split_record(&slot[..n]).unwrap();
    assert_eq!((m, d), (&b"abc"[..], &b"hello"[..]));
    assert_eq!(
        split_record(&slot[..n - 1]).unwrap_err().kind(),
        ErrorKind::Corrupt
    );
    slot[0] = b'X';
    assert_eq!(
        split_record(&slot[..n]).unwrap_err().kind(),
        ErrorKind::Corrupt
    );
}

#[test]
fn the_store_is_shared_across_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<ChunkStore>();
    let s = std::sync::Arc::new(
        ChunkStore::open(&cfg(r#"{"host_bytes":"1MiB"}"#), 0, 4096, 2).unwrap(),
    );
    let hs: Vec<_> = (0..4u8)
        .map(|t| {
            let s = s.clone();
            std::thread::spawn(move || {
                for i in 0..200u32 {
                    let k = [t, (i % 50) as u8];
                    let _ = s.put(&k, b"", &chunk(t, 4096));
                    if let Ok(d) = get(&s, &k) {
                        assert_eq!(d, chunk(t, 4096), "never another chunk's bytes");
                    }
                }
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
}
