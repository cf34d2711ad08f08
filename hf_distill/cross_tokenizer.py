"""Cross-tokenizer mode of `DistillationTrainer`: a causal-LM teacher whose tokenizer differs from the student's.

The batches come from :func:`hf_distill.lm.cross_tokenizer_data.tokenize_aligned` (each side's own tokens,
and the character-aligned groups). The logit terms become, per micro-batch (unnormalised sums; the trainer
divides by the student's completion tokens of the whole optimizer step, as in the same-tokenizer path)::

    alpha · Σ_groups L_g  +  (1 − alpha) · Σ_student completion tokens CE

with L_g of :func:`hf_distill.losses.cross_tokenizer.cross_tokenizer_group_losses` (``cross_tokenizer_loss``:
hybrid or uld). The T² factor of the KL groups follows ``scale_by_temperature_squared``; so with identical
tokenizers (one group per completion token, every pair shared) the loss equals the same-tokenizer forward KL +
CE. Features that read the teacher on the student's token ids are refused (:func:`refuse_incompatible`).

On-policy batches: :meth:`CrossTokenizerLoss.on_policy_batch` re-tokenizes the student's samples for the teacher
(``lm.cross_tokenizer_data.align_generated``). Offline: :func:`cache_aligned_teacher_topk` stores the teacher's
top-k over its own tokens, which the group losses read instead of live logits.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .lm.alignment import IGNORE_INDEX, NO_GROUP, check_unaligned_share, require_fast_tokenizer, tokenizer_scheme
from .lm.cross_tokenizer_data import ALIGNMENT_COLUMNS, CrossTokenizerCollator, align_generated, teacher_prompt_ids
from .lm.data import FINISHED_COLUMN
from .losses.cross_tokenizer import (TopKTeacher, VocabMapping, build_vocab_mapping, cross_tokenizer_group_losses,
                                     flatten_group_ids)
from .teacher_cache import TOKEN_LOG_PROBS_SUFFIX, cache_teacher_outputs

logger = logging.getLogger(__name__)

__all__ = ["ALIGNMENT_COLUMNS", "CrossTokenizerLoss", "cache_aligned_teacher_topk", "refuse_incompatible",
           "wants_cross_tokenizer"]


def cache_aligned_teacher_topk(teacher: Any, dataset: Any, *, top_k: int, temperature: float = 1.0,
                               batch_size: int = 32, pad_token_id: int | None = None, **kwargs: Any) -> Any:
    """Cache the teacher's top-k at ``temperature`` over the ``teacher_input_ids`` of ``tokenize_aligned`` rows.

    Adds ``teacher_topk_log_probs`` / ``teacher_topk_indices`` [teacher seq_len, k], ``teacher_topk_temperature``
    and ``teacher_topk_token_log_probs`` (the log-probability of each next teacher token), through
    :func:`hf_distill.teacher_cache.cache_teacher_outputs` (same fingerprinting; ``kwargs`` go there). Cross-tokenizer
    training then reads these instead of running the teacher; the losses are exact at k = the teacher's
    vocabulary, approximate below (:func:`hf_distill.losses.cross_tokenizer.topk_shared_forward_kl`).
    """
    if "teacher_input_ids" not in getattr(dataset, "column_names", []):
        raise ValueError("cache_aligned_teacher_topk needs rows of tokenize_aligned (a teacher_input_ids column): "
                         "tokenize the data with hf_distill.tokenize_aligned first.")
    return cache_teacher_outputs(teacher, dataset, task="causal-lm", batch_size=batch_size, top_k=top_k,
                                 temperature=temperature, pad_token_id=pad_token_id, input_prefix="teacher_",
                                 token_log_probs=True, **kwargs)


def wants_cross_tokenizer(mode: str, dataset_columns: Any) -> bool:
    """On when the vocabulary check chose cross-tokenizer mode, or the data is already aligned (then it runs
    even with identical tokenizers, where it gives the same-tokenizer loss)."""
    return mode == "cross-tokenizer" or all(c in set(dataset_columns or ()) for c in ALIGNMENT_COLUMNS)


def cache_problem(cache: Any, train_dataset: Any) -> str | None:
    """Why the datasets' cached teacher columns cannot serve cross-tokenizer mode, or None (no cache, or the
    aligned top-k cache of :func:`cache_aligned_teacher_topk` over the rows' ``teacher_input_ids``)."""
    fix = ("cache the teacher's aligned top-k instead: hf_distill.cross_tokenizer.cache_aligned_teacher_topk(teacher, "
           "aligned_dataset, top_k=...), or drop the columns and let the teacher run live")
    if not cache.present:
        return None
    if cache.logits_column in cache.dataset_columns:
        return f"the data carries cached teacher logits (full logits over one vocabulary; {fix})"
    lengths_match = True
    if cache.aligned and train_dataset is not None and "teacher_input_ids" in (train_dataset.column_names or []):
        row = train_dataset[0]
        lengths_match = len(row[f"{cache.topk_prefix}_log_probs"]) == len(row["teacher_input_ids"])
    if not cache.aligned or not lengths_match:
        return ("the data carries a top-k cache that is not over the teacher's own tokens of these rows (made from "
                f"the student's tokens, i.e. another tokenizer's ids; {fix})")
    return None


def refuse_incompatible(args: Any, task: str, teachers: list, cache_problem: str | None, intermediate: Any) -> None:
    """Raise a ValueError naming the flag for features that cannot work across vocabularies."""
    problems = []
    if task != "causal-lm":
        problems.append(f"the task is {task} (cross-tokenizer distillation is for causal-lm only)")
    if cache_problem:
        problems.append(cache_problem)
    if args.truncate_teacher_vocab:
        problems.append("--truncate_teacher_vocab assumes one vocabulary padded on the teacher's side (turn it off)")
    if intermediate is not None:
        problems.append("hidden/attention/relation terms compare positions of one tokenization "
                        "(set --hidden_weight, --attention_weight and --relation_weight to 0)")
    if args.lmbda > 0 and not teachers:
        problems.append("on-policy batches (--lmbda > 0) need the live teacher: a cache covers only the dataset's "
                        "completions (pass the teacher model too, or set --lmbda 0)")
    if len(teachers) > 1 or args.self_distillation != "none":
        problems.append("several teachers and self-distillation are not supported across tokenizers (pass one "
                        "teacher as `teacher_model` / --teacher; for several, distil from them one after another)")
    if args.distillation_loss != "forward_kl":
        problems.append(f"--distillation_loss {args.distillation_loss}: the shared-vocabulary groups use forward KL "
                        "(set --distillation_loss forward_kl, and choose --cross_tokenizer_loss hybrid or uld)")
    if problems:
        raise ValueError("Cross-tokenizer mode (the teacher has its own tokenizer) cannot run: " + "; ".join(problems) + ".")


def _shift_left(x: torch.Tensor, fill: Any) -> torch.Tensor:
    """x[:, t] <- x[:, t + 1]: the logits at position t predict token t + 1."""
    return torch.cat([x[:, 1:], x.new_full((x.shape[0], 1), fill)], dim=1)


@dataclass
class CrossTokenizerLoss:
    """The vocabulary mapping (built once) and the settings of the cross-tokenizer logit terms."""

    mapping: VocabMapping
    mode: str
    max_unaligned_share: float
    collator: CrossTokenizerCollator
    student_tokenizer: Any = None
    teacher_tokenizer: Any = None
    same_tokenizer: bool = False  # identical vocabularies (aligned data given to identical tokenizers)

    @classmethod
    def build(cls, student_tokenizer: Any, teacher_tokenizer: Any, args: Any) -> "CrossTokenizerLoss":
        """Check both tokenizers are fast and pair their vocabularies."""
        if student_tokenizer is None or teacher_tokenizer is None:
            raise ValueError("Cross-tokenizer mode needs both tokenizers: pass the student's as `processing_class` and "
                             "the teacher's as `teacher_processing_class`.")
        require_fast_tokenizer(student_tokenizer, "student")
        require_fast_tokenizer(teacher_tokenizer, "teacher")
        mapping = build_vocab_mapping(
            student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab(), tokenizer_scheme(student_tokenizer),
            tokenizer_scheme(teacher_tokenizer), student_tokenizer.all_special_tokens, teacher_tokenizer.all_special_tokens,
        )
        pads = [t.pad_token_id if t.pad_token_id is not None else (t.eos_token_id or 0)
                for t in (student_tokenizer, teacher_tokenizer)]
        logger.info("Cross-tokenizer mode: %d vocabulary entries shared (student %d, teacher %d); loss %s.",
                    len(mapping), len(student_tokenizer), len(teacher_tokenizer), args.cross_tokenizer_loss)
        if args.temperature != 1.0 or (args.temperature_end or 1.0) != 1.0:
            logger.warning("Cross-tokenizer mode at temperature %s: the benchmark (README) found T = 2 systematically "
                           "worse across tokenizers than T = 1 (the T²-weighted KL groups); consider --temperature 1.",
                           args.temperature)
        same = student_tokenizer.get_vocab() == teacher_tokenizer.get_vocab() and \
            tokenizer_scheme(student_tokenizer) == tokenizer_scheme(teacher_tokenizer)
        collator = CrossTokenizerCollator(*pads, topk_prefix=args.teacher_topk_column_prefix)
        return cls(mapping, args.cross_tokenizer_loss, args.max_unaligned_share, collator, student_tokenizer,
                   teacher_tokenizer, same)

    @classmethod
    def for_trainer(cls, trainer: Any, teachers: list, modes: set, teacher_tokenizer: Any) -> "CrossTokenizerLoss | None":
        """The trainer's cross-tokenizer loss when the mode is on (``modes`` from ``check_vocabularies``, or
        aligned data), after refusing what cannot work across vocabularies; None in same-tokenizer mode."""
        if not wants_cross_tokenizer("cross-tokenizer" if "cross-tokenizer" in modes else "same-tokenizer",
                                     trainer.cache.dataset_columns):
            return None
        refuse_incompatible(trainer.args, trainer.task, teachers, cache_problem(trainer.cache, trainer.train_dataset),
                            trainer.intermediate)
        columns = set(trainer.cache.dataset_columns)
        if columns and not columns.issuperset(ALIGNMENT_COLUMNS):
            raise ValueError(
                "The teacher and student tokenizers differ (cross-tokenizer mode), but the datasets lack the aligned "
                f"columns {list(ALIGNMENT_COLUMNS)}: tokenize the prompt/completion rows with hf_distill.lm.cross_tokenizer_data."
                "tokenize_aligned(dataset, student_tokenizer, teacher_tokenizer, max_length=...).")
        student_tokenizer = trainer.processing_class
        loss = cls.build(student_tokenizer, teacher_tokenizer or student_tokenizer, trainer.args)
        given = trainer.data_collator
        if isinstance(given, CrossTokenizerCollator):
            loss.collator = given
        elif type(given).__name__ != "DataCollatorWithPadding" and getattr(given, "__name__", "") != "default_data_collator":
            logger.warning("Cross-tokenizer mode pads batches with CrossTokenizerCollator; the given data_collator (%s) "
                           "is not used.", type(given).__name__)
        return loss

    def on_policy_batch(self, generated: dict[str, torch.Tensor], drawn: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The student's generated batch (``generate_on_policy_batch``) re-tokenized for the teacher and aligned.

        Per row, the student keeps its prompt and sampled ids; the teacher gets its own prompt tokens of the drawn
        batch (:func:`teacher_prompt_ids`) followed by its tokenization of the decoded completion text
        (:func:`align_generated`). Returns the collated columns of ``tokenize_aligned`` on the student's device.
        """
        rows = []
        for b, ids in enumerate(generated["input_ids"]):
            length, start = int(generated["attention_mask"][b].sum()), int(generated["prompt_length"][b])
            ids = ids[:length].tolist()
            teacher_row = {k: drawn[k][b] for k in ("teacher_input_ids", "teacher_attention_mask", *ALIGNMENT_COLUMNS)}
            rows.append(align_generated(self.student_tokenizer, self.teacher_tokenizer, ids[:start], ids[start:],
                                        teacher_prompt_ids(teacher_row, self.teacher_tokenizer.eos_token_id),
                                        self.same_tokenizer))
        device = generated["input_ids"].device
        batch = {k: v.to(device) for k, v in self.collator(rows).items()}
        if FINISHED_COLUMN in generated:  # marks a generated batch (lm/on_policy.py logs its entropy)
            batch[FINISHED_COLUMN] = generated[FINISHED_COLUMN]
        return batch

    def _topk_teacher(self, cached: dict[str, Any], temperature: float) -> TopKTeacher:
        """The batch's aligned top-k cache as flat rows; its temperature must be the training one."""
        prefix = self.collator.topk_prefix
        stored = cached.get(f"{prefix}_temperature")
        if stored is not None and not torch.allclose(torch.as_tensor(stored).float().cpu(), torch.tensor(float(temperature))):
            raise ValueError(
                f"The aligned top-k cache was made at temperature {torch.as_tensor(stored).flatten()[0].item()} but "
                f"training uses {temperature}; re-cache with the training temperature or set --temperature to match.")
        log_probs, indices = cached[f"{prefix}_log_probs"], cached[f"{prefix}_indices"]
        return TopKTeacher(log_probs.reshape(-1, log_probs.shape[-1]), indices.reshape(-1, indices.shape[-1]),
                           cached[f"{prefix}_{TOKEN_LOG_PROBS_SUFFIX}"].reshape(-1))

    def pop_alignment(self, inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Take the alignment columns out of a batch (they are no model's inputs); check the unaligned share."""
        alignment = {name: inputs.pop(name) for name in ALIGNMENT_COLUMNS if name in inputs}
        if len(alignment) != len(ALIGNMENT_COLUMNS):
            self.collator([{}])  # raises the error naming tokenize_aligned
        share = check_unaligned_share(alignment, self.max_unaligned_share)
        if share > 0:
            logger.warning("%.1f%% of this batch's completion tokens could not be aligned between the tokenizers; "
                           "they get only the CE term.", 100 * share)
        return alignment

    def logit_terms(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | dict, inputs: dict[str, Any],
                    alignment: dict[str, torch.Tensor], alpha: float, temperature: float,
                    scale_by_temperature_squared: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(alpha · Σ_g L_g + (1 − alpha) · Σ CE, {"kd": Σ_g L_g, "ce": Σ CE}), unnormalised (module docstring).

        ``teacher_logits``: the live teacher's logits, or the batch's aligned top-k cache columns (a dict)."""
        teacher = self._topk_teacher(teacher_logits, temperature) if isinstance(teacher_logits, dict) else \
            teacher_logits.reshape(-1, teacher_logits.shape[-1])
        s_groups = _shift_left(alignment["student_group_ids"], NO_GROUP)
        t_groups = _shift_left(alignment["teacher_group_ids"], NO_GROUP)
        per_example = int(torch.maximum(s_groups.max(), t_groups.max()).clamp_min(0)) + 1 if s_groups.numel() else 1
        flat = student_logits.reshape(-1, student_logits.shape[-1])
        log_q = F.log_softmax(flat.float() / temperature if temperature != 1 else flat.float(), dim=-1)  # groups, CE
        rows = cross_tokenizer_group_losses(
            flat, teacher,
            _shift_left(inputs["input_ids"], 0).reshape(-1), _shift_left(inputs["teacher_input_ids"], 0).reshape(-1),
            flatten_group_ids(s_groups, per_example).reshape(-1), flatten_group_ids(t_groups, per_example).reshape(-1),
            per_example * s_groups.shape[0], self.mapping, temperature=temperature, mode=self.mode, student_log_probs=log_q,
        )
        group_losses = rows.loss
        if not scale_by_temperature_squared:  # the KL groups carry T²; ULD groups have no temperature factor
            group_losses = torch.where(rows.uses_kl, group_losses / temperature**2, group_losses)
        kd = group_losses.sum()
        labels = _shift_left(inputs["labels"], IGNORE_INDEX).reshape(-1)
        ce = F.nll_loss(log_q, labels, ignore_index=IGNORE_INDEX, reduction="sum") if temperature == 1 else \
            F.cross_entropy(flat.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
        weighted = alpha * kd + (1.0 - alpha) * ce
        return weighted, {"kd": kd.detach(), "ce": ce.detach()}
