"""Pushing a distilled student to the Hugging Face Hub: the student, its card and report, nothing else.

Only an allowlist leaves the machine: the student's config, weights (`*.safetensors` and their
index), tokenizer files, LoRA adapter files, `README.md`, `report.{png,md,json}` and the `onnx/`
folder. The `distillation/` folder (projection heads, recipe), checkpoints, optimizer and scheduler
state, `training_args.bin`, `runs/` and anything named after the teacher stay local. Nothing local
is deleted or changed by a push, whether it succeeds or fails.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import re
import sys
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

logger = logging.getLogger(__name__)

__all__ = ["HubPushError", "check_repo_id", "resolve_hub_token", "files_to_push", "push_distilled_to_hub"]

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
)
#: Folders pushed whole (recursively), when present.
PUSHED_FOLDERS = ("onnx",)
#: Never pushed, even inside a pushed folder.
NEVER_PUSHED = ("training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state*.pth", "trainer_state.json",
                "*teacher*")

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


def _readme_bytes(root: Path, repo_id: str) -> bytes:
    if (root / "README.md").is_file():
        return (root / "README.md").read_bytes()
    from hf_distill.cards import render_model_card  # rendered in memory: a push changes nothing local

    return str(render_model_card(root, model_name=repo_id)).encode("utf-8")


def push_distilled_to_hub(
    output_dir: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    commit_message: str = "Upload distilled model",
    revision: str | None = None,
    endpoint: str | None = None,
) -> str:
    """Upload the student in `output_dir` (allowlisted files only, see `files_to_push`) and return the commit URL.

    Creates the repository if needed (`exist_ok`), and the branch `revision` when it is not `main`.
    `endpoint` defaults to `HF_ENDPOINT` (read when huggingface_hub is imported) or the public Hub.
    When the folder has no README.md, the distillation card is rendered in memory and uploaded.
    Raises ValueError for an invalid repo id or a folder without student weights, and HubPushError
    when there is no token or the Hub cannot be reached or refuses the push.
    """
    root = Path(output_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"model folder not found: {root}")
    check_repo_id(repo_id)
    token = resolve_hub_token(token)
    files = files_to_push(root)
    if not any(fnmatch.fnmatch(name, "*.safetensors") for name in files if "/" not in name):
        raise ValueError(
            f"no student weights (*.safetensors) at the top of {root.name!r}: save the student with "
            "save_pretrained (safetensors) before pushing"
        )
    operations = [CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=_readme_bytes(root, repo_id))]
    for relative in files:
        if relative == "README.md":
            continue
        source = root / relative
        small_text = source.suffix in (".md", ".json", ".txt", ".jinja") and source.stat().st_size < 2**26
        operations.append(CommitOperationAdd(path_in_repo=relative,
                                             path_or_fileobj=source.read_bytes() if small_text else str(source)))
    for operation in operations:
        content = operation.path_or_fileobj
        if isinstance(content, bytes) and token.encode() in content:
            raise HubPushError(f"refusing to upload {operation.path_in_repo}: it contains the Hub token. "
                               "Nothing was uploaded.")
    logger.info("pushing %d files to %s: %s", len(operations), repo_id, ", ".join(op.path_in_repo for op in operations))

    api = HfApi(endpoint=endpoint, token=token)
    try:
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True, token=token)
        full_id = getattr(repo_url, "repo_id", None) or repo_id
        if revision and revision != constants.DEFAULT_REVISION:
            api.create_branch(full_id, branch=revision, exist_ok=True, token=token)
        info = api.create_commit(full_id, operations, commit_message=commit_message, revision=revision, token=token)
    except (HfHubHTTPError, *_network_errors()) as err:
        raise _explain(err, api.endpoint) from err
    return str(info.commit_url)
