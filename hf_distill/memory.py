"""The memory estimate of the preflight: peak bytes of one distillation training step.

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
from .losses.fused_linear import BLOCK_ELEMENTS as FUSED_BLOCK_ELEMENTS

GiB = float(1024**3)
MiB = float(1024**2)

# Optimizer states per trainable parameter, in units of the parameter's element size
# (8-bit variants: in bytes, see _optimizer_state_bytes).
_STATES_PER_PARAM = {
    "adamw": 2.0, "adam": 2.0, "lamb": 2.0, "adamw_8bit": 0.5, "adafactor": 0.0,
    "sgd": 0.0, "sgd_momentum": 1.0, "adagrad": 1.0, "rmsprop": 1.0, "lion": 1.0,
}


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
    fused_lm_loss: bool = False,
) -> MemoryEstimate:
    """Estimate the peak memory of one distillation training step (see the module doc for the parts).

    Args: ``teacher=None`` when training from cached outputs (``cached_topk``: the cache's k, else full logits);
    ``batch_size`` per device and padded ``seq_length``; ``optimizer`` a Trainer ``optim`` name;
    ``gradient_accumulation_steps`` > 1 keeps gradients through the next forward; ``dtype_bytes`` per activation
    element for the analytic rule; ``task`` detected when None; ``vocab_or_labels`` the output width (from the
    config when None); ``teacher_dtype_bytes`` if the teacher is cast; ``loss_chunk_size`` 0 when the loss is not
    chunked; ``activation_method`` auto (probe, else analytic), probe or analytic; ``device`` for ``resident``;
    ``teacher_hidden_states`` / ``teacher_attentions`` / ``projected_layers`` / ``extra_parameters`` what the
    intermediate terms add (teacher internals kept, projected student states, the projections' parameters);
    ``fused_lm_loss`` when the causal-LM loss runs from hidden states (no [rows, vocab] logits: one block's
    working set, see :func:`_fused_loss_bytes`).
    """
    if batch_size < 1 or seq_length < 1:
        raise ValueError(f"batch_size and seq_length must be >= 1, got {batch_size} and {seq_length}.")
    if activation_method not in ("auto", "probe", "analytic"):
        raise ValueError(f"activation_method must be auto, probe or analytic, got {activation_method!r}.")
    student = unwrap_model(student)
    teacher = unwrap_model(teacher) if teacher is not None else None
    notes: list[str] = []
    task = task or detect_task(student)
    parts = _weight_parts(student, teacher, optimizer, list(extra_parameters), teacher_dtype_bytes, notes)
    dims = _dims(student)
    activations = _activation_bytes(student, dims, batch_size, seq_length, dtype_bytes, activation_method, notes)
    teacher_forward = _teacher_forward_bytes(teacher, batch_size, seq_length) if teacher is not None else 0
    intermediate_outputs = _teacher_internals_bytes(teacher, batch_size, seq_length, teacher_hidden_states,
                                                    teacher_attentions, projected_layers, teacher_dtype_bytes)
    width = vocab_or_labels if vocab_or_labels is not None else _output_width(student, dims, task)
    rows = batch_size * (1 if task == "sequence-classification" else seq_length)
    logits_and_loss = _fused_loss_bytes(rows, width) if fused_lm_loss else _logits_and_loss_bytes(
        rows, width, dtype_bytes, teacher, teacher_dtype_bytes, cached_topk, loss_chunk_size)
    target = torch.device(device) if device is not None else _model_device(student)
    resident = _resident_bytes(student, target) + _resident_bytes(teacher, target)
    return MemoryEstimate(
        **parts, activations=activations, teacher_forward=teacher_forward, intermediate_outputs=intermediate_outputs,
        logits_and_loss=int(logits_and_loss), resident=resident,
        gradient_accumulation_steps=gradient_accumulation_steps, notes=notes,
    )


def _teacher_internals_bytes(teacher: Optional[nn.Module], batch_size: int, seq_length: int, hidden_states: bool,
                             attentions: bool, projected_layers: int, teacher_dtype_bytes: Optional[int]) -> int:
    """What the intermediate terms keep of the teacher's internals (0 without them)."""
    if teacher is None or not (hidden_states or attentions or projected_layers):
        return 0
    element = teacher_dtype_bytes or next((p.element_size() for p in teacher.parameters()), 4)
    return _intermediate_output_bytes(teacher, batch_size, seq_length, hidden_states, attentions, projected_layers,
                                      element)


def _weight_parts(student: nn.Module, teacher: Optional[nn.Module], optimizer: str, extra: list[torch.Tensor],
                  teacher_dtype_bytes: Optional[int], notes: list[str]) -> dict[str, int]:
    """Student weights (and ``extra`` trained parameters), their gradients and optimizer states, teacher weights."""
    student_params = list(student.parameters()) + extra
    trainable = [p for p in student_params if p.requires_grad]
    optimizer_states, note = _optimizer_state_bytes(optimizer, trainable)
    if note:
        notes.append(note)
    teacher_weights = 0
    if teacher is not None:
        teacher_weights = _bytes_of(list(teacher.parameters()) + list(teacher.buffers()), teacher_dtype_bytes)
    return dict(
        student_weights=_bytes_of(student_params) + _bytes_of(student.buffers()), student_gradients=_bytes_of(trainable),
        optimizer_states=optimizer_states, teacher_weights=teacher_weights,
    )


def _activation_bytes(student: nn.Module, dims: Optional[_Dims], batch_size: int, seq_length: int, dtype_bytes: int,
                      method: str, notes: list[str]) -> int:
    """Activations saved for backward: probed at batch 1 and extrapolated, else the analytic rule."""
    if dims is None:
        notes.append("activations: unknown architecture (no config); not counted")
        return 0
    if method == "analytic":
        notes.append("activations: analytic rule")
        return _analytic_activations(dims, batch_size, seq_length, dtype_bytes)
    try:
        activations = _probe_activations(student, batch_size, seq_length, dims)
        notes.append("activations: measured by a batch-1 probe and extrapolated")
        return activations
    except Exception as error:  # noqa: BLE001 - any forward failure falls back to the analytic rule
        if method == "probe":
            raise
        notes.append(f"activations: probe failed ({error.__class__.__name__}), analytic rule used")
        return _analytic_activations(dims, batch_size, seq_length, dtype_bytes)


def _output_width(student: nn.Module, dims: Optional[_Dims], task: str) -> int:
    if task == "causal-lm":
        return dims.vocab if dims else 0
    return 2 if task == "question-answering" else getattr(getattr(student, "config", None), "num_labels", 2)


def _logits_and_loss_bytes(rows: int, width: int, student_elem: int, teacher: Optional[nn.Module],
                           teacher_dtype_bytes: Optional[int], cached_topk: Optional[int], loss_chunk_size: int) -> float:
    """Rows × width for the student logits, the teacher targets and the loss buffers.

    The loss keeps about 5.3 fp32 [rows, width] tensors (log-softmaxes, probabilities, their gradients) when
    computed at once; chunked, one gradient buffer for all rows plus that working set per chunk."""
    if teacher is not None:
        teacher_elem = teacher_dtype_bytes or next((p.element_size() for p in teacher.parameters()), 4)
        teacher_targets = rows * width * teacher_elem
    elif cached_topk:
        teacher_targets = rows * cached_topk * (4 + 8)  # fp32 log-probs and int64 indices after collation
    else:
        teacher_targets = rows * width * 4
    full = rows * width * 4
    if loss_chunk_size <= 0 or rows <= loss_chunk_size:
        loss_buffers = 5.3 * full
    else:
        loss_buffers = full + 5.3 * loss_chunk_size * width * 4
    return rows * width * student_elem + teacher_targets + loss_buffers


def _fused_loss_bytes(rows: int, width: int) -> float:
    """The fused-linear loss (losses/fused_linear.py) keeps no [rows, vocab] tensor beyond one block of at most
    ``BLOCK_ELEMENTS`` logits: about six fp32 tensors of the block (student and teacher logits, their
    log-softmaxes, probabilities, the logits' gradient)."""
    return 6 * 4 * min(rows * width, FUSED_BLOCK_ELEMENTS)


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
