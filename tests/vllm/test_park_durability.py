"""A turn three times the host tier parks whole, lands on NVMe while the engine idles, and
survives a crash (real vLLM engines, CPU backend).

  K  one turn of ~59 blocks against a host tier of 19 (the save streams through the host
     tier to NVMe), then the engine is drained (the save reported), sits idle without a
     step for a few seconds, and kills itself with SIGKILL (no destructor, no flush).
  R  a fresh engine on the same NVMe directory resumes the session: every block of the
     parked prefix comes from NVMe, outputs equal an engine without kvpark.
"""

from __future__ import annotations

from pathlib import Path

from test_e2e import BS, assert_same_outputs, base_spec, expected_hit, run_engine, snaps, turn, turns

HOST_BLOCKS = 19
NEW_TOKENS = 1900  # 59 full blocks parked: more than 3x the host tier


def test_oversize_turn_survives_an_idle_crash(tmp_path: Path, tiny_model: str, libkvpark):
    cfg = {
        "host_bytes": f"{HOST_BLOCKS * 32}KiB",  # 32 KiB blocks (1 KiB of KV per token)
        "nvme_dir": str(tmp_path / "nvme"),
        "sync_load_budget_bytes": "512KiB",
    }
    park = [
        turn(["big"], NEW_TOKENS, "k.t1", {"awaiting": "user"}),
        {"op": "drain"},
        {"op": "snapshot", "tag": "k.parked"},
        {"op": "idle", "seconds": 4},
        {"op": "sigkill", "tag": "k.killed"},
    ]
    resume = [turn(["big"], 64, "r.t2"), {"op": "snapshot", "tag": "r.after"}]
    ref = run_engine(
        tmp_path,
        "ref",
        base_spec(tiny_model, None, [turn(["big"], NEW_TOKENS, "k.t1"), {"op": "reset_prefix_cache"}, *resume]),
    )
    k = run_engine(tmp_path, "K", base_spec(tiny_model, cfg, park), killed=True)
    r = run_engine(tmp_path, "R", base_spec(tiny_model, cfg, resume, prev=k))

    prev = turns(k)["k.t1"]["sessions"]["big"]["prompt_len"]
    parked_blocks = (prev + 8 - 1) // BS
    assert parked_blocks >= 3 * HOST_BLOCKS
    m = snaps(k)["k.parked"]["mover"]["counters"]
    # the whole turn was parked: nothing failed for want of host room, nothing dropped
    assert m["saved_blocks"] == parked_blocks, m
    assert m["save_failed_blocks"] == 0 and m["dropped_blocks"] == 0, m
    assert m["save_stream_batches"] >= 2, m

    assert_same_outputs(ref, r, ["r.t2"])
    t2 = turns(r)["r.t2"]
    want = expected_hit(prev, t2["sessions"]["big"]["prompt_len"])
    assert want == parked_blocks * BS
    assert t2["external_tokens"] == want
    assert t2["sessions"]["big"]["num_cached_tokens"] == want
    p = snaps(r)["r.after"]["planner"]
    assert p["recovered_blocks"] == parked_blocks, p
    assert p["hit_blocks_nvme"] == parked_blocks and p["hit_blocks_host"] == 0, p
    mr = snaps(r)["r.after"]["mover"]["counters"]
    assert mr["load_blocks_nvme"] == parked_blocks and mr["load_failed_blocks"] == 0, mr
