"""On-policy distillation as TRL's stable DistillationTrainer runs it: prompt-only data (plain and chat), lmbda = 1,
TRL's sampling flag names, and the generation metrics logged at each log line (checked against independent
recomputations from the generated batches)."""

from __future__ import annotations

import datasets
import pytest
import torch
from transformers import HfArgumentParser

from hf_distill import CompletionCollator, DistillationArguments, DistillationTrainer, tokenize_completions
from single_thread import one_thread  # noqa: F401  (autouse)
from test_causal_lm_data import BOS, EOS, VOCAB, make_tokenizer, tiny_llama


def ids(text: str) -> list[int]:
    return [VOCAB.index(w) for w in text.split()]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def _args(tmp_path, **overrides) -> DistillationArguments:
    settings = dict(output_dir=str(tmp_path), distillation_task="causal-lm", lmbda=1.0, max_steps=3, logging_steps=1, alpha=1.0, per_device_train_batch_size=2, report_to="none",
                    use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0)
    settings.update(overrides)
    return DistillationArguments(**settings)


def _prompt_only_rows(n: int = 4) -> datasets.Dataset:
    """Prompt-only rows built by hand (no completion token anywhere), independent of tokenize_completions."""
    prompts = [[BOS] + ids(t) for t in ("the cat", "once upon a time", "the dog ran", "hello there")][:n]
    return datasets.Dataset.from_dict({"input_ids": prompts, "attention_mask": [[1] * len(p) for p in prompts],
                                       "labels": [[-100] * len(p) for p in prompts],
                                       "prompt_length": [len(p) for p in prompts]})


# ---------------------------------------------------------------------------------------------- data
def test_prompt_only_plain_and_chat_prompts_tokenize(tokenizer) -> None:
    plain = tokenize_completions(datasets.Dataset.from_dict({"prompt": ["the cat", "once upon a time"]}), tokenizer,
                                 max_length=16)
    assert plain["input_ids"] == [[BOS] + ids("the cat"), [BOS] + ids("once upon a time")]  # BOS, no EOS
    assert plain["labels"] == [[-100] * 3, [-100] * 5] and plain["prompt_length"] == [3, 5]
    chat = datasets.Dataset.from_dict({"prompt": [[{"role": "system", "content": "fine"},
                                                   {"role": "user", "content": "how are you"}]]})
    out = tokenize_completions(chat, tokenizer, max_length=16)
    # the template writes "<|system|> fine <|user|> how are you <|assistant|> " (generation prompt appended)
    expected = ids("<|system|> fine <|user|> how are you <|assistant|>")
    assert out["input_ids"] == [expected] and out["labels"] == [[-100] * 7] and out["prompt_length"] == [7]
    with pytest.raises(ValueError, match="empty prompt"):
        tokenize_completions(datasets.Dataset.from_dict({"prompt": [[]]}), tokenizer, max_length=16)


# ---------------------------------------------------------------------------------------------- refusals
def test_prompt_only_data_needs_lmbda_one(tmp_path, tokenizer) -> None:
    data = _prompt_only_rows()
    for lmbda in (0.0, 0.5):
        with pytest.raises(ValueError, match="--lmbda 1"):
            DistillationTrainer(tiny_llama(1), tiny_llama(2), _args(tmp_path, lmbda=lmbda), train_dataset=data,
                                data_collator=CompletionCollator(tokenizer), processing_class=tokenizer)
    for alpha, alpha_end in ((0.5, None), (1.0, 0.5)):  # cross-entropy on the student's own samples
        with pytest.raises(ValueError, match="--alpha 1"):
            DistillationTrainer(tiny_llama(1), tiny_llama(2), _args(tmp_path, alpha=alpha, alpha_end=alpha_end),
                                train_dataset=data, data_collator=CompletionCollator(tokenizer), processing_class=tokenizer)
    with pytest.raises(ValueError, match="evaluation data has prompts only"):
        DistillationTrainer(tiny_llama(1), tiny_llama(2), _args(tmp_path), train_dataset=data, eval_dataset=data,
                            data_collator=CompletionCollator(tokenizer), processing_class=tokenizer)


def test_trl_generation_flag_names_parse_and_old_names_still_work(tmp_path) -> None:
    parser = HfArgumentParser(DistillationArguments)
    (args,) = parser.parse_args_into_dataclasses(args=[
        "--output_dir", str(tmp_path), "--lmbda", "1", "--max_completion_length", "12", "--top_p", "0.9",
        "--top_k", "5", "--generation_temperature", "0.7", "--temperature", "2"])
    assert (args.max_completion_length, args.top_p, args.top_k) == (12, 0.9, 5)
    assert (args.generation_temperature, args.temperature, args.lmbda) == (0.7, 2.0, 1.0)
    with pytest.warns(FutureWarning, match="max_completion_length"):
        (old,) = parser.parse_args_into_dataclasses(args=[
            "--output_dir", str(tmp_path), "--generation_max_new_tokens", "7", "--generation_top_p", "0.5",
            "--generation_top_k", "3"])
    assert (old.max_completion_length, old.top_p, old.top_k) == (7, 0.5, 3)
    with pytest.raises(ValueError, match="pass only --max_completion_length"):
        DistillationArguments(output_dir=str(tmp_path), max_completion_length=9, generation_max_new_tokens=7)
    for bad in ({"max_completion_length": 0}, {"top_p": 0.0}, {"top_k": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            DistillationArguments(output_dir=str(tmp_path), **bad)


# ---------------------------------------------------------------------------------------------- training and logs
def _entropy_reference(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> tuple[float, int]:
    """Σ H over the positions that predict a completion token (labels shifted), with torch.distributions."""
    targets = labels[:, 1:]
    rows = logits[:, :-1][targets != -100].double() / temperature
    return float(torch.distributions.Categorical(logits=rows).entropy().sum()), int(rows.shape[0])


@pytest.mark.parametrize("fused", ["false", "true"])  # entropy from the full logits, or hidden states through lm_head
def test_prompt_only_training_logs_trl_metrics(tmp_path, tokenizer, monkeypatch, fused) -> None:
    """lr 0: the student is the same at every step, so its entropy is recomputed after training from the batches."""
    generated = []
    original = DistillationTrainer.on_policy_inputs

    def spy(self, model, inputs):
        out = original(self, model, inputs)
        generated.append({k: v.clone() for k, v in out.items()})
        return out

    monkeypatch.setattr(DistillationTrainer, "on_policy_inputs", spy)
    data = tokenize_completions(datasets.Dataset.from_dict({"prompt": ["the cat", "once upon a time", "the dog ran",
                                                                      "hello there"]}), tokenizer, max_length=16)
    student, temperature = tiny_llama(1), 2.0
    trainer = DistillationTrainer(student, tiny_llama(2), _args(tmp_path, learning_rate=0.0, temperature=temperature,
                                                                      max_completion_length=6, fused_lm_loss=fused),
                                  train_dataset=data, data_collator=CompletionCollator(tokenizer),
                                  processing_class=tokenizer)
    assert trainer.fused_lm.enabled is (fused == "true")
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == len(generated) == 3
    student.eval()
    for log, batch in zip(logs, generated):
        lengths, finished = [], []
        for row, mask, p in zip(batch["input_ids"], batch["attention_mask"], batch["prompt_length"]):
            completion = row[int(p): int(mask.sum())].tolist()  # what was generated after the prompt
            assert 1 <= len(completion) <= 6 and EOS not in completion[:-1]
            lengths.append(len(completion))
            finished.append(completion[-1] == EOS)
        assert log["completions/mean_length"] == pytest.approx(sum(lengths) / len(lengths))
        assert log["completions/clipped_ratio"] == pytest.approx(finished.count(False) / len(finished))
        done = [n for n, f in zip(lengths, finished) if f]
        assert log["completions/mean_terminated_length"] == pytest.approx(sum(done) / len(done) if done else 0.0)
        with torch.no_grad():
            logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        total, count = _entropy_reference(logits, batch["labels"], temperature)
        assert count == sum(lengths)
        assert log["entropy"] == pytest.approx(total / count, rel=1e-4)
        assert log["loss_kd"] > 0 and log["loss_kd"] == pytest.approx(log["loss"], rel=1e-3, abs=1e-4)  # 4.57 rounds


def test_chat_prompts_train_on_policy_and_the_student_moves(tmp_path, tokenizer) -> None:
    chats = [[{"role": "user", "content": t}] for t in ("hi there", "how are you", "once upon a time", "the cat sat")]
    data = tokenize_completions(datasets.Dataset.from_dict({"prompt": chats}), tokenizer, max_length=16)
    student = tiny_llama(1)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    trainer = DistillationTrainer(student, tiny_llama(2), _args(tmp_path, learning_rate=1e-2, max_steps=4,
                                                                     max_completion_length=6),
                                  train_dataset=data, data_collator=CompletionCollator(tokenizer),
                                  processing_class=tokenizer)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert all(h["completions/mean_length"] >= 1 and h["loss_kd"] > 0 for h in logs)
    assert logs[-1]["loss_kd"] < logs[0]["loss_kd"]  # distilling on its own samples brings it closer to the teacher
    assert any(not torch.equal(before[n], p) for n, p in student.named_parameters())


def test_completion_entropy_matches_categorical_in_several_chunks() -> None:
    from hf_distill.lm.on_policy import completion_entropy

    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11) * 3
    weights = torch.tensor([[1, 1, 0, 0, 0], [0, 1, 1, 1, 0], [0, 0, 0, 0, 0]]).float()
    total, count = completion_entropy(logits, weights, temperature=1.5, chunk_logits=22)  # 2 rows per chunk
    reference = torch.distributions.Categorical(logits=logits[weights.bool()].double() / 1.5).entropy().sum()
    assert float(count) == 5 and float(total) == pytest.approx(float(reference), rel=1e-5)


# ---------------------------------------------------------------------------------------------- the script
def test_script_trains_on_a_prompt_only_jsonl(tmp_path) -> None:
    import json
    import sys
    from pathlib import Path

    from conftest import shared_data_dir

    stories = shared_data_dir() / "models" / "stories260K"
    if not (stories / "stories260K.bin").is_file():
        pytest.skip(f"stories260K not found in {stories}")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import distill_causal_lm as dcl

    prompts = tmp_path / "prompts.jsonl"
    openings = ["Once upon a time, there was a", "Tom and his dog", "Lily wanted to", "One day, a little",
                "The sun was shining and", "Max liked to play with", "Sam had a new toy", "The cat and the mouse"]
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in openings))
    argv = ["--teacher", f"llama2c:{stories}", "--dataset", str(prompts), "--heldout_fraction", "0.25",
            "--max_completion_length", "16", "--teacher_max_new_tokens", "16", "--max_length", "32",
            "--max_steps", "3", "--logging_steps", "1", "--per_device_train_batch_size", "3", "--use_cpu", "true",
            "--disable_tqdm", "true", "--alpha", "1", "--distillation_loss", "jsd", "--skip_initial_eval", "true"]
    with pytest.raises(ValueError, match="--lmbda 1"):
        dcl.main(argv + ["--output_dir", str(tmp_path / "refused")])
    results = dcl.main(argv + ["--output_dir", str(tmp_path / "run"), "--lmbda", "1"])
    assert results["steps"] == 3 and results["train_examples"] == 6 and results["heldout_examples"] == 2
    assert results["final"]["tokens"] > 2  # held-out teacher samples of the 2 held-out prompts
    assert json.loads((tmp_path / "run" / "distillation" / "recipe.json").read_text())["arguments"]["lmbda"] == 1.0
