"""Layer-map strategies, their range checks, width checks and the projection heads."""

from __future__ import annotations

import pytest
import torch

from hf_distill.layer_map import (
    FeatureProjections,
    check_widths,
    parse_layer_map_spec,
    resolve_attention_layer_map,
    resolve_layer_map,
)

EXPECTED = {
    # (student layers, teacher layers): {strategy: map}
    (6, 12): {
        "uniform": {1: 2, 2: 4, 3: 6, 4: 8, 5: 10, 6: 12},
        "last": {1: 7, 2: 8, 3: 9, 4: 10, 5: 11, 6: 12},
        "skip": {1: 2, 2: 4, 3: 6, 4: 8, 5: 10, 6: 12},
    },
    (4, 12): {
        "uniform": {1: 3, 2: 6, 3: 9, 4: 12},
        "last": {1: 9, 2: 10, 3: 11, 4: 12},
        "skip": {1: 3, 2: 6, 3: 9, 4: 12},
    },
    (4, 6): {
        "uniform": {1: 2, 2: 3, 3: 5, 4: 6},  # 1.5 -> 2, 3, 4.5 -> 5, 6
        "last": {1: 3, 2: 4, 3: 5, 4: 6},
        "skip": {1: 1, 2: 2, 3: 3, 4: 4},  # step 6 // 4 = 1
    },
    (2, 5): {
        "uniform": {1: 3, 2: 5},  # 2.5 -> 3, 5
        "last": {1: 4, 2: 5},
        "skip": {1: 2, 2: 4},  # step 5 // 2 = 2
    },
}


@pytest.mark.parametrize("counts", list(EXPECTED))
@pytest.mark.parametrize("strategy", ["uniform", "last", "skip"])
def test_strategies(counts, strategy):
    student, teacher = counts
    assert resolve_layer_map(strategy, student, teacher) == EXPECTED[counts][strategy]
    with_embeddings = resolve_layer_map(strategy.upper(), student, teacher, include_embeddings=True)
    assert with_embeddings == {0: 0, **EXPECTED[counts][strategy]}
    assert list(with_embeddings) == sorted(with_embeddings)
    # attention indices are the same pairs, one lower (no embedding entry)
    attention = resolve_attention_layer_map(strategy, student, teacher)
    assert attention == {s - 1: t - 1 for s, t in EXPECTED[counts][strategy].items()}


def test_strategy_options_and_student_deeper_than_teacher():
    assert resolve_layer_map("last", 6, 12, num_layers=2) == {5: 11, 6: 12}
    assert resolve_layer_map("skip", 4, 12, step=2) == {1: 2, 2: 4, 3: 6, 4: 8}
    assert resolve_layer_map("uniform", 12, 12) == {i: i for i in range(1, 13)}
    assert resolve_layer_map("uniform", 6, 3) == {1: 1, 2: 1, 3: 2, 4: 2, 5: 3, 6: 3}
    with pytest.raises(ValueError, match="num_layers"):
        resolve_layer_map("last", 6, 12, num_layers=7)
    with pytest.raises(ValueError, match="'skip'"):
        resolve_layer_map("skip", 6, 3)
    with pytest.raises(ValueError, match="'skip'"):
        resolve_layer_map("skip", 4, 12, step=4)


def test_explicit_maps():
    assert resolve_layer_map({2: 12, 1: 6}, 2, 12) == {1: 6, 2: 12}
    assert resolve_layer_map('{"1": 3, "0": 0}', 2, 4) == {0: 0, 1: 3}
    assert resolve_layer_map({"1": "3"}, 2, 4, include_embeddings=True) == {1: 3}  # explicit maps are taken as given
    assert resolve_attention_layer_map('{"0": 5}', 2, 6) == {0: 5}
    assert resolve_attention_layer_map({1: 0}, 2, 6) == {1: 0}


@pytest.mark.parametrize(
    "spec,match",
    [
        ({7: 12}, r"student hidden-state index 7 is out of range: valid indices are 0\.\.6"),
        ({1: 13}, r"teacher hidden-state index 13 is out of range: valid indices are 0\.\.12"),
        ('{"-1": 2}', r"student hidden-state index -1"),
        ("{}", "empty"),
        ('{"1": 2', "not valid JSON"),
        ({"a": 1}, "integers"),
        ("pkd", "unknown layer-map strategy 'pkd'"),
    ],
)
def test_bad_maps(spec, match):
    with pytest.raises(ValueError, match=match):
        resolve_layer_map(spec, 6, 12)


@pytest.mark.parametrize(
    "spec,expected",
    [("uniform", ("uniform", None)), ("Last", ("last", None)), ("last:1", ("last", 1)), ("skip:3", ("skip", 3)),
     ('{"2": 4}', ('{"2": 4}', None)), ({1: 3}, ({1: 3}, None))],
)
def test_layer_map_spec_syntax_is_read_without_models(spec, expected):
    assert parse_layer_map_spec(spec) == expected


@pytest.mark.parametrize(
    "spec,match",
    [("bogus", "'bogus' is not a layer map; accepted: uniform, last, last:N"), ("uniform:2", "not a layer map"),
     ("last:0", "positive integer"), ("skip:x", "positive integer"), ("{}", "non-empty"),
     ('{"1": -2}', "indices >= 0"), ('{"1": 2', "not valid JSON"), (3, "string or a dict")],
)
def test_bad_layer_map_specs_name_the_flag(spec, match):
    with pytest.raises(ValueError, match=match) as error:
        parse_layer_map_spec(spec, flag="--hidden_layer_map")
    assert "--hidden_layer_map" in str(error.value)


def test_bad_attention_maps_and_counts():
    with pytest.raises(ValueError, match=r"student attention index 6 is out of range: valid indices are 0\.\.5"):
        resolve_attention_layer_map({6: 0}, 6, 12)
    with pytest.raises(ValueError, match=r"teacher attention index 12 .* 0\.\.11"):
        resolve_attention_layer_map('{"0": 12}', 6, 12)
    with pytest.raises(ValueError, match="layer counts"):
        resolve_layer_map("uniform", 0, 12)
    with pytest.raises(ValueError, match="strategy name or a dict"):
        resolve_layer_map(3, 6, 12)


def test_check_widths():
    assert check_widths(128, 128, use_projection=False) is False
    assert check_widths(64, 128, use_projection=True) is True
    with pytest.raises(ValueError, match="student width 64 differs from teacher width 128 and projections are disabled"):
        check_widths(64, 128, use_projection=False)


@pytest.mark.parametrize("shared", [False, True])
def test_projections_forward_save_load(tmp_path, shared):
    torch.manual_seed(0)
    projections = FeatureProjections(8, 16, layers=[0, 2, 4], shared=shared)
    hidden = torch.randn(2, 3, 8)
    out = projections(hidden, 2)
    assert out.shape == (2, 3, 16)
    assert len(list(projections.parameters())) == (2 if shared else 6)
    if shared:
        assert torch.equal(projections(hidden, 0), out)
    with pytest.raises(KeyError, match="mapped layers are"):
        projections(hidden, 1)

    path = tmp_path / "distillation" / "projections.safetensors"
    projections.save(path)
    loaded = FeatureProjections.load(path)
    assert (loaded.layers, loaded.shared, loaded.student_width, loaded.teacher_width) == ([0, 2, 4], shared, 8, 16)
    for layer in (0, 2, 4):
        assert torch.equal(loaded(hidden, layer), projections(hidden, layer))


def test_projections_identity_when_widths_equal_and_bad_file(tmp_path):
    projections = FeatureProjections(8, 8, layers=[1], bias=False)
    hidden = torch.randn(2, 3, 8)
    assert torch.equal(projections(hidden, 1), hidden)
    with pytest.raises(ValueError, match="at least one layer"):
        FeatureProjections(8, 8, layers=[])

    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(1)}, str(other))
    with pytest.raises(ValueError, match="not a FeatureProjections file"):
        FeatureProjections.load(other)
