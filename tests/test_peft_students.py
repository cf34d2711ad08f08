"""LoRA students: merging reproduces the adapter model, only adapters train, adapter folders are not teachers."""

from __future__ import annotations

import shutil
from pathlib import Path

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from hf_distill import DistillationTrainer
from hf_distill.peft_students import (
    is_adapter_folder,
    lora_config,
    merge_lora_student,
    refuse_adapter_without_base,
)
from hf_distill.safe_loading import PickleWeightsError
from single_thread import one_thread  # noqa: F401  (autouse)
from tiny_models import distill_args, lm_collator, lm_dataset

VOCAB = 64


def tiny_llama(seed: int = 0, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(2, VOCAB, (3, 10), generator=g), "attention_mask": torch.ones(3, 10, dtype=torch.long)}


def _lora_student(base: LlamaForCausalLM, perturb: bool = True):
    """The base wrapped with LoRA on every linear layer; B matrices made non-zero so the adapter matters."""
    model = peft.get_peft_model(base, lora_config(r=4, alpha=8, target_modules=["all-linear"]))
    if perturb:
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def test_merged_folder_reproduces_adapter_logits(tmp_path: Path) -> None:
    base_dir, adapter_dir, merged_dir = tmp_path / "base", tmp_path / "adapter", tmp_path / "merged"
    base = tiny_llama()
    base.save_pretrained(base_dir)
    inputs = _inputs()
    base_logits = _logits(base, inputs)
    student = _lora_student(AutoModelForCausalLM.from_pretrained(base_dir))
    adapter_logits = _logits(student, inputs)
    assert (adapter_logits - base_logits).abs().max() > 1e-2  # the adapter changes the function
    student.save_pretrained(adapter_dir)
    assert is_adapter_folder(adapter_dir) and not (adapter_dir / "model.safetensors").exists()

    merged = merge_lora_student(adapter_dir, merged_dir)
    assert type(merged) is LlamaForCausalLM
    assert not any("lora" in key for key in merged.state_dict())
    torch.testing.assert_close(_logits(merged, inputs), adapter_logits, atol=1e-5, rtol=1e-5)

    assert (merged_dir / "model.safetensors").is_file() and not is_adapter_folder(merged_dir)
    reloaded = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert type(reloaded) is LlamaForCausalLM
    torch.testing.assert_close(_logits(reloaded, inputs), adapter_logits, atol=1e-5, rtol=1e-5)


def test_merge_in_memory_model_and_explicit_base(tmp_path: Path) -> None:
    base = tiny_llama(seed=3)
    inputs = _inputs()
    student = _lora_student(base)
    expected = _logits(student, inputs)
    student.save_pretrained(tmp_path / "adapter")
    merged = merge_lora_student(student)
    torch.testing.assert_close(_logits(merged, inputs), expected, atol=1e-5, rtol=1e-5)
    # A folder whose recorded base is gone merges onto an explicit base (same weights as the original base).
    again = merge_lora_student(tmp_path / "adapter", base_model=tiny_llama(seed=3))
    torch.testing.assert_close(_logits(again, inputs), expected, atol=1e-5, rtol=1e-5)


def test_pickle_only_adapter_and_base_folders_are_refused_unless_allowed(tmp_path: Path) -> None:
    base = tiny_llama(seed=3)
    inputs = _inputs()
    student = _lora_student(base)
    expected = _logits(student, inputs)
    student.save_pretrained(tmp_path / "adapter", safe_serialization=False)
    assert (tmp_path / "adapter" / "adapter_model.bin").is_file()
    assert not (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    with pytest.raises(PickleWeightsError, match="adapter folder .* only pickle weights .*adapter_model.bin"):
        merge_lora_student(tmp_path / "adapter", base_model=tiny_llama(seed=3))
    allowed = merge_lora_student(tmp_path / "adapter", base_model=tiny_llama(seed=3), allow_pickle_weights=True)
    torch.testing.assert_close(_logits(allowed, inputs), expected, atol=1e-5, rtol=1e-5)

    tiny_llama(seed=3).config.save_pretrained(tmp_path / "base")  # a base folder with pytorch_model.bin only
    torch.save(tiny_llama(seed=3).state_dict(), tmp_path / "base" / "pytorch_model.bin")
    student.save_pretrained(tmp_path / "safe-adapter")
    with pytest.raises(PickleWeightsError, match="pytorch_model.bin"):
        merge_lora_student(tmp_path / "safe-adapter", base_model=str(tmp_path / "base"))
    allowed = merge_lora_student(tmp_path / "safe-adapter", base_model=str(tmp_path / "base"), allow_pickle_weights=True)
    torch.testing.assert_close(_logits(allowed, inputs), expected, atol=1e-5, rtol=1e-5)


def test_merge_refuses_what_is_not_an_adapter(tmp_path: Path) -> None:
    model = tiny_llama()
    with pytest.raises(ValueError, match="no adapter to merge"):
        merge_lora_student(model)
    model.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="not a PEFT adapter folder.*full model already"):
        merge_lora_student(tmp_path / "plain")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        merge_lora_student(tmp_path / "missing")


def test_adapter_folder_as_teacher_without_its_base_is_refused(tmp_path: Path) -> None:
    base_dir = tmp_path / "base"
    tiny_llama().save_pretrained(base_dir)
    _lora_student(AutoModelForCausalLM.from_pretrained(base_dir)).save_pretrained(tmp_path / "adapter")
    # With its base present the adapter can be loaded (and merged) as a full model.
    assert refuse_adapter_without_base(tmp_path / "adapter") == str(base_dir)
    assert refuse_adapter_without_base(base_dir) is None  # a full model passes
    shutil.rmtree(base_dir)
    with pytest.raises(ValueError, match=r"teacher .* is a LORA adapter folder.*base model .* cannot be found"):
        refuse_adapter_without_base(tmp_path / "adapter", role="teacher")
    with pytest.raises(ValueError, match="cannot be found"):
        merge_lora_student(tmp_path / "adapter")
    assert refuse_adapter_without_base(tmp_path / "adapter", base_model="elsewhere") == "elsewhere"


def test_lora_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="rank"):
        lora_config(r=0)
    with pytest.raises(ValueError, match="dropout"):
        lora_config(dropout=1.0)
    assert lora_config(target_modules=["all-linear"]).target_modules == "all-linear"


@pytest.mark.parametrize("route", ["peft_model", "peft_config"])
def test_only_adapter_weights_train_and_saving_writes_the_adapter(tmp_path: Path, route: str) -> None:
    teacher = tiny_llama(seed=1)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    base = tiny_llama(seed=0, layers=1).train()
    base_before = {k: v.clone() for k, v in base.state_dict().items()}
    config = lora_config(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    args = distill_args(tmp_path, max_steps=4, learning_rate=1e-2, alpha=1.0, distillation_task="causal-lm")
    if route == "peft_config":
        trainer = DistillationTrainer(model=base, teacher_model=teacher, args=args, train_dataset=lm_dataset(16),
                                      data_collator=lm_collator, peft_config=config)
    else:
        trainer = DistillationTrainer(model=peft.get_peft_model(base, config), teacher_model=teacher, args=args,
                                      train_dataset=lm_dataset(16), data_collator=lm_collator)
    student = trainer.model
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    lora_before = {n: p.detach().clone() for n, p in student.named_parameters() if "lora_B" in n}
    trainer.train()

    assert any((p.detach() - lora_before[n]).abs().max() > 0 for n, p in student.named_parameters() if n in lora_before)
    for key, value in student.get_base_model().state_dict().items():  # base weights untouched
        if "lora_" not in key:
            plain = key.replace(".base_layer", "")
            torch.testing.assert_close(value, base_before[plain], msg=key)
    for key, value in teacher.state_dict().items():
        torch.testing.assert_close(value, teacher_before[key], msg=key)

    trainer.save_model(str(tmp_path / "saved"))
    saved = tmp_path / "saved"
    assert is_adapter_folder(saved) and (saved / "adapter_model.safetensors").is_file()
    assert not (saved / "model.safetensors").exists()
    merged = merge_lora_student(saved, base_model=tiny_llama(seed=0, layers=1))
    inputs = _inputs()
    student.eval()
    torch.testing.assert_close(_logits(merged, inputs), _logits(student, inputs), atol=1e-5, rtol=1e-5)
