"""Teachers: one way to load them (safetensors only), and the vocabulary check for every task."""

import pytest
import torch
from safetensors.torch import save_file

from hf_distill import DistillationTrainer, load_teacher
from hf_distill.teachers import check_vocabularies
from tiny_models import distill_args, sentiment_dataset, tiny_bert


def _pickle_only_folder(tmp_path, model):
    folder = tmp_path / "teacher"
    model.save_pretrained(folder)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    return folder


def test_a_teacher_folder_with_only_pickle_weights_is_refused_unless_allowed(tmp_path):
    teacher = tiny_bert(seed=1)
    folder = _pickle_only_folder(tmp_path, teacher)
    with pytest.raises(ValueError, match="pytorch_model.bin.*safetensors"):
        load_teacher(str(folder), "sequence-classification")
    data, tokenizer = sentiment_dataset(8)
    with pytest.raises(ValueError, match="--allow_pickle_weights"):
        DistillationTrainer(tiny_bert(seed=2), str(folder), distill_args(tmp_path / "run"), train_dataset=data,
                            processing_class=tokenizer)
    loaded = load_teacher(str(folder), "sequence-classification", allow_pickle_weights=True)
    for name, value in teacher.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


def test_a_safetensors_teacher_folder_loads_with_its_weights(tmp_path):
    teacher = tiny_bert(seed=1)
    teacher.save_pretrained(tmp_path / "teacher")
    save_file({"x": torch.zeros(1)}, tmp_path / "unrelated.safetensors")  # no effect: only the folder's files count
    loaded = load_teacher(str(tmp_path / "teacher"), "sequence-classification")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in teacher.state_dict().items())


@pytest.mark.parametrize("task", ["sequence-classification", "token-classification", "question-answering"])
def test_a_student_with_another_vocabulary_is_refused_before_training_for_every_task(tmp_path, task):
    data, tokenizer = sentiment_dataset(8)  # token ids below 64, the teacher's vocabulary
    teacher = tiny_bert(task, seed=1, vocab_size=len(tokenizer))
    student = tiny_bert(task, seed=2, vocab_size=30522)  # e.g. a --student folder with bert-base-uncased's vocabulary
    with pytest.raises(ValueError, match=f"input embeddings differ \\({len(tokenizer)} teacher rows vs 30522"):
        DistillationTrainer(student, teacher, distill_args(tmp_path), train_dataset=data, processing_class=tokenizer)


def test_different_tokenizers_are_refused_and_teacher_inputs_of_its_own_are_accepted(tmp_path):
    data, tokenizer = sentiment_dataset(8)
    other, _ = sentiment_dataset(8)
    other_tokenizer = type(tokenizer)(tokenizer_object=tokenizer.backend_tokenizer)
    other_tokenizer.add_tokens(["zzzz"])
    with pytest.raises(ValueError, match="tokenizers differ"):
        check_vocabularies(None, tiny_bert(), other_tokenizer, tokenizer)
    teacher, student = tiny_bert(seed=1, vocab_size=80), tiny_bert(seed=2, vocab_size=64)
    with_teacher_ids = data.map(lambda row: {"teacher_input_ids": row["input_ids"]})
    DistillationTrainer(student, teacher, distill_args(tmp_path), train_dataset=with_teacher_ids,
                        processing_class=tokenizer)  # the teacher reads its own ids: no refusal
