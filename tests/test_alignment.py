"""Character-span alignment of two tokenizations (hf_distill.lm.alignment).

Real vocabularies from ../shared/data: GPT-2 byte-level BPE, bert-base-uncased WordPiece and the stories260K
SentencePiece BPE (byte fallback). Group texts are checked by rebuilding each side's text from its *token
strings* (byte-level map, ``▁``/``<0xNN>``, ``##``), independently of the offsets the alignment used.
"""

from __future__ import annotations

import unicodedata

import pytest
import torch
from conftest import shared_data_dir

from hf_distill.lm.alignment import (
    align_example,
    check_unaligned_share,
    collate_aligned,
    require_fast_tokenizer,
    tokenizer_scheme,
    unaligned_share,
)

DATA = shared_data_dir()
pytestmark = pytest.mark.skipif(not (DATA / "tokenizers" / "gpt2").is_dir(), reason="../shared/data is not staged")

TEXTS = [
    " Héllo,  wörld! 😀 日本語 12345\n\n  x\tÉ end  ",
    "Café   naïve 👍🏽 ok 3.14159 and 2024年の夏",
    "MiXeD CaSe ÅÉÎ çà   \t\tdone 000 99\n",
]


def _bert(normalizer_extra=None):
    from tokenizers import normalizers
    from tokenizers.implementations import BertWordPieceTokenizer
    from transformers import PreTrainedTokenizerFast

    raw = BertWordPieceTokenizer(str(DATA / "tokenizers/bert-base-uncased/vocab.txt"), lowercase=True)._tokenizer
    if normalizer_extra is not None:
        raw.normalizer = normalizers.Sequence([raw.normalizer, normalizer_extra])
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
                                  pad_token="[PAD]")
    assert len(tok) == 30522
    return tok


@pytest.fixture(scope="module")
def toks() -> dict:
    from tokenizers.implementations import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    from hf_distill.llama2c import convert_llama2c_tokenizer

    gpt2_raw = ByteLevelBPETokenizer(str(DATA / "tokenizers/gpt2/vocab.json"), str(DATA / "tokenizers/gpt2/merges.txt"))
    gpt2 = PreTrainedTokenizerFast(tokenizer_object=gpt2_raw._tokenizer, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>")
    sp = convert_llama2c_tokenizer(DATA / "models/stories260K/tok512.model")
    assert len(gpt2) == 50257 and len(sp) == 512
    return {"gpt2": gpt2, "bert": _bert(), "sp": sp}


def _gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's printable-character <-> byte table (written out here, not taken from the library)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


BYTE_DECODER = _gpt2_byte_decoder()


def _token_bytes(kind: str, token: str) -> bytes:
    if kind == "gpt2":
        return bytes(BYTE_DECODER[c] for c in token)
    if kind == "sp":
        if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            return bytes([int(token[3:5], 16)])
        return token.replace("▁", " ").encode()
    return (token[2:] if token.startswith("##") else token).encode()


def _canon(text: str, with_wordpiece: bool) -> str:
    """WordPiece (uncased) loses case, accents and whitespace; compare texts after the same loss."""
    if not with_wordpiece:
        return text
    text = unicodedata.normalize("NFD", text.lower())
    return "".join(c for c in text if unicodedata.category(c) != "Mn" and not c.isspace())


def _group_texts(example, side_name: str, kind: str, tok) -> dict[int, str]:
    side = getattr(example, side_name)
    tokens = tok.convert_ids_to_tokens(side.input_ids)
    pieces: dict[int, bytes] = {}
    for token, group in zip(tokens, side.group_ids):
        if group >= 0:
            pieces[group] = pieces.get(group, b"") + _token_bytes(kind, token)
    texts = {g: b.decode("utf-8") for g, b in pieces.items()}  # groups end on character boundaries
    if kind == "sp" and not example.text.startswith(" ") and texts:  # Metaspace prepends one "▁"
        assert texts[0].startswith(" ")
        texts[0] = texts[0][1:]
    return texts


@pytest.mark.parametrize("student,teacher", [("sp", "gpt2"), ("gpt2", "sp"), ("bert", "gpt2"), ("gpt2", "bert"),
                                             ("sp", "bert"), ("bert", "sp")])
@pytest.mark.parametrize("text", TEXTS)
def test_groups_cover_the_same_text_on_both_sides(toks, student, teacher, text):
    ex = align_example(toks[student], toks[teacher], "Q: hi", text)
    wordpiece = "bert" in (student, teacher)
    s_texts = _group_texts(ex, "student", student, toks[student])
    t_texts = _group_texts(ex, "teacher", teacher, toks[teacher])
    assert sorted(s_texts) == sorted(t_texts) == list(range(ex.num_groups)) and ex.num_groups > 5
    for g in range(ex.num_groups):
        if "[UNK]" in (s_texts[g], t_texts[g]):  # WordPiece has no piece for an emoji: the other side spells it
            other = t_texts[g] if s_texts[g] == "[UNK]" else s_texts[g]
            assert not other.isascii() and other.strip()
            continue
        assert _canon(s_texts[g], wordpiece) == _canon(t_texts[g], wordpiece), (g, s_texts[g], t_texts[g])
    # The groups, in order, spell the whole completion: nothing skipped, nothing reordered.
    if not wordpiece:
        assert "".join(s_texts[g] for g in range(ex.num_groups)) == text
    for side in (ex.student, ex.teacher):
        groups = [g for g in side.group_ids if g >= 0]
        assert groups == sorted(groups) and not any(side.unaligned)
    assert unaligned_share(ex.to_features()) == 0.0


def test_multibyte_characters_split_differently_stay_in_one_group(toks):
    ex = align_example(toks["sp"], toks["gpt2"], "", "a 😀")
    sp_tokens = toks["sp"].convert_ids_to_tokens(ex.student.input_ids)
    gpt_tokens = toks["gpt2"].convert_ids_to_tokens(ex.teacher.input_ids)
    emoji_group = ex.student.group_ids[sp_tokens.index("<0xF0>")]
    assert [t for t, g in zip(sp_tokens, ex.student.group_ids) if g == emoji_group] == [
        "▁", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    assert [t for t, g in zip(gpt_tokens, ex.teacher.group_ids) if g == emoji_group] == ["ĠðŁĺ", "Ģ"]


@pytest.mark.parametrize("kind", ["gpt2", "sp", "bert"])
def test_identical_tokenizers_give_one_to_one_groups(toks, kind):
    tok = toks[kind]
    for text in TEXTS:
        ex = align_example(tok, tok, "Q: hi", text)
        content = [g for g in ex.student.group_ids if g >= 0]
        assert ex.student.group_ids == ex.teacher.group_ids
        assert content == list(range(len(content))) and len(content) == ex.num_groups
        assert len(content) == len(tok(text, add_special_tokens=False)["input_ids"])
        batch = collate_aligned([ex.to_features()], tok.pad_token_id or 0, tok.pad_token_id or 0)
        assert batch["group_student_counts"].eq(1).all() and batch["group_teacher_counts"].eq(1).all()


def test_prompt_special_tokens_and_eos_belong_to_no_group(toks):
    sp, gpt2 = toks["sp"], toks["gpt2"]
    ex = align_example(sp, gpt2, "Once upon", " a time")
    prompt_ids = sp("Once upon")["input_ids"]  # with BOS
    completion_ids = sp(" a time", add_special_tokens=False)["input_ids"]
    assert ex.student.input_ids == prompt_ids + completion_ids + [sp.eos_token_id]
    assert ex.student.labels == [-100] * len(prompt_ids) + completion_ids + [sp.eos_token_id]
    assert ex.student.group_ids[: len(prompt_ids)] == [-1] * len(prompt_ids) and ex.student.group_ids[-1] == -1
    assert ex.teacher.input_ids[-1] == gpt2.eos_token_id and ex.teacher.group_ids[-1] == -1
    assert not any(ex.student.unaligned) and not any(ex.teacher.unaligned)


def test_each_side_renders_its_own_chat_template(toks):
    sp, gpt2 = toks["sp"], toks["gpt2"]
    gpt2.chat_template = ("{% for m in messages %}### {{ m.role }}:\n{{ m.content }}<|endoftext|>{% endfor %}"
                          "{% if add_generation_prompt %}### assistant:\n{% endif %}")
    sp.chat_template = ("{% for m in messages %}[{{ m.role }}] {{ m.content }}</s>{% endfor %}"
                        "{% if add_generation_prompt %}[assistant] {% endif %}")
    try:
        ex = align_example(sp, gpt2, [{"role": "user", "content": "Hi"}], "Hello there, Ünïcode 42!")
    finally:
        gpt2.chat_template = sp.chat_template = None
    s_texts = _group_texts(ex, "student", "sp", sp)
    t_texts = _group_texts(ex, "teacher", "gpt2", gpt2)
    assert "".join(t_texts[g] for g in range(ex.num_groups)) == "Hello there, Ünïcode 42!"
    assert s_texts == t_texts
    s_tokens, t_tokens = sp.convert_ids_to_tokens(ex.student.input_ids), gpt2.convert_ids_to_tokens(ex.teacher.input_ids)
    assert s_tokens[-1] == "</s>" and t_tokens[-1] == "<|endoftext|>"  # the templates' end tokens, not doubled
    assert "assistant" in gpt2.decode(ex.teacher.input_ids[: ex.teacher.labels.count(-100)])
    for side in (ex.student, ex.teacher):  # template text and end tokens: no group, and not counted as unaligned
        assert side.group_ids[-1] == -1 and not any(side.unaligned)


def test_token_straddling_the_content_edge_is_unaligned(toks):
    sp, gpt2 = toks["sp"], toks["gpt2"]
    gpt2.chat_template = "{% for m in messages %}{{ m.content }}{% if m.role == 'assistant' %}s{% endif %}\n{% endfor %}"
    sp.chat_template = "{% for m in messages %}{{ m.content }}\n{% endfor %}"
    try:
        ex = align_example(sp, gpt2, [{"role": "user", "content": "Q"}], "The cat")
    finally:
        gpt2.chat_template = sp.chat_template = None
    t_tokens = gpt2.convert_ids_to_tokens(ex.teacher.input_ids)
    assert "Ġcats" in t_tokens  # "cat" + the template's "s": one token across the content's end
    assert ex.teacher.unaligned[t_tokens.index("Ġcats")] and ex.teacher.group_ids[t_tokens.index("The")] == 0
    assert ex.num_groups == 1 and any(ex.student.unaligned)
    assert 0 < unaligned_share(ex.to_features()) < 1


def test_normaliser_dropping_characters_counts_unaligned_tokens(toks):
    from tokenizers import normalizers

    dropping = _bert(normalizers.Replace("!", ""))
    ex = align_example(toks["gpt2"], dropping, "", "Hi ! there ! ok")
    g_tokens = toks["gpt2"].convert_ids_to_tokens(ex.student.input_ids)
    unaligned = [t for t, u in zip(g_tokens, ex.student.unaligned) if u]
    assert unaligned == ["Ġ!", "Ġ!"] and not any(ex.teacher.unaligned)
    content = sum(1 for g in ex.student.group_ids if g >= 0) + 2
    batch = collate_aligned([ex.to_features(), align_example(toks["gpt2"], dropping, "", "fine")
                             .to_features()], 0, 0)
    share = unaligned_share(batch)
    assert share == pytest.approx(2 / (content + 1))
    assert check_unaligned_share(batch, max_share=0.5) == share
    with pytest.raises(ValueError, match="max_unaligned_share"):
        check_unaligned_share(batch, max_share=0.1)


def test_collate_pads_and_counts_group_members(toks):
    rows = [align_example(toks["sp"], toks["gpt2"], "A", t).to_features() for t in ("Ünïcode 日本", "ok")]
    batch = collate_aligned(rows, student_pad_id=0, teacher_pad_id=50256)
    width = max(len(r["teacher_input_ids"]) for r in rows)
    assert batch["teacher_input_ids"].shape == (2, width)
    short = min(range(2), key=lambda b: len(rows[b]["teacher_input_ids"]))
    n = len(rows[short]["teacher_input_ids"])
    assert batch["teacher_input_ids"][short, n:].eq(50256).all() and batch["teacher_group_ids"][short, n:].eq(-1).all()
    assert batch["teacher_labels"][short, n:].eq(-100).all() and batch["teacher_attention_mask"][short].sum() == n
    for b, row in enumerate(rows):
        for side in ("student", "teacher"):
            expected = [row[f"{side}_group_ids"].count(g) for g in range(batch["group_student_counts"].shape[1])]
            assert batch[f"group_{side}_counts"][b].tolist() == expected
    assert batch["student_unaligned"].dtype == torch.bool


def test_slow_tokenizer_is_refused_with_the_fast_one_named(toks):
    from transformers import BertGenerationTokenizer  # a SentencePiece (slow) tokenizer in 4.57 and 5.x

    slow = BertGenerationTokenizer(vocab_file=str(DATA / "models/stories260K/tok512.model"))
    assert not slow.is_fast
    with pytest.raises(ValueError, match="teacher tokenizer.*slow.*use_fast=True"):
        align_example(toks["gpt2"], slow, "Q", "A")
    with pytest.raises(ValueError, match="student tokenizer.*PreTrainedTokenizerFast"):
        require_fast_tokenizer(slow, "student")


def test_tokenizer_scheme(toks):
    assert [tokenizer_scheme(toks[k]) for k in ("gpt2", "sp", "bert")] == ["byte_level", "sentencepiece", "wordpiece"]
