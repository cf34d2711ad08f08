"""Placing the frozen teacher on several processes.

The student is prepared by the stock Trainer through Accelerate (DDP, FSDP, DeepSpeed). The teacher has no
optimizer and no gradients, so Accelerate's ``prepare_model(teacher, evaluation_mode=True)`` leaves it
unwrapped: a full replica on every process. That is right for DDP, but under FSDP or ZeRO-3 the teacher, often
the largest model of the run, would then be the one thing not sharded. ``teacher_sharding`` chooses:

=========  ====================================================================================================
mode       what each process holds
=========  ====================================================================================================
none       the full teacher (in ``teacher_dtype``)
fsdp       1 / world_size of it: FSDP2 ``fully_shard`` on every block named in the model's ``_no_split_modules``
           and then the root, resharded after each forward, so one block at a time is gathered in full
deepspeed  its ZeRO-3 partition: ``deepspeed.initialize`` on the teacher with the student's DeepSpeed config
           less optimizer and scheduler (an inference engine, as TRL does for reference models)
auto       ``fsdp`` under Accelerate FSDP, ``deepspeed`` under DeepSpeed stage 3, else ``none``
=========  ====================================================================================================

``fsdp`` also works with a DDP student (a teacher too large for one device beside a student that fits) and on
CPU with gloo, which is how it is tested here (``tests/test_multiprocess.py``).
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

TEACHER_SHARDING_MODES = ("auto", "none", "fsdp", "deepspeed")


def _deepspeed_zero_stage(accelerator: Any) -> int | None:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return None if plugin is None else int(plugin.zero_stage)


def resolve_teacher_sharding(mode: str, accelerator: Any) -> str:
    """The placement ``mode`` stands for with this accelerator: ``none``, ``fsdp`` or ``deepspeed``."""
    if mode not in TEACHER_SHARDING_MODES:
        raise ValueError(f"teacher_sharding must be one of {', '.join(TEACHER_SHARDING_MODES)}, got {mode!r}.")
    if accelerator.num_processes == 1:
        return "none"  # nothing to shard across
    from accelerate.utils import DistributedType

    engine = accelerator.distributed_type
    if mode == "auto":
        if engine == DistributedType.FSDP:
            return "fsdp"
        if engine == DistributedType.DEEPSPEED and _deepspeed_zero_stage(accelerator) == 3:
            return "deepspeed"
        return "none"
    if mode == "deepspeed" and engine != DistributedType.DEEPSPEED:
        raise ValueError(
            "teacher_sharding='deepspeed' needs a DeepSpeed run (accelerate launch with a DeepSpeed config, e.g. "
            "scripts/accelerate_configs/deepspeed_zero3.yaml); use 'fsdp' to shard the teacher otherwise."
        )
    return mode


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's sub-modules whose class is named in ``_no_split_modules``, innermost first.

    Without that attribute (some model classes of older transformers releases), the members of every
    ``nn.ModuleList`` of identical modules: the layer stacks.
    """
    names = set(getattr(model, "_no_split_modules", None) or [])
    if not names:
        stacks = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 1
                  and len({type(x) for x in m}) == 1 and any(True for _ in m[0].children())]  # not lists of Linear
        members = {id(x) for stack in stacks for x in stack}
        return [m for m in reversed(list(model.modules())) if id(m) in members]
    return [m for m in reversed(list(model.modules())) if m is not model and type(m).__name__ in names]


def shard_teacher_fsdp(teacher: nn.Module, device: torch.device, compute_dtype: torch.dtype | None = None) -> nn.Module:
    """Shard ``teacher`` in place across the default process group with FSDP2, block by block, then the root.

    Each process keeps 1 / world_size of every parameter; a forward gathers one block, runs it and frees the
    gathered copy (``reshard_after_forward``). Every process must call the teacher's forward the same number of
    times, which the trainer does (one teacher forward per micro-batch on every rank). Each block's parameters
    move to ``device`` as it is sharded, so the full teacher is never on one device. ``compute_dtype`` (the
    run's mixed precision) is the dtype the gathered parameters are computed in.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("teacher_sharding='fsdp' needs a distributed run (accelerate launch / torchrun).")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    blocks = transformer_blocks(teacher)
    if not blocks:
        logger.warning(
            "The teacher (%s) names no _no_split_modules: it is sharded as one unit, so a forward gathers all of "
            "it at once (memory at rest is still 1/%d per process).", type(teacher).__name__, dist.get_world_size()
        )
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype)
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=True, mp_policy=policy)
    fully_shard(teacher, mesh=mesh, reshard_after_forward=True, mp_policy=policy)
    return teacher


def deepspeed_inference_config(ds_config: dict[str, Any], hidden_size: int | None, micro_batch_size: int,
                               gradient_accumulation_steps: int) -> dict[str, Any]:
    """The student's DeepSpeed config turned into one for a frozen ZeRO-3 teacher.

    No optimizer or scheduler; batch sizes resolved (DeepSpeed checks them even without training); the
    hidden-size dependent "auto" buckets of ZeRO-3 filled from the teacher's width, other "auto" keys dropped
    (DeepSpeed's defaults); any other stage becomes 0, since stages 1-2 shard only optimizer states, which a
    teacher has none of.
    """
    config = copy.deepcopy(ds_config)
    for key in ("optimizer", "scheduler", "train_batch_size", "gradient_clipping"):
        config.pop(key, None)
    config["train_micro_batch_size_per_gpu"] = micro_batch_size
    config["gradient_accumulation_steps"] = gradient_accumulation_steps
    zero = dict(config.get("zero_optimization", {}))
    if zero.get("stage") != 3:
        zero = {"stage": 0}
    else:
        sizes = {}
        if hidden_size:
            sizes = {"reduce_bucket_size": hidden_size * hidden_size,
                     "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
                     "stage3_param_persistence_threshold": 10 * hidden_size}
        for key, value in list(zero.items()):
            if value == "auto":
                if key in sizes:
                    zero[key] = sizes[key]
                else:
                    del zero[key]
        zero.pop("offload_optimizer", None)
    config["zero_optimization"] = zero
    return {k: v for k, v in config.items() if v != "auto"}


def deepspeed_teacher(teacher: nn.Module, accelerator: Any, args: Any) -> nn.Module:
    """``teacher`` as a DeepSpeed inference engine partitioned like the student (see the module doc)."""
    import deepspeed  # only reached in a DeepSpeed run, where Accelerate has imported it already

    plugin = accelerator.state.deepspeed_plugin
    hidden = getattr(getattr(teacher, "config", None), "hidden_size", None)
    config = deepspeed_inference_config(plugin.deepspeed_config, hidden, args.per_device_train_batch_size,
                                        args.gradient_accumulation_steps)
    engine, *_ = deepspeed.initialize(model=teacher, config=config)
    engine.eval()
    return engine


def place_teacher(teacher: nn.Module, accelerator: Any, args: Any) -> nn.Module:
    """Put the frozen, eval-mode ``teacher`` where ``args.teacher_sharding`` says (see the module doc)."""
    mode = resolve_teacher_sharding(args.teacher_sharding, accelerator)
    if mode != "none" and args.self_distillation == "ema":
        if args.teacher_sharding != "auto":
            raise ValueError(
                "EMA self-distillation updates the teacher from the student's weights every step, which a sharded "
                "teacher cannot take: set --teacher_sharding none."
            )
        mode = "none"
    if mode == "fsdp":
        # Like Accelerate's autocast around a replica's forward: a teacher kept in fp32 computes in the run's
        # mixed precision; one cast by teacher_dtype computes in that dtype.
        compute_dtype = None
        if args.teacher_dtype == "auto":
            compute_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(accelerator.mixed_precision))
        logger.info("Teacher sharded with FSDP2 across %d processes (compute dtype %s).", accelerator.num_processes,
                    compute_dtype or "as loaded")
        return shard_teacher_fsdp(teacher, accelerator.device, compute_dtype)
    if mode == "deepspeed":
        stage = _deepspeed_zero_stage(accelerator)
        logger.info("Teacher prepared as a DeepSpeed inference engine (%s; DeepSpeed casts it to the bf16 / fp16 of "
                    "its config, whatever teacher_dtype says).", "ZeRO-3 partitioned" if stage == 3 else
                    "stage 0: a full replica per process, since stages 1-2 shard only optimizer states")
        return deepspeed_teacher(teacher, accelerator, args)
    return accelerator.prepare_model(teacher, evaluation_mode=True)
