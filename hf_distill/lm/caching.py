"""Sequence-level KD transfer sets cached on disk: :func:`cache_teacher_completions`."""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import torch

from ..tasks import unwrap_model
from ..teacher_cache import model_fingerprint
from .generation import _id_list, _prompt_list, generate_teacher_completions

logger = logging.getLogger(__name__)

_CACHE_FORMAT = 1


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    h = hashlib.sha256(f"hf_distill-tokenizer-v1|{type(tokenizer).__name__}".encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(str(getattr(tokenizer, "chat_template", None)).encode())
    special = {k: str(v) for k, v in (getattr(tokenizer, "special_tokens_map", None) or {}).items()}
    h.update(json.dumps(special, sort_keys=True).encode())
    return h.hexdigest()


def cache_teacher_completions(
    teacher: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[Any] | datasets.Dataset,
    *,
    cache_dir: str | os.PathLike[str],
    overwrite: bool = False,
    prompt_column: str = "prompt",
    show_progress: bool = True,
    **generation: Any,
) -> datasets.Dataset:
    """:func:`generate_teacher_completions`, saved under ``cache_dir`` and reused; ``generation`` takes its
    sampling arguments (``max_new_tokens``, ``batch_size``, ``do_sample``, ``temperature``, ``top_p``, ``top_k``,
    ``seed``, ``eos_token_id``), with the same defaults.

    The cache key digests the teacher (``hf_distill.teacher_cache.model_fingerprint``), the tokenizer (vocabulary,
    chat template, special tokens), the prompts and every generation argument (batch size
    included: it changes padding, hence sampled tokens). A hit loads the dataset with
    ``datasets.load_from_disk`` without calling ``generate``; a miss generates, writes with
    ``save_to_disk`` into a temporary folder and renames it into place (so a crash never leaves
    a half-written cache). ``overwrite=True`` regenerates. Each folder holds
    ``hf_distill_cache.json`` with the key's inputs. In multi-process runs, call it on the main
    process first (e.g. ``with training_args.main_process_first():``).
    """
    prompt_list = _prompt_list(prompts, prompt_column)
    settings = _generation_settings(generation)
    key = {
        "format": _CACHE_FORMAT,
        "teacher": model_fingerprint(unwrap_model(teacher)),
        "tokenizer": _tokenizer_fingerprint(tokenizer),
        "prompts": hashlib.sha256(json.dumps(prompt_list, sort_keys=True, default=str).encode()).hexdigest(),
        "num_prompts": len(prompt_list),
        "settings": settings,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    path = Path(cache_dir) / f"teacher-completions-{digest}"
    if path.is_dir() and (path / "hf_distill_cache.json").is_file() and not overwrite:
        logger.info("Loading cached teacher completions from %s", path)
        return datasets.load_from_disk(str(path))
    dataset = generate_teacher_completions(
        teacher, tokenizer, prompt_list, show_progress=show_progress, prompt_column=prompt_column, **settings
    )
    _save_atomically(dataset, key, path, overwrite)
    logger.info("Saved teacher completions to %s", path)
    return datasets.load_from_disk(str(path))


def _generation_settings(generation: dict[str, Any]) -> dict[str, Any]:
    """Every sampling argument of generate_teacher_completions, given or default (the cache key's settings)."""
    parameters = inspect.signature(generate_teacher_completions).parameters
    names = ("max_new_tokens", "batch_size", "do_sample", "temperature", "top_p", "top_k", "seed", "eos_token_id")
    unknown = sorted(set(generation) - set(names))
    if unknown:
        raise TypeError(f"cache_teacher_completions() got unexpected arguments {unknown}; it takes {', '.join(names)}.")
    settings = {name: generation.get(name, parameters[name].default) for name in names}
    if settings["eos_token_id"] is not None:
        settings["eos_token_id"] = _id_list(settings["eos_token_id"])
    return settings


def _save_atomically(dataset: datasets.Dataset, key: dict[str, Any], path: Path, overwrite: bool) -> None:
    """save_to_disk into a temporary folder renamed into place: a crash never leaves a half-written cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    dataset.save_to_disk(str(tmp))
    (tmp / "hf_distill_cache.json").write_text(json.dumps(key, indent=2, sort_keys=True))
    if overwrite and path.exists():
        shutil.rmtree(path)
    try:
        os.rename(tmp, path)
    except OSError:  # another process finished the same cache first
        shutil.rmtree(tmp, ignore_errors=True)
