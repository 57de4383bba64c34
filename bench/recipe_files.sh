#!/usr/bin/env bash
# ModelOpt recipe files through the launcher: one shipped with ModelOpt, one a user wrote (bench/recipes/), and a
# run again from the recipe file an earlier run wrote beside its checkpoint, compared byte for byte.
#
#     bash bench/recipe_files.sh cpu    # SmolLM2-135M (the default model) on this CPU: shipped
#                                       # general/ptq/fp8_default-kv_fp8, bench/recipes/fp8_mlp_only.yaml, then the
#                                       # user file's written modelopt_recipe.yaml run again
#     bash bench/recipe_files.sh gpu    # one GPU, a random-weight Llama-3.2-1B shape (PTQ_TOKENIZER, as
#                                       # bench/speed_gpu.sh): shipped general/ptq/nvfp4_default-kv_fp8 and
#                                       # bench/recipes/nvfp4_mlp_fp8_attention.yaml, then the written file again
#
# Fidelity is on (WikiText-2 halves when PTQ_WIKITEXT is set, else the model's own text), evaluation off.
# Writes $PTQ_BENCH_OUT (default $PTQ_WORK/out, PTQ_WORK default /tmp/ptq-recipe-files): run-records.json (every
# run record), timings.jsonl, and same-checkpoint.json (sha256 of every file of both checkpoints and whether they
# are equal).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
WORK=${PTQ_WORK:-/tmp/ptq-recipe-files}
BENCH_OUT=${PTQ_BENCH_OUT:-$WORK/out}
TEXT=$WORK/text
mkdir -p "$WORK" "$BENCH_OUT" "$TEXT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1
BENCH_NAME=recipe_files
# shellcheck source=bench/timed.sh
source bench/timed.sh

case ${1:-} in
cpu)
    COMMON=(hardware=cpu "output_root=$WORK/runs" "cache_dir=$WORK/cache" calib.size=32 calib.seq_len=256
            fidelity.samples=16 fidelity.seq_len=256)
    shipped=general/ptq/fp8_default-kv_fp8
    user=bench/recipes/fp8_mlp_only.yaml
    ;;
gpu)
    [ -d "${PTQ_TOKENIZER:-}" ] || { echo "recipe_files: set PTQ_TOKENIZER to a tokenizer folder"; exit 1; }
    timed random-1b python3 -m bench.random_checkpoint --shape llama3.2-1b --tokenizer "$PTQ_TOKENIZER" \
        --out "$WORK/llama3.2-1b-random" || exit 1
    COMMON=("hardware=${PTQ_HARDWARE:-h100}" model=llama3.2-1b "model.path=$WORK/llama3.2-1b-random"
            model.name=llama3.2-1b-random model.hf_id=null "output_root=$WORK/runs" "cache_dir=$WORK/cache"
            calib.size=256 calib.seq_len=512 fidelity.samples=32 fidelity.seq_len=512)
    shipped=general/ptq/nvfp4_default-kv_fp8
    user=bench/recipes/nvfp4_mlp_fp8_attention.yaml
    ;;
*)
    sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
if [ -f "${PTQ_WIKITEXT:-}" ]; then
    [ -f "$TEXT/calib.txt" ] || python3 -m bench.wikitext_halves "$PTQ_WIKITEXT" "$TEXT" || exit 1
    COMMON+=("calib.dataset=$TEXT/calib.txt" "fidelity.text=$TEXT/fidelity.txt")
fi

timed shipped python3 launch.py "${COMMON[@]}" recipe=modelopt "recipe.modelopt_recipe=$shipped" eval=none
timed user python3 launch.py "${COMMON[@]}" "recipe=$user" eval=none
# The recipe file the user run wrote beside its checkpoint, run again into another output root; then both
# checkpoints file by file. A user's file names its runs `<file name>-<content hash>` (conf/recipe/modelopt.yaml).
checkpoint_of() {  # the finished checkpoint under $1 whose recipe name starts with $2
    python3 - "$1" "$2" <<'EOF'
import json, sys
from pathlib import Path
records = [json.loads(p.read_text()) for p in Path(sys.argv[1]).glob("*/*/run.json")]
print(next((r["checkpoint"] for r in records if r.get("status") == "finished" and r["recipe"].startswith(sys.argv[2])), ""))
EOF
}
stem=$(basename "$user" .yaml)
first=$(checkpoint_of "$WORK/runs" "$stem")
if [ -n "$first" ]; then
    timed again python3 launch.py "${COMMON[@]}" "recipe=$first/modelopt_recipe.yaml" eval=none "output_root=$WORK/again"
    python3 - "$first" "$(checkpoint_of "$WORK/again" modelopt_recipe)" "$BENCH_OUT/same-checkpoint.json" <<'EOF'
import hashlib, json, sys
from pathlib import Path

def digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).iterdir()) if p.is_file()}

first, again = sys.argv[1], sys.argv[2]
a, b = digests(first), digests(again) if again else {}
weights = [n for n in a if n.endswith(".safetensors")]
result = {
    "first": first, "again": again, "first_files": a, "again_files": b,
    "weights_identical": bool(weights) and all(a[n] == b.get(n) for n in weights),
    "differing_files": sorted(n for n in set(a) | set(b) if a.get(n) != b.get(n)),
}
Path(sys.argv[3]).write_text(json.dumps(result, indent=1) + "\n")
print("recipe_files: weights identical:", result["weights_identical"], "differing files:", result["differing_files"])
EOF
fi
cp "$WORK/timings.jsonl" "$BENCH_OUT/"
python3 -m bench.records "$WORK/runs" "$BENCH_OUT"
python3 -m bench.records "$WORK/again" "$WORK/again-out" && cp "$WORK/again-out/run-records.json" "$BENCH_OUT/run-records-again.json"
