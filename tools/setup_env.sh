#!/usr/bin/env bash
# Create or update .venv with the pinned mmsecvit stack. Idempotent: a second run that finds everything in place
# only checks, and the mmcv wheel (about 15 minutes to build on 2 cores) is built once and reused from the cache.
#
# Environment:
#   MMSECVIT_VENV   where the virtual environment lives (default: <repo>/.venv)
#   MMSECVIT_CACHE  where built wheels are kept (default: ~/.cache/mmsecvit)
#   PYTHON          interpreter used to create the venv (default: python3.11)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${MMSECVIT_VENV:-$ROOT/.venv}
CACHE=${MMSECVIT_CACHE:-$HOME/.cache/mmsecvit}
PYTHON=${PYTHON:-python3.11}
MMCV_VERSION=2.1.0
TORCH_VERSION=2.13.0
WHEELS=$CACHE/wheels/torch-$TORCH_VERSION
STAMP=$VENV/.mmsecvit-setup

say() { printf '[setup] %s\n' "$*"; }

fingerprint() {
    cat "$ROOT"/requirements/*.txt "$ROOT/tools/setup_env.sh" "$ROOT/setup.py" "$ROOT/pyproject.toml" \
        "$ROOT"/mmsecvit/ops/csrc/* | sha256sum | cut -c1-16
}

is_current() {
    [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(fingerprint)" ] &&
        "$VENV/bin/python" -c 'import mmcv.ops, mmdet, mmseg, timm, mmsecvit' 2>/dev/null
}

if is_current; then
    say "environment in $VENV is up to date"
    exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV with $PYTHON"
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check)

say "build tools and torch $TORCH_VERSION"
"${PIP[@]}" -q -r "$ROOT/requirements/build.txt"
"${PIP[@]}" -q -r "$ROOT/requirements/torch.txt"

mmcv_wheel() { ls "$WHEELS"/mmcv-$MMCV_VERSION-*.whl 2>/dev/null | head -n 1; }
if [ -z "$(mmcv_wheel)" ]; then
    say "building mmcv $MMCV_VERSION with ops against torch $TORCH_VERSION (once; about 15 minutes on 2 cores)"
    mkdir -p "$WHEELS"
    MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} "$VENV/bin/python" -m pip wheel -q --no-deps \
        --no-build-isolation --no-binary mmcv "mmcv==$MMCV_VERSION" -w "$WHEELS"
fi
say "using $(mmcv_wheel)"

say "runtime and test requirements"
"${PIP[@]}" -q "$(mmcv_wheel)" -r "$ROOT/requirements/runtime.txt" -r "$ROOT/requirements/tests.txt"

say "mmsecvit (editable)"
"${PIP[@]}" -q --no-deps --no-build-isolation -e "$ROOT"

fingerprint > "$STAMP"
is_current || { say "setup finished but the stack does not import"; exit 1; }
say "environment in $VENV is ready"
