"""DICOM export of an analysis: a CBIS-DDSM view analysed with the bundled weights, exported as a
FRACTIONAL Segmentation, a Comprehensive SR and an RGB Secondary Capture; each object validates
with dciodvfy, re-reads with highdicom, and carries exactly the analysis' numbers."""

from __future__ import annotations

import logging
import shutil
import subprocess
import warnings
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import torch

from napari_mammo_sae.dicom import read_mammogram
from napari_mammo_sae.dicom_export import (
    CAPTION,
    MAX_FRACTIONAL_VALUE,
    ExportInput,
    InterventionSummary,
    ModelIdentity,
    export_analysis,
    maps_on_source_grid,
)
from napari_mammo_sae.errors import ExportError
from napari_mammo_sae.models.weights import bundled_weights_dir

torch.set_num_threads(2)


def dciodvfy_errors(path: Path) -> list[str]:
    """The 'Error -' lines dciodvfy prints for a file (patient values are not echoed back)."""
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.fail("dciodvfy is missing: apt-get install dicom3tools (make test installs it)")
    out = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
    return [ln for ln in (out.stdout + out.stderr).splitlines() if ln.startswith("Error")]


def sr_numbers(ds) -> dict[str, list[float]]:
    """Code value -> numeric values (the FD value where highdicom wrote one) in an SR tree."""
    found: dict[str, list[float]] = {}

    def walk(items):
        for it in items:
            if it.ValueType == "NUM":
                mv = it.MeasuredValueSequence[0]
                v = mv.get("FloatingPointValue")
                v = float(mv.NumericValue) if v is None else float(v)
                found.setdefault(it.ConceptNameCodeSequence[0].CodeValue, []).append(v)
            if "ContentSequence" in it:
                walk(it.ContentSequence)

    walk(ds.ContentSequence)
    return found


def sr_texts(ds) -> list[str]:
    out: list[str] = []

    def walk(items):
        for it in items:
            if it.ValueType == "TEXT":
                out.append(str(it.TextValue))
            if it.ValueType == "CODE":
                out.append(str(it.ConceptCodeSequence[0].CodeValue))
            if "ContentSequence" in it:
                walk(it.ContentSequence)

    walk(ds.ContentSequence)
    return out


@pytest.fixture(scope="module")
def analyzer():
    from napari_mammo_sae.models.inference import Analyzer

    root = bundled_weights_dir()
    return Analyzer.from_weights(
        root / "finetuned-calcification", root / "sae-finetuned-calcification", device="cpu"
    )


@pytest.fixture(scope="module")
def exported(analyzer, cbis_files, tmp_path_factory):
    source = cbis_files[0]
    record = read_mammogram(source)
    analysis = analyzer.analyse(record)
    neurons = [int(n) for n in analysis.top_neurons(3)]
    identity = ModelIdentity(
        "finetuned-calcification", "a" * 64, "sae-finetuned-calcification", "b" * 64,
        "calcification",
    )  # fmt: skip
    engine = analysis.intervention()
    iv = engine.apply(neurons, "remove")
    intervention = InterventionSummary("remove", tuple(neurons), iv.probability, iv.logit)
    inp = ExportInput(
        source, analysis, identity, neurons=neurons, scores=[3.0, 2.0, 1.0],
        box_iou={neurons[0]: 0.375}, verdicts={neurons[0]: ["clinical", "spurious"]},
        intervention=intervention, record=record,
    )  # fmt: skip
    out = tmp_path_factory.mktemp("export")
    result = export_analysis(inp, out)
    return source, record, analysis, neurons, intervention, result


def test_every_object_validates_with_dciodvfy_and_rereads(exported):
    source, _, _, _, _, result = exported
    assert sorted(p.name.split(".")[-2] for p in result.folder.glob("*.dcm")) == ["SC", "SEG", "SR"]
    assert not list(result.folder.glob("*.part"))
    for path in result.paths:
        assert dciodvfy_errors(path) == [], path.name
        assert subprocess.run(["dcmdump", "-q", str(path)], capture_output=True).returncode == 0
    assert isinstance(hd.seg.segread(result.segmentation), hd.seg.Segmentation)
    assert isinstance(hd.sr.srread(result.report), hd.sr.ComprehensiveSR)
    assert hd.imread(result.capture).SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage


def test_objects_join_the_source_study_in_new_series_and_reference_the_source(exported):
    source, *_, result = exported
    src = pydicom.dcmread(source, stop_before_pixels=True)
    objs = [pydicom.dcmread(p) for p in result.paths]
    for ds in objs:
        assert ds.StudyInstanceUID == src.StudyInstanceUID
        assert ds.PatientID == src.PatientID and ds.PatientName == src.PatientName
        assert ds.SeriesInstanceUID != src.SeriesInstanceUID
    assert len({ds.SeriesInstanceUID for ds in objs}) == 3
    seg, sr, sc = objs
    refs = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    assert refs[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    evidence = [
        i.ReferencedSOPInstanceUID
        for s in sr.CurrentRequestedProcedureEvidenceSequence
        for ser in s.ReferencedSeriesSequence
        for i in ser.ReferencedSOPSequence
    ]
    assert src.SOPInstanceUID in evidence
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    assert sc.Laterality == "L"  # copied from the source (dciodvfy requires it)


def test_patient_values_appear_only_in_the_patient_module(exported):
    source, *_, result = exported
    src = pydicom.dcmread(source, stop_before_pixels=True)
    secrets = {str(src.PatientName), str(src.PatientID)}
    allowed = {"PatientName", "PatientID"}

    def leaks(ds):
        bad = []
        for elem in ds.iterall():
            if elem.VR in ("SQ", "OB", "OW", "UN") or elem.keyword in allowed:
                continue
            if any(s and s in str(elem.value) for s in secrets):
                bad.append(elem.keyword)
        return bad

    for path in result.paths:
        assert leaks(pydicom.dcmread(path)) == [], path.name
        assert not any(s in path.name for s in secrets)


def test_segmentation_maps_equal_the_analysis_to_the_quantisation(exported):
    _, record, analysis, neurons, _, result = exported
    seg = pydicom.dcmread(result.segmentation)
    assert seg.SegmentationType == "FRACTIONAL"
    assert int(seg.MaximumFractionalValue) == MAX_FRACTIONAL_VALUE
    labels = [s.SegmentLabel for s in seg.SegmentSequence]
    assert labels == [f"neuron {n} rank {i + 1}" for i, n in enumerate(neurons)]
    frames = seg.pixel_array.astype(np.float64) / MAX_FRACTIONAL_VALUE  # (k, rows, cols)
    assert frames.shape == (len(neurons), *record.shape)
    ours = maps_on_source_grid(analysis, neurons, record.shape).astype(np.float64)
    for i, scale in enumerate(result.scales):
        assert scale == pytest.approx(float(ours[i].max()))
        assert f"{scale:.6g}" in seg.SegmentSequence[i].SegmentDescription
        np.testing.assert_allclose(frames[i] * scale, ours[i], atol=scale * 0.5 / 255 + 1e-6)
    assert frames[0].max() == 1.0  # the neuron's maximum is fraction 1
    r0, c0, r1, c1 = analysis.geometry.crop_box  # outside the model's crop there is no map
    rows = np.arange(record.shape[0]) + 0.5
    cols = np.arange(record.shape[1]) + 0.5
    outside = ~(((rows >= r0) & (rows < r1))[:, None] & ((cols >= c0) & (cols < c1))[None, :])
    assert (frames[:, outside] == 0).all()


def test_report_numbers_equal_the_analysis(exported):
    _, _, analysis, neurons, intervention, result = exported
    sr = pydicom.dcmread(result.report)
    nums = sr_numbers(sr)
    assert nums["P-ORIG"] == [analysis.probability]
    assert nums["P-SAE"] == [analysis.reconstruction_probability]
    assert nums["LOGIT-ORIG"] == [analysis.logit]
    assert nums["RANK"] == [1.0, 2.0, 3.0]
    assert nums["SCORE"] == [3.0, 2.0, 1.0]
    assert nums["CONTRIB"] == [float(analysis.logit_contributions[n]) for n in neurons]
    assert nums["ACT-MAX"] == pytest.approx(list(result.scales))
    assert nums["BOX-IOU"] == [0.375]  # only the neuron that has one
    assert nums["P-INTERV"] == [intervention.probability]
    texts = sr_texts(sr)
    assert "classifier_sha256=" + "a" * 64 in texts and "sae_sha256=" + "b" * 64 in texts
    assert texts.count("CLINICAL") == 1 and texts.count("SPURIOUS") == 1
    assert "concept=calcification" in texts


def test_capture_is_rgb_with_burned_in_caption_and_overlay(exported):
    *_, result = exported
    sc = pydicom.dcmread(result.capture)
    assert sc.PhotometricInterpretation == "RGB" and sc.BurnedInAnnotation == "YES"
    assert sc.ImageComments == CAPTION and "NOT FOR DIAGNOSIS" in sc.SeriesDescription
    px = sc.pixel_array.astype(int)
    band = px[:20]
    yellow = (band[..., 0] > 200) & (band[..., 1] > 200) & (band[..., 2] < 80)
    assert yellow.sum() > 50  # caption text drawn on the black band
    body = px[40:]
    coloured = np.abs(body[..., 0] - body[..., 2]) > 40  # the heatmap tints; grey has R == B
    assert coloured.mean() > 0.001


def test_export_writes_no_patient_values_to_logs_or_warnings(
    analyzer, cbis_files, tmp_path, caplog
):
    source = cbis_files[1]
    src = pydicom.dcmread(source, stop_before_pixels=True)
    record = read_mammogram(source)
    analysis = analyzer.analyse(record)
    identity = ModelIdentity("c", "", "s", "", "calcification")
    with caplog.at_level(logging.DEBUG), warnings.catch_warnings(record=True) as record_warnings:
        warnings.simplefilter("always")
        export_analysis(ExportInput(source, analysis, identity, record=record, k=1), tmp_path)
    messages = caplog.text + " ".join(str(w.message) for w in record_warnings)
    assert str(src.PatientID) not in messages and str(src.PatientName) not in messages


def test_analysis_of_another_image_or_missing_source_is_refused(exported, cbis_files, tmp_path):
    _, _, analysis, _, _, _ = exported
    identity = ModelIdentity("c", "", "s", "", "calcification")
    with pytest.raises(ExportError, match="another image"):
        export_analysis(ExportInput(cbis_files[1], analysis, identity), tmp_path / "a")
    with pytest.raises(ExportError, match="could not be read"):
        export_analysis(ExportInput(tmp_path / "gone.dcm", analysis, identity), tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_region_intervention_is_reported_with_its_boxes(analyzer, cbis_files, tmp_path):
    """The interventions dock's region mode: one planar ROI per box on the source image, each with
    the probability after switching off everything under all the boxes; valid for dciodvfy."""
    source = cbis_files[0]
    record = read_mammogram(source)
    analysis = analyzer.analyse(record)
    cells = np.zeros(analysis.grid, bool)
    cells[2:4, 1:3] = True
    iv = analysis.region_intervention(cells)
    boxes = ((100.0, 200.0, 400.0, 600.0), (900.5, 1000.0, 1100.0, 1250.25))
    summary = InterventionSummary(
        "region", (), iv.probability, iv.logit, boxes=boxes, cells=int(cells.sum())
    )
    identity = ModelIdentity("clf", "a" * 64, "sae", "b" * 64, "calcification")
    result = export_analysis(
        ExportInput(source, analysis, identity, neurons=[0, 1], scores=[2.0, 1.0],
                    intervention=summary, record=record),
        tmp_path,
    )  # fmt: skip
    assert dciodvfy_errors(result.report) == []
    sr = pydicom.dcmread(result.report)
    nums = sr_numbers(sr)
    assert nums["P-INTERV"] == [iv.probability, iv.probability]
    assert nums["CELLS-INTERV"] == [4.0, 4.0]
    assert "N-INTERV" not in nums
    regions = []

    def walk(items):
        for it in items:
            if it.ValueType == "SCOORD":
                regions.append(np.asarray(it.GraphicData, dtype=float).reshape(-1, 2))
            if "ContentSequence" in it:
                walk(it.ContentSequence)

    walk(sr.ContentSequence)
    assert len(regions) == 2
    for (x0, y0, x1, y1), got in zip(boxes, regions, strict=True):
        np.testing.assert_allclose(got, [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]])
    groups = hd.sr.srread(result.report).content.get_planar_roi_measurement_groups()
    assert len(groups) == 2 and all(g.roi is not None for g in groups)


def test_a_region_intervention_without_boxes_is_refused(analyzer, cbis_files, tmp_path):
    source = cbis_files[0]
    record = read_mammogram(source)
    analysis = analyzer.analyse(record)
    summary = InterventionSummary("region", (), 0.5, 0.0)
    identity = ModelIdentity("clf", "a" * 64, "sae", "b" * 64, "calcification")
    with pytest.raises(ExportError, match="needs the boxes"):
        export_analysis(
            ExportInput(source, analysis, identity, neurons=[0], intervention=summary,
                        record=record),
            tmp_path,
        )  # fmt: skip
