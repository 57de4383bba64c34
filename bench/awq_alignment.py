"""INT4 AWQ on SmolLM2-135M, PTQ and 20 QAD steps, with the in-memory model aligned with the export right after
calibration (the launcher's behaviour) and without (`--unaligned`: the grouped layers' AWQ scales averaged only by
the export, as before): how far the checkpoint as written is from the model measured in memory.

    python -m bench.awq_alignment --smollm2 <converted SmolLM2 folder> --out DIR [--unaligned]

Prints one JSON line per run (in-memory and written mean KL, with per-sequence values) and leaves the run records
under DIR/runs. Calibration, fidelity and training text as the tests use them (WikiText-2 when PTQ_TEST_TEXT or the
evaluation data is there, else self-sampled text): 8 x 64 calibration tokens, 4 x 64 held-out tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ptq.backends import hf_modelopt
from ptq.run import run
from ptq.schema import register_schemas
from ptq.state import ProcessState

REPO = Path(__file__).resolve().parents[1]
QAD = ["recover=qad", "recover.steps=20", "recover.batch_size=4", "recover.seq_len=64", "recover.lr=1e-4"]


def overrides(out: Path, smollm2: str, text: str, extra) -> list:
    return [
        f"model.path={smollm2}",
        "recipe=int4_awq",
        f"output_root={out / 'runs'}",
        f"cache_dir={out / 'cache'}",
        f"calib.dataset={text}",
        "calib.size=8",
        "calib.seq_len=64",
        f"fidelity.text={text}",
        "fidelity.samples=4",
        "fidelity.seq_len=64",
        *extra,
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smollm2", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--text", default="self", help="calibration and held-out text (default: self-sampled)")
    parser.add_argument("--unaligned", action="store_true", help="skip the alignment (the behaviour before it)")
    args = parser.parse_args()
    if args.unaligned:
        hf_modelopt.align_with_export = lambda model: None
    register_schemas()
    state = ProcessState()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        for extra in ([], QAD):
            cfg = compose(config_name="config", overrides=overrides(args.out, args.smollm2, args.text, extra))
            record = run(OmegaConf.to_object(cfg), OmegaConf.to_container(cfg, resolve=True), state=state)
            fid, written = record["fidelity"], record["fidelity"]["exported_checkpoint"]
            line = {
                "aligned": not args.unaligned,
                "recover": "qad20" if extra else "none",
                "in_memory_kl": fid["mean_kl"],
                "written_kl": written["mean_kl"],
                "in_memory_per_sequence": fid["per_sequence"]["kl"],
                "written_per_sequence": written["per_sequence"]["kl"],
            }
            print(json.dumps(line), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
