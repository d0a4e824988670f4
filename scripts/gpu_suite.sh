#!/usr/bin/env bash
# One call on a GPU machine: install carried wheels, run the GPU tests, run the benchmarks.
# Results (logs, JSON) go to $OUT (default ./gpu_results). Used with the device tool:
#   bash scripts/gpu_suite.sh tests|graph|routing|decode-profile|tt-compare|bench-100M|bench-1B|fsdp2|profile|perf|batch-8|float8-8|float8-4B|ckpt|moe-<family>|ssd|hybrid|decode|waaagh|launch|scaling
# NGPU=<n> runs tt-compare and moe-<family> on n GPUs; launch, scaling and float8-4B use every GPU of the host
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

# scripts/benchmark.py on $NGPU GPUs of this host (default 1: a plain process; more: torchrun, FSDP over them)
NGPU=${NGPU:-1}
bench() {
    if [ "$NGPU" -gt 1 ]; then
        torchrun --nproc_per_node="$NGPU" --rdzv_backend c10d --rdzv_endpoint=localhost:0 scripts/benchmark.py "$@"
    else
        python3 scripts/benchmark.py "$@"
    fi
}

# the profile of both 1B steps (device categories, top kernels, host time); $1 = lines of each report kept
profile_1b() {
    for case in hydra:1B llama:1B; do
        python3 scripts/profile_step.py --case $case --json "$OUT/profile_${case/:/_}.json" 2>&1 \
            | grep -v -i warn | tail -"$1" | tee -a "$OUT/profile.txt"
    done
}

# both 1B models at local batch $1 (selective AC)
bench_1b_batch() {
    python3 scripts/benchmark.py --cases hydra:1B llama:1B --batch "$1" --steps 20 --warmup 8 \
        --json "$OUT/bench_1B_b$1.json" 2>&1 | grep "^| [hl]\|peak\|Error" | tee -a "$OUT/bench_batch.txt"
}

case "$MODE" in
ssd)
    # Triton SSD kernels: GPU tests against the PyTorch reference, then fwd+bwd timings (issue shapes,
    # and the 1B hybrid layer's 64 heads sharing one B/C group)
    python3 -m pytest -m gpu tests/gpu/test_ssd_cuda.py -q -p no:cacheprovider > "$OUT/ssd_tests.txt" 2>&1
    grep -E "passed|failed|Error|^FAILED|^ERROR|assert" "$OUT/ssd_tests.txt" | tail -30
    python3 scripts/ssd_benchmark.py --profile --json "$OUT/ssd.json" 2>&1 | grep -v -i warn | tee "$OUT/ssd.txt"
    python3 scripts/ssd_benchmark.py --shapes 4x2048x64x64x128 --groups 1 --json "$OUT/ssd_1B_layer.json" 2>&1 \
        | grep "^|" | tee -a "$OUT/ssd.txt" ;;
hybrid)
    # hybrid 1B (v1, v2, v3) beside llama 1B at SEQ (default 2048), local batch BATCH (default 4)
    SEQ=${SEQ:-2048}
    python3 scripts/benchmark.py --cases ${CASES:-hybrid:1B llama:1B hybrid:1B:variant=v2 hybrid:1B:variant=v3} \
        --seq-len "$SEQ" --batch "${BATCH:-4}" --steps "${STEPS:-15}" --warmup "${WARMUP:-6}" --ac selective \
        --json "$OUT/bench_hybrid_$SEQ.json" 2>&1 | grep "^| \|peak\|Error\|error" | tee -a "$OUT/bench_hybrid.txt" ;;
decode)
    # the captured decode step against the eager one (every family), then decode speed of both 1B models:
    # CUDA graph vs eager cache vs recompute (the eager modes over SLOW new tokens, default 64)
    python3 -m pytest -m gpu tests/gpu/test_decode_graph.py -q -p no:cacheprovider > "$OUT/decode_tests.txt" 2>&1
    grep -E "passed|failed|Error|^FAILED|^ERROR|assert" "$OUT/decode_tests.txt" | tail -30
    python3 scripts/decode_benchmark.py --cases ${CASES:-llama:1B hydra:1B} --batch 1 16 --slow-tokens "${SLOW:-64}" \
        --json "$OUT/decode.json" 2>&1 | grep -v -i warn | tee "$OUT/decode.txt" ;;
decode-profile)
    # where a token's time goes in the recorded (compiled) decode step: CASES at batch 1 and 16
    for case in ${CASES:-hydra:1B llama:1B}; do
        for b in ${BATCHES:-1 16}; do
            python3 scripts/profile_decode.py --case $case --batch $b --json "$OUT/decode_profile_${case/:/_}_b$b.json" \
                2>&1 | grep -v -i warn | tee -a "$OUT/decode_profile.txt"
        done
    done ;;
waaagh)
    # the seed's four demonstrations; the speed table at the 100M width beside llama
    python3 scripts/waaagh_demo.py --json "$OUT/waaagh_demo.json" 2>&1 | grep -v -i warn | tee "$OUT/waaagh_demo.txt" ;;
graph)
    # training.cuda_graph: replayed vs uncaptured steps (bitwise), then CASES at BATCH captured and not
    python3 -m pytest -m gpu tests/gpu/test_cuda_graph_step.py -q -p no:cacheprovider > "$OUT/graph_tests.txt" 2>&1
    grep -E "passed|failed|Error|^FAILED|^ERROR|assert" "$OUT/graph_tests.txt" | tail -30
    python3 scripts/benchmark.py --cases ${CASES:-hydra:100M llama:100M} --batch "${BATCH:-16}" --steps "${STEPS:-15}" \
        --warmup "${WARMUP:-6}" --cuda-graph off on --json "$OUT/bench_graph_b${BATCH:-16}.json" 2>&1 \
        | grep "^| \|Error\|error" | tee -a "$OUT/bench_graph.txt" ;;
routing)
    # the Triton top-k routing kernel: GPU tests against the torch path, the per-selection timing, then
    # CASES (default hydra 100M) at BATCH (default 16), captured, with the kernel and with torch's topk
    python3 -m pytest -m gpu tests/gpu/test_topk_route_cuda.py -q -p no:cacheprovider > "$OUT/routing_tests.txt" 2>&1
    grep -E "passed|failed|Error|^FAILED|^ERROR|assert" "$OUT/routing_tests.txt" | tail -30
    python3 scripts/routing_benchmark.py --json "$OUT/routing_kernel.json" 2>&1 | grep -v -i warn | tee "$OUT/routing.txt"
    F=${FLAVOR:-100M}
    python3 scripts/benchmark.py --cases hydra:$F:routing_kernel=torch hydra:$F llama:$F --batch "${BATCH:-16}" \
        --steps "${STEPS:-15}" --warmup "${WARMUP:-6}" --cuda-graph on --json "$OUT/bench_routing_$F.json" 2>&1 \
        | grep "^| \|Error\|error" | tee -a "$OUT/routing.txt" ;;
tt-compare)
    # torchtitan v0.2.2 (the anchor, carried as .anchor) beside our llama of its shape, bf16 sel / no AC / float8,
    # both on $NGPU GPUs
    bench --compare-torchtitan .anchor --cuda-graph ${GRAPH:-on} --steps "${STEPS:-20}" \
        --warmup "${WARMUP:-8}" --json "$OUT/tt_compare.json" 2>&1 | grep "^| \|^{\"torchtitan\|Error\|error" \
        | tee "$OUT/tt_compare_$NGPU.txt" ;;
tests)
    python3 -m pytest -m gpu tests/gpu -q -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt" ;;
bench-*)
    # bf16 (compile + selective AC) and float8 of one flavor of both families, 50 steps each
    FLAVOR=${MODE#bench-}
    python3 scripts/benchmark.py --cases hydra:$FLAVOR llama:$FLAVOR --steps 40 --warmup 10 \
        --ac selective --float8 none tensorwise --json "$OUT/bench_$FLAVOR.json" 2>&1 \
        | grep -v Warning | tail -30 | tee "$OUT/bench_$FLAVOR.txt" ;;
fsdp2)
    # hydra 1B: FSDP over 2 GPUs vs 1 GPU of the same host, local batch $BATCH (default 8)
    B=${BATCH:-8}
    torchrun --nproc_per_node=2 scripts/benchmark.py --cases hydra:1B --batch $B --steps 30 --warmup 8 \
        --ac selective --json "$OUT/bench_fsdp2.json" 2>&1 | grep "^| [hl]\|Error" | tee "$OUT/bench_fsdp2.txt"
    python3 scripts/benchmark.py --cases hydra:1B --batch $B --steps 30 --warmup 8 --ac selective \
        --json "$OUT/bench_1gpu_same_host.json" 2>&1 | grep "^| [hl]\|Error" | tee "$OUT/bench_1gpu.txt" ;;
float8-4B)
    # bf16 vs tensorwise float8 (weights all-gathered in float8) at the 4B flavor, FSDP over every GPU of the
    # host; CASES picks the models (default both; one model per call keeps a call under 10 minutes)
    NGPU=$(nvidia-smi -L | wc -l)
    bench --cases ${CASES:-llama:4B hydra:4B} --batch ${BATCH:-4} --steps 10 --warmup 5 --float8 none tensorwise \
        --fsdp-float8-all-gather --json "$OUT/bench_float8_4B.json" 2>&1 | grep "^| [hl]\|Error" \
        | tee -a "$OUT/bench_float8_4B.txt" ;;
float8-*)
    # bf16 vs float8 (RECIPES, default tensorwise and rowwise) for both 1B models at local batch N
    B=${MODE#float8-}
    python3 scripts/benchmark.py --cases llama:1B hydra:1B --batch $B --steps 20 --warmup 8 \
        --float8 ${RECIPES:-none tensorwise rowwise} --json "$OUT/bench_float8_b$B.json" 2>&1 \
        | grep "^| [hl]\|Error" | tee "$OUT/bench_float8.txt" ;;
profile)
    # where the time goes (per category), and what routing costs: same model without MoD / with dense recursions
    profile_1b 40
    python3 scripts/benchmark.py --cases hydra:1B --steps 20 --warmup 8 --json "$OUT/ablate_nomod.json" \
        -- --model.overrides.mod_every 0 2>&1 | grep "^| hydra" | sed 's/^/no MoD: /' | tee -a "$OUT/ablation.txt"
    python3 scripts/benchmark.py --cases hydra:1B --steps 20 --warmup 8 --json "$OUT/ablate_dense.json" \
        -- --model.overrides.mod_capacity 1.0 --model.overrides.mor_capacities '[1.0,1.0,1.0,1.0]' 2>&1 \
        | grep "^| hydra" | sed 's/^/all capacities 1: /' | tee -a "$OUT/ablation.txt" ;;
perf)
    # where the time goes in both 1B steps, with the top kernels, then tokens/s at batch 4
    profile_1b 75
    bench_1b_batch 4 ;;
batch-*)
    bench_1b_batch "${MODE#batch-}" ;;
moe-llama|moe-hydra)
    # the MoE GPU tests, then dense vs 8 experts top-1 on every other layer (same active parameters):
    # llama 1B (llama_moe_1B.toml) or hydra 500M (moe_500M.toml), local batch $BATCH (default 8), on $NGPU GPUs
    python3 -m pytest -m gpu tests/gpu/test_moe_cuda.py -q -p no:cacheprovider -W ignore::UserWarning 2>&1 \
        | grep -v "^  \|^$" | tail -25 | tee -a "$OUT/gpu_tests.txt"
    case "$MODE" in moe-llama) C=llama:1B ;; *) C=hydra:500M ;; esac
    bench --cases $C $C:moe_num_experts=8,moe_every=2 --batch ${BATCH:-8} --steps 20 \
        --warmup 8 --json "$OUT/bench_$MODE.json" 2>&1 | grep "^| [hl]\|^NVIDIA\|Error" | tee "$OUT/bench_$MODE.txt" ;;
launch)
    # the user's command on every GPU of the host: 1B.toml for STEPS (default 120) with a checkpoint at CKPT
    # (default 100), then a resume on half the GPUs (DCP resharding; local batch doubled, same global batch)
    # continuing to RESUME_STEPS (default 160); the loss lines of both
    N=$(nvidia-smi -L | wc -l); H=$(( N > 1 ? N / 2 : 1 )); B=${BATCH:-8}
    D=/tmp/hydra_launch_1B; rm -rf "$D"
    common=(--config train_configs/1B.toml --job.dump_folder "$D" --metrics.log_freq 10 --validation.enable false
            --checkpoint.interval "${CKPT:-100}" --checkpoint.async_mode disabled)
    torchrun --nproc_per_node="$N" train.py "${common[@]}" --training.steps "${STEPS:-120}" \
        --training.local_batch_size "$B" 2>&1 | grep -E "step +[0-9]|checkpoint|rror" | tee "$OUT/launch_$N.txt"
    ls "$D/checkpoint" | tee -a "$OUT/launch_$N.txt"
    torchrun --nproc_per_node="$H" train.py "${common[@]}" --training.steps "${RESUME_STEPS:-160}" \
        --training.local_batch_size $(( B * N / H )) 2>&1 | grep -E "step +[0-9]|resum|checkpoint|rror" \
        | tee "$OUT/launch_resume_$H.txt"
    cp "$D/metrics.jsonl" "$OUT/launch_metrics.jsonl" ;;
scaling)
    # FSDP over each GPU count of GPUS (default 1 2 4 8, those this host has), CASES (default llama 1B, hydra 1B)
    # at local batch BATCH (default 8): tokens/s per GPU and efficiency against 1 GPU (BASELINE: a carried
    # 1-GPU JSON, else this call's); HSDP 2 x N/2 beside FSDP N at the largest count
    have=$(nvidia-smi -L | wc -l); base=${BASELINE:-$OUT/scale_1.json}
    args=(--cases ${CASES:-llama:1B hydra:1B} --batch "${BATCH:-8}" --steps "${STEPS:-15}" --warmup "${WARMUP:-6}")
    for n in ${GPUS:-1 2 4 8}; do
        [ "$n" -le "$have" ] || continue
        b=(); [ "$n" -gt 1 ] && [ -f "$base" ] && b=(--baseline "$base")
        NGPU=$n bench "${args[@]}" "${b[@]}" --json "$OUT/scale_$n.json" 2>&1 | grep "^| [hl]\|Error" \
            | tee -a "$OUT/scaling.txt"
        last=$n
    done
    if [ "${last:-1}" -ge 4 ]; then
        b=(); [ -f "$base" ] && b=(--baseline "$base")
        NGPU=$last bench "${args[@]}" "${b[@]}" --json "$OUT/scale_hsdp_$last.json" -- --parallelism.dp_replicate 2 \
            2>&1 | grep "^| [hl]\|Error" | sed 's/^/HSDP: /' | tee -a "$OUT/scaling.txt"
    fi ;;
ckpt)
    # save (sync, then async) and resume the 1B flavor; quote save times and size
    D=/tmp/hydra_ckpt_1b
    rm -rf "$D"
    if [ "${CKPT_ASYNC_ONLY:-0}" = 1 ]; then skip_sync=1; else skip_sync=0; fi
    common=(--config train_configs/1B.toml --compile.enable false --validation.enable false --metrics.log_freq 1
            --checkpoint.enable true --checkpoint.interval 2 --checkpoint.keep_latest_k 0)
    if [ $skip_sync = 0 ]; then
    python3 train.py "${common[@]}" --training.steps 4 --checkpoint.async_mode disabled --job.dump_folder "$D/sync" \
        2>&1 | grep -E "checkpoint|step +[0-9]|Error" | tee -a "$OUT/ckpt.txt"
    du -sh "$D"/sync/checkpoint/step-* | tee -a "$OUT/ckpt.txt"
    python3 train.py "${common[@]}" --training.steps 6 --checkpoint.async_mode disabled --job.dump_folder "$D/sync" \
        2>&1 | grep -E "checkpoint|step +[0-9]|Error" | tee -a "$OUT/ckpt.txt"
    fi
    python3 train.py "${common[@]}" --training.steps 4 --checkpoint.async_mode async --job.dump_folder "$D/async" \
        2>&1 | grep -E "checkpoint|step +[0-9]|Error" | tee -a "$OUT/ckpt.txt" ;;
*) echo "usage: $0 tests|graph|routing|decode|decode-profile|tt-compare|bench-<flavor>|fsdp2|profile|perf|batch-<n>|float8-<n>|float8-4B|ckpt|moe-llama|moe-hydra|ssd|hybrid|waaagh|launch|scaling" >&2
   exit 2 ;;
esac
