#!/usr/bin/env bash
# The GPU check, for a machine with CUDA (about 10 minutes on one GPU):
#   1. the device tests on CUDA: outputs and gradients against the official reference network on the CPU,
#      the ranking under fp16/bf16 autocast, fp16/bf16 models, an fp16 training step;
#   2. a few Mask R-CNN training iterations of the demo config, with --amp and without;
#   3. SecViT-S against Swin-T, forward and forward+backward at 800x1344, batch 2, float32 and bf16 autocast.
#
#   bash tools/gpu_check.sh            # on a CUDA machine; results under work_dirs/gpu_check/
#   bash tools/gpu_check.sh --cpu      # the same steps on the CPU, small (CI runs this to keep it working)
#
# Run it in a set-up environment (make setup); PYTHON overrides the interpreter (default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT=work_dirs/gpu_check

if [[ "${1:-}" == "--cpu" ]]; then
    DEVICE=cpu ITERS=2 SIZE=128x128 BATCH=1 REPEATS=1
elif [[ $# -eq 0 ]]; then
    DEVICE=cuda ITERS=20 SIZE=800x1344 BATCH=2 REPEATS=10
    "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: use --cpu')"
else
    echo "usage: bash tools/gpu_check.sh [--cpu]" >&2
    exit 2
fi
mkdir -p "$OUT"
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'device', \
    torch.cuda.get_device_name() if torch.cuda.is_available() and '$DEVICE' == 'cuda' else 'cpu')"

echo "== 1. device tests ($DEVICE)"
"$PYTHON" -m pytest -q -p no:cacheprovider tests/integration/test_device.py --device "$DEVICE"

echo "== 2. Mask R-CNN demo config, $ITERS iterations"
"$PYTHON" demo/make_dataset.py coco --out data/coco_demo
PRECISIONS=(fp32)
[[ "$DEVICE" == cuda ]] && PRECISIONS+=(amp)  # mmengine's AmpOptimWrapper runs on CUDA only
for precision in "${PRECISIONS[@]}"; do
    work_dir="$OUT/maskrcnn_$precision"
    rm -rf "$work_dir"
    "$PYTHON" tools/train.py configs/detection/maskrcnn_secvit_demo.py --work-dir "$work_dir" \
        $([[ "$precision" == amp ]] && echo --amp) \
        --cfg-options train_cfg.max_epochs=1 "train_dataloader.dataset.indices=$((ITERS * 8))" \
        default_hooks.logger.interval=1 train_cfg.val_begin=2 \
        > "$work_dir.log" 2>&1 || { tail -30 "$work_dir.log"; exit 1; }
    "$PYTHON" - "$work_dir" "$precision" <<'EOF'
import glob, json, math, sys
work_dir, precision = sys.argv[1:]
records = [json.loads(line) for path in glob.glob(f'{work_dir}/*/vis_data/scalars.json') for line in open(path)]
losses = [r['loss'] for r in records if 'loss' in r]
if not losses or not all(math.isfinite(v) for v in losses):
    sys.exit(f'{precision}: no finite losses logged in {work_dir}: {losses}')
print(f'{precision}: {len(losses)} iterations, loss {losses[0]:.3f} -> {losses[-1]:.3f}')
EOF
done

echo "== 3. SecViT-S vs Swin-T at $SIZE, batch $BATCH"
for dtype in float32 bfloat16; do
    "$PYTHON" tools/analysis_tools/benchmark.py --device "$DEVICE" --models secvit_s swin_t --sizes "$SIZE" \
        --batch "$BATCH" --dtype "$dtype" --repeats "$REPEATS" --json "$OUT/benchmark_$dtype.json"
done
