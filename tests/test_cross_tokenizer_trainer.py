"""Cross-tokenizer mode of DistillationTrainer (hf_distill.cross_tokenizer, hf_distill.lm.cross_tokenizer_data).

Tokenizers are trained here with the `tokenizers` library on generated sentences (byte-level BPE, WordPiece);
the end-to-end test uses the stories260K teacher and its SentencePiece tokenizer from ../shared/data.
"""

from __future__ import annotations

import logging
import math
import random
from pathlib import Path

import pytest
import torch
from conftest import shared_data_dir
from single_thread import one_thread  # noqa: F401
from tiny_models import distill_args, tiny_bert, tiny_gpt2

from hf_distill import DistillationTrainer
from hf_distill.lm.cross_tokenizer_data import tokenize_aligned
from hf_distill.lm.data import CompletionCollator, tokenize_completions
from hf_distill.teachers import check_vocabularies

WORDS = ("the cat dog bird sun moon tree house river small big red blue green happy sad ran jumped saw found "
         "little girl boy played with ball under over near far away day night Tom Lily said hello 3 12 2024").split()
STORIES = shared_data_dir() / "models" / "stories260K"


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 10))]
        out.append(" ".join(words).capitalize() + rng.choice([".", "!", " ?", ", ok."]))
    return out


def byte_bpe(vocab_size: int, corpus: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>", pad_token="<pad>")


def wordpiece(vocab_size: int, corpus: list[str], normalizer=None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    raw.decoder = decoders.WordPiece()
    if normalizer is not None:
        raw.normalizer = normalizer
    raw.train_from_iterator(corpus, trainers.WordPieceTrainer(vocab_size=vocab_size,
                                                              special_tokens=["[PAD]", "[UNK]", "[SEP]"]))
    return PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", pad_token="[PAD]", eos_token="[SEP]")


def rows(n: int, seed: int = 0) -> list[dict]:
    return [{"prompt": text.split(" ", 1)[0], "completion": " " + text.split(" ", 1)[1]} for text in sentences(n, seed)]


@pytest.fixture(scope="module")
def toks() -> dict:
    corpus = sentences(300, seed=1)
    return {"bpe": byte_bpe(260 + 40, corpus), "wp": wordpiece(120, corpus)}


def _gpt2(tokenizer, seed: int, layers: int = 2):
    return tiny_gpt2(layers=layers, vocab_size=len(tokenizer), seed=seed)


# ------------------------------------------------------------------------------------------------ the loss
@pytest.mark.parametrize("alpha,temperature,scaled", [(0.3, 2.0, True), (1.0, 1.0, True), (0.6, 2.0, False)])
def test_identical_tokenizers_give_exactly_the_same_tokenizer_loss_and_gradients(tmp_path, toks, alpha, temperature,
                                                                                  scaled):
    tok, data = toks["bpe"], rows(6, seed=2)
    teacher = _gpt2(tok, seed=7, layers=3)
    args = dict(alpha=alpha, temperature=temperature, scale_by_temperature_squared=scaled, preflight=False)
    same_data = tokenize_completions(data, tok, max_length=40)
    same = DistillationTrainer(_gpt2(tok, 1), teacher, distill_args(tmp_path / "same", **args), train_dataset=same_data,
                               processing_class=tok, data_collator=CompletionCollator(tok))
    cross_data = tokenize_aligned(data, tok, tok, max_length=40)
    cross = DistillationTrainer(_gpt2(tok, 1), teacher, distill_args(tmp_path / "cross", **args), train_dataset=cross_data,
                                processing_class=tok, teacher_processing_class=tok)
    assert same.cross is None and cross.cross is not None
    b_same = same.data_collator([same_data[i] for i in range(6)])
    b_cross = cross.data_collator([cross_data[i] for i in range(6)])
    assert torch.equal(b_same["input_ids"], b_cross["input_ids"]) and torch.equal(b_same["labels"], b_cross["labels"])
    losses, grads = [], []
    for trainer, batch in ((same, b_same), (cross, b_cross)):
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.reshape(-1) for p in trainer.model.parameters()]))
    assert losses[0] > 5e-3
    # float32 round-off only: KL sums vocabulary terms ~ the entropy (about 5.7 nats) that cancel to ~0.01
    assert abs(losses[1] - losses[0]) <= 1e-6 and abs(losses[1] - losses[0]) <= 1e-4 * losses[0]
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)


def test_the_vocabulary_check_says_which_mode_it_chose(toks, caplog):
    student = _gpt2(toks["bpe"], 1)
    with caplog.at_level(logging.INFO, logger="hf_distill.teachers"):
        mode = check_vocabularies(_gpt2(toks["wp"], 2), student, toks["wp"], toks["bpe"], task="causal-lm")
    assert mode == "cross-tokenizer" and "cross-tokenizer mode" in caplog.text
    assert check_vocabularies(_gpt2(toks["bpe"], 2), student, toks["bpe"], toks["bpe"], task="causal-lm") == "same-tokenizer"


# ------------------------------------------------------------------------------------------------ accumulation
def _one_step(tmp_path, name, toks, data, **args):
    trainer = DistillationTrainer(
        _gpt2(toks["bpe"], 1), _gpt2(toks["wp"], 2, layers=3),
        distill_args(tmp_path / name, max_steps=1, optim="sgd", learning_rate=1.0, max_grad_norm=0.0,
                     lr_scheduler_type="constant", alpha=0.5, temperature=2.0, preflight=False, **args),
        train_dataset=data, processing_class=toks["bpe"], teacher_processing_class=toks["wp"],
    )
    assert trainer.cross is not None
    trainer.train()
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}, trainer.state.log_history[0]["loss"]


@pytest.mark.parametrize("mode", ["hybrid", "uld"])
def test_gradient_accumulation_equals_the_full_batch_across_tokenizers(tmp_path, toks, mode):
    data = tokenize_aligned(rows(4, seed=3), toks["bpe"], toks["wp"], max_length=40)
    lengths = [sum(1 for x in r["labels"] if x != -100) for r in data]
    assert len(set(lengths[:2])) > 1 or sum(lengths[:2]) != sum(lengths[2:])  # micro-batches hold unequal token counts
    full, full_loss = _one_step(tmp_path, "full", toks, data, per_device_train_batch_size=4, cross_tokenizer_loss=mode)
    acc, acc_loss = _one_step(tmp_path, "ga", toks, data, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                              cross_tokenizer_loss=mode)
    start = _gpt2(toks["bpe"], 1).state_dict()
    assert max((full[k] - start[k]).abs().max().item() for k in full) > 1e-3
    for key in full:
        torch.testing.assert_close(acc[key], full[key], atol=1e-5, rtol=1e-4, msg=key)
    assert acc_loss == pytest.approx(full_loss, rel=1e-4)


# ------------------------------------------------------------------------------------------------ bad input
def _trainer(tmp_path, toks, data, teacher_tok=None, data_collator=None, **args):
    teacher_tok = teacher_tok or toks["wp"]
    return DistillationTrainer(_gpt2(toks["bpe"], 1), _gpt2(teacher_tok, 2), distill_args(tmp_path, preflight=False, **args),
                               train_dataset=data, processing_class=toks["bpe"], teacher_processing_class=teacher_tok,
                               data_collator=data_collator)


@pytest.mark.parametrize("setting,match", [
    ({"truncate_teacher_vocab": True}, "truncate_teacher_vocab"),
    ({"hidden_weight": 1.0}, "hidden_weight"),
    ({"distillation_loss": "reverse_kl"}, "distillation_loss forward_kl"),
])
def test_features_that_cannot_cross_vocabularies_are_refused(tmp_path, toks, setting, match):
    data = tokenize_aligned(rows(4), toks["bpe"], toks["wp"], max_length=40)
    with pytest.raises(ValueError, match=f"Cross-tokenizer mode.*{match}"):
        _trainer(tmp_path, toks, data, **setting)


def test_several_teachers_across_tokenizers_are_refused_naming_the_fix(tmp_path, toks):
    data = tokenize_aligned(rows(4), toks["bpe"], toks["wp"], max_length=40)
    teachers = [_gpt2(toks["wp"], 2), _gpt2(toks["wp"], 3)]
    with pytest.raises(ValueError, match="Cross-tokenizer mode.*several teachers.*pass one teacher as `teacher_model`"):
        DistillationTrainer(_gpt2(toks["bpe"], 1), teachers, distill_args(tmp_path, preflight=False), train_dataset=data,
                            processing_class=toks["bpe"], teacher_processing_class=toks["wp"])


def test_cached_teacher_columns_and_unaligned_data_are_refused(tmp_path, toks):
    data = tokenize_aligned(rows(4), toks["bpe"], toks["wp"], max_length=40)
    cached = data.map(lambda r: {"teacher_logits": [[0.0] * len(toks["bpe"])] * len(r["input_ids"])})
    with pytest.raises(ValueError, match="cached teacher logits"):
        _trainer(tmp_path, toks, cached)
    plain = tokenize_completions(rows(4), toks["bpe"], max_length=40)
    with pytest.raises(ValueError, match="tokenize_aligned"):
        _trainer(tmp_path, toks, plain)


def test_a_slow_teacher_tokenizer_is_refused_naming_the_fast_one(tmp_path, toks):
    if not (STORIES / "tok512.model").is_file():
        pytest.skip("../shared/data is not staged")
    from transformers import BertGenerationTokenizer

    slow = BertGenerationTokenizer(vocab_file=str(STORIES / "tok512.model"))
    data = tokenize_aligned(rows(4), toks["bpe"], toks["wp"], max_length=40)
    with pytest.raises(ValueError, match="teacher tokenizer.*slow.*use_fast=True"):
        _trainer(tmp_path, toks, data, teacher_tok=slow)


def test_another_task_with_another_tokenizer_is_refused(tmp_path, toks):
    with pytest.raises(ValueError, match="tokenizers differ.*only for causal-lm"):
        check_vocabularies(tiny_bert(vocab_size=len(toks["wp"])), tiny_bert(vocab_size=len(toks["bpe"])), toks["wp"],
                           toks["bpe"], task="sequence-classification")


def test_unaligned_tokens_are_warned_per_batch_and_refused_past_the_limit(tmp_path, toks, caplog):
    from tokenizers import Regex, normalizers

    corpus = sentences(300, seed=1)
    digits_dropped = wordpiece(120, corpus, normalizers.Replace(Regex("[0-9]"), ""))
    data = tokenize_aligned([{"prompt": "Tom", "completion": " saw 2024 and 12 birds 3"},
                             {"prompt": "Lily", "completion": " ran away"}], toks["bpe"], digits_dropped, max_length=40)
    unaligned = sum(sum(r["student_unaligned"]) for r in data)
    assert unaligned > 0
    strict = _trainer(tmp_path / "strict", toks, data, teacher_tok=digits_dropped, max_unaligned_share=0.05)
    batch = strict.data_collator([data[0], data[1]])
    with pytest.raises(ValueError, match="could not be aligned.*max_unaligned_share"):
        strict.compute_loss(strict.model, dict(batch))
    lenient = _trainer(tmp_path / "lenient", toks, data, teacher_tok=digits_dropped, max_unaligned_share=1.0)
    with caplog.at_level(logging.WARNING, logger="hf_distill.cross_tokenizer"):
        loss = lenient.compute_loss(lenient.model, dict(batch))
    assert torch.isfinite(loss) and "could not be aligned" in caplog.text


# ------------------------------------------------------------------------------------------------ end to end
def _nll_per_char(model, data, texts) -> float:
    """The student's own completion NLL (nats) per completion character: independent of the teacher."""
    total = 0.0
    with torch.no_grad():
        for row in data:
            ids, labels = torch.tensor([row["input_ids"]]), torch.tensor([row["labels"]])
            logits = model(input_ids=ids).logits[:, :-1]
            total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                                       ignore_index=-100, reduction="sum").item()
    return total / sum(len(t) for t in texts)


def _stories_samples():
    """The stories260K teacher, its tokenizer, 96 of its samples (seed 0) and those split at the first space into
    prompt / completion rows: the data both stories260K tests distil on."""
    if not (STORIES / "stories260K.bin").is_file():
        pytest.skip("../shared/data is not staged")
    from hf_distill.llama2c import convert_llama2c_checkpoint, convert_llama2c_tokenizer

    teacher, sp = convert_llama2c_checkpoint(STORIES / "stories260K.bin"), convert_llama2c_tokenizer(STORIES / "tok512.model")
    torch.manual_seed(0)
    prompt = torch.full((96, 1), sp.bos_token_id)
    samples = teacher.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, max_new_tokens=32,
                               pad_token_id=0)
    texts = [t.strip() for t in sp.batch_decode(samples, skip_special_tokens=True) if len(t.split(" ", 1)) == 2]
    data = [{"prompt": t.split(" ", 1)[0], "completion": " " + t.split(" ", 1)[1]} for t in texts]
    return teacher, sp, texts, data


def test_a_student_with_its_own_tokenizer_learns_from_the_stories260k_teacher(tmp_path):
    teacher, sp, texts, data = _stories_samples()
    student_tok = byte_bpe(320, texts)
    train = tokenize_aligned(data[:72], student_tok, sp, max_length=48)
    held_out = tokenize_aligned(data[72:], student_tok, sp, max_length=48)
    held_texts = [r["completion"] for r in data[72:]]
    student = tiny_gpt2(layers=2, hidden=64, vocab_size=len(student_tok), seed=0)
    before = _nll_per_char(student, held_out, held_texts)
    trainer = DistillationTrainer(student, teacher, distill_args(tmp_path, alpha=1.0, max_steps=32, learning_rate=1e-2,
                                                                 per_device_train_batch_size=8, logging_steps=8,
                                                                 preflight_eval_batches=1),
                                  train_dataset=train, eval_dataset=held_out, processing_class=student_tok,
                                  teacher_processing_class=sp)
    assert trainer.cross is not None and len(trainer.cross.mapping) > 50
    start_eval = trainer.evaluate()["eval_loss"]
    trainer.train()  # the preflight runs first: it must cope with a teacher over other tokens
    assert trainer.preflight_report.compatibility == (
        f"cross-tokenizer mode: {len(trainer.cross.mapping)} vocabulary entries shared, loss hybrid")
    after = _nll_per_char(trainer.model.eval(), held_out, held_texts)
    assert after < 0.8 * before, (before, after)  # alpha = 1: only the teacher's distributions taught it
    assert trainer.evaluate()["eval_loss"] < start_eval


def test_a_given_collator_is_kept_only_when_it_pads_aligned_batches(tmp_path, toks, caplog):
    from hf_distill.lm.cross_tokenizer_data import CrossTokenizerCollator

    data = tokenize_aligned(rows(4), toks["bpe"], toks["wp"], max_length=40)
    own = CrossTokenizerCollator(student_pad_token_id=0, teacher_pad_token_id=0)
    assert _trainer(tmp_path / "own", toks, data, data_collator=own).data_collator is own
    with caplog.at_level(logging.WARNING, logger="hf_distill.cross_tokenizer"):
        trainer = _trainer(tmp_path / "other", toks, data, data_collator=CompletionCollator(toks["bpe"]))
    assert isinstance(trainer.data_collator, CrossTokenizerCollator) and "is not used" in caplog.text


# ------------------------------------------------------------------------------------------------ the data
def test_each_side_renders_its_own_chat_template_and_only_the_completion_is_grouped(toks):
    from copy import deepcopy

    student, teacher = deepcopy(toks["bpe"]), deepcopy(toks["wp"])
    student.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    teacher.chat_template = "{% for m in messages %}{{ m.role }} said {{ m.content }} ! {% endfor %}{% if add_generation_prompt %}assistant said {% endif %}"
    prompt = [{"role": "user", "content": "the cat saw"}]
    row = tokenize_aligned([{"prompt": prompt, "completion": "the big dog"}], student, teacher, max_length=64)[0]
    s_text = student.decode(row["input_ids"])
    t_text = teacher.decode(row["teacher_input_ids"])
    assert s_text.startswith("<user>the cat saw<assistant>") and "said" not in s_text
    assert "user said the cat saw" in t_text and "assistant said" in t_text and "<user>" not in t_text
    grouped_s = [i for i, g in zip(row["input_ids"], row["student_group_ids"]) if g >= 0]
    grouped_t = [i for i, g in zip(row["teacher_input_ids"], row["teacher_group_ids"]) if g >= 0]
    assert student.decode(grouped_s[:-1]) == "the big dog" and grouped_s[-1] == student.eos_token_id
    assert teacher.decode(grouped_t[:-1]) == "the big dog" and grouped_t[-1] == teacher.eos_token_id
    # the final EOS of both sides is one group of its own; labels cover the completion only
    assert row["student_group_ids"][-1] == row["teacher_group_ids"][-1] == max(row["student_group_ids"])
    first = next(i for i, label in enumerate(row["labels"]) if label != -100)
    assert student.decode(row["input_ids"][first:]).startswith("the big dog")


def test_truncation_drops_a_group_cut_on_either_side(toks):
    data = [{"prompt": "Tom", "completion": " jumped happy"}]
    full = tokenize_aligned(data, toks["bpe"], toks["wp"], max_length=64)[0]
    s_len, t_len = len(full["input_ids"]), len(full["teacher_input_ids"])
    assert s_len != t_len or full["student_group_ids"] != full["teacher_group_ids"]
    short = tokenize_aligned(data, toks["bpe"], toks["wp"], max_length=min(s_len, t_len) - 1)[0]
    kept_s = {g for g in short["student_group_ids"] if g >= 0}
    kept_t = {g for g in short["teacher_group_ids"] if g >= 0}
    assert kept_s == kept_t  # every group kept has its tokens on both sides
    for group in kept_s:
        assert full["student_group_ids"].count(group) == short["student_group_ids"].count(group)
        assert full["teacher_group_ids"].count(group) == short["teacher_group_ids"].count(group)
    assert len(kept_s) < len({g for g in full["student_group_ids"] if g >= 0})


def _expected_cross_loss(student, teacher, batch, pairs, alpha, temperature):
    """The loss written out group by group: row t predicts token t + 1; a one-token pair that both vocabularies
    share gets T²·KL over the shared entries + the "other" bin, any other group ULD between the group
    distributions (first row × probabilities of the later tokens); CE on the student's completion tokens."""
    s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    t_logits = teacher(input_ids=batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"]).logits.double()
    shared = dict(pairs)
    kd, groups_seen = 0.0, 0
    for b in range(batch["input_ids"].shape[0]):
        s_ids, t_ids = batch["input_ids"][b], batch["teacher_input_ids"][b]
        for g in sorted({int(x) for x in batch["student_group_ids"][b] if x >= 0}):
            s_pos = [i for i, x in enumerate(batch["student_group_ids"][b]) if x == g]
            t_pos = [i for i, x in enumerate(batch["teacher_group_ids"][b]) if x == g]
            assert s_pos[0] > 0 and t_pos[0] > 0  # the prompt precedes every group
            s_lp = torch.log_softmax(s_logits[b, [i - 1 for i in s_pos]] / temperature, -1)
            t_lp = torch.log_softmax(t_logits[b, [i - 1 for i in t_pos]] / temperature, -1)
            groups_seen += 1
            if len(s_pos) == 1 and len(t_pos) == 1 and shared.get(int(s_ids[s_pos[0]])) == int(t_ids[t_pos[0]]):
                s_keys = torch.tensor(list(shared.keys()))
                t_keys = torch.tensor(list(shared.values()))
                p, q = t_lp[0].exp(), s_lp[0].exp()
                big_p = torch.cat([p[t_keys], (1 - p[t_keys].sum()).clamp_min(0).reshape(1)])
                big_q = torch.cat([q[s_keys], (1 - q[s_keys].sum()).clamp_min(1e-12).reshape(1)])
                kd += temperature**2 * float(sum(pi * torch.log(pi / qi) for pi, qi in zip(big_p, big_q) if pi > 0))
            else:
                def group(lp, ids, pos):
                    return (lp[0] + sum(lp[k, ids[pos[k]]] for k in range(1, len(pos)))).exp()
                r_s = group(s_lp, s_ids, s_pos).sort(descending=True).values
                r_t = group(t_lp, t_ids, t_pos).sort(descending=True).values
                width = max(len(r_s), len(r_t))
                r_s = torch.cat([r_s, r_s.new_zeros(width - len(r_s))])
                r_t = torch.cat([r_t, r_t.new_zeros(width - len(r_t))])
                kd += float((r_s - r_t).abs().sum())
    labels = batch["labels"][:, 1:]
    ce = torch.nn.functional.cross_entropy(s_logits[:, :-1].reshape(-1, s_logits.shape[-1]), labels.reshape(-1),
                                           ignore_index=-100, reduction="sum")
    tokens = int((labels != -100).sum())
    return (alpha * kd + (1 - alpha) * float(ce)) / tokens, groups_seen


def test_the_cross_tokenizer_loss_through_compute_loss_matches_the_groups_written_out(tmp_path, toks):
    data = tokenize_aligned(rows(5, seed=4), toks["bpe"], toks["wp"], max_length=40)
    trainer = _trainer(tmp_path, toks, data, alpha=0.4, temperature=2.0)
    batch = trainer.data_collator([data[i] for i in range(5)])
    multi = sum(1 for r in data for g in set(r["student_group_ids"]) - {-1}
                if r["student_group_ids"].count(g) > 1 or r["teacher_group_ids"].count(g) > 1)
    assert multi > 0  # some groups span several tokens on a side
    mapping = trainer.cross.mapping
    pairs = zip(mapping.student_ids.tolist(), mapping.teacher_ids.tolist())
    with torch.no_grad():
        expected, groups = _expected_cross_loss(trainer.model, trainer.teacher, batch, pairs, 0.4, 2.0)
        loss = trainer.compute_loss(trainer.model, dict(batch))
    assert groups > 20
    assert loss.item() == pytest.approx(expected, rel=1e-5)


# ------------------------------------------------------------------------------------------------ the script
def test_distill_causal_lm_script_takes_a_teacher_tokenizer(tmp_path):
    if not (STORIES / "stories260K.bin").is_file():
        pytest.skip("../shared/data is not staged")
    import json
    import sys

    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_distill.llama2c import convert_llama2c_tokenizer, save_portable_tokenizer

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import distill_causal_lm as dcl

    save_portable_tokenizer(convert_llama2c_tokenizer(STORIES / "tok512.model"), tmp_path / "teacher_tok")
    texts = sentences(40, seed=5)
    (tmp_path / "data.jsonl").write_text("".join(json.dumps({"prompt": t.split(" ", 1)[0], "completion": " " + t.split(" ", 1)[1]}) + "\n"
                                                 for t in texts))
    bpe = byte_bpe(300, texts)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(bpe), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, eos_token_id=bpe.eos_token_id,
                                 pad_token_id=bpe.pad_token_id)).save_pretrained(tmp_path / "student")
    bpe.save_pretrained(tmp_path / "student")
    argv = ["--teacher", f"llama2c:{STORIES}", "--student", str(tmp_path / "student"), "--dataset",
            str(tmp_path / "data.jsonl"), "--heldout_fraction", "0.25", "--max_length", "40", "--max_steps", "8",
            "--learning_rate", "1e-2", "--use_cpu", "true", "--disable_tqdm", "true", "--output_dir", str(tmp_path / "o")]
    with pytest.raises(ValueError, match="tokenizers differ.*--teacher_tokenizer"):
        dcl.main(argv)
    results = dcl.main(argv + ["--teacher_tokenizer", str(tmp_path / "teacher_tok")])
    assert results["steps"] == 8 and "kl" not in results["final"]  # the student's own metrics only
    assert results["final"]["ppl"] < results["initial"]["ppl"]


# ------------------------------------------------------------------------------------------------ on-policy
def _generated(trainer, batch, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    return trainer.on_policy_inputs(trainer.model, dict(batch))


def test_on_policy_with_identical_tokenizers_gives_the_same_tokenizer_loss(tmp_path, toks):
    tok, data = toks["bpe"], rows(6, seed=6)
    teacher = _gpt2(tok, seed=7, layers=3)
    args = dict(alpha=0.5, temperature=2.0, preflight=False, lmbda=1.0, max_completion_length=12)
    same_data = tokenize_completions(data, tok, max_length=40)
    same = DistillationTrainer(_gpt2(tok, 1), teacher, distill_args(tmp_path / "same", **args), train_dataset=same_data,
                               processing_class=tok, data_collator=CompletionCollator(tok))
    cross_data = tokenize_aligned(data, tok, tok, max_length=40)
    cross = DistillationTrainer(_gpt2(tok, 1), teacher, distill_args(tmp_path / "cross", **args), train_dataset=cross_data,
                                processing_class=tok, teacher_processing_class=tok)
    drawn = cross.data_collator([cross_data[i] for i in range(6)])
    generated = _generated(same, same.data_collator([same_data[i] for i in range(6)]))
    assert torch.equal(generated["input_ids"], _generated(cross, drawn)["input_ids"])  # the prompts were the same
    aligned = cross.cross.on_policy_batch(generated, drawn)
    mask = generated["attention_mask"].bool()
    assert torch.equal(aligned["teacher_input_ids"][mask], generated["input_ids"][mask])  # the teacher reads them as is
    assert torch.equal(aligned["labels"], generated["labels"])
    for trainer in (same, cross):
        trainer.model.eval()
    with torch.no_grad():
        expected = same.compute_loss(same.model, generated).item()
        loss = cross.compute_loss(cross.model, aligned).item()
    assert expected > 1e-3 and abs(loss - expected) <= 1e-6


def test_on_policy_samples_are_retokenized_for_the_teacher_and_aligned_by_their_text(tmp_path, toks):
    student_tok = toks["bpe"]
    teacher_tok = byte_bpe(420, sentences(300, seed=9))  # another byte-level BPE: decoding is exact on both sides
    assert student_tok.get_vocab() != teacher_tok.get_vocab()
    prompts = [r["prompt"] for r in rows(6, seed=7)]
    data = tokenize_aligned(rows(6, seed=7), student_tok, teacher_tok, max_length=40)
    trainer = _trainer(tmp_path, toks, data, teacher_tok=teacher_tok, lmbda=1.0, max_completion_length=16)
    drawn = trainer.data_collator([data[i] for i in range(6)])
    generated = _generated(trainer, drawn, seed=3)
    aligned = trainer.cross.on_policy_batch(generated, drawn)
    assert torch.equal(aligned["input_ids"], generated["input_ids"])  # the student keeps its own samples
    groups = 0
    for b in range(6):
        start, n = int(generated["prompt_length"][b]), int(generated["attention_mask"][b].sum())
        completion = generated["input_ids"][b, start:n].tolist()
        t_ids = aligned["teacher_input_ids"][b][aligned["teacher_attention_mask"][b].bool()].tolist()
        t_start = len(teacher_tok(prompts[b])["input_ids"])
        assert t_ids[:t_start] == data[b]["teacher_input_ids"][:t_start]  # the teacher's own prompt tokens
        text = student_tok.decode(completion, skip_special_tokens=True)
        assert teacher_tok.decode(t_ids[t_start:], skip_special_tokens=True) == text
        assert (completion[-1] == student_tok.eos_token_id) == (t_ids[-1] == teacher_tok.eos_token_id)
        s_groups, t_groups = aligned["student_group_ids"][b], aligned["teacher_group_ids"][b]
        for g in set(s_groups.tolist()) - {-1}:  # each group stands for the same text on both sides
            s_text = student_tok.decode(aligned["input_ids"][b][s_groups == g].tolist())
            assert s_text == teacher_tok.decode(aligned["teacher_input_ids"][b][t_groups == g].tolist())
            groups += 1
    assert groups > 30


def test_a_cross_tokenizer_run_with_lmbda_1_trains_on_its_own_samples(tmp_path, toks):
    data = tokenize_aligned(rows(16, seed=8), toks["bpe"], toks["wp"], max_length=40)
    trainer = _trainer(tmp_path, toks, data, lmbda=1.0, max_completion_length=10, max_steps=3,
                       per_device_train_batch_size=4, learning_rate=1e-2, max_unaligned_share=1.0)
    calls = []
    original = trainer.cross.on_policy_batch
    trainer.cross.on_policy_batch = lambda generated, drawn: calls.append(1) or original(generated, drawn)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    assert len(calls) == 3
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(math.isfinite(x) and x > 0 for x in losses)
    assert max((trainer.model.state_dict()[k] - before[k]).abs().max().item() for k in before) > 1e-4
    logged = [h for h in trainer.state.log_history if "loss" in h]  # TRL's generation metrics, as without cross mode
    assert all(h["entropy"] > 0 and 0 < h["completions/mean_length"] <= 10 for h in logged)


# ------------------------------------------------------------------------------------------------ aligned top-k cache
def _loss_and_grad(student, teacher, data, student_tok, teacher_tok, tmp_path, **args) -> tuple[float, torch.Tensor]:
    trainer = DistillationTrainer(student, teacher, distill_args(tmp_path, preflight=False, **args), train_dataset=data,
                                  processing_class=student_tok, teacher_processing_class=teacher_tok)
    batch = trainer.data_collator([data[i] for i in range(len(data))])
    student.zero_grad()
    loss = trainer.compute_loss(student, batch)
    loss.backward()
    return loss.item(), torch.cat([p.grad.reshape(-1) for p in student.parameters()])


@pytest.mark.parametrize("mode", ["hybrid", "uld"])
def test_an_aligned_topk_cache_of_the_whole_teacher_vocabulary_equals_the_live_teacher(tmp_path, toks, mode):
    from hf_distill.cross_tokenizer import cache_aligned_teacher_topk

    data = tokenize_aligned(rows(6, seed=4), toks["bpe"], toks["wp"], max_length=40)
    teacher = _gpt2(toks["wp"], 2, layers=3)
    cached = cache_aligned_teacher_topk(teacher, data, top_k=teacher.config.vocab_size, temperature=2.0)
    student = _gpt2(toks["bpe"], 1)
    args = dict(alpha=0.5, temperature=2.0, cross_tokenizer_loss=mode)
    live, live_grad = _loss_and_grad(student, teacher, data, toks["bpe"], toks["wp"], tmp_path / "live", **args)
    offline, offline_grad = _loss_and_grad(student, None, cached, toks["bpe"], toks["wp"], tmp_path / "cache", **args)
    assert live > 0.1 and offline == pytest.approx(live, rel=1e-6)
    torch.testing.assert_close(offline_grad, live_grad, atol=1e-6, rtol=1e-5)


def test_a_small_aligned_topk_cache_stays_close_to_the_live_teacher(tmp_path):
    """Measured (stories260K teacher, a BPE student after 40 steps): k = 64 of 512 changes the hybrid KD term by
    about -2% (gradient cosine 0.99+) and ULD by under 0.1%; the README quotes these."""
    from hf_distill.cross_tokenizer import cache_aligned_teacher_topk

    teacher, sp, texts, data = _stories_samples()
    bpe = byte_bpe(320, texts)
    train, held = tokenize_aligned(data[:80], bpe, sp, max_length=48), tokenize_aligned(data[80:], bpe, sp, max_length=48)
    student = tiny_gpt2(layers=2, hidden=64, vocab_size=len(bpe), seed=0)
    DistillationTrainer(student, teacher, distill_args(tmp_path / "warm", preflight=False, alpha=1.0, max_steps=40,
                                                       learning_rate=1e-2),
                        train_dataset=train, processing_class=bpe, teacher_processing_class=sp).train()
    for mode, bound in (("hybrid", 0.05), ("uld", 0.01)):
        args = dict(alpha=1.0, temperature=1.0, cross_tokenizer_loss=mode)
        live, live_grad = _loss_and_grad(student, teacher, held, bpe, sp, tmp_path / "live", **args)
        cached = cache_aligned_teacher_topk(teacher, held, top_k=64)
        offline, offline_grad = _loss_and_grad(student, None, cached, bpe, sp, tmp_path / "cache", **args)
        assert offline != live and abs(offline / live - 1) < bound, (mode, live, offline)
        assert torch.nn.functional.cosine_similarity(offline_grad, live_grad, dim=0) > 0.98


def test_caches_that_cannot_serve_cross_tokenizer_mode_are_refused(tmp_path, toks):
    from hf_distill import cache_teacher_outputs
    from hf_distill.cross_tokenizer import cache_aligned_teacher_topk

    data = tokenize_aligned(rows(4), toks["bpe"], toks["wp"], max_length=40)
    over_student_ids = cache_teacher_outputs(_gpt2(toks["bpe"], 3), data, top_k=4)  # another tokenizer's ids
    with pytest.raises(ValueError, match="not over the teacher's own tokens.*cache_aligned_teacher_topk"):
        _trainer(tmp_path / "a", toks, over_student_ids)
    wrong_rows = cache_teacher_outputs(_gpt2(toks["bpe"], 3), data, top_k=4, token_log_probs=True)  # student positions
    with pytest.raises(ValueError, match="not over the teacher's own tokens"):
        _trainer(tmp_path / "b", toks, wrong_rows)
    full = cache_teacher_outputs(_gpt2(toks["wp"], 2), data, input_prefix="teacher_")
    with pytest.raises(ValueError, match="cached teacher logits.*cache_aligned_teacher_topk"):
        _trainer(tmp_path / "c", toks, full)
    at_t2 = cache_aligned_teacher_topk(_gpt2(toks["wp"], 2), data, top_k=4, temperature=2.0)
    with pytest.raises(ValueError, match="lmbda > 0.*need the live teacher"):  # the cache has no scores for samples
        DistillationTrainer(_gpt2(toks["bpe"], 1), None, distill_args(tmp_path / "e", lmbda=0.5), train_dataset=at_t2,
                            processing_class=toks["bpe"], teacher_processing_class=toks["wp"])
    trainer = _trainer(tmp_path / "d", toks, at_t2, temperature=1.0)
    with pytest.raises(ValueError, match="aligned top-k cache was made at temperature 2.0.*--temperature"):
        trainer.compute_loss(trainer.model, trainer.data_collator([at_t2[i] for i in range(4)]))


def test_prompt_only_rows_train_on_policy_across_tokenizers_and_lmbda_below_1_is_refused(tmp_path, toks):
    prompts = [{"prompt": r["prompt"]} for r in rows(8, seed=9)]  # no completion column at all
    data = tokenize_aligned(prompts, toks["bpe"], toks["wp"], max_length=40)
    assert all(all(label == -100 for label in row["labels"]) for row in data)  # nothing to train on off-policy
    with pytest.raises(ValueError, match="--lmbda 1"):
        _trainer(tmp_path / "half", toks, data, lmbda=0.5, alpha=1.0)
    trainer = _trainer(tmp_path, toks, data, lmbda=1.0, alpha=1.0, max_completion_length=8, max_steps=2,
                       per_device_train_batch_size=4, learning_rate=1e-2, max_unaligned_share=1.0)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2 and all(math.isfinite(h["loss"]) and h["loss"] > 0 for h in logged)
    assert all(h["completions/mean_length"] > 0 for h in logged)


def test_the_script_reads_a_llama2c_teacher_tokenizer_by_the_teacher_s_own_name(tmp_path):
    if not (STORIES / "stories260K.bin").is_file():
        pytest.skip("../shared/data is not staged")
    import sys
    from types import SimpleNamespace

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import distill_causal_lm as dcl

    bpe = byte_bpe(300, sentences(40, seed=5))
    bpe.save_pretrained(tmp_path / "student")
    loaded = byte_bpe(300, sentences(10, seed=1))  # stands for the tokenizer loaded with the teacher
    for name, expect_loaded in ((f"llama2c:{STORIES}", True), (f"llama2c:{STORIES}/", False)):
        script = SimpleNamespace(student=str(tmp_path / "student"), teacher_topk=None, teacher=f"llama2c:{STORIES}",
                                 teacher_tokenizer=name)
        student_tok, teacher_tok = dcl.cross_tokenizers(script, loaded)
        assert len(student_tok) == len(bpe)
        if expect_loaded:  # --teacher_tokenizer = --teacher: the tokenizer that came with the teacher
            assert teacher_tok is loaded
        else:  # another spelling of a llama2c folder: its SentencePiece model, converted
            assert len(teacher_tok) == 512 and teacher_tok.encode("Once upon a time", add_special_tokens=False)


def test_the_mode_is_logged_once_and_a_temperature_above_1_is_warned_about(tmp_path, toks, caplog):
    from hf_distill.teachers import check_same_tokenizer

    with caplog.at_level(logging.INFO, logger="hf_distill"):
        check_same_tokenizer(toks["bpe"], toks["bpe"])  # a check the scripts run: it names no mode
        data = tokenize_aligned(rows(4), toks["bpe"], toks["wp"], max_length=40)
        _trainer(tmp_path, toks, data, temperature=2.0)
    assert "same-tokenizer mode" not in caplog.text and "cross-tokenizer mode" in caplog.text
    assert "consider --temperature 1" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hf_distill"):
        _trainer(tmp_path / "t1", toks, data, temperature=1.0)
    assert "consider --temperature 1" not in caplog.text
