"""The kvpark policy in a real vLLM engine (CPU backend, tiny Llama): prefetch while idle.

A session that waits on a short tool (hint) is pushed out of the small host tier to NVMe
by a long session that waits on a human. While the engine sits idle, kvpark's idle thread
ticks the planner: at the tool session's checkpoint the policy ranks it ahead of the human
one and prefetches it NVMe -> host (evicting the human session's host copy). The tool
session's next request is then a synchronous host hit, not an async NVMe load, and every
output equals a reference engine without kvpark. The human session's next request, whose
host copy the prefetch displaced, loads from NVMe and is equally correct: a prefetch costs
bytes moved, never a wrong output.
"""

from __future__ import annotations

import pytest

from test_e2e import assert_same_outputs, base_spec, run_engine, snaps, turns, turn

PHASE = [
    # before any worker report: the planner knows the block size from vLLM's KV cache
    # config, so the very first session is in the policy's accounting
    {"op": "snapshot", "tag": "start"},
    turn(["p1"], 320, "p1.t1", {"awaiting": "tool", "tool": "Bash"}),
    {"op": "drain"},
    turn(["p2"], 640, "p2.t1", {"awaiting": "user"}),
    {"op": "drain"},
    {"op": "reset_prefix_cache"},
    {"op": "snapshot", "tag": "before_idle"},
    {"op": "idle", "seconds": 4.0},
    {"op": "snapshot", "tag": "after_idle"},
    turn(["p1"], 64, "p1.t2", {"awaiting": "user"}),
    {"op": "drain"},
    {"op": "snapshot", "tag": "after_p1"},
    turn(["p2"], 64, "p2.t2", {"awaiting": "user"}),
    {"op": "drain"},
    {"op": "snapshot", "tag": "after_p2"},
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model, libkvpark):
    tmp = tmp_path_factory.mktemp("prefetch")
    ref = run_engine(tmp, "ref", base_spec(tiny_model, None, PHASE))
    # 20 host slots of 32 KiB: p2's 20 blocks push all of p1's 10 out to NVMe (the
    # kvpark policy writes each suspend through to NVMe). Checkpoints every 500 ms.
    cfg = {
        "host_bytes": "640KiB",
        "nvme_dir": str(tmp / "nvme"),
        "policy": "kvpark",
        "kvpark": {"check_every": "500ms"},
    }
    got = run_engine(tmp, "kvpark", base_spec(tiny_model, cfg, PHASE))
    return ref, got


def test_outputs_equal_a_run_without_kvpark(runs):
    ref, got = runs
    assert_same_outputs(ref, got, ["p1.t1", "p2.t1", "p1.t2", "p2.t2"])


def test_the_block_size_from_vllms_config_is_the_workers(runs):
    _, got = runs
    s = snaps(got)
    assert s["start"]["planner"]["block_bytes"] == 32 << 10, s["start"]["planner"]
    assert s["after_p2"]["planner"]["block_bytes"] == 32 << 10


def test_without_kv_events_no_gpu_eviction_is_heard(runs):
    _, got = runs
    end = snaps(got)["after_p2"]["planner"]
    # vLLM publishes no KV-cache events here: the policy goes without them
    assert (end["gpu_events"], end["gpu_removed_blocks"], end["gpu_dropped_sessions"]) == (0, 0, 0), end
    assert "kv_events" not in end, end


def test_idle_prefetch_makes_the_next_request_a_sync_host_hit(runs):
    _, got = runs
    s = snaps(got)
    before, idle, p1 = s["before_idle"]["planner"], s["after_idle"]["planner"], s["after_p1"]["planner"]
    # p1 was on NVMe only when the engine went idle
    assert before["parked_nvme_blocks"] >= 10, before
    assert before["prefetches"] == 0, before
    # while idle, the idle thread ran the policy's moves: a prefetch, done on host
    assert s["after_idle"]["planner"]["idle"]["plans"] >= 1, s["after_idle"]["planner"]["idle"]
    assert idle["prefetches"] >= 1, idle
    assert idle["idle_plans"] >= 1, idle
    assert idle["parked_host_blocks"] >= 10, idle
    # p1's next request: its whole parked prefix from host, synchronously, in time
    t = turns(got)["p1.t2"]
    assert t["external_tokens"] == 320, t["external_tokens"]
    assert p1["loads_sync"] - idle["loads_sync"] == 1, (idle, p1)
    assert p1["loads_async"] == idle["loads_async"], (idle, p1)
    assert p1["hit_blocks_host"] - idle["hit_blocks_host"] == 10, (idle, p1)
    assert p1["prefetch_in_time"] - idle["prefetch_in_time"] == 1, (idle, p1)
    assert p1["prefetch_late"] == 0, p1


def test_the_displaced_session_still_hits_from_nvme(runs):
    _, got = runs
    s = snaps(got)
    p1, p2 = s["after_p1"]["planner"], s["after_p2"]["planner"]
    t = turns(got)["p2.t2"]
    # p2's host copy made room for the prefetch: its prefix comes back from NVMe
    assert t["external_tokens"] == 640, t["external_tokens"]
    assert p2["hit_blocks_nvme"] - p1["hit_blocks_nvme"] >= 1, (p1, p2)
    assert p2["load_failed_blocks"] == 0, p2


def test_the_gap_predictions_are_counted(runs):
    _, got = runs
    s = snaps(got)
    # p1 and p2 came back once each, both after a predicted gap
    end = s["after_p2"]["planner"]
    assert s["before_idle"]["planner"]["predicted_gaps"] == 0
    assert end["predicted_gaps"] == 2, end
    assert end["gaps_below_p50"] <= end["gaps_below_p90"] <= 2, end
