"""Fixtures for the LMCache storage-plugin tests (real `lmcache` from PyPI, CPU path).

Prerequisites (a missing one is an error, never a skip):
- `lmcache` 0.5.x importable: `bash scripts/lmcache_setup.sh` makes `.venv-lmcache`;
- libkvpark built: `cargo build --release` (or `KVPARK_LIB=/path/to/libkvpark.so`).
`kvpark` itself is imported from `python_shim/` (put on sys.path here).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "python_shim"))

try:
    import torch  # noqa: F401
    import lmcache  # noqa: F401
except ImportError as e:  # a missing prerequisite is an error naming the setup step
    raise RuntimeError(
        f"the LMCache plugin tests need the lmcache package ({e}): run `bash scripts/lmcache_setup.sh` "
        f"and use .venv-lmcache/bin/python"
    ) from e
if not str(getattr(lmcache, "__version__", "")).startswith("0.5."):
    raise RuntimeError(
        f"the LMCache plugin tests target lmcache 0.5.x, found {lmcache.__version__}: "
        f"run `bash scripts/lmcache_setup.sh`"
    )

os.environ.setdefault("KVPARK_LIB", str(ROOT / "target" / "release" / "libkvpark.so"))
if not Path(os.environ["KVPARK_LIB"]).is_file():
    raise RuntimeError(
        f"libkvpark not found at {os.environ['KVPARK_LIB']}: run `cargo build --release --lib` "
        f"(or set KVPARK_LIB)"
    )

import yaml  # noqa: E402  (lmcache depends on pyyaml)
from lmcache.v1.config import LMCacheEngineConfig  # noqa: E402
from lmcache.v1.event_manager import EventManager  # noqa: E402
from lmcache.v1.metadata import LMCacheMetadata  # noqa: E402
from lmcache.v1.storage_backend.storage_manager import StorageManager  # noqa: E402

#: Tokens per LMCache chunk in these tests.
CHUNK_TOKENS = 16
#: (layers, K and V, tokens, KV heads, head size) of the test model.
KV_SHAPE = (4, 2, CHUNK_TOKENS, 2, 64)
KV_DTYPE = torch.bfloat16
MODEL = "kvpark-test/tiny-model"


def metadata(worker_id: int = 0) -> LMCacheMetadata:
    return LMCacheMetadata(
        model_name=MODEL,
        world_size=1,
        local_world_size=1,
        worker_id=worker_id,
        local_worker_id=worker_id,
        kv_dtype=KV_DTYPE,
        kv_shape=KV_SHAPE,
        chunk_size=CHUNK_TOKENS,
    )


def write_config(path: Path, nvme_dir: Path | None, **kvpark: object) -> Path:
    """An LMCache config file loading kvpark through `storage_plugins`."""
    extra: dict[str, object] = {
        "storage_plugin.kvpark.module_path": "kvpark.lmcache",
        "storage_plugin.kvpark.class_name": "KvparkBackend",
        "storage_plugin.kvpark.host_bytes": "4MiB",
    }
    if nvme_dir is not None:
        extra.update(
            {
                "storage_plugin.kvpark.nvme_dir": str(nvme_dir),
                "storage_plugin.kvpark.nvme_bytes": "64MiB",
                "storage_plugin.kvpark.nvme_segment_bytes": "1MiB",
            }
        )
    for k, v in kvpark.items():
        extra[f"storage_plugin.kvpark.{k}"] = v
    cfg = {
        "chunk_size": CHUNK_TOKENS,
        "local_cpu": True,
        "max_local_cpu_size": 0.05,
        "save_unfull_chunk": True,
        "storage_plugins": ["kvpark"],
        "extra_config": extra,
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def storage_manager(config_file: Path) -> StorageManager:
    """LMCache's own storage manager built from a config file (its loader loads kvpark)."""
    cfg = LMCacheEngineConfig.from_file(str(config_file))
    return StorageManager(cfg, metadata(), EventManager())


@pytest.fixture
def nvme_dir(tmp_path: Path) -> Path:
    d = tmp_path / "nvme"
    d.mkdir()
    return d
