//! A file-backed host arena (config `host_file`): a restarted worker finds
//! what it parked in host memory — byte-exact, from the host tier, with no
//! NVMe tier at all — and the scheduler of a restarted engine learns those
//! blocks from the slot table. A slot whose bytes changed behind kvpark's
//! back is dropped and counted at restart, never served.

mod common;

use common::Cache;
use kvpark::block::{BlockKey, Geometry};
use kvpark::config::Config;
use kvpark::mover::{scan_host_file, Mover};
use kvpark::plan::{LoadReq, Plan, SaveReq};
use kvpark::planner::blocks::BlockPlanner;

const BLOCKS: u64 = 16;
const LAYERS: usize = 2;

fn geom() -> Geometry {
    common::small_f32(LAYERS as u32)
}

fn key(i: u32) -> BlockKey {
    BlockKey::derive(b"hostfile", &i.to_le_bytes())
}

fn mover(cfg: &Config, c: &mut Cache) -> Mover {
    let mut m = Mover::new(cfg.clone(), 0).unwrap();
    unsafe { m.register(geom(), c.views(), None) }.unwrap();
    m
}

fn counters(m: &Mover) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_str(&m.metrics_json()).unwrap();
    v["counters"].clone()
}

#[test]
fn a_restarted_worker_finds_its_host_blocks_and_drops_a_changed_one() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config {
        host_file: Some(dir.path().join("kv")),
        host_bytes: 8 * geom().block_bytes() as u64,
        ..Config::default()
    };
    assert!(cfg.nvme_dir.is_none());
    let mut c = Cache::new(geom(), BLOCKS);
    for b in 1..=4 {
        c.fill(b, b as f32);
    }
    let want: Vec<Vec<f32>> = (1..=4).map(|b| c.block(b)).collect();
    {
        let mut m = mover(&cfg, &mut c);
        let plan = Plan {
            saves: vec![SaveReq {
                req_id: "s".into(),
                session: 42,
                blocks: (1..=4).map(|b| (key(b), b, b - 1)).collect(),
                to_nvme: false,
            }],
            ..Default::default()
        };
        m.bind(&plan.encode()).unwrap();
        m.start_load().unwrap();
        m.wait_for_save().unwrap();
        assert_eq!(
            m.drain(std::time::Duration::from_secs(10)).sending,
            vec!["s".to_string()]
        );
        assert_eq!(counters(&m)["saved_blocks"], 4);
    } // the worker goes away; the arena file and its slot table stay

    // The scheduler of the restarted engine reads the slot table.
    let arena = cfg.host_file_for(0).unwrap();
    let mut found = scan_host_file(&arena).unwrap();
    found.sort_by_key(|f| f.0 .0);
    let mut keys: Vec<BlockKey> = (1..=4).map(key).collect();
    keys.sort_by_key(|k| k.0);
    assert_eq!(found.iter().map(|f| f.0).collect::<Vec<_>>(), keys);
    assert!(found
        .iter()
        .all(|f| f.1 == 42 && f.2 == geom().block_bytes() as u64));
    let mut p = BlockPlanner::new(cfg.clone(), 16).unwrap();
    p.recover_tiers(found.into_iter().map(|(k, s, l)| (0, k, s, l, true, false)));
    let pm = p.metrics();
    assert_eq!(pm.parked_host_blocks, 4);
    assert_eq!(pm.parked_nvme_blocks, 0);

    // Change one byte of block 3's slot behind kvpark's back.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&arena)
            .unwrap();
        let slot_bytes = geom().block_bytes().div_ceil(4096) * 4096;
        let mut hit = 0;
        for s in 0..8u64 {
            let mut b = vec![0u8; geom().block_bytes()];
            f.read_exact_at(&mut b, s * slot_bytes as u64).unwrap();
            let v: Vec<f32> = b
                .chunks_exact(4)
                .map(|x| f32::from_le_bytes(x.try_into().unwrap()))
                .collect();
            if v == want[2] {
                f.write_all_at(&[0x5a], s * slot_bytes as u64 + 100)
                    .unwrap();
                hit += 1;
            }
        }
        assert_eq!(hit, 1, "block 3 is in exactly one slot");
    }

    // The restarted worker: a new mover over the same files, new vLLM blocks.
    let mut c2 = Cache::new(geom(), BLOCKS);
    let mut m = mover(&cfg, &mut c2);
    let k = counters(&m);
    assert_eq!(k["host_recovered_blocks"], 3, "{k}");
    assert_eq!(k["host_recovered_dropped"], 1, "{k}");
    let plan = Plan {
        loads: vec![LoadReq {
            req_id: "l".into(),
            sync: true,
            blocks: (1..=4).map(|b| (key(b), b + 8)).collect(),
        }],
        ..Default::default()
    };
    m.bind(&plan.encode()).unwrap();
    m.start_load().unwrap();
    m.wait_for_save().unwrap();
    let f = m.get_finished();
    assert_eq!(
        f.failed_blocks,
        vec![11],
        "block 3 (into vLLM block 11) fails"
    );
    for b in [1u32, 2, 4] {
        assert_eq!(c2.block(b + 8), want[b as usize - 1], "block {b}");
    }
    assert!(
        c2.block(11).iter().all(|v| *v == 0.0),
        "nothing written for the dropped block"
    );
    let k = counters(&m);
    assert_eq!(k["load_blocks_host"], 3, "{k}");
    assert_eq!(k["load_blocks_nvme"], 0, "{k}");
    drop(m);

    // A different geometry on the same file name: refused (the arena size
    // no longer matches), never misread.
    let other = Config {
        host_bytes: 4 * geom().block_bytes() as u64,
        ..cfg.clone()
    };
    let mut c3 = Cache::new(geom(), BLOCKS);
    let mut m3 = Mover::new(other, 0).unwrap();
    let e = unsafe { m3.register(geom(), c3.views(), None) }.unwrap_err();
    assert!(e.to_string().contains("refusing to reuse it"), "{e}");
}
