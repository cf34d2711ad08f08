"""The encoder tasks, which have no logits: general (task-agnostic) distillation and sentence embeddings.

``feature-extraction`` (DistilBERT's pre-training stage, TinyBERT's general distillation, MiniLM): a headless
student (``AutoModel``) learns a headless teacher's internals on unlabelled text::

    loss = Σ w · (hidden-state, attention-map, MiniLM-relation terms)          (intermediate.py)

``sentence-embedding`` (sentence-transformers' distillation recipe): the student learns the teacher's pooled
sentence embedding, the intermediate terms optional beside it::

    loss = w_emb · 1/B Σ_b embedding_loss(P(e_s,b), e_t,b) + Σ w · (intermediate terms)

There is no KD or CE term in either. The logit-term settings (``alpha``, ``temperature``, ``distillation_loss``,
their schedules: ``arguments.LOGIT_TERM_FIELDS``) are refused when set away from their defaults, since they would
weight or shape a term that cannot exist; so is ``feature-extraction`` with every intermediate weight 0.

:class:`EncoderTask` is what :class:`~hf_distill.DistillationTrainer` holds for these tasks (None for the others):
the embedding term's sums for ``compute_loss``, its evaluation metrics, the sentence-transformers files of the
saved student, and the embedding projection trained (and saved in ``distillation/``) beside the student.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch
from torch import nn

from .arguments import EMBEDDING_FIELDS, _DEFAULTS, logit_settings_changed
from .sentence_embeddings import EmbeddingTerm, build_embedding_term, check_encoder_task, write_sentence_transformers_files
from .tasks import ENCODER_TASKS, unwrap_model

PROJECTIONS_FORMAT = "hf_distill.encoder_tasks.TrainedBeside"


def check_encoder_arguments(task: str, args: Any) -> dict[str, float]:
    """Refuse what an encoder task cannot do and return its active terms ({name: weight > 0}): logit-term
    settings changed from their defaults, embedding settings outside ``sentence-embedding``, no active term."""
    changed = logit_settings_changed(args)
    if changed:
        given = ", ".join(f"--{name} {value}" for name, value in changed.items())
        raise ValueError(
            f"distillation_task={task!r} has no logits, so no KD or CE term, but {given} would weight or shape one. "
            "Remove these settings (leave them at their defaults), or distil a student with a task head and its "
            "task (e.g. --distillation_task sequence-classification)."
        )
    embedding = [name for name in EMBEDDING_FIELDS if getattr(args, name, _DEFAULTS[name]) != _DEFAULTS[name]]
    if task != "sentence-embedding" and embedding:
        raise ValueError(f"{', '.join('--' + n for n in embedding)} apply to distillation_task='sentence-embedding' "
                         f"only, not {task!r}: remove them.")
    weight = float(args.embedding_weight) if task == "sentence-embedding" else 0.0
    return check_encoder_task(task, {"hidden": args.hidden_weight, "attention": args.attention_weight,
                                     "relation": args.relation_weight, "embedding": weight})


def _is_headless(model: nn.Module) -> bool:
    model = unwrap_model(model)
    return getattr(model, "base_model", None) is model


class TrainedBeside(nn.Module):
    """The modules trained beside the student when there is an embedding projection: the feature projections
    (or None) and the embedding projection, in one optimizer group, saved in one ``distillation/`` file."""

    def __init__(self, features: Optional[nn.Module], embedding: nn.Module) -> None:
        super().__init__()
        self.features, self.embedding = features, embedding

    def save(self, path: str | Path) -> None:
        """Write every weight (``features.*``, ``embedding.*``) to a safetensors file."""
        from safetensors.torch import save_file

        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata={"format": PROJECTIONS_FORMAT})


class EncoderTask(nn.Module):
    """The trainer's part for ``feature-extraction`` and ``sentence-embedding`` (``embedding`` is the
    :class:`~hf_distill.sentence_embeddings.EmbeddingTerm` of the latter, None for the former)."""

    def __init__(self, task: str, embedding: Optional[EmbeddingTerm] = None) -> None:
        super().__init__()
        if task not in ENCODER_TASKS:
            raise ValueError(f"EncoderTask is for {ENCODER_TASKS}, got {task!r}")
        self.task, self.embedding = task, embedding
        self._beside: Optional[TrainedBeside] = None

    def terms(self, student_outputs: Any, teacher_outputs: list, inputs: Mapping[str, torch.Tensor],
              training: bool, gather: Optional[Callable[[Any], Any]] = None,
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(weighted loss sum, {"embedding": unweighted sum}) over the batch's examples; (0, {}) for
        feature-extraction, whose loss is the intermediate terms alone. Evaluation keeps the embeddings, of all
        processes when ``gather`` is given (``accelerator.gather_for_metrics``)."""
        if self.embedding is None:
            return torch.zeros((), device=inputs["input_ids"].device), {}
        if not teacher_outputs:
            raise ValueError("distillation_task='sentence-embedding' needs the live teacher's hidden states, but the "
                             "batch carries cached teacher outputs (logits) instead: remove those dataset columns")
        mask = inputs.get("attention_mask")
        sums = self.embedding(student_outputs, teacher_outputs[0], mask, inputs.get("teacher_attention_mask", mask),
                              collect=not training, gather=gather)
        return self.embedding.weight * sums["embedding"], sums

    def pop_metrics(self, prefix: str = "eval") -> dict[str, float]:
        """``{prefix}_mean_cosine`` and ``{prefix}_similarity_spearman`` of what evaluation collected."""
        return {} if self.embedding is None else self.embedding.pop_metrics(prefix)

    def trainable(self, intermediate: Any) -> Optional[nn.Module]:
        """What trains beside the student: the feature projections alone (their own file format, as before),
        or, with an embedding projection, both in a :class:`TrainedBeside`."""
        features = None if intermediate is None else intermediate.projections
        projection = None if self.embedding is None else self.embedding.projection
        if projection is None:
            return features
        if self._beside is None or self._beside.features is not features:
            self._beside = TrainedBeside(features, projection)
        return self._beside

    def save(self, folder: str | Path, tokenizer: Any = None) -> None:
        """sentence-embedding: the sentence-transformers files (pooling) of the student saved in ``folder``."""
        if self.embedding is None:
            return
        limit = getattr(tokenizer, "model_max_length", None)
        limit = limit if isinstance(limit, int) and 0 < limit < 1_000_000 else None
        write_sentence_transformers_files(folder, self.embedding.pooling, self.embedding.student_width, limit)


def build_encoder_task(task: str, args: Any, student: nn.Module, teachers: list, teacher_source: Optional[str],
                       ) -> Optional[EncoderTask]:
    """For the trainer's ``__init__``: None for tasks with logits; else the checks (before training) and the
    :class:`EncoderTask` on ``args.device`` (the pooling read from ``teacher_source`` when not given)."""
    if task not in ENCODER_TASKS:
        return None
    check_encoder_arguments(task, args)
    if len(teachers) != 1:
        raise ValueError(f"distillation_task={task!r} distils one live teacher (`teacher_model`), got "
                         f"{len(teachers)}: cached outputs hold logits, and several teachers are not supported here.")
    if task == "feature-extraction":
        return EncoderTask(task)
    for role, model in (("student", student), ("teacher", teachers[0])):
        if not _is_headless(model):
            raise ValueError(
                f"distillation_task='sentence-embedding' pools the last hidden state of a headless model, and the "
                f"{role} is a {type(unwrap_model(model)).__name__}: pass its .base_model, or load it with "
                "AutoModel.from_pretrained."
            )
    return EncoderTask(task, build_embedding_term(task, args, student, teachers[0], teacher_source)).to(args.device)


def trained_beside(intermediate: Any, encoder: Optional[EncoderTask]) -> Optional[nn.Module]:
    """The modules trained beside the student (``DistillationTrainer.extra_trainable``), or None."""
    if encoder is None:
        return None if intermediate is None else intermediate.projections
    return encoder.trainable(intermediate)


def encoder_recipe(recipe: dict[str, Any], encoder: Optional[EncoderTask]) -> dict[str, Any]:
    """The recipe of an encoder-task run: its loss terms without kd and ce (which do not exist there), and the
    embedding term (weight, loss, pooling, projection widths); other recipes are returned unchanged."""
    if encoder is None:
        return recipe
    losses = {name: term for name, term in recipe.get("losses", {}).items() if name not in ("kd", "ce")}
    if encoder.embedding is not None:
        losses["embedding"] = encoder.embedding.describe()
    return {**recipe, "losses": losses}


def encoder_metrics(encoder: Optional[EncoderTask], prefix: str) -> dict[str, float]:
    """The encoder task's evaluation metrics ({} for the tasks with logits)."""
    return {} if encoder is None else encoder.pop_metrics(prefix)


def save_encoder_files(folder: str | Path, encoder: Optional[EncoderTask], tokenizer: Any = None) -> None:
    """Write the encoder task's files into a saved student's folder (nothing for the tasks with logits)."""
    if encoder is not None:
        encoder.save(folder, tokenizer)
