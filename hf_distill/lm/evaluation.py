"""Evaluating a causal-LM student against its teacher, independently of :mod:`hf_distill.losses`; and the
story openings the stories260K examples and benchmarks prompt with."""

from __future__ import annotations

import math
from typing import Any

import torch

from .data import CompletionCollator

#: Prompts of the default transfer set: openings in the style of TinyStories.
STORY_OPENINGS = [
    "Once upon a time, there was a", "One day, a little", "Tom and his dog", "Lily wanted to",
    "Once upon a time, in a big forest,", "There was a little boy named", "Sue had a red ball.",
    "The sun was shining and", "Mom said to Ben,", "One morning, a cat", "Anna and her friend",
    "Once there was a small bird", "Max liked to play with", "It was a rainy day.", "The little girl found a",
    "Tim went to the park", "Once upon a time, a bunny", "Sara had a big box.", "The dog was very happy because",
    "One day, Mia saw a", "Jack and Jill went", "There was a big tree in the", "Lucy loved her doll.",
    "A little fish lived in", "Once upon a time, there lived a king", "Ben was sad because", "The bear wanted to eat",
    "Every day, Amy would", "In the garden, there was", "Sam had a new toy", "Once upon a time, a little car",
    "The kids were playing", "Dad took Tom to the", "A girl named Zoe", "The cat and the mouse", "One night, the moon",
    "Lily and her mom baked", "There once was a happy frog", "The old man had a", "Once upon a time, a tiny ant",
]
#: Openings of the held-out evaluation set (none of them is a transfer-set opening).
HELDOUT_OPENINGS = [
    "Once upon a time, there was a big", "Billy found a shiny", "The bird flew to", "Emma and Tom were",
    "One sunny day, a duck", "Grandma gave Lily a", "There was a girl who liked", "The puppy ran to",
    "Once upon a time, a boy named Joe", "Kate wanted a cookie.", "The toy truck was", "Once there was a little star",
]


def heldout_metrics(student: Any, teacher: Any, dataset: Any, tokenizer: Any, batch_size: int = 16) -> dict[str, float]:
    """On the completion tokens of ``dataset``: KL(teacher ‖ student) per token at T = 1, student and teacher
    perplexity of the completions, and top-1 agreement of the two models."""
    collate = CompletionCollator(tokenizer)
    sums = {"kl": 0.0, "nll": 0.0, "teacher_nll": 0.0, "agree": 0.0, "tokens": 0.0}
    was_training = student.training
    student.eval()
    device = next(student.parameters()).device
    teacher_device = next(teacher.parameters()).device
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            log_q = torch.log_softmax(student(**{k: v.to(device) for k, v in inputs.items()}).logits[:, :-1].float(), -1)
            logits_t = teacher(**{k: v.to(teacher_device) for k, v in inputs.items()}).logits[:, :-1].float()
            log_p = torch.log_softmax(logits_t.to(log_q.device), -1)
            targets = batch["labels"][:, 1:].to(log_q.device)
            mask = targets != -100
            safe = targets.clamp(min=0).unsqueeze(-1)
            sums["kl"] += float((log_p.exp() * (log_p - log_q)).sum(-1)[mask].sum())
            sums["nll"] += float(-log_q.gather(-1, safe).squeeze(-1)[mask].sum())
            sums["teacher_nll"] += float(-log_p.gather(-1, safe).squeeze(-1)[mask].sum())
            sums["agree"] += float((log_q.argmax(-1) == log_p.argmax(-1))[mask].sum())
            sums["tokens"] += float(mask.sum())
    student.train(was_training)
    n = max(sums["tokens"], 1.0)
    return {"kl": sums["kl"] / n, "ppl": math.exp(sums["nll"] / n), "teacher_ppl": math.exp(sums["teacher_nll"] / n),
            "top1_agreement": sums["agree"] / n, "tokens": sums["tokens"]}
