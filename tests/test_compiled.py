"""The compiled hot modules: used when the build matches the sources, never otherwise."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from worker import compiled
from worker.devtools.compile import missing_tools

ROOT = Path(__file__).resolve().parent.parent

_PROBE = (
    "import json, worker.compiled as c, worker.core.lifecycle as l, worker.engine.task as t; "
    "print(json.dumps([c.state(), l.__file__, t.__file__]))"
)


def _probe(tree: Path, *flags: str, **env: str) -> tuple[str, str, str]:
    """(state, lifecycle's file, task's file) as a fresh interpreter sees them in `tree`."""
    done = subprocess.run(
        [sys.executable, *flags, "-c", _PROBE],
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree), **env},
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        return "raised", done.stderr.strip().splitlines()[-1], ""
    state, lifecycle, task = json.loads(done.stdout)
    return state, lifecycle, task


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the package with the build of this checkout."""
    if missing_tools() is not None:
        pytest.skip(f"cannot compile here: {missing_tools()}")
    assert compiled.MANIFEST.is_file(), "make compile builds worker/_compiled before the tests"
    copy = tmp_path_factory.mktemp("tree")
    for package in ("worker", "schemas"):
        shutil.copytree(
            ROOT / package, copy / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    return copy


def test_the_tests_run_the_compiled_modules_where_a_compiler_is() -> None:
    """Under `make test` on a machine that can compile, every hot module comes from the
    build: the suite checks the code the worker runs."""
    if missing_tools() is not None or os.environ.get("JOBS_COMPILED") == "0":
        pytest.skip("no build to use here")
    import worker.engine.task  # noqa: F401  (loads every compiled module)

    assert compiled.state() == "compiled"
    for name in compiled.MODULES:
        __import__(name)
        assert sys.modules[name].__file__.endswith(".so"), name  # type: ignore[union-attr]


def test_a_matching_build_is_used(tree: Path) -> None:
    state, lifecycle, task = _probe(tree)
    assert state == "compiled"
    assert lifecycle.endswith(".so")
    assert task.endswith(".so")


def test_a_changed_source_sends_every_module_back_to_source(tree: Path) -> None:
    """One edited module: a warning names it, and every module (not only it) runs from
    source, since compiled modules call each other directly."""
    source = tree / "worker" / "core" / "runid.py"
    original = source.read_text()
    source.write_text(original + "\n# edited\n")
    try:
        assert _probe(tree, "-W", "error::RuntimeWarning")[:2] == (
            "raised",
            "RuntimeWarning: worker: the compiled build is "
            "stale (worker/core/runid.py changed since it was "
            "compiled); running from source. `make compile` rebuilds it.",
        )
        state, lifecycle, task = _probe(tree)
    finally:
        source.write_text(original)
    assert state.startswith("source: the compiled build is stale")
    assert lifecycle.endswith("lifecycle.py")
    assert task.endswith("task.py")


def test_jobs_compiled_0_runs_from_source(tree: Path) -> None:
    state, lifecycle, _ = _probe(tree, JOBS_COMPILED="0")
    assert state == "source: JOBS_COMPILED=0"
    assert lifecycle.endswith("lifecycle.py")


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (lambda m: m.update(suffix=".cpython-39-x86_64-linux-gnu.so"), "not this interpreter"),
        (lambda m: m["modules"].pop("worker.core.runid"), "another list of modules"),
        (lambda m: m.update(group="gone.so"), "gone.so missing"),
        (lambda m: m.clear(), "not this interpreter"),
    ],
    ids=["other-python", "other-modules", "missing-file", "empty"],
)
def test_a_build_that_does_not_fit_is_not_used(tree: Path, damage: object, why: str) -> None:
    manifest_path = tree / "worker" / "_compiled" / "manifest.json"
    kept = manifest_path.read_text()
    manifest = json.loads(kept)
    damage(manifest)  # type: ignore[operator]
    manifest_path.write_text(json.dumps(manifest))
    try:
        state, lifecycle, _ = _probe(tree)
    finally:
        manifest_path.write_text(kept)
    assert why in state
    assert lifecycle.endswith("lifecycle.py")


@pytest.mark.parametrize(
    "junk", [b"", b"\xff\xfe{", b"[1, 2]", b'{"modules": 5}', b"[" * 100_000, b"\x00" * 64]
)
def test_a_damaged_manifest_is_not_used(tree: Path, junk: bytes) -> None:
    """Whatever bytes the manifest holds, the worker imports and runs from source."""
    manifest_path = tree / "worker" / "_compiled" / "manifest.json"
    kept = manifest_path.read_bytes()
    manifest_path.write_bytes(junk)
    try:
        state, lifecycle, _ = _probe(tree)
    finally:
        manifest_path.write_bytes(kept)
    assert state.startswith("source: the compiled build is stale")
    assert lifecycle.endswith("lifecycle.py")


def _compile(tree: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-W", "ignore::RuntimeWarning", "-m", "worker.devtools.compile", *args],
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree), **env},
        capture_output=True,
        text=True,
    )


def test_make_compile_with_jobs_compiled_0_leaves_the_build_alone(tree: Path) -> None:
    manifest = (tree / "worker" / "_compiled" / "manifest.json").read_bytes()
    done = _compile(tree, JOBS_COMPILED="0")
    assert done.returncode == 0
    assert "not compiling the hot modules: JOBS_COMPILED=0" in done.stdout
    assert (tree / "worker" / "_compiled" / "manifest.json").read_bytes() == manifest


def test_clean_removes_the_build_and_the_worker_runs_from_source(
    tree: Path, tmp_path: Path
) -> None:
    keep = tmp_path / "kept"
    shutil.copytree(tree / "worker" / "_compiled", keep)
    try:
        done = _compile(tree, "--clean")
        assert done.returncode == 0
        assert not (tree / "worker" / "_compiled").exists()
        state, lifecycle, _ = _probe(tree)
    finally:
        shutil.copytree(keep, tree / "worker" / "_compiled", dirs_exist_ok=True)
    assert state == "source: no compiled build (make compile)"
    assert lifecycle.endswith("lifecycle.py")
