#!/usr/bin/env bash
# Every recipe on the real SmolLM2-135M-Instruct, on the lent GPU machine, then the results table.
#
#     bash bench/gpu_recipe_table.sh part1        # bf16, fp8, fp8 + FP8 KV cache
#     bash bench/gpu_recipe_table.sh part2        # fp8_blockwise, int8_sq, nvfp4, int4_awq
#     bash bench/gpu_recipe_table.sh part3        # w4a8_awq, nvfp4_awq
#     bash bench/gpu_recipe_table.sh part4        # auto_quantize at two budgets (if conf/recipe/auto_quantize.yaml exists)
#     bash bench/gpu_recipe_table.sh all          # in order, as far as the time budget goes
#     bash bench/gpu_recipe_table.sh fp8 "fp8 recipe.kv_cache=fp8" "int4_awq recipe.awq_block_size=64"
#
# Each argument is one run: a recipe name, optionally followed by more launcher overrides (quote it).
# Every run is `launch.py hardware=$PTQ_HARDWARE (h100) eval=local_quick` on the converted GGUF
# (model.path=$PTQ_SMOLLM2, model.gguf_package=null), writing under $PTQ_RUNS (/tmp/runs) with the shared
# cache $PTQ_CACHE (/tmp/cache: BF16 baseline scores, self-sampled calibration/fidelity text).
# Extra overrides for every run: PTQ_EXTRA="calib.size=256 ...". Auto-quantize budgets: AUTOQ_BUDGETS.
#
# Why four parts (H100, 2026-11-23, see bench/results/evaluation-throughput-h100.md): a run costs about
# 15 s of imports, 12 s to load, 38 s of local_quick evaluation (11 s of it lm-eval's task index) and its
# calibration (1-2 s for fp8, about a minute for the AWQ recipes). The first runs also sample text from the
# BF16 model, once per cache: the fidelity text (32 x 512, about 60 s, in the bf16 run) and the calibration
# text (512 x 512, about 3 min, in the first quantized run). Keep bf16 and fp8 first, in one call.
#
# It sources bench/gpu_setup.sh first (see there for the setup calls and their carry lists). Runs stop
# being started when fewer than PTQ_MIN_RUN_S (150) seconds remain of PTQ_BUDGET_S (540 s from the
# start), so the command ends inside the device's 10-minute limit; a run not started is named in the log
# and the summary (pass it again in the next call). Each run is killed 30 s before the budget ends.
#
# Back in $OUT (at most 8 files come back): report/ (results.md, results.csv, results.html, the plot; over
# every run.json under $PTQ_RUNS, so the last call's report covers earlier calls on the same warm machine),
# run-records.json (every run.json under $PTQ_RUNS, keyed by <model>/<point>), recipe-table.log (everything
# printed), recipe-table-summary.json (this call's runs: spec, exit status, seconds).

cd "$(dirname "$0")/.." || exit 1
START=$SECONDS
PTQ_BUDGET_S=${PTQ_BUDGET_S:-540}
PTQ_MIN_RUN_S=${PTQ_MIN_RUN_S:-150}
PTQ_RUNS=${PTQ_RUNS:-/tmp/runs}
PTQ_CACHE=${PTQ_CACHE:-/tmp/cache}
PTQ_HARDWARE=${PTQ_HARDWARE:-h100}
OUT=${OUT:-$PWD/out}
AUTOQ_BUDGETS=${AUTOQ_BUDGETS:-4.8 6.0}
mkdir -p "$OUT"
LOG=$OUT/recipe-table.log

source bench/gpu_setup.sh > >(tee -a "$LOG") 2>&1
if [ "$PTQ_READY" != 1 ]; then
    echo "gpu_recipe_table: setup incomplete (see the gpu_setup lines above); nothing run" | tee -a "$LOG"
    exit 1
fi

PART1=(bf16 fp8 "fp8 recipe.kv_cache=fp8")
PART2=(fp8_blockwise int8_sq nvfp4 int4_awq)
PART3=(w4a8_awq nvfp4_awq)
PART4=()
if [ -f conf/recipe/auto_quantize.yaml ]; then
    # The budget field: effective_bits if the recipe has it, else the first *bits* key it defines.
    key=$(grep -oE '^(effective_bits|[a-z_]*bits[a-z_]*):' conf/recipe/auto_quantize.yaml | grep -m1 effective_bits \
          || grep -m1 -oE '^[a-z_]*bits[a-z_]*:' conf/recipe/auto_quantize.yaml)
    key=${key%:}
    if [ -n "$key" ]; then
        for b in $AUTOQ_BUDGETS; do PART4+=("auto_quantize recipe.$key=$b"); done
    else
        PART4=(auto_quantize)
    fi
fi

SPECS=()
[ $# -gt 0 ] || set -- part1
for arg in "$@"; do
    case $arg in
        part1) SPECS+=("${PART1[@]}") ;;
        part2) SPECS+=("${PART2[@]}") ;;
        part3) SPECS+=("${PART3[@]}") ;;
        part4) [ ${#PART4[@]} -gt 0 ] && SPECS+=("${PART4[@]}") || echo "gpu_recipe_table: no conf/recipe/auto_quantize.yaml; part4 is empty" | tee -a "$LOG" ;;
        all) SPECS+=("${PART1[@]}" "${PART2[@]}" "${PART3[@]}" "${PART4[@]}") ;;
        *) SPECS+=("$arg") ;;
    esac
done

SUMMARY=$OUT/recipe-table-summary.jsonl
: > "$SUMMARY"
for spec in "${SPECS[@]}"; do
    left=$((PTQ_BUDGET_S - (SECONDS - START)))
    if [ "$left" -lt "$PTQ_MIN_RUN_S" ]; then
        echo "gpu_recipe_table: SKIPPED (${left} s left): $spec" | tee -a "$LOG"
        printf '{"spec": "%s", "status": "skipped", "seconds": 0}\n' "$spec" >> "$SUMMARY"
        continue
    fi
    read -r -a words <<< "$spec"
    overrides=()
    for w in "${words[@]}"; do
        case $w in *=*) overrides+=("$w") ;; *) overrides+=("recipe=$w") ;; esac
    done
    # shellcheck disable=SC2206
    overrides+=($PTQ_EXTRA)
    echo "gpu_recipe_table: RUN ${overrides[*]} (limit $((left - 30)) s)" | tee -a "$LOG"
    t0=$SECONDS
    timeout $((left - 30)) python3 launch.py hardware="$PTQ_HARDWARE" eval=local_quick \
        model.path="$PTQ_SMOLLM2" model.gguf_package=null eval.data_dir="$PTQ_EVALDATA" \
        output_root="$PTQ_RUNS" cache_dir="$PTQ_CACHE" "${overrides[@]}" >> "$LOG" 2>&1
    rc=$?
    echo "gpu_recipe_table: rc=$rc in $((SECONDS - t0)) s: $spec" | tee -a "$LOG"
    [ $rc -eq 0 ] || grep -E "Error|error:|Traceback" "$LOG" | tail -3
    printf '{"spec": "%s", "status": %d, "seconds": %d}\n' "$spec" "$rc" "$((SECONDS - t0))" >> "$SUMMARY"
done

python3 -m ptq.report "$PTQ_RUNS" --out "$OUT/report" > "$OUT/report-stdout.md" 2>> "$LOG" \
    || echo "gpu_recipe_table: ptq.report failed (see the log)" | tee -a "$LOG"
cat "$OUT/report/results.md" 2>/dev/null | head -60
rm -f "$OUT/report-stdout.md"
python3 - "$PTQ_RUNS" "$OUT" "$START" <<'PY'
import json, os, sys, time
from pathlib import Path
runs, out = Path(sys.argv[1]), Path(sys.argv[2])
records = {}
for path in sorted(runs.glob("**/run.json")):
    try:
        records[str(path.parent.relative_to(runs))] = json.loads(path.read_text())
    except ValueError as exc:
        records[str(path.parent.relative_to(runs))] = {"unreadable": str(exc)}
(out / "run-records.json").write_text(json.dumps(records, indent=1) + "\n")
rows = [json.loads(l) for l in (out / "recipe-table-summary.jsonl").read_text().splitlines() if l.strip()]
(out / "recipe-table-summary.json").write_text(json.dumps(rows, indent=1) + "\n")
(out / "recipe-table-summary.jsonl").unlink()
print(f"gpu_recipe_table: {len(records)} run records packed into {out}/run-records.json")
PY
echo "gpu_recipe_table: done in $((SECONDS - START)) s"
