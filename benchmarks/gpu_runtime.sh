#!/bin/sh
# Device check for the Holmes runtime on one CUDA GPU. Not part of CI: run it on a GPU machine,
# e.g. `benchmarks/gpu_runtime.sh /tmp/gpu-runtime`, and record its output in docs/benchmarks.md.
#   1. versions: torch, CUDA, NCCL, the GPU;
#   2. world size 1 on NCCL with the model on CUDA, through the same plan, pipeline and checkpoint
#      code, against the same plan on gloo/CPU: the loss curves must agree within 1e-3 (fp32);
#   3. the pipeline's CUDA tensor path: P2P.exchange (batch_isend_irecv) sending to itself on
#      NCCL, with device receive buffers (NCCL allows send/recv to self inside one group call).
set -eu
OUT=${1:-gpu-runtime}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
$PY - <<'PY'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "nccl", ".".join(map(str, torch.cuda.nccl.version())),
      "gpu", torch.cuda.get_device_name(0))
import torch.distributed as dist
cfg = getattr(dist.ProcessGroupNCCL.Options(), "config", None)
print("ProcessGroupNCCL.Options().config.net_name bound:", cfg is not None and hasattr(cfg, "net_name"))
PY
cat > "$OUT/one-gpu.yaml" <<'YAML'
name: one-gpu
gpu: {name: gpu, peak_tflops: 100, memory_gib: 40}
clusters:
  - {name: local, nodes: 1, gpus_per_node: 1, nic: {kind: ethernet, gbps: 10}}
YAML
$PY -m wallbreak.cli plan "$OUT/one-gpu.yaml" --layers 4 --hidden 128 --heads 4 --seq-len 64 --vocab 256 \
  --global-batch 8 --micro-batch 2 --dtype fp32 --emit-launch "$OUT/launch" > /dev/null
for BACKEND in nccl gloo; do
  $PY -m torch.distributed.run --standalone --nproc-per-node 1 -m wallbreak.holmes.runtime.train \
    --plan "$OUT/launch/plan.json" --steps 5 --backend $BACKEND --log-file "$OUT/$BACKEND.jsonl" \
    --checkpoint-dir "$OUT/ckpt-$BACKEND" 2> "$OUT/$BACKEND.err" || { tail -20 "$OUT/$BACKEND.err"; exit 1; }
done
$PY - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
loss = {b: [json.loads(l)["loss"] for l in open(f"{out}/{b}.jsonl")] for b in ("nccl", "gloo")}
diff = max(abs(a - b) for a, b in zip(loss["nccl"], loss["gloo"]))
print("losses nccl/cuda:", [round(x, 5) for x in loss["nccl"]])
print("losses gloo/cpu: ", [round(x, 5) for x in loss["gloo"]])
print(f"max |difference| {diff:.2e}:", "PASS" if diff < 1e-3 else "FAIL")
sys.exit(0 if diff < 1e-3 else 1)
PY
cat > "$OUT/p2p_self.py" <<'PY'
import torch, torch.distributed as dist
from wallbreak.holmes.runtime.pipeline import P2P
dist.init_process_group("nccl")
dev = torch.device("cuda:0")
p2p = P2P(0, 0, None, dev, torch.float32)
x = torch.arange(12, dtype=torch.float32, device=dev).view(3, 4)
try:
    got = p2p.exchange([(x, 0)], [((3, 4), 0)])[0]
    ok = got is not None and got.device == dev and torch.equal(got, x)
    print("P2P.exchange to self on NCCL, device buffers:", "PASS" if ok else f"FAIL {got}")
except Exception as e:  # NCCL builds differ in self-send support: report it, do not hide it
    print("P2P.exchange to self on NCCL: not allowed here:", type(e).__name__, e)
dist.destroy_process_group()
PY
$PY -m torch.distributed.run --standalone --nproc-per-node 1 "$OUT/p2p_self.py"
