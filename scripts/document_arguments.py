#!/usr/bin/env python
"""Print the markdown reference of every `DistillationArguments` field (the README's argument table).

    python scripts/document_arguments.py > /tmp/arguments.md
    python scripts/document_arguments.py --check README.md   # exit 1 if the README lacks a field
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import MISSING, fields

from transformers import TrainingArguments

from hf_distill import DistillationArguments


def own_fields() -> list:
    """The fields DistillationArguments adds to TrainingArguments, in declaration order."""
    inherited = {f.name for f in fields(TrainingArguments)}
    return [f for f in fields(DistillationArguments) if f.name not in inherited]


def markdown() -> str:
    lines = ["| flag | default | meaning |", "|---|---|---|"]
    for f in own_fields():
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        text = f.metadata.get("help", "").replace("|", "\\|").replace("\n", " ")
        lines.append(f"| `--{f.name}` | `{default}` | {text} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", help="a README whose argument table must name every field")
    options = parser.parse_args()
    if options.check:
        text = open(options.check, encoding="utf-8").read()
        missing = [f.name for f in own_fields() if f"`--{f.name}`" not in text]
        if missing:
            print(f"{options.check} does not document: {', '.join(missing)}")
            return 1
        return 0
    print(markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
