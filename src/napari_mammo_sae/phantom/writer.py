"""Digital mammography DICOM files for phantom images (MG, For Presentation), deterministic UIDs.

Tags follow the Digital Mammography X-Ray Image IOD: Modality MG, 12-14 bits stored in 16,
MONOCHROME2 (or MONOCHROME1), Imager Pixel Spacing, Image Laterality, View Position and the View
Code Sequence (SNOMED-RT codes of DICOM CID 4014), Patient Orientation as stored by FFDM units
(columns toward the nipple: L CC ``A\\R``, R CC ``P\\L``, L MLO ``A\\F``, R MLO ``P\\F``), a window,
and a synthetic patient module (``PHANTOM^<n>``, ``PH<n>``) that identifies nobody.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)

from ..errors import ConfigError, MissingDecoderError

MG_FOR_PRESENTATION = UID("1.2.840.10008.5.1.4.1.1.1.2")
#: view -> (code value, scheme, meaning), DICOM CID 4014 (SNOMED-RT)
VIEW_CODES = {
    "CC": ("R-10242", "SRT", "cranio-caudal"),
    "MLO": ("R-10226", "SRT", "medio-lateral oblique"),
}
#: (laterality, view) -> Patient Orientation (row direction, column direction)
PATIENT_ORIENTATION = {
    ("L", "CC"): ("A", "R"),
    ("R", "CC"): ("P", "L"),
    ("L", "MLO"): ("A", "F"),
    ("R", "MLO"): ("P", "F"),
}
COMPRESSIONS = {"none": None, "rle": RLELossless, "jpeg2000": JPEG2000Lossless}


def phantom_uid(seed: int, *parts: object) -> str:
    """A DICOM UID that depends only on the seed and the parts (same arguments, same UID)."""
    return str(generate_uid(entropy_srcs=["napari-mammo-sae-phantom", str(seed), *map(str, parts)]))


@dataclass(frozen=True)
class DicomInfo:
    """What the file says about one phantom image (no real patient data)."""

    laterality: str
    view: str
    spacing_mm: float
    bits_stored: int
    photometric: str
    window: tuple[float, float]  # centre, width in stored units (MONOCHROME2 sense for M2)
    patient_number: int
    study_uid: str
    series_uid: str
    sop_uid: str
    study_number: int
    instance_number: int


def write_dicom(
    path: str | Path, pixels: np.ndarray, info: DicomInfo, compression: str | None = None
) -> Path:
    """Write one MG For Presentation image; ``compression`` is None, 'rle' or 'jpeg2000'."""
    path = Path(path)
    ts = COMPRESSIONS.get(compression or "none", "bad")
    if ts == "bad":
        raise ConfigError(
            f"unknown compression {compression!r}: use one of {', '.join(COMPRESSIONS)}"
        )
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MG_FOR_PRESENTATION
    meta.MediaStorageSOPInstanceUID = UID(info.sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationVersionName = "NMSAE_PHANTOM"
    ds = FileDataset(str(path), Dataset(), file_meta=meta, preamble=b"\0" * 128)
    n = info.patient_number
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
    ds.SOPClassUID = MG_FOR_PRESENTATION
    ds.SOPInstanceUID = info.sop_uid
    ds.StudyInstanceUID = info.study_uid
    ds.SeriesInstanceUID = info.series_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20260101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.AccessionNumber = ""
    ds.Modality = "MG"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.Manufacturer = "napari-mammo-sae phantom"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "Synthetic screening mammogram (phantom)"
    ds.SeriesDescription = f"{info.laterality} {info.view}"
    ds.PatientName = f"PHANTOM^{n}"
    ds.PatientID = f"PH{n:06d}"
    ds.PatientBirthDate = ""
    ds.PatientSex = "F"
    ds.PatientIdentityRemoved = "YES"
    ds.BodyPartExamined = "BREAST"
    ds.StudyID = str(info.study_number)
    ds.SeriesNumber = 1
    ds.InstanceNumber = info.instance_number
    ds.PatientOrientation = list(PATIENT_ORIENTATION[(info.laterality, info.view)])
    ds.BurnedInAnnotation = "NO"
    ds.ImageLaterality = info.laterality
    ds.ViewPosition = info.view
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = VIEW_CODES[info.view]
    ds.ViewCodeSequence = Sequence([code])
    ds.BreastImplantPresent = "NO"
    ds.ImagerPixelSpacing = [info.spacing_mm, info.spacing_mm]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = info.photometric
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.BitsAllocated = 16
    ds.BitsStored = info.bits_stored
    ds.HighBit = info.bits_stored - 1
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.WindowCenter = round(float(info.window[0]), 1)
    ds.WindowWidth = round(float(info.window[1]), 1)
    ds.VOILUTFunction = "LINEAR"
    ds.LossyImageCompression = "00"
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    if ts is not None:
        try:
            ds.compress(ts, encoding_plugin="pylibjpeg" if ts == JPEG2000Lossless else "")
        except (RuntimeError, ImportError, ValueError) as exc:
            what = "pylibjpeg-openjpeg" if ts == JPEG2000Lossless else "pydicom's RLE encoder"
            raise MissingDecoderError(
                f"{compression} compression failed ({exc}); it needs {what}: "
                "pip install pylibjpeg pylibjpeg-openjpeg, or write uncompressed files"
            ) from exc
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
