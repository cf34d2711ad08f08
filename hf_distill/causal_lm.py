"""Causal-LM building blocks, kept importable from here: the code lives in :mod:`hf_distill.lm`.

- data (:mod:`hf_distill.lm.data`): :func:`tokenize_completions`, :class:`CompletionCollator`;
- generation (:mod:`hf_distill.lm.generation`): :func:`generate_teacher_completions`,
  :func:`generate_on_policy_batch`, :class:`GenerationSettings`, :func:`draw_on_policy`;
- caching (:mod:`hf_distill.lm.caching`): :func:`cache_teacher_completions`.
"""

from .lm.caching import cache_teacher_completions
from .lm.data import IGNORE_INDEX, CompletionCollator, tokenize_completions
from .lm.generation import GenerationSettings, draw_on_policy, generate_on_policy_batch, generate_teacher_completions

__all__ = [
    "CompletionCollator",
    "GenerationSettings",
    "IGNORE_INDEX",
    "cache_teacher_completions",
    "draw_on_policy",
    "generate_on_policy_batch",
    "generate_teacher_completions",
    "tokenize_completions",
]
