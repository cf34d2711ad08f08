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

from hf_distill.export import (ParityError, UnsupportedTaskError, benchmark_models, detect_task,  # noqa: E402
                               export_onnx, load_eval_jsonl, write_report)
from hf_distill.export import optimum_backend, torch_backend  # noqa: E402
from hf_distill.export.quantization import detect_quantization_preset  # noqa: E402
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


TASKS = ["sequence-classification", "token-classification", "question-answering", "text-generation"]


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
    assert int8.passed and int8.max_abs_diff <= int8.atol
    assert result.int8_size_bytes < 0.5 * result.fp32_size_bytes
    assert result.quantization_preset == detect_quantization_preset()
    info = json.loads((result.output_dir / "export_info.json").read_text())
    assert info["backend"] == "torch" and info["task"] == task and "/" not in info["model_path"]


def test_causal_lm_export_has_past_key_values(torch_exports):
    result = torch_exports["text-generation"]
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

    generated = load_onnx_pipeline(torch_exports["text-generation"].output_dir, quantized=False)(
        "the film", max_new_tokens=5)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dirs["text-generation"])
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
    with pytest.raises(ParityError, match=r"int8 .*int8_parity_atol"):
        export_onnx(model_dirs["sequence-classification"], tmp_path / "int8", backend="torch", int8_parity_atol=1e-9)
    assert issubclass(ParityError, ValueError)


def test_unknown_backend(model_dirs):
    with pytest.raises(ValueError, match="backend must be one of"):
        export_onnx(model_dirs["sequence-classification"], backend="tensorrt")


def test_task_detection():
    assert detect_task({"architectures": ["DistilBertForSequenceClassification"]}) == "sequence-classification"
    assert detect_task({"architectures": ["GPT2LMHeadModel"]}) == "text-generation"
    assert detect_task({"architectures": ["LlamaForCausalLM"]}) == "text-generation"
    with pytest.raises(UnsupportedTaskError):
        detect_task({"architectures": None})


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
        "--warmup", "1"])
    assert result.backend == "torch" and (tmp_path / "onnx" / "model_quantized.onnx").is_file()
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert len(report["rows"]) == 4 and report["rows"][0]["accuracy"] is not None


# ----------------------------------------------------------------------------------------------------------
# Optimum path (runs only where optimum-onnx imports: the transformers 4.57 environment)
# ----------------------------------------------------------------------------------------------------------
ORT_CLASSES = {"sequence-classification": "ORTModelForSequenceClassification",
               "token-classification": "ORTModelForTokenClassification",
               "question-answering": "ORTModelForQuestionAnswering",
               "text-generation": "ORTModelForCausalLM"}


@pytest.mark.parametrize("task", TASKS)
def test_optimum_export_each_task(task, tmp_path, model_dirs, caplog):
    pytest.importorskip("optimum.onnxruntime")
    with caplog.at_level(logging.INFO, logger="hf_distill.export.core"):
        result = export_onnx(model_dirs[task], tmp_path / "onnx")  # backend="auto" must pick Optimum here
    assert result.backend == "optimum" and "ONNX export backend: optimum" in caplog.text
    assert result.parity["fp32"].passed and result.parity["fp32"].max_abs_diff <= 1e-4
    assert result.parity["int8"].passed and result.int8_size_bytes < 0.5 * result.fp32_size_bytes
    if task == "text-generation":
        assert result.with_past
    info = json.loads((result.output_dir / "export_info.json").read_text())
    assert info["backend"] == "optimum" and info["quantization_preset"] == detect_quantization_preset()
    pipe = load_onnx_pipeline(result.output_dir)
    assert pipe.task == task
    int8 = getattr(pytest.importorskip("optimum.onnxruntime"), ORT_CLASSES[task]).from_pretrained(
        result.output_dir, file_name="model_quantized.onnx")
    encoded = pipe.tokenizer(["the film is good"], return_tensors="pt")
    if task == "text-generation":
        encoded.pop("token_type_ids", None)
    first_output = "start_logits" if task == "question-answering" else "logits"
    assert np.allclose(int8(**encoded)[first_output].numpy(), pipe.run(**encoded)[first_output], atol=1e-5)


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
    if task == "text-generation":
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

