"""kvpark's vLLM V1 KV connector: a thin layer over libkvpark's C ABI.

Load it with no change to vLLM::

    vllm serve MODEL --kv-transfer-config '{"kv_connector":"KVParkConnector",
      "kv_connector_module_path":"kvpark.vllm","kv_role":"kv_both",
      "kv_load_failure_policy":"recompute",
      "kv_connector_extra_config":{"host_bytes":"8GiB","nvme_dir":"/nvme/kvpark"}}'

vLLM builds the class twice, in two processes: role SCHEDULER in the engine core (backed by a
`kvpark_planner_*` handle) and role WORKER in every worker (backed by a `kvpark_mover_*`
handle). The two halves talk only through vLLM's own channels:

- scheduler -> workers: the step's plan, opaque bytes from `kvpark_planner_build_meta`,
  inside `KVParkConnectorMetadata` (vLLM pickles it to the workers);
- workers -> scheduler: opaque bytes from `kvpark_mover_take_worker_meta` inside
  `KVParkWorkerMetadata` (aggregated across workers by vLLM's `KVOutputAggregator`), plus
  the finished sets `finished_sending` / `finished_recving` and failed block ids.

Python never parses a plan or a worker blob; it passes bytes, block ids and pointers.
Time is passed to the library as wall-clock nanoseconds (`time.time_ns()`), the same clock
in every process and across restarts.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

import torch

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats

from . import _ffi, _kv_events
from . import errors as kvpark_errors
from ._ffi import DTYPE_BF16, DTYPE_F16, DTYPE_F32, DTYPE_FP8, KvparkGeometry, KvparkLayerView
from .metrics import KVParkPromMetrics, KVParkStats, summary

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

# Under vLLM's logger tree, so kvpark's lines use vLLM's handler, format and level.
logger = logging.getLogger("vllm.kvpark")

#: The engine has been quiet this long (no scheduler call): the planner's
#: time-driven moves are run from the idle thread instead of the next step.
IDLE_AFTER_S = 0.25
#: After an idle plan, the worker's report is collected this long (its moves
#: finish on the saver thread), so the next request's match already sees them.
IDLE_REPORT_S = 10.0

#: Scheduler and worker connectors of one engine in this process (vLLM's
#: single-worker executor: the engine core runs the scheduler and the worker
#: together), by engine id: the scheduler side reaches the worker's mover
#: directly while the engine is idle.
_LINES: dict[str, dict[str, "weakref.ref[KVParkConnector]"]] = {}
_LINES_LOCK = threading.Lock()


def _line_key(vllm_config: "VllmConfig") -> str:
    kvtc = getattr(vllm_config, "kv_transfer_config", None)
    return str(getattr(kvtc, "engine_id", None) or "")

#: Key of kvpark's session hints inside a request's kv_transfer_params.
HINT_KEY = "kvpark"

_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")

_DTYPES = {
    torch.float16: DTYPE_F16,
    torch.bfloat16: DTYPE_BF16,
    torch.float32: DTYPE_F32,
    torch.uint8: DTYPE_FP8,  # fp8 KV caches are often stored as uint8
}
for _name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"):
    if hasattr(torch, _name):
        _DTYPES[getattr(torch, _name)] = DTYPE_FP8


class KVParkConnectorMetadata(KVConnectorMetadata):
    """One step's plan from the scheduler to every worker: opaque bytes."""

    def __init__(self, plan: bytes):
        self.plan = plan

    def __repr__(self) -> str:
        return f"KVParkConnectorMetadata({len(self.plan)} bytes)"


class KVParkWorkerMetadata(KVConnectorWorkerMetadata):
    """Completions from the workers to the scheduler: one opaque blob per worker."""

    def __init__(self, blobs: list[bytes]):
        self.blobs = blobs

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        if not isinstance(other, KVParkWorkerMetadata):
            return self
        return KVParkWorkerMetadata(self.blobs + other.blobs)

    def __repr__(self) -> str:
        return f"KVParkWorkerMetadata({[len(b) for b in self.blobs]} bytes)"


def _now_ns() -> int:
    return time.time_ns()


def _request_view(request: "Request", with_hint: bool = True) -> _ffi.RequestView:
    params = getattr(request, "kv_transfer_params", None) or {}
    hint = params.get(HINT_KEY) if (with_hint and isinstance(params, dict)) else None
    return _ffi.RequestView(
        request.request_id,
        request.block_hashes,
        salt=getattr(request, "cache_salt", None),
        hint=hint,
    )


def layer_index(name: str) -> int | None:
    """The layer number in a vLLM attention layer name ("model.layers.7.self_attn.attn" -> 7)."""
    m = _LAYER_INDEX.search(name)
    return int(m.group(1)) if m else None


def order_layers(names: list[str]) -> list[str]:
    """Layer names in model order: by parsed layer index; names without one keep their
    relative order after the numbered ones."""
    indexed = [(layer_index(n), i, n) for i, n in enumerate(names)]
    numbered = sorted((idx, i, n) for idx, i, n in indexed if idx is not None)
    rest = [n for idx, _, n in indexed if idx is None]
    return [n for _, _, n in numbered] + rest


def device_ordinal(device: torch.device) -> int | None:
    """The CUDA ordinal of a KV cache's device (each TP rank has its own), None for CPU."""
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        raise ValueError(f"kvpark: KV caches on {device} are not supported (cpu or cuda)")
    return torch.cuda.current_device() if device.index is None else int(device.index)


def kv_geometry(kv_caches: dict[str, torch.Tensor], vllm_config: "VllmConfig | None"):
    """(names in model order, KvparkGeometry, [KvparkLayerView], CUDA ordinal or None)
    from the tensors vLLM registers: each a 4-D view [num_blocks, kv_heads, block_size, k+v]."""
    names = order_layers(list(kv_caches))
    if not names:
        raise ValueError("kvpark: register_kv_caches got no layers")
    first = kv_caches[names[0]]
    if first.dim() != 4:
        raise ValueError(
            f"kvpark: layer {names[0]} has a {first.dim()}-D KV tensor {tuple(first.shape)}; "
            "expected the 4-D view [num_blocks, num_kv_heads, block_size, head_size_k + head_size_v]"
        )
    num_blocks, kv_heads, block_tokens, content = (int(x) for x in first.shape)
    cc = getattr(vllm_config, "cache_config", None) if vllm_config is not None else None
    bs = getattr(cc, "block_size", None)
    if isinstance(bs, int) and bs != block_tokens:
        # vLLM split its blocks into smaller kernel blocks: block id b would not
        # name page b of these views.
        raise ValueError(
            f"kvpark: the KV views hold {block_tokens}-token blocks but the scheduler's "
            f"block_size is {bs} (the attention backend splits blocks into kernel blocks); "
            "kvpark needs them equal: choose a block_size the backend uses as is"
        )
    if first.dtype not in _DTYPES:
        raise ValueError(f"kvpark: unsupported KV cache dtype {first.dtype}")
    head_k, head_v = _head_sizes(content, vllm_config)
    views = []
    for n in names:
        t = kv_caches[n]
        if tuple(t.shape) != tuple(first.shape) or t.dtype != first.dtype or t.device != first.device:
            raise ValueError(
                f"kvpark: layer {n} has shape {tuple(t.shape)} {t.dtype} on {t.device}, "
                f"unlike {names[0]} {tuple(first.shape)} {first.dtype} on {first.device}"
            )
        st = t.stride()
        if st[3] != 1:
            raise ValueError(f"kvpark: layer {n}: content stride is {st[3]}, expected 1 (strides {st})")
        views.append(
            KvparkLayerView(
                base=t.data_ptr(),
                num_blocks=num_blocks,
                stride_block=st[0],
                stride_head=st[1],
                stride_token=st[2],
            )
        )
    geom = KvparkGeometry(
        layers=len(names),
        kv_heads=kv_heads,
        block_tokens=block_tokens,
        head_size_k=head_k,
        head_size_v=head_v,
        dtype=_DTYPES[first.dtype],
    )
    return names, geom, views, device_ordinal(first.device)


def _head_sizes(content: int, vllm_config: "VllmConfig | None") -> tuple[int, int]:
    """K and V head sizes whose sum is the tensor's last dim."""
    head = None
    mc = getattr(vllm_config, "model_config", None) if vllm_config is not None else None
    if mc is not None:
        try:
            head = int(mc.get_head_size())
        except Exception:  # noqa: BLE001 - fall back to the tensor shape
            head = None
        if getattr(mc, "use_mla", False):
            # MLA: one latent vector per token (kv_lora_rank + rope dims), no separate V.
            return content, 0
        hf = getattr(mc, "hf_text_config", None)
        v = getattr(hf, "v_head_dim", None) if hf is not None else None
        if isinstance(v, int) and 0 < v < content:
            return content - v, v
    if head is not None and 2 * head == content:
        return head, head
    if content % 2 == 0:
        return content // 2, content // 2
    raise ValueError(f"kvpark: cannot split KV content dim {content} into K and V halves")


def model_identity(vllm_config: "VllmConfig") -> dict[str, Any]:
    """What names the model whose KV is parked: every kvpark block key covers it, so a
    store written by one model is never served to another (vLLM's block hashes cover the
    tokens, not the model)."""
    import os

    mc = getattr(vllm_config, "model_config", None)
    cc = getattr(vllm_config, "cache_config", None)
    pc = getattr(vllm_config, "parallel_config", None)

    def call(obj: Any, name: str) -> Any:
        try:
            return getattr(obj, name)()
        except Exception:  # noqa: BLE001 - a field this vLLM does not have
            return None

    model = str(getattr(mc, "model", "") or "")
    if model and os.path.isdir(model):
        model = os.path.realpath(model)
    hf = getattr(mc, "hf_text_config", None)
    ident = {
        "model": model,
        "revision": getattr(mc, "revision", None),
        "dtype": str(getattr(mc, "dtype", "")),
        "kv_cache_dtype": str(getattr(cc, "cache_dtype", "")),
        "block_size": getattr(cc, "block_size", None),
        "block_hash": str(getattr(cc, "prefix_caching_hash_algo", "")),
        "layers": getattr(hf, "num_hidden_layers", None),
        "kv_heads": call(mc, "get_total_num_kv_heads"),
        "head_size": call(mc, "get_head_size"),
        "tensor_parallel_size": getattr(pc, "tensor_parallel_size", None),
    }
    return {k: v for k, v in ident.items() if isinstance(v, (str, int)) and not isinstance(v, bool)}


def preflight_context(
    vllm_config: "VllmConfig", kv_cache_config: "KVCacheConfig | None", rank: int | None
) -> dict[str, Any]:
    """What kvpark_config_preflight needs beyond the config: the rank (None on the
    scheduler), how many ranks of this engine map a host arena on this machine, the host
    memory vLLM still allocates after the connector is built (its KV cache, on the CPU
    backend) and the bytes of one KV block of this rank."""
    ctx: dict[str, Any] = {"rank": rank}
    pc = getattr(vllm_config, "parallel_config", None)

    def pos(v: Any) -> int:
        return v if isinstance(v, int) and v > 0 else 1

    world = pos(getattr(pc, "world_size", 1))
    nodes = pos(getattr(pc, "nnodes_within_dp", None) or getattr(pc, "nnodes", 1))
    ctx["ranks"] = max(1, world // nodes) * pos(getattr(pc, "data_parallel_size_local", 1))
    try:
        tensors = list(getattr(kv_cache_config, "kv_cache_tensors", None) or [])
        kv_bytes = sum(int(t.size) for t in tensors)
        groups = list(getattr(kv_cache_config, "kv_cache_groups", None) or [])
        block = sum(int(g.kv_cache_spec.page_size_bytes) * len(g.layer_names) for g in groups)
    except (AttributeError, TypeError, ValueError):
        kv_bytes, block = 0, 0
    dc = getattr(vllm_config, "device_config", None)
    if rank is not None and str(getattr(dc, "device_type", "")) == "cpu":
        ctx["reserve_host_bytes"] = kv_bytes * ctx["ranks"]
    if block > 0:
        ctx["block_bytes"] = block
    return ctx


def engine_ranks(vllm_config: "VllmConfig") -> tuple[int, int]:
    """The worker ranks of one engine as (first rank, world size): tensor x pipeline
    parallel workers, each running a mover with its own files and reporting with its
    rank (its rank in vLLM's world group); the planner counts a block as parked only
    when all of them hold it. With data parallelism vLLM numbers the workers of
    data-parallel rank d from d x world size."""
    pc = getattr(vllm_config, "parallel_config", None)

    def nat(v: Any, default: int) -> int:
        return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else default

    world = max(1, nat(getattr(pc, "world_size", 1), 1))
    first = 0
    dp = nat(getattr(pc, "data_parallel_size", 1), 1)
    if dp > 1 and getattr(pc, "distributed_executor_backend", None) != "external_launcher":
        first = nat(getattr(pc, "data_parallel_rank", 0), 0) * world
    return first, world


def _worker_rank() -> int:
    try:
        from vllm.distributed.parallel_state import get_world_group

        return int(get_world_group().rank_in_group)
    except Exception:  # noqa: BLE001 - no distributed group (tests, single process)
        return 0


class KVParkConnector(KVConnectorBase_V1):
    """vLLM V1 connector that parks KV blocks in kvpark's host and NVMe tiers.

    Best-effort cache: a failed or dropped save is a future miss, a failed load is
    reported through `get_block_ids_with_load_errors` so vLLM recomputes (configure
    `kv_load_failure_policy: "recompute"`).
    """

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole, kv_cache_config: "KVCacheConfig" = None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = dict(self._kv_transfer_config.kv_connector_extra_config or {})
        if extra.get("model_identity") is None:
            extra["model_identity"] = model_identity(vllm_config)
        self._block_size = int(vllm_config.cache_config.block_size)
        self._rank = 0 if role == KVConnectorRole.SCHEDULER else _worker_rank()
        #: What vLLM does with a block kvpark offered but could not load.
        self._failure_policy = str(getattr(self._kv_transfer_config, "kv_load_failure_policy", "fail") or "fail")
        # Every key and the machine (directories, host memory, a reused host_file) are
        # checked here, before vLLM allocates its KV cache: one ConfigError naming each
        # problem's key, value and what would work.
        context = preflight_context(vllm_config, kv_cache_config, None if role == KVConnectorRole.SCHEDULER else self._rank)
        self._config = _ffi.preflight_config(extra, context)
        self._raw_config = extra
        self._planner: _ffi.Planner | None = None
        self._mover: _ffi.Mover | None = None
        self._layer_index: dict[str, int] = {}
        self._on_cuda = False  # KV caches on a GPU (set at register_kv_caches)
        self._stream = None  # the CUDA stream last passed to the mover
        self._failed_blocks: set[int] = set()
        self._last_match: dict[str, bool] = {}
        self._bad_hint_reqs: set[str] = set()
        # metrics: the last snapshot sent (worker: its own; scheduler: the planner's),
        # and on the scheduler the newest snapshot of every worker rank
        self._sent_snapshot: bytes | None = None
        self._movers: dict[str, Any] = {}
        self._movers_changed = False
        #: Counters kept by the shim itself, exactly as vLLM passed the values
        #: (independent of the library's own metrics).
        self.shim_counters: dict[str, int] = {
            "external_tokens": 0,  # sum of num_external_tokens in update_state_after_alloc
            "async_loads": 0,
            "delayed_frees": 0,
            "finished_sending": 0,
            "finished_recving": 0,
            "load_error_blocks": 0,
            "bad_hints": 0,
        }
        # idle-time moves (scheduler side): see _idle_loop
        self._line = _line_key(vllm_config)
        self._lock = threading.RLock()
        self._last_engine_call = time.monotonic()
        self._idle_thread: threading.Thread | None = None
        self._idle_stop = threading.Event()
        self._idle_report_until = 0.0
        self.idle_counters: dict[str, int] = {"plans": 0, "reports": 0, "errors": 0}
        # vLLM's KV-cache events (scheduler side): see _start_gpu_feed
        self._gpu_feed: _kv_events.GpuEvictionFeed | None = None
        first, world = engine_ranks(vllm_config)
        with _LINES_LOCK:
            _LINES.setdefault(self._line, {})["scheduler" if role == KVConnectorRole.SCHEDULER else "worker"] = (
                weakref.ref(self)
            )
        self._world = world
        if role == KVConnectorRole.SCHEDULER:
            self._planner = _ffi.Planner(extra, self._block_size, world, first)
            if context.get("block_bytes"):
                # sessions parked before the first worker report are accounted too
                self._planner.expect_block_bytes(int(context["block_bytes"]))
            logger.info(
                "kvpark: planner up (block_size %d, worker ranks %d..%d, config %s)",
                self._block_size,
                first,
                first + world - 1,
                self._config,
            )
            self._start_gpu_feed(vllm_config)
        else:
            self._mover = _ffi.Mover(extra, self._rank)
            logger.info("kvpark: mover up (rank %d, config %s)", self._rank, self._config)
        if self._failure_policy != "recompute":
            logger.warning(
                "kvpark: kv_load_failure_policy is %r: a request whose blocks kvpark offered but "
                "cannot load (a corrupt NVMe record, a reclaimed host slot) fails with an error; "
                'set "kv_load_failure_policy": "recompute" to have vLLM recompute those blocks',
                self._failure_policy,
            )

    # ------------------------------------------------------------------ common

    @property
    def requires_kv_delivery(self) -> bool:
        """kvpark is a best-effort cache: a dropped save is only a future miss."""
        return False

    @property
    def config(self) -> dict[str, Any]:
        """The normalized config (defaults filled, sizes in bytes) from kvpark_config_validate."""
        return dict(self._config)

    def metrics(self) -> dict[str, Any]:
        """This process's kvpark metrics: the library's snapshot (planner or mover JSON
        object) plus the shim's own counters under "shim"."""
        out: dict[str, Any] = {}
        if self._planner is not None:
            out = {**self._planner.metrics(), "idle": dict(self.idle_counters)}
            if self._gpu_feed is not None:
                out["kv_events"] = {"endpoint": self._gpu_feed.endpoint, **self._gpu_feed.counters}
        elif self._mover is not None:
            out = self._mover.metrics()
        return {**out, "shim": dict(self.shim_counters)}

    def shutdown(self):
        self._idle_stop.set()
        if self._gpu_feed is not None:
            self._gpu_feed.close()
        t = self._idle_thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout=5)
        with _LINES_LOCK:
            line = _LINES.get(self._line, {})
            for k in [k for k, r in line.items() if r() is self]:
                del line[k]
            sched = line.get("scheduler")
            sched = sched() if sched is not None else None
        # The scheduler's idle thread works on this worker's mover under the scheduler's
        # lock: close under it too, so no idle call is inside the library meanwhile.
        with (sched._lock if sched is not None else self._lock):
            if self._mover is not None:
                self._mover.close()
                self._mover = None
        with self._lock:
            if self._planner is not None:
                self._planner.close()
                self._planner = None

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        """Layer-wise sync loads (layerwise_load true, or auto on a GPU) are ordered by
        wait_for_layer_load, which a FULL CUDA graph replay never calls: the forward would
        read blocks still being loaded. vLLM then uses PIECEWISE graphs (attention runs
        eagerly between the pieces). With layerwise_load false, loads are in place before
        start_load_kv returns and FULL graphs stay allowed.

        vLLM asks this while it builds its config, before any model loads (when CUDA graphs
        are on): the config is checked against the machine here already (directories, the
        host memory of one rank), so such errors stop the server within seconds."""
        cfg = _ffi.preflight_config(dict(extra_config or {}), {"rank": None, "ranks": 1})
        return cfg.get("layerwise_load") is not False

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        return KVParkStats(data=data) if data is not None else KVParkStats()

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: "VllmConfig",
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> KVConnectorPromMetrics | None:
        """kvpark's `kvpark_*` series on vLLM's Prometheus `/metrics` (kvpark.metrics)."""
        return KVParkPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        """A snapshot whenever kvpark's counters changed since the last one sent.

        Worker: its mover's counters `{"mover": {rank: ...}}`. Scheduler: the planner's
        counters and the newest counters of every worker rank (kept from
        update_connector_output), so every snapshot vLLM logs or exports is whole.
        """
        if self._mover is not None:
            raw = self._mover.metrics_bytes()
            if raw == self._sent_snapshot:
                return None
            self._sent_snapshot = raw
            return KVParkStats(data={"mover": {str(self._rank): json.loads(raw or b"{}")}})
        if self._planner is not None:
            raw = self._planner.metrics_bytes()
            if raw == self._sent_snapshot and not self._movers_changed:
                return None
            self._sent_snapshot = raw
            self._movers_changed = False
            return KVParkStats(data={"planner": json.loads(raw or b"{}"), "mover": dict(self._movers)})
        return None

    # --------------------------------------------------------------- scheduler

    def _p(self) -> _ffi.Planner:
        if self._planner is None:
            raise RuntimeError("kvpark: scheduler-side method called on a worker-role connector")
        return self._planner

    def _with_hint_fallback(self, request: "Request", call):
        """Runs call(view); a malformed kvpark hint (client input) must not fail the engine:
        the request is retried without it and counted in shim_counters["bad_hints"]."""
        view = _request_view(request)
        try:
            return call(view)
        except kvpark_errors.InvalidArgumentError as e:
            if view.struct.hint_len == 0:
                raise
            if request.request_id not in self._bad_hint_reqs:  # once per request
                self._bad_hint_reqs.add(request.request_id)
                self.shim_counters["bad_hints"] += 1
                logger.warning("kvpark: ignoring the hint of request %s: %s", request.request_id, e.message)
            return call(_request_view(request, with_hint=False))

    def _engine_call(self) -> None:
        """A scheduler call of vLLM: the engine is not idle. With an idle thread, under
        its lock, so that a pass of it in progress ends first and the next one sees this
        call (no report is applied between a match and its allocation)."""
        if self._idle_thread is None:
            self._last_engine_call = time.monotonic()
            return
        with self._lock:
            self._last_engine_call = time.monotonic()

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        self._engine_call()
        now = _now_ns()
        n, load_async = self._with_hint_fallback(
            request, lambda v: self._p().match(v, num_computed_tokens, request.num_tokens, now)
        )
        load_async = bool(load_async and n > 0)
        if n > 0:
            self._last_match[request.request_id] = load_async
        return n, load_async

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int):
        self._engine_call()
        ids = blocks.get_block_ids()
        block_ids = list(ids[0]) if ids else []
        self._p().on_alloc(request.request_id, block_ids, num_external_tokens)
        if num_external_tokens > 0:
            self.shim_counters["external_tokens"] += int(num_external_tokens)
            self.shim_counters["async_loads"] += int(self._last_match.pop(request.request_id, False))

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        self._engine_call()
        self._take_gpu_events()
        return KVParkConnectorMetadata(self._p().build_meta(_now_ns()))

    # ------------------------------------------------ vLLM's KV-cache events

    def _start_gpu_feed(self, vllm_config: "VllmConfig") -> None:
        """Subscribes to vLLM's KV-cache events when vLLM publishes them over ZMQ, so the
        planner hears which parked contexts the GPU prefix cache gave up (the kvpark policy
        then keeps host for those and prefetches them; see README "GPU evictions")."""
        kec = getattr(vllm_config, "kv_events_config", None)
        if kec is None or not getattr(kec, "enable_kv_cache_events", False):
            return
        par = getattr(vllm_config, "parallel_config", None)
        dp = getattr(par, "data_parallel_index", None)
        if dp is None:
            dp = getattr(par, "data_parallel_rank", 0)
        endpoint, why = _kv_events.subscribe_endpoint(kec, int(dp or 0))
        if endpoint is None:
            logger.warning("kvpark: GPU evictions go unheard: %s", why)
            return
        try:
            self._gpu_feed = _kv_events.GpuEvictionFeed(endpoint, str(getattr(kec, "topic", "") or ""))
        except Exception as e:  # noqa: BLE001 - without the feed kvpark still serves
            logger.warning("kvpark: cannot subscribe to vLLM's KV-cache events at %s (%s)", endpoint, e)
            return
        self._p().hear_gpu_events()
        logger.info("kvpark: hearing the GPU prefix cache's evictions from vLLM's KV-cache events at %s", endpoint)

    def _take_gpu_events(self) -> None:
        """Hands the GPU evictions heard since the last call to the planner (from the
        scheduler thread, or the idle thread under its lock)."""
        feed = self._gpu_feed
        if feed is None or self._planner is None:
            return
        removed, cleared = feed.take()
        if cleared:
            self._planner.gpu_cleared()
        if removed:
            self._planner.gpu_removed(removed)

    # ------------------------------------------------------- idle-time moves

    def _start_idle_thread(self) -> None:
        """Starts the idle thread once, when the policy has time-driven work (the planner
        has a wakeup: the kvpark policies' checkpoints) and the worker shares this process."""
        if self._idle_thread is not None or self._world != 1:
            return  # workers in other processes: moves travel with the steps only
        if self._planner is None or self._planner.next_wakeup() is None:
            return
        self._idle_thread = threading.Thread(target=self._idle_loop, name="kvpark-idle", daemon=True)
        self._idle_thread.start()

    def _idle_worker(self) -> "KVParkConnector | None":
        with _LINES_LOCK:
            ref = _LINES.get(self._line, {}).get("worker")
        w = ref() if ref is not None else None
        return w if w is not None and w._mover is not None else None

    def _idle_loop(self) -> None:
        """vLLM calls the scheduler only while it has requests, so the policy's
        checkpoints (prefetch NVMe -> host ahead of a predicted return) would wait for
        the next request. While the engine is quiet this thread ticks the planner at its
        wakeups, runs the resulting tier moves on the worker's mover and feeds the
        worker's reports back, so the next request's match sees the prefetched blocks
        on host (a synchronous load)."""
        while True:
            wait = 1.0
            try:
                wait = self._idle_tick()
            except Exception as e:  # noqa: BLE001 - the idle thread must never take the engine down
                self.idle_counters["errors"] += 1
                logger.warning("kvpark: idle-time moves failed (%s); they wait for the next step", e)
            if self._idle_stop.wait(max(0.01, min(wait, 1.0))):
                return

    def _idle_tick(self) -> float:
        """One pass of the idle thread; returns how long to sleep."""
        with self._lock:
            planner = self._planner
            if planner is None:
                return 1.0
            quiet = time.monotonic() - self._last_engine_call
            if quiet < IDLE_AFTER_S:
                return IDLE_AFTER_S - quiet
            w = self._idle_worker()
            if w is None:
                return 1.0
            # the worker's news first (saves and NVMe writes that finished after the
            # last step), so the policy decides on what the tiers hold now
            blob = w._m().take_worker_meta()
            if blob:
                planner.on_worker_meta(blob, _now_ns())
                self.idle_counters["reports"] += 1
                self._idle_report_until = time.monotonic() + IDLE_REPORT_S
            self._take_gpu_events()
            plan = planner.tick_moves(_now_ns())
            if plan:
                w._m().run_moves(plan)
                self.idle_counters["plans"] += 1
                self._idle_report_until = time.monotonic() + IDLE_REPORT_S
            if time.monotonic() < self._idle_report_until:
                return 0.05
            nxt = planner.next_wakeup()
            return 1.0 if nxt is None else max(0.0, (nxt - _now_ns()) / 1e9)

    def update_connector_output(self, connector_output: "KVConnectorOutput"):
        self._engine_call()
        stats = getattr(connector_output, "kv_connector_stats", None)
        movers = getattr(stats, "data", None) or {}
        for rank, snap in (movers.get("mover") or {}).items():
            if self._movers.get(rank) != snap:
                self._movers[rank] = snap
                self._movers_changed = True
        meta = getattr(connector_output, "kv_connector_worker_meta", None)
        if isinstance(meta, KVParkWorkerMetadata):
            now = _now_ns()
            for blob in meta.blobs:
                if blob:
                    self._p().on_worker_meta(blob, now)

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """Hands the finished turn to the planner, which decides whether to park it.

        Returns delay_free=True only while a save of this request is planned: vLLM then keeps
        the blocks until a worker reports the request in finished_sending.
        """
        self._engine_call()
        now = _now_ns()
        ids = list(block_ids)
        delay = self._with_hint_fallback(
            request, lambda v: self._p().request_finished(v, ids, int(request.num_computed_tokens), now)
        )
        self.shim_counters["delayed_frees"] += int(delay)
        # a suspend is where the policy sets its timers (once per finished request,
        # not per step, until the thread runs)
        self._start_idle_thread()
        self._last_match.pop(request.request_id, None)
        self._bad_hint_reqs.discard(request.request_id)
        return delay, None

    # ------------------------------------------------------------------ worker

    def _m(self) -> _ffi.Mover:
        if self._mover is None:
            raise RuntimeError("kvpark: worker-side method called on a scheduler-role connector")
        return self._mover

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]):
        names, geom, views, device = kv_geometry(kv_caches, self._vllm_config)
        self._layer_index = {n: i for i, n in enumerate(names)}
        self._on_cuda = device is not None
        self._m().register(geom, views, device)
        logger.info(
            "kvpark: registered %d layers, %d blocks x %d tokens, %d kv heads, head %d+%d, dtype %s, %s",
            geom.layers,
            views[0].num_blocks,
            geom.block_tokens,
            geom.kv_heads,
            geom.head_size_k,
            geom.head_size_v,
            kv_caches[names[0]].dtype,
            f"cuda:{device}" if device is not None else "host",
        )

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        if isinstance(connector_metadata, KVParkConnectorMetadata):
            if self._on_cuda:
                # transfers of this step wait, on the GPU, for the work queued
                # on the stream the model runs on (no host synchronisation);
                # told again only when vLLM's stream changes
                stream = torch.cuda.current_stream().cuda_stream
                if stream != self._stream:
                    self._m().set_stream(stream)
                    self._stream = stream
            self._m().bind(connector_metadata.plan)

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        self._m().start_load()

    def wait_for_layer_load(self, layer_name: str) -> None:
        idx = self._layer_index.get(layer_name)
        if idx is not None:
            try:
                self._m().wait_layer(idx)
            except _ffi.KvparkError as e:
                # Raising here would take the engine down from inside the forward.
                # The mover reports the step's blocks as failed loads (get_finished);
                # vLLM then recomputes or fails those requests (kv_load_failure_policy).
                logger.warning("kvpark: layer %d of this step's loads failed: %s; %s", idx, e, self._on_failure())

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        """No-op: kvpark parks a turn when its request ends, not layer by layer.

        `request_finished` plans the save; in the worker's next step `wait_for_save` hands it
        to the mover's saver thread, which gathers the blocks beside the following steps; the
        request is reported in `finished_sending` once they are copied (or failed).
        """

    def wait_for_save(self):
        self._m().wait_for_save()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        done = self._m().get_finished()
        self._failed_blocks.update(int(b) for b in done.get("failed_blocks") or ())
        sending = set(done.get("sending") or ())
        recving = set(done.get("recving") or ())
        self.shim_counters["finished_sending"] += len(sending)
        self.shim_counters["finished_recving"] += len(recving)
        return (sending or None), (recving or None)

    def get_block_ids_with_load_errors(self) -> set[int]:
        failed, self._failed_blocks = self._failed_blocks, set()
        if failed:
            self.shim_counters["load_error_blocks"] += len(failed)
            logger.warning("kvpark: %d block(s) failed to load; %s", len(failed), self._on_failure())
        return failed

    def _on_failure(self) -> str:
        """What vLLM does with blocks reported as failed loads, under this engine's policy."""
        if self._failure_policy == "recompute":
            return "vLLM recomputes them (kv_load_failure_policy \"recompute\")"
        return (
            "vLLM ends the requests that needed them with an error (kv_load_failure_policy "
            f"{self._failure_policy!r}; \"recompute\" would have vLLM recompute them instead)"
        )

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        blob = self._m().take_worker_meta()
        return KVParkWorkerMetadata([blob]) if blob else None
