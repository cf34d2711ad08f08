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


def test_the_sentence_embedding_example_runs_as_written(tmp_path):
    """The README's sentence-embedding block, run with its paths pointed at the shared data and 2 steps."""
    from conftest import shared_data_dir

    data = shared_data_dir()
    if not (data / "models" / "all-MiniLM-L6-v2").is_dir():
        import pytest

        pytest.skip("../shared/data is not staged")
    text = (REPO_ROOT / "README.md").read_text()
    anchor = text.index('path = "../shared/data/models/all-MiniLM-L6-v2"')
    block = text[text.rindex("```python", 0, anchor) + len("```python"):text.index("```", anchor)]
    block = (block.replace("../shared/data", str(data)).replace('"runs/minilm-l3"', repr(str(tmp_path / "run")))
             .replace("max_steps=300", "max_steps=2, report_to=[], use_cpu=True, save_strategy='no'"))
    exec(compile(block, "README.md", "exec"), {})
    saved = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"model.safetensors", "modules.json", "sentence_bert_config.json", "1_Pooling"} <= saved
