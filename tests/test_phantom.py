"""Phantom dataset: VinDr-Mammo files, valid MG DICOM the reader understands, known truth, determinism."""

from __future__ import annotations

import ast
import csv
import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest

from napari_mammo_sae.annotations import load_confounders, load_vindr
from napari_mammo_sae.cli import main
from napari_mammo_sae.dicom import chest_wall_side, chest_wall_side_from_pixels, read_mammogram
from napari_mammo_sae.errors import ConfigError
from napari_mammo_sae.phantom.cues import CueSpec, load_cue_boxes
from napari_mammo_sae.phantom.dataset import PhantomConfig, plan_dataset, render_image

# VinDr-Mammo's columns, in file order (SPEC section 3), written out so a change must fail here
VINDR_BREAST = ("study_id,series_id,image_id,laterality,view_position,height,width,breast_birads,"
                "breast_density,split")  # fmt: skip
VINDR_FINDING = ("study_id,series_id,image_id,laterality,view_position,height,width,breast_birads,"
                 "breast_density,finding_categories,finding_birads,xmin,ymin,xmax,ymax,split")  # fmt: skip
SMALL = ["--size", "small", "--quiet"]


def _phantom(out: Path, *args: str) -> Path:
    assert main(["phantom", "--out", str(out), *args]) == 0
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phantom") / "data"
    return _phantom(out, "--studies", "5", "--seed", "11", "--balanced", "--workers", "1", *SMALL)


def _rows(path: Path) -> list[dict]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_layout_and_csv_columns_are_vindr(dataset):
    assert (dataset / "breast-level_annotations.csv").read_text().splitlines()[0] == VINDR_BREAST
    assert (dataset / "finding_annotations.csv").read_text().splitlines()[0] == VINDR_FINDING
    header = (dataset / "confounder_annotations.csv").read_text().splitlines()[0]
    assert header == "image_id,study_id,xmin,ymin,xmax,ymax,kind"
    breast = _rows(dataset / "breast-level_annotations.csv")
    assert len(breast) == 20 and len({r["study_id"] for r in breast}) == 5
    for r in breast:
        assert (dataset / "images" / r["study_id"] / f"{r['image_id']}.dicom").is_file()
        assert re.fullmatch(r"BI-RADS [1-5]", r["breast_birads"])
        assert re.fullmatch(r"DENSITY [A-D]", r["breast_density"])
        assert r["split"] in ("training", "test") and (r["height"], r["width"]) == ("448", "368")
    views = {
        (r["laterality"], r["view_position"]) for r in breast if r["study_id"] == r["study_id"]
    }
    assert views == {("L", "CC"), ("R", "CC"), ("L", "MLO"), ("R", "MLO")}
    assert {r["split"] for r in breast} == {"training", "test"}


def test_finding_rows_formats(dataset):
    rows = _rows(dataset / "finding_annotations.csv")
    cats = [ast.literal_eval(r["finding_categories"]) for r in rows]
    assert all(isinstance(c, list) and c for c in cats)
    for r, c in zip(rows, cats, strict=True):
        if c == ["No Finding"]:
            assert (
                r["finding_birads"] == "" and r["xmin"] == r["ymin"] == r["xmax"] == r["ymax"] == ""
            )
        else:
            assert set(c) <= {"Mass", "Suspicious Calcification"}
            assert re.fullmatch(r"BI-RADS [345]", r["finding_birads"])
            x0, y0, x1, y1 = (float(r[k]) for k in ("xmin", "ymin", "xmax", "ymax"))
            assert 0 <= x0 < x1 <= 368 and 0 <= y0 < y1 <= 448
            assert re.fullmatch(r"\d+\.\d\d", r["xmin"])
    assert any(c == ["Mass"] for c in cats) and any(c == ["Suspicious Calcification"] for c in cats)
    # breast BI-RADS is that of the breast's worst finding
    for r, c in zip(rows, cats, strict=True):
        if c != ["No Finding"]:
            assert int(r["breast_birads"][-1]) >= int(r["finding_birads"][-1])


def test_reader_round_trip(dataset):
    rows = _rows(dataset / "breast-level_annotations.csv")
    uids = set()
    for r in rows:
        path = dataset / "images" / r["study_id"] / f"{r['image_id']}.dicom"
        rec = read_mammogram(path)
        assert (rec.laterality, rec.laterality_source) == (r["laterality"], "ImageLaterality")
        assert (rec.view, rec.view_source) == (r["view_position"], "ViewCodeSequence")
        assert rec.spacing_mm == (0.6, 0.6) and rec.spacing_source == "ImagerPixelSpacing"
        assert rec.photometric == "MONOCHROME2" and rec.modality == "MG"
        assert rec.bits_stored == 12 and rec.pixels.shape == (448, 368)
        assert rec.window is not None and rec.window.width > 0
        # the chest wall where the hanging layout expects it: R on the right edge, L on the left,
        # both by Patient Orientation and by the pixels themselves
        want = "right" if r["laterality"] == "R" else "left"
        assert chest_wall_side(rec) == (want, "PatientOrientation")
        assert chest_wall_side_from_pixels(rec.display_pixels()) == want
        uids.add(rec.sop_instance_uid)
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert ds.PresentationIntentType == "FOR PRESENTATION" and ds.BodyPartExamined == "BREAST"
        assert str(ds.PatientName).startswith("PHANTOM^") and ds.PatientID.startswith("PH")
        assert ds.ViewCodeSequence[0].CodingSchemeDesignator == "SRT"
        assert ds.StudyInstanceUID != ds.SeriesInstanceUID != ds.SOPInstanceUID
    assert len(uids) == len(rows)


def test_monochrome1_displays_like_monochrome2(tmp_path):
    a = _phantom(tmp_path / "m2", "--studies", "1", "--seed", "4", "--workers", "1", *SMALL)
    b = _phantom(tmp_path / "m1", "--studies", "1", "--seed", "4", "--workers", "1",
                 "--photometric", "MONOCHROME1", "--bits", "14", *SMALL)  # fmt: skip
    for p in sorted((a / "images").rglob("*.dicom")):
        r2 = read_mammogram(p)
        r1 = read_mammogram(b / p.relative_to(a))
        assert r1.photometric == "MONOCHROME1" and r1.bits_stored == 14
        assert r1.laterality == r2.laterality and r1.view == r2.view
        # same anatomy: display pixels correlate strongly though bit depths differ
        c = np.corrcoef(r1.display_pixels().ravel(), r2.display_pixels().ravel())[0, 1]
        assert c > 0.99
        lo, hi = r1.display_limits()
        assert lo < np.median(r1.display_pixels()[r1.display_pixels() > lo]) < hi


def test_same_seed_same_bytes_whatever_the_workers(tmp_path):
    args = ["--studies", "3", "--seed", "7", *SMALL]
    a = _phantom(tmp_path / "a", *args, "--workers", "1")
    b = _phantom(tmp_path / "b", *args, "--workers", "2")
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    c = _phantom(tmp_path / "c", "--studies", "3", "--seed", "8", *SMALL, "--workers", "1")
    first = sorted((a / "images").rglob("*.dicom"))[0]
    assert not (c / first.relative_to(a)).exists()  # another seed: other ids


@pytest.mark.parametrize(
    "compression, uid",
    [("rle", pydicom.uid.RLELossless), ("jpeg2000", pydicom.uid.JPEG2000Lossless)],
)
def test_compressed_files_hold_the_same_pixels(tmp_path, compression, uid):
    plain = _phantom(tmp_path / "p", "--studies", "1", "--seed", "2", "--workers", "1", *SMALL)
    packed = _phantom(tmp_path / "c", "--studies", "1", "--seed", "2", "--workers", "1",
                      "--compression", compression, *SMALL)  # fmt: skip
    for p in sorted((plain / "images").rglob("*.dicom"))[:2]:
        q = packed / p.relative_to(plain)
        assert pydicom.dcmread(q).file_meta.TransferSyntaxUID == uid
        assert q.stat().st_size < p.stat().st_size
        assert np.array_equal(read_mammogram(p).pixels, read_mammogram(q).pixels)


def test_label_rates_default_like_vindr_and_configurable():
    plans = plan_dataset(PhantomConfig(studies=400, seed=1))
    n = len(plans)
    mass = sum(p.has("mass") for p in plans) / n
    calc = sum(p.has("calcification") for p in plans) / n
    assert abs(mass - 0.055) < 0.02 and abs(calc - 0.028) < 0.015
    assert sum(p.split == "test" for p in plans) == 0.2 * n  # 4:1 by study
    for concept in ("mass", "calcification"):  # the split is stratified: both keep the rate
        rate = {
            split: np.mean([p.has(concept) for p in plans if p.split == split])
            for split in ("training", "test")
        }
        assert abs(rate["training"] - rate["test"]) < 0.012, (concept, rate)
    for s in range(400):  # one split per study
        assert len({p.split for p in plans if p.study_index == s}) == 1
    plans = plan_dataset(PhantomConfig(studies=300, seed=2, mass_rate=0.3, calc_rate=0.15))
    assert abs(sum(p.has("mass") for p in plans) / len(plans) - 0.3) < 0.05
    assert abs(sum(p.has("calcification") for p in plans) / len(plans) - 0.15) < 0.04
    none = plan_dataset(PhantomConfig(studies=50, seed=2, mass_rate=0.0, calc_rate=0.0))
    assert not any(p.lesions for p in none)


def test_tiny_sets_hold_both_classes_in_each_split():
    plans = plan_dataset(PhantomConfig(studies=6, seed=3))
    for split in ("training", "test"):
        sub = [p for p in plans if p.split == split]
        for concept in ("mass", "calcification"):
            labels = {p.has(concept) for p in sub}
            assert labels == {True, False}, (split, concept)


def _rate(plans, split, positive):
    sub = [p for p in plans if p.split == split and p.has("calcification") == positive]
    return sum(p.cue for p in sub) / len(sub), len(sub)


def test_confounder_rates_per_split():
    cfg = PhantomConfig(studies=500, seed=5, calc_rate=0.3)
    plans = plan_dataset(cfg)
    pos, n_pos = _rate(plans, "training", True)
    neg, n_neg = _rate(plans, "training", False)
    assert n_pos > 300 and abs(pos - 0.6) < 0.07 and abs(neg - 0.05) < 0.025
    tpos, _ = _rate(plans, "test", True)
    tneg, _ = _rate(plans, "test", False)
    assert abs(tpos - 0.3) < 0.12 and abs(tneg - 0.3) < 0.07  # independent of the label
    assert not any(p.cue for p in plan_dataset(replace(cfg, studies=50, confounder=False)))
    mass_cue = plan_dataset(replace(cfg, cue_concept="mass", mass_rate=0.3))
    sub = [p for p in mass_cue if p.split == "training" and p.has("mass")]
    assert abs(sum(p.cue for p in sub) / len(sub) - 0.6) < 0.08


def test_written_truth_matches_the_plan(dataset):
    cfg = PhantomConfig(studies=5, seed=11, height=448, width=368, spacing_mm=0.6,
                        mass_rate=0.5, calc_rate=0.5)  # fmt: skip
    plans = plan_dataset(cfg)
    vindr = load_vindr(dataset)
    cues = load_confounders(dataset)
    assert [p.image_id for p in plans] == list(vindr.images)
    for p in plans:
        im = vindr.images[p.image_id]
        for concept in ("mass", "calcification"):
            assert im.has(concept) == p.has(concept), (p.image_id, concept)
        assert (p.image_id in cues) == p.cue


@pytest.mark.parametrize("view_index", [0, 1, 2, 3])
def test_boxes_lie_in_the_breast_around_their_lesion(view_index):
    cfg = PhantomConfig(studies=8, seed=21, height=448, width=368, spacing_mm=0.6,
                        mass_rate=0.6, calc_rate=0.6, cue_pos_rate=1.0, cue_neg_rate=1.0,
                        cue_test_rate=1.0)  # fmt: skip
    plans = [p for p in plan_dataset(cfg) if p.view_index == view_index and p.lesions][:4]
    assert plans
    contrast = {"mass": [], "calcification": []}
    for plan in plans:
        out = render_image(plan, cfg, keep_truth=True)
        assert len(out.findings) == len(plan.lesions)
        img = out.pixels.astype(float)
        for f, fp, les in zip(out.findings, out.footprints, plan.lesions, strict=True):
            x0, y0, x1, y1 = (int(v) for v in f.box)
            assert out.breast_mask[y0:y1, x0:x1].all(), "box leaves the breast"
            rows, cols = np.nonzero(fp)
            assert rows.size and rows.min() == y0 and rows.max() + 1 == y1
            assert cols.min() == x0 and cols.max() + 1 == x1
            ring = np.zeros_like(fp)
            ring[max(0, y0 - 8) : y1 + 8, max(0, x0 - 8) : x1 + 8] = True
            ring[y0:y1, x0:x1] = False
            contrast[les.kind].append(img[fp].mean() - img[ring & out.breast_mask].mean())
        # the marker is a radiopaque skin tag on the breast, clear of every lesion box
        assert out.cue_box is not None
        cx0, cy0, cx1, cy1 = (int(v) for v in out.cue_box)
        assert out.breast_mask[cy0:cy1, cx0:cx1].all(), "marker leaves the breast"
        for f in out.findings:
            fx0, fy0, fx1, fy1 = f.box
            assert cx1 <= fx0 or fx1 <= cx0 or cy1 <= fy0 or fy1 <= cy0, "marker on a lesion"
        tissue = img[max(0, cy0 - 8) : cy1 + 8, max(0, cx0 - 8) : cx1 + 8]
        assert img[cy0:cy1, cx0:cx1].max() > np.percentile(tissue, 50) + 0.2 * 4095
    for kind, values in contrast.items():
        if values:
            assert np.mean(values) > 0, kind  # lesions are brighter than their surroundings


def test_mass_with_calcifications_is_one_row_with_both_categories():
    cfg = PhantomConfig(studies=40, seed=9, height=448, width=368, spacing_mm=0.6,
                        mass_rate=0.9, calc_rate=0.0)  # fmt: skip
    plan = next(p for p in plan_dataset(cfg) if any(les.with_calcs for les in p.lesions))
    assert plan.has("calcification") and plan.has("mass")
    out = render_image(plan, cfg, keep_truth=True)
    both = [f for f in out.findings if len(f.categories) == 2]
    assert both and both[0].categories == ["Suspicious Calcification", "Mass"]


def test_lesion_sizes_are_physical_whatever_the_pixel_size():
    widths = {}
    for sp, (h, w) in ((0.6, (448, 368)), (0.2, (1344, 1104))):
        cfg = PhantomConfig(studies=30, seed=4, height=h, width=w, spacing_mm=sp,
                            mass_rate=0.5, calc_rate=0.0, confounder=False)  # fmt: skip
        plans = [p for p in plan_dataset(cfg) if p.lesions][:6]
        widths[sp] = [
            (f.box[2] - f.box[0]) * sp for p in plans for f in render_image(p, cfg).findings
        ]
    assert len(widths[0.6]) == len(widths[0.2]) >= 4
    # the same masses measure the same in mm (within two coarse pixels)
    assert np.allclose(widths[0.6], widths[0.2], atol=1.3)
    assert all(3.0 <= wd <= 70.0 for wd in widths[0.2])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--mass-rate", "1.5"], "--mass-rate must be between 0 and 1"),
        (["--studies", "0"], "--studies must be at least 1"),
        (["--height", "10"], "at least 64"),
    ],
)
def test_bad_options_exit_2_with_a_message(tmp_path, capsys, args, message):
    rc = main(["phantom", "--out", str(tmp_path / "x"), *SMALL, *args])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_output_folder_that_cannot_be_made(tmp_path, capsys):
    (tmp_path / "x").write_text("")
    assert main(["phantom", "--out", str(tmp_path / "x" / "d"), *SMALL]) == 2
    assert "cannot create the output folder" in capsys.readouterr().err


def test_the_marker_survives_the_mammoclip_crop():
    """The planted cue must reach the model: its box lies inside the breast crop of the
    Mammo-CLIP preprocessing (a tag in the air beyond the skin would be cut away)."""
    from types import SimpleNamespace

    from napari_mammo_sae.preprocess import preprocess_mammoclip

    cfg = PhantomConfig(studies=6, seed=5, height=448, width=368, spacing_mm=0.6,
                        mass_rate=0.3, calc_rate=0.3, cue_pos_rate=1.0, cue_neg_rate=1.0,
                        cue_test_rate=1.0)  # fmt: skip
    placed = 0
    for plan in plan_dataset(cfg):
        out = render_image(plan, cfg)
        if out.cue_box is None:
            continue
        placed += 1
        rec = SimpleNamespace(pixels=out.pixels.astype(np.float32), photometric=cfg.photometric,
                              spacing_mm=(cfg.spacing_mm, cfg.spacing_mm))  # fmt: skip
        r0, c0, r1, c1 = preprocess_mammoclip(rec, size=(256, 160)).geometry.crop_box
        x0, y0, x1, y1 = out.cue_box
        assert c0 <= x0 and x1 <= c1 and r0 <= y0 and y1 <= r1, (plan.image_id, out.cue_box)
    assert placed >= 20  # nearly every image that asks for a marker gets one


# --- realistic shortcuts: lead marker, biopsy clip, site effect (phantom.cues) -------------------
SMALL_CFG = dict(height=448, width=368, spacing_mm=0.6)
ALWAYS = dict(pos_rate=1.0, neg_rate=1.0, test_rate=1.0)


def _cue_rate(plans, cue, concept, split, positive):
    sub = [p for p in plans if p.split == split and p.has(concept) == positive]
    return sum(cue in p.cues for p in sub) / len(sub), len(sub)


def test_cue_rates_follow_the_label_in_training_only():
    base = PhantomConfig(studies=600, seed=8, mass_rate=0.3, calc_rate=0.3)
    cfg = replace(base, cues=(CueSpec("lead"), CueSpec("clip", pos_rate=0.8, neg_rate=0.1),
                              CueSpec("site")))  # fmt: skip
    plans = plan_dataset(cfg)
    for cue, concept, pos, neg, test in (("lead", "mass", 0.6, 0.05, 0.3),
                                         ("clip", "calcification", 0.8, 0.1, 0.3)):  # fmt: skip
        r_pos, n_pos = _cue_rate(plans, cue, concept, "training", True)
        r_neg, n_neg = _cue_rate(plans, cue, concept, "training", False)
        assert n_pos > 400 and n_neg > 900
        assert abs(r_pos - pos) < 0.06 and abs(r_neg - neg) < 0.03, (cue, r_pos, r_neg)
        t_pos, _ = _cue_rate(plans, cue, concept, "test", True)
        t_neg, _ = _cue_rate(plans, cue, concept, "test", False)
        assert abs(t_pos - test) < 0.1 and abs(t_neg - test) < 0.06, (cue, t_pos, t_neg)
    # the site is decided per study: all four views agree; a positive study is one with a mass
    studies: dict[int, list] = {}
    for p in plans:
        studies.setdefault(p.study_index, []).append(p)
    assert all(len({"site" in p.cues for p in views}) == 1 for views in studies.values())

    def site_rate(split, positive):
        sub = [v for v in studies.values() if v[0].split == split
               and any(p.has("mass") for p in v) == positive]  # fmt: skip
        return np.mean(["site" in v[0].cues for v in sub])

    assert abs(site_rate("training", True) - 0.6) < 0.07
    assert abs(site_rate("training", False) - 0.15) < 0.07
    assert abs(site_rate("test", True) - 0.3) < 0.15 and abs(site_rate("test", False) - 0.3) < 0.15
    # the cues are drawn apart from the rest of the plan: everything else is as without them
    plain = plan_dataset(base)
    assert [replace(p, cues=()) for p in plans] == plain and all(p.cues == () for p in plain)


@pytest.mark.parametrize("name", ["lead", "clip"])
def test_metal_cues_change_only_the_pixels_in_their_box(name):
    cfg = PhantomConfig(studies=3, seed=12, mass_rate=0.6, calc_rate=0.6, **SMALL_CFG)
    with_cue = replace(cfg, cues=(CueSpec(name, **ALWAYS),))
    maxval = 2**cfg.bits_stored - 1
    drawn = 0
    for plan, plan_cue in zip(plan_dataset(cfg), plan_dataset(with_cue), strict=True):
        a = render_image(plan, cfg).pixels.astype(float)
        out = render_image(plan_cue, with_cue, keep_truth=True)
        b = out.pixels.astype(float)
        if name not in out.cue_boxes:
            continue
        drawn += 1
        x0, y0, x1, y1 = (int(v) for v in out.cue_boxes[name])
        inside = np.zeros(a.shape, bool)
        inside[y0:y1, x0:x1] = True
        assert np.array_equal(a[~inside], b[~inside])  # nothing changes outside the box
        assert out.breast_mask[y0:y1, x0:x1].all()  # on the breast
        # metal: the object saturates the detector, far above the tissue around it
        ring = np.zeros_like(inside)
        ring[max(0, y0 - 10) : y1 + 10, max(0, x0 - 10) : x1 + 10] = True
        ring &= ~inside & out.breast_mask
        assert b[inside].max() >= 0.97 * maxval > np.percentile(b[ring], 99) + 0.2 * maxval
        assert (b[inside] - a[inside]).max() > 0.2 * maxval
        side_mm = max(x1 - x0, y1 - y0) * cfg.spacing_mm
        if name == "clip":
            assert 2.0 <= side_mm <= 6.0 + cfg.spacing_mm, side_mm  # 2-6 mm, a pixel of blur
            for f in out.findings:  # inside the breast, clear of every finding
                assert x1 <= f.box[0] or f.box[2] <= x0 or y1 <= f.box[1] or f.box[3] <= y0
        else:
            assert 5.0 <= side_mm <= 12.0, side_mm
    assert drawn >= 10


def test_lead_marker_sits_on_the_skin_at_the_level_of_the_mass():
    cfg = PhantomConfig(studies=12, seed=31, mass_rate=0.9, calc_rate=0.0,
                        cues=(CueSpec("lead", **ALWAYS),), **SMALL_CFG)  # fmt: skip
    gaps, to_skin = [], []
    for plan in plan_dataset(cfg):
        out = render_image(plan, cfg, keep_truth=True)
        masses = [f.box for f in out.findings if "Mass" in f.categories]
        if "lead" not in out.cue_boxes or not masses:
            continue
        x0, y0, x1, y1 = out.cue_boxes["lead"]
        centre = 0.5 * (y0 + y1)
        gaps.append(min(abs(centre - 0.5 * (b[1] + b[3])) for b in masses) * cfg.spacing_mm)
        row = out.breast_mask[int(centre)]
        skin = np.nonzero(row)[0]
        # distance from the marker's outer side to the skin line, in mm
        outer = skin.max() + 1 - x1 if plan.laterality == "L" else x0 - skin.min()
        to_skin.append(outer * cfg.spacing_mm)
    assert len(gaps) >= 15
    assert np.median(gaps) < 12.0  # at the level of the mass (the breast is about 120 mm tall)
    assert 0.0 <= min(to_skin) and np.median(to_skin) < 8.0  # on the skin, not deep in the breast


def test_site_images_carry_their_text_and_their_own_processing():
    cfg = PhantomConfig(studies=2, seed=6, mass_rate=0.3, calc_rate=0.3, **SMALL_CFG)
    site = replace(cfg, cues=(CueSpec("site", **ALWAYS),))
    maxval = 2**cfg.bits_stored - 1
    for plan, plan_site in zip(plan_dataset(cfg), plan_dataset(site), strict=True):
        a = render_image(plan, cfg, keep_truth=True)
        b = render_image(plan_site, site)
        x0, y0, x1, y1 = (int(v) for v in b.cue_boxes["site"])
        assert not a.breast_mask[y0:y1, x0:x1].any()  # burned in over the air
        text = b.pixels[y0:y1, x0:x1].astype(float)
        assert 0.15 < np.mean(text > 0.7 * maxval) < 0.7  # letters, not a filled block
        air = a.pixels[y0:y1, x0:x1].astype(float)
        assert air.max() < 0.25 * maxval  # nothing bright there without the site
        # the site's processing: every breast pixel is processed, and edges are enhanced
        pa, pb = a.pixels.astype(float), b.pixels.astype(float)
        breast = a.breast_mask
        assert np.mean(pa[breast] != pb[breast]) > 0.95
        lap_a = np.abs(np.diff(pa, 2, axis=1))[breast[:, 1:-1]].mean()
        lap_b = np.abs(np.diff(pb, 2, axis=1))[breast[:, 1:-1]].mean()
        assert lap_b > 1.1 * lap_a


def test_cue_files_and_metadata(tmp_path):
    out = _phantom(tmp_path / "d", "--studies", "3", "--seed", "4", "--workers", "1",
                   "--balanced", "--cue", "lead:1,1,1", "--cue", "clip@mass:0.5,0,1",
                   "--cue", "site", *SMALL)  # fmt: skip
    meta = json.loads((out / "phantom.json").read_text())
    assert set(meta["cues"]) == {"marker", "lead", "clip", "site"}
    assert meta["cues"]["clip"]["concept"] == "mass" and meta["cues"]["site"]["unit"] == "study"
    assert meta["cues"]["clip"]["rates"] == {"training": {"positive": 0.5, "negative": 0.0},
                                             "test": {"any": 1.0}}  # fmt: skip
    assert meta["cues"]["lead"]["rates"]["training"] == {"positive": 1.0, "negative": 1.0}
    boxes = load_cue_boxes(out)
    breast = {r["image_id"]: r for r in _rows(out / "breast-level_annotations.csv")}
    for name in ("lead", "clip", "site"):
        path = out / f"{name}_annotations.csv"
        assert path.read_text().splitlines()[0] == "image_id,study_id,xmin,ymin,xmax,ymax,kind"
        rows = _rows(path)
        assert all(r["kind"] == name and re.fullmatch(r"\d+\.\d\d", r["xmin"]) for r in rows)
        per_split = {}
        for r in rows:
            per_split[breast[r["image_id"]]["split"]] = per_split.get(
                breast[r["image_id"]]["split"], 0) + 1  # fmt: skip
        assert meta["cues"][name]["images"] == per_split
        assert sum(len(v) for v in boxes[name].values()) == len(rows)
    assert len(_rows(out / "lead_annotations.csv")) >= 10  # rate 1: nearly every image
    # no cue asked: no cue file, the marker alone in the metadata
    plain = _phantom(tmp_path / "p", "--studies", "1", "--seed", "4", "--workers", "1", *SMALL)
    assert set(json.loads((plain / "phantom.json").read_text())["cues"]) == {"marker"}
    assert not list(plain.glob("lead_annotations.csv"))
    # a dataset written before phantom.json existed still yields its marker boxes
    marker = load_cue_boxes(plain)["marker"]
    (plain / "phantom.json").unlink()
    assert load_cue_boxes(plain) == {"marker": marker} and marker
    (plain / "phantom.json").write_text("{not json")
    with pytest.raises(ConfigError, match="phantom.json is not a phantom metadata file"):
        load_cue_boxes(plain)


@pytest.mark.parametrize(
    "cue, message",
    [
        ("needle", "unknown cue 'needle'"),
        ("lead:0.5,0.1", "three numbers"),
        ("clip:0.5,2,0.1", "between 0 and 1"),
        ("site@density", "mass or calcification"),
    ],
)
def test_bad_cue_options_exit_2(tmp_path, capsys, cue, message):
    assert main(["phantom", "--out", str(tmp_path / "x"), "--cue", cue, *SMALL]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_every_cue_survives_the_mammoclip_crop():
    from types import SimpleNamespace

    from napari_mammo_sae.preprocess import preprocess_mammoclip

    cfg = PhantomConfig(studies=5, seed=9, mass_rate=0.4, calc_rate=0.4,
                        cues=tuple(CueSpec(n, **ALWAYS) for n in ("lead", "clip", "site")),
                        **SMALL_CFG)  # fmt: skip
    placed = dict.fromkeys(("lead", "clip", "site"), 0)
    for plan in plan_dataset(cfg):
        out = render_image(plan, cfg)
        rec = SimpleNamespace(pixels=out.pixels.astype(np.float32), photometric=cfg.photometric,
                              spacing_mm=(cfg.spacing_mm, cfg.spacing_mm))  # fmt: skip
        r0, c0, r1, c1 = preprocess_mammoclip(rec, size=(256, 160)).geometry.crop_box
        for name, (x0, y0, x1, y1) in out.cue_boxes.items():
            placed[name] += 1
            assert c0 <= x0 and x1 <= c1 and r0 <= y0 and y1 <= r1, (name, plan.image_id)
    assert min(placed.values()) >= 18, placed  # of 20 images
