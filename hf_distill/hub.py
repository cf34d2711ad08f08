"""Pushing a distilled student to the Hugging Face Hub: the student, its card and report, nothing else.

Only an allowlist leaves the machine: the student's config, weights (`*.safetensors` and their
index), tokenizer files, LoRA adapter files, `README.md`, `report.{png,md,json}` and the `onnx/`
folder. The `distillation/` folder (projection heads, recipe), checkpoints, optimizer and scheduler
state, `training_args.bin`, `runs/` and anything named after the teacher stay local. Nothing local
is deleted or changed by a push, whether it succeeds or fails.

Every push path goes through `push_distilled_to_hub`: the `push_to_hub.py` script, `Trainer.push_to_hub`
(and `save_model` with `push_to_hub=True`), and the checkpoint pushes of `hub_strategy`
(`push_checkpoint_allowlisted`, which uploads the student of each checkpoint, never its optimizer state).
"""

from __future__ import annotations

import fnmatch
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

logger = logging.getLogger(__name__)

__all__ = [
    "HubPushError",
    "check_repo_id",
    "resolve_hub_token",
    "files_to_push",
    "check_student_folder",
    "render_card_bytes",
    "ensure_hub_repo",
    "push_distilled_to_hub",
    "push_checkpoint_allowlisted",
]

#: Top-level files of the student folder that are pushed (glob patterns).
STUDENT_FILES = (
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
    "adapter_config.json",
    "README.md",
    "report.png",
    "report.md",
    "report.json",
    "modules.json",  # sentence-transformers: the modules of a sentence-embedding student (its pooling)
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
)
#: Folders pushed whole (recursively), when present (``2_Normalize/`` is empty: sentence-transformers needs no file).
PUSHED_FOLDERS = ("onnx", "1_Pooling")
#: Never pushed, even inside a pushed folder.
NEVER_PUSHED = ("training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state*.pth", "trainer_state.json",
                "*teacher*", "rejected")  # rejected: an int8 export that failed its check (export_onnx)

_REPO_PART = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?$")
REPO_ID_RULE = (
    "a repo id is 'name' or 'namespace/name'; each part uses only ASCII letters, digits, '-', '_' and '.', "
    "does not start or end with '-' or '.', contains no '--' or '..', and is at most 96 characters long"
)


class HubPushError(RuntimeError):
    """A push could not be done (no token, Hub unreachable, refused); nothing local was changed."""


def check_repo_id(repo_id: str) -> None:
    """Raise a ValueError naming the rule when `repo_id` is not a valid Hub repo id."""
    parts = repo_id.split("/") if isinstance(repo_id, str) else []
    valid = 1 <= len(parts) <= 2 and all(
        _REPO_PART.match(part) and "--" not in part and ".." not in part and len(part) <= 96 for part in parts
    )
    if not valid:
        raise ValueError(f"invalid repo id {repo_id!r}: {REPO_ID_RULE}")


def resolve_hub_token(token: str | None = None) -> str:
    """The token to push with: `token`, else `HF_TOKEN`, else the login saved by `huggingface-cli login`."""
    token = token or os.environ.get("HF_TOKEN") or get_token()
    if not token:
        raise HubPushError(
            "no Hugging Face token: pass token= (--hub_token on the command line), set HF_TOKEN, or run "
            "`huggingface-cli login` (`hf auth login` in recent huggingface_hub) to save one. "
            "Nothing was uploaded and nothing local was changed."
        )
    return token


def _never_pushed(relative: str) -> bool:
    return any(fnmatch.fnmatch(part, pattern) for part in relative.split("/") for pattern in NEVER_PUSHED)


def files_to_push(output_dir: str | os.PathLike) -> list[str]:
    """Paths (relative, POSIX) of the files in `output_dir` that a push would upload, sorted."""
    root = Path(output_dir)
    selected = []
    for path in root.iterdir():
        if path.is_file() and any(fnmatch.fnmatch(path.name, pattern) for pattern in STUDENT_FILES):
            selected.append(path.name)
    for folder in PUSHED_FOLDERS:
        if (root / folder).is_dir():
            for path in (root / folder).rglob("*"):
                relative = path.relative_to(root).as_posix()
                if path.is_file() and not any(part.startswith(".") for part in relative.split("/")):
                    selected.append(relative)
    return sorted(relative for relative in selected if not _never_pushed(relative))


def _network_errors() -> tuple[type[BaseException], ...]:
    """Connection-level exception types of whichever HTTP client huggingface_hub uses."""
    errors: list[type[BaseException]] = [OSError, TimeoutError]
    for module_name, attribute in (("httpx2", "TransportError"), ("httpx", "TransportError"),
                                   ("requests", "RequestException")):
        error = getattr(sys.modules.get(module_name), attribute, None)
        if isinstance(error, type) and issubclass(error, BaseException):
            errors.append(error)
    return tuple(errors)


def _explain(err: BaseException, endpoint: str) -> HubPushError:
    kept = "Nothing local was deleted or changed; fix the cause and push again."
    if isinstance(err, OfflineModeIsEnabled):
        return HubPushError(f"HF_HUB_OFFLINE is set, so the Hub cannot be reached: unset it to push. {kept}")
    if isinstance(err, HfHubHTTPError):
        status = getattr(getattr(err, "response", None), "status_code", None)
        if status in (401, 403):
            return HubPushError(
                f"the Hub at {endpoint} refused the token (HTTP {status}): check that it is valid and has write "
                f"access (`huggingface-cli login` or --hub_token). {kept}"
            )
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return HubPushError(f"the Hub at {endpoint} answered with an error (HTTP {status}): {first_line}. {kept}")
    return HubPushError(
        f"could not reach the Hugging Face Hub at {endpoint} ({type(err).__name__}: {err}). Check the network "
        f"connection or HF_ENDPOINT. {kept}"
    )


def check_student_folder(output_dir: str | os.PathLike) -> list[str]:
    """`files_to_push(output_dir)`, after checking that the folder exists and holds student weights."""
    root = Path(output_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"model folder not found: {root}")
    files = files_to_push(root)
    if not any(fnmatch.fnmatch(name, "*.safetensors") for name in files if "/" not in name):
        raise ValueError(
            f"no student weights (*.safetensors) at the top of {root.name!r}: save the student with "
            "save_pretrained (safetensors) before pushing"
        )
    return files


def _readme_bytes(root: Path, repo_id: str) -> bytes:
    if (root / "README.md").is_file():
        return (root / "README.md").read_bytes()
    return render_card_bytes(root, repo_id)


def render_card_bytes(root: str | os.PathLike, repo_id: str, license: str | None = None) -> bytes:  # noqa: A002
    """The distillation card of the student in `root`, rendered in memory (nothing is written)."""
    from hf_distill.cards import render_model_card

    return str(render_model_card(Path(root), model_name=repo_id, license=license)).encode("utf-8")


def ensure_hub_repo(
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    revision: str | None = None,
    endpoint: str | None = None,
) -> str:
    """Check that the Hub can be reached with the token: create the repository (and branch) if missing.

    Returns the full repo id (``namespace/name``). Raises ValueError for an invalid repo id and HubPushError
    when there is no token or the Hub cannot be reached or refuses; nothing local is read or written.
    """
    check_repo_id(repo_id)
    token = resolve_hub_token(token)
    api = HfApi(endpoint=endpoint, token=token)
    try:
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True, token=token)
        full_id = getattr(repo_url, "repo_id", None) or repo_id
        if revision and revision != constants.DEFAULT_REVISION:
            api.create_branch(full_id, branch=revision, exist_ok=True, token=token)
    except (HfHubHTTPError, *_network_errors()) as err:
        raise _explain(err, api.endpoint) from err
    return full_id


def _operations(root: Path, files: list[str], readme: bytes, token: str, copy_to: Path | None) -> list[Any]:
    """One CommitOperationAdd per allowlisted file (README.md from `readme`); large files are read at commit
    time from `root`, or from a copy in `copy_to` (a push that runs later must not see a later save)."""
    operations = [CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=readme)]
    for relative in files:
        if relative == "README.md":
            continue
        source = root / relative
        small_text = source.suffix in (".md", ".json", ".txt", ".jinja") and source.stat().st_size < 2**26
        if not small_text and copy_to is not None:
            target = copy_to / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            source = Path(shutil.copyfile(source, target))
        operations.append(CommitOperationAdd(path_in_repo=relative,
                                             path_or_fileobj=source.read_bytes() if small_text else str(source)))
    for operation in operations:
        content = operation.path_or_fileobj
        if isinstance(content, bytes) and token.encode() in content:
            raise HubPushError(f"refusing to upload {operation.path_in_repo}: it contains the Hub token. "
                               "Nothing was uploaded.")
    return operations


_EXECUTOR: ThreadPoolExecutor | None = None
_EXECUTOR_LOCK = threading.Lock()


def _executor() -> ThreadPoolExecutor:
    """One worker for every non-blocking push, so that commits land in the order they were asked for."""
    global _EXECUTOR
    with _EXECUTOR_LOCK:
        if _EXECUTOR is None:
            _EXECUTOR = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf_distill-push")
        return _EXECUTOR


def push_distilled_to_hub(
    output_dir: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    commit_message: str = "Upload distilled model",
    revision: str | None = None,
    endpoint: str | None = None,
    readme: bytes | None = None,
    blocking: bool = True,
) -> str | Future:
    """Upload the student in `output_dir` (allowlisted files only, see `files_to_push`) and return the commit URL.

    Creates the repository if needed (`exist_ok`), and the branch `revision` when it is not `main`.
    `endpoint` defaults to `HF_ENDPOINT` (read when huggingface_hub is imported) or the public Hub.
    The card is `readme` when given, else the folder's README.md, else the distillation card rendered in
    memory. `blocking=False` returns a Future of the URL at once; the files are copied first, so later
    saves do not change what it uploads. Raises ValueError for an invalid repo id or a folder without
    student weights, and HubPushError when there is no token or the Hub cannot be reached or refuses.
    """
    root = Path(output_dir)
    check_repo_id(repo_id)
    files = check_student_folder(root)
    token = resolve_hub_token(token)
    copy_to = None if blocking else Path(tempfile.mkdtemp(prefix="hf_distill-push-"))
    try:
        operations = _operations(root, files, readme if readme is not None else _readme_bytes(root, repo_id),
                                 token, copy_to)
    except BaseException:
        if copy_to is not None:
            shutil.rmtree(copy_to, ignore_errors=True)
        raise
    logger.info("pushing %d files to %s: %s", len(operations), repo_id, ", ".join(op.path_in_repo for op in operations))

    def commit() -> str:
        try:
            full_id = ensure_hub_repo(repo_id, token=token, private=private, revision=revision, endpoint=endpoint)
            api = HfApi(endpoint=endpoint, token=token)
            try:
                info = api.create_commit(full_id, operations, commit_message=commit_message, revision=revision,
                                         token=token)
            except (HfHubHTTPError, *_network_errors()) as err:
                raise _explain(err, api.endpoint) from err
            return str(info.commit_url)
        finally:
            if copy_to is not None:
                shutil.rmtree(copy_to, ignore_errors=True)

    return commit() if blocking else _executor().submit(commit)


def _log_failure(future: Future) -> None:
    error = future.exception()
    if error is not None:
        logger.warning("checkpoint push to the Hub failed: %s", error)


def push_checkpoint_allowlisted(trainer: Any, checkpoint_folder: str | os.PathLike) -> Future | None:
    """The allowlisted replacement for the stock ``Trainer._push_from_checkpoint`` (``hub_strategy``).

    The stock method uploads the whole ``output_dir`` (projections, ``training_args.bin``, a staged
    ``.checkpoint-N.staging/``) and, for ``checkpoint`` / ``all_checkpoints``, the checkpoint folder with its
    optimizer state. Here every strategy but ``end`` pushes the student of the checkpoint (its allowlisted
    files, see `files_to_push`, and its card rendered in memory) to the repository root, in the
    background; resumable training state is never uploaded. Writes nothing. Like the stock method, it
    skips a push while the previous one runs unless ``hub_always_push``, and ``train()`` waits for the last.
    A push that fails is logged as a warning and training goes on (the final ``push_to_hub`` raises).
    """
    from transformers.utils.hub import PushInProgress

    args = trainer.args
    if not trainer.is_world_process_zero() or args.hub_strategy == "end":
        return None
    pending = getattr(trainer, "push_in_progress", None)
    if not args.hub_always_push and pending is not None and not pending.is_done():
        return None
    if args.hub_strategy in ("checkpoint", "all_checkpoints"):
        logger.warning("hub_strategy=%s: pushing the student of %s only; optimizer state and checkpoint folders "
                       "stay local (resume from the local checkpoint).", args.hub_strategy, Path(checkpoint_folder).name)
    getattr(trainer.callback_handler, "on_push_begin", lambda *a: None)(args, trainer.state, trainer.control)
    step = f"step {trainer.state.global_step}" if args.save_strategy == "steps" else f"epoch {int(trainer.state.epoch or 0)}"
    repo_id = getattr(trainer, "hub_model_id", None) or args.hub_model_id or Path(args.output_dir).absolute().name
    try:
        future = push_distilled_to_hub(
            checkpoint_folder, repo_id, token=args.hub_token, private=bool(args.hub_private_repo),
            commit_message=f"Training in progress, {step}", revision=args.hub_revision, blocking=False,
        )
    except (HubPushError, ValueError, OSError) as err:  # a failed checkpoint push does not stop training
        logger.warning("checkpoint push to the Hub skipped: %s", err)
        return None
    future.add_done_callback(_log_failure)
    if pending is None or pending.is_done():
        trainer.push_in_progress = PushInProgress([future])
    else:
        pending.jobs.append(future)
    return future


def push_trainer_to_hub(trainer: Any, commit_message: Optional[str], *, blocking: bool = True,
                        token: Optional[str] = None, **kwargs: Any) -> Any:
    """``DistillationTrainer.push_to_hub``: save the student and its card, then push the allowlist."""
    args = trainer.args
    repo_id = args.hub_model_id or Path(args.output_dir).name
    trainer.save_model(_internal_call=True)  # not a second push (save_model pushes when args.push_to_hub)
    trainer.create_model_card(model_name=repo_id, dataset_name=kwargs.get("dataset_name"))
    if not trainer.is_world_process_zero():
        return ""
    return push_distilled_to_hub(
        args.output_dir, repo_id, token=token or args.hub_token, private=bool(args.hub_private_repo),
        commit_message=commit_message or "Upload distilled model",
        revision=kwargs.get("revision") or args.hub_revision, blocking=blocking,
    )
