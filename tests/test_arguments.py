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
