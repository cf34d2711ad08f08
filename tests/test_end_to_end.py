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
        "--export_onnx", "false", "--num_train_epochs", "2",
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
