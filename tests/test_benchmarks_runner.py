"""benchmarks/run_all.py (`make benchmarks`): every benchmark run as BENCHMARKS.md records it.

Only the runner's logic is exercised (``--dry-run`` and its planning function): the benchmarks
themselves take minutes and are not run here.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_all():
    spec = importlib.util.spec_from_file_location("run_all", REPO / "benchmarks" / "run_all.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["run_all"] = module  # dataclasses look their module up while it executes
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("run_all", None)


def scripts(*names: str) -> list[Path]:
    return [REPO / "benchmarks" / f"bench_{n}.py" for n in names]


def test_every_recorded_command_is_found(run_all):
    markdown = (REPO / "BENCHMARKS.md").read_text()
    recorded = run_all.documented_commands(markdown)
    # each backticked benchmark command in BENCHMARKS.md, and nothing else
    expected = set(
        re.findall(r"`[^`]*\.venv/bin/python benchmarks/(bench_\w+\.py)[^`]*`", markdown)
    )
    assert set(recorded) == expected and "bench_gui.py" in expected
    for name in recorded:
        assert (REPO / "benchmarks" / name).is_file(), f"BENCHMARKS.md names a missing {name}"
    (gui,) = recorded["bench_gui.py"]
    assert gui[0] == "xvfb-run" and gui[-1] == "benchmarks/bench_gui.py"


def test_gui_runs_under_xvfb_and_is_reported_when_xvfb_is_missing(run_all):
    markdown = (REPO / "BENCHMARKS.md").read_text()
    (run,) = run_all.plan(scripts("gui"), markdown, python="PY", which=lambda _: "/usr/bin/x")
    assert run.argv[0] == "xvfb-run" and run.argv[-2:] == ["PY", "benchmarks/bench_gui.py"]
    assert run.blocked is None
    (run,) = run_all.plan(scripts("gui"), markdown, python="PY", which=lambda _: None)
    assert "xvfb-run not found" in run.blocked


def test_sae_training_uses_the_library_only_where_it_is(run_all):
    markdown = (REPO / "BENCHMARKS.md").read_text()
    seen = []

    def library(python):
        seen.append(python)
        return {"/side/bin/python": "1.10.0", "/old/bin/python": "1.9.0"}.get(python)

    def sae_run(env):
        (run,) = run_all.plan(scripts("sae_train"), markdown, python="PY", env=env, library=library)
        lib = run.argv[run.argv.index("--library-python") + 1]
        return lib, " ".join(run.notes)

    lib, notes = sae_run({"BENCH_SAE_LIBRARY_PYTHON": "/side/bin/python"})
    assert lib == "/side/bin/python" and "against sparse-autoencoder 1.10.0" in notes
    lib, notes = sae_run({"BENCH_SAE_LIBRARY_PYTHON": "/old/bin/python"})
    assert lib == "/old/bin/python" and "measured against 1.10.0" in notes  # version flagged
    # no side environment: said so, and the benchmark is told there is none (no ratio printed)
    lib, notes = sae_run({"BENCH_SAE_LIBRARY_PYTHON": "/nowhere/bin/python"})
    assert lib == "" and "NOT measured" in notes and "no ratio" in notes
    # without the override, the environment BENCHMARKS.md names is the one asked about
    sae_run({})
    assert seen[-1] == "/tmp/saevenv/bin/python"


def test_unrecorded_script_runs_with_defaults_and_odd_commands_are_refused(run_all, tmp_path):
    (run,) = run_all.plan([tmp_path / "bench_new.py"], "", python="PY")
    assert run.argv == ["PY", "benchmarks/bench_new.py"] and "not in BENCHMARKS.md" in run.notes[0]
    with pytest.raises(ValueError, match="unexpected benchmark command"):
        run_all.documented_commands("`rm -rf / ; .venv/bin/python benchmarks/bench_x.py`")
    with pytest.raises(ValueError, match="unexpected benchmark command"):
        run_all.documented_commands("`.venv/bin/python benchmarks/bench_x.py > out.txt`")
    # a file named in passing is no command
    assert run_all.documented_commands("see `benchmarks/bench_gui.py`") == {}


def test_dry_run_prints_every_benchmark_and_runs_nothing(run_all, capsys, monkeypatch):
    ran = []
    monkeypatch.setattr(run_all.subprocess, "run", lambda *a, **k: ran.append(a))
    monkeypatch.setattr(run_all, "library_status", lambda python: None)
    monkeypatch.setattr(run_all.shutil, "which", lambda name: f"/usr/bin/{name}")
    assert run_all.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert ran == []
    for script in sorted((REPO / "benchmarks").glob("bench_*.py")):
        assert f"=== {script.name} ===" in out
    assert re.search(r"\$ xvfb-run .* benchmarks/bench_gui\.py", out)
    assert f"{sys.executable} benchmarks/bench_phantom.py --studies 12 --size full" in out
    assert "the library is NOT measured" in out
    with pytest.raises(SystemExit):
        run_all.main(["--dry-run", "no_such_benchmark"])
