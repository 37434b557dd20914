"""kvpark under LMCache's cache engine (`LMCacheEngine.store` / `retrieve`) on the CPU.

LMCache's GPU connectors move KV with its CUDA kernels (`lmcache.cuda_ops`), which need a
GPU. Here the engine gets `HostConnector`, an implementation of LMCache's own
`GPUConnectorInterface` over a KV tensor in host memory; everything else is LMCache's:
token chunking and hashing (the `CacheEngineKey`s), the storage manager, its CPU cache and
its plugin loader.
"""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import CHUNK_TOKENS, KV_DTYPE, KV_SHAPE, metadata, write_config
from lmcache.v1.cache_engine import LMCacheEngineBuilder
from lmcache.v1.config import LMCacheEngineConfig
from lmcache.v1.gpu_connector.gpu_connectors import GPUConnectorInterface

from kvpark.lmcache import KvparkBackend

TOKENS = 4 * CHUNK_TOKENS + 6  # four full chunks and a short one


class HostConnector(GPUConnectorInterface):
    """LMCache's connector interface over a host tensor [K/V, layers, tokens, hidden]."""

    def get_shape(self, num_tokens: int) -> torch.Size:
        layers, kv, _, heads, head_size = KV_SHAPE
        return torch.Size([kv, layers, num_tokens, heads * head_size])

    def from_gpu(self, memory_obj, start: int, end: int, **kwargs) -> None:
        memory_obj.tensor.copy_(kwargs["kv"][:, :, start:end])

    def to_gpu(self, memory_obj, start: int, end: int, **kwargs) -> None:
        kwargs["kv"][:, :, start:end].copy_(memory_obj.tensor)

    def batched_from_gpu(self, memory_objs, starts, ends, **kwargs) -> None:
        for o, s, e in zip(memory_objs, starts, ends):
            self.from_gpu(o, s, e, **kwargs)

    def batched_to_gpu(self, memory_objs, starts, ends, **kwargs) -> None:
        for o, s, e in zip(memory_objs, starts, ends):
            self.to_gpu(o, s, e, **kwargs)


class Engine:
    """An LMCacheEngine built by LMCache's builder from a config file."""

    n = 0

    def __init__(self, config_file: Path):
        Engine.n += 1
        self.id = f"kvpark-test-{Engine.n}"
        cfg = LMCacheEngineConfig.from_file(str(config_file))
        self.engine = LMCacheEngineBuilder.get_or_create(
            self.id, cfg, metadata(), HostConnector(), lambda *a: None, lambda *a: None
        )
        self.engine.post_init()
        self.sm = self.engine.storage_manager
        self.plugin = self.sm.storage_backends["kvpark"]
        assert isinstance(self.plugin, KvparkBackend)

    def close(self) -> None:
        LMCacheEngineBuilder.destroy(self.id)


def kv_of(seed: int) -> torch.Tensor:
    layers, kv, _, heads, head_size = KV_SHAPE
    g = torch.Generator().manual_seed(seed)
    return torch.randn(kv, layers, TOKENS, heads * head_size, generator=g).to(KV_DTYPE)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def test_engine_store_restart_retrieve(tmp_path: Path, nvme_dir: Path) -> None:
    cfg = write_config(tmp_path / "lmcache.yaml", nvme_dir, codec="lz4")
    tokens = torch.arange(1000, 1000 + TOKENS)
    kv = kv_of(7)
    e = Engine(cfg)
    try:
        e.engine.store(tokens, kv=kv)
        e.plugin.flush()
        c = e.plugin.metrics()["store"]
        assert (c["puts"], c["nvme_writes"]) == (5, 5)
        # LMCache's own CPU cache dropped: the retrieve is served by kvpark
        e.sm.storage_backends["LocalCPUBackend"].clear()
        out = torch.zeros_like(kv)
        got = e.engine.retrieve(tokens, kv=out)
        assert int(got.sum()) == TOKENS and same_bytes(out, kv)
        assert e.plugin.metrics()["store"]["gets"] == 5
    finally:
        e.close()

    e = Engine(cfg)  # restart: chunks come back from NVMe
    try:
        assert e.plugin.metrics()["store"]["recovered"] == 5
        out = torch.zeros_like(kv)
        got = e.engine.retrieve(tokens, kv=out)
        assert int(got.sum()) == TOKENS and same_bytes(out, kv)
        c = e.plugin.metrics()["store"]
        assert (c["gets"], c["nvme_reads"], c["corrupt"]) == (5, 5, 0)
        # other tokens: nothing to retrieve
        out2 = torch.zeros_like(kv)
        assert int(e.engine.retrieve(torch.arange(TOKENS), kv=out2).sum()) == 0
        assert not out2.any()
    finally:
        e.close()


def test_engine_retrieve_stops_at_a_corrupt_chunk(tmp_path: Path, nvme_dir: Path) -> None:
    cfg = write_config(tmp_path / "lmcache.yaml", nvme_dir, io_threads=1)
    tokens = torch.arange(5000, 5000 + TOKENS)
    kv = kv_of(11)
    e = Engine(cfg)
    try:
        e.engine.store(tokens, kv=kv)
        e.plugin.flush()
    finally:
        e.close()
    # One I/O thread writes the chunks in order: the third record holds chunk 2.
    seg = sorted((nvme_dir / "rank0").glob("seg-*.kvp"))[0]
    data = bytearray(seg.read_bytes())
    starts = [i for i in range(0, len(data), 4096) if data[i : i + 4] == b"KVPR"]  # record headers
    assert len(starts) >= 5, "one record per chunk"
    pos = starts[2] + 4096 + 64
    with open(seg, "r+b") as f:
        f.seek(pos)
        f.write(bytes([data[pos] ^ 0xFF]))

    e = Engine(cfg)
    try:
        out = torch.zeros_like(kv)
        got = e.engine.retrieve(tokens, kv=out)
        n = int(got.sum())
        assert n == 2 * CHUNK_TOKENS, f"the prefix before the corrupt chunk, got {n} tokens"
        assert same_bytes(out[:, :, :n], kv[:, :, :n])
        assert not out[:, :, n:].any(), "nothing of the corrupt chunk or after it is written"
        c = e.plugin.metrics()["store"]
        assert c["corrupt"] == 1
    finally:
        e.close()
