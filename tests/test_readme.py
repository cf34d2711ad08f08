"""The README documents every DistillationArguments field and keeps the two-command set-up."""

import subprocess
import sys

from conftest import REPO_ROOT


def test_readme_documents_every_distillation_argument():
    done = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "document_arguments.py"), "--check",
                           str(REPO_ROOT / "README.md")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_readme_setup_is_make_demo_and_make_test():
    text = (REPO_ROOT / "README.md").read_text()
    setup = text.split("## Set-up", 1)[1].split("##", 1)[0]
    assert "make demo" in setup and "make test" in setup


def test_every_import_the_readme_shows_works():
    import importlib
    import re

    text = (REPO_ROOT / "README.md").read_text()
    statements = re.findall(r"^\s*from (hf_distill[\w.]*) import (\([^)]*\)|[^\n]+)", text, flags=re.M)
    statements += [(m, "") for m in re.findall(r"^\s*import (hf_distill[\w.]*)\s*$", text, flags=re.M)]
    assert len(statements) >= 5, statements  # the README shows the API through imports
    for module, names in statements:
        imported = importlib.import_module(module)
        for name in filter(None, (n.split("#")[0].strip(" ()") for n in names.replace("\n", ",").split(","))):
            assert hasattr(imported, name), f"README: from {module} import {name}"
