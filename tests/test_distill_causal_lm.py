"""scripts/distill_causal_lm.py end to end on the real stories260K teacher (skipped without ../shared/data).

Each run trains a few steps on teacher samples of story openings and checks that the student got closer to
the teacher on held-out teacher samples (per-token KL), and that what was saved is what was evaluated.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "distill_causal_lm.py"
sys.path.insert(0, str(REPO / "scripts"))

import distill_causal_lm as dcl  # noqa: E402
from single_thread import one_thread  # noqa: E402,F401  (autouse: two threads contend on a shared 2-core machine)

from hf_distill import DistillationArguments  # noqa: E402


@pytest.fixture(scope="module")
def stories_dir() -> Path:
    from conftest import shared_data_dir

    folder = shared_data_dir() / "models" / "stories260K"
    if not (folder / "stories260K.bin").is_file():
        pytest.skip(f"stories260K not found in {folder}")
    return folder


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """Teacher completions are generated once for the whole module."""
    return tmp_path_factory.mktemp("completions")


def _argv(stories_dir: Path, cache_dir: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--teacher", f"llama2c:{stories_dir}", "--output_dir", str(output_dir), "--completions_cache_dir", str(cache_dir),
        "--samples_per_prompt", "1", "--heldout_samples_per_prompt", "1", "--teacher_max_new_tokens", "48",
        "--max_length", "72", "--max_steps", "12", "--logging_steps", "6", "--use_cpu", "true",
        "--disable_tqdm", "true", "--seed", "0", *extra,
    ]


def _reevaluate(model_dir: Path, stories_dir: Path, cache_dir: Path) -> dict:
    """Held-out metrics of a saved student, recomputed from disk."""
    from transformers import AutoModelForCausalLM

    teacher, tokenizer = dcl.load_llama2c_teacher(stories_dir)
    script = dcl.ScriptArguments(samples_per_prompt=1, heldout_samples_per_prompt=1, teacher_max_new_tokens=48,
                                 max_length=72)
    _, heldout = dcl.build_datasets(script, teacher, tokenizer, cache_dir, seed=0)
    student = AutoModelForCausalLM.from_pretrained(model_dir)
    return dcl.heldout_metrics(student, teacher, dcl.tokenize(heldout, tokenizer, script), tokenizer)


def test_sequence_kd_run_lowers_heldout_kl_and_saves_the_evaluated_student(stories_dir, cache_dir, tmp_path) -> None:
    out = tmp_path / "run"
    results = dcl.main(_argv(stories_dir, cache_dir, out, "--alpha", "0.5", "--distillation_loss", "forward_kl"))
    initial, final = results["initial"], results["final"]
    assert results["steps"] == 12 and results["teacher_at_train_time"]
    assert results["train_examples"] == len(dcl.STORY_OPENINGS) and results["heldout_examples"] == len(dcl.HELDOUT_OPENINGS)
    assert final["kl"] < 0.8 * initial["kl"], (initial, final)
    assert final["ppl"] < initial["ppl"]
    assert final["teacher_ppl"] < final["ppl"]  # held-out data are teacher samples: the teacher fits them best
    for name in ("config.json", "model.safetensors", "tokenizer.json", "distillation/recipe.json", "results.json",
                 "results.md", "README.md"):
        assert (out / name).is_file(), name
    card = (out / "README.md").read_text()
    assert "pipeline_tag: text-generation" in card and "teacher-generated stories" in card
    assert json.loads((out / "results.json").read_text())["final"]["kl"] == pytest.approx(final["kl"])
    again = _reevaluate(out, stories_dir, cache_dir)
    assert again["kl"] == pytest.approx(final["kl"], rel=1e-4)


def test_topk_cache_trains_without_the_teacher(stories_dir, cache_dir, tmp_path) -> None:
    results = dcl.main(_argv(stories_dir, cache_dir, tmp_path / "topk", "--teacher_topk", "8", "--alpha", "1",
                             "--skip_initial_eval", "true"))
    assert results["teacher_at_train_time"] is False and results["teacher_topk"] == 8
    # The untrained student's KL is ~4.9 nats/token on these samples (see the first test); 12 steps cut it.
    assert results["final"]["kl"] < 3.5


def test_on_policy_mixing_runs_and_lowers_heldout_kl(stories_dir, cache_dir, tmp_path) -> None:
    results = dcl.main(_argv(stories_dir, cache_dir, tmp_path / "onpolicy", "--lmbda", "0.5", "--alpha", "1",
                             "--distillation_loss", "jsd", "--max_completion_length", "24",
                             "--skip_initial_eval", "true"))
    recipe = json.loads((tmp_path / "onpolicy" / "distillation" / "recipe.json").read_text())
    assert recipe["arguments"]["lmbda"] == 0.5 and recipe["arguments"]["distillation_loss"] == "jsd"
    assert results["steps"] == 12 and results["final"]["kl"] < 3.5  # untrained: ~4.9 nats/token


def test_lora_student_trains_adapters_and_merges_to_a_plain_model(stories_dir, cache_dir, tmp_path) -> None:
    pytest.importorskip("peft")
    out = tmp_path / "lora"
    results = dcl.main(_argv(stories_dir, cache_dir, out, "--use_lora", "true", "--lora_r", "8", "--lora_alpha", "16",
                             "--lora_target_modules", "q_proj", "v_proj", "gate_proj", "up_proj", "down_proj",
                             "--merge_lora", "true", "--learning_rate", "1e-2", "--alpha", "1"))
    assert 0 < results["trainable_parameters"] < results["student_parameters"] / 4
    assert results["final"]["kl"] < results["initial"]["kl"]
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert not (out / "model.safetensors").exists()
    merged = out / "merged"
    assert (merged / "model.safetensors").is_file() and not (merged / "adapter_config.json").exists()
    assert (merged / "distillation" / "recipe.json").is_file() and (merged / "tokenizer.json").is_file()
    assert results["merged_parameters"] == results["student_parameters"] - results["trainable_parameters"]
    again = _reevaluate(merged, stories_dir, cache_dir)
    assert again["kl"] == pytest.approx(results["final"]["kl"], rel=1e-4)


@pytest.mark.skipif(os.environ.get("HF_DISTILL_SLOW_TESTS") != "1",
                    reason="two fresh interpreters (~15 s idle, ~60 s on a busy machine): set HF_DISTILL_SLOW_TESTS=1")
def test_accelerate_launch_runs_the_script(stories_dir, cache_dir, tmp_path) -> None:
    accelerate = Path(sys.executable).with_name("accelerate")
    if not accelerate.is_file():
        pytest.skip("accelerate CLI not installed")
    out = tmp_path / "launched"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [str(accelerate), "launch", "--num_processes", "1", "--cpu", "--mixed_precision", "no",
               "--dynamo_backend", "no", "--num_machines", "1", str(SCRIPT),
               *_argv(stories_dir, cache_dir, out, "--max_steps", "4", "--skip_initial_eval", "true")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 4 and (out / "model.safetensors").is_file()
    assert "| student after training |" in done.stdout


def test_narrow_student_shares_the_vocabulary(stories_dir) -> None:
    teacher, _ = dcl.load_llama2c_teacher(stories_dir)
    student = dcl.narrow_causal_student(teacher, hidden_size=32, num_layers=2)
    assert student.config.hidden_size == 32 and student.config.num_hidden_layers == 2
    assert student.config.vocab_size == teacher.config.vocab_size
    assert student.config.num_attention_heads * student.config.head_dim == 32
    logits = student(input_ids=torch.tensor([[1, 5, 9]])).logits
    assert logits.shape == (1, 3, teacher.config.vocab_size)
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in teacher.parameters()) / 2


def test_user_jsonl_is_split_into_train_and_heldout(tmp_path) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"p{i}", "completion": f" c{i}"}) + "\n" for i in range(10)))
    script = dcl.ScriptArguments(dataset=str(data), heldout_fraction=0.2, max_train_samples=5)
    train, heldout = dcl.build_datasets(script, teacher=None, tokenizer=None, cache_dir=tmp_path, seed=0)
    assert len(train) == 5 and len(heldout) == 2
    assert not set(train["prompt"]) & set(heldout["prompt"])
    script = dcl.ScriptArguments(dataset=str(data), eval_dataset=str(data))
    train, heldout = dcl.build_datasets(script, teacher=None, tokenizer=None, cache_dir=tmp_path, seed=0)
    assert len(train) == 10 and len(heldout) == 10


# ---------------------------------------------------------------------------------------------- bad input
def test_script_flags_do_not_collide_with_distillation_arguments() -> None:
    ours = {f.name for f in dataclasses.fields(dcl.ScriptArguments)}
    theirs = {f.name for f in dataclasses.fields(DistillationArguments)}
    assert not ours & theirs, f"HfArgumentParser refuses duplicate flags: {sorted(ours & theirs)}"


def test_prompt_too_long_is_a_clear_error(stories_dir, cache_dir, tmp_path) -> None:
    data = tmp_path / "data.jsonl"
    rows = [{"prompt": "Once upon a time " * 20, "completion": " the end."}, {"prompt": "Hi", "completion": " there."}]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(ValueError, match="leaves no room for a completion token at max_length=16"):
        dcl.main(_argv(stories_dir, cache_dir, tmp_path / "o", "--dataset", str(data), "--eval_dataset", str(data),
                       "--max_length", "16"))


def test_student_with_another_vocabulary_is_refused(stories_dir, cache_dir, tmp_path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(512)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    other = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0", eos_token="w1")
    folder = tmp_path / "other_student"
    LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(folder)
    other.save_pretrained(folder)
    with pytest.raises(ValueError, match="tokenizers differ.*give the student the teacher's tokenizer"):
        dcl.main(_argv(stories_dir, cache_dir, tmp_path / "o", "--student", str(folder)))


def test_lora_adapter_teacher_without_its_base_is_refused(tmp_path) -> None:
    peft = pytest.importorskip("peft")
    from transformers import LlamaConfig, LlamaForCausalLM

    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2))
    base.config._name_or_path = str(tmp_path / "deleted_base")
    adapter = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    adapter.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match=r"teacher .*adapter folder.*base model .* cannot be found.*--teacher_base_model"):
        dcl.main(["--teacher", str(tmp_path / "adapter"), "--output_dir", str(tmp_path / "o")])


def test_out_of_range_jsd_beta_and_lmbda_are_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="jsd_beta"):
        dcl.parse_arguments(["--output_dir", str(tmp_path), "--jsd_beta", "1.5"])
    with pytest.raises(ValueError, match="lmbda"):
        dcl.parse_arguments(["--output_dir", str(tmp_path), "--lmbda", "1.5"])
    with pytest.raises(ValueError, match="teacher_topk"):
        dcl.parse_arguments(["--output_dir", str(tmp_path), "--lmbda", "0.5", "--teacher_topk", "8"])
