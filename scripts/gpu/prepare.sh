#!/bin/sh
# Builds what a GPU session carries (the GPU machine has no Rust toolchain):
#   .gpu/libkvpark.so   the library with the kvpark_cuda_* C exports that
#                       check_and_bench.py drives (Cargo feature gpu-bench;
#                       the library vLLM loads does not carry them)
#   .gpu/cuda_engine    the tests/cuda_engine.rs binary (its #[ignore]d GPU tests)
# then prints the one command to run on the device (carry: [".gpu"]).
set -eu
cd "$(dirname "$0")/../.."
cargo build --release --lib --features gpu-bench
BIN=$(cargo test --release --test cuda_engine --no-run --message-format=json 2>/dev/null \
      | sed -n 's/.*"executable":"\([^"]*cuda_engine[^"]*\)".*/\1/p' | tail -1)
mkdir -p .gpu
# without debug info (the release profile keeps it): what a device call carries
# is limited to 64 MiB, and the two files are ~35 MiB each with it, ~2 MiB without
strip --strip-debug -o .gpu/libkvpark.so target/release/libkvpark.so
strip --strip-debug -o .gpu/cuda_engine "$BIN"
ls -la .gpu
total=$(du -cb .gpu/* | tail -1 | cut -f1)
if [ "$total" -gt $((48 << 20)) ]; then
  echo "prepare: .gpu holds $total bytes; a device call carries at most 64 MiB with the tree" >&2
  exit 1
fi
cat <<'CMD'
# device command (one call):
set -o pipefail; eval "$(scripts/nvrtc_env.sh python3)"; nvidia-smi --query-gpu=name,driver_version --format=csv; .gpu/cuda_engine --ignored --test-threads=1 --nocapture 2>&1 | tee $OUT/gpu_tests.log; PYTHONUNBUFFERED=1 python3 scripts/gpu/check_and_bench.py .gpu/libkvpark.so 2>&1 | tee $OUT/bench.log
CMD
