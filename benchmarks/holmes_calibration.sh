#!/bin/sh
# Calibrate the Holmes cost model on one emulated cluster and check it on another it never saw.
#   1. wallbreak bench holmes on emu-small at two global batches (compute and traffic scale differently)
#   2. wallbreak plan --calibrate on those eight runs -> calibration.json
#   3. wallbreak bench holmes on emu-three, planned and predicted with that calibration
# Needs root (network namespaces). Usage: sudo benchmarks/holmes_calibration.sh [OUT_DIR] [STEPS]
# The model: MODEL=small (default: a 4-layer Llama, hidden 256, 8 heads, 2 key/value heads, seq 128),
# tiny, or any `--model SRC` (a folder or .gguf, e.g. SmolLM2-135M) with SEQ=... for its sequence.
set -e
OUT=${1:-holmes-calibration}
STEPS=${2:-30}
WB=${WALLBREAK:-wallbreak}
mkdir -p "$OUT"
MODEL=${MODEL:-small}
SHAPE="--model $MODEL --micro-batch 2${SEQ:+ --seq-len $SEQ}"
for GB in 8 16; do
  $WB bench holmes examples/clusters/emu-small.yaml $SHAPE --global-batch $GB --steps "$STEPS" \
    --json --plot "$OUT/small-gb$GB.png" > "$OUT/small-gb$GB.json"
done
$WB plan examples/clusters/emu-small.yaml --model llama-small --seq-len 128 --global-batch 8 --dtype fp32 \
  --calibrate "$OUT/small-gb8.json" "$OUT/small-gb16.json" --save-calibration "$OUT/calibration.json" > /dev/null
$WB bench holmes examples/clusters/emu-three.yaml $SHAPE --global-batch 8 --steps "$STEPS" \
  --calibration "$OUT/calibration.json" --json --plot "$OUT/three-calibrated.png" > "$OUT/three-calibrated.json"
$WB emulate down
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
for name in ("small-gb8", "small-gb16", "three-calibrated"):
    d = json.load(open(f"{out}/{name}.json"))
    for k, v in d["placements"].items():
        print(f"{name:17} {k:13} measured {v['measured']['iteration_s']:.4f} s  predicted "
              f"{v['predicted']['iteration_s']:.4f} s  error {v['error_pct']:+.1f}%"
              f"{'  (calibrated)' if v['predicted'].get('calibrated') else ''}")
    print(f"{name:17} holmes vs megatron, measured: {d['speedup_holmes_vs_megatron']:.2f}x")
PY
