#!/usr/bin/env bash
# One in-process sweep of SmolLM2-135M-Instruct on the lent GPU machine, then the results table.
#
#     bash bench/gpu_sweep.sh recipe=bf16,fp8,int8_sq [more Hydra overrides]
#
# Sources bench/gpu_setup.sh (wheels, the GGUF joined and converted, ModelOpt's extensions; see there
# for the carry lists of the setup calls). All points run in one `launch.py -m` process, so the BF16
# model is loaded once and the BF16 baseline scores are computed once (packing). Calibration text is the
# second half of WikiText-2 test, fidelity text the first half (no text is sampled from the model).
# Back in $OUT: report/ (over every run under $PTQ_RUNS so far) and run-records.json.
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-$PWD/out}
PTQ_RUNS=${PTQ_RUNS:-/tmp/runs}
mkdir -p "$OUT"
source bench/gpu_setup.sh
[ "$PTQ_READY" = 1 ] || { echo "gpu_sweep: setup incomplete; nothing run"; exit 1; }
TEXT=$PTQ_REPO/.device-carry/text
[ -d "$TEXT" ] || TEXT=$PTQ_HOME/text
mkdir -p "$PTQ_HOME/text" && cp -n "$TEXT"/*.txt "$PTQ_HOME/text/" 2>/dev/null
start=$SECONDS
python3 launch.py -m hardware=${PTQ_HARDWARE:-h100} eval=local_quick model.path="$PTQ_SMOLLM2" model.gguf_package=null \
    eval.data_dir="$PTQ_EVALDATA" output_root="$PTQ_RUNS" cache_dir=/tmp/cache \
    calib.dataset="$PTQ_HOME/text/wiki-test-second-half.txt" calib.size=128 calib.seq_len=512 \
    fidelity.text="$PTQ_HOME/text/wiki-test-first-half.txt" "hydra.sweep.dir=$PTQ_RUNS/sweeps/\${now:%H-%M-%S}" \
    "$@" 2>&1 | grep -v "real_accelerator\|it/s\]\|s/it\]" | tail -40
echo "gpu_sweep: sweep took $((SECONDS - start)) s"
python3 -m ptq.report "$PTQ_RUNS" --out "$OUT/report" > /dev/null 2> "$OUT/report.log" || tail "$OUT/report.log"
python3 - "$PTQ_RUNS" "$OUT" <<'PY'
import json, sys
from pathlib import Path
runs, out = Path(sys.argv[1]), Path(sys.argv[2])
records = {str(p.parent.relative_to(runs)): json.loads(p.read_text()) for p in sorted(runs.glob("*/*/run.json"))}
(out / "run-records.json").write_text(json.dumps(records, indent=1) + "\n")
for name, r in records.items():
    print(name, r["status"], (r.get("error") or "")[:200], r.get("timings_s"))
PY
