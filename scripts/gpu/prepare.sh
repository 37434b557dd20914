#!/bin/sh
# Builds what a GPU session carries (the GPU machine has no Rust toolchain):
#   .gpu/libkvpark.so   the library (needs the kvpark_cuda_* C exports for
#                       check_and_bench.py)
#   .gpu/cuda_engine    the tests/cuda_engine.rs binary (its #[ignore]d GPU tests)
# then prints the one command to run on the device (carry: [".gpu"]).
set -eu
cd "$(dirname "$0")/../.."
cargo build --release --lib
BIN=$(cargo test --release --test cuda_engine --no-run --message-format=json 2>/dev/null \
      | sed -n 's/.*"executable":"\([^"]*cuda_engine[^"]*\)".*/\1/p' | tail -1)
mkdir -p .gpu
cp target/release/libkvpark.so .gpu/libkvpark.so
cp "$BIN" .gpu/cuda_engine
ls -la .gpu
cat <<'CMD'
# device command (one call):
set -o pipefail; eval "$(scripts/nvrtc_env.sh python3)"; nvidia-smi --query-gpu=name,driver_version --format=csv; .gpu/cuda_engine --ignored --test-threads=1 --nocapture 2>&1 | tee $OUT/gpu_tests.log; PYTHONUNBUFFERED=1 python3 scripts/gpu/check_and_bench.py .gpu/libkvpark.so 2>&1 | tee $OUT/bench.log
CMD
