"""Model cards: every field renders, the YAML header parses, and no token or local path leaks."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hub_stub import LEAKED_TOKEN, make_run_folder  # noqa: E402

from huggingface_hub import ModelCard  # noqa: E402

from hf_distill.cards import is_hub_id, render_model_card, scrub, write_model_card  # noqa: E402

ABSOLUTE_PATH = re.compile(r"(?<![\w.:/\\~-])(?:~|[A-Za-z]:)?[/\\](?:home|root|tmp|data|var|Users|private)\b")


def _header(text: str) -> dict:
    match = re.match(r"^---\n(.*?)\n---\n", text, flags=re.DOTALL)
    assert match, "the card has no YAML header"
    return yaml.safe_load(match.group(1))


def _assert_clean(text: str, run: Path) -> None:
    assert LEAKED_TOKEN not in text
    assert not re.search(r"hf_[A-Za-z0-9]{16,}", text)
    assert str(run) not in text and str(Path.home()) + "/" not in text
    assert not ABSOLUTE_PATH.search(text), ABSOLUTE_PATH.search(text)


@pytest.fixture
def run(tmp_path: Path) -> Path:
    return make_run_folder(tmp_path / "sst2-student")


def test_card_renders_every_field(run: Path) -> None:
    text = str(render_model_card(run))
    header = _header(text)
    assert header["base_model"] == "google-bert/bert-base-uncased"
    assert {"distillation", "knowledge-distillation", "hf_distill"} <= set(header["tags"])
    assert header["datasets"] == ["stanfordnlp/sst2"]  # the local dataset is named in the body only
    assert header["pipeline_tag"] == "text-classification"
    (entry,) = header["model-index"]
    assert entry["name"] == "sst2-student"
    (result,) = entry["results"]
    assert result["task"]["type"] == "text-classification"
    assert result["dataset"]["type"] == "stanfordnlp/sst2"
    metrics = {metric["type"]: metric["value"] for metric in result["metrics"]}
    assert metrics == {"accuracy": 0.874, "teacher_accuracy": 0.912, "teacher_agreement": 0.93, "int8_accuracy": 0.871}

    body = text.split("\n---\n", 1)[1]
    for expected in ("| kd | `loss_kd` | 0.7 | divergence=forward_kl, temperature=4 |", "| ce | `loss_ce` | 0.3 |",
                     "| hidden | `loss_hidden` | 1.5 | loss=mse, projection=linear |", "**Temperature:** 4",
                     "**Divergence:** forward_kl", "**Alpha (KD share of KD + CE weights):** 0.7",
                     "| hidden | 0 → 1, 1 → 3, 2 → 5 |", "`kd_temperature` | 4", "`learning_rate` | 5e-05",
                     "## Training data", "(https://huggingface.co/datasets/stanfordnlp/sst2)",
                     "`extra_sst2.jsonl` (local data)",
                     "| student int8 (ONNX) | 0.871 | 4.6 |  | 1.2 / 1.4 | 21 / 23 |",
                     "![Accuracy against latency", "(report.png)", "2 CPU threads", "## Intended use and limitations",
                     "34.2× faster than the teacher", "arXiv:1503.02531", "arXiv:1910.01108", "TinyBERT",
                     "The `onnx/` folder", "25.0× more than the student"):
        assert expected in body, expected
    for absent in ("Patient Knowledge", "MiniLM", "On-Policy Distillation", "DistiLLM"):
        assert absent not in body


def test_card_has_no_token_and_no_absolute_path(run: Path) -> None:
    recipe = json.loads((run / "distillation" / "recipe.json").read_text())
    assert LEAKED_TOKEN in json.dumps(recipe) and str(Path.home()) in json.dumps(recipe)
    text = str(render_model_card(run))
    _assert_clean(text, run)
    assert "hub_token" not in text
    assert "`max_new_tokens` | 32" in text  # a number under a "token" key is a hyperparameter, not a secret
    assert "`logging_dir` | sst2" in text and "tiny-init" not in text


def test_local_teacher_is_never_base_model(run: Path, tmp_path: Path) -> None:
    teacher_dir = tmp_path / "my-local-teacher"
    teacher_dir.mkdir()
    recipe = json.loads((run / "distillation" / "recipe.json").read_text())
    for name in (str(teacher_dir), "~/models/bert-teacher", "./teacher"):
        recipe["teacher"]["name_or_path"] = name
        text = str(render_model_card(run, recipe=recipe))
        assert "base_model" not in _header(text)
        assert "(a local model)" in text
        _assert_clean(text, run)


@pytest.mark.parametrize(
    ("losses", "cited", "not_cited"),
    [
        ({"kd": {"weight": 1.0}, "pkd": {"weight": 1.0}}, ["Patient Knowledge"], ["TinyBERT", "MiniLM"]),
        ({"kd": {"weight": 1.0}, "relation": {"weight": 1.0, "type": "minilm"}}, ["MiniLM"], ["TinyBERT"]),
        ({"kd": {"weight": 1.0, "divergence": "jsd"}}, ["On-Policy Distillation"], ["DistiLLM", "TinyBERT"]),
        ({"kd": {"weight": 1.0, "divergence": "skew_reverse_kl"}}, ["DistiLLM"], ["On-Policy", "TinyBERT"]),
        ({"kd": {"weight": 1.0}, "attention": {"weight": 1.0}}, ["TinyBERT"], ["MiniLM", "DistiLLM"]),
    ],
)
def test_citations_follow_the_losses(tmp_path: Path, losses: dict, cited: list[str], not_cited: list[str]) -> None:
    text = str(render_model_card(tmp_path, recipe={"task": "causal-lm", "losses": losses}, eval_results={}, report={}))
    assert "Hinton" in text and "Sanh" in text
    for name in cited:
        assert name in text
    for name in not_cited:
        assert name not in text


def test_write_model_card_round_trips(run: Path) -> None:
    path = write_model_card(run, model_name="me/sst2-student", license="apache-2.0")
    assert path == run / "README.md"
    card = ModelCard.load(path)
    assert card.data.base_model == "google-bert/bert-base-uncased"
    assert card.data.license == "apache-2.0"
    assert card.data.model_name == "me/sst2-student"
    metric_types = {result.metric_type for result in card.data.eval_results}
    assert metric_types >= {"accuracy", "teacher_accuracy", "int8_accuracy"}
    assert 'model="me/sst2-student"' in card.text


def test_bare_folder_renders_without_results(tmp_path: Path) -> None:
    text = str(render_model_card(tmp_path))
    header = _header(text)
    assert "model-index" not in header and "base_model" not in header
    assert "distillation" in header["tags"]
    assert "recipe (`distillation/recipe.json`) was not available" in text
    assert "No evaluation results were available" in text


def test_bad_inputs(tmp_path: Path) -> None:
    (tmp_path / "distillation").mkdir()
    (tmp_path / "distillation" / "recipe.json").write_text("{not json")
    with pytest.raises(ValueError, match="recipe.json .* not valid JSON"):
        render_model_card(tmp_path)
    with pytest.raises(FileNotFoundError, match="template not found"):
        render_model_card(tmp_path, recipe={}, template_path=tmp_path / "missing.md")


def test_scrub_and_hub_ids() -> None:
    cleaned = scrub({"hub_token": "hf_" + "x" * 34, "token_count": 3, "url": "https://huggingface.co/a/b",
                     "paths": ["/home/me/data/train.csv", "~/x/y", "C:\\Users\\me\\m.bin", "rel/dir"],
                     "text": "saved to /tmp/run/out and ~/cache"})
    assert cleaned == {"token_count": 3, "url": "https://huggingface.co/a/b",
                       "paths": ["train.csv", "y", "m.bin", "rel/dir"], "text": "saved to out and cache"}
    assert is_hub_id("google-bert/bert-base-uncased") and is_hub_id("gpt2")
    for local in ("/abs/model", "~/model", "./model", "a/b/c", "bad--name", None, ""):
        assert not is_hub_id(local)


@pytest.mark.parametrize("max_steps, epochs_shown", [(20, False), (-1, True)])
def test_epochs_shown_only_when_they_bound_the_run(run: Path, max_steps: int, epochs_shown: bool) -> None:
    recipe = json.loads((run / "distillation" / "recipe.json").read_text())
    recipe["arguments"]["max_steps"] = max_steps  # the Trainer ignores num_train_epochs when max_steps > 0
    text = str(render_model_card(run, recipe=recipe))
    assert ("**Epochs:**" in text) is epochs_shown
    assert ("**Max steps:** 20" in text) is (not epochs_shown)


@pytest.mark.parametrize("task, pipeline", [("feature-extraction", "feature-extraction"),
                                            ("sentence-embedding", "sentence-similarity")])
def test_encoder_tasks_get_their_pipeline_tag(run: Path, task: str, pipeline: str) -> None:
    recipe = json.loads((run / "distillation" / "recipe.json").read_text())
    recipe["task"] = task
    assert _header(str(render_model_card(run, recipe=recipe)))["pipeline_tag"] == pipeline


def test_an_encoder_task_card_names_no_logit_settings(run: Path) -> None:
    recipe = json.loads((run / "distillation" / "recipe.json").read_text())
    recipe["task"] = recipe["arguments"]["distillation_task"] = "sentence-embedding"
    recipe["arguments"].update(temperature=2.0, alpha=0.5)  # the defaults, recorded but unused
    recipe["losses"] = {"embedding": {"weight": 1.0, "loss": "cosine", "pooling": "mean"}}
    text = str(render_model_card(run, recipe=recipe))
    assert "**Temperature:**" not in text and "**Alpha" not in text
    assert "| embedding | `loss_embedding` | 1 |" in text
