//! `cargo bench --bench step [-- --sessions N --turns N --forward-ms N --dir D]`:
//! the connector's hook time per engine step, driven the way vLLM drives
//! it.
//!
//! A scheduler loop runs the real [`BlockPlanner`] (match, on_alloc,
//! request_finished, build_meta, on_report) and the real [`Mover`] with the
//! CPU copy engine over a host-memory KV cache (bf16, 8 layers, 8 KV heads,
//! head 128, 16 tokens: 512 KiB per block) with a small host tier (64
//! blocks) and an NVMe tier in a temporary directory, so sessions park
//! and resume through both tiers: even sessions come back after every
//! other session has run (their blocks read from NVMe), odd ones 10 ms
//! after their last turn's save was reported (from the host tier). Per step the worker hooks run in vLLM's
//! order: `bind`, `start_load`, `wait_layer` for every layer, the forward
//! (a sleep of `--forward-ms`), `wait_for_save`, `get_finished`,
//! `take_report`.
//!
//! Reported: the hook time per step (all hooks but the forward), p50 /
//! p99 / max; in steps that carry sync loads, `start_load` + `wait_layer`
//! (the bounded sync-load copy) are left out of the hook time and
//! reported on their own line.

use kvpark::block::{Dtype, Geometry, LayerView};
use kvpark::config::Config;
use kvpark::mover::Mover;
use kvpark::plan::Plan;
use kvpark::planner::{BlockPlanner, RequestView};
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

#[path = "common/clock.rs"]
mod clock;
use clock::thread_cpu_ns;

const LAYERS: u32 = 8;
const BLOCK_TOKENS: u32 = 16;
/// vLLM blocks in the fake KV cache.
const VLLM_BLOCKS: u64 = 512;
/// Host tier, in blocks.
const HOST_BLOCKS: u64 = 64;
/// Blocks a session's prompt grows by per turn.
const BLOCKS_PER_TURN: usize = 4;
/// Decode steps per turn.
const DECODE_STEPS: u32 = 3;
/// Pause before an odd session's next turn arrives, from the step that
/// reported its last turn's save (before that, vLLM still holds the
/// blocks, a local prefix hit); wall time, so that a slower step does not
/// lengthen it.
const PAUSE: Duration = Duration::from_millis(10);
/// Requests scheduled at once.
const RUNNING: usize = 8;

fn geom() -> Geometry {
    Geometry {
        layers: LAYERS,
        kv_heads: 8,
        block_tokens: BLOCK_TOKENS,
        head_size_k: 128,
        head_size_v: 128,
        dtype: Dtype::Bf16,
    }
}

struct Args {
    sessions: usize,
    turns: usize,
    forward: Duration,
    dir: std::path::PathBuf,
}

fn args() -> Args {
    let mut a = Args {
        sessions: 100,
        turns: 3,
        forward: Duration::from_millis(2),
        dir: std::path::PathBuf::from("target"),
    };
    let v: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < v.len() {
        let next = v.get(i + 1).cloned().unwrap_or_default();
        match v[i].as_str() {
            "--sessions" => a.sessions = next.parse().expect("--sessions N"),
            "--turns" => a.turns = next.parse().expect("--turns N"),
            "--forward-ms" => {
                a.forward = Duration::from_millis(next.parse().expect("--forward-ms N"))
            }
            "--dir" => a.dir = next.into(),
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    a
}

enum State {
    /// Waiting for an async load (WAITING_FOR_REMOTE_KVS).
    Remote,
    /// Steps left to run.
    Running(u32),
}

struct Req {
    id: String,
    session: usize,
    turn: usize,
    hashes: Vec<u8>,
    tokens: u32,
    blocks: Vec<u32>,
    state: State,
}

fn hashes(session: usize, blocks: usize) -> Vec<u8> {
    let mut h = Vec::with_capacity(blocks * 32);
    for j in 0..blocks {
        let mut b = [0u8; 32];
        b[..8].copy_from_slice(&(session as u64).to_le_bytes());
        b[8..16].copy_from_slice(&(j as u64).to_le_bytes());
        b[16..24].copy_from_slice(&0x6b76_7061_726b_u64.to_le_bytes());
        h.extend_from_slice(&b);
    }
    h
}

fn view<'a>(r: &'a Req) -> RequestView<'a> {
    RequestView {
        req_id: &r.id,
        salt: b"",
        hashes: &r.hashes,
        hash_len: 32,
        hint: None,
    }
}

/// Context switches of the calling thread so far: (voluntary: it blocked,
/// involuntary: it was preempted).
fn switches() -> (i64, i64) {
    // SAFETY: a zeroed rusage is a valid value to be written by getrusage.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer; RUSAGE_THREAD exists on Linux.
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
    (ru.ru_nvcsw as i64, ru.ru_nivcsw as i64)
}

fn pct(v: &mut [u64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_unstable();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i] as f64 / 1e6
}

fn main() {
    let a = args();
    let g = geom();
    std::fs::create_dir_all(&a.dir).expect("bench dir");
    let dir = tempfile::tempdir_in(&a.dir).expect("tempdir");
    let cfg = Config {
        host_bytes: HOST_BLOCKS * g.block_bytes() as u64,
        nvme_dir: Some(dir.path().to_path_buf()),
        nvme_segment_bytes: 64 << 20,
        ..Config::default()
    };
    // The fake vLLM KV cache: one bf16 storage per layer, token-major.
    let page = g.layer_page_bytes() / 2;
    let mut layers: Vec<Vec<u16>> = (0..LAYERS)
        .map(|l| vec![l as u16; VLLM_BLOCKS as usize * page])
        .collect();
    let row = g.row_elems() as u64;
    let views: Vec<LayerView> = layers
        .iter_mut()
        .map(|buf| LayerView {
            base: buf.as_mut_ptr() as u64,
            num_blocks: VLLM_BLOCKS,
            stride_block: page as u64,
            stride_head: row,
            stride_token: g.kv_heads as u64 * row,
        })
        .collect();
    let mut planner = BlockPlanner::new(cfg.clone(), BLOCK_TOKENS).expect("planner");
    let mut mover = Mover::new(cfg, 0).expect("mover");
    // SAFETY: `layers` outlives `mover` (dropped at the end of main, after it).
    unsafe { mover.register(g, views, None) }.expect("register");

    // Block 0 is vLLM's null block, never handed out.
    let mut free: Vec<u32> = (1..VLLM_BLOCKS as u32).rev().collect();
    // Every session's first turn is queued; when a turn ends, an even
    // session's next turn goes to the back of the queue (it comes back after
    // every other session: from NVMe), an odd one's comes back to the front
    // after a short pause (from the host tier).
    let mut queue: VecDeque<(usize, usize)> = (0..a.sessions).map(|s| (s, 0)).collect();
    let mut pausing: Vec<(Instant, usize, usize)> = Vec::new();
    let mut running: Vec<Req> = Vec::new();
    // Finished requests whose blocks vLLM keeps until finished_sending
    // (delay_free), with when they finished.
    let mut held: HashMap<String, (Vec<u32>, Instant, usize, usize)> = HashMap::new();
    let mut held_ns: Vec<u64> = Vec::new();
    let mut misses = 0u64;
    let mut hook_ns: Vec<u64> = Vec::new();
    let mut sync_ns: Vec<u64> = Vec::new();
    let mut hook_cpu_ns: Vec<u64> = Vec::new();
    // Hook time of steps whose hooks neither blocked nor were preempted,
    // and how many steps did either.
    let mut quiet_ns: Vec<u64> = Vec::new();
    let (mut blocked_steps, mut preempted_steps) = (0u64, 0u64);
    let mut worst = (0u64, String::new());
    let (mut loads_sync, mut loads_async, mut failed) = (0u64, 0u64, 0u64);
    let t_start = Instant::now();
    let mut now: u64 = 1;
    let mut step: u64 = 0;
    let mut next_id = 0u64;
    while !(queue.is_empty() && running.is_empty() && held.is_empty() && pausing.is_empty()) {
        step += 1;
        assert!(step < 100_000, "the bench stopped making progress");
        now += 10_000_000;
        let wall_now = Instant::now();
        pausing.retain(|&(ready, s, t)| {
            if ready <= wall_now {
                queue.push_front((s, t));
            }
            ready > wall_now
        });
        // Admit requests (vLLM's scheduler).
        while running.len() < RUNNING {
            let Some(&(session, turn)) = queue.front() else {
                break;
            };
            let nb = BLOCKS_PER_TURN * (turn + 1);
            let tokens = (nb as u32) * BLOCK_TOKENS + 1;
            let need = (tokens + DECODE_STEPS).div_ceil(BLOCK_TOKENS) as usize;
            if free.len() < need {
                break;
            }
            queue.pop_front();
            next_id += 1;
            let mut r = Req {
                id: format!("s{session}-t{turn}-{next_id}"),
                session,
                turn,
                hashes: hashes(session, nb),
                tokens,
                blocks: Vec::new(),
                state: State::Running(1 + DECODE_STEPS),
            };
            let m = planner
                .match_request(&view(&r), 0, tokens, now)
                .expect("match");
            r.blocks = free.split_off(free.len() - need);
            planner
                .on_alloc(&r.id, &r.blocks, m.external_tokens)
                .expect("on_alloc");
            if turn > 0 && m.external_tokens == 0 {
                misses += 1;
            }
            if m.external_tokens > 0 && m.load_async {
                r.state = State::Remote;
            }
            running.push(r);
        }
        let meta = planner.build_meta(now);
        let plan = Plan::decode(&meta).expect("plan");
        let has_sync = plan.loads.iter().any(|l| l.sync);
        loads_sync += plan.loads.iter().filter(|l| l.sync).count() as u64;
        loads_async += plan.loads.iter().filter(|l| !l.sync).count() as u64;

        // The worker's hooks, in vLLM's order.
        let sw0 = switches();
        let (c0, t0) = (thread_cpu_ns(), Instant::now());
        mover.bind(&meta).expect("bind");
        let (c1, t1) = (thread_cpu_ns(), Instant::now());
        mover.start_load().expect("start_load");
        for l in 0..LAYERS {
            mover.wait_layer(l).expect("wait_layer");
        }
        let (c2, t2) = (thread_cpu_ns(), Instant::now());
        let sw1 = switches();
        std::thread::sleep(a.forward);
        let sw2 = switches();
        let (c3, t3) = (thread_cpu_ns(), Instant::now());
        mover.wait_for_save().expect("wait_for_save");
        let fin = mover.get_finished();
        let report = mover.take_report();
        let (c4, t4) = (thread_cpu_ns(), Instant::now());
        let sw3 = switches();
        let (vol, invol) = (
            (sw1.0 - sw0.0) + (sw3.0 - sw2.0),
            (sw1.1 - sw0.1) + (sw3.1 - sw2.1),
        );
        hook_cpu_ns.push((c1 - c0) + (c4 - c3) + if has_sync { 0 } else { c2 - c1 });
        let load_part = (t2 - t1).as_nanos() as u64;
        let mut hooks = (t1 - t0).as_nanos() as u64 + (t4 - t3).as_nanos() as u64;
        if has_sync {
            sync_ns.push(load_part);
        } else {
            hooks += load_part;
        }
        if hooks > worst.0 {
            worst = (
                hooks,
                format!(
                    "step {step}: {} saves, {} loads, {} moves",
                    plan.saves.len(),
                    plan.loads.len(),
                    plan.moves.len()
                ),
            );
        }
        hook_ns.push(hooks);
        blocked_steps += (vol > 0) as u64;
        preempted_steps += (invol > 0) as u64;
        if vol == 0 && invol == 0 {
            quiet_ns.push(hooks);
        }
        if !report.is_empty() {
            planner.on_report(&report, now).expect("on_report");
        }
        failed += fin.failed_blocks.len() as u64;
        for id in &fin.sending {
            if let Some((b, t, session, turn)) = held.remove(id) {
                held_ns.push(t.elapsed().as_nanos() as u64);
                free.extend(b);
                if session % 2 == 1 && turn + 1 < a.turns {
                    pausing.push((Instant::now() + PAUSE, session, turn + 1));
                }
            }
        }
        for id in &fin.recving {
            if let Some(r) = running.iter_mut().find(|r| &r.id == id) {
                r.state = State::Running(1 + DECODE_STEPS);
            }
        }
        // The forward ran: one step per running request.
        let mut i = 0;
        while i < running.len() {
            if let State::Running(left) = &mut running[i].state {
                *left -= 1;
                if *left == 0 {
                    let r = running.swap_remove(i);
                    let delay = planner
                        .request_finished(&view(&r), &r.blocks, r.tokens + DECODE_STEPS, now)
                        .expect("request_finished");
                    let next = r.turn + 1 < a.turns;
                    if next && r.session % 2 == 0 {
                        queue.push_back((r.session, r.turn + 1));
                    }
                    if delay {
                        held.insert(r.id.clone(), (r.blocks, Instant::now(), r.session, r.turn));
                    } else {
                        free.extend(r.blocks);
                        if next && r.session % 2 == 1 {
                            pausing.push((Instant::now() + PAUSE, r.session, r.turn + 1));
                        }
                    }
                    continue;
                }
            }
            i += 1;
        }
    }
    let wall = t_start.elapsed();
    mover.drain(Duration::from_secs(30));
    let m: serde_json::Value = serde_json::from_str(&mover.metrics_json()).expect("metrics");
    let c = &m["counters"];
    println!(
        "step bench: {} sessions x {} turns, {} steps in {:.1} s (forward {} ms), block {} KiB, host tier {} blocks, NVMe in {}",
        a.sessions,
        a.turns,
        step,
        wall.as_secs_f64(),
        a.forward.as_millis(),
        g.block_bytes() >> 10,
        HOST_BLOCKS,
        dir.path().display()
    );
    println!(
        "work: saved {} blocks, loaded {} from host and {} from NVMe ({} sync / {} async loads, {} resumed turns found nothing), {} failed blocks, {} demoted, {} evicted",
        c["saved_blocks"],
        c["load_blocks_host"],
        c["load_blocks_nvme"],
        loads_sync,
        loads_async,
        misses,
        failed,
        c["demoted_blocks"],
        c["host_evictions"]
    );
    let n = hook_ns.len();
    let n_sync = sync_ns.len();
    println!(
        "hook time per step ({} steps): p50 {:.3} ms  p99 {:.3} ms  max {:.3} ms  ({})",
        n,
        pct(&mut hook_ns, 0.50),
        pct(&mut hook_ns, 0.99),
        pct(&mut hook_ns, 1.0),
        worst.1
    );
    println!(
        "  of which on the CPU (thread CPU time; the rest is preemption or waiting): p50 {:.3} ms  p99 {:.3} ms  max {:.3} ms",
        pct(&mut hook_cpu_ns, 0.50),
        pct(&mut hook_cpu_ns, 0.99),
        pct(&mut hook_cpu_ns, 1.0)
    );
    println!(
        "  steps whose hooks blocked: {blocked_steps}, were preempted: {preempted_steps}; the other {} steps: p50 {:.3} ms  p99 {:.3} ms  max {:.3} ms",
        quiet_ns.len(),
        pct(&mut quiet_ns, 0.50),
        pct(&mut quiet_ns, 0.99),
        pct(&mut quiet_ns, 1.0)
    );
    println!(
        "sync-load copy ({} steps with sync loads): p50 {:.3} ms  p99 {:.3} ms  max {:.3} ms",
        n_sync,
        pct(&mut sync_ns, 0.50),
        pct(&mut sync_ns, 0.99),
        pct(&mut sync_ns, 1.0)
    );
    let n_held = held_ns.len();
    println!(
        "finished request to finished_sending ({} saves): p50 {:.3} ms  p99 {:.3} ms  max {:.3} ms",
        n_held,
        pct(&mut held_ns, 0.50),
        pct(&mut held_ns, 0.99),
        pct(&mut held_ns, 1.0)
    );
    drop(mover);
    drop(layers);
}
