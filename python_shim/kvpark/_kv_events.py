"""vLLM's KV-cache events, read by the scheduler-side connector: which parked contexts the
GPU prefix cache gave up.

vLLM publishes the GPU prefix cache's changes (BlockStored, BlockRemoved,
AllBlocksCleared) when its `kv_events_config` enables them with the `zmq` publisher. The
connector has no other way to learn when vLLM evicts a cached block, and the kvpark
policy decides better with it: a host copy of a context the GPU still holds is redundant,
and a context the GPU gave up is the one to bring back to host ahead of its session's
return (the replay's `kvpark:gpu-events`).

`GpuEvictionFeed` subscribes to the publisher from a thread of the engine-core process
and keeps the removed block hashes until the scheduler takes them (`take`): the planner
is only ever called from vLLM's scheduler thread or under the idle thread's lock.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

logger = logging.getLogger("kvpark")

#: The medium vLLM names its GPU prefix cache with (BlockRemoved.medium).
MEDIUM_GPU = "GPU"
#: Removed hashes kept before the oldest are dropped (a scheduler that stopped
#: taking them must not grow memory without bound; a lost event is a late prefetch).
MAX_PENDING = 1 << 20
MASK64 = (1 << 64) - 1


def subscribe_endpoint(kv_events_config: Any, data_parallel_index: int) -> tuple[str | None, str]:
    """The endpoint a subscriber in this process connects to, or (None, why not).

    vLLM's publisher binds wildcard, ipc and inproc endpoints and connects to the rest
    (then an outside proxy owns the socket and kvpark cannot subscribe); its tcp port is
    offset by the data-parallel index, as vLLM does."""
    if kv_events_config is None or not getattr(kv_events_config, "enable_kv_cache_events", False):
        return None, "vLLM's kv_events_config does not enable KV-cache events"
    publisher = getattr(kv_events_config, "publisher", None)
    if publisher != "zmq":
        return None, f"vLLM's KV-cache event publisher is {publisher!r}, not 'zmq'"
    endpoint = str(getattr(kv_events_config, "endpoint", "") or "")
    if endpoint.startswith(("ipc://", "inproc://")):
        base = endpoint
    elif endpoint.startswith("tcp://") and ("*" in endpoint or "::" in endpoint):
        host, _, port = endpoint[len("tcp://") :].rpartition(":")
        if not port.isdigit() or int(port) == 0:
            return None, f"vLLM publishes KV-cache events on {endpoint!r}: kvpark needs a fixed port"
        local = "[::1]" if "::" in host else "127.0.0.1"
        base = f"tcp://{local}:{port}"
    else:
        return None, (
            f"vLLM connects its KV-cache event publisher to {endpoint!r} (an outside socket); "
            "kvpark subscribes only to an endpoint vLLM binds (tcp://*:PORT, ipc://, inproc://)"
        )
    if data_parallel_index:
        if base.startswith("inproc://"):
            base = f"{base}_dp{data_parallel_index}"
        elif base.startswith("tcp://"):
            head, _, port = base.rpartition(":")
            base = f"{head}:{int(port) + data_parallel_index}"
    return base, ""


def event_id(h: bytes | int) -> int:
    """A block hash as vLLM's events give it by default (VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES):
    the last 8 bytes of the hash bytes as a big-endian integer; hash bytes (that variable
    set to 0) are converted the same way, so either setting works."""
    if isinstance(h, int):
        return h & MASK64
    return int.from_bytes(bytes(h), "big") & MASK64


class GpuEvictionFeed:
    """A ZMQ subscriber to vLLM's KV-cache events that collects the GPU prefix cache's
    removals. `take()` hands over (removed hashes, cleared) since the last call."""

    def __init__(self, endpoint: str, topic: str = ""):
        import msgspec
        import zmq
        from vllm.distributed.kv_events import KVEventBatch

        self.endpoint = endpoint
        self._decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
        self._ctx = zmq.Context.instance()  # inproc endpoints need the publisher's context
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
        self._sock.connect(endpoint)
        self._lock = threading.Lock()
        self._removed: list[int] = []
        self._cleared = False
        self._stop = threading.Event()
        #: batches read, removed GPU blocks seen, batches lost (sequence gaps), bad payloads,
        #: removals dropped unread (MAX_PENDING)
        self.counters: dict[str, int] = {
            "batches": 0,
            "removed": 0,
            "lost_batches": 0,
            "bad_payloads": 0,
            "dropped": 0,
        }
        self._next_seq: int | None = None
        self._thread = threading.Thread(target=self._loop, name="kvpark-kv-events", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        import zmq

        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                if not dict(poller.poll(100)):
                    continue
                while True:
                    try:
                        frames = self._sock.recv_multipart(flags=zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._on_frames(frames)
        except Exception as e:  # noqa: BLE001 - the feed must never take the engine down
            logger.warning("kvpark: reading vLLM's KV-cache events stopped (%s); GPU evictions go unheard", e)
        finally:
            self._sock.close(linger=0)

    def _on_frames(self, frames: list[bytes]) -> None:
        if len(frames) != 3:
            self.counters["bad_payloads"] += 1
            return
        _, seq_bytes, payload = frames
        seq = int.from_bytes(seq_bytes, "big", signed=True)
        if self._next_seq is not None and seq > self._next_seq:
            self.counters["lost_batches"] += seq - self._next_seq
        self._next_seq = seq + 1
        try:
            batch = self._decoder.decode(payload)
        except Exception:  # noqa: BLE001 - a payload we cannot read is counted, not fatal
            self.counters["bad_payloads"] += 1
            return
        self.counters["batches"] += 1
        removed: list[int] = []
        cleared = False
        for ev in batch.events:
            kind = type(ev).__name__
            if kind == "AllBlocksCleared":
                cleared = True
                removed.clear()
            elif kind == "BlockRemoved" and getattr(ev, "medium", None) in (None, MEDIUM_GPU):
                removed.extend(event_id(h) for h in ev.block_hashes)
        with self._lock:
            self.counters["removed"] += len(removed)
            if cleared:
                # what was removed before the clear is covered by it
                self._removed.clear()
                self._cleared = True
            self._removed.extend(removed)
            over = len(self._removed) - MAX_PENDING
            if over > 0:
                del self._removed[:over]
                self.counters["dropped"] += over

    def take(self) -> tuple[list[int], bool]:
        """The removed block hashes and whether the whole cache was cleared, since the last
        call (a clear comes before the removals listed with it)."""
        with self._lock:
            removed, self._removed = self._removed, []
            cleared, self._cleared = self._cleared, False
        return removed, cleared

    def close(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=2)
