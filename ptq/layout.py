"""Names of what the launcher writes. Imports nothing of the project.

Every run owns one output folder:

    <output_dir>/
        run.json             the run record (ptq/record_parts.py); status running | finished | failed
        run.lock             held by the run writing the folder (ptq/lock.py)
        run.log              the run's log
        checkpoint/          the exported, validated checkpoint (appears only once complete)
        checkpoint.partial/  the export while it is written and checked
        eval_data/           benchmark files as fed to lm-eval
        logs/                output of the Megatron-Bridge steps
        hydra/               the composed config and the overrides of the run

A sweep's folder (hydra.sweep.dir) holds sweep.json, the manifest `python -m ptq.status` reads.
"""

RECORD_NAME = "run.json"
LOCK_NAME = "run.lock"
LOG_NAME = "run.log"
CONFIG_DIR_NAME = "hydra"
CHECKPOINT_NAME = "checkpoint"
# A backend exports here; the folder is renamed to CHECKPOINT_NAME once validated.
PARTIAL_NAME = CHECKPOINT_NAME + ".partial"
EVAL_WORK_NAME = "eval_data"
LOG_DIR_NAME = "logs"
MANIFEST_NAME = "sweep.json"
# Markers ModelOpt's export writes into a checkpoint folder.
QUANT_CONFIG_NAME = "hf_quant_config.json"
