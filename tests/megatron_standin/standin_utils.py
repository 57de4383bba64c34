"""Stand-in for Megatron-Bridge's quantization scripts (tests only: Megatron-Bridge needs CUDA and
Transformer Engine, which the test machines lack). Each script joins a real torch.distributed
process group over gloo, records its rank, world size and arguments, and the export writes a small
FP8-shaped Hugging Face checkpoint (or copies a real export named by STANDIN_EXPORT_FROM) so the
launcher's validation and measurements have something real to read."""

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist


def parse(step):
    p = argparse.ArgumentParser()
    for flag in (
        "--hf-model-id",
        "--export-quant-cfg",
        "--megatron-save-path",
        "--megatron-load-path",
        "--export-dir",
        "--dtype",
        "--prompts",
        "--calib-dataset",
    ):
        p.add_argument(flag)
    for flag in ("--tp", "--pp", "--ep", "--etp", "--calib-size", "--calib-seq-length", "--calib-batch-size"):
        p.add_argument(flag, type=int)
    for flag in ("--trust-remote-code", "--export-kv-cache-quant", "--weight-only", "--compress"):
        p.add_argument(flag, action="store_true")
    return p.parse_args()


def record(step):
    args = parse(step)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    log_dir = os.environ["STANDIN_LOG"]
    with open(os.path.join(log_dir, f"{step}-rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "world": world, "argv": sys.argv[1:]}, f)
    if step == "quantize" and rank == 0:
        os.makedirs(args.megatron_save_path, exist_ok=True)
    if step in ("quantize", "generate") and rank == 0:
        # The real scripts print each prompt and the quantized model's answer like this.
        prompts = (args.prompts or "Hello!|Born in California, Soyer trained as a").split("|")
        for i, prompt in enumerate(prompts, 1):
            print(f"Prompt {i}: {prompt}")
            print(f"Generated: {[prompt + ' (stand-in)']!r}", flush=True)
    if step == "export" and rank == 0:
        write_checkpoint(args.export_dir)
    dist.barrier()
    dist.destroy_process_group()


def write_checkpoint(folder):
    # A real ModelOpt export to hand over as this "Megatron export" (the tests make one with the in-process
    # backend), so the launcher's read-back, fidelity and benchmarks run on real numbers.
    source = os.environ.get("STANDIN_EXPORT_FROM")
    if source:
        import shutil

        shutil.copytree(source, folder, dirs_exist_ok=True)
        return
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    weight = torch.randn(8, 8)
    save_file(
        {
            "model.layers.0.mlp.down_proj.weight": weight.to(torch.float8_e4m3fn),
            "model.layers.0.mlp.down_proj.weight_scale": torch.tensor(1.0),
            "model.embed_tokens.weight": torch.randn(16, 8).to(torch.bfloat16),
        },
        os.path.join(folder, "model.safetensors"),
    )
    with open(os.path.join(folder, "hf_quant_config.json"), "w") as f:
        json.dump({"quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": None}}, f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"quantization_config": {"quant_method": "modelopt"}}, f)
