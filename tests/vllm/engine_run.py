"""Runs one vLLM engine (CPU backend) through a list of operations; prints JSON results.

    python tests/vllm/engine_run.py SPEC.json OUT.json

Used by test_e2e.py and benches/vllm_ttft.py. Each engine runs in its own process (vLLM's
CPU platform spawns; a fresh process also gives a clean warm-restart). The engine core and
the worker run in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, one worker), so the
scheduler and both connector instances are inspectable.

SPEC = {
  "model": dir, "block_size": 32, "kv_bytes": int, "max_model_len": int,
  "kvpark": null | {extra config},   # null = reference engine without the connector
  "executor": null | "mp",            # "mp": worker in its own process (worker connector
                                      # and its metrics then not inspectable here)
  "tensor_parallel_size": 1,          # optional; > 1 needs "executor": "mp"
  "gpu_memory_utilization": 0.92,     # optional (CPU backend: host memory per rank)
  "history": {session: [token ids]},  # optional, carried over from an earlier run
  "ops": [
    {"op": "turn", "sessions": [s, ...], "new_tokens": n, "max_tokens": m,
     "hint": {"awaiting": "user"} | null, "salt": str | null, "tag": str},
    {"op": "reset_prefix_cache"},
    {"op": "drain"},                    # step the engine until delayed frees finished
    {"op": "snapshot", "tag": str},     # kvpark metrics (planner, mover, shim counters)
    {"op": "check_empty", "tag": str},  # scheduler leak check after drain + reset
    {"op": "idle", "seconds": x},       # sleep without stepping the engine
    {"op": "sigkill", "tag": str},      # snapshot, write the output, then SIGKILL itself
  ]
}
A turn appends `new_tokens` deterministic tokens (seeded by session name and turn number)
to the session's history (previous prompt + previous output) and generates greedily with
top-5 logprobs. All sessions of one op are submitted together (they interleave).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import signal
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

VOCAB_LO, VOCAB_HI = 4, 512
TOP_K = 5


def session_tokens(session: str, turn: int, n: int) -> list[int]:
    """Deterministic pseudo-random token ids for (session, turn)."""
    out: list[int] = []
    counter = 0
    while len(out) < n:
        h = hashlib.sha256(f"{session}/{turn}/{counter}".encode()).digest()
        out.extend(VOCAB_LO + (b % (VOCAB_HI - VOCAB_LO)) for b in h)
        counter += 1
    return out[:n]


def build_llm(spec: dict):
    from vllm import LLM

    kw = dict(
        model=spec["model"],
        dtype="float32",
        enforce_eager=True,
        block_size=spec.get("block_size", 32),
        kv_cache_memory_bytes=spec["kv_bytes"],
        max_model_len=spec["max_model_len"],
        max_num_seqs=spec.get("max_num_seqs", 16),
        max_num_batched_tokens=spec.get("max_num_batched_tokens", 2048),
        enable_prefix_caching=True,
        seed=0,
    )
    if spec.get("tensor_parallel_size"):
        kw["tensor_parallel_size"] = int(spec["tensor_parallel_size"])
    if spec.get("gpu_memory_utilization"):
        kw["gpu_memory_utilization"] = float(spec["gpu_memory_utilization"])
    if spec.get("executor"):
        # "mp": the worker runs in its own (spawned) process, so the plan and the worker
        # metadata really cross a process boundary (serialized by vLLM's message queue).
        kw["distributed_executor_backend"] = spec["executor"]
    if spec.get("kv_events"):
        # vLLM publishes its KV-cache events (the GPU prefix cache's changes) over ZMQ
        from vllm.config import KVEventsConfig

        kw["kv_events_config"] = KVEventsConfig(enable_kv_cache_events=True, publisher="zmq", **spec["kv_events"])
    if spec.get("kvpark") is not None:
        kw["kv_transfer_config"] = {
            "kv_connector": "KVParkConnector",
            "kv_connector_module_path": "kvpark.vllm",
            "kv_role": "kv_both",
            "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": spec["kvpark"],
        }
    return LLM(**kw)


class Runner:
    def __init__(self, spec: dict):
        self.spec = spec
        t0 = time.monotonic()
        self.llm = build_llm(spec)
        self.startup_s = time.monotonic() - t0
        self.core = self.llm.llm_engine.engine_core.engine_core  # InprocClient -> EngineCore
        self.scheduler = self.core.scheduler
        self.history: dict[str, list[int]] = {k: list(v) for k, v in (spec.get("history") or {}).items()}
        self.turns: dict[str, int] = dict(spec.get("turn_counts") or {})
        self.results: list[dict] = []

    # connector instances (None for the reference engine)
    def sched_connector(self):
        return self.scheduler.connector

    def worker_connector(self):
        from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

        return get_kv_transfer_group() if has_kv_transfer_group() else None

    def turn(self, op: dict) -> dict:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts, params = [], []
        for s in op["sessions"]:
            t = self.turns.get(s, 0)
            prompt = self.history.get(s, []) + session_tokens(s, t, op["new_tokens"])
            prompts.append(TokensPrompt(prompt_token_ids=prompt))
            extra = {}
            hint = op.get("hint")
            if hint is not None:
                extra["kv_transfer_params"] = {"kvpark": {"session": s, **hint}}
            params.append(
                SamplingParams(
                    max_tokens=op.get("max_tokens", 8),
                    temperature=0.0,
                    logprobs=TOP_K,
                    ignore_eos=True,
                    extra_args=extra or None,
                )
            )
        salt = op.get("salt")
        if salt:
            for p in prompts:
                p["cache_salt"] = salt
        before = self._shim_counters()
        t0 = time.monotonic()
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        wall = time.monotonic() - t0
        after = self._shim_counters()
        res = {"op": "turn", "tag": op.get("tag"), "wall_s": wall, "sessions": {}}
        for s, p, o in zip(op["sessions"], prompts, outs):
            c = o.outputs[0]
            lps = []
            for pos in c.logprobs or []:
                top = sorted(pos.items(), key=lambda kv: -kv[1].logprob)[:TOP_K]
                lps.append([[int(tid), float(lp.logprob)] for tid, lp in top])
            res["sessions"][s] = {
                "prompt_len": len(p["prompt_token_ids"]),
                "tokens": list(c.token_ids),
                "logprobs": lps,
                "num_cached_tokens": getattr(o, "num_cached_tokens", None),
            }
            self.history[s] = list(p["prompt_token_ids"]) + list(c.token_ids)
            self.turns[s] = self.turns.get(s, 0) + 1
        res["external_tokens"] = after.get("external_tokens", 0) - before.get("external_tokens", 0)
        res["load_error_blocks"] = after.get("load_error_blocks", 0) - before.get("load_error_blocks", 0)
        return res

    def _shim_counters(self) -> dict:
        c = self.sched_connector()
        out = dict(getattr(c, "shim_counters", {}) or {}) if c is not None else {}
        w = self.worker_connector()
        if w is not None:
            out["load_error_blocks"] = getattr(w, "shim_counters", {}).get("load_error_blocks", 0)
        return out

    def drain(self, timeout_s: float = 60.0) -> int:
        """Steps the engine until no finished request still holds blocks (delayed frees)."""
        steps = 0
        deadline = time.monotonic() + timeout_s
        while self.scheduler.has_requests():
            if time.monotonic() > deadline:
                raise RuntimeError(f"drain: {len(self.scheduler.requests)} request(s) still held after {timeout_s}s")
            self.core.step()
            steps += 1
            if steps % 50 == 0:
                time.sleep(0.01)
        return steps

    def snapshot(self, op: dict) -> dict:
        sc, wc = self.sched_connector(), self.worker_connector()
        return {
            "op": "snapshot",
            "tag": op.get("tag"),
            "planner": sc.metrics() if sc is not None else None,
            "mover": wc.metrics() if wc is not None else None,
            # every worker rank's newest counters, as the scheduler received them
            "movers": dict(getattr(sc, "_movers", None) or {}) if sc is not None else None,
            "shim": self._shim_counters(),
        }

    def check_empty(self, op: dict) -> dict:
        s = self.scheduler
        self.drain()
        ok_reset = s.reset_prefix_cache()
        pool = s.kv_cache_manager.block_pool
        info = {
            "op": "check_empty",
            "tag": op.get("tag"),
            "requests": len(s.requests),
            "running": len(s.running),
            "waiting": len(s.waiting),
            "finished_req_ids": len(s.finished_req_ids),
            "free_blocks": pool.get_num_free_blocks(),
            "num_blocks": pool.num_gpu_blocks,
            "reset_ok": bool(ok_reset),
        }
        mgr = s.kv_cache_manager.coordinator.single_type_managers
        info["req_to_blocks"] = sum(len(m.req_to_blocks) for m in mgr)
        info["num_cached_block"] = sum(len(m.num_cached_block) for m in mgr)
        return info

    def run(self) -> dict:
        for op in self.spec["ops"]:
            kind = op["op"]
            if kind == "turn":
                self.results.append(self.turn(op))
            elif kind == "reset_prefix_cache":
                self.drain()
                ok = self.llm.reset_prefix_cache()
                self.results.append({"op": kind, "ok": bool(ok)})
            elif kind == "drain":
                self.results.append({"op": kind, "steps": self.drain()})
            elif kind == "snapshot":
                self.results.append(self.snapshot(op))
            elif kind == "check_empty":
                self.results.append(self.check_empty(op))
            elif kind == "idle":
                # The engine is not stepped: no connector hook runs meanwhile.
                time.sleep(float(op["seconds"]))
                self.results.append({"op": kind})
            elif kind == "sigkill":
                # A crash: write what happened so far, then die without any
                # cleanup (no connector destructor, no flush).
                self.results.append(self.snapshot({"tag": op.get("tag")}))
                with open(self.spec["_out_path"], "w") as f:
                    json.dump(self._output(), f)
                os.kill(os.getpid(), signal.SIGKILL)
            else:
                raise ValueError(f"unknown op {kind}")
        self.drain()
        return self._output()

    def _output(self) -> dict:
        return {
            "startup_s": self.startup_s,
            "results": self.results,
            "history": self.history,
            "turn_counts": self.turns,
            "final": self.snapshot({"tag": "final"}),
        }


def main(argv: list[str]) -> int:
    spec = json.loads(open(argv[1]).read())
    spec["_out_path"] = argv[2]
    out = Runner(spec).run()
    with open(argv[2], "w") as f:
        json.dump(out, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
