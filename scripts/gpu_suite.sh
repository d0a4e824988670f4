#!/usr/bin/env bash
# One call on a GPU machine: install carried wheels, run the GPU tests, run the benchmarks.
# Results (logs, JSON) go to $OUT (default ./gpu_results). Used with the device tool:
#   bash scripts/gpu_suite.sh tests|bench-100M|bench-1B|fsdp2
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./gpu_results}
mkdir -p "$OUT"
MODE=${1:-tests}
if ls wheels/*.whl >/dev/null 2>&1; then
    python3 -m pip install --no-deps --no-index -q wheels/*.whl 2>&1 | tail -2
fi
export PYTHONPATH=$PWD TORCHINDUCTOR_CACHE_DIR=/tmp/inductor PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, torchao; print('torch', torch.__version__, 'torchao', torchao.__version__)" | tee -a "$OUT/gpu.txt"

case "$MODE" in
tests)
    python3 -m pytest -m gpu tests/gpu -q -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt" ;;
bench-*)
    # bf16 (compile + selective AC) and float8 of one flavor of both families, 50 steps each
    FLAVOR=${MODE#bench-}
    python3 scripts/benchmark.py --cases hydra:$FLAVOR llama:$FLAVOR --steps 40 --warmup 10 \
        --ac selective --float8 none tensorwise --json "$OUT/bench_$FLAVOR.json" 2>&1 \
        | grep -v Warning | tail -30 | tee "$OUT/bench_$FLAVOR.txt" ;;
fsdp2)
    torchrun --nproc_per_node=2 scripts/benchmark.py --cases hydra:1B --steps 40 --warmup 10 \
        --ac selective --json "$OUT/bench_fsdp2.json" 2>&1 | grep -v Warning | tail -30 | tee "$OUT/bench_fsdp2.txt"
    python3 scripts/benchmark.py --cases hydra:1B --steps 40 --warmup 10 --ac selective \
        --json "$OUT/bench_1gpu_same_host.json" 2>&1 | grep -v Warning | tail -12 | tee "$OUT/bench_1gpu.txt" ;;
*) echo "usage: $0 tests|bench-<flavor>|fsdp2" >&2; exit 2 ;;
esac
