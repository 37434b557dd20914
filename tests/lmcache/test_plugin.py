"""kvpark as an LMCache storage plugin, against the real `lmcache` package (CPU path).

Every test builds LMCache's own `StorageManager` from a config file, so the plugin is
loaded by LMCache's loader (`storage_plugins` + `extra_config`), and stores and retrieves
chunks through LMCache's interfaces. To make LMCache read a chunk from kvpark rather than
from its own CPU cache, a test drops the chunk from LMCache's `LocalCPUBackend` (or starts
a new storage manager: a restart).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from conftest import CHUNK_TOKENS, KV_DTYPE, MODEL, metadata, storage_manager, write_config
from lmcache.utils import CacheEngineKey
from lmcache.v1.config import LMCacheEngineConfig
from lmcache.v1.memory_management import MemoryFormat

from kvpark.errors import ConfigError
from kvpark.lmcache import KvparkBackend


def key(i: int) -> CacheEngineKey:
    return CacheEngineKey(MODEL, 1, 0, 0xC0FFEE00 + i, KV_DTYPE)


def make_chunks(sm, n: int, short_last: bool = True, seed: int = 1234):
    """n chunks allocated by LMCache and filled with distinct values; the last one shorter
    (LMCache's unfull last chunk) when short_last."""
    keys, objs, want = [], [], []
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        tokens = CHUNK_TOKENS // 2 + 3 if (short_last and i == n - 1) else CHUNK_TOKENS
        shape = metadata().get_shapes(tokens)[0]
        obj = sm.allocate(shape, KV_DTYPE, fmt=MemoryFormat.KV_2LTD)
        assert obj is not None
        obj.tensor.copy_(torch.randn(shape, generator=g).to(KV_DTYPE))
        keys.append(key(i))
        objs.append(obj)
        want.append(obj.tensor.clone())
    return keys, objs, want


def store(sm, keys, objs) -> None:
    sm.batched_put(keys, objs)  # LMCache's put path: LocalCPUBackend and every plugin
    plugin(sm).flush()


def plugin(sm) -> KvparkBackend:
    b = sm.storage_backends.get("kvpark")
    assert isinstance(b, KvparkBackend), f"kvpark not loaded: {list(sm.storage_backends)}"
    return b


def drop_from_lmcache_cpu(sm, keys) -> None:
    for k in keys:
        assert sm.remove(k, locations=["LocalCPUBackend"]) == 1
        assert sm.contains(k, search_range=["LocalCPUBackend"]) is None


def assert_chunk(obj, want: torch.Tensor) -> None:
    assert obj is not None, "a stored chunk came back as a miss"
    got = obj.tensor
    assert got.shape == want.shape and got.dtype == want.dtype
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), "bytes differ"


def counters(sm) -> dict:
    return plugin(sm).metrics()["store"]


def test_lmcache_loader_loads_the_plugin_from_a_config_file(tmp_path: Path, nvme_dir: Path) -> None:
    sm = storage_manager(write_config(tmp_path / "lmcache.yaml", nvme_dir, codec="lz4"))
    try:
        assert list(sm.storage_backends) == ["LocalCPUBackend", "kvpark"]
        p = plugin(sm)
        assert p.get_allocator_backend() is sm.storage_backends["LocalCPUBackend"]
        m = p.metrics()
        assert m["write_through"] is True and m["nvme"]["codec"] == "lz4"
        assert p.chunk_bytes == 2 * 4 * CHUNK_TOKENS * 2 * 64 * 2  # K+V, layers, tokens, heads·dim, bf16
        assert (nvme_dir / "rank0").is_dir()
        assert '"model": "kvpark-test/tiny-model"' in (nvme_dir / "rank0" / "model").read_text()
    finally:
        sm.close()


def test_round_trip_through_the_storage_manager(tmp_path: Path, nvme_dir: Path) -> None:
    sm = storage_manager(write_config(tmp_path / "lmcache.yaml", nvme_dir))
    try:
        keys, objs, want = make_chunks(sm, 6)
        store(sm, keys, objs)
        c = counters(sm)
        assert (c["puts"], c["nvme_writes"]) == (6, 6)
        drop_from_lmcache_cpu(sm, keys)
        for k in keys:
            assert sm.contains(k) == "kvpark"
        for k, w in zip(keys[:3], want[:3]):
            assert_chunk(sm.get(k), w)  # LMCache's blocking get
        # (StorageManager.batched_get returns the first backend's list, LocalCPUBackend's
        # all-None one, unless a location is named)
        got = sm.batched_get(keys[3:], location="kvpark")
        for obj, w in zip(got, want[3:]):
            assert_chunk(obj, w)
        c = counters(sm)
        assert (c["gets"], c["misses"], c["corrupt"]) == (6, 0, 0)
        # a key never stored is a miss everywhere
        assert sm.contains(key(99)) is None
        assert sm.get(key(99)) is None
        assert plugin(sm).get_blocking(key(99)) is None
        # remove through LMCache
        assert sm.remove(keys[0]) >= 1
        assert not plugin(sm).contains(keys[0])
    finally:
        sm.close()


def test_restart_brings_chunks_back_from_nvme(tmp_path: Path, nvme_dir: Path) -> None:
    cfg = write_config(tmp_path / "lmcache.yaml", nvme_dir, codec="lz4-planes")
    sm = storage_manager(cfg)
    keys, objs, want = make_chunks(sm, 8)
    store(sm, keys, objs)
    sm.close()  # closes the plugin: queued NVMe writes finish

    sm = storage_manager(cfg)  # a restarted engine: LMCache's CPU cache is empty
    try:
        c = counters(sm)
        assert c["recovered"] == 8
        assert all(sm.contains(k) == "kvpark" for k in keys)
        for k, w in zip(keys, want):
            assert_chunk(sm.get(k), w)
        c = counters(sm)
        assert (c["gets"], c["nvme_reads"], c["corrupt"]) == (8, 8, 0)
    finally:
        sm.close()


def test_lookup_prefetches_from_nvme_for_the_retrieve(tmp_path: Path, nvme_dir: Path) -> None:
    cfg = write_config(tmp_path / "lmcache.yaml", nvme_dir)
    sm = storage_manager(cfg)
    keys, objs, want = make_chunks(sm, 5, short_last=False)
    store(sm, keys, objs)
    sm.close()
    sm = storage_manager(cfg)
    try:
        p = plugin(sm)

        def on_loop(coro):
            return asyncio.run_coroutine_threadsafe(coro, sm.loop).result(timeout=60)

        # LMCache's async lookup (pin) then retrieve, on LMCache's event loop
        assert on_loop(p.batched_async_contains("req-1", keys + [key(99)], pin=True)) == 5
        p.flush()
        c = counters(sm)
        assert c["prefetches"] == 5
        got = on_loop(p.batched_get_non_blocking("req-1", keys + [key(99)]))
        assert len(got) == 5
        for obj, w in zip(got, want):
            assert_chunk(obj, w)
        c = counters(sm)
        assert (c["gets"], c["nvme_reads"]) == (5, 0), "served from the prefetched host copies"
        sm.batched_unpin(keys)
        for obj in got:
            obj.ref_count_down()
    finally:
        sm.close()


def test_a_corrupt_nvme_record_is_a_miss_never_wrong_bytes(tmp_path: Path, nvme_dir: Path) -> None:
    cfg = write_config(tmp_path / "lmcache.yaml", nvme_dir, io_threads=1)
    sm = storage_manager(cfg)
    keys, objs, want = make_chunks(sm, 4, short_last=False)
    store(sm, keys, objs)
    sm.close()

    # Flip one payload byte of the first record of the first segment.
    seg = sorted((nvme_dir / "rank0").glob("seg-*.kvp"))[0]
    with open(seg, "r+b") as f:
        f.seek(4096 + 100)
        b = f.read(1)
        f.seek(4096 + 100)
        f.write(bytes([b[0] ^ 0xFF]))

    sm = storage_manager(cfg)
    try:
        results = [sm.get(k) for k in keys]
        misses = [i for i, o in enumerate(results) if o is None]
        assert len(misses) == 1, f"exactly the corrupted chunk misses, got misses at {misses}"
        for i, (obj, w) in enumerate(zip(results, want)):
            if i not in misses:
                assert_chunk(obj, w)
        bad = keys[misses[0]]
        assert sm.contains(bad) is None, "a corrupt chunk is gone, not served later"
        assert sm.get(bad) is None
        c = counters(sm)
        assert (c["corrupt"], c["gets"]) == (1, 3)
        assert plugin(sm).metrics()["nvme"]["read_corrupt"] == 1
    finally:
        sm.close()


def test_host_arena_full_spills_to_nvme_and_short_chunks_keep_their_length(tmp_path: Path, nvme_dir: Path) -> None:
    # 640 KiB of 32 KiB + 4 KiB slots: 17 chunks fit in host memory.
    sm = storage_manager(write_config(tmp_path / "lmcache.yaml", nvme_dir, host_bytes="640KiB"))
    try:
        keys, objs, want = [], [], []
        for start in range(0, 30, 10):
            k, o, w = make_chunks(sm, 10, seed=start)
            k = [key(start + i) for i in range(10)]
            store(sm, k, o)
            keys += k
            want += w
        c = counters(sm)
        assert c["puts"] == 30 and c["host_evictions_to_nvme"] >= 13
        drop_from_lmcache_cpu(sm, keys)
        for k, w in zip(keys, want):
            assert_chunk(sm.get(k), w)
        assert counters(sm)["nvme_reads"] >= 13
    finally:
        sm.close()


def test_config_errors_name_the_extra_config_key(tmp_path: Path, nvme_dir: Path) -> None:
    def backend(**kv):
        cfg = LMCacheEngineConfig.from_file(str(write_config(tmp_path / "bad.yaml", nvme_dir, **kv)))
        return KvparkBackend(dst_device="cpu", config=cfg, metadata=metadata(), local_cpu_backend=object())

    with pytest.raises(ConfigError, match=r"storage_plugin\.kvpark\.hostbytes.*unknown kvpark key"):
        backend(hostbytes="1GiB")
    with pytest.raises(ConfigError, match=r"storage_plugin\.kvpark\.layerwise_load.*no effect"):
        backend(layerwise_load=True)
    with pytest.raises(ConfigError, match=r"storage_plugin\.kvpark\..*host_bytes"):
        backend(host_bytes="lots")
    with pytest.raises(ConfigError, match=r"storage_plugin\.kvpark\..*codec"):
        backend(codec="zip")
    with pytest.raises(ConfigError, match=r"chunk_bytes"):
        backend(chunk_bytes=-1)

    # Through LMCache's loader: the plugin is not created (LMCache logs the error).
    sm = storage_manager(write_config(tmp_path / "bad.yaml", nvme_dir, codec="zip"))
    try:
        assert "kvpark" not in sm.storage_backends
    finally:
        sm.close()
