"""Data helpers that work offline: a synthetic sentiment task, tokenizers from local files, JSONL loading."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Optional, Union

from transformers import PreTrainedTokenizerFast

POSITIVE = ["good", "great", "wonderful", "excellent", "lovely", "brilliant", "superb", "fun", "moving", "clever"]
NEGATIVE = ["bad", "awful", "terrible", "boring", "dull", "poor", "weak", "ugly", "clumsy", "tedious"]
NOUNS = ["movie", "film", "plot", "acting", "story", "cast", "music", "ending", "script", "camera", "pace", "dialogue"]
INTENSIFIERS = ["", "", "very", "really", "quite", "truly"]
NEGATORS = ["not", "never", "hardly"]
CONNECTIVES = ["and", "but", "while", "although"]
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
SYNTHETIC_LABELS = ["negative", "positive"]


def _clause(rng: random.Random) -> tuple[str, int]:
    positive = rng.random() < 0.5
    negated = rng.random() < 0.35
    words = ["the", rng.choice(NOUNS), "was"]
    if negated:
        words.append(rng.choice(NEGATORS))
    intensifier = rng.choice(INTENSIFIERS)
    if intensifier:
        words.append(intensifier)
    words.append(rng.choice(POSITIVE if positive else NEGATIVE))
    return " ".join(words), 1 if positive != negated else -1


def synthetic_sentiment(
    num_examples: int, *, label_noise: float = 0.0, seed: int = 0, num_clauses: int = 3
) -> list[dict[str, Union[str, int]]]:
    """Sentences of ``num_clauses`` clauses ("the plot was not very good but ..."), label = majority sentiment.

    Negation flips a clause. ``label_noise`` flips that fraction of labels at random (the clean label
    is kept in ``clean_label``), which is where soft teacher targets help a student most.
    """
    if num_clauses % 2 == 0:
        raise ValueError("num_clauses must be odd so that the majority is defined.")
    rng = random.Random(seed)
    rows = []
    for _ in range(num_examples):
        clauses, score = [], 0
        for _ in range(num_clauses):
            text, polarity = _clause(rng)
            clauses.append(text)
            score += polarity
        sentence = clauses[0]
        for clause in clauses[1:]:
            sentence += f" {rng.choice(CONNECTIVES)} {clause}"
        clean = int(score > 0)
        label = 1 - clean if rng.random() < label_noise else clean
        rows.append({"text": sentence, "label": label, "clean_label": clean})
    return rows


def synthetic_tokenizer() -> PreTrainedTokenizerFast:
    """A BERT-style word-level tokenizer over the synthetic task's vocabulary."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    words = sorted(set(POSITIVE + NEGATIVE + NOUNS + NEGATORS + CONNECTIVES + [w for w in INTENSIFIERS if w] + ["the", "was"]))
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + words)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return _wrap_bert_style(tokenizer)


def _wrap_bert_style(tokenizer: "tokenizers.Tokenizer") -> PreTrainedTokenizerFast:  # noqa: F821
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )


def bert_tokenizer_from_vocab(vocab_file: Union[str, Path], lowercase: bool = True) -> PreTrainedTokenizerFast:
    """A BERT WordPiece tokenizer built from a local ``vocab.txt`` with the `tokenizers` library.

    (transformers 5's ``BertTokenizerFast(vocab_file=...)`` silently ignores the file; see STACK.md.)
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab_path = Path(vocab_file)
    if not vocab_path.is_file():
        raise FileNotFoundError(f"vocab file not found: {vocab_path}")
    vocab = {line.rstrip("\n"): i for i, line in enumerate(vocab_path.read_text(encoding="utf-8").splitlines())}
    tokenizer = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=lowercase, strip_accents=None, clean_text=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    from tokenizers import decoders

    tokenizer.decoder = decoders.WordPiece(prefix="##")
    wrapped = _wrap_bert_style(tokenizer)
    if len(wrapped) != len(vocab):
        raise ValueError(f"tokenizer has {len(wrapped)} tokens but {vocab_path} lists {len(vocab)}.")
    return wrapped


def load_jsonl(path: Union[str, Path], limit: Optional[int] = None) -> list[dict]:
    """Read a JSON-lines file (one object per line)."""
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                rows.append(json.loads(line))
            if limit is not None and len(rows) >= limit:
                break
    return rows
