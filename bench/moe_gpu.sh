#!/usr/bin/env bash
# Mixture-of-Experts and hybrid Mamba-MoE shapes on one GPU, through the launcher's command line:
#
#     bash bench/moe_gpu.sh prepare SHAPE         # a random-weight checkpoint of SHAPE (bench/random_checkpoint.py)
#     bash bench/moe_gpu.sh point SHAPE RECIPE.. # one launch.py run per recipe (fidelity on, evaluation off)
#     bash bench/moe_gpu.sh floor SHAPE RECIPE BATCH  # the same point with calib.batch_size=BATCH, under
#                                                # $PTQ_WORK/runs-batchBATCH: its peak GPU memory against the
#                                                # automatic batch's (which takes what memory is free)
#     bash bench/moe_gpu.sh kernels SHAPE RECIPE # the same point with model.mamba_kernels=true (mamba-ssm's and
#                                                # causal-conv1d's CUDA kernels, installed), under $PTQ_WORK/runs-kernels
#     bash bench/moe_gpu.sh profile SHAPE RECIPE # time per layer kind (Mamba, MoE, attention) in a BF16 forward
#                                                # and in RECIPE's calibration (bench/moe_profile.py)
#     bash bench/moe_gpu.sh report               # timings.jsonl and the whole run records (bench/records.py:
#                                                # timings, peak GPU memory, layer kinds, expert coverage) into $PTQ_BENCH_OUT
#
# Shapes: nemotron3-nano-30b-a3b (31.6 B parameters, about 63 GB in BF16), qwen3-30b-a3b (30.5 B) and their
# -tiny versions. Random weights exercise shapes, code paths, memory and time; their KL and perplexity figures
# are not accuracy.
#
# Needs the launcher installed and: PTQ_WIKITEXT (WikiText-2's wiki.test.raw: its first half is the fidelity
# text, the second calibrates), PTQ_TOKENIZER (a Hugging Face tokenizer folder, e.g. the converted SmolLM2).
# Optional: PTQ_WORK (/tmp/ptq-moe: logs, outputs, cache), PTQ_MODELS ($PTQ_WORK/models: the BF16 checkpoints;
# a 30B shape takes 61 GiB, so on a 64 GiB disk point it at a RAM disk such as /dev/shm), PTQ_BENCH_OUT
# ($PTQ_WORK/out), PTQ_HARDWARE (h200), PTQ_CALIB (calib.size, 256), PTQ_EXTRA (more launch.py overrides),
# PTQ_PROFILE_BATCH (the profile's batch, 16), PTQ_MAMBA_KERNELS (1: the profile loads the model with mamba-ssm's
# kernels). Every stage appends its
# wall time to $PTQ_WORK/timings.jsonl; every point deletes its exported checkpoint after its record is written
# unless PTQ_KEEP=1 (a 30B FP8 export is 32 GB).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
WORK=${PTQ_WORK:-/tmp/ptq-moe}
MODELS=${PTQ_MODELS:-$WORK/models}
BENCH_OUT=${PTQ_BENCH_OUT:-$WORK/out}
CACHE=$WORK/cache
TEXT=$WORK/text
mkdir -p "$WORK" "$MODELS" "$BENCH_OUT" "$TEXT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1

# The launcher's model entry for each shape: the random checkpoint stands in for the published weights.
model_args() {
    case $1 in
    nemotron3-nano*) echo "model=nemotron-3-nano-30b-a3b model.path=$MODELS/$1 model.name=$1-random model.hf_id=null" ;;
    qwen3*) echo "model=qwen3-30b-a3b model.path=$MODELS/$1 model.name=$1-random model.hf_id=null model.layer_widths=[]" ;;
    *) echo "moe_gpu: unknown shape $1" >&2; return 1 ;;
    esac
}

# One point of RECIPE with more overrides, in its own runs folder ($PTQ_WORK/runs-NAME), its record into
# $PTQ_BENCH_OUT/NAME: variant SHAPE RECIPE NAME OVERRIDE...
variant() {
    local shape=$1 recipe=$2 name=$3
    shift 3
    # shellcheck disable=SC2046,SC2086
    timed "$shape-$recipe-$name" python3 launch.py $(model_args "$shape") "recipe=$recipe" "hardware=${PTQ_HARDWARE:-h200}" \
        eval=none "cache_dir=$CACHE" "output_root=$WORK/runs-$name" "calib.dataset=$TEXT/calib.txt" \
        "calib.size=${PTQ_CALIB:-256}" calib.seq_len=512 "fidelity.text=$TEXT/fidelity.txt" fidelity.samples=32 \
        fidelity.seq_len=512 ${PTQ_EXTRA:-} "$@"
    if [ "${PTQ_KEEP:-0}" != 1 ]; then
        find "$WORK/runs-$name" -maxdepth 3 -type d -name "checkpoint*" -exec rm -rf {} +
    fi
    python3 -m bench.records "$WORK/runs-$name" "$BENCH_OUT/$name"
}

BENCH_NAME=moe_gpu
# shellcheck source=bench/timed.sh
source bench/timed.sh

case ${1:-} in
prepare)
    shape=${2:?shape}
    [ -f "$TEXT/calib.txt" ] || python3 -m bench.wikitext_halves "${PTQ_WIKITEXT:?set PTQ_WIKITEXT}" "$TEXT" || exit 1
    timed "random-$shape" python3 -m bench.random_checkpoint --shape "$shape" --tokenizer "${PTQ_TOKENIZER:?set PTQ_TOKENIZER}" \
        --out "$MODELS/$shape"
    ;;
point)
    shape=${2:?shape}
    shift 2
    for recipe in "$@"; do
        # shellcheck disable=SC2046,SC2086
        timed "$shape-$recipe" python3 launch.py $(model_args "$shape") "recipe=$recipe" "hardware=${PTQ_HARDWARE:-h200}" eval=none \
            "cache_dir=$CACHE" "output_root=$WORK/runs" "calib.dataset=$TEXT/calib.txt" "calib.size=${PTQ_CALIB:-256}" \
            calib.seq_len=512 "fidelity.text=$TEXT/fidelity.txt" fidelity.samples=32 fidelity.seq_len=512 ${PTQ_EXTRA:-}
        if [ "${PTQ_KEEP:-0}" != 1 ]; then
            find "$WORK/runs" -maxdepth 3 -type d -name "checkpoint*" -path "*$shape-random/$recipe-*" -exec rm -rf {} +
        fi
    done
    ;;
floor)
    shape=${2:?shape}
    recipe=${3:?recipe}
    batch=${4:?batch}
    variant "$shape" "$recipe" "batch$batch" "calib.batch_size=$batch" "fidelity.batch_size=$batch"
    ;;
kernels)
    shape=${2:?shape}
    recipe=${3:?recipe}
    variant "$shape" "$recipe" kernels model.mamba_kernels=true
    ;;
profile)
    shape=${2:?shape}
    recipe=${3:?recipe}
    group=$(model_args "$shape" | sed 's/^model=\([^ ]*\).*/\1/')
    timed "profile-$shape-$recipe" python3 -m bench.moe_profile --model "$MODELS/$shape" --text "$TEXT/calib.txt" \
        --recipe "$recipe" --model-group "$group" $([ "${PTQ_MAMBA_KERNELS:-0}" = 1 ] && echo --mamba-kernels) --samples 64 --seq-len 512 --batch "${PTQ_PROFILE_BATCH:-16}" --coverage-samples "${PTQ_COVERAGE:-256}" --out "$BENCH_OUT/profile-$shape-$recipe.json"
    ;;
report)
    cp "$WORK/timings.jsonl" "$BENCH_OUT/" 2>/dev/null
    python3 -m bench.records "$WORK/runs" "$BENCH_OUT"
    ;;
*)
    sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
