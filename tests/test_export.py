"""ONNX export: every task through torch.onnx (both environments) and through Optimum (transformers 4.57
environment only), parity, int8 size, the inference helper, the report, and bad input."""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

import transformers  # noqa: E402
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors  # noqa: E402
from transformers import (BertConfig, BertForMaskedLM, BertForQuestionAnswering,  # noqa: E402
                          BertForSequenceClassification, BertForTokenClassification, GPT2Config, GPT2LMHeadModel,
                          PreTrainedTokenizerFast)

from hf_distill.export import (ParityError, RejectedModelError, UnsupportedTaskError, benchmark_models,  # noqa: E402
                               detect_task, export_onnx, load_eval_jsonl, write_report)
from hf_distill.export import optimum_backend, quantization, torch_backend  # noqa: E402
from hf_distill.export.quantization import detect_quantization_preset  # noqa: E402
from hf_distill.export.parity import DEFAULT_SAMPLE_TEXTS  # noqa: E402
from hf_distill.inference import build_feed, create_session, load_onnx_pipeline  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
HAS_OPTIMUM = optimum_backend.optimum_import_error() is None
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ("the a an and but or of to in on it is was this that film movie story plot acting actor music score "
         "good great fun funny gripping wonderful moving bad boring dull thin slow awful worst best never quite "
         "ever what who where when why how long short last hour first drags wants be decides point without "
         "with john mary paris london lives works city born his her she he they paris tokyo sentence time "
         "model . , ! ? ' s ##s ##ing ##ed").split()
LABELS = {"sequence-classification": ["negative", "positive"], "token-classification": ["O", "B-PER", "B-LOC"]}


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {token: index for index, token in enumerate(dict.fromkeys(SPECIALS + WORDS))}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                                        cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    assert len(tokenizer) == len(vocab)
    return tokenizer


def bert_config(tokenizer, **kwargs) -> BertConfig:
    settings = dict(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=160, pad_token_id=0)
    return BertConfig(**{**settings, **kwargs})


def save_model(model, tokenizer, path: Path) -> Path:
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def labelled(task: str) -> dict:
    labels = LABELS[task]
    return {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
            "label2id": {label: index for index, label in enumerate(labels)}}


def build_model(task: str, tokenizer, seed: int = 0, **config_kwargs):
    import torch

    torch.manual_seed(seed)
    if task == "sequence-classification":
        return BertForSequenceClassification(bert_config(tokenizer, **labelled(task), **config_kwargs))
    if task == "token-classification":
        return BertForTokenClassification(bert_config(tokenizer, **labelled(task), **config_kwargs))
    if task == "question-answering":
        return BertForQuestionAnswering(bert_config(tokenizer, **config_kwargs))
    special = tokenizer.convert_tokens_to_ids("[SEP]")
    return GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=160, n_embd=128, n_layer=2, n_head=4,
                                      bos_token_id=special, eos_token_id=special, pad_token_id=0))


TASKS = ["sequence-classification", "token-classification", "question-answering", "causal-lm"]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {task: save_model(build_model(task, tokenizer), tokenizer, root / task) for task in TASKS}


@pytest.fixture(scope="module")
def torch_exports(tmp_path_factory, model_dirs) -> dict:
    root = tmp_path_factory.mktemp("torch_exports")
    return {task: export_onnx(model_dirs[task], root / task, backend="torch") for task in TASKS}


# ----------------------------------------------------------------------------------------------------------
# torch.onnx path (both environments)
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", TASKS)
def test_torch_export_parity_and_size(task, torch_exports):
    result = torch_exports[task]
    assert result.backend == "torch" and result.task == task
    assert result.model_path.name == "model.onnx" and result.quantized_path.name == "model_quantized.onnx"
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "export_info.json"):
        assert (result.output_dir / name).is_file(), name
    fp32, int8 = result.parity["fp32"], result.parity["int8"]
    assert fp32.passed and fp32.max_abs_diff <= 1e-4 and fp32.argmax_agreement == 1.0
    assert fp32.max_abs_diff <= 1e-4 * fp32.logit_scale  # float rounding only
    assert int8.passed and result.int8_accepted and int8.max_abs_diff <= 0.5 * int8.logit_scale
    assert result.int8_size_bytes < 0.5 * result.fp32_size_bytes
    assert result.quantization_preset == detect_quantization_preset()
    info = json.loads((result.output_dir / "export_info.json").read_text())
    assert info["backend"] == "torch" and info["task"] == task and "/" not in info["model_path"]


def test_causal_lm_export_has_past_key_values(torch_exports):
    result = torch_exports["causal-lm"]
    assert result.with_past
    session = create_session(result.model_path)
    names = [arg.name for arg in session.get_inputs()]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert "past_key_values.1.value" in names
    assert [arg.name for arg in session.get_outputs()][:2] == ["logits", "present.0.key"]


def test_inference_helper_sequence_classification(torch_exports):
    classify = load_onnx_pipeline(torch_exports["sequence-classification"].output_dir)
    single = classify("a gripping and funny film")
    assert len(single) == 1 and single[0]["label"] in LABELS["sequence-classification"]
    assert 0.5 <= single[0]["score"] <= 1.0
    batch = load_onnx_pipeline(torch_exports["sequence-classification"].output_dir, quantized=False)(
        ["boring .", "the acting is great"])
    assert [set(item) for item in batch] == [{"label", "score"}] * 2


def test_inference_helper_matches_pytorch(torch_exports, model_dirs, tokenizer):
    import torch

    pipe = load_onnx_pipeline(torch_exports["sequence-classification"].output_dir, quantized=False)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dirs["sequence-classification"])
    with torch.inference_mode():
        probabilities = model(**tokenizer(["the plot is thin"], return_tensors="pt")).logits.softmax(-1)[0]
    result = pipe("the plot is thin")[0]
    assert result["label"] == model.config.id2label[int(probabilities.argmax())]
    assert result["score"] == pytest.approx(float(probabilities.max()), abs=1e-5)


def test_inference_helper_token_classification(torch_exports):
    tokens = load_onnx_pipeline(torch_exports["token-classification"].output_dir)("John lives in Paris")
    assert [token["token"] for token in tokens] == ["John", "lives", "in", "Paris"]
    assert all(token["label"] in LABELS["token-classification"] for token in tokens)
    assert tokens[3]["start"] == 14 and tokens[3]["end"] == 19


def test_inference_helper_question_answering(torch_exports):
    context = "mary lives in paris and works in london"
    answer = load_onnx_pipeline(torch_exports["question-answering"].output_dir)(
        question="where does mary live ?", context=context)
    assert set(answer) == {"answer", "score", "start", "end"}
    assert answer["answer"] == context[answer["start"]:answer["end"]] and answer["answer"]
    assert 0.0 < answer["score"] <= 1.0


def test_inference_helper_generation_uses_cache(torch_exports, model_dirs, tokenizer):
    import torch

    generated = load_onnx_pipeline(torch_exports["causal-lm"].output_dir, quantized=False)(
        "the film", max_new_tokens=5)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dirs["causal-lm"])
    ids = tokenizer("the film", add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        for _ in range(5):
            next_id = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
            if next_id.item() == model.config.eos_token_id:
                break
    assert generated == [{"generated_text": tokenizer.decode(ids[0], skip_special_tokens=True)}]


def test_sample_texts_and_no_tokenizer(tmp_path, tokenizer):
    without_tokenizer = save_model(build_model("sequence-classification", tokenizer), None, tmp_path / "bare")
    result = export_onnx(without_tokenizer, backend="torch", quantize=False)
    assert result.output_dir == without_tokenizer / "onnx"
    assert result.parity["fp32"].inputs == "random token ids" and result.parity["fp32"].passed
    assert result.quantized_path is None and "int8" not in result.parity
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        load_onnx_pipeline(result.output_dir, quantized=False)
    with pytest.raises(FileNotFoundError, match="model_quantized.onnx"):
        load_onnx_pipeline(result.output_dir)


def test_external_data_for_large_models(tmp_path, monkeypatch, model_dirs):
    """Models past the 2 GiB protobuf limit are written with external data: lower the threshold to check."""
    monkeypatch.setattr(torch_backend, "EXTERNAL_DATA_THRESHOLD_BYTES", 1)
    result = export_onnx(model_dirs["sequence-classification"], tmp_path / "onnx", backend="torch",
                         sample_texts=["a good film", "an awful , boring film"])
    assert result.external_data and result.parity["fp32"].inputs == "sample_texts"
    assert (tmp_path / "onnx" / "model.onnx_data").is_file()
    assert result.model_path.stat().st_size < 100_000 < result.fp32_size_bytes
    assert result.int8_size_bytes < result.fp32_size_bytes and result.parity["int8"].passed
    assert load_onnx_pipeline(tmp_path / "onnx")("a good film")[0]["label"] in LABELS["sequence-classification"]


def _scale_sizes(onnx_path: Path) -> set[int]:
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    return {numpy_helper.to_array(tensor).size for tensor in graph.initializer if tensor.name.endswith("_scale")}


def test_per_channel_quantization(tmp_path, model_dirs, torch_exports):
    """Per-channel int8 stores one weight scale per output column; the default stores one per tensor."""
    result = export_onnx(model_dirs["sequence-classification"], tmp_path / "onnx", backend="torch", per_channel=True)
    assert result.per_channel and json.loads((tmp_path / "onnx" / "export_info.json").read_text())["per_channel"]
    assert max(_scale_sizes(result.quantized_path)) == 512  # intermediate_size columns of the FFN input weight
    assert _scale_sizes(torch_exports["sequence-classification"].quantized_path) == {1}
    assert result.parity["int8"].passed and result.int8_size_bytes < 0.5 * result.fp32_size_bytes


def test_ort_format(tmp_path, model_dirs):
    result = export_onnx(model_dirs["sequence-classification"], tmp_path / "onnx", backend="torch", ort_format=True)
    assert sorted(path.name for path in result.ort_paths) == ["model.ort", "model_quantized.ort"]
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "onnx" / "model_quantized.ort"), providers=["CPUExecutionProvider"])
    feed = build_feed(session, build_tokenizer()(["a good film"], return_tensors="np"))
    assert session.run(None, feed)[0].shape == (1, 2)


# ----------------------------------------------------------------------------------------------------------
# int8 verdict: judged on an evaluation set, never throws the export away; tolerances that catch a 2x error
# ----------------------------------------------------------------------------------------------------------
def eval_rows(count: int = 40, seed: int = 0) -> list[dict]:
    """Sentences of the test vocabulary with random labels."""
    generator = np.random.default_rng(seed)
    words = [word for word in WORDS if word.isalpha()]
    return [{"text": " ".join(generator.choice(words, size=int(generator.integers(3, 12)))),
             "label": int(generator.integers(0, 2))} for _ in range(count)]


def classifier_scaled_copy(model_dir: Path, path: Path, factor: float) -> Path:
    """The classification model with its classifier weight and bias multiplied by `factor` (logits x factor)."""
    import torch

    model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir)
    with torch.no_grad():
        model.classifier.weight.mul_(factor)
        model.classifier.bias.mul_(factor)
    return save_model(model, build_tokenizer(), path)


def pytorch_logits(model_dir: Path, texts: list[str]) -> np.ndarray:
    import torch

    model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    encoded = build_tokenizer()(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.inference_mode():
        return model(**encoded).logits.numpy()


def quantize_as(monkeypatch, model_dir: Path) -> None:
    """Make the int8 step write the fp32 ONNX of another model: a broken int8 file of known error."""
    export = torch_backend.export_with_torch

    def fake_quantize(model_path, output_path, preset, per_channel, use_external_data):
        export(model_dir, output_path, "sequence-classification", 17)

    monkeypatch.setattr(quantization, "quantize_with_onnxruntime", fake_quantize)


def test_two_x_logit_error_fails_parity(tmp_path, monkeypatch, model_dirs):
    """Logits doubled (argmax unchanged) fail fp32 parity, and int8 parity on samples; on an evaluation set, where
    accuracy decides, the error is recorded (relative diff 1.0) and fails an explicit int8_parity_atol."""
    source = model_dirs["sequence-classification"]
    doubled = classifier_scaled_copy(source, tmp_path / "doubled", 2.0)
    texts = ["a good film", "an awful , boring film", "the plot is thin"]
    scale = float(np.abs(pytorch_logits(source, texts)).max())
    export = torch_backend.export_with_torch
    with monkeypatch.context() as patch:
        patch.setattr(torch_backend, "export_with_torch", lambda model_dir, path, task, opset: export(
            doubled, path, task, opset))
        with pytest.raises(ParityError, match="fp32 ONNX parity check failed"):
            export_onnx(source, tmp_path / "fp32", backend="torch", quantize=False, sample_texts=texts)
    quantize_as(monkeypatch, doubled)
    on_samples = export_onnx(source, tmp_path / "samples", backend="torch", sample_texts=texts)
    int8 = on_samples.parity["int8"]
    assert int8.argmax_agreement == 1.0 and int8.logit_scale == pytest.approx(scale, rel=1e-5)
    assert int8.max_abs_diff == pytest.approx(scale, rel=1e-4)  # a 2x error is off by the whole logit scale
    assert not int8.passed and not on_samples.int8_accepted and "max abs diff" in int8.problems[0]
    on_eval = export_onnx(source, tmp_path / "eval", backend="torch", eval_dataset=eval_rows())
    int8 = on_eval.parity["int8"]
    assert int8.accuracy == int8.reference_accuracy and on_eval.int8_accepted  # same predictions
    assert int8.atol is None and int8.relative_diff == pytest.approx(1.0, rel=1e-4)
    strict = export_onnx(source, tmp_path / "strict", backend="torch", eval_dataset=eval_rows(),
                         int8_parity_atol=0.5 * int8.logit_scale)
    assert not strict.int8_accepted and "max abs diff" in strict.parity["int8"].problems[0]


def test_rejected_int8_keeps_the_export_and_is_not_loaded(tmp_path, monkeypatch, model_dirs, tokenizer):
    """Negated logits as int8 on samples: rejected by argmax agreement; nothing is lost, nothing loads it."""
    source = model_dirs["sequence-classification"]
    quantize_as(monkeypatch, classifier_scaled_copy(source, tmp_path / "negated", -1.0))
    output = tmp_path / "onnx"
    result = export_onnx(source, output, backend="torch", int8_parity_atol=1e6)  # judged by agreement only
    int8 = result.parity["int8"]
    assert not result.int8_accepted and int8.argmax_agreement == 0.0 and int8.min_argmax_agreement == 0.9
    assert int8.problems == [f"argmax agreement 0.0% < int8_min_agreement (--int8_min_agreement)=90.0% on "
                             f"{len(DEFAULT_SAMPLE_TEXTS)} predictions"]
    assert result.quantized_path is None and result.rejected_int8_path == output / "rejected" / "model_quantized.onnx"
    names = {path.name for path in output.iterdir()}
    assert {"model.onnx", "rejected", "export_info.json", "config.json", "tokenizer.json"} <= names
    assert not any(name.startswith("model_quantized") for name in names)
    assert (output / "rejected" / "model_quantized.onnx").is_file()
    info = json.loads((output / "export_info.json").read_text())
    assert info["int8_accepted"] is False and info["rejected_int8_path"] == "rejected/model_quantized.onnx"
    with pytest.raises(RejectedModelError, match=r"rejected at export \(argmax agreement 0.0%.*quantized=False"):
        load_onnx_pipeline(output)
    assert load_onnx_pipeline(output, quantized=False)("a good film")[0]["label"] in LABELS["sequence-classification"]
    rows = benchmark_models(source, onnx_dir=output, batch_sizes=(1,), sequence_length=16, warmup=0, runs=1)
    assert [row.name for row in rows] == ["student fp32 PyTorch", "student fp32 ONNX"]
    assert "int8 model was rejected at export (argmax agreement 0.0%" in write_report(
        tmp_path / "report", rows)["markdown"].read_text()
    (output / "rejected" / "model_quantized.onnx").replace(output / "model_quantized.onnx")
    with pytest.warns(UserWarning, match="int8 model the export rejected"):
        load_onnx_pipeline(output)
    accepted = export_onnx(source, output, backend="torch", int8_parity_atol=1e6, int8_min_agreement=0.0)
    assert accepted.int8_accepted and not (output / "rejected").exists()
    load_onnx_pipeline(output)  # a fresh export that accepts int8 replaces the rejected one


def expected_accuracy(onnx_path: Path, rows: list[dict]) -> float:
    """Accuracy of an ONNX classification file on `rows`, computed here with onnxruntime directly."""
    session = create_session(onnx_path)
    encoded = build_tokenizer()([row["text"] for row in rows], padding=True, return_tensors="np")
    predictions = session.run(None, build_feed(session, encoded))[0].argmax(-1)
    return float((predictions == np.array([row["label"] for row in rows])).mean())


def test_int8_judged_by_accuracy_on_the_eval_set(tmp_path, model_dirs):
    import datasets

    source, rows = model_dirs["sequence-classification"], eval_rows(60)
    result = export_onnx(source, tmp_path / "onnx", backend="torch", eval_dataset=datasets.Dataset.from_list(rows))
    int8 = result.parity["int8"]
    reference_predictions = pytorch_logits(source, [row["text"] for row in rows]).argmax(-1)
    expected_reference = float((reference_predictions == np.array([row["label"] for row in rows])).mean())
    assert int8.reference_accuracy == pytest.approx(expected_reference)
    assert int8.accuracy == pytest.approx(expected_accuracy(result.quantized_path, rows))
    assert int8.inputs == "eval_dataset (60 rows)" and int8.num_predictions == 60
    assert int8.max_accuracy_drop == 1.0 and int8.min_argmax_agreement is None and result.int8_accepted
    assert result.parity["fp32"].accuracy == pytest.approx(expected_reference)


def test_int8_accuracy_drop_beyond_the_limit_is_rejected(tmp_path, monkeypatch, model_dirs):
    """Labels = the fp32 model's own predictions; an int8 file with negated logits gets every row wrong."""
    source = model_dirs["sequence-classification"]
    rows = eval_rows(50)
    predictions = pytorch_logits(source, [row["text"] for row in rows]).argmax(-1)
    rows = [{"text": row["text"], "label": int(label)} for row, label in zip(rows, predictions)]
    quantize_as(monkeypatch, classifier_scaled_copy(source, tmp_path / "negated", -1.0))
    result = export_onnx(source, tmp_path / "onnx", backend="torch", eval_dataset=rows, int8_parity_atol=1e6)
    int8 = result.parity["int8"]
    assert (int8.reference_accuracy, int8.accuracy, int8.accuracy_drop) == (1.0, 0.0, 100.0)
    assert int8.problems == ["accuracy 0.00% vs PyTorch fp32 100.00%: drop of 100.00 points > int8_max_accuracy_drop "
                             "(--int8_max_accuracy_drop)=1"]
    assert not result.int8_accepted and (tmp_path / "onnx" / "model.onnx").is_file()
    lenient = export_onnx(source, tmp_path / "lenient", backend="torch", eval_dataset=rows, int8_parity_atol=1e6,
                          int8_max_accuracy_drop=100.0, int8_min_agreement=1.0)
    assert lenient.int8_accepted  # int8_min_agreement is not a criterion when an eval set is given


def test_eval_set_token_classification_and_text_generation(tmp_path, model_dirs, tokenizer):
    import torch

    words = [["john", "lives", "in", "paris"], ["mary", "works", "in", "london", "."]]
    tags = [[1, 0, 0, 2], [1, 0, 0, 2, 0]]
    result = export_onnx(model_dirs["token-classification"], tmp_path / "tokens", backend="torch",
                         eval_dataset=[{"tokens": w, "ner_tags": t} for w, t in zip(words, tags)])
    model = transformers.AutoModelForTokenClassification.from_pretrained(model_dirs["token-classification"])
    correct = []
    for row_words, row_tags in zip(words, tags):  # every test word is one token: skip [CLS] and [SEP]
        with torch.inference_mode():
            logits = model(**tokenizer(row_words, is_split_into_words=True, return_tensors="pt")).logits[0, 1:-1]
        correct += (logits.argmax(-1).numpy() == np.array(row_tags)).tolist()
    assert result.parity["int8"].reference_accuracy == pytest.approx(np.mean(correct))
    texts = ["the film is good and the story is fun", "boring ."]
    result = export_onnx(model_dirs["causal-lm"], tmp_path / "lm", backend="torch",
                         eval_dataset=[{"text": text} for text in texts])
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dirs["causal-lm"])
    correct = []
    for text in texts:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            correct += (model(input_ids=ids).logits[0, :-1].argmax(-1) == ids[0, 1:]).tolist()
    fp32 = result.parity["fp32"]
    assert fp32.reference_accuracy == pytest.approx(np.mean(correct)) and fp32.passed
    assert fp32.num_predictions == sum(len(tokenizer(text)["input_ids"]) for text in texts)
    split = [{"prompt": "the film is ", "completion": "good and the story is fun"}, {"prompt": "boring", "completion": " ."}]
    result = export_onnx(model_dirs["causal-lm"], tmp_path / "lm", backend="torch", eval_dataset=split)
    assert result.parity["fp32"].reference_accuracy == pytest.approx(np.mean(correct))  # prompt + completion


def test_eval_dataset_bad_input(tmp_path, model_dirs):
    source = model_dirs["sequence-classification"]
    with pytest.raises(ValueError, match=r"needs a column 'label' or 'labels'; it has \['sentence', 'text'\]"):
        export_onnx(source, tmp_path / "a", backend="torch", eval_dataset=[{"text": "good", "sentence": "good"}])
    with pytest.raises(ValueError, match="eval_dataset is empty"):
        export_onnx(source, tmp_path / "b", backend="torch", eval_dataset=[])
    with pytest.raises(ValueError, match=r"eval labels \[-1\] are outside .*drop them"):
        export_onnx(source, tmp_path / "c", backend="torch", eval_dataset=[{"text": "good", "label": -1}])
    with pytest.raises(ValueError, match="not question-answering: pass eval_dataset=None"):
        export_onnx(model_dirs["question-answering"], tmp_path / "d", backend="torch", eval_dataset=eval_rows(3))
    with pytest.raises(ValueError, match=r"int8_max_accuracy_drop \(--int8_max_accuracy_drop\).* >= 0"):
        export_onnx(source, tmp_path / "e", backend="torch", int8_max_accuracy_drop=-1)
    assert not any((tmp_path / name).exists() for name in "abcde")  # refused before anything was written


def test_no_function_in_the_export_package_is_longer_than_60_lines():
    import ast

    files = [*sorted((REPO_ROOT / "hf_distill" / "export").glob("*.py")), REPO_ROOT / "hf_distill" / "inference.py"]
    long = [f"{path.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)" for path in files
            for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > 60]
    assert long == []


# ----------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------
def test_folder_without_config(tmp_path):
    (tmp_path / "weights_only").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        export_onnx(tmp_path / "weights_only")
    with pytest.raises(FileNotFoundError, match="not found"):
        export_onnx(tmp_path / "missing")


def test_unsupported_task(tmp_path, tokenizer):
    masked_lm = save_model(BertForMaskedLM(bert_config(tokenizer)), tokenizer, tmp_path / "mlm")
    with pytest.raises(UnsupportedTaskError, match="BertForMaskedLM.*pass task="):
        export_onnx(masked_lm, backend="torch")
    with pytest.raises(UnsupportedTaskError, match="unsupported task 'summarization'"):
        export_onnx(masked_lm, task="summarization", backend="torch")
    assert not (masked_lm / "onnx" / "model.onnx").exists()


def test_parity_failure_names_the_flag(tmp_path, model_dirs):
    with pytest.raises(ParityError, match=r"fp32 .*parity_atol \(--parity_atol\)=1e-12"):
        export_onnx(model_dirs["sequence-classification"], tmp_path / "fp32", backend="torch", parity_atol=1e-12)
    assert not (tmp_path / "fp32" / "model_quantized.onnx").exists()  # derived from a wrong export: set aside
    result = export_onnx(model_dirs["sequence-classification"], tmp_path / "int8", backend="torch",
                         int8_parity_atol=1e-9)
    assert not result.int8_accepted and "int8_parity_atol (--int8_parity_atol)=1e-09" in result.parity["int8"].problems[0]
    assert issubclass(ParityError, ValueError)


def test_unknown_backend(model_dirs):
    with pytest.raises(ValueError, match="backend must be one of"):
        export_onnx(model_dirs["sequence-classification"], backend="tensorrt")


def test_task_detection():
    assert detect_task({"architectures": ["DistilBertForSequenceClassification"]}) == "sequence-classification"
    assert detect_task({"architectures": ["GPT2LMHeadModel"]}) == "causal-lm"
    assert detect_task({"architectures": ["LlamaForCausalLM"]}) == "causal-lm"
    with pytest.raises(UnsupportedTaskError):
        detect_task({"architectures": None})


def test_training_and_export_name_every_task_alike():
    from transformers import (BertConfig, BertForQuestionAnswering, BertForSequenceClassification,
                              BertForTokenClassification, GPT2Config, GPT2LMHeadModel)

    from hf_distill.tasks import detect_task as training_task

    bert = BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    models = [cls(bert) for cls in (BertForSequenceClassification, BertForTokenClassification, BertForQuestionAnswering)]
    models.append(GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2)))
    for model in models:
        config = {"architectures": [type(model).__name__]}
        assert detect_task(config) == training_task(model), type(model).__name__


def test_benchmark_sequence_length_fits_the_models():
    from hf_distill.export.report import fit_sequence_length

    assert fit_sequence_length(128, [BertConfig(max_position_embeddings=512), None]) == 128
    assert fit_sequence_length(128, [BertConfig(max_position_embeddings=512), BertConfig(max_position_embeddings=64)]) == 64
    assert fit_sequence_length(128, [GPT2Config(n_positions=100)]) == 100


def test_quantization_preset_from_cpu():
    assert detect_quantization_preset({"avx2", "avx512f", "avx512bw", "avx512_vnni"}, "x86_64") == "avx512_vnni"
    assert detect_quantization_preset({"avx2", "avx512f", "avx512bw"}, "x86_64") == "avx512"
    assert detect_quantization_preset({"avx2", "fma"}, "x86_64") == "avx2"
    assert detect_quantization_preset(set(), "aarch64") == "arm64"


@pytest.mark.skipif(HAS_OPTIMUM, reason="optimum-onnx imports here")
def test_auto_backend_falls_back_to_torch_and_says_so(tmp_path, model_dirs, caplog):
    with caplog.at_level(logging.INFO, logger="hf_distill.export.core"):
        result = export_onnx(model_dirs["sequence-classification"], tmp_path / "onnx", quantize=False)
    assert result.backend == "torch" and "optimum-onnx does not import" in result.backend_reason
    assert "ONNX export backend: torch" in caplog.text


@pytest.mark.skipif(HAS_OPTIMUM, reason="optimum-onnx imports here")
def test_optimum_backend_missing_gives_the_fix(model_dirs):
    with pytest.raises(ImportError, match="optimum-onnx does not import.*backend='torch'"):
        export_onnx(model_dirs["sequence-classification"], backend="optimum")


# ----------------------------------------------------------------------------------------------------------
# Report and scripts
# ----------------------------------------------------------------------------------------------------------
def test_benchmark_report(tmp_path, torch_exports, model_dirs, tokenizer):
    teacher = save_model(build_model("sequence-classification", tokenizer, seed=1, num_hidden_layers=3),
                         tokenizer, tmp_path / "teacher")
    texts = ["a good film", "boring .", "the worst movie", "a great story", "dull and slow"]
    rows = benchmark_models(model_dirs["sequence-classification"], teacher_dir=teacher,
                            onnx_dir=torch_exports["sequence-classification"].output_dir, eval_texts=texts,
                            eval_labels=[1, 0, "negative", "positive", 0], batch_sizes=(1, 8), sequence_length=32,
                            warmup=1, runs=5, threads=1)
    assert [row.name for row in rows] == ["teacher fp32 PyTorch", "student fp32 PyTorch", "student fp32 ONNX",
                                          "student int8 ONNX"]
    assert all(0.0 <= row.accuracy <= 1.0 and set(row.latency_ms) == {"batch_1", "batch_8"} for row in rows)
    assert rows[1].accuracy == rows[2].accuracy  # fp32 ONNX predicts what fp32 PyTorch predicts
    assert rows[3].size_mb < rows[2].size_mb and rows[0].num_parameters > rows[1].num_parameters
    paths = write_report(tmp_path / "report", rows)
    report = json.loads(paths["json"].read_text())
    assert report["threads"] == 1 and report["backend"] == "torch" and report["sequence_length"] == 32
    assert report["rows"][3]["latency_ms"]["batch_1"]["runs"] == 5
    assert "int8_speedup_vs_teacher_batch_1" in report["summary"]
    markdown = paths["markdown"].read_text()
    assert "| student int8 ONNX |" in markdown and "threads = 1" in markdown
    # A user's report states measurements; the project's benchmark goals are not the user's.
    assert "goals" not in report and not any(word in markdown.lower() for word in ("goal", "met:", "target"))
    assert paths["plot"].read_bytes()[:4] == b"\x89PNG"


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_export_script_with_report(tmp_path, model_dirs):
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("\n".join(json.dumps({"text": text, "label": label})
                                   for text, label in [("a good film", 1), ("boring .", 0)]) + "\n")
    assert load_eval_jsonl(eval_file) == (["a good film", "boring ."], [1, 0])
    result = _load_script("export_onnx").main([
        "--model_dir", str(model_dirs["sequence-classification"]), "--output_dir", str(tmp_path / "onnx"),
        "--backend", "torch", "--teacher", str(model_dirs["sequence-classification"]), "--eval_file", str(eval_file),
        "--report_dir", str(tmp_path / "report"), "--batch_sizes", "1", "--sequence_length", "16", "--runs", "3",
        "--warmup", "1", "--int8_max_accuracy_drop", "50", "--int8_min_agreement", "0.5"])
    assert result.backend == "torch" and (tmp_path / "onnx" / "model_quantized.onnx").is_file()
    int8 = result.parity["int8"]  # judged on the eval file's rows, with the flag's limit
    assert int8.inputs == "eval_dataset (2 rows)" and int8.max_accuracy_drop == 50.0 and result.int8_accepted
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert len(report["rows"]) == 4 and report["rows"][0]["accuracy"] is not None


# ----------------------------------------------------------------------------------------------------------
# Optimum path (runs only where optimum-onnx imports: the transformers 4.57 environment)
# ----------------------------------------------------------------------------------------------------------
ORT_CLASSES = {"sequence-classification": "ORTModelForSequenceClassification",
               "token-classification": "ORTModelForTokenClassification",
               "question-answering": "ORTModelForQuestionAnswering",
               "causal-lm": "ORTModelForCausalLM"}


@pytest.mark.parametrize("task", TASKS)
def test_optimum_export_each_task(task, tmp_path, model_dirs, caplog):
    pytest.importorskip("optimum.onnxruntime")
    with caplog.at_level(logging.INFO, logger="hf_distill.export.core"):
        result = export_onnx(model_dirs[task], tmp_path / "onnx")  # backend="auto" must pick Optimum here
    assert result.backend == "optimum" and "ONNX export backend: optimum" in caplog.text
    assert result.parity["fp32"].passed and result.parity["fp32"].max_abs_diff <= 1e-4
    assert result.parity["int8"].passed and result.int8_size_bytes < 0.5 * result.fp32_size_bytes
    if task == "causal-lm":
        assert result.with_past
    info = json.loads((result.output_dir / "export_info.json").read_text())
    assert info["backend"] == "optimum" and info["quantization_preset"] == detect_quantization_preset()
    assert load_onnx_pipeline(result.output_dir).task == task
    # Optimum's own runtime on the files, against PyTorch (not against this package's pipeline)
    import torch

    model_class = getattr(pytest.importorskip("optimum.onnxruntime"), ORT_CLASSES[task])
    fp32 = model_class.from_pretrained(result.output_dir)
    int8 = model_class.from_pretrained(result.output_dir, file_name="model_quantized.onnx")
    reference = getattr(transformers, ORT_CLASSES[task].replace("ORTModel", "AutoModel")).from_pretrained(
        model_dirs[task]).eval()
    encoded = build_tokenizer()(["the film is good"], return_tensors="pt")
    if task == "causal-lm":
        encoded.pop("token_type_ids", None)
    first_output = "start_logits" if task == "question-answering" else "logits"
    with torch.inference_mode():
        expected = reference(**encoded)[first_output]
    scale = float(expected.abs().max())
    assert torch.allclose(fp32(**encoded)[first_output], expected, atol=1e-4 * scale)
    assert float((int8(**encoded)[first_output] - expected).abs().max()) <= 0.5 * scale


@pytest.mark.parametrize("task", TASKS)
def test_torch_export_folder_loads_in_optimum(task, torch_exports, model_dirs, tokenizer):
    """The torch.onnx fallback writes the layout Optimum's ORTModelFor* classes load, fp32 and int8."""
    onnxruntime_module = pytest.importorskip("optimum.onnxruntime")
    import torch

    folder = torch_exports[task].output_dir
    model_class = getattr(onnxruntime_module, ORT_CLASSES[task])
    fp32 = model_class.from_pretrained(folder)
    int8 = model_class.from_pretrained(folder, file_name="model_quantized.onnx")
    reference = getattr(transformers, ORT_CLASSES[task].replace("ORTModel", "AutoModel")).from_pretrained(
        model_dirs[task])
    inputs = tokenizer(["the film is good", "boring"], padding=True, return_tensors="pt")
    if task == "causal-lm":
        inputs.pop("token_type_ids")
        prompt = tokenizer(["the film"], return_tensors="pt", return_token_type_ids=False, add_special_tokens=False)
        expected_ids = reference.generate(**prompt, max_new_tokens=4, do_sample=False)
        assert torch.equal(fp32.generate(**prompt, max_new_tokens=4, do_sample=False), expected_ids)
    first_output = "start_logits" if task == "question-answering" else "logits"
    with torch.inference_mode():
        expected = reference(**inputs)[first_output]
    mask = inputs["attention_mask"].bool()
    actual = fp32(**inputs)[first_output]
    if task != "sequence-classification":
        expected, actual = expected[mask], actual[mask]
    assert torch.allclose(expected, actual, atol=1e-4)
    assert int8(**inputs)[first_output].shape == fp32(**inputs)[first_output].shape

