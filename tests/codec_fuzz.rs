//! Decoder fuzzing by property tests, and the codec's ratio on real KV.
//!
//! Every codec's decoder is fed random bytes, truncated encodings and
//! bit-flipped encodings (of random data and of real KV records): it must
//! return `Ok` or an error of kind `Corrupt`, never panic, never touch
//! memory outside its slices (safe code; run under Miri/ASan for more).
//! Lossless codecs round-trip random data of every element size.
//!
//! The ratio test reads the real KV corpus of `scripts/kv_corpus.py` from
//! `KVPARK_KV_CORPUS` (scripts/test.sh and scripts/setup.sh generate it);
//! without it, it says so and skips. Set `KVPARK_REQUIRE_CORPUS=1` to make a
//! missing corpus a failure.

use kvpark::codec::bench::{exp_huff_ratio, load_corpus, CORPUS_ENV};
use kvpark::codec::{by_tag, huff, CodecTag, ALL};
use kvpark::ErrorKind;
use proptest::prelude::*;
use std::path::PathBuf;

fn corpus() -> Option<PathBuf> {
    let dir = kvpark::codec::bench::corpus_dir();
    if dir.is_none() {
        assert!(
            std::env::var_os("KVPARK_REQUIRE_CORPUS").is_none(),
            "KVPARK_REQUIRE_CORPUS set but {CORPUS_ENV} names no corpus"
        );
        eprintln!("SKIP: {CORPUS_ENV} not set: no real KV corpus (scripts/kv_corpus.py)");
    }
    dir
}

fn decode_is_ok_or_corrupt(tag: CodecTag, src: &[u8], es: usize, raw_len: usize) {
    let mut dst = vec![0u8; raw_len];
    if let Err(e) = by_tag(tag).decode(src, es, &mut dst) {
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{}: {e}", tag.name());
    }
    if tag == CodecTag::ExpHuff {
        if let Err(e) = huff::decode_parallel(src, es, &mut dst, 3) {
            assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
        }
    }
}

/// Data with the shape of KV: skewed high bytes, noisy low bytes.
fn kv_like(es: usize) -> impl Strategy<Value = Vec<u8>> {
    (0usize..6000, any::<u64>(), 1u8..16).prop_map(move |(n, seed, spread)| {
        let mut s = seed | 1;
        (0..n)
            .map(|i| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                if i % es == es - 1 {
                    0x3c + (s % spread as u64) as u8
                } else {
                    s as u8
                }
            })
            .collect()
    })
}

fn es_strategy() -> impl Strategy<Value = usize> {
    prop::sample::select(vec![1usize, 2, 4, 8])
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn random_bytes_never_panic(
        src in prop::collection::vec(any::<u8>(), 0..3000),
        es in es_strategy(),
        raw_len in 0usize..9000,
    ) {
        for tag in ALL {
            decode_is_ok_or_corrupt(tag, &src, es, raw_len);
        }
    }

    #[test]
    fn lossless_codecs_round_trip(es in es_strategy(), data in es_strategy().prop_flat_map(kv_like)) {
        for tag in ALL {
            let c = by_tag(tag);
            if !c.lossless() {
                continue;
            }
            let mut enc = Vec::new();
            c.encode(&data, es, &mut enc).unwrap();
            let mut dec = vec![0u8; data.len()];
            c.decode(&enc, es, &mut dec).unwrap();
            prop_assert_eq!(&dec, &data, "{}", tag.name());
        }
    }

    #[test]
    fn exp_huff_round_trips_every_chunk_size(
        data in prop::collection::vec(any::<u8>(), 0..5000),
        es in es_strategy(),
        log2 in 10u8..=16,
        threads in 1usize..5,
    ) {
        let mut enc = Vec::new();
        huff::encode_with_chunk(&data, es, log2, &mut enc).unwrap();
        let mut dec = vec![0u8; data.len()];
        huff::decode_parallel(&enc, es, &mut dec, threads).unwrap();
        prop_assert_eq!(dec, data);
    }

    #[test]
    fn truncated_and_flipped_encodings_are_errors_not_panics(
        es in prop::sample::select(vec![1usize, 2, 4]),
        data in prop::sample::select(vec![1usize, 2, 4]).prop_flat_map(kv_like),
        cut in any::<prop::sample::Index>(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), 0u8..8), 1..6),
    ) {
        for tag in ALL {
            let c = by_tag(tag);
            let mut enc = Vec::new();
            if c.encode(&data, es, &mut enc).is_err() || enc.is_empty() {
                continue;
            }
            // every strict prefix of a record is an error for exp-huff
            let k = cut.index(enc.len());
            let mut dst = vec![0u8; data.len()];
            let r = c.decode(&enc[..k], es, &mut dst);
            if tag == CodecTag::ExpHuff || tag == CodecTag::Fp8Lossy {
                prop_assert!(r.is_err(), "{} accepted a {k}-byte prefix of {}", tag.name(), enc.len());
            }
            decode_is_ok_or_corrupt(tag, &enc[..k], es, data.len());
            let mut bad = enc.clone();
            for (i, b) in &flips {
                let i = i.index(bad.len());
                bad[i] ^= 1 << b;
            }
            decode_is_ok_or_corrupt(tag, &bad, es, data.len());
            // a raw length the record was not written for
            decode_is_ok_or_corrupt(tag, &enc, es, data.len() + es);
        }
    }
}

/// Bit flips in real KV records (first records of each dtype).
#[test]
fn corpus_seeded_corruption_never_panics() {
    let Some(dir) = corpus() else { return };
    for dtype in ["bf16", "f16", "f32", "e4m3", "e5m2"] {
        let f = load_corpus(&dir, dtype).unwrap();
        let rec = f.records().next().unwrap();
        let mut enc = Vec::new();
        by_tag(CodecTag::ExpHuff)
            .encode(rec, f.elem_size, &mut enc)
            .unwrap();
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut dst = vec![0u8; rec.len()];
        for _ in 0..300 {
            let mut bad = enc.clone();
            for _ in 0..1 + (x % 4) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let i = (x >> 8) as usize % bad.len();
                bad[i] ^= 1 << (x % 8);
            }
            if let Err(e) = by_tag(CodecTag::ExpHuff).decode(&bad, f.elem_size, &mut dst) {
                assert_eq!(e.kind(), ErrorKind::Corrupt);
            }
        }
    }
}

/// The measured ratio of exp-huff on real bf16 KV, from the encoded sizes.
#[test]
fn exp_huff_ratio_on_real_kv() {
    let Some(dir) = corpus() else { return };
    let mut dec = Vec::new();
    for (dtype, floor) in [("bf16", 1.40), ("f16", 1.10), ("f32", 1.15), ("e4m3", 1.10)] {
        let mut f = load_corpus(&dir, dtype).unwrap();
        if dtype != "bf16" {
            // a debug build codes ~10 MB/s: the other dtypes on a sample
            f.data.truncate(32 * f.block_bytes);
        }
        let ratio = exp_huff_ratio(&f);
        eprintln!("exp-huff on real {dtype} KV: {ratio:.4}x");
        assert!(ratio >= floor, "{dtype}: {ratio:.4}x < {floor}x");
        // and every record round-trips
        let mut enc = Vec::new();
        for r in f.records().take(16) {
            by_tag(CodecTag::ExpHuff)
                .encode(r, f.elem_size, &mut enc)
                .unwrap();
            dec.resize(r.len(), 0);
            by_tag(CodecTag::ExpHuff)
                .decode(&enc, f.elem_size, &mut dec)
                .unwrap();
            assert_eq!(&dec[..], r);
        }
    }
}

/// The NVMe store with the default codec: real KV records (or KV-like data
/// without the corpus) are stored coded, survive a reopen and read back
/// exactly; the lossy codec is labelled as such.
#[test]
fn nvme_store_round_trips_with_exp_huff_and_lossy_is_labelled() {
    use kvpark::block::BlockKey;
    use kvpark::tier::nvme::{NvmeConfig, NvmeStore};
    assert_eq!(kvpark::config::Config::default().codec, CodecTag::ExpHuff);
    assert!(by_tag(CodecTag::ExpHuff).lossless());
    assert!(!by_tag(CodecTag::Fp8Lossy).lossless());
    assert!(CodecTag::Fp8Lossy.name().contains("lossy"));
    let blocks: Vec<Vec<u8>> = match corpus() {
        Some(d) => {
            let f = load_corpus(&d, "bf16").unwrap();
            f.records().take(12).map(|r| r.to_vec()).collect()
        }
        None => (0..12u64)
            .map(|i| kvpark::codec::bench::synthetic_bf16(100_000, i + 1))
            .collect(),
    };
    let dir = tempfile::tempdir().unwrap();
    let cfg = || {
        let mut c = NvmeConfig::new(dir.path(), 0, 1 << 30);
        c.segment_bytes = 8 << 20;
        c.codec = CodecTag::ExpHuff;
        c.elem_size = 2;
        c
    };
    let key = |i: usize| BlockKey::derive(b"codec", &(i as u64).to_le_bytes());
    {
        let s = NvmeStore::open(cfg()).unwrap();
        for (i, b) in blocks.iter().enumerate() {
            s.put(&key(i), 1, i as u32, b).unwrap();
        }
        s.close().unwrap();
    }
    let s = NvmeStore::open(cfg()).unwrap();
    let (mut raw, mut stored) = (0u64, 0u64);
    for (i, b) in blocks.iter().enumerate() {
        let mut v = vec![0u8; b.len()];
        let info = s.get(&key(i), &mut v).unwrap();
        assert_eq!(&v, b, "block {i}");
        assert_eq!(info.codec, CodecTag::ExpHuff);
        raw += info.raw_len as u64;
        stored += info.stored_len as u64;
    }
    let ratio = raw as f64 / stored as f64;
    eprintln!("nvme store, exp-huff: {ratio:.3}x");
    assert!(ratio > 1.3, "{ratio}");
}
