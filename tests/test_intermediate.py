"""Intermediate terms (hidden / attention / relation) read from model outputs; schedules; teacher mixtures."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from hf_distill import DistillationArguments
from hf_distill.intermediate import IntermediateSettings, IntermediateTerms, accumulation_warnings, use_eager_attention
from hf_distill.losses.logits import teacher_mixture_logits
from hf_distill.schedules import scheduled_value
from tiny_models import tiny_bert


def _outputs(model, input_ids, attention_mask):
    return model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, output_attentions=True)


def _eager_pair(student_hidden=16, teacher_hidden=32, student_layers=2, teacher_layers=4):
    student = tiny_bert(layers=student_layers, hidden=student_hidden, seed=1, attn_implementation="eager")
    teacher = tiny_bert(layers=teacher_layers, hidden=teacher_hidden, seed=2, attn_implementation="eager")
    return student.eval(), teacher.eval()


def test_hidden_mse_sum_matches_hand_computation_with_projection():
    student, teacher = _eager_pair()
    terms = IntermediateTerms(IntermediateSettings(hidden_weight=1.0, hidden_layer_map="uniform"), student, teacher)
    assert terms.hidden_map == {0: 0, 1: 2, 2: 4} and terms.projections is not None
    ids = torch.randint(5, 60, (3, 7))
    mask = torch.ones_like(ids)
    s, t = _outputs(student, ids, mask), _outputs(teacher, ids, mask)
    got = terms(s, t, mask)["hidden"]
    expected = 0.0
    for si, ti in {0: 0, 1: 2, 2: 4}.items():
        projected = terms.projections(s.hidden_states[si], si)
        expected = expected + (projected - t.hidden_states[ti]).pow(2).mean(-1).mean(-1)  # [B]
    torch.testing.assert_close(got, (expected / 3).sum())


def test_projection_gradients_flow_and_equal_widths_need_none():
    student, teacher = _eager_pair(student_hidden=32, teacher_hidden=32)
    terms = IntermediateTerms(IntermediateSettings(hidden_weight=1.0), student, teacher)
    assert terms.projections is None  # equal widths: compared directly
    student2, teacher2 = _eager_pair()
    terms2 = IntermediateTerms(IntermediateSettings(hidden_weight=1.0), student2, teacher2)
    ids = torch.randint(5, 60, (2, 6))
    loss = terms2(_outputs(student2, ids, None), _outputs(teacher2, ids, None), None)["hidden"]
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in terms2.projections.parameters())


def test_padding_changes_no_intermediate_term():
    student, teacher = _eager_pair()
    settings = IntermediateSettings(
        hidden_weight=1.0, hidden_loss="cosine", attention_weight=1.0, attention_loss="kl",
        relation_weight=1.0, relation_loss="minilm", relation_heads=4,
    )
    terms = IntermediateTerms(settings, student, teacher)
    ids = torch.randint(5, 60, (1, 6))
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)
    pad_mask = torch.tensor([[1] * 6 + [0] * 3])
    short = terms(_outputs(student, ids, torch.ones_like(ids)), _outputs(teacher, ids, torch.ones_like(ids)), torch.ones_like(ids))
    long = terms(_outputs(student, padded, pad_mask), _outputs(teacher, padded, pad_mask), pad_mask)
    for name in ("hidden", "attention", "relation"):
        torch.testing.assert_close(long[name], short[name], atol=1e-5, rtol=1e-4)


def test_rkd_relation_is_batch_size_times_batch_loss():
    student, teacher = _eager_pair()
    terms = IntermediateTerms(IntermediateSettings(relation_weight=1.0, relation_loss="rkd_distance"), student, teacher)
    ids = torch.randint(5, 60, (4, 5))
    s, t = _outputs(student, ids, None), _outputs(teacher, ids, None)
    from hf_distill.losses.relations import rkd_distance

    expected = 4 * rkd_distance(s.hidden_states[-1].mean(1), t.hidden_states[-1].mean(1))
    torch.testing.assert_close(terms(s, t, None)["relation"], expected)


def test_identical_models_give_zero_terms():
    student = tiny_bert(layers=2, hidden=32, seed=3, attn_implementation="eager").eval()
    settings = IntermediateSettings(hidden_weight=1, attention_weight=1, relation_weight=1, relation_heads=2,
                                    hidden_layer_map="uniform")
    terms = IntermediateTerms(settings, student, student)
    ids = torch.randint(5, 60, (2, 5))
    out = _outputs(student, ids, None)
    for value in terms(out, out, None).values():
        assert abs(float(value.detach())) < 1e-5


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(hidden_weight=1, hidden_projection=False), "projection"),
        (dict(hidden_weight=1, hidden_layer_map='{"1": 9}'), "range"),
        (dict(attention_weight=1, attention_head_mismatch="error"), "heads"),
        (dict(relation_weight=1, relation_heads=5), "relation_heads"),
    ],
)
def test_bad_settings_for_these_models_are_refused_before_training(settings, message):
    student = tiny_bert(layers=2, hidden=16, seed=1)  # 4 heads
    teacher = tiny_bert(layers=4, hidden=32, seed=2, heads=8)
    with pytest.raises(ValueError, match=message):
        IntermediateTerms(IntermediateSettings(**settings), student, teacher)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(hidden_weight=1, hidden_loss="l1"), "--hidden_loss"),
        (dict(hidden_weight=-1), "--hidden_weight"),
        (dict(relation_heads=0), "--relation_heads"),
        (dict(attention_layer_map="every"), "--attention_layer_map 'every' is not a layer map"),
        (dict(hidden_layer_map="last:x"), "positive integer"),
    ],
)
def test_bad_settings_are_refused_when_built_and_in_the_arguments(tmp_path, settings, message):
    with pytest.raises(ValueError, match=message):
        IntermediateSettings(**settings)
    with pytest.raises(ValueError, match=message):
        DistillationArguments(output_dir=str(tmp_path), report_to=[], **settings)


def test_settings_are_generated_from_the_arguments_fields():
    prefixed = {f.name: f for f in dataclasses.fields(DistillationArguments)
                if f.name.split("_")[0] in ("hidden", "attention", "relation")}
    own = {f.name: f for f in dataclasses.fields(IntermediateSettings)}
    assert set(own) == set(prefixed) and len(own) == 14
    for name, f in own.items():
        assert f.default == prefixed[name].default, name
        assert f.metadata["help"] == prefixed[name].metadata["help"], name  # one declaration, help included
    args = DistillationArguments(output_dir="unused", report_to=[], hidden_weight=0.5, relation_loss="rkd_angle")
    settings = IntermediateSettings.from_args(args)
    assert (settings.hidden_weight, settings.relation_loss, settings.active) == (0.5, "rkd_angle", {"hidden": 0.5})


def test_rkd_with_accumulation_is_warned_about_and_minilm_is_not(tmp_path):
    def warnings(**kwargs):
        return accumulation_warnings(DistillationArguments(output_dir=str(tmp_path), report_to=[], **kwargs))

    rkd = dict(relation_weight=1.0, relation_loss="rkd_distance")
    (message,) = warnings(**rkd, gradient_accumulation_steps=2, per_device_train_batch_size=4)
    assert "--relation_loss rkd_distance" in message and "--gradient_accumulation_steps 2" in message
    assert "(4 per process)" in message
    assert len(warnings(relation_weight=1.0, relation_loss="rkd_angle", gradient_accumulation_steps=4)) == 1
    assert warnings(**rkd) == []  # no accumulation: exact
    assert warnings(relation_weight=1.0, relation_loss="minilm", gradient_accumulation_steps=2) == []
    assert warnings(relation_weight=0.0, relation_loss="rkd_angle", gradient_accumulation_steps=2) == []  # term off


def test_use_eager_attention_switches_sdpa_models():
    model = tiny_bert(attn_implementation="sdpa")
    changed = use_eager_attention(model)
    assert changed and model.config._attn_implementation == "eager"
    assert use_eager_attention(model) == []
    out = model(input_ids=torch.randint(5, 60, (1, 4)), output_attentions=True)
    assert out.attentions[0] is not None


def test_schedules_hit_their_end_points():
    assert scheduled_value("constant", 4.0, 1.0, 0.7) == 4.0
    assert scheduled_value("linear", 4.0, 1.0, 0.5) == pytest.approx(2.5)
    assert scheduled_value("cosine", 4.0, 1.0, 0.0) == pytest.approx(4.0)
    assert scheduled_value("cosine", 4.0, 1.0, 0.5) == pytest.approx(2.5)
    assert scheduled_value("cosine", 4.0, 1.0, 1.0) == pytest.approx(1.0)
    assert scheduled_value("linear", 4.0, 1.0, 3.0) == pytest.approx(1.0)  # clamped
    with pytest.raises(ValueError, match="schedule"):
        scheduled_value("step", 1, 0, 0.5)


def test_teacher_mixture_softens_to_the_weighted_average():
    torch.manual_seed(0)
    a, b = torch.randn(3, 5), torch.randn(3, 5)
    T = 2.0
    mixed = teacher_mixture_logits([a, b], [0.25, 0.75], T)
    expected = 0.25 * torch.softmax(a / T, -1) + 0.75 * torch.softmax(b / T, -1)
    torch.testing.assert_close(torch.softmax(mixed / T, -1), expected)
    torch.testing.assert_close(torch.softmax(teacher_mixture_logits([a], [1.0], T) / T, -1), torch.softmax(a / T, -1))
    assert math.isfinite(float(mixed.sum()))


def test_last_and_skip_counts_in_the_layer_map_string():
    student, teacher = _eager_pair()
    last1 = IntermediateTerms(IntermediateSettings(hidden_weight=1, hidden_layer_map="last:1",
                                                   hidden_include_embeddings=False), student, teacher)
    assert last1.hidden_map == {2: 4}
    skip = IntermediateTerms(IntermediateSettings(attention_weight=1, attention_layer_map="skip:2"), student, teacher)
    assert skip.attention_map == {0: 1, 1: 3}


def test_last_n_maps_the_last_layers_only_whatever_the_embeddings_flag():
    student, teacher = _eager_pair()  # 2 student layers, 4 teacher layers
    for include in (True, False):  # True is the default
        def hidden_map(spec):
            settings = IntermediateSettings(hidden_weight=1, hidden_layer_map=spec, hidden_include_embeddings=include)
            return IntermediateTerms(settings, student, teacher).hidden_map

        assert hidden_map("last:1") == {2: 4}
        assert hidden_map("last:2") == {1: 3, 2: 4}
        assert hidden_map("last") == {1: 3, 2: 4}
    with_embeddings = IntermediateSettings(hidden_weight=1, hidden_layer_map="uniform")
    assert IntermediateTerms(with_embeddings, student, teacher).hidden_map == {0: 0, 1: 2, 2: 4}  # uniform still adds 0
