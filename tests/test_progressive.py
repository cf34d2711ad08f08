"""Progressive distillation: each stage's trained model is the next stage's frozen teacher."""

from hf_distill.progressive import distill_progressively
from tiny_models import distill_args, sentiment_dataset, tiny_bert


def test_chain_teacher_assistant_student(tmp_path):
    data, tokenizer = sentiment_dataset(16)
    teacher = tiny_bert(layers=4, seed=0)
    assistant, student = tiny_bert(layers=3, seed=1), tiny_bert(layers=1, seed=2)
    trainers = distill_progressively(teacher, [assistant, student], distill_args(tmp_path, max_steps=2),
                                     train_dataset=data, processing_class=tokenizer)
    assert [t.model for t in trainers] == [assistant, student]
    def plain(model):  # a compiled teacher (torch_compile left on by an earlier trainer in this process) wraps it
        return getattr(model, "_orig_mod", model)

    assert plain(trainers[0].teacher) is teacher and plain(trainers[1].teacher) is assistant
    assert not any(p.requires_grad for p in assistant.parameters())  # frozen once it teaches
    assert any(p.requires_grad for p in student.parameters())
    for name in ("stage-0-assistant0", "stage-1-student"):
        assert (tmp_path / "out" / name / "model.safetensors").is_file()
        assert (tmp_path / "out" / name / "distillation" / "recipe.json").is_file()
