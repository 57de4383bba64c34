#!/usr/bin/env bash
# Wheels of mamba-ssm and causal-conv1d, the CUDA packages Megatron-Core's Mamba layers import (Nemotron-H and
# Nemotron 3 under backend=megatron_bridge). PyPI has only their source archives, which compile CUDA code
# against the installed torch, so they are built once on a GPU host of the kind that will run them.
#
#   scripts/mamba-wheels.sh fetch DIR     on a machine with internet: download the two source archives into DIR
#   scripts/mamba-wheels.sh build DIR     on the GPU host (nvcc, torch, CUDA GPU; no internet needed): build a
#                                         wheel of each archive in DIR into DIR/wheels, logs in DIR/build-*.log
#
# Then `scripts/install-offline.sh DIR/wheels --exact` installs them like any other wheel (with einops, which
# mamba-ssm needs, in the same folder). Versions: MAMBA_VERSION (2.2.6.post3: the last release without the
# tilelang/quack-kernels dependencies of 2.3) and CAUSAL_CONV1D_VERSION (1.5.3.post1: Megatron-Core 0.19.2's
# `ssm` extra asks for causal-conv1d~=1.5). Both setup scripts compile for every GPU generation from sm_53 or
# sm_75 up; CUDA_ARCHS (default: the visible GPU's, e.g. 90) keeps only those, which makes the build several
# times shorter. MAX_JOBS (default: the CPU count) sets the parallel compile jobs.
set -euo pipefail

MAMBA_VERSION=${MAMBA_VERSION:-2.2.6.post3}
CAUSAL_CONV1D_VERSION=${CAUSAL_CONV1D_VERSION:-1.5.3.post1}
PY=${PYTHON:-python3}

die() { echo "mamba-wheels: $*" >&2; exit 1; }

fetch() {
  local dir=$1
  mkdir -p "$dir"
  "$PY" - "$dir" "mamba-ssm" "$MAMBA_VERSION" "causal-conv1d" "$CAUSAL_CONV1D_VERSION" <<'PY'
import hashlib, re, sys, urllib.request
from pathlib import Path

out = Path(sys.argv[1])
for name, version in zip(sys.argv[2::2], sys.argv[3::2]):
    # PyPI's simple index (what pip reads): one link per file, its sha256 in the fragment.
    filename = f"{name.replace('-', '_')}-{version}.tar.gz"
    with urllib.request.urlopen(f"https://pypi.org/simple/{name}/", timeout=60) as answer:
        page = answer.read().decode()
    link = re.search(r'href="([^"#]*/' + re.escape(filename) + r')#sha256=([0-9a-f]{64})"', page)
    if not link:
        sys.exit(f"mamba-wheels: PyPI lists no {filename}")
    target = out / filename
    urllib.request.urlretrieve(link.group(1), target)
    digest = hashlib.sha256(target.read_bytes()).hexdigest()
    if digest != link.group(2):
        target.unlink()
        sys.exit(f"mamba-wheels: {filename} has sha256 {digest}, PyPI says {link.group(2)}")
    print(f"mamba-wheels: {target} ({target.stat().st_size} bytes, sha256 {digest} checked)")
PY
}

build() {
  local dir archs
  dir=$(cd "$1" && pwd)
  command -v nvcc >/dev/null || die "nvcc is not on the PATH: build on a GPU host with the CUDA toolkit"
  archs=${CUDA_ARCHS:-$("$PY" -c 'import torch; print("%d%d" % torch.cuda.get_device_capability())')} \
    || die "torch sees no CUDA GPU: build on the GPU host, or set CUDA_ARCHS (e.g. 90)"
  mkdir -p "$dir/wheels"
  BUILD_WORK=$(mktemp -d)
  trap 'rm -rf "${BUILD_WORK:-}"' EXIT  # a global: the trap runs after build() has returned
  for archive in "$dir"/causal_conv1d-"$CAUSAL_CONV1D_VERSION".tar.gz "$dir"/mamba_ssm-"$MAMBA_VERSION".tar.gz; do
    [ -f "$archive" ] || die "$archive is missing: run '$0 fetch $1' on a machine with internet first"
    tar -xzf "$archive" -C "$BUILD_WORK"
    local src name log start
    name=$(basename "$archive" .tar.gz)
    src=$BUILD_WORK/$name
    log=$dir/build-$name.log
    # Keep the -gencode pairs of the chosen architectures only (the setup scripts append one pair per line).
    "$PY" - "$src/setup.py" "$archs" <<'PY'
import re, sys
path, keep = sys.argv[1], set(sys.argv[2].replace(",", " ").split())
lines = open(path).read().split("\n")
out, i = [], 0
while i < len(lines):
    pair = re.match(r'\s*cc_flag\.append\("-gencode"\)\s*$', lines[i])
    arch = re.search(r'arch=compute_(\d+),code=(?:sm|compute)_\d+', lines[i + 1]) if pair and i + 1 < len(lines) else None
    if arch and arch.group(1) not in keep:
        out.append(lines[i][: len(lines[i]) - len(lines[i].lstrip())] + "pass")  # keeps an if-block valid
        i += 2
        continue
    out.append(lines[i])
    i += 1
compile("\n".join(out), path, "exec")  # still a valid setup script
open(path, "w").write("\n".join(out))
kept = sorted(set(re.findall(r'arch=compute_(\d+)', "\n".join(out))))
print(f"mamba-wheels: {path}: compiling for sm_{', sm_'.join(kept)}")
if not kept:
    sys.exit("mamba-wheels: none of the setup script's architectures is in CUDA_ARCHS")
PY
    start=$(date +%s)
    echo "mamba-wheels: building $name for sm_$archs (log: $log)"
    (cd "$src" && MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE MAX_JOBS=${MAX_JOBS:-$(nproc)} \
      "$PY" -m pip wheel --no-deps --no-build-isolation -w "$dir/wheels" . ) > "$log" 2>&1 \
      || die "building $name failed after $(( $(date +%s) - start )) s; the last lines of $log:
$(tail -n 30 "$log")"
    echo "mamba-wheels: built $name in $(( $(date +%s) - start )) s"
  done
  ls -l "$dir/wheels"
}

case ${1:-} in
fetch) fetch "${2:?a folder}" ;;
build) build "${2:?the folder with the source archives}" ;;
*) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
