//! `cargo bench --features cli --bench codec`: exp-huff encode/decode per core on the real
//! KV corpus (`KVPARK_KV_CORPUS`, scripts/kv_corpus.sh), beside memcpy of
//! the same bytes, plus the full `kvpark bench --only codec` table.
//! `KVPARK_CODEC_BENCH=huff` runs only the exp-huff loop (for profiling).

use kvpark::benchkit::{best_rate, paired};
use kvpark::codec::bench::{bench_codecs, corpus_dir, load_corpus, synthetic_bf16};
use kvpark::codec::{Codec, ExpHuff};
use std::time::Duration;

fn main() {
    let (data, block, label) = match corpus_dir() {
        Some(d) => {
            let f = load_corpus(&d, "bf16").expect("corpus");
            (f.data, f.block_bytes, "real bf16 KV")
        }
        None => (synthetic_bf16(1 << 21, 7), 1 << 20, "SYNTHETIC bf16"),
    };
    let recs: Vec<&[u8]> = data.chunks(block).step_by(16).take(8).collect();
    let bytes: u64 = recs.iter().map(|r| r.len() as u64).sum();
    let encs: Vec<Vec<u8>> = recs
        .iter()
        .map(|r| {
            let mut e = Vec::new();
            ExpHuff.encode(r, 2, &mut e).unwrap();
            e
        })
        .collect();
    let mut scratch = Vec::new();
    let mut out = vec![0u8; block];
    let set: Vec<u8> = recs.concat();
    let mut copy = vec![0u8; set.len()];
    let per = Duration::from_millis(300);
    if std::env::var("KVPARK_CODEC_BENCH").as_deref() == Ok("huff") {
        let e = best_rate(bytes, 2000, Duration::from_secs(3), || {
            for r in &recs {
                ExpHuff.encode(r, 2, &mut scratch).unwrap();
            }
        });
        let d = best_rate(bytes, 2000, Duration::from_secs(3), || {
            for (e, r) in encs.iter().zip(&recs) {
                ExpHuff.decode(e, 2, &mut out[..r.len()]).unwrap();
            }
        });
        println!(
            "exp-huff {label}: encode {:.2} GB/s, decode {:.2} GB/s",
            e / 1e9,
            d / 1e9
        );
        return;
    }
    let mut memcpy = || {
        copy.copy_from_slice(&set);
        std::hint::black_box(&copy);
    };
    let (e, m) = paired(
        bytes,
        4,
        per,
        || {
            for r in &recs {
                ExpHuff.encode(r, 2, &mut scratch).unwrap();
            }
        },
        &mut memcpy,
    );
    println!(
        "encode exp-huff {label}: {:.2} GB/s (memcpy {:.2} GB/s)",
        e / 1e9,
        m / 1e9
    );
    let (d, m) = paired(
        bytes,
        4,
        per,
        || {
            for (e, r) in encs.iter().zip(&recs) {
                ExpHuff.decode(e, 2, &mut out[..r.len()]).unwrap();
            }
        },
        &mut memcpy,
    );
    println!(
        "decode exp-huff {label}: {:.2} GB/s (memcpy {:.2} GB/s)",
        d / 1e9,
        m / 1e9
    );
    let (figs, lines) = bench_codecs(false);
    for f in figs {
        println!("{}", f.row());
    }
    for l in lines {
        println!("  {l}");
    }
}
