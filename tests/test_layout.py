"""The shape of the code: units small enough to read whole."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

WORKER = Path(__file__).resolve().parent.parent / "worker"


def _too_long() -> list[str]:
    found = []
    for path in sorted(WORKER.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            lines = (node.end_lineno or node.lineno) - node.lineno + 1
            limit = 300 if isinstance(node, ast.ClassDef) else 80
            if lines > limit:
                found.append(f"{path.relative_to(WORKER.parent)}:{node.name} ({lines} lines)")
    return found


def test_no_class_over_300_lines_and_no_function_over_80() -> None:
    """Every class of `worker/` fits 300 lines and every function 80."""
    assert _too_long() == []


def test_the_client_loads_nothing_of_the_orchestrator() -> None:
    """Importing the client library loads no module of the engine, the core, the audit or
    the dev tools: a deployed client depends only on the published wire models."""
    code = (
        "import sys, worker.client; "
        "print(sorted(m for m in sys.modules if m.startswith("
        "('worker.engine', 'worker.core', 'worker.audit', 'worker.devtools'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def test_the_packages_say_they_are_typed() -> None:
    """`py.typed` in both packages, and in the wheel's package data, so that mypy checks a
    user's calls into the client (PEP 561) instead of reporting the modules missing."""
    import tomllib

    root = WORKER.parent
    assert (root / "worker" / "py.typed").exists()
    assert (root / "schemas" / "py.typed").exists()
    data = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "py.typed" in data["package-data"]["worker"]
    assert "py.typed" in data["package-data"]["schemas"]
