"""Time to first token of a resumed turn: kvpark host hit, kvpark NVMe hit, recompute.

    python benches/vllm_ttft.py [--prefix-tokens 6144] [--samples 3] [--model bench|tiny]

Real vLLM engines (CPU backend, float32, enforce_eager) on a random Llama-architecture model
built locally (tests/vllm/tiny_model.py; "bench" = 8 layers, hidden 512, 16 KiB of KV per
token). Each sample is one session: a first turn of `--prefix-tokens` tokens is generated
and parked, vLLM's prefix cache is reset, and the next turn (prefix + 32 new tokens,
1 output token) is timed: the wall time of `LLM.generate` for that one request = TTFT.

  recompute  vLLM without kvpark: the whole prefix is prefilled again (the baseline)
  host       kvpark, same engine: the prefix comes back from the host tier (sync load;
             on the CPU backend the default loads every layer before the forward)
  host-lw    the same with `layerwise_load: true`: layer by layer beside the forward,
             each attention layer waiting for its own layer (a separate engine process)
  nvme       kvpark, fresh engine on the same NVMe directory (warm restart, host tier
             empty): the prefix comes back from NVMe (async load, lz4-planes records)

All run in this one invocation (four engine processes, one after the other), so the
speedups are ratios measured in the same run on the same machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests" / "vllm"
sys.path.insert(0, str(TESTS))

import tiny_model  # noqa: E402

BS = 32
NEW_TOKENS = 32


def run_engine(work: Path, name: str, spec: dict) -> dict:
    spec_path, out_path, log = work / f"{name}.spec.json", work / f"{name}.out.json", work / f"{name}.log"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    with open(log, "w") as f:
        p = subprocess.run(
            [sys.executable, str(TESTS / "engine_run.py"), str(spec_path), str(out_path)],
            stdout=f, stderr=subprocess.STDOUT, env=env,
        )
    if p.returncode != 0:
        sys.stderr.write(log.read_text()[-4000:])
        raise SystemExit(f"engine {name} failed (log: {log})")
    return json.loads(out_path.read_text())


def turn(s: str, n: int, tag: str) -> dict:
    return {"op": "turn", "sessions": [s], "new_tokens": n, "max_tokens": 1, "tag": tag}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prefix-tokens", type=int, default=6144)
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--model", choices=["bench", "tiny"], default="bench")
    ap.add_argument("--work", default=None, help="work dir (default: a temp dir); NVMe records go to WORK/nvme")
    ap.add_argument("--json", default=None, help="also write the results as JSON here")
    args = ap.parse_args()

    cache = Path(os.environ.get("KVPARK_TEST_CACHE", Path.home() / ".cache" / "kvpark-tests"))
    overrides = tiny_model.BENCH_OVERRIDES if args.model == "bench" else None
    model = str(tiny_model.build(cache / f"{args.model}-llama", overrides=overrides))
    cfgm = {**tiny_model.CONFIG, **(overrides or {})}
    kv_per_token = 2 * cfgm["num_hidden_layers"] * cfgm["num_key_value_heads"] * cfgm["head_dim"] * 4
    prefix = args.prefix_tokens // BS * BS
    max_len = prefix + 4 * BS + NEW_TOKENS
    gpu_kv = (max_len + BS) * kv_per_token * 2
    work = Path(args.work or tempfile.mkdtemp(prefix="kvpark-ttft-"))
    work.mkdir(parents=True, exist_ok=True)
    nvme = work / "nvme"
    parked = 2 * args.samples * (prefix + BS) * kv_per_token
    kvpark_cfg = {
        "host_bytes": max(parked * 2, 64 << 20),
        "nvme_dir": str(nvme),
        "sync_load_budget_bytes": "1GiB",
    }

    def spec(kv, ops, prev=None):
        s = {"model": model, "block_size": BS, "kv_bytes": gpu_kv, "max_model_len": max_len, "kvpark": kv, "ops": ops}
        if prev:
            s["history"], s["turn_counts"] = prev["history"], prev["turn_counts"]
        return s

    warm = [turn("warmup", 2 * BS, "warmup"), turn("warmup", NEW_TOKENS, "warmup2")]
    n = args.samples
    # recompute baseline: vLLM without kvpark
    ops = warm + [turn(f"r{i}", prefix, f"first.r{i}") for i in range(n)] + [{"op": "reset_prefix_cache"}]
    ops += [turn(f"r{i}", NEW_TOKENS, f"resume.recompute.{i}") for i in range(n)]
    ref = run_engine(work, "recompute", spec(None, ops))
    # kvpark engine 1: park 2n sessions, resume n from the host tier
    ops = warm + [turn(f"{k}{i}", prefix, f"first.{k}{i}") for k in ("h", "n") for i in range(n)]
    ops += [{"op": "drain"}, {"op": "reset_prefix_cache"}]
    ops += [turn(f"h{i}", NEW_TOKENS, f"resume.host.{i}") for i in range(n)]
    ops += [{"op": "snapshot", "tag": "host"}]
    host = run_engine(work, "host", spec(kvpark_cfg, ops))
    # the same host hits loaded layer by layer beside the forward (own NVMe dir)
    lw_cfg = {**kvpark_cfg, "nvme_dir": str(work / "nvme-lw"), "layerwise_load": True}
    ops = warm + [turn(f"w{i}", prefix, f"first.w{i}") for i in range(n)]
    ops += [{"op": "drain"}, {"op": "reset_prefix_cache"}]
    ops += [turn(f"w{i}", NEW_TOKENS, f"resume.host-lw.{i}") for i in range(n)]
    ops += [{"op": "snapshot", "tag": "host-lw"}]
    lw = run_engine(work, "host-lw", spec(lw_cfg, ops))
    # kvpark engine 2: warm restart on the same NVMe directory, resume the other n
    ops = warm + [turn(f"n{i}", NEW_TOKENS, f"resume.nvme.{i}") for i in range(n)] + [{"op": "snapshot", "tag": "nvme"}]
    nv = run_engine(work, "nvme", spec(kvpark_cfg, ops, prev=host))

    def walls(out, kind):
        rs = [r for r in out["results"] if r["op"] == "turn" and (r["tag"] or "").startswith(f"resume.{kind}.")]
        return [r["wall_s"] for r in rs], [r["external_tokens"] for r in rs]

    rows = []
    base = None
    for kind, out in (("recompute", ref), ("host", host), ("host-lw", lw), ("nvme", nv)):
        w, ext = walls(out, kind)
        med = statistics.median(w)
        base = base or med
        rows.append({"scenario": kind, "ttft_median_s": med, "ttft_min_s": min(w), "samples": len(w),
                     "external_tokens": ext, "speedup": base / med})
    for r in rows[1:]:
        want = prefix
        if any(e != want for e in r["external_tokens"]):
            print(f"WARNING: {r['scenario']}: external hit tokens {r['external_tokens']}, expected {want} each")

    print(f"\nTTFT of a resumed turn: prefix {prefix} tokens ({prefix * kv_per_token / 2**20:.0f} MiB of fp32 KV), "
          f"+{NEW_TOKENS} new tokens, 1 output token; model {args.model} ({cfgm['num_hidden_layers']} layers, "
          f"hidden {cfgm['hidden_size']}); {os.cpu_count()} CPUs")
    print(f"{'scenario':<10} {'median s':>9} {'min s':>8} {'n':>3} {'hit tokens':>11} {'vs recompute':>13}")
    for r in rows:
        print(f"{r['scenario']:<10} {r['ttft_median_s']:>9.3f} {r['ttft_min_s']:>8.3f} {r['samples']:>3} "
              f"{r['external_tokens'][0]:>11} {r['speedup']:>12.2f}x")
    mh = next(x for x in host["results"] if x["op"] == "snapshot")["mover"]["counters"]
    ml = next(x for x in lw["results"] if x["op"] == "snapshot")["mover"]["counters"]
    mn = next(x for x in nv["results"] if x["op"] == "snapshot")["mover"]["counters"]
    print(f"host loads: {mh['load_blocks_host']} blocks in {mh['load_ns'] / 1e6:.1f} ms before the forward; "
          f"host-lw loads: {ml['load_blocks_host']} blocks in {ml['load_ns'] / 1e6:.1f} ms beside the forward, "
          f"which waited {ml['layer_wait_ns'] / 1e6:.1f} ms in {ml['layer_waits']} wait_for_layer_load calls "
          f"({ml['layerwise_loads']} layer-wise loads); nvme loads: {mn['load_blocks_nvme']} blocks in "
          f"{mn['load_ns'] / 1e6:.1f} ms (mover)")
    if args.json:
        Path(args.json).write_text(json.dumps({"prefix_tokens": prefix, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
