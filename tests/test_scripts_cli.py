"""The user-facing scripts as a user runs them: tiny teachers saved to folders, tiny datasets, a few steps.

Covers what a new user met on real runs: a mismatched student, resuming, label maps in another order, the
hard-labels baseline, a failing ONNX export, opaque data and weight errors, and what a run leaves on disk.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import distill_causal_lm as dcl  # noqa: E402
import distill_classification as dcls  # noqa: E402
from single_thread import one_thread  # noqa: E402,F401  (autouse)

from hf_distill.data import synthetic_sentiment, synthetic_tokenizer  # noqa: E402

LABELS = ["negative", "positive"]


# ---------------------------------------------------------------------------------------------- fixtures
def _bert(vocab_size: int, id2label: dict, seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, id2label=id2label,
                        label2id={name: i for i, name in id2label.items()})
    return BertForSequenceClassification(config)


def _save_teacher(folder: Path, id2label: dict | None = None) -> Path:
    tokenizer = synthetic_tokenizer()
    _bert(len(tokenizer), id2label or dict(enumerate(LABELS))).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _write_dataset(folder: Path, n_train: int = 32, n_eval: int = 16, labels: list | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, n, seed in (("train", n_train, 1), ("validation", n_eval, 2)):
        rows = synthetic_sentiment(n, seed=seed, num_clauses=1)
        (folder / f"{name}.jsonl").write_text("".join(json.dumps({"text": r["text"], "label": r["label"]}) + "\n"
                                                      for r in rows))
    (folder / "labels.json").write_text(json.dumps(labels or LABELS))
    return folder


@pytest.fixture
def teacher_dir(tmp_path: Path) -> Path:
    return _save_teacher(tmp_path / "teacher")


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return _write_dataset(tmp_path / "data")


def _argv(teacher: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["--teacher", str(teacher), "--dataset", str(data), "--output_dir", str(out), "--max_steps", "4",
            "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16", "--max_length", "32",
            "--export_onnx", "false", "--measure_speed", "false", "--compare_baseline", "false",
            "--model_card", "false", "--use_cpu", "true", "--report_to", "none", "--disable_tqdm", "true",
            "--save_strategy", "no", "--logging_steps", "1", "--learning_rate", "1e-3", "--seed", "0", *extra]


def _run_cli(script: str, argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, str(REPO / "scripts" / script), *argv], capture_output=True, text=True,
                          timeout=300, env=env, cwd=cwd, check=False)


def _word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")


def _llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64,
                                        bos_token_id=1, eos_token_id=2, pad_token_id=2))


@pytest.fixture
def lm_setup(tmp_path: Path) -> tuple[Path, Path]:
    """A 2-layer Llama teacher with a word-level tokenizer, and 20 prompt/completion rows in its words."""
    words = [f"w{i}" for i in range(40)]
    tokenizer = _word_tokenizer(words)
    teacher = tmp_path / "lm_teacher"
    _llama(len(tokenizer)).save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    rows = [{"prompt": " ".join(words[i % 40: i % 40 + 3]), "completion": " " + " ".join(words[(i + 5) % 35:][:4])}
            for i in range(20)]
    data = tmp_path / "lm.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return teacher, data


def _lm_argv(teacher: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["--teacher", str(teacher), "--dataset", str(data), "--output_dir", str(out), "--max_steps", "4",
            "--max_length", "16", "--per_device_train_batch_size", "4", "--use_cpu", "true", "--disable_tqdm", "true",
            "--seed", "0", "--heldout_fraction", "0.2", *extra]


def _checkpoints(folder: Path) -> set[int]:
    return {int(p.name.split("-")[1]) for p in folder.glob("checkpoint-*")}


# ---------------------------------------------------------------------------------------------- item 6: vocabularies
@pytest.mark.parametrize("with_tokenizer", [True, False], ids=["student-tokenizer", "embeddings-only"])
def test_classification_student_with_another_vocabulary_fails_before_training(tmp_path, teacher_dir, data_dir,
                                                                              with_tokenizer):
    """The teacher has the 50-token synthetic vocabulary; the student 300 tokens (the issue: 30,522 vs 45)."""
    student = tmp_path / "student"
    _bert(300, dict(enumerate(LABELS)), seed=1).save_pretrained(student)
    if with_tokenizer:
        _word_tokenizer([f"t{i}" for i in range(297)]).save_pretrained(student)
    out = tmp_path / "out"
    argv = _argv(teacher_dir, data_dir, out, "--student", str(student))
    if with_tokenizer:  # the command line, in a fresh interpreter
        done = _run_cli("distill_classification.py", argv, tmp_path)
        assert done.returncode != 0, done.stdout[-2000:]
        assert "vocabular" in done.stderr.lower(), done.stderr[-3000:]
    else:
        with pytest.raises(Exception, match="(?i)vocabular"):
            dcls.main(argv)
    assert not (out / "model.safetensors").exists()


def test_causal_lm_student_with_another_vocabulary_fails_with_the_trainers_message(tmp_path, lm_setup):
    """No tokenizer in the student's folder: the script's own evaluation used to crash with a shape error first."""
    teacher, data = lm_setup
    student = tmp_path / "lm_student"
    _llama(64, seed=1).save_pretrained(student)
    with pytest.raises(ValueError, match="(?i)vocabular"):
        dcl.main(_lm_argv(teacher, data, tmp_path / "out", "--student", str(student)))


# ---------------------------------------------------------------------------------------------- item 7: resume
@pytest.fixture
def step_counter(monkeypatch) -> list:
    """Counts the training steps the DistillationTrainer really runs (a resumed run skips the saved ones)."""
    from hf_distill import DistillationTrainer

    calls = []
    original = DistillationTrainer.training_step

    def counted(self, *args, **kwargs):
        calls.append(self.state.global_step)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DistillationTrainer, "training_step", counted)
    return calls


def _mtimes(folder: Path) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_classification_resume_continues_at_the_saved_step(tmp_path, teacher_dir, data_dir, step_counter, caplog):
    out = tmp_path / "out"
    steps = ("--save_strategy", "steps", "--save_steps", "2", "--teacher_train_epochs", "1")
    first = dcls.main(_argv(teacher_dir, data_dir, out, "--max_steps", "2", *steps))
    assert first["steps"] == 2 and _checkpoints(out) == {2} and len(step_counter) == 2
    before = _mtimes(out / "checkpoint-2")
    step_counter.clear()
    caplog.set_level("INFO")
    second = dcls.main(_argv(teacher_dir, data_dir, out, "--max_steps", "4", "--resume_from_checkpoint", "true", *steps))
    assert second["steps"] == 4 and _checkpoints(out) == {2, 4}
    assert step_counter == [2, 3], "a run restarted at step 0 trains steps 0-3 and rewrites checkpoint-2"
    assert _mtimes(out / "checkpoint-2") == before
    assert "Reusing the teacher fine-tuned with the same settings" in caplog.text


def test_classification_resume_from_a_named_checkpoint(tmp_path, teacher_dir, data_dir, step_counter):
    out = tmp_path / "out"
    dcls.main(_argv(teacher_dir, data_dir, out, "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2"))
    step_counter.clear()
    second = dcls.main(_argv(teacher_dir, data_dir, out, "--max_steps", "5", "--save_strategy", "steps",
                             "--save_steps", "2", "--resume_from_checkpoint", str(out / "checkpoint-2")))
    assert second["steps"] == 5 and step_counter == [2, 3, 4]
    with pytest.raises(FileNotFoundError, match="--resume_from_checkpoint .*checkpoint-9.*no such checkpoint"):
        dcls.main(_argv(teacher_dir, data_dir, out, "--resume_from_checkpoint", str(out / "checkpoint-9")))


def test_causal_lm_resume_continues_at_the_saved_step(tmp_path, lm_setup, step_counter):
    teacher, data = lm_setup
    out = tmp_path / "out"
    steps = ("--save_strategy", "steps", "--save_steps", "2")
    first = dcl.main(_lm_argv(teacher, data, out, "--max_steps", "2", *steps))
    assert first["steps"] == 2 and _checkpoints(out) == {2}
    before = _mtimes(out / "checkpoint-2")
    step_counter.clear()
    second = dcl.main(_lm_argv(teacher, data, out, "--max_steps", "4", "--resume_from_checkpoint", "true", *steps))
    assert second["steps"] == 4 and second["resumed_from"] is True and _checkpoints(out) == {2, 4}
    assert step_counter == [2, 3], "a run restarted at step 0 trains steps 0-3 and rewrites checkpoint-2"
    assert _mtimes(out / "checkpoint-2") == before


# ---------------------------------------------------------------------------------------------- item 8: label maps
def _biased_teacher(folder: Path, id2label: dict, favourite: int) -> Path:
    """A teacher that predicts class id ``favourite`` for every input."""
    tokenizer = synthetic_tokenizer()
    model = _bert(len(tokenizer), id2label)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([5.0, -5.0] if favourite == 0 else [-5.0, 5.0]))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_teacher_labels_in_the_other_order_are_remapped_by_name(tmp_path, caplog):
    """The teacher's id 0 is "positive" and it always says positive; in the dataset "positive" is id 1. Read by
    name it is right on every positive row; read by id (the old overwrite of id2label) it is always wrong."""
    teacher = _biased_teacher(tmp_path / "teacher", {0: "positive", 1: "negative"}, favourite=0)
    data = tmp_path / "data"
    data.mkdir()
    for name in ("train", "validation"):
        (data / f"{name}.jsonl").write_text("".join(json.dumps({"text": "the film was good", "label": 1}) + "\n"
                                                    for _ in range(16)))
    (data / "labels.json").write_text(json.dumps(LABELS))
    caplog.set_level("INFO")
    results = dcls.main(_argv(teacher, data, tmp_path / "out"))
    assert results["rows"][0]["validation accuracy"] == 1.0
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["id2label"] == {"0": "positive", "1": "negative"}
    assert "remapped to the teacher's ids by name: {0: 1, 1: 0}" in caplog.text


def test_teacher_with_other_label_names_is_refused(tmp_path, data_dir):
    teacher = _save_teacher(tmp_path / "teacher", {0: "bad", 1: "good"})
    with pytest.raises(ValueError, match="teacher's labels .* are not the dataset's .*labels.json"):
        dcls.main(_argv(teacher, data_dir, tmp_path / "out"))


def test_label_alignment_cases():
    from hf_distill.classification import align_labels

    assert align_labels(["Neg", "Pos"], {0: "neg", 1: "pos"})[0] is None  # same names, any case
    assert align_labels(["neg", "pos"], {0: "pos", 1: "neg"})[0] == {0: 1, 1: 0}
    mapping, decision = align_labels(["0", "1"], {0: "neg", 1: "pos"})
    assert mapping is None and "no names" in decision
    mapping, decision = align_labels(["neg", "pos"], {0: "LABEL_0", 1: "LABEL_1"})
    assert mapping is None and "takes the dataset's" in decision
    with pytest.raises(ValueError, match="teacher has 3 labels .* dataset has 2"):
        align_labels(["neg", "pos"], {0: "a", 1: "b", 2: "c"})


# ---------------------------------------------------------------------------------------------- item 10: baseline
@pytest.mark.parametrize("recipe", ["demo_synthetic", "distilbert", "tinybert"])
def test_recipe_baselines_have_every_teacher_term_off(tmp_path, recipe):
    from hf_distill import DistillationTrainer
    from hf_distill.classification import hard_label_arguments
    from hf_distill.preflight import configured_loss_terms
    from tiny_models import sentiment_dataset, tiny_bert

    _, args = dcls.parse_arguments(["--recipe", str(REPO / "recipes" / f"{recipe}.yaml"), "--output_dir",
                                    str(tmp_path / "run"), "--alpha_schedule", "linear", "--alpha_end", "0.2"])
    baseline = hard_label_arguments(args, str(tmp_path / "base"))
    data, _ = sentiment_dataset(8)
    trainer = DistillationTrainer(tiny_bert(seed=1), tiny_bert(layers=4, seed=2), baseline, train_dataset=data)
    assert {name: w for name, w in configured_loss_terms(trainer.args).items() if w} == {"ce": 1.0}
    assert baseline.save_strategy == "no" and not baseline.save_on_signal


def test_baseline_of_a_run_with_hidden_terms_trains_on_labels_only(tmp_path, teacher_dir, data_dir):
    results = dcls.main(_argv(teacher_dir, data_dir, tmp_path / "out", "--compare_baseline", "true",
                              "--hidden_weight", "1", "--hidden_layer_map", "last:1", "--alpha", "0.5"))
    assert results["baseline"]["loss_terms"] == {"ce": 1.0} and results["baseline"]["steps"] == 4
    assert results["rows"][2]["model"] == "student, hard labels only"
    assert not (tmp_path / "out" / "baseline").exists()


# ---------------------------------------------------------------------------------------------- item 9: export
def test_a_failing_export_keeps_the_run_and_gets_the_evaluation_split(tmp_path, teacher_dir, data_dir, monkeypatch,
                                                                      capsys):
    import hf_distill.export

    calls = {}

    def failing_export(model_dir, output_dir=None, *, sample_texts=None, eval_dataset=None, int8_min_agreement=None,
                       int8_max_accuracy_drop=None, **kwargs):
        calls.update(eval_dataset=eval_dataset, int8_min_agreement=int8_min_agreement,
                     int8_max_accuracy_drop=int8_max_accuracy_drop)
        raise hf_distill.export.ParityError("int8 argmax agreement 87.5% < int8_min_agreement")

    monkeypatch.setattr(hf_distill.export, "export_onnx", failing_export)
    out = tmp_path / "out"
    results = dcls.main(_argv(teacher_dir, data_dir, out, "--export_onnx", "true", "--model_card", "true",
                              "--int8_min_agreement", "0.8", "--int8_max_accuracy_drop", "1.5"))
    assert calls["int8_min_agreement"] == 0.8 and calls["int8_max_accuracy_drop"] == 1.5
    assert len(calls["eval_dataset"]) == 16 and set(calls["eval_dataset"].column_names) == {"text", "label"}
    assert results["export"]["error"].startswith("ParityError: int8 argmax agreement")
    saved = json.loads((out / "results.json").read_text())
    assert saved["export"]["error"] == results["export"]["error"] and len(saved["rows"]) == 2
    for name in ("model.safetensors", "config.json", "README.md", "distillation/recipe.json"):
        assert (out / name).is_file(), name
    assert "WARNING: the ONNX export failed" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- item 11: errors
def test_empty_jsonl_names_the_file(tmp_path):
    from hf_distill.classification import load_text_classification

    folder = _write_dataset(tmp_path / "data")
    (folder / "validation.jsonl").write_text("\n")
    with pytest.raises(ValueError, match=r"--dataset: .*validation.jsonl is empty\. Write one JSON object per line"):
        load_text_classification(str(folder))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"empty.jsonl is empty.*\"prompt\""):
        dcl.load_prompt_completion_data(str(tmp_path / "empty.jsonl"), "train")


@pytest.mark.parametrize("name", ["data/no_such_folder", "no_such.jsonl", "./missing", "runs/x/data.jsonl"])
def test_a_local_dataset_path_that_does_not_exist_is_not_looked_up_on_the_hub(tmp_path, monkeypatch, name):
    from hf_distill.classification import load_text_classification

    monkeypatch.chdir(tmp_path)
    # "data/no_such_folder" could be a Hub id (owner/name): it is tried there, and the error says both places
    message = rf"--dataset '{re.escape(name)}'(: no such file or folder| is not a local file or folder \(looked for )"
    with pytest.raises(FileNotFoundError, match=message):
        load_text_classification(name)
    with pytest.raises(FileNotFoundError, match=message):
        dcl.load_prompt_completion_data(name, "train")


def test_a_hub_name_that_cannot_be_loaded_says_both_places_were_tried(tmp_path, monkeypatch):
    from hf_distill.classification import load_text_classification

    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="'someone/sst2' is not a local file or folder .* from the Hub"):
        load_text_classification("someone/sst2")


def _damage(folder: Path) -> None:
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])


def test_a_damaged_teacher_weights_file_is_named(tmp_path, teacher_dir, data_dir):
    _damage(teacher_dir)
    with pytest.raises(ValueError, match=r"--teacher .*model\.safetensors cannot be read .*damaged or incomplete"):
        dcls.main(_argv(teacher_dir, data_dir, tmp_path / "out"))


def test_a_damaged_student_weights_file_is_named(tmp_path, lm_setup):
    teacher, data = lm_setup
    student = tmp_path / "lm_student"
    _llama(43, seed=1).save_pretrained(student)
    _damage(student)
    with pytest.raises(ValueError, match=r"--student .*model\.safetensors cannot be read"):
        dcl.main(_lm_argv(teacher, data, tmp_path / "out", "--student", str(student)))


def test_prompt_longer_than_max_length_trains_with_truncation_side_left(tmp_path, lm_setup):
    teacher, _ = lm_setup
    data = tmp_path / "long.jsonl"
    long_prompt = " ".join(f"w{i % 40}" for i in range(30))
    data.write_text("".join(json.dumps({"prompt": long_prompt, "completion": " w1 w2"}) + "\n" for _ in range(8)))
    with pytest.raises(ValueError, match="truncation_side"):
        dcl.main(_lm_argv(teacher, data, tmp_path / "right", "--heldout_fraction", "0"))
    results = dcl.main(_lm_argv(teacher, data, tmp_path / "left", "--heldout_fraction", "0", "--truncation_side",
                                "left"))
    assert results["steps"] == 4


# ---------------------------------------------------------------------------------------------- item 13: the folder
def _documented_entries() -> set[str]:
    """Top-level names in the README's "What a run leaves on disk" block (first word of each line)."""
    readme = (REPO / "README.md").read_text()
    block = readme.split("## What a run leaves on disk", 1)[1].split("```", 2)[1]
    names = set()
    for line in block.splitlines()[1:]:
        for item in line.split("#", 1)[0].split(","):
            item = item.strip()
            if item and not item.startswith("<"):
                names.add(item.split("/")[0] + ("/" if "/" in item else ""))
    return names


def test_the_run_folder_matches_the_readme(tmp_path, teacher_dir, data_dir):
    out = tmp_path / "out"
    dcls.main(_argv(teacher_dir, data_dir, out, "--compare_baseline", "true", "--teacher_train_epochs", "1",
                    "--model_card", "true", "--save_strategy", "steps", "--save_steps", "4"))
    tokenizer_files = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"}  # 4.57: more
    found = {p.name + ("/" if p.is_dir() else "") for p in out.iterdir()} - tokenizer_files
    assert not {"baseline/", "teacher_training/"} & found
    assert found == {"config.json", "model.safetensors", "training_args.bin", "distillation/", "checkpoint-4/",
                     "results.json", "eval_results.json", "all_results.json", "README.md"}
    documented = _documented_entries()
    assert {"checkpoint-N/", "training_args.bin", "results.json", "tokenizer files"} <= documented
    assert found - {"checkpoint-4/"} <= documented
    teacher_files = {p.name for p in (tmp_path / "out-teacher").iterdir()} - tokenizer_files
    assert teacher_files == {"config.json", "model.safetensors", "teacher_training.json"}


def test_causal_lm_script_refuses_an_encoder_teacher_and_classification_data(tmp_path, teacher_dir, lm_setup, data_dir):
    """What a new user tried first: the MiniLM encoder and SST-2 with the causal-LM script."""
    teacher, data = lm_setup
    with pytest.raises(ValueError, match="BertForSequenceClassification checkpoint, not a causal language model.*"
                                         "distill_classification.py"):
        dcl.main(_lm_argv(teacher_dir, data, tmp_path / "out"))
    with pytest.raises(ValueError, match=r"columns \['label', 'text'\].*--prompt_column"):
        dcl.main(_lm_argv(teacher, data_dir / "train.jsonl", tmp_path / "out"))


# ---------------------------------------------------------------------------------------------- --trim_vocabulary
def test_trim_vocabulary_saves_a_smaller_student_with_the_same_outputs_on_training_text(tmp_path, teacher_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    data = _write_dataset(tmp_path / "data", n_train=8)
    full = dcls.main(_argv(teacher_dir, data, tmp_path / "full"))
    trimmed = dcls.main(_argv(teacher_dir, data, tmp_path / "trimmed", "--trim_vocabulary", "true"))
    kept = trimmed["trim_vocabulary"]["kept_size"]
    assert kept < trimmed["trim_vocabulary"]["original_size"] == len(synthetic_tokenizer())
    assert [r["model"] for r in trimmed["rows"]][-1] == "student, vocabulary trimmed"
    assert "trim_vocabulary" not in full
    models = {}
    for name in ("full", "trimmed"):
        models[name] = (AutoModelForSequenceClassification.from_pretrained(tmp_path / name).eval(),
                        AutoTokenizer.from_pretrained(tmp_path / name))
    assert models["trimmed"][0].config.vocab_size == len(models["trimmed"][1]) == kept
    text = json.loads((data / "train.jsonl").read_text().splitlines()[0])["text"]
    with torch.no_grad():
        logits = {name: model(**tokenizer(text, return_tensors="pt")).logits for name, (model, tokenizer) in models.items()}
    assert torch.allclose(logits["full"], logits["trimmed"], atol=1e-5)


# ---------------------------------------------------------------------------------------------- headless teachers
def test_a_teacher_without_a_trained_head_is_refused_unless_fine_tuned_first(tmp_path, data_dir):
    from transformers import BertModel

    tokenizer = synthetic_tokenizer()
    encoder = _bert(len(tokenizer), dict(enumerate(LABELS))).bert  # a pretrained-style encoder: no task head
    assert isinstance(encoder, BertModel)
    encoder.save_pretrained(tmp_path / "encoder")
    tokenizer.save_pretrained(tmp_path / "encoder")
    with pytest.raises(ValueError, match="no trained task head.*--teacher_train_epochs"):
        dcls.main(_argv(tmp_path / "encoder", data_dir, tmp_path / "refused"))
    assert not (tmp_path / "refused" / "model.safetensors").exists()
    dcls.main(_argv(tmp_path / "encoder", data_dir, tmp_path / "tuned", "--teacher_train_epochs", "1"))
    recipe = json.loads((tmp_path / "tuned" / "distillation" / "recipe.json").read_text())
    assert recipe["teacher"]["name_or_path"] == str(tmp_path / "tuned-teacher")  # the teacher actually distilled
    settings = json.loads((tmp_path / "tuned-teacher" / "teacher_training.json").read_text())
    assert settings["learning_rate"] == 5e-5  # a pretrained teacher's default, not the from-scratch 1e-3


def test_max_eval_and_predict_samples_cut_the_validation_and_test_splits(tmp_path):
    folder = _write_dataset(tmp_path / "data", n_train=32, n_eval=16)
    (folder / "test.jsonl").write_text((folder / "validation.jsonl").read_text())
    script, args = dcls.parse_arguments(["--dataset", str(folder), "--output_dir", str(tmp_path / "out"),
                                    "--max_train_samples", "20", "--max_eval_samples", "5", "--max_predict_samples", "7"])
    splits, _ = dcls.load_data(script, args)
    assert {name: len(split) for name, split in splits.items()} == {"train": 20, "validation": 5, "test": 7}


def test_a_trimmed_vocabulary_that_leaves_validation_tokens_unknown_is_warned_about():
    assert dcls.unk_warning(None) is None and dcls.unk_warning(0.0033) is None
    message = dcls.unk_warning(0.0775)
    assert "7.7%" in message or "7.8%" in message
    assert "--max_train_samples" in message and "--trim_vocabulary" in message


# ---------------------------------------------------------------------------------------------- which teacher layers
def test_student_layer_indices_copy_the_chosen_teacher_layers(tmp_path, teacher_dir, data_dir):
    from transformers import AutoModelForSequenceClassification

    results = dcls.main(_argv(teacher_dir, data_dir, tmp_path / "last", "--student_layer_indices", "1",
                              "--learning_rate", "1e-9", "--alpha", "0.7"))
    recorded = json.loads((tmp_path / "last" / "results.json").read_text())["arguments"]
    assert recorded["script"]["student_layer_indices"] == [1] == results["arguments"]["script"]["student_layer_indices"]
    assert recorded["distillation"]["alpha"] == 0.7  # what distilled it, beside how it was built
    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_dir)
    student = AutoModelForSequenceClassification.from_pretrained(tmp_path / "last")
    assert student.config.num_hidden_layers == 1
    copied, other = (dict(teacher.bert.encoder.layer[i].named_parameters()) for i in (1, 0))
    for name, value in student.bert.encoder.layer[0].named_parameters():
        torch.testing.assert_close(value, copied[name], atol=1e-6, rtol=0, msg=name)  # lr 1e-9: still the copy
    assert any(not torch.allclose(copied[n], other[n]) for n in copied)  # layers 0 and 1 differ: the choice shows


@pytest.mark.parametrize("extra, message", [
    (["--student_layer_indices", "0", "2"], r"--student_layer_indices 0 2: the teacher has 2 layers, numbered 0 to 1"),
    (["--student_layers", "3"], r"--student_layers 3: .* 1 to 2 layers .*--student_layer_indices"),
    (["--student_layer_indices", "0", "--student_hidden_size", "16"], r"--student_hidden_size gives a student of its own"),
])
def test_a_layer_choice_the_teacher_cannot_give_is_refused_before_the_teacher_is_fine_tuned(tmp_path, teacher_dir,
                                                                                            data_dir, extra, message):
    out = tmp_path / "refused"
    with pytest.raises(ValueError, match=message):
        dcls.main(_argv(teacher_dir, data_dir, out, "--teacher_train_epochs", "1", *extra))
    assert not Path(f"{out}-teacher").exists() and not (out / "model.safetensors").exists()


def test_causal_lm_student_layer_indices_and_their_check(tmp_path, lm_setup):
    from transformers import AutoModelForCausalLM

    teacher, data = lm_setup
    with pytest.raises(ValueError, match=r"--student_layer_indices 5: the teacher has 2 layers"):
        dcl.main(_lm_argv(teacher, data, tmp_path / "refused", "--student_layer_indices", "5"))
    dcl.main(_lm_argv(teacher, data, tmp_path / "out", "--student_layer_indices", "1", "--learning_rate", "1e-9"))
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    source = AutoModelForCausalLM.from_pretrained(teacher).model.layers[1]
    assert student.config.num_hidden_layers == 1
    for (name, value), (_, expected) in zip(student.model.layers[0].named_parameters(), source.named_parameters()):
        torch.testing.assert_close(value, expected, atol=1e-6, rtol=0, msg=name)
