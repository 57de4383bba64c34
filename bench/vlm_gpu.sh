#!/usr/bin/env bash
# Vision-language shapes on one GPU, through the launcher's command line:
#
#     bash bench/vlm_gpu.sh prepare SHAPE          # a random-weight checkpoint of SHAPE with its processor, and the
#                                                  # image-text pair files (bench/vlm_pairs.py: 64 calibration, 16 held out)
#     bash bench/vlm_gpu.sh point SHAPE RECIPE..   # per recipe: one run calibrated on text, one on image-text pairs,
#                                                  # both measured on the held-out pairs (fidelity on, evaluation off)
#     bash bench/vlm_gpu.sh report                 # timings.jsonl, the run records (bench/records.py) and the
#                                                  # results report (image-text against text calibration) into $PTQ_BENCH_OUT
#
# Shapes: qwen2.5-vl-3b (its processor needs torchvision), gemma3-4b, and their -tiny versions. Random weights
# exercise the code paths, memory and time; their KL figures are not accuracy.
#
# Needs the launcher installed and: PTQ_WIKITEXT (WikiText-2's wiki.test.raw: its second half calibrates the text
# runs), PTQ_TOKENIZER (a Hugging Face tokenizer folder, e.g. the converted SmolLM2). Optional: PTQ_WORK
# (/tmp/ptq-vlm), PTQ_MODELS ($PTQ_WORK/models), PTQ_BENCH_OUT ($PTQ_WORK/out), PTQ_HARDWARE (h200), PTQ_CALIB
# (calib.size, 64), PTQ_HELDOUT (held-out pairs, 16), PTQ_EXTRA (more launch.py overrides). Every stage appends its wall time to $PTQ_WORK/timings.jsonl.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
WORK=${PTQ_WORK:-/tmp/ptq-vlm}
MODELS=${PTQ_MODELS:-$WORK/models}
BENCH_OUT=${PTQ_BENCH_OUT:-$WORK/out}
CACHE=$WORK/cache
TEXT=$WORK/text
PAIRS=$WORK/pairs
mkdir -p "$WORK" "$MODELS" "$BENCH_OUT" "$TEXT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1

# The launcher's model entry for each shape: the random checkpoint stands in for the published weights.
model_args() {
    case $1 in
    qwen2.5-vl*) echo "model=qwen2.5-vl-3b model.path=$MODELS/$1 model.name=$1-random model.hf_id=null" ;;
    gemma3*) echo "model=gemma-3-4b model.path=$MODELS/$1 model.name=$1-random model.hf_id=null" ;;
    *) echo "vlm_gpu: unknown shape $1" >&2; return 1 ;;
    esac
}

BENCH_NAME=vlm_gpu
# shellcheck source=bench/timed.sh
source bench/timed.sh

case ${1:-} in
prepare)
    shape=${2:?shape}
    [ -f "$TEXT/calib.txt" ] || python3 -m bench.wikitext_halves "${PTQ_WIKITEXT:?set PTQ_WIKITEXT}" "$TEXT" || exit 1
    [ -f "$PAIRS/heldout.jsonl" ] || timed pairs python3 -m bench.vlm_pairs --out "$PAIRS" --calib "${PTQ_CALIB:-64}" --heldout "${PTQ_HELDOUT:-16}"
    timed "random-$shape" python3 -m bench.random_checkpoint --shape "$shape" --tokenizer "${PTQ_TOKENIZER:?set PTQ_TOKENIZER}" \
        --out "$MODELS/$shape"
    ;;
point)
    shape=${2:?shape}
    shift 2
    for recipe in "$@"; do
        for calib in "$TEXT/calib.txt" "$PAIRS/calib.jsonl"; do
            kind=$([ "$calib" = "$TEXT/calib.txt" ] && echo text || echo images)
            # shellcheck disable=SC2046,SC2086
            timed "$shape-$recipe-$kind" python3 launch.py $(model_args "$shape") "recipe=$recipe" "hardware=${PTQ_HARDWARE:-h200}" \
                eval=none "cache_dir=$CACHE" "output_root=$WORK/runs" "calib.dataset=$calib" "calib.size=${PTQ_CALIB:-64}" \
                calib.seq_len=512 "fidelity.text=$PAIRS/heldout.jsonl" "fidelity.samples=${PTQ_HELDOUT:-16}" ${PTQ_EXTRA:-}
        done
    done
    ;;
report)
    cp "$WORK/timings.jsonl" "$BENCH_OUT/" 2>/dev/null
    python3 -m bench.records "$WORK/runs" "$BENCH_OUT"
    python3 -m ptq.report "$WORK/runs" --out "$BENCH_OUT/report"
    ;;
*)
    sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
