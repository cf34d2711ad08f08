#!/usr/bin/env python
"""Write (or refresh) the distillation model card of a saved student, then push it to the Hub.

    python scripts/push_to_hub.py --model_dir outputs/sst2-student --repo_id me/bert-sst2-distilled

Only the student, its card, its report and `onnx/` are uploaded (see hf_distill.hub.files_to_push).
The token comes from --hub_token, else HF_TOKEN, else the login saved by `huggingface-cli login`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import hf_distill  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_distill.cards import write_model_card  # noqa: E402
from hf_distill.hub import (  # noqa: E402
    HubPushError,
    check_repo_id,
    files_to_push,
    push_distilled_to_hub,
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
    """Check inputs first (nothing is written on bad input), refresh the card, push, print the commit URL."""
    args = parse_args(argv)
    model_dir = Path(args.model_dir)
    try:
        if not model_dir.is_dir():
            raise FileNotFoundError(f"--model_dir not found: {model_dir}")
        check_repo_id(args.repo_id)
        if args.dry_run:
            print("\n".join(sorted(set(files_to_push(model_dir)) | {"README.md"})))
            return 0
        token = resolve_hub_token(args.hub_token)
        if not args.no_card:
            print(f"model card: {write_model_card(model_dir, model_name=args.repo_id, license=args.license)}")
        url = push_distilled_to_hub(model_dir, args.repo_id, token=token, private=args.private,
                                    commit_message=args.commit_message, revision=args.revision)
    except (ValueError, FileNotFoundError, HubPushError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"pushed: {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
