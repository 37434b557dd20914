"""Build step: copy libkvpark.so into the package (kvpark/lib/libkvpark.so).

Source of the library, first found: $KVPARK_LIB_SRC, ../target/release/libkvpark.so (the
crate's `cargo build --release` output). With KVPARK_CARGO_BUILD=1 the crate is built first.
Without a library the package still installs; it then needs $KVPARK_LIB at run time.
"""

import os
import shutil
import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
CRATE = HERE.parent


def _find_lib() -> Path | None:
    src = os.environ.get("KVPARK_LIB_SRC")
    if src:
        return Path(src)
    if os.environ.get("KVPARK_CARGO_BUILD") == "1":
        subprocess.run(["cargo", "build", "--release", "--lib"], cwd=CRATE, check=True)
    cand = CRATE / "target" / "release" / "libkvpark.so"
    return cand if cand.is_file() else None


class BuildPyWithLib(build_py):
    def run(self):
        lib = _find_lib()
        if lib is not None:
            dst = HERE / "kvpark" / "lib"
            dst.mkdir(exist_ok=True)
            target = dst / "libkvpark.so"
            if not (target.exists() and target.resolve() == lib.resolve()):
                shutil.copy2(lib, target)
            self.announce(f"kvpark: bundled {lib}", level=2)
        else:
            self.announce("kvpark: no libkvpark.so found; set KVPARK_LIB at run time", level=3)
        super().run()


setup(cmdclass={"build_py": BuildPyWithLib})
