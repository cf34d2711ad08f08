"""Token-level distillation from last hidden states and ``lm_head`` weights, never materialising [N, V] logits.

For the N loss positions, with student hidden states h_s [N, H_s], head (W_s [V, H_s], b_s [V]) and post-processing
φ_s, the student logits are z_s = φ_s(h_s W_sᵀ + b_s); the teacher's are z_t = φ_t(h_t W_tᵀ + b_t) (or a top-k cache
stands in for them). The loss is the one of :mod:`hf_distill.losses.logits` over those logits:

    L = c_soft · Σ_n w_n · soft(z_s,n, z_t,n) + c_hard · Σ_n w_n · CE(z_s,n, y_n)

with ``soft`` = :func:`~hf_distill.losses.logits.soft_label_loss` (or
:func:`~hf_distill.losses.logits.topk_soft_label_loss`) and CE = :func:`~hf_distill.losses.logits.hard_label_loss`
(rows with y = −100 give 0). It is computed block by block over rows: a block's logits are projected, the block's
loss and its gradient g = ∂L/∂(h Wᵀ + b) w.r.t. the raw logits come from the trainer's own logit path
(``fused_forward_kl_and_ce`` for forward KL, ``chunked_weighted_sums`` otherwise, by autograd through φ), and g is
folded at once into ∂L/∂h = g W, ∂L/∂W += gᵀ h and ∂L/∂b += Σ_rows g. Autograd keeps nothing of the
vocabulary-wide intermediates; peak extra memory is the parameter gradients plus a few blocks of logits.

Post-processing φ, as each family's forward applies it after ``lm_head``: z · ``logit_scale`` (Cohere, Cohere2),
z / ``logits_scaling`` (Granite family; HyperCLOVA X multiplies), then c · tanh(z / c) with c =
``final_logit_softcapping`` (Gemma 2/3, ...). See :func:`logit_postprocessing`.

Under FSDP2 the ``lm_head`` weight is a DTensor: the caller gathers it once per step (``weight.full_tensor()``) and
passes the plain tensor; this module refuses a DTensor rather than gathering it per block. Under ZeRO-3 the caller
gathers the parameter (``deepspeed.zero.GatheredParameters``) around the call.

Only ``torch`` is imported here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from . import logits as _logits
from .logits import (
    chunked_weighted_sums,
    fused_forward_kl_and_ce,
    hard_label_loss,
    soft_label_loss,
    topk_soft_label_loss,
)

Tensor = torch.Tensor

#: Rows per projected block are capped so that a block holds at most this many logits (16 MiB in fp32); the
#: autograd over a block runs on sub-blocks capped at ``logits.MAX_CHUNK_ELEMENTS`` (2²¹) logits.
BLOCK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class LogitPostprocessing:
    """φ(z) applied after ``lm_head``: z · scale / divisor, then softcap · tanh(z / softcap) when softcap is set."""

    scale: float = 1.0
    divisor: float = 1.0
    softcap: Optional[float] = None

    def apply(self, z: Tensor) -> Tensor:
        """φ(z), with the same operations (and order) as the model's forward."""
        if self.scale != 1.0:
            z = z * self.scale
        if self.divisor != 1.0:
            z = z / self.divisor
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z


def logit_postprocessing(config: Any) -> LogitPostprocessing:
    """The logit post-processing a transformers config's causal-LM forward applies after ``lm_head``.

    ``logit_scale`` (Cohere family) and ``output_multiplier`` multiply; ``logits_scaling`` divides (Granite family;
    MiniCPM3 divides the hidden states, the same for its bias-free head), except HyperCLOVA X, which multiplies;
    ``final_logit_softcapping`` caps last. Unset (None) fields mean no post-processing.
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = getattr(text, "logit_scale", None)
    if scale is None:
        scale = getattr(text, "output_multiplier", None)
    divisor = getattr(text, "logits_scaling", None)
    if divisor is not None and getattr(text, "model_type", "") == "hyperclovax":
        scale, divisor = divisor, None
    for name, value in (("logit_scale", scale), ("logits_scaling", divisor)):
        if value is not None and not isinstance(value, (int, float)):
            raise TypeError(f"config.{name} = {value!r} is not a number; fix the model's config.json.")
    softcap = getattr(text, "final_logit_softcapping", None)
    return LogitPostprocessing(
        scale=1.0 if scale is None else float(scale),
        divisor=1.0 if divisor is None else float(divisor),
        softcap=None if softcap is None else float(softcap),
    )


def chunk_logits(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor] = None, post: LogitPostprocessing = LogitPostprocessing()
) -> Tensor:
    """φ(h Wᵀ + b) for a block of rows, in the weight's dtype (as the model's forward computes its logits)."""
    return post.apply(F.linear(hidden.to(weight.dtype), weight, bias))


@dataclass(frozen=True)
class _Options:
    coefficients: tuple[float, float]
    soft: dict
    student_post: LogitPostprocessing
    teacher_post: LogitPostprocessing
    block_rows: int
    sub_rows: int
    topk: bool


def _teacher_block(opts: _Options, teacher: tuple, rows: slice, vocab: int) -> tuple[Tensor, ...]:
    """The teacher targets of a block: fp32 logits φ_t(h_t W_tᵀ + b_t) (computed in the teacher's dtype, no grad)
    or the block's rows of the top-k cache."""
    if opts.topk:
        return tuple(part[rows] for part in teacher)
    hidden, weight, bias = teacher
    with torch.no_grad():
        logits = chunk_logits(hidden[rows], weight[:vocab], None if bias is None else bias[:vocab], opts.teacher_post)
    return (logits.float(),)


def _block_loss(opts: _Options, z: Tensor, targets: tuple, labels: Optional[Tensor], w: Tensor) -> tuple[Tensor, Tensor]:
    """(c_soft · S_soft + c_hard · S_hard, [S_soft, S_hard]) of a block's logits, by the trainer's logit path:
    ``fused_forward_kl_and_ce`` for forward KL, else ``chunked_weighted_sums`` over the soft and hard row losses."""
    if opts.soft["loss"] == "forward_kl":
        return fused_forward_kl_and_ce(
            z, targets, labels, w, opts.coefficients, temperature=opts.soft["temperature"],
            scale_by_temperature_squared=opts.soft["scale_by_temperature_squared"], chunk_size=opts.sub_rows)
    soft_fn = topk_soft_label_loss if opts.topk else soft_label_loss
    k = len(targets)

    def row_losses(x: Tensor, *rest: Tensor) -> Tensor:
        soft = soft_fn(x, *rest[:k], **opts.soft)
        return torch.stack([soft, hard_label_loss(x, rest[k]) if labels is not None else torch.zeros_like(soft)])

    extra = (labels,) if labels is not None else ()
    return chunked_weighted_sums(row_losses, opts.coefficients, z, w, *targets, *extra, chunk_size=opts.sub_rows)


def _block_logit_grads(opts: _Options, raw: Tensor, targets: tuple, labels: Optional[Tensor], w: Tensor,
                       need_grad: bool) -> tuple[Optional[Tensor], Tensor]:
    """(g, [S_soft, S_hard]) of a block, g = ∂(c_soft · S_soft + c_hard · S_hard)/∂raw for the block's raw logits
    raw = h Wᵀ + b (None without ``need_grad``): autograd through φ_s and the logit path of :func:`_block_loss`,
    whose vocabulary-wide intermediates live one sub-block at a time."""
    with torch.set_grad_enabled(need_grad):
        raw_leaf = raw.detach().requires_grad_(need_grad)
        total, sums = _block_loss(opts, opts.student_post.apply(raw_leaf), targets, labels, w)
        if not need_grad:
            return None, sums
        (g,) = torch.autograd.grad(total, raw_leaf)
    return g, sums


class _FusedLinearDistillation(torch.autograd.Function):
    """The loss of :func:`fused_linear_distillation_loss`, its gradients w.r.t. (h_s, W_s, b_s) formed in forward."""

    @staticmethod
    def forward(ctx, opts, hidden, weight, bias, labels, weights, teacher):  # type: ignore[override]
        n, vocab = hidden.shape[0], weight.shape[0]
        need = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
        grad_h = torch.zeros_like(hidden) if need[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need[1] else None
        grad_b = torch.zeros(vocab, dtype=torch.float32, device=weight.device) if need[2] else None
        sums = torch.zeros(2, dtype=torch.float32, device=hidden.device)
        for start in range(0, n, opts.block_rows):
            rows = slice(start, start + opts.block_rows)
            w = weights[rows]
            if not bool((w != 0).any()):
                continue
            h = hidden[rows].to(weight.dtype)
            raw = F.linear(h, weight, bias)
            targets = _teacher_block(opts, teacher, rows, vocab)
            y = None if labels is None else labels[rows]
            g, block_sums = _block_logit_grads(opts, raw, targets, y, w, any(need))
            del raw
            sums += block_sums
            if grad_h is not None:
                grad_h[rows] = g @ weight  # ∂L/∂h = g W
            if grad_w is not None:
                grad_w.addmm_(g.t().float(), h.float())  # ∂L/∂W += gᵀ h (no copies in fp32)
            if grad_b is not None:
                grad_b += g.float().sum(0)
        grads = (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                 None if grad_b is None else grad_b.to(bias.dtype))
        # Kept on ctx rather than saved: once backward drops its reference, autograd can adopt the [V, H] weight
        # gradient as .grad instead of copying it.
        ctx.grads = grads
        ctx.mark_non_differentiable(sums)
        c_soft, c_hard = opts.coefficients
        return c_soft * sums[0] + c_hard * sums[1], sums

    @staticmethod
    def backward(ctx, grad_total, _grad_sums):  # type: ignore[override]
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError("The fused-linear loss was backpropagated twice; its gradients are used once.")
        # Scaled in place: no second buffer.
        scaled = tuple(None if g is None else g.mul_(grad_total.to(torch.float32)) for g in grads)
        del grads
        return (None, *scaled, None, None, None)


def _is_dtensor(x: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(x, DTensor)


def _check_inputs(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], side: str, n: int) -> None:
    """Clear errors for the shapes, devices and DTensors of one side's (hidden, weight, bias)."""
    flag = "teacher_hidden / teacher_weight" if side == "teacher" else "student_hidden / student_weight"
    for name, x in (("weight", weight), ("bias", bias)):
        if x is not None and _is_dtensor(x):
            raise TypeError(f"The {side} lm_head {name} is a DTensor (FSDP2): gather it once per step with "
                            f"{name}.full_tensor() and pass the plain tensor ({flag}).")
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"{side}: hidden states must be [N, H] (loss positions only) and the lm_head weight "
                         f"[V, H]; got {tuple(hidden.shape)} and {tuple(weight.shape)} ({flag}).")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"{side}: hidden size {hidden.shape[1]} does not match the lm_head weight "
                         f"{tuple(weight.shape)}; pass the backbone's last hidden states, before the lm_head ({flag}).")
    if hidden.shape[0] != n:
        raise ValueError(f"{side}: {hidden.shape[0]} rows of hidden states for {n} loss positions ({flag}).")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{side}: lm_head bias {tuple(bias.shape)} does not match the weight {tuple(weight.shape)}.")
    if bias is not None and bias.device != weight.device:
        raise ValueError(f"{side}: lm_head bias on {bias.device}, weight on {weight.device}; put them on one device.")
    if hidden.device != weight.device:
        raise ValueError(f"{side}: hidden states on {hidden.device} but the lm_head weight on {weight.device}; "
                         "move them to one device.")


def _check_teacher(student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Optional[Tensor],
                   teacher_weight: Optional[Tensor], teacher_bias: Optional[Tensor],
                   teacher_topk: Optional[Sequence[Tensor]]) -> tuple:
    """The teacher as (hidden, weight, bias) or (top-k log-probs, ids), checked against the student."""
    n, vocab = student_hidden.shape[0], student_weight.shape[0]
    if (teacher_topk is None) == (teacher_hidden is None or teacher_weight is None):
        raise ValueError("Give the teacher as teacher_hidden + teacher_weight (live teacher) or as teacher_topk "
                         "(a top-k cache), exactly one of the two.")
    if teacher_topk is not None:
        log_probs, ids = teacher_topk
        if log_probs.shape != ids.shape or log_probs.dim() != 2 or log_probs.shape[0] != n:
            raise ValueError(f"teacher_topk must be two [N, k] tensors for N = {n} rows; got "
                             f"{tuple(log_probs.shape)} and {tuple(ids.shape)}.")
        return (log_probs, ids)
    _check_inputs(teacher_hidden, teacher_weight, teacher_bias, "teacher", n)
    if teacher_weight.device != student_weight.device:
        raise ValueError(f"The teacher lm_head is on {teacher_weight.device} and the student lm_head on "
                         f"{student_weight.device}: put both models' heads on one device (move the teacher).")
    if teacher_weight.shape[0] < vocab:
        raise ValueError(f"The teacher lm_head has {teacher_weight.shape[0]} rows, fewer than the student's "
                         f"vocabulary ({vocab}); the vocabularies must match (a larger padded teacher is sliced).")
    return (teacher_hidden, teacher_weight, teacher_bias)


def _make_options(n: int, vocab: int, labels: Optional[Tensor], weights: Tensor, coefficients: Sequence[float],
                  chunk_size: int, soft: dict, posts: tuple, topk: bool) -> _Options:
    """Checked options: rows per block (``chunk_size`` capped at ``BLOCK_ELEMENTS`` logits) and per sub-block."""
    if weights.shape != (n,) or (labels is not None and labels.shape != (n,)):
        raise ValueError(f"weights and labels must be [N] = [{n}]; got {tuple(weights.shape)} and "
                         f"{None if labels is None else tuple(labels.shape)}.")
    if len(coefficients) != 2:
        raise ValueError(f"coefficients must be (soft, hard); got {tuple(coefficients)}.")
    block_rows = max(1, min(chunk_size if chunk_size > 0 else n, BLOCK_ELEMENTS // max(vocab, 1)))
    sub_rows = max(1, min(block_rows, _logits.MAX_CHUNK_ELEMENTS // max(vocab, 1)))  # read now: tests shrink it
    return _Options(coefficients=(float(coefficients[0]), float(coefficients[1])), soft=soft, student_post=posts[0],
                    teacher_post=posts[1], block_rows=block_rows, sub_rows=sub_rows, topk=topk)


def fused_linear_distillation_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    labels: Optional[Tensor],
    weights: Tensor,
    coefficients: Sequence[float],
    *,
    student_bias: Optional[Tensor] = None,
    student_post: LogitPostprocessing = LogitPostprocessing(),
    teacher_hidden: Optional[Tensor] = None,
    teacher_weight: Optional[Tensor] = None,
    teacher_bias: Optional[Tensor] = None,
    teacher_post: LogitPostprocessing = LogitPostprocessing(),
    teacher_topk: Optional[Sequence[Tensor]] = None,
    loss: str = "forward_kl",
    temperature: float = 1.0,
    scale_by_temperature_squared: bool = True,
    jsd_beta: float = 0.5,
    skew_lambda: float = 0.1,
    chunk_size: int = 1024,
) -> tuple[Tensor, Tensor]:
    """``(c_soft · S_soft + c_hard · S_hard, [S_soft, S_hard])`` from hidden states and ``lm_head`` weights.

    S_soft = Σ_n w_n · soft(z_s,n, z_t,n) (``soft_label_loss`` with ``loss``, ``temperature``, T² scaling, ``jsd_beta``,
    ``skew_lambda``; ``topk_soft_label_loss`` against ``teacher_topk`` = (log-probs at T, ids) [N, k]) and
    S_hard = Σ_n w_n · CE(z_s,n, y_n) (0 when ``labels`` is None), where z_s = φ_s(h_s W_sᵀ + b_s) and
    z_t = φ_t(h_t W_tᵀ + b_t): the same values as :func:`~hf_distill.losses.logits.chunked_weighted_sums` over the
    models' full logits. The first output is differentiable w.r.t. ``student_hidden``, ``student_weight`` and
    ``student_bias``; the teacher gets no gradient. A teacher head with more rows than the student's (padded
    vocabulary) is sliced to the student's V, as the trainer slices teacher logits. Blocks hold at most
    ``chunk_size`` rows and ``BLOCK_ELEMENTS`` logits (``chunk_size <= 0``: the cap only); the result does not
    depend on the blocking. Weights under FSDP2 (DTensor) must be gathered by the caller, once per step.
    """
    n = student_hidden.shape[0]
    _check_inputs(student_hidden, student_weight, student_bias, "student", n)
    teacher = _check_teacher(student_hidden, student_weight, teacher_hidden, teacher_weight, teacher_bias, teacher_topk)
    soft = dict(loss=loss, temperature=float(temperature), scale_by_temperature_squared=bool(scale_by_temperature_squared),
                jsd_beta=float(jsd_beta), skew_lambda=float(skew_lambda))
    opts = _make_options(n, student_weight.shape[0], labels, weights, coefficients, chunk_size, soft,
                         (student_post, teacher_post), teacher_topk is not None)
    return _FusedLinearDistillation.apply(opts, student_hidden, student_weight, student_bias, labels, weights, teacher)
