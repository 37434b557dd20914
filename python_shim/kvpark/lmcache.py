"""kvpark as an LMCache storage plugin (LMCache 0.5.x `StoragePluginInterface`).

LMCache loads it itself from its config (no LMCache patch)::

    chunk_size: 256
    local_cpu: true
    max_local_cpu_size: 5
    storage_plugins: [kvpark]
    extra_config:
      storage_plugin.kvpark.module_path: kvpark.lmcache
      storage_plugin.kvpark.class_name: KvparkBackend
      storage_plugin.kvpark.host_bytes: 8GiB
      storage_plugin.kvpark.nvme_dir: /mnt/nvme/kvpark-lmcache
      storage_plugin.kvpark.codec: lz4

The plugin stores LMCache's chunks (the bytes of a `MemoryObj` plus its shape, dtype and
format) under the `CacheEngineKey` string in kvpark's chunk store (`kvpark._store`, C ABI
`kvpark_store_*`): a host arena of fixed-size slots (one chunk per slot; a shorter last
chunk keeps its length) written through to the compressed, checksummed NVMe segment store.
A restarted engine finds its chunks on NVMe. A corrupt NVMe record is a miss (`get_blocking`
returns None, `contains` says False afterwards) and is counted (`metrics()["store"]
["corrupt"]`), never wrong bytes.

Configuration: every other key under `storage_plugin.<name>.` (the name listed in
`storage_plugins`) is a kvpark key: `host_bytes`, `nvme_dir`, `nvme_bytes`,
`nvme_segment_bytes`, `codec`, `policy`, `io_threads`, `fsync`, `model_identity`, and the
plugin's own `chunk_bytes` (default: LMCache's full chunk). An unknown key, a vLLM-connector
key that has no meaning here, or a bad value raises `ConfigError` naming the
`extra_config` key. (LMCache's loader logs a failing plugin and carries on without it.)
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from concurrent.futures import Future
from typing import Any, Callable, List, Optional, Sequence

import torch

from lmcache.utils import CacheEngineKey
from lmcache.v1.memory_management import MemoryFormat, MemoryObj
from lmcache.v1.storage_backend.abstract_backend import StoragePluginInterface

from ._store import ChunkStore
from .errors import ConfigError, CorruptError, KvparkError

log = logging.getLogger("kvpark.lmcache")

#: kvpark configuration keys the plugin passes to the chunk store.
STORE_KEYS = (
    "host_bytes",
    "nvme_dir",
    "nvme_bytes",
    "nvme_segment_bytes",
    "codec",
    "policy",
    "io_threads",
    "fsync",
    "model_identity",
)
#: The plugin's own keys.
PLUGIN_KEYS = ("module_path", "class_name", "chunk_bytes")
#: vLLM-connector keys that mean nothing to the plugin, with the reason.
CONNECTOR_ONLY_KEYS = {
    "host_file": "chunks outlive a restart on NVMe (set nvme_dir); a file-backed arena is the vLLM connector's",
    "sync_load_budget_bytes": "LMCache decides when it loads",
    "layerwise_load": "LMCache decides how it loads",
    "copy_strategy": "the plugin copies host memory only; LMCache moves chunks to and from the GPU",
    "min_park_blocks": "LMCache decides what it stores",
    "session_ttl": "LMCache's keys carry no session",
    "kvpark": "the kvpark policy's knobs: the policy predicts session gaps, and LMCache's keys carry no session",
}


def plugin_name(config: Any, module: str = __name__, cls: str = "KvparkBackend") -> str:
    """The name under which `config.storage_plugins` lists this plugin ('kvpark' if none does)."""
    extra = getattr(config, "extra_config", None) or {}
    for name in getattr(config, "storage_plugins", None) or []:
        if (
            extra.get(f"storage_plugin.{name}.module_path") == module
            and extra.get(f"storage_plugin.{name}.class_name") == cls
        ):
            return name
    return "kvpark"


def parse_plugin_config(extra_config: dict[str, Any] | None, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Splits `extra_config` entries `storage_plugin.<name>.*` into (kvpark store config,
    plugin options), refusing unknown and connector-only keys with a ConfigError naming
    the `extra_config` key. Values are checked by the library when the store opens."""
    prefix = f"storage_plugin.{name}."
    store: dict[str, Any] = {}
    plugin: dict[str, Any] = {}
    for full, value in (extra_config or {}).items():
        if not isinstance(full, str) or not full.startswith(prefix):
            continue
        key = full[len(prefix):]
        if key in STORE_KEYS:
            store[key] = value
        elif key in PLUGIN_KEYS:
            plugin[key] = value
        elif key in CONNECTOR_ONLY_KEYS:
            raise ConfigError(
                f"extra_config[{full!r}]: {key} is a kvpark vLLM-connector key with no effect on the "
                f"LMCache plugin ({CONNECTOR_ONLY_KEYS[key]}); remove it",
                "kvpark.lmcache",
            )
        else:
            raise ConfigError(
                f"extra_config[{full!r}]: unknown kvpark key {key!r} (known: "
                f"{', '.join(STORE_KEYS + PLUGIN_KEYS)})",
                "kvpark.lmcache",
            )
    if "chunk_bytes" in plugin:
        v = plugin["chunk_bytes"]
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ConfigError(
                f"extra_config[{prefix + 'chunk_bytes'!r}]: expected a positive number of bytes, got {v!r}",
                "kvpark.lmcache",
            )
    return store, plugin


def model_identity(metadata: Any) -> str:
    """kvpark's model identity for LMCache's metadata: the model and KV geometry."""
    if metadata is None:
        return ""
    return json.dumps(
        {
            "engine": "lmcache",
            "model": str(getattr(metadata, "model_name", "")),
            "kv_dtype": str(getattr(metadata, "kv_dtype", "")),
            "kv_shape": [int(x) for x in getattr(metadata, "kv_shape", ())],
            "use_mla": bool(getattr(metadata, "use_mla", False)),
            "world_size": int(getattr(metadata, "world_size", 1)),
        },
        sort_keys=True,
    )


def _dtype_name(d: torch.dtype) -> str:
    return str(d).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    d = getattr(torch, name, None)
    if not isinstance(d, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return d


class KvparkBackend(StoragePluginInterface):
    """LMCache storage plugin over kvpark's host arena and NVMe store (module docs)."""

    def __init__(
        self,
        dst_device: str = "cpu",
        config: Any = None,
        metadata: Any = None,
        local_cpu_backend: Any = None,
        loop: Optional[asyncio.AbstractEventLoop] = None,
    ):
        super().__init__(
            dst_device=dst_device,
            config=config,
            metadata=metadata,
            local_cpu_backend=local_cpu_backend,
            loop=loop,
        )
        if config is None or metadata is None:
            raise ConfigError("the kvpark LMCache plugin needs LMCache's config and metadata", "kvpark.lmcache")
        if local_cpu_backend is None:
            raise ConfigError(
                "the kvpark LMCache plugin runs in LMCache's worker role with its local CPU backend "
                "(local_cpu: true, max_local_cpu_size > 0): it allocates the chunks it returns there",
                "kvpark.lmcache",
            )
        self.name = plugin_name(config, type(self).__module__, type(self).__name__)
        store_cfg, opts = parse_plugin_config(config.extra_config, self.name)
        store_cfg.setdefault("model_identity", model_identity(metadata))
        self.chunk_bytes = int(opts.get("chunk_bytes") or self._full_chunk_bytes())
        self.rank = int(getattr(metadata, "worker_id", 0))
        elem = int(getattr(getattr(metadata, "kv_dtype", None), "itemsize", 2) or 2)
        try:
            self.store = ChunkStore(store_cfg, self.rank, self.chunk_bytes, elem)
        except ConfigError as e:
            raise ConfigError(
                f"LMCache extra_config storage_plugin.{self.name}.*: {e.message}", "kvpark.lmcache"
            ) from None
        self.put_errors = 0
        self._lock = threading.Lock()
        log.info(
            "kvpark LMCache plugin %r: rank %d, chunks up to %d bytes, %s",
            self.name,
            self.rank,
            self.chunk_bytes,
            json.dumps(store_cfg, default=str),
        )

    def __str__(self) -> str:
        return "KvparkBackend"

    def _full_chunk_bytes(self) -> int:
        sizes = []
        f = getattr(self.local_cpu_backend, "get_full_chunk_size_bytes", None)
        if callable(f):
            sizes.append(int(f()))
        try:
            shapes = self.metadata.get_shapes()
            dtypes = self.metadata.get_dtypes()
            sizes.append(sum(s.numel() * d.itemsize for s, d in zip(shapes, dtypes)))
        except Exception:  # metadata without a geometry
            pass
        if not sizes or max(sizes) <= 0:
            raise ConfigError(
                f"cannot tell LMCache's chunk size in bytes: set extra_config "
                f"storage_plugin.{self.name}.chunk_bytes",
                "kvpark.lmcache",
            )
        return max(sizes)

    # ---- keys and chunks -------------------------------------------------------------

    @staticmethod
    def _key(key: CacheEngineKey) -> bytes:
        return key.to_string().encode()

    @staticmethod
    def _meta(key: CacheEngineKey, obj: MemoryObj) -> bytes:
        m = obj.meta
        shapes = m.shapes if m.shapes is not None else [obj.get_shape()]
        dtypes = m.dtypes if m.dtypes is not None else [obj.get_dtype()]
        return json.dumps(
            {
                "k": key.to_string(),
                "shapes": [list(s) for s in shapes],
                "dtypes": [_dtype_name(d) for d in dtypes],
                "fmt": m.fmt.name,
            },
            separators=(",", ":"),
        ).encode()

    def _put_one(self, key: CacheEngineKey, obj: MemoryObj) -> bool:
        raw = obj.raw_tensor
        if raw is None:
            raise ValueError("memory object is invalid")
        if raw.device.type != "cpu":
            raw = raw.to("cpu")
        n = obj.get_size()
        return self.store.put(self._key(key), self._meta(key, obj), raw.data_ptr(), n)

    def _get_one(self, key: CacheEngineKey) -> Optional[MemoryObj]:
        k = self._key(key)
        try:
            found = self.store.lookup(k)
            if found is None:
                return None
            meta_b, data_len = found
            meta = json.loads(meta_b)
            if meta.get("k") != key.to_string():
                log.warning("kvpark: chunk metadata names another key than %s; treated as a miss", key.to_string())
                return None
            shapes = [torch.Size(s) for s in meta["shapes"]]
            dtypes = [_dtype(d) for d in meta["dtypes"]]
            fmt = MemoryFormat[meta["fmt"]]
        except CorruptError as e:
            log.warning("kvpark: %s: %s (a miss)", key.to_string(), e.message)
            return None
        except (ValueError, KeyError, TypeError) as e:
            log.warning("kvpark: %s: unreadable chunk metadata (%s); a miss", key.to_string(), e)
            return None
        if len(shapes) == 1:
            obj = self.local_cpu_backend.allocate(shapes[0], dtypes[0], fmt)
        else:
            obj = self.local_cpu_backend.allocate(shapes, dtypes, fmt)
        if obj is None:
            log.warning("kvpark: no LMCache CPU memory for %s; a miss", key.to_string())
            return None
        ok = False
        try:
            raw = obj.raw_tensor
            if raw is None or raw.device.type != "cpu" or obj.get_size() != data_len:
                log.warning(
                    "kvpark: %s: allocated %s bytes for a chunk of %d; a miss",
                    key.to_string(),
                    None if raw is None else obj.get_size(),
                    data_len,
                )
                return None
            n = self.store.get_into(k, raw.data_ptr(), data_len)
            ok = n == data_len
            return obj if ok else None
        except CorruptError as e:
            log.warning("kvpark: %s: %s (a miss)", key.to_string(), e.message)
            return None
        finally:
            if not ok:
                obj.ref_count_down()

    # ---- StorageBackendInterface -----------------------------------------------------

    def contains(self, key: CacheEngineKey, pin: bool = False) -> bool:
        return self.store.contains(self._key(key), pin)

    def exists_in_put_tasks(self, key: CacheEngineKey) -> bool:
        # A put copies the chunk into host memory before it returns.
        return False

    def batched_submit_put_task(
        self,
        keys: Sequence[CacheEngineKey],
        objs: List[MemoryObj],
        transfer_spec: Any = None,
        on_complete_callback: Optional[Callable[[CacheEngineKey], None]] = None,
    ) -> None:
        """Copies the chunks into kvpark's host arena before returning (NVMe writes follow
        on kvpark's I/O threads); returns None, as a synchronous backend does."""
        for key, obj in zip(keys, objs):
            try:
                self._put_one(key, obj)
            except KvparkError as e:
                with self._lock:
                    self.put_errors += 1
                log.warning("kvpark: not stored: %s: %s", key.to_string(), e)
                continue
            if on_complete_callback is not None:
                try:
                    on_complete_callback(key)
                except Exception as e:  # LMCache's contract: callback errors are logged
                    log.warning("kvpark: on_complete_callback(%s) failed: %s", key.to_string(), e)
        return None

    async def async_batched_submit_put_task(
        self,
        keys: Sequence[CacheEngineKey],
        objs: List[MemoryObj],
        transfer_spec: Any = None,
        on_complete_callback: Optional[Callable[[CacheEngineKey], None]] = None,
    ) -> None:
        await asyncio.to_thread(self.batched_submit_put_task, keys, objs, transfer_spec, on_complete_callback)

    def get_blocking(self, key: CacheEngineKey) -> Optional[MemoryObj]:
        return self._get_one(key)

    def get_non_blocking(self, key: CacheEngineKey, location: Optional[str] = None) -> Optional[Future]:
        if not self.contains(key):
            return None
        if self.loop is None or not self.loop.is_running():
            f: Future = Future()
            f.set_result(self._get_one(key))
            return f
        return asyncio.run_coroutine_threadsafe(asyncio.to_thread(self._get_one, key), self.loop)

    def batched_get_blocking(self, keys: List[CacheEngineKey]) -> List[Optional[MemoryObj]]:
        return [self._get_one(k) for k in keys]

    async def batched_async_contains(self, lookup_id: str, keys: List[CacheEngineKey], pin: bool = False) -> int:
        """The hit prefix; with `pin`, host copies are pinned and chunks only on NVMe start
        coming back into host memory (prefetch) for the retrieve that follows."""
        hits = 0
        for k in keys:
            if not self.contains(k, pin):
                break
            hits += 1
        return hits

    async def batched_get_non_blocking(
        self, lookup_id: str, keys: list[CacheEngineKey], transfer_spec: Any = None
    ) -> list[MemoryObj]:
        """The chunks of the hit prefix (stops at the first miss)."""

        def prefix() -> list[MemoryObj]:
            out: list[MemoryObj] = []
            for k in keys:
                obj = self._get_one(k)
                if obj is None:
                    break
                out.append(obj)
            return out

        return await asyncio.to_thread(prefix)

    def pin(self, key: CacheEngineKey) -> bool:
        try:
            self.store.pin(self._key(key))
            return True
        except KvparkError:
            return False

    def unpin(self, key: CacheEngineKey) -> bool:
        try:
            self.store.unpin(self._key(key))
            return True
        except KvparkError:
            return False

    def remove(self, key: CacheEngineKey, force: bool = True) -> bool:
        try:
            return self.store.remove(self._key(key))
        except KvparkError as e:
            log.info("kvpark: remove %s: %s", key.to_string(), e)
            return False

    def get_allocator_backend(self) -> Any:
        return self.local_cpu_backend

    def touch_cache(self) -> None:
        # kvpark keeps its own LRU order (every contains/get is an access).
        return None

    def close(self) -> None:
        store = getattr(self, "store", None)
        if store is not None:
            store.close()

    # ---- kvpark extras ---------------------------------------------------------------

    def flush(self, timeout_s: float = 60.0) -> None:
        """Waits until the NVMe writes in flight are done."""
        self.store.flush(timeout_s)

    def metrics(self) -> dict[str, Any]:
        """kvpark's counters (`store`), index states, host occupancy and NVMe stats."""
        m = self.store.metrics()
        m["plugin"] = {"name": self.name, "put_errors": self.put_errors, "chunk_bytes": self.chunk_bytes}
        return m
