#!/usr/bin/env bash
# Recovery after PTQ (recover=qad) against PTQ and BF16 on SmolLM2-135M's real weights, through launch.py sweeps,
# then the report (PTQ and each recovery point side by side, the share of the gap closed with its interval).
#
#     bash bench/recovery.sh cpu    # int4_awq (block 64): PTQ, then QAD of RECOVERY_STEPS (25,100) steps
#     bash bench/recovery.sh gpu    # nvfp4 and int4_awq: PTQ, then QAD of RECOVERY_STEPS (100,300,1000) steps; and
#                                   # the 1B shape's QAD throughput and memory (needs PTQ_TOKENIZER)
#
# Both: BF16 baseline, calibration 64 x 256 tokens of WikiText-2 test's second half, fidelity on 32 x 256 held-out
# tokens of its first half, QAD on text the BF16 model writes (recover.text=self: kept apart from the held-out
# text) at lr RECOVERY_LR (1e-4), evaluation eval=local_quick when PTQ_EVALDATA is set (else fidelity only).
# Needs PTQ_WIKITEXT (wiki.test.raw). Writes $PTQ_BENCH_OUT (default $PTQ_WORK/out, PTQ_WORK default
# /tmp/ptq-recovery): run-records.json, timings.jsonl and report/ (python -m ptq.report).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
WORK=${PTQ_WORK:-/tmp/ptq-recovery}
BENCH_OUT=${PTQ_BENCH_OUT:-$WORK/out}
TEXT=$WORK/text
mkdir -p "$WORK" "$BENCH_OUT" "$TEXT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1
BENCH_NAME=recovery
# shellcheck source=bench/timed.sh
source bench/timed.sh

[ -f "${PTQ_WIKITEXT:-}" ] || { echo "recovery: set PTQ_WIKITEXT to WikiText-2's wiki.test.raw"; exit 1; }
[ -f "$TEXT/calib.txt" ] || python3 -m bench.wikitext_halves "$PTQ_WIKITEXT" "$TEXT" || exit 1
EVAL=eval=none
[ -d "${PTQ_EVALDATA:-}" ] && EVAL=eval=local_quick
LR=${RECOVERY_LR:-1e-4}
case ${1:-} in
cpu)
    HARDWARE=hardware=cpu RECIPES=int4_awq STEPS=${RECOVERY_STEPS:-25,100} ;;
gpu)
    HARDWARE=hardware=${PTQ_HARDWARE:-h100} RECIPES=nvfp4,int4_awq STEPS=${RECOVERY_STEPS:-100,300,1000} ;;
*)
    sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
    exit 2 ;;
esac
COMMON=("$HARDWARE" "output_root=$WORK/runs" "cache_dir=$WORK/cache" "calib.dataset=$TEXT/calib.txt" calib.size=64
        calib.seq_len=256 "fidelity.text=$TEXT/fidelity.txt" fidelity.samples=32 fidelity.seq_len=256 "$EVAL")

timed bf16 python3 launch.py "${COMMON[@]}" recipe=bf16
timed ptq python3 launch.py -m "${COMMON[@]}" "recipe=$RECIPES" "hydra.sweep.dir=$WORK/sweeps/ptq"
# One process for all recovery points: it keeps the BF16 model as every point's teacher (ptq/state.py).
timed qad python3 launch.py -m "${COMMON[@]}" "recipe=$RECIPES" recover=qad "recover.steps=$STEPS" "recover.lr=$LR" \
    "hydra.sweep.dir=$WORK/sweeps/qad"
if [ "$1" = gpu ] && [ -d "${PTQ_TOKENIZER:-}" ]; then
    # Throughput and memory of the same stage on the 1B shape (random weights: its KL figures are not accuracy).
    timed random-1b python3 -m bench.random_checkpoint --shape llama3.2-1b --tokenizer "$PTQ_TOKENIZER" \
        --out "$WORK/llama3.2-1b-random"
    timed qad-1b python3 launch.py "$HARDWARE" model=llama3.2-1b "model.path=$WORK/llama3.2-1b-random" \
        model.name=llama3.2-1b-random model.hf_id=null "output_root=$WORK/runs-1b" "cache_dir=$WORK/cache" \
        "calib.dataset=$TEXT/calib.txt" calib.size=64 calib.seq_len=256 "fidelity.text=$TEXT/fidelity.txt" \
        fidelity.samples=32 fidelity.seq_len=256 eval=none recipe=nvfp4 recover=qad recover.steps=100 "recover.lr=$LR"
    python3 -m bench.records "$WORK/runs-1b" "$WORK/out-1b" && cp "$WORK/out-1b/run-records.json" "$BENCH_OUT/run-records-1b.json"
fi
cp "$WORK/timings.jsonl" "$BENCH_OUT/"
python3 -m bench.records "$WORK/runs" "$BENCH_OUT"
python3 -m ptq.report "$WORK/runs" --out "$BENCH_OUT/report"
