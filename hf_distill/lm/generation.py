"""Causal-LM generation: teacher completions (sequence-level KD) and student completions (on-policy).

- :func:`generate_teacher_completions` builds a sequence-level KD transfer set (teacher completions as text).
- :func:`generate_on_policy_batch` lets the student complete a batch's prompts (GKD-style on-policy
  distillation) and returns a batch ready for the teacher and student forward; :func:`draw_on_policy` decides
  which optimizer steps do.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import datasets
import torch
from tqdm.auto import tqdm

from ..tasks import unwrap_model
from .data import FINISHED_COLUMN, IGNORE_INDEX, PROMPT_LENGTH_COLUMN, _encode_prompt, _pad


def _check_generation(max_new_tokens: int, temperature: float, top_p: float, top_k: int) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"`max_new_tokens` must be at least 1, got {max_new_tokens}.")
    if not temperature > 0:
        raise ValueError(f"`temperature` must be > 0, got {temperature}; use do_sample=False for greedy decoding.")
    if not 0 < top_p <= 1:
        raise ValueError(f"`top_p` must be in (0, 1], got {top_p}.")
    if top_k < 0:
        raise ValueError(f"`top_k` must be >= 0 (0 disables it), got {top_k}.")


@dataclass
class GenerationSettings:
    """How completions are sampled. ``top_k=0`` and ``top_p=1`` sample from the full distribution.

    ``generate_on_policy_batch(student, batch, pad_token_id=..., eos_token_id=..., **settings.to_kwargs())``.
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    do_sample: bool = True
    top_k: int = 0

    def __post_init__(self) -> None:
        _check_generation(self.max_new_tokens, self.temperature, self.top_p, self.top_k)

    def to_kwargs(self) -> dict[str, Any]:
        """The settings as keyword arguments of the generation functions."""
        return asdict(self)


def _generate_kwargs(
    *, max_new_tokens: int, do_sample: bool, temperature: float, top_p: float, top_k: int, pad: int, eos: list[int]
) -> dict[str, Any]:
    # Explicit values, so that a model's own generation_config (e.g. top_k=50, a repetition
    # penalty, beams) does not silently change the distribution that is sampled.
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "do_sample": do_sample,
        "num_beams": 1,
        "use_cache": True,  # a Trainer with gradient checkpointing turns it off in the config
        "repetition_penalty": 1.0,
        "pad_token_id": pad,
        "eos_token_id": eos if len(eos) != 1 else eos[0],
    }
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=top_k)
    return kwargs


def _device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _id_list(ids: int | Sequence[int] | None) -> list[int]:
    if ids is None:
        return []
    if isinstance(ids, int):
        return [ids]
    return [int(i) for i in ids]


def _sequences(output: Any) -> torch.Tensor:
    return output.sequences if hasattr(output, "sequences") else output


def _after_first_eos(generated: torch.Tensor, eos: list[int]) -> torch.Tensor:
    """Boolean mask of the generated tokens strictly after each row's first EOS."""
    if not eos:
        return torch.zeros_like(generated, dtype=torch.bool)
    is_eos = torch.isin(generated, torch.tensor(eos, device=generated.device)).long()
    return (is_eos.cumsum(dim=1) - is_eos) > 0


class _EvalMode:
    """Put a module in eval mode and restore every submodule's own mode on exit."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.modes: list[tuple[torch.nn.Module, bool]] = []

    def __enter__(self) -> torch.nn.Module:
        self.modes = [(m, m.training) for m in self.module.modules()]
        self.module.eval()
        return self.module

    def __exit__(self, *exc: object) -> None:
        for m, training in self.modes:
            m.training = training


# --------------------------------------------------------------------------------------------
# 4. On-policy (GKD-style) generation
# --------------------------------------------------------------------------------------------


def _batch_prompts(batch: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    """Each row's prompt tokens, from ``prompt_input_ids`` or from ``input_ids`` + ``prompt_length``."""
    if "prompt_input_ids" in batch:
        ids = batch["prompt_input_ids"]
        mask = batch.get("prompt_attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        return [row[m.bool()] for row, m in zip(ids, mask)]
    missing = [k for k in ("input_ids", PROMPT_LENGTH_COLUMN) if k not in batch]
    if missing:
        raise ValueError(
            f"generate_on_policy_batch needs 'input_ids' and 'prompt_length' (or 'prompt_input_ids') in the batch; "
            f"missing {missing}. Build the data with tokenize_completions and batch it with CompletionCollator, and "
            f"keep 'prompt_length' (Trainer's remove_unused_columns drops it unless it is a signature column)."
        )
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    lengths = torch.as_tensor(batch[PROMPT_LENGTH_COLUMN]).reshape(-1).tolist()
    # Non-padding tokens in order, whatever the padding side; the prompt is their start.
    return [row[m.bool()][: int(n)] for row, m, n in zip(ids, mask, lengths)]


def _sharded(model: torch.nn.Module) -> bool:
    """Parameters gathered by hooks at forward time: FSDP2 DTensors or DeepSpeed ZeRO-3 (``ds_id``)."""
    return any(hasattr(p, "ds_id") or type(p.data).__name__ == "DTensor" for p in model.parameters())


def _student_generate(model: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                      kwargs: dict[str, Any]) -> torch.Tensor:
    """Sequences sampled in eval mode (each submodule's mode restored) without autograd: under
    ``torch.inference_mode`` (less work per op than ``no_grad``), returned as a normal tensor the training
    forward can use; under ``no_grad`` where sharded parameters are gathered by hooks."""
    context = torch.no_grad() if _sharded(model) else torch.inference_mode()
    with _EvalMode(model), context:
        sequences = _sequences(model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, **kwargs))
    return sequences.clone()


def draw_on_policy(lmbda: float, seed: int, step: int) -> bool:
    """Whether optimizer step ``step`` trains on student generations: a coin of probability ``lmbda`` seeded by
    (seed, step), so every process and a resumed run draw the same."""
    if lmbda <= 0:
        return False
    rng = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return bool(torch.rand((), generator=rng) < lmbda)


def generate_on_policy_batch(
    student: torch.nn.Module,
    batch: Mapping[str, torch.Tensor],
    *,
    pad_token_id: int | None,
    eos_token_id: int | Sequence[int] | None,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    do_sample: bool = True,
    top_k: int = 0,
) -> dict[str, torch.Tensor]:
    """Let the student complete the batch's prompts; return a new batch to distil on.

    The prompts come from ``prompt_input_ids``/``prompt_attention_mask`` if present, else from
    each row's first ``prompt_length`` non-padding tokens (either padding side). The student
    (unwrapped from DDP-style wrappers) generates with the KV cache in eval mode without autograd
    (``torch.inference_mode``); the mode of each of its modules is restored afterwards. Sampling
    uses the global torch RNG.

    Returns right-padded ``input_ids`` (prompt + completion), ``attention_mask``, ``labels``
    (-100 on the prompt, on padding and on anything after a row's first EOS; the EOS itself is a
    label), ``prompt_length`` and ``completion_finished`` (False where ``max_new_tokens`` cut it), on
    the student's device. Right padding keeps plain forwards (no ``position_ids``) position-correct.
    Other columns of ``batch`` are not carried over: they describe the old completions.
    """
    _check_generation(max_new_tokens, temperature, top_p, top_k)
    eos = _id_list(eos_token_id)
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else None)
    if pad is None:
        raise ValueError("generate_on_policy_batch needs a pad_token_id or an eos_token_id.")
    model = unwrap_model(student)
    device = _device(model)
    prompts = [p.to(device) for p in _batch_prompts(batch)]
    empty = [i for i, p in enumerate(prompts) if p.numel() == 0]
    if empty:
        raise ValueError(
            f"Rows {empty} of the batch have an empty prompt; on-policy generation needs at least one prompt token."
        )
    prompt_ids = _pad(prompts, pad, "left")
    prompt_mask = _pad([torch.ones_like(p) for p in prompts], 0, "left")
    kwargs = _generate_kwargs(
        max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p, top_k=top_k,
        pad=pad, eos=eos,
    )
    generated = _student_generate(model, prompt_ids, prompt_mask, kwargs)[:, prompt_ids.shape[1] :]
    keep = ~_after_first_eos(generated, eos)
    completion_lengths = keep.sum(dim=1).tolist()
    rows = [torch.cat([p, g[:n]]) for p, g, n in zip(prompts, generated, completion_lengths)]
    labels = [
        torch.cat([torch.full_like(p, IGNORE_INDEX), g[:n]]) for p, g, n in zip(prompts, generated, completion_lengths)
    ]
    return {
        "input_ids": _pad(rows, pad, "right"),
        "attention_mask": _pad([torch.ones_like(r) for r in rows], 0, "right"),
        "labels": _pad(labels, IGNORE_INDEX, "right"),
        PROMPT_LENGTH_COLUMN: torch.tensor([len(p) for p in prompts], dtype=torch.long, device=device),
        FINISHED_COLUMN: torch.isin(generated, generated.new_tensor(eos)).any(dim=1),  # an EOS ended it
    }


def _prompt_list(prompts: Sequence[Any] | datasets.Dataset, prompt_column: str) -> list[Any]:
    if isinstance(prompts, datasets.Dataset):
        if prompt_column not in prompts.column_names:
            raise ValueError(
                f"The prompts dataset has no '{prompt_column}' column (columns: {prompts.column_names}); "
                f"pass prompt_column=."
            )
        return list(prompts[prompt_column])
    if isinstance(prompts, str):
        raise TypeError("`prompts` must be a list of prompts (or a Dataset), not a single string.")
    return list(prompts)


def _default_eos(model: torch.nn.Module, tokenizer: Any, eos_token_id: int | Sequence[int] | None) -> list[int]:
    if eos_token_id is not None:
        return _id_list(eos_token_id)
    eos = _id_list(tokenizer.eos_token_id)
    config = getattr(model, "generation_config", None)
    for i in _id_list(getattr(config, "eos_token_id", None)):
        if i not in eos and i < len(tokenizer):
            eos.append(i)
    return eos


def _decode_completion(tokenizer: Any, prompt_ids: list[int], completion_ids: list[int]) -> str:
    """Completion text as it continues the prompt (keeps a leading space that SentencePiece drops)."""
    options = {"skip_special_tokens": True, "clean_up_tokenization_spaces": False}
    prefix = tokenizer.decode(prompt_ids, **options)
    full = tokenizer.decode(prompt_ids + completion_ids, **options)
    return full[len(prefix) :] if full.startswith(prefix) else tokenizer.decode(completion_ids, **options)


def generate_teacher_completions(
    teacher: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[Any] | datasets.Dataset,
    *,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    show_progress: bool = True,
    top_k: int = 0,
    eos_token_id: int | Sequence[int] | None = None,
    prompt_column: str = "prompt",
) -> datasets.Dataset:
    """Generate the teacher's completion of every prompt: a sequence-level KD transfer set.

    ``prompts`` are texts or chat conversations (rendered with ``add_generation_prompt=True``),
    as a list or a Dataset's ``prompt_column``. They are encoded like :func:`tokenize_completions`
    encodes prompts, sorted by length and generated in left-padded batches under a tqdm bar; the
    torch RNG is seeded with ``seed`` inside a forked RNG state, so results are reproducible for
    the same arguments and the caller's RNG is untouched.

    Returns a Dataset with ``prompt`` (as given), ``completion`` (text up to the first EOS,
    special tokens removed) and ``completion_finished`` (False when ``max_new_tokens`` cut it;
    :func:`tokenize_completions` then does not add an EOS). EOS ids default to the tokenizer's
    plus those in the teacher's ``generation_config``.
    """
    _check_generation(max_new_tokens, temperature, top_p, top_k)
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be at least 1, got {batch_size}.")
    prompt_list = _prompt_list(prompts, prompt_column)
    model = unwrap_model(teacher)
    eos = _default_eos(model, tokenizer, eos_token_id)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else None)
    if pad is None:
        raise ValueError("The tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token.")
    encoded = _encode_prompts(tokenizer, prompt_list)
    kwargs = _generate_kwargs(
        max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p, top_k=top_k,
        pad=pad, eos=eos,
    )
    completions: list[str] = [""] * len(encoded)
    finished: list[bool] = [False] * len(encoded)
    device = _device(model)
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), _EvalMode(model), torch.no_grad(), tqdm(
        total=len(encoded), desc="Teacher completions", unit="prompt", disable=not show_progress
    ) as bar:
        torch.manual_seed(seed)
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            for i, (text, done) in zip(chunk, _complete(model, tokenizer, [encoded[i] for i in chunk], pad, eos, kwargs)):
                completions[i], finished[i] = text, done
            bar.update(len(chunk))
    return datasets.Dataset.from_dict(
        {"prompt": prompt_list, "completion": completions, "completion_finished": finished}
    )


def _encode_prompts(tokenizer: Any, prompts: list[Any]) -> list[list[int]]:
    """Prompt ids as tokenize_completions encodes them; an empty prompt starts from BOS."""
    encoded = []
    for i, prompt in enumerate(prompts):
        ids = _encode_prompt(tokenizer, prompt)
        if not ids:
            if tokenizer.bos_token_id is None:
                raise ValueError(f"Prompt {i} is empty and the tokenizer has no BOS token to start generation from.")
            ids = [tokenizer.bos_token_id]
        encoded.append(ids)
    return encoded


def _complete(model: torch.nn.Module, tokenizer: Any, prompts: list[list[int]], pad: int, eos: list[int],
              kwargs: dict[str, Any]) -> list[tuple[str, bool]]:
    """(completion text up to the first EOS, whether an EOS ended it) for one left-padded batch of prompts."""
    device = _device(model)
    rows = [torch.tensor(ids, dtype=torch.long) for ids in prompts]
    input_ids = _pad(rows, pad, "left").to(device)
    attention_mask = _pad([torch.ones_like(r) for r in rows], 0, "left").to(device)
    sequences = _sequences(model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs))
    generated = sequences[:, input_ids.shape[1] :]
    after = _after_first_eos(generated, eos)
    results = []
    for row, ids in enumerate(prompts):
        tokens = generated[row][~after[row]].tolist()
        done = bool(tokens) and tokens[-1] in eos
        results.append((_decode_completion(tokenizer, ids, tokens[:-1] if done else tokens), done))
    return results
