#!/bin/sh
# 1F1B against interleaved 1F1B (two chunks per rank) on emulated clusters, every placement each:
#   emu-small (IB + RoCE, 10 Gbit/s between) and emu-slow-link (the link between 20x slower than RoCE).
# Model: MODEL=small (default; a 4-layer Llama, hidden 256, GQA, seq 128) or any `--model SRC`.
# Needs root (network namespaces). Usage: sudo benchmarks/holmes_schedules.sh [OUT_DIR] [STEPS]
set -e
OUT=${1:-holmes-schedules}
STEPS=${2:-20}
WB=${WALLBREAK:-wallbreak}
MODEL=${MODEL:-small}
mkdir -p "$OUT"
for CLUSTER in emu-small emu-slow-link; do
  for SCHEDULE in 1f1b interleaved; do
    $WB bench holmes examples/clusters/$CLUSTER.yaml --model "$MODEL" --micro-batch 2 --global-batch 8 \
      --steps "$STEPS" --schedule $SCHEDULE --json > "$OUT/$CLUSTER-$SCHEDULE.json"
  done
done
$WB emulate down
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
for cluster in ("emu-small", "emu-slow-link"):
    for sched in ("1f1b", "interleaved"):
        d = json.load(open(f"{out}/{cluster}-{sched}.json"))
        for k, v in d["placements"].items():
            print(f"{cluster:14} {sched:12} {k:13} measured {v['measured']['iteration_s']:.4f} s  "
                  f"predicted {v['predicted']['iteration_s']:.4f} s  ({v['error_pct']:+.1f}%)")
        print(f"{cluster:14} {sched:12} holmes vs megatron {d['speedup_holmes_vs_megatron']:.2f}x, "
              f"holmes / all-RDMA speed {d['holmes_vs_all_rdma']:.2f}")
PY
