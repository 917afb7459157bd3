"""The whole headless chain from the command line on a small phantom set.

phantom -> train-head -> extract -> train (SAE) -> probe -> evaluate, in ONE subprocess that then
reports which modules it imported: nothing on this path may import Qt or napari.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SIZE = "128x80"

CHAIN = textwrap.dedent(
    """
    import json, sys, torch
    torch.set_num_threads(1)
    from napari_mammo_sae.cli import main
    root = sys.argv[1]
    from napari_mammo_sae.cli import build_parser
    has_phantom = "phantom" in build_parser()._subparsers._group_actions[0].choices
    if has_phantom:
        first = ["phantom", "--out", f"{root}/data", "--studies", "{STUDIES}", "--seed", "3",
                 "--size", "small"] + {PHANTOM_ARGS}
    else:  # no phantom generator in this build: the tests' own tiny VinDr-layout writer
        sys.path.insert(0, sys.argv[2])
        from test_extract import write_vindr_dataset
        write_vindr_dataset(__import__("pathlib").Path(root) / "data", studies=6)
    steps = [
        ["train-head", "--data", f"{root}/data", "--concept", "calcification", "--variant",
         "finetuned", "--backbone", "test_efficientnet", "--input-size", "{SIZE}", "--epochs", "1",
         "--batch-size", "8", "--lr", "1e-3", "--device", "cpu", "--out", f"{root}/ft_calc"],
        ["train-head", "--data", f"{root}/data", "--concept", "mass", "--variant", "pretrained",
         "--backbone", "test_efficientnet", "--init-weights", f"{root}/ft_calc", "--input-size",
         "{SIZE}", "--epochs", "3", "--device", "cpu", "--out", f"{root}/pt_mass"],
        ["extract", "--data", f"{root}/data", "--weights", f"{root}/ft_calc", "--out",
         f"{root}/store.h5", "--workers", "0", "--device", "cpu"],
        ["train", "--store", f"{root}/store.h5", "--out", f"{root}/sae"] + {TRAIN_ARGS},
        ["probe", "--store", f"{root}/store.h5", "--sae", f"{root}/sae", "--head", f"{root}/ft_calc",
         "--concept", "calcification", "--out", f"{root}/probe.npz"],
        ["evaluate", "--store", f"{root}/store.h5", "--sae", f"{root}/sae", "--heads",
         f"{root}/ft_calc", f"{root}/pt_mass", "--data", f"{root}/data", "--out", f"{root}/report",
         "--bootstrap", "20", "--k", "0,1,2,5,10,all"],
    ]
    codes = [["phantom" if has_phantom else "fixture", main(first) if has_phantom else 0]]
    for step in steps:
        rc = main(step)
        codes.append([step[0], rc])
        if rc:
            break
    bad = sorted(m for m in sys.modules if m.split(".")[0] in ("napari", "PyQt5", "PyQt6", "PySide2", "PySide6", "qtpy", "vispy", "magicgui"))
    print("RESULT " + json.dumps({"codes": codes, "gui_modules": bad}))
    """
)

TRAIN_ARGS = [
    "--expansion",
    "2",
    "--steps",
    "30",
    "--batch-size",
    "64",
    "--device",
    "cpu",
    "--quiet",
]
PHANTOM_ARGS: list[str] = []
STUDIES = "6"


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("chain")
    script = (
        CHAIN.replace("{SIZE}", SIZE)
        .replace("{TRAIN_ARGS}", repr(TRAIN_ARGS))
        .replace("{PHANTOM_ARGS}", repr(PHANTOM_ARGS))
        .replace("{STUDIES}", STUDIES)
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    proc = subprocess.run(
        [sys.executable, "-c", script, str(root), str(Path(__file__).parent)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, f"chain crashed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    result = json.loads(lines[-1][len("RESULT ") :])
    result["root"] = root
    result["stderr"] = proc.stderr
    return result


def test_every_step_succeeds(chain):
    assert [c for c in chain["codes"] if c[1] != 0] == [], chain["stderr"][-5000:]
    assert [c[0] for c in chain["codes"]][1:] == [
        "train-head", "train-head", "extract", "train", "probe", "evaluate"
    ]  # fmt: skip


def test_nothing_on_the_path_imports_qt_or_napari(chain):
    assert chain["gui_modules"] == []


def test_report_shows_the_four_analyses(chain):
    report = Path(chain["root"]) / "report"
    html = (report / "index.html").read_text()
    for title in ("Table 1", "Figure 2", "Table 2", "Figure 4"):
        assert title in html
    results = json.loads((report / "results.json").read_text())
    variants = {(r["variant"], r["concept"]) for r in results["table1"]}
    assert variants == {("finetuned", "calcification"), ("pretrained", "mass")}
    for r in results["table1"]:
        assert 0.0 <= r["without"]["auroc"] <= 1.0 and 0.0 <= r["with"]["auroc"] <= 1.0
    modes = {(r["concept"], r["mode"]) for r in results["figure2"]}
    assert ("calcification", "activated") in modes and ("calcification", "deactivated") in modes
    act = next(r for r in results["figure2"] if r["mode"] == "activated")
    assert act["k"][0] == 0 and act["union_size"][0] == 0 and act["auroc"][0] == 0.5
    assert results["table2"] and len(results["table2"][0]["neurons"]) == 10
    assert results["figure4"]
    # every image the page shows exists, linked relatively
    import re

    for src in re.findall(r'src="([^"]+)"', html):
        assert not src.startswith(("/", "http")) and (report / src).is_file()
    assert "confounder" in results  # the phantom set plants a cue


def test_probe_file_belongs_to_the_sae(chain):
    import hashlib

    from napari_mammo_sae.pipeline.probe import find_probe, load_probe

    root = Path(chain["root"])
    sha = hashlib.sha256((root / "sae" / "model.safetensors").read_bytes()).hexdigest()
    assert find_probe(root, sha, "calcification") == root / "probe.npz"
    result = load_probe(root / "probe.npz")
    assert len(result.rankings["class_mean"][1]) == 10
    assert set(result.scores) == {"class-mean", "class-centred", "logit"}  # the one spelling
