"""`DistillationTrainer`: the stock `transformers.Trainer` loop with a teacher in the loss.

One training step (see ARCHITECTURE.md)::

    batch ─► student(**inputs)                 ─► student logits ─┐
          └► teacher(**teacher_inputs) or cache ─► teacher targets ┴► rows (tasks.py) ─► loss terms ─► loss

    loss = alpha · KD(teacher ‖ student; T) · T² + (1 − alpha) · CE(student, labels)
         + w_hidden · L_hidden + w_attention · L_attention + w_relation · L_relation

The encoder tasks (feature-extraction, sentence-embedding: ``encoder_tasks.py``) have no KD or CE term: their loss is
``w_embedding · L_embedding`` (sentence-embedding) plus the intermediate terms.
alpha and T may follow schedules; with several teachers KD reads their mixture (or sums one KD per
teacher); the intermediate terms read ``hidden_states`` / ``attentions`` of the same two forwards.

Normalisation: every term is a sum over items (examples, or tokens for token tasks) divided by the
number of items in the whole optimizer step, counted across gradient-accumulation micro-batches and
processes. So batch 8 and 4 × 2 accumulation give the same gradients, on one process or many. The counts
travel with each micro-batch as a :class:`StepRecord` (set in ``get_batch_samples``, read in ``compute_loss``).

What is not the distillation step lives beside it: teachers (``teachers.py``), the non-finite guard and
atomic checkpoints (``faults.py``), the preflight (``preflight.py``), the recipe (``recipe.py``), the card
(``cards.py``) and the Hub allowlist (``hub.py``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch
from torch import nn
from transformers import PreTrainedModel, Trainer

from .arguments import DistillationArguments
from .lm.fused_step import FusedLMLoss
from .lm.generation import draw_on_policy
from .lm.on_policy import OnPolicyLog, check_on_policy_data
from .collator import TeacherColumnsCollator
from .cross_tokenizer import ALIGNMENT_COLUMNS, CrossTokenizerLoss
from .encoder_tasks import build_encoder_task, encoder_metrics, encoder_recipe, save_encoder_files, trained_beside
from .faults import FaultToleranceMixin
from .intermediate import build_intermediate_terms
from .logit_terms import logit_terms
from .losses.logits import teacher_mixture_logits
from .peft_students import wrap_with_peft
from .preflight import PreflightReport, run_preflight
from .recipe import build_recipe, restore_distillation_folder, write_distillation_folder
from .schedules import scheduled_value
from .tasks import TARGET_KEYS, agreement_counts, count_items, detect_task, logit_rows, task_logits, unwrap_model
from .teacher_cache import CachedTeacherColumns
from .teachers import check_vocabularies, load_teachers, prepare_teacher, resolve_teacher_weights, teacher_summary
from .term_log import TermLog

logger = logging.getLogger(__name__)

# Columns that describe a batch but are not model inputs (causal-LM prompts and generation bookkeeping).
NON_MODEL_KEYS = ("prompt_length", "completion_finished", "prompt_input_ids", "prompt_attention_mask", *ALIGNMENT_COLUMNS)
STEP_RECORD_KEY = "__distillation_step__"


@dataclass
class StepRecord:
    """What one optimizer step's micro-batches share: its item and example counts (over accumulation and
    processes) and whether it trains on student generations."""

    items: torch.Tensor
    examples: torch.Tensor
    on_policy: bool


class DistillationTrainer(FaultToleranceMixin, Trainer):
    """A `transformers.Trainer` whose loss distils a frozen teacher into the student ``model``.

    Args:
        model: the student.
        teacher_model: a model, a local folder or a Hub id, or a list of them (several teachers, weighted by
            ``args.teacher_weights``); ``None`` when the datasets carry cached teacher outputs (see
            :func:`hf_distill.cache_teacher_outputs`) or with ``args.self_distillation``.
        args: :class:`DistillationArguments`.
        teacher_processing_class: the teacher's tokenizer, when it is a separate object (compared entry by entry
            with the student's; used to pad ``teacher_``-prefixed inputs); causal LM: another vocabulary turns on
            cross-tokenizer mode (``cross_tokenizer.py``, data from ``lm.cross_tokenizer_data.tokenize_aligned``).
        peft_config: a PEFT config (e.g. ``LoraConfig``): the student is wrapped with ``get_peft_model`` so that
            only its adapters train; saving writes the adapter. The teacher stays the full model.
        Every other argument is passed to `transformers.Trainer`.
    """

    def __init__(
        self,
        model: Union[PreTrainedModel, nn.Module, None] = None,
        teacher_model: Union[PreTrainedModel, nn.Module, str, list, None] = None,
        args: Optional[DistillationArguments] = None,
        *trainer_args: Any,
        teacher_processing_class: Any = None,
        peft_config: Any = None,
        **trainer_kwargs: Any,
    ) -> None:
        if model is None:
            raise ValueError("DistillationTrainer needs the student as `model`.")
        args = args if args is not None else DistillationArguments(output_dir="distilled")
        if not isinstance(args, DistillationArguments):
            raise TypeError("`args` must be DistillationArguments (a TrainingArguments subclass with the recipe).")
        self.task = args.distillation_task or detect_task(model)
        teachers, self.teacher_names = load_teachers(teacher_model, self.task, args.teacher_trust_remote_code,
                                                     self_distillation_of=model if args.self_distillation != "none" else None,
                                                     allow_pickle_weights=args.allow_pickle_weights)
        self.teacher_name_or_path = self.teacher_names[0] if self.teacher_names else None
        self.teacher_weights = resolve_teacher_weights(len(teachers), args.teacher_weights, args.intermediate_teacher)
        if peft_config is not None:
            model = wrap_with_peft(model, peft_config)
        self.intermediate = build_intermediate_terms(args, model, teachers)
        super().__init__(model, args, *trainer_args, **trainer_kwargs)
        self.cache = CachedTeacherColumns(args, self.train_dataset, self.eval_dataset)
        self._check_data_and_vocabularies(teachers, teacher_processing_class)
        placed = [prepare_teacher(t, self.model, self.task, self.accelerator, args, self.cross is not None) for t in teachers]
        self.teachers = [teacher for teacher, _ in placed]
        self._teacher_summaries = [summary for _, summary in placed]  # taken before sharding
        self.teacher = self.teachers[args.intermediate_teacher] if self.teachers else None
        self.encoder = build_encoder_task(self.task, args, self.model, self.teachers, self.teacher_name_or_path)
        if self.teacher is None and not self.cache.present:
            raise ValueError(
                "No teacher: pass `teacher_model` (a model, folder or Hub id), or cache its outputs into the "
                "datasets with hf_distill.cache_teacher_outputs() and train from those."
            )
        self.cache.check_width(self.student_output_width())
        self.train_dataset, self.eval_dataset = self.cache.fast(self.train_dataset), self.cache.fast(self.eval_dataset)
        self._finish_setup(teacher_processing_class)

    def _check_data_and_vocabularies(self, teachers: list, teacher_processing_class: Any) -> None:
        """Before anything runs: data present, and teacher and student reading the same token ids."""
        for name, dataset in (("train_dataset", self.train_dataset), ("eval_dataset", self.eval_dataset)):
            if dataset is not None and hasattr(dataset, "__len__") and not isinstance(dataset, dict) and len(dataset) == 0:
                raise ValueError(f"`{name}` is empty: there is nothing to distil on. Check the data loading and filters.")
        check_on_policy_data(self.args, self.train_dataset, self.eval_dataset)  # prompt-only data needs lmbda = 1
        separate = any(c.startswith("teacher_input_ids") for c in self.cache.dataset_columns)
        modes = {check_vocabularies(teacher, self.model, teacher_processing_class, self.processing_class,
                                    separate_teacher_inputs=separate, allow_larger_teacher=self.args.truncate_teacher_vocab,
                                    task=self.task) for teacher in teachers}
        if not teachers:
            modes.add(check_vocabularies(None, self.model, teacher_processing_class, self.processing_class, task=self.task))
        self.cross = CrossTokenizerLoss.for_trainer(self, teachers, modes, teacher_processing_class)  # or None

    def _finish_setup(self, teacher_processing_class: Any) -> None:
        args = self.args
        if self.intermediate is not None:
            self.intermediate.to(args.device)
        if args.self_distillation == "ema":
            from .self_distillation import EMATeacherCallback

            self.add_callback(EMATeacherCallback(self.teacher, self.model, args.ema_decay))
        self.data_collator = self.cross.collator if self.cross is not None else TeacherColumnsCollator(
            self.data_collator, cached_columns=self.cache.columns,
            padding_side=getattr(self.processing_class, "padding_side", "right"),
            teacher_pad_token_id=getattr(teacher_processing_class, "pad_token_id", None) or 0,
        )
        # The loss is normalised by the item count of the whole step (see module doc), so the Trainer must
        # neither divide by the accumulation steps nor count items its own way.
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = True
        self.term_log = TermLog(args.device)
        self.on_policy_log = OnPolicyLog(args.device, enabled=self.task == "causal-lm" and args.lmbda > 0)
        self._eval_counts: dict[str, torch.Tensor] = {}
        self.preflight_report: Optional[PreflightReport] = None
        self.fused_lm = FusedLMLoss.for_trainer(self)  # causal LM: loss from hidden states + lm_head (lm/fused_step.py)
        self.init_fault_tolerance()

    @property
    def extra_trainable(self) -> Optional[nn.Module]:
        """Modules trained beside the student (the learned projections), or None."""
        return trained_beside(self.intermediate, getattr(self, "encoder", None))

    def create_optimizer(self, *args: Any, **kwargs: Any):
        """The stock optimizer, plus a parameter group for the learned projections (no weight decay)."""
        optimizer = super().create_optimizer(*args, **kwargs)
        if self.extra_trainable is not None and not getattr(self, "_projections_in_optimizer", False):
            optimizer.add_param_group({"params": list(self.extra_trainable.parameters()), "weight_decay": 0.0})
            self._projections_in_optimizer = True
        return optimizer

    def _set_signature_columns_if_needed(self) -> None:
        """Keep teacher columns (cached outputs, ``teacher_``-prefixed inputs) through remove_unused_columns."""
        if self._signature_columns is None:
            super()._set_signature_columns_if_needed()
            columns = self.cache.dataset_columns
            extra = set(self.cache.columns) | {c for c in columns if c.startswith("teacher_")}
            extra |= {c for c in NON_MODEL_KEYS if c in columns}
            self._signature_columns += sorted(extra - set(self._signature_columns))

    # ------------------------------------------------------------------ schedules and summaries
    def _progress(self) -> float:
        max_steps = getattr(self.state, "max_steps", 0) or 0
        return self.state.global_step / max_steps if max_steps > 0 else 0.0

    def current_temperature(self) -> float:
        """The temperature at this step (``temperature_schedule``)."""
        a = self.args
        end = a.temperature if a.temperature_end is None else a.temperature_end
        return scheduled_value(a.temperature_schedule, a.temperature, end, self._progress())

    def current_alpha(self) -> float:
        """alpha at this step (``alpha_schedule``)."""
        a = self.args
        return scheduled_value(a.alpha_schedule, a.alpha, a.alpha if a.alpha_end is None else a.alpha_end, self._progress())

    def student_output_width(self) -> int:
        """Labels, 2 (QA start/end) or the vocabulary: the width of the rows the logit terms compare."""
        student = unwrap_model(self.model)
        if self.task == "causal-lm":
            return student.get_output_embeddings().weight.shape[0]
        return 2 if self.task == "question-answering" else student.config.num_labels

    def teacher_summary(self) -> dict[str, Any]:
        """Fingerprint and size of the intermediate teacher as loaded (an EMA teacher as it is now)."""
        if self.args.self_distillation == "ema":
            return teacher_summary(unwrap_model(self.teacher))
        return self._teacher_summaries[self.args.intermediate_teacher]

    def train(self, resume_from_checkpoint: Union[str, bool, None] = None, *args: Any, **kwargs: Any):
        """`Trainer.train`, after the preflight; ``resume_from_checkpoint=True`` picks the last *complete*
        checkpoint, and the distillation state (non-finite counts) is restored with it."""
        resume_from_checkpoint = self.prepare_resume(resume_from_checkpoint)
        if self.args.preflight and self.preflight_report is None:
            self.preflight_report = run_preflight(self)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    # ------------------------------------------------------------------ one optimizer step's record
    def get_batch_samples(self, epoch_iterator: Iterator, num_batches: int, device: torch.device) -> tuple[list, Any]:
        """The step's micro-batches, each carrying the step's :class:`StepRecord`; returns its item count."""
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        if not batches:
            return batches, None
        record = self._step_record(batches, device)
        for batch in batches:
            batch[STEP_RECORD_KEY] = record
        return batches, record.items

    def _step_record(self, batches: list, device: torch.device) -> StepRecord:
        """Items (examples or weighted tokens) and examples of the whole step, summed over processes."""
        items = sum(count_items(batch, self.task).to(device) for batch in batches)
        examples = torch.tensor(float(sum(len(b["input_ids"]) for b in batches)), device=device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            items = self.accelerator.gather(items.reshape(1)).sum()
            examples = self.accelerator.gather(examples.reshape(1)).sum()
        on_policy = self.task == "causal-lm" and draw_on_policy(self.args.lmbda, self.args.seed, self.state.global_step)
        return StepRecord(items, examples, on_policy)

    def on_policy_inputs(self, model: nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
        """Replace the batch's completions by the student's own (prompts kept); lm/on_policy.py logs them."""
        return self.on_policy_log.generate(model, inputs, self.args, self.processing_class)

    # ------------------------------------------------------------------ the loss
    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Optional[torch.Tensor] = None):
        record: Optional[StepRecord] = inputs.pop(STEP_RECORD_KEY, None)
        drawn = inputs  # cross-tokenizer on-policy: the teacher's prompts come from the drawn batch
        if model.training and record is not None and record.on_policy:
            inputs, record = self.on_policy_inputs(model, inputs), None  # the generated batch counts its own items
        if self.cross is not None and inputs is not drawn:  # the student's samples, re-tokenized for the teacher
            inputs = self.cross.on_policy_batch(inputs, drawn)
        alignment = self.cross.pop_alignment(inputs) if self.cross is not None else None
        student_inputs, teacher_inputs, cached = self.split_inputs(inputs)
        # The teacher first: its activations are freed before the student's (kept for backward) are made.
        fused = self.fused_lm.enabled and not return_outputs  # evaluation reads the student's full logits
        teacher_outputs = self.live_teacher_outputs(teacher_inputs, cached, fused)
        student_outputs = model(**student_inputs, **self._output_flags(fused))
        student_logits = task_logits(student_outputs, self.task)
        temperature, alpha = self.current_temperature(), self.current_alpha()
        self.on_policy_log.add_entropy(student_outputs, model, inputs, model.training, temperature)  # generated
        items, examples = self._normalisers(inputs, record, model.training)
        if self.encoder is not None:  # no logits (encoder_tasks.py): the embedding term, or none beside the intermediate
            targets = [((None,), 1.0)]
            loss_sum, term_sums = self.encoder.terms(student_outputs, teacher_outputs, inputs, model.training,
                                                     gather=self.accelerator.gather_for_metrics)
        elif alignment is not None:  # cross-tokenizer: alpha · Σ_groups L_g + (1 − alpha) · CE (cross_tokenizer.py)
            targets = [((None,), 1.0)]
            teacher = teacher_outputs[0].logits if teacher_outputs else cached  # live, or the aligned top-k cache
            loss_sum, term_sums = self.cross.logit_terms(student_logits, teacher, inputs, alignment,
                                                         alpha, temperature, self.args.scale_by_temperature_squared)
        elif fused:  # the same sums through each model's lm_head, no [B, L, V] logits
            loss_sum, term_sums = self.fused_lm.logit_terms(self, model, student_outputs, teacher_outputs, cached,
                                                            inputs, alpha, temperature)
        else:
            targets = self.teacher_targets(teacher_outputs, cached, temperature, student_logits.shape[-1])
            rows = [(logit_rows(self.task, student_logits, t, inputs), w) for t, w in targets]
            loss_sum, term_sums = logit_terms(rows, alpha, temperature, self.args)  # alpha · KD + (1 − alpha) · CE
        loss = loss_sum / items
        self.term_log.add(term_sums, items, model.training)
        if self.intermediate is not None:  # + Σ w_term · term, averaged over examples
            feature_sums = self.intermediate(student_outputs, teacher_outputs[self.args.intermediate_teacher],
                                             student_inputs.get("attention_mask"))
            weights = self.intermediate.settings.active
            loss = loss + sum(weights[name] * value for name, value in feature_sums.items()) / examples
            self.term_log.add(feature_sums, examples, model.training)
        if model.training and self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients over processes
        if return_outputs:
            first = targets[0][0]  # for agreement metrics: the (mixed) teacher logits, or the top-k pair
            return loss, {"logits": student_logits, "teacher_logits": first[0] if len(first) == 1 else first}
        return loss

    def _normalisers(self, inputs: dict, record: Optional[StepRecord], training: bool) -> tuple:
        """(items, examples) that the summed losses are divided by: the whole step's counts in the training
        loop; outside it (evaluation, or a batch just generated on-policy) the batch's own counts, scaled by the
        accumulation steps (and processes) so that the step still averages over its micro-batches."""
        if record is not None:
            return record.items, record.examples
        items = count_items(inputs, self.task).clamp_min(1)
        examples = float(len(inputs["input_ids"]))
        if training:
            scale = self.args.gradient_accumulation_steps * (
                self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
            )
            items, examples = items * scale, examples * scale
        return items, examples

    def _output_flags(self, fused: bool = False) -> dict[str, Any]:
        terms, flags = self.intermediate, (self.fused_lm.flags() if fused else {})
        if terms is None:
            return flags
        return flags | {k: True for k, on in (("output_hidden_states", terms.needs_hidden_states),
                                              ("output_attentions", terms.needs_attentions)) if on}

    def split_inputs(self, inputs: dict[str, Any]) -> tuple[dict, dict, dict]:
        """(student inputs, teacher inputs, cached teacher outputs) from one batch; targets are left out."""
        cached_names = set(self.cache.columns)
        cached = {k: v for k, v in inputs.items() if k in cached_names}
        prefixed = {k[len("teacher_"):]: v for k, v in inputs.items()
                    if k.startswith("teacher_") and k not in cached_names and k not in NON_MODEL_KEYS}
        targets = set(TARGET_KEYS[self.task]) | {"label", "label_ids"} | set(NON_MODEL_KEYS)
        student_inputs = {k: v for k, v in inputs.items() if k not in targets and not k.startswith("teacher_")}
        return student_inputs, (prefixed or student_inputs), cached

    def live_teacher_outputs(self, teacher_inputs: dict, cached: dict, fused: bool = False) -> list[Any]:
        """The teachers' outputs for this batch, or [] when its cached outputs serve (logit terms only)."""
        return [] if cached and self.intermediate is None else self.teacher_forward(teacher_inputs, fused)

    def teacher_forward(self, teacher_inputs: dict, fused: bool = False) -> list[Any]:
        """One forward of each teacher under no_grad; the intermediate teacher also returns its internals."""
        flags, lm_flags = self._output_flags(fused), (self.fused_lm.flags() if fused else {})
        with torch.no_grad():
            return [
                teacher(**teacher_inputs, **(flags if i == self.args.intermediate_teacher else lm_flags))
                for i, teacher in enumerate(self.teachers)
            ]

    def teacher_targets(
        self, teacher_outputs: list[Any], cached: dict, temperature: float, student_width: int
    ) -> list[tuple[tuple[torch.Tensor, ...], float]]:
        """[(targets, weight)]: the soft-label targets of the batch and the weight of their KD term.

        Cached outputs when the batch has them (and no teacher ran); else the live teachers: one target,
        their mixture (``multi_teacher_mode="average"``), or one per teacher (``"sum"``).
        """
        if self.cross is not None:  # the preflight's teacher accuracy reads these against the student's labels
            raise ValueError("teacher outputs are over the teacher's own tokens (cross-tokenizer mode)")
        if not teacher_outputs:
            return [(self.cache.targets(cached, temperature), 1.0)]
        logits = [task_logits(out, self.task)[..., :student_width] for out in teacher_outputs]
        if len(logits) == 1:
            return [((logits[0],), 1.0)]
        if self.args.multi_teacher_mode == "average":
            return [((teacher_mixture_logits(logits, self.teacher_weights, temperature),), 1.0)]
        return [((z,), w) for z, w in zip(logits, self.teacher_weights)]

    # ------------------------------------------------------------------ logging and evaluation
    def _reduce(self, value: torch.Tensor, reduction: str) -> torch.Tensor:
        return self.accelerator.reduce(value, reduction) if self.accelerator.num_processes > 1 else value

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add the averaged loss terms (loss_kd, loss_ce, ...) to training logs."""
        if "loss" in logs:
            # Each micro-batch recorded its local sum / global item count: sum over processes when items were
            # counted globally, else average the per-process means.
            reduction = "sum" if self.args.average_tokens_across_devices else "mean"
            logs.update(self.term_log.pop_train(self._reduce, reduction))
            logs.update(self.on_policy_log.pop(self._reduce))
            if self._non_finite.total:
                logs["non_finite_losses"] = self._non_finite.total
        super().log(logs, *args, **kwargs)

    def prediction_step(self, model: nn.Module, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: Optional[list] = None):
        """Student loss and logits for `compute_metrics`, plus teacher agreement, with one teacher forward."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        student_logits = outputs["logits"]
        teacher = outputs["teacher_logits"]  # None in cross-tokenizer mode: no token-by-token agreement
        for name, value in agreement_counts(logit_rows(self.task, student_logits, teacher, inputs) if teacher is not None else []).items():
            self._eval_counts[name] = self._eval_counts.get(name, 0) + value
        if prediction_loss_only:
            return loss.detach(), None, None
        labels = tuple(inputs[k] for k in TARGET_KEYS[self.task] if k in inputs) or None
        if labels is not None and len(labels) == 1:
            labels = labels[0]
        logits = (student_logits[..., 0], student_logits[..., 1]) if self.task == "question-answering" else student_logits
        return loss.detach(), logits, labels

    def evaluation_loop(self, *args: Any, **kwargs: Any):
        """Run the stock loop, then add teacher agreement, teacher accuracy and the eval loss terms."""
        self._eval_counts.clear()
        self.term_log.clear_eval()
        output = super().evaluation_loop(*args, **kwargs)
        prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
        counts = {k: self._reduce(torch.as_tensor(v), "sum").item() for k, v in self._eval_counts.items()}
        if counts.get("rows"):
            output.metrics[f"{prefix}_teacher_agreement"] = counts["agree"] / counts["rows"]
        if counts.get("labelled"):
            output.metrics[f"{prefix}_teacher_accuracy"] = counts["teacher_correct"] / counts["labelled"]
        output.metrics.update(encoder_metrics(self.encoder, prefix))  # sentence-embedding: mean cosine, Spearman
        batches = len(args[0]) if args and hasattr(args[0], "__len__") else 1
        for name, value in self.term_log.pop_eval(self._reduce, batches).items():
            output.metrics[f"{prefix}_{name}"] = value
        return output

    # ------------------------------------------------------------------ saving, card and Hub
    def recipe(self) -> dict[str, Any]:
        """What the run did, as plain data: written to ``distillation/recipe.json`` beside the student."""
        return encoder_recipe(build_recipe(self), self.encoder)  # the encoder tasks: no kd / ce, + embedding

    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        """Save the student as a plain `from_pretrained` folder, and the recipe under ``distillation/``."""
        with self.atomic_target(output_dir or self.args.output_dir) as target:  # temp folder, renamed in
            super()._save(target, state_dict=state_dict)
            ema = self.teacher if self._saving_checkpoint and self.args.self_distillation == "ema" else None
            write_distillation_folder(target, self.recipe(), self.extra_trainable, ema)
            save_encoder_files(target, self.encoder, self.processing_class)  # sentence-embedding: the pooling

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Optional[nn.Module] = None) -> None:
        """Restore the student (stock), and the learned projections and EMA teacher of the checkpoint."""
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        ema = self.teacher if self.args.self_distillation == "ema" else None
        restore_distillation_folder(resume_from_checkpoint, self.extra_trainable, ema, str(self.args.device))

    def create_model_card(self, model_name: Optional[str] = None, dataset_name: Optional[str] = None, **kwargs: Any) -> None:
        """Write the distillation model card (``model_cards/`` template) instead of the generic Trainer card."""
        if not self.is_world_process_zero():
            return
        from .cards import write_model_card

        if dataset_name:
            self.dataset_names = [dataset_name] if isinstance(dataset_name, str) else list(dataset_name)
            if (Path(self.args.output_dir) / "distillation").is_dir():
                write_distillation_folder(self.args.output_dir, self.recipe())
        write_model_card(self.args.output_dir, model_name=model_name or self.args.hub_model_id)

    def push_to_hub(self, commit_message: Optional[str] = "End of training", blocking: bool = True,
                    token: Optional[str] = None, **kwargs: Any) -> Any:
        """Save the student and card, then upload only the allowlisted files (student, card, plot, onnx/).
        Returns the commit URL, or a Future of it when ``blocking=False``; ``token`` overrides ``hub_token``."""
        from .hub import push_trainer_to_hub

        return push_trainer_to_hub(self, commit_message, blocking=blocking, token=token, **kwargs)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """``hub_strategy`` pushes upload the checkpoint's student through the same allowlist."""
        from .hub import push_checkpoint_allowlisted

        push_checkpoint_allowlisted(self, checkpoint_folder)
