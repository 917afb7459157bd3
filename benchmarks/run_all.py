"""Run every benchmark the way BENCHMARKS.md records it, one after another, and print their output.

Usage: ``.venv/bin/python benchmarks/run_all.py [--dry-run] [NAME ...]`` (names without ``bench_`` /
``.py``; ``make benchmarks`` runs them all).

The commands are read from BENCHMARKS.md (the backticked ``.venv/bin/python benchmarks/bench_*.py
...`` lines, optionally behind ``xvfb-run``), so the figures there and the runs here cannot drift
apart. Each command is checked against that shape and run without a shell, from the repository
root, with this interpreter in place of ``.venv/bin/python``. In particular:

- the GUI benchmark runs under ``xvfb-run`` as recorded (software OpenGL: the figures of record);
  without ``xvfb-run`` it is reported as not run;
- the SAE training benchmark is compared with the paper's library ``sparse-autoencoder`` in its side
  environment (``--library-python``, overridable with ``BENCH_SAE_LIBRARY_PYTHON``) only when that
  environment exists and has the library installed; otherwise the runner says so and the
  benchmark runs without it (it then prints "not measured" and no ratio - nothing stands in for
  the library);
- a ``bench_*.py`` script that BENCHMARKS.md does not mention runs with its defaults, flagged.

``--dry-run`` prints what would run (and the checks above) without running anything.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
VENV_PYTHON = ".venv/bin/python"
LIBRARY = "sparse-autoencoder"
LIBRARY_VERSION = "1.10.0"  # the version BENCHMARKS.md's figures were measured against
_COMMAND = re.compile(r"`([^`]*benchmarks/bench_\w+\.py[^`]*)`")


@dataclass
class Run:
    """One benchmark command: argv to execute, and what the runner found out about it."""

    script: str
    argv: list[str]
    notes: list[str] = field(default_factory=list)
    blocked: str | None = None  # why it cannot run (then it counts as failed)


def documented_commands(markdown: str) -> dict[str, list[list[str]]]:
    """script name -> distinct argv lists recorded in BENCHMARKS.md, in order of appearance."""
    out: dict[str, list[list[str]]] = {}
    for text in _COMMAND.findall(markdown):
        argv = shlex.split(text)
        if VENV_PYTHON not in argv:
            continue  # a file named in passing, not a command
        i = argv.index(VENV_PYTHON)
        prefix = argv[:i]
        script = argv[i + 1] if i < len(argv) - 1 else ""
        if (
            not re.fullmatch(r"benchmarks/bench_\w+\.py", script)
            or (prefix and prefix[0] != "xvfb-run")
            or any(t in {";", "&&", "||", "|", "&", ">", "<"} for t in argv)
        ):
            raise ValueError(f"unexpected benchmark command in BENCHMARKS.md: {text}")
        name = Path(script).name
        if argv not in out.setdefault(name, []):
            out[name].append(argv)
    return out


def library_status(python: str) -> str | None:
    """The library's version in the side environment ``python``, or None (with no environment)."""
    if not python or not Path(python).exists():
        return None
    # installed, by its distribution metadata (bench_sae_train.py imports it with shims for the
    # names newer torch dropped, so a bare import is no test)
    probe = "import importlib.metadata as m; print(m.version('sparse-autoencoder'))"
    try:
        done = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else None


def _library_python(argv: list[str]) -> tuple[int | None, str]:
    if "--library-python" in argv:
        i = argv.index("--library-python") + 1
        return i, argv[i]
    return None, "/tmp/saevenv/bin/python"  # the script's own default


def plan(
    scripts: list[Path],
    markdown: str,
    *,
    python: str = sys.executable,
    env: dict[str, str] | None = None,
    which=None,
    library=None,
) -> list[Run]:
    """The runs for ``scripts``: their BENCHMARKS.md commands with the checks applied.

    ``which`` (finds xvfb-run) and ``library`` (the side environment's library version) default to
    :func:`shutil.which` and :func:`library_status`.
    """
    env = os.environ if env is None else env
    which = shutil.which if which is None else which
    library = library_status if library is None else library
    recorded = documented_commands(markdown)
    runs: list[Run] = []
    for script in scripts:
        rel = f"benchmarks/{script.name}"
        commands = recorded.get(script.name)
        if not commands:
            run = Run(script.name, [VENV_PYTHON, rel])
            run.notes.append("not in BENCHMARKS.md: runs with its defaults")
            commands_runs = [run]
        else:
            commands_runs = [Run(script.name, list(argv)) for argv in commands]
        for run in commands_runs:
            argv = run.argv
            argv[argv.index(VENV_PYTHON)] = python
            if argv[0] == "xvfb-run" and which("xvfb-run") is None:
                run.blocked = "xvfb-run not found (install xvfb: `make system-deps`)"
            if script.name == "bench_sae_train.py":
                i, lib_py = _library_python(argv)
                lib_py = env.get("BENCH_SAE_LIBRARY_PYTHON", lib_py)
                version = library(lib_py)
                if version is None:
                    run.notes.append(
                        f"the paper's library side environment {lib_py} does not exist or lacks "
                        f"{LIBRARY}: the library is NOT measured and no ratio is printed (recipe: "
                        "benchmarks/bench_sae_train.py docstring)"
                    )
                    lib_py = ""  # the script then measures ours only
                else:
                    run.notes.append(f"against {LIBRARY} {version} in {lib_py}")
                    if version != LIBRARY_VERSION:
                        run.notes.append(
                            f"BENCHMARKS.md's figures were measured against {LIBRARY_VERSION}"
                        )
                if i is None:
                    argv += ["--library-python", lib_py]
                else:
                    argv[i] = lib_py
        runs.extend(commands_runs)
    return runs


def main(argv: list[str] | None = None) -> int:
    """Run the selected (default: all) benchmarks; return non-zero if any failed or could not run."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help="benchmarks to run (e.g. gui sae_train); default all")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = ap.parse_args(argv)
    scripts = sorted(HERE.glob("bench_*.py"))
    if args.names:
        wanted = {f"bench_{name}.py" for name in args.names}
        unknown = wanted - {s.name for s in scripts}
        if unknown:
            ap.error(f"no such benchmark: {', '.join(sorted(unknown))}")
        scripts = [s for s in scripts if s.name in wanted]
    markdown = (REPO / "BENCHMARKS.md").read_text(encoding="utf-8")
    missing = sorted(set(documented_commands(markdown)) - {s.name for s in HERE.glob("bench_*.py")})
    if missing:
        print(f"BENCHMARKS.md names scripts that do not exist: {', '.join(missing)}", flush=True)
    failed = [f"{name} (missing)" for name in missing if not args.names]
    for run in plan(scripts, markdown):
        print(f"\n=== {run.script} ===", flush=True)
        for note in run.notes:
            print(f"note: {note}", flush=True)
        print("$ " + shlex.join(run.argv), flush=True)
        if run.blocked:
            print(f"NOT RUN: {run.blocked}", flush=True)
            failed.append(run.script)
            continue
        if args.dry_run:
            continue
        if subprocess.run(run.argv, cwd=REPO).returncode != 0:
            failed.append(run.script)
    if failed:
        print("failed or not run:", ", ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
