"""The OpenAI server, started with the serve line of README.md (the CPU form), on loopback.

Two servers run side by side, both from the README's line: one with kvpark, one with the
`--kv-transfer-config` argument removed (the reference). Each serves two completions that
share a 320-token prefix, with `POST /reset_prefix_cache` between them, so vLLM's own
prefix cache cannot serve the second. The first carries a session hint, the second a
malformed hint (client input: kvpark must ignore it, not fail the request).

Asserted: the second completion is served by kvpark (its `cached_tokens` is the whole
prefix, and kvpark's Prometheus series on `/metrics` count exactly that hit, the host-tier
blocks, the sync load and the saves); the reference server had no hit; the generated text
of both completions is the same on both servers; the malformed hint was logged and
ignored. Both servers are bound to 127.0.0.1 and stopped by their PID (their process
group), also when the test fails.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import hashlib

import pytest

ROOT = Path(__file__).resolve().parents[2]
BS = 32
PREFIX = 10 * BS  # ten full blocks shared by both completions
SUFFIX = 16
MAX_TOKENS = 8
START_TIMEOUT_S = 240
#: Marks the README block this test runs.
MARKER = "<!-- tests/vllm/test_server.py runs this line -->"
#: Flags the test adds to the README's line: loopback, a free port, the tiny model's sizes.
TEST_FLAGS = [
    "--host", "127.0.0.1",
    "--dtype", "float32",
    "--enforce-eager",
    "--block-size", str(BS),
    "--max-model-len", "1024",
    "--max-num-seqs", "4",
    "--kv-cache-memory-bytes", str(4 << 20),
    "--enable-prefix-caching",
    "--seed", "0",
]


def session_tokens(session: str, turn: int, n: int) -> list[int]:
    """Deterministic token ids in the tiny model's vocabulary (as engine_run.py makes them)."""
    out: list[int] = []
    counter = 0
    while len(out) < n:
        h = hashlib.sha256(f"{session}/{turn}/{counter}".encode()).digest()
        out.extend(4 + (b % 508) for b in h)
        counter += 1
    return out[:n]


def readme_serve_line() -> tuple[dict[str, str], list[str]]:
    """(environment, argv) of the README's CPU serve line (the block after MARKER)."""
    text = (ROOT / "README.md").read_text()
    at = text.find(MARKER)
    if at < 0:
        raise AssertionError(f"README.md has no block marked {MARKER!r}")
    block = re.search(r"```sh\n(.*?)```", text[at:], re.S)
    assert block, "no ```sh block after the marker"
    words = shlex.split(block.group(1).replace("\\\n", " "))
    env = {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        k, v = words.pop(0).split("=", 1)
        env[k] = v
    return env, words


def server_argv(model: str, port: int, extra: dict | None) -> tuple[dict[str, str], list[str]]:
    """The README's line for `model` with kvpark's extra config `extra`, or without the
    connector (extra None)."""
    env, words = readme_serve_line()
    assert words[:3] == ["python", "-m", "vllm.entrypoints.openai.api_server"], words
    assert "--enable-prompt-tokens-details" in words, "the README's line must ask for cached-token counts"
    assert env.get("VLLM_SERVER_DEV_MODE") == "1", "the README's line must enable /reset_prefix_cache"
    argv = [sys.executable, *words[1:]]
    argv[argv.index("MODEL")] = model
    i = argv.index("--kv-transfer-config")
    if extra is None:
        del argv[i : i + 2]
    else:
        cfg = json.loads(argv[i + 1])
        assert cfg["kv_connector"] == "KVParkConnector" and cfg["kv_connector_module_path"] == "kvpark.vllm"
        cfg["kv_connector_extra_config"] = extra
        argv[i + 1] = json.dumps(cfg)
    return env, argv + TEST_FLAGS + ["--port", str(port)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, name: str, model: str, extra: dict | None, log_dir: Path):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env, argv = server_argv(model, self.port, extra)
        self.log_path = log_dir / f"{name}.log"
        self.log = open(self.log_path, "wb")
        penv = {**os.environ, **env, "VLLM_LOGGING_LEVEL": "INFO", "PYTHONUNBUFFERED": "1"}
        # a session of its own: the server and the workers it spawns form one process
        # group, whose id is the server's PID
        self.proc = subprocess.Popen(argv, env=penv, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def log_text(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log_text()[-4000:]}")
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(1)
        raise AssertionError(f"server not ready after {START_TIMEOUT_S}s:\n{self.log_text()[-4000:]}")

    def post(self, path: str, body: dict | None = None) -> dict:
        data = json.dumps(body or {}).encode()
        req = urllib.request.Request(self.base + path, data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read() or b"{}")

    def metrics(self) -> str:
        with urllib.request.urlopen(self.base + "/metrics", timeout=10) as r:
            return r.read().decode()

    def reset_prefix_cache(self) -> None:
        """Retries while vLLM still holds blocks (kvpark's save of the last turn)."""
        for _ in range(100):
            if self.post("/reset_prefix_cache").get("success"):
                return
            time.sleep(0.1)
        raise AssertionError("reset_prefix_cache never succeeded")

    def stop(self) -> None:
        """Stops the server by its PID: SIGTERM to its process group, SIGKILL after 30 s."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # workers left behind, if any
        except ProcessLookupError:
            pass
        if self.proc.poll() is None:
            self.proc.wait(timeout=10)
        self.log.close()


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels` (0 when none)."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(3) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(4))
    return total


def completion(server: Server, prompt: list[int], hint: dict | None) -> dict:
    body = {
        "model": server.model,
        "prompt": prompt,
        "max_tokens": MAX_TOKENS,
        "temperature": 0.0,
        "ignore_eos": True,
        "logprobs": 1,
    }
    if hint is not None:
        body["kv_transfer_params"] = {"kvpark": hint}
    return server.post("/v1/completions", body)


def two_turns(server: Server) -> list[dict]:
    prefix = session_tokens("srv", 0, PREFIX)
    first = completion(server, prefix + session_tokens("srv", 1, SUFFIX), {"session": "s1", "awaiting": "tool", "tool": "Bash"})
    server.reset_prefix_cache()
    second = completion(server, prefix + session_tokens("srv", 2, SUFFIX), {"session": "s1", "awaiting": "a nap"})
    return [first, second]


@pytest.fixture
def servers(tiny_model, tmp_path):
    started: list[Server] = []
    try:
        extra = {"host_bytes": "64MiB", "nvme_dir": str(tmp_path / "nvme")}
        kv = Server("kvpark", tiny_model, extra, tmp_path)
        started.append(kv)
        ref = Server("reference", tiny_model, None, tmp_path)
        started.append(ref)
        deadline = time.monotonic() + START_TIMEOUT_S
        for s in started:
            s.wait_ready(deadline)
            s.model = tiny_model
        yield kv, ref
    finally:
        for s in started:
            s.stop()


def test_readme_server_serves_the_second_turn_from_kvpark(servers):
    kv, ref = servers
    out_kv = two_turns(kv)
    out_ref = two_turns(ref)

    # the same text, turn by turn, with and without kvpark (greedy decoding)
    for a, b in zip(out_kv, out_ref):
        assert a["choices"][0]["text"] == b["choices"][0]["text"]
        assert a["choices"][0]["logprobs"]["tokens"] == b["choices"][0]["logprobs"]["tokens"]

    # vLLM's own prefix cache was reset: the reference server recomputed the prefix, the
    # kvpark server got all of it from kvpark
    cached = [o["usage"]["prompt_tokens_details"]["cached_tokens"] for o in out_kv]
    assert cached == [0, PREFIX], cached
    assert [o["usage"]["prompt_tokens_details"]["cached_tokens"] for o in out_ref] == [0, 0]

    # kvpark's counters on vLLM's /metrics (stats reach the API server after the step)
    want = {
        ("kvpark_hit_tokens_total", ()): PREFIX,
        ("kvpark_hit_requests_total", ()): 1,
        ("kvpark_hit_blocks_total", (("tier", "host"),)): PREFIX // BS,
        ("kvpark_loads_total", (("mode", "sync"),)): 1,
        ("kvpark_worker_loaded_blocks_total", (("rank", "0"), ("tier", "host"))): PREFIX // BS,
    }
    deadline = time.monotonic() + 30
    while True:
        text = kv.metrics()
        got = {k: metric(text, k[0], **dict(k[1])) for k in want}
        if got == want or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert got == want, "\n".join(line for line in text.splitlines() if line.startswith("kvpark_"))
    assert metric(text, "kvpark_saves_total") >= 1
    assert metric(text, "kvpark_worker_saved_blocks_total", rank="0") >= PREFIX // BS
    assert metric(text, "kvpark_host_capacity_bytes", rank="0") > 0
    assert metric(text, "kvpark_nvme_capacity_bytes", rank="0") > 0
    assert metric(text, "kvpark_load_failed_blocks_total") == 0
    assert "kvpark_hit_tokens_total" not in ref.metrics()

    log = kv.log_text()
    assert "ignoring the hint of request" in log and "a nap" in log, log[-3000:]
