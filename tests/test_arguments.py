"""DistillationArguments: what is checked when the arguments are built, and the tables other modules read."""

from __future__ import annotations

import pytest
import torch

from hf_distill import DistillationArguments
from hf_distill.arguments import TEACHER_DTYPES


@pytest.mark.parametrize("flag", ["hidden_layer_map", "attention_layer_map"])
def test_layer_map_syntax_is_checked_when_the_arguments_are_built(tmp_path, flag):
    for spec in ("bogus", "last:zero", "uniform:3", '{"1": "x"}', "{}"):
        with pytest.raises(ValueError, match=f"--{flag}"):
            DistillationArguments(output_dir=str(tmp_path), report_to=[], **{flag: spec})
    for spec in ("uniform", "last", "last:1", "skip:2", '{"0": 0, "2": 4}'):  # valid before the models are known
        assert getattr(DistillationArguments(output_dir=str(tmp_path), report_to=[], **{flag: spec}), flag) == spec


def test_teacher_dtypes_is_the_one_table_of_names_and_dtypes(tmp_path):
    assert TEACHER_DTYPES == {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16,
                              "float16": torch.float16}
    assert [TEACHER_DTYPES[name].itemsize for name in ("float32", "bfloat16", "float16")] == [4, 2, 2]
    for name in TEACHER_DTYPES:
        assert DistillationArguments(output_dir=str(tmp_path), report_to=[], teacher_dtype=name).teacher_dtype == name
    with pytest.raises(ValueError, match="--teacher_dtype"):
        DistillationArguments(output_dir=str(tmp_path), report_to=[], teacher_dtype="int8")


def test_fused_lm_loss_takes_boolean_spellings(tmp_path):
    from transformers import HfArgumentParser

    for given, expected in ((False, "false"), (True, "true"), ("True", "true"), ("FALSE", "false"), ("auto", "auto")):
        assert DistillationArguments(output_dir=str(tmp_path), fused_lm_loss=given).fused_lm_loss == expected
    (args,) = HfArgumentParser(DistillationArguments).parse_args_into_dataclasses(
        args=["--output_dir", str(tmp_path), "--fused_lm_loss", "False"])
    assert args.fused_lm_loss == "false"
    with pytest.raises(ValueError, match="--fused_lm_loss"):
        DistillationArguments(output_dir=str(tmp_path), fused_lm_loss="sometimes")


def test_a_divergence_setting_the_chosen_loss_does_not_read_is_warned_about(tmp_path):
    import warnings

    with pytest.warns(UserWarning, match="--jsd_beta 0.3 is read only by --distillation_loss jsd"):
        DistillationArguments(output_dir=str(tmp_path), jsd_beta=0.3)
    with pytest.warns(UserWarning, match="--skew_lambda 0.3"):
        DistillationArguments(output_dir=str(tmp_path), skew_lambda=0.3, distillation_loss="jsd")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DistillationArguments(output_dir=str(tmp_path), jsd_beta=0.3, distillation_loss="jsd")
        DistillationArguments(output_dir=str(tmp_path), skew_lambda=0.3, distillation_loss="skew_reverse_kl")
