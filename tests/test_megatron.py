"""Megatron-Bridge backend: the exact upstream command lines, layout checks, and real torchrun orchestration.

Megatron-Bridge itself needs CUDA and Transformer Engine, which these machines lack, so the
orchestration test runs stand-in scripts (tests/megatron_standin/) under a real torchrun with gloo.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from conftest import GPU_FACTS as GPU
from conftest import compose_run, text_source
from conftest import plan_for as plan_on

from ptq.backends.megatron_steps import ENTRY, build_steps, check_scripts, describe_steps, unsupported_flags
from ptq.cluster import process_rank
from ptq.errors import ConfigError
from ptq.plan import Facts, make_plan
from ptq.run import execute, run

STANDIN = Path(__file__).parent / "megatron_standin"
# Megatron-Bridge's quantize.py reads its calibration text itself: a dataset name or a file, never "self".
MB = ["backend=megatron_bridge", "calib.dataset=cnn_dailymail"]
SUPER = [
    *MB,
    "model=nemotron-3-super-120b-a12b",
    "recipe=mamba_moe_nvfp4_conservative",
    "parallelism=tp8_pp2_ep8",
    "hardware=h100",
    "output_root=/ckpt",
    "output_dir=/ckpt/super-nvfp4",
]


def plan_for(overrides, facts=GPU):
    return plan_on(overrides, facts)


def test_nemotron_super_commands_on_two_nodes():
    steps = build_steps(
        plan_for(SUPER),
        Path("/ckpt/super-nvfp4/megatron"),
        Path("/ckpt/super-nvfp4/hf"),
        env={"MASTER_ADDR": "node001", "SLURM_JOB_ID": "4242"},
    )
    assert [s.name for s in steps] == ["quantize", "generate", "export"]
    assert steps[0].argv == [
        "torchrun",
        "--nproc_per_node=8",
        "--nnodes=2",
        "--rdzv_backend=c10d",
        "--rdzv_endpoint=node001:29500",
        "--rdzv_id=4242",
        str(ENTRY),
        "/opt/Megatron-Bridge/examples/quantization/quantize.py",
        "--hf-model-id",
        "nvidia/NVIDIA-Nemotron-3-Super-120B-A12B-BF16",
        "--export-quant-cfg",
        "mamba_moe_nvfp4_conservative",
        "--megatron-save-path",
        "/ckpt/super-nvfp4/megatron",
        "--tp",
        "8",
        "--pp",
        "2",
        "--ep",
        "8",
        "--etp",
        "1",
        "--calib-size",
        "512",
        "--calib-seq-length",
        "512",
        "--calib-batch-size",
        "16",
        "--calib-dataset",
        "cnn_dailymail",
        "--prompts",
        "Hello!|Born in California, Soyer trained as a",
        "--trust-remote-code",
    ]
    assert steps[1].argv[6:11] == [
        str(ENTRY),
        "/opt/Megatron-Bridge/examples/quantization/ptq_generate.py",
        "--hf-model-id",
        "nvidia/NVIDIA-Nemotron-3-Super-120B-A12B-BF16",
        "--megatron-load-path",
    ]
    # Export gathers no TP shards: TP 1, the quantize step's PP, on one node (a rendezvous of its own).
    assert steps[2].argv == [
        "torchrun",
        "--nproc_per_node=2",
        "--standalone",
        str(ENTRY),
        "/opt/Megatron-Bridge/examples/quantization/export.py",
        "--hf-model-id",
        "nvidia/NVIDIA-Nemotron-3-Super-120B-A12B-BF16",
        "--megatron-load-path",
        "/ckpt/super-nvfp4/megatron",
        "--export-dir",
        "/ckpt/super-nvfp4/hf",
        "--tp",
        "1",
        "--pp",
        "2",
        "--ep",
        "1",
        "--etp",
        "1",
        "--dtype",
        "bfloat16",
        "--trust-remote-code",
    ]


def test_a_text_file_is_handed_to_the_scripts_as_jsonl_with_the_same_tokens(tmp_path, smollm2_dir):
    """ModelOpt's Megatron calibration loader packs JSONL text exactly as the in-process backend cuts a text file:
    the same tokens reach both backends."""
    from modelopt.torch.utils.dataset_utils import get_dataset_dataloader
    from transformers import AutoTokenizer

    from ptq.backends.megatron_steps import calib_dataset, write_calib_jsonl
    from ptq.calib_data import token_batches

    text = tmp_path / "calib.txt"
    text.write_text(
        "The quick brown fox jumps over the lazy dog. " * 40 + "\n\nA second paragraph, with numbers 1 2 3.\n" * 10
    )
    plan = plan_for(
        [
            *MB,
            "model=qwen3-8b",
            "recipe=fp8",
            "hardware=h100",
            f"calib.dataset={text}",
            "calib.size=6",
            "calib.seq_len=32",
            f"output_root={tmp_path}",
            f"output_dir={tmp_path / 'out'}",
        ]
    )
    jsonl = write_calib_jsonl(plan)
    assert calib_dataset(plan) == str(jsonl) == str(tmp_path / "out" / "calib.jsonl")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    ours = token_batches(
        str(text),
        model=None,
        tokenizer=tokenizer,
        model_id="x",
        samples=6,
        seq_len=32,
        seed=0,
        cache_dir=str(tmp_path),
        sample_batch_size=1,
    )
    loader = get_dataset_dataloader(
        dataset_name=str(jsonl),
        tokenizer=tokenizer,
        batch_size=6,
        num_samples=6,
        max_sample_length=32,
        device=None,
        pack=True,
    )
    theirs = next(iter(loader))["input_ids"]
    assert theirs.shape == ours.shape == (6, 32)
    assert theirs.tolist() == ours.tolist()
    # A JSONL is handed over as it is; a dataset name too; "self" cannot be (the scripts never see the BF16 model here).
    given = tmp_path / "given.jsonl"
    given.write_text('{"text": "hello"}\n')
    assert calib_dataset(plan_for([*MB, "model=qwen3-8b", "hardware=h100", f"calib.dataset={given}"])) == str(given)
    with pytest.raises(ConfigError, match="calib.dataset=self.*local .txt or .jsonl"):
        plan_for(["backend=megatron_bridge", "model=qwen3-8b", "hardware=h100"])


def test_generation_answers_are_parsed_from_the_scripts_output():
    from ptq.backends.megatron_bridge import parse_generations

    out = (
        "[rank0]: noise\nPrompt 1: Hello!\nGenerated: ['Hello! How can I help you today?']\n"
        "Prompt 2: Born in California, Soyer trained as a\nGenerated: [\"a painter, and 'moved'\"]\nGeneration completed\n"
    )
    assert parse_generations(out) == [
        {"prompt": "Hello!", "generated": "Hello! How can I help you today?"},
        {"prompt": "Born in California, Soyer trained as a", "generated": "a painter, and 'moved'"},
    ]
    assert parse_generations("nothing here") == []


def test_ranks_started_by_srun_run_the_script_directly():
    steps = build_steps(plan_for(SUPER), Path("/m"), Path("/e"), env={"WORLD_SIZE": "16", "RANK": "3"})
    assert steps[0].argv[:3] == ["python", str(ENTRY), "/opt/Megatron-Bridge/examples/quantization/quantize.py"]
    # The export is TP 1 x PP 2: ranks 0 and 1 run it in a world of their own; the other 14 skip it.
    export = steps[-1]
    assert export.name == "export" and export.ranks == 2 and dict(export.env) == {"WORLD_SIZE": "2"}
    assert steps[0].ranks > 16 and not steps[0].env


def test_process_rank_reads_the_global_rank_or_the_slurm_task():
    assert process_rank({}) == 0
    assert process_rank({"SLURM_PROCID": "1"}) == 1
    assert process_rank({"SLURM_PROCID": "1", "WORLD_SIZE": "16", "RANK": "9"}) == 9
    torchrun_steps = build_steps(plan_for(SUPER), Path("/m"), Path("/e"), env={"SLURM_PROCID": "1"})
    assert torchrun_steps[-1].ranks == 1  # torchrun on the first node only


def _node(rank, overrides, env, results):
    """One node's task of a two-node job (a forked process, as Slurm would start one per node)."""
    import os

    import ptq.run as run_module

    os.environ.update(env, SLURM_PROCID=str(rank))
    run_module.prepare = lambda cfg: make_plan(cfg, GPU)  # these nodes pretend to have GPUs
    cfg, config = compose_run(overrides)
    try:
        results.put((rank, run_module.run(cfg, config)["status"]))
    except BaseException as exc:  # reported to the test, not lost in the child
        results.put((rank, f"{type(exc).__name__}: {exc}"))


@pytest.mark.slow
def test_two_node_job_only_the_first_node_exports_and_keeps_the_record(tmp_path):
    import multiprocessing

    log_dir = tmp_path / "ranks"
    log_dir.mkdir()
    overrides = [
        *MB,
        "model=qwen3-8b",
        "recipe=fp8",
        "hardware=h100",
        "parallelism=tp2",
        "parallelism.nodes=2",
        "parallelism.gpus_per_node=1",
        "fidelity.enabled=false",
        f"backend.scripts_dir={STANDIN}",
        f"backend.torchrun={sys.executable} -m torch.distributed.run",
        f"backend.python={sys.executable}",
        "backend.rdzv_port=29613",
        f"output_root={tmp_path / 'runs'}",
    ]
    env = {"STANDIN_LOG": str(log_dir), "MASTER_ADDR": "127.0.0.1", "SLURM_JOB_ID": "4242"}
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    nodes = [ctx.Process(target=_node, args=(rank, overrides, env, results)) for rank in (0, 1)]
    for node in nodes:
        node.start()
    for node in nodes:
        node.join(timeout=300)
    status = dict(results.get(timeout=5) for _ in nodes)
    assert status == {0: "finished", 1: "worker"}
    ranks = {p.stem: json.loads(p.read_text()) for p in log_dir.glob("*.json")}
    # Both nodes joined one quantize and one generate group of world size 2; the export ran once, on node 0.
    assert set(ranks) == {"quantize-rank0", "quantize-rank1", "generate-rank0", "generate-rank1", "export-rank0"}
    assert ranks["quantize-rank1"]["world"] == 2 and ranks["export-rank0"]["world"] == 1
    (record_path,) = (tmp_path / "runs").rglob("run.json")
    assert json.loads(record_path.read_text())["status"] == "finished"


def test_in_process_backend_refuses_to_run_as_a_second_task(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_PROCID", "1")
    cfg, config = compose_run([f"output_root={tmp_path}", "fidelity.enabled=false"])
    with pytest.raises(ConfigError, match="runs in one process.*rank 1"):
        run(cfg, config)
    assert not list(tmp_path.rglob("run.json"))


@pytest.mark.parametrize(
    "recipe,name",
    [
        ("fp8", "fp8"),
        ("fp8_blockwise", "fp8_blockwise"),
        ("nvfp4", "nvfp4"),
        ("mamba_moe_fp8_aggressive", "mamba_moe_fp8_aggressive"),
    ],
)
def test_each_recipe_passes_its_megatron_name(recipe, name):
    plan = plan_for(
        [*MB, "model=qwen3-8b", f"recipe={recipe}", "parallelism=tp2", "hardware=b200", "recipe.kv_cache=fp8"]
    )
    quantize = build_steps(plan, Path("/m"), Path("/e"), env={})[0].argv
    assert quantize[quantize.index("--export-quant-cfg") + 1] == name
    assert "--export-kv-cache-quant" in quantize
    assert ("--weight-only" in quantize) == (recipe == "fp8_blockwise")


@pytest.mark.parametrize("recipe", ["int8_sq", "int4_awq", "w4a8_awq"])
def test_recipes_the_megatron_export_cannot_write_are_refused_before_running(recipe):
    # On two H200s the quantize and generate steps of these ran, then ModelOpt's Megatron-Core export raised
    # on the SmoothQuant scales (int8_sq) or wrote int4_awq without hf_quant_config.json.
    with pytest.raises(ConfigError, match=f"recipe={recipe} exports as .*backend=hf_modelopt"):
        plan_for([*MB, "model=qwen3-8b", f"recipe={recipe}", "parallelism=tp2", "hardware=h100"])


def test_the_megatron_export_formats_match_the_installed_modelopt():
    """ModelOpt's Megatron-Core export names the formats it writes and refuses SmoothQuant/AWQ scales; when a
    ModelOpt release changes that, this fails and MEGATRON_EXPORT_ALGOS needs another look."""
    import modelopt.torch.export as mtex

    from ptq.backend_spec import MEGATRON_EXPORT_ALGOS

    source = (Path(mtex.__file__).parent / "unified_export_megatron.py").read_text()
    assert "SmoothQuant/AWQ are not yet supported" in source
    branch = source[source.index("quantization_format = self._get_quantization_format(self.model)") :]
    branch = branch[: branch.index("if is_last_stage_main_rank")]
    for constant in (
        "QUANTIZATION_FP8_PB_REAL",
        "QUANTIZATION_FP8_PB_WO",
        "QUANTIZATION_FP8",
        "QUANTIZATION_NVFP4",
        "QUANTIZATION_W4A16_NVFP4",
    ):
        assert constant in branch
    assert "AWQ" not in branch and "W8A8" not in branch and "INT8" not in branch
    assert set(MEGATRON_EXPORT_ALGOS) == {"FP8", "FP8_PB_WO", "FP8_PB_REAL", "NVFP4", "W4A16_NVFP4"}


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["recipe=nvfp4_awq"], "no Megatron-Bridge --export-quant-cfg"),
        (["recipe=bf16"], "no Megatron-Bridge --export-quant-cfg"),
        (["parallelism=tp8", "parallelism.gpus_per_node=4"], "does not divide the world size"),
        (
            ["parallelism=tp8_ep8", "parallelism.nodes=1", "parallelism.gpus_per_node=8", "parallelism.pp=2"],
            "does not divide",
        ),
        (["parallelism=tp8_ep8"], "needs a mixture-of-experts model"),
        (["model=nemotron-h-8b", "parallelism=tp8_ep8"], "nemotron-h-8b has no routed experts"),
        (
            ["model=qwen3-30b-a3b", "parallelism=tp4", "parallelism.ep=3", "parallelism.gpus_per_node=12"],
            "does not divide the 128 experts",
        ),
        (["model=nemotron-h-8b", "model.mamba_ngroups=8", "parallelism=tp8", "parallelism.tp=8"], None),
        (["recipe=int4_awq", "recipe.awq_block_size=64"], "always uses 128"),
        (["recipe=int4_awq"], "exports as W4A16_AWQ"),
        (["hardware=cpu"], "runs on CUDA GPUs"),
    ],
)
def test_impossible_layouts_are_refused_before_submitting(overrides, message):
    base = [*MB, "model=qwen3-8b", "recipe=fp8", "hardware=h100"]
    if message is None:
        assert plan_for(base + overrides).action == "run"
        return
    with pytest.raises(ConfigError, match=message):
        plan_for(base + overrides)


def test_mamba_groups_must_divide_tp():
    with pytest.raises(ConfigError, match="Mamba groups"):
        plan_for(
            [
                *MB,
                "model=nemotron-h-8b",
                "model.mamba_ngroups=8",
                "parallelism=tp8",
                "parallelism.tp=16",
                "parallelism.gpus_per_node=16",
                "recipe=fp8",
                "hardware=h100",
            ]
        )


def test_flags_the_installed_scripts_lack_are_refused(tmp_path):
    assert unsupported_flags(["--tp", "2", "--calib-dataset=c4"], 'add_argument("--tp")') == ["--calib-dataset"]
    plan = plan_for(
        [
            *MB,
            "model=qwen3-8b",
            "recipe=fp8",
            "hardware=h100",
            f"backend.scripts_dir={STANDIN}",
            "backend.extra_args=[--calib-shuffle-seed,7]",
        ]
    )
    steps = build_steps(plan, tmp_path / "m", tmp_path / "e", env={})
    with pytest.raises(ConfigError, match="does not accept --calib-shuffle-seed"):
        check_scripts(plan, steps)
    missing = plan_for(
        [*MB, "model=qwen3-8b", "recipe=fp8", "hardware=h100", f"backend.scripts_dir={tmp_path / 'nowhere'}"]
    )
    with pytest.raises(ConfigError, match="/opt/Megatron-Bridge/examples/quantization"):
        check_scripts(missing, build_steps(missing, tmp_path / "m", tmp_path / "e", env={}))


def test_dry_run_prints_the_commands_and_writes_nothing(tmp_path):
    cfg, config = compose_run(
        SUPER[:-2] + [f"output_root={tmp_path}", f"output_dir={tmp_path / 'out'}", "dry_run=true"]
    )
    from ptq.run import run

    summary = run(cfg, config)
    assert summary["status"] == "dry_run" and len(summary["commands"]) == 3
    assert "--export-quant-cfg mamba_moe_nvfp4_conservative" in summary["commands"][0]
    assert not (tmp_path / "out").exists()
    assert describe_steps(make_plan(cfg, GPU), env={})[2].startswith("torchrun --nproc_per_node=2 --standalone")


@pytest.mark.slow
def test_steps_run_under_a_real_torchrun_and_the_export_is_validated(tmp_path, monkeypatch):
    log_dir = tmp_path / "ranks"
    log_dir.mkdir()
    monkeypatch.setenv("STANDIN_LOG", str(log_dir))
    for var in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(var, raising=False)
    cfg, config = compose_run(
        [
            *MB,
            "model=qwen3-8b",
            "recipe=fp8",
            "hardware=h100",
            "parallelism=tp2",
            f"backend.scripts_dir={STANDIN}",
            f"backend.torchrun={sys.executable} -m torch.distributed.run",
            f"backend.python={sys.executable}",
            "backend.rdzv_port=29611",
            f"output_root={tmp_path / 'runs'}",
            "calib.size=16",
            "fidelity.enabled=false",
        ]
    )  # an 8B model cannot be read back here; see the SmolLM2 test below
    record = execute(make_plan(cfg, GPU), config)
    assert record["status"] == "finished", record.get("error")
    assert record["validation"]["passed"] and record["validation"]["quant_algo"] == "FP8"
    assert Path(record["checkpoint"], "model.safetensors").exists()
    ranks = {p.stem: json.loads(p.read_text()) for p in log_dir.glob("*.json")}
    assert set(ranks) == {"quantize-rank0", "quantize-rank1", "generate-rank0", "generate-rank1", "export-rank0"}
    assert ranks["quantize-rank1"]["world"] == 2 and ranks["export-rank0"]["world"] == 1
    argv = ranks["quantize-rank0"]["argv"]
    assert argv[argv.index("--tp") + 1] == "2" and argv[argv.index("--calib-size") + 1] == "16"
    export_argv = ranks["export-rank0"]["argv"]
    assert export_argv[export_argv.index("--tp") + 1] == "1"
    assert set(record["timings_s"]) >= {"quantize", "generate", "export", "validate"}
    # The generation check's answers (printed by rank 0) are kept, and each step's output is in logs/.
    answers = record["details"]["generation"]["generate"]
    assert [a["prompt"] for a in answers] == ["Hello!", "Born in California, Soyer trained as a"]
    assert Path(record["details"]["logs"]["quantize"]).read_text().count("Generated:") == 2


@pytest.mark.slow
def test_a_failing_step_fails_the_run_without_a_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("STANDIN_LOG", str(tmp_path / "missing-folder"))  # the stand-in cannot write its log
    cfg, config = compose_run(
        [
            *MB,
            "model=qwen3-8b",
            "recipe=fp8",
            "hardware=h100",
            f"backend.scripts_dir={STANDIN}",
            f"backend.torchrun={sys.executable} -m torch.distributed.run",
            "backend.rdzv_port=29612",
            f"output_root={tmp_path / 'runs'}",
        ]
    )
    with pytest.raises(RuntimeError, match="quantize step exited"):
        execute(make_plan(cfg, GPU), config)
    out = next((tmp_path / "runs" / "qwen3-8b").iterdir())
    assert json.loads((out / "run.json").read_text())["status"] == "failed"
    assert not (out / "checkpoint").exists()


@pytest.mark.slow
def test_megatron_export_is_read_back_measured_and_tabulated_beside_the_in_process_one(
    smollm2_dir, tmp_path, monkeypatch
):
    """The Megatron path's export is measured by reading it back from disk. The stand-in export hands over a real
    SmolLM2 FP8 export made by the in-process backend, so both backends measure the very same file: their
    figures for the written checkpoint must agree, and the report lists both."""
    from conftest import small_run_overrides

    from ptq.report import build_report

    arc = tmp_path / "arc.jsonl"
    arc.write_text(
        "\n".join(
            json.dumps({"question": q, "choices": {"label": ["A", "B"], "text": c}, "answerKey": "A"})
            for q, c in [
                ("What is the capital of France?", ["Paris", "Tokyo"]),
                ("What do bees make?", ["honey", "steel"]),
                ("Which is a colour?", ["blue", "seven"]),
            ]
        )
        + "\n"
    )
    eval_args = [
        "eval=local_quick",
        "eval.suite=tiny",
        "eval.bootstrap_iters=0",
        f"eval.benchmarks=[{{name: arc, kind: multiple_choice, format: arc_jsonl, path: '{arc}'}}]",
    ]
    common = small_run_overrides(
        tmp_path, "recipe=fp8", f"model.path={smollm2_dir}", "fidelity.exported_check=full", *eval_args
    )
    cfg, config = compose_run(common)
    in_process = run(cfg, config)
    assert in_process["status"] == "finished", in_process.get("error")

    monkeypatch.setenv("STANDIN_LOG", str(tmp_path))
    monkeypatch.setenv("STANDIN_EXPORT_FROM", in_process["checkpoint"])
    for var in ("WORLD_SIZE", "RANK", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    cfg, config = compose_run(
        common
        + [
            "backend=megatron_bridge",
            "hardware=h100",
            "backend.generate_check=false",
            f"backend.scripts_dir={STANDIN}",
            *(["calib.dataset=cnn_dailymail"] if text_source() == "self" else []),
            f"backend.torchrun={sys.executable} -m torch.distributed.run",
            "backend.rdzv_port=29614",
            f"output_root={tmp_path}",
            f"output_dir={tmp_path / 'megatron-fp8'}",
        ]
    )
    plan = make_plan(cfg, Facts(cuda_available=True, local_model_ok=True))
    # The Megatron steps need CUDA (the plan insists on it); the measurement runs wherever the model fits:
    # here, on the CPU in FP32 like the in-process run above.
    plan.cfg.hardware.device, plan.cfg.hardware.dtype = "cpu", "float32"
    megatron = execute(plan, config)
    assert megatron["status"] == "finished", megatron.get("error")

    fid, written = megatron["fidelity"], in_process["fidelity"]["exported_checkpoint"]
    assert fid["measured_on"] == "exported checkpoint" and fid["simulated"]["formats"] == {"FP8": 210}
    assert fid["mean_kl"] > 0
    assert fid["mean_kl"] == pytest.approx(written["mean_kl"], rel=1e-3)
    assert fid["bf16_perplexity"] == pytest.approx(in_process["fidelity"]["bf16_perplexity"], rel=1e-3)
    assert megatron["evaluation"]["measured_on"] == "exported checkpoint"
    assert {r["benchmark"] for r in megatron["evaluation"]["results"]} == {"arc"}

    report = build_report([in_process, megatron])
    variants = set(report.summary["variant"])
    assert {"fp8@4", "fp8@4 (megatron_bridge)"} <= variants
    arc_rows = report.scores[(report.scores["benchmark"] == "arc") & (report.scores["variant"] != "bf16")]
    assert set(arc_rows["variant"]) == {"fp8@4", "fp8@4 (megatron_bridge)"} and arc_rows["recovery"].notna().all()


def test_export_is_measured_only_when_the_bf16_model_fits_one_gpu():
    from ptq.backend_spec import export_measurement

    super_plan = plan_for(SUPER)
    assert not super_plan.measure_export
    assert any("240 GB" in w and "fidelity=none eval=none" in w for w in super_plan.warnings)
    assert plan_for([*MB, "model=qwen3-8b", "recipe=fp8", "hardware=h100"]).measure_export
    cfg, _ = compose_run(SUPER + ["fidelity=none"])  # eval is off by default: nothing to measure, no warning
    assert export_measurement(cfg) == "off"
    cfg, _ = compose_run(["recipe=fp8"])  # the in-process backend measures its own model
    assert export_measurement(cfg) == "off"


def test_missing_megatron_packages_are_named_before_the_scripts_start(tmp_path):
    """This machine has no Megatron-Bridge: run through the entry, a script in a Megatron-Bridge folder (one that
    holds quantize_utils.py) stops at once with the missing distributions and the install command."""
    import subprocess

    from ptq.backends.megatron_entry import MISSING_EXIT

    (tmp_path / "quantize_utils.py").write_text("raise SystemExit('the script itself must not start')\n")
    (tmp_path / "quantize.py").write_text("import quantize_utils\n")
    done = subprocess.run([sys.executable, str(ENTRY), str(tmp_path / "quantize.py")], capture_output=True, text=True)
    assert done.returncode == MISSING_EXIT
    assert "megatron-bridge, megatron-core, transformer-engine" in done.stderr
    assert "pip install -e '.[megatron]'" in done.stderr and "install-offline.sh WHEELHOUSE --megatron" in done.stderr
    assert "must not start" not in done.stderr + done.stdout


def test_a_mamba_model_also_needs_mamba_ssm_and_causal_conv1d(tmp_path):
    """For models with Mamba layers the entry also asks for mamba-ssm and causal-conv1d (this machine has neither)
    and names the script that builds their wheels."""
    import subprocess

    from ptq.backends.megatron_entry import MAMBA_ENV, MISSING_EXIT

    (tmp_path / "quantize_utils.py").write_text("raise SystemExit('the script itself must not start')\n")
    (tmp_path / "quantize.py").write_text("import quantize_utils\n")
    argv = [sys.executable, str(ENTRY), str(tmp_path / "quantize.py")]
    mamba = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, MAMBA_ENV: "1"})
    assert mamba.returncode == MISSING_EXIT
    assert "mamba-ssm, causal-conv1d, which the Megatron scripts need" in mamba.stderr
    assert "for this model (Mamba layers)" in mamba.stderr and "scripts/mamba-wheels.sh" in mamba.stderr
    dense = subprocess.run(
        argv, capture_output=True, text=True, env={k: v for k, v in os.environ.items() if k != MAMBA_ENV}
    )
    assert "mamba-ssm" not in dense.stderr and dense.returncode == MISSING_EXIT


def test_a_failing_step_reports_the_end_of_its_output(tmp_path, monkeypatch):
    from ptq.backends.megatron_bridge import run_steps
    from ptq.record_parts import StageTimer

    step = build_steps(
        plan_for([*MB, "model=qwen3-8b", "recipe=fp8", "hardware=h100"]), tmp_path / "m", tmp_path / "e", env={}
    )[0]
    failing = type(step)(
        "quantize",
        [
            sys.executable,
            "-c",
            "import sys; print('loading'); print('ValueError: bad scale'); "
            "print('UserWarning: ignore me'); sys.exit(4)",
        ],
    )
    with pytest.raises(
        RuntimeError, match=r"exited with status 4; the end of its output .*\nloading\nValueError: bad scale\n"
    ):
        run_steps([failing], {}, StageTimer(), tmp_path / "logs")
    assert "UserWarning" in (tmp_path / "logs" / "quantize.log").read_text()


def test_the_entry_turns_wgrad_fusion_off_through_megatron_configs_post_init(tmp_path):
    """Megatron-Core 0.19 has no wheel for this Python (3.12 only), so a two-class stand-in with its shape stands
    in here: a ModelParallelConfig dataclass whose subclass's __post_init__ calls super(), and a provider that
    runs the subclass's __post_init__ later, as Megatron-Bridge's finalize() does. On the H200s the real classes
    took the same path (the records' details.notes say the fusion was forced off)."""
    import subprocess

    package = tmp_path / "megatron" / "core"
    package.mkdir(parents=True)
    (tmp_path / "megatron" / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "model_parallel_config.py").write_text(
        "from dataclasses import dataclass\n"
        "@dataclass\n"
        "class ModelParallelConfig:\n"
        "    gradient_accumulation_fusion: bool = True\n"
        "    def __post_init__(self):\n"
        "        self.checked = True\n"
        "@dataclass\n"
        "class TransformerConfig(ModelParallelConfig):\n"
        "    num_layers: int = 2\n"
        "    def __post_init__(self):\n"
        "        super().__post_init__()\n"
        "class Provider(TransformerConfig):\n"
        "    def __post_init__(self):\n"
        "        pass  # deferred\n"
        "    def finalize(self):\n"
        "        TransformerConfig.__post_init__(self)\n"
    )
    code = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "from ptq.backends.megatron_entry import force_wgrad_fusion_off\n"
        "from megatron.core.model_parallel_config import TransformerConfig, Provider\n"
        "before = TransformerConfig(gradient_accumulation_fusion=True).gradient_accumulation_fusion\n"
        "assert force_wgrad_fusion_off() and force_wgrad_fusion_off()  # applying it twice is harmless\n"
        "config = TransformerConfig(gradient_accumulation_fusion=True)\n"
        "provider = Provider(gradient_accumulation_fusion=True); provider.finalize()\n"
        "print(before, config.gradient_accumulation_fusion, config.checked, provider.gradient_accumulation_fusion)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, cwd=Path(__file__).parents[1]
    )
    assert done.stdout.split() == ["True", "False", "True", "False"], done.stderr
    # Without Megatron-Core there is nothing to patch, and the script is left to fail on its own imports.
    from ptq.backends.megatron_entry import force_wgrad_fusion_off

    assert force_wgrad_fusion_off() is False
