#!/usr/bin/env bash
# The CUDA checks for the lent GPU machine: run from the repo root with jsonschema wheels in .whl/.
set -x
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/tests HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name())"
timeout 120 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/unit/test_tiers_gpu.py tests/unit/test_tiers.py -k "gpu or bit_exact or coalesce or logits" 2>&1 | tail -5
timeout 200 python3 -m wallbreak.cli bundle synth --out /tmp/b --experts 2 --params 135M --seed 0 2>/dev/null
for th in 4 8 16; do timeout 150 python3 -m wallbreak.cli bench switch --bundle /tmp/b --device cuda --cache both --repeats 3 --reader-threads $th --json 2>${OUT:-/tmp}/bench.err > ${OUT:-/tmp}/gpu_switch_$th.json; done
cat ${OUT:-/tmp}/gpu_switch_*.json; tail -3 ${OUT:-/tmp}/bench.err
