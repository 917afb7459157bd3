"""A built wheel, installed outside the repository, is a working plugin with the bundled weights.

The wheel is built offline from a copy of the files a release is built from, installed with
``--no-deps`` into a fresh virtual environment in a temporary folder, which borrows the heavy
dependencies (torch, napari, ...) from this interpreter's site-packages through a ``.pth`` file. That
folder is only appended to ``sys.path``, so the ``.pth`` files in it (this checkout's editable
install among them) are not run and the repository's ``src/`` is not importable there: every
``napari_mammo_sae`` import in the new environment is the installed wheel (asserted).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: what a release is built from (a clean copy: no build/ or egg-info from the checkout)
BUILD_INPUTS = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "weights", "src")

pytestmark = pytest.mark.slow  # about 30 s on 2 busy cores (builds, installs, runs 3 commands)


def run(cmd: list, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"{cmd[:3]} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """(venv folder, its python, its console script, a clean environment) with the wheel installed."""
    root = tmp_path_factory.mktemp("wheel")
    assert not root.resolve().is_relative_to(REPO)
    src = root / "source"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in BUILD_INPUTS:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=ignore)
        else:
            shutil.copy2(path, src / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PIP_NO_INDEX"] = "1"  # offline: nothing may come from a registry
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    dist = root / "dist"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", dist, "."],
        cwd=src, env=env)  # fmt: skip
    (wheel,) = dist.glob("napari_mammo_sae-*.whl")

    venv = root / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=root, env=env)
    python = venv / "bin" / "python"
    own_site = run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root, env
    ).stdout.strip()
    borrowed = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(own_site) / "_borrowed_dependencies.pth").write_text("\n".join(sorted(borrowed)) + "\n")
    run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", wheel], root, env)
    script = venv / "bin" / "napari-mammo-sae"
    assert script.is_file()
    return {"root": root, "venv": venv, "python": python, "script": script, "env": env,
            "wheel": wheel}  # fmt: skip


def test_wheel_carries_the_bundled_weights(installed):
    manifest = json.loads((REPO / "weights" / "MANIFEST.json").read_text())
    with zipfile.ZipFile(installed["wheel"]) as whl:
        names = set(whl.namelist())
        packaged = "napari_mammo_sae/_bundled_weights/"
        assert f"{packaged}MANIFEST.json" in names
        for rel in manifest["files"]:
            assert f"{packaged}{rel}" in names, rel
        assert "napari_mammo_sae/napari.yaml" in names
        # the same bytes as the single source, weights/
        rel = "sae-finetuned-calcification/model.safetensors"
        assert whl.read(packaged + rel) == (REPO / "weights" / rel).read_bytes()


def test_installed_plugin_finds_its_bundled_weights(installed):
    """The explorer's default ("bundled demo weights") works from the installed package."""
    probe = (
        "import json, napari_mammo_sae, npe2\n"
        "from napari_mammo_sae.models.weights import bundled_weights_dir\n"
        "from napari_mammo_sae._napari.model_choice import bundled_choice\n"
        "c = bundled_choice('calcification', 'finetuned')\n"
        "m = npe2.PluginManifest.from_distribution('napari-mammo-sae')\n"
        "print(json.dumps({'module': napari_mammo_sae.__file__, 'weights': str(bundled_weights_dir()),"
        " 'classifier': str(c.classifier), 'sae': str(c.sae), 'probe': str(c.probe),"
        " 'readers': [r.command for r in m.contributions.readers or []]}))\n"
    )
    out = run([installed["python"], "-c", probe], installed["root"], installed["env"]).stdout
    got = json.loads(out.strip().splitlines()[-1])
    venv = installed["venv"].resolve()
    for key in ("module", "weights", "classifier", "sae", "probe"):
        path = Path(got[key]).resolve()
        assert path.is_relative_to(venv), (key, path)  # the wheel's copy, never the checkout's
        assert path.exists(), (key, path)
    assert got["readers"], "the installed napari manifest declares no reader"


def test_installed_console_script_runs_an_analysis_with_the_bundled_weights(installed):
    env, work = installed["env"], installed["root"] / "analysis"
    work.mkdir()
    weights = Path(
        run(
            [installed["python"], "-c",
             "from napari_mammo_sae.models.weights import bundled_weights_dir as b; print(b())"],
            work, env,
        ).stdout.strip()
    )  # fmt: skip
    assert weights.resolve().is_relative_to(installed["venv"].resolve())
    cli = installed["script"]
    run(
        [cli, "phantom", "--out", "data", "--studies", "1", "--size", "small", "--quiet"], work, env
    )
    run([cli, "extract", "--data", "data", "--weights", weights / "finetuned-calcification",
         "--out", "features.h5", "--workers", "0", "--input-size", "384x240"], work, env)  # fmt: skip
    done = run([cli, "probe", "--store", "features.h5", "--sae", weights / "sae-finetuned-calcification",
                "--head", weights / "finetuned-calcification", "--concept", "calcification",
                "--out", "probe.npz", "--top-k", "3", "--images", "2"], work, env)  # fmt: skip
    # the probe names the SAE by its hash: the bundled SAE's, as weights/MANIFEST.json records it
    manifest = json.loads((REPO / "weights" / "MANIFEST.json").read_text())
    sha = manifest["files"]["sae-finetuned-calcification/model.safetensors"]["sha256"]
    assert f"SAE {sha[:12]}" in done.stdout + done.stderr
    assert "top class-1 neurons: [" in done.stdout + done.stderr
    assert (work / "probe.npz").stat().st_size > 0
