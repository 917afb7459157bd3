"""`make weights` in miniature: the recipe runs end to end with the project's own CLI and ships safely."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_quick_recipe_writes_verified_weights_and_a_report(tmp_path):
    out, work, report = tmp_path / "weights", tmp_path / "work", tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_weights.py"), "--quick", "--out", str(out),
         "--work", str(work), "--report", str(report), "--workers", "0", "--device", "cpu"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    manifest = json.loads((out / "MANIFEST.json").read_text())
    steps = [c["step"] for c in manifest["commands"]]
    assert steps[0] == "phantom" and steps[-1] == "evaluate"
    assert all(c["command"].startswith("napari-mammo-sae ") for c in manifest["commands"])
    from napari_mammo_sae.models.weights import load_weights, sha256_file

    for rel, entry in manifest["files"].items():
        assert sha256_file(out / rel) == entry["sha256"]
    for name in ("pretrained-mass", "finetuned-calcification", "sae-finetuned-calcification"):
        module, config = load_weights(out / name)
        assert config
    # the pretrained heads hold only their head and borrow the pretext backbone
    head_only = json.loads((out / "pretrained-mass" / "config.json").read_text())
    assert head_only["backbone_weights"] == "../backbone-pretext"
    # no shipped file names the machine it was built on: provenance paths are relative
    for cfg in out.glob("*/config.json"):
        text = cfg.read_text()
        assert str(tmp_path) not in text, cfg
    assert head_only["provenance"]["init_weights"] == "../backbone-pretext"
    assert manifest["metrics"]["finetuned-calcification"]
    results = json.loads((report / "results.json").read_text())
    assert {"table1", "figure2", "table2", "figure4", "confounder"} <= set(results)
    # evaluate --run: the shortcut report (every cue x concept x layer) and localisation per layer
    layers = {r["layer"] for r in results["shortcuts"]}
    cues = {r["cue"] for r in results["shortcuts"]}
    assert layers == {"head", "stage3"} and {"marker", "lead", "clip", "site"} <= cues
    assert {(r["layer"], r["method"]) for r in results["localisation"]} == {
        (layer, method) for layer in layers for method in ("percentile", "contour")
    }
    assert (report / "shortcuts.csv").exists() and (report / "localisation.csv").exists()
    assert (report / "index.html").exists()
    # the summary is computed from those files
    summary = tmp_path / "EVAL.md"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "summarise_evaluation.py"), "--report", str(report),
         "--manifest", str(out / "MANIFEST.json"), "--out", str(summary)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    text = summary.read_text()
    assert "## Summary: the paper's findings on known truth" in text
    assert "## Shortcuts:" in text and "## Localisation at each layer" in text
