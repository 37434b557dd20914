"""Failures end as recompute, never as a hang, in a real vLLM engine (CPU backend).

kvpark's test hook `KVPARK_FAULT` (read once when the worker's mover is created) makes
every job of one background thread panic:

- `loader_panic`: a session's second turn finds its first turn parked in the host tier;
  the load is asynchronous (`sync_load_budget_bytes` 0: every load goes to the loader
  thread, the request waits in WAITING_FOR_REMOTE_KVS), the loader job panics, the mover
  reports the request in finished_recving with every block failed, and vLLM recomputes
  them (kv_load_failure_policy "recompute").
- `saver_panic`: every save panics; each request is still reported in finished_sending,
  so vLLM frees its blocks (nothing is parked, later turns miss).

Each engine's greedy tokens and top-5 logprobs equal a reference engine without kvpark,
and the scheduler ends empty (no request left waiting, no block held).
"""

from __future__ import annotations

import pytest

from test_e2e import BS, assert_same_outputs, base_spec, run_engine, snaps, turn, turns

OPS = [
    turn(["f1"], 320, "f1.t1", {"awaiting": "user"}),
    {"op": "reset_prefix_cache"},
    turn(["f1"], 64, "f1.t2"),
    {"op": "snapshot", "tag": "after"},
    turn(["f2", "f3"], 200, "f23.t1"),
    {"op": "reset_prefix_cache"},
    turn(["f2", "f3"], 40, "f23.t2"),
    {"op": "check_empty", "tag": "end"},
]
TAGS = ["f1.t1", "f1.t2", "f23.t1", "f23.t2"]
# Engine timeout: a request stuck in WAITING_FOR_REMOTE_KVS would hang generate().
TIMEOUT_S = 420


@pytest.fixture(scope="module")
def fault_runs(tmp_path_factory, tiny_model, libkvpark):
    tmp = tmp_path_factory.mktemp("faults")
    cfg = {"host_bytes": "2MiB", "sync_load_budget_bytes": 0}
    ref = run_engine(tmp, "ref", base_spec(tiny_model, None, OPS), timeout=TIMEOUT_S)
    out = {"ref": ref}
    for fault in ("loader_panic", "saver_panic"):
        out[fault] = run_engine(
            tmp,
            fault,
            base_spec(tiny_model, {**cfg, "nvme_dir": str(tmp / f"nvme-{fault}")}, OPS),
            env_extra={"KVPARK_FAULT": fault},
            timeout=TIMEOUT_S,
        )
    return out


def assert_empty_at_end(out: dict) -> None:
    end = {r["tag"]: r for r in out["results"] if r["op"] == "check_empty"}["end"]
    assert end["requests"] == 0 and end["running"] == 0 and end["waiting"] == 0, end
    assert end["req_to_blocks"] == 0 and end["free_blocks"] == end["num_blocks"] - 1, end


def test_a_panicking_loader_ends_as_recompute_with_equal_outputs(fault_runs):
    ref, got = fault_runs["ref"], fault_runs["loader_panic"]
    assert_same_outputs(ref, got, TAGS)
    t2 = turns(got)["f1.t2"]
    # kvpark offered the parked prefix as an async load; it failed and was recomputed
    assert t2["external_tokens"] == 320
    assert t2["load_error_blocks"] == 320 // BS
    p = snaps(got)["after"]["planner"]
    assert p["loads_async"] >= 1 and p["loads_sync"] == 0, p
    m = got["final"]["mover"]["counters"]
    assert m["job_panics"] >= 1 and m["loaded_blocks"] == 0, m
    assert m["load_failed_blocks"] >= 320 // BS, m
    assert got["final"]["mover"]["threads_stopped"] == [], got["final"]["mover"]
    assert_empty_at_end(got)


def test_a_panicking_saver_reports_every_save_and_parks_nothing(fault_runs):
    ref, got = fault_runs["ref"], fault_runs["saver_panic"]
    assert_same_outputs(ref, got, TAGS)
    m = got["final"]["mover"]["counters"]
    assert m["saves"] == 0 and m["saved_blocks"] == 0, m
    assert m["job_panics"] >= 1 and m["save_failed_blocks"] > 0, m
    assert turns(got)["f1.t2"]["external_tokens"] == 0
    assert_empty_at_end(got)
