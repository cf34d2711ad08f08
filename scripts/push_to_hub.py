#!/usr/bin/env python
"""Push a saved student and its distillation model card to the Hub, then refresh the card locally.

    python scripts/push_to_hub.py --model_dir outputs/sst2-student --repo_id me/bert-sst2-distilled

Only the student, its card, its report and `onnx/` are uploaded (see hf_distill.hub.files_to_push).
The token comes from --hub_token, else HF_TOKEN, else the login saved by `huggingface-cli login`.
The token, the Hub and the repository are checked first, and the card is rendered in memory:
README.md is written into --model_dir only after the push succeeded, so a failed push changes nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import hf_distill  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_distill.hub import (  # noqa: E402
    HubPushError,
    check_repo_id,
    check_student_folder,
    ensure_hub_repo,
    files_to_push,
    push_distilled_to_hub,
    render_card_bytes,
    resolve_hub_token,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_dir", required=True, help="the saved student folder (a training output_dir)")
    parser.add_argument("--repo_id", required=True, help="'namespace/name' (or 'name', in your own namespace)")
    parser.add_argument("--hub_token", default=None, help="Hub token with write access (default: HF_TOKEN or login)")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--revision", default=None, help="branch to push to (created if missing; default main)")
    parser.add_argument("--commit_message", default="Upload distilled model")
    parser.add_argument("--license", default=None, help="license id for the card, e.g. apache-2.0")
    parser.add_argument("--no_card", action="store_true", help="push README.md as it is instead of refreshing it")
    parser.add_argument("--dry_run", action="store_true", help="list the files that would be pushed, then stop")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Check everything first (token, folder, Hub, repository), push, then write the card; print the URL."""
    args = parse_args(argv)
    model_dir = Path(args.model_dir)
    try:
        if not model_dir.is_dir():
            raise FileNotFoundError(f"--model_dir not found: {model_dir}")
        check_repo_id(args.repo_id)
        if args.dry_run:
            print("\n".join(sorted(set(files_to_push(model_dir)) | {"README.md"})))
            return 0
        check_student_folder(model_dir)
        token = resolve_hub_token(args.hub_token)
        ensure_hub_repo(args.repo_id, token=token, private=args.private, revision=args.revision)
        card = None if args.no_card else render_card_bytes(model_dir, args.repo_id, license=args.license)
        url = push_distilled_to_hub(model_dir, args.repo_id, token=token, private=args.private,
                                    commit_message=args.commit_message, revision=args.revision, readme=card)
    except (ValueError, FileNotFoundError, HubPushError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if card is not None:
        (model_dir / "README.md").write_bytes(card)  # the card that was pushed, written once the push succeeded
        print(f"model card: {model_dir / 'README.md'}")
    print(f"pushed: {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
