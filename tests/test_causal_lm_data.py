"""Causal-LM data and generation building blocks: completion masks, collation, teacher and on-policy generation."""

from __future__ import annotations

import datasets
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from hf_distill.causal_lm import (
    IGNORE_INDEX,
    CompletionCollator,
    GenerationSettings,
    cache_teacher_completions,
    generate_on_policy_batch,
    generate_teacher_completions,
    tokenize_completions,
)

SPECIAL = ["<pad>", "<bos>", "<eos>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
WORDS = "the a cat dog sat ran on mat park hello hi there how are you fine thanks story once upon time little girl"
WORDS = WORDS.split()
VOCAB = SPECIAL + WORDS
PAD, BOS, EOS = 0, 1, 2
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def make_tokenizer(chat_template: str | None = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over a tiny vocabulary; plain text gets a BOS like Llama's."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.chat_template = chat_template
    return fast


def ids(text: str) -> list[int]:
    return [VOCAB.index(w) for w in text.split()]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(VOCAB), n_positions=64, n_embd=32, n_layer=2, n_head=2,
        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
    )
    return GPT2LMHeadModel(config)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
    )
    return LlamaForCausalLM(config)


# ---------------------------------------------------------------------------------------------
# tokenize_completions
# ---------------------------------------------------------------------------------------------


def test_labels_masked_on_prompt_and_padding(tokenizer):
    ds = datasets.Dataset.from_dict(
        {"prompt": ["the cat", "once upon a time"], "completion": ["sat on the mat", "hi"], "id": [7, 8]}
    )
    out = tokenize_completions(ds, tokenizer, max_length=32)
    assert sorted(out.column_names) == ["attention_mask", "id", "input_ids", "labels", "prompt_length"]
    row = out[0]
    assert row["input_ids"] == [BOS] + ids("the cat") + ids("sat on the mat") + [EOS]
    assert row["prompt_length"] == 3
    assert row["labels"] == [IGNORE_INDEX] * 3 + ids("sat on the mat") + [EOS]
    assert row["attention_mask"] == [1] * 8

    batch = CompletionCollator(tokenizer)(list(out))
    assert batch["input_ids"].shape == (2, 8)
    assert batch["id"].tolist() == [7, 8]
    short = batch["labels"][1]
    assert short.tolist() == [IGNORE_INDEX] * 5 + [ids("hi")[0], EOS] + [IGNORE_INDEX]
    assert batch["input_ids"][1, -1] == PAD and batch["attention_mask"][1, -1] == 0
    # -100 exactly on prompt and padding: everything else is the token itself.
    supervised = batch["labels"] != IGNORE_INDEX
    prompt = torch.arange(8)[None, :] < batch["prompt_length"][:, None]
    assert torch.equal(supervised, batch["attention_mask"].bool() & ~prompt)
    assert torch.equal(batch["labels"][supervised], batch["input_ids"][supervised])


def test_add_eos_options(tokenizer):
    ds = datasets.Dataset.from_dict({"prompt": ["hi", "hi"], "completion": ["there", "there <eos>"]})
    no_eos = tokenize_completions(ds, tokenizer, max_length=16, add_eos=False)
    assert no_eos[0]["labels"][-1] == ids("there")[0]
    with_eos = tokenize_completions(ds, tokenizer, max_length=16)
    assert with_eos[0]["input_ids"] == with_eos[1]["input_ids"]  # an EOS already there is not doubled
    unfinished = ds.add_column("completion_finished", [False, True])
    out = tokenize_completions(unfinished, tokenizer, max_length=16)
    assert "completion_finished" not in out.column_names
    assert out[0]["input_ids"][-1] != EOS and out[1]["input_ids"][-1] == EOS


def test_chat_messages(tokenizer):
    conversation = [
        {"role": "system", "content": "fine"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi there"},
        {"role": "user", "content": "how are you"},
        {"role": "assistant", "content": "fine thanks"},
    ]
    out = tokenize_completions(datasets.Dataset.from_dict({"messages": [conversation]}), tokenizer, max_length=64)
    row = out[0]
    prompt = "<|system|> fine <|user|> hello <|assistant|> hi there <|user|> how are you <|assistant|>"
    assert row["input_ids"] == ids(prompt) + ids("fine thanks") + [EOS]  # no BOS: the template owns specials
    assert row["prompt_length"] == len(ids(prompt))
    assert row["labels"] == [IGNORE_INDEX] * len(ids(prompt)) + ids("fine thanks") + [EOS]

    # TRL's conversational prompt/completion format renders the same sequence.
    pc = datasets.Dataset.from_dict(
        {"prompt": [conversation[:-1]], "completion": [[{"role": "assistant", "content": "fine thanks"}]]}
    )
    assert tokenize_completions(pc, tokenizer, max_length=64)[0] == row


def test_chat_errors():
    no_assistant = datasets.Dataset.from_dict({"messages": [[{"role": "user", "content": "hi"}]]})
    with pytest.raises(ValueError, match="no assistant message"):
        tokenize_completions(no_assistant, make_tokenizer(), max_length=16)
    talk = datasets.Dataset.from_dict(
        {"messages": [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]]}
    )
    with pytest.raises(ValueError, match="chat template"):
        tokenize_completions(talk, make_tokenizer(chat_template=None), max_length=16)


def test_missing_columns(tokenizer):
    ds = datasets.Dataset.from_dict({"text": ["the cat sat"]})
    with pytest.raises(ValueError, match=r"'prompt'.*'completion'.*'messages'.*\['text'\]"):
        tokenize_completions(ds, tokenizer, max_length=16)


def test_truncation_right_cuts_completion(tokenizer):
    ds = datasets.Dataset.from_dict({"prompt": ["the cat"], "completion": ["sat on the mat in the park"]})
    row = tokenize_completions(ds, tokenizer, max_length=6)[0]
    assert row["input_ids"] == [BOS] + ids("the cat sat on the")  # prompt kept, completion end and EOS cut
    assert row["prompt_length"] == 3
    assert row["labels"] == [IGNORE_INDEX] * 3 + ids("sat on the")


def test_truncation_left_cuts_prompt(tokenizer):
    ds = datasets.Dataset.from_dict({"prompt": ["once upon a time the cat"], "completion": ["sat"]})
    row = tokenize_completions(ds, tokenizer, max_length=4, truncation_side="left")[0]
    assert row["input_ids"] == ids("the cat sat") + [EOS]
    assert row["prompt_length"] == 2


def test_prompt_too_long_error(tokenizer):
    ds = datasets.Dataset.from_dict(
        {"prompt": ["hi", "the cat", "once upon a time the little girl"], "completion": ["there"] * 3}
    )
    with pytest.raises(ValueError) as info:
        tokenize_completions(ds, tokenizer, max_length=8)
    message = str(info.value)
    assert "Example 2" in message and "8 tokens" in message and "max_length=8" in message
    assert "Raise max_length to at least 9" in message and "shorten" in message
    assert tokenize_completions(ds, tokenizer, max_length=9)[2]["prompt_length"] == 8  # one completion token fits
    splits = datasets.DatasetDict({"train": ds.select([0]), "test": ds})
    with pytest.raises(ValueError, match="Split 'test': Example 2"):
        tokenize_completions(splits, tokenizer, max_length=8)


# ---------------------------------------------------------------------------------------------
# CompletionCollator
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rows(tokenizer):
    ds = datasets.Dataset.from_dict(
        {
            "prompt": ["the cat", "once upon a time", "hi"],
            "completion": ["sat on the mat", "a little girl ran", "there"],
            "note": ["x", "y", "z"],
        }
    )
    out = tokenize_completions(ds, tokenizer, max_length=32)
    return [dict(r, per_token=[float(t) for t in r["input_ids"]]) for r in out]


@pytest.mark.parametrize("side", ["right", "left"])
def test_collator_padding_keeps_labels_aligned(rows, tokenizer, side):
    batch = CompletionCollator(tokenizer, padding_side=side, pad_to_multiple_of=4)(rows)
    width = batch["input_ids"].shape[1]
    assert width % 4 == 0 and width >= max(len(r["input_ids"]) for r in rows)
    assert "note" not in batch  # text cannot be a tensor
    assert batch["per_token"].shape == batch["input_ids"].shape  # per-token columns are padded like input_ids
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        real = slice(width - n, width) if side == "left" else slice(0, n)
        pad = slice(0, width - n) if side == "left" else slice(n, width)
        assert batch["input_ids"][i, real].tolist() == row["input_ids"]
        assert batch["labels"][i, real].tolist() == row["labels"]
        assert batch["per_token"][i, real].tolist() == row["per_token"]
        assert batch["attention_mask"][i, real].all() and not batch["attention_mask"][i, pad].any()
        assert (batch["labels"][i, pad] == IGNORE_INDEX).all() and (batch["input_ids"][i, pad] == PAD).all()
    # The shifted next-token targets are the same tokens under either padding side.
    targets = batch["labels"][:, 1:][batch["labels"][:, 1:] != IGNORE_INDEX]
    expected = [t for r in rows for t in r["labels"][1:] if t != IGNORE_INDEX]
    assert targets.tolist() == expected


def test_collator_padding_side_from_tokenizer(rows):
    left = make_tokenizer()
    left.padding_side = "left"
    assert CompletionCollator(left).padding_side == "left"
    assert CompletionCollator(make_tokenizer()).padding_side == "right"
    assert CompletionCollator(pad_token_id=5).pad_token_id == 5


def test_collator_prompt_only(rows, tokenizer):
    batch = CompletionCollator(tokenizer, prompt_only=True)(rows)
    assert set(batch) == {"prompt_input_ids", "prompt_attention_mask", "prompt_length"}
    lengths = batch["prompt_length"].tolist()
    assert lengths == [r["prompt_length"] for r in rows]
    width = max(lengths)
    for i, row in enumerate(rows):
        n = lengths[i]
        assert batch["prompt_input_ids"][i, width - n :].tolist() == row["input_ids"][:n]  # left-padded
        assert batch["prompt_attention_mask"][i].tolist() == [0] * (width - n) + [1] * n


# ---------------------------------------------------------------------------------------------
# Sequence-level KD: teacher completions
# ---------------------------------------------------------------------------------------------

PROMPTS = ["once upon a time", "the cat", "hi", "the little girl ran on the", "hello"]


def test_teacher_completions_deterministic_and_batched(tokenizer):
    teacher = tiny_gpt2()
    teacher.train()
    kw = dict(max_new_tokens=6, do_sample=True, temperature=1.0, show_progress=False)
    torch.manual_seed(123)
    outside = torch.rand(1)
    first = generate_teacher_completions(teacher, tokenizer, PROMPTS, seed=3, batch_size=2, **kw)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(1), outside)  # the caller's RNG state is not consumed
    again = generate_teacher_completions(teacher, tokenizer, PROMPTS, seed=3, batch_size=2, **kw)
    other = generate_teacher_completions(teacher, tokenizer, PROMPTS, seed=4, batch_size=2, **kw)
    assert first.column_names == ["prompt", "completion", "completion_finished"]
    assert first["prompt"] == PROMPTS
    assert first["completion"] == again["completion"]
    assert first["completion"] != other["completion"]
    assert teacher.training  # mode restored

    # Greedy, left-padded batches give what one prompt at a time gives.
    greedy = dict(max_new_tokens=5, do_sample=False, show_progress=False)
    batched = generate_teacher_completions(teacher, tokenizer, PROMPTS, batch_size=4, **greedy)
    single = generate_teacher_completions(teacher, tokenizer, PROMPTS, batch_size=1, **greedy)
    assert batched["completion"] == single["completion"]
    teacher.eval()
    for prompt, completion, done in zip(PROMPTS, batched["completion"], batched["completion_finished"]):
        ids_ = tokenizer(prompt)["input_ids"]
        out = teacher.generate(
            torch.tensor([ids_]), max_new_tokens=5, do_sample=False, pad_token_id=PAD, eos_token_id=EOS
        )
        tokens = [t for t in out[0, len(ids_) :].tolist()]
        cut = tokens[: tokens.index(EOS)] if EOS in tokens else tokens
        assert done == (EOS in tokens)
        assert completion.split() == tokenizer.decode(cut, skip_special_tokens=True).split()


def test_teacher_completions_feed_tokenize(tokenizer):
    teacher = tiny_gpt2()
    out = generate_teacher_completions(teacher, tokenizer, datasets.Dataset.from_dict({"prompt": PROMPTS[:2]}),
                                       max_new_tokens=4, show_progress=False)
    tokenized = tokenize_completions(out, tokenizer, max_length=32)
    assert tokenized.column_names == ["input_ids", "attention_mask", "labels", "prompt_length"]
    chat = [[{"role": "user", "content": "hello"}]]
    chat_out = generate_teacher_completions(teacher, tokenizer, chat, max_new_tokens=4, show_progress=False)
    row = tokenize_completions(chat_out, tokenizer, max_length=32)[0]
    assert row["input_ids"][: row["prompt_length"]] == ids("<|user|> hello <|assistant|>")


def test_cache_reuses_without_generating(tokenizer, tmp_path, monkeypatch):
    teacher = tiny_gpt2()
    calls = []
    real_generate = teacher.generate

    def counting_generate(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(teacher, "generate", counting_generate)
    kw = dict(cache_dir=tmp_path, max_new_tokens=4, batch_size=2, do_sample=True, seed=1, show_progress=False)
    first = cache_teacher_completions(teacher, tokenizer, PROMPTS, **kw)
    assert sum(calls) == len(PROMPTS) and len(calls) == 3
    second = cache_teacher_completions(teacher, tokenizer, PROMPTS, **kw)
    assert len(calls) == 3  # loaded from disk, generate not called
    assert second.to_dict() == first.to_dict()
    assert len(list(tmp_path.iterdir())) == 1

    cache_teacher_completions(teacher, tokenizer, PROMPTS, **{**kw, "seed": 2})  # other arguments: regenerate
    assert len(calls) == 6
    with torch.no_grad():
        teacher.lm_head.weight.mul_(1.5)  # other weights: regenerate
    cache_teacher_completions(teacher, tokenizer, PROMPTS, **kw)
    assert len(calls) == 9
    cache_teacher_completions(teacher, tokenizer, PROMPTS, **{**kw, "overwrite": True})
    assert len(calls) == 12 and len(list(tmp_path.iterdir())) == 3


# ---------------------------------------------------------------------------------------------
# On-policy generation
# ---------------------------------------------------------------------------------------------


def test_generation_settings_validation():
    settings = GenerationSettings(max_new_tokens=8, temperature=0.7)
    expected = {"max_new_tokens": 8, "temperature": 0.7, "top_p": 1.0, "do_sample": True, "top_k": 0}
    assert settings.to_kwargs() == expected
    for bad in ({"temperature": 0.0}, {"top_p": 0.0}, {"top_p": 1.5}, {"max_new_tokens": 0}, {"top_k": -1}):
        with pytest.raises(ValueError):
            GenerationSettings(**bad)


@pytest.mark.parametrize("side", ["right", "left"])
def test_on_policy_batch_masks_after_eos(rows, tokenizer, side, monkeypatch):
    """A scripted `generate` pins down the layout: prompt -100, completion through the first EOS, rest masked."""
    student = tiny_gpt2()
    student.train()
    batch = CompletionCollator(tokenizer, padding_side=side)(rows)
    scripted = [ids("a dog") + [EOS, 5, 6], ids("sat sat sat sat sat"), [EOS, EOS, EOS, EOS, EOS]]
    seen = {}

    def fake_generate(input_ids, attention_mask, **kwargs):
        seen.update(training=student.training, grad=torch.is_grad_enabled(), kwargs=kwargs,
                    input_ids=input_ids.clone(), attention_mask=attention_mask.clone())
        return torch.cat([input_ids, torch.tensor(scripted)], dim=1)

    monkeypatch.setattr(student, "generate", fake_generate)
    out = generate_on_policy_batch(
        student, batch, pad_token_id=PAD, eos_token_id=EOS, max_new_tokens=5, temperature=0.5
    )
    assert seen["training"] is False and seen["grad"] is False and student.training
    assert all(m.training for m in student.modules())
    assert seen["kwargs"]["temperature"] == 0.5 and seen["kwargs"]["top_k"] == 0 and seen["kwargs"]["do_sample"]
    width = seen["input_ids"].shape[1]
    for i, row in enumerate(rows):  # the prompts were left-padded for generate
        p = row["prompt_length"]
        assert seen["input_ids"][i, width - p :].tolist() == row["input_ids"][:p]
        assert seen["attention_mask"][i].tolist() == [0] * (width - p) + [1] * p

    completions = [ids("a dog") + [EOS], ids("sat sat sat sat sat"), [EOS]]
    assert out["prompt_length"].tolist() == [r["prompt_length"] for r in rows]
    assert out["input_ids"].shape[1] == max(r["prompt_length"] + len(c) for r, c in zip(rows, completions))
    for i, (row, completion) in enumerate(zip(rows, completions)):
        p, n = row["prompt_length"], row["prompt_length"] + len(completion)
        assert out["input_ids"][i, :n].tolist() == row["input_ids"][:p] + completion  # right-padded
        assert out["labels"][i, :n].tolist() == [IGNORE_INDEX] * p + completion
        assert out["attention_mask"][i].tolist() == [1] * n + [0] * (out["input_ids"].shape[1] - n)
        assert (out["labels"][i, n:] == IGNORE_INDEX).all() and (out["input_ids"][i, n:] == PAD).all()


def test_on_policy_batch_real_student(rows, tokenizer):
    student = tiny_llama()
    student.gradient_checkpointing_enable()
    student.config.use_cache = False  # as the Trainer leaves it
    student.train()
    student.model.layers[0].eval()  # a submodule's own mode survives too
    batch = CompletionCollator(tokenizer, padding_side="left")(rows)
    torch.manual_seed(0)
    settings = GenerationSettings(max_new_tokens=6)
    out = generate_on_policy_batch(student, batch, pad_token_id=PAD, eos_token_id=EOS, **settings.to_kwargs())
    assert student.training and not student.model.layers[0].training and student.model.layers[1].training
    for i, row in enumerate(rows):
        p = row["prompt_length"]
        assert out["input_ids"][i, :p].tolist() == row["input_ids"][:p]
        assert (out["labels"][i, :p] == IGNORE_INDEX).all()
        real = out["attention_mask"][i].bool()
        completion = out["labels"][i, p:][real[p:]]
        assert 1 <= len(completion) <= 6
        assert torch.equal(completion, out["input_ids"][i, p:][real[p:]])
        assert EOS not in completion[:-1].tolist()  # nothing is labelled after an EOS
        assert (out["labels"][i][~real] == IGNORE_INDEX).all()
    # The result goes straight into a forward with a loss.
    loss = student(input_ids=out["input_ids"], attention_mask=out["attention_mask"], labels=out["labels"]).loss
    assert torch.isfinite(loss)

    # Prompt-only batches work too, and a batch without prompt lengths is refused clearly.
    prompts = CompletionCollator(tokenizer, prompt_only=True)(rows)
    torch.manual_seed(0)
    again = generate_on_policy_batch(student, prompts, pad_token_id=PAD, eos_token_id=EOS, **settings.to_kwargs())
    assert torch.equal(again["input_ids"], out["input_ids"])
    with pytest.raises(ValueError, match="prompt_length"):
        generate_on_policy_batch(student, {"input_ids": batch["input_ids"]}, pad_token_id=PAD, eos_token_id=EOS,
                                 max_new_tokens=2)


def test_gpt2_bpe_completion_keeps_leading_space(shared_data):
    """Byte-level BPE: the completion text continues the prompt exactly (leading space kept)."""
    from tokenizers import ByteLevelBPETokenizer

    path = shared_data / "tokenizers" / "gpt2"
    if not (path / "vocab.json").is_file():
        pytest.skip("GPT-2 tokenizer files not staged")
    bpe = ByteLevelBPETokenizer(str(path / "vocab.json"), str(path / "merges.txt"))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    assert len(tok) == 50257
    ds = datasets.Dataset.from_dict({"prompt": ["Once upon a time"], "completion": [" there was a cat."]})
    row = tokenize_completions(ds, tok, max_length=32)[0]
    assert tok.decode(row["input_ids"]) == "Once upon a time there was a cat.<|endoftext|>"
    assert row["labels"][: row["prompt_length"]] == [IGNORE_INDEX] * 4
    torch.manual_seed(0)
    teacher = GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=32, n_embd=16, n_layer=1, n_head=2,
                                         bos_token_id=50256, eos_token_id=50256)).eval()
    out = generate_teacher_completions(teacher, tok, ["Once upon a time"], max_new_tokens=4, show_progress=False)
    prompt_ids = tok("Once upon a time")["input_ids"]
    full = teacher.generate(torch.tensor([prompt_ids]), max_new_tokens=4, do_sample=False, pad_token_id=50256)
    assert "Once upon a time" + out["completion"][0] == tok.decode(full[0], skip_special_tokens=True)
