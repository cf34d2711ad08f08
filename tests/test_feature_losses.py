"""Hidden-state and attention losses: hand-computed values, zero for identical inputs, padding invariance."""

from __future__ import annotations

import math

import pytest
import torch

from hf_distill.losses.features import attention_kl, attention_mse, hidden_cosine, hidden_mse, pkd_cls

HIDDEN_LOSSES = [hidden_mse, hidden_cosine, pkd_cls]
ATTENTION_LOSSES = [attention_kl, attention_mse]


def _pad_hidden(x: torch.Tensor, mask: torch.Tensor, extra: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Append ``extra`` padded positions holding large garbage values."""
    garbage = torch.randn(x.shape[0], extra, x.shape[2]) * 1e3
    return torch.cat([x, garbage], 1), torch.cat([mask, torch.zeros(x.shape[0], extra, dtype=mask.dtype)], 1)


def _pad_attention(a: torch.Tensor, extra: int) -> torch.Tensor:
    """Grow [B, N, T, T] to [B, N, T+extra, T+extra] with garbage in every new row and column."""
    b, n, t, _ = a.shape
    out = torch.rand(b, n, t + extra, t + extra) * 50
    out[:, :, :t, :t] = a
    return out


def _random_attention(b: int, n: int, t: int, mask: torch.Tensor) -> torch.Tensor:
    """Softmax rows over the valid keys (padded keys get probability 0), as eager attention returns them."""
    scores = torch.randn(b, n, t, t).masked_fill(~mask.bool()[:, None, None, :], float("-inf"))
    return scores.softmax(-1)


# ---------------------------------------------------------------- hand-computed values


def test_hidden_mse_hand_values():
    student = torch.tensor([[[1.0, 2.0], [0.0, 0.0], [5.0, 5.0]], [[1.0, 1.0], [2.0, 0.0], [9.0, 9.0]]])
    teacher = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [5.0, 5.0]], [[0.0, 1.0], [0.0, 0.0], [0.0, 0.0]]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # example 0: token errors (0+4)/2=2, (1+1)/2=1, 0 -> mean 1; example 1: (1+0)/2, (4+0)/2 -> (0.5+2)/2
    assert torch.allclose(hidden_mse(student, teacher, mask), torch.tensor([1.0, 1.25]))
    # without a mask the last token of example 1 counts too: (0.5 + 2 + 81) / 3
    assert torch.allclose(hidden_mse(student, teacher), torch.tensor([1.0, 83.5 / 3]))


def test_hidden_cosine_hand_values():
    student = torch.tensor([[[1.0, 0.0], [1.0, 1.0]], [[2.0, 0.0], [-3.0, 0.0]]])
    teacher = torch.tensor([[[0.0, 1.0], [1.0, 0.0]], [[5.0, 0.0], [7.0, 7.0]]])
    mask = torch.tensor([[1, 1], [1, 0]])
    expected = torch.tensor([(1.0 + (1 - 1 / math.sqrt(2))) / 2, 0.0])
    assert torch.allclose(hidden_cosine(student, teacher, mask), expected, atol=1e-6)


def test_pkd_cls_hand_values():
    student = torch.tensor([[[3.0, 4.0], [9.0, 9.0]], [[0.0, 2.0], [1.0, 1.0]]])
    teacher = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 7.0], [5.0, 1.0]]])
    # [3,4]/5 = [0.6, 0.8] vs [1, 0]: 0.16 + 0.64; [0, 1] vs [0, 1]: 0
    assert torch.allclose(pkd_cls(student, teacher), torch.tensor([0.8, 0.0]))
    # index 1: [9,9]/|.| vs 0-vector (normalised to 0): 1; [1,1]/sqrt2 vs [5,1]/sqrt26
    cos = 6 / math.sqrt(2 * 26)
    assert torch.allclose(pkd_cls(student, teacher, cls_index=1), torch.tensor([1.0, 2 - 2 * cos]), atol=1e-6)


def _attention_reference(student, teacher, mask, kind):
    """Loops over heads, valid query rows and valid keys, in plain Python."""
    out = []
    for b in range(student.shape[0]):
        valid = [i for i in range(student.shape[2]) if mask[b][i]]
        heads = []
        for n in range(student.shape[1]):
            total = 0.0
            for q in valid:
                for k in valid:
                    s, t = float(student[b, n, q, k]), float(teacher[b, n, q, k])
                    if kind == "kl":
                        total += t * (math.log(t) - math.log(s)) if t > 0 else 0.0
                    else:
                        total += (s - t) ** 2
            heads.append(total / (len(valid) if kind == "kl" else len(valid) ** 2))
        out.append(sum(heads) / len(heads))
    return torch.tensor(out)


def test_attention_losses_hand_values_small():
    # one example, one head, two tokens: rows [0.5, 0.5] vs teacher [0.9, 0.1] and [1, 0] vs [0.5, 0.5]
    student = torch.tensor([[[[0.5, 0.5], [1.0 - 1e-9, 1e-9]]]]).double()
    teacher = torch.tensor([[[[0.9, 0.1], [0.5, 0.5]]]]).double()
    kl_row0 = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    kl_row1 = 0.5 * math.log(0.5 / (1 - 1e-9)) + 0.5 * math.log(0.5 / 1e-9)
    assert torch.allclose(attention_kl(student, teacher), torch.tensor([(kl_row0 + kl_row1) / 2]).double())
    mse = (0.4**2 + 0.4**2 + 0.5**2 + 0.5**2) / 4
    assert torch.allclose(attention_mse(student, teacher), torch.tensor([mse]).double())


@pytest.mark.parametrize("kind,fn", [("kl", attention_kl), ("mse", attention_mse)])
def test_attention_losses_match_reference(kind, fn):
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    student, teacher = _random_attention(2, 3, 4, mask), _random_attention(2, 3, 4, mask)
    expected = _attention_reference(student, teacher, mask, kind)
    assert torch.allclose(fn(student, teacher, mask), expected, atol=1e-5)


# ---------------------------------------------------------------- zero, padding, gradients


@pytest.mark.parametrize("fn", HIDDEN_LOSSES)
def test_hidden_losses_zero_for_identical(fn):
    x = torch.randn(3, 5, 8)
    assert torch.allclose(fn(x, x.clone(), torch.ones(3, 5)), torch.zeros(3), atol=1e-6)


@pytest.mark.parametrize("fn", ATTENTION_LOSSES)
def test_attention_losses_zero_for_identical(fn):
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    a = _random_attention(2, 2, 3, mask)
    assert torch.allclose(fn(a, a.clone(), mask), torch.zeros(2), atol=1e-6)


@pytest.mark.parametrize("fn", HIDDEN_LOSSES)
def test_hidden_losses_padding_invariance(fn):
    torch.manual_seed(1)
    student, teacher = torch.randn(2, 4, 6), torch.randn(2, 4, 6)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    reference = fn(student, teacher, mask)
    padded_student, padded_mask = _pad_hidden(student, mask, 3)
    padded_teacher, _ = _pad_hidden(teacher, mask, 3)
    assert reference.shape == (2,)
    assert torch.allclose(fn(padded_student, padded_teacher, padded_mask), reference, atol=1e-6)
    # garbage in already-padded positions changes nothing either
    student2 = student.clone()
    student2[1, 3] = 1e6
    assert torch.allclose(fn(student2, teacher, mask), reference, atol=1e-6)


@pytest.mark.parametrize("fn", ATTENTION_LOSSES)
def test_attention_losses_padding_invariance(fn):
    torch.manual_seed(2)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    student, teacher = _random_attention(2, 2, 3, mask), _random_attention(2, 2, 3, mask)
    reference = fn(student, teacher, mask)
    padded_mask = torch.cat([mask, torch.zeros(2, 2, dtype=mask.dtype)], 1)
    result = fn(_pad_attention(student, 2), _pad_attention(teacher, 2), padded_mask)
    assert torch.allclose(result, reference, atol=1e-6)


@pytest.mark.parametrize("fn", HIDDEN_LOSSES + ATTENTION_LOSSES)
def test_padded_positions_get_no_gradient(fn):
    torch.manual_seed(3)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    if fn in ATTENTION_LOSSES:
        student, teacher = _random_attention(2, 2, 3, mask), _random_attention(2, 2, 3, mask)
    else:
        student, teacher = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    student.requires_grad_(True)
    fn(student, teacher, mask).sum().backward()
    assert torch.isfinite(student.grad).all()
    if fn in ATTENTION_LOSSES:  # padded query row and padded key column
        assert student.grad[1, :, 2].abs().sum() == 0 and student.grad[1, :, :, 2].abs().sum() == 0
    else:  # padded token
        assert student.grad[1, 2].abs().sum() == 0


# ---------------------------------------------------------------- heads and shapes


def test_attention_head_count_mismatch():
    mask = torch.ones(1, 3)
    student = _random_attention(1, 2, 3, mask)
    teacher = _random_attention(1, 4, 3, mask)
    with pytest.raises(ValueError, match="head_reduction='mean'"):
        attention_kl(student, teacher, mask)
    with pytest.raises(ValueError, match="head_reduction"):
        attention_mse(student, teacher, mask, head_reduction="max")
    averaged = attention_mse(student.mean(1, keepdim=True), teacher.mean(1, keepdim=True), mask)
    assert torch.allclose(attention_mse(student, teacher, mask, head_reduction="mean"), averaged)
    expected = _attention_reference(student.mean(1, keepdim=True), teacher.mean(1, keepdim=True), [[1, 1, 1]], "kl")
    assert torch.allclose(attention_kl(student, teacher, mask, head_reduction="mean"), expected, atol=1e-5)


def test_shape_errors():
    with pytest.raises(ValueError, match="FeatureProjections"):
        hidden_mse(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4))
    with pytest.raises(ValueError, match="attention_mask"):
        hidden_mse(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), torch.ones(1, 3))
    with pytest.raises(ValueError, match="cls_index"):
        pkd_cls(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), torch.tensor([[0, 1]]))
