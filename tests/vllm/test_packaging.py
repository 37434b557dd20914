"""`pip install ./python_shim` builds libkvpark itself and writes nothing into the source
tree; an editable install loads the crate's target/release/libkvpark.so.

The wheel is built with this environment's setuptools-rust (no build isolation, no
network) from the same Cargo unit `cargo build --release --lib` builds, so it reuses that
build.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import kvpark

ROOT = Path(__file__).resolve().parents[2]


def _tree_state() -> str:
    """Every file git sees under python_shim/, ignored ones included."""
    return subprocess.run(
        ["git", "status", "--porcelain", "--ignored", "--untracked-files=all", "python_shim"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout


def test_wheel_carries_the_library_and_the_tree_stays_clean(tmp_path):
    before = _tree_state()
    env = {k: v for k, v in os.environ.items() if k != "KVPARK_LIB"}
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path), str(ROOT / "python_shim")],
        env=env, capture_output=True, text=True, timeout=1200,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    wheels = list(tmp_path.glob("kvpark-*.whl"))
    assert len(wheels) == 1, wheels
    names = zipfile.ZipFile(wheels[0]).namelist()
    assert "kvpark/lib/libkvpark.abi3.so" in names, names
    assert "kvpark/vllm.py" in names and "kvpark/metrics.py" in names
    assert wheels[0].name.endswith("-cp310-abi3-linux_x86_64.whl"), wheels[0].name
    assert _tree_state() == before, "the build wrote into python_shim/"
    # the wheel's library is the real one: it loads and speaks this package's ABI
    extracted = tmp_path / "x"
    zipfile.ZipFile(wheels[0]).extractall(extracted)
    lib = kvpark.load_library(extracted / "kvpark" / "lib" / "libkvpark.abi3.so")
    assert lib.kvpark_abi_version() == kvpark.ABI_VERSION


def test_a_source_checkout_loads_cargo_output(monkeypatch):
    """What an editable install does: no library copied into the package; the crate's
    target/release/libkvpark.so (or $CARGO_TARGET_DIR's) is loaded, so a rebuild is
    picked up without reinstalling."""
    monkeypatch.delenv("KVPARK_LIB", raising=False)
    assert Path(kvpark.__file__).resolve().parent == ROOT / "python_shim" / "kvpark", (
        "run scripts/e2e_setup.sh: the suite needs the editable install of this checkout"
    )
    target = Path(os.environ.get("CARGO_TARGET_DIR") or ROOT / "target")
    assert kvpark.library_path() == target / "release" / "libkvpark.so"
    assert not (ROOT / "python_shim" / "kvpark" / "lib").exists()
