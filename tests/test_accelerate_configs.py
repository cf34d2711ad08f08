"""The Accelerate configs in scripts/accelerate_configs/ parse and say what they promise.

The 2-process DDP run on CPU with ddp_cpu.yaml is in tests/test_multiprocess.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.utils import DistributedType

CONFIGS = Path(__file__).resolve().parents[1] / "scripts" / "accelerate_configs"
EXPECTED = {
    "ddp_cpu.yaml": DistributedType.MULTI_GPU,  # the torchrun launcher; ranks run gloo on CPU (see the file)
    "ddp_gpu.yaml": DistributedType.MULTI_GPU,
    "fsdp.yaml": DistributedType.FSDP,
    "deepspeed_zero3.yaml": DistributedType.DEEPSPEED,
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_parses_and_documents_its_launch_line(name):
    path = CONFIGS / name
    config = load_config_from_file(str(path))  # raises on unknown keys
    assert isinstance(config, ClusterConfig)
    assert config.distributed_type == EXPECTED[name]
    assert config.num_processes == 2 and config.num_machines == 1
    text = path.read_text()
    assert text.startswith("#") and f"accelerate launch --config_file scripts/accelerate_configs/{name}" in text
    assert sum(line.lstrip().startswith("#") for line in text.splitlines()) >= 8, "each config explains itself"


def test_sharded_configs_shard_everything():
    fsdp = yaml.safe_load((CONFIGS / "fsdp.yaml").read_text())["fsdp_config"]
    assert fsdp["fsdp_version"] == 2
    assert fsdp["fsdp_reshard_after_forward"] is True  # FULL_SHARD
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    for name in ("fsdp.yaml", "deepspeed_zero3.yaml"):  # the teacher's treatment is stated where users look
        assert "--teacher_sharding auto" in (CONFIGS / name).read_text()
    zero = yaml.safe_load((CONFIGS / "deepspeed_zero3.yaml").read_text())["deepspeed_config"]
    assert zero["zero_stage"] == 3 and zero["zero3_init_flag"] is True
    assert "gradient_accumulation_steps" not in zero  # "auto": taken from TrainingArguments
    cpu = yaml.safe_load((CONFIGS / "ddp_cpu.yaml").read_text())
    assert cpu["use_cpu"] is False and cpu["mixed_precision"] == "no"
