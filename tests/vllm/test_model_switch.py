"""A store written by one model is never served to another (real vLLM engines, CPU backend).

vLLM's block hashes cover the tokens, not the model: two models of the same KV geometry
(here the tiny Llama and a copy with other weights) produce the same hashes for the same
prompt. kvpark's block keys also cover the model's identity, which the connector derives
from vLLM's config, and each store carries a label naming its model.

  A   model A parks a session (host tier in a file, NVMe tier), then exits.
  B   model B restarts on the same nvme_dir and host_file with that session's history:
      zero kvpark hits, both stores reported as another model's, outputs equal to model B
      without kvpark.
  A2  model A again on the same stores (after B): the session still hits, so the stores
      held usable blocks and only the model's identity kept them from B.
"""

from __future__ import annotations

from pathlib import Path

from conftest import CACHE
from test_e2e import BS, assert_same_outputs, base_spec, expected_hit, run_engine, snaps, turn, turns


def test_other_model_on_the_same_stores_gets_no_hits(tmp_path: Path, tiny_model: str, libkvpark):
    import tiny_model as tm

    model_b = str(tm.build(CACHE / "tiny-llama-seed99", seed=99))
    (tmp_path / "shm").mkdir()
    cfg = {
        "host_bytes": "640KiB",
        "host_file": str(tmp_path / "shm" / "kv"),
        "nvme_dir": str(tmp_path / "nvme"),
        "sync_load_budget_bytes": "512KiB",
    }
    park = [turn(["m1"], 320, "a.m1.t1", {"awaiting": "user"}), {"op": "drain"}]
    resume = [turn(["m1"], 64, "m1.t2"), {"op": "snapshot", "tag": "after"}]

    a = run_engine(tmp_path, "A", base_spec(tiny_model, cfg, park))
    ref_b = run_engine(tmp_path, "refB", base_spec(model_b, None, resume, prev=a))
    b = run_engine(tmp_path, "B", base_spec(model_b, cfg, resume, prev=a))
    a2 = run_engine(tmp_path, "A2", base_spec(tiny_model, cfg, resume, prev=a))

    # the two models really differ: same prompt, other greedy tokens
    assert turns(ref_b)["m1.t2"]["sessions"]["m1"]["tokens"] != turns(a2)["m1.t2"]["sessions"]["m1"]["tokens"]

    # B: nothing from A's stores, outputs as model B computes them alone
    tb = turns(b)["m1.t2"]
    assert tb["external_tokens"] == 0
    assert tb["sessions"]["m1"]["num_cached_tokens"] == 0
    assert_same_outputs(ref_b, b, ["m1.t2"])
    p, m = snaps(b)["after"]["planner"], snaps(b)["after"]["mover"]["counters"]
    assert p["hit_blocks_host"] == 0 and p["hit_blocks_nvme"] == 0, p
    # A's blocks were found (and are still there for A2) but match no key of model B;
    # the worker said once per store that it holds another model's KV
    assert p["recovered_blocks"] > 0, p
    assert m["other_model_stores"] == 2, m
    assert m["load_blocks_host"] == 0 and m["load_blocks_nvme"] == 0, m

    # A2: model A finds its session again (B's turn added its own blocks, A's remain)
    prev = turns(a)["a.m1.t1"]["sessions"]["m1"]["prompt_len"]
    t2 = turns(a2)["m1.t2"]
    want = expected_hit(prev, t2["sessions"]["m1"]["prompt_len"])
    assert want == 320
    assert t2["external_tokens"] == want
    pa, ma = snaps(a2)["after"]["planner"], snaps(a2)["after"]["mover"]["counters"]
    assert pa["hit_blocks_host"] + pa["hit_blocks_nvme"] == want // BS, pa
    assert ma["other_model_stores"] == 2, ma  # B had labelled both stores
