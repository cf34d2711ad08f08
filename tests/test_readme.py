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
