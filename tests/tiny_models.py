"""Tiny models and datasets built in code, shared by the trainer tests."""

from __future__ import annotations

import torch
from datasets import Dataset
from transformers import (
    BertConfig,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    GPT2Config,
    GPT2LMHeadModel,
)

from hf_distill import DistillationArguments
from hf_distill.data import synthetic_sentiment, synthetic_tokenizer

BERT_CLASSES = {
    "sequence-classification": BertForSequenceClassification,
    "token-classification": BertForTokenClassification,
    "question-answering": BertForQuestionAnswering,
}


def tiny_bert(task="sequence-classification", layers=2, hidden=32, num_labels=2, vocab_size=64, seed=0, heads=4, **config):
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=hidden * 2, max_position_embeddings=64, num_labels=num_labels,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **config,
    )
    return BERT_CLASSES[task](cfg)


def tiny_gpt2(layers=2, hidden=32, vocab_size=64, seed=0):
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=4, n_positions=64,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )
    return GPT2LMHeadModel(cfg)


def sentiment_dataset(n=32, seed=0, noise=0.0, max_length=32):
    tokenizer = synthetic_tokenizer()
    rows = synthetic_sentiment(n, seed=seed, label_noise=noise)
    data = Dataset.from_list(rows).remove_columns("clean_label")
    data = data.map(lambda b: tokenizer(b["text"], truncation=True, max_length=max_length), batched=True)
    return data.remove_columns("text"), tokenizer


def lm_dataset(n=16, vocab_size=64, seed=0, min_len=4, max_len=14, prompt_len=3):
    """Random token sequences of varying length; labels -100 on a short prompt."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        ids = torch.randint(2, vocab_size, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * length, "labels": [-100] * prompt_len + ids[prompt_len:]})
    return Dataset.from_list(rows)


def lm_collator(features):
    """Right-pad input_ids (pad 1), attention_mask (0) and labels (-100)."""
    longest = max(len(f["input_ids"]) for f in features)
    pad = {"input_ids": 1, "attention_mask": 0, "labels": -100}
    batch = {k: torch.tensor([list(f[k]) + [v] * (longest - len(f[k])) for f in features]) for k, v in pad.items()}
    return batch


def distill_args(tmp_path, **overrides) -> DistillationArguments:
    defaults = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, per_device_eval_batch_size=8, max_steps=4,
        learning_rate=1e-3, report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, seed=0,
        disable_tqdm=True, dataloader_num_workers=0,
    )
    defaults.update(overrides)
    return DistillationArguments(**defaults)
