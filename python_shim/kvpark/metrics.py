"""kvpark's counters in vLLM's connector metrics: the periodic log line and Prometheus.

Data flow (vLLM 0.32's connector-stats mechanism):

- every worker's connector returns, on each step whose mover counters changed, a
  `KVParkStats` `{"mover": {"<rank>": snapshot}}` (`get_kv_connector_stats`); vLLM merges
  the workers' objects with `aggregate` (one entry per rank) and hands the result to the
  scheduler's connector in `update_connector_output`;
- the scheduler's connector keeps the newest snapshot of every rank and returns, on each
  step where the planner's or any rank's counters changed, the whole state
  `{"planner": snapshot, "mover": {"<rank>": snapshot, ...}}`;
- vLLM's stat loggers (in the API server process) get that dict: `KVParkStats.reduce`
  makes the `KV Transfer metrics` log line (planner and workers together), and
  `KVParkPromMetrics.observe` sets the `kvpark_*` Prometheus series.

Snapshots are cumulative, so merging keeps the newest per source (summing would double
count) and a Prometheus counter grows by the difference to the last snapshot it saw from
the same source. Every value is as of the engine's last step: vLLM moves stats only while
it steps, so work that finishes while the engine is idle shows with the next step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
)

#: Prefix of every kvpark Prometheus series.
PROM_PREFIX = "kvpark_"


@dataclass(frozen=True)
class Metric:
    """One kvpark series: `kvpark_<name>` (counters get `_total` from prometheus_client).

    `source` "planner" (one per engine, the scheduler) or "mover" (one per worker rank,
    labelled `rank`); `series` maps extra label values (matching `labels`) to the path of
    the value in the snapshot.
    """

    name: str
    kind: str  # "counter" | "gauge"
    doc: str
    source: str
    series: tuple[tuple[tuple[str, ...], Callable[[dict], Any]], ...]
    labels: tuple[str, ...] = ()


def _at(*path: str) -> Callable[[dict], Any]:
    def get(d: dict) -> Any:
        for p in path:
            if not isinstance(d, dict):
                return None
            d = d.get(p)
        return d

    return get


def _product(a: str, b: str) -> Callable[[dict], Any]:
    def get(d: dict) -> Any:
        x, y = d.get(a), d.get(b)
        return x * y if isinstance(x, int) and isinstance(y, int) else None

    return get


def _one(get: Callable[[dict], Any]) -> tuple[tuple[tuple[str, ...], Callable[[dict], Any]], ...]:
    return (((), get),)


METRICS: tuple[Metric, ...] = (
    # ---- scheduler (planner): what kvpark served and decided
    Metric("hit_requests", "counter", "Requests kvpark served a prefix to (beyond vLLM's prefix cache).",
           "planner", _one(_at("hit_requests"))),
    Metric("hit_tokens", "counter", "Prompt tokens kvpark loaded instead of vLLM computing them.",
           "planner", _one(_at("hit_tokens"))),
    Metric("hit_blocks", "counter", "KV blocks kvpark planned to load, by the tier that held them.",
           "planner", ((("host",), _at("hit_blocks_host")), (("nvme",), _at("hit_blocks_nvme"))), ("tier",)),
    Metric("loads", "counter", "Loads planned: sync (before or beside the forward) or async (request waits).",
           "planner", ((("sync",), _at("loads_sync")), (("async",), _at("loads_async"))), ("mode",)),
    Metric("load_failed_blocks", "counter",
           "Blocks kvpark offered but a worker could not load (vLLM recomputes or fails the request, "
           "per kv_load_failure_policy).", "planner", _one(_at("load_failed_blocks"))),
    Metric("saves", "counter", "Finished turns kvpark planned to park.", "planner", _one(_at("saves"))),
    Metric("saved_blocks", "counter", "Blocks confirmed parked.", "planner", _one(_at("saved_blocks"))),
    Metric("save_failed_blocks", "counter", "Blocks whose save failed.", "planner", _one(_at("save_failed_blocks"))),
    Metric("policy_moves", "counter", "Block moves the placement policy planned (evict, demote, promote, drop).",
           "planner", _one(_at("moves"))),
    Metric("prefetches", "counter",
           "Prefetches (NVMe -> host ahead of a predicted return) by outcome: issued; in_time (whole on host "
           "when the session came back); late (still moving); wasted (left host before the session came back).",
           "planner", ((("issued",), _at("prefetches")), (("in_time",), _at("prefetch_in_time")),
                       (("late",), _at("prefetch_late")), (("wasted",), _at("prefetch_wasted"))), ("outcome",)),
    Metric("predicted_gaps", "counter",
           "Gaps (suspend to the next request) the kvpark policy had predicted: all; below_p50 / below_p90 "
           "(at most the predicted median / p90: calibrated, half and nine in ten).",
           "planner", ((("all",), _at("predicted_gaps")), (("below_p50",), _at("gaps_below_p50")),
                       (("below_p90",), _at("gaps_below_p90"))), ("bucket",)),
    Metric("gpu_evictions", "counter",
           "vLLM's GPU prefix-cache evictions heard from its KV-cache events (kv_events_config with the zmq "
           "publisher): removed_blocks (block hashes removed); dropped_sessions (parked contexts given up).",
           "planner", ((("removed_blocks",), _at("gpu_removed_blocks")),
                       (("dropped_sessions",), _at("gpu_dropped_sessions"))), ("kind",)),
    Metric("sessions", "counter", "Sessions seen.", "planner", _one(_at("sessions"))),
    Metric("parked_blocks", "gauge", "Blocks kvpark holds, by tier (a block on both counts in both).",
           "planner", ((("host",), _at("parked_host_blocks")), (("nvme",), _at("parked_nvme_blocks"))), ("tier",)),
    # ---- workers (mover, one series per rank): what moved and what is held
    Metric("worker_loaded_blocks", "counter", "Blocks a worker copied into vLLM's KV cache, by source tier.",
           "mover", ((("host",), _at("counters", "load_blocks_host")), (("nvme",), _at("counters", "load_blocks_nvme"))),
           ("tier",)),
    Metric("worker_load_failed_blocks", "counter", "Blocks whose load failed on a worker.",
           "mover", _one(_at("counters", "load_failed_blocks"))),
    Metric("worker_saved_blocks", "counter", "Blocks a worker gathered into its host tier.",
           "mover", _one(_at("counters", "saved_blocks"))),
    Metric("worker_rehosted_blocks", "counter",
           "Blocks on NVMe only that a save gathered into the host tier again.",
           "mover", _one(_at("counters", "rehosted_blocks"))),
    Metric("demoted_blocks", "counter", "Blocks written from the host tier to NVMe.",
           "mover", _one(_at("counters", "demoted_blocks"))),
    Metric("host_evictions", "counter", "Host blocks evicted to make room.", "mover", _one(_at("counters", "host_evictions"))),
    Metric("dropped_blocks", "counter", "Host blocks dropped without an NVMe copy.",
           "mover", _one(_at("counters", "dropped_blocks"))),
    Metric("nvme_written_bytes", "counter", "Bytes written to NVMe records (after the codec).",
           "mover", _one(_at("nvme", "put_stored_bytes"))),
    Metric("nvme_reads", "counter", "NVMe record reads that returned data.", "mover", _one(_at("nvme", "gets"))),
    Metric("nvme_corrupt_records", "counter", "NVMe records that failed their checksum on a load (never served).",
           "mover", _one(_at("counters", "load_corrupt"))),
    Metric("nvme_write_errors", "counter", "NVMe writes that failed.", "mover", _one(_at("counters", "nvme_write_errors"))),
    Metric("nvme_io_errors", "counter", "NVMe I/O errors other than a full disk.", "mover", _one(_at("nvme", "io_errors"))),
    Metric("nvme_no_space_errors", "counter", "NVMe writes refused for lack of space.",
           "mover", _one(_at("nvme", "no_space_errors"))),
    Metric("host_used_bytes", "gauge", "Bytes of the worker's host tier holding blocks.",
           "mover", _one(_product("host_slots_used", "host_slot_bytes"))),
    Metric("host_capacity_bytes", "gauge", "Bytes of the worker's host tier.",
           "mover", _one(_product("host_slots", "host_slot_bytes"))),
    Metric("nvme_used_bytes", "gauge", "Bytes the worker's NVMe segment files occupy.",
           "mover", _one(_at("nvme", "used_bytes"))),
    Metric("nvme_capacity_bytes", "gauge", "The worker's NVMe capacity (nvme_bytes).",
           "mover", _one(_at("nvme", "capacity_bytes"))),
)


def _num(v: Any) -> int | float | None:
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _sources(data: dict[str, Any], source: str) -> list[tuple[tuple[str, ...], dict]]:
    """(extra label values, snapshot) of every source of a kind: the planner, or each rank."""
    if source == "planner":
        p = data.get("planner")
        return [((), p)] if isinstance(p, dict) else []
    movers = data.get("mover") or {}
    return [((str(r),), snap) for r, snap in sorted(movers.items()) if isinstance(snap, dict)]


def summary(data: dict[str, Any]) -> dict[str, int | float]:
    """The log line's values: every metric, planner and workers together, worker values
    summed over ranks (same names as the Prometheus series, without the prefix)."""
    out: dict[str, int | float] = {}
    for m in METRICS:
        for _, snap in _sources(data, m.source):
            for extra, get in m.series:
                v = _num(get(snap))
                if v is None:
                    continue
                key = "_".join((m.name, *extra))
                out[key] = out.get(key, 0) + v
    return out


class KVParkStats(KVConnectorStats):
    """kvpark's counter snapshots through vLLM's connector stats.

    `data` = {"planner": {...}, "mover": {"<rank>": {...}}}; `aggregate` keeps the newest
    snapshot per source, `reduce` gives the log line's values (`summary`).
    """

    def reset(self):
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        if other is None or not other.data:
            return self
        merged: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in self.data.items()}
        for key, value in other.data.items():
            if key == "mover" and isinstance(value, dict):
                merged.setdefault("mover", {}).update(value)
            else:
                merged[key] = value
        return KVParkStats(data=merged)

    def reduce(self) -> dict[str, int | float]:
        return summary(self.data)

    def is_empty(self) -> bool:
        return not self.data


class KVParkPromMetrics(KVConnectorPromMetrics):
    """The `kvpark_*` series on vLLM's Prometheus `/metrics`, labelled like vLLM's own
    (`model_name`, `engine`) plus `rank` for worker series and `tier` / `mode` where the
    metric says. Counters advance by the difference between consecutive snapshots of the
    same source (a source whose counter went back, a restarted worker, counts from zero)."""

    def __init__(self, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        _unregister_kvpark_series()
        self._series: dict[str, Any] = {}
        for m in METRICS:
            labels = list(self._labelnames) + (["rank"] if m.source == "mover" else []) + list(m.labels)
            name = PROM_PREFIX + m.name
            if m.kind == "counter":
                self._series[m.name] = self._counter_cls(name=name, documentation=m.doc, labelnames=labels)
            else:
                self._series[m.name] = self._gauge_cls(
                    name=name, documentation=m.doc, labelnames=labels, multiprocess_mode="mostrecent"
                )
        self._last: dict[tuple, float] = {}

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0):
        base = [str(v) for v in self.per_engine_labelvalues.get(engine_idx, [])]
        for m in METRICS:
            series = self._series[m.name]
            for src_labels, snap in _sources(transfer_stats_data or {}, m.source):
                for extra, get in m.series:
                    v = _num(get(snap))
                    if v is None:
                        continue
                    labels = (*base, *src_labels, *extra)
                    child = series.labels(*labels)
                    if m.kind == "gauge":
                        child.set(v)
                        continue
                    key = (engine_idx, m.name, labels)
                    last = self._last.get(key, 0)
                    delta = v - last if v >= last else v
                    if delta > 0:
                        child.inc(delta)
                    self._last[key] = v


def _unregister_kvpark_series() -> None:
    """Drops kvpark series registered by an earlier stat logger in this process (vLLM
    unregisters only its own `vllm:` series before registering them again)."""
    try:
        from prometheus_client import REGISTRY
    except ImportError:  # pragma: no cover
        return
    for collector in list(getattr(REGISTRY, "_collector_to_names", {})):
        if getattr(collector, "_name", "").startswith(PROM_PREFIX):
            REGISTRY.unregister(collector)


__all__ = ["METRICS", "PROM_PREFIX", "KVParkPromMetrics", "KVParkStats", "summary"]
