"""The package's shape (ARCHITECTURE.md): functions a reader can hold in mind, a trainer that holds the step."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "hf_distill"
MAX_FUNCTION_LINES = 60
MAX_TRAINER_LINES = 500


def _functions(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.lineno, node.end_lineno - node.lineno + 1


def test_no_function_in_the_package_is_longer_than_60_lines():
    too_long = [
        f"{path.relative_to(PACKAGE.parent)}:{line} {name} ({length} lines)"
        for path in sorted(PACKAGE.rglob("*.py"))
        for name, line, length in _functions(path)
        if length > MAX_FUNCTION_LINES
    ]
    assert not too_long, "functions over 60 lines: " + "; ".join(too_long)


def test_the_trainer_module_stays_under_500_lines():
    lines = len((PACKAGE / "trainer.py").read_text(encoding="utf-8").splitlines())
    assert lines < MAX_TRAINER_LINES, f"hf_distill/trainer.py has {lines} lines"


def test_nothing_below_the_trainer_imports_it():
    importers = [
        path.name for path in sorted(PACKAGE.rglob("*.py"))
        if path.name not in ("trainer.py", "__init__.py", "progressive.py")
        and any(
            isinstance(node, ast.ImportFrom)
            and ((node.level > 0 and node.module == "trainer") or node.module == "hf_distill.trainer")
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        )
    ]
    assert not importers, f"modules below the trainer import it: {importers}"
