"""Small helpers that write synthetic DICOM files with pydicom, for edge cases real files lack.

Every file carries the fake patient name ``FAKE_PATIENT_NAME`` and ID ``FAKE_PATIENT_ID`` so tests can
check that no patient-identifying value leaks into names, logs or errors.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)

FAKE_PATIENT_NAME = "DOE^JANE"
FAKE_PATIENT_ID = "PID-8675309"
FAKE_ACCESSION = "ACC-424242"
FAKE_BIRTH_DATE = "19610203"
FAKE_INSTITUTION = "Springfield General Hospital"
PATIENT_VALUES = (
    FAKE_PATIENT_NAME,
    "DOE",
    "JANE",
    FAKE_PATIENT_ID,
    FAKE_ACCESSION,
    FAKE_BIRTH_DATE,
    FAKE_INSTITUTION,
)

MG_FOR_PRESENTATION = UID("1.2.840.10008.5.1.4.1.1.1.2")
BASIC_TEXT_SR = UID("1.2.840.10008.5.1.4.1.1.88.11")
GSPS = UID("1.2.840.10008.5.1.4.1.1.11.1")
BREAST_TOMO = UID("1.2.840.10008.5.1.4.1.1.13.1.3")

#: SNOMED-RT view codes (DICOM CID 4014)
VIEW_CODE = {
    "CC": ("R-10242", "SRT", "cranio-caudal"),
    "MLO": ("R-10226", "SRT", "medio-lateral oblique"),
}


def breast_image(
    rows: int = 96, cols: int = 64, chest_wall: str = "left", bits: int = 12, seed: int = 0
) -> np.ndarray:
    """A uint16 half-disc 'breast' whose flat side (chest wall) lies on the given image edge."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:rows, 0:cols]
    cx = 0 if chest_wall == "left" else cols - 1
    r = np.hypot((yy - rows / 2) / (rows * 0.42), (xx - cx) / (cols * 0.8))
    tissue = (r < 1.0).astype(np.float64)
    maxval = 2**bits - 1
    img = tissue * (0.55 * maxval) + tissue * rng.uniform(0, 0.3 * maxval, size=tissue.shape)
    img += rng.uniform(0, 0.02 * maxval, size=tissue.shape)  # background noise
    return np.clip(img, 0, maxval).astype(np.uint16)


def _base_dataset(
    path: Path, sop_class: UID, transfer_syntax: UID = ExplicitVRLittleEndian
) -> FileDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = FAKE_PATIENT_NAME
    ds.PatientID = FAKE_PATIENT_ID
    ds.PatientBirthDate = FAKE_BIRTH_DATE
    ds.AccessionNumber = FAKE_ACCESSION
    ds.InstitutionName = FAKE_INSTITUTION
    return ds


def write_mammogram(
    path: str | Path,
    *,
    pixels: np.ndarray | None = None,
    chest_wall: str = "left",
    image_laterality: str | None = "L",
    laterality: str | None = None,
    view_position: str | None = None,
    view_code: str | None = "CC",
    series_description: str | None = None,
    patient_id: str | None = None,
    patient_orientation: tuple[str, str] | None = None,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    window: tuple[float, float] | tuple[list[float], list[float]] | None = (2000.0, 3000.0),
    voi_function: str | None = None,
    voi_lut: tuple[int, np.ndarray] | None = None,
    rescale: tuple[float, float] | None = None,
    pixel_spacing: tuple[float, float] | None = (0.1, 0.1),
    imager_pixel_spacing: tuple[float, float] | None = None,
    frames: int = 1,
    transfer_syntax: UID = ExplicitVRLittleEndian,
    rows: int = 96,
    cols: int = 64,
) -> Path:
    """Write a small synthetic MG image with the given tags; returns the path."""
    path = Path(path)
    sop_class = BREAST_TOMO if frames > 1 else MG_FOR_PRESENTATION
    ds = _base_dataset(path, sop_class)
    if patient_id is not None:
        ds.PatientID = patient_id
    ds.Modality = "MG"
    if pixels is None:
        pixels = breast_image(rows, cols, chest_wall, bits=bits_stored)
        if photometric == "MONOCHROME1":
            pixels = (2**bits_stored - 1 - pixels).astype(np.uint16)
    if frames > 1:
        pixels = np.stack([pixels + i for i in range(frames)]).astype(np.uint16)
        ds.NumberOfFrames = frames
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    if image_laterality:
        ds.ImageLaterality = image_laterality
    if laterality:
        ds.Laterality = laterality
    if view_position:
        ds.ViewPosition = view_position
    if view_code:
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = VIEW_CODE[view_code]
        ds.ViewCodeSequence = Sequence([code])
    if series_description:
        ds.SeriesDescription = series_description
    if patient_orientation:
        ds.PatientOrientation = list(patient_orientation)
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if voi_function:
        ds.VOILUTFunction = voi_function
    if voi_lut is not None:
        first, lut = voi_lut
        item = Dataset()
        item.LUTDescriptor = [len(lut), first, 16]
        item.add_new(0x00283006, "US", [int(v) for v in lut])  # LUT Data
        ds.VOILUTSequence = Sequence([item])
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    if pixel_spacing:
        ds.PixelSpacing = list(pixel_spacing)
    if imager_pixel_spacing:
        ds.ImagerPixelSpacing = list(imager_pixel_spacing)
    if transfer_syntax == RLELossless:
        ds.compress(RLELossless, pixels.astype(np.uint16))
    else:
        ds.PixelData = pixels.astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def write_structured_report(path: str | Path) -> Path:
    """A Basic Text SR (no pixel data)."""
    path = Path(path)
    ds = _base_dataset(path, BASIC_TEXT_SR)
    ds.Modality = "SR"
    ds.ValueType = "CONTAINER"
    ds.save_as(path, enforce_file_format=True)
    return path


def write_presentation_state(path: str | Path) -> Path:
    """A Grayscale Softcopy Presentation State (no pixel data)."""
    path = Path(path)
    ds = _base_dataset(path, GSPS)
    ds.Modality = "PR"
    ds.save_as(path, enforce_file_format=True)
    return path


def write_truncated(src: str | Path, dst: str | Path, keep_fraction: float = 0.6) -> Path:
    """Copy the first part of a file (cut inside the pixel data)."""
    data = Path(src).read_bytes()
    dst = Path(dst)
    dst.write_bytes(data[: int(len(data) * keep_fraction)])
    return dst


def write_broken_sequence(path: str | Path) -> Path:
    """A mammogram whose View Code Sequence length is corrupted so that it swallows the pixel data."""
    path = Path(path)
    write_mammogram(path, view_code="CC")
    data = bytearray(path.read_bytes())
    pos = data.find(bytes.fromhex("54002002") + b"SQ")  # (0054,0220) SQ, explicit VR little endian
    assert pos > 0, "no View Code Sequence found"
    data[pos + 8 : pos + 12] = (0x100000).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    return path


def write_not_dicom(path: str | Path) -> Path:
    """A plain text file with a .dcm name."""
    path = Path(path)
    path.write_text("this is not a DICOM file\n" * 20)
    return path


def write_jpeg_baseline(path: str | Path, pixels: np.ndarray) -> Path:
    """An 8-bit greyscale JPEG baseline (1.2.840.10008.1.2.4.50) mammogram, encoded with Pillow."""
    import io

    from PIL import Image
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    path = Path(path)
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8), mode="L").save(buf, format="JPEG", quality=95)
    ds = _base_dataset(path, MG_FOR_PRESENTATION, JPEGBaseline8Bit)
    ds.Modality = "MG"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.ImageLaterality = "R"
    ds.ViewPosition = "MLO"
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


def pydicom_data_file(name: str) -> Path:
    """A test file from the `pydicom-data` package (dev extra) or pydicom's bundled test files."""
    import data_store  # the pydicom-data package: a missing dev dependency fails loudly
    import pydicom

    candidates = [
        Path(data_store.__file__).parent / "data" / name,
        Path(pydicom.__file__).parent / "data" / "test_files" / name,
    ]
    for path in candidates:
        if path.is_file():
            return path
    raise AssertionError(f"test file {name} not found: install the dev extra (pydicom-data)")


def tiny_classifier():
    """timm test_efficientnet + a linear head, seeded, in eval mode, with a head bias of -0.3 (so
    probabilities are not 0.5 by construction)."""
    import torch

    from napari_mammo_sae.pipeline.head_training import build_classifier

    torch.manual_seed(0)
    clf = build_classifier("test_efficientnet").eval()
    with torch.no_grad():
        clf.head.bias.fill_(-0.3)
    return clf
