"""Transfer-set augmentation: n-gram sampling, masking, vocabulary and masked-LM replacement, teacher labels."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from hf_distill.augmentation import augment_and_cache, augment_texts
from hf_distill.data import synthetic_tokenizer
from tiny_models import tiny_bert

TEXTS = ["the movie was good and the acting was great", "the plot was bad but the music was wonderful"]


def test_ngram_sampling_keeps_one_span_of_the_source():
    tok = synthetic_tokenizer()
    out = augment_texts(TEXTS, tok, num_per_example=20, replace_probability=0.0, ngram_probability=1.0,
                        ngram_range=(2, 3), seed=0)
    assert out, "n-gram sampling produced nothing new"
    for text in out:
        words = text.split()
        assert 2 <= len(words) <= 3
        assert any(" ".join(words) in source for source in TEXTS)


def test_masking_replaces_about_the_requested_share():
    tok = synthetic_tokenizer()
    out = augment_texts(TEXTS * 20, tok, num_per_example=5, replace_probability=0.3, ngram_probability=0.0, seed=1)
    words = [w for text in out for w in text.split()]
    share = sum(w == tok.mask_token for w in words) / len(words)
    assert 0.2 < share < 0.45  # 0.3 requested; only changed variants are kept, which biases it up slightly
    assert out == augment_texts(TEXTS * 20, tok, num_per_example=5, replace_probability=0.3, ngram_probability=0.0, seed=1)


def test_vocabulary_replacement_never_inserts_special_tokens():
    tok = synthetic_tokenizer()
    out = augment_texts(TEXTS, tok, num_per_example=10, replace_probability=0.5, replace_with="vocab", ngram_probability=0.0)
    specials = set(tok.all_special_tokens)
    assert out and not any(w in specials for text in out for w in text.split())


def test_mlm_replacement_draws_from_the_models_top_k():
    tok = synthetic_tokenizer()
    torch.manual_seed(0)
    mlm = BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32))
    with torch.no_grad():  # make one word overwhelmingly likely everywhere
        mlm.cls.predictions.decoder.bias.zero_()
        favourite = tok.convert_tokens_to_ids("wonderful")
        mlm.cls.predictions.decoder.bias[favourite] = 100.0
    out = augment_texts(TEXTS, tok, num_per_example=6, replace_probability=0.5, replace_with="mlm", mlm_model=mlm,
                        mlm_top_k=1, ngram_probability=0.0)
    assert out
    for text in out:
        changed = [w for w, src in zip(text.split(), TEXTS[0].split() if text.split()[1] != "plot" else TEXTS[1].split()) if w != src]
        assert set(changed) <= {"wonderful"}


def test_bad_augmentation_settings_are_refused():
    tok = synthetic_tokenizer()
    with pytest.raises(ValueError, match="mlm_model"):
        augment_texts(TEXTS, tok, replace_with="mlm")
    with pytest.raises(ValueError, match="replace_probability"):
        augment_texts(TEXTS, tok, replace_probability=1.5)
    with pytest.raises(ValueError, match="ngram_range"):
        augment_texts(TEXTS, tok, ngram_range=(3, 1))


def test_augment_and_cache_labels_new_text_with_the_teacher():
    tok = synthetic_tokenizer()
    teacher = tiny_bert(vocab_size=len(tok), seed=0).eval()
    data = augment_and_cache(teacher, TEXTS, tok, num_per_example=3, replace_probability=0.2, seed=2)
    assert len(data) > 0 and "teacher_logits" in data.column_names
    row = data[0]
    with torch.no_grad():
        expected = teacher(input_ids=torch.tensor([row["input_ids"]])).logits[0]
    torch.testing.assert_close(torch.tensor(row["teacher_logits"]), expected, atol=1e-5, rtol=1e-4)
