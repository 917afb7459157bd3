"""The installable package: manifest, console script, and a Qt-free core."""

from __future__ import annotations

import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_installed_package_carries_the_top_level_manifest():
    shipped = resources.files("napari_mammo_sae").joinpath("napari.yaml").read_text()
    assert shipped == (ROOT / "napari.yaml").read_text()


def test_npe2_validate_with_imports():
    npe2 = Path(sys.executable).with_name("npe2")
    result = subprocess.run(
        [str(npe2), "validate", "napari-mammo-sae", "--imports"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "valid" in result.stdout


def test_manifest_commands_resolve_to_callables():
    from npe2 import PluginManifest

    manifest = PluginManifest.from_distribution("napari-mammo-sae")
    for command in manifest.contributions.commands:
        assert callable(_resolve(command)), command.python_name


def _resolve(command):
    module_name, _, attr = command.python_name.partition(":")
    module = __import__(module_name, fromlist=[attr])
    return getattr(module, attr)


@pytest.mark.parametrize("flag", ["--help", "--version"])
def test_console_script(flag):
    exe = Path(sys.executable).with_name("napari-mammo-sae")
    result = subprocess.run([str(exe), flag], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "napari-mammo-sae" in result.stdout


def test_core_never_imports_qt_or_napari():
    code = (
        "import sys, importlib, pkgutil, napari_mammo_sae as p\n"
        "for m in pkgutil.walk_packages(p.__path__, 'napari_mammo_sae.'):\n"
        # Alembic runs its migration scripts itself, inside its own context: not importable alone
        "    if '._napari' in m.name or m.name.endswith('__main__') or '.migrations' in m.name: continue\n"
        "    importlib.import_module(m.name)\n"
        "bad = sorted(k for k in sys.modules if k.split('.')[0] in {'napari','qtpy','PyQt6','PySide6','PyQt5','vispy','magicgui'})\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


def test_the_suite_keeps_away_from_the_users_settings_and_verdicts():
    """conftest points platformdirs at throw-away directories: no test touches the user's files."""
    import os

    from napari_mammo_sae._napari.widgets._common import settings_path
    from napari_mammo_sae.labels import default_path

    home = os.path.expanduser("~")
    for path in (settings_path(), default_path()):
        assert "napari-mammo-sae-tests-" in str(path), path
        assert not str(path).startswith(os.path.join(home, ".config"))
        assert not str(path).startswith(os.path.join(home, ".local"))


def test_a_subcommand_whose_import_fails_is_not_dropped(monkeypatch, tmp_path):
    """A typo in an internal import surfaces as the real ImportError, for --help and any command."""
    from napari_mammo_sae import cli

    (tmp_path / "broken_subcommand.py").write_text(
        "from napari_mammo_sae.pipeline.extrct import extract_features\n"
        "def add_arguments(parser): pass\n"
        "def run(args): return 0\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.SUBCOMMANDS, "broken", ("broken_subcommand", "a broken command"))
    for argv in (["--help"], ["info", "--help"], ["broken"]):
        with pytest.raises(ModuleNotFoundError) as err:
            cli.main(argv)
        assert err.value.name == "napari_mammo_sae.pipeline.extrct"
    monkeypatch.setitem(cli.SUBCOMMANDS, "broken", ("napari_mammo_sae.no_such_module", "gone"))
    with pytest.raises(ModuleNotFoundError, match="napari_mammo_sae.no_such_module"):
        cli.build_parser()


def test_every_registered_subcommand_is_offered():
    from napari_mammo_sae import cli

    parser = cli.build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    assert set(sub.choices) == set(cli.SUBCOMMANDS)
