#!/usr/bin/env bash
# lm-evaluation-harness (`local-completions`) against `wallbreak serve`, with both of its tokenizer
# backends, on a local multiple-choice task (benchmarks/lmeval/capitals.jsonl, 30 items), over
# SmolLM2-135M-Instruct imported as float32; then benchmarks/lmeval_referee.py scores the same
# items with transformers' own forward and compares every log-likelihood and the accuracy.
#
#   LM_EVAL=/path/to/lm_eval benchmarks/lmeval_referee.sh      (lm-eval in a venv of its own:
#   python -m venv E && E/bin/pip install torch==2.13.0 && E/bin/pip install 'lm-eval[api]' transformers)
set -euo pipefail
cd "$(dirname "$0")/.."
LM_EVAL=${LM_EVAL:-lm_eval}
PY=${PY:-.venv/bin/python}
PORT=${PORT:-8012}
work=$(mktemp -d)
trap 'kill "$server" 2>/dev/null || true; rm -rf "$work"' EXIT
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
gguf=$("$PY" -c "from wallbreak.coe.bundle.importers import DEFAULT_EXPERTS as D; print(D[0].locate())")
.venv/bin/wallbreak bundle import "$gguf" --name smollm2-fp32 --out "$work/bundle" --dtype fp32 >&2
tokdir=$(ls -d "$work"/bundle/tokenizers/*)
cat > "$work/wb_capitals.yaml" <<YAML
task: wb_capitals
dataset_path: json
dataset_kwargs:
  data_files:
    test: $PWD/benchmarks/lmeval/capitals.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{question}}\nAnswer:"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
YAML
.venv/bin/wallbreak serve --bundle "$work/bundle" --compile off --port "$PORT" >"$work/serve.log" 2>&1 &
server=$!
for _ in $(seq 120); do curl -sf "localhost:$PORT/health" >/dev/null && break; sleep 1; done
url="http://127.0.0.1:$PORT/v1/completions"
for backend in huggingface remote; do
  extra=$([ "$backend" = huggingface ] && echo ",tokenizer=$tokdir" || true)
  "$LM_EVAL" --model local-completions \
    --model_args "base_url=$url,model=smollm2-fp32,tokenizer_backend=$backend$extra,tokenized_requests=True" \
    --batch_size 8 --tasks wb_capitals --include_path "$work" --output_path "$work/out-$backend" \
    --log_samples >"$work/lm-$backend.log" 2>&1
  echo "{\"tokenizer_backend\": \"$backend\", \"referee\":"
  "$PY" benchmarks/lmeval_referee.py --samples "$(ls "$work/out-$backend"/*/samples_*.jsonl)" \
    --model "$(dirname "$gguf")" --gguf "$(basename "$gguf")" --tokenizer "$tokdir" 2>/dev/null
  echo "}"
done
