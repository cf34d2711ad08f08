"""Logit losses against values worked out by hand, and their invariants.

Reference pair: teacher p = [1/2, 1/2], student q = [1/4, 3/4], given as logits log p, log q (T = 1):
  KL(p‖q)  = ½ ln 2 + ½ ln(2/3)                                  = 0.143841
  KL(q‖p)  = ¼ ln(1/2) + ¾ ln(3/2)                               = 0.130812
  JSD_½    : m = [3/8, 5/8], ½ KL(p‖m) + ½ KL(q‖m) = ½ (0.032269 + 0.035375) = 0.033822
  JSD_0.1  : m = 0.1 p + 0.9 q = [0.275, 0.725], 0.1 KL(p‖m) + 0.9 KL(q‖m)
             = 0.1 · 0.113137 + 0.9 · 0.001599                     = 0.012752
  JSD_0.9  : m = [0.475, 0.525], 0.9 KL(p‖m) + 0.1 KL(q‖m) = 0.9 · 0.001252 + 0.1 · 0.107043 = 0.011831
  SKL_0.1  : KL(p ‖ 0.1 p + 0.9 q) = KL(p ‖ [0.275, 0.725])       = 0.113137
  SRKL_0.1 : KL(q ‖ 0.1 q + 0.9 p) = KL(q ‖ [0.475, 0.525])       = 0.107043
  TV       : ½ (¼ + ¼)                                            = 0.25
  CE(y=1)  : −ln ¾                                                = 0.287682
"""

import math

import pytest
import torch

from hf_distill.losses.logits import (
    LOSS_NAMES,
    chunked_weighted_sums,
    hard_label_loss,
    soft_label_loss,
    topk_soft_label_loss,
)

P = torch.tensor([[0.5, 0.5]]).log()
Q = torch.tensor([[0.25, 0.75]]).log()


@pytest.mark.parametrize(
    "loss, expected",
    [
        ("forward_kl", 0.143841),
        ("reverse_kl", 0.130812),
        ("jsd", 0.033822),
        ("skew_forward_kl", 0.113137),
        ("skew_reverse_kl", 0.107043),
        ("tvd", 0.25),
    ],
)
def test_divergences_match_hand_computed_values(loss, expected):
    value = soft_label_loss(Q, P, loss=loss, temperature=1.0, jsd_beta=0.5, skew_lambda=0.1)
    assert value.shape == (1,)
    assert value.item() == pytest.approx(expected, abs=1e-5)


def test_logit_mse_and_cross_entropy_by_hand():
    assert soft_label_loss(torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 4.0]]), loss="mse").item() == 2.5
    assert hard_label_loss(Q, torch.tensor([1])).item() == pytest.approx(-math.log(0.75), abs=1e-6)
    assert hard_label_loss(Q, torch.tensor([-100])).item() == 0.0


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_every_loss_is_zero_for_identical_logits(loss):
    logits = torch.randn(6, 11)
    assert soft_label_loss(logits, logits.clone(), loss=loss, temperature=3.0).abs().max().item() < 1e-6


def test_temperature_softens_and_t_squared_scales():
    student, teacher = torch.randn(4, 7), torch.randn(4, 7)
    T = 4.0
    unscaled = soft_label_loss(student, teacher, temperature=T, scale_by_temperature_squared=False)
    scaled = soft_label_loss(student, teacher, temperature=T)
    torch.testing.assert_close(scaled, unscaled * T**2)
    # The temperature divides the logits before the softmax: T=4 on z equals T=1 on z/4.
    torch.testing.assert_close(unscaled, soft_label_loss(student / T, teacher / T, temperature=1.0))


@pytest.mark.parametrize("beta, expected", [(0.1, 0.012752), (0.9, 0.011831)])
def test_jsd_beta_weights_teacher_side_by_beta_as_in_gkd(beta, expected):
    # GKD Eq. 1 / TRL: β KL(p‖m) + (1 − β) KL(q‖m), m = β p + (1 − β) q (the old weights gave 0.101983 / 0.096464).
    value = soft_label_loss(Q, P, loss="jsd", temperature=1.0, jsd_beta=beta)
    assert value.item() == pytest.approx(expected, abs=1e-5)


def reference_jsd(student_logits, teacher_logits, beta, temperature):
    """GKD's JSD_β per row, in float64 from probabilities: β KL(p‖m) + (1 − β) KL(q‖m), m = β p + (1 − β) q."""
    q = torch.softmax(student_logits.double() / temperature, -1)
    p = torch.softmax(teacher_logits.double() / temperature, -1)
    return reference_jsd_of_probs(q, p, beta)


def reference_jsd_of_probs(q, p, beta):
    m = beta * p + (1 - beta) * q
    return beta * (p * (p / m).log()).sum(-1) + (1 - beta) * (q * (q / m).log()).sum(-1)


BETAS = [0.1, 0.5, 0.9]


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("scale", [True, False])
def test_jsd_matches_the_reference_formula_in_value_and_gradient(beta, scale):
    torch.manual_seed(10)
    student, teacher = (3 * torch.randn(6, 13)).requires_grad_(), 3 * torch.randn(6, 13)
    T = 2.0
    got = soft_label_loss(student, teacher, loss="jsd", jsd_beta=beta, temperature=T, scale_by_temperature_squared=scale)
    (got_grad,) = torch.autograd.grad(got.sum(), student)
    ref_student = student.detach().double().requires_grad_()
    expected = reference_jsd(ref_student, teacher, beta, T) * (T**2 if scale else 1.0)
    (expected_grad,) = torch.autograd.grad(expected.sum(), ref_student)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_grad.double(), expected_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("beta", BETAS)
def test_chunked_jsd_matches_the_reference_formula_in_value_and_gradient(beta):
    torch.manual_seed(11)
    student, teacher = (3 * torch.randn(23, 17)).requires_grad_(), 3 * torch.randn(23, 17)
    weights = (torch.rand(23) > 0.3).float()

    def rows(x, t):
        return soft_label_loss(x, t, loss="jsd", jsd_beta=beta, temperature=2.0)[None]

    got, _ = chunked_weighted_sums(rows, (0.7,), student, weights, teacher, chunk_size=4)
    (got_grad,) = torch.autograd.grad(got, student)
    ref_student = student.detach().double().requires_grad_()
    expected = 0.7 * (reference_jsd(ref_student, teacher, beta, 2.0) * 4.0 * weights.double()).sum()
    (expected_grad,) = torch.autograd.grad(expected, ref_student)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_grad.double(), expected_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("beta", BETAS)
def test_topk_jsd_matches_the_reference_formula_on_k_plus_one_bins(beta):
    torch.manual_seed(12)
    student, teacher = (3 * torch.randn(5, 11)).requires_grad_(), 3 * torch.randn(5, 11)
    T, k = 2.0, 4
    log_p_topk, idx = torch.log_softmax(teacher / T, -1).topk(k, dim=-1)
    got = topk_soft_label_loss(student, log_p_topk, idx, loss="jsd", jsd_beta=beta, temperature=T)
    (got_grad,) = torch.autograd.grad(got.sum(), student)
    ref_student = student.detach().double().requires_grad_()
    q_topk = torch.softmax(ref_student / T, -1).gather(-1, idx)
    p_topk = log_p_topk.double().exp()
    q_bins = torch.cat([q_topk, 1 - q_topk.sum(-1, keepdim=True)], -1)
    p_bins = torch.cat([p_topk, 1 - p_topk.sum(-1, keepdim=True)], -1)
    expected = reference_jsd_of_probs(q_bins, p_bins, beta) * T**2
    (expected_grad,) = torch.autograd.grad(expected.sum(), ref_student)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got_grad.double(), expected_grad, rtol=1e-4, atol=1e-6)


def test_jsd_endpoints_are_forward_and_reverse_kl():
    torch.manual_seed(13)
    student, teacher = torch.randn(5, 9), torch.randn(5, 9)
    forward = soft_label_loss(student, teacher, loss="forward_kl")
    reverse = soft_label_loss(student, teacher, loss="reverse_kl")
    torch.testing.assert_close(soft_label_loss(student, teacher, loss="jsd", jsd_beta=0.0), forward)
    torch.testing.assert_close(soft_label_loss(student, teacher, loss="jsd", jsd_beta=1.0), reverse)
    # GKD's formula itself vanishes at the ends: JSD_β / β -> KL(p‖q) and JSD_β / (1 − β) -> KL(q‖p).
    small = 1e-3
    torch.testing.assert_close(soft_label_loss(student, teacher, loss="jsd", jsd_beta=small) / small, forward, rtol=2e-2, atol=0)
    torch.testing.assert_close(soft_label_loss(student, teacher, loss="jsd", jsd_beta=1 - small) / small, reverse, rtol=2e-2, atol=0)


def test_jsd_beta_outside_the_unit_interval_is_refused():
    with pytest.raises(ValueError, match="--jsd_beta"):
        soft_label_loss(Q, P, loss="jsd", jsd_beta=1.5)


def test_topk_with_tail_bin_by_hand():
    # p = [0.5, 0.3, 0.2], top-2 = {0, 1}, tail 0.2; q = [0.2, 0.5, 0.3] -> bins [0.2, 0.5 | 0.3]
    # KL = 0.5 ln(0.5/0.2) + 0.3 ln(0.3/0.5) + 0.2 ln(0.2/0.3) = 0.223804
    teacher_log_probs = torch.tensor([[0.5, 0.3]]).log()
    indices = torch.tensor([[0, 1]])
    student_logits = torch.tensor([[0.2, 0.5, 0.3]]).log()
    value = topk_soft_label_loss(student_logits, teacher_log_probs, indices, temperature=1.0)
    assert value.item() == pytest.approx(0.223804, abs=1e-5)


def test_topk_with_all_tokens_equals_full_divergence():
    student, teacher = torch.randn(3, 6), torch.randn(3, 6)
    log_p, idx = torch.log_softmax(teacher / 2.0, -1).topk(6, dim=-1)
    for loss in ("forward_kl", "reverse_kl", "jsd"):
        full = soft_label_loss(student, teacher, loss=loss, temperature=2.0)
        topk = topk_soft_label_loss(student, log_p, idx, loss=loss, temperature=2.0)
        torch.testing.assert_close(topk, full, atol=1e-4, rtol=1e-4)


def test_unknown_loss_name_is_refused():
    with pytest.raises(ValueError, match="Unknown distillation loss 'kl'"):
        soft_label_loss(Q, P, loss="kl")


@pytest.mark.parametrize("loss", ["forward_kl", "jsd", "skew_reverse_kl", "tvd"])
def test_chunked_equals_unchunked_in_value_and_gradient(loss):
    torch.manual_seed(0)
    logits = torch.randn(37, 50, requires_grad=True)
    teacher, labels = torch.randn(37, 50), torch.randint(0, 50, (37,))
    weights = (torch.rand(37) > 0.3).float()

    def rows(x, t, y):
        return torch.stack([soft_label_loss(x, t, loss=loss, temperature=2.0), hard_label_loss(x, y)])

    full, full_sums = chunked_weighted_sums(rows, (0.7, 0.3), logits, weights, teacher, labels, chunk_size=0)
    (full_grad,) = torch.autograd.grad(full, logits)
    chunked, chunked_sums = chunked_weighted_sums(rows, (0.7, 0.3), logits, weights, teacher, labels, chunk_size=8)
    (chunked_grad,) = torch.autograd.grad(chunked, logits)
    torch.testing.assert_close(chunked, full)
    torch.testing.assert_close(chunked_sums, full_sums)
    torch.testing.assert_close(chunked_grad, full_grad)


def test_zero_weight_rows_change_nothing():
    torch.manual_seed(1)
    logits, teacher = torch.randn(10, 5), torch.randn(10, 5)
    weights = torch.tensor([1.0] * 6 + [0.0] * 4)
    garbage = logits.clone()
    garbage[6:] = 1e3 * torch.randn(4, 5)

    def rows(x, t):
        return soft_label_loss(x, t, loss="forward_kl")[None]

    clean, _ = chunked_weighted_sums(rows, (1.0,), logits, weights, teacher, chunk_size=3)
    noisy, _ = chunked_weighted_sums(rows, (1.0,), garbage, weights, teacher, chunk_size=3)
    torch.testing.assert_close(clean, noisy)


def test_chunks_are_capped_by_elements_at_large_vocabularies():
    from hf_distill.losses.logits import MAX_CHUNK_ELEMENTS, chunked_weighted_sums, soft_label_loss

    torch.manual_seed(0)
    vocab = 1 << 16  # 2^21 / 2^16 = 32 rows per chunk, so 40 rows take two chunks even at chunk_size=1024
    student = torch.randn(40, vocab, requires_grad=True)
    teacher = torch.randn(40, vocab)
    weights = torch.ones(40)

    def rows(x, t):
        return soft_label_loss(x, t, temperature=2.0)[None]

    assert MAX_CHUNK_ELEMENTS // vocab < 40
    chunked, _ = chunked_weighted_sums(rows, (1.0,), student, weights, teacher, chunk_size=1024)
    (g_chunked,) = torch.autograd.grad(chunked, student)
    plain, _ = chunked_weighted_sums(rows, (1.0,), student, weights, teacher, chunk_size=0)
    (g_plain,) = torch.autograd.grad(plain, student)
    torch.testing.assert_close(chunked, plain)
    torch.testing.assert_close(g_chunked, g_plain)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("scale", [True, False])
@pytest.mark.parametrize("with_labels", [True, False])
@pytest.mark.parametrize("chunk_size", [0, 3])
def test_fused_forward_kl_and_ce_equals_the_generic_path(temperature, scale, with_labels, chunk_size):
    from hf_distill.losses.logits import chunked_weighted_sums, fused_forward_kl_and_ce, hard_label_loss, soft_label_loss

    torch.manual_seed(1)
    student = (3 * torch.randn(10, 7)).requires_grad_()
    teacher = 3 * torch.randn(10, 7)
    labels = torch.randint(0, 7, (10,))
    labels[[2, 5]] = -100
    weights = torch.tensor([1.0, 0.5, 0, 1, 1, 2, 0, 1, 1, 1])
    coefficients = (0.3, 0.7) if with_labels else (1.0, 0.0)

    def rows(x, t, *y):
        soft = soft_label_loss(x, t, temperature=temperature, scale_by_temperature_squared=scale)
        hard = hard_label_loss(x, y[0]) if y else torch.zeros_like(soft)
        return torch.stack([soft, hard])

    targets = (teacher, labels) if with_labels else (teacher,)
    expected, expected_sums = chunked_weighted_sums(rows, coefficients, student, weights, *targets, chunk_size=0)
    (expected_grad,) = torch.autograd.grad(expected * 1.7, student)
    got, got_sums = fused_forward_kl_and_ce(student, teacher, labels if with_labels else None, weights, coefficients,
                                            temperature=temperature, scale_by_temperature_squared=scale,
                                            chunk_size=chunk_size)
    (got_grad,) = torch.autograd.grad(got * 1.7, student)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_sums[: 2 if with_labels else 1], expected_sums[: 2 if with_labels else 1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_grad, expected_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("with_labels", [True, False])
@pytest.mark.parametrize("chunk_size", [0, 3])
@pytest.mark.parametrize("top_k", [3, 7])  # 7 = the whole vocabulary: the tail bins are empty and clamped
def test_fused_forward_kl_and_ce_with_a_topk_teacher_equals_the_generic_path(temperature, with_labels, chunk_size, top_k):
    from hf_distill.losses.logits import chunked_weighted_sums, fused_forward_kl_and_ce, hard_label_loss, topk_soft_label_loss

    torch.manual_seed(2)
    student = (3 * torch.randn(10, 7)).requires_grad_()
    log_probs, indices = torch.log_softmax(3 * torch.randn(10, 7) / temperature, -1).topk(top_k, dim=-1)
    log_probs[4] = -1e4  # a padded row, as the collator writes it (weight 0 below)
    labels = torch.randint(0, 7, (10,))
    labels[[2, 5]] = -100
    weights = torch.tensor([1.0, 0.5, 0, 1, 0, 2, 0, 1, 1, 1])
    coefficients = (0.3, 0.7) if with_labels else (1.0, 0.0)

    def rows(x, lp, ix, *y):
        soft = topk_soft_label_loss(x, lp, ix, temperature=temperature)
        hard = hard_label_loss(x, y[0]) if y else torch.zeros_like(soft)
        return torch.stack([soft, hard])

    targets = (log_probs, indices) + ((labels,) if with_labels else ())
    expected, expected_sums = chunked_weighted_sums(rows, coefficients, student, weights, *targets, chunk_size=0)
    (expected_grad,) = torch.autograd.grad(expected * 1.7, student)
    got, got_sums = fused_forward_kl_and_ce(student, (log_probs, indices), labels if with_labels else None, weights,
                                            coefficients, temperature=temperature, chunk_size=chunk_size)
    (got_grad,) = torch.autograd.grad(got * 1.7, student)
    n = 2 if with_labels else 1
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_sums[:n], expected_sums[:n], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_grad, expected_grad, rtol=1e-5, atol=1e-6)


def test_fused_forward_kl_is_zero_for_identical_logits_and_handles_masked_teacher_logits():
    from hf_distill.losses.logits import fused_forward_kl_and_ce, soft_label_loss

    torch.manual_seed(3)
    logits = 5 * torch.randn(6, 11)
    weights = torch.ones(6)
    zero, _ = fused_forward_kl_and_ce(logits.clone().requires_grad_(), logits, None, weights, (1.0, 0.0), temperature=2.0)
    assert abs(zero.item()) < 1e-5
    teacher = 5 * torch.randn(6, 11)
    teacher[:, :3] = float("-inf")  # tokens a teacher masks out: p = 0 there, KL stays finite
    student = (5 * torch.randn(6, 11)).requires_grad_()
    got, _ = fused_forward_kl_and_ce(student, teacher, None, weights, (1.0, 0.0))
    expected = soft_label_loss(student, teacher).sum()
    torch.testing.assert_close(got, expected)
    (grad,) = torch.autograd.grad(got, student)
    torch.testing.assert_close(grad, torch.softmax(student, -1) - torch.softmax(teacher, -1))


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_fused_loss_with_a_bf16_teacher_rounds_it_once_like_the_generic_path(temperature):
    from hf_distill.losses.logits import chunked_weighted_sums, fused_forward_kl_and_ce, hard_label_loss, soft_label_loss

    torch.manual_seed(4)
    student = (4 * torch.randn(12, 50)).requires_grad_()
    teacher = (4 * torch.randn(12, 50)).bfloat16()
    labels, weights = torch.randint(0, 50, (12,)), torch.ones(12)

    def rows(x, t, y):
        return torch.stack([soft_label_loss(x, t, temperature=temperature), hard_label_loss(x, y)])

    expected, _ = chunked_weighted_sums(rows, (0.5, 0.5), student, weights, teacher, labels, chunk_size=0)
    (expected_grad,) = torch.autograd.grad(expected, student)
    got, _ = fused_forward_kl_and_ce(student, teacher, labels, weights, (0.5, 0.5), temperature=temperature, chunk_size=5)
    (got_grad,) = torch.autograd.grad(got, student)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_grad, expected_grad, rtol=1e-5, atol=1e-6)


def test_fused_cross_entropy_ignores_rows_whatever_their_first_logit():
    from hf_distill.losses.logits import fused_forward_kl_and_ce, hard_label_loss

    torch.manual_seed(5)
    student, teacher = 3 * torch.randn(6, 9), 3 * torch.randn(6, 9)
    student[:, 0] = teacher[:, 0] = float("-inf")  # a masked token: ignored rows must not read it as a label
    labels = torch.tensor([1, -100, 2, -100, 3, 4])
    _, sums = fused_forward_kl_and_ce(student.requires_grad_(), teacher, labels, torch.ones(6), (0.5, 0.5))
    assert torch.isfinite(sums).all()
    torch.testing.assert_close(sums[1], hard_label_loss(student, labels).sum())
