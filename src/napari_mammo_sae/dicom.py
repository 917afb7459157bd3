"""Read DICOM mammograms into a small typed record (Qt-free, never modifies the file).

What the reader does, in the order a workstation does it:

* **Pixels** are decoded (uncompressed, RLE, JPEG baseline/lossless, JPEG-LS, JPEG 2000 through the
  pylibjpeg plugins) and passed through the *modality LUT* (Rescale Slope/Intercept, or a Modality
  LUT Sequence). ``MammogramRecord.pixels`` holds these values as stored: MONOCHROME1 is not inverted.
* **Window**: Window Center/Width (first value when several) with its VOI LUT Function (LINEAR,
  LINEAR_EXACT or SIGMOID); else the first VOI LUT Sequence item; else none (then min/max).
  Center/Width wins over a LUT when both are present because napari's linear contrast limits reproduce
  it exactly. How each becomes napari contrast limits (``Window.limits``):

  - LINEAR: DICOM PS3.3 C.11.2.1.2.1, i.e. ``c - 0.5 -/+ (w - 1) / 2``;
  - LINEAR_EXACT: ``c -/+ w / 2``;
  - SIGMOID: DICOM PS3.3 C.11.2.1.3.1, ``y = 1 / (1 + exp(-4 (x - c) / w))`` (output range 0..1).
    napari's contrast limits are linear, so ``display_pixels()`` returns the sigmoid's output itself
    and ``display_limits()`` is ``(0, 1)``: the screen shows exactly the standard's curve.
    ``Window.limits()`` still gives the linear ramp tangent to the sigmoid at its centre
    (``c -/+ w / 2``) for reports;
  - VOI LUT Sequence: the input range over which the LUT output rises from its minimum to its
    maximum (the workstation shows everything below as black and above as white); the LUT's shape
    inside that range is approximated linearly. The window then has ``source="VOILUTSequence"``.

* **MONOCHROME1** (bright = low values): ``display_pixels()`` inverts about the middle of the
  representable range, and ``display_limits()`` maps the window the same way, so dense tissue is bright
  (with SIGMOID the sigmoid's output is inverted: ``1 - y``, as the standard inverts after the VOI LUT).
* **Spacing**: Pixel Spacing, else Imager Pixel Spacing, else 1 mm with a logged warning
  (``spacing_source`` says which).
* **Laterality**: Image Laterality, else Laterality, else text such as ``LEFT_CC`` / ``R MLO`` in
  Series Description, Protocol Name, Image Comments or Patient ID (read for parsing only, never
  logged or echoed), else the image content: the side of the image the breast touches (its chest
  wall) - standard display puts a left breast's chest wall on the image's left edge. No guess is made
  for modalities that are certainly not mammography (CT, MR, US, ...).
* **View**: View Code Sequence (SNOMED-RT and SNOMED CT codes of DICOM CID 4014, then its code
  meaning), else View Position, else the same text tags.
* **Multi-frame objects** (tomosynthesis, enhanced objects): refused by default with
  ``UnsupportedImageError``, because the model analyses one 2-D image; pass ``frame=N`` (0-based index)
  to open frame N. Colour images are refused.

Errors are the typed ones of :mod:`napari_mammo_sae.errors`; their messages name the file the user gave,
say what to do, and never contain patient-identifying values. pydicom's own warnings and log records
(which may quote element values) are swallowed while a file is read.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import (
    CorruptPixelDataError,
    DicomReadError,
    MissingDecoderError,
    NoPixelDataError,
    NotDicomError,
    UnsupportedImageError,
)

logger = logging.getLogger(__name__)

WINDOW_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")

#: DICOM CID 4014 (view for mammography): SNOMED-RT and SNOMED CT code -> ACR view abbreviation
VIEW_CODES: dict[str, str] = {
    "R-10242": "CC",
    "399162004": "CC",
    "R-10226": "MLO",
    "399368009": "MLO",
    "R-10224": "ML",
    "399260004": "ML",
    "R-10228": "LM",
    "399352003": "LM",
    "R-10230": "LMO",
    "399099002": "LMO",
    "R-1024A": "XCCL",
    "399192003": "XCCL",
    "R-1024B": "XCCM",
    "399101009": "XCCM",
    "R-10244": "FB",
    "399196006": "FB",
    "R-102D0": "SIO",
    "399188001": "SIO",
    "R-102C2": "ISO",
    "441555000": "ISO",
}

#: code meanings (lower case, hyphens/spaces removed) -> view, for codes we do not know
_VIEW_MEANINGS: list[tuple[str, str]] = [
    ("exaggeratedlaterally", "XCCL"),
    ("exaggeratedmedially", "XCCM"),
    ("mediolateraloblique", "MLO"),
    ("lateromedialoblique", "LMO"),
    ("mediolateral", "ML"),
    ("lateromedial", "LM"),
    ("caudocranial", "FB"),
    ("craniocaudal", "CC"),
]

#: modalities whose images are certainly not mammograms: no laterality guess from the pixels
NON_MAMMO_MODALITIES = frozenset(
    {"CT", "MR", "US", "NM", "PT", "XA", "RF", "SEG", "SR", "PR", "ECG"}
)

#: view abbreviations recognised in View Position and free text
KNOWN_VIEWS = ("XCCL", "XCCM", "MLO", "LMO", "CC", "ML", "LM", "FB", "SIO", "ISO")
_LATERALITY_WORDS = {"LEFT": "L", "RIGHT": "R", "L": "L", "R": "R"}
_COMBINED = re.compile(r"^(LEFT|RIGHT|L|R)(" + "|".join(KNOWN_VIEWS) + r")$")
# Text tags searched for laterality/view, in order. Patient ID is read for parsing only.
_TEXT_TAGS = ("SeriesDescription", "ProtocolName", "ImageComments", "PatientID")

#: transfer syntax UID -> pip packages that decode it
DECODER_PACKAGES: dict[str, tuple[str, ...]] = {
    "1.2.840.10008.1.2.4.50": ("pylibjpeg", "pylibjpeg-libjpeg"),  # JPEG baseline
    "1.2.840.10008.1.2.4.51": ("pylibjpeg", "pylibjpeg-libjpeg"),  # JPEG extended
    "1.2.840.10008.1.2.4.57": ("pylibjpeg", "pylibjpeg-libjpeg"),  # JPEG lossless
    "1.2.840.10008.1.2.4.70": ("pylibjpeg", "pylibjpeg-libjpeg"),  # JPEG lossless SV1
    "1.2.840.10008.1.2.4.80": ("pylibjpeg", "pylibjpeg-libjpeg"),  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81": ("pylibjpeg", "pylibjpeg-libjpeg"),  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.90": ("pylibjpeg", "pylibjpeg-openjpeg"),  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91": ("pylibjpeg", "pylibjpeg-openjpeg"),  # JPEG 2000
    "1.2.840.10008.1.2.4.201": ("pylibjpeg", "pylibjpeg-openjpeg"),  # HTJ2K lossless
    "1.2.840.10008.1.2.4.202": ("pylibjpeg", "pylibjpeg-openjpeg"),  # HTJ2K lossless RPCL
    "1.2.840.10008.1.2.4.203": ("pylibjpeg", "pylibjpeg-openjpeg"),  # HTJ2K
}


# --------------------------------------------------------------------------------------------
# records
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Window:
    """Display window in modality units (after rescale slope/intercept)."""

    center: float
    width: float
    function: str = "LINEAR"  # LINEAR | LINEAR_EXACT | SIGMOID
    source: str = "WindowCenterWidth"  # WindowCenterWidth | VOILUTSequence

    def limits(self) -> tuple[float, float]:
        """(low, high) napari contrast limits that reproduce this window (see module docstring)."""
        c, w = float(self.center), float(self.width)
        if self.function == "LINEAR":
            half = max(w - 1.0, 0.0) / 2.0
            low, high = c - 0.5 - half, c - 0.5 + half
        else:  # LINEAR_EXACT, and SIGMOID by its tangent at the centre
            low, high = c - w / 2.0, c + w / 2.0
        if not high > low:
            high = low + max(abs(low) * 1e-6, 1e-3)
        return (low, high)

    @property
    def is_sigmoid(self) -> bool:
        """True when display needs the sigmoid curve (linear contrast limits cannot reproduce it)."""
        return self.function == "SIGMOID"

    def sigmoid(self, values: np.ndarray, y_min: float = 0.0, y_max: float = 1.0) -> np.ndarray:
        """The SIGMOID VOI LUT function of PS3.3 C.11.2.1.3.1 (float32), whatever ``function`` is.

        ``y = (y_max - y_min) / (1 + exp(-4 (x - c) / w)) + y_min``.
        """
        c, w = float(self.center), float(self.width)
        x = np.asarray(values, dtype=np.float32)
        with np.errstate(over="ignore"):  # exp overflows to inf far below the centre: y -> y_min
            t = np.exp(np.float32(-4.0 / w) * (x - np.float32(c)))
        y = np.float32(y_max - y_min) / (np.float32(1.0) + t) + np.float32(y_min)
        return y.astype(np.float32, copy=False)


@dataclass(frozen=True)
class MammogramRecord:
    """One 2-D mammogram as read from DICOM; holds no patient-identifying values."""

    pixels: np.ndarray  # 2-D float32, modality LUT applied, AS STORED (MONOCHROME1 not inverted)
    photometric: str  # "MONOCHROME1" | "MONOCHROME2"
    window: Window | None  # None when the file has no window (then use min/max)
    spacing_mm: tuple[float, float]  # (row, col)
    spacing_source: str  # "PixelSpacing" | "ImagerPixelSpacing" | "default"
    laterality: str | None  # "L" | "R"
    laterality_source: str  # "ImageLaterality" | "Laterality" | "text" | "image" | "unknown"
    view: str | None  # "CC" | "MLO" | other ACR code such as "ML", "XCCL"
    view_source: str  # "ViewCodeSequence" | "ViewPosition" | "text" | "unknown"
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    bits_stored: int
    source: str  # file name the user gave (no patient data)
    frame: int | None = None
    # --- extras (defaults keep records built by hand, e.g. phantoms, short) ---
    value_range: tuple[float, float] | None = None  # representable range in modality units
    patient_orientation: tuple[str, ...] | None = None  # e.g. ("A", "R"); None if absent/invalid
    transfer_syntax: str = ""  # name, e.g. "RLE Lossless"
    transfer_syntax_uid: str = ""
    modality: str = ""
    sop_class: str = ""  # name, e.g. "Digital Mammography X-Ray Image Storage - For Presentation"
    number_of_frames: int = 1
    notes: tuple[str, ...] = field(default=())  # warnings worth showing (no patient data)

    def _inversion_pivot(self) -> float:
        if self.value_range is not None:
            return float(self.value_range[0]) + float(self.value_range[1])
        return float(np.nanmin(self.pixels)) + float(np.nanmax(self.pixels))

    def display_pixels(self) -> np.ndarray:
        """Pixels for display: MONOCHROME1 inverted so that dense tissue is bright.

        With a SIGMOID window these are the sigmoid's output (0..1; ``1 - y`` for MONOCHROME1), shown
        with ``display_limits() == (0, 1)``.
        """
        if self.window is not None and self.window.is_sigmoid:
            y = self.window.sigmoid(self.pixels)
            if self.photometric == "MONOCHROME1":
                y = np.float32(1.0) - y
            return y
        if self.photometric == "MONOCHROME1":
            return (np.float32(self._inversion_pivot()) - self.pixels).astype(
                np.float32, copy=False
            )
        return self.pixels

    def display_limits(self) -> tuple[float, float]:
        """Contrast limits for ``display_pixels()``: the file's window, else the data min/max."""
        if self.window is not None and self.window.is_sigmoid:
            return (0.0, 1.0)
        if self.window is not None:
            low, high = self.window.limits()
            if self.photometric == "MONOCHROME1":
                pivot = self._inversion_pivot()
                low, high = pivot - high, pivot - low
            return (float(low), float(high))
        data = self.display_pixels()
        low, high = float(np.nanmin(data)), float(np.nanmax(data))
        if not high > low:
            high = low + 1.0
        return (low, high)

    @property
    def name(self) -> str:
        """Layer name from laterality and view: "R CC", "L MLO", "? CC" ..."""
        return f"{self.laterality or '?'} {self.view or '?'}"

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols) of the image."""
        return (int(self.pixels.shape[0]), int(self.pixels.shape[1]))


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_pydicom() -> Iterator[None]:
    """Swallow pydicom warnings/log records (they may quote element values) and skip value validation."""
    from pydicom import config

    pyd_logger = logging.getLogger("pydicom")

    def _drop(record: logging.LogRecord) -> bool:
        return False

    old_mode = config.settings.reading_validation_mode
    config.settings.reading_validation_mode = config.IGNORE
    pyd_logger.addFilter(_drop)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
        if caught:
            logger.debug("pydicom emitted %d warning(s) while reading (not shown)", len(caught))
    finally:
        pyd_logger.removeFilter(_drop)
        config.settings.reading_validation_mode = old_mode


def _read_dataset(path: Path, name: str):
    """Parse the file with pydicom (read-only), mapping parse failures to typed errors."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(str(path))
            has_header = True
        except InvalidDicomError:
            has_header = False
            ds = None
        except OSError:
            raise
        except Exception as exc:  # malformed after a valid header: broken sequence, truncation
            raise CorruptPixelDataError(
                f"{name}: the DICOM file is damaged and cannot be parsed ({type(exc).__name__}, "
                "e.g. a broken sequence or a truncated file). Re-export it from the PACS or modality."
            ) from None
    truncated = any("End of file reached" in str(w.message) for w in caught)
    if ds is None:
        # Some DICOM files lack the 128-byte preamble and 'DICM' prefix: accept those only when
        # they really parse as an image object.
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(str(path), force=True)
            plausible = "SOPClassUID" in ds or ("Rows" in ds and "PixelData" in ds)
        except Exception:
            plausible = False
        if not plausible:
            raise NotDicomError(
                f"{name} is not a DICOM file (no DICOM header). Open a DICOM mammogram (.dcm) "
                "exported from the PACS or modality."
            )
    if (
        "TransferSyntaxUID" not in ds.file_meta
    ):  # headerless or incomplete meta: use the encoding read
        from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

        implicit, little = getattr(ds, "original_encoding", (True, True))
        ds.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian
            if implicit
            else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
        )
    ds._mammo_truncated = truncated  # type: ignore[attr-defined]
    ds._mammo_has_header = has_header  # type: ignore[attr-defined]
    return ds


def _uid_name(uid: str) -> str:
    try:
        from pydicom.uid import UID

        return UID(uid).name
    except Exception:
        return str(uid)


def _has_pixels(ds) -> bool:
    return any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))


def _check_image(ds, name: str, frame: int | None) -> int:
    """Raise the typed error for objects we cannot show; return the number of frames."""
    sop_class = _uid_name(
        str(ds.get("SOPClassUID", ds.file_meta.get("MediaStorageSOPClassUID", "")))
    )
    if not _has_pixels(ds):
        if getattr(ds, "_mammo_truncated", False):
            raise CorruptPixelDataError(
                f"{name}: the file ends before its pixel data (truncated file). Copy or export it again "
                "from the PACS; the original transfer may have been interrupted."
            )
        if "Image Storage" in sop_class or "Rows" in ds:
            raise CorruptPixelDataError(
                f"{name}: this image object has no readable pixel data (a damaged element or sequence "
                "hides it, or the file is cut short). Export the image again from the PACS or modality."
            )
        kind = sop_class or "a non-image object"
        raise NoPixelDataError(
            f"{name} contains no image ({kind}); objects such as structured reports, presentation "
            "states or plans carry no pixels. Open the mammogram image files of the study instead."
        )
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise UnsupportedImageError(
            f"{name} is a colour image ({photometric or 'unknown'}, {samples} samples per pixel); "
            "mammograms are greyscale. Open the original greyscale DICOM image instead of a screenshot "
            "or secondary capture."
        )
    try:
        n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        n_frames = 1
    if n_frames > 1 and frame is None:
        raise UnsupportedImageError(
            f"{name} holds {n_frames} frames (e.g. tomosynthesis or an enhanced multi-frame object); "
            f"the analysis needs one 2-D image. Pass a frame index (0 to {n_frames - 1}), e.g. "
            "read_mammogram(path, frame=0) or `napari-mammo-sae info --frame 0`, or open a 2-D "
            "synthesised mammogram instead."
        )
    if frame is not None and not 0 <= frame < n_frames:
        raise UnsupportedImageError(
            f"{name} has {n_frames} frame(s); frame={frame} does not exist. Choose 0 to {n_frames - 1}."
        )
    return n_frames


def _decode(ds, name: str, frame: int | None, n_frames: int) -> np.ndarray:
    """Decode the (selected frame of the) pixel data, mapping failures to typed errors."""
    from pydicom.pixels import get_decoder, pixel_array

    tsyntax = ds.file_meta.TransferSyntaxUID
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError:
        raise MissingDecoderError(
            f"{name}: no decoder exists for its transfer syntax {tsyntax.name} ({tsyntax}). "
            "Convert it to an uncompressed or JPEG 2000 DICOM (e.g. with dcmtk's dcmdjpeg/dcmconv)."
        ) from None
    if not decoder.is_available:
        packages = DECODER_PACKAGES.get(str(tsyntax), ("pylibjpeg",))
        raise MissingDecoderError(
            f"{name}: {tsyntax.name} pixel data needs the decoder package {packages[-1]}: "
            f"pip install {' '.join(packages)}"
        )
    index = frame if n_frames > 1 else None
    try:
        arr = pixel_array(ds, index=index)
    except (ImportError, ModuleNotFoundError):
        packages = DECODER_PACKAGES.get(str(tsyntax), ("pylibjpeg",))
        raise MissingDecoderError(
            f"{name}: {tsyntax.name} pixel data needs the decoder package {packages[-1]}: "
            f"pip install {' '.join(packages)}"
        ) from None
    except Exception as exc:
        text = str(exc)
        # pydicom's messages about lengths and missing image-pixel elements quote no values
        safe = ("length" in text.lower() and "pixel data" in text.lower()) or text.startswith(
            "Missing required element"
        )
        reason = text if safe else ""
        raise CorruptPixelDataError(
            f"{name}: the {tsyntax.name} pixel data is truncated or corrupt and does not decode "
            f"({type(exc).__name__}{': ' + reason if reason else ''}). Export the image again from the "
            "PACS or modality."
        ) from None
    if getattr(ds, "_mammo_truncated", False):
        raise CorruptPixelDataError(
            f"{name}: the file is truncated (it ends inside its pixel data). Copy or export it again."
        )
    arr = np.asarray(arr)
    if arr.ndim == 3 and n_frames == 1 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise UnsupportedImageError(
            f"{name}: decoded pixel data has shape {arr.shape}, not a 2-D greyscale image. "
            "Open a single-frame greyscale mammogram."
        )
    return arr


def _modality(ds, arr: np.ndarray) -> tuple[np.ndarray, tuple[float, float]]:
    """Apply the modality LUT; also return the modality-unit range of representable stored values."""
    from pydicom.pixels import apply_modality_lut

    bits = int(ds.get("BitsStored", 16) or 16)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    if np.issubdtype(arr.dtype, np.floating):
        lo_s, hi_s = float(np.nanmin(arr)), float(np.nanmax(arr))
    elif signed:
        lo_s, hi_s = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    else:
        lo_s, hi_s = 0, 2**bits - 1
    if "ModalityLUTSequence" in ds:
        out = apply_modality_lut(arr, ds)
        ends = apply_modality_lut(np.array([lo_s, hi_s], dtype=arr.dtype), ds)
    else:
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        out = arr.astype(np.float32)
        if slope != 1 or intercept != 0:
            out = out * np.float32(slope) + np.float32(intercept)
        ends = np.array([lo_s, hi_s], dtype=np.float64) * slope + intercept
    lo, hi = float(np.min(ends)), float(np.max(ends))
    return np.ascontiguousarray(out, dtype=np.float32), (lo, hi)


def _first_number(value) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        if len(value) == 0:
            return None
        value = value[0]
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _window(ds) -> Window | None:
    """Window Center/Width (first value) with its function, else the first VOI LUT Sequence item."""
    center = _first_number(ds.get("WindowCenter"))
    width = _first_number(ds.get("WindowWidth"))
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    if function not in WINDOW_FUNCTIONS:
        function = "LINEAR"
    min_width = 1.0 if function == "LINEAR" else 1e-9
    if center is not None and width is not None and width >= min_width:
        return Window(center=center, width=width, function=function)
    seq = ds.get("VOILUTSequence")
    if seq:
        try:
            lut_in, lut_out = _voi_lut_curve(ds)
        except Exception:
            logger.debug("VOI LUT Sequence unreadable; no window")
            return None
        lo_out, hi_out = float(lut_out.min()), float(lut_out.max())
        if not hi_out > lo_out:
            return None
        varying = np.nonzero((lut_out > lo_out) & (lut_out < hi_out))[0]
        if varying.size == 0:  # a step: the window is the step itself
            varying = np.nonzero(lut_out != lut_out[0])[0][:1]
        low = float(lut_in[max(int(varying[0]) - 1, 0)])
        high = float(lut_in[min(int(varying[-1]) + 1, lut_in.size - 1)])
        if not high > low:
            high = low + 1.0
        # LINEAR_EXACT so that limits() == (low, high)
        return Window(
            center=(low + high) / 2.0,
            width=high - low,
            function="LINEAR_EXACT",
            source="VOILUTSequence",
        )
    return None


def _voi_lut_curve(ds) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, outputs) of the first VOI LUT Sequence item, evaluated by pydicom."""
    from pydicom.pixels.processing import apply_voi

    item = ds.VOILUTSequence[0]
    n, first = int(item.LUTDescriptor[0]) or 65536, int(item.LUTDescriptor[1])
    lut_in = np.arange(first, first + n, dtype=np.int64)
    dtype = np.int32 if lut_in.min() < 0 or lut_in.max() > 65535 else np.uint16
    lut_out = apply_voi(lut_in.astype(dtype), ds, index=0)
    return lut_in.astype(np.float64), np.asarray(lut_out, dtype=np.float64)


def _spacing(ds, name: str) -> tuple[tuple[float, float], str]:
    for tag in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(tag)
        try:
            if value is not None and len(value) == 2:
                sy, sx = float(value[0]), float(value[1])
                if sy > 0 and sx > 0 and math.isfinite(sy) and math.isfinite(sx):
                    return (sy, sx), tag
        except (TypeError, ValueError):
            continue
    logger.warning(
        "%s: no PixelSpacing or ImagerPixelSpacing; using 1 mm per pixel, so millimetre figures "
        "are in pixels",
        name,
    )
    return (1.0, 1.0), "default"


def parse_text(text: str) -> tuple[str | None, str | None]:
    """(laterality, view) from free text such as 'Mass-Test_P_00173_LEFT_CC' or 'R MLO'."""
    laterality = view = None
    for token in re.split(r"[^A-Z0-9]+", str(text).upper()):
        if not token:
            continue
        m = _COMBINED.match(token)
        if m:
            laterality = laterality or _LATERALITY_WORDS[m.group(1)]
            view = view or m.group(2)
        elif token in ("LEFT", "RIGHT") or (token in ("L", "R")):
            laterality = laterality or _LATERALITY_WORDS[token]
        elif token in KNOWN_VIEWS:
            view = view or token
    return laterality, view


def _text_fields(ds) -> Iterator[str]:
    for tag in _TEXT_TAGS:
        value = ds.get(tag)
        if value:
            yield str(value)


def _laterality_tag(value) -> str | None:
    v = str(value or "").strip().upper()
    return v if v in ("L", "R") else None


def _view_from_code_sequence(ds) -> str | None:
    seq = ds.get("ViewCodeSequence")
    if not seq:
        return None
    item = seq[0]
    code = str(item.get("CodeValue", "") or "").strip()
    if code in VIEW_CODES:
        return VIEW_CODES[code]
    meaning = re.sub(r"[^a-z]", "", str(item.get("CodeMeaning", "") or "").lower())
    for key, view in _VIEW_MEANINGS:
        if key in meaning:
            return view
    return None


def _patient_orientation(ds) -> tuple[str, ...] | None:
    value = ds.get("PatientOrientation")
    if not value:
        return None
    parts = [str(v).strip().upper() for v in (value if not isinstance(value, str) else [value])]
    if len(parts) != 2 or not all(p and set(p) <= set("APRLHF") for p in parts):
        return None  # e.g. CBIS-DDSM writes 'MLO' here
    return tuple(parts)


def chest_wall_side_from_pixels(display: np.ndarray) -> str | None:
    """'left' or 'right': the image edge the breast touches (display pixels: tissue bright)."""
    img = np.asarray(display, dtype=np.float32)
    step = max(1, int(math.ceil(max(img.shape) / 512)))
    small = img[::step, ::step]
    rows, cols = small.shape
    # drop film borders and edge artefacts
    mr, mc = max(1, rows * 3 // 100), max(1, cols * 3 // 100)
    small = small[mr : rows - mr, mc : cols - mc]
    finite = small[np.isfinite(small)]
    if finite.size == 0 or finite.max() <= finite.min():
        return None
    try:
        from skimage.filters import threshold_otsu
        from skimage.measure import label

        mask = small > threshold_otsu(finite)
        labels = label(mask, connectivity=1)
        if labels.max() > 0:
            counts = np.bincount(labels.ravel())
            counts[0] = 0
            mask = labels == int(np.argmax(counts))
    except ImportError:  # pragma: no cover - scikit-image is a dependency
        mask = small > (finite.min() + finite.max()) / 2
    band = max(1, mask.shape[1] // 5)
    left, right = float(mask[:, :band].sum()), float(mask[:, -band:].sum())
    if max(left, right) < 1 or max(left, right) < 2.0 * min(left, right):
        return None  # no clear chest wall edge
    return "left" if left > right else "right"


def chest_wall_side(record: MammogramRecord) -> tuple[str | None, str]:
    """(side, source): the image edge holding the chest wall, from Patient Orientation else pixels."""
    po = record.patient_orientation
    if po:
        row_dir = po[0]
        if "A" in row_dir and "P" not in row_dir:
            return (
                "left",
                "PatientOrientation",
            )  # columns run toward anterior: chest wall at column 0
        if "P" in row_dir and "A" not in row_dir:
            return "right", "PatientOrientation"
    return chest_wall_side_from_pixels(record.display_pixels()), "image"


def _safe_str(ds, tag: str) -> str:
    value = ds.get(tag)
    return str(value) if value is not None else ""


def _record_from_dataset(
    ds, name: str, frame: int | None, n_frames: int, pixels: np.ndarray, value_range
) -> MammogramRecord:
    """Collect window, spacing, laterality, view and UIDs into the record."""
    photometric = str(ds.PhotometricInterpretation).strip().upper()
    window = _window(ds)
    spacing, spacing_source = _spacing(ds, name)
    notes: list[str] = []
    if spacing_source == "default":
        notes.append("no pixel spacing in the file: 1 mm per pixel assumed")

    # laterality
    laterality, lat_source = _laterality_tag(ds.get("ImageLaterality")), "ImageLaterality"
    if laterality is None:
        laterality, lat_source = _laterality_tag(ds.get("Laterality")), "Laterality"
    text_lat = text_view = None
    for text in _text_fields(ds):
        t_lat, t_view = parse_text(text)
        text_lat, text_view = text_lat or t_lat, text_view or t_view
    if laterality is None and text_lat is not None:
        laterality, lat_source = text_lat, "text"

    # view
    view, view_source = _view_from_code_sequence(ds), "ViewCodeSequence"
    if view is None:
        view = parse_text(_safe_str(ds, "ViewPosition"))[1]
        view_source = "ViewPosition"
    if view is None and text_view is not None:
        view, view_source = text_view, "text"
    if view is None:
        view_source = "unknown"

    record = MammogramRecord(
        pixels=pixels,
        photometric=photometric,
        window=window,
        spacing_mm=spacing,
        spacing_source=spacing_source,
        laterality=laterality,
        laterality_source=lat_source if laterality else "unknown",
        view=view,
        view_source=view_source,
        sop_instance_uid=_safe_str(ds, "SOPInstanceUID"),
        study_instance_uid=_safe_str(ds, "StudyInstanceUID"),
        series_instance_uid=_safe_str(ds, "SeriesInstanceUID"),
        bits_stored=int(ds.get("BitsStored", 16) or 16),
        source=name,
        frame=frame,
        value_range=value_range,
        patient_orientation=_patient_orientation(ds),
        transfer_syntax=ds.file_meta.TransferSyntaxUID.name,
        transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
        modality=_safe_str(ds, "Modality"),
        sop_class=_uid_name(_safe_str(ds, "SOPClassUID")),
        number_of_frames=n_frames,
        notes=tuple(notes),
    )
    return record


def read_mammogram(path: str | Path, *, frame: int | None = None) -> MammogramRecord:
    """Read one DICOM mammogram (or frame ``frame`` of a multi-frame object) into a record."""
    path = Path(path)
    name = path.name
    if path.is_dir():
        raise NotDicomError(
            f"{name} is a folder, not a file; use read_directory() to open a folder."
        )
    if not path.is_file():
        raise NotDicomError(f"{name} does not exist or is not a file; check the path.")
    with _quiet_pydicom():
        try:
            ds = _read_dataset(path, name)
            n_frames = _check_image(ds, name, frame)
            raw = _decode(ds, name, frame, n_frames)
            pixels, value_range = _modality(ds, raw)
            record = _record_from_dataset(ds, name, frame, n_frames, pixels, value_range)
        except DicomReadError:
            raise
        except OSError as exc:
            raise NotDicomError(
                f"{name} cannot be read ({type(exc).__name__}); check that the file exists and "
                "that you may read it."
            ) from None
        except Exception as exc:
            raise CorruptPixelDataError(
                f"{name}: a damaged DICOM element prevents reading ({type(exc).__name__}). "
                "Export the image again from the PACS or modality."
            ) from None
    if record.laterality is None and record.modality.upper() not in NON_MAMMO_MODALITIES:
        side = chest_wall_side_from_pixels(record.display_pixels())
        if side is not None:
            from dataclasses import replace

            record = replace(
                record,
                laterality="L" if side == "left" else "R",
                laterality_source="image",
                notes=record.notes + ("laterality guessed from the image (chest wall side)",),
            )
    logger.info(
        "read %s: %s (laterality from %s, view from %s), SOPInstanceUID %s",
        name,
        record.name,
        record.laterality_source,
        record.view_source,
        record.sop_instance_uid,
    )
    return record


def read_directory(path: str | Path) -> list[MammogramRecord]:
    """Readable images among a folder's *.dcm, *.dicom and extension-less DICOM files (not recursive)."""
    records, _errors = read_directory_with_errors(path)
    return records


def read_directory_with_errors(
    path: str | Path,
) -> tuple[list[MammogramRecord], list[tuple[str, DicomReadError]]]:
    """Like ``read_directory`` but also return (file name, typed error) for every file that failed."""
    folder = Path(path)
    if not folder.is_dir():
        raise NotDicomError(
            f"{folder.name} is not a folder; use read_mammogram() for a single file."
        )
    records: list[MammogramRecord] = []
    errors: list[tuple[str, DicomReadError]] = []
    for file in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        if file.name.upper() == "DICOMDIR":
            continue  # the index of a DICOM medium, not an image
        suffix = file.suffix.lower()
        if not (suffix in (".dcm", ".dicom") or (suffix == "" and has_dicm_prefix(file))):
            continue
        try:
            records.append(read_mammogram(file))
        except DicomReadError as exc:
            logger.warning("skipped %s: %s", file.name, exc)
            errors.append((file.name, exc))
    return records, errors


def has_dicm_prefix(file: Path) -> bool:
    """True when the file has the 128-byte preamble followed by b"DICM"."""
    try:
        with open(file, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"
