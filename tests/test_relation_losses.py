"""MiniLM relations and RKD: hand-computed values, zero for identical inputs, padding and width invariance."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from hf_distill.losses.relations import minilm_relation, rkd_angle, rkd_distance


def _softmax(xs: list[float]) -> list[float]:
    top = max(xs)
    exps = [math.exp(x - top) for x in xs]
    return [e / sum(exps) for e in exps]


def _minilm_reference(student, teacher, mask, heads, student_keys=None, teacher_keys=None):
    """Plain-Python loops: per head, per valid query, softmax over valid keys, KL(teacher || student)."""
    student_keys = student if student_keys is None else student_keys
    teacher_keys = teacher if teacher_keys is None else teacher_keys

    def relation(q_states, k_states, b, r, q, valid):
        d = q_states.shape[-1] // heads
        qv = q_states[b, q, r * d : (r + 1) * d].tolist()
        scores = [sum(x * y for x, y in zip(qv, k_states[b, k, r * d : (r + 1) * d].tolist())) / math.sqrt(d) for k in valid]
        return _softmax(scores)

    out = []
    for b in range(student.shape[0]):
        valid = [i for i in range(student.shape[1]) if mask[b][i]]
        total = 0.0
        for r in range(heads):
            for q in valid:
                ps = relation(student, student_keys, b, r, q, valid)
                pt = relation(teacher, teacher_keys, b, r, q, valid)
                total += sum(t * math.log(t / s) for s, t in zip(ps, pt))
        out.append(total / (heads * len(valid)))
    return torch.tensor(out)


def _smooth_l1(x: float) -> float:
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def _rkd_distance_reference(student, teacher):
    def normalised(x):
        pairs = [(i, j) for i in range(len(x)) for j in range(len(x)) if i != j]
        dist = {p: math.dist(x[p[0]], x[p[1]]) for p in pairs}
        mean = sum(dist.values()) / len(dist)
        return {p: d / mean for p, d in dist.items()}

    s, t = normalised(student.tolist()), normalised(teacher.tolist())
    return sum(_smooth_l1(s[p] - t[p]) for p in s) / len(s)


def _rkd_angle_reference(student, teacher):
    def cosines(x):
        out = {}
        for i, j, k in itertools.permutations(range(len(x)), 3):
            u = [a - b for a, b in zip(x[i], x[j])]
            v = [a - b for a, b in zip(x[k], x[j])]
            out[i, j, k] = sum(a * b for a, b in zip(u, v)) / (math.hypot(*u) * math.hypot(*v))
        return out

    s, t = cosines(student.tolist()), cosines(teacher.tolist())
    return sum(_smooth_l1(s[key] - t[key]) for key in s) / len(s)


# ---------------------------------------------------------------- MiniLM


def test_minilm_hand_value_two_tokens():
    # one head, width 1, two tokens. Student states 0 -> uniform relations [0.5, 0.5].
    # Teacher states [1], [2]: row 0 scores [1, 2], row 1 scores [2, 4].
    student = torch.zeros(1, 2, 1)
    teacher = torch.tensor([[[1.0], [2.0]]])

    def kl_to_uniform(a, b):
        p = [1 / (1 + math.exp(b - a)), 1 / (1 + math.exp(a - b))]
        return sum(x * math.log(x / 0.5) for x in p)

    expected = (kl_to_uniform(1, 2) + kl_to_uniform(2, 4)) / 2
    assert torch.allclose(minilm_relation(student, teacher, None, 1), torch.tensor([expected]))


@pytest.mark.parametrize("heads", [1, 2])
def test_minilm_matches_reference_with_different_widths(heads):
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 4, 4), torch.randn(2, 4, 6)  # widths 4 and 6
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    expected = _minilm_reference(student, teacher, mask, heads)
    assert torch.allclose(minilm_relation(student, teacher, mask, heads), expected, atol=1e-5)


def test_minilm_query_key_relation_matches_reference():
    torch.manual_seed(1)
    sq, sk, tq, tk = torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    expected = _minilm_reference(sq, tq, mask, 2, sk, tk)
    result = minilm_relation(sq, tq, mask, 2, student_keys=sk, teacher_keys=tk)
    assert torch.allclose(result, expected, atol=1e-5)


def test_minilm_zero_for_identical_and_padding_invariance():
    torch.manual_seed(2)
    x = torch.randn(2, 3, 6)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    assert torch.allclose(minilm_relation(x, x.clone(), mask, 3), torch.zeros(2), atol=1e-6)

    student, teacher = torch.randn(2, 3, 4), torch.randn(2, 3, 6)
    reference = minilm_relation(student, teacher, mask, 2)
    pad = lambda t: torch.cat([t, torch.randn(2, 2, t.shape[-1]) * 1e3], 1)  # noqa: E731
    padded_mask = torch.cat([mask, torch.zeros(2, 2, dtype=mask.dtype)], 1)
    assert torch.allclose(minilm_relation(pad(student), pad(teacher), padded_mask, 2), reference, atol=1e-6)

    student.requires_grad_(True)
    minilm_relation(student, teacher, mask, 2).sum().backward()
    assert torch.isfinite(student.grad).all() and student.grad[1, 2].abs().sum() == 0


def test_minilm_errors():
    with pytest.raises(ValueError, match="divide the teacher width 6"):
        minilm_relation(torch.randn(1, 2, 4), torch.randn(1, 2, 6), None, 4)
    with pytest.raises(ValueError, match="mismatch"):
        minilm_relation(torch.randn(1, 2, 4), torch.randn(1, 3, 4), None, 1)


# ---------------------------------------------------------------- RKD


def test_rkd_distance_hand_value():
    # student: right triangle (0,0), (1,0), (0,1): distances 1, 1, sqrt2 (each twice), mean (2 + sqrt2) / 3.
    # teacher: points on a line 0, 1, 2: distances 1, 2, 1, mean 4 / 3. Pairs (0,1), (0,2), (1,2), each twice.
    student = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    teacher = torch.tensor([[0.0], [1.0], [2.0]])
    ms, mt = (2 + math.sqrt(2)) / 3, 4 / 3
    diffs = [1 / ms - 1 / mt, 1 / ms - 2 / mt, math.sqrt(2) / ms - 1 / mt] * 2
    expected = sum(0.5 * d * d for d in diffs) / 6
    assert rkd_distance(student, teacher).shape == ()
    assert math.isclose(rkd_distance(student, teacher).item(), expected, rel_tol=1e-5)


def test_rkd_angle_hand_value():
    # student: right isosceles triangle, angles 90, 45, 45; teacher: equilateral, all 60 degrees.
    student = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    teacher = torch.tensor([[0.0, 0.0], [2.0, 0.0], [1.0, math.sqrt(3)]])
    # each vertex appears in 2 ordered triplets: cos 0 vs 0.5 (x2), cos(45) vs 0.5 (x4)
    diffs = [0.0 - 0.5] * 2 + [math.sqrt(0.5) - 0.5] * 4
    expected = sum(0.5 * d * d for d in diffs) / 6
    assert math.isclose(rkd_angle(student, teacher).item(), expected, rel_tol=1e-5)


@pytest.mark.parametrize("fn,reference", [(rkd_distance, _rkd_distance_reference), (rkd_angle, _rkd_angle_reference)])
def test_rkd_matches_reference_and_invariances(fn, reference):
    torch.manual_seed(3)
    student, teacher = torch.randn(5, 3), torch.randn(5, 7) * 4  # widths differ
    assert math.isclose(fn(student, teacher).item(), reference(student, teacher), rel_tol=1e-4)
    # zero for identical inputs, and for a scaled, shifted copy (RKD compares normalised structure)
    assert fn(student, student.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert fn(student, 3 * student + 1).item() == pytest.approx(0.0, abs=1e-6)
    student.requires_grad_(True)
    fn(student, teacher).backward()
    assert torch.isfinite(student.grad).all()


@pytest.mark.parametrize("fn,minimum", [(rkd_distance, 2), (rkd_angle, 3)])
def test_rkd_small_batches_give_zero(fn, minimum):
    student = torch.randn(minimum - 1, 4, requires_grad=True)
    loss = fn(student, torch.randn(minimum - 1, 4))
    assert loss.item() == 0.0
    loss.backward()  # still part of the graph
    with pytest.raises(ValueError, match="pooled"):
        fn(torch.randn(3, 2, 4), torch.randn(3, 4))
