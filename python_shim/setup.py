"""Build of the kvpark Python package: compiles libkvpark with Cargo and ships it in the wheel.

`pip install ./python_shim` runs `cargo rustc --lib --release --crate-type cdylib` on the
crate one directory up (setuptools-rust, `Binding.NoBinding`: the library is a plain C-ABI
cdylib that `kvpark._ffi` opens with ctypes, not a Python extension module) and puts it in
the wheel as `kvpark/lib/libkvpark.abi3.so` (one wheel for every CPython >= 3.10: the
library does not link against Python). setuptools-rust rather than maturin: maturin's
layouts are a PyO3/cffi/uniffi module or an executable; a ctypes-loaded cdylib beside
pure-Python code is setuptools-rust's NoBinding case, and the package keeps its
setuptools metadata.

Nothing is written into the source tree: Cargo builds in its own target directory
($CARGO_TARGET_DIR, else the crate's git-ignored target/), setuptools' build/ and
egg-info go to a temporary directory. An editable install (`pip install -e python_shim`)
builds the library the same way but copies it nowhere: `kvpark._ffi` loads the crate's
target/release/libkvpark.so from a source checkout, so a later `cargo build --release` is
picked up without reinstalling.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

from setuptools import setup
from setuptools_rust import Binding, RustExtension, Strip
from setuptools_rust.build import build_rust

HERE = Path(__file__).resolve().parent
CRATE = HERE.parent

_scratch = tempfile.mkdtemp(prefix="kvpark-build-")
atexit.register(shutil.rmtree, _scratch, ignore_errors=True)


class BuildRustOutOfTree(build_rust):
    """build_rust that, for an editable install (inplace), leaves the library in Cargo's
    target directory instead of copying it into the source tree."""

    def install_extension(self, ext, dylib_paths, build_artifact_dir):
        if self.inplace:
            for _, path in dylib_paths:
                self.announce(f"kvpark: editable install loads {path}", level=2)
            return
        super().install_extension(ext, dylib_paths, build_artifact_dir)


setup(
    rust_extensions=[
        RustExtension(
            "kvpark.lib.libkvpark",
            path=str(CRATE / "Cargo.toml"),
            binding=Binding.NoBinding,
            py_limited_api=True,
            debug=False,
            strip=Strip.Debug,
            # the crate's own crate types: the same Cargo unit as `cargo build --release
            # --lib`, so neither build redoes the other's work
            args=["--crate-type", "cdylib,rlib"],
            # no Cargo features: the library vLLM loads is the connector only (the
            # simulator, benchmarks and CLI are feature `cli`, the GPU test exports
            # feature `gpu-bench`)
            features=[],
        )
    ],
    cmdclass={"build_rust": BuildRustOutOfTree},
    options={
        "build": {"build_base": str(Path(_scratch) / "build")},
        "egg_info": {"egg_base": _scratch},
        "bdist_wheel": {"py_limited_api": "cp310"},
    },
    zip_safe=False,
)
