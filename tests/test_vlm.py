"""Vision-language models: only the language model is quantized, the vision tower and projector stay BF16 byte for
byte, calibration takes text or image-text pairs, and the export reloads with its processor (ptq/vlm.py)."""

from __future__ import annotations

import json
import struct
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import GGUF_FACTS, GPU_FACTS, compose_run, plan_for, small_run_overrides

from ptq import layerkinds, vlm
from ptq.errors import ConfigError
from ptq.evaluation.readers import read_image_choice
from ptq.report.calib_kinds import finding
from ptq.report.render import render_markdown
from ptq.report.tables import build_report
from ptq.validate import compare_vision_tensors, export_names


def vlm_facts(model_type="gemma3", **more):
    return replace(GGUF_FACTS, local_model_ok=True, local_vision_language=model_type, **more)


def test_a_vision_language_model_keeps_its_vision_tower_and_projector_out_of_quantization():
    plan = plan_for(["model.path=/models/gemma3", "recipe=fp8"], vlm_facts())
    assert plan.vision_language == "gemma3" and plan.calib_kind == "text"
    assert {"*vision_tower*", "*multi_modal_projector*"} <= set(plan.exclude_patterns)
    text = plan_for(["model.path=/models/llama", "recipe=fp8"], replace(GGUF_FACTS, local_model_ok=True))
    assert text.vision_language is None and not any("vision" in p for p in text.exclude_patterns)


def test_a_checkpoint_loaded_by_hub_id_is_declared_a_vlm_by_model_vision_language():
    plan = plan_for(
        [
            "model.path=null",
            "model.gguf_package=null",
            "model.hf_id=Qwen/Qwen2.5-VL-3B-Instruct",
            "model.vision_language=qwen2_5_vl",
            "recipe=fp8",
        ]
    )
    assert plan.vision_language == "qwen2_5_vl" and "*visual*" in plan.exclude_patterns
    with pytest.raises(ConfigError, match="says model_type=gemma3"):
        plan_for(["model.path=/m", "model.vision_language=qwen2_5_vl"], vlm_facts("gemma3"))


@pytest.mark.parametrize(
    "overrides,facts,message",
    [
        (
            ["backend=megatron_bridge", "calib.dataset=cnn_dailymail", "recipe=fp8", "hardware=h100"],
            replace(GPU_FACTS, gpu_count=1),
            "quantize_vlm.py calibrates only on COCO",
        ),
        (["recover=qat", "recipe=int4_awq"], None, "recover=qat with a vision-language model"),
        (["recipe=auto_quantize_cpu"], None, "searches per-layer formats"),
    ],
)
def test_what_is_not_done_for_a_vlm_yet_is_refused_before_loading(overrides, facts, message):
    facts = replace(facts or GGUF_FACTS, local_model_ok=True, local_vision_language="gemma3")
    with pytest.raises(ConfigError, match=message):
        plan_for(["model.path=/models/gemma3", *overrides], facts)


def test_image_text_calibration_of_a_qwen_vl_model_needs_torchvision():
    overrides = ["model.path=/models/qwen", "recipe=fp8", "calib.dataset=/data/pairs.jsonl"]
    with pytest.raises(ConfigError, match="reads only with torchvision"):
        plan_for(overrides, vlm_facts("qwen2_5_vl", calib_pairs=True, torchvision=False))
    assert plan_for(overrides, vlm_facts("qwen2_5_vl", calib_pairs=True, torchvision=True)).calib_kind == "image_text"
    # Gemma 3's processor has no video part: no torchvision needed.
    assert plan_for(overrides, vlm_facts("gemma3", calib_pairs=True)).calib_kind == "image_text"


def test_pairs_are_read_relative_to_their_file_and_checked(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(b"not read here")
    good = tmp_path / "pairs.jsonl"
    good.write_text(json.dumps({"image": "img/a.png", "text": "a caption"}) + "\n\n")
    [pair] = vlm.read_pairs(good)
    assert pair.image == (tmp_path / "img" / "a.png").resolve() and pair.text == "a caption" and pair.line == 1
    cases = [
        ({"text": "no image"}, ':1 has no "image" path'),
        ({"image": "img/a.png"}, ':1 has no "text" string'),
        ({"image": "pairs.jsonl", "text": "x"}, "is not an image file"),
    ]
    for row, message in cases:
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps(row) + "\n")
        with pytest.raises(ConfigError, match=message):
            vlm.read_pairs(bad)


def test_an_image_text_file_gets_its_own_output_folder(image_pairs, tmp_path):
    _, images = compose_run([f"calib.dataset={image_pairs}", f"output_root={tmp_path}"])
    _, text = compose_run([f"calib.dataset={tmp_path / 'text.txt'}", f"output_root={tmp_path}"])
    assert images["output_dir"] == text["output_dir"] + "-images"


def test_vision_modules_are_a_kind_every_recipe_leaves_in_bf16():
    assert layerkinds.kind_of("visual.blocks.0.attn.qkv") == "vision"
    assert layerkinds.kind_of("model.vision_tower.vision_model.encoder.layers.0.mlp.fc1") == "vision"
    assert layerkinds.kind_of("multi_modal_projector.linear_1") == "vision"
    assert layerkinds.kind_of("model.layers.0.self_attn.q_proj") == "attention"
    index = {
        "visual.blocks.0.attn.qkv.weight": {"dtype": "F8_E4M3", "shape": [8, 8]},
        "visual.blocks.0.attn.qkv.weight_scale": {"dtype": "F32", "shape": []},
    }
    problems = layerkinds.promise_problems(layerkinds.summarize(index), {}, None)
    assert problems == ["vision layers should be left in BF16 but 1 in FP8"]


def test_layer_names_match_across_transformers_wrapper_renames():
    index = {
        f"{n}.weight": {"dtype": "BF16", "shape": [2, 2]}
        for n in ("language_model.model.layers.0.mlp.up_proj", "vision_tower.vision_model.encoder.layers.0.mlp.fc1")
    }
    assert export_names(
        [
            "model.language_model.layers.0.mlp.up_proj",
            "model.vision_tower.vision_model.encoder.layers.0.mlp.fc1",
            "model.language_model.layers.1.mlp.up_proj",
        ],
        index,
    ) == [
        "language_model.model.layers.0.mlp.up_proj",
        "vision_tower.vision_model.encoder.layers.0.mlp.fc1",
        "model.language_model.layers.1.mlp.up_proj",  # not in the export: kept as it is
    ]


def _safetensors(path: Path, tensors: dict) -> None:
    header, data, offset = {}, b"", 0
    for name, raw in tensors.items():
        header[name] = {"dtype": "BF16", "shape": [len(raw) // 2], "data_offsets": [offset, offset + len(raw)]}
        data += raw
        offset += len(raw)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def test_the_vision_tower_is_compared_byte_for_byte_with_the_source(tmp_path):
    source, export = tmp_path / "source", tmp_path / "export"
    source.mkdir()
    export.mkdir()
    weights = {"visual.blocks.0.attn.qkv.weight": bytes(range(16)), "visual.merger.mlp.0.weight": bytes(8)}
    _safetensors(source / "model.safetensors", {**weights, "model.layers.0.mlp.up_proj.weight": bytes(4)})
    _safetensors(export / "model.safetensors", {**weights, "model.layers.0.mlp.up_proj.weight": bytes([1] * 4)})
    same = compare_vision_tensors(export, source)
    assert same["identical"] and same["tensors"] == 2 and same["parameters"] == 12
    _safetensors(export / "model.safetensors", {**weights, "visual.merger.mlp.0.weight": bytes(7) + b"\x01"})
    changed = compare_vision_tensors(export, source)
    assert not changed["identical"] and changed["differing"] == ["visual.merger.mlp.0.weight"]


def image_choice_file(folder: Path, image: str, answer=0) -> Path:
    path = folder / "pictures.jsonl"
    row = {
        "image": image,
        "question": "What is shown?",
        "choices": ["A person", "A gift box", "A logo"],
        "answer": answer,
    }
    path.write_text(json.dumps(row) + "\n" + json.dumps({**row, "answer": 2}) + "\n")
    return path


def test_image_choice_items_are_read_and_checked_before_loading(tmp_path):
    (tmp_path / "a.png").write_bytes(b"not read here")
    [first, second] = read_image_choice(image_choice_file(tmp_path, "a.png"))
    assert first["image"] == str((tmp_path / "a.png").resolve()) and first["gold"] == 0 and second["gold"] == 2
    assert first["prompt"] == "What is shown?\nAnswer with one of the choices."
    with pytest.raises(ConfigError, match=r"pictures.jsonl:1: image b.png does not exist"):
        read_image_choice(image_choice_file(tmp_path, "b.png"))
    with pytest.raises(ConfigError, match=r":1: \"answer\" 3 is not an index into its 3 choices"):
        read_image_choice(image_choice_file(tmp_path, "a.png", answer=3))
    bench = f"eval.benchmarks=[{{name: pics, kind: image_choice, path: '{image_choice_file(tmp_path, 'a.png')}'}}]"
    with pytest.raises(ConfigError, match="asks questions about images"):
        plan_for(["eval=local_quick", bench])
    assert plan_for(["eval=local_quick", bench, "model.path=/m"], vlm_facts()).vision_language == "gemma3"


def test_a_difference_is_a_finding_only_when_its_interval_excludes_zero():
    assert finding(-0.02, -0.01) == "images calibrate better (lower KL)"
    assert finding(0.01, 0.03) == "images calibrate worse (higher KL)"
    assert finding(-0.01, 0.02) == "within noise"


def vlm_run(tmp_path, model_dir, *extra):
    from ptq.run import run

    overrides = small_run_overrides(
        tmp_path,
        "recipe=fp8",
        f"model.path={model_dir}",
        "model.name=vlm",
        "model.gguf_package=null",
        "eval=none",
        *extra,
    )
    return run(*compose_run(overrides))


@pytest.mark.slow
def test_qwen_vl_quantizes_its_language_model_and_reloads_with_the_vision_tower_unchanged(qwen_vl_tiny_dir, tmp_path):
    import torch
    from transformers import AutoModelForImageTextToText, AutoTokenizer, Qwen2VLImageProcessorPil

    record = vlm_run(tmp_path, qwen_vl_tiny_dir, "fidelity.exported_check=full")
    assert record["status"] == "finished", record.get("error")
    assert record["calib_kind"] == "text" and record["details"]["calibration"]["kind"] == "text"
    calibration = record["details"]["calibration"]
    assert calibration["batch_size"] == min(record["details"]["calib_batch_size"], calibration["samples"])
    validation = record["validation"]
    assert validation["passed"], validation["problems"]
    kinds = validation["layer_kinds"]["kinds"]
    assert set(kinds["vision"]) == {"BF16"} and set(kinds["attention"]) == set(kinds["mlp"]) == {"FP8"}
    assert validation["vision_tower"]["identical"] and validation["vision_tower"]["tensors"] > 0
    # The full read-back builds the vision-language class and measures the written language model.
    written = record["fidelity"]["exported_checkpoint"]
    assert written["check"] == "full read-back" and written["simulated"]["layers"] == record["layers"]["quantized"]
    checkpoint = Path(record["checkpoint"])
    assert (checkpoint / "preprocessor_config.json").is_file() and (checkpoint / "chat_template.jinja").is_file()
    exclude = json.loads((checkpoint / "hf_quant_config.json").read_text())["quantization"]["exclude_modules"]
    assert any(e.startswith("visual") for e in exclude)
    # transformers reads the export back (ModelOpt's quantization_config aside) with its image processor.
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "modelopt"
    # The image processor as the source has it (its PIL build: torchvision, which the default build needs, is optional).
    assert (checkpoint / "preprocessor_config.json").read_text() == (
        qwen_vl_tiny_dir / "preprocessor_config.json"
    ).read_text()
    assert Qwen2VLImageProcessorPil.from_pretrained(checkpoint).size == {
        "shortest_edge": 56 * 56,
        "longest_edge": 448 * 448,
    }
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    assert tokenizer.convert_tokens_to_ids("<|image_pad|>") == config["image_token_id"]
    source = AutoModelForImageTextToText.from_pretrained(qwen_vl_tiny_dir, dtype=torch.bfloat16)
    assert type(source).__name__ == "Qwen2_5_VLForConditionalGeneration"


@pytest.mark.slow
def test_gemma3_calibrates_with_image_text_pairs_and_reloads_with_its_processor(
    gemma3_vl_tiny_dir, image_pairs, tmp_path
):
    from safetensors import safe_open
    from transformers import AutoProcessor

    # Calibrated and measured on image-text pairs (fidelity on the text positions of the same 4 pairs).
    held_out = [f"fidelity.text={image_pairs}", "fidelity.samples=4"]
    images = vlm_run(tmp_path, gemma3_vl_tiny_dir, f"calib.dataset={image_pairs}", *held_out)
    assert images["status"] == "finished", images.get("error")
    assert images["output_dir"].endswith("-images")
    assert images["calib_kind"] == "image_text"
    calibration = images["details"]["calibration"]
    assert calibration["kind"] == "image_text" and calibration["pairs"] == 4
    assert calibration["batch_size"] == 1  # one pair a forward pass, whatever the BF16 reference's batch
    # Each pair holds its image's 16 soft tokens besides the text.
    assert calibration["tokens"] > 4 * 16
    assert images["validation"]["passed"], images["validation"]["problems"]
    assert images["validation"]["vision_tower"]["identical"]
    checkpoint = Path(images["checkpoint"])
    processor = AutoProcessor.from_pretrained(checkpoint)
    assert type(processor).__name__ == "Gemma3Processor" and processor.image_seq_length == 16

    fid = images["fidelity"]
    assert images["fidelity_kind"] == "image_text" and fid["sequences"] == 4
    # Only text positions are scored: fewer than the pairs' tokens, which hold 16 image tokens each.
    assert 0 < fid["tokens"] <= calibration["tokens"] - 4 * 16 - 4
    assert fid["mean_kl"] > 0 and fid["mean_kl_stderr"] > 0

    text = vlm_run(tmp_path, gemma3_vl_tiny_dir, *held_out)
    assert text["status"] == "finished" and text["calib_kind"] == "text" and text["fidelity"]["tokens"] == fid["tokens"]
    # The activations the language model saw differ: images calibrate other input ranges than text.
    name = "language_model.model.layers.0.self_attn.q_proj.input_scale"
    scales = []
    for record in (images, text):
        with safe_open(str(Path(record["checkpoint"]) / "model.safetensors"), framework="pt") as f:
            scales.append(float(f.get_tensor(name)))
    assert scales[0] != scales[1]

    # The report pairs the two calibrations on the same held-out pairs: the difference in mean KL with its interval.
    report = build_report([images, text])
    [row] = report.calib_kinds.to_dict("records")
    assert row["images_variant"] == "fp8+images@4" and row["text_variant"] == "fp8@4" and row["sequences"] == 4
    assert row["fidelity"] == "pairs.jsonl, 4 image-text pairs"
    deltas = [a - b for a, b in zip(images["fidelity"]["per_sequence"]["kl"], text["fidelity"]["per_sequence"]["kl"])]
    assert row["kl_difference"] == pytest.approx(sum(deltas) / 4)
    assert row["kl_difference_lo"] < row["kl_difference"] < row["kl_difference_hi"]
    assert row["finding"] == finding(row["kl_difference_lo"], row["kl_difference_hi"])
    assert "image-text against text calibration" in render_markdown(report)


@pytest.mark.slow
def test_a_vlm_is_evaluated_on_questions_about_images_against_bf16(gemma3_vl_tiny_dir, image_pairs, tmp_path):
    rows = [
        ("images/grace_hopper.jpg", ["A person", "A gift box", "A logo"], 0),
        ("images/Minduka_Present_Blue_Pack.png", ["A person", "A gift box", "A logo"], 1),
        ("images/logo2.png", ["A person", "A gift box", "A logo"], 2),
    ]
    questions = image_pairs.parent / "questions.jsonl"
    questions.write_text(
        "".join(
            json.dumps({"image": i, "question": "What is shown?", "choices": c, "answer": a}) + "\n" for i, c, a in rows
        )
    )
    bench = f"eval.benchmarks=[{{name: pictures, kind: image_choice, path: '{questions}'}}]"
    record = vlm_run(tmp_path, gemma3_vl_tiny_dir, "eval=local_quick", bench, "eval.limit=null")
    assert record["status"] == "finished", record.get("error")
    evaluation = record["evaluation"]
    for side in (evaluation["results"], evaluation["baseline"]):
        scored = {r["metric"]: r for r in side if r["benchmark"] == "pictures"}
        assert set(scored) == {"acc", "acc_norm"}
        for row in scored.values():
            assert row["items"]["doc_ids"] == [0, 1, 2] and set(row["items"]["scores"]) <= {0.0, 1.0}
            assert row["value"] == pytest.approx(sum(row["items"]["scores"]) / 3) and row["fingerprint"]


@pytest.mark.slow
def test_llava_calibrates_with_images_and_keeps_its_clip_tower_and_projector(llava_tiny_dir, image_pairs, tmp_path):
    from transformers import AutoProcessor

    record = vlm_run(tmp_path, llava_tiny_dir, f"calib.dataset={image_pairs}")
    assert record["status"] == "finished", record.get("error")
    assert record["calib_kind"] == "image_text" and record["details"]["calibration"]["pairs"] == 4
    validation = record["validation"]
    assert validation["passed"], validation["problems"]
    assert validation["vision_tower"]["identical"]
    # The projector's two linear layers are part of the vision kind, left in BF16 with the CLIP tower.
    index = json.loads((Path(record["checkpoint"]) / "hf_quant_config.json").read_text())["quantization"]
    assert any("multi_modal_projector" in e for e in index["exclude_modules"])
    assert set(validation["layer_kinds"]["kinds"]["vision"]) == {"BF16"}
    assert type(AutoProcessor.from_pretrained(record["checkpoint"])).__name__ == "LlavaProcessor"


@pytest.mark.parametrize("fixture", ["gemma3_vl_tiny_dir", "llava_tiny_dir"])
def test_the_image_reaches_the_language_model_of_a_random_vlm_shape(fixture, request, image_pairs, tmp_path):
    """The random-weight VLM shapes (bench/random_checkpoint.py) must pass the image on to the language model, or
    image-text calibration and fidelity measure nothing of the image path: transformers initialises Gemma 3's
    projector matrix to zero, which made every image give the same logits. Two pictures, one prompt: the logits
    at the prompt's last position must differ. (Qwen2.5-VL's processor needs torchvision, not installed here.)"""
    import torch
    from transformers import AutoModelForImageTextToText

    from ptq.calib_data import image_text_inputs
    from ptq.models import load_processor

    checkpoint = request.getfixturevalue(fixture)
    pictures = sorted({json.loads(line)["image"] for line in image_pairs.read_text().splitlines()})[:2]
    pairs = tmp_path / "same-prompt.jsonl"
    pairs.write_text(
        "".join(
            json.dumps({"image": str(image_pairs.parent / p), "text": "Describe this picture."}) + "\n"
            for p in pictures
        )
    )
    inputs = image_text_inputs(pairs, load_processor(str(checkpoint), False), 2)
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        last = [model(**batch).logits[0, -1] for batch in inputs]
    assert inputs[0]["input_ids"].shape == inputs[1]["input_ids"].shape  # same prompt, same image-token count
    assert (last[0] - last[1]).abs().max() > 1e-4
