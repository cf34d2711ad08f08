"""Sentence-embedding distillation building blocks: the teacher's pooling, the student's sentence-transformers
files, the projection, the metrics, the encoder-task checks, and a short distillation of the shared MiniLM."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertModel

from hf_distill.data import synthetic_tokenizer
from hf_distill.losses.embeddings import embedding_loss
from hf_distill.sentence_embeddings import (
    EmbeddingProjection,
    EmbeddingTerm,
    PoolingSettings,
    build_embedding_term,
    check_encoder_task,
    embed,
    embedding_loss_sum,
    embedding_metrics,
    read_pooling,
    resolve_pooling,
    spearman,
    write_sentence_transformers_files,
)

from conftest import shared_data_dir

MINILM = shared_data_dir() / "models" / "all-MiniLM-L6-v2"
SST2 = shared_data_dir() / "sst2"
SENTENCES = ["the movie was great", "the plot was bad", "great acting", "bad bad bad"]


def _write(path, content) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content))


def _tiny_bert(cls=BertModel, hidden=32, seed=0):
    torch.manual_seed(seed)
    tokenizer = synthetic_tokenizer()
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=2 * hidden, max_position_embeddings=64)
    return cls(config).eval(), tokenizer


def _masked_mean(hidden, mask):
    """The mean of the real tokens, written out independently of hf_distill."""
    out = torch.zeros(hidden.shape[0], hidden.shape[2])
    for b in range(hidden.shape[0]):
        real = [t for t in range(hidden.shape[1]) if mask[b, t] == 1]
        out[b] = sum(hidden[b, t] for t in real) / len(real)
    return out


# ---------------------------------------------------------------- reading the teacher's pooling
def test_read_pooling_legacy_modules_json_with_normalize(tmp_path):
    _write(tmp_path / "modules.json", [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ])
    _write(tmp_path / "1_Pooling" / "config.json", {"word_embedding_dimension": 384, "pooling_mode_cls_token": False,
                                                    "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False})
    assert read_pooling(tmp_path) == PoolingSettings("mean", True)


def test_read_pooling_new_format_and_no_modules_json(tmp_path):
    _write(tmp_path / "a" / "modules.json", [{"idx": 1, "name": "1", "path": "pool", "type": "sentence_transformers.Pooling"}])
    _write(tmp_path / "a" / "pool" / "config.json", {"embedding_dimension": 8, "pooling_mode": "cls"})
    assert read_pooling(tmp_path / "a") == PoolingSettings("cls", False)
    _write(tmp_path / "b" / "1_Pooling" / "config.json", {"pooling_mode_max_tokens": True})
    assert read_pooling(tmp_path / "b") == PoolingSettings("max", False)
    (tmp_path / "b" / "2_Normalize").mkdir()
    assert read_pooling(tmp_path / "b") == PoolingSettings("max", True)


def test_read_pooling_refuses_what_it_cannot_reproduce(tmp_path):
    _write(tmp_path / "w" / "1_Pooling" / "config.json", {"pooling_mode_weightedmean_tokens": True})
    with pytest.raises(ValueError, match="weightedmean.*--embedding_pooling"):
        read_pooling(tmp_path / "w")
    _write(tmp_path / "d" / "modules.json", [{"path": "2_Dense", "type": "sentence_transformers.models.Dense"}])
    with pytest.raises(ValueError, match="Dense"):
        read_pooling(tmp_path / "d")


@pytest.mark.skipif(not MINILM.is_dir(), reason="../shared/data/models/all-MiniLM-L6-v2 is not staged")
def test_minilm_folder_without_pooling_files_asks_for_the_pooling():
    with pytest.raises(ValueError, match=r"no sentence-transformers pooling.*--embedding_pooling mean --embedding_normalize true"):
        read_pooling(MINILM)
    with pytest.raises(ValueError, match="--embedding_pooling mean"):
        resolve_pooling(MINILM)
    assert resolve_pooling(MINILM, "mean", True) == PoolingSettings("mean", True)


def test_resolve_pooling_explicit_settings_and_bad_input(tmp_path):
    _write(tmp_path / "1_Pooling" / "config.json", {"pooling_mode_cls_token": True})
    assert resolve_pooling(tmp_path) == PoolingSettings("cls", False)
    assert resolve_pooling(tmp_path, "mean", True) == PoolingSettings("mean", True)  # explicit wins
    with pytest.raises(ValueError, match="needs --embedding_pooling"):
        resolve_pooling(tmp_path, normalize=True)
    with pytest.raises(ValueError, match="not a local folder"):
        resolve_pooling("someone/some-hub-model")
    with pytest.raises(ValueError, match="--embedding_pooling"):
        PoolingSettings("weightedmean")


# ---------------------------------------------------------------- writing the student's files
@pytest.mark.parametrize("pooling", [PoolingSettings("mean", True), PoolingSettings("cls", False)])
def test_written_files_are_sentence_transformers_layout(tmp_path, pooling):
    write_sentence_transformers_files(tmp_path, pooling, embedding_dim=48, max_seq_length=128)
    modules = json.loads((tmp_path / "modules.json").read_text())
    types = [m["type"].rsplit(".", 1)[-1] for m in modules]
    assert types == (["Transformer", "Pooling", "Normalize"] if pooling.normalize else ["Transformer", "Pooling"])
    assert [m["path"] for m in modules][:2] == ["", "1_Pooling"]
    config = json.loads((tmp_path / "1_Pooling" / "config.json").read_text())
    assert config["word_embedding_dimension"] == 48
    assert config["pooling_mode_mean_tokens"] is (pooling.mode == "mean")
    assert config["pooling_mode_cls_token"] is (pooling.mode == "cls")
    assert config["pooling_mode_max_tokens"] is False
    assert json.loads((tmp_path / "sentence_bert_config.json").read_text())["max_seq_length"] == 128
    assert (tmp_path / "2_Normalize").is_dir() is pooling.normalize
    assert read_pooling(tmp_path) == pooling


def test_sentence_transformers_loads_the_written_student(tmp_path):
    st = pytest.importorskip("sentence_transformers", reason="sentence-transformers is not installed")
    model, tokenizer = _tiny_bert()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    write_sentence_transformers_files(tmp_path, PoolingSettings("mean", True), embedding_dim=32, max_seq_length=32)
    encoded = st.SentenceTransformer(str(tmp_path), device="cpu").encode(SENTENCES, convert_to_tensor=True)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        mean = _masked_mean(model(**batch).last_hidden_state, batch["attention_mask"])
    expected = mean / mean.norm(dim=-1, keepdim=True)
    assert torch.allclose(encoded.cpu(), expected, atol=1e-5)


# ---------------------------------------------------------------- embedding, projection, loss sum
@pytest.mark.parametrize("cls", [BertModel, BertForSequenceClassification])
def test_embed_mean_pools_the_last_hidden_state(cls):
    model, tokenizer = _tiny_bert(cls)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any()  # the batch is padded
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
        got = embed(model, batch, PoolingSettings("mean", False))
    assert torch.allclose(got, _masked_mean(out.hidden_states[-1], batch["attention_mask"]), atol=1e-6)


def test_embedding_projection_saves_apart_and_reloads(tmp_path):
    assert EmbeddingProjection.if_needed(384, 384) is None
    projection = EmbeddingProjection.if_needed(32, 48)
    x = torch.randn(5, 32)
    assert projection(x).shape == (5, 48)
    projection.save(tmp_path / "p.safetensors")
    assert torch.equal(EmbeddingProjection.load(tmp_path / "p.safetensors")(x), projection(x))
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not an EmbeddingProjection"):
        EmbeddingProjection.load(tmp_path / "other.safetensors")


def test_embedding_loss_sum_is_the_sum_of_per_example_losses():
    student, tokenizer = _tiny_bert(hidden=32, seed=1)
    teacher, _ = _tiny_bert(hidden=48, seed=2)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    mask = batch["attention_mask"]
    s_out, t_out = student(**batch), teacher(**batch)
    projection = EmbeddingProjection(32, 48)
    pooling = PoolingSettings("mean", True)
    got = embedding_loss_sum(s_out, t_out, mask, mask, pooling, "mse", projection)
    unit = lambda x: x / x.norm(dim=-1, keepdim=True)  # noqa: E731
    # The projection reads the student's embedding as the model gives it (pooled, normalised); MSE then
    # compares unit vectors, since the pooling normalises.
    s = unit(projection(unit(_masked_mean(s_out.last_hidden_state, mask))))
    t = unit(_masked_mean(t_out.last_hidden_state, mask))
    assert torch.allclose(got, ((s - t) ** 2).mean(-1).sum(), atol=1e-6)
    got.backward()
    assert projection.linear.weight.grad is not None and student.encoder.layer[0].output.dense.weight.grad is not None
    with pytest.raises(ValueError, match="EmbeddingProjection"):
        embedding_loss_sum(s_out, t_out, mask, mask, pooling)


# ---------------------------------------------------------------- metrics
def test_spearman_by_hand():
    assert spearman(torch.tensor([1.0, 2, 3, 4]), torch.tensor([10.0, 20, 35, 40])) == pytest.approx(1.0)
    assert spearman(torch.tensor([1.0, 2, 3, 4]), torch.tensor([4.0, 3, 2, 1])) == pytest.approx(-1.0)
    # ties: ranks x = (1, 2.5, 2.5, 4), y = (1, 3, 2, 4): 4.5 / sqrt(4.5 * 5)
    assert spearman(torch.tensor([1.0, 2, 2, 3]), torch.tensor([1.0, 3, 2, 4])) == pytest.approx(4.5 / math.sqrt(22.5))
    assert math.isnan(spearman(torch.tensor([1.0, 1, 1]), torch.tensor([1.0, 2, 3])))


def test_embedding_metrics_on_hand_made_vectors():
    teacher = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])  # pair cosines (0,1) 0.6, (0,2) 0, (1,2) 0.8
    same = embedding_metrics(teacher * 3, teacher)
    assert same["mean_cosine"] == pytest.approx(1.0) and same["similarity_spearman"] == pytest.approx(1.0)
    rotated = teacher @ torch.tensor([[0.0, 1.0], [-1.0, 0.0]])  # 90°: each vector orthogonal to its teacher
    turned = embedding_metrics(rotated, teacher)
    assert turned["mean_cosine"] == pytest.approx(0.0, abs=1e-7) and turned["similarity_spearman"] == pytest.approx(1.0)
    # pair cosines 0, 0.6, 0.8 against 0.6, 0, 0.8: ranks (1, 2, 3) vs (2, 1, 3) give 0.5; cosines 1, 0.8, 0.8
    swapped = embedding_metrics(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]), teacher)
    assert swapped["similarity_spearman"] == pytest.approx(0.5)
    assert swapped["mean_cosine"] == pytest.approx(2.6 / 3)
    wider = embedding_metrics(torch.cat([teacher, torch.zeros(3, 2)], 1), teacher)
    assert "mean_cosine" not in wider and wider["similarity_spearman"] == pytest.approx(1.0)


# ---------------------------------------------------------------- tasks without logits
def test_check_encoder_task():
    assert check_encoder_task("feature-extraction", {"hidden": 1.0, "attention": 0.0, "kd": 0}) == {"hidden": 1.0}
    assert check_encoder_task("sentence-embedding", {"embedding": 1.0, "hidden": 0.5}) == {"embedding": 1.0, "hidden": 0.5}
    with pytest.raises(ValueError, match="logit terms \\['kd'\\]"):
        check_encoder_task("feature-extraction", {"hidden": 1.0, "kd": 0.5})
    with pytest.raises(ValueError, match="--hidden_weight, --attention_weight or --relation_weight"):
        check_encoder_task("feature-extraction", {"hidden": 0.0})
    with pytest.raises(ValueError, match="--embedding_weight"):
        check_encoder_task("sentence-embedding", {"hidden": 1.0})
    with pytest.raises(ValueError, match="logit terms \\['ce'\\]"):
        check_encoder_task("sentence-embedding", {"embedding": 1.0, "ce": 1.0})


# ---------------------------------------------------------------- the shared MiniLM
@pytest.mark.skipif(not MINILM.is_dir() or not (SST2 / "train.jsonl").is_file(),
                    reason="../shared/data (all-MiniLM-L6-v2, sst2) is not staged")
def test_minilm_three_layer_student_moves_toward_the_teacher():
    from transformers import AutoModel, AutoTokenizer

    from hf_distill import create_student

    start, threads = time.time(), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        tokenizer = AutoTokenizer.from_pretrained(MINILM)
        teacher = AutoModel.from_pretrained(MINILM).eval()
        student = create_student(teacher, num_layers=3)  # a bare BertModel: blocks [0, 3, 5] copied
        assert type(student) is BertModel and student.config.num_hidden_layers == 3
        pooling = PoolingSettings("mean", True)  # the model card's pooling

        def sentences(split: str, n: int) -> list[str]:
            with open(SST2 / f"{split}.jsonl") as f:
                return [json.loads(line)["text"] for line, _ in zip(f, range(n))]

        def batch(texts):
            return tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")

        held_out = batch(sentences("validation", 64))
        with torch.no_grad():
            target = embed(teacher, held_out, pooling)

        def metrics():
            student.eval()
            with torch.no_grad():
                result = embedding_metrics(embed(student, held_out, pooling), target)
            student.train()
            return result

        before = metrics()
        student.embeddings.requires_grad_(False)  # the 11.7M embedding parameters stay the teacher's: a faster step
        optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=2e-4)
        train = sentences("train", 8 * 30)
        for step in range(30):
            inputs = batch(train[8 * step: 8 * step + 8])
            with torch.no_grad():
                teacher_embeddings = embed(teacher, inputs, pooling)
            loss = embedding_loss(embed(student, inputs, pooling), teacher_embeddings, "cosine").mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        after = metrics()
    finally:
        torch.set_num_threads(threads)
    print(f"MiniLM 3-layer student, 64 held-out SST-2 sentences: before {before}, after {after}, "
          f"{time.time() - start:.1f} s")
    assert after["mean_cosine"] > before["mean_cosine"] + 0.05
    assert after["similarity_spearman"] > before["similarity_spearman"]


def test_embedding_term_sums_collects_saves_and_restores(tmp_path):
    student, tokenizer = _tiny_bert(hidden=32, seed=1)
    teacher, _ = _tiny_bert(hidden=48, seed=2)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    mask = batch["attention_mask"]
    term = EmbeddingTerm(PoolingSettings("mean", False), student_width=32, teacher_width=48, loss="cosine")
    assert isinstance(term.projection, EmbeddingProjection) and len(list(term.parameters())) == 2
    with torch.no_grad():
        s_out, t_out = student(**batch), teacher(**batch)
        sums = term(s_out, t_out, mask, mask, collect=True)
        term(s_out, t_out, mask, mask, collect=True)  # a second batch: the same 4 sentences
    s = term.projection(_masked_mean(s_out.last_hidden_state, mask))
    t = _masked_mean(t_out.last_hidden_state, mask)
    expected = (1 - (s * t).sum(-1) / (s.norm(dim=-1) * t.norm(dim=-1))).sum()
    assert set(sums) == {"embedding"} and torch.allclose(sums["embedding"], expected.detach(), atol=1e-6)
    metrics = term.pop_metrics("eval")
    assert set(metrics) == {"eval_mean_cosine", "eval_similarity_spearman"}
    cos = ((s * t).sum(-1) / (s.norm(dim=-1) * t.norm(dim=-1))).detach()
    assert metrics["eval_mean_cosine"] == pytest.approx(float(cos.mean()), abs=1e-6)
    assert term.pop_metrics("eval") == {}  # cleared
    term.save(tmp_path, max_seq_length=32)
    assert read_pooling(tmp_path) == PoolingSettings("mean", False)
    restored = EmbeddingTerm(PoolingSettings("mean", False), 32, 48)
    assert not torch.equal(restored.projection.linear.weight, term.projection.linear.weight)
    restored.load(tmp_path)
    assert torch.equal(restored.projection.linear.weight, term.projection.linear.weight)
    assert EmbeddingTerm(PoolingSettings(), 48, 48).projection is None
    with pytest.raises(ValueError, match="--embedding_loss"):
        EmbeddingTerm(PoolingSettings(), 48, 48, loss="kl")


def test_build_embedding_term_for_the_trainer(tmp_path):
    from types import SimpleNamespace

    student, _ = _tiny_bert(hidden=32, seed=1)
    teacher, _ = _tiny_bert(hidden=48, seed=2)
    args = SimpleNamespace(hidden_weight=0.0, attention_weight=0.0, relation_weight=0.0, embedding_weight=2.0,
                           embedding_loss="mse", embedding_pooling="cls", embedding_normalize=False)
    assert build_embedding_term("sequence-classification", args, student, teacher, None) is None
    term = build_embedding_term("sentence-embedding", args, student, teacher, None)
    assert (term.pooling, term.loss, term.weight) == (PoolingSettings("cls", False), "mse", 2.0)
    assert (term.projection.student_dim, term.projection.teacher_dim) == (32, 48)
    with pytest.raises(ValueError, match="--hidden_weight, --attention_weight or --relation_weight"):
        build_embedding_term("feature-extraction", args, student, teacher, None)
    assert build_embedding_term("feature-extraction", SimpleNamespace(**{**vars(args), "hidden_weight": 1.0}),
                                student, teacher, None) is None
    with pytest.raises(ValueError, match="needs a live teacher"):
        build_embedding_term("sentence-embedding", args, student, None, None)
    no_pooling = SimpleNamespace(**{**vars(args), "embedding_pooling": None, "embedding_normalize": None})
    with pytest.raises(ValueError, match="--embedding_pooling mean --embedding_normalize true"):
        build_embedding_term("sentence-embedding", no_pooling, student, teacher, str(tmp_path))
    write_sentence_transformers_files(tmp_path, PoolingSettings("max", True), 48)
    assert build_embedding_term("sentence-embedding", no_pooling, student, teacher, str(tmp_path)).pooling == PoolingSettings("max", True)
