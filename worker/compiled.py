"""The hot modules compiled with mypyc, used only while the build matches their sources.

`make compile` (`python -m worker.devtools.compile`) compiles `MODULES` into
`worker/_compiled/`, with a manifest of each source's SHA-256. Importing `worker` serves
those modules from the build when the build is for this interpreter and every source is
the one compiled; otherwise (no build, a stale one, or `JOBS_COMPILED=0`) every module
comes from its source, as without a build. It is all or nothing: compiled modules call
each other directly, so one stale module sends all of them back to source.

Compiled, a module runs the same code as its source (mypyc checks its type annotations at
run time besides: a value that contradicts one raises `TypeError`, a batch failure like any
other); the worker spends 12-15% less CPU per transition (docs/performance.md, "Compiled
hot modules").
`state()` says which is in use; the worker logs it at start and `jobctl bench` records it.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
import warnings
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType

# What a transition runs through, in the worker's process: its values (`core/values.py`,
# job states, run rows), decoding, deciding, the status events' headers and records,
# SQLite's rows and the records held for the other input. Left out: the write-behind queue
# (`engine/writer.py`, asynchronous, its work SQLite's); what pydantic validates or
# serializes by its annotations (mypyc erases those it does not need): the values' shapes
# (`core/shapes.py`) and the changelog's rows as read and restored
# (`engine/changelog.py`); and what mypyc does not compile (classes derived from a builtin
# exception or from pydantic, async generators).
MODULES = (
    "worker.core.values",
    "worker.core.jobstate",
    "worker.core.runs",
    "worker.core.lifecycle",
    "worker.core.runid",
    "worker.engine.task",
    "worker.engine.codec",
    "worker.engine.encoding",
    "worker.engine.stored",
    "worker.engine.hold",
    "worker.engine.envelope",
    "worker.engine.records",
    "worker.engine.staterows",
    "worker.engine.writer",
)
GROUP = "worker_native"  # mypyc's shared library of the group: `worker_native__mypyc`
BUILD = Path(__file__).resolve().parent / "_compiled"
MANIFEST = BUILD / "manifest.json"
ROOT = BUILD.parent.parent  # the directory holding the `worker` package

_state = "source: not installed yet"


def source_of(module: str) -> Path:
    """The source file of one of `MODULES`."""
    return ROOT.joinpath(*module.split(".")).with_suffix(".py")


def digest(path: Path) -> str:
    """The SHA-256 of a file, hex."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


class _Finder(importlib.abc.MetaPathFinder):
    """Serves the compiled modules (and their group's shared library) from the build."""

    def __init__(self, binaries: dict[str, Path]) -> None:
        self.binaries = binaries

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        binary = self.binaries.get(fullname)
        if binary is None:
            return None
        loader = importlib.machinery.ExtensionFileLoader(fullname, str(binary))
        return importlib.util.spec_from_file_location(fullname, binary, loader=loader)


def _binaries(manifest: dict[str, object]) -> dict[str, Path] | str:
    """The compiled files by module name, or why the build cannot be used."""
    if manifest.get("suffix") != importlib.machinery.EXTENSION_SUFFIXES[0]:
        return f"built for {manifest.get('suffix')}, not this interpreter"
    modules = manifest.get("modules")
    if not isinstance(modules, dict) or set(modules) != set(MODULES):
        return "built from another list of modules"
    binaries: dict[str, Path] = {}
    for name, entry in modules.items():
        source = source_of(name)
        if not isinstance(entry, dict) or not source.is_file() or digest(source) != entry["sha256"]:
            return f"{source.relative_to(ROOT)} changed since it was compiled"
        binaries[name] = BUILD / str(entry["binary"])
    binaries[f"{GROUP}__mypyc"] = BUILD / str(manifest["group"])
    missing = [path.name for path in binaries.values() if not path.is_file()]
    if missing:
        return f"{', '.join(missing)} missing"
    return binaries


def install() -> str:
    """Serve `MODULES` from the build when it matches their sources; returns `state()`."""
    global _state
    if os.environ.get("JOBS_COMPILED", "1") == "0":
        _state = "source: JOBS_COMPILED=0"
    elif not MANIFEST.is_file():
        _state = "source: no compiled build (make compile)"
    else:
        try:
            found = _binaries(json.loads(MANIFEST.read_text()))
        except Exception as exc:  # whatever the damage, the sources still run
            found = f"unreadable manifest: {exc.__class__.__name__}"
        if isinstance(found, str):
            stale = f"the compiled build is stale ({found})"
            _state = f"source: {stale}"
            warnings.warn(
                f"worker: {stale}; running from source. `make compile` rebuilds it.",
                RuntimeWarning,
                stacklevel=2,
            )
        elif any(name in sys.modules for name in MODULES):
            _state = "source: imported before the build was installed"
        else:
            sys.meta_path.insert(0, _Finder(found))
            _state = "compiled"
    return _state


def state() -> str:
    """`compiled`, or `source: <why>`."""
    return _state
