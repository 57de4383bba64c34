"""Vision-language models: which families the launcher quantizes, what stays in BF16, and the image-text files
that calibrate them. Torch-free: planning reads it before any model is loaded.

Only the language model of a VLM is quantized. The vision tower and the projector that maps its features into
the language model's embedding space stay in BF16: their module patterns join the run's exclusions, so ModelOpt
leaves their quantizers off and its export names them in `exclude_modules`, and validation checks every vision
weight of the export against the source (ptq/layerkinds.py's `vision` kind; ptq/validate.py's
`compare_vision_tensors`).

An image-text calibration file is JSONL with one pair per line: {"image": "<path>", "text": "<prompt or caption>"},
the image path absolute or relative to the file's folder. A calibration file of text rows ({"text": ...}) keeps
calibrating with text only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ptq.errors import ConfigError
from ptq.textfiles import read_jsonl


@dataclass(frozen=True)
class Family:
    """A VLM family by its transformers model_type."""

    title: str
    # fnmatch patterns of the modules that stay BF16 (vision encoder and projector).
    vision_modules: Tuple[str, ...]
    # Its processor builds a video processor too, which needs torchvision.
    processor_needs_torchvision: bool = False


FAMILIES: Dict[str, Family] = {
    "qwen2_5_vl": Family("Qwen2.5-VL", ("*visual*",), processor_needs_torchvision=True),
    "qwen2_vl": Family("Qwen2-VL", ("*visual*",), processor_needs_torchvision=True),
    "qwen3_vl": Family("Qwen3-VL", ("*visual*",), processor_needs_torchvision=True),
    "gemma3": Family("Gemma 3", ("*vision_tower*", "*multi_modal_projector*")),
    "llava": Family("LLaVA", ("*vision_tower*", "*multi_modal_projector*")),
}

# Files of a VLM's processor besides the tokenizer's; the export copies them from the source folder.
PROCESSOR_FILES = (
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "chat_template.json",
    "chat_template.jinja",
)

# Where a checkpoint folder keeps its chat template (the processor places images by it), and its image processor.
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
CHAT_TEMPLATE_KEY_FILES = ("tokenizer_config.json", "processor_config.json")
IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def family(model_type: str) -> Family:
    """The family of a VLM's model_type, or a ConfigError naming the ones the launcher knows."""
    if model_type not in FAMILIES:
        known = ", ".join(f"{name} ({f.title})" for name, f in FAMILIES.items())
        raise ConfigError(
            f"model_type {model_type!r} is a vision-language model the launcher has no entry for, so it cannot tell "
            f"which modules form its vision tower (they must stay BF16). Known: {known}. Add the family to "
            "ptq/vlm.py FAMILIES with its vision module patterns, or quantize the language model on its own."
        )
    return FAMILIES[model_type]


def vision_language_type(declared: Optional[str], local: Optional[str], where: str, local_read: bool) -> Optional[str]:
    """The VLM model_type of a run: a local config.json (`local_read`) with a `vision_config` says it (`local`, its
    model_type), else `model.vision_language` (for a checkpoint not read before loading). None for a text model.
    Refuses a contradiction, and a family the launcher has no entry for."""
    if local and declared and local != declared:
        raise ConfigError(
            f"model.vision_language={declared}, but {where}'s config.json says model_type={local}; set "
            f"model.vision_language={local} (or null: a local config.json is read)."
        )
    if declared and local_read and not local:
        raise ConfigError(
            f"model.vision_language={declared}, but {where}'s config.json has no vision_config: it is a text model; "
            "set model.vision_language=null."
        )
    found = local or declared
    if found:
        family(found)
    return found or None


def processor_problem(folder: Path) -> Optional[str]:
    """What a local VLM checkpoint lacks for image inputs (its image processor, its chat template), or None."""
    folder = Path(folder)
    if not any((folder / name).is_file() for name in IMAGE_PROCESSOR_FILES):
        return f"no image processor ({' or '.join(IMAGE_PROCESSOR_FILES)})"
    if any((folder / name).is_file() for name in CHAT_TEMPLATE_FILES):
        return None
    for name in CHAT_TEMPLATE_KEY_FILES:
        try:
            if "chat_template" in json.loads((folder / name).read_text(encoding="utf-8")):
                return None
        except (OSError, ValueError, TypeError):
            continue
    return f"no chat template ({', '.join(CHAT_TEMPLATE_FILES)}, or a chat_template in {' or '.join(CHAT_TEMPLATE_KEY_FILES)})"


def image_token_ids(config) -> List[int]:
    """The placeholder token ids a VLM's config gives images and videos (the positions fidelity does not score)."""
    ids = []
    for key in ("image_token_id", "image_token_index", "video_token_id"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value not in ids:
            ids.append(value)
    return ids


@dataclass(frozen=True)
class Pair:
    image: Path
    text: str
    line: int


def image_file(jsonl: Path, number: int, image: str) -> Path:
    """The image a JSONL file's line `number` names (absolute, or relative to the file's folder), resolved; a clear
    error when it does not exist or is not an image file this launcher reads."""
    file = Path(image).expanduser()
    file = file if file.is_absolute() else jsonl.parent / file
    if not file.is_file():
        raise ConfigError(
            f"{jsonl}:{number}: image {image} does not exist (looked at {file}); image paths are absolute or "
            "relative to the JSONL file's folder."
        )
    if file.suffix.lower() not in IMAGE_SUFFIXES:
        raise ConfigError(
            f"{jsonl}:{number}: {image} is not an image file this launcher reads ({', '.join(IMAGE_SUFFIXES)})."
        )
    return file.resolve()


def image_prompt(processor, text: str, answer_follows: bool, source) -> str:
    """One user turn of the processor's chat template holding an image and `text`, so the image tokens stand where
    the model was trained to see them; `answer_follows` adds the assistant's opening (a prompt whose continuation
    is scored). `source` names the file the pair comes from in the error for a processor without a template."""
    if getattr(processor, "chat_template", None) is None:
        raise ConfigError(
            f"the processor of this model has no chat template, so {source} cannot place its images in the "
            "prompt; save the model's chat template with its processor, or use text."
        )
    turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    return processor.apply_chat_template(turn, tokenize=False, add_generation_prompt=answer_follows)


def read_pairs(path: Path) -> List[Pair]:
    """The pairs of an image-text JSONL file, every image checked to exist; problems name the file and line."""
    path = Path(path)
    pairs = []
    for number, row in read_jsonl(path):
        image, text = row.get("image"), row.get("text")
        if not isinstance(image, str) or not image:
            raise ConfigError(
                f'{path}:{number} has no "image" path; each line of an image-text file must be '
                '{"image": "<file>", "text": "<prompt or caption>"}.'
            )
        if not isinstance(text, str):
            raise ConfigError(f'{path}:{number} has no "text" string beside its image.')
        pairs.append(Pair(image_file(path, number, image), text, number))
    if not pairs:
        raise ConfigError(f"{path} holds no image-text pairs.")
    return pairs
