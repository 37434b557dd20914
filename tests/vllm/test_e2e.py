"""End-to-end: real vLLM engines (CPU backend, tiny Llama, float32) with and without kvpark.

Every engine runs in its own process (tests/vllm/engine_run.py) and reports JSON. One
reference engine without the connector runs every turn of every phase; the kvpark engines
run the same turns (prompts are built from each session's own history, so a divergence
would also change later prompts) and must produce the same greedy tokens and top-5
logprobs (|Δ| <= 1e-4).

Phases (each a fresh engine process on the same NVMe store directory; B with its worker in
a separate process, so plans and worker metadata cross a process boundary):
  A  host hit after vLLM's prefix cache was reset; NVMe hit after the small host tier
     evicted the session; many interleaved sessions overflowing the GPU cache, then a
     leak check of the scheduler.
  B  warm restart: the host tier is empty, the sessions come back from NVMe.
  C  one byte flipped in every NVMe record's payload between runs: the loads fail,
     are reported as load errors, vLLM recomputes, outputs still equal the reference.
  D/E host tier in a file (`host_file`), host-only policy, no NVMe tier: D parks a
     session and exits; E, a fresh engine process, finds it in the arena file and
     serves the hit from host memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
BS = 32
KV_BYTES = 4 << 20  # 128 blocks of 32 tokens (1 KiB per token): the GPU(CPU) cache overflows
MAX_MODEL_LEN = 2048
MAX_TOKENS = 8
TOL = 1e-4
# NVMe record layout (src/tier/nvme/format.rs): a 4 KiB-aligned record, magic at 0,
# format version (u16) at 4, stored length (u32) at 64; the payload starts at 4096 in
# format version 2.
RECORD_ALIGN, HEADER_LEN = 4096, 128
PAYLOAD_OFF = {2: 4096}

INTERLEAVED = [f"d{i}" for i in range(6)]


def turn(sessions, new_tokens, tag, hint=None):
    return {
        "op": "turn",
        "sessions": sessions,
        "new_tokens": new_tokens,
        "max_tokens": MAX_TOKENS,
        "hint": hint,
        "tag": tag,
    }


PHASE_A = [
    turn(["s1"], 320, "a.s1.t1", {"awaiting": "user"}),
    {"op": "reset_prefix_cache"},
    turn(["s1"], 64, "a.s1.t2.host", {"awaiting": "tool", "tool": "Bash"}),
    {"op": "snapshot", "tag": "a.after_host"},
    turn(["s2"], 640, "a.s2.t1"),
    turn(["s3"], 640, "a.s3.t1"),
    {"op": "reset_prefix_cache"},
    {"op": "snapshot", "tag": "a.before_nvme"},
    turn(["s1"], 64, "a.s1.t3.nvme"),
    {"op": "snapshot", "tag": "a.after_nvme"},
    turn(INTERLEAVED, 640, "a.d.t1"),
    turn(INTERLEAVED, 96, "a.d.t2"),
    turn(INTERLEAVED, 96, "a.d.t3"),
    {"op": "check_empty", "tag": "a.end"},
]
PHASE_B = [
    turn(["s1"], 64, "b.s1.t4.restart"),
    {"op": "snapshot", "tag": "b.after"},
]
PHASE_C = [
    turn(["s2"], 64, "c.s2.t2.corrupt"),
    {"op": "snapshot", "tag": "c.after"},
    {"op": "check_empty", "tag": "c.end"},
]
PHASE_D = [
    turn(["h1"], 320, "d.h1.t1", {"awaiting": "user"}),
    {"op": "drain"},
]
PHASE_E = [
    turn(["h1"], 64, "e.h1.t2.hostfile"),
    {"op": "snapshot", "tag": "e.after"},
]


def run_engine(
    tmp: Path, name: str, spec: dict, killed: bool = False, env_extra: dict | None = None, timeout: int = 600
) -> dict:
    """Runs one engine process; `killed`: it ends itself with SIGKILL (op "sigkill");
    `env_extra`: environment variables for that process only (e.g. KVPARK_FAULT)."""
    spec_path, out_path = tmp / f"{name}.spec.json", tmp / f"{name}.out.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ)
    env.pop("KVPARK_FAULT", None)
    env.update(env_extra or {})
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    log = tmp / f"{name}.log"
    with open(log, "w") as f:
        p = subprocess.run(
            [sys.executable, str(HERE / "engine_run.py"), str(spec_path), str(out_path)],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
            timeout=timeout,
        )
    if p.returncode != (-9 if killed else 0):
        tail = log.read_text()[-6000:]
        raise AssertionError(f"engine {name} exited {p.returncode}; log tail:\n{tail}")
    return json.loads(out_path.read_text())


def base_spec(model: str, kvpark: dict | None, ops: list, prev: dict | None = None) -> dict:
    spec = {
        "model": model,
        "block_size": BS,
        "kv_bytes": KV_BYTES,
        "max_model_len": MAX_MODEL_LEN,
        "kvpark": kvpark,
        "ops": ops,
    }
    if prev is not None:
        spec["history"] = prev["history"]
        spec["turn_counts"] = prev["turn_counts"]
    return spec


def turns(out: dict) -> dict[str, dict]:
    return {r["tag"]: r for r in out["results"] if r["op"] == "turn"}


def snaps(out: dict) -> dict[str, dict]:
    return {r["tag"]: r for r in out["results"] if r["op"] == "snapshot"}


def assert_same_outputs(ref: dict, got: dict, tags: list[str]) -> None:
    rt, gt = turns(ref), turns(got)
    for tag in tags:
        for s, r in rt[tag]["sessions"].items():
            g = gt[tag]["sessions"][s]
            assert g["prompt_len"] == r["prompt_len"], (tag, s)
            assert g["tokens"] == r["tokens"], f"{tag}/{s}: tokens differ"
            assert len(g["logprobs"]) == len(r["logprobs"])
            for pos, (rl, gl) in enumerate(zip(r["logprobs"], g["logprobs"])):
                rd, gd = dict((int(t), lp) for t, lp in rl), dict((int(t), lp) for t, lp in gl)
                common = set(rd) & set(gd)
                assert len(common) >= len(rd) - 1, f"{tag}/{s}@{pos}: top-k sets differ {rd} {gd}"
                for t in common:
                    assert abs(rd[t] - gd[t]) <= TOL, f"{tag}/{s}@{pos} token {t}: {rd[t]} vs {gd[t]}"


def parked_tokens(prev_prompt_len: int) -> int:
    """Tokens kvpark can have parked for a finished turn: its fully computed blocks
    (prompt + all generated tokens but the last, which was never fed back)."""
    return (prev_prompt_len + MAX_TOKENS - 1) // BS * BS


def expected_hit(prev_prompt_len: int, prompt_len: int) -> int:
    """Full-block prefix of the new prompt that the previous turn parked (>= 1 token left)."""
    return min(parked_tokens(prev_prompt_len), (prompt_len - 1) // BS * BS)


def planner_delta(out: dict, before: str, after: str, key: str) -> int:
    s = snaps(out)
    return s[after]["planner"][key] - s[before]["planner"][key]


def after_resets(*phases: list) -> list:
    """The phases' ops in one engine, vLLM's prefix cache reset between phases: what a
    reference engine without kvpark runs for phases that are separate engines with it."""
    ops: list = []
    for i, phase in enumerate(phases):
        if i:
            ops.append({"op": "reset_prefix_cache"})
        ops.extend(phase)
    return ops


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model, libkvpark):
    tmp = tmp_path_factory.mktemp("e2e")
    nvme = tmp / "nvme"
    # A host tier of 20 blocks (32 KiB each): two long sessions push the first one out to
    # NVMe; the default policy ("lmcache-lru") writes every parked block through to NVMe.
    # Host hits up to 16 blocks load before the forward (sync); NVMe hits always async.
    cfg = {"host_bytes": "640KiB", "nvme_dir": str(nvme), "sync_load_budget_bytes": "512KiB"}
    ref = run_engine(
        tmp,
        "ref",
        base_spec(
            tiny_model,
            None,
            after_resets(PHASE_A, PHASE_B, PHASE_C, PHASE_D, PHASE_E),
        ),
    )
    # Phase A loads host hits layer by layer beside the forward (on the CPU backend the
    # default, "auto", loads every layer first; B and C run the default).
    a = run_engine(tmp, "A", base_spec(tiny_model, {**cfg, "layerwise_load": True}, PHASE_A))
    # B also runs its worker in a separate process: plans and worker metadata are
    # serialized across the process boundary as in a real deployment.
    b = run_engine(tmp, "B", {**base_spec(tiny_model, cfg, PHASE_B, prev=a), "executor": "mp"})
    flipped = flip_payload_bytes(nvme)
    c = run_engine(tmp, "C", base_spec(tiny_model, cfg, PHASE_C, prev=b))
    # D/E: the host tier lives in a file; no NVMe tier, host-only policy.
    (tmp / "shm").mkdir()
    hf = {
        "host_bytes": "640KiB",
        "host_file": str(tmp / "shm" / "kv"),
        "policy": "vllm-offload",
        "sync_load_budget_bytes": "512KiB",
    }
    d = run_engine(tmp, "D", base_spec(tiny_model, hf, PHASE_D, prev=c))
    e = run_engine(tmp, "E", base_spec(tiny_model, hf, PHASE_E, prev=d))
    return {"ref": ref, "A": a, "B": b, "C": c, "D": d, "E": e, "flipped": flipped, "tmp": tmp}


def flip_payload_bytes(nvme_dir: Path) -> int:
    """Flips one byte in the middle of every record's payload (headers stay valid, so the
    store still indexes the record and only the payload checksum can catch it)."""
    flipped = 0
    for seg in sorted(p for p in nvme_dir.rglob("*") if p.is_file()):
        data = bytearray(seg.read_bytes())
        off = 0
        while off + HEADER_LEN <= len(data):
            if data[off : off + 4] != b"KVPR":
                off += RECORD_ALIGN
                continue
            version = int.from_bytes(data[off + 4 : off + 6], "little")
            assert version in PAYLOAD_OFF, f"record format version {version}: update this test"
            payload = off + PAYLOAD_OFF[version]
            stored = int.from_bytes(data[off + 64 : off + 68], "little")
            if stored > 0 and payload + stored <= len(data):
                data[payload + stored // 2] ^= 0x5A
                flipped += 1
            off = payload + (stored + RECORD_ALIGN - 1) // RECORD_ALIGN * RECORD_ALIGN
        seg.write_bytes(bytes(data))
    return flipped


def test_a_host_hit_after_prefix_cache_reset(runs):
    ref, a = runs["ref"], runs["A"]
    assert_same_outputs(ref, a, ["a.s1.t1", "a.s1.t2.host"])
    t1, t2 = turns(a)["a.s1.t1"], turns(a)["a.s1.t2.host"]
    want = expected_hit(t1["sessions"]["s1"]["prompt_len"], t2["sessions"]["s1"]["prompt_len"])
    assert want == 320
    assert t2["external_tokens"] == want
    assert t2["sessions"]["s1"]["num_cached_tokens"] == want
    p = snaps(a)["a.after_host"]["planner"]
    assert p["hit_blocks_host"] == want // BS
    assert p["loads_sync"] == 1 and p["loads_async"] == 0
    assert p["shim"]["bad_hints"] == 0  # the session hints were accepted
    # the host hit was scattered layer by layer beside vLLM's forward: every attention
    # layer waited for its own layer through wait_for_layer_load
    m = a["final"]["mover"]["counters"]
    assert m["layerwise_loads"] >= 1 and m["layerwise_errors"] == 0, m
    assert m["layer_waits"] >= m["layerwise_loads"], m
    # the reference engine had nothing cached after the reset
    assert turns(runs["ref"])["a.s1.t2.host"]["sessions"]["s1"]["num_cached_tokens"] == 0


def test_b_nvme_hit_after_host_eviction(runs):
    ref, a = runs["ref"], runs["A"]
    assert_same_outputs(ref, a, ["a.s2.t1", "a.s3.t1", "a.s1.t3.nvme"])
    t2, t3 = turns(a)["a.s1.t2.host"], turns(a)["a.s1.t3.nvme"]
    want = expected_hit(t2["sessions"]["s1"]["prompt_len"], t3["sessions"]["s1"]["prompt_len"])
    assert t3["external_tokens"] == want
    assert t3["sessions"]["s1"]["num_cached_tokens"] == want
    assert planner_delta(a, "a.before_nvme", "a.after_nvme", "hit_blocks_nvme") > 0
    assert planner_delta(a, "a.before_nvme", "a.after_nvme", "loads_async") >= 1


def test_b_nvme_hit_after_restart(runs):
    ref, a, b = runs["ref"], runs["A"], runs["B"]
    assert_same_outputs(ref, b, ["b.s1.t4.restart"])
    prev = turns(a)["a.s1.t3.nvme"]["sessions"]["s1"]["prompt_len"]
    t4 = turns(b)["b.s1.t4.restart"]
    want = expected_hit(prev, t4["sessions"]["s1"]["prompt_len"])
    assert t4["external_tokens"] == want
    s = snaps(b)["b.after"]["planner"]
    assert s["recovered_blocks"] > 0
    assert s["hit_blocks_nvme"] == want // BS


def test_c_corrupt_record_is_recomputed(runs):
    ref, c = runs["ref"], runs["C"]
    assert runs["flipped"] > 0
    assert_same_outputs(ref, c, ["c.s2.t2.corrupt"])
    t = turns(c)["c.s2.t2.corrupt"]
    # kvpark offered the parked prefix, the load failed and was reported, vLLM recomputed
    assert t["external_tokens"] > 0
    assert t["load_error_blocks"] > 0
    final = c["final"]["mover"]["counters"]
    assert final["load_corrupt"] > 0
    end = {r["tag"]: r for r in c["results"] if r["op"] == "check_empty"}["c.end"]
    assert end["requests"] == 0 and end["free_blocks"] == end["num_blocks"] - 1


def test_d_interleaved_sessions_leave_no_leaks(runs):
    ref, a = runs["ref"], runs["A"]
    assert_same_outputs(ref, a, ["a.d.t1", "a.d.t2", "a.d.t3"])
    t = turns(a)
    # the interleaved sessions do not fit the GPU cache together: later turns come back
    # through kvpark
    assert t["a.d.t2"]["external_tokens"] + t["a.d.t3"]["external_tokens"] > 0
    end = {r["tag"]: r for r in a["results"] if r["op"] == "check_empty"}["a.end"]
    assert end["reset_ok"]
    assert end["requests"] == 0 and end["running"] == 0 and end["waiting"] == 0
    assert end["req_to_blocks"] == 0 and end["num_cached_block"] == 0
    assert end["free_blocks"] == end["num_blocks"] - 1


def test_e_host_file_survives_an_engine_restart(runs):
    ref, d, e = runs["ref"], runs["D"], runs["E"]
    assert_same_outputs(ref, d, ["d.h1.t1"])
    assert_same_outputs(ref, e, ["e.h1.t2.hostfile"])
    prev = turns(d)["d.h1.t1"]["sessions"]["h1"]["prompt_len"]
    t = turns(e)["e.h1.t2.hostfile"]
    want = expected_hit(prev, t["sessions"]["h1"]["prompt_len"])
    assert want == 320
    assert t["external_tokens"] == want
    assert t["sessions"]["h1"]["num_cached_tokens"] == want
    snap = snaps(e)["e.after"]
    p, m = snap["planner"], snap["mover"]["counters"]
    assert p["recovered_blocks"] >= want // BS  # the scheduler read the slot table
    assert p["hit_blocks_host"] == want // BS and p["hit_blocks_nvme"] == 0
    assert m["host_recovered_blocks"] >= want // BS and m["host_recovered_dropped"] == 0, m
    assert m["load_blocks_host"] == want // BS and m["load_blocks_nvme"] == 0, m
    # the reference engine had nothing cached after the reset
    assert turns(ref)["e.h1.t2.hostfile"]["sessions"]["h1"]["num_cached_tokens"] == 0
