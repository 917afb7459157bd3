"""Localisation at any layer (pipeline.layer_localisation) and ``evaluate --run``: the grid
measures and both box rules' APs by hand, and evaluate's shortcut rows equal to `shortcuts`'."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict

import numpy as np
import pytest
import torch

from napari_mammo_sae.cli import main
from napari_mammo_sae.geometry import Geometry
from napari_mammo_sae.pipeline.layer_localisation import (
    COLUMNS,
    cell_mm,
    layer_localisation_rows,
    span_cells,
    write_localisation_csv,
)


def test_cell_size_and_finding_span_on_a_known_geometry():
    # crop rows 20..100 of a 100 x 80 image onto a 40 x 40 input: 2 original pixels per input
    # pixel, spacing (0.5, 0.25) mm -> (1.0, 0.5) mm per input pixel; a 4 x 4 grid: stride 10
    g = Geometry((100, 80), (20, 0, 100, 80), (40, 40), (0.5, 0.25))
    assert cell_mm(g, (4, 4)) == pytest.approx((10.0, 5.0))
    assert cell_mm(g, (8, 2)) == pytest.approx((5.0, 10.0))
    # cells are 20 x 20 original pixels: rows 45..62 -> 1.25..2.1, cols 25..35 -> 1.25..1.75
    assert span_cells(g, (25, 45, 35, 62), (4, 4)) == pytest.approx((0.85, 0.5))
    # the part the crop cuts away (rows < 20) does not count
    assert span_cells(g, (0, 0, 10, 30), (4, 4)) == pytest.approx((0.5, 0.5))
    assert span_cells(g, (0, 0, 10, 30), (8, 8)) == pytest.approx((1.0, 1.0))


# --- both box rules on hand-built heatmaps ---------------------------------------------------------
# 128 x 128 original pixels of (0.1, 0.2) mm on a 64 x 64 input (2 original pixels per input pixel)
# and an 8 x 8 grid (stride 8): a cell of 1.6 x 3.2 mm
GEOMETRY = Geometry((128, 128), (0, 0, 128, 128), (64, 64), (0.1, 0.2))
# the finding around cell (3, 3) (input 24..32): input rows 22..34 (1.5 cells), cols 20..36 (2 cells)
FINDING = (40.0, 44.0, 72.0, 68.0)


def _maps():
    """Channel 0 of three images (channel 1 stays 0): a, a finding on a plateau; b, no finding."""
    a = np.zeros((2, 8, 8), np.float32)
    a[0, 1:7, 1:7] = 0.5  # a broad plateau over 6 x 6 cells ...
    a[0, 3, 3] = 1.0  # ... with its peak on the finding
    b = np.zeros((2, 8, 8), np.float32)
    b[0, 1, 6] = 2.0  # fires harder where there is no finding
    return [a, b, a.copy()]  # the third: a training positive, so neuron 0 ranks first


def _store(path, maps, splits, labels):
    from napari_mammo_sae.pipeline import store as fs

    c, h, w = maps[0].shape
    writer = fs.create(path, feature_dim=c, grid=(h, w), backbone_signature="sig",
                       dtype="float32", attrs={"hook": "stage3"})  # fmt: skip
    for i, (fmap, split, y) in enumerate(zip(maps, splits, labels, strict=True)):
        writer.append(f"img{i}", fmap, {"study_id": f"s{i}", "split": split, "laterality": "L",
                                        "view": "CC", "labels": {"mass": 0, "calcification": y},
                                        "geometry": asdict(GEOMETRY)})  # fmt: skip
    writer.close(complete=True)
    return fs.open(path)


def _identity_sae():
    from napari_mammo_sae.models.sae import SparseAutoencoder

    sae = SparseAutoencoder(2, 2, "relu")
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(2))
        sae.W_dec.copy_(torch.eye(2))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae.eval()


def test_percentile_and_contour_rules_give_the_hand_computed_aps(tmp_path):
    """On a, the 95th percentile keeps the top 5% (205) of the 4096 input pixels, all inside the
    peak's bump (the bilinear upsampling spreads one cell over 16 x 16 = 256 pixels above the
    plateau), whose top pixels reach its footprint's edges: a box of 2 x 2 cells (input 20..36)
    around the 1.5 x 2-cell finding, IoU 12 x 16 / 16^2 = 0.75. 0.3 x max keeps the whole plateau
    (input 9..55, 5.75 cells a side): IoU 12 x 16 / 46^2 = 0.09. On b both rules box the lone peak,
    scored 2 x 0.9375^2 = 1.76, above a's 0.5 + 0.5 x 0.9375^2 = 0.94.

    percentile: paper protocol (a only) TP -> AP 1; whole split FP (b) then TP (a) -> AP 1/2.
    contour: a's box misses -> AP 0 under both protocols."""
    view = _store(tmp_path / "s.h5", _maps(), ["test", "test", "training"], [1, 0, 1])
    gt = {"img0": [FINDING], "img2": [FINDING]}  # img2 is a training image: not scored
    rows = layer_localisation_rows(view, _identity_sae(), "calcification", gt, k=1)
    by = {r.method: r for r in rows}
    assert list(by) == ["percentile", "contour"]
    for r in rows:
        assert (r.layer, r.concept, r.grid, r.k, r.neurons) == ("stage3", "calcification",
                                                                  "8 x 8", 1, [0])  # fmt: skip
        assert (r.cell_mm_row, r.cell_mm_col) == pytest.approx((1.6, 3.2))
        assert (r.finding_span_cells_row, r.finding_span_cells_col) == (1.5, 2.0)
        assert (r.n_finding_boxes, r.n_finding_images, r.n_whole_split) == (1, 1, 2)
        assert r.boxes_per_image == 1.0  # one component per image under both rules
    p, c = by["percentile"], by["contour"]
    assert (p.mean_ap_finding_images, p.mean_ap_whole_split) == (1.0, 0.5)
    assert (c.mean_ap_finding_images, c.mean_ap_whole_split) == (0.0, 0.0)
    # why: the percentile box is about the finding's size, the contour box the plateau's
    assert p.recall_ceiling == 1.0 and c.recall_ceiling == 0.0
    assert p.median_best_iou == 0.75 and c.median_best_iou == pytest.approx(192 / 46**2)
    assert (p.pred_span_cells_row, p.pred_span_cells_col) == (2.0, 2.0)
    assert (c.pred_span_cells_row, c.pred_span_cells_col) == (5.75, 5.75)

    path = write_localisation_csv(rows, tmp_path / "out" / "localisation.csv")
    with path.open(newline="") as fh:
        got = list(csv.DictReader(fh))
    assert tuple(got[0]) == COLUMNS
    assert [g["method"] for g in got] == ["percentile", "contour"]
    assert (
        got[0]["mean_ap_whole_split"] == "0.5000" and got[1]["mean_ap_finding_images"] == "0.0000"
    )
    assert (
        got[0]["grid"] == "8 x 8" and got[0]["neurons"] == "0" and got[0]["cell_mm_col"] == "3.2000"
    )
    assert not list(path.parent.glob("*.part"))
    view.close()


def test_no_finding_box_leaves_the_span_undefined(tmp_path):
    view = _store(tmp_path / "s.h5", _maps(), ["test", "test", "training"], [1, 0, 1])
    (row,) = layer_localisation_rows(view, _identity_sae(), "calcification", {}, k=1,
                                     methods=["percentile"])  # fmt: skip
    assert math.isnan(row.finding_span_cells_row) and row.n_finding_boxes == 0
    assert math.isnan(row.mean_ap_finding_images) and math.isnan(row.recall_ceiling)
    view.close()


# --- evaluate --run on a phantom with cues ---------------------------------------------------------
@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    from napari_mammo_sae.models.sae import SparseAutoencoder
    from napari_mammo_sae.models.weights import save_weights
    from napari_mammo_sae.pipeline.head_training import build_classifier, save_model

    root = tmp_path_factory.mktemp("layerloc")
    data = root / "data"
    assert main(["phantom", "--out", str(data), "--studies", "3", "--seed", "5", "--size",
                 "small", "--workers", "1", "--quiet", "--balanced", "--cue", "clip:1,0,0.5",
                 "--cue", "site"]) == 0  # fmt: skip
    torch.manual_seed(0)
    weights = root / "clf"
    config = {"kind": "classifier", "backbone": "test_efficientnet", "input_size": [128, 80],
              "task": "concept", "concept": "calcification", "variant": "finetuned"}  # fmt: skip
    save_model(weights, build_classifier("test_efficientnet"), config)
    runs = []
    for hook, channels in (("head", 256), ("stage3", 48)):
        store = root / f"{hook}.h5"
        assert main(["extract", "--data", str(data), "--weights", str(weights), "--out",
                     str(store), "--workers", "0", "--device", "cpu", "--runtime", "torch",
                     "--input-size", "128x80", "--hook", hook]) == 0  # fmt: skip
        sae = SparseAutoencoder(channels, 32, "relu", generator=torch.Generator().manual_seed(2))
        save_weights(root / f"sae-{hook}", sae, sae.config())
        runs += ["--run", str(store), str(root / f"sae-{hook}"), str(weights)]
    return root, runs


def _evaluate(root, out, *extra):
    return main(["evaluate", "--store", str(root / "head.h5"), "--sae", str(root / "sae-head"),
                 "--heads", str(root / "clf"), "--data", str(root / "data"), "--out", str(out),
                 "--bootstrap", "0", "--k", "0", "--device", "cpu", *extra])  # fmt: skip


def test_evaluate_with_run_writes_both_tables(phantom, tmp_path):
    root, runs = phantom
    alone = tmp_path / "shortcuts.csv"
    assert main(["shortcuts", "--data", str(root / "data"), *runs, "--out", str(alone),
                 "--k", "5", "--quiet"]) == 0  # fmt: skip
    out = tmp_path / "report"
    assert _evaluate(root, out, *runs, "--shortcut-k", "5") == 0
    # the shortcut rows are those of `napari-mammo-sae shortcuts` for the same inputs, byte for byte
    assert (out / "shortcuts.csv").read_text() == alone.read_text()
    results = json.loads((out / "results.json").read_text())
    with alone.open(newline="") as fh:
        assert len(results["shortcuts"]) == len(list(csv.DictReader(fh))) == 6  # 3 cues x 2 layers
    with (out / "localisation.csv").open(newline="") as fh:
        got = list(csv.DictReader(fh))
    assert tuple(got[0]) == COLUMNS
    assert [(g["layer"], g["grid"], g["method"]) for g in got] == [
        ("head", "4 x 3", "percentile"), ("head", "4 x 3", "contour"),
        ("stage3", "8 x 5", "percentile"), ("stage3", "8 x 5", "contour"),
    ]  # fmt: skip
    loc = results["localisation"]
    head, stage3 = loc[0], loc[2]
    # the same boxes on a grid twice as fine (rows) and 5/3 as fine (cols): spans scale, cells shrink
    assert stage3["finding_span_cells_row"] == pytest.approx(2 * head["finding_span_cells_row"])
    assert stage3["finding_span_cells_col"] == pytest.approx(5 / 3 * head["finding_span_cells_col"])
    assert head["cell_mm_row"] == pytest.approx(2 * stage3["cell_mm_row"])
    assert head["n_finding_boxes"] > 0 and head["n_whole_split"] == stage3["n_whole_split"]
    # the head run (its store and SAE are evaluate's own) with the percentile rule is Table 2
    (t2,) = results["table2"]
    assert head["neurons"] == t2["neurons"]
    assert head["ap_finding_images"] == pytest.approx(t2["ap_finding_images"], nan_ok=True)
    assert head["ap_whole_split"] == pytest.approx(t2["ap_whole_split"], nan_ok=True)
    assert [r["layer"] for r in results["meta"]["runs"]] == ["head", "stage3"]
    html = (out / "index.html").read_text()
    assert "(f) Shortcut report" in html and "(g) Localisation by layer" in html
    assert 'href="localisation.csv"' in html and 'href="shortcuts.csv"' in html


def test_evaluate_without_run_is_unchanged_and_a_bad_run_is_refused_first(phantom, tmp_path):
    root, runs = phantom
    out = tmp_path / "plain"
    assert _evaluate(root, out) == 0
    results = json.loads((out / "results.json").read_text())
    assert "shortcuts" not in results and "localisation" not in results
    assert "runs" not in results["meta"]
    assert not (out / "shortcuts.csv").exists() and not (out / "localisation.csv").exists()
    # an SAE of another layer: refused (exit 2) by the check `shortcuts` uses, before any report
    bad = ["--run", str(root / "stage3.h5"), str(root / "sae-head"), str(root / "clf")]
    assert _evaluate(root, tmp_path / "bad", *bad) == 2
    assert not (tmp_path / "bad").exists()
    assert _evaluate(root, tmp_path / "k0", *runs[:4], "--shortcut-k", "0") == 2
