#!/usr/bin/env bash
# Device-side setup for GPU benchmarks on the lent machine (H100/H200 image 'cuda': torch, transformers,
# accelerate, no ModelOpt/Hydra/lm-eval, no network). Run from the repository root, or source it:
#
#     bash bench/gpu_setup.sh          # do every stage the carried paths allow, print a status line
#     source bench/gpu_setup.sh        # the same, and keep the exported environment (PYTHONPATH, ...)
#
# Everything it makes lives outside the work tree (under /root), so it survives between device calls
# only while the machine stays warm (about 30 s after a call returns): make the calls back to back.
# Each stage runs once and is skipped when its result is already there:
#   .whl/                      launcher wheels (nvidia-modelopt, hydra-core, omegaconf, pulp, pydantic...):
#                              installed into $PTQ_SITE as they are (--upgrade)
#   .whl-eval/                 lm-eval 0.4.13, its dependencies the image lacks, and gguf: each wheel is
#                              installed unless the image (or $PTQ_SITE) already has that distribution
#   .device-carry/evaldata/    the local evaluation files: copied to $PTQ_EVALDATA
#   .device-carry-gguf/a|b/    the two halves of SmolLM2-135M-Instruct.Q4_1.gguf (split -b 49181216 -d):
#                              copied to $PTQ_HOME/gguf-parts, joined and checked (sha256) once both arrived
#   then                       the GGUF converted to a Hugging Face folder $PTQ_SMOLLM2 (ptq.models.convert_gguf),
#                              and ModelOpt's CUDA extensions built into $TORCH_EXTENSIONS_DIR ($PTQ_PREBUILD_EXT)
#
# One call carries at most 64 MiB, so the setup takes three calls made back to back (carry lists). As run
# on an H100 on 2026-11-23 (device seconds are wall seconds of the command):
#   1. [.whl, .whl-eval, .device-carry]  bash bench/gpu_setup.sh   installs (6 s) and builds ModelOpt's
#                                        fp8 and int extensions in parallel (about 100 s); PTQ_PREBUILD_EXT=
#                                        leaves them to a later call
#   2. [.device-carry-gguf/a]            bash bench/gpu_setup.sh   stores the first half (a few s)
#   3. [.device-carry-gguf/b]            bash bench/gpu_recipe_table.sh part1
#                                        joins and checks the GGUF, converts it (37 s), then runs
# and later calls carry nothing while the machine stays warm (bash bench/gpu_recipe_table.sh part2, ...).
# A call that finds a fresh machine finds none of this: start again at 1.

PTQ_REPO=${PTQ_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
PTQ_HOME=${PTQ_HOME:-/root}
PTQ_SITE=${PTQ_SITE:-$PTQ_HOME/site}
PTQ_EVALDATA=${PTQ_EVALDATA:-$PTQ_HOME/evaldata}
PTQ_GGUF=${PTQ_GGUF:-$PTQ_HOME/gguf/SmolLM2-135M-Instruct.Q4_1.gguf}
PTQ_GGUF_SHA256=${PTQ_GGUF_SHA256:-b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53}
PTQ_SMOLLM2=${PTQ_SMOLLM2:-$PTQ_HOME/smollm2-hf}
PTQ_PREBUILD_EXT=${PTQ_PREBUILD_EXT-fp8 int}
export PTQ_REPO PTQ_HOME PTQ_SITE PTQ_EVALDATA PTQ_GGUF PTQ_SMOLLM2
export PYTHONPATH="$PTQ_SITE:$PTQ_REPO${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PTQ_HOME/torch_ext}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

_ptq_log() { echo "gpu_setup: $*"; }

_ptq_pip() {
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$PTQ_SITE" "$@" 2>&1 \
        | grep -v "Target directory .* already exists"
    return "${PIPESTATUS[0]}"
}

_ptq_install_launcher_wheels() {
    local dir="$PTQ_REPO/.whl" mark="$PTQ_SITE/.ptq-whl"
    compgen -G "$dir/*.whl" >/dev/null || return 0
    [ "$(ls "$dir")" = "$(cat "$mark" 2>/dev/null)" ] && return 0
    mkdir -p "$PTQ_SITE"
    _ptq_pip "$dir"/*.whl || { _ptq_log "FAILED to install $dir"; return 1; }
    ls "$dir" > "$mark"
    _ptq_log "installed $(ls "$dir" | wc -l) wheels of .whl into $PTQ_SITE"
}

_ptq_install_eval_wheels() {
    local dir="$PTQ_REPO/.whl-eval" mark="$PTQ_SITE/.ptq-whl-eval" missing
    compgen -G "$dir/*.whl" >/dev/null || return 0
    [ "$(ls "$dir")" = "$(cat "$mark" 2>/dev/null)" ] && return 0
    mkdir -p "$PTQ_SITE"
    # Only the distributions this Python cannot find yet: the image's own copies (datasets, say) stay.
    missing=$(python3 - "$dir" <<'PY'
import sys
from importlib import metadata
from pathlib import Path
for wheel in sorted(Path(sys.argv[1]).glob("*.whl")):
    name, version = wheel.name.split("-")[:2]
    try:
        print(f"gpu_setup: keeping {name} {metadata.version(name)} (wheel has {version})", file=sys.stderr)
    except metadata.PackageNotFoundError:
        print(wheel)
PY
)
    if [ -n "$missing" ]; then
        # shellcheck disable=SC2086
        _ptq_pip $missing || { _ptq_log "FAILED to install wheels of $dir"; return 1; }
        _ptq_log "installed $(echo "$missing" | wc -l) wheels of .whl-eval into $PTQ_SITE"
    fi
    ls "$dir" > "$mark"
}

_ptq_copy_evaldata() {
    local src="$PTQ_REPO/.device-carry/evaldata"
    [ -d "$src" ] || return 0
    [ -d "$PTQ_EVALDATA" ] && [ "$(cd "$src" && find . | sort)" = "$(cd "$PTQ_EVALDATA" && find . | sort)" ] && return 0
    mkdir -p "$PTQ_EVALDATA" && cp -r "$src"/. "$PTQ_EVALDATA"/ && _ptq_log "copied evaldata to $PTQ_EVALDATA"
}

_ptq_gguf() {
    local parts="$PTQ_HOME/gguf-parts" name tmp sum f
    name=$(basename "$PTQ_GGUF")
    [ -f "$PTQ_GGUF" ] && return 0
    mkdir -p "$parts"
    for f in "$PTQ_REPO"/.device-carry-gguf/*/"$name".part*; do
        [ -f "$f" ] || continue
        cmp -s "$f" "$parts/$(basename "$f")" || { cp "$f" "$parts/" && _ptq_log "stored $(basename "$f")"; }
    done
    [ -f "$parts/$name.part00" ] && [ -f "$parts/$name.part01" ] || return 0
    mkdir -p "$(dirname "$PTQ_GGUF")"
    tmp="$PTQ_GGUF.tmp"
    cat "$parts/$name".part* > "$tmp"
    sum=$(sha256sum "$tmp" | cut -d' ' -f1)
    if [ "$sum" != "$PTQ_GGUF_SHA256" ]; then
        _ptq_log "FAILED: joined GGUF has sha256 $sum, expected $PTQ_GGUF_SHA256"
        rm -f "$tmp"
        return 1
    fi
    mv "$tmp" "$PTQ_GGUF" && rm -rf "$parts"
    _ptq_log "joined $PTQ_GGUF (sha256 ok, $(stat -c %s "$PTQ_GGUF") bytes)"
}

_ptq_convert() {
    [ -f "$PTQ_SMOLLM2/.complete" ] && return 0
    [ -f "$PTQ_GGUF" ] || return 0
    python3 -c "import gguf, hydra, omegaconf" 2>/dev/null || { _ptq_log "conversion waits for the wheels (.whl, .whl-eval)"; return 0; }
    TQDM_DISABLE=1 python3 - <<'PY' 2>&1 | grep -v "real_accelerator"
import logging, os
logging.basicConfig(level=logging.INFO, format="gpu_setup: %(message)s")
from ptq.models import convert_gguf
convert_gguf(os.environ["PTQ_GGUF"], os.environ["PTQ_SMOLLM2"])
PY
    [ -f "$PTQ_SMOLLM2/.complete" ] || { _ptq_log "FAILED to convert $PTQ_GGUF"; return 1; }
}

# Builds ModelOpt's CUDA extensions (about a minute each, in parallel) so timed runs do not pay for them.
_ptq_prebuild_start() {
    _PTQ_PREBUILD_PIDS=()
    [ -n "$PTQ_PREBUILD_EXT" ] || return 0
    python3 -c "import modelopt, torch; assert torch.cuda.is_available()" 2>/dev/null || return 0
    local ext fn
    mkdir -p "$TORCH_EXTENSIONS_DIR"
    for ext in $PTQ_PREBUILD_EXT; do
        [ -f "$TORCH_EXTENSIONS_DIR/.ptq-built-$ext" ] && continue
        case $ext in fp8) fn=get_cuda_ext_fp8 ;; int) fn=get_cuda_ext ;; mx) fn=get_cuda_ext_mx ;; *) _ptq_log "unknown extension $ext"; continue ;; esac
        ( start=$SECONDS
          if python3 -c "from modelopt.torch.quantization.extensions import $fn; assert $fn(raise_if_failed=True) is not None" \
                > "$TORCH_EXTENSIONS_DIR/.ptq-build-$ext.log" 2>&1; then
              touch "$TORCH_EXTENSIONS_DIR/.ptq-built-$ext"; _ptq_log "built ModelOpt extension '$ext' in $((SECONDS - start)) s"
          else
              _ptq_log "FAILED to build ModelOpt extension '$ext':"; tail -20 "$TORCH_EXTENSIONS_DIR/.ptq-build-$ext.log"
          fi ) &
        _PTQ_PREBUILD_PIDS+=($!)
    done
}

# 0 when the wheels, the converted model and the evaluation data are all in place.
ptq_ready() {
    [ -f "$PTQ_SMOLLM2/.complete" ] && [ -d "$PTQ_EVALDATA" ] \
        && python3 -c "import lm_eval, modelopt.torch.quantization, hydra" 2>/dev/null
}

ptq_setup() {
    local rc=0 start=$SECONDS pid
    _ptq_install_launcher_wheels || rc=1
    _ptq_install_eval_wheels || rc=1
    _ptq_copy_evaldata || rc=1
    _ptq_prebuild_start
    _ptq_gguf || rc=1
    _ptq_convert || rc=1
    for pid in "${_PTQ_PREBUILD_PIDS[@]}"; do wait "$pid"; done
    _ptq_log "$(python3 - <<'PY' 2>/dev/null
import os
from importlib import metadata
have = []
for name in ("torch", "transformers", "nvidia-modelopt", "lm_eval", "datasets", "hydra-core", "gguf"):
    try:
        have.append(f"{name} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
        have.append(f"{name} MISSING")
print("; ".join(have))
PY
)"
    _ptq_log "gguf: $([ -f "$PTQ_GGUF" ] && echo ok || echo "missing ($(ls "$PTQ_HOME/gguf-parts" 2>/dev/null | tr '\n' ' '))");" \
        "model: $([ -f "$PTQ_SMOLLM2/.complete" ] && echo "$PTQ_SMOLLM2" || echo missing);" \
        "evaldata: $([ -d "$PTQ_EVALDATA" ] && echo "$PTQ_EVALDATA" || echo missing);" \
        "extensions built: $(cd "$TORCH_EXTENSIONS_DIR" 2>/dev/null && ls -A | grep '^.ptq-built-' | sed 's/^.ptq-built-//' | tr '\n' ' ')" \
        "($((SECONDS - start)) s)"
    if ptq_ready; then PTQ_READY=1; _ptq_log READY; else PTQ_READY=0; _ptq_log "not ready yet"; fi
    return $rc
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    cd "$PTQ_REPO" || exit 1
    ptq_setup
    exit $?
fi
ptq_setup
