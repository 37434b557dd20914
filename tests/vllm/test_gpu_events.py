"""kvpark hears vLLM's GPU prefix-cache evictions from vLLM's own KV-cache events.

A real vLLM engine (CPU backend, tiny Llama, 4 MiB of KV = 128 blocks of 32 tokens) with
`kv_events_config` publishing over ZMQ and the kvpark connector (policy kvpark). The
connector subscribes from the engine-core process and tells the planner which parked
contexts vLLM gave up:

- two parked sessions, then `reset_prefix_cache` (vLLM publishes AllBlocksCleared): both
  contexts are counted as given up, none before;
- session p1 comes back and parks again, then two long requests fill the GPU cache: the
  second takes the never-cached blocks and then the least recently used ones, p1's,
  tail first, so vLLM evicts p1's deepest block (BlockRemoved) and not the first long
  request's blocks, which were freed after p1's: exactly one more context given up.
"""

from __future__ import annotations

import socket

import pytest

from test_e2e import base_spec, run_engine, snaps, turn, turns


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


PHASE = [
    turn(["p1"], 320, "p1.t1", {"awaiting": "user"}),
    {"op": "drain"},
    turn(["p2"], 320, "p2.t1", {"awaiting": "user"}),
    {"op": "drain"},
    # a request of less than a block (never parked): steps that move the events along
    turn(["r1"], 16, "r1.t1"),
    {"op": "idle", "seconds": 1.5},
    {"op": "snapshot", "tag": "parked"},
    {"op": "reset_prefix_cache"},
    turn(["r2"], 16, "r2.t1"),
    {"op": "idle", "seconds": 1.5},
    {"op": "snapshot", "tag": "cleared"},
    turn(["p1"], 64, "p1.t2", {"awaiting": "user"}),
    {"op": "drain"},
    turn(["f1"], 1880, "f1.t1", {"awaiting": "user"}),
    {"op": "drain"},
    {"op": "idle", "seconds": 1.5},
    {"op": "snapshot", "tag": "filled_once"},
    turn(["f2"], 1880, "f2.t1", {"awaiting": "user"}),
    {"op": "drain"},
    turn(["r3"], 16, "r3.t1"),
    {"op": "idle", "seconds": 1.5},
    {"op": "snapshot", "tag": "evicted"},
]


@pytest.fixture(scope="module", params=["1", "0"], ids=["int-hashes", "byte-hashes"])
def run(request, tmp_path_factory, tiny_model, libkvpark):
    """vLLM's events carry block hashes as integers by default
    (VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1), as the hash bytes otherwise: both work."""
    tmp = tmp_path_factory.mktemp("gpu_events")
    cfg = {"host_bytes": "4MiB", "nvme_dir": str(tmp / "nvme"), "policy": "kvpark"}
    spec = base_spec(tiny_model, cfg, PHASE)
    spec["kv_events"] = {"endpoint": f"tcp://*:{_free_port()}"}
    return run_engine(tmp, "events", spec, env_extra={"VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES": request.param})


def test_the_connector_subscribes(run):
    s = snaps(run)["parked"]["planner"]
    assert s["gpu_events"] == 1, s
    feed = s["kv_events"]
    assert feed["endpoint"].startswith("tcp://127.0.0.1:"), feed
    # every batch read, none lost or unreadable
    assert feed["batches"] >= 1 and feed["lost_batches"] == 0 and feed["bad_payloads"] == 0, feed


def test_nothing_is_given_up_while_the_gpu_cache_has_room(run):
    s = snaps(run)["parked"]["planner"]
    assert (s["gpu_removed_blocks"], s["gpu_dropped_sessions"]) == (0, 0), s


def test_a_cleared_prefix_cache_gives_up_every_parked_context(run):
    s = snaps(run)["cleared"]["planner"]
    # p1 and p2 (r1 and r2 hold less than a block: never parked)
    assert s["gpu_dropped_sessions"] == 2, s
    assert s["gpu_removed_blocks"] == 0, s


def test_an_evicted_context_is_heard_once_and_only_that_one(run):
    s = snaps(run)
    once, ev = s["filled_once"]["planner"], s["evicted"]["planner"]
    # f1 took blocks nobody had cached: no eviction yet
    assert once["gpu_removed_blocks"] == 0, once
    assert once["gpu_dropped_sessions"] == 2, once
    # f2 evicted p1's least recently used blocks, tail first: p1's context, not f1's
    assert ev["gpu_removed_blocks"] >= 1, ev
    assert ev["gpu_dropped_sessions"] == 3, ev
    t = turns(run)
    assert t["p1.t2"]["external_tokens"] > 0, t["p1.t2"]
