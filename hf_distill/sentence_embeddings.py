"""Sentence-embedding distillation: the pooling a teacher uses, the student's sentence-transformers files,
the projection when widths differ, and the metrics that judge a student embedder.

The student learns the teacher's pooled sentence embedding (sentence-transformers' distillation recipe)::

    e_s = pool(student last hidden state),  e_t = pool(teacher last hidden state)
    L_b = embedding_loss(P(e_s), e_t)        P: EmbeddingProjection when the widths differ, else identity

The pooling (mean / cls / max, then optional L2 normalisation) is read from the teacher's sentence-transformers
files or given explicitly, and written into the student's folder so that ``SentenceTransformer(folder)`` loads it.
The files follow the layout sentence-transformers has read since v2 (checked against 6.2):
``modules.json``, ``sentence_bert_config.json``, ``1_Pooling/config.json`` (``pooling_mode_*`` flags) and
``2_Normalize/``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch
from torch import nn

from .losses.embeddings import POOLING_MODES, embedding_loss, pool
from .tasks import ENCODER_TASKS, unwrap_model

logger = logging.getLogger(__name__)

MODULE_TYPES = {
    "transformer": "sentence_transformers.models.Transformer",
    "pooling": "sentence_transformers.models.Pooling",
    "normalize": "sentence_transformers.models.Normalize",
}
# sentence-transformers' legacy flag for each mode we compute, and the flags we cannot reproduce.
_MODE_FLAGS = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token", "max": "pooling_mode_max_tokens"}
_OTHER_FLAGS = {
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
HOW_TO_GIVE_POOLING = (
    "give the pooling explicitly: --embedding_pooling mean --embedding_normalize true (in Python "
    "PoolingSettings(mode='mean', normalize=True)); the teacher's model card says which pooling it was trained with "
    "(all-MiniLM-L6-v2: mean pooling, then L2 normalisation)"
)
PROJECTION_FILE = "embedding_projection.safetensors"


@dataclass(frozen=True)
class PoolingSettings:
    """How token vectors become one sentence vector: ``mode`` (mean, cls, max), then L2 ``normalize``."""

    mode: str = "mean"
    normalize: bool = False

    def __post_init__(self) -> None:
        if self.mode not in POOLING_MODES:
            raise ValueError(f"pooling mode must be one of {POOLING_MODES}, got {self.mode!r} (--embedding_pooling)")
        if not isinstance(self.normalize, bool):
            raise ValueError(f"normalize must be True or False, got {self.normalize!r} (--embedding_normalize)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read {path}: {error}") from None


def _mode_from_config(config: Mapping[str, Any], path: Path) -> str:
    """The one pooling mode a sentence-transformers Pooling config selects (legacy flags or ``pooling_mode``)."""
    if "pooling_mode" in config:
        modes = config["pooling_mode"]
        modes = [modes] if isinstance(modes, str) else list(modes)
    else:
        flags = {**{flag: mode for mode, flag in _MODE_FLAGS.items()}, **_OTHER_FLAGS}
        modes = [mode for flag, mode in flags.items() if config.get(flag)]
    if len(modes) != 1 or modes[0] not in POOLING_MODES:
        raise ValueError(
            f"{path} selects pooling {modes}; hf_distill computes exactly one of {POOLING_MODES}. "
            f"To distil with another pooling, {HOW_TO_GIVE_POOLING}"
        )
    return modes[0]


def _module_paths(folder: Path) -> Optional[dict[str, str]]:
    """{kind: subfolder} of the sentence-transformers modules in ``modules.json`` (None without the file)."""
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return None
    found: dict[str, str] = {}
    for module in _read_json(modules_file):
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        if kind in ("Dense", "LayerNorm", "WeightedLayerPooling", "Router", "Asym"):
            raise ValueError(
                f"{modules_file} lists a {kind} module: its sentence embedding is not a pooling of the model's last "
                f"hidden state, which is all hf_distill reproduces. Remove it, or {HOW_TO_GIVE_POOLING}"
            )
        found[kind.lower()] = str(module.get("path", ""))
    return found


def read_pooling(folder: str | Path) -> PoolingSettings:
    """The pooling of a sentence-transformers folder: ``modules.json`` (its Pooling and Normalize modules), or
    without it ``1_Pooling/config.json`` and an optional ``2_Normalize/``. ValueError naming the fix when absent."""
    folder = Path(folder)
    modules = _module_paths(folder)
    if modules is not None:
        pooling_dir = folder / modules["pooling"] if "pooling" in modules else None
        normalize = "normalize" in modules
    else:
        pooling_dir, normalize = folder / "1_Pooling", (folder / "2_Normalize").is_dir()
    config_file = pooling_dir / "config.json" if pooling_dir is not None else None
    if config_file is None or not config_file.is_file():
        raise ValueError(
            f"{folder} has no sentence-transformers pooling information (modules.json with a Pooling module, or "
            f"1_Pooling/config.json), so the teacher's sentence embedding is unknown: {HOW_TO_GIVE_POOLING}."
        )
    return PoolingSettings(_mode_from_config(_read_json(config_file), config_file), normalize)


def resolve_pooling(source: str | Path | None, mode: Optional[str] = None,
                    normalize: Optional[bool] = None) -> PoolingSettings:
    """The pooling to distil with: the explicit ``mode`` (and ``normalize``, default False) when given, else
    :func:`read_pooling` of the teacher's folder ``source``. Explicit settings that differ from the folder's are
    used, with a warning."""
    if mode is None:
        if normalize is not None:
            raise ValueError("--embedding_normalize needs --embedding_pooling (mean, cls or max) beside it")
        if source is None or not Path(source).is_dir():
            raise ValueError(f"the teacher {source!r} is not a local folder to read the pooling from: "
                             f"{HOW_TO_GIVE_POOLING}")
        return read_pooling(source)
    settings = PoolingSettings(mode, bool(normalize))
    if source is not None and Path(source).is_dir():
        try:
            found = read_pooling(source)
        except ValueError:
            return settings
        if found != settings:
            logger.warning("Distilling with pooling %s, although %s records %s", settings, source, found)
    return settings


def write_sentence_transformers_files(folder: str | Path, pooling: PoolingSettings, embedding_dim: int,
                                      max_seq_length: Optional[int] = None) -> list[Path]:
    """Write the files that make a saved transformers folder load with ``SentenceTransformer(folder)``:
    ``modules.json`` (Transformer at the root, then Pooling, then Normalize when ``pooling.normalize``),
    ``sentence_bert_config.json``, ``1_Pooling/config.json`` and ``2_Normalize/``. Returns the paths written."""
    folder = Path(folder)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": MODULE_TYPES["transformer"]},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": MODULE_TYPES["pooling"]},
    ]
    if pooling.normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": MODULE_TYPES["normalize"]})
    pooling_config = {"word_embedding_dimension": int(embedding_dim)}
    pooling_config.update({flag: mode == pooling.mode for mode, flag in _MODE_FLAGS.items()})
    pooling_config.update({flag: False for flag in _OTHER_FLAGS})
    pooling_config["include_prompt"] = True
    bert_config: dict[str, Any] = {"do_lower_case": False}
    if max_seq_length is not None:
        bert_config["max_seq_length"] = int(max_seq_length)
    written = {
        folder / "modules.json": modules,
        folder / "sentence_bert_config.json": bert_config,
        folder / "1_Pooling" / "config.json": pooling_config,
    }
    for path, content in written.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(content, indent=2) + "\n")
    paths = list(written)
    if pooling.normalize:
        (folder / "2_Normalize").mkdir(exist_ok=True)
        paths.append(folder / "2_Normalize")
    return paths


class EmbeddingProjection(nn.Module):
    """``P(e) = W e + b``, a learned map of the student's sentence embedding to the teacher's width. It trains
    with the student and is saved apart (:meth:`save`, a safetensors file), never inside the student."""

    def __init__(self, student_dim: int, teacher_dim: int) -> None:
        super().__init__()
        self.student_dim, self.teacher_dim = int(student_dim), int(teacher_dim)
        self.linear = nn.Linear(self.student_dim, self.teacher_dim)

    @classmethod
    def if_needed(cls, student_dim: int, teacher_dim: int) -> Optional[EmbeddingProjection]:
        """A projection when the widths differ, else None (equal widths are compared directly)."""
        return None if int(student_dim) == int(teacher_dim) else cls(student_dim, teacher_dim)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.linear(embeddings)

    def save(self, path: str | Path) -> None:
        """Write the weights, with the widths as metadata, to a safetensors file."""
        from safetensors.torch import save_file

        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata={"student_dim": str(self.student_dim), "teacher_dim": str(self.teacher_dim)})

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> EmbeddingProjection:
        """Rebuild a projection written by :meth:`save`."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            meta = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        if not {"student_dim", "teacher_dim"} <= set(meta):
            raise ValueError(f"{path} is not an EmbeddingProjection file (its metadata lacks the widths)")
        module = cls(int(meta["student_dim"]), int(meta["teacher_dim"]))
        module.load_state_dict(tensors)
        return module.to(device)


def last_hidden_state(outputs: Any) -> torch.Tensor:
    """The ``[B, T, H]`` last hidden state of a transformers output (a base model's ``last_hidden_state``, else
    the last of ``hidden_states``)."""
    def field(name: str) -> Any:
        return outputs.get(name) if isinstance(outputs, Mapping) else getattr(outputs, name, None)

    hidden = field("last_hidden_state")
    if hidden is None:
        states = field("hidden_states")
        if not states:
            raise ValueError("the model output has no last_hidden_state: call the model with output_hidden_states=True")
        hidden = states[-1]
    return hidden


def sentence_embedding(outputs: Any, attention_mask: Optional[torch.Tensor], pooling: PoolingSettings) -> torch.Tensor:
    """The ``[B, H]`` sentence embedding of a model output: its last hidden state, pooled (and normalised)."""
    return pool(last_hidden_state(outputs), attention_mask, pooling.mode, pooling.normalize)


MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


def embed(model: nn.Module, batch: Mapping[str, torch.Tensor], pooling: PoolingSettings) -> torch.Tensor:
    """Run ``model`` on the batch's model inputs and return the ``[B, H]`` sentence embeddings (with the
    gradient when grad mode is on: the same function serves the loss and the evaluation)."""
    inputs = {k: batch[k] for k in MODEL_INPUT_KEYS if k in batch}
    outputs = model(**inputs, output_hidden_states=True)  # a model with a head has no last_hidden_state
    return sentence_embedding(outputs, batch.get("attention_mask"), pooling)


def embedding_loss_sum(student_outputs: Any, teacher_outputs: Any, student_mask: Optional[torch.Tensor],
                       teacher_mask: Optional[torch.Tensor], pooling: PoolingSettings, loss: str = "cosine",
                       projection: Optional[EmbeddingProjection] = None) -> torch.Tensor:
    """``sum_b embedding_loss(P(e_s,b), e_t,b)`` over the batch (the caller divides by its example count).

    ``e`` is the embedding as the model gives it (pooled, then normalised when ``pooling.normalize``); ``P`` reads
    the student's, as a Dense module after it would; MSE compares L2-normalised vectors when the pooling normalises.
    """
    student = sentence_embedding(student_outputs, student_mask, pooling)
    with torch.no_grad():
        teacher = sentence_embedding(teacher_outputs, teacher_mask, pooling)
    if projection is not None:
        student = projection(student)
    elif student.shape[-1] != teacher.shape[-1]:
        raise ValueError(
            f"student embeddings are {student.shape[-1]}-wide and the teacher's {teacher.shape[-1]}-wide: "
            "train an EmbeddingProjection beside the student (EmbeddingProjection.if_needed)"
        )
    return embedding_loss(student, teacher, loss=loss, normalize=pooling.normalize).sum()


def _average_ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks of a 1-D tensor, ties sharing the mean of their ranks (float64)."""
    order = torch.argsort(values, stable=True)
    _, inverse, counts = torch.unique_consecutive(values[order], return_inverse=True, return_counts=True)
    last = torch.cumsum(counts, 0).to(torch.float64)
    mean_rank = last - (counts.to(torch.float64) - 1) / 2  # mean of first..last = last - (count - 1) / 2
    ranks = torch.empty(values.shape[0], dtype=torch.float64, device=values.device)
    ranks[order] = mean_rank[inverse]
    return ranks


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman's rank correlation: the Pearson correlation of the average ranks of ``x`` and ``y`` (1-D, same
    length). NaN when either is constant."""
    x, y = x.detach().flatten().to(torch.float64), y.detach().flatten().to(torch.float64)
    if x.shape != y.shape or x.numel() < 2:
        raise ValueError(f"spearman needs two 1-D series of one length >= 2, got {tuple(x.shape)} and {tuple(y.shape)}")
    rx, ry = _average_ranks(x), _average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = (rx.pow(2).sum() * ry.pow(2).sum()).sqrt()
    return float("nan") if denominator == 0 else float((rx * ry).sum() / denominator)


def pairwise_cosines(embeddings: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every pair i < j of ``[N, D]`` embeddings, row-major: ``[N (N - 1) / 2]``."""
    unit = torch.nn.functional.normalize(embeddings.detach().to(torch.float64), p=2.0, dim=-1)
    rows, cols = torch.triu_indices(unit.shape[0], unit.shape[0], offset=1, device=unit.device)
    return (unit[rows] * unit[cols]).sum(-1)


def embedding_metrics(student_embeddings: torch.Tensor, teacher_embeddings: torch.Tensor) -> dict[str, float]:
    """How well student embeddings ``[N, Ds]`` stand in for the teacher's ``[N, Dt]`` of the same N sentences:

    ``mean_cosine`` = ``1/N sum_i cos(s_i, t_i)`` (only when Ds == Dt: project the student first otherwise);
    ``similarity_spearman`` = Spearman correlation of ``cos(s_i, s_j)`` against ``cos(t_i, t_j)`` over pairs i < j.
    """
    s, t = student_embeddings.detach(), teacher_embeddings.detach()
    if s.dim() != 2 or t.dim() != 2 or s.shape[0] != t.shape[0] or s.shape[0] < 3:
        raise ValueError(f"need [N, D] embeddings of the same N >= 3 sentences, got {tuple(s.shape)} and {tuple(t.shape)}")
    metrics = {"similarity_spearman": spearman(pairwise_cosines(s), pairwise_cosines(t))}
    if s.shape[1] == t.shape[1]:
        cosines = torch.nn.functional.cosine_similarity(s.to(torch.float64), t.to(torch.float64), dim=-1)
        metrics["mean_cosine"] = float(cosines.mean())
    return metrics


LOGIT_TERMS = ("kd", "ce")
INTERMEDIATE_TERMS = ("hidden", "attention", "relation")


def check_encoder_task(task: str, term_weights: Mapping[str, float]) -> dict[str, float]:
    """Check the loss terms of a task without logits and return the active ones ({name: weight > 0}).

    ``feature-extraction`` (task-agnostic distillation: a student without head learns the teacher's hidden states,
    attention maps or relations) needs an intermediate term and no logit or embedding term; ``sentence-embedding``
    needs the embedding term and no logit term. ``term_weights`` maps kd, ce, hidden, attention, relation and
    embedding to their weights (absent = 0).
    """
    if task not in ENCODER_TASKS:
        raise ValueError(f"check_encoder_task is for {ENCODER_TASKS}, got {task!r}")
    active = {name: float(w) for name, w in term_weights.items() if w and float(w) > 0}
    logits = sorted(set(active) & set(LOGIT_TERMS))
    if logits:
        raise ValueError(
            f"distillation_task={task!r} has no logits to distil, but the logit terms {logits} are weighted above 0: "
            "set their weights to 0, or give a student with a task head and its task (e.g. sequence-classification)"
        )
    if task == "feature-extraction":
        if "embedding" in active:
            raise ValueError("the embedding term belongs to distillation_task='sentence-embedding', "
                             "not 'feature-extraction'")
        if not set(active) & set(INTERMEDIATE_TERMS):
            raise ValueError(
                "distillation_task='feature-extraction' distils intermediate terms only, and none is on: set "
                "--hidden_weight, --attention_weight or --relation_weight above 0"
            )
    elif "embedding" not in active:
        raise ValueError("distillation_task='sentence-embedding' needs the embedding term: set --embedding_weight above 0")
    return active


class EmbeddingTerm(nn.Module):
    """What a trainer needs for ``distillation_task="sentence-embedding"``, in one module.

    ``forward`` gives ``{"embedding": sum_b embedding_loss(P(e_s,b), e_t,b)}`` (unweighted; the trainer adds
    ``weight * sum / examples``) and, with ``collect=True``, keeps the batch's embeddings for :meth:`pop_metrics`.
    The projection ``P`` is a submodule (``.to()`` and ``.parameters()`` reach it); :meth:`save` writes the
    student's sentence-transformers files and the projection, :meth:`load` restores the projection.
    """

    def __init__(self, pooling: PoolingSettings, student_width: int, teacher_width: int, loss: str = "cosine",
                 weight: float = 1.0) -> None:
        super().__init__()
        if loss not in ("mse", "cosine") or not weight > 0:
            raise ValueError(f"--embedding_loss must be mse or cosine and --embedding_weight > 0, got {loss!r}, {weight}")
        self.pooling, self.loss, self.weight = pooling, loss, float(weight)
        self.student_width, self.teacher_width = int(student_width), int(teacher_width)
        self.projection = EmbeddingProjection.if_needed(student_width, teacher_width)
        self._collected: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def forward(self, student_outputs: Any, teacher_outputs: Any, student_mask: Optional[torch.Tensor],
                teacher_mask: Optional[torch.Tensor], collect: bool = False,
                gather: Optional[Callable[[Any], Any]] = None) -> dict[str, torch.Tensor]:
        """``gather`` (e.g. ``accelerator.gather_for_metrics``): with ``collect``, the batch's embeddings of every
        process are kept, so the metrics are those of the whole evaluation set (every process calls it)."""
        student = sentence_embedding(student_outputs, student_mask, self.pooling)
        with torch.no_grad():
            teacher = sentence_embedding(teacher_outputs, teacher_mask, self.pooling)
        projected = student if self.projection is None else self.projection(student)
        if collect:
            kept = tuple(x.detach().float() for x in (student, projected, teacher))
            self._collected.append(tuple(x.cpu() for x in (gather(kept) if gather is not None else kept)))
        return {"embedding": embedding_loss(projected, teacher, self.loss, self.pooling.normalize).sum()}

    def pop_metrics(self, prefix: str = "eval") -> dict[str, float]:
        """``{prefix}_mean_cosine`` (of the projected student when widths differ) and
        ``{prefix}_similarity_spearman`` (of the student's own embeddings) over what was collected; then clears."""
        if not self._collected:
            return {}
        student, projected, teacher = (torch.cat(parts) for parts in zip(*self._collected))
        self._collected.clear()
        if len(teacher) < 3:
            return {}
        metrics = embedding_metrics(student, teacher)
        metrics["mean_cosine"] = embedding_metrics(projected, teacher)["mean_cosine"]
        return {f"{prefix}_{name}": value for name, value in sorted(metrics.items())}

    def describe(self) -> dict[str, Any]:
        """The term's recipe, for ``distillation/recipe.json``."""
        return {"pooling": self.pooling.to_dict(), "loss": self.loss, "weight": self.weight,
                "projection": None if self.projection is None else [self.student_width, self.teacher_width]}

    def save(self, output_dir: str | Path, max_seq_length: Optional[int] = None) -> None:
        """The student's sentence-transformers files in ``output_dir``; the projection in ``distillation/``."""
        write_sentence_transformers_files(output_dir, self.pooling, self.student_width, max_seq_length)
        if self.projection is not None:
            self.projection.save(Path(output_dir) / "distillation" / PROJECTION_FILE)

    def load(self, checkpoint: str | Path, device: str | torch.device = "cpu") -> None:
        """Restore the projection a checkpoint's ``distillation/`` holds (nothing to do without one)."""
        path = Path(checkpoint) / "distillation" / PROJECTION_FILE
        if self.projection is not None and path.is_file():
            self.projection.load_state_dict(EmbeddingProjection.load(path, device).state_dict())


def _width(model: nn.Module) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(config.hidden_size)


def build_embedding_term(task: str, args: Any, student: nn.Module, teacher: Optional[nn.Module],
                         teacher_source: Optional[str]) -> Optional[EmbeddingTerm]:
    """For the trainer's ``__init__``: None for tasks with logits; for the encoder tasks, check the active terms
    (:func:`check_encoder_task`) and, for ``sentence-embedding``, build the :class:`EmbeddingTerm` from
    ``args.embedding_{pooling,normalize,loss,weight}`` (the pooling read from ``teacher_source`` when not given)."""
    if task not in ENCODER_TASKS:
        return None
    weight = float(getattr(args, "embedding_weight", 1.0)) if task == "sentence-embedding" else 0.0
    check_encoder_task(task, {"hidden": args.hidden_weight, "attention": args.attention_weight,
                              "relation": args.relation_weight, "embedding": weight})
    if task == "feature-extraction":
        return None
    if teacher is None:
        raise ValueError("distillation_task='sentence-embedding' needs a live teacher (`teacher_model`): "
                         "its embeddings are not cached")
    pooling = resolve_pooling(teacher_source, getattr(args, "embedding_pooling", None),
                              getattr(args, "embedding_normalize", None))
    return EmbeddingTerm(pooling, _width(unwrap_model(student)), _width(unwrap_model(teacher)),
                         getattr(args, "embedding_loss", "cosine"), weight)
