"""Preflight checks run before the first training step: memory, teacher quality, loss terms, one report.

This module knows nothing of the Trainer. It takes models, numbers and plain mappings, and returns
numbers, booleans and text, so the trainer (or a script) decides when to call it and what to refuse.

Peak memory of one training step (:func:`estimate_peak_memory`), in bytes::

    student weights + optimizer states + teacher weights           # resident for the whole run
  + gradients                                                      # one per trainable parameter
  + activations                                                    # saved by the student's forward for backward
  + teacher forward                                                # one teacher layer's working set (no_grad)
  + intermediate outputs                                           # teacher hidden states / attentions kept for
                                                                   # the intermediate terms, projected student states
  + logits and loss buffers                                        # student/teacher logits, loss gradient buffer

A teacher sharded across processes (FSDP2 DTensors) counts its local shard only.

Activations are measured, not guessed, when the student can run: a forward at batch 1 on three short
sequence lengths under :func:`torch.autograd.graph.saved_tensors_hooks` records the bytes autograd keeps
(parameters excluded, shared storages counted once). They grow as ``c0 + c1·s + c2·s²`` (the ``s²`` from
materialised attention), so three points give the exact curve, scaled to the batch. That follows the
attention implementation, dropout and activation functions of the real model on its real device. When the
probe cannot run (no config, an unusual forward), an analytic rule per layer is used instead
(``6h + 3i`` elements per token, plus ``2·a·s`` when attention weights are materialised).

The gradients are counted in full although, with one accumulation step, the Trainer frees them before the
next forward and they only partly overlap the activations: the total is meant as an upper bound for a refusal
check, and the measured peak in ``tests/test_preflight.py`` sits within 30% below it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from torch import nn

from .tasks import detect_task, unwrap_model

GiB = float(1024**3)
MiB = float(1024**2)

# Optimizer states per trainable parameter, in units of the parameter's element size
# (8-bit variants: in bytes, see _optimizer_state_bytes).
_STATES_PER_PARAM = {
    "adamw": 2.0, "adam": 2.0, "lamb": 2.0, "adamw_8bit": 0.5, "adafactor": 0.0,
    "sgd": 0.0, "sgd_momentum": 1.0, "adagrad": 1.0, "rmsprop": 1.0, "lion": 1.0,
}


class PreflightError(ValueError):
    """A preflight check refused the run; the message names the fix (or ``force`` to override)."""


# ----------------------------------------------------------------------------------------------
# Memory estimate
# ----------------------------------------------------------------------------------------------
@dataclass
class MemoryEstimate:
    """Bytes of the peak of one training step, by part (see the module doc). ``resident`` is what the
    models already occupy on the target device (not needed again); ``notes`` says how parts were found."""

    student_weights: int
    student_gradients: int
    optimizer_states: int
    teacher_weights: int
    activations: int
    teacher_forward: int
    logits_and_loss: int
    intermediate_outputs: int = 0
    resident: int = 0
    gradient_accumulation_steps: int = 1
    notes: list[str] = field(default_factory=list)

    PARTS = ("student_weights", "student_gradients", "optimizer_states", "teacher_weights",
             "activations", "teacher_forward", "intermediate_outputs", "logits_and_loss")

    @property
    def total(self) -> int:
        """The estimated peak, in bytes.

        With one accumulation step the Trainer frees the gradients before each forward (``zero_grad`` sets
        them to None) and backward frees activations as it creates gradients, so the two take turns:
        the peak holds the larger of (activations + teacher forward + logits) and the gradients. With
        accumulation the gradients stay resident through the next micro-batch's forward, so both add up.
        """
        resident = self.student_weights + self.optimizer_states + self.teacher_weights
        forward = self.activations + self.teacher_forward + self.intermediate_outputs + self.logits_and_loss
        if self.gradient_accumulation_steps > 1:
            return int(resident + forward + self.student_gradients)
        return int(resident + max(forward, self.student_gradients))

    @property
    def additional(self) -> int:
        """Bytes still to be allocated on the device: the total minus what is already resident there."""
        return max(self.total - self.resident, 0)

    def as_dict(self) -> dict[str, Any]:
        """Every part in bytes, the total, and the notes (for JSON reports)."""
        out: dict[str, Any] = {name: int(getattr(self, name)) for name in self.PARTS}
        out.update(total=self.total, resident=int(self.resident), additional=self.additional, notes=list(self.notes))
        return out

    def summary(self) -> str:
        """One line: total and parts in MiB/GiB."""
        parts = ", ".join(f"{name.replace('_', ' ')} {format_bytes(getattr(self, name))}" for name in self.PARTS)
        return f"{format_bytes(self.total)} ({parts})"


def format_bytes(n: float) -> str:
    """``1.23 GiB`` or ``45.6 MiB``."""
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / MiB:.1f} MiB"


@dataclass
class _Dims:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    attention_materialized: bool


def _first_attr(config: Any, names: Iterable[str], default: Any = None) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def _dims(model: nn.Module) -> Optional[_Dims]:
    """Transformer sizes from a model's config (BERT, GPT-2, Llama, DistilBERT, ... names), or None."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    text_config = getattr(config, "text_config", None) or config
    hidden = _first_attr(text_config, ("hidden_size", "n_embd", "d_model", "dim"))
    layers = _first_attr(text_config, ("num_hidden_layers", "n_layer", "num_layers", "n_layers"))
    heads = _first_attr(text_config, ("num_attention_heads", "n_head", "n_heads"))
    if not (hidden and layers and heads):
        return None
    intermediate = _first_attr(text_config, ("intermediate_size", "n_inner", "ffn_dim", "hidden_dim"), 4 * hidden)
    implementation = getattr(config, "_attn_implementation", None) or "eager"
    attention_dropout = _first_attr(text_config, ("attention_probs_dropout_prob", "attn_pdrop", "attention_dropout"), 0.0)
    # eager always materialises [heads, s, s]; SDPA does too on its math path (dropout in training).
    materialized = implementation == "eager" or (implementation == "sdpa" and float(attention_dropout) > 0)
    vocab = int(getattr(text_config, "vocab_size", 0) or 0)
    return _Dims(int(hidden), int(layers), int(heads), int(intermediate), vocab, materialized)


def _bytes_of(tensors: Iterable[torch.Tensor], float_bytes: Optional[int] = None) -> int:
    """Bytes of ``tensors`` on this process (a sharded DTensor counts its local shard); ``float_bytes``
    overrides the element size of floating-point ones (a cast)."""
    return int(sum(_local(t).numel() * (float_bytes if float_bytes and t.is_floating_point() else t.element_size())
                   for t in tensors))


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The part of ``tensor`` this process holds: an FSDP2 DTensor's local shard, a ZeRO-3 partition."""
    if hasattr(tensor, "to_local"):
        return tensor.to_local()
    return getattr(tensor, "ds_tensor", tensor)


def _intermediate_output_bytes(teacher: nn.Module, batch_size: int, seq_length: int, hidden_states: bool,
                               attentions: bool, projected_layers: int, element: int) -> int:
    """Teacher hidden states (L + 1 of [b, s, h]) and attention maps (L of [b, heads, s, s]) returned for the
    intermediate terms, plus the student's projected hidden states ([b, s, h_teacher] fp32 each)."""
    dims = _dims(teacher)
    if dims is None:
        return 0
    tokens = batch_size * seq_length
    total = (dims.layers + 1) * tokens * dims.hidden * element if hidden_states else 0
    total += dims.layers * tokens * dims.heads * seq_length * element if attentions else 0
    return int(total + projected_layers * tokens * dims.hidden * 4)


def _model_device(model: nn.Module) -> torch.device:
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _resident_bytes(model: Optional[nn.Module], device: torch.device) -> int:
    if model is None:
        return 0
    tensors = [t for t in list(model.parameters()) + list(model.buffers()) if t.device.type == device.type]
    return _bytes_of({t.untyped_storage().data_ptr(): t for t in tensors}.values())


def _optimizer_state_bytes(optimizer: str, trainable: list[torch.Tensor]) -> tuple[int, Optional[str]]:
    name = str(optimizer).lower().removeprefix("optimizernames.")
    if "8bit" in name or "bnb" in name:
        key = "adamw_8bit"
    elif name.startswith("sgd"):
        key = "sgd_momentum" if "momentum" in name else "sgd"
    else:
        key = next((k for k in ("adafactor", "adamw", "adam", "lamb", "adagrad", "rmsprop", "lion") if k in name), None)
    if key is None:
        return _bytes_of(trainable) * 2, f"unknown optimizer {optimizer!r}: counted like AdamW (2 states)"
    if key == "adamw_8bit":
        return sum(2 * t.numel() for t in trainable), None
    if key == "adafactor":  # factored second moments: one row and one column vector per matrix
        return int(sum((sum(t.shape[-2:]) if t.dim() >= 2 else t.numel()) * 4 for t in trainable)), None
    return int(_bytes_of(trainable) * _STATES_PER_PARAM[key]), None


def _probe_inputs(model: nn.Module, length: int, vocab: int, device: torch.device) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, max(vocab, 2), (1, length), device=device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if getattr(getattr(model, "config", None), "type_vocab_size", None):
        inputs["token_type_ids"] = torch.zeros_like(ids)
    return inputs


def saved_activation_bytes(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> int:
    """Bytes autograd saves for backward in one training-mode forward of ``model`` on ``inputs``.

    Parameters are excluded; tensors sharing a storage count once. The RNG state and the train/eval mode
    are restored afterwards, so the probe leaves no trace on training.
    """
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params and storage.nbytes() > 0:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    device = _model_device(model)
    was_training = model.training
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=rng_devices), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.train()
            outputs = model(**inputs)
            del outputs
    finally:
        model.train(was_training)
    return int(sum(saved.values()))


def _probe_activations(model: nn.Module, batch_size: int, seq_length: int, dims: _Dims) -> int:
    """Saved bytes at batch 1 on three lengths, fitted as c0 + c1·s + c2·s², scaled to the batch."""
    max_positions = _first_attr(getattr(model, "config", None), ("max_position_embeddings", "n_positions"), seq_length)
    top = max(4, min(seq_length, int(max_positions), 64))
    lengths = [max(top // 4, 1), max(top // 2, 2), top]
    if len(set(lengths)) < 3:
        lengths = [1, 2, 3]
    device = _model_device(model)
    values = [saved_activation_bytes(model, _probe_inputs(model, s, dims.vocab, device)) for s in lengths]
    # Exact quadratic through the three points (Lagrange form), evaluated at seq_length.
    total = 0.0
    for i, (s_i, y_i) in enumerate(zip(lengths, values)):
        basis = 1.0
        for j, s_j in enumerate(lengths):
            if j != i:
                basis *= (seq_length - s_j) / (s_i - s_j)
        total += y_i * basis
    batch1 = max(total, values[-1] * seq_length / lengths[-1])  # never below linear growth
    return int(batch1 * batch_size)


def _analytic_activations(dims: _Dims, batch_size: int, seq_length: int, element_bytes: int) -> int:
    per_token_layer = 6 * dims.hidden + 3 * dims.intermediate
    if dims.attention_materialized:
        per_token_layer += 2 * dims.heads * seq_length
    per_token = per_token_layer * dims.layers + 4 * dims.hidden
    return int(per_token * batch_size * seq_length * element_bytes)


def _teacher_forward_bytes(teacher: nn.Module, batch_size: int, seq_length: int) -> int:
    """One no_grad teacher layer in flight: residual stream, Q/K/V, attention scores and the MLP."""
    dims = _dims(teacher)
    element = next((p.element_size() for p in teacher.parameters()), 4)
    if dims is None:
        return 0
    per_token = 5 * dims.hidden + 2 * dims.intermediate + (2 * dims.heads * seq_length if dims.attention_materialized else 0)
    return int(per_token * batch_size * seq_length * element)


def estimate_peak_memory(
    student: nn.Module,
    teacher: Optional[nn.Module],
    *,
    batch_size: int,
    seq_length: int,
    optimizer: str = "adamw",
    gradient_accumulation_steps: int = 1,
    dtype_bytes: int = 4,
    task: Optional[str] = None,
    vocab_or_labels: Optional[int] = None,
    teacher_dtype_bytes: Optional[int] = None,
    cached_topk: Optional[int] = None,
    loss_chunk_size: int = 1024,
    activation_method: str = "auto",
    device: Union[str, torch.device, None] = None,
    teacher_hidden_states: bool = False,
    teacher_attentions: bool = False,
    projected_layers: int = 0,
    extra_parameters: Iterable[torch.Tensor] = (),
) -> MemoryEstimate:
    """Estimate the peak memory of one distillation training step (see the module doc for the parts).

    Args:
        student, teacher: the models (``teacher=None`` when training from cached teacher outputs).
        batch_size: per-device micro-batch (what one forward sees).
        seq_length: padded sequence length of a batch.
        optimizer: ``adamw`` (also any ``adamw_torch*`` name), ``adafactor``, ``sgd``, ``adamw_8bit``, ...
        gradient_accumulation_steps: above 1, gradients stay resident through the next forward (see ``total``).
        dtype_bytes: bytes per activation element for the analytic rule (4 fp32, 2 with bf16 autocast).
        task: the distillation task (detected from the student class when None).
        vocab_or_labels: output width (vocabulary or number of labels); read from the config when None.
        teacher_dtype_bytes: the teacher's element size if it will be cast (e.g. 2 for ``teacher_dtype=bfloat16``).
        cached_topk: with ``teacher=None`` on a top-k cache, its k (else full cached logits are assumed).
        loss_chunk_size: the trainer's ``loss_chunk_size`` (0: the token-level loss is not chunked).
        activation_method: ``auto`` (probe, else analytic), ``probe`` or ``analytic``.
        device: where training runs, for ``resident`` (default: the student's device).
        teacher_hidden_states, teacher_attentions: the teacher also returns these (intermediate terms).
        projected_layers: student hidden states mapped through a learned projection to the teacher's width.
        extra_parameters: trained beside the student (the projections): weights, gradients, optimizer states.
    """
    if batch_size < 1 or seq_length < 1:
        raise ValueError(f"batch_size and seq_length must be >= 1, got {batch_size} and {seq_length}.")
    if activation_method not in ("auto", "probe", "analytic"):
        raise ValueError(f"activation_method must be auto, probe or analytic, got {activation_method!r}.")
    student = unwrap_model(student)
    teacher = unwrap_model(teacher) if teacher is not None else None
    notes: list[str] = []
    task = task or detect_task(student)

    extra = list(extra_parameters)
    student_params = list(student.parameters()) + extra
    trainable = [p for p in student_params if p.requires_grad]
    student_weights = _bytes_of(student_params) + _bytes_of(student.buffers())
    gradients = _bytes_of(trainable)
    optimizer_states, note = _optimizer_state_bytes(optimizer, trainable)
    if note:
        notes.append(note)
    teacher_weights = 0
    if teacher is not None:
        teacher_params = list(teacher.parameters()) + list(teacher.buffers())
        teacher_weights = _bytes_of(teacher_params, teacher_dtype_bytes)

    dims = _dims(student)
    activations = 0
    if activation_method in ("auto", "probe") and dims is not None:
        try:
            activations = _probe_activations(student, batch_size, seq_length, dims)
            notes.append("activations: measured by a batch-1 probe and extrapolated")
        except Exception as error:  # noqa: BLE001 - any forward failure falls back to the analytic rule
            if activation_method == "probe":
                raise
            notes.append(f"activations: probe failed ({error.__class__.__name__}), analytic rule used")
            activations = _analytic_activations(dims, batch_size, seq_length, dtype_bytes)
    elif dims is not None:
        activations = _analytic_activations(dims, batch_size, seq_length, dtype_bytes)
        notes.append("activations: analytic rule")
    else:
        notes.append("activations: unknown architecture (no config); not counted")

    teacher_forward = _teacher_forward_bytes(teacher, batch_size, seq_length) if teacher is not None else 0
    intermediate_outputs = 0
    if teacher is not None and (teacher_hidden_states or teacher_attentions or projected_layers):
        element = teacher_dtype_bytes or next((p.element_size() for p in teacher.parameters()), 4)
        intermediate_outputs = _intermediate_output_bytes(teacher, batch_size, seq_length, teacher_hidden_states,
                                                          teacher_attentions, projected_layers, element)

    # Logits and loss: rows × width for student logits, teacher targets and the loss gradient buffer.
    width = vocab_or_labels
    if width is None:
        config = getattr(student, "config", None)
        width = (dims.vocab if dims else 0) if task == "causal-lm" else 2 if task == "question-answering" else (
            getattr(config, "num_labels", 2))
    rows = batch_size * (1 if task == "sequence-classification" else seq_length)
    student_elem = dtype_bytes
    if teacher is not None:
        teacher_elem = teacher_dtype_bytes or next((p.element_size() for p in teacher.parameters()), 4)
        teacher_targets = rows * width * teacher_elem
    elif cached_topk:
        teacher_targets = rows * cached_topk * (4 + 8)  # fp32 log-probs and int64 indices after collation
    else:
        teacher_targets = rows * width * 4
    # The loss keeps about 5.3 fp32 [rows, width] tensors (log-softmaxes, probabilities, their gradients)
    # when computed at once; chunked, one gradient buffer for all rows plus that working set per chunk.
    full = rows * width * 4
    if loss_chunk_size <= 0 or rows <= loss_chunk_size:
        loss_buffers = 5.3 * full
    else:
        loss_buffers = full + 5.3 * loss_chunk_size * width * 4
    logits_and_loss = rows * width * student_elem + teacher_targets + loss_buffers

    target = torch.device(device) if device is not None else _model_device(student)
    resident = _resident_bytes(student, target) + _resident_bytes(teacher, target)
    return MemoryEstimate(
        student_weights=student_weights,
        student_gradients=gradients,
        optimizer_states=optimizer_states,
        teacher_weights=teacher_weights,
        activations=activations,
        teacher_forward=teacher_forward,
        intermediate_outputs=intermediate_outputs,
        logits_and_loss=int(logits_and_loss),
        resident=resident,
        gradient_accumulation_steps=gradient_accumulation_steps,
        notes=notes,
    )


def _cgroup_available() -> Optional[int]:
    """Memory left under the cgroup limit (v2, else v1), or None without a limit."""
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            with open(limit_file) as f:
                limit = f.read().strip()
            with open(usage_file) as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or int(limit) >= 1 << 60:
            return None
        return max(int(limit) - usage, 0)
    return None


def available_memory_bytes(device: Union[str, torch.device, None] = None) -> Optional[int]:
    """Bytes this process can still allocate on ``device``, or None when unknown.

    CUDA: free device memory (``torch.cuda.mem_get_info``) plus what PyTorch's cache holds but does not use.
    CPU: ``MemAvailable`` from ``/proc/meminfo`` (``psutil`` elsewhere), capped by a cgroup limit if any.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        free, _ = torch.cuda.mem_get_info(index)
        return int(free + torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index))
    if device.type != "cpu":
        return None
    available: Optional[int] = None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if available is None:
        try:
            import psutil

            available = int(psutil.virtual_memory().available)
        except ImportError:
            return None
    limit = _cgroup_available()
    return min(available, limit) if limit is not None else available


# ----------------------------------------------------------------------------------------------
# Teacher at chance
# ----------------------------------------------------------------------------------------------
def chance_level(num_labels: int) -> float:
    """Accuracy of a uniform random guess over ``num_labels`` classes."""
    if num_labels < 1:
        raise ValueError(f"num_labels must be >= 1, got {num_labels}.")
    return 1.0 / num_labels


def majority_fraction(labels: Iterable[int], ignore_index: int = -100) -> Optional[float]:
    """Share of the most frequent label (what always predicting it scores), or None without labels."""
    values = torch.as_tensor(list(labels) if not isinstance(labels, torch.Tensor) else labels).flatten()
    values = values[values != ignore_index]
    if values.numel() == 0:
        return None
    return float(torch.unique(values, return_counts=True)[1].max()) / values.numel()


def teacher_is_at_chance(
    teacher_accuracy: float, num_labels: int, majority_fraction: Optional[float] = None, margin: float = 0.02
) -> bool:
    """True when the teacher does no better than guessing: accuracy ≤ max(1/num_labels, majority) + margin."""
    baseline = max(chance_level(num_labels), majority_fraction or 0.0)
    return teacher_accuracy <= baseline + margin


# ----------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------
@dataclass
class PreflightReport:
    """What the preflight found, as data; :meth:`format` renders one block of text, :meth:`check` refuses.

    Fields (all optional):
        teacher_metric: ``{"accuracy": 0.93}`` measured on the eval set (first item is the one judged).
        teacher_metric_source: where it was measured (``"eval set, 8 batches, 256 rows"``) or why it was not.
        num_labels / majority: for the at-chance judgement of an accuracy metric.
        compatibility: a line on label maps or vocabularies (e.g. from :func:`compatibility_summary`).
        loss_weights: every configured loss term and its weight (``{"kd": 0.5, "ce": 0.5, "hidden": 0.0}``).
        inactive_terms: term name → why it cannot run here (e.g. ``"no labels in the dataset"``).
        memory / available_bytes: the estimate and what the device has left.
    """

    teacher_metric: Optional[Mapping[str, float]] = None
    teacher_metric_source: Optional[str] = None
    num_labels: Optional[int] = None
    majority: Optional[float] = None
    compatibility: Optional[str] = None
    loss_weights: Mapping[str, float] = field(default_factory=dict)
    inactive_terms: Mapping[str, str] = field(default_factory=dict)
    memory: Optional[MemoryEstimate] = None
    available_bytes: Optional[int] = None
    margin: float = 0.02

    def teacher_at_chance(self) -> bool:
        """True when the judged teacher metric is an accuracy at chance level."""
        if not self.teacher_metric or not self.num_labels:
            return False
        name, value = next(iter(self.teacher_metric.items()))
        if "acc" not in name:
            return False
        return teacher_is_at_chance(value, self.num_labels, self.majority, self.margin)

    def active_terms(self) -> dict[str, float]:
        """Terms with a non-zero weight that can run."""
        return {k: w for k, w in self.loss_weights.items() if w != 0 and k not in self.inactive_terms}

    def unused_terms(self) -> dict[str, str]:
        """Terms configured with a non-zero weight that will not run, and why."""
        return {k: why for k, why in self.inactive_terms.items() if self.loss_weights.get(k, 0) != 0}

    def memory_exceeded(self) -> bool:
        """True when the estimate needs more than the device has left."""
        return self.memory is not None and self.available_bytes is not None and self.memory.additional > self.available_bytes

    def warnings(self) -> list[str]:
        """Problems worth a loud log line that do not stop the run."""
        found = []
        if self.teacher_at_chance():
            name, value = next(iter(self.teacher_metric.items()))  # type: ignore[union-attr]
            baseline = max(chance_level(self.num_labels or 1), self.majority or 0.0)
            found.append(
                f"The teacher's {name} {value:.4f} is at chance (baseline {baseline:.4f} for {self.num_labels} labels): "
                "is it trained? Distilling an untrained teacher teaches the student nothing."
            )
        for name, why in self.unused_terms().items():
            found.append(f"Loss term '{name}' has weight {self.loss_weights[name]:g} but will not run: {why}.")
        if (
            self.memory is not None and self.available_bytes is not None and not self.memory_exceeded()
            and self.memory.additional > 0.8 * self.available_bytes
        ):
            found.append(
                f"The estimated peak needs {format_bytes(self.memory.additional)} of the "
                f"{format_bytes(self.available_bytes)} left: little headroom."
            )
        return found

    def errors(self) -> list[str]:
        """Problems that refuse the run unless forced."""
        found = []
        if self.loss_weights and not self.active_terms():
            found.append(
                "No loss term is active: every term has weight 0 or cannot run "
                f"({', '.join(f'{k}={w:g}' for k, w in self.loss_weights.items())}). Give one term a non-zero weight."
            )
        if self.memory_exceeded():
            assert self.memory is not None and self.available_bytes is not None
            found.append(
                f"The estimated peak memory {format_bytes(self.memory.total)} needs {format_bytes(self.memory.additional)} "
                f"more than is resident, but only {format_bytes(self.available_bytes)} is available. Lower the batch size "
                "or sequence length, use gradient accumulation, a bf16 teacher or cached teacher outputs, or force "
                "the run if the estimate is wrong."
            )
        return found

    def format(self) -> str:
        """The report as one block of text."""
        lines = ["=== hf_distill preflight ==="]
        if self.teacher_metric:
            metrics = ", ".join(f"{k} {v:.4f}" for k, v in self.teacher_metric.items())
            verdict = "AT CHANCE" if self.teacher_at_chance() else "ok"
            if self.num_labels and self.teacher_at_chance() is False and "acc" in next(iter(self.teacher_metric)):
                verdict += f" (chance {max(chance_level(self.num_labels), self.majority or 0.0):.4f})"
            source = f" ({self.teacher_metric_source})" if self.teacher_metric_source else ""
            lines.append(f"teacher{source}: {metrics} [{verdict}]")
        else:
            lines.append(f"teacher: not measured{f' ({self.teacher_metric_source})' if self.teacher_metric_source else ''}")
        lines.append(f"labels / vocabulary: {self.compatibility or 'not checked'}")
        if self.loss_weights:
            active = self.active_terms()
            lines.append("loss terms active: " + (", ".join(f"{k}={w:g}" for k, w in active.items()) or "NONE"))
            for name, why in self.unused_terms().items():
                lines.append(f"  !! configured but inactive: {name}={self.loss_weights[name]:g} ({why})")
            off = [k for k, w in self.loss_weights.items() if w == 0]
            if off:
                lines.append("loss terms off (weight 0): " + ", ".join(off))
        if self.memory is not None:
            lines.append(f"memory estimate: peak {self.memory.summary()}")
            if self.available_bytes is not None:
                verdict = "EXCEEDS" if self.memory_exceeded() else "fits"
                lines.append(
                    f"memory available: {format_bytes(self.available_bytes)}; still to allocate "
                    f"{format_bytes(self.memory.additional)} [{verdict}]"
                )
        for warning in self.warnings():
            lines.append(f"WARNING: {warning}")
        for error in self.errors():
            lines.append(f"ERROR: {error}")
        return "\n".join(lines)

    def check(self, force: bool = False) -> None:
        """Raise :class:`PreflightError` listing every error, unless ``force``."""
        errors = self.errors()
        if errors and not force:
            raise PreflightError("Preflight refused the run:\n- " + "\n- ".join(errors))


def format_preflight_report(**fields: Any) -> str:
    """``PreflightReport(**fields).format()``: one block of text (see :class:`PreflightReport` for the fields)."""
    return PreflightReport(**fields).format()


def compatibility_summary(teacher: Optional[nn.Module], student: nn.Module, task: str) -> str:
    """A line describing label maps or vocabularies of the pair (informational; mismatches are the trainer's)."""
    student = unwrap_model(student)
    s_config = getattr(student, "config", None)
    if task == "causal-lm":
        s_vocab = student.get_output_embeddings().weight.shape[0]
        if teacher is None:
            return f"vocabulary {s_vocab} (student; teacher outputs cached)"
        t_vocab = unwrap_model(teacher).get_output_embeddings().weight.shape[0]
        return f"vocabulary teacher {t_vocab} / student {s_vocab} [{'match' if t_vocab == s_vocab else 'MISMATCH'}]"
    if task == "question-answering":
        return "start/end positions (no label map)"
    s_map = {int(k): str(v) for k, v in (getattr(s_config, "id2label", None) or {}).items()}
    names = ", ".join(s_map[k] for k in sorted(s_map))
    if teacher is None:
        return f"{len(s_map)} labels ({names}); teacher outputs cached"
    t_config = getattr(unwrap_model(teacher), "config", None)
    t_map = {int(k): str(v) for k, v in (getattr(t_config, "id2label", None) or {}).items()}
    verdict = "match" if t_map == s_map else "MISMATCH"
    return f"{len(s_map)} labels ({names}); teacher label map [{verdict}]"


__all__ = [
    "MemoryEstimate", "PreflightError", "PreflightReport", "available_memory_bytes", "chance_level",
    "compatibility_summary", "estimate_peak_memory", "format_bytes", "format_preflight_report",
    "majority_fraction", "saved_activation_bytes", "teacher_is_at_chance",
]
