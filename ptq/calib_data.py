"""The `calib` group (and the fidelity text): token batches from a file, a hub dataset or the model itself."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
from tqdm.auto import tqdm

from ptq.errors import ConfigError
from ptq.files import atomic_path
from ptq.textfiles import file_key, read_texts
from ptq.vlm import image_prompt, read_pairs

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


def _row_generator(seed: int, row: int) -> torch.Generator:
    # Each row draws from its own generator: a row's text does not depend on which rows share its batch, so a
    # cached sample of many rows serves a request for fewer, and the two uses can be sampled in one pass.
    return torch.Generator().manual_seed(seed * 1_000_003 + row)


class _RowSampling:
    """A logits processor that samples the next token of each row from its own generator (temperature 1, no
    top-k/top-p: the model's own distribution) by the Gumbel-max trick, and reports progress per token. The
    generation runs greedy, so the token it marks is the one taken."""

    def __init__(self, generators: List[torch.Generator], progress, report) -> None:
        self.generators, self.progress, self.report = generators, progress, report

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        uniform = torch.stack([torch.rand(scores.shape[-1], generator=g) for g in self.generators])
        gumbel = -torch.log(-torch.log(uniform.clamp_min(1e-20))).to(scores.device)
        choice = (scores.float() + gumbel).argmax(dim=-1, keepdim=True)
        marked = torch.full_like(scores, float("-inf"))
        marked.scatter_(1, choice, 0.0)
        self.progress.update(1)
        self.report()
        return marked


def sample_rows(model, tokenizer, rows: List[tuple], seq_len: int, batch_size: int) -> torch.Tensor:
    """[len(rows), seq_len] token ids the model writes itself from its BOS token, row (seed, index) drawn from
    its own generator; a progress bar counts tokens, and the log says how far it got every 10%."""
    from transformers import LogitsProcessorList

    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    steps = -(-len(rows) // batch_size) * (seq_len - 1)
    began, logged = time.perf_counter(), [0]
    out = []
    with tqdm(
        total=steps, desc=f"sampling {len(rows)} x {seq_len} tokens of text from the BF16 model", unit="token"
    ) as progress:

        def report():
            tenth = progress.n * 10 // max(steps, 1)
            if tenth > logged[0]:
                logged[0] = tenth
                log.info(
                    "Sampling text: %d%% (%d of %d token steps) after %.0f s",
                    tenth * 10,
                    progress.n,
                    steps,
                    time.perf_counter() - began,
                )

        for first in range(0, len(rows), batch_size):
            chunk = rows[first : first + batch_size]
            prompt = torch.full((len(chunk), 1), start, dtype=torch.long, device=device)
            sampler = _RowSampling([_row_generator(seed, row) for seed, row in chunk], progress, report)
            generated = model.generate(
                prompt,
                do_sample=False,
                num_beams=1,
                max_new_tokens=seq_len - 1,
                min_new_tokens=seq_len - 1,
                logits_processor=LogitsProcessorList([sampler]),
                pad_token_id=tokenizer.pad_token_id,
                attention_mask=torch.ones_like(prompt),
                temperature=None,
                top_p=None,
                top_k=None,
            )
            out.append(generated[:, :seq_len].cpu())
    return torch.cat(out)


def _self_cache(cache_dir: str, model_id: str, seed: int) -> Path:
    key = hashlib.sha256(f"self-v2|{model_id}|{seed}".encode()).hexdigest()[:16]
    return Path(os.path.expanduser(cache_dir)) / "text" / f"self-{key}.pt"


def _cached_rows(path: Path):
    if not path.exists():
        return None
    try:
        tokens = torch.load(path)
    except Exception as exc:  # damaged: sample again and replace it
        log.warning("Ignoring unreadable self-sampled text %s (%s)", path, exc)
        return None
    return tokens if isinstance(tokens, torch.Tensor) and tokens.dim() == 2 else None


def self_sampled(
    model, tokenizer, *, model_id: str, cache_dir: str, requests: Dict[str, tuple], batch_size: int
) -> Dict[str, torch.Tensor]:
    """Text the model writes itself, for several uses at once: `requests` maps a use to (seed, samples,
    seq_len); each use gets [samples, seq_len] tokens, the first rows of its seed's stream. One sampling pass
    makes every row no cached sample holds (at the longest length asked for); a cached sample with at least as
    many rows, each at least as long, serves a request by cutting it, and one with fewer rows of the full length is
    extended by the rows after its own."""
    out, missing = {}, {}
    for use, (seed, samples, seq_len) in requests.items():
        cached = _cached_rows(_self_cache(cache_dir, model_id, seed))
        if cached is not None and cached.shape[0] >= samples and cached.shape[1] >= seq_len:
            log.info("Using cached self-sampled text for %s (%d x %d tokens)", use, *cached.shape)
            out[use] = cached[:samples, :seq_len]
        else:
            missing[use] = (seed, samples, seq_len, cached)
    if not missing:
        return out
    # Per seed: every row up to the largest request or cached sample; all at the longest length asked or cached.
    counts: Dict[int, int] = {}
    held: Dict[int, torch.Tensor] = {}
    length = 0
    for seed, samples, seq_len, cached in missing.values():
        have_rows, have_length = (0, 0) if cached is None else tuple(cached.shape)
        counts[seed] = max(counts.get(seed, 0), samples, have_rows)
        length = max(length, seq_len, have_length)
        if cached is not None:
            held[seed] = cached
    # A row's text depends only on its seed and index (_row_generator), so a cached sample at the full length keeps
    # its rows and only the rows after them are sampled; a shorter one is sampled again whole.
    start = {seed: held[seed].shape[0] if seed in held and held[seed].shape[1] >= length else 0 for seed in counts}
    seeds = sorted(counts)
    wanted = [(seed, row) for seed in seeds for row in range(start[seed], counts[seed])]
    tokens = sample_rows(model, tokenizer, wanted, length, batch_size)
    new = dict(zip(seeds, tokens.split([counts[seed] - start[seed] for seed in seeds])))
    sampled = {seed: torch.cat([held[seed][:, :length], new[seed]]) if start[seed] else new[seed] for seed in seeds}
    for seed, rows in sampled.items():
        if start[seed]:
            log.info("Extending cached self-sampled text (seed %d) from %d to %d rows", seed, start[seed], len(rows))
        with atomic_path(_self_cache(cache_dir, model_id, seed)) as tmp:
            torch.save(rows.clone(), tmp)
    for use, (seed, samples, seq_len, _) in missing.items():
        out[use] = sampled[seed][:samples, :seq_len]
    return out


# Token ids of text files, by (tokenizer, file version, samples, seq_len): the points of a sweep in one process
# tokenize each file once; other processes read the copy saved under cache_dir/text/.


def _tokenizer_key(tokenizer, model_id: str) -> str:
    return f"{model_id}|{type(tokenizer).__name__}|{len(tokenizer)}|{getattr(tokenizer, 'name_or_path', '')}"


def file_tokens(
    path: Path,
    *,
    tokenizer,
    model_id: str,
    samples: int,
    seq_len: int,
    cache_dir: str,
    memo: Optional[Dict[str, torch.Tensor]] = None,
) -> torch.Tensor:
    """tokens_from_texts of a local file, cached on disk (keyed by tokenizer and file) and in `memo` (a
    ProcessState's `tokens`: the runs of one process read it once)."""
    ident = json.dumps([_tokenizer_key(tokenizer, model_id), file_key(path), samples, seq_len])
    key = hashlib.sha256(ident.encode()).hexdigest()[:20]
    memo = {} if memo is None else memo
    if key in memo:
        return memo[key]
    cached = Path(os.path.expanduser(cache_dir)) / "text" / f"file-{key}.pt"
    if cached.exists():
        try:
            tokens = torch.load(cached)
        except Exception as exc:  # damaged: tokenize again and replace it
            log.warning("Ignoring unreadable token cache %s (%s)", cached, exc)
        else:
            if tuple(tokens.shape) == (samples, seq_len):
                return _remember(memo, key, tokens)
    tokens = tokens_from_texts(read_texts(path), tokenizer, samples, seq_len, str(path))
    with atomic_path(cached) as tmp:
        torch.save(tokens, tmp)
    return _remember(memo, key, tokens)


def _remember(memo: Dict[str, torch.Tensor], key: str, tokens: torch.Tensor) -> torch.Tensor:
    if len(memo) >= 4:  # a sweep's calibration and held-out text, for a model or two
        memo.pop(next(iter(memo)))
    memo[key] = tokens
    return tokens


def token_batches(
    spec: str,
    *,
    model,
    tokenizer,
    model_id: str,
    samples: int,
    seq_len: int,
    seed: int,
    cache_dir: str,
    sample_batch_size: int,
    memo: Optional[Dict[str, torch.Tensor]] = None,
) -> torch.Tensor:
    """[samples, seq_len] token ids for `spec`: "self", a .txt/.jsonl path, or a Hugging Face dataset name
    (`memo`: file_tokens')."""
    if spec == SELF:
        return self_sampled(
            model,
            tokenizer,
            model_id=model_id,
            cache_dir=cache_dir,
            requests={"text": (seed, samples, seq_len)},
            batch_size=sample_batch_size,
        )["text"]
    path = Path(os.path.expanduser(spec))
    if path.suffix in (".txt", ".jsonl", ".raw") or path.exists():
        if not path.is_file():
            raise ConfigError(
                f'calibration/fidelity text {spec} is not a file; give a .txt or .jsonl path, a Hugging Face dataset name, or "self".'
            )
        return file_tokens(
            path,
            tokenizer=tokenizer,
            model_id=model_id,
            samples=samples,
            seq_len=seq_len,
            cache_dir=cache_dir,
            memo=memo,
        )
    from modelopt.torch.utils.dataset_utils import get_dataset_samples

    try:
        texts = get_dataset_samples(spec, samples * 4)
    except Exception as exc:  # the hub is unreachable or the name is wrong
        raise ConfigError(
            f"Could not load the dataset {spec!r} ({type(exc).__name__}: {exc}). Offline, use calib.dataset=self "
            "or a local .txt/.jsonl file."
        ) from exc
    return tokens_from_texts(texts, tokenizer, samples, seq_len, spec)


def image_text_inputs(path: Path, processor, samples: int) -> List[Dict[str, torch.Tensor]]:
    """The model inputs (input_ids, pixel_values, ...) of the first `samples` pairs of an image-text JSONL file
    (ptq/vlm.py), one pair per batch: each image makes its own number of vision tokens. Each pair is a user turn
    of the processor's chat template holding the image and the text, so the image tokens stand where the model
    was trained to see them."""
    from PIL import Image

    inputs = []
    for pair in read_pairs(Path(path))[:samples]:
        prompt = image_prompt(processor, pair.text, answer_follows=False, source=path)
        with Image.open(pair.image) as image:
            batch = processor(text=[prompt], images=[image.convert("RGB")], return_tensors="pt")
        inputs.append(dict(batch))
    return inputs
