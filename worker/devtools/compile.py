"""`make compile`: the hot modules (`worker.compiled.MODULES`) compiled with mypyc.

The build goes to `worker/_compiled/` beside the sources of the `worker` package in use
(a checkout, or an installed copy), with a manifest of what was compiled; `worker` uses it
only while every source is the one compiled (`worker.compiled`). It takes 20-40 s on two
cores. Without a C compiler or mypyc it says so and changes nothing: the worker runs from
source, at 14-16% more CPU per transition.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from worker.compiled import BUILD, GROUP, MANIFEST, MODULES, ROOT, digest, source_of

# mypy's settings while compiling: pydantic's plugin, for the models' types; no `strict`
# (mypyc needs the types, not the lint, which `make typecheck` does).
_MYPY_INI = """\
[mypy]
plugins = pydantic.mypy
[mypy-aiokafka.*]
ignore_missing_imports = True
"""

_SETUP = """\
import sys
from setuptools import setup
from mypyc.build import mypycify
paths, group = sys.argv[1].split(","), sys.argv[2]
setup(
    name="worker-compiled",
    ext_modules=mypycify(paths, opt_level="3", group_name=group),
    script_args=["build_ext", "--build-lib", "out", "--build-temp", "temp"],
)
"""


def missing_tools() -> str | None:
    """Why this machine cannot compile, or None."""
    if importlib.util.find_spec("mypyc") is None:
        return "mypyc is not installed (it comes with mypy: pip install mypy)"
    if importlib.util.find_spec("setuptools") is None:
        return "setuptools is not installed (pip install setuptools)"
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        return f"no C compiler ({compiler}) on PATH"
    return None


def build() -> Path:
    """Compile `MODULES` into `BUILD`, replacing what is there; returns the manifest."""
    sources = {name: source_of(name) for name in MODULES}
    with tempfile.TemporaryDirectory(prefix="worker-compile-") as tmp:
        work = Path(tmp)
        for package in ("worker", "schemas"):
            shutil.copytree(
                ROOT / package,
                work / package,
                ignore=shutil.ignore_patterns("_compiled", "__pycache__", "static"),
            )
        (work / "mypy.ini").write_text(_MYPY_INI)
        paths = [str(path.relative_to(ROOT)) for path in sources.values()]
        done = subprocess.run(
            [sys.executable, "-c", _SETUP, ",".join(paths), GROUP],
            cwd=work,
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-25:])
            raise SystemExit(f"mypyc could not compile the hot modules:\n{tail}")
        suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
        out = work / "out"
        staged = work / "_compiled"
        staged.mkdir()
        modules = {}
        for name in MODULES:
            built = out.joinpath(*name.split(".")).with_name(name.rsplit(".", 1)[1] + suffix)
            binary = name + suffix
            shutil.copy2(built, staged / binary)
            compiled = work / sources[name].relative_to(ROOT)
            modules[name] = {"binary": binary, "sha256": digest(compiled)}
        group = f"{GROUP}__mypyc{suffix}"
        shutil.copy2(out / group, staged / group)
        manifest = {"suffix": suffix, "group": group, "modules": modules}
        (staged / MANIFEST.name).write_text(json.dumps(manifest, indent=2) + "\n")
        shutil.rmtree(BUILD, ignore_errors=True)
        shutil.copytree(staged, BUILD)
    return MANIFEST


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m worker.devtools.compile", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--clean", action="store_true", help="remove the build: run from source")
    args = parser.parse_args(argv)
    if args.clean:
        shutil.rmtree(BUILD, ignore_errors=True)
        print(f"removed {BUILD}: the worker runs from source")
        return 0
    reason = missing_tools()
    if os.environ.get("JOBS_COMPILED", "1") == "0":
        reason = "JOBS_COMPILED=0"
    if reason is not None:
        print(f"not compiling the hot modules: {reason}; the worker runs from source")
        return 0
    print(f"compiling {len(MODULES)} hot modules with mypyc (20-40 s) ...", flush=True)
    started = time.monotonic()
    build()
    print(f"compiled into {BUILD} in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
