"""Scheduler-side tests on vLLM's own connector test utilities.

A real vLLM `Scheduler` (built by vLLM's `create_scheduler`) drives kvpark's connector in
SCHEDULER role through the normal factory (`kv_connector_module_path="kvpark.vllm"`). The
test plays the model runner: a WORKER-role connector over CPU tensors shaped like vLLM's KV
views runs each step's plan (bind, start_load, wait_for_layer_load, wait_for_save,
get_finished, worker meta) and its outputs go back through `create_model_runner_output`.
Loaded blocks are compared byte for byte with what was saved.
"""

from __future__ import annotations

import time

import pytest
import torch

import kvpark
from kvpark.vllm import KVParkConnector

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.sampling_params import SamplingParams
from vllm.utils.hashing import sha256
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.request import Request, RequestStatus

BS = 16  # block size (tokens)
NUM_BLOCKS = 64
LAYERS, HEADS, HEAD = 2, 2, 32


def kv_tensors(layout: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One storage shared by all layers, like vLLM; per layer a 4-D logical view
    [blocks, heads, tokens, 2*head] of pages stored in the layout's order (torch derives
    the strides from it; libkvpark classifies them back, KvLayout::strides)."""
    c = 2 * HEAD
    per_layer = NUM_BLOCKS * HEADS * BS * c
    buf = torch.randn(LAYERS * per_layer, generator=torch.Generator().manual_seed(7))
    views = {}
    for i in range(LAYERS):
        layer = buf[i * per_layer:(i + 1) * per_layer]
        if layout == "LBHNC":  # head-major (CPU backend): stored [blocks, heads, tokens, c]
            view = layer.view(NUM_BLOCKS, HEADS, BS, c)
        else:  # "LBNHC": token-major (FlashAttention default): stored [blocks, tokens, heads, c]
            view = layer.view(NUM_BLOCKS, BS, HEADS, c).permute(0, 2, 1, 3)
        views[f"model.layers.{i}.self_attn.attn"] = view
    return buf, views


class Harness:
    """A vLLM scheduler with kvpark in SCHEDULER role, plus a WORKER-role kvpark over CPU
    tensors standing in for the model runner."""

    def __init__(self, utils, model: str, extra: dict, layout: str = "LBHNC"):
        self.u = utils
        cfg = utils.create_vllm_config(
            model=model,
            block_size=BS,
            max_num_batched_tokens=1024,
            max_model_len=2048,
            dtype="float32",
            kv_connector="KVParkConnector",
            kv_connector_module_path="kvpark.vllm",
            kv_role="kv_both",
            kv_connector_extra_config=extra,
            kv_load_failure_policy="recompute",
        )
        self.scheduler = utils.create_scheduler(cfg, num_blocks=NUM_BLOCKS)
        self.connector = self.scheduler.connector
        assert isinstance(self.connector, KVParkConnector)
        self.buf, self.views = kv_tensors(layout)
        self.worker = KVParkConnector(cfg, KVConnectorRole.WORKER, None)
        self.worker.register_kv_caches(self.views)
        init_none_hash(sha256)
        self.hasher = get_request_block_hasher(BS, sha256)

    def request(self, rid: str, tokens: list[int], salt: str | None = None, max_tokens: int = 1) -> Request:
        sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        sp.update_from_generation_config({}, self.u.EOS_TOKEN_ID)
        return Request(
            request_id=rid,
            prompt_token_ids=tokens,
            sampling_params=sp,
            pooling_params=None,
            mm_features=None,
            cache_salt=salt,
            block_hasher=self.hasher,
        )

    def step(self):
        """One engine step: schedule, run the worker side, feed its output back."""
        out = self.scheduler.schedule()
        w = self.worker
        w.bind_connector_metadata(out.kv_connector_metadata)
        w.start_load_kv(None)
        for name in self.views:
            w.wait_for_layer_load(name)
        w.wait_for_save()
        sending, recving = w.get_finished(out.finished_req_ids)
        invalid = w.get_block_ids_with_load_errors()
        meta = w.build_connector_worker_meta()
        w.clear_connector_metadata()
        reqs = [self.scheduler.requests[r] for r in out.num_scheduled_tokens]
        mro = self.u.create_model_runner_output(
            reqs,
            finished_sending=sending,
            finished_recving=recving,
            invalid_block_ids=invalid or None,
            kv_connector_worker_meta=meta,
        )
        self.scheduler.update_from_output(out, mro)
        return out

    def run_until_empty(self, timeout_s: float = 30.0) -> int:
        """Steps until the scheduler holds no request. Saves and async loads finish on the
        worker's background threads (at a lower priority than the step), so on a busy
        machine this takes time, not a number of steps: it steps as vLLM does, yielding
        the CPU between steps, for up to `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        steps = 0
        while self.scheduler.has_requests():
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"scheduler still holds {list(self.scheduler.requests)} after {steps} steps ({timeout_s} s)"
                )
            self.step()
            steps += 1
            time.sleep(0.001)
        return steps

    def block_ids(self, req: Request) -> list[int]:
        return list(self.scheduler.kv_cache_manager.get_block_ids(req.request_id)[0])

    def blocks(self, ids: list[int]) -> list[torch.Tensor]:
        return [v[ids].clone() for v in self.views.values()]

    def close(self):
        self.worker.shutdown()
        self.connector.shutdown()


def prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, 500, (n,), generator=g).tolist()


def park_one(h: Harness, tokens: list[int], rid: str = "r1", salt: str | None = None):
    """Runs one request to completion and through its save; returns (block ids, their
    contents at save time, number of full blocks computed)."""
    r = h.request(rid, tokens, salt=salt)
    h.scheduler.add_request(r)
    h.step()  # prefill + the one output token -> finished -> request_finished
    ids = None
    if r.request_id in h.scheduler.requests:
        ids = h.block_ids(r)
    delayed_before = h.connector.shim_counters["delayed_frees"]
    assert delayed_before >= 1, "kvpark did not plan a save of the finished request"
    assert r.request_id in h.scheduler.requests, "blocks were freed while the save was in flight"
    saved = h.blocks(ids)
    h.run_until_empty()
    h.u.assert_scheduler_empty(h.scheduler)
    assert h.worker.shim_counters["finished_sending"] >= 1
    return ids, saved, len(tokens) // BS


@pytest.fixture
def make(vllm_unit_utils, tiny_model, libkvpark):
    made = []

    def _make(extra: dict, layout: str = "LBHNC") -> Harness:
        h = Harness(vllm_unit_utils, tiny_model, extra, layout)
        made.append(h)
        return h

    yield _make
    for h in made:
        h.close()


@pytest.mark.parametrize("layout", ["LBHNC", "LBNHC"])
def test_sync_hit_loads_saved_bytes(make, layout):
    h = make({"host_bytes": "4MiB"}, layout)
    p1 = prompt(5 * BS + 3, 1)
    ids1, saved, full = park_one(h, p1)
    assert full == 5
    h.buf.zero_()  # whatever a load does not write stays zero
    assert h.scheduler.reset_prefix_cache()

    # Next turn: the same 5 blocks plus new text; vLLM's own cache is empty.
    r2 = h.request("r2", p1[: 5 * BS] + prompt(2 * BS + 5, 2), max_tokens=3)
    h.scheduler.add_request(r2)
    out = h.step()
    assert r2.status == RequestStatus.RUNNING
    assert h.connector.shim_counters["external_tokens"] == 5 * BS
    assert h.connector.shim_counters["async_loads"] == 0
    assert out.num_scheduled_tokens["r2"] == len(r2.prompt_token_ids) - 5 * BS
    ids2 = h.block_ids(r2)
    got = h.blocks(ids2[:5])
    for layer_saved, layer_got in zip(saved, got):
        assert torch.equal(layer_saved[:5], layer_got)
    h.run_until_empty()
    h.u.assert_scheduler_empty(h.scheduler)


def test_async_hit_waits_for_remote_kvs(make):
    h = make({"host_bytes": "4MiB", "sync_load_budget_bytes": 0})
    p1 = prompt(4 * BS + 1, 3)
    _, saved, _ = park_one(h, p1)
    h.buf.zero_()
    assert h.scheduler.reset_prefix_cache()

    r2 = h.request("r2", p1[: 4 * BS] + prompt(BS, 4), max_tokens=3)
    h.scheduler.add_request(r2)
    out = h.step()
    # First step: blocks allocated for the hit, nothing scheduled, waiting on the load.
    assert "r2" not in out.num_scheduled_tokens or r2.status == RequestStatus.WAITING_FOR_REMOTE_KVS
    seen_waiting = r2.status == RequestStatus.WAITING_FOR_REMOTE_KVS
    ids2 = None
    # bounded in time, not in steps: the loader thread runs at a lower priority and
    # on a loaded machine may need many of these (fast, empty) steps
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if r2.status == RequestStatus.WAITING_FOR_REMOTE_KVS:
            seen_waiting = True
            ids2 = h.block_ids(r2)
        if r2.status == RequestStatus.RUNNING or r2.is_finished():
            break
        out = h.step()
        time.sleep(0.001)
    assert seen_waiting
    assert h.worker.shim_counters["finished_recving"] == 1
    assert h.connector.shim_counters["async_loads"] == 1
    assert h.connector.shim_counters["external_tokens"] == 4 * BS
    got = h.blocks(ids2[:4])
    for layer_saved, layer_got in zip(saved, got):
        assert torch.equal(layer_saved[:4], layer_got)
    h.run_until_empty()
    h.u.assert_scheduler_empty(h.scheduler)


def test_salts_never_cross(make):
    h = make({"host_bytes": "4MiB"})
    p = prompt(3 * BS + 2, 5)
    park_one(h, p, rid="a1", salt="tenant-a")
    assert h.scheduler.reset_prefix_cache()

    # Same tokens, other salt: no hit.
    rb = h.request("b1", p, salt="tenant-b")
    h.scheduler.add_request(rb)
    h.step()
    assert h.connector.shim_counters["external_tokens"] == 0
    h.run_until_empty()
    assert h.scheduler.reset_prefix_cache()

    # Same tokens, same salt: hit.
    ra = h.request("a2", p, salt="tenant-a")
    h.scheduler.add_request(ra)
    h.step()
    assert h.connector.shim_counters["external_tokens"] == 3 * BS
    h.run_until_empty()
    h.u.assert_scheduler_empty(h.scheduler)


def test_unknown_config_key_fails_engine_start(vllm_unit_utils, tiny_model, libkvpark):
    cfg = vllm_unit_utils.create_vllm_config(
        model=tiny_model,
        block_size=BS,
        dtype="float32",
        kv_connector="KVParkConnector",
        kv_connector_module_path="kvpark.vllm",
        kv_role="kv_both",
        kv_connector_extra_config={"host_bytez": "1GiB"},
    )
    with pytest.raises(kvpark.ConfigError) as ei:
        vllm_unit_utils.create_scheduler(cfg, num_blocks=NUM_BLOCKS)
    assert "host_bytez" in str(ei.value)


def test_connector_stats_reach_vllm(make):
    """Metrics flow through vLLM's connector stats, whole and never stale: a worker sends
    its snapshot on every step its counters changed (nothing when they did not), the
    scheduler keeps every rank's newest snapshot from update_connector_output and sends
    planner and workers together; vLLM rebuilds the payload with build_kv_connector_stats
    and the log line (reduce) shows planner and worker counters side by side."""
    from kvpark.metrics import KVParkStats
    from vllm.v1.outputs import KVConnectorOutput

    h = make({"host_bytes": "4MiB"})
    h.worker.get_kv_connector_stats()  # what registration counted
    h.connector.get_kv_connector_stats()
    park_one(h, prompt(2 * BS + 1, 9))
    wst = h.worker.get_kv_connector_stats()
    assert isinstance(wst, KVParkStats)
    assert wst.data["mover"]["0"]["counters"]["saved_blocks"] == 2
    assert h.worker.get_kv_connector_stats() is None, "unchanged counters are not resent"
    # a second rank, as vLLM's KVOutputAggregator merges the workers' stats
    other = KVParkStats(data={"mover": {"1": wst.data["mover"]["0"]}})
    both = wst.aggregate(other)
    assert sorted(both.data["mover"]) == ["0", "1"]
    h.connector.update_connector_output(KVConnectorOutput(kv_connector_stats=both))
    st = h.connector.get_kv_connector_stats()
    assert st.data["planner"]["saved_blocks"] == 2
    assert sorted(st.data["mover"]) == ["0", "1"], "planner and every rank in one snapshot"
    assert h.connector.get_kv_connector_stats() is None
    # as vLLM does: worker stats aggregated with scheduler stats, shipped as a dict,
    # rebuilt by the connector class, accumulated over an interval, reduced for the log
    payload = both.aggregate(st).to_dict()
    rebuilt = KVParkConnector.build_kv_connector_stats(payload)
    again = rebuilt.aggregate(KVParkStats(data=payload))
    red = again.reduce()
    assert red["saved_blocks"] == 2, red
    assert red["worker_saved_blocks"] == 4, red  # two ranks, two blocks each
    assert red["host_used_bytes"] > 0, red
    assert not again.is_empty()


def test_prometheus_series_follow_snapshots():
    """kvpark_* series: counters advance by the difference between snapshots of the same
    source (a repeated snapshot adds nothing, a worker that restarted counts from zero),
    worker series carry their rank, gauges hold the latest value."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    from kvpark.metrics import KVParkPromMetrics

    reg = CollectorRegistry()

    def bound(cls):
        class Bound(cls):
            def __init__(self, *a, **kw):
                kw.pop("multiprocess_mode", None)
                super().__init__(*a, registry=reg, **kw)

        return Bound

    class Cfg:
        kv_transfer_config = None

    prom = KVParkConnector.build_prom_metrics(
        Cfg(),
        {Counter: bound(Counter), Gauge: bound(Gauge), Histogram: bound(Histogram)},
        ["model_name", "engine"],
        {0: ["m", "0"]},
    )
    assert isinstance(prom, KVParkPromMetrics)

    def snap(hit, saved, used):
        return {
            "planner": {"hit_tokens": hit, "hit_blocks_host": hit // 16, "hit_blocks_nvme": 0},
            "mover": {
                "0": {"counters": {"saved_blocks": saved}, "host_slots_used": used, "host_slot_bytes": 4096},
                "1": {"counters": {"saved_blocks": saved + 1}, "host_slots_used": used, "host_slot_bytes": 4096},
            },
        }

    def val(name, **labels):
        return reg.get_sample_value(name, {"model_name": "m", "engine": "0", **labels})

    prom.observe(snap(64, 2, 3), 0)
    prom.observe(snap(64, 2, 3), 0)
    prom.observe(snap(96, 5, 1), 0)
    assert val("kvpark_hit_tokens_total") == 96
    assert val("kvpark_hit_blocks_total", tier="host") == 6
    assert val("kvpark_worker_saved_blocks_total", rank="0") == 5
    assert val("kvpark_worker_saved_blocks_total", rank="1") == 6
    assert val("kvpark_host_used_bytes", rank="1") == 4096
    restarted = snap(96, 5, 1)
    restarted["mover"]["0"]["counters"]["saved_blocks"] = 1
    prom.observe(restarted, 0)
    assert val("kvpark_worker_saved_blocks_total", rank="0") == 6


def test_bad_hint_is_ignored_not_fatal(make):
    """A malformed kvpark hint is client input: the request is served without it."""
    h = make({"host_bytes": "4MiB"})
    p = prompt(2 * BS + 3, 11)
    park_one(h, p, rid="h1")
    assert h.scheduler.reset_prefix_cache()
    r = h.request("h2", p, max_tokens=1)
    r.kv_transfer_params = {"kvpark": {"session": "x", "awaiting": "lunch"}}
    h.scheduler.add_request(r)
    h.step()
    assert h.connector.shim_counters["bad_hints"] == 1
    assert h.connector.shim_counters["external_tokens"] == 2 * BS
    h.run_until_empty()
    h.u.assert_scheduler_empty(h.scheduler)
    # matched, allocated and finished with the same bad hint: counted (and logged) once
    assert h.connector.shim_counters["bad_hints"] == 1


def test_geometry_orders_layers_by_index_and_keeps_strides():
    """register_kv_caches' geometry: layers sorted by their index (not dict order, not
    string order), per-layer base pointer and element strides from the tensor."""
    from kvpark.vllm import kv_geometry, order_layers

    names = [f"model.layers.{i}.self_attn.attn" for i in (10, 2, 0)]
    assert order_layers(names) == [names[2], names[1], names[0]]
    _, views = kv_tensors("LBNHC")
    shuffled = {n: v for n, v in reversed(list(views.items()))}
    order, geom, lv, on_device = kv_geometry(shuffled, None)
    assert order == list(views)  # layer 0 first
    assert (geom.layers, geom.kv_heads, geom.block_tokens, geom.head_size_k, geom.head_size_v) == (
        LAYERS, HEADS, BS, HEAD, HEAD,
    )
    assert geom.dtype == 3 and not on_device
    for v, (name, t) in zip(lv, views.items()):
        assert v.base == t.data_ptr() and v.num_blocks == NUM_BLOCKS
        assert (v.stride_block, v.stride_head, v.stride_token) == t.stride()[:3]
    # token-major: heads are adjacent within a token
    assert lv[0].stride_head == 2 * HEAD and lv[0].stride_token == HEADS * 2 * HEAD
    # the second layer lives in the same storage, one layer further
    assert lv[1].base - lv[0].base == NUM_BLOCKS * HEADS * BS * 2 * HEAD * 4


def test_caches_on_a_gpu_name_their_own_device():
    """Each tensor-parallel rank's caches live on its own GPU: the mover must open that
    device, not device 0."""
    from kvpark.vllm import device_ordinal

    assert device_ordinal(torch.device("cpu")) is None
    assert device_ordinal(torch.device("cuda", 3)) == 3
    assert device_ordinal(torch.device("cuda", 0)) == 0
    with pytest.raises(ValueError, match="meta"):
        device_ordinal(torch.device("meta"))


def test_kernel_block_splitting_is_refused_by_name():
    """Views of smaller kernel blocks than the scheduler's block_size would make block id b
    name the wrong page: refused at registration, naming both sizes."""
    from types import SimpleNamespace

    from kvpark.vllm import kv_geometry

    _, views = kv_tensors("LBNHC")
    ok = SimpleNamespace(cache_config=SimpleNamespace(block_size=BS), model_config=None)
    assert kv_geometry(views, ok)[1].block_tokens == BS
    split = SimpleNamespace(cache_config=SimpleNamespace(block_size=2 * BS), model_config=None)
    with pytest.raises(ValueError, match=rf"{BS}-token blocks .* block_size is {2 * BS}"):
        kv_geometry(views, split)


def test_layerwise_loads_ask_vllm_for_piecewise_cuda_graphs():
    """A FULL CUDA graph replay skips wait_for_layer_load; with layer-wise loads (the GPU
    default) kvpark asks vLLM for PIECEWISE graphs, and not when they are off."""
    assert KVParkConnector.requires_piecewise_for_cudagraph({}) is True
    assert KVParkConnector.requires_piecewise_for_cudagraph({"layerwise_load": True}) is True
    assert KVParkConnector.requires_piecewise_for_cudagraph({"layerwise_load": "auto"}) is True
    assert KVParkConnector.requires_piecewise_for_cudagraph({"layerwise_load": False}) is False


def test_a_failed_layer_load_does_not_raise_into_the_forward(caplog):
    """wait_for_layer_load runs inside the model's forward: a failed layer is logged (the
    mover reports the blocks as failed loads for vLLM to recompute), never raised."""
    from kvpark.errors import KvparkError

    class FailingMover:
        def wait_layer(self, layer):
            raise KvparkError("layer 1 scatter failed: device lost", "kvpark_mover_wait_layer")

    c = KVParkConnector.__new__(KVParkConnector)
    c._layer_index = {"model.layers.1.self_attn.attn": 1}
    c._mover = FailingMover()
    c._failure_policy = "recompute"
    with caplog.at_level("WARNING"):
        c.wait_for_layer_load("model.layers.1.self_attn.attn")
    assert "layer 1 of this step's loads failed" in caplog.text
    assert "device lost" in caplog.text
    assert "vLLM recomputes them" in caplog.text
    # under vLLM's default policy the message says what vLLM really does
    caplog.clear()
    c._failure_policy = "fail"
    with caplog.at_level("WARNING"):
        c.wait_for_layer_load("model.layers.1.self_attn.attn")
    assert "recomputes them" not in caplog.text
    assert "ends the requests that needed them with an error" in caplog.text


def test_engine_ranks_follow_vllms_worker_numbering():
    """The planner plans for the worker ranks vLLM gives this engine: 0..world_size, or
    with data parallelism (data-parallel rank d) d*world_size.. (a worker's rank in vLLM's
    world group, with which its mover reports)."""
    from types import SimpleNamespace as NS

    from kvpark.vllm import engine_ranks

    def cfg(**pc):
        return NS(parallel_config=NS(**pc))

    assert engine_ranks(cfg(world_size=2, data_parallel_size=1, data_parallel_rank=0)) == (0, 2)
    assert engine_ranks(cfg(world_size=2, data_parallel_size=3, data_parallel_rank=2)) == (4, 2)
    # the external launcher numbers ranks itself, without the data-parallel offset
    assert engine_ranks(
        cfg(world_size=2, data_parallel_size=3, data_parallel_rank=2, distributed_executor_backend="external_launcher")
    ) == (0, 2)
    assert engine_ranks(NS()) == (0, 1)
