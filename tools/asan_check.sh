#!/usr/bin/env bash
# Build the kernels with AddressSanitizer in a scratch copy of the repository and run the op tests (every
# kernel build) under it. Run by `make asan`; needs the environment of `make setup`.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
git -C "$ROOT" ls-files -z | (cd "$ROOT" && xargs -0 cp --parents -t "$SCRATCH")
cd "$SCRATCH"
echo "[asan] building the kernels with -fsanitize=address in $SCRATCH"
MMSECVIT_SANITIZE=address "$PYTHON" setup.py -q build_ext --inplace >/dev/null
# libstdc++ preloaded too, so that ASan finds the real __cxa_throw for the kernels' error exceptions.
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)"
# PyTorch itself is not instrumented: leaks and its own allocator's patterns are not ours to report.
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1
PYTHONPATH="$SCRATCH" "$PYTHON" -c "
import sys, mmsecvit.ops.dispatch as dispatch
built = [dispatch._modules[isa].__file__ for isa in dispatch.available_isas()]
print('[asan] kernels:', *built)
sys.exit(0 if built and all(path.startswith('$SCRATCH') for path in built) else 'not the instrumented build')"
PYTHONPATH="$SCRATCH" "$PYTHON" -m pytest -q -p no:cacheprovider tests/ops tests/integration/test_reliability.py
