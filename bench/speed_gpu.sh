#!/usr/bin/env bash
# The launcher's own costs on one GPU, through its command line:
#
#     bash bench/speed_gpu.sh prepare    # WikiText-2 halves, a random-weight Llama-3.2-1B-shaped checkpoint
#     bash bench/speed_gpu.sh extensions # ModelOpt's CUDA extensions loaded by two fresh processes through the
#                                        # launcher's build cache under cache_dir: the first builds, the second reuses
#     bash bench/speed_gpu.sh extensions-stable  # 10 fresh processes, TORCH_CUDA_ARCH_LIST unset or set: one build
#     bash bench/speed_gpu.sh packed     # 4 recipes as one `launch.py -m` process, then as 4 separate processes
#     bash bench/speed_gpu.sh large      # Llama-3.1-8B shape: fp8 and nvfp4 with fidelity on (default check of
#                                        # the written checkpoint)
#     bash bench/speed_gpu.sh pair       # one 8B fp8 point (load, calibrate, export; fidelity and evaluation off),
#                                        # the launcher and ModelOpt called directly (bench/modelopt_direct.py),
#                                        # three times each in alternating order (needs `large` first)
#     bash bench/speed_gpu.sh report     # timings.json and the run records into $PTQ_BENCH_OUT
#
# Needs the launcher installed and: PTQ_WIKITEXT (WikiText-2's wiki.test.raw: its first half is the fidelity
# text, the second calibrates), PTQ_TOKENIZER (a Hugging Face tokenizer folder, e.g. the converted SmolLM2).
# Optional: PTQ_WORK (/tmp/ptq-speed), PTQ_BENCH_OUT ($PTQ_WORK/out). Every stage appends its wall times to
# $PTQ_WORK/timings.jsonl. All runs share one cache_dir, as the jobs of a sweep on a shared file system do.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
WORK=${PTQ_WORK:-/tmp/ptq-speed}
BENCH_OUT=${PTQ_BENCH_OUT:-$WORK/out}
CACHE=$WORK/cache
TEXT=$WORK/text
mkdir -p "$WORK" "$BENCH_OUT" "$TEXT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1
unset TORCH_EXTENSIONS_DIR  # the launcher's own default (under cache_dir) is what is measured

COMMON=(hardware=h200 eval=none "cache_dir=$CACHE" "calib.dataset=$TEXT/calib.txt" calib.size=256 calib.seq_len=512
        "fidelity.text=$TEXT/fidelity.txt" fidelity.samples=32 fidelity.seq_len=512)
RECIPES=(fp8 nvfp4 int8_sq fp8_blockwise)

# A random checkpoint of shape $1 as the model: the 1B shape as model=llama3.2-1b, the 8B one through the
# qwen3-8b entry (a dense 8B model, same exclusions) with the Llama shape's size.
shape_args() {
    case $1 in
    llama3.2-1b) echo "model=llama3.2-1b model.path=$WORK/$1-random model.name=$1-random model.hf_id=null" ;;
    llama3.1-8b) echo "model=qwen3-8b model.path=$WORK/$1-random model.name=$1-random model.hf_id=null model.params_b=8.03 model.layer_widths=[]" ;;
    esac
}

BENCH_NAME=speed_gpu
# shellcheck source=bench/timed.sh
source bench/timed.sh

# Loads ModelOpt's CUDA extensions in a fresh process through the launcher's build cache under $1.
load='import time; from ptq.backends.base import use_extension_cache; import sys; print("dir", use_extension_cache(sys.argv[1]));
from modelopt.torch.quantization import extensions as e; t = time.time(); e.get_cuda_ext(); e.get_cuda_ext_fp8(); print("load", round(time.time() - t, 2))'

case ${1:-} in
prepare)
    [ -f "${PTQ_WIKITEXT:-}" ] || { echo "speed_gpu: set PTQ_WIKITEXT to WikiText-2's wiki.test.raw"; exit 1; }
    python3 -m bench.wikitext_halves "$PTQ_WIKITEXT" "$TEXT" || exit 1
    timed random-1b python3 -m bench.random_checkpoint --shape llama3.2-1b --tokenizer "$PTQ_TOKENIZER" --out "$WORK/llama3.2-1b-random"
    ;;
extensions)
    # What ModelOpt builds on the first fake-quantized forward of FP8 and of the other formats.
    timed extensions-first python3 -c "$load" "$CACHE"
    timed extensions-second python3 -c "$load" "$CACHE"
    ;;
extensions-stable)
    # Ten fresh processes load ModelOpt's extensions through the launcher's build cache, half with
    # TORCH_CUDA_ARCH_LIST unset and half with it set to the GPU's own architecture (as ModelOpt sets it): after
    # the first build none may compile again. Prints each process's load time and the ninja log's compile count.
    for i in $(seq 1 10); do
        if [ $((i % 2)) = 0 ]; then arch=$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())"); else arch=""; fi
        TORCH_CUDA_ARCH_LIST=$arch timed "extensions-stable-$i" python3 -c "$load" "$CACHE"
        grep -h "^load" "$WORK/extensions-stable-$i.log"
    done
    echo "compile steps in the ninja logs: $(cat "$CACHE"/torch_extensions/*/*/.ninja_log 2>/dev/null | grep -vc '^#')"
    ;;
packed)
    timed packed-4 python3 launch.py -m "${COMMON[@]}" $(shape_args llama3.2-1b) "recipe=$(IFS=,; echo "${RECIPES[*]}")" \
        "output_root=$WORK/packed" "hydra.sweep.dir=$WORK/packed/sweep"
    for recipe in "${RECIPES[@]}"; do
        timed "separate-$recipe" python3 launch.py "${COMMON[@]}" $(shape_args llama3.2-1b) "recipe=$recipe" \
            "output_root=$WORK/separate"
    done
    ;;
large)
    timed random-8b python3 -m bench.random_checkpoint --shape llama3.1-8b --tokenizer "$PTQ_TOKENIZER" --out "$WORK/llama3.1-8b-random"
    for recipe in fp8 nvfp4; do
        timed "large-$recipe" python3 launch.py "${COMMON[@]}" $(shape_args llama3.1-8b) "recipe=$recipe" "output_root=$WORK/large"
    done
    ;;
pair)
    # The same calibration tokens and the same automatic batch size on both sides; each launcher run writes a
    # fresh output root (the launcher never overwrites a finished point).
    PAIR=(hardware=h200 eval=none fidelity=none "cache_dir=$CACHE" "calib.dataset=$TEXT/calib.txt" calib.size=256
          calib.seq_len=512 recipe=fp8)
    direct() {
        timed "pair-direct-$1" python3 -m bench.modelopt_direct --model "$WORK/llama3.1-8b-random" \
            --text "$TEXT/calib.txt" --recipe fp8 --samples 256 --seq-len 512 --out "$WORK/pair-direct-$1/checkpoint"
        tail -n 1 "$WORK/pair-direct-$1.log" >> "$WORK/direct.jsonl"
    }
    launcher() {
        timed "pair-launcher-$1" python3 launch.py "${PAIR[@]}" $(shape_args llama3.1-8b) "output_root=$WORK/pair-launcher-$1"
    }
    for step in ${PTQ_PAIR_STEPS:-launcher:1 direct:1 direct:2 launcher:2 launcher:3 direct:3}; do ${step%%:*} ${step##*:}; done
    ;;
report)
    cp "$WORK/timings.jsonl" "$BENCH_OUT/" 2>/dev/null
    cp "$WORK/direct.jsonl" "$BENCH_OUT/" 2>/dev/null
    python3 - "$WORK" "$BENCH_OUT" <<'PY'
import json, sys
from pathlib import Path

work, out = Path(sys.argv[1]), Path(sys.argv[2])
records = {}
for path in sorted(work.glob("*/**/run.json")):
    record = json.loads(path.read_text())
    records[str(path.relative_to(work))] = {k: record.get(k) for k in (
        "status", "error", "model", "recipe", "timings_s", "details", "fidelity", "validation", "size", "versions",
        "hardware", "started_at", "finished_at")}
(out / "run-records.json").write_text(json.dumps(records, indent=1, default=str) + "\n")
for name, r in records.items():
    t = r["timings_s"] or {}
    written = (r.get("fidelity") or {}).get("exported_checkpoint") or {}
    print(name, r["status"], {k: t[k] for k in t}, written.get("check"), written.get("problems"))
PY
    ;;
*)
    sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
