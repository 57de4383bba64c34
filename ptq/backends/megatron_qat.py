"""Quantization-aware training of a Megatron-Bridge PTQ checkpoint: `recover=qat` with `backend=megatron_bridge`.

    python megatron_qat.py data --rows ROWS.npy --out PREFIX
    torchrun ... megatron_entry.py megatron_qat.py train --hf-path MODEL --load PTQ_DIR --save QAT_DIR \
        --data PREFIX --steps N --lr LR ...

`data` writes the launcher's tokenized training rows (one document per row) as a Megatron indexed dataset
(PREFIX.bin / PREFIX.idx) with Megatron-Core's own `IndexedDatasetBuilder`.

`train` is the QAT half of Megatron-Bridge's quantization guide, for any model its AutoBridge converts: the
pre-training configuration every recipe starts from (`_pretrain_common`), the model's own provider
(`AutoBridge.from_hf_pretrained(...).to_megatron_provider`), the PTQ checkpoint as `pretrained_checkpoint` with
its ModelOpt state restored (`restore_modelopt_state`: the quantizers and their calibrated ranges come back and
stay frozen), `finetune` (weights only: no optimizer state, iteration 0), and Megatron-Bridge's `pretrain` loop
on the indexed dataset with the model's Hugging Face tokenizer. The guide's own script builds the Llama-3 8B
recipe, which reads that model's config from the Hugging Face Hub; this one needs only the local model folder.
The trained checkpoint lands in QAT_DIR/iter_<steps>/, which the generate and export scripts load (they take the
newest iter_* folder). Nothing is written outside QAT_DIR and the data prefix: TensorBoard is off.

Like megatron_entry.py, this file imports only the standard library at module level.
"""

from __future__ import annotations

import argparse
import os
import sys

SCHEDULES = ("cosine", "linear", "constant")


def data(args) -> None:
    import numpy
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, get_bin_path, get_idx_path

    rows = numpy.load(args.rows)
    if rows.ndim != 2 or rows.shape[0] == 0:
        sys.exit(f"megatron_qat: {args.rows} holds {rows.shape}, not rows of token ids")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    # Written under a name of this process, then renamed: each node of a multi-node job writes the same files.
    partial = f"{args.out}.partial{os.getpid()}"
    builder = IndexedDatasetBuilder(get_bin_path(partial), dtype=numpy.int32)
    for row in rows:
        builder.add_document(torch.from_numpy(row.astype(numpy.int32)), [int(row.shape[0])])
    builder.finalize(get_idx_path(partial))
    os.replace(get_bin_path(partial), get_bin_path(args.out))
    os.replace(get_idx_path(partial), get_idx_path(args.out))
    print(f"megatron_qat: {rows.shape[0]} rows of {rows.shape[1]} tokens in {args.out}.bin/.idx")


def train(args) -> None:
    from megatron.bridge import AutoBridge
    from megatron.bridge.recipes.common import _pretrain_common
    from megatron.bridge.training.gpt_step import forward_step
    from megatron.bridge.training.post_training.checkpointing import has_modelopt_state
    from megatron.bridge.training.pretrain import pretrain

    if not has_modelopt_state(args.load):
        sys.exit(f"megatron_qat: {args.load} holds no ModelOpt state: it is not a quantized Megatron checkpoint")
    cfg = _pretrain_common()
    bridge = AutoBridge.from_hf_pretrained(args.hf_path, trust_remote_code=args.trust_remote_code)
    model = cfg.model = bridge.to_megatron_provider(load_weights=False)
    model.tensor_model_parallel_size = args.tp
    model.pipeline_model_parallel_size = args.pp
    model.expert_model_parallel_size = args.ep
    model.expert_tensor_parallel_size = args.etp
    model.seq_length = args.seq_length
    model.gradient_accumulation_fusion = False  # the guide's setting for QAT
    model.restore_modelopt_state = True

    cfg.tokenizer.tokenizer_type = "HuggingFaceTokenizer"
    cfg.tokenizer.tokenizer_model = args.hf_path
    cfg.dataset.blend = ([args.data], None)
    cfg.dataset.split = "1,0,0"  # every row trains; the held-out text is the launcher's fidelity text
    cfg.dataset.seq_length = args.seq_length
    cfg.dataset.random_seed = args.seed
    cfg.dataset.num_workers = 1

    cfg.train.train_iters = args.steps
    cfg.train.global_batch_size = args.global_batch_size
    cfg.train.micro_batch_size = args.micro_batch_size
    cfg.validation.eval_iters = 0
    cfg.validation.eval_interval = None
    cfg.optimizer.lr = args.lr
    cfg.optimizer.min_lr = 0.0 if args.schedule != "constant" else args.lr
    cfg.scheduler.lr_warmup_iters = args.warmup_iters
    cfg.scheduler.lr_decay_iters = args.steps
    cfg.scheduler.lr_decay_style = args.schedule
    cfg.rng.seed = args.seed

    cfg.checkpoint.pretrained_checkpoint = args.load
    cfg.checkpoint.finetune = True
    cfg.checkpoint.load = None
    cfg.checkpoint.save = args.save
    cfg.checkpoint.save_interval = args.steps
    cfg.logger.log_interval = 1
    cfg.logger.tensorboard_dir = None
    cfg.logger.log_timers_to_tensorboard = False

    pretrain(config=cfg, forward_step_func=forward_step)


def parse(argv):
    parser = argparse.ArgumentParser(prog="megatron_qat.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("data")
    d.add_argument("--rows", required=True)
    d.add_argument("--out", required=True)
    t = sub.add_parser("train")
    for flag in ("--hf-path", "--load", "--save", "--data"):
        t.add_argument(flag, required=True)
    for flag in ("--steps", "--global-batch-size", "--seq-length"):
        t.add_argument(flag, type=int, required=True)
    t.add_argument("--micro-batch-size", type=int, default=1)
    t.add_argument("--warmup-iters", type=int, default=0)
    t.add_argument("--lr", type=float, required=True)
    t.add_argument("--schedule", choices=SCHEDULES, default="cosine")
    t.add_argument("--seed", type=int, default=1234)
    for flag in ("--tp", "--pp", "--ep", "--etp"):
        t.add_argument(flag, type=int, default=1)
    t.add_argument("--trust-remote-code", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse(sys.argv[1:] if argv is None else argv)
    data(args) if args.command == "data" else train(args)


if __name__ == "__main__":
    main()
