"""Cross-tokenizer losses (hf_distill.losses.cross_tokenizer), checked against values computed here by hand."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import shared_data_dir

from hf_distill.losses.cross_tokenizer import (
    build_vocab_mapping,
    cross_tokenizer_group_losses,
    flatten_group_ids,
    group_log_probs,
    shared_vocab_forward_kl,
    token_bytes,
    uld_distance,
)
from hf_distill.losses.logits import soft_label_loss

DATA = shared_data_dir()
needs_data = pytest.mark.skipif(not (DATA / "tokenizers" / "gpt2").is_dir(), reason="../shared/data is not staged")

# A SentencePiece-style student and a byte-level teacher, written out by hand.
SP_VOCAB = {"<unk>": 0, "<s>": 1, "</s>": 2, "<0x41>": 3, "A": 4, "▁the": 5, "▁": 6, "<0xE2>": 7, "ing": 8, "zz": 9}
BL_VOCAB = {"A": 0, "Ġthe": 1, "Ġ": 2, "â": 3, "ing": 4, "<|endoftext|>": 5, "xyz": 6}
# shared: A (student 4, not the byte piece 3), ▁the/Ġthe, ▁/Ġ, <0xE2>/â (byte 0xE2), ing
EXPECTED_PAIRS = [(4, 0), (5, 1), (6, 2), (7, 3), (8, 4)]


def _mapping():
    return build_vocab_mapping(SP_VOCAB, BL_VOCAB, "sentencepiece", "byte_level",
                               student_special=("<unk>", "<s>", "</s>"), teacher_special=("<|endoftext|>",))


def test_vocab_mapping_normalises_space_markers_and_byte_fallback():
    m = _mapping()
    assert list(zip(m.student_ids.tolist(), m.teacher_ids.tolist())) == EXPECTED_PAIRS
    assert m.pair_is_shared(torch.tensor([5, 3, 9, 4]), torch.tensor([1, 0, 6, 1])).tolist() == [True, False, False, False]
    wp = build_vocab_mapping({"##ing": 0, "the": 1, "[UNK]": 2}, BL_VOCAB, "wordpiece", "byte_level",
                             student_special=("[UNK]",), teacher_special=("<|endoftext|>",))
    assert sorted(zip(wp.student_ids.tolist(), wp.teacher_ids.tolist())) == [(0, 4), (1, 1)]
    assert token_bytes("<0x0A>", "sentencepiece") == (b"\n", 1) and token_bytes("Ċ", "byte_level") == (b"\n", 0)
    with pytest.raises(ValueError, match="Unknown tokenizer scheme"):
        token_bytes("x", "bpe")


@needs_data
def test_vocab_mapping_of_real_gpt2_and_sentencepiece_vocabularies():
    import json

    from hf_distill.llama2c import read_sentencepiece_pieces

    gpt2 = json.loads((DATA / "tokenizers/gpt2/vocab.json").read_text(encoding="utf-8"))
    pieces = read_sentencepiece_pieces(DATA / "models/stories260K/tok512.model")
    sp = {p.piece: i for i, p in enumerate(pieces)}
    m = build_vocab_mapping(sp, gpt2, "sentencepiece", "byte_level", ("<unk>", "<s>", "</s>"), ("<|endoftext|>",))
    # Independently: spell each normal piece in GPT-2's alphabet (bytes -> printable chars) and look it up.
    printable = [*range(33, 127), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    spell = {b: chr(b) if b in printable else chr(256 + sum(1 for x in range(b) if x not in printable))
             for b in range(256)}
    normal_bytes = {p.piece.replace("▁", " ").encode() for p in pieces if p.type == 1}
    expected = {}
    for i, p in enumerate(pieces):
        if p.type == 6:  # byte fallback: only where no normal piece spells the same byte
            raw = bytes([int(p.piece[3:5], 16)])
            if raw in normal_bytes:
                continue
        elif p.type == 1:
            raw = p.piece.replace("▁", " ").encode()
        else:
            continue
        name = "".join(spell[b] for b in raw)
        if name in gpt2:
            expected[i] = gpt2[name]
    assert dict(zip(m.student_ids.tolist(), m.teacher_ids.tolist())) == expected
    assert expected[sp["▁the"]] == gpt2["Ġthe"] and expected[sp["<0x0A>"]] == gpt2["Ċ"] and len(expected) > 250


def _kl_by_hand(zs, zt, pairs, t):
    p = [math.exp(v / t) for v in zt]
    p = [v / sum(p) for v in p]
    q = [math.exp(v / t) for v in zs]
    q = [v / sum(q) for v in q]
    big_p = [p[b] for _, b in pairs] + [1 - sum(p[b] for _, b in pairs)]
    big_q = [q[a] for a, _ in pairs] + [1 - sum(q[a] for a, _ in pairs)]
    return t * t * sum(x * math.log(x / y) for x, y in zip(big_p, big_q) if x > 0)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_shared_vocab_forward_kl_has_an_other_bin(temperature):
    torch.manual_seed(0)
    zs, zt = torch.randn(3, len(SP_VOCAB)) * 2, torch.randn(3, len(BL_VOCAB)) * 2
    got = shared_vocab_forward_kl(zs, zt, _mapping(), temperature)
    want = [_kl_by_hand(zs[r].tolist(), zt[r].tolist(), EXPECTED_PAIRS, temperature) for r in range(3)]
    assert got.tolist() == pytest.approx(want, rel=1e-5)
    # A teacher with all its mass on shared entries; the student moves mass onto an unshared one ("zz").
    # Renormalising over the shared entries would not see it; the other bin penalises it.
    zt[:, 5:] = -40.0
    zs2 = zs.clone()
    zs2[:, 9] += 5.0
    before = shared_vocab_forward_kl(zs, zt, _mapping(), temperature)
    after = shared_vocab_forward_kl(zs2, zt, _mapping(), temperature)
    assert (after > before + 0.1).all()
    shared_s, shared_t = [a for a, _ in EXPECTED_PAIRS], [b for _, b in EXPECTED_PAIRS]
    renormalised = [soft_label_loss(z[:, shared_s], zt[:, shared_t], temperature=temperature) for z in (zs, zs2)]
    assert torch.allclose(renormalised[0], renormalised[1], atol=1e-6)


def test_uld_distance_sorted_l1_with_zero_padding():
    p = torch.tensor([[0.1, 0.7, 0.2]])
    q = torch.tensor([[0.1, 0.3, 0.5, 0.1]])
    # sorted: q = .5 .3 .1 .1, p = .7 .2 .1 0  ->  .2 + .1 + 0 + .1
    assert uld_distance(q, p).item() == pytest.approx(0.4, abs=1e-6)
    assert uld_distance(q[:, [3, 2, 0, 1]], p[:, [2, 0, 1]]).item() == pytest.approx(0.4, abs=1e-6)


def test_group_log_probs_multiplies_later_tokens_into_the_first_distribution():
    torch.manual_seed(1)
    log_probs = torch.log_softmax(torch.randn(4, 5), -1)
    tokens, groups = torch.tensor([2, 4, 1, 3]), torch.tensor([0, 0, -1, 1])
    out, present = group_log_probs(log_probs, tokens, groups, 3)
    p = log_probs.exp()
    assert torch.allclose(out[0].exp(), p[0] * p[1, 4], rtol=1e-5)
    assert out[0, 2].exp().item() == pytest.approx((p[0, 2] * p[1, 4]).item(), rel=1e-5)  # P(group text)
    assert torch.allclose(out[1].exp(), p[3], rtol=1e-5)
    assert present.tolist() == [True, True, False] and torch.isinf(out[2]).all()


def test_hybrid_group_losses_match_hand_values():
    torch.manual_seed(2)
    vs, vt = len(SP_VOCAB), len(BL_VOCAB)
    zs, zt = torch.randn(5, vs) * 2, torch.randn(4, vt) * 2
    # groups: 0 = one shared token each side ("▁the"/"Ġthe"); 1 = one token each, not a shared pair ("zz"/"xyz");
    #         2 = two student tokens vs one teacher token; 3 = student only (truncated teacher side)
    s_tok, s_grp = torch.tensor([5, 9, 4, 8, 6]), torch.tensor([0, 1, 2, 2, 3])
    t_tok, t_grp = torch.tensor([1, 6, 4, 2]), torch.tensor([0, 1, 2, -1])
    t = 2.0
    out = cross_tokenizer_group_losses(zs, zt, s_tok, t_tok, s_grp, t_grp, 4, _mapping(), temperature=t)
    assert out.valid.tolist() == [True, True, True, False] and out.uses_kl.tolist() == [True, False, False, False]
    ps, pt = torch.softmax(zs / t, -1), torch.softmax(zt / t, -1)

    def uld(a, b):
        a, b = sorted(a, reverse=True), sorted(b, reverse=True)
        a, b = a + [0.0] * (len(b) - len(a)), b + [0.0] * (len(a) - len(b))
        return sum(abs(x - y) for x, y in zip(a, b))

    want = [
        _kl_by_hand(zs[0].tolist(), zt[0].tolist(), EXPECTED_PAIRS, t),
        uld(ps[1].tolist(), pt[1].tolist()),
        uld((ps[2] * ps[3, 8]).tolist(), pt[2].tolist()),
        0.0,
    ]
    assert out.loss.tolist() == pytest.approx(want, rel=1e-5, abs=1e-7)
    uld_only = cross_tokenizer_group_losses(zs, zt, s_tok, t_tok, s_grp, t_grp, 4, _mapping(), t, mode="uld")
    assert uld_only.loss[0].item() == pytest.approx(uld(ps[0].tolist(), pt[0].tolist()), rel=1e-5)
    assert not uld_only.uses_kl.any()


@needs_data
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_identical_tokenizers_give_exactly_the_same_tokenizer_forward_kl(temperature):
    from hf_distill.llama2c import convert_llama2c_tokenizer
    from hf_distill.lm.alignment import align_example, collate_aligned, tokenizer_scheme

    tok = convert_llama2c_tokenizer(DATA / "models/stories260K/tok512.model")
    vocab, scheme = tok.get_vocab(), tokenizer_scheme(tok)
    mapping = build_vocab_mapping(vocab, vocab, scheme, scheme, tok.all_special_tokens, tok.all_special_tokens)
    assert len(mapping) == len(vocab) == 512
    rows = [align_example(tok, tok, p, c).to_features() for p, c in [("Once", " upon a time 😀"), ("A", " cat  sat.")]]
    batch = collate_aligned(rows, 0, 0)
    torch.manual_seed(3)
    b, n = batch["student_input_ids"].shape
    student = torch.randn(b, n, 512, requires_grad=True)
    teacher = torch.randn(b, n, 512) * 3
    groups = batch["group_student_counts"].shape[1]
    # Row i-1 predicts token i: shift, then flatten the batch.
    s_grp = flatten_group_ids(batch["student_group_ids"], groups)[:, 1:].reshape(-1)
    t_grp = flatten_group_ids(batch["teacher_group_ids"], groups)[:, 1:].reshape(-1)
    ids = batch["student_input_ids"][:, 1:].reshape(-1)
    out = cross_tokenizer_group_losses(student[:, :-1].reshape(-1, 512), teacher[:, :-1].reshape(-1, 512), ids,
                                       batch["teacher_input_ids"][:, 1:].reshape(-1), s_grp, t_grp, b * groups,
                                       mapping, temperature)
    in_loss = s_grp >= 0
    per_token = soft_label_loss(student[:, :-1].reshape(-1, 512)[in_loss], teacher[:, :-1].reshape(-1, 512)[in_loss],
                                loss="forward_kl", temperature=temperature)
    assert out.uses_kl[out.valid].all() and int(out.valid.sum()) == int(in_loss.sum()) > 10
    assert torch.allclose(out.loss[out.valid], per_token, rtol=1e-6, atol=0)
    assert out.loss.sum().item() == pytest.approx(per_token.sum().item(), rel=1e-6)
    (grad_cross,) = torch.autograd.grad(out.loss.sum(), student)
    (grad_same,) = torch.autograd.grad(per_token.sum(), student)
    assert torch.isfinite(grad_cross).all() and torch.allclose(grad_cross, grad_same, rtol=1e-5, atol=1e-8)


def test_bad_mode_is_refused():
    with pytest.raises(ValueError, match="'hybrid' or 'uld'"):
        cross_tokenizer_group_losses(torch.zeros(1, 10), torch.zeros(1, 7), torch.tensor([0]), torch.tensor([0]),
                                     torch.tensor([0]), torch.tensor([0]), 1, _mapping(), mode="kl")


def test_uld_distance_gradient_is_the_sorted_l1_gradient():
    """The CPU sort goes through NumPy: values and gradients must be those of the sorted L1 written out."""
    torch.manual_seed(3)
    q_logits = torch.randn(5, 40, requires_grad=True)
    p = torch.randn(5, 24).softmax(-1)
    uld_distance(q_logits.softmax(-1), p).sum().backward()
    ref_logits = q_logits.detach().clone().requires_grad_()
    q = ref_logits.softmax(-1)
    expected = []
    for r in range(5):  # sort each row by hand: order of the entries, largest first
        order = sorted(range(40), key=lambda j: -q[r, j].item())
        p_sorted = sorted(p[r].tolist(), reverse=True) + [0.0] * 16
        expected.append(sum((q[r, j] - p_sorted[i]).abs() for i, j in enumerate(order)))
    torch.stack(expected).sum().backward()
    assert uld_distance(q_logits.softmax(-1), p).sum().item() == pytest.approx(torch.stack(expected).sum().item(), rel=1e-6)
    torch.testing.assert_close(q_logits.grad, ref_logits.grad, atol=1e-7, rtol=1e-5)
