#!/bin/sh
# Prints the export line that points kvpark at NVRTC: KVPARK_NVRTC_LIB (the newest
# wheel's library, what the engine compiles with) and KVPARK_NVRTC_LIBS (every one,
# what tests/cuda_ptx.rs compiles with).
#
#   python3 -m venv .nvrtc && .nvrtc/bin/pip install nvidia-cuda-nvrtc-cu12
#   eval "$(scripts/nvrtc_env.sh .nvrtc/bin/python)"
#   cargo test --test cuda_ptx
#
# Argument: the Python whose site-packages hold NVRTC's wheel
# (nvidia-cuda-nvrtc-cu12: nvidia/cuda_nvrtc/lib; CUDA 13's nvidia-cuda-nvrtc: nvidia/cu13/lib)
# (default: python3). Exits 1 with a message on stderr when it is not there.
set -eu
PY="${1:-python3}"
# every NVRTC wheel's library, oldest CUDA first; the newest is the default
LIBS=$("$PY" -c 'import nvidia, os, glob
c = [p for d in nvidia.__path__ for p in glob.glob(os.path.join(d, "*", "lib", "libnvrtc.so*"))
     if "builtins" not in p and ".alt." not in p]
c.sort(key=lambda p: [int(x) for x in p.rsplit(".so.", 1)[-1].split(".") if x.isdigit()])
assert c
print(":".join(c))' 2>/dev/null) || {
    echo "nvrtc_env.sh: $PY has no nvidia-cuda-nvrtc-cu12; run: $PY -m pip install nvidia-cuda-nvrtc-cu12" >&2
    exit 1
}
echo "export KVPARK_NVRTC_LIBS=$LIBS KVPARK_NVRTC_LIB=${LIBS##*:}"
