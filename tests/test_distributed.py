"""Teacher placement on several processes (hf_distill/distributed.py).

The FSDP2 path runs for real in tests/test_multiprocess.py (2 gloo ranks, half the teacher on each). DeepSpeed
needs CUDA and is not installed here: its path is checked up to the call of ``deepspeed.initialize``, with a
stand-in module that records what it was given.
"""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType

from hf_distill import DistillationArguments
from hf_distill.distributed import deepspeed_inference_config, place_teacher, resolve_teacher_sharding, transformer_blocks


def fake_accelerator(processes: int, distributed_type: str = "MULTI_GPU", zero_stage=None, ds_config=None,
                     mixed_precision="no"):
    plugin = None if zero_stage is None else SimpleNamespace(zero_stage=zero_stage, deepspeed_config=ds_config or {})
    calls = []
    return SimpleNamespace(
        num_processes=processes, distributed_type=DistributedType[distributed_type], mixed_precision=mixed_precision,
        state=SimpleNamespace(deepspeed_plugin=plugin), device=torch.device("cpu"),
        prepare_model=lambda model, evaluation_mode: calls.append(evaluation_mode) or model, calls=calls,
    )


@pytest.mark.parametrize(
    "mode, processes, kind, stage, expected",
    [
        ("auto", 1, "FSDP", None, "none"),  # one process: nothing to shard
        ("auto", 2, "MULTI_GPU", None, "none"),  # DDP: a replica per process
        ("auto", 2, "FSDP", None, "fsdp"),
        ("auto", 2, "DEEPSPEED", 3, "deepspeed"),
        ("auto", 2, "DEEPSPEED", 2, "none"),  # stages 1-2 shard optimizer states only; a teacher has none
        ("fsdp", 2, "MULTI_GPU", None, "fsdp"),  # a sharded teacher beside a DDP student
        ("none", 2, "FSDP", None, "none"),
    ],
)
def test_resolve_teacher_sharding(mode, processes, kind, stage, expected):
    assert resolve_teacher_sharding(mode, fake_accelerator(processes, kind, stage)) == expected


def test_bad_sharding_requests_fail_early_naming_the_fix():
    with pytest.raises(ValueError, match="teacher_sharding"):
        DistillationArguments(output_dir="unused", teacher_sharding="zero3")
    with pytest.raises(ValueError, match="needs a DeepSpeed run"):
        resolve_teacher_sharding("deepspeed", fake_accelerator(2, "MULTI_GPU"))
    args = SimpleNamespace(teacher_sharding="fsdp", self_distillation="ema", teacher_dtype="auto")
    with pytest.raises(ValueError, match="teacher_sharding none"):
        place_teacher(torch.nn.Linear(2, 2), fake_accelerator(2, "MULTI_GPU"), args)


def test_ema_self_distillation_keeps_a_replica_under_auto():
    accelerator = fake_accelerator(2, "FSDP")
    teacher = torch.nn.Linear(2, 2)
    args = SimpleNamespace(teacher_sharding="auto", self_distillation="ema", teacher_dtype="auto")
    assert place_teacher(teacher, accelerator, args) is teacher and accelerator.calls == [True]


def test_transformer_blocks_are_the_no_split_modules_innermost_first():
    from tiny_models import tiny_bert

    model = tiny_bert(layers=2)
    names = [type(m).__name__ for m in transformer_blocks(model)]
    assert names.count("BertLayer") == 2
    if model._no_split_modules:  # transformers 5; 4.57's BERT names none and the layer stack is found instead
        assert sorted(set(names)) == sorted(set(model._no_split_modules))
    # innermost first: fully_shard must see a child before any parent that contains it
    modules = list(model.modules())
    order = [modules.index(m) for m in transformer_blocks(model)]
    assert order == sorted(order, reverse=True)


def test_layer_stack_fallback_ignores_lists_of_leaf_modules():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(3)])  # leaves: not blocks

    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([Block(), Block()])
    assert [type(m).__name__ for m in transformer_blocks(model)] == ["Block", "Block"]


def test_deepspeed_inference_config_drops_training_parts_and_resolves_autos():
    student_config = {
        "optimizer": {"type": "AdamW", "params": {"lr": "auto"}},
        "scheduler": {"type": "WarmupLR"},
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                              "stage3_param_persistence_threshold": "auto", "overlap_comm": "auto",
                              "offload_optimizer": {"device": "cpu"}},
    }
    config = deepspeed_inference_config(student_config, hidden_size=64, micro_batch_size=4, gradient_accumulation_steps=2)
    assert "optimizer" not in config and "scheduler" not in config and "train_batch_size" not in config
    assert config["train_micro_batch_size_per_gpu"] == 4 and config["gradient_accumulation_steps"] == 2
    assert config["bf16"] == {"enabled": True}
    assert config["zero_optimization"] == {"stage": 3, "reduce_bucket_size": 64 * 64,
                                           "stage3_prefetch_bucket_size": int(0.9 * 64 * 64),
                                           "stage3_param_persistence_threshold": 640}
    assert student_config["optimizer"]["type"] == "AdamW"  # the student's config is left as it was
    stage2 = deepspeed_inference_config({"zero_optimization": {"stage": 2}}, 64, 1, 1)
    assert stage2["zero_optimization"] == {"stage": 0}


def test_deepspeed_path_initialises_an_inference_engine(monkeypatch):
    received = {}

    class Engine:
        def eval(self):
            received["eval"] = True
            return self

    def initialize(model, config):
        received.update(model=model, config=config)
        return Engine(), None, None, None

    monkeypatch.setitem(sys.modules, "deepspeed", types.SimpleNamespace(initialize=initialize))
    teacher = torch.nn.Linear(2, 2)
    teacher.config = SimpleNamespace(hidden_size=8)
    accelerator = fake_accelerator(2, "DEEPSPEED", 3, {"optimizer": {"type": "AdamW"}, "zero_optimization": {"stage": 3}})
    args = SimpleNamespace(teacher_sharding="auto", self_distillation="none", per_device_train_batch_size=2,
                           gradient_accumulation_steps=1)
    engine = place_teacher(teacher, accelerator, args)
    assert isinstance(engine, Engine) and received["eval"] and received["model"] is teacher
    assert "optimizer" not in received["config"] and received["config"]["zero_optimization"]["stage"] == 3
    assert accelerator.calls == []  # not also prepared the Accelerate way
