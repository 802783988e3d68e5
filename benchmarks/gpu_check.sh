#!/usr/bin/env bash
# The GPU check of issue 18, in one script of under 10 minutes. Run it on a machine with CUDA:
#
#     bash benchmarks/gpu_check.sh [OUT_DIR]        (default OUT_DIR: $OUT, else /tmp/moemerge-gpu-check)
#
# 1. the CUDA tests (pytest -k cuda: solver on the GPU against the CPU float64 dense solve, stage 1 on cuda);
# 2. the HARC operator's fraction of the GPU matmul rate at the OLMoE (E 64) and Qwen3-30B-A3B (E 128)
#    router shapes, d 2048 (benchmarks/harc_operator.py);
# 3. the router solve at OLMoE width on the GPU, auto against Jacobi side by side (benchmarks/harc_cg.py);
# 4. one real-width OLMoE layer calibrated end to end on cuda and on the cpu, routers compared
#    (benchmarks/gpu_layer.py);
# 5. a 2-rank NCCL calibration (torchrun) of that layer against the single-process cuda one (needs 2 GPUs;
#    skipped with a message on one).
# Without CUDA it says so and exits 0 (nothing to check). Each step has its own time limit; a step that
# fails is reported and the others still run; the exit status is the number of failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-/tmp/moemerge-gpu-check}}
PYTHON=${PYTHON:-python}
mkdir -p "$OUT_DIR"
failed=0

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to OUT_DIR/NAME.log and the terminal
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit} s): $*"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$OUT_DIR/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - start)) s"
    if [ "$rc" -ne 0 ]; then failed=$((failed + 1)); fi
}

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "SKIP: torch $("$PYTHON" -c 'import torch; print(torch.__version__)') sees no CUDA device; nothing to check here"
    exit 0
fi
gpus=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count())"

step cuda_tests 120 "$PYTHON" -m pytest -q -x -k cuda tests/test_harc_solver.py tests/test_merge_driver.py
step operator_e64 45 "$PYTHON" benchmarks/harc_operator.py --device cuda --tokens 131072 --E 64 \
    --batch-sizes 16384,65536 --repeats 10
step operator_e128 45 "$PYTHON" benchmarks/harc_operator.py --device cuda --tokens 131072 --E 128 \
    --batch-sizes 16384,65536 --repeats 10
step router_solve 90 "$PYTHON" benchmarks/harc_cg.py --device cuda --tokens 32768 \
    --preconditioners auto,diagonal,kronecker --repeats 2
step layer_end_to_end 150 "$PYTHON" benchmarks/gpu_layer.py "$OUT_DIR/layer" --devices cuda,cpu

layer=$OUT_DIR/layer
if [ "$gpus" -lt 2 ]; then
    echo "== nccl_2_ranks: SKIP, NCCL needs one GPU per rank and this machine has $gpus"
elif [ ! -f "$layer/calibrated-cuda/moemerge_calibration.json" ]; then
    echo "== nccl_2_ranks: SKIP, the single-process cuda run of step layer_end_to_end is missing"
    failed=$((failed + 1))
else
    args=(calibrate --merged "$layer/stage1" -o "$OUT_DIR/nccl" --overwrite --device cuda
        --max-samples 16 --max-length 256)
    for domain in code prose math; do
        args+=(--source "$layer/$domain" --data "$layer/$domain=examples/specialists/data/$domain.jsonl")
    done
    step nccl_2_ranks 90 "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node 2 -m moemerge "${args[@]}"
    step nccl_equals_single 30 "$PYTHON" - "$layer/calibrated-cuda" "$OUT_DIR/nccl" <<'EOF'
import sys

import torch

from moemerge.checkpoint.reader import CheckpointReader

single, ranks = (CheckpointReader(p) for p in sys.argv[1:3])
worst = 0.0
for name in single.names():
    if name.endswith("mlp.gate.weight"):
        a, b = single.read(name).double(), ranks.read(name).double()
        worst = max(worst, float((a - b).norm() / a.norm()))
print(f"2 NCCL ranks against one process: largest relative router difference {worst:.2e} (float32 solves, tol 1e-6)")
sys.exit(0 if worst <= 1e-5 else 1)
EOF
fi
echo "== gpu check done: $failed step(s) failed; logs in $OUT_DIR"
exit "$failed"
