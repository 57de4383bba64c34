"""The `calib` group (and the fidelity text): token batches from a file, a hub dataset or the model itself."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Dict, List

import torch
from tqdm.auto import tqdm

from ptq.errors import ConfigError
from ptq.files import atomic_path
from ptq.textfiles import file_key, read_texts

log = logging.getLogger(__name__)

SELF = "self"


def _chunk(token_ids: List[int], samples: int, seq_len: int, source: str) -> torch.Tensor:
    need = samples * seq_len
    if len(token_ids) < need:
        raise ConfigError(
            f"{source} holds {len(token_ids)} tokens, fewer than the {samples} x {seq_len} = {need} asked for; "
            "use a larger file or lower the size / seq_len."
        )
    return torch.tensor(token_ids[:need], dtype=torch.long).view(samples, seq_len)


def tokens_from_texts(texts: List[str], tokenizer, samples: int, seq_len: int, source: str) -> torch.Tensor:
    """Concatenate texts and cut them into `samples` rows of exactly `seq_len` tokens."""
    ids: List[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        if len(ids) >= samples * seq_len:
            break
    return _chunk(ids, samples, seq_len, source)


def sample_from_model(model, tokenizer, samples: int, seq_len: int, seed: int, batch_size: int) -> torch.Tensor:
    """Text the model writes itself, starting from its BOS token: needs no data set and no network."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    rows = []
    try:
        for first in tqdm(range(0, samples, batch_size), desc="sampling text from the BF16 model", unit="batch"):
            n = min(batch_size, samples - first)
            prompt = torch.full((n, 1), start, dtype=torch.long, device=device)
            out = model.generate(
                prompt, do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                max_new_tokens=seq_len - 1, min_new_tokens=seq_len - 1,
                pad_token_id=tokenizer.pad_token_id, attention_mask=torch.ones_like(prompt),
            )
            rows.append(out[:, :seq_len].cpu())
    finally:
        torch.random.set_rng_state(generator_state)
    return torch.cat(rows)


# Token ids of text files, by (tokenizer, file version, samples, seq_len): the points of a sweep in one process
# tokenize each file once; other processes read the copy saved under cache_dir/text/.
_tokens: Dict[str, torch.Tensor] = {}


def _tokenizer_key(tokenizer, model_id: str) -> str:
    return f"{model_id}|{type(tokenizer).__name__}|{len(tokenizer)}|{getattr(tokenizer, 'name_or_path', '')}"


def file_tokens(path: Path, *, tokenizer, model_id: str, samples: int, seq_len: int, cache_dir: str) -> torch.Tensor:
    """tokens_from_texts of a local file, cached in this process and on disk (keyed by tokenizer and file)."""
    ident = json.dumps([_tokenizer_key(tokenizer, model_id), file_key(path), samples, seq_len])
    key = hashlib.sha256(ident.encode()).hexdigest()[:20]
    if key in _tokens:
        return _tokens[key]
    cached = Path(os.path.expanduser(cache_dir)) / "text" / f"file-{key}.pt"
    if cached.exists():
        try:
            tokens = torch.load(cached)
        except Exception as exc:  # damaged: tokenize again and replace it
            log.warning("Ignoring unreadable token cache %s (%s)", cached, exc)
        else:
            if tuple(tokens.shape) == (samples, seq_len):
                return _remember(key, tokens)
    tokens = tokens_from_texts(read_texts(path), tokenizer, samples, seq_len, str(path))
    with atomic_path(cached) as tmp:
        torch.save(tokens, tmp)
    return _remember(key, tokens)


def _remember(key: str, tokens: torch.Tensor) -> torch.Tensor:
    if len(_tokens) >= 4:  # a sweep's calibration and held-out text, for a model or two
        _tokens.pop(next(iter(_tokens)))
    _tokens[key] = tokens
    return tokens


def token_batches(spec: str, *, model, tokenizer, model_id: str, samples: int, seq_len: int, seed: int,
                  cache_dir: str, sample_batch_size: int) -> torch.Tensor:
    """[samples, seq_len] token ids for `spec`: "self", a .txt/.jsonl path, or a Hugging Face dataset name."""
    if spec == SELF:
        key = hashlib.sha256(f"{model_id}|{samples}|{seq_len}|{seed}".encode()).hexdigest()[:16]
        cached = Path(os.path.expanduser(cache_dir)) / "text" / f"self-{key}.pt"
        if cached.exists():
            log.info("Using cached self-sampled text %s", cached)
            return torch.load(cached)
        tokens = sample_from_model(model, tokenizer, samples, seq_len, seed, sample_batch_size)
        with atomic_path(cached) as tmp:
            torch.save(tokens, tmp)
        return tokens
    path = Path(os.path.expanduser(spec))
    if path.suffix in (".txt", ".jsonl", ".raw") or path.exists():
        if not path.is_file():
            raise ConfigError(f"calibration/fidelity text {spec} is not a file; give a .txt or .jsonl path, a Hugging Face dataset name, or \"self\".")
        return file_tokens(path, tokenizer=tokenizer, model_id=model_id, samples=samples, seq_len=seq_len,
                           cache_dir=cache_dir)
    from modelopt.torch.utils.dataset_utils import get_dataset_samples

    try:
        texts = get_dataset_samples(spec, samples * 4)
    except Exception as exc:  # the hub is unreachable or the name is wrong
        raise ConfigError(
            f"Could not load the dataset {spec!r} ({type(exc).__name__}: {exc}). Offline, use calib.dataset=self "
            "or a local .txt/.jsonl file."
        ) from exc
    return tokens_from_texts(texts, tokenizer, samples, seq_len, spec)
