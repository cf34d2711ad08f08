"""Pushing to the Hub, tested honestly: the real huggingface_hub client against a local HTTP stand-in.

The stand-in (tests/hub_stub.py) runs in a thread of this process. The client runs in one subprocess
(so that `HF_ENDPOINT` is set and `HF_HUB_OFFLINE` unset before huggingface_hub is imported); it goes
through every scenario in turn and reports back as JSON, and the tests below check what arrived.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hub_stub import EXPECTED_PUSHED, LEAKED_TOKEN, HubStub, make_run_folder  # noqa: E402

from hf_distill.hub import HubPushError, check_repo_id, files_to_push, push_distilled_to_hub  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_" + "StubWriteToken42" * 2 + "xy"

# Runs in the subprocess: argv[1] is a JSON object of folder paths and the closed port.
DRIVER = r'''
import contextlib, io, json, sys, traceback
cfg = json.loads(sys.argv[1])
sys.path.insert(0, cfg["scripts"])
import push_to_hub as cli
from hf_distill.hub import push_distilled_to_hub

results = {}

def scenario(name, call):
    out, err = io.StringIO(), io.StringIO()
    record = {}
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            record["value"] = call()
        except Exception as exc:
            record["error_type"] = type(exc).__name__
            record["error"] = str(exc)
            record["traceback"] = traceback.format_exc()
    record["stdout"], record["stderr"] = out.getvalue(), err.getvalue()
    results[name] = record

token = cfg["token"]
scenario("cli_push", lambda: cli.main(["--model_dir", cfg["cli_run"], "--repo_id", "me/sst2-student",
                                       "--hub_token", token, "--private", "--license", "apache-2.0"]))
scenario("cli_push_again", lambda: cli.main(["--model_dir", cfg["cli_run"], "--repo_id", "me/sst2-student",
                                             "--hub_token", token, "--no_card"]))
scenario("cli_no_token", lambda: cli.main(["--model_dir", cfg["bare_run"], "--repo_id", "me/no-token"]))
scenario("function_push", lambda: push_distilled_to_hub(cfg["bare_run"], "sst2-distilled", token=token,
                                                        revision="dev", commit_message="first version"))
scenario("wrong_token", lambda: push_distilled_to_hub(cfg["bare_run"], "me/wrong-token", token="hf_" + "w" * 34))
scenario("unreachable", lambda: push_distilled_to_hub(cfg["bare_run"], "me/unreachable", token=token,
                                                      endpoint="http://127.0.0.1:%d" % cfg["closed_port"]))

def cli_unreachable():
    import huggingface_hub.constants as constants
    saved, constants.ENDPOINT = constants.ENDPOINT, "http://127.0.0.1:%d" % cfg["closed_port"]
    try:
        return cli.main(["--model_dir", cfg["fail_runs"][1], "--repo_id", "me/unreachable-cli", "--hub_token", token])
    finally:
        constants.ENDPOINT = saved

scenario("cli_wrong_token", lambda: cli.main(["--model_dir", cfg["fail_runs"][0], "--repo_id", "me/refused",
                                              "--hub_token", "hf_" + "w" * 34, "--license", "mit"]))
scenario("cli_unreachable", cli_unreachable)
print("RESULTS=" + json.dumps(results))
'''


def _snapshot(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _header(text: str) -> dict:
    return yaml.safe_load(re.match(r"^---\n(.*?)\n---\n", text, flags=re.DOTALL).group(1))


@pytest.fixture(scope="module")
def pushed(tmp_path_factory: pytest.TempPathFactory):
    """Run every push scenario once against the stand-in; yield (results, stub, folders, snapshots)."""
    base = tmp_path_factory.mktemp("push")
    cli_run, bare_run = make_run_folder(base / "cli-run"), make_run_folder(base / "bare-run")
    fail_runs = [make_run_folder(base / "fail-run-0"), make_run_folder(base / "fail-run-1")]
    (fail_runs[0] / "README.md").write_text("the card of an earlier push\n")  # must survive a failed push
    home = base / "hf_home"
    home.mkdir()
    before = {"cli": _snapshot(cli_run), "bare": _snapshot(bare_run),
              **{f"fail{i}": _snapshot(run) for i, run in enumerate(fail_runs)}}
    with HubStub(tokens={TOKEN}) as stub:
        env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
        env.update(HF_ENDPOINT=stub.endpoint, HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1",
                   PYTHONPATH=os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]))
        config = {"scripts": str(REPO_ROOT / "scripts"), "token": TOKEN, "cli_run": str(cli_run),
                  "bare_run": str(bare_run), "closed_port": _closed_port(), "fail_runs": [str(r) for r in fail_runs]}
        proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(config)], env=env, cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=240)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULTS=")]
    assert proc.returncode == 0 and lines, f"driver failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    results = json.loads(lines[-1][len("RESULTS="):])
    yield results, stub, {"cli": cli_run, "bare": bare_run, "fail0": fail_runs[0], "fail1": fail_runs[1]}, before


def test_cli_push_uploads_exactly_the_allowlist(pushed) -> None:
    results, stub, runs, _ = pushed
    record = results["cli_push"]
    assert record.get("value") == 0, record
    assert re.search(r"pushed: http://127\.0\.0\.1:\d+/me/sst2-student/commit/[0-9a-f]{40}", record["stdout"])
    assert stub.committed_paths("me/sst2-student") == EXPECTED_PUSHED
    repo = stub.repos["me/sst2-student"]
    assert repo.private is True
    assert repo.commits[0]["header"]["summary"] == "Upload distilled model"
    arrived = stub.files("me/sst2-student")
    assert arrived["model.safetensors"] == b"student weights"
    assert arrived["onnx/model_quantized.onnx"] == b"onnx int8"
    assert arrived["README.md"] == (runs["cli"] / "README.md").read_bytes()
    assert f"Bearer {TOKEN}" in stub.auth_headers


def test_pushed_card_says_what_it_should(pushed) -> None:
    _, stub, runs, _ = pushed
    text = stub.files("me/sst2-student")["README.md"].decode()
    header = _header(text)
    assert header["base_model"] == "google-bert/bert-base-uncased"
    assert header["license"] == "apache-2.0"
    assert {"distillation", "knowledge-distillation", "hf_distill"} <= set(header["tags"])
    assert header["model-index"][0]["name"] == "me/sst2-student"
    metric_types = {m["type"] for m in header["model-index"][0]["results"][0]["metrics"]}
    assert {"accuracy", "teacher_accuracy", "int8_accuracy"} <= metric_types
    assert "temperature=4" in text and "| hidden | 0 → 1, 1 → 3, 2 → 5 |" in text
    assert 'model="me/sst2-student"' in text
    for secret in (TOKEN, LEAKED_TOKEN, str(runs["cli"]), str(Path.home()) + "/", "/data/private"):
        assert secret not in text


def test_push_changes_nothing_local_but_the_card(pushed) -> None:
    results, stub, runs, before = pushed
    after = _snapshot(runs["cli"])
    assert after.pop("README.md")
    assert after == before["cli"]
    assert _snapshot(runs["bare"]) == before["bare"]  # the function pushes a card rendered in memory
    assert results["cli_push_again"].get("value") == 0  # the repo exists: exist_ok, second commit
    assert len(stub.repos["me/sst2-student"].commits) == 2


def test_function_push_with_branch_and_in_memory_card(pushed) -> None:
    results, stub, _, _ = pushed
    record = results["function_push"]
    assert "error" not in record, record.get("traceback")
    assert record["value"].startswith(stub.endpoint + "/stub-user/sst2-distilled/commit/")
    repo = stub.repos["stub-user/sst2-distilled"]
    assert repo.private is False and "dev" in repo.branches
    assert [(c["revision"], c["header"]["summary"]) for c in repo.commits] == [("dev", "first version")]
    assert stub.committed_paths("stub-user/sst2-distilled") == EXPECTED_PUSHED
    card = _header(stub.files("stub-user/sst2-distilled")["README.md"].decode())
    assert card["model-index"][0]["name"] == "sst2-distilled"


def test_no_token_is_a_clear_error(pushed) -> None:
    results, stub, _, _ = pushed
    record = results["cli_no_token"]
    assert record.get("value") == 2
    assert "no Hugging Face token" in record["stderr"]
    assert "huggingface-cli login" in record["stderr"] and "--hub_token" in record["stderr"]
    assert "me/no-token" not in stub.repos


def test_rejected_token_is_a_clear_error(pushed) -> None:
    record = pushed[0]["wrong_token"]
    assert record.get("error_type") == "HubPushError"
    assert "refused the token (HTTP 401)" in record["error"]
    assert "Nothing local was deleted" in record["error"]


def test_unreachable_endpoint_is_a_clear_error(pushed) -> None:
    results, _, runs, before = pushed
    record = results["unreachable"]
    assert record.get("error_type") == "HubPushError"
    assert "could not reach the Hugging Face Hub at http://127.0.0.1:" in record["error"]
    assert "Nothing local was deleted or changed" in record["error"]
    assert _snapshot(runs["bare"]) == before["bare"]


@pytest.mark.parametrize("scenario, folder, message", [
    ("cli_wrong_token", "fail0", "refused the token (HTTP 401)"),
    ("cli_unreachable", "fail1", "could not reach the Hugging Face Hub at http://127.0.0.1:"),
])
def test_failed_cli_push_leaves_the_folder_byte_identical(pushed, scenario: str, folder: str, message: str) -> None:
    results, stub, runs, before = pushed
    record = results[scenario]
    assert _snapshot(runs[folder]) == before[folder]  # README.md neither written nor rewritten
    assert record.get("value") == 2, record
    assert message in record["stderr"] and "Nothing local was deleted or changed" in record["stderr"]
    assert "model card:" not in record["stdout"]
    assert "me/refused" not in stub.repos and "me/unreachable-cli" not in stub.repos


# -- in-process checks: they fail before any network call ----------------------------------------
@pytest.mark.parametrize("repo_id", ["me/my model", "me/model!", "a/b/c", "me/-model", "me/model.", "me/a--b",
                                     "me/a..b", "", "/model", "me/" + "m" * 97, "mé/modèle"])
def test_invalid_repo_id_is_a_clear_error(tmp_path: Path, repo_id: str) -> None:
    with pytest.raises(ValueError, match=r"invalid repo id .*only ASCII letters, digits, '-', '_' and '\.'"):
        check_repo_id(repo_id)
    run = make_run_folder(tmp_path / "run")
    before = _snapshot(run)
    with pytest.raises(ValueError, match="invalid repo id"):
        push_distilled_to_hub(run, repo_id, token=TOKEN)
    assert _snapshot(run) == before


@pytest.mark.parametrize("repo_id", ["model", "me/model", "Org_1/bert-base.v2", "a" * 96])
def test_valid_repo_ids(repo_id: str) -> None:
    check_repo_id(repo_id)


def test_files_to_push_is_the_allowlist(tmp_path: Path) -> None:
    run = make_run_folder(tmp_path / "run")
    (run / "onnx" / ".cache").mkdir()
    (run / "onnx" / ".cache" / "x").write_text("hidden")
    (run / "onnx" / "rejected").mkdir()
    (run / "onnx" / "rejected" / "model_quantized.onnx").write_bytes(b"int8 that failed its check")
    (run / "adapter_config.json").write_text("{}")
    (run / "adapter_model.safetensors").write_bytes(b"lora")
    expected = sorted({*EXPECTED_PUSHED, "adapter_config.json", "adapter_model.safetensors"} - {"README.md"})
    assert files_to_push(run) == expected


def test_refuses_to_upload_a_file_holding_the_token(tmp_path: Path) -> None:
    run = make_run_folder(tmp_path / "run")
    (run / "report.md").write_text(f"pushed with {TOKEN}")
    with pytest.raises(HubPushError, match="refusing to upload report.md: it contains the Hub token"):
        push_distilled_to_hub(run, "me/model", token=TOKEN)


def test_folder_without_student_weights(tmp_path: Path) -> None:
    run = make_run_folder(tmp_path / "run")
    (run / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"no student weights \(\*\.safetensors\)"):
        push_distilled_to_hub(run, "me/model", token=TOKEN)


def test_offline_mode_is_a_clear_error(tmp_path: Path) -> None:
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE:
        pytest.skip("HF_HUB_OFFLINE was not set when huggingface_hub was imported")
    run = make_run_folder(tmp_path / "run")
    before = _snapshot(run)
    with pytest.raises(HubPushError, match="HF_HUB_OFFLINE is set"):
        push_distilled_to_hub(run, "me/model", token=TOKEN)
    assert _snapshot(run) == before


def test_cli_dry_run_lists_the_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("push_to_hub_cli", REPO_ROOT / "scripts" / "push_to_hub.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    run = make_run_folder(tmp_path / "run")
    assert cli.main(["--model_dir", str(run), "--repo_id", "me/model", "--dry_run"]) == 0
    assert capsys.readouterr().out.split() == EXPECTED_PUSHED
    assert cli.main(["--model_dir", str(run), "--repo_id", "me/bad name", "--dry_run"]) == 2
    assert "invalid repo id" in capsys.readouterr().err


# -- the trainer's own push paths: hub_strategy checkpoint pushes, push_to_hub, save_model -------------------
TRAINER_DRIVER = r'''
import json, sys, traceback
import torch
cfg = json.loads(sys.argv[1])
sys.path.insert(0, cfg["tests"])
torch.set_num_threads(1)
from tiny_models import distill_args, sentiment_dataset, tiny_bert
from hf_distill import DistillationTrainer
from pathlib import Path

results = {}

def trainer_for(out, **overrides):
    data, tokenizer = sentiment_dataset(16)
    # hidden states through projections (student 32 wide, teacher 48): distillation/projections.safetensors exists
    settings = dict(output_dir=out, max_steps=4, save_strategy="steps", save_steps=2, hidden_weight=1.0,
                    preflight=False)
    args = distill_args(Path(out), **{**settings, **overrides})
    return DistillationTrainer(tiny_bert(seed=1), tiny_bert(layers=3, hidden=48, seed=2), args,
                               train_dataset=data, processing_class=tokenizer)

def scenario(name, call):
    try:
        results[name] = {"value": call()}
    except BaseException as exc:
        results[name] = {"error_type": type(exc).__name__, "error": str(exc)[-2000:],
                         "traceback": traceback.format_exc()[-4000:]}

def run_strategy(strategy):
    trainer = trainer_for(cfg["base"] + "/" + strategy, push_to_hub=True, hub_strategy=strategy,
                          hub_model_id="me/" + strategy, hub_token=cfg["token"], hub_always_push=True)
    trainer.train()
    return str(trainer.push_to_hub())

for strategy in ("end", "every_save", "checkpoint", "all_checkpoints"):
    scenario(strategy, lambda: run_strategy(strategy))

def save_model_pushes():
    trainer = trainer_for(cfg["base"] + "/save", push_to_hub=True, hub_model_id="me/save", hub_token=cfg["token"],
                          max_steps=1, save_strategy="no")
    trainer.save_model()
    return "saved"

def token_and_blocking():
    trainer = trainer_for(cfg["base"] + "/token", hub_model_id="me/token-argument", hub_token="hf_" + "w" * 34,
                          max_steps=1, save_strategy="no")
    pending = trainer.push_to_hub(token=cfg["token"], blocking=False)
    return {"type": type(pending).__name__, "url": str(pending.result(timeout=120))}

scenario("save_model", save_model_pushes)
scenario("token_blocking", token_and_blocking)
print("RESULTS=" + json.dumps(results))
'''

HUB_STRATEGIES = ["end", "every_save", "checkpoint", "all_checkpoints"]
#: Must never reach the Hub from a training run: any path that has one of these parts.
FORBIDDEN_PARTS = ("distillation", "training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth",
                   "trainer_state.json", "distillation_state.json", "last-checkpoint")


def _forbidden(path: str) -> bool:
    parts = path.split("/")
    return any(part in FORBIDDEN_PARTS or part.startswith(("checkpoint-", ".checkpoint-")) for part in parts)


@pytest.fixture(scope="module")
def trainer_pushes(tmp_path_factory: pytest.TempPathFactory):
    """Train tiny students with push_to_hub=True for every hub_strategy against the stand-in; yield (results, stub)."""
    base = tmp_path_factory.mktemp("trainer-push")
    home = base / "hf_home"
    home.mkdir()
    with HubStub(tokens={TOKEN}) as stub:
        env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
        env.update(HF_ENDPOINT=stub.endpoint, HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1",
                   PYTHONPATH=os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]))
        config = {"tests": str(REPO_ROOT / "tests"), "token": TOKEN, "base": str(base)}
        proc = subprocess.run([sys.executable, "-c", TRAINER_DRIVER, json.dumps(config)], env=env, cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=400)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULTS=")]
    assert proc.returncode == 0 and lines, f"driver failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    yield json.loads(lines[-1][len("RESULTS="):]), stub


def _student_files() -> set[str]:
    """What a push of the trained student holds, known without the code under test: its weights and config,
    the files its tokenizer saves, and the card."""
    import tempfile

    from hf_distill.data import synthetic_tokenizer

    with tempfile.TemporaryDirectory() as folder:
        synthetic_tokenizer().save_pretrained(folder)
        tokenizer_files = {p.name for p in Path(folder).iterdir()}
    return {"README.md", "config.json", "model.safetensors"} | tokenizer_files


@pytest.mark.parametrize("strategy", HUB_STRATEGIES)
def test_every_hub_strategy_pushes_the_allowlist_only(trainer_pushes, strategy: str) -> None:
    results, stub = trainer_pushes
    repo = stub.repos[f"me/{strategy}"]
    uploaded = sorted({path for commit in repo.commits for path in commit["files"]})
    assert not [path for path in uploaded if _forbidden(path)], uploaded
    record = results[strategy]
    assert "error" not in record, record.get("traceback")
    assert set(uploaded) == _student_files(), uploaded
    summaries = [commit["header"]["summary"] for commit in repo.commits]
    in_progress = [s for s in summaries if s.startswith("Training in progress")]
    # saves at steps 2 and 4 (hub_always_push: none skipped); "end" pushes only when asked, at the end
    assert in_progress == ([] if strategy == "end" else ["Training in progress, step 2", "Training in progress, step 4"])
    assert summaries[-1] == "End of training" and record["value"] == f"{stub.endpoint}/me/{strategy}/commit/{repo.commits[-1]['oid']}"
    card = stub.files(repo.repo_id)["README.md"].decode()
    assert "knowledge-distillation" in _header(card)["tags"] and TOKEN not in card


def test_save_model_with_push_to_hub_pushes_once_through_the_allowlist(trainer_pushes) -> None:
    results, stub = trainer_pushes
    assert results["save_model"].get("value") == "saved", results["save_model"].get("traceback")
    repo = stub.repos["me/save"]
    assert [c["header"]["summary"] for c in repo.commits] == ["Model save"]
    assert set(repo.commits[0]["files"]) == _student_files()


def test_push_to_hub_honours_token_and_blocking(trainer_pushes) -> None:
    results, stub = trainer_pushes
    record = results["token_blocking"]
    assert "error" not in record, record.get("traceback")
    assert record["value"]["type"] == "Future"
    repo = stub.repos["me/token-argument"]
    assert record["value"]["url"] == f"{stub.endpoint}/me/token-argument/commit/{repo.commits[-1]['oid']}"
    assert set(stub.committed_paths("me/token-argument")) == _student_files()


def test_a_sentence_embedding_student_is_pushed_with_its_pooling(tmp_path: Path) -> None:
    from hf_distill.sentence_embeddings import PoolingSettings, write_sentence_transformers_files

    run = make_run_folder(tmp_path / "run")
    write_sentence_transformers_files(run, PoolingSettings("mean", True), embedding_dim=8)
    pushed = set(files_to_push(run))
    assert {"modules.json", "sentence_bert_config.json", "1_Pooling/config.json"} <= pushed
    modules = json.loads((run / "modules.json").read_text())
    needing_files = {m["path"] for m in modules if m["path"] and not m["path"].endswith("Normalize")}
    assert all(any(p.startswith(folder + "/") for p in pushed) for folder in needing_files)
