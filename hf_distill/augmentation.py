"""Transfer-set augmentation (Tang et al. 2019; TinyBERT, Jiao et al. 2020): more unlabeled text for the teacher.

Each new example starts from a source sentence's word pieces and applies, in order:

1. n-gram sampling, with probability ``ngram_probability``: keep one random span of n pieces,
   n uniform in ``ngram_range`` (Tang et al.);
2. token replacement, each piece independently with probability ``replace_probability``, by
   ``replace_with``:
   - ``"mask"``: the tokenizer's mask token (Tang et al.'s masking);
   - ``"vocab"``: a random non-special vocabulary entry;
   - ``"mlm"``: a sample from the ``mlm_top_k`` most likely pieces of a masked-LM's prediction at that
     position (TinyBERT's contextual replacement; the teacher's own MLM head when it has one).

The new texts carry no labels: the teacher labels them, through :func:`augment_and_cache` and the
offline teacher-output cache, so the student trains on teacher soft labels only.
"""

from __future__ import annotations

import random
from typing import Any, Optional, Sequence

import torch
from torch import nn

REPLACEMENTS = ("mask", "vocab", "mlm")


def _check(replace_probability: float, ngram_probability: float, ngram_range: tuple[int, int], replace_with: str) -> None:
    for name, value in (("replace_probability", replace_probability), ("ngram_probability", ngram_probability)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"`{name}` must be in [0, 1], got {value}.")
    if not 1 <= ngram_range[0] <= ngram_range[1]:
        raise ValueError(f"`ngram_range` must be (low, high) with 1 <= low <= high, got {ngram_range}.")
    if replace_with not in REPLACEMENTS:
        raise ValueError(f"`replace_with` must be one of {REPLACEMENTS}, got {replace_with!r}.")


def _ngram(ids: list[int], rng: random.Random, ngram_range: tuple[int, int]) -> list[int]:
    n = min(rng.randint(*ngram_range), len(ids))
    start = rng.randint(0, len(ids) - n)
    return ids[start : start + n]


def _mlm_candidates(mlm_model: nn.Module, tokenizer: Any, ids: list[int], positions: list[int], top_k: int) -> list[list[int]]:
    """Top-k piece ids of the masked LM at each position, with those positions masked."""
    masked = list(ids)
    for p in positions:
        masked[p] = tokenizer.mask_token_id
    start = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    end = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    encoded = ([start] if start is not None else []) + masked + ([end] if end is not None else [])
    offset = 1 if start is not None else 0
    device = next(mlm_model.parameters()).device
    with torch.no_grad():
        logits = mlm_model(input_ids=torch.tensor([encoded], device=device)).logits[0]
    special = torch.tensor(tokenizer.all_special_ids, device=device)
    logits[:, special] = float("-inf")
    return [logits[offset + p].topk(top_k).indices.tolist() for p in positions]


def augment_texts(
    texts: Sequence[str],
    tokenizer: Any,
    *,
    num_per_example: int = 4,
    replace_probability: float = 0.15,
    replace_with: str = "mask",
    ngram_probability: float = 0.25,
    ngram_range: tuple[int, int] = (1, 5),
    mlm_model: Optional[nn.Module] = None,
    mlm_top_k: int = 15,
    seed: int = 0,
) -> list[str]:
    """``num_per_example`` augmented variants of each text (see the module doc), deduplicated, sources excluded."""
    _check(replace_probability, ngram_probability, tuple(ngram_range), replace_with)
    if replace_with == "mlm" and mlm_model is None:
        raise ValueError("replace_with='mlm' needs `mlm_model`, a masked LM sharing the tokenizer (e.g. the teacher's MLM).")
    if replace_with == "mask" and tokenizer.mask_token_id is None:
        raise ValueError("The tokenizer has no mask token; use replace_with='vocab'.")
    rng = random.Random(seed)
    special = set(tokenizer.all_special_ids)
    vocabulary = [i for i in range(len(tokenizer)) if i not in special]
    if mlm_model is not None:
        mlm_model.eval()
    seen, out = set(texts), []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            continue
        for _ in range(num_per_example):
            new = _ngram(ids, rng, tuple(ngram_range)) if rng.random() < ngram_probability else list(ids)
            positions = [p for p in range(len(new)) if rng.random() < replace_probability]
            if replace_with == "mask":
                for p in positions:
                    new[p] = tokenizer.mask_token_id
            elif replace_with == "vocab":
                for p in positions:
                    new[p] = rng.choice(vocabulary)
            elif positions:
                for p, candidates in zip(positions, _mlm_candidates(mlm_model, tokenizer, new, positions, mlm_top_k)):
                    new[p] = rng.choice(candidates)
            augmented = tokenizer.decode(new, clean_up_tokenization_spaces=True)
            if augmented and augmented not in seen:
                seen.add(augmented)
                out.append(augmented)
    return out


def augment_and_cache(
    teacher: nn.Module,
    texts: Sequence[str],
    tokenizer: Any,
    *,
    max_length: int = 128,
    text_column: str = "text",
    batch_size: int = 32,
    **augment_kwargs: Any,
) -> "datasets.Dataset":  # noqa: F821
    """Augment ``texts``, tokenize them and label them with the teacher (a ``teacher_logits`` column)."""
    import datasets

    from .teacher_cache import cache_teacher_outputs

    new_texts = augment_texts(texts, tokenizer, **augment_kwargs)
    dataset = datasets.Dataset.from_dict({text_column: new_texts})
    dataset = dataset.map(
        lambda batch: tokenizer(batch[text_column], truncation=True, max_length=max_length), batched=True
    )
    return cache_teacher_outputs(teacher, dataset.remove_columns([text_column]), batch_size=batch_size)
