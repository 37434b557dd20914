//! The worker-side mover across tiers, driven by real plans over a fake
//! vLLM KV cache in host memory: bytes equal after park and load, eviction to
//! NVMe and back, a corrupt record is a failed block (never wrong KV), and a
//! restarted worker finds its NVMe blocks.

use kvpark::block::{BlockKey, Dtype, Geometry, KvLayout, LayerView};
use kvpark::config::Config;
use kvpark::mover::Mover;
use kvpark::plan::{LoadReq, Plan, Report, SaveReq, TierChange};
use std::time::Duration;

const BLOCKS: u64 = 32;

fn geom() -> Geometry {
    Geometry {
        layers: 2,
        kv_heads: 2,
        block_tokens: 32,
        head_size_k: 32,
        head_size_v: 32,
        dtype: Dtype::F32,
    }
}

/// A token-major (LBNHC, FlashAttention-style) cache, layers sharing one storage.
struct Cache {
    buf: Vec<f32>,
    page: usize,
}

impl Cache {
    fn new() -> Self {
        let g = geom();
        let page = g.layer_page_bytes() / 4;
        Cache {
            buf: vec![0.0; 2 * BLOCKS as usize * page],
            page,
        }
    }
    fn views(&mut self) -> Vec<LayerView> {
        let g = geom();
        assert_eq!((g.layers, g.dtype.size()), (2, 4));
        LayerView::layer_major(&g, KvLayout::Lbnhc, self.buf.as_mut_ptr() as u64, BLOCKS).unwrap()
    }
    fn block(&self, l: usize, b: u32) -> &[f32] {
        let o = (l * BLOCKS as usize + b as usize) * self.page;
        &self.buf[o..o + self.page]
    }
    fn fill(&mut self, b: u32, seed: f32) {
        for l in 0..2 {
            let o = (l * BLOCKS as usize + b as usize) * self.page;
            for (i, v) in self.buf[o..o + self.page].iter_mut().enumerate() {
                *v = seed * 1000.0 + l as f32 * 100.0 + i as f32 * 0.25;
            }
        }
    }
    fn clear(&mut self, b: u32) {
        for l in 0..2 {
            let o = (l * BLOCKS as usize + b as usize) * self.page;
            self.buf[o..o + self.page].fill(0.0);
        }
    }
}

fn key(i: u32) -> BlockKey {
    BlockKey::derive(b"", &i.to_le_bytes())
}

fn mover(cfg: &Config, cache: &mut Cache) -> Mover {
    let mut m = Mover::new(cfg.clone(), 0).unwrap();
    unsafe { m.register(geom(), cache.views(), None) }.unwrap();
    m
}

fn save(m: &mut Mover, req: &str, items: &[(u32, u32)]) {
    let plan = Plan {
        saves: vec![SaveReq {
            req_id: req.into(),
            session: 1,
            blocks: items.iter().map(|&(k, b)| (key(k), b, k)).collect(),
            to_nvme: true,
        }],
        ..Default::default()
    };
    m.bind(&plan.encode()).unwrap();
    m.start_load().unwrap();
    m.wait_for_save().unwrap();
    let f = m.drain(Duration::from_secs(10));
    assert_eq!(f.sending, vec![req.to_string()]);
}

fn load(m: &mut Mover, req: &str, sync: bool, items: &[(u32, u32)]) -> Vec<u32> {
    let plan = Plan {
        loads: vec![LoadReq {
            req_id: req.into(),
            sync,
            blocks: items.iter().map(|&(k, b)| (key(k), b)).collect(),
        }],
        ..Default::default()
    };
    m.bind(&plan.encode()).unwrap();
    m.start_load().unwrap();
    m.wait_for_save().unwrap();
    let f = if sync {
        m.get_finished()
    } else {
        m.drain(Duration::from_secs(10))
    };
    if !sync {
        assert_eq!(f.recving, vec![req.to_string()]);
    }
    f.failed_blocks
}

fn counters(m: &Mover) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_str(&m.metrics_json()).unwrap();
    v["counters"].clone()
}

#[test]
fn park_and_load_from_host_is_byte_exact() {
    let mut c = Cache::new();
    let mut m = mover(&Config::default(), &mut c);
    for b in 1..=4 {
        c.fill(b, b as f32);
    }
    let want: Vec<Vec<f32>> = (1..=4).map(|b| c.block(1, b).to_vec()).collect();
    save(&mut m, "r1", &[(10, 1), (11, 2), (12, 3), (13, 4)]);
    for b in 1..=4 {
        c.clear(b);
    }
    let failed = load(
        &mut m,
        "r2",
        true,
        &[(10, 20), (11, 21), (12, 22), (13, 23)],
    );
    assert!(failed.is_empty());
    for (i, b) in (20..24).enumerate() {
        assert_eq!(c.block(1, b), &want[i][..], "block {b}");
    }
    let k = counters(&m);
    assert_eq!(k["saved_blocks"], 4);
    assert_eq!(k["load_blocks_host"], 4);
    // the report tells the planner what was parked
    let r = Report::decode(&m.take_report()).unwrap();
    assert_eq!(r.saved[0].ok.len(), 4);
    assert_eq!(r.block_bytes, geom().block_bytes() as u64);
}

#[test]
fn evicted_blocks_come_back_from_nvme_and_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    let g = geom();
    let cfg = Config {
        host_bytes: 3 * g.block_bytes() as u64,
        nvme_dir: Some(dir.path().to_path_buf()),
        nvme_segment_bytes: 1 << 20,
        ..Config::default()
    };
    let mut c = Cache::new();
    for b in 1..=8 {
        c.fill(b, b as f32 + 0.5);
    }
    let want: Vec<Vec<f32>> = (1..=8).map(|b| c.block(0, b).to_vec()).collect();
    {
        let mut m = mover(&cfg, &mut c);
        for b in 1..=8u32 {
            save(&mut m, &format!("s{b}"), &[(100 + b, b)]);
            m.drain(Duration::from_secs(10)); // let write-behind land
        }
        let k = counters(&m);
        assert_eq!(k["saved_blocks"], 8);
        assert_eq!(k["demoted_blocks"], 8);
        assert!(k["host_evictions"].as_u64().unwrap() >= 5, "{k}");
        for b in 1..=8 {
            c.clear(b);
        }
        // async load of all 8: most come from NVMe through the 3-slot host tier
        let failed = load(
            &mut m,
            "l1",
            false,
            &(1..=8).map(|b| (100 + b, b)).collect::<Vec<_>>(),
        );
        assert!(failed.is_empty(), "{failed:?}");
        for b in 1..=8u32 {
            assert_eq!(c.block(0, b), &want[b as usize - 1][..], "block {b}");
        }
        assert!(counters(&m)["load_blocks_nvme"].as_u64().unwrap() >= 5);
    }
    // restart: the scheduler's scan and a new worker both find the blocks
    let found = kvpark::mover::scan_parked(dir.path(), 0).unwrap();
    assert_eq!(found.len(), 8);
    assert!(found.iter().all(|f| f.2 == g.block_bytes() as u64));
    for b in 1..=8 {
        c.clear(b);
    }
    let mut m = mover(&cfg, &mut c);
    assert_eq!(counters(&m)["recovered_blocks"], 8);
    let failed = load(&mut m, "l2", false, &[(101, 11), (108, 12)]);
    assert!(failed.is_empty());
    assert_eq!(c.block(0, 11), &want[0][..]);
    assert_eq!(c.block(0, 12), &want[7][..]);
}

#[test]
fn corrupt_nvme_record_is_a_failed_block_never_wrong_kv() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config {
        nvme_dir: Some(dir.path().to_path_buf()),
        nvme_segment_bytes: 1 << 20,
        codec: kvpark::codec::CodecTag::None,
        ..Config::default()
    };
    let mut c = Cache::new();
    c.fill(1, 1.0);
    c.fill(2, 2.0);
    let want2 = c.block(1, 2).to_vec();
    {
        let mut m = mover(&cfg, &mut c);
        // one at a time, so key 1's record is the segment's first (two I/O
        // threads may otherwise land them in either order)
        save(&mut m, "s1", &[(1, 1)]);
        m.drain(Duration::from_secs(10));
        save(&mut m, "s2", &[(2, 2)]);
        m.drain(Duration::from_secs(10));
        assert_eq!(counters(&m)["demoted_blocks"], 2);
    }
    // flip one payload byte of the first record (records are 4 KiB aligned; header first)
    let seg = dir.path().join("rank0/seg-000001.kvp");
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[4096 + 100] ^= 0x40;
    std::fs::write(&seg, &bytes).unwrap();
    c.clear(1);
    c.clear(2);
    c.fill(5, 9.0);
    let sentinel = c.block(0, 5).to_vec();
    let mut m = mover(&cfg, &mut c);
    // key 1 -> vLLM block 5 (its record is corrupt), key 2 -> block 6
    let failed = load(&mut m, "l", false, &[(1, 5), (2, 6)]);
    assert_eq!(
        failed,
        vec![5],
        "the corrupt block is reported for recompute"
    );
    assert_eq!(
        c.block(0, 5),
        &sentinel[..],
        "nothing written into the failed block"
    );
    assert_eq!(c.block(1, 6), &want2[..]);
    assert_eq!(counters(&m)["load_corrupt"], 1);
    let r = Report::decode(&m.take_report()).unwrap();
    assert_eq!(
        r.tiers,
        vec![(TierChange::Lost, key(1)), (TierChange::OnHost, key(2))],
        "the planner is told to forget key 1, and that key 2 is in host memory now"
    );
    assert_eq!(r.loaded[0].failed, vec![key(1)]);
}

#[test]
fn unknown_block_and_unregistered_mover_fail_cleanly() {
    let mut c = Cache::new();
    let mut m = mover(&Config::default(), &mut c);
    assert_eq!(load(&mut m, "x", true, &[(999, 3)]), vec![3]);
    // out-of-range vLLM block id in a save: reported failed, request still released
    save(&mut m, "bad", &[(5, BLOCKS as u32 + 10)]);
    let r = Report::decode(&m.take_report()).unwrap();
    assert_eq!(r.saved[0].failed, vec![key(5)]);

    let mut un = Mover::new(Config::default(), 0).unwrap();
    let plan = Plan {
        saves: vec![SaveReq {
            req_id: "early".into(),
            session: 1,
            blocks: vec![(key(1), 1, 0)],
            to_nvme: true,
        }],
        loads: vec![LoadReq {
            req_id: "early-load".into(),
            sync: false,
            blocks: vec![(key(2), 2)],
        }],
        ..Default::default()
    };
    un.bind(&plan.encode()).unwrap();
    un.start_load().unwrap();
    un.wait_for_save().unwrap();
    let f = un.get_finished();
    assert_eq!(f.sending, vec!["early".to_string()]);
    assert_eq!(f.recving, vec!["early-load".to_string()]);
    assert_eq!(f.failed_blocks, vec![2]);
}

#[test]
fn write_behind_never_blocks_a_save_and_lands_everything() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config {
        nvme_dir: Some(dir.path().to_path_buf()),
        nvme_segment_bytes: 4 << 20,
        ..Config::default()
    };
    let mut c = Cache::new();
    for b in 1..=30 {
        c.fill(b, b as f32);
    }
    let mut m = mover(&cfg, &mut c);
    // one request parks 30 blocks: far more NVMe writes than the store queues
    save(
        &mut m,
        "big",
        &(1..=30).map(|b| (200 + b, b)).collect::<Vec<_>>(),
    );
    let k = counters(&m);
    assert_eq!(k["saved_blocks"], 30);
    // 8 writes in flight at most: at least 22 wait for room, less what the
    // writer thread completed while the saver was still submitting
    let deferred = k["demotions_deferred"].as_u64().unwrap();
    assert!(deferred <= 22, "at most 8 in flight, the rest wait: {k}");
    m.drain(Duration::from_secs(20));
    let k = counters(&m);
    assert_eq!(k["demoted_blocks"], 30, "{k}");
    assert_eq!(k["nvme_write_errors"], 0);
    let on_nvme = Report::decode(&m.take_report())
        .unwrap()
        .tiers
        .iter()
        .filter(|t| t.0 == TierChange::OnNvme)
        .count();
    assert_eq!(on_nvme, 30);
}

#[test]
fn a_save_three_times_the_host_tier_streams_to_nvme_and_lands_while_idle() {
    let dir = tempfile::tempdir().unwrap();
    let g = geom();
    let cfg = Config {
        host_bytes: 4 * g.block_bytes() as u64,
        nvme_dir: Some(dir.path().to_path_buf()),
        nvme_segment_bytes: 1 << 20,
        ..Config::default()
    };
    let mut c = Cache::new();
    for b in 1..=12 {
        c.fill(b, b as f32 + 0.25);
    }
    let want: Vec<Vec<f32>> = (1..=12).map(|b| c.block(1, b).to_vec()).collect();
    let items: Vec<(u32, u32)> = (1..=12).map(|b| (300 + b, b)).collect();
    {
        let mut m = mover(&cfg, &mut c);
        save(&mut m, "big", &items);
        let k = counters(&m);
        assert_eq!(k["saved_blocks"], 12, "{k}");
        assert_eq!(k["save_failed_blocks"], 0, "{k}");
        assert_eq!(k["dropped_blocks"], 0, "{k}");
        assert!(k["save_stream_batches"].as_u64().unwrap() >= 2, "{k}");
        // The engine now calls nothing (an idle gap): every block still
        // reaches the disk, on the mover's own threads.
        let end = std::time::Instant::now() + Duration::from_secs(20);
        let mut found = kvpark::mover::scan_parked(dir.path(), 0).unwrap();
        while found.len() < 12 && std::time::Instant::now() < end {
            std::thread::sleep(Duration::from_millis(20));
            found = kvpark::mover::scan_parked(dir.path(), 0).unwrap();
        }
        let mut keys: Vec<BlockKey> = found.iter().map(|f| f.0).collect();
        keys.sort();
        let mut expect: Vec<BlockKey> = items.iter().map(|&(k, _)| key(k)).collect();
        expect.sort();
        assert_eq!(
            keys, expect,
            "every block of the turn is on NVMe while idle"
        );
    }
    // A fresh worker serves every block, byte for byte.
    for b in 1..=12 {
        c.clear(b);
    }
    let mut m = mover(&cfg, &mut c);
    assert_eq!(counters(&m)["recovered_blocks"], 12);
    let failed = load(
        &mut m,
        "back",
        false,
        &(1..=12).map(|b| (300 + b, b + 12)).collect::<Vec<_>>(),
    );
    assert!(failed.is_empty(), "{failed:?}");
    for b in 1..=12u32 {
        assert_eq!(c.block(1, b + 12), &want[b as usize - 1][..], "block {b}");
    }
}

#[test]
fn a_save_of_a_block_on_nvme_only_gathers_it_into_host_again() {
    let dir = tempfile::tempdir().unwrap();
    let g = geom();
    let cfg = Config {
        host_bytes: 3 * g.block_bytes() as u64,
        nvme_dir: Some(dir.path().to_path_buf()),
        nvme_segment_bytes: 1 << 20,
        ..Config::default()
    };
    let mut c = Cache::new();
    for b in 1..=6 {
        c.fill(b, b as f32 + 0.25);
    }
    let want = c.block(1, 1).to_vec();
    let mut m = mover(&cfg, &mut c);
    for b in 1..=6u32 {
        save(&mut m, &format!("s{b}"), &[(200 + b, b)]);
        m.drain(Duration::from_secs(10));
    }
    // the 3-slot host tier evicted the first blocks: on NVMe only now
    let k = counters(&m);
    assert!(k["host_evictions"].as_u64().unwrap() >= 3, "{k}");
    m.take_report();
    // the session's next turn parks block 1 again (vLLM holds it in block 7)
    c.fill(7, 1.25);
    save(&mut m, "again", &[(201, 7)]);
    let r = Report::decode(&m.take_report()).unwrap();
    assert_eq!(r.saved[0].ok, vec![key(201)]);
    assert!(
        r.tiers.contains(&(TierChange::OnHost, key(201))),
        "{:?}",
        r.tiers
    );
    assert_eq!(counters(&m)["rehosted_blocks"], 1);
    // it loads from host, byte-exact, without reading the disk
    let nvme_reads = counters(&m)["load_blocks_nvme"].as_u64().unwrap();
    c.clear(20);
    assert!(load(&mut m, "l", true, &[(201, 20)]).is_empty());
    assert_eq!(c.block(1, 20), &want[..]);
    let k = counters(&m);
    assert_eq!(k["load_blocks_nvme"].as_u64().unwrap(), nvme_reads);
    assert_eq!(k["load_blocks_host"], 1);
}
