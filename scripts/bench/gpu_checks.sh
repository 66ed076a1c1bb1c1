#!/usr/bin/env bash
# The GPU checks: the GPU tests, profiles of our x1.5 step (eager, compiled), the x1.5 benchmarks (bf16 vs the
# naive fp32 loop: compiled with and without the latent cache, eager; batch 16; all-bf16 against official and
# naive), x2 at 512 px, 300 training steps of x1.5 at 256 px (compiled), and the largest-batch search. Each part
# has its own time limit (all together: up to ~50 min) and writes OUT/<part>.log; a part that fails or times out
# does not stop the rest. Compiled parts share inductor's on-disk cache: the first one pays most of the compiling
# (on an H200 the first compiled benchmark needs over 190 s, 122 s with the cache warm).
#     bash scripts/bench/gpu_checks.sh [OUT_DIR [PART ...]]   (default gpu_checks/; the PARTs in the order given,
#                                                        default: all, in the order below)
# PARTs: bench_compile_vs_naive_fp32 tests profile_compile max_batch_x15 train_x15 bench_compile_cached_vs_naive_fp32
#        max_batch profile bench_vs_naive_fp32 bench_batch16 bench_all_bf16 x2_512_batch2
#        decode_cost (benchmark_decode.py --latency: every decoder at 512-2048 px; ours, tiled, diffusers, bf16)
#        bases_bf16 (two bf16-mixed steps of x1.5 at 256 px on each of sdxl, sd3, flux, flux2, qwenimage, random
#        weights, GAN and validation on)
set -u
cd "$(dirname "$0")/../.."
OUT=${1:-gpu_checks}
[ $# -gt 0 ] && shift
PARTS=${*:-bench_compile_vs_naive_fp32 tests profile_compile max_batch_x15 train_x15 bench_compile_cached_vs_naive_fp32 \
max_batch profile bench_vs_naive_fp32 bench_batch16 bench_all_bf16 x2_512_batch2 decode_cost bases_bf16}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: nothing to check')" || exit 2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.log"
T0=$(date +%s)
part() {  # part NAME SECONDS CMD... (SECONDS: LIMIT_<NAME> overrides): in its own process group, so a timeout also ends the benchmark's children
    local name=$1 limit=$2 waited=0; shift 2
    local override="LIMIT_$name"; limit=${!override:-$limit}
    echo "=== [$(( $(date +%s) - T0 )) s] $name (limit $limit s)"
    setsid "$@" > "$OUT/$name.log" 2>&1 &
    local pid=$!
    while kill -0 "$pid" 2>/dev/null && [ "$waited" -lt "$limit" ]; do sleep 1; waited=$((waited + 1)); done
    if kill -0 "$pid" 2>/dev/null; then
        echo "    timed out after $limit s"; kill -TERM -- "-$pid"; sleep 5; kill -KILL -- "-$pid" 2>/dev/null
    fi
    wait "$pid"; echo "    exit $?"
    grep -v -i -E "warn|tip|tensor cores|LOCAL_RANK|available:" "$OUT/$name.log" | tail -n 12
}
RANDOM_INIT="model.vae_ckpt=null perceptual.pretrained=false"
BUDGET="--memory-budget-gb ${MEMORY_BUDGET_GB:-79.18}"  # what torch sees of an H100 80GB: the same figure on larger cards
X15="-c configs/x1_5.yaml $RANDOM_INIT data.resolution=256 trainer.precision=bf16-mixed model.channels_last=true"
run_part() {
    case $1 in
    bench_compile_cached_vs_naive_fp32) part "$1" 150 "$PY" scripts/bench/benchmark.py $X15 --compile --cached-latents \
        --reference naive --reference-precision 32-true --steps 60 --warmup 10 ;;
    tests) part "$1" 360 "$PY" -m pytest -v -rs --durations=0 -p no:cacheprovider tests/test_gpu.py ;;
    max_batch) part "$1" 240 "$PY" scripts/bench/benchmark.py --max-batch $RANDOM_INIT trainer.precision=bf16-mixed \
        model.channels_last=true --presets x1.5 x2 --resolutions 256 512 $BUDGET ;;
    max_batch_x15) part "$1" 150 "$PY" scripts/bench/benchmark.py --max-batch $RANDOM_INIT trainer.precision=bf16-mixed \
        model.channels_last=true --presets x1.5 --resolutions 256 512 $BUDGET ;;
    train_x15) part "$1" 200 "$PY" train.py $X15 model.compile=true trainer.max_steps=300 \
            trainer.val_check_interval=150 trainer.limit_val_batches=4 trainer.log_every_n_steps=25 \
            trainer.enable_progress_bar=false run.checkpoint_every_n_steps=300 loss.disc_start=100 \
            optim.warmup_steps=50 ema.decay=0.999 data.num_workers=8 run.log_dir="$OUT/logs" run.overwrite=true \
            --name x15_gpu
        cp "$OUT/logs/x15_gpu/metrics.csv" "$OUT/train_x15_metrics.csv" 2>/dev/null ;;
    profile) part "$1" 90 "$PY" scripts/bench/profile_step.py $X15 --steps 5 --warmup 5 --top 25 ;;
    profile_compile) part "$1" 200 "$PY" scripts/bench/profile_step.py $X15 model.compile=true --steps 5 --warmup 5 \
        --top 25 ;;
    bench_compile_vs_naive_fp32) part "$1" 300 "$PY" scripts/bench/benchmark.py $X15 --compile --reference naive \
        --reference-precision 32-true --steps 60 --warmup 10 ;;
    bench_vs_naive_fp32) part "$1" 120 "$PY" scripts/bench/benchmark.py $X15 --reference naive \
        --reference-precision 32-true --steps 20 --warmup 5 ;;
    bench_batch16) part "$1" 120 "$PY" scripts/bench/benchmark.py $X15 model.compile=true data.batch_size=16 \
        --cached-latents --steps 10 --warmup 3 ;;
    bench_all_bf16) part "$1" 120 "$PY" scripts/bench/benchmark.py $X15 --reference official --reference naive \
        --steps 15 --warmup 5 ;;
    x2_512_batch2) part "$1" 90 "$PY" scripts/bench/benchmark.py -c configs/x2.yaml $RANDOM_INIT data.resolution=512 \
        data.batch_size=2 trainer.precision=bf16-mixed model.channels_last=true --steps 3 --warmup 2 ;;
    decode_cost) part "$1" 480 "$PY" scripts/bench/benchmark_decode.py --latency --impls ours tiled diffusers bf16 \
        --repeats 2 ;;
    bases_bf16) part "$1" 480 env PY="$PY" OUT="$OUT" RANDOM_INIT="$RANDOM_INIT" bash -c 'for base in sdxl sd3 flux flux2 qwenimage; do
            "$PY" train.py -c configs/x1_5.yaml -c configs/bases/$base.yaml $RANDOM_INIT data.resolution=256 \
                trainer.precision=bf16-mixed trainer.max_steps=2 loss.disc_start=1 trainer.val_check_interval=2 \
                trainer.limit_val_batches=1 trainer.enable_progress_bar=false run.log_dir="$OUT/logs" \
                run.overwrite=true --name "bf16_$base" || exit 1; done' ;;
    *) echo "unknown part '$1' (see the PARTs at the top of $0)"; return 2 ;;
    esac
}
for name in $PARTS; do run_part "$name"; done
echo "=== [$(( $(date +%s) - T0 )) s] done: logs in $OUT/"
