"""On-policy distillation as TRL's stable ``DistillationTrainer`` runs it: prompt-only data, the student completes
each step's prompts, and the step logs what it generated.

- :func:`is_prompt_only` / :func:`check_on_policy_data`: a dataset tokenized from prompts alone (no completion
  tokens) trains only on-policy, so ``lmbda`` must be 1; anything else is refused before training.
- :class:`OnPolicyLog`: generates the step's completions (:func:`generate_on_policy_batch` with the arguments'
  sampling settings) and keeps, between two log lines, TRL's generation metrics: ``completions/mean_length``
  (tokens generated per completion, the EOS included), ``completions/clipped_ratio`` (share cut by
  ``max_completion_length`` before an EOS), ``completions/mean_terminated_length`` (mean length of the
  completions an EOS ended), and ``entropy``: the student's mean entropy per completion token,
  H = −Σ_v p_v log p_v with p = softmax(z / T) at the distillation temperature T (as TRL computes it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Optional

import torch

from ..losses.fused_linear import chunk_logits as head_logits
from ..losses.fused_linear import logit_postprocessing
from ..tasks import token_weights, unwrap_model
from .fused_step import _sharded, fusable_head
from .data import FINISHED_COLUMN, IGNORE_INDEX, PROMPT_LENGTH_COLUMN
from .generation import generate_on_policy_batch

#: Logits per chunk of the entropy (rows × vocabulary), as the chunked losses cap theirs.
ENTROPY_CHUNK_LOGITS = 1 << 21
_SUMS = ("completions", "completion_tokens", "clipped", "terminated_tokens", "entropy", "entropy_tokens")


def _prompt_only_rows(lengths: Any, prompt_lengths: Any) -> bool:
    return len(lengths) > 0 and all(int(n) <= int(p) for n, p in zip(lengths, prompt_lengths))


def is_prompt_only(dataset: Any) -> bool:
    """True for tokenized causal-LM data without a single completion token: every row's ``prompt_length`` equals
    its length (``tokenize_completions`` on a ``prompt`` column alone). Data without ``prompt_length``, or that
    cannot be read column-wise (an iterable dataset), is not prompt-only."""
    columns = getattr(dataset, "column_names", None)
    if not isinstance(columns, list) or "input_ids" not in columns or PROMPT_LENGTH_COLUMN not in columns:
        return False
    try:
        import pyarrow.compute as pc

        table = dataset.with_format("arrow", columns=["input_ids", PROMPT_LENGTH_COLUMN])[:]  # no Python rows
        lengths = pc.list_value_length(table.column("input_ids"))
        return len(table) > 0 and pc.all(pc.less_equal(lengths, table.column(PROMPT_LENGTH_COLUMN))).as_py()
    except (AttributeError, TypeError, KeyError, ImportError):
        rows = [dataset[i] for i in range(len(dataset))]
        return _prompt_only_rows([len(r["input_ids"]) for r in rows], [r[PROMPT_LENGTH_COLUMN] for r in rows])


def check_on_policy_data(args: Any, train_dataset: Any, eval_dataset: Any = None) -> None:
    """Refuse prompt-only training data unless every step is on-policy (``lmbda = 1``), and prompt-only
    evaluation data (evaluation scores fixed completions and generates none)."""
    if getattr(args, "distillation_task", None) not in (None, "causal-lm"):
        return
    if args.lmbda < 1 and is_prompt_only(train_dataset):
        raise ValueError(
            f"The training data has prompts only (no completion tokens), so only on-policy steps can train on it, "
            f"but lmbda={args.lmbda} would also take steps on the dataset's completions. Pass --lmbda 1 (lmbda=1.0: "
            "the student completes every step's prompts, as TRL's DistillationTrainer does), or give data with "
            "completions."
        )
    ce_weight = 1 - min(args.alpha, args.alpha if getattr(args, "alpha_end", None) is None else args.alpha_end)
    if ce_weight > 0 and is_prompt_only(train_dataset):
        raise ValueError(
            f"The training data has prompts only, so every completion is the student's own sample, and alpha="
            f"{args.alpha} would give {ce_weight:g} of the loss to cross-entropy on those samples (training the "
            "student to repeat itself; TRL's DistillationTrainer has no such term). Pass --alpha 1 (and no "
            "--alpha_end below 1): the loss is then the divergence to the teacher only."
        )
    splits = eval_dataset.values() if isinstance(eval_dataset, Mapping) else [eval_dataset]
    if any(split is not None and is_prompt_only(split) for split in splits):
        raise ValueError(
            "The evaluation data has prompts only: evaluation scores fixed completions and generates none. Give "
            "eval_dataset with completions (e.g. teacher samples: generate_teacher_completions), or leave it out."
        )


def completion_entropy(logits: torch.Tensor, weights: torch.Tensor, temperature: float = 1.0,
                       chunk_logits: int = ENTROPY_CHUNK_LOGITS) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ_rows w · H(softmax(z / T)), Σ w) over the rows with weight > 0, chunk by chunk and without gradient:
    H = −Σ_v p_v log p_v in nats; ``logits`` [..., V], ``weights`` of the same leading shape. A chunk holds at
    most ``chunk_logits`` logits and an eighth of the rows, so it adds little to the step's peak memory."""
    flat = logits.detach().reshape(-1, logits.shape[-1])
    return _entropy_sum(lambda rows: flat.index_select(0, rows), flat.shape[-1], weights, temperature, chunk_logits)


def _entropy_sum(row_logits: Callable[[torch.Tensor], torch.Tensor], vocab: int, weights: torch.Tensor,
                 temperature: float, chunk_logits: int = ENTROPY_CHUNK_LOGITS) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`completion_entropy` over ``row_logits(indices)``, the logits of the given flat rows."""
    with torch.no_grad():
        w = weights.reshape(-1).float()
        index = torch.nonzero(w > 0).squeeze(1)
        total = torch.zeros((), device=w.device)
        rows = max(1, min(chunk_logits // vocab, -(-index.numel() // 8)))
        for start in range(0, index.numel(), rows):
            part = index[start : start + rows]
            log_p = torch.log_softmax(row_logits(part).float().div_(temperature), dim=-1)
            total += (w[part] * log_p.exp().mul_(log_p).sum(-1).to(w.device)).sum().neg()
        return total, w.sum()


def _row_logits(outputs: Any, model: torch.nn.Module, weights: torch.Tensor) -> Optional[tuple[Callable, int]]:
    """(indices -> those flat rows' logits, V): the model's logits when it made them at every position, else (the
    fused-linear path, ``logits_to_keep`` empty) its last hidden states through its ``lm_head``; None when neither
    is readable (a sharded head is not gathered again for a log line)."""
    logits = getattr(outputs, "logits", None)
    if logits is not None and logits.shape[:-1] == weights.shape:
        flat = logits.detach().reshape(-1, logits.shape[-1])
        return (lambda rows: flat.index_select(0, rows)), flat.shape[-1]
    hidden = getattr(outputs, "hidden_states", None)
    head = fusable_head(model)[0]
    if not hidden or head is None or hidden[-1].shape[:-1] != weights.shape or _sharded(head.weight):
        return None
    states = hidden[-1].detach().reshape(-1, hidden[-1].shape[-1])
    post = logit_postprocessing(unwrap_model(model).config)
    bias = None if head.bias is None else head.bias.detach()
    weight = head.weight.detach()
    return (lambda rows: head_logits(states.index_select(0, rows), weight, bias, post)), weight.shape[0]


class OnPolicyLog:
    """Generates the on-policy completions and keeps TRL's generation metrics between two log lines.

    ``pop`` reads means over every completion (or completion token) since the last log line, summed over
    processes by ``reduce``; it is {} when nothing was generated.
    """

    def __init__(self, device: torch.device, enabled: bool = True) -> None:
        self.device = device
        self.enabled = enabled  # lmbda > 0: the same on every process, so the reductions in pop() match
        self._sums = {k: torch.zeros((), device=device) for k in _SUMS}

    def generate(self, model: torch.nn.Module, inputs: Mapping[str, torch.Tensor], args: Any,
                 tokenizer: Any) -> dict[str, torch.Tensor]:
        """The batch with its completions replaced by the student's own (prompts kept); counts their lengths."""
        pad = getattr(tokenizer, "pad_token_id", None)
        eos = getattr(tokenizer, "eos_token_id", None)
        eos = getattr(unwrap_model(model).config, "eos_token_id", None) if eos is None else eos
        batch = generate_on_policy_batch(
            model, inputs, pad_token_id=pad if pad is not None else eos, eos_token_id=eos,
            max_new_tokens=args.max_completion_length, temperature=args.generation_temperature,
            top_p=args.top_p, top_k=args.top_k, do_sample=True,
        )
        self.add_completions(batch)
        return batch

    def add_completions(self, batch: Mapping[str, torch.Tensor]) -> None:
        """Count a generated batch: its completions' lengths (labelled tokens) and which an EOS ended."""
        lengths = (batch["labels"] != IGNORE_INDEX).sum(dim=1).float()
        finished = batch[FINISHED_COLUMN].bool()
        updates = {"completions": float(len(lengths)), "completion_tokens": lengths.sum(),
                   "clipped": (~finished).sum().float(), "terminated_tokens": lengths[finished].sum()}
        for name, value in updates.items():
            self._sums[name] += torch.as_tensor(value, device=self.device)

    def add_entropy(self, outputs: Any, model: torch.nn.Module, inputs: Mapping[str, torch.Tensor], training: bool,
                    temperature: float = 1.0) -> None:
        """Add the student's entropy over the completion tokens of a generated training batch (others: nothing),
        from its logits or, on the fused-linear path, its last hidden states through its ``lm_head``."""
        if not training or FINISHED_COLUMN not in inputs:
            return
        weights = token_weights(inputs, "causal-lm")
        source = _row_logits(outputs, model, weights)
        if source is None:
            return
        total, tokens = _entropy_sum(source[0], source[1], weights, temperature)
        self._sums["entropy"] += total.to(self.device)
        self._sums["entropy_tokens"] += tokens.to(self.device)

    def pop(self, reduce: Callable[[torch.Tensor, str], torch.Tensor]) -> dict[str, float]:
        """TRL's metric names with their means since the last call; the sums restart at 0."""
        if not self.enabled:
            return {}
        s = {k: float(reduce(v, "sum")) for k, v in self._sums.items()}
        for value in self._sums.values():
            value.zero_()
        if not s["completions"]:
            return {}
        terminated = s["completions"] - s["clipped"]
        out = {"completions/mean_length": s["completion_tokens"] / s["completions"],
               "completions/clipped_ratio": s["clipped"] / s["completions"],
               "completions/mean_terminated_length": s["terminated_tokens"] / terminated if terminated else 0.0}
        if s["entropy_tokens"]:
            out["entropy"] = s["entropy"] / s["entropy_tokens"]
        return {k: round(v, 6) for k, v in out.items()}
