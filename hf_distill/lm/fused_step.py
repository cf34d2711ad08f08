"""The fused-linear path of causal-LM token distillation in `DistillationTrainer` (``--fused_lm_loss``).

Each model runs its own forward (wrapped or not) with ``output_hidden_states=True`` and ``logits_to_keep`` = an
empty index, so no [B, L, V] logits are made. ``hidden_states[-1]`` is what the ``lm_head`` reads (after the final
norm); its rows at the loss positions of `tasks.logit_rows` (row t predicts token t + 1, same labels and weights)
go through each model's ``lm_head`` block by block in
:func:`~hf_distill.losses.fused_linear.fused_linear_distillation_loss`:

    loss_sum = alpha · Σ_i w_i Σ_n w_n soft(z_s,n, z_t_i,n) + (1 − alpha) · Σ_n w_n CE(z_s,n, y_n)

the sums `logit_terms.logit_terms` forms over the models' full logits. Teacher targets are the live teachers'
hidden states (one teacher, or several summed: ``multi_teacher_mode="sum"``) or a top-k cache.

Whether the path is taken is decided once per trainer (:meth:`FusedLMLoss.for_trainer`): each model's head must be
a plain ``nn.Linear`` and a tiny probe forward must show that ``hidden_states[-1]`` through the head (with
`logit_postprocessing`) gives the model's own logits. ``auto`` falls back to the full-logit path and names the
reason once in the log; ``true`` refuses what cannot be fused.

Sharded heads: a DTensor (FSDP2) weight is gathered with ``full_tensor()`` once per ``compute_loss`` (not per
block); a ZeRO-3 partitioned one (``ds_id``) is gathered with ``deepspeed.zero.GatheredParameters`` for the loss.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
from torch import nn

from ..losses.fused_linear import chunk_logits, fused_linear_distillation_loss, logit_postprocessing
from ..tasks import token_targets, token_weights, unwrap_model

logger = logging.getLogger(__name__)

FALLBACK_FIX = "use --fused_lm_loss auto (falls back to the full-logit path) or --fused_lm_loss false"


def fusable_head(model: nn.Module) -> tuple[Optional[nn.Linear], str]:
    """(the model's ``lm_head``, "") when the fused path can read it, else (None, why not)."""
    base = unwrap_model(model)
    get = getattr(base, "get_output_embeddings", None)
    head = get() if callable(get) else None
    name = type(base).__name__
    if head is None or getattr(head, "weight", None) is None:
        return None, f"{name} has no output embeddings"
    plain = isinstance(head, nn.Linear) and type(head).forward is nn.Linear.forward and "forward" not in vars(head)
    if not plain:
        return None, f"{name} has a custom head ({type(head).__name__})"
    return head, ""


def _sharded(weight: torch.Tensor) -> bool:
    return hasattr(weight, "ds_id") or hasattr(weight, "full_tensor")


def probe_hidden_states(model: nn.Module, head: nn.Linear) -> str:
    """"" when the model's forward takes ``output_hidden_states`` / ``logits_to_keep`` (an index tensor) and
    ``hidden_states[-1]`` through ``head`` gives its logits (one tiny forward in eval mode, no grad); else why not.
    Sharded weights (FSDP2, ZeRO-3) are not gathered for this: their forward's signature is checked only."""
    base = unwrap_model(model)
    name = type(base).__name__
    if "logits_to_keep" not in inspect.signature(base.forward).parameters:
        return f"{name}'s forward has no logits_to_keep argument"
    if _sharded(head.weight):
        return ""
    device = head.weight.device
    ids = (torch.arange(3, device=device) % head.weight.shape[0]).unsqueeze(0)
    was_training = base.training
    base.eval()
    try:
        with torch.no_grad():
            out = base(input_ids=ids, output_hidden_states=True, logits_to_keep=torch.tensor([2], device=device))
    except (TypeError, ValueError, IndexError, RuntimeError) as error:
        return f"{name}'s forward refused output_hidden_states / logits_to_keep ({error})"
    finally:
        base.train(was_training)
    logits, hidden = getattr(out, "logits", None), getattr(out, "hidden_states", None)
    if logits is None or not hidden or logits.shape[1] != 1:
        return f"{name}'s forward does not honour logits_to_keep / output_hidden_states"
    with torch.no_grad():
        fused = chunk_logits(hidden[-1][:, 2], head.weight, head.bias, logit_postprocessing(base.config)).float()
    if not torch.allclose(fused, logits[:, 0].float(), rtol=1e-3, atol=1e-3):
        return f"{name}: hidden_states[-1] through its lm_head does not give its logits"
    return ""


def _blocker(trainer: Any) -> str:
    """Why the trainer's logit terms cannot take the fused path ("" when they can)."""
    args = trainer.args
    if trainer.task != "causal-lm":
        return f"{trainer.task} task, not causal-lm"
    if trainer.cross is not None:
        return "cross-tokenizer mode"
    if len(trainer.teachers) > 1 and args.multi_teacher_mode == "average":
        return "teacher mixture average"
    if trainer.cache.logits_column in trainer.cache.dataset_columns:
        return "cached full teacher logits"
    heads = []
    for side, model in [("student", trainer.model)] + [(f"teacher {i}", t) for i, t in enumerate(trainer.teachers)]:
        head, why = fusable_head(model)
        why = why or probe_hidden_states(model, head)
        if why:
            return f"{side}: {why}"
        heads.append(head.weight.device)
    if any(device != heads[0] for device in heads[1:]):
        return (f"the teacher lm_head is on {heads[1:]} and the student lm_head on {heads[0]}: put both heads on one "
                "device (move the teacher)")
    return ""


def full_weight(param: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A head parameter as a plain tensor: a DTensor (FSDP2) is gathered (``full_tensor()``, differentiable)."""
    return param.full_tensor() if param is not None and hasattr(param, "full_tensor") else param


@contextlib.contextmanager
def gathered(params: list) -> Iterator[None]:
    """ZeRO-3 partitioned parameters (``ds_id``) gathered for the block; nothing to do otherwise."""
    partitioned = [p for p in params if p is not None and hasattr(p, "ds_id")]
    if not partitioned:
        yield
        return
    import deepspeed  # a ZeRO-3 parameter means deepspeed is installed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield


@dataclass
class FusedLMLoss:
    """Whether the trainer's causal-LM logit terms take the fused-linear path (``enabled``), and the path itself."""

    enabled: bool
    reason: str = ""

    @classmethod
    def for_trainer(cls, trainer: Any) -> "FusedLMLoss":
        """Decide once (``args.fused_lm_loss``), log the decision once; ``true`` refuses what cannot be fused."""
        mode = trainer.args.fused_lm_loss
        reason = "--fused_lm_loss false" if mode == "false" else _blocker(trainer)
        if reason and mode == "true":
            raise ValueError(f"--fused_lm_loss true, but the causal-LM loss cannot be fused: {reason}; {FALLBACK_FIX}.")
        log = logger.info if trainer.task == "causal-lm" else logger.debug
        log("fused LM loss: %s", f"off ({reason})" if reason else "on")
        return cls(enabled=not reason, reason=reason)

    @staticmethod
    def flags() -> dict[str, Any]:
        """Forward arguments for the fused path: the hidden states, and logits at no position."""
        return {"output_hidden_states": True, "logits_to_keep": torch.empty(0, dtype=torch.long)}

    def logit_terms(self, trainer: Any, model: nn.Module, student_outputs: Any, teacher_outputs: list, cached: dict,
                    inputs: dict, alpha: float, temperature: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``logit_terms.logit_terms``' (loss_sum, {"kd", "ce"}) over the loss positions, through the lm_heads."""
        labels, weights = token_targets(inputs, "causal-lm"), token_weights(inputs, "causal-lm")
        keep = weights > 0
        has_labels = labels is not None
        alpha = alpha if has_labels else 1.0
        student = unwrap_model(model)
        head = student.get_output_embeddings()
        a = trainer.args
        options = dict(student_post=logit_postprocessing(student.config), loss=a.distillation_loss,
                       temperature=temperature, scale_by_temperature_squared=a.scale_by_temperature_squared,
                       jsd_beta=a.jsd_beta, skew_lambda=a.skew_lambda, chunk_size=a.loss_chunk_size)
        hidden = student_outputs.hidden_states[-1][keep]
        rows = (labels[keep] if has_labels else None, weights[keep])
        loss_sum, sums = hidden.new_zeros((), dtype=torch.float32), torch.zeros(2, device=hidden.device)
        teacher_heads = [unwrap_model(t).get_output_embeddings() for t in trainer.teachers] if teacher_outputs else []
        with gathered([p for h in [head, *teacher_heads] for p in (h.weight, h.bias)]):
            targets = _teacher_targets(trainer, teacher_outputs, cached, temperature, keep)
            weight, bias = full_weight(head.weight), full_weight(head.bias)  # once per step, not per block
            for i, (teacher, w) in enumerate(targets):
                total, term = fused_linear_distillation_loss(
                    hidden, weight, rows[0] if i == 0 else None, rows[1], (alpha * w, 1.0 - alpha if i == 0 else 0.0),
                    student_bias=bias, **teacher, **options)
                loss_sum, sums = loss_sum + total, sums + term * term.new_tensor([w, 1.0 if i == 0 else 0.0])
        return loss_sum, ({"kd": sums[0], "ce": sums[1]} if has_labels else {"kd": sums[0]})


def _teacher_targets(trainer: Any, teacher_outputs: list, cached: dict, temperature: float,
                     keep: torch.Tensor) -> list[tuple[dict, float]]:
    """[(teacher keyword arguments of the fused loss, KD weight)]: the top-k cache when no teacher ran, else each
    live teacher's hidden states at the loss positions and its head (ZeRO-3: inside the caller's `gathered`);
    weights as the trainer's `teacher_targets`."""
    if not teacher_outputs:
        parts = trainer.cache.targets(cached, temperature)
        if len(parts) != 2:
            raise ValueError(f"Cached full teacher logits cannot take the fused LM loss; {FALLBACK_FIX}.")
        return [({"teacher_topk": tuple(p[keep] for p in parts)}, 1.0)]
    weights = [1.0] if len(teacher_outputs) == 1 else list(trainer.teacher_weights)
    targets = []
    for out, teacher, w in zip(teacher_outputs, trainer.teachers, weights):
        base = unwrap_model(teacher)
        head = base.get_output_embeddings()
        with torch.no_grad():
            weight, bias = full_weight(head.weight), full_weight(head.bias)
        targets.append(({"teacher_hidden": out.hidden_states[-1][keep], "teacher_weight": weight, "teacher_bias": bias,
                         "teacher_post": logit_postprocessing(base.config)}, w))
    return targets
