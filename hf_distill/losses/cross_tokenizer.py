"""Losses between a student and a teacher with different tokenizers, over aligned token groups.

The groups come from :mod:`hf_distill.lm.alignment`: each group covers the same characters of the
completion on both sides, with one or more tokens on each side. Here everything is a pure tensor
function on flat rows:

* row ``r`` of ``*_logits`` is the distribution that predicted token ``*_token_ids[r]`` (the caller
  shifts causal-LM logits by one), and ``*_group_ids[r]`` is that token's group (``-1``: none; for a
  batch, make ids unique across examples with :func:`flatten_group_ids`);
* ``p`` is the teacher distribution, ``q`` the student's, both softened by the temperature ``T``.

Per group, :func:`cross_tokenizer_group_losses` uses

* the **shared-vocabulary forward KL** (:func:`shared_vocab_forward_kl`) when the group is one token
  on each side and that token pair is in the :class:`VocabMapping`; with identical tokenizers every
  group is of this kind and the loss equals the same-tokenizer forward KL;
* otherwise **ULD** (Boizard et al. 2024, :func:`uld_distance`) between the group distributions of
  :func:`group_log_probs` (a multi-token group's text probability, on its first token's row).

The teacher side is its logits, or (offline) a :class:`TopKTeacher` read from the aligned top-k cache: per
row the k largest log-probabilities at ``T`` with their ids, and the log-probability of the row's own next
token. Then the KL groups compare the shared entries among the k (the rest of the teacher's mass, in or out of
the k, is the "other" bin) and ULD compares the sorted k values padded with zeros
(:func:`topk_shared_forward_kl`, :func:`cross_tokenizer_group_losses`); with k = the teacher's vocabulary both
equal the live losses.

Only ``torch`` is imported here.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

SCHEMES = ("byte_level", "sentencepiece", "wordpiece", "raw")
OTHER_BIN_FLOOR = 1e-12  # the student's "other" bin never drops below this mass, so the KL stays finite
_LOG_OTHER_FLOOR = math.log(OTHER_BIN_FLOOR)


# ----------------------------------------------------------------------------------------------
# The vocabulary mapping, built once from the two vocabularies
# ----------------------------------------------------------------------------------------------
def _byte_level_table() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character standing for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            table[chr(byte)] = byte
        else:
            table[chr(256 + shifted)] = byte
            shifted += 1
    return table


_BYTE_LEVEL = _byte_level_table()


def token_bytes(token: str, scheme: str) -> tuple[bytes, int] | None:
    """The text a vocabulary entry stands for, as bytes, and a priority (0 normal piece, 1 byte fallback).

    ``byte_level``: GPT-2's alphabet (``Ġ`` is a space); ``sentencepiece``: ``▁`` is a space and
    ``<0xNN>`` the byte NN; ``wordpiece``: ``##x`` continues a word (``x``), any other piece starts one
    after a space (`` x``); ``raw``: the string itself. ``None`` when the string is not in the scheme.
    """
    if scheme == "byte_level":
        if not all(c in _BYTE_LEVEL for c in token):
            return None
        return bytes(_BYTE_LEVEL[c] for c in token), 0
    if scheme == "sentencepiece":
        if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            try:
                return bytes([int(token[3:5], 16)]), 1
            except ValueError:
                pass
        return token.replace("▁", " ").encode(), 0
    if scheme == "wordpiece":
        return (token[2:] if token.startswith("##") else " " + token).encode(), 0
    if scheme == "raw":
        return token.encode(), 0
    raise ValueError(f"Unknown tokenizer scheme {scheme!r}; choose one of {', '.join(SCHEMES)}.")


def _canonical(vocab: Mapping[str, int], scheme: str) -> dict[bytes, int]:
    """Bytes -> id of the entries of one vocabulary; collisions keep the best (priority, id)."""
    best: dict[bytes, tuple[int, int]] = {}
    for token, index in vocab.items():
        decoded = token_bytes(token, scheme)
        if decoded is not None and (decoded[0] not in best or (decoded[1], index) < best[decoded[0]]):
            best[decoded[0]] = (decoded[1], index)
    return {key: index for key, (_, index) in best.items()}


@dataclass(frozen=True)
class VocabMapping:
    """Index pairs of the entries two vocabularies share: ``student_ids[k]`` ↔ ``teacher_ids[k]``."""

    student_ids: Tensor
    teacher_ids: Tensor
    student_to_teacher: Tensor  # [max student id + 1], the teacher id of a shared student id, else -1

    def __len__(self) -> int:
        return int(self.student_ids.numel())

    def teacher_to_student(self, size: int) -> Tensor:
        """[max(size, max teacher id + 1)]: the student id of a shared teacher id, else -1."""
        width = max(size, int(self.teacher_ids.max()) + 1 if len(self) else 1)
        table = torch.full((width,), -1, dtype=torch.long)
        table[self.teacher_ids] = self.student_ids
        return table

    def pair_is_shared(self, student_token_ids: Tensor, teacher_token_ids: Tensor) -> Tensor:
        """True where the student token and the teacher token are the same shared entry."""
        table = self.student_to_teacher.to(student_token_ids.device)
        inside = student_token_ids < table.numel()
        mapped = table[student_token_ids.clamp(max=table.numel() - 1)]
        return inside & (mapped == teacher_token_ids)


def build_vocab_mapping(
    student_vocab: Mapping[str, int],
    teacher_vocab: Mapping[str, int],
    student_scheme: str,
    teacher_scheme: str,
    student_special: Collection[str] = (),
    teacher_special: Collection[str] = (),
) -> VocabMapping:
    """Pair the entries of two vocabularies (``tokenizer.get_vocab()``) that stand for the same text.

    Special tokens match only by their exact string; with the same scheme on both sides, so do all entries
    (identical vocabularies map completely). The other entries match on the bytes they stand for
    (:func:`token_bytes`), so ``▁the`` (SentencePiece), ``Ġthe`` (byte-level) and ``the`` (WordPiece,
    word-initial) pair up, as do ``<0xE2>`` and ``â``. Where several entries of one vocabulary stand for
    the same bytes, the normal piece wins over the byte fallback (it is the one the tokenizer emits).
    """
    exact = set(student_special) & set(teacher_special) & student_vocab.keys() & teacher_vocab.keys()
    if student_scheme == teacher_scheme:  # the same string in the same convention is the same text
        exact |= (student_vocab.keys() & teacher_vocab.keys()) - set(student_special) - set(teacher_special)
    pairs = sorted((student_vocab[token], teacher_vocab[token]) for token in exact)
    done_s, done_t = {s for s, _ in pairs}, {t for _, t in pairs}
    rest_s = {k: v for k, v in student_vocab.items() if v not in done_s and k not in student_special}
    rest_t = {k: v for k, v in teacher_vocab.items() if v not in done_t and k not in teacher_special}
    student, teacher = _canonical(rest_s, student_scheme), _canonical(rest_t, teacher_scheme)
    pairs = sorted(pairs + [(student[key], teacher[key]) for key in student.keys() & teacher.keys()])
    student_ids = torch.tensor([s for s, _ in pairs], dtype=torch.long)
    teacher_ids = torch.tensor([t for _, t in pairs], dtype=torch.long)
    table = torch.full((max(student_vocab.values(), default=-1) + 1,), -1, dtype=torch.long)
    table[student_ids] = teacher_ids
    return VocabMapping(student_ids, teacher_ids, table)


# ----------------------------------------------------------------------------------------------
# Divergences
# ----------------------------------------------------------------------------------------------
def _log_other(log_probs: Tensor, shared_ids: Tensor) -> Tensor:
    """log Σ_{v not shared} exp(log_probs_v), per row; -inf when every entry is shared."""
    outside = torch.ones(log_probs.shape[-1], dtype=torch.bool, device=log_probs.device)
    outside[shared_ids.to(log_probs.device)] = False
    if not bool(outside.any()):  # no gradient path through an empty logsumexp (its gradient is NaN)
        return log_probs.new_full(log_probs.shape[:-1] + (1,), -math.inf)
    return log_probs.index_select(-1, outside.nonzero().squeeze(-1)).logsumexp(-1, keepdim=True)


def _log_q(logits: Tensor | None, log_probs: Tensor | None, temperature: float) -> Tensor:
    return log_probs if log_probs is not None else F.log_softmax(logits.float() / temperature, dim=-1)


def shared_vocab_forward_kl(
    student_logits: Tensor | None, teacher_logits: Tensor, mapping: VocabMapping, temperature: float = 1.0,
    student_log_probs: Tensor | None = None,
) -> Tensor:
    """T² · KL(P ‖ Q) per row over the K shared entries plus one "other" bin.

    p = softmax(z_t / T), q = softmax(z_s / T);
    P = (p_{t_1}, …, p_{t_K}, 1 − Σ_k p_{t_k}),  Q = (q_{s_1}, …, q_{s_K}, max(1 − Σ_k q_{s_k}, 1e-12)),
    with (s_k, t_k) the pairs of ``mapping``. The other bin keeps both distributions whole: the mass a side
    puts outside the shared entries is compared as one outcome, so a student cannot hide mass there
    unpunished (renormalising over the shared entries would ignore it), and with identical vocabularies
    the bin is empty and the loss is exactly the forward KL over the full vocabulary. ``student_log_probs``:
    log q already computed (then ``student_logits`` is not read).
    """
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    log_q = _log_q(student_logits, student_log_probs, temperature)
    teacher_ids, student_ids = mapping.teacher_ids.to(log_p.device), mapping.student_ids.to(log_q.device)
    big_p = torch.cat([log_p.index_select(-1, teacher_ids), _log_other(log_p, teacher_ids)], dim=-1)
    big_q = torch.cat([log_q.index_select(-1, student_ids), _log_other(log_q, student_ids).clamp_min(_LOG_OTHER_FLOOR)],
                      dim=-1)
    p = big_p.exp()
    return (p * (big_p - big_q)).masked_fill(p == 0, 0.0).sum(-1) * temperature**2


class TopKTeacher(NamedTuple):
    """The teacher's rows as an offline top-k cache: ``log_probs`` [N, k] (log-probabilities at T, decreasing),
    ``indices`` [N, k] (their teacher ids) and ``token_log_probs`` [N] (log-probability at T of the token the row
    predicts, i.e. of the teacher's own next token)."""

    log_probs: Tensor
    indices: Tensor
    token_log_probs: Tensor

    def rows(self, which: Tensor) -> "TopKTeacher":
        """The rows selected by ``which`` (a mask or indices)."""
        if which.dtype == torch.bool:
            which = which.nonzero().squeeze(-1)
        return TopKTeacher(*(x.index_select(0, which.to(x.device)) for x in self))


def topk_shared_forward_kl(student_logits: Tensor | None, teacher: TopKTeacher, mapping: VocabMapping,
                           temperature: float = 1.0, student_log_probs: Tensor | None = None) -> Tensor:
    """T² · KL(P ‖ Q) per row over the shared entries among the teacher's top k, plus one "other" bin.

    With S_r the top-k entries of row r that the mapping pairs (teacher id t ↔ student id s):
    P = (p_t for t ∈ S_r, 1 − Σ_{t ∈ S_r} p_t),  Q = (q_s for s ∈ S_r, max(1 − Σ_{s ∈ S_r} q_s, 1e-12)),
    where the teacher's other bin is its top-k mass outside S_r plus the tail 1 − Σ_topk p (clamped at 0), and
    the student's is the logsumexp of its entries outside S_r. The approximation: shared entries below the top k
    join the other bin on both sides. With k = the teacher's vocabulary, S_r is every shared entry and this is
    :func:`shared_vocab_forward_kl` (up to float rounding).
    """
    log_q = _log_q(student_logits, student_log_probs, temperature)
    indices = teacher.indices.long().to(log_q.device)
    table = mapping.teacher_to_student(int(indices.max()) + 1 if indices.numel() else 1).to(log_q.device)
    student_ids = table[indices.clamp(0, table.numel() - 1)]
    kept = student_ids >= 0
    log_p = teacher.log_probs.float().to(log_q.device)
    p = log_p.exp()
    tail = (1.0 - p.sum(-1)).clamp_min(0.0)
    p_other = torch.where(kept, 0.0, p).sum(-1) + tail
    taken = torch.zeros_like(log_q).scatter_add_(-1, student_ids.clamp_min(0), kept.float())
    log_q_other = log_q.masked_fill(taken > 0, -math.inf).logsumexp(-1).clamp_min(_LOG_OTHER_FLOOR)
    log_q_kept = log_q.gather(-1, student_ids.clamp_min(0))
    kept_terms = torch.where(kept & (p > 0), p * (log_p - log_q_kept), 0.0).sum(-1)
    other = torch.where(p_other > 0, p_other * (p_other.clamp_min(1e-30).log() - log_q_other), 0.0)
    return (kept_terms + other) * temperature**2


def _sorted_decreasing(x: Tensor) -> Tensor:
    """``x.sort(dim=-1, descending=True).values``, differentiable. On CPU the order comes from NumPy's sort through
    the tensor's array view (several times faster than ``torch.sort`` for vocabulary-wide rows), then a gather."""
    if x.device.type != "cpu" or x.dim() != 2:
        return x.sort(dim=-1, descending=True).values
    if not x.requires_grad:
        negated = (-x.detach()).numpy()
        negated.sort(axis=-1)  # in place: the negated copy
        return -torch.from_numpy(negated)
    if x.dtype == torch.float32 and bool((x >= 0).all()):
        # A non-negative float32's bits order like its value: sort (bits << 32 | index) keys, read the indices.
        keys = (x.detach().contiguous().view(torch.int32).to(torch.int64) << 32) | torch.arange(x.shape[-1])
        array = keys.numpy()
        array.sort(axis=-1)
        order = torch.from_numpy(array[:, ::-1] & 0xFFFFFFFF)
    else:
        order = torch.from_numpy((-x.detach()).numpy().argsort(axis=-1))
    return x.gather(-1, order.contiguous())


def uld_distance(student_probs: Tensor, teacher_probs: Tensor) -> Tensor:
    """Universal Logit Distillation (Boizard et al. 2024): Σ_i |sort↓(q)_i − sort↓(p)_i| per row.

    Each row is sorted in decreasing order, and the shorter vocabulary is padded with zeros.
    """
    q = _sorted_decreasing(student_probs.float())
    p = _sorted_decreasing(teacher_probs.float())
    width = max(q.shape[-1], p.shape[-1])
    q = F.pad(q, (0, width - q.shape[-1]))
    p = F.pad(p, (0, width - p.shape[-1]))
    return (q - p).abs().sum(-1)


# ----------------------------------------------------------------------------------------------
# Groups of tokens
# ----------------------------------------------------------------------------------------------
def flatten_group_ids(group_ids: Tensor, groups_per_example: int) -> Tensor:
    """Per-example group ids [B, L] -> ids unique in the batch: g + b · G (``-1`` stays ``-1``)."""
    offsets = torch.arange(group_ids.shape[0], device=group_ids.device).unsqueeze(1) * groups_per_example
    return torch.where(group_ids >= 0, group_ids + offsets, group_ids)


def _first_rows(group_ids: Tensor, num_groups: int) -> tuple[Tensor, Tensor, Tensor]:
    """(group of each row, with ``num_groups`` for rows of no group; [G + 1] first row of each group, N if
    none; [G] rows per group)."""
    n = group_ids.numel()
    gid = torch.where(group_ids >= 0, group_ids, num_groups)
    rows = torch.arange(n, device=group_ids.device)
    first = torch.full((num_groups + 1,), n, dtype=torch.long, device=group_ids.device)
    first = first.scatter_reduce(0, gid, rows, reduce="amin")
    counts = torch.zeros(num_groups + 1, dtype=torch.long, device=group_ids.device).index_add(0, gid, torch.ones_like(gid))
    return gid, first, counts[:num_groups]


def group_log_probs(log_probs: Tensor, token_ids: Tensor | None, group_ids: Tensor, num_groups: int,
                    own: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """log r_g(v) = log p_f(v) + Σ_{j ∈ g, j ≠ f} log p_j(x_j), with f the first row of group g.

    ``own`` [N]: log p_j(x_j) given directly (a top-k cache, whose ``log_probs`` hold only the k largest);
    else it is read from ``log_probs`` at ``token_ids``.

    r_g is the first token's distribution scaled by the probability of the group's later tokens, so
    r_g(x_f) = Π_{j ∈ g} p_j(x_j) is the probability of the group's text (chain rule). The first row is
    the one both sides predict from the same text (the completion up to the group); later rows
    condition on this side's own partial tokens, which have no counterpart on the other side (GOLD's
    "observed" merge). Returns ([G, V] log-values, -inf for a group without rows; [G] True where it has rows).
    """
    n = log_probs.shape[0]
    gid, first, _ = _first_rows(group_ids, num_groups)
    present = first[:num_groups] < n
    if n == 0:
        return log_probs.new_full((num_groups, log_probs.shape[-1]), -math.inf), present
    if own is None:
        own = log_probs.gather(-1, token_ids.long().unsqueeze(-1)).squeeze(-1)
    own = own.to(log_probs.dtype)
    later = (group_ids >= 0) & (torch.arange(n, device=log_probs.device) != first[gid])
    rest = log_probs.new_zeros(num_groups + 1).index_add(0, gid, torch.where(later, own, 0.0))[:num_groups]
    base = log_probs.index_select(0, first[:num_groups].clamp(max=n - 1))
    return torch.where(present.unsqueeze(-1), base + rest.unsqueeze(-1), -math.inf), present


class GroupLosses(NamedTuple):
    """Per-group loss ``[G]``; ``uses_kl``: groups scored by the shared-vocabulary KL (else ULD);
    ``valid``: groups with rows on both sides (others have loss 0, e.g. after truncation)."""

    loss: Tensor
    uses_kl: Tensor
    valid: Tensor


def cross_tokenizer_group_losses(
    student_logits: Tensor,
    teacher_logits: Tensor | TopKTeacher,
    student_token_ids: Tensor,
    teacher_token_ids: Tensor,
    student_group_ids: Tensor,
    teacher_group_ids: Tensor,
    num_groups: int,
    mapping: VocabMapping,
    temperature: float = 1.0,
    mode: str = "hybrid",
    student_log_probs: Tensor | None = None,
) -> GroupLosses:
    """One loss per aligned group, from flat rows of both sides (see the module docstring).

    ``mode="hybrid"``: a group of one token per side whose pair is shared (``mapping``) gets
    T² · KL(P ‖ Q) of :func:`shared_vocab_forward_kl`; every other group gets
    ULD(r^s_g, r^t_g) = Σ_i |sort↓(r^s_g)_i − sort↓(r^t_g)_i| with r_g of :func:`group_log_probs` on
    softmax(z / T) (no T² factor). ``mode="uld"``: ULD for every group. Rows of no group are ignored.
    A :class:`TopKTeacher` (offline cache) uses :func:`topk_shared_forward_kl`, and ULD on its k sorted values
    (r^t_g has k entries, padded with zeros: the tail mass is left out). ``student_log_probs``: the rows'
    log_softmax(z_s / T), when the caller has it (one log_softmax serves every group and its CE at T = 1).
    """
    if mode not in ("hybrid", "uld"):
        raise ValueError(f"Unknown cross-tokenizer loss mode {mode!r}; choose 'hybrid' or 'uld'.")
    s_idx, t_idx = (student_group_ids >= 0).nonzero().squeeze(-1), (teacher_group_ids >= 0).nonzero().squeeze(-1)
    s_tok, t_tok = student_token_ids[s_idx].long(), teacher_token_ids[t_idx].long()
    s_gid, t_gid = student_group_ids[s_idx].long(), teacher_group_ids[t_idx].long()
    s_first, t_first, valid, uses_kl = _kinds(s_gid, t_gid, s_tok, t_tok, num_groups, mapping, mode)

    def student_rows(which: Tensor) -> Tensor:  # log q of the kept rows at positions `which`
        rows = s_idx[which]
        if student_log_probs is not None:
            return student_log_probs.index_select(0, rows)
        return F.log_softmax(student_logits.index_select(0, rows).float() / temperature, dim=-1)

    loss = student_logits.new_zeros(num_groups, dtype=torch.float32)
    kl_idx = uses_kl.nonzero().squeeze(-1)
    if kl_idx.numel():
        t_rows, s_log = t_idx[t_first[kl_idx]], student_rows(s_first[kl_idx])
        kl = topk_shared_forward_kl(None, teacher_logits.rows(t_rows), mapping, temperature, s_log) \
            if isinstance(teacher_logits, TopKTeacher) else \
            shared_vocab_forward_kl(None, teacher_logits.index_select(0, t_rows), mapping, temperature, s_log)
        loss = loss.index_put((kl_idx,), kl)
    uld_idx = (valid & ~uses_kl).nonzero().squeeze(-1)
    if uld_idx.numel():  # only the rows of the ULD groups, renumbered 0..U-1
        renumber = torch.full((num_groups,), -1, dtype=torch.long, device=uld_idx.device)
        renumber[uld_idx] = torch.arange(uld_idx.numel(), device=uld_idx.device)
        s_sel, t_sel = (renumber[s_gid] >= 0).nonzero().squeeze(-1), (renumber[t_gid] >= 0).nonzero().squeeze(-1)
        s_r, _ = group_log_probs(student_rows(s_sel), s_tok[s_sel], renumber[s_gid[s_sel]], uld_idx.numel())
        t_r = _teacher_group_log_probs(teacher_logits, t_idx[t_sel], t_tok[t_sel], renumber[t_gid[t_sel]],
                                       uld_idx.numel(), temperature)
        loss = loss.index_put((uld_idx,), uld_distance(s_r.exp(), t_r.exp()))
    return GroupLosses(loss, uses_kl, valid)


def _kinds(s_gid: Tensor, t_gid: Tensor, s_tok: Tensor, t_tok: Tensor, num_groups: int, mapping: VocabMapping,
           mode: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per group: its first row on each side, whether both sides have rows, and whether the KL scores it."""
    _, s_first, s_counts = _first_rows(s_gid, num_groups)
    _, t_first, t_counts = _first_rows(t_gid, num_groups)
    valid = (s_counts > 0) & (t_counts > 0)
    s_first, t_first = s_first[:num_groups].clamp(max=max(s_tok.numel() - 1, 0)), t_first[:num_groups].clamp(
        max=max(t_tok.numel() - 1, 0))
    uses_kl = torch.zeros_like(valid)
    if mode == "hybrid" and bool(valid.any()):
        single = valid & (s_counts == 1) & (t_counts == 1)
        uses_kl = single & mapping.pair_is_shared(s_tok[s_first], t_tok[t_first])
    return s_first, t_first, valid, uses_kl


def _teacher_group_log_probs(teacher: Tensor | TopKTeacher, rows: Tensor, token_ids: Tensor, group_ids: Tensor,
                             num_groups: int, temperature: float) -> Tensor:
    """The teacher's r_g of :func:`group_log_probs` from its ``rows`` (with their tokens and groups): over its
    vocabulary (logits), or over its top k (a cache)."""
    if isinstance(teacher, TopKTeacher):
        top = teacher.rows(rows)
        return group_log_probs(top.log_probs.float(), None, group_ids, num_groups, own=top.token_log_probs)[0]
    log_probs = F.log_softmax(teacher.index_select(0, rows).float() / temperature, dim=-1)
    return group_log_probs(log_probs, token_ids, group_ids, num_groups)[0]
