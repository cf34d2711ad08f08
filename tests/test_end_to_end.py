"""End to end: the classification script distils a trained teacher, and distillation beats hard labels."""

import importlib.util
import json
import sys

from conftest import REPO_ROOT


def _load_script(name):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_distilled_student_beats_the_same_student_on_hard_labels(tmp_path):
    script = _load_script("distill_classification")
    out = tmp_path / "demo"
    results = script.main([
        "--recipe", str(REPO_ROOT / "recipes" / "demo_synthetic.yaml"), "--output_dir", str(out),
        "--export_onnx", "false", "--num_train_epochs", "2", "--measure_speed", "false", "--teacher_train_size", "1200",
    ])
    teacher, distilled, baseline = results["rows"]
    assert teacher["validation accuracy"] >= 0.95, "the teacher must have learned the task"
    # Same student, same steps, same data: soft targets from the teacher beat the noisy hard labels.
    assert distilled["validation accuracy"] > baseline["validation accuracy"] + 0.02
    assert distilled["test accuracy"] > baseline["test accuracy"] + 0.02
    assert distilled["parameters"] < 0.6 * teacher["parameters"]
    # The output folder is a plain from_pretrained student plus the recipe.
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    recipe = json.loads((out / "distillation" / "recipe.json").read_text())
    assert recipe["losses"]["kd"]["weight"] == 0.9
    assert json.loads((out / "results.json").read_text())["rows"][1]["model"].startswith("student")


def test_tinybert_recipe_runs_intermediate_terms_with_projections_and_augmentation(tmp_path):
    script = _load_script("distill_classification")
    out = tmp_path / "tinybert"
    results = script.main([
        "--recipe", str(REPO_ROOT / "recipes" / "tinybert.yaml"), "--output_dir", str(out),
        "--export_onnx", "false", "--num_train_epochs", "1", "--teacher_train_epochs", "1",
        "--max_train_samples", "96", "--augment_factor", "2", "--compare_baseline", "false",
        "--teacher_train_size", "256", "--measure_speed", "false",
    ])
    metrics = results["eval_metrics"]
    assert metrics["eval_loss_hidden"] > 0 and metrics["eval_loss_attention"] > 0
    recipe = json.loads((out / "distillation" / "recipe.json").read_text())
    assert recipe["layer_map"]["hidden_layer_map"] == {"0": 0, "1": 2, "2": 4}
    assert recipe["layer_map"]["projections"] == {"student_width": 32, "teacher_width": 64, "shared": False}
    assert (out / "distillation" / "projections.safetensors").is_file()
    from safetensors.torch import load_file

    assert not any("projection" in key for key in load_file(str(out / "model.safetensors")))
    card = (out / "README.md").read_text()
    assert "knowledge-distillation" in card and str(tmp_path) not in card
