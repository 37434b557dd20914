#!/usr/bin/env bash
# The whole kvpark test suite: lint, Rust unit + integration tests (NVMe
# faults, model-based index tests, header check, PTX compile), the C ABI smoke
# test under valgrind, the vLLM connector inside a real vLLM engine, and the
# LMCache storage plugin under the real lmcache package.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"

# NVRTC from the pip wheels, for the PTX compile test (no GPU needed): every
# one installed (CUDA 12's and CUDA 13's) is checked; the newest is the default.
nvrtc=$(scripts/nvrtc_env.sh .venv/bin/python)  # fails the script when NVRTC is missing
eval "$nvrtc"

step() { printf '\n=== %s\n' "$*"; }

step "format, lint, docs"
cargo fmt --all -- --check
# every feature combination the crate is built in: the library vLLM loads
# (default, no features) and everything (the `cli` simulator, benchmarks and
# binary; the `gpu-bench` exports)
cargo clippy --all-targets -- -D warnings
cargo clippy --all-targets --all-features -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps -q
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps -q --all-features

step "real KV corpus"
# post-RoPE K/V of SmolLM2-135M over real text (scripts/kv_corpus.py, ~1-2 min
# on two cores); the codec ratio test asserts >= 1.40x on its bf16 records
export KVPARK_KV_CORPUS="$PWD/target/kv-corpus"
bash scripts/kv_corpus.sh "$KVPARK_KV_CORPUS"
export KVPARK_REQUIRE_CORPUS=1

step "rust tests"
# --all-features: the simulator's and the benchmarks' tests (required-features
# in Cargo.toml) run too; the lib's own unit tests build without features as
# well (clippy above), which is what vLLM loads.
cargo test --all-features --lib --bins --tests 2>&1 | tee target/rust-tests.log
cargo test --all-features --doc -q

step "fuzz targets under valgrind"
# tests/fuzz.rs: every parser of outside bytes, a few cases each, with the
# memory checks of valgrind (lz4_flex is built without its safe-decode
# feature; the NVMe store reads records into aligned buffers).
fuzz_bin=$(cargo test --all-features --no-run --test fuzz 2>&1 | sed -n 's/.*Executable tests\/fuzz.rs (\(.*\))$/\1/p')
test -x "$fuzz_bin" || { echo "fuzz test binary not found"; exit 1; }
KVPARK_FUZZ_CASES=100 timeout 900 valgrind --quiet --error-exitcode=99 "$fuzz_bin" --test-threads=2 -q

step "C ABI smoke test under valgrind"
# the library vLLM loads: no features (the connector only)
cargo build --release --lib -q
cc -std=c11 -Wall -Wextra -Werror -Iinclude tests/c/abi_smoke.c -Ltarget/release -lkvpark \
   -Wl,-rpath,"$PWD/target/release" -o target/abi_smoke
valgrind --quiet --error-exitcode=99 --leak-check=full --errors-for-leak-kinds=definite \
   target/abi_smoke

step "vLLM connector (real vLLM engine, CPU backend)"
# scripts/e2e_setup.sh (run by setup.sh) installed python_shim in editable mode: it loads
# target/release/libkvpark.so, which the C ABI step above rebuilt from these sources.
.venv/bin/python -m pytest tests/vllm -q -p no:cacheprovider 2>&1 | tee target/vllm-tests.log

step "LMCache storage plugin (real lmcache from PyPI, CPU)"
# scripts/lmcache_setup.sh (run by setup.sh) made .venv-lmcache; the tests load
# kvpark from python_shim/ and libkvpark from target/release.
KVPARK_LIB="$PWD/target/release/libkvpark.so" .venv-lmcache/bin/python -m pytest tests/lmcache \
  -q -p no:cacheprovider 2>&1 | tee target/lmcache-tests.log

step "summary"
rust=$(grep -E '^test result:' target/rust-tests.log | awk '{p+=$4; f+=$6; i+=$8} END {print p, f, i}')
py=$(grep -Eo '[0-9]+ passed' target/vllm-tests.log | tail -1 | grep -Eo '[0-9]+')
lmc=$(grep -Eo '[0-9]+ passed' target/lmcache-tests.log | tail -1 | grep -Eo '[0-9]+')
read -r rp rf ri <<<"$rust"
echo "rust ${rp} passed, ${rf} failed, ${ri} skipped (GPU tests without a device); C ABI smoke passed; vLLM ${py:-0} passed; LMCache ${lmc:-0} passed"
echo "kvpark: $((rp + ${py:-0} + ${lmc:-0} + 1)) passed, ${rf} failed, ${ri} skipped"
