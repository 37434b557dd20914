"""Shared fixtures of the vLLM suite: test cache dir, tiny model, vLLM's connector test
utilities (from the vLLM source distribution, unpacked by scripts/e2e_setup.sh), libkvpark.

Everything the suite needs is prepared by scripts/e2e_setup.sh; a missing piece is a test
error naming the setup step, never a skip.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("KVPARK_TEST_CACHE", Path.home() / ".cache" / "kvpark-tests"))
VLLM_SDIST = CACHE / f"vllm-{os.environ.get('VLLM_VERSION', '0.32.0')}"

sys.path.insert(0, str(HERE))


def _lib_env() -> None:
    """Points KVPARK_LIB at the crate's build output unless the package bundles one."""
    if os.environ.get("KVPARK_LIB"):
        return
    import kvpark

    if kvpark.library_path().is_file():
        return
    built = ROOT / "target" / "release" / "libkvpark.so"
    if built.is_file():
        os.environ["KVPARK_LIB"] = str(built)


_lib_env()


@pytest.fixture(scope="session")
def tiny_model() -> str:
    import tiny_model as tm

    return str(tm.build(CACHE / "tiny-llama"))


@pytest.fixture(scope="session")
def vllm_unit_utils():
    """vLLM's tests/v1/kv_connector/unit/utils.py, imported by path."""
    path = VLLM_SDIST / "tests" / "v1" / "kv_connector" / "unit" / "utils.py"
    if not path.is_file():
        raise RuntimeError(f"{path} missing: run scripts/e2e_setup.sh")
    spec = importlib.util.spec_from_file_location("kvpark_vllm_unit_utils", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def libkvpark():
    import kvpark

    return kvpark.load_library()
