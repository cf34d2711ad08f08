"""Vocabulary trimming: exact tokenization and outputs on kept text for WordPiece, byte-level BPE, SentencePiece
BPE and Unigram; tied, untied and biased output layers; save/load; ONNX; the real MiniLM; bad input.

Expected values come from the untrimmed model and tokenizer, matched to the trimmed ones by token *string*
(never through the ids `trim_vocabulary` computed)."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from tokenizers import (ByteLevelBPETokenizer, SentencePieceBPETokenizer, SentencePieceUnigramTokenizer, Tokenizer,
                        models, pre_tokenizers)
from transformers import (AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification,
                          AutoTokenizer, BertConfig, BertForMaskedLM, BertForSequenceClassification, GPT2Config,
                          GPT2LMHeadModel, PreTrainedTokenizer, PreTrainedTokenizerFast)

from hf_distill import trim_vocabulary, unk_rate
from hf_distill.data import bert_tokenizer_from_vocab, synthetic_tokenizer
from tests.conftest import shared_data_dir

ATOL = 1e-5
SP_WORDS = ("the cat sat on a mat while my dog ran in the park . we like green tea and warm bread ; "
            "rain fell over old hills , so birds sang softly near quiet rivers").split()


def sst2(shared, split, n):
    with open(shared / "sst2" / f"{split}.jsonl", encoding="utf-8") as handle:
        return [json.loads(line)["text"] for _, line in zip(range(n), handle)]


def bert_wordpiece(shared):
    tokenizer = bert_tokenizer_from_vocab(shared / "tokenizers" / "bert-base-uncased" / "vocab.txt")
    assert len(tokenizer) == 30522
    return tokenizer


def gpt2_byte_level(shared):
    folder = shared / "tokenizers" / "gpt2"
    backend = ByteLevelBPETokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    backend.add_special_tokens(["<|endoftext|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend._tokenizer, bos_token="<|endoftext|>",
                                        eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    assert len(tokenizer) == 50257 and tokenizer("Hello world")["input_ids"] == [15496, 995]
    return tokenizer


def sentencepiece(kind, sentences):
    specials = ["<unk>", "<pad>", "<s>", "</s>"]
    if kind == "bpe":
        backend = SentencePieceBPETokenizer(unk_token="<unk>")
        backend.train_from_iterator(sentences, vocab_size=150, min_frequency=1, special_tokens=specials)
    else:
        backend = SentencePieceUnigramTokenizer()
        backend.train_from_iterator(sentences, vocab_size=120, special_tokens=specials, unk_token="<unk>")
    return PreTrainedTokenizerFast(tokenizer_object=backend._tokenizer, unk_token="<unk>", pad_token="<pad>",
                                   bos_token="<s>", eos_token="</s>")


def sp_sentences(seed, n):
    g = torch.Generator().manual_seed(seed)
    return [" ".join(SP_WORDS[i] for i in torch.randint(0, len(SP_WORDS), (8,), generator=g)) for _ in range(n)]


def tiny_bert(cls, vocab_size, tie=True, seed=0):
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128, num_labels=2, pad_token_id=0,
                        tie_word_embeddings=tie)
    model = cls(config).eval()
    if cls is BertForMaskedLM:  # a non-zero output bias, so that trimming it is checked
        with torch.no_grad():
            model.cls.predictions.bias.normal_()
    return model


def tiny_gpt2(tie=True):
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50257, n_embd=32, n_layer=2, n_head=4, n_positions=128, bos_token_id=50256,
                        eos_token_id=50256, tie_word_embeddings=tie)
    return GPT2LMHeadModel(config).eval()


def old_ids_of_new(original, trimmed):
    """For each new id, the old id of the same token string."""
    vocab, new = original.get_vocab(), trimmed.get_vocab()
    assert sorted(new.values()) == list(range(len(new)))
    return [vocab[token] for token in sorted(new, key=new.get)]


def kept_texts(original, trimmed, texts):
    """The texts whose original tokens all exist in the trimmed vocabulary."""
    vocab = trimmed.get_vocab()
    return [t for t in texts if all(tok in vocab for tok in original.convert_ids_to_tokens(original(t)["input_ids"]))]


def outputs(model, tokenizer, texts):
    """Logits, and the mask of the values to compare (real tokens for token-level logits)."""
    batch = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    return logits, batch["attention_mask"].bool() if logits.dim() == 3 else torch.ones_like(logits, dtype=torch.bool)


def assert_exact(original_model, original, model, trimmed, texts):
    """Same tokens (by string) and the same outputs as the untrimmed pair; LM logits compared on kept columns."""
    old_of_new = old_ids_of_new(original, trimmed)
    for text in texts:
        ids, old = trimmed(text)["input_ids"], original(text)["input_ids"]
        assert [old_of_new[i] for i in ids] == old
    assert torch.equal(model.get_input_embeddings().weight, original_model.get_input_embeddings().weight[old_of_new])
    if original.pad_token is None:
        original.pad_token = trimmed.pad_token = original.eos_token
    expected, mask = outputs(original_model, original, texts)
    got, _ = outputs(model, trimmed, texts)
    if expected.shape[-1] == len(original):
        expected = expected[..., old_of_new]
        assert got.shape[-1] == len(old_of_new) == model.config.vocab_size
    assert (got - expected)[mask].abs().max() <= ATOL


def assert_round_trip(model, tokenizer, texts, folder, auto_cls):
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    loaded, loaded_tokenizer = auto_cls.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    assert [loaded_tokenizer(t)["input_ids"] for t in texts] == [tokenizer(t)["input_ids"] for t in texts]
    assert loaded.config.vocab_size == model.config.vocab_size == len(loaded_tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = loaded_tokenizer.pad_token = tokenizer.eos_token
    expected, mask = outputs(model, tokenizer, texts)
    got, _ = outputs(loaded, loaded_tokenizer, texts)
    assert (got - expected)[mask].abs().max() <= ATOL


def test_wordpiece_bert_classifier_is_exact_and_round_trips(shared_data, tmp_path):
    original = bert_wordpiece(shared_data)
    original_model = tiny_bert(BertForSequenceClassification, 30522)
    train, validation = sst2(shared_data, "train", 1000), sst2(shared_data, "validation", 200)
    model, trimmed, report = trim_vocabulary(tiny_bert(BertForSequenceClassification, 30522), original, train,
                                             held_out_texts=validation, return_report=True)
    held = kept_texts(original, trimmed, validation)
    assert 20 < len(held) < len(validation)  # some unseen sentences are all kept, some are not
    assert_exact(original_model, original, model, trimmed, train[:64] + held[:64])
    assert report.kept_size == len(trimmed) == model.config.vocab_size < 30522 and report.original_size == 30522
    assert report.parameters_after == report.parameters_before - (30522 - len(trimmed)) * 32
    assert report.texts_unk_rate == 0.0 and 0.0 <= report.held_out_unk_rate < 0.01
    assert model.config.pad_token_id == trimmed.pad_token_id == 0 and trimmed.unk_token == "[UNK]"
    # a token no text used ("ж" is in the BERT vocabulary) now maps to [UNK]
    assert original.tokenize("ж") == ["ж"] and trimmed.tokenize("ж ж good") == ["[UNK]", "[UNK]", "good"]
    assert unk_rate(trimmed, ["ж ж good"]) == pytest.approx(2 / 3) and unk_rate(original, ["ж ж good"]) == 0.0
    assert_round_trip(model, trimmed, train[:32] + held[:32], tmp_path / "trimmed", AutoModelForSequenceClassification)


def test_min_frequency_keeps_exactly_the_frequent_and_special_tokens(shared_data):
    original = bert_wordpiece(shared_data)
    train = sst2(shared_data, "train", 200)
    counts = Counter(token for text in train for token in original.tokenize(text))
    _, trimmed = trim_vocabulary(tiny_bert(BertForSequenceClassification, 30522), original, train, min_frequency=3)
    expected = {t for t, c in counts.items() if c >= 3} | {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"}
    assert set(trimmed.get_vocab()) == expected
    rare = next(t for t, c in counts.items() if c == 1 and not t.startswith("##"))
    assert "[UNK]" in trimmed.tokenize(rare) or trimmed.tokenize(rare) != [rare]


def test_report_counts_held_out_words_split_into_kept_pieces(shared_data):
    """A dropped whole-word token ("cooking") is split into kept pieces ("cook ##ing"), not mapped to [UNK]: the
    unknown-token rate misses it, the changed share counts the text."""
    original = bert_wordpiece(shared_data)
    train = ["i like to cook", "zooming through thrashing rain"]  # keeps cook, ##ing; not cooking
    held = ["i like cooking", "i like to cook", "rain", "ж"]
    _, trimmed, report = trim_vocabulary(tiny_bert(BertForSequenceClassification, 30522), original, train,
                                         held_out_texts=held, return_report=True)
    assert original.tokenize("i like cooking") == ["i", "like", "cooking"]
    assert trimmed.tokenize("i like cooking") == ["i", "like", "cook", "##ing"]
    assert report.held_out_unk_rate == pytest.approx(1 / 10)  # only "ж", of 4 + 4 + 1 + 1 trimmed tokens
    assert report.held_out_changed_share == pytest.approx(2 / 4)  # "i like cooking" and "ж"


@pytest.mark.parametrize("tie", [True, False])
def test_masked_lm_output_layer_and_bias(shared_data, tie):
    original = bert_wordpiece(shared_data)
    original_model = tiny_bert(BertForMaskedLM, 30522, tie=tie)
    train = sst2(shared_data, "train", 100)
    model, trimmed = trim_vocabulary(tiny_bert(BertForMaskedLM, 30522, tie=tie), original, train)
    decoder = model.get_output_embeddings()
    assert (decoder.weight is model.get_input_embeddings().weight) == tie
    assert decoder.weight.shape[0] == decoder.bias.shape[0] == model.cls.predictions.bias.shape[0] == len(trimmed)
    assert_exact(original_model, original, model, trimmed, train[:16])


@pytest.mark.parametrize("tie", [True, False])
def test_byte_level_gpt2_is_exact_keeps_bytes_and_round_trips(shared_data, tmp_path, tie):
    original, original_model = gpt2_byte_level(shared_data), tiny_gpt2(tie)
    train, validation = sst2(shared_data, "train", 1000), sst2(shared_data, "validation", 100)
    model, trimmed, report = trim_vocabulary(tiny_gpt2(tie), original, train, held_out_texts=validation,
                                             return_report=True)
    assert set(pre_tokenizers.ByteLevel.alphabet()) <= set(trimmed.get_vocab())  # every byte stays encodable
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == tie
    per_row = 32 * (1 if tie else 2)
    assert report.parameters_after == report.parameters_before - (50257 - len(trimmed)) * per_row
    held = kept_texts(original, trimmed, validation)
    assert 0 < len(held) < len(validation)
    assert_exact(original_model, original, model, trimmed, train[:12] + held[:12])
    # text with dropped tokens: no unknown token, more (shorter) tokens, decoded losslessly
    unseen = next(t for t in validation if t not in held)
    assert len(trimmed(unseen)["input_ids"]) > len(original(unseen)["input_ids"])
    assert trimmed.decode(trimmed(unseen)["input_ids"]) == unseen == original.decode(original(unseen)["input_ids"])
    assert report.held_out_unk_rate == 0.0 and report.held_out_token_ratio > 1.0
    assert model.config.eos_token_id == trimmed.eos_token_id == len(trimmed) - 1
    assert_round_trip(model, trimmed, train[:16] + held[:16], tmp_path / "gpt2", AutoModelForCausalLM)


def test_bpe_keeps_the_intermediate_tokens_of_a_kept_token(shared_data):
    """'Hello' is one GPT-2 token built through merges whose intermediate tokens the text never shows."""
    original = gpt2_byte_level(shared_data)
    _, trimmed = trim_vocabulary(tiny_gpt2(), original, ["Hello"])
    assert trimmed.tokenize("Hello") == ["Hello"] and trimmed.decode(trimmed("Hello")["input_ids"]) == "Hello"
    assert len(trimmed) > 256 + 2  # bytes, <|endoftext|>, 'Hello' and its intermediates
    assert original.tokenize(" Hello") == ["ĠHello"] and trimmed.tokenize(" Hello") == ["Ġ", "Hello"]


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_sentencepiece_tokenizers_are_exact_on_unseen_kept_text(tmp_path, kind):
    train = sp_sentences(0, 40)
    original = sentencepiece(kind, train + ["zebra quiz jumps vex"])
    original_model = tiny_bert(BertForSequenceClassification, len(original))
    model, trimmed = trim_vocabulary(tiny_bert(BertForSequenceClassification, len(original)), original, train)
    assert len(trimmed) < len(original)
    unseen = sp_sentences(1, 40)  # new sentences from the same words: every token kept, none in `texts`
    assert kept_texts(original, trimmed, unseen) == unseen and not set(unseen) & set(train)
    assert_exact(original_model, original, model, trimmed, train[:20] + unseen)
    dropped = [c for c in original.get_vocab() if len(c) == 1 and c not in trimmed.get_vocab()]
    assert dropped  # characters of "zebra quiz jumps vex" that no text used: now the unknown token
    old_unk, unk = original.convert_tokens_to_ids("<unk>"), trimmed.convert_tokens_to_ids("<unk>")
    assert all(old_unk not in original(f"tea{c}")["input_ids"] and unk in trimmed(f"tea{c}")["input_ids"]
               for c in dropped)
    assert_round_trip(model, trimmed, unseen[:10], tmp_path / kind, AutoModelForSequenceClassification)


def test_unigram_keeps_the_lowest_scored_piece_that_prices_unknown_characters():
    """'a' has no piece, so it is an unknown node scored (lowest score) - 10. Originally -110 and 'ab cd' (-80)
    beats '<unk> bcd' (-111); were 'zz' (-100) dropped, the unknown node would cost -60 and '<unk> bcd' (-61) win."""
    pieces = [("<unk>", 0.0), ("ab", -40.0), ("cd", -40.0), ("bcd", -1.0), ("b", -50.0), ("c", -50.0), ("d", -50.0),
              ("zz", -100.0), ("e", -60.0)]
    backend = Tokenizer(models.Unigram(pieces, unk_id=0, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    original = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    assert original.tokenize("abcd") == ["ab", "cd"]
    model, trimmed = trim_vocabulary(tiny_bert(BertForSequenceClassification, len(pieces)), original, ["abcd", "bcd"])
    assert trimmed.tokenize("abcd") == ["ab", "cd"] and trimmed.tokenize("e") == ["e"]  # the tokenizer shows text
    assert trimmed("e")["input_ids"] == [trimmed.unk_token_id]  # 'e' was never used: now unknown
    assert set(trimmed.get_vocab()) == {"<unk>", "ab", "cd", "bcd", "b", "c", "d", "zz"}  # characters of kept pieces


def test_trimmed_classifier_exports_to_onnx(shared_data, tmp_path):
    pytest.importorskip("onnxruntime")
    from hf_distill.export import export_onnx
    from hf_distill.inference import create_session

    train = sst2(shared_data, "train", 100)
    model, trimmed = trim_vocabulary(tiny_bert(BertForSequenceClassification, 30522), bert_wordpiece(shared_data),
                                     train)
    model.save_pretrained(tmp_path / "student")
    trimmed.save_pretrained(tmp_path / "student")
    result = export_onnx(tmp_path / "student", quantize=False)
    assert result.parity["fp32"].passed
    session = create_session(result.model_path)
    batch = trimmed(train[:8], padding=True, return_tensors="np")
    names = {i.name for i in session.get_inputs()}
    got = session.run(None, {k: v.astype("int64") for k, v in batch.items() if k in names})[0]
    expected, _ = outputs(model, trimmed, train[:8])
    assert abs(got - expected.numpy()).max() <= ATOL


def test_shared_minilm_classifier(tmp_path):
    folder = shared_data_dir() / "models" / "all-MiniLM-L6-v2"
    if not folder.is_dir():
        pytest.skip(f"shared MiniLM not found at {folder}")
    shared = shared_data_dir()
    train, validation = sst2(shared, "train", 300), sst2(shared, "validation", 150)
    torch.manual_seed(0)
    original_model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2).eval()
    original = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    student = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2).eval()
    model, trimmed, report = trim_vocabulary(student, original, train, held_out_texts=validation, return_report=True)
    assert type(trimmed) is type(original) and report.kept_size == len(trimmed) < 30522
    assert report.parameters_after == report.parameters_before - (30522 - len(trimmed)) * 384
    held = kept_texts(original, trimmed, validation)
    assert_exact(original_model, original, model, trimmed, train[:16] + held[:16])
    assert_round_trip(model, trimmed, held[:8], tmp_path / "minilm", AutoModelForSequenceClassification)
    assert AutoModel.from_pretrained(tmp_path / "minilm").embeddings.word_embeddings.num_embeddings == len(trimmed)


class SlowWhitespaceTokenizer(PreTrainedTokenizer):
    """A minimal slow (Python) tokenizer."""

    def __init__(self, **kwargs):
        self.vocab = {"[UNK]": 0, "good": 1, "film": 2}
        super().__init__(unk_token="[UNK]", **kwargs)

    def get_vocab(self):
        return dict(self.vocab)

    @property
    def vocab_size(self):
        return len(self.vocab)

    def _tokenize(self, text, **kwargs):
        return text.split()

    def _convert_token_to_id(self, token):
        return self.vocab.get(token, 0)

    def _convert_id_to_token(self, index):
        return {v: k for k, v in self.vocab.items()}[index]


def test_bad_input(shared_data):
    train = sst2(shared_data, "train", 50)
    bert = tiny_bert(BertForSequenceClassification, 30522)
    with pytest.raises(ValueError, match=r"slow \(Python\) tokenizer.*AutoTokenizer"):
        trim_vocabulary(bert, SlowWhitespaceTokenizer(), ["good film"])
    with pytest.raises(ValueError, match=r"id 50256 but the model's input embedding has 30522 rows.*AutoTokenizer"):
        trim_vocabulary(bert, gpt2_byte_level(shared_data), train)
    wrong = synthetic_tokenizer()  # the word-level tokenizer of the package's synthetic task: not for SST-2
    small = tiny_bert(BertForSequenceClassification, len(wrong))
    with pytest.raises(ValueError, match=r"\d% of the tokens of the texts are the unknown token.*unk_share_limit"):
        trim_vocabulary(small, wrong, train)
    trim_vocabulary(small, wrong, train, unk_share_limit=1.0)  # the limit is the user's to raise
    with pytest.raises(ValueError, match="non-empty list of strings"):
        trim_vocabulary(bert, bert_wordpiece(shared_data), [])
    with pytest.raises(ValueError, match="min_frequency"):
        trim_vocabulary(bert, bert_wordpiece(shared_data), train, min_frequency=0)
    assert bert.config.vocab_size == 30522  # nothing was changed by refused calls
