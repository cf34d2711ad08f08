"""The fused-linear loss (hidden states + lm_head) against the current path (the models' full logits + logits.py).

Per family a tiny random student and a wider teacher share a vocabulary; the reference runs the models' own
forward (``model(...).logits``, post-processing included) and the existing chunked / fused losses of
``hf_distill.losses.logits`` on those logits, and takes gradients by autograd through the model's ``lm_head``.
"""

from __future__ import annotations

import functools
import types

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import hf_distill.losses.logits as logits_module
from hf_distill.losses.fused_linear import (
    LogitPostprocessing,
    chunk_logits,
    fused_linear_distillation_loss,
    logit_postprocessing,
)
from hf_distill.losses.logits import (
    chunked_weighted_sums,
    fused_forward_kl_and_ce,
    hard_label_loss,
    soft_label_loss,
    topk_soft_label_loss,
)

VOCAB, BATCH, LENGTH = 97, 3, 9
LLAMA_LIKE = dict(vocab_size=VOCAB, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _llama_like(config_cls, model_cls, **extra):
    return lambda hidden: model_cls(config_cls(hidden_size=hidden, **LLAMA_LIKE, **extra))


def _qwen2_with_bias(hidden):
    model = Qwen2ForCausalLM(Qwen2Config(hidden_size=hidden, tie_word_embeddings=False, **LLAMA_LIKE))
    model.lm_head = torch.nn.Linear(hidden, VOCAB, bias=True)  # a head with a bias: the forward adds it
    return model


def _gpt2_tied(hidden):
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=hidden, n_layer=2, n_head=4, n_positions=64,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True))


FAMILIES = {
    "llama": _llama_like(LlamaConfig, LlamaForCausalLM),
    "qwen2_bias": _qwen2_with_bias,
    "gpt2_tied": _gpt2_tied,
    "gemma2_softcap": _llama_like(Gemma2Config, Gemma2ForCausalLM, head_dim=8, final_logit_softcapping=2.0),
    "cohere_logit_scale": _llama_like(CohereConfig, CohereForCausalLM, logit_scale=0.3),
    "granite_logits_scaling": _llama_like(GraniteConfig, GraniteForCausalLM, logits_scaling=0.4),
}
POSTPROCESSED = ("gemma2_softcap", "cohere_logit_scale", "granite_logits_scaling")
LOSSES = ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd", "mse"]


def _run(model, ids, mask, leaf: bool):
    """(model(ids).logits, the lm_head input): with ``leaf`` the input is swapped for a leaf that requires grad."""
    seen = {}

    def pre_hook(_module, args):
        hidden = args[0].detach().requires_grad_(True) if leaf else args[0].detach()
        seen["hidden"] = hidden
        return (hidden,) + tuple(args[1:])

    handle = model.get_output_embeddings().register_forward_pre_hook(pre_hook)
    try:
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    finally:
        handle.remove()
    return logits, seen["hidden"]


@functools.lru_cache(maxsize=None)
def _family(name):
    """Student (hidden 32), teacher (hidden 48, same family), inputs, loss positions, labels and row weights."""
    torch.manual_seed(0)
    student, teacher = FAMILIES[name](32).eval(), FAMILIES[name](48).eval()
    for model in (student, teacher):
        for p in model.parameters():  # random small weights give flat distributions: widen them
            torch.nn.init.normal_(p, std=0.3) if p.dim() > 1 else None
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (BATCH, LENGTH), generator=g)
    mask = torch.zeros(BATCH, LENGTH, dtype=torch.bool)
    mask[:, 3:-1] = True  # completion positions
    mask[2, 5:] = False
    labels = ids[:, 1:][mask[:, :-1]]
    labels[::4] = -100
    weights = torch.rand(labels.shape[0], generator=g) + 0.5
    weights[1] = 0.0
    return student, teacher, ids, mask, labels, weights


def _head(model):
    head = model.get_output_embeddings()
    return head.weight, head.bias


def _reference(name, options, coefficients, topk=None):
    """Current path: full logits from both models, chunked_weighted_sums over soft/hard_label_loss; autograd grads."""
    student, teacher, ids, mask, labels, weights = _family(name)
    with torch.no_grad():
        teacher_rows = teacher(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[mask]
    logits, leaf = _run(student, ids, mask, leaf=True)
    rows = logits[mask]
    targets = (teacher_rows,) if topk is None else _topk(teacher_rows, options["temperature"], topk)
    soft_fn = soft_label_loss if topk is None else topk_soft_label_loss

    def row_losses(x, *rest):
        soft = soft_fn(x, *rest[:-1], **options)
        return torch.stack([soft, hard_label_loss(x, rest[-1])])

    total, sums = chunked_weighted_sums(row_losses, coefficients, rows, weights, *targets, labels, chunk_size=4)
    weight, bias = _head(student)
    wrt = [leaf, weight] + ([bias] if bias is not None else [])
    grads = torch.autograd.grad(total, wrt)
    return total.detach(), sums, [grads[0][mask]] + list(grads[1:])


def _topk(teacher_rows, temperature, k=5):
    values, ids = F.log_softmax(teacher_rows / temperature, dim=-1).topk(k, dim=-1)
    return values, ids


def _fused(name, options, coefficients, topk=None, chunk_size=5, **overrides):
    """The fused path on the same rows: hidden states at the loss positions and the lm_head weights."""
    student, teacher, ids, mask, labels, weights = _family(name)
    with torch.no_grad():
        teacher_logits, teacher_hidden = _run(teacher, ids, mask, leaf=False)
        _, student_hidden = _run(student, ids, mask, leaf=False)
    hidden = student_hidden[mask].clone().requires_grad_(True)
    weight, bias = _head(student)
    teacher_side = dict(teacher_hidden=teacher_hidden[mask], teacher_weight=_head(teacher)[0],
                        teacher_bias=_head(teacher)[1], teacher_post=logit_postprocessing(teacher.config))
    if topk is not None:
        teacher_side = dict(teacher_topk=_topk(teacher_logits[mask], options["temperature"], topk))
    kwargs = dict(student_bias=bias, student_post=logit_postprocessing(student.config), **teacher_side,
                  **options, chunk_size=chunk_size)
    labels = overrides.pop("labels", labels)
    kwargs.update(overrides)
    total, sums = fused_linear_distillation_loss(hidden, weight, labels, weights, coefficients, **kwargs)
    wrt = [hidden, weight] + ([bias] if bias is not None else [])
    return total.detach(), sums, list(torch.autograd.grad(total, wrt))


def _assert_same(fused, reference):
    (total, sums, grads), (ref_total, ref_sums, ref_grads) = fused, reference
    torch.testing.assert_close(total, ref_total, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sums, ref_sums, atol=1e-5, rtol=1e-5)
    assert len(grads) == len(ref_grads)
    for got, want in zip(grads, ref_grads):
        assert want.abs().max() > 1e-3  # the gradient is not trivially zero
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_chunk_logits_equal_the_models_logits(name):
    student, _teacher, ids, mask, _labels, _weights = _family(name)
    with torch.no_grad():
        logits, hidden = _run(student, ids, mask, leaf=False)
    weight, bias = _head(student)
    with torch.no_grad():
        fused = chunk_logits(hidden[mask][:7], weight, bias, logit_postprocessing(student.config))
    torch.testing.assert_close(fused, logits[mask][:7], atol=1e-5, rtol=1e-5)
    if name in POSTPROCESSED:  # the configs are chosen so that dropping the post-processing is visible
        with torch.no_grad():
            plain = chunk_logits(hidden[mask][:7], weight, bias, LogitPostprocessing())
        assert (plain - logits[mask][:7]).abs().max() > 0.1


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("name", list(FAMILIES))
def test_loss_and_gradients_equal_the_current_path(name, loss):
    options = dict(loss=loss, temperature=2.0, scale_by_temperature_squared=True, jsd_beta=0.3, skew_lambda=0.2)
    coefficients = (0.6, 0.4)
    _assert_same(_fused(name, options, coefficients), _reference(name, options, coefficients))


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"])
@pytest.mark.parametrize("name", ["llama", "gemma2_softcap", "granite_logits_scaling"])
def test_topk_teacher_equals_the_current_path(name, loss):
    options = dict(loss=loss, temperature=1.5, scale_by_temperature_squared=True, jsd_beta=0.5, skew_lambda=0.1)
    _assert_same(_fused(name, options, (0.5, 0.5), topk=5), _reference(name, options, (0.5, 0.5), topk=5))


@pytest.mark.parametrize("name", ["qwen2_bias", "cohere_logit_scale"])
def test_forward_kl_equals_the_trainers_fused_logit_path(name):
    """T = 1, no T² scaling: the same values and gradients as fused_forward_kl_and_ce on the full logits."""
    student, teacher, ids, mask, labels, weights = _family(name)
    with torch.no_grad():
        teacher_rows = teacher(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[mask]
    logits, leaf = _run(student, ids, mask, leaf=True)
    total, sums = fused_forward_kl_and_ce(logits[mask], teacher_rows, labels, weights, (0.3, 0.7),
                                          temperature=1.0, scale_by_temperature_squared=False, chunk_size=4)
    weight, bias = _head(student)
    grads = torch.autograd.grad(total, [leaf, weight] + ([bias] if bias is not None else []))
    reference = (total.detach(), sums, [grads[0][mask], *grads[1:]])
    options = dict(loss="forward_kl", temperature=1.0, scale_by_temperature_squared=False)
    _assert_same(_fused(name, options, (0.3, 0.7)), reference)


def test_result_does_not_depend_on_blocks_or_sub_blocks(monkeypatch):
    options = dict(loss="jsd", temperature=2.0, jsd_beta=0.5)
    reference = _reference("gemma2_softcap", options, (0.5, 0.5))
    _assert_same(_fused("gemma2_softcap", options, (0.5, 0.5), chunk_size=0), reference)
    monkeypatch.setattr(logits_module, "MAX_CHUNK_ELEMENTS", 3 * VOCAB)  # sub-blocks of 3 rows in blocks of 8
    _assert_same(_fused("gemma2_softcap", options, (0.5, 0.5), chunk_size=8), reference)


def test_without_labels_the_hard_term_is_zero():
    options = dict(loss="forward_kl", temperature=2.0)
    with_labels = _fused("llama", options, (1.0, 0.0))
    total, sums, grads = _fused("llama", options, (1.0, 0.0), labels=None)
    assert float(sums[1]) == 0.0
    torch.testing.assert_close(sums[0], with_labels[1][0])
    for got, want in zip(grads, with_labels[2]):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_a_padded_teacher_head_is_sliced_to_the_student_vocabulary():
    """Extra teacher rows (a padded vocabulary) are dropped, as the trainer slices teacher logits."""
    torch.manual_seed(0)
    hidden, weight = torch.randn(6, 8, requires_grad=True), torch.randn(VOCAB, 8)
    teacher_hidden, teacher_weight = torch.randn(6, 12), torch.randn(VOCAB + 11, 12)
    labels, weights = torch.randint(0, VOCAB, (6,)), torch.ones(6)
    total, _ = fused_linear_distillation_loss(hidden, weight, labels, weights, (1.0, 0.0), teacher_hidden=teacher_hidden,
                                              teacher_weight=teacher_weight)
    expected = soft_label_loss(hidden @ weight.T, teacher_hidden @ teacher_weight[:VOCAB].T).sum()
    torch.testing.assert_close(total, expected)


def test_logit_postprocessing_reads_each_familys_fields():
    assert logit_postprocessing(CohereConfig(logit_scale=0.25)) == LogitPostprocessing(scale=0.25)
    assert logit_postprocessing(GraniteConfig(logits_scaling=8.0)) == LogitPostprocessing(divisor=8.0)
    assert logit_postprocessing(Gemma2Config(final_logit_softcapping=30.0)) == LogitPostprocessing(softcap=30.0)
    assert logit_postprocessing(Gemma2Config(final_logit_softcapping=None)) == LogitPostprocessing()
    assert logit_postprocessing(LlamaConfig()) == LogitPostprocessing()
    hyperclovax = types.SimpleNamespace(model_type="hyperclovax", logits_scaling=0.5)  # multiplies (its forward)
    assert logit_postprocessing(hyperclovax) == LogitPostprocessing(scale=0.5)
    z = torch.tensor([[-50.0, 0.0, 3.0]])
    torch.testing.assert_close(LogitPostprocessing(scale=2.0, divisor=4.0, softcap=10.0).apply(z),
                               10.0 * torch.tanh(z * 0.5 / 10.0))


def _small_inputs():
    torch.manual_seed(0)
    return dict(student_hidden=torch.randn(4, 8, requires_grad=True), student_weight=torch.randn(VOCAB, 8),
                labels=torch.randint(0, VOCAB, (4,)), weights=torch.ones(4), coefficients=(0.5, 0.5))


def test_bad_input_heads_on_different_devices():
    args = _small_inputs()
    teacher_weight = torch.empty(VOCAB, 12, device="meta")
    with pytest.raises(ValueError, match="one device"):
        fused_linear_distillation_loss(*args.values(), teacher_hidden=torch.empty(4, 12, device="meta"),
                                       teacher_weight=teacher_weight)


@pytest.mark.parametrize("side", ["student", "teacher"])
def test_bad_input_hidden_size_does_not_match_the_weight(side):
    args = _small_inputs()
    teacher = dict(teacher_hidden=torch.randn(4, 12), teacher_weight=torch.randn(VOCAB, 12))
    if side == "student":
        args["student_hidden"] = torch.randn(4, 9)
    else:
        teacher["teacher_hidden"] = torch.randn(4, 10)
    with pytest.raises(ValueError, match=f"{side}: hidden size .* does not match the lm_head weight"):
        fused_linear_distillation_loss(*args.values(), **teacher)


def test_bad_input_teacher_given_twice_or_not_at_all():
    args = _small_inputs()
    topk = (torch.zeros(4, 3), torch.zeros(4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="exactly one of the two"):
        fused_linear_distillation_loss(*args.values())
    with pytest.raises(ValueError, match="exactly one of the two"):
        fused_linear_distillation_loss(*args.values(), teacher_topk=topk, teacher_hidden=torch.randn(4, 12),
                                       teacher_weight=torch.randn(VOCAB, 12))


def test_values_without_gradients_and_a_second_backward_is_refused():
    torch.manual_seed(0)
    weight, teacher = torch.randn(VOCAB, 8), dict(teacher_hidden=torch.randn(6, 12), teacher_weight=torch.randn(VOCAB, 12))
    hidden, labels, weights = torch.randn(6, 8), torch.randint(0, VOCAB, (6,)), torch.rand(6)
    options = dict(loss="reverse_kl", temperature=2.0)
    with torch.no_grad():
        total, sums = fused_linear_distillation_loss(hidden, weight, labels, weights, (0.5, 0.5), **teacher, **options)
    z_s, z_t = hidden @ weight.T, teacher["teacher_hidden"] @ teacher["teacher_weight"].T
    expected = torch.stack([(soft_label_loss(z_s, z_t, **options) * weights).sum(), (hard_label_loss(z_s, labels) * weights).sum()])
    torch.testing.assert_close(sums, expected)
    torch.testing.assert_close(total, expected.sum() * 0.5)
    leaf = hidden.clone().requires_grad_(True)
    total, _ = fused_linear_distillation_loss(leaf, weight, labels, weights, (0.5, 0.5), **teacher, **options)
    total.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backpropagated twice"):
        total.backward()
