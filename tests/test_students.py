"""Students copied from their teacher, and the BERT -> DistilBERT conversion."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import transformers as tf
from datasets import Dataset

from hf_distill.students import bert_to_distilbert, create_student, select_layers

VOCAB, LAYERS = 64, 3
LABELS = {0: "neg", 1: "neu", 2: "pos"}


def _bert_like(config_class, **extra):
    return config_class(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=40,
        **extra,
    )


CONFIGS = {
    "bert": lambda: _bert_like(tf.BertConfig),
    "roberta": lambda: _bert_like(tf.RobertaConfig, pad_token_id=1),
    "distilbert": lambda: tf.DistilBertConfig(vocab_size=VOCAB, dim=16, n_layers=LAYERS, n_heads=2, hidden_dim=32),
    "gpt2": lambda: tf.GPT2Config(
        vocab_size=VOCAB, n_embd=16, n_layer=LAYERS, n_head=2, n_positions=40, bos_token_id=0, eos_token_id=0, pad_token_id=0
    ),
    "llama": lambda: tf.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=40,
        pad_token_id=0,
    ),
}

CASES = [
    ("bert", "BertForSequenceClassification"),
    ("bert", "BertForTokenClassification"),
    ("bert", "BertForQuestionAnswering"),
    ("bert", "BertForMaskedLM"),
    ("roberta", "RobertaForSequenceClassification"),
    ("roberta", "RobertaForMaskedLM"),
    ("distilbert", "DistilBertForSequenceClassification"),
    ("distilbert", "DistilBertForQuestionAnswering"),
    ("gpt2", "GPT2LMHeadModel"),
    ("gpt2", "GPT2ForSequenceClassification"),
    ("gpt2", "GPT2ForTokenClassification"),
    ("llama", "LlamaForCausalLM"),
    ("llama", "LlamaForSequenceClassification"),
    ("llama", "LlamaForTokenClassification"),
    ("llama", "LlamaForQuestionAnswering"),
]


def _teacher(family: str, class_name: str, **config_changes):
    torch.manual_seed(0)
    config = CONFIGS[family]()
    config.id2label, config.label2id = dict(LABELS), {v: k for k, v in LABELS.items()}
    if "QuestionAnswering" in class_name:
        config.num_labels = 2
    for name, value in config_changes.items():
        setattr(config, name, value)
    return getattr(tf, class_name)(config).eval()


def _inputs():
    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _outputs(model, **extra):
    with torch.no_grad():
        out = model(**_inputs(), output_hidden_states=True, **extra)
    return {key: value for key, value in out.items() if key != "past_key_values"}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        values_a = a[key] if isinstance(a[key], tuple) else (a[key],)
        values_b = b[key] if isinstance(b[key], tuple) else (b[key],)
        assert len(values_a) == len(values_b), key
        for x, y in zip(values_a, values_b):
            assert torch.equal(x, y), key


@pytest.mark.parametrize("family,class_name", CASES)
def test_all_layers_reproduce_teacher_exactly(family, class_name):
    teacher = _teacher(family, class_name)
    student = create_student(teacher)
    assert type(student) is type(teacher) and not student.training
    assert student.config.num_hidden_layers == LAYERS
    assert student.config.id2label == teacher.config.id2label
    _assert_same(_outputs(teacher), _outputs(student))


@pytest.mark.parametrize("family,class_name", [c for c in CASES if "Sequence" in c[1] or "LM" in c[1]])
def test_chosen_layers_and_heads_are_copied(family, class_name):
    teacher = _teacher(family, class_name)
    student = create_student(teacher, layers=[2, 0])
    assert student.config.num_hidden_layers == 2
    teacher_state, student_state = teacher.state_dict(), student.state_dict()
    block_list = {"bert": "encoder.layer", "roberta": "encoder.layer", "distilbert": "transformer.layer"}.get(
        family, "h" if family == "gpt2" else "layers"
    )
    moved = 0
    for key, value in student_state.items():
        marker = f"{block_list}."
        if marker in key:
            head, rest = key.split(marker, 1)
            index, leaf = rest.split(".", 1)
            source = f"{head}{marker}{[2, 0][int(index)]}.{leaf}"
            moved += 1
        else:
            source = key  # embeddings, final norms, pooler and heads
        assert torch.equal(value, teacher_state[source]), key
    assert moved > 0
    head_keys = [k for k in student_state if k.split(".")[0] in {"classifier", "score", "lm_head", "cls", "pre_classifier"}]
    assert head_keys, "the head must be part of the copy"


def test_first_layers_give_the_teachers_first_hidden_states():
    teacher = _teacher("bert", "BertForSequenceClassification")
    student = create_student(teacher, num_layers=2, layers=[0, 1])
    full, short = _outputs(teacher)["hidden_states"], _outputs(student)["hidden_states"]
    assert len(short) == 3
    for a, b in zip(full[:3], short):
        assert torch.equal(a, b)


def test_select_layers():
    assert select_layers(12, 6) == [0, 2, 4, 7, 9, 11]  # DistilBERT's choice
    assert select_layers(12, 4) == [0, 4, 7, 11]
    assert select_layers(6, 4) == [0, 2, 3, 5]
    assert select_layers(5, 2) == [0, 4]
    assert select_layers(12, 1) == [0]
    assert select_layers(7, 7) == list(range(7))
    with pytest.raises(ValueError, match=r"1\.\.12"):
        select_layers(12, 13)


def test_default_student_is_evenly_spread_and_saves_as_plain_model(tmp_path):
    teacher = _teacher("bert", "BertForSequenceClassification")
    student = create_student(teacher, num_layers=2, hidden_dropout_prob=0.0)
    assert student.config.hidden_dropout_prob == 0.0 and teacher.config.hidden_dropout_prob == 0.1
    layer = student.bert.encoder.layer
    assert torch.equal(layer[0].output.dense.weight, teacher.bert.encoder.layer[0].output.dense.weight)
    assert torch.equal(layer[1].output.dense.weight, teacher.bert.encoder.layer[2].output.dense.weight)
    student.save_pretrained(tmp_path)
    reloaded = tf.BertForSequenceClassification.from_pretrained(tmp_path).eval()
    assert reloaded.config.num_hidden_layers == 2 and reloaded.config.id2label == LABELS
    assert torch.allclose(_outputs(reloaded)["logits"], _outputs(student)["logits"])


def test_dtype_and_layer_types_follow_the_teacher():
    teacher = _teacher("llama", "LlamaForCausalLM").double()
    teacher.config.layer_types = ["full_attention"] * LAYERS
    student = create_student(teacher, num_layers=2)
    assert next(student.parameters()).dtype == torch.float64
    assert student.config.layer_types == ["full_attention"] * 2


def test_create_student_errors():
    teacher = _teacher("bert", "BertForSequenceClassification")
    with pytest.raises(ValueError, match=r"1\.\.3"):
        create_student(teacher, num_layers=4)
    with pytest.raises(ValueError, match=r"1\.\.3"):
        create_student(teacher, num_layers=0)
    with pytest.raises(ValueError, match=r"0\.\.2"):
        create_student(teacher, layers=[0, 3])
    with pytest.raises(ValueError, match="num_layers=1 but 2 layers"):
        create_student(teacher, num_layers=1, layers=[0, 1])
    with pytest.raises(ValueError, match="config override"):
        create_student(teacher, num_layers=2, intermediate_size=64)
    electra = tf.ElectraModel(_bert_like(tf.ElectraConfig, embedding_size=16))
    with pytest.raises(ValueError, match="supports model types .* got 'electra'"):
        create_student(electra, num_layers=1)


# ---------------------------------------------------------------- BERT -> DistilBERT

EXACT_HEADS = ["BertModel", "BertForTokenClassification", "BertForQuestionAnswering", "BertForMaskedLM"]


def _eager_bert(class_name):
    return _teacher("bert", class_name, _attn_implementation="eager")


@pytest.mark.parametrize("class_name", EXACT_HEADS + ["BertForSequenceClassification"])
def test_bert_to_distilbert_hidden_states_match(class_name):
    bert = _eager_bert(class_name)
    distil = bert_to_distilbert(bert)
    assert type(distil).__name__ == class_name.replace("Bert", "DistilBert")
    assert distil.config.model_type == "distilbert" and distil.config.n_layers == LAYERS
    assert distil.config.id2label == bert.config.id2label and not distil.training
    a, b = _outputs(bert, output_attentions=True), _outputs(distil, output_attentions=True)
    real = _inputs()["attention_mask"].bool()
    for x, y in zip(a["hidden_states"], b["hidden_states"]):
        assert torch.allclose(x[real], y[real], atol=1e-5)
    for x, y in zip(a["attentions"], b["attentions"]):
        assert torch.allclose(x, y, atol=1e-5)
    for key in ("logits", "start_logits", "end_logits"):
        if key in a and class_name in EXACT_HEADS:
            assert torch.allclose(a[key], b[key], atol=1e-5), key


def test_bert_to_distilbert_sequence_classification_head():
    bert = _eager_bert("BertForSequenceClassification")
    distil = bert_to_distilbert(bert)
    assert torch.equal(distil.pre_classifier.weight, bert.bert.pooler.dense.weight)
    assert torch.equal(distil.classifier.weight, bert.classifier.weight)
    hidden = _outputs(distil)["hidden_states"][-1][:, 0]
    pooled = distil.pre_classifier(hidden)
    with torch.no_grad():
        # DistilBERT applies ReLU where BERT's pooler applies tanh: documented, not equal.
        assert torch.allclose(_outputs(distil)["logits"], distil.classifier(torch.relu(pooled)), atol=1e-6)
        assert torch.allclose(_outputs(bert)["logits"], bert.classifier(torch.tanh(pooled)), atol=1e-5)


def test_bert_to_distilbert_multiple_choice():
    bert = _eager_bert("BertForMultipleChoice")
    distil = bert_to_distilbert(bert)
    assert type(distil).__name__ == "DistilBertForMultipleChoice"
    assert torch.equal(distil.pre_classifier.weight, bert.bert.pooler.dense.weight)
    choices = {key: value[:, None].repeat(1, 2, 1) for key, value in _inputs().items()}
    with torch.no_grad():
        a = bert(**choices, output_hidden_states=True).hidden_states[-1]
        b = distil(**choices, output_hidden_states=True).hidden_states[-1]
    real = choices["attention_mask"].reshape(-1, 7).bool()
    assert torch.allclose(a[real], b[real], atol=1e-5)


def test_bert_to_distilbert_of_a_student_and_mlm_tying():
    bert = _eager_bert("BertForMaskedLM")
    student = bert_to_distilbert(create_student(bert, num_layers=2))
    assert student.config.n_layers == 2
    assert torch.equal(student.vocab_projector.weight, student.distilbert.embeddings.word_embeddings.weight)
    expected = bert.bert.embeddings.position_embeddings.weight + bert.bert.embeddings.token_type_embeddings.weight[0]
    assert torch.equal(student.distilbert.embeddings.position_embeddings.weight, expected)


def test_bert_to_distilbert_errors():
    with pytest.raises(ValueError, match="supports BERT models"):
        bert_to_distilbert(_teacher("roberta", "RobertaForMaskedLM"))
    with pytest.raises(ValueError, match="supports BERT models"):
        bert_to_distilbert(tf.BertForPreTraining(_bert_like(tf.BertConfig)))
    with pytest.raises(ValueError, match="encoder-only"):
        bert_to_distilbert(tf.BertForMaskedLM(_bert_like(tf.BertConfig, is_decoder=True)))


# ---------------------------------------------------------------- what the README says about them

README = Path(__file__).resolve().parents[1] / "README.md"


def _twelve_layer_bert():
    torch.manual_seed(0)
    config = _bert_like(tf.BertConfig, attn_implementation="eager")
    config.num_hidden_layers = 12
    return tf.BertForSequenceClassification(config).eval()


def test_readme_names_the_blocks_create_student_keeps():
    teacher = _twelve_layer_bert()
    student = create_student(teacher, num_layers=6)
    kept = [
        next(i for i, block in enumerate(teacher.bert.encoder.layer)
             if torch.equal(block.output.dense.weight, layer.output.dense.weight))
        for layer in student.bert.encoder.layer
    ]
    assert kept == [0, 2, 4, 7, 9, 11]  # DistilBERT's choice, written out by hand
    lines = [line for line in README.read_text().splitlines() if "create_student(teacher, num_layers=6)" in line]
    assert lines and all("0,2,4,7,9,11" in line for line in lines), lines


def test_readme_says_bert_to_distilbert_changes_the_classification_head():
    text = README.read_text()
    shown = next(line for line in text.splitlines() if line.startswith("distil = bert_to_distilbert("))
    assert "same hidden states, new head" in shown
    paragraph = text[text.index(shown):text.index("### Loss terms")]
    assert "`tanh` pooler" in paragraph and "ReLU" in paragraph and "retrained" in paragraph


def test_bert_to_distilbert_keeps_hidden_states_and_the_recipe_retrains_the_head(tmp_path):
    from hf_distill import DistillationArguments, DistillationTrainer
    from hf_distill.data import synthetic_sentiment, synthetic_tokenizer

    teacher = _twelve_layer_bert()
    built = create_student(teacher, num_layers=6)
    student = bert_to_distilbert(built)
    with torch.no_grad():
        a, b = built(**_inputs(), output_hidden_states=True), student(**_inputs(), output_hidden_states=True)
    real = _inputs()["attention_mask"].bool()
    for x, y in zip(a.hidden_states, b.hidden_states):  # values of order 1: float rounding only
        assert (x[real] - y[real]).abs().max() < 2e-6
    assert (a.logits - b.logits).abs().max() > 1e-4  # tanh pooler vs ReLU pre_classifier: the head differs

    tokenizer = synthetic_tokenizer()
    rows = [{"text": r["text"], "label": r["label"]} for r in synthetic_sentiment(16, seed=0)]
    data = Dataset.from_list(rows).map(lambda r: tokenizer(r["text"], truncation=True, max_length=16,
                                                           return_token_type_ids=False), remove_columns=["text"])
    teacher.resize_token_embeddings(len(tokenizer))
    student.resize_token_embeddings(len(tokenizer))
    head = {n: p.detach().clone() for n, p in student.named_parameters() if n.split(".")[0] in ("pre_classifier", "classifier")}
    args = DistillationArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=8, learning_rate=1e-2,
                                 report_to=[], use_cpu=True, save_strategy="no", alpha=0.5, temperature=2.0,
                                 hidden_weight=1.0, hidden_loss="cosine", hidden_layer_map="last:1",
                                 hidden_include_embeddings=False, preflight=False, disable_tqdm=True)
    DistillationTrainer(student, teacher, args, train_dataset=data, processing_class=tokenizer).train()
    assert len(head) == 4
    for name, before in head.items():  # trained with the student: not frozen, in the optimizer
        assert not torch.equal(dict(student.named_parameters())[name].detach(), before), name


def test_a_student_with_every_teacher_block_is_flagged_as_a_copy():
    teacher = _teacher("bert", "BertForSequenceClassification")
    with pytest.warns(UserWarning, match="copy of the teacher, not smaller"):
        create_student(teacher, num_layers=teacher.config.num_hidden_layers)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        create_student(teacher, num_layers=teacher.config.num_hidden_layers - 1)
